//! The web console: a static single-page app served at `/` on the API port,
//! its assets compiled into the binary (`console/` next to this crate's
//! `Cargo.toml`). The assets are public and hold no data or secret; the page
//! asks for a token, keeps it in `sessionStorage`, and calls the same `/v1`
//! API with it as any other client, so it can never see more than the
//! token may. See docs/console.md.
//!
//! Every answer carries a strict Content-Security-Policy: scripts only from
//! this origin (no inline script, no `eval`), connections only back to it,
//! no framing. Styles allow `'unsafe-inline'` because xterm.js sizes and
//! colours its rows through `<style>` elements it creates at run time.

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::sync::LazyLock;

use crate::error::ApiError;

/// The routes of the console, all public (see `auth::rules::PUBLIC`).
pub const INDEX_ROUTE: &str = "/";
pub const ASSET_ROUTE: &str = "/console/{*path}";

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; font-src 'self'; connect-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ct:expr) => {
        Asset {
            path: $path,
            content_type: $ct,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("app.css", CSS),
    asset!("icon.svg", "image/svg+xml"),
    asset!("vendor/xterm.mjs", JS),
    asset!("vendor/xterm.css", CSS),
    asset!("vendor/addon-fit.mjs", JS),
    asset!("vendor/LICENSE.xterm", "text/plain; charset=utf-8"),
    asset!("vendor/LICENSE.addon-fit", "text/plain; charset=utf-8"),
];

/// Strong ETags from the content, computed once: the assets never change
/// while the binary runs.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let h = blake3::hash(a.body);
            let tag = format!("\"{}\"", &h.to_hex()[..32]);
            HeaderValue::from_str(&tag).expect("hex is a valid header value")
        })
        .collect()
});

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(INDEX_ROUTE, get(index))
        .route(ASSET_ROUTE, get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return ApiError::not_found("no such console asset").into_response();
    };
    let (a, etag) = (&ASSETS[i], &ETAGS[i]);
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag.to_str().unwrap_or("")));
    let mut resp = if fresh {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Body::from(a.body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(a.content_type));
        r
    };
    let h = resp.headers_mut();
    h.insert(ETAG, etag.clone());
    // Names are not versioned: revalidate every time (a 304 is cheap), so an
    // upgraded den never runs a stale script against a newer API.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, etag: Option<&str>) -> Response {
        let mut req = Request::get(path);
        if let Some(t) = etag {
            req = req.header(IF_NONE_MATCH, t);
        }
        router::<()>()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn index_and_assets_have_their_types_csp_and_etag() {
        for (path, ct) in [
            ("/", "text/html; charset=utf-8"),
            ("/console/app.js", JS),
            ("/console/vendor/xterm.mjs", JS),
            ("/console/vendor/xterm.css", CSS),
        ] {
            let r = get(path, None).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[CONTENT_TYPE], ct, "{path}");
            assert_eq!(h["content-security-policy"], CSP, "{path}");
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h[CACHE_CONTROL], "no-cache");
            assert!(h.contains_key(ETAG), "{path}");
        }
    }

    #[tokio::test]
    async fn a_matching_etag_answers_304_and_another_the_body() {
        let tag = get("/console/app.css", None).await.headers()[ETAG].clone();
        let r = get("/console/app.css", Some(tag.to_str().unwrap())).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        let r = get("/console/app.css", Some("\"other\"")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert!(!body.is_empty());
    }

    #[tokio::test]
    async fn unknown_and_traversing_paths_are_404_in_the_api_error_shape() {
        for path in [
            "/console/nope.js",
            "/console/../Cargo.toml",
            "/console/%2e%2e/src/lib.rs",
            "/console/vendor",
        ] {
            let r = get(path, None).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
            let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], "not_found", "{path}");
        }
    }

    #[test]
    fn the_policy_allows_no_inline_or_foreign_script() {
        let script = CSP
            .split(';')
            .map(str::trim)
            .find(|d| d.starts_with("script-src"))
            .unwrap();
        assert_eq!(script, "script-src 'self'");
        assert!(CSP.contains("default-src 'none'"));
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(!CSP.contains("unsafe-eval"));
    }
}
