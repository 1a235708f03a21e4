//! Cluster mode: a request for a sprite that another node owns is
//! forwarded to that node, so any node answers any request.
//!
//! A [`Router`] (implemented by the cluster crate) says where a sprite is
//! served. In single-node mode there is none and nothing here runs: the
//! middleware is not even installed.
//!
//! Forwarding is transparent: same method, path, query, headers (the bearer
//! token included: the owner checks it again) and streamed body, and the
//! owner's status, headers and streamed body come back. An upgrade
//! (WebSocket exec, attach, TCP proxy, sprite URL upgrades) is accepted
//! towards the client only once the owner accepted it, so the owner's
//! refusals (401, 404, …) reach the client as HTTP errors; after that,
//! bytes are copied both ways, which keeps frames and close codes intact.
//!
//! A forwarded request carries [`FORWARDED_BY`]. Its receiver never
//! forwards it again: if it does not own the sprite either (ownership moved
//! meanwhile), it answers 503 `sprite_moved` and the forwarding node routes
//! once more before giving up, so a stale view can't make requests loop.
//!
//! Peers prove who they are: every request a node sends another carries a
//! [`PEER`] proof (a MAC with the cluster secret over node, time, method,
//! target and client address; see `den_cluster::peer`) and the client's
//! address in [`CLIENT`]. [`authenticate_peer`], outermost on every
//! request, keeps [`FORWARDED_BY`] and [`CLIENT`] only under a proof that
//! verifies and strips them otherwise, so a client that claims to be a
//! peer is served exactly as if it had not: its token is checked, its
//! request is routed to the owner, and its own address is the one that
//! counts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, OriginalUri, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use den_cluster::PeerKey;
use den_cluster::peer::ProofError;

use crate::error::ApiError;
use crate::state::AppState;
use crate::url_proxy::{splice, strip_hop_by_hop, upgrade_of};

/// Set on requests one node forwards to another: the forwarding node's name.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-den-forwarded-by");
/// The forwarding node's proof (see [`authenticate_peer`]).
pub const PEER: HeaderName = HeaderName::from_static(den_cluster::peer::PEER);
/// The address of the client the forwarding node served.
pub const CLIENT: HeaderName = HeaderName::from_static(den_cluster::peer::CLIENT);

/// The error code of the 503 a node answers for a forwarded request it
/// does not own either.
pub const SPRITE_MOVED: &str = "sprite_moved";

/// Where a request has to be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local,
    /// `base_url` like `http://10.0.0.2:7080`.
    Remote {
        node: String,
        base_url: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No live node serves the region (`None`: no live node at all).
    #[error("no den node is available in region {}", .0.as_deref().unwrap_or("(any)"))]
    NoNodeInRegion(Option<String>),
    /// The cluster's state could not be read (metadata store down, …).
    #[error("cluster routing: {0}")]
    Internal(String),
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let code = match &self {
            RouteError::NoNodeInRegion(_) => "region_unavailable",
            RouteError::Internal(_) => "cluster_unavailable",
        };
        // Both are transient from the client's point of view: nodes come
        // back, the metadata store recovers.
        unavailable(code, self.to_string())
    }
}

/// Decides which node serves a sprite; implemented by the cluster crate.
#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    fn node_name(&self) -> &str;
    /// The cluster secret's key: signs this node's requests to peers and
    /// checks theirs.
    fn peer_key(&self) -> &PeerKey;
    /// Where requests for this sprite must be served. `Local` means this
    /// node owns it (or has just claimed it); an unknown sprite is `Local`
    /// too, so the local handler answers its 404.
    async fn route_sprite(&self, name: &str) -> Result<Route, RouteError>;
    /// Where a create in this region (`None` = any) should run.
    async fn route_create(&self, region: Option<&str>) -> Result<Route, RouteError>;
    /// The last route given for `name` turned out wrong (the peer said the
    /// sprite moved, or was unreachable): don't answer from a cache again.
    fn invalidate(&self, _name: &str) {}
}

/// A bounded wait for a peer's SYN-ACK: peers are in one network, so a
/// slow connect means a dead node, and the client should retry soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bodies up to this size (with a known length) are read before
/// forwarding, so the request can be sent again after a `sprite_moved`.
/// Larger or streamed bodies go out as they come and are not retried. As
/// large as the biggest JSON body the API accepts, so every JSON request
/// survives a move; file uploads and exec stdin stream instead.
const REPLAY_MAX: u64 = crate::extract::MAX_JSON as u64;
/// A peer's error bodies are small JSON; this bounds reading one.
const ERROR_BODY_MAX: usize = 64 << 10;

type PeerClient = Client<HttpConnector, Body>;

/// One pooled client for all peers: a forwarded exec round trip then costs
/// no connection setup.
fn client() -> &'static PeerClient {
    static CLIENT: OnceLock<PeerClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http)
    })
}

fn unavailable(code: &'static str, message: String) -> Response {
    let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Expected while ownership moves, so not logged as a failure.
fn sprite_moved(name: &str, owner: &str) -> Response {
    tracing::debug!(
        sprite = name,
        owner,
        "forwarded request for a sprite this node does not own"
    );
    let body = serde_json::json!({
        "error": SPRITE_MOVED,
        "message": format!("sprite {name} is now served by node {owner}; retry the request"),
    });
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
        axum::Json(body),
    )
        .into_response()
}

fn count(kind: &'static str) {
    metrics::counter!("den_forwarded_requests_total", "kind" => kind).increment(1);
}

/// Whether this request was forwarded by another node. Only true behind
/// [`authenticate_peer`], which strips the header unless a peer proved it
/// sent the request.
pub fn is_forwarded(h: &HeaderMap) -> bool {
    h.contains_key(FORWARDED_BY)
}

/// The node that forwarded a request, as proven by its [`PEER`] proof
/// (a request extension set by [`authenticate_peer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer(pub String);

/// Outermost layer of the whole app (API and sprite URLs): the peer-only
/// headers ([`FORWARDED_BY`], [`CLIENT`]) count only under a [`PEER`]
/// proof that verifies; without one they are removed, so the request is
/// served as the plain client request it is. A verified peer's client
/// address replaces the connection's (the peer's own), so the owner sees
/// the client as if it had connected directly. The proof itself never
/// reaches a handler or a sprite.
pub async fn authenticate_peer(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    check_peer(st.router.as_deref(), &mut req);
    next.run(req).await
}

fn check_peer(router: Option<&dyn Router>, req: &mut Request) {
    let h = req.headers_mut();
    let proof = h.remove(PEER);
    let client = h.remove(CLIENT);
    let claimed = h.remove(FORWARDED_BY);
    if proof.is_none() && client.is_none() && claimed.is_none() {
        return;
    }
    let client = client
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<SocketAddr>().ok());
    let verdict = match (proof, router) {
        (None, _) => Err(Refused::NoProof),
        (Some(_), None) => Err(Refused::NotClustered),
        (Some(p), Some(r)) => {
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            p.to_str()
                .map_err(|_| ProofError::Malformed)
                .and_then(|p| r.peer_key().verify(p, req.method().as_str(), target, client))
                .map_err(Refused::Proof)
        }
    };
    match verdict {
        Ok(node) => {
            if let Ok(v) = HeaderValue::from_str(&node) {
                req.headers_mut().insert(FORWARDED_BY, v);
            }
            if let Some(c) = client {
                req.extensions_mut().insert(ConnectInfo(c));
            }
            req.extensions_mut().insert(VerifiedPeer(node));
        }
        Err(why) => refused(req, &why),
    }
}

enum Refused {
    NoProof,
    NotClustered,
    Proof(ProofError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::NoProof => f.write_str("peer-only headers without a peer proof"),
            Refused::NotClustered => f.write_str("a peer proof sent to a node outside any cluster"),
            Refused::Proof(e) => e.fmt(f),
        }
    }
}

/// One warning per refused claim, at most one a second (a client can send
/// as many as it likes); the rest are counted, and the next warning says
/// how many. Nothing of the proof is logged.
fn refused(req: &Request, why: &Refused) {
    static LAST: parking_lot::Mutex<Option<Instant>> = parking_lot::Mutex::new(None);
    static QUIET: AtomicU64 = AtomicU64::new(0);
    metrics::counter!("den_peer_claims_refused_total").increment(1);
    {
        let mut last = LAST.lock();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            QUIET.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(Instant::now());
    }
    let from = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    tracing::warn!(
        from = ?from,
        method = %req.method(),
        path = req.uri().path(),
        not_logged_since = QUIET.swap(0, Ordering::Relaxed),
        "request claims to come from a den node but does not prove it ({why}); served as a client request"
    );
}

/// Middleware on `/v1/sprites/{name}/…` (installed only with a router).
pub async fn sprite_api(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let Some(router) = st.router.clone() else {
        return next.run(req).await;
    };
    // The authorization layer resolved the sprite in the caller's organisation.
    let name = req
        .extensions()
        .get::<crate::auth::SpriteRef>()
        .map(|s| s.0.clone());
    match name {
        Some(name) => dispatch(&*router, st.shutdown.clone(), &name, "api", req, |r| next.run(r)).await,
        None => next.run(req).await,
    }
}

/// Serve `req` for sprite `name` where the router says: `local` here, or
/// forwarded to the owner.
pub async fn dispatch<F, Fut>(
    router: &dyn Router,
    stop: CancellationToken,
    name: &str,
    kind: &'static str,
    req: Request,
    local: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let node = match router.route_sprite(name).await {
        Ok(Route::Local) => return local(req).await,
        Ok(Route::Remote { node, base_url }) => (node, base_url),
        Err(e) => return e.into_response(),
    };
    if is_forwarded(req.headers()) {
        return sprite_moved(name, &node.0);
    }
    let mut out = match Outgoing::new(req, router, stop).await {
        Ok(o) => o,
        Err(r) => return *r,
    };
    count(kind);
    let sent = out.send(&node.1).await;
    if matches!(sent, Sent::Moved(_) | Sent::Unreachable(_)) {
        router.invalidate(name);
    }
    match sent {
        Sent::Moved(_) | Sent::Unreachable(_) if out.replayable() => {
            tracing::debug!(sprite = name, node = %node.0, "owner changed or gone; routing again");
        }
        other => return out.finish(other),
    }
    match router.route_sprite(name).await {
        Ok(Route::Local) => local(out.into_local()).await,
        Ok(Route::Remote { base_url, .. }) => {
            let again = out.send(&base_url).await;
            out.finish(again)
        }
        Err(e) => e.into_response(),
    }
}

/// Send `req` unchanged to the node at `base_url` (node-scoped requests
/// such as a drain asked of another node).
pub async fn to_node(router: &dyn Router, stop: CancellationToken, base_url: &str, req: Request) -> Response {
    let mut out = match Outgoing::new(req, router, stop).await {
        Ok(o) => o,
        Err(r) => return *r,
    };
    count("node");
    let sent = out.send(base_url).await;
    out.finish(sent)
}

/// Forward a create (`POST uri` with the client's `headers`) whose body was
/// already read and checked to the node at `base_url`. `None`: the router
/// now places it here after all.
pub async fn create(
    router: &dyn Router,
    region: Option<&str>,
    base_url: &str,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let mut parts = Request::new(Body::empty()).into_parts().0;
    parts.method = Method::POST;
    parts.uri = uri;
    parts.headers = headers;
    let mut out = Outgoing::from_parts(parts, OutBody::Bytes(body), router);
    count("create");
    match out.send(base_url).await {
        // A node that vanished: perhaps the router knows better now.
        Sent::Unreachable(_) => match router.route_create(region).await {
            Ok(Route::Remote { base_url, .. }) => {
                let again = out.send(&base_url).await;
                Some(out.finish(again))
            }
            // Served here after all: the caller goes on.
            Ok(Route::Local) => None,
            Err(e) => Some(e.into_response()),
        },
        other => Some(out.finish(other)),
    }
}

/// An error with its causes (hyper's own says little: "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

enum OutBody {
    /// Read in full: can be sent again.
    Bytes(Bytes),
    /// Streamed once.
    Stream(Option<Body>),
}

/// What a send produced.
enum Sent {
    /// The peer's answer (its body still streaming).
    Ok(Response),
    /// The peer does not own the sprite (any more); its answer, rebuilt.
    Moved(Response),
    /// The peer could not be reached: why.
    Unreachable(String),
}

/// A request on its way to a peer, kept so it can be sent again or served
/// here after all.
struct Outgoing {
    /// The client's request as received (minus its body and upgrade).
    parts: Parts,
    body: OutBody,
    /// Path and query as the client sent them (nested routers see less).
    path: String,
    /// The headers as the peer gets them (but the proof, made per send).
    headers: HeaderMap,
    /// This node, and the key its proofs are made with.
    me: String,
    key: PeerKey,
    /// The client this node serves (sent on, under the proof).
    client: Option<SocketAddr>,
    client_upgrade: Option<OnUpgrade>,
    upgrade: Option<HeaderValue>,
    /// Ends spliced upgrades when this server stops.
    stop: CancellationToken,
}

impl Outgoing {
    async fn new(req: Request, me: &dyn Router, stop: CancellationToken) -> Result<Outgoing, Box<Response>> {
        let (mut parts, body) = req.into_parts();
        let upgrade = upgrade_of(&parts.headers);
        let hint = body.size_hint();
        let body = if upgrade.is_some() || hint.exact() == Some(0) {
            OutBody::Bytes(Bytes::new())
        } else if hint.upper().is_some_and(|n| n <= REPLAY_MAX) {
            let read = Limited::new(body, REPLAY_MAX as usize)
                .collect()
                .await
                .map_err(|e| {
                    Box::new(ApiError::bad_request(format!("reading the body: {e}")).into_response())
                })?;
            OutBody::Bytes(read.to_bytes())
        } else {
            OutBody::Stream(Some(body))
        };
        let client_upgrade = parts.extensions.remove::<OnUpgrade>();
        let mut out = Outgoing::from_parts(parts, body, me);
        out.client_upgrade = client_upgrade;
        out.stop = stop;
        Ok(out)
    }

    fn from_parts(parts: Parts, body: OutBody, me: &dyn Router) -> Outgoing {
        let upgrade = upgrade_of(&parts.headers);
        let mut h = parts.headers.clone();
        strip_hop_by_hop(&mut h);
        // This node has answered any expectation already (hyper sends 100
        // when the body is first read).
        h.remove(header::EXPECT);
        if let Ok(v) = HeaderValue::from_str(me.node_name()) {
            h.insert(FORWARDED_BY, v);
        }
        // The owner takes the client's address from here (under the
        // proof), not from the connection, which is this node's; so it
        // adds it to `X-Forwarded-For` itself where it would for a client
        // that connected directly, and this node leaves that header alone.
        let client = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
        match client.and_then(|c| HeaderValue::from_str(&c.to_string()).ok()) {
            Some(v) => h.insert(CLIENT, v),
            None => h.remove(CLIENT),
        };
        if let OutBody::Bytes(b) = &body {
            // The body may be re-encoded (a create's), and an empty one
            // needs no length.
            h.remove(header::CONTENT_LENGTH);
            if !b.is_empty() {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            }
        }
        if let Some(u) = &upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, u.clone());
        }
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map(|o| &o.0)
            .unwrap_or(&parts.uri);
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Outgoing {
            parts,
            body,
            path,
            headers: h,
            me: me.node_name().to_string(),
            key: me.peer_key().clone(),
            client,
            client_upgrade: None,
            upgrade,
            stop: CancellationToken::new(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self.body, OutBody::Bytes(_))
    }

    async fn send(&mut self, base_url: &str) -> Sent {
        let uri: Uri = match format!("{}{}", base_url.trim_end_matches('/'), self.path).parse() {
            Ok(u) => u,
            Err(e) => {
                return Sent::Unreachable(format!("peer address {base_url:?} is invalid: {e}"));
            }
        };
        let body = match &mut self.body {
            OutBody::Bytes(b) => Body::from(b.clone()),
            OutBody::Stream(b) => b.take().unwrap_or_else(Body::empty),
        };
        let mut req = hyper::Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        // Made per send: a request sent again after `sprite_moved` gets a
        // fresh time.
        let proof = self
            .key
            .prove(&self.me, self.parts.method.as_str(), &self.path, self.client);
        if let Ok(v) = HeaderValue::from_str(&proof) {
            req.headers_mut().insert(PEER, v);
        }
        let resp = match client().request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Sent::Unreachable(format!("node at {base_url} did not answer: {}", chain(&e)));
            }
        };
        let resp = resp.map(Body::new);
        if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
            return Sent::Ok(resp);
        }
        // Another node's 503 may be `sprite_moved`: read it to know.
        let (mut parts, body) = resp.into_parts();
        let bytes = match Limited::new(body, ERROR_BODY_MAX).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Sent::Unreachable(format!("node at {base_url}: reading its answer: {e}"));
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        let moved =
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v["error"] == SPRITE_MOVED);
        let r = Response::from_parts(parts, Body::from(bytes));
        if moved { Sent::Moved(r) } else { Sent::Ok(r) }
    }

    /// The request as it came, to be served here after all.
    fn into_local(mut self) -> Request {
        if let Some(u) = self.client_upgrade.take() {
            self.parts.extensions.insert(u);
        }
        let body = match self.body {
            OutBody::Bytes(b) => Body::from(b),
            OutBody::Stream(b) => b.unwrap_or_else(Body::empty),
        };
        Request::from_parts(self.parts, body)
    }

    /// The peer's answer as this node's answer; an accepted upgrade gets
    /// both upgraded connections spliced.
    fn finish(&mut self, sent: Sent) -> Response {
        let mut resp = match sent {
            Sent::Ok(r) => r,
            Sent::Moved(r) => return r,
            Sent::Unreachable(why) => return unavailable("node_unavailable", why),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client), Some(_)) = (self.client_upgrade.take(), &self.upgrade) else {
                return ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    "peer node switched protocols without being asked to",
                )
                .into_response();
            };
            let peer = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(client, peer, (), self.stop.clone()));
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, Body::empty());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if parts.headers.contains_key(header::CONTENT_LENGTH) {
            return Response::from_parts(parts, body);
        }
        // A stream of unknown length (log follow, exec output) ends when
        // this node stops, as the owner's own streams do, rather than
        // holding up the shutdown.
        let stop = self.stop.clone().cancelled_owned();
        let body = Body::from_stream(body.into_data_stream().take_until(stop));
        Response::from_parts(parts, body)
    }
}
