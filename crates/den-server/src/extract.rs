//! Request extractors with Sprites-shaped errors.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON body accepted.
pub(crate) const MAX_JSON: usize = 1 << 20;

/// A JSON body, whatever the `Content-Type` says (some clients omit it); an
/// empty body reads as `{}`. Malformed input is a 400 with the parser's reason.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state).await.map_err(|e| {
            // axum's own body limit (2 MiB) answers a too-large body.
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::bad_request(format!("reading the body: {e}"))
            }
        })?;
        if body.len() > MAX_JSON {
            return Err(too_large());
        }
        let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &body
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("JSON bodies are limited to {} KiB", MAX_JSON >> 10),
    )
}
