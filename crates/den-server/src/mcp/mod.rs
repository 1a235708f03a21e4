//! `/mcp`: den's sprites as tools for coding agents, over the Model Context
//! Protocol's Streamable HTTP transport (the official Rust SDK, `rmcp`).
//!
//! Revisions: 2026-07-28 (stateless: every POST carries its own envelope,
//! no session) and the handshake revisions before it (2024-11-05 to
//! 2025-11-25: `initialize`, then `Mcp-Session-Id` on every request).
//!
//! Authorization is the REST API's, not a copy of it. `/mcp` sits behind
//! [`crate::auth::authorize`] like every route (401 without a valid token),
//! and each tool is one or two in-process requests to the `/v1` router,
//! carrying the caller's own `Authorization` (and `Den-Org`) header. So a
//! tool gets exactly the answer its REST route gives that token: the same
//! rules, hidden sprites answering "not found", viewer tokens refused, the
//! same audit entries, quotas and cluster forwarding. Nothing here decides
//! who may do what. A session never carries authority either: each request
//! of a session is authorized by the token it carries itself.
//!
//! DNS rebinding: a browser's request with an `Origin` that is not the
//! server's own (the `Host` it was sent to) is refused before anything
//! runs; clients that are not browsers send no `Origin`.

mod rest;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

/// Largest JSON-RPC message accepted (a `fs_write` of a few MiB fits).
pub const MAX_BODY: usize = 4 << 20;

/// The `/mcp` route. `api` is the authorized `/v1` router the tools call.
pub fn router(state: &AppState, api: Router) -> Router<AppState> {
    let config = StreamableHttpServerConfig::default()
        // den answers on whatever name it is reached by (sprite URLs, a
        // proxy's name): the Origin check below is the rebinding defence.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY)
        .with_cancellation_token(state.shutdown.child_token())
        .with_sse_keep_alive(Some(Duration::from_secs(15)));
    let api = Arc::new(api);
    let service = StreamableHttpService::new(
        move || Ok(DenMcp { api: api.clone() }),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let sessions = Arc::new(Sessions::default());
    Router::new()
        .route_service("/mcp", service)
        .route_layer(axum::middleware::from_fn(check_message))
        .route_layer(axum::middleware::from_fn(move |req, next| {
            bind_session(sessions.clone(), req, next)
        }))
        .route_layer(axum::middleware::from_fn(check_origin))
}

/// How long a session may go unused before its binding is forgotten (rmcp
/// ends it after 5 idle minutes; a forgotten one answers 404, on which the
/// client starts a new session, as the spec says).
const SESSION_IDLE: Duration = Duration::from_secs(3600);

/// Which token opened each handshake-era session: a session belongs to it,
/// and another token presenting its id is told it does not exist. (A
/// session carries no authority anyway: each request is authorized by its
/// own token. This keeps one token off another's session stream.)
#[derive(Default)]
struct Sessions(parking_lot::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>);

async fn bind_session(sessions: Arc<Sessions>, req: Request, next: Next) -> Response {
    let Some(token) = req
        .extensions()
        .get::<crate::auth::Principal>()
        .map(|p| p.token.id.clone())
    else {
        return ApiError::unauthorized().into_response();
    };
    let asked = req
        .headers()
        .get("mcp-session-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let deleting = req.method() == Method::DELETE;
    if let Some(id) = &asked {
        let mut map = sessions.0.lock();
        match map.get_mut(id) {
            Some((owner, used)) if *owner == token => *used = std::time::Instant::now(),
            _ => {
                drop(map);
                let body = json!({"jsonrpc": "2.0", "id": null,
                    "error": {"code": -32001, "message": "Session not found"}});
                return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
            }
        }
    }
    let resp = next.run(req).await;
    let mut map = sessions.0.lock();
    match (&asked, resp.headers().get("mcp-session-id")) {
        (None, Some(new)) => {
            let now = std::time::Instant::now();
            map.retain(|_, (_, used)| now.duration_since(*used) < SESSION_IDLE);
            map.insert(String::from_utf8_lossy(new.as_bytes()).into_owned(), (token, now));
        }
        (Some(id), _)
            if (deleting && resp.status().is_success()) || resp.status() == StatusCode::NOT_FOUND =>
        {
            map.remove(id);
        }
        _ => {}
    }
    resp
}

/// A POST body that is not one JSON-RPC message gets a JSON-RPC error (rmcp
/// would answer some of them in plain text); a valid one goes on unchanged.
async fn check_message(req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an MCP message may have at most {MAX_BODY} bytes"),
            )
            .into_response();
        }
    };
    if let Err((code, message)) = one_message(&bytes) {
        let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// JSON-RPC 2.0's parse error and invalid request, for what is not one
/// request, notification or response object.
fn one_message(bytes: &[u8]) -> Result<(), (i64, String)> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| (-32700, format!("Parse error: {e}")))?;
    let invalid = |why: &str| Err((-32600, format!("Invalid Request: {why}")));
    let Some(obj) = v.as_object() else {
        return invalid("the body must be one JSON-RPC message object (batches are not supported)");
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("\"jsonrpc\" must be \"2.0\"");
    }
    match obj.get("method") {
        Some(Value::String(_)) => Ok(()),
        Some(_) => invalid("\"method\" must be a string"),
        None if obj.contains_key("id") && (obj.contains_key("result") || obj.contains_key("error")) => Ok(()),
        None => invalid("a request needs a \"method\""),
    }
}

/// Refuse a browser request whose `Origin` is not the server's own.
async fn check_origin(req: Request, next: Next) -> Response {
    match foreign_origin(req.headers()) {
        Some(origin) => ApiError::forbidden(format!(
            "Origin {origin} may not use this MCP endpoint (only the server's own origin)"
        ))
        .into_response(),
        None => next.run(req).await,
    }
}

/// The request's `Origin` if it names another host (or port) than the
/// `Host` the request was sent to; `None` when absent or the same.
fn foreign_origin(headers: &HeaderMap) -> Option<String> {
    let origin = headers.get(header::ORIGIN)?;
    let text = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let same = url::Url::parse(&text).ok().is_some_and(|u| {
        let Some(h) = u.host_str() else { return false };
        let authority = match u.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        };
        // A default port may be left out of either header.
        let default = u.port_or_known_default().map(|p| format!("{h}:{p}"));
        host.is_some_and(|host| {
            host.eq_ignore_ascii_case(&authority) || default.is_some_and(|d| host.eq_ignore_ascii_case(&d))
        })
    });
    (!same).then_some(text)
}

/// One MCP server instance (rmcp makes one per session, or per request at
/// 2026-07-28); all it holds is the router its tools call.
#[derive(Clone)]
struct DenMcp {
    api: Arc<Router>,
}

impl ServerHandler for DenMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("den", env!("CARGO_PKG_VERSION")))
            .with_instructions(tools::INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::all()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // Injected by rmcp: the HTTP request this call came in (its headers
        // carry the caller's token).
        let parts = context
            .extensions
            .get::<axum::http::request::Parts>()
            .ok_or_else(|| ErrorData::internal_error("the HTTP request is missing", None))?;
        let api = rest::Api::new(self.api.clone(), parts);
        let args = request.arguments.unwrap_or_default();
        tools::call(&api, &request.name, args).await.map(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn only_one_json_rpc_message_passes() {
        assert!(one_message(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).is_ok());
        assert!(one_message(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).is_ok());
        assert!(one_message(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).is_ok());
        assert_eq!(one_message(b"{not json").unwrap_err().0, -32700);
        for bad in [
            &b"[1,2]"[..],
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"id":1,"method":"x"}"#,
            br#"{"jsonrpc":"2.0","method":7}"#,
        ] {
            assert_eq!(
                one_message(bad).unwrap_err().0,
                -32600,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn origin_must_be_the_servers_own() {
        assert_eq!(foreign_origin(&headers("127.0.0.1:8080", None)), None);
        assert_eq!(
            foreign_origin(&headers("127.0.0.1:8080", Some("http://127.0.0.1:8080"))),
            None
        );
        assert_eq!(
            foreign_origin(&headers("den.example.com", Some("https://den.example.com"))),
            None
        );
        assert_eq!(
            foreign_origin(&headers("den.example.com:443", Some("https://den.example.com"))),
            None
        );
        for bad in [
            "http://evil.example",
            "http://127.0.0.1:9999",
            "null",
            "http://127.0.0.1.evil.example:8080",
        ] {
            assert_eq!(
                foreign_origin(&headers("127.0.0.1:8080", Some(bad))).as_deref(),
                Some(bad)
            );
        }
    }
}
