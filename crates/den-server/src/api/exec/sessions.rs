//! `GET /exec` without an upgrade (the session list) and `HEAD /exec`.

use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use den_agent::protocol::SessionSummary;
use den_sprite::{SpriteInfo, SpriteStatus};
use serde_json::{Value, json};

use crate::auth::SpriteRef;
use crate::error::ApiResult;
use crate::state::AppState;

fn rfc3339(unix_s: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_s)).to_string()
}

fn session_json(s: &SessionSummary, now: u64) -> Value {
    let age = now.saturating_sub(s.created).max(1);
    json!({
        "id": s.id,
        "command": s.command,
        "workdir": s.workdir,
        "created": rfc3339(s.created),
        "bytes_per_second": s.bytes_out as f64 / age as f64,
        "is_active": s.clients > 0,
        "last_activity": rfc3339(s.last_activity),
        "tty": s.tty,
    })
}

/// The sessions of a sprite. A cold sprite has none, so it is not booted
/// just to say so.
pub(super) async fn list(st: &AppState, name: &str, info: &SpriteInfo) -> ApiResult<Json<Value>> {
    let sessions = if info.status == SpriteStatus::Cold {
        Vec::new()
    } else {
        let activity = st.mgr.wake(name).await?;
        activity.agent().list_sessions().await?
    };
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let list: Vec<Value> = sessions.iter().map(|s| session_json(s, now)).collect();
    Ok(Json(json!({"count": list.len(), "sessions": list})))
}

/// Version probe: 200 with the `Sprite-Version` header (the Go SDK reads it
/// to pick the attach URL form).
#[utoipa::path(head, path = "/v1/sprites/{name}/exec", params(("name" = String, Path)),
    responses((status = 200), (status = 404)))]
pub async fn head(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<StatusCode> {
    st.mgr.get(&name)?;
    Ok(StatusCode::OK)
}
