//! The tools' one way to act: an in-process request to the `/v1` router,
//! with the caller's credentials, answered exactly as over HTTP.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::ORG_HEADER;

/// What a failed call tells the agent: the API's status and clean message.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

pub type Outcome<T> = Result<T, Failure>;

/// The `/v1` API as one caller sees it.
pub struct Api {
    router: Arc<Router>,
    /// The caller's credentials and the request's id, copied to every call.
    headers: HeaderMap,
    peer: Option<ConnectInfo<std::net::SocketAddr>>,
}

impl Api {
    pub fn new(router: Arc<Router>, parts: &Parts) -> Api {
        let mut headers = HeaderMap::new();
        for name in [
            header::AUTHORIZATION,
            ORG_HEADER,
            header::HeaderName::from_static("x-request-id"),
        ] {
            if let Some(v) = parts.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        Api {
            router,
            headers,
            peer: parts.extensions.get().cloned(),
        }
    }

    /// `/seg/seg…?query`: every byte of a segment but `[A-Za-z0-9_~-]` is
    /// percent-encoded (dots too, so `..` can't climb), so a name can't
    /// reach another route or smuggle a query.
    pub fn url(segments: &[&str], query: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for seg in segments {
            out.push('/');
            for b in seg.bytes() {
                if b.is_ascii_alphanumeric() || b"_~-".contains(&b) {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
        }
        if !query.is_empty() {
            out.push('?');
            out.push_str(
                &url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(query)
                    .finish(),
            );
        }
        out
    }

    /// One request; the response as the router gives it (status, streamed body).
    pub async fn send(&self, method: Method, uri: &str, body: Body, json: bool) -> Outcome<Response> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(body)
            .map_err(|e| Failure::invalid(format!("bad request: {e}")))?;
        req.headers_mut().extend(self.headers.clone());
        if json {
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/json".parse().expect("a header value"),
            );
        }
        if let Some(p) = self.peer {
            req.extensions_mut().insert(p);
        }
        let resp = Router::clone(&self.router)
            .oneshot(req)
            .await
            .unwrap_or_else(|never| match never {});
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(failure(resp).await)
        }
    }

    /// A JSON call answered with JSON (or nothing).
    pub async fn json(&self, method: Method, uri: &str, body: Option<Value>) -> Outcome<Value> {
        let has_body = body.is_some();
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = self.send(method, uri, body, has_body).await?;
        let bytes = read_all(resp.into_body(), RESPONSE_CAP).await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Failure::new(StatusCode::BAD_GATEWAY, "internal", e.to_string()))
    }

    /// A call answered with NDJSON progress (checkpoint, restore, service
    /// events): its lines, or the failure an `error` line reports.
    pub async fn ndjson(&self, method: Method, uri: &str, body: Option<Value>) -> Outcome<Vec<Value>> {
        let has_body = body.is_some();
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let resp = self.send(method, uri, body, has_body).await?;
        let bytes = read_all(resp.into_body(), RESPONSE_CAP).await?;
        let lines: Vec<Value> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        if let Some(err) = lines.iter().find(|l| l["type"] == "error") {
            let text = err["error"].as_str().or(err["data"].as_str()).unwrap_or("failed");
            return Err(Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "error", text));
        }
        Ok(lines)
    }
}

/// Largest response a tool reads whole (listings, progress streams, logs).
pub const RESPONSE_CAP: usize = 8 << 20;

/// The body, up to `cap` bytes (more is a failure, not a silent cut).
pub async fn read_all(body: Body, cap: usize) -> Outcome<Bytes> {
    let limited = http_body_util::Limited::new(body, cap);
    limited.collect().await.map(|c| c.to_bytes()).map_err(|e| {
        Failure::new(
            StatusCode::BAD_GATEWAY,
            "internal",
            format!("reading the answer: {e}"),
        )
    })
}

/// The API's error answer (`{"error","message"}`, or plain text) as a failure.
async fn failure(resp: Response) -> Failure {
    let status = resp.status();
    let bytes = read_all(resp.into_body(), 1 << 16).await.unwrap_or_default();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) if v["message"].is_string() => Failure::new(
            status,
            v["error"].as_str().unwrap_or("error"),
            v["message"].as_str().unwrap_or_default(),
        ),
        _ => {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            let text = if text.is_empty() {
                status.canonical_reason().unwrap_or("failed").to_string()
            } else {
                text
            };
            Failure::new(status, "error", text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_their_segment() {
        assert_eq!(
            Api::url(
                &["v1", "sprites", "a/../../tokens?x=1#y", "fs", "read"],
                &[("path", "/a b&c")]
            ),
            "/v1/sprites/a%2F%2E%2E%2F%2E%2E%2Ftokens%3Fx%3D1%23y/fs/read?path=%2Fa+b%26c"
        );
        assert_eq!(Api::url(&["v1", "sprites", ".."], &[]), "/v1/sprites/%2E%2E");
    }
}
