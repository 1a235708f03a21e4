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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            plain: false,
            limited: None,
        }
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
        }
    }
    pub fn plain(mut self) -> Self {
        self.plain = true;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        if let Some(l) = self.limited {
            return l.into_response();
        }
        if self.plain {
            return (self.status, self.message).into_response();
        }
        let mut resp = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
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
            SpriteError::NotFound(name) => ApiError::not_found(format!("sprite not found: {name}")),
            SpriteError::Exists(name) => ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("sprite {name:?} already exists"),
            ),
            SpriteError::Invalid(m) => ApiError::bad_request(m),
            SpriteError::Conflict(m) => ApiError::conflict(m),
            SpriteError::CheckpointNotFound { .. } => ApiError::not_found(msg),
            SpriteError::AwakeLimit { awake, limit } => {
                ApiError::limited(crate::limits::Limited::awake(awake, limit))
            }
            SpriteError::NotOwner(_) | SpriteError::Store(StoreError::Fenced(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "sprite_moved", msg)
            }
            SpriteError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            ),
            SpriteError::BootTimeout { .. } | SpriteError::BootFailed { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", msg)
            }
            SpriteError::Store(StoreError::InvalidArgument(m)) => ApiError::bad_request(m),
            SpriteError::Store(StoreError::CheckpointNotFound { .. }) => ApiError::not_found(msg),
            SpriteError::Store(StoreError::NotDurable { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "checkpoint_not_durable", msg)
            }
            _ => ApiError::internal(msg),
        }
    }
}

impl From<den_agent::Error> for ApiError {
    fn from(e: den_agent::Error) -> Self {
        match &e {
            den_agent::Error::Agent { code, message } => match code.as_str() {
                "not_found" => ApiError::not_found(message.clone()),
                "bad_request" => ApiError::bad_request(message.clone()),
                "not_running" => ApiError::conflict(message.clone()),
                _ => ApiError::internal(e.to_string()),
            },
            _ => ApiError::internal(e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
