//! Quotas and rate limits, answered with the Sprites error codes
//! (`sprite_creation_rate_limited`, `concurrent_sprite_limit_exceeded`) as
//! 429 with `Retry-After` and `X-RateLimit-*` headers.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::json;

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
}
