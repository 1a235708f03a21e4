//! API errors in the Sprites shape: `{"error": "<code>", "message": "…"}`
//! with the status the SDKs expect.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use den_sprite::SpriteError;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as plain text instead of JSON (the Sprites policy endpoint does so).
    pub plain: bool,
    /// Set for 429s: their body and headers carry the limit.
    pub limited: Option<Box<crate::limits::Limited>>,
    /// `Retry-After` (seconds) of a retryable 503: the request lost a race
    /// with a lifecycle change (a restore, a stop) and will work once it is over.
    pub retry_after: Option<u32>,
    /// Also carries the message in the list form `"errors": [message]`,
    /// which the Sprites reference shows for validation errors.
    pub listed: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            plain: false,
            limited: None,
            retry_after: None,
            listed: false,
        }
    }
    /// A 400 whose body also has the list form:
    /// `{"error":"bad_request","message":m,"errors":[m]}`.
    pub fn validation(message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.listed = true;
        e
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// Visible to the caller, but not allowed to it.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    /// A quota or rate limit (429 with the Sprites fields and headers).
    pub fn limited(l: crate::limits::Limited) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: l.code,
            message: l.message.clone(),
            plain: false,
            limited: Some(Box::new(l)),
            retry_after: None,
            listed: false,
        }
    }
    pub fn plain(mut self) -> Self {
        self.plain = true;
        self
    }
    /// A 503 the client should retry after `secs` seconds.
    pub fn retry_later(code: &'static str, message: impl Into<String>, secs: u32) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        e.retry_after = Some(secs);
        e
    }
    /// A failure inside den: the client gets what failed, in one short line,
    /// and a reference; the details (which may hold a helper's raw log,
    /// with colour codes and paths) go to the server log under that reference.
    pub fn internal_logged(what: &str, detail: &dyn std::fmt::Display) -> Self {
        let reference = log_with_reference(what, detail);
        Self::internal(format!(
            "internal error: {what} failed (reference {reference}; details in the server log)"
        ))
    }
}

/// Log `detail` of a failure of `what` under a new reference, and return it.
fn log_with_reference(what: &str, detail: &dyn std::fmt::Display) -> String {
    let reference = format!("{:08x}", rand::random::<u32>());
    tracing::error!(reference = %reference, error = %detail, "{what} failed");
    reference
}

/// Longest message of a 5xx answer.
const MAX_SERVER_ERROR_MESSAGE: usize = 300;

/// One clean line of `raw` for a client: ANSI escape sequences and other
/// control characters removed, the first non-empty line only, bounded.
pub fn one_clean_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_SERVER_ERROR_MESSAGE));
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI (`ESC [ … final`), OSC (`ESC ] … BEL|ESC \\`), or a two-byte escape.
                match chars.next() {
                    Some('[') => {
                        for c in chars.by_ref() {
                            if ('\u{40}'..='\u{7e}').contains(&c) {
                                break;
                            }
                        }
                    }
                    Some(']') => {
                        while let Some(c) = chars.next() {
                            if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
            '\n' | '\r' if !out.trim().is_empty() => break,
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    let out = out.trim();
    match out.char_indices().nth(MAX_SERVER_ERROR_MESSAGE) {
        Some((i, _)) => format!("{}…", &out[..i]),
        None => out.to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut message = self.message;
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %message, "request failed");
            // Whatever built it, a server error's message is one clean line.
            message = one_clean_line(&message);
        }
        if let Some(l) = self.limited {
            return l.into_response();
        }
        let mut resp = if self.plain {
            (self.status, message).into_response()
        } else if self.listed {
            let body = json!({"error": self.code, "message": message, "errors": [message]});
            (self.status, Json(body)).into_response()
        } else {
            (self.status, Json(json!({"error": self.code, "message": message}))).into_response()
        };
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        // A rejected oversize body is left unread on the wire, so this connection
        // cannot carry another request. Without the header a client pools it and
        // its next request dies with "connection closed before message completed".
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

impl From<SpriteError> for ApiError {
    fn from(e: SpriteError) -> Self {
        use den_store::StoreError;
        let msg = e.to_string();
        match e {
            // Messages name a sprite as its users do, never by its key.
            SpriteError::NotFound(key) => {
                ApiError::not_found(format!("sprite not found: {}", den_sprite::key_parts(&key).1))
            }
            SpriteError::Exists(key) => ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("sprite {:?} already exists", den_sprite::key_parts(&key).1),
            ),
            SpriteError::Invalid(m) => ApiError::bad_request(m),
            SpriteError::Conflict(m) => ApiError::conflict(m),
            SpriteError::CheckpointNotFound { .. } | SpriteError::ServiceNotFound { .. } => {
                ApiError::not_found(msg)
            }
            SpriteError::AwakeLimit { awake, limit } => {
                ApiError::limited(crate::limits::Limited::awake(awake, limit))
            }
            SpriteError::Quota {
                message,
                limit,
                current,
            } => ApiError::limited(crate::limits::Limited::quota(message, limit, current)),
            SpriteError::NotOwner(_) | SpriteError::Store(StoreError::Fenced(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sprite_moved", msg)
            }
            SpriteError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ),
            SpriteError::BootTimeout { sprite, after, .. } => {
                tracing::warn!(error = %msg, "sprite did not become ready");
                ApiError::retry_later(
                    "not_ready",
                    format!("sprite {sprite} did not become ready within {after:?}"),
                    1,
                )
            }
            SpriteError::BootFailed { sprite, detail } => {
                let reference = log_with_reference("starting the sprite", &detail);
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    format!(
                        "sprite {sprite} failed to start (reference {reference}; details in the server log)"
                    ),
                )
            }
            SpriteError::Store(StoreError::InvalidArgument(m)) => ApiError::bad_request(m),
            SpriteError::Store(StoreError::CheckpointNotFound { .. }) => ApiError::not_found(msg),
            SpriteError::Store(StoreError::NotDurable { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "checkpoint_not_durable", msg)
            }
            // A race with a delete: the sprite existed when the request began.
            SpriteError::Store(StoreError::VolumeNotFound(_)) => {
                ApiError::not_found("the sprite's disk is gone: the sprite was deleted meanwhile")
            }
            SpriteError::Store(StoreError::VolumeBusy(_)) => ApiError::conflict(msg),
            SpriteError::Store(StoreError::ShuttingDown) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ),
            SpriteError::Agent(e) => e.into(),
            SpriteError::Store(e) => ApiError::internal_logged("storage", &e),
            SpriteError::Block(e) => ApiError::internal_logged("the block device", &e),
            SpriteError::Runtime(e) => ApiError::internal_logged("the container runtime", &e),
            SpriteError::Image(e) => ApiError::internal_logged("the base image", &e),
            SpriteError::Net(e) => ApiError::internal_logged("networking", &e),
            SpriteError::Catalog(e) => ApiError::internal_logged("the sprite catalog", &e),
            SpriteError::Io { .. } => ApiError::internal_logged("an internal operation", &msg),
        }
    }
}

/// Whether an agent call failed because the agent went away: the sprite was
/// stopped, restored or restarted under the request.
pub fn agent_gone(e: &den_agent::Error) -> bool {
    match e {
        den_agent::Error::Io(_) => true,
        den_agent::Error::Protocol(m) => m.contains("closed the connection"),
        _ => false,
    }
}

impl From<den_agent::Error> for ApiError {
    fn from(e: den_agent::Error) -> Self {
        match &e {
            den_agent::Error::Agent { code, message } => match code.as_str() {
                "not_found" => ApiError::not_found(message.clone()),
                "bad_request" => ApiError::bad_request(message.clone()),
                "not_running" => ApiError::conflict(message.clone()),
                _ => ApiError::internal_logged("the sprite's agent", &e),
            },
            e if agent_gone(e) => {
                tracing::info!(error = %e, "the sprite's agent went away during a request");
                ApiError::retry_later(
                    "sprite_unavailable",
                    "the sprite is restarting (a restore, stop or wake happened meanwhile); retry",
                    1,
                )
            }
            _ => ApiError::internal_logged("the sprite's agent", &e),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(e: ApiError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = e.into_response();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    /// What the runtime shim printed when a rootfs could not be prepared:
    /// coloured tracing lines.
    const SHIM_LOG: &str = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \
        \u{1b}[2mden::shim\u{1b}[0m: failed to prepare rootfs: /var/cache/den/images/debian-7/idmapped: \
        No such file or directory\n    at crates/den-runtime/src/shim.rs:120\n";

    #[tokio::test]
    async fn runtime_failure_answers_a_short_clean_message_without_the_shim_log() {
        let e = SpriteError::Runtime(den_runtime::RuntimeError::Shim {
            status: "exit status: 1".into(),
            stderr: SHIM_LOG.into(),
        });
        let (status, _, body) = answer(e.into()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "internal");
        let m = body["message"].as_str().unwrap();
        assert!(!m.contains('\u{1b}') && !m.contains('\n'), "{m:?}");
        assert!(
            !m.contains("/var/cache") && !m.contains("shim.rs"),
            "no raw log: {m:?}"
        );
        assert!(
            m.contains("container runtime") && m.contains("reference"),
            "{m:?}"
        );
        assert!(m.len() < 200, "{m:?}");
    }

    #[tokio::test]
    async fn boot_failure_names_the_sprite_not_the_log() {
        let e = SpriteError::BootFailed {
            sprite: "s1".into(),
            detail: SHIM_LOG.into(),
        };
        let (status, _, body) = answer(e.into()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let m = body["message"].as_str().unwrap();
        assert!(m.starts_with("sprite s1 failed to start"), "{m:?}");
        assert!(!m.contains('\u{1b}') && !m.contains("rootfs"), "{m:?}");
    }

    #[tokio::test]
    async fn any_server_error_message_is_one_clean_line() {
        let (_, _, body) = answer(ApiError::internal(SHIM_LOG)).await;
        let m = body["message"].as_str().unwrap();
        assert!(!m.contains('\u{1b}') && !m.contains('\n'), "{m:?}");
        assert!(
            m.starts_with("2026-01-01T00:00:00Z ERROR den::shim: failed"),
            "{m:?}"
        );
        let (_, _, body) = answer(ApiError::internal("x".repeat(5000))).await;
        assert!(body["message"].as_str().unwrap().chars().count() <= MAX_SERVER_ERROR_MESSAGE + 1);
    }

    #[test]
    fn one_clean_line_strips_escapes_and_controls() {
        assert_eq!(one_clean_line("\u{1b}[1;31mred\u{1b}[0m text"), "red text");
        assert_eq!(one_clean_line("\u{1b}]0;title\u{7}after"), "after");
        assert_eq!(one_clean_line("\n\nfirst\r\nsecond"), "first");
        assert_eq!(one_clean_line("tab\there\u{0}"), "tabhere");
        assert_eq!(one_clean_line("plain"), "plain");
    }

    /// How an agent call fails when the sprite is stopped under it.
    fn agent_gone_errors() -> Vec<den_agent::Error> {
        vec![
            den_agent::Error::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            den_agent::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            den_agent::Error::Protocol("agent closed the connection without answering".into()),
        ]
    }

    #[tokio::test]
    async fn agent_gone_under_a_restore_is_a_retryable_503() {
        let direct = agent_gone_errors().into_iter().map(ApiError::from);
        let wrapped = agent_gone_errors()
            .into_iter()
            .map(|e| ApiError::from(SpriteError::Agent(e)));
        for api in direct.chain(wrapped) {
            let (status, headers, body) = answer(api).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(headers[axum::http::header::RETRY_AFTER], "1");
            assert_eq!(body["error"], "sprite_unavailable");
        }
    }

    #[tokio::test]
    async fn volume_gone_under_a_delete_is_404_not_500() {
        let e = SpriteError::Store(den_store::StoreError::VolumeNotFound("v1".into()));
        let (status, _, body) = answer(e.into()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
    }
}
