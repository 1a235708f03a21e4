//! Sprite URLs (§2.8): a request whose `Host` is `<name>.<url_domain>`
//! (any port) is reverse-proxied to the sprite's HTTP port, the first
//! service with `http_port`, else 8080. Every other request goes on to the
//! API.
//!
//! The request wakes the sprite and keeps it awake until the exchange (or
//! the upgraded connection) ends. `url_settings.auth` `sprite` requires a
//! den bearer token; `public` lets anyone in. A den token is never passed
//! on to the sprite's program. Upstream connections are kept for the next
//! request to the same boot of the sprite ([`crate::upstream_pool`]).
//!
//! URL traffic is dialed at the sprite's address, not its loopback (as in
//! Sprites): a program bound to `127.0.0.1` stays private even when the
//! URL is public.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body_splice::{self, Handoff};
use crate::error::{ApiError, ApiResult};
use crate::sprite_json::url_auth;
use crate::state::AppState;
use crate::upstream;
use crate::upstream_pool::{PoolKey, Upstream};

/// URL traffic goes here unless a service says otherwise.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// Middleware in front of the API: sprite hosts are proxied, the rest
/// passes through.
pub async fn route_by_host(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(host) = request_host(&req) else {
        return next.run(req).await;
    };
    let Some(label) = sprite_name(&host, &st.cfg.url_domain) else {
        return next.run(req).await;
    };
    let Some(name) = crate::config::key_of_url_label(&label, |org| st.tokens.org(org).is_some()) else {
        return no_sprite(&st, &req, &label).into_response();
    };
    match st.router.clone() {
        None => forward(st, name, host, req)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        // In a cluster the owner serves URL traffic; its node checks the
        // token (`sprite` auth) with the sprite's settings at hand.
        Some(router) => {
            let stop = st.shutdown.clone();
            let sprite = name.clone();
            let local = |req| async move {
                forward(st, sprite, host, req)
                    .await
                    .unwrap_or_else(IntoResponse::into_response)
            };
            crate::forward::dispatch(&*router, stop, &name, "url", req, local).await
        }
    }
}

/// What a URL without a valid token answers unless its sprite is public:
/// exactly the hosted service's body (browsers and scripts match on it).
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({"error": "unauthorized"})),
    )
        .into_response()
}

/// A URL that names no sprite: 404 for a valid token, but the same 401 as
/// a private sprite's without one, so that nobody can list sprites by
/// trying names.
fn no_sprite(st: &AppState, req: &Request, label: &str) -> Response {
    if crate::auth::principal(st, req.headers()).is_ok() {
        crate::auth::hidden_sprite(label).into_response()
    } else {
        unauthorized()
    }
}

/// The host the client addressed: the absolute-form URI's, else `Host`.
fn request_host(req: &Request) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers().get(header::HOST)?.to_str().ok().map(str::to_string)
}

/// `<name>` of `<name>.<domain>[:port]` (case-insensitive); `None` for the
/// API's own host and anything else.
pub fn sprite_name(host: &str, domain: &str) -> Option<String> {
    if domain.is_empty() || host.starts_with('[') {
        return None;
    }
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(&domain)?.strip_suffix('.')?;
    (!name.is_empty()).then(|| name.to_string())
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Drop hop-by-hop headers, those `Connection` names included, and
/// `Upgrade` (put back by the caller for an upgrade it forwards).
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

/// The `Upgrade` value of a request that asks for one.
pub(crate) fn upgrade_of(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| h.get(header::UPGRADE).cloned()).flatten()
}

fn bad_gateway(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", message)
}

/// The port URL traffic of `name` goes to.
fn http_port(st: &AppState, name: &str) -> ApiResult<u16> {
    Ok(st
        .mgr
        .services(name)?
        .iter()
        .find_map(|s| s.http_port)
        .unwrap_or(DEFAULT_HTTP_PORT))
}

async fn forward(st: AppState, name: String, host: String, mut req: Request) -> ApiResult<Response> {
    let host = HeaderValue::from_str(&host).map_err(|_| ApiError::bad_request("invalid Host"))?;
    let Ok(info) = st.mgr.get(&name) else {
        return Ok(no_sprite(&st, &req, den_sprite::key_parts(&name).1));
    };
    let caller = crate::auth::principal(&st, req.headers());
    let token_ok = caller.is_ok();
    if url_auth(&info) != "public" {
        let Ok(caller) = caller else {
            return Ok(unauthorized());
        };
        // A token that can't reach the sprite sees no sprite at all. The
        // host names the organisation, so a server administrator needs no
        // `den-org` here.
        if !caller.is_server_admin() && !caller.sees(&name) {
            return Err(crate::auth::hidden_sprite(info.record.short_name()));
        }
        caller.check(crate::auth::Need::Exec)?;
    }
    let port = http_port(&st, &name)?;
    let cold = upstream::is_cold(&st.mgr, &name);
    let activity = Arc::new(st.mgr.wake(&name).await?);
    let key = PoolKey {
        sprite: name.clone(),
        boot: activity.boot_id(),
        port,
    };

    let client_upgrade = req.extensions_mut().remove::<OnUpgrade>();
    let handoff = req.extensions_mut().remove::<Handoff>();
    let upgrade = upgrade_of(req.headers());
    // Whether the response body may be spliced: a plain TCP client, and a
    // response that has a body (not to HEAD) and is no tunnel.
    let zeros = body_splice::placeholder()
        .filter(|_| handoff.is_some() && upgrade.is_none())
        .filter(|_| req.method() != Method::HEAD && req.method() != Method::CONNECT);
    let (mut parts, body) = req.into_parts();
    rewrite_request(&mut parts, host, upgrade.clone(), token_ok);
    let req = Request::from_parts(parts, body);
    // An upgraded connection is spliced, never pooled: it gets its own.
    let pooled = match upgrade {
        None => st.upstreams.checkout(&key),
        Some(_) => None,
    };
    let reused = pooled.is_some();
    let mut up = match pooled {
        Some(s) => s,
        None => connect(&st, &name, activity.addr(), port, cold).await?,
    };
    // Until decided below, hyper gets the response head and not its body;
    // undecided (an error, the client gone), the body is hyper's again.
    let mut decide = zeros.and(up.gate.clone()).map(Undecided::new);
    let did_not_answer = |e: hyper::Error| bad_gateway(format!("sprite {name} did not answer: {e}"));
    let mut resp = match up.sender.try_send_request(req).await {
        Ok(resp) => resp,
        // The kept connection closed before the request went out: hyper
        // hands it back unsent, and it goes out on a new connection.
        Err(mut e) if reused && e.message().is_some() => {
            let req = e.take_message().expect("checked above");
            up = connect(&st, &name, activity.addr(), port, false).await?;
            decide = zeros.and(up.gate.clone()).map(Undecided::new);
            up.sender.send_request(req).await.map_err(did_not_answer)?
        }
        Err(e) => return Err(did_not_answer(e.into_error())),
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client), Some(_)) = (client_upgrade, &upgrade) else {
            return Err(bad_gateway(format!(
                "sprite {name} switched protocols without being asked to"
            )));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let stop = st.shutdown.clone();
        tokio::spawn(splice(client, upstream_upgrade, activity, stop));
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    let (mut parts, body) = resp.into_parts();
    // Before the hop-by-hop headers go: `Transfer-Encoding` rules it out.
    let len = spliceable(&parts);
    strip_hop_by_hop(&mut parts.headers);
    if let (Some(d), Some(zeros), Some(handoff), Some(len)) = (decide.take(), zeros, handoff, len)
        && d.0.take()
    {
        // The connection carries this body and then ends: not pooled.
        drop(body);
        drop(up);
        let job = body_splice::Job::new(d.0.clone(), len, activity)
            .map_err(|e| bad_gateway(format!("sprite {name}: taking over the response body: {e}")))?;
        metrics::counter!("den_url_bodies_total", "copy" => "splice").increment(1);
        let body = body_splice::SplicedBody::new(job, len, handoff, zeros);
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    drop(decide);
    if upgrade.is_none() {
        // Back into the pool once the body has been read to the end.
        st.upstreams.give_back(key, up);
    }
    // The body, not the connection, keeps the sprite awake: a connection
    // idle in the pool must not.
    Ok(Response::from_parts(
        parts,
        Body::new(Held {
            body,
            _hold: activity,
        }),
    ))
}

/// The length of a response body worth splicing: a `Content-Length` of at
/// least [`body_splice::MIN_SPLICED_BODY`] on a response that has a body.
fn spliceable(parts: &axum::http::response::Parts) -> Option<u64> {
    let s = parts.status;
    if s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
        return None;
    }
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    let mut lens = parts.headers.get_all(header::CONTENT_LENGTH).iter();
    let len: u64 = lens.next()?.to_str().ok()?.trim().parse().ok()?;
    (lens.next().is_none() && len >= body_splice::MIN_SPLICED_BODY).then_some(len)
}

/// A gate holding a response body back until the proxy decides; dropped
/// undecided, the body goes to hyper as usual.
struct Undecided(Arc<body_splice::Gate>);

impl Undecided {
    fn new(gate: Arc<body_splice::Gate>) -> Self {
        gate.expect_head();
        Undecided(gate)
    }
}

impl Drop for Undecided {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A new HTTP/1.1 connection to the sprite's port; `just_booted` gives a
/// program that is still starting time to listen.
async fn connect(
    st: &AppState,
    name: &str,
    addr: std::net::Ipv4Addr,
    port: u16,
    just_booted: bool,
) -> ApiResult<Upstream> {
    let tcp = upstream::dial(addr, port, just_booted).await.map_err(|e| {
        bad_gateway(format!(
            "nothing answers on port {port} of sprite {name} ({e}); \
             URL traffic goes to port {DEFAULT_HTTP_PORT} or the service with http_port, \
             which must listen on 0.0.0.0"
        ))
    })?;
    let (io, gate) =
        body_splice::UpstreamIo::new(tcp).map_err(|e| bad_gateway(format!("sprite {name}: {e}")))?;
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(io))
        .await
        .map_err(|e| bad_gateway(format!("sprite {name}: {e}")))?;
    let stop = st.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.with_upgrades() => {}
            _ = stop.cancelled() => {}
        }
    });
    Ok(Upstream {
        sender,
        gate: Some(gate),
    })
}

/// A response body that keeps its sprite awake until it ends or is dropped.
struct Held<B> {
    body: B,
    _hold: Arc<den_sprite::Activity>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The client's request as the sprite gets it: this hop's headers and a
/// den token removed, forwarding headers added, origin-form on HTTP/1.1.
fn rewrite_request(parts: &mut Parts, host: HeaderValue, upgrade: Option<HeaderValue>, den_token: bool) {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let via_tls = parts.extensions.get::<crate::tls::ViaTls>().is_some();
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    if den_token {
        h.remove(header::AUTHORIZATION);
    }
    // den's server has already answered the expectation (hyper sends 100
    // when the body is first read), and the body follows regardless.
    h.remove(header::EXPECT);
    // Between den nodes only: the sprite's program has no use for it.
    h.remove(crate::forward::FORWARDED_BY);
    h.insert(header::HOST, host.clone());
    add_forwarded(h, peer, host, via_tls);
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|pq| Uri::from(pq.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
}

/// `X-Forwarded-For` gets the client appended; `-Host` and `-Proto` are
/// set unless a fronting proxy (TLS termination) already did. When den
/// terminated TLS itself, `-Proto` is always `https`: the client reached den
/// over TLS whatever it claims, and a program that marks cookies `Secure`
/// by this header must not be talked down to `http`.
fn add_forwarded(h: &mut HeaderMap, peer: Option<std::net::IpAddr>, host: HeaderValue, via_tls: bool) {
    if let Some(ip) = peer {
        let xff = HeaderName::from_static("x-forwarded-for");
        let value = match h.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(xff, v);
        }
    }
    let xfh = HeaderName::from_static("x-forwarded-host");
    if !h.contains_key(&xfh) {
        h.insert(xfh, host);
    }
    let xfp = HeaderName::from_static("x-forwarded-proto");
    if via_tls {
        h.insert(xfp, HeaderValue::from_static("https"));
    } else if !h.contains_key(&xfp) {
        h.insert(xfp, HeaderValue::from_static("http"));
    }
}

/// Both sides switched protocols: copy bytes until either ends or the
/// server stops, keeping `hold` (the sprite awake) meanwhile. Two plain TCP
/// sockets are spliced ([`crate::splice`]); anything else (TLS on either
/// side) is copied through buffers.
pub(crate) async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    hold: impl Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(client = ?c.err(), upstream = ?u.err(), "sprite URL upgrade failed");
            return;
        }
    };
    let moved = async {
        // den's own upstream connections are plain TCP; the client's is
        // unless den terminates TLS.
        let (upstream, u_early) = match upstream.downcast::<TokioIo<body_splice::UpstreamIo>>() {
            Ok(p) => (p.io.into_inner().into_tcp(), p.read_buf),
            Err(u) => match u.downcast::<TokioIo<tokio::net::TcpStream>>() {
                Ok(p) => (p.io.into_inner(), p.read_buf),
                Err(u) => return copied(TokioIo::new(client), b"", TokioIo::new(u)).await,
            },
        };
        match crate::listener::upgraded_tcp(client) {
            Ok((client, c_early)) => {
                metrics::counter!("den_upgraded_connections_total", "copy" => "splice").increment(1);
                let r = crate::splice::bidirectional(client.tcp(), &c_early, &upstream, &u_early).await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "spliced upgraded connection ended");
                }
            }
            Err(client) => copied(TokioIo::new(client), &u_early, upstream).await,
        }
    };
    tokio::select! {
        _ = moved => {}
        _ = stop.cancelled() => {}
    }
    drop(hold);
}

/// The copy through buffers, for connections that can't be spliced:
/// `b_early` (already read from `b`) goes to `a` first.
async fn copied<A, B>(mut a: A, b_early: &[u8], mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    metrics::counter!("den_upgraded_connections_total", "copy" => "buffer").increment(1);
    if a.write_all(b_early).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    }
}
