//! The `/v1` API: one module per resource. Every route but the public ones
//! (the health check and the console's assets, `auth::rules::PUBLIC`)
//! sits behind [`crate::auth::authorize`], which authenticates the caller and
//! applies the route's rule from [`crate::auth::rules`].

pub mod checkpoints;
pub mod control;
pub mod exec;
pub mod fs;
pub mod orgs;
pub mod policy;
pub mod proxy;
pub mod services;
pub mod sprite_ops;
pub mod sprite_watch;
pub mod sprites;
pub mod tokens;
pub mod watch;

use axum::Router;
use axum::http::HeaderValue;
use axum::middleware;
use axum::routing::{get, post};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::state::AppState;

/// `Sprite-Version` on every response: a release version, so the Go SDK
/// uses path-style session attach.
pub const SPRITE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Checkpoint ids as the API accepts them: `v3`, `3`, `checkpoints/v3`.
pub fn checkpoint_id(raw: &str) -> String {
    let s = raw.trim().trim_start_matches("checkpoints/");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        format!("v{s}")
    } else {
        s.to_string()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "den",
        description = "Sprites-compatible API of den (self-hosted persistent sandboxes)"
    ),
    paths(
        sprites::create,
        sprites::list,
        sprites::get,
        sprites::update,
        sprites::delete,
        sprites::upgrade,
        sprites::fork,
        sprite_ops::restart,
        sprite_ops::check,
        checkpoints::create,
        checkpoints::list,
        checkpoints::get,
        checkpoints::delete,
        checkpoints::restore,
        policy::get,
        policy::set,
        proxy::proxy,
        control::control,
        tokens::create,
        tokens::list,
        tokens::revoke,
        orgs::current,
        orgs::create,
        orgs::list,
        orgs::get,
        orgs::update,
        orgs::delete,
        orgs::audit,
        services::list,
        services::get,
        services::put,
        services::delete,
        services::start,
        services::stop,
        services::signal,
        services::logs,
        fs::read,
        fs::write,
        fs::list,
        fs::delete,
        fs::rename,
        fs::copy,
        fs::chmod,
        fs::chown,
        watch::ports,
        watch::fs,
        exec::exec_get,
        exec::attach,
        exec::head,
        exec::exec_http,
        exec::kill,
    )
)]
pub struct ApiDoc;

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok", "version": SPRITE_VERSION}))
}

pub fn router(state: AppState) -> Router {
    let sprite = Router::new()
        .route(
            "/",
            get(sprites::get).put(sprites::update).delete(sprites::delete),
        )
        .route("/upgrade", post(sprites::upgrade))
        .route("/fork", post(sprites::fork))
        .route("/restart", post(sprite_ops::restart))
        .route("/check", get(sprite_ops::check))
        .route("/checkpoint", post(checkpoints::create))
        .route("/checkpoints", get(checkpoints::list))
        .route(
            "/checkpoints/{id}",
            get(checkpoints::get).delete(checkpoints::delete),
        )
        .route("/checkpoints/{id}/restore", post(checkpoints::restore))
        .route("/policy/network", get(policy::get).post(policy::set))
        .route("/services", get(services::list))
        .route(
            "/services/{service}",
            get(services::get)
                .put(services::put)
                .delete(services::delete)
                .post(services::signal),
        )
        .route("/services/{service}/start", post(services::start))
        .route("/services/{service}/stop", post(services::stop))
        .route("/services/{service}/logs", get(services::logs))
        .route("/fs/read", get(fs::read))
        .route("/fs/write", axum::routing::put(fs::write))
        .route("/fs/list", get(fs::list))
        .route("/fs/delete", axum::routing::delete(fs::delete))
        .route("/fs/rename", post(fs::rename))
        .route("/fs/copy", post(fs::copy))
        .route("/fs/chmod", post(fs::chmod))
        .route("/fs/chown", post(fs::chown))
        .route("/fs/watch", get(watch::fs))
        .route("/ports/watch", get(watch::ports));
    let sprite = sprite
        .route("/proxy", get(proxy::proxy))
        .route("/control", axum::routing::any(control::control))
        .route(
            "/exec",
            get(exec::exec_get).head(exec::head).post(exec::exec_http),
        )
        .route("/exec/{session_id}", get(exec::attach))
        .route("/exec/{session_id}/kill", post(exec::kill));
    // Cluster mode only, so a single node pays nothing for it. Inside the
    // authorization: a node forwards only requests it would accept itself.
    let sprite = if state.router.is_some() {
        sprite.route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::forward::sprite_api,
        ))
    } else {
        sprite
    };
    let v1 = Router::new()
        .route("/v1/sprites", get(sprites::list).post(sprites::create))
        .nest("/v1/sprites/{name}", sprite)
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/nodes", get(crate::cluster_api::list_nodes))
        .route("/v1/nodes/{node}/drain", post(crate::cluster_api::drain_node))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/v1/organization", get(orgs::current))
        .route("/v1/orgs", get(orgs::list).post(orgs::create))
        .route(
            "/v1/orgs/{org}",
            get(orgs::get).put(orgs::update).delete(orgs::delete),
        )
        .route("/v1/orgs/{org}/audit", get(orgs::audit))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(crate::metrics::render));
    let authorized = |r: Router<AppState>| {
        r.route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authorize,
        ))
    };
    // What the MCP tools call, in process, with their caller's token.
    let mcp_api = authorized(v1.clone())
        .layer(catch_panics())
        .with_state(state.clone());
    let authed = authorized(v1.merge(crate::mcp::router(&state, mcp_api)));
    Router::new()
        .route("/v1/health", get(health))
        .route("/healthz", get(health))
        .merge(crate::console::router())
        .merge(authed)
        // After routing, so requests are counted by route template.
        .route_layer(middleware::from_fn(crate::metrics::track))
        .fallback(not_found)
        .layer(middleware::map_response(
            |mut r: axum::response::Response| async move {
                r.headers_mut()
                    .insert("sprite-version", HeaderValue::from_static(SPRITE_VERSION));
                r
            },
        ))
        .layer(middleware::from_fn(close_after_unread_body))
        .layer(catch_panics())
        // Sprite-URL hosts never reach the API (nor its headers).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::url_proxy::route_by_host,
        ))
        // Outermost: every request (API and URL) gets an id, echoed in
        // `x-request-id` and carried by its log span.
        .layer(
            tower::ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(TraceLayer::new_for_http().make_span_with(request_span))
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}

/// An error answered to a request with a body may come before the body
/// was read (a write to a sprite that does not exist is refused on its
/// path). hyper then closes the connection instead of waiting for the body,
/// so the answer says so: a client that pooled the connection would lose
/// its next request on it ("Server disconnected without sending a
/// response"). Successes read their bodies; errors cost a reconnect.
async fn close_after_unread_body(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
    let h = req.headers();
    let has_body = h.contains_key(TRANSFER_ENCODING)
        || h.get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0);
    let mut resp = next.run(req).await;
    let status = resp.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A handler that panics on some input must not end its connection
/// without an answer: the client gets a clean 500 and the log the panic.
fn catch_panics()
-> tower_http::catch_panic::CatchPanicLayer<fn(Box<dyn std::any::Any + Send>) -> axum::response::Response> {
    fn answer(panic: Box<dyn std::any::Any + Send>) -> axum::response::Response {
        use axum::response::IntoResponse;
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        crate::error::ApiError::internal_logged("a request handler", &what).into_response()
    }
    tower_http::catch_panic::CatchPanicLayer::custom(answer as fn(_) -> _)
}

/// The log span of one request: method, path and its request id.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path())
}

async fn not_found() -> crate::error::ApiError {
    crate::error::ApiError::not_found("no such endpoint")
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_clean_500() {
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    let v: Vec<u8> = Vec::new();
                    format!("{}", v[3])
                }),
            )
            .layer(super::catch_panics());
        let resp = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "internal");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains("request handler") && !m.contains("index out of bounds"),
            "{m}"
        );
    }
}
