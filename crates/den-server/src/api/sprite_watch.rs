//! `GET /v1/sprites` with `Accept: application/x-ndjson`
//! (`client.watchSprites()` of the JS SDK): a live stream of the sprites'
//! states, one JSON object per line:
//!
//! ```text
//! {"type":"sprite","name","status","running_version","last_running_at","last_warming_at",
//!  "timestamp","org":{"name","running","warm","cold","running_limit","warm_limit"}}
//! ```
//!
//! First one `sprite` line per sprite the token sees (matching `prefix`),
//! then one per change (created, status changed; `"type":"deleted"` for a
//! deleted one), and a `heartbeat` line (counts only) every
//! [`HEARTBEAT`]. Changes come from the sprite manager's broadcast, not from
//! polling. A client that falls behind the broadcast's buffer gets the
//! whole list again instead (a resync); one that stops reading holds at
//! most the stream's few queued lines.
//!
//! In a cluster, changes are those of the sprites the serving node runs;
//! sprites living on other nodes appear in the first lines and resyncs only
//! (with their owners' statuses, as in the list).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use den_sprite::{SpriteEvent, SpriteInfo, SpriteStatus};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::api::checkpoints::async_stream;
use crate::auth::Principal;
use crate::sprite_json::rfc3339_ms;
use crate::state::AppState;

/// Idle streams get a line this often, so proxies keep them open and
/// clients see the counts.
pub const HEARTBEAT: Duration = Duration::from_secs(30);

/// Whether a list request asks for the stream.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("application/x-ndjson")))
}

struct Watch {
    st: AppState,
    caller: Principal,
    prefix: String,
}

impl Watch {
    fn visible(&self, info: &SpriteInfo) -> bool {
        self.caller.sees(&info.record.name) && info.record.short_name().starts_with(&self.prefix)
    }

    /// The organisation's counts, over the sprites this token sees.
    fn org(&self) -> Value {
        let (mut running, mut warm, mut cold) = (0, 0, 0);
        for s in self.st.mgr.list() {
            if !self.caller.sees(&s.record.name) {
                continue;
            }
            match s.status {
                SpriteStatus::Running => running += 1,
                SpriteStatus::Warm => warm += 1,
                SpriteStatus::Cold => cold += 1,
            }
        }
        json!({
            "name": self.caller.org,
            "running": running,
            "warm": warm,
            "cold": cold,
            "running_limit": Value::Null,
            "warm_limit": Value::Null,
        })
    }

    fn line(&self, kind: &str, info: &SpriteInfo, status: &str) -> Bytes {
        let r = &info.record;
        let v = json!({
            "type": kind,
            "name": r.short_name(),
            "status": status,
            "running_version": env!("CARGO_PKG_VERSION"),
            "last_running_at": r.last_running_at_ms.map(rfc3339_ms),
            "last_warming_at": r.last_warming_at_ms.map(rfc3339_ms),
            "timestamp": now(),
            "org": self.org(),
        });
        ndjson(&v)
    }

    async fn snapshot(&self) -> Vec<Bytes> {
        if self.st.cluster.is_some() {
            // Other nodes create and delete sprites too (as the list does).
            if let Err(e) = self.st.mgr.refresh_all().await {
                tracing::warn!(error = %e, "refreshing the sprite list for a watcher");
            }
        }
        let mut all: Vec<SpriteInfo> = self
            .st
            .mgr
            .list()
            .into_iter()
            .filter(|s| self.visible(s))
            .collect();
        // In a cluster a sprite's status is its owner's.
        if let Some(c) = &self.st.cluster
            && let Ok(p) = crate::cluster_api::placements(c, &all).await
        {
            for s in &mut all {
                if let Some(status) = p.get(&s.record.name).and_then(|p| p.status) {
                    s.status = status;
                }
            }
        }
        all.sort_by(|a, b| a.record.short_name().cmp(b.record.short_name()));
        all.iter()
            .map(|s| self.line("sprite", s, s.status.as_str()))
            .collect()
    }

    fn event(&self, ev: &SpriteEvent) -> Option<Bytes> {
        match ev {
            SpriteEvent::Changed(info) if self.visible(info) => {
                Some(self.line("sprite", info, info.status.as_str()))
            }
            SpriteEvent::Deleted(info) if self.visible(info) => Some(self.line("deleted", info, "deleted")),
            _ => None,
        }
    }

    fn heartbeat(&self) -> Bytes {
        ndjson(&json!({"type": "heartbeat", "timestamp": now(), "org": self.org()}))
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn ndjson(v: &Value) -> Bytes {
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

/// The stream's response; `prefix` filters by name like the list does.
pub fn stream(st: AppState, caller: Principal, prefix: Option<String>) -> Response {
    // Subscribed before the first lines are made, so no change falls in
    // between (at worst one is seen twice).
    let mut rx = st.mgr.subscribe();
    let shutdown = st.shutdown.clone();
    let w = Watch {
        st,
        caller,
        prefix: prefix.unwrap_or_default(),
    };
    let body = async_stream(move |tx| async move {
        let send_all = |lines: Vec<Bytes>| {
            let tx = tx.clone();
            async move {
                for l in lines {
                    if tx.send(l).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        if !send_all(w.snapshot().await).await {
            return;
        }
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        loop {
            let lines = tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => w.event(&ev).into_iter().collect(),
                    // Fell behind: start over from the current states.
                    Err(RecvError::Lagged(_)) => {
                        // The snapshot covers the backlog: skip it.
                        rx = rx.resubscribe();
                        w.snapshot().await
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = beat.tick() => vec![w.heartbeat()],
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            };
            if !send_all(lines).await {
                return;
            }
        }
    });
    use futures::StreamExt;
    let mut resp = Response::new(Body::from_stream(body.map(Ok::<_, std::convert::Infallible>)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_selects_the_stream() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
            wanted(&m)
        };
        assert!(h("application/x-ndjson"));
        assert!(h("text/plain, application/x-ndjson;q=0.9"));
        assert!(!h("application/json"));
        assert!(!h("*/*"));
        assert!(!wanted(&HeaderMap::new()));
    }
}
