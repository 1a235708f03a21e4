//! Quotas and rate limits, answered with the Sprites error codes
//! (`sprite_creation_rate_limited`, `concurrent_sprite_limit_exceeded`) as
//! 429 with `Retry-After` and `X-RateLimit-*` headers.
//!
//! Two layers: the server's own limits (`max_sprites`, `max_awake`,
//! `create_rate` in its config) bound everyone, and each organisation's
//! [`OrgLimits`] bound its sprites within them ([`OrgQuotas`] for creates,
//! forks and checkpoints; [`OrgAdmission`] for wakes, which the sprite
//! manager consults under its admission lock).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use den_runtime::Resources;
use den_sprite::{Admission, HostCapacity, SpriteError, SpriteManager};
use parking_lot::Mutex;
use serde_json::json;

use crate::auth::{OrgLimits, TokenStore};
use crate::config::RateLimit;

/// A sliding-window counter of sprite creations.
pub struct CreateLimiter {
    rate: Option<RateLimit>,
    recent: Mutex<VecDeque<Instant>>,
}

/// A refused request: turns into the 429 the SDKs understand.
#[derive(Debug)]
pub struct Limited {
    pub code: &'static str,
    pub message: String,
    pub limit: u64,
    pub current: u64,
    pub window: Option<Duration>,
    pub retry_after: Duration,
}

impl CreateLimiter {
    pub fn new(rate: Option<RateLimit>) -> Self {
        CreateLimiter {
            rate,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    /// Count one creation, or refuse it if the window is full.
    pub fn admit(&self) -> Result<(), Limited> {
        let Some(rate) = self.rate else { return Ok(()) };
        let now = Instant::now();
        let mut recent = self.recent.lock();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= rate.window)
        {
            recent.pop_front();
        }
        if recent.len() >= rate.count as usize {
            let oldest = *recent.front().expect("full window is not empty");
            let retry_after = rate.window.saturating_sub(now.duration_since(oldest));
            return Err(Limited {
                code: "sprite_creation_rate_limited",
                message: format!(
                    "at most {} sprites may be created per {}",
                    rate.count,
                    humantime::format_duration(rate.window)
                ),
                limit: rate.count as u64,
                current: recent.len() as u64,
                window: Some(rate.window),
                retry_after,
            });
        }
        recent.push_back(now);
        Ok(())
    }
}

impl Limited {
    /// Too many sprites awake at once.
    pub fn awake(awake: usize, limit: usize) -> Self {
        Limited {
            code: "concurrent_sprite_limit_exceeded",
            message: format!(
                "{awake} sprites are awake and the limit is {limit}; let one sleep or raise max_awake"
            ),
            limit: limit as u64,
            current: awake as u64,
            window: None,
            retry_after: Duration::from_secs(30),
        }
    }

    /// Too many sprites in total.
    pub fn total(count: usize, limit: usize) -> Self {
        Limited {
            code: "sprite_limit_exceeded",
            message: format!(
                "{count} sprites exist and the limit is {limit}; destroy one or raise max_sprites"
            ),
            limit: limit as u64,
            current: count as u64,
            window: None,
            retry_after: Duration::from_secs(60),
        }
    }
}

impl Limited {
    /// Too many sprites in one organisation.
    pub fn org_total(org: &str, count: usize, limit: usize) -> Self {
        Limited {
            message: format!(
                "organisation {org} has {count} sprites and its limit is {limit}; destroy one or raise its max_sprites"
            ),
            ..Limited::total(count, limit)
        }
    }

    /// An organisation's disks and checkpoints hold its whole `max_disk_bytes`.
    pub fn disk(org: &str, used: u64, limit: u64) -> Self {
        Limited {
            code: "disk_quota_exceeded",
            message: format!(
                "organisation {org} stores {used} bytes and its max_disk_bytes is {limit}; delete checkpoints or sprites, or raise the limit"
            ),
            limit,
            current: used,
            window: None,
            retry_after: Duration::from_secs(60),
        }
    }

    /// A wake the organisation's awake, memory or CPU quota refused.
    pub fn quota(message: String, limit: u64, current: u64) -> Self {
        Limited {
            code: "concurrent_sprite_limit_exceeded",
            message,
            limit,
            current,
            window: None,
            retry_after: Duration::from_secs(30),
        }
    }
}

/// How long an organisation's stored-bytes figure is reused before it is
/// counted again.
pub const DISK_USAGE_TTL: Duration = Duration::from_secs(10);

/// The per-organisation state of the quotas on creates, forks and
/// checkpoints: create-rate windows and stored-bytes figures.
#[derive(Default)]
pub struct OrgQuotas {
    /// Each organisation's window, with the `create_rate` it was made for:
    /// a changed rate starts a fresh window.
    rates: Mutex<HashMap<String, (String, Arc<CreateLimiter>)>>,
    disk: Mutex<HashMap<String, (Instant, u64)>>,
    /// Held from the `max_sprites` count to the new sprite's insertion, so
    /// concurrent creates can't all pass the same count.
    pub creating: tokio::sync::Mutex<()>,
}

impl OrgQuotas {
    /// Count one creation in `org`'s window, if it has a `create_rate`.
    pub fn admit_create(&self, org: &str, rate: Option<&str>) -> Result<(), Limited> {
        let limiter = {
            let mut rates = self.rates.lock();
            let Some(spec) = rate else {
                rates.remove(org);
                return Ok(());
            };
            match rates.get(org) {
                Some((s, l)) if s == spec => l.clone(),
                _ => {
                    // Checked when the organisation's limits were set; a bad
                    // one stored by an older release limits nothing.
                    let Ok(parsed) = spec.parse::<RateLimit>() else {
                        return Ok(());
                    };
                    let l = Arc::new(CreateLimiter::new(Some(parsed)));
                    rates.insert(org.to_string(), (spec.to_string(), l.clone()));
                    l
                }
            }
        };
        limiter.admit()
    }

    /// Bytes `org`'s disks and checkpoints keep stored, at most
    /// [`DISK_USAGE_TTL`] old.
    /// Memory images of gVisor sprites count too.
    pub async fn disk_bytes(&self, mgr: &SpriteManager, org: &str) -> Result<u64, den_sprite::SpriteError> {
        if let Some((at, bytes)) = self.disk.lock().get(org)
            && at.elapsed() < DISK_USAGE_TTL
        {
            return Ok(*bytes);
        }
        let sprites = mgr.list();
        let names: Vec<&str> = sprites
            .iter()
            .filter(|s| s.record.org() == org)
            .map(|s| s.record.name.as_str())
            .collect();
        let total = mgr.stored_bytes(&names).await?;
        self.disk.lock().insert(org.to_string(), (Instant::now(), total));
        Ok(total)
    }

    /// `org` just stored more (a new sprite, fork or checkpoint): count it
    /// again next time rather than reuse a figure from before.
    pub fn forget_disk(&self, org: &str) {
        self.disk.lock().remove(org);
    }

    /// Refuse to store more for `org` once it holds its `max_disk_bytes`.
    pub async fn check_disk(
        &self,
        mgr: &SpriteManager,
        org: &str,
        limit: Option<u64>,
    ) -> Result<(), crate::error::ApiError> {
        let Some(limit) = limit else { return Ok(()) };
        let used = self.disk_bytes(mgr, org).await.map_err(|e| {
            crate::error::ApiError::internal_logged("counting the organisation's stored bytes", &e)
        })?;
        if used >= limit {
            return Err(crate::error::ApiError::limited(Limited::disk(org, used, limit)));
        }
        Ok(())
    }
}

/// What a sprite's limits take of an organisation's memory and CPU quotas:
/// no limit counts as the whole host.
pub fn footprint(r: &Resources, host: &HostCapacity) -> (u64, f64) {
    let memory = r.memory_bytes.unwrap_or(host.memory_bytes);
    let cpus = match (r.cpu.quota_us, r.cpu.period_us) {
        (Some(q), Some(p)) if q > 0 && p > 0 => q as f64 / p as f64,
        _ => host.cpus,
    };
    (memory, cpus)
}

/// The organisations' `max_awake`, `max_memory_mb` and `max_cpus`, as the
/// sprite manager's admission hook: asked on every wake of a cold sprite,
/// whatever woke it (exec, URL, files, services…).
pub struct OrgAdmission {
    pub tokens: Arc<TokenStore>,
    pub host: HostCapacity,
}

impl Admission for OrgAdmission {
    fn admit(
        &self,
        key: &str,
        resources: &Resources,
        awake: &[(String, Resources)],
    ) -> Result<(), SpriteError> {
        let (org, name) = den_sprite::key_parts(key);
        let Some(limits) = self.tokens.org(org).map(|o| o.limits) else {
            return Ok(());
        };
        if limits.max_awake.is_none() && limits.max_memory_mb.is_none() && limits.max_cpus.is_none() {
            return Ok(());
        }
        check_wake(
            org,
            name,
            &limits,
            footprint(resources, &self.host),
            awake
                .iter()
                .filter(|(k, _)| den_sprite::key_parts(k).0 == org)
                .map(|(_, r)| footprint(r, &self.host)),
        )
    }
}

/// Whether a sprite of `org` taking `(memory, cpus)` may wake next to the
/// organisation's awake sprites `others`.
fn check_wake(
    org: &str,
    name: &str,
    limits: &OrgLimits,
    (memory, cpus): (u64, f64),
    others: impl Iterator<Item = (u64, f64)>,
) -> Result<(), SpriteError> {
    let (mut count, mut mem_used, mut cpus_used) = (0usize, 0u64, 0f64);
    for (m, c) in others {
        count += 1;
        mem_used = mem_used.saturating_add(m);
        cpus_used += c;
    }
    if let Some(limit) = limits.max_awake
        && count >= limit
    {
        return Err(SpriteError::Quota {
            message: format!(
                "{count} sprites of organisation {org} are awake and its limit is {limit}; let one sleep or raise its max_awake"
            ),
            limit: limit as u64,
            current: count as u64,
        });
    }
    if let Some(limit_mb) = limits.max_memory_mb {
        let (used_mb, want_mb) = (mem_used >> 20, memory.div_ceil(1 << 20));
        if mem_used.saturating_add(memory) > limit_mb.saturating_mul(1 << 20) {
            return Err(SpriteError::Quota {
                message: format!(
                    "organisation {org}'s awake sprites use {used_mb} MiB of its max_memory_mb {limit_mb}; {name} needs {want_mb} MiB more"
                ),
                limit: limit_mb,
                current: used_mb,
            });
        }
    }
    if let Some(limit) = limits.max_cpus {
        // A hair of slack: quotas are whole microseconds per period.
        if cpus_used + cpus > limit + 1e-9 {
            return Err(SpriteError::Quota {
                message: format!(
                    "organisation {org}'s awake sprites use {cpus_used} of its max_cpus {limit}; {name} needs {cpus} more"
                ),
                limit: limit.ceil() as u64,
                current: cpus_used.ceil() as u64,
            });
        }
    }
    Ok(())
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let retry = self.retry_after.as_secs().max(1);
        let mut body = json!({
            "error": self.code,
            "message": self.message,
            "limit": self.limit,
            "current_count": self.current,
            "retry_after_seconds": retry,
        });
        if let Some(w) = self.window {
            body["window_seconds"] = w.as_secs().into();
        }
        let reset = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() + retry)
            .unwrap_or(0);
        let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
        let h = resp.headers_mut();
        let num = |n: u64| HeaderValue::from_str(&n.to_string()).expect("digits are a valid header");
        h.insert("retry-after", num(retry));
        h.insert("x-ratelimit-limit", num(self.limit));
        h.insert(
            "x-ratelimit-remaining",
            num(self.limit.saturating_sub(self.current)),
        );
        h.insert("x-ratelimit-reset", num(reset));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_fills_and_refuses() {
        let l = CreateLimiter::new(Some(RateLimit {
            count: 2,
            window: Duration::from_secs(3600),
        }));
        l.admit().unwrap();
        l.admit().unwrap();
        let e = l.admit().unwrap_err();
        assert_eq!(e.code, "sprite_creation_rate_limited");
        assert_eq!((e.limit, e.current), (2, 2));
        assert!(e.retry_after <= Duration::from_secs(3600) && e.retry_after > Duration::from_secs(3500));
        assert!(CreateLimiter::new(None).admit().is_ok());
    }

    #[test]
    fn org_rate_window_resets_when_the_rate_changes() {
        let q = OrgQuotas::default();
        q.admit_create("a", Some("1/1h")).unwrap();
        assert_eq!(
            q.admit_create("a", Some("1/1h")).unwrap_err().code,
            "sprite_creation_rate_limited"
        );
        // Another organisation has a window of its own.
        q.admit_create("b", Some("1/1h")).unwrap();
        q.admit_create("a", Some("2/1h")).unwrap();
        q.admit_create("a", Some("2/1h")).unwrap();
        assert!(q.admit_create("a", Some("2/1h")).is_err());
        q.admit_create("a", None).unwrap();
    }

    #[test]
    fn wake_counts_only_what_the_limits_name() {
        const GIB: u64 = 1 << 30;
        let limits = OrgLimits {
            max_awake: Some(2),
            max_memory_mb: Some(3 << 10),
            max_cpus: Some(2.0),
            ..Default::default()
        };
        let check = |others: &[(u64, f64)]| check_wake("o", "s", &limits, (GIB, 1.0), others.iter().copied());
        check(&[(GIB, 1.0)]).unwrap();
        let refused = |others: &[(u64, f64)], what: &str| match check(others) {
            Err(SpriteError::Quota { message, .. }) => assert!(message.contains(what), "{message}"),
            other => panic!("{what}: {other:?}"),
        };
        refused(&[(GIB, 0.1), (GIB, 0.1)], "max_awake");
        refused(&[(3 * GIB, 0.1)], "max_memory_mb");
        refused(&[(GIB, 1.5)], "max_cpus");
        // Exactly at the limits still fits.
        check(&[(2 * GIB, 1.0)]).unwrap();
    }

    #[test]
    fn unlimited_resources_count_as_the_whole_host() {
        let host = HostCapacity {
            memory_bytes: 8 << 30,
            cpus: 4.0,
        };
        let mut r = Resources::sprite_default();
        assert_eq!(footprint(&r, &host), (2 << 30, 1.0));
        r.memory_bytes = None;
        r.cpu.quota_us = None;
        assert_eq!(footprint(&r, &host), (8 << 30, 4.0));
    }
}
