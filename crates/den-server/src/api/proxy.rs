//! TCP over WebSocket (§2.11): `GET /v1/sprites/{name}/proxy`; the control
//! channel's `proxy` operation runs the same tunnel.
//!
//! After the upgrade the client names a target with a text frame
//! `{"host":"localhost","port":8080}` (or `?host=&port=` on the URL); den
//! dials it and answers `{"status":"connected","target":"<ip>:<port>"}`,
//! then binary frames carry the raw byte stream both ways.
//!
//! Targets are the sprite itself only. An empty host, `localhost`,
//! `127.0.0.1` and `::1` are dialed as `127.0.0.1` inside the sprite's
//! network namespace, so loopback-only listeners (dev servers) work; the
//! inner-container names the SDKs document (`10.0.0.1`, `fdf::1`) and the
//! sprite's own address are dialed at that address. Any other host is
//! refused like an unreachable one (close 1011 `Failed to connect to
//! target: …`): den dials from the host, so reaching it would bypass the
//! sprite's egress policy and open the host's own networks.

use std::net::Ipv4Addr;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::response::Response;
use den_runtime::Runtime;
use den_sprite::Activity;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::SpriteRef;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::upstream;

/// How long a client may take to send the init frame.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
const BAD_PORT: &str = "Invalid port number";
const NOT_JSON: &str = "Expected JSON initialization message";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ProxyQuery {
    /// With `port`: the target, so no init frame is expected.
    pub host: Option<String>,
    pub port: Option<String>,
}

/// Where the tunnel goes, as the client asked.
pub(crate) struct Target {
    host: String,
    port: u16,
}

fn parse_port(v: &Value) -> Option<u16> {
    v.as_u64().filter(|p| (1..=65535).contains(p)).map(|p| p as u16)
}

/// The init frame: `Err` is the 1003 close reason.
fn parse_init(text: &str) -> Result<Target, &'static str> {
    let v: Value = serde_json::from_str(text).map_err(|_| NOT_JSON)?;
    let obj = v.as_object().ok_or(NOT_JSON)?;
    let host = match obj.get("host") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(h)) => h.clone(),
        Some(_) => return Err(NOT_JSON),
    };
    let port = obj.get("port").and_then(parse_port).ok_or(BAD_PORT)?;
    Ok(Target { host, port })
}

/// How a target that names the sprite is reached.
enum Route {
    /// `127.0.0.1` in the sprite's network namespace.
    Loopback(String),
    Addr(Ipv4Addr),
}

/// `None` if `host` is not the sprite.
fn resolve(host: &str, act: &Activity, runtime: Runtime) -> Option<Route> {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    let sprite = act.addr();
    if h.is_empty() || h.eq_ignore_ascii_case("localhost") || matches!(h, "127.0.0.1" | "::1") {
        // Without a namespace (no network) the address path reports why.
        // Under gVisor the sprite's loopback is its sentry's own network
        // stack, not the namespace's, so the namespace's 127.0.0.1 reaches
        // nothing: its ports are reached at its address (a listener bound
        // to 127.0.0.1 alone is out of reach there, docs/sprites.md).
        return Some(match (act.netns(), runtime) {
            (Some(ns), Runtime::Native) => Route::Loopback(ns.to_string()),
            _ => Route::Addr(sprite),
        });
    }
    (h == sprite.to_string() || matches!(h, "10.0.0.1" | "fdf::1")).then_some(Route::Addr(sprite))
}

/// Open a TCP tunnel to a port of the sprite (WebSocket).
#[utoipa::path(get, path = "/v1/sprites/{name}/proxy", params(ProxyQuery),
    responses((status = 101, description = "Tunnel: init frame, `connected` reply, then binary frames"),
        (status = 400), (status = 401), (status = 404), (status = 503)))]
pub async fn proxy(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<ProxyQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let preset = preset_target(q.host, q.port.as_deref())?;
    let ws = ws.map_err(|e| ApiError::bad_request(format!("expected a WebSocket upgrade: {e}")))?;
    // Wake before the upgrade, so the client's handshake (not its init
    // timeout) waits for a booting sprite, and failures are HTTP statuses.
    let (activity, cold) = wake(&st, &name).await?;
    Ok(ws.on_upgrade(move |socket| async move {
        tunnel(st, socket, activity, preset, cold).await;
    }))
}

/// The target given as parameters (`host`, `port`) rather than by an init
/// frame; `None` if there is no `port`.
pub(crate) fn preset_target(host: Option<String>, port: Option<&str>) -> ApiResult<Option<Target>> {
    match (host, port) {
        (host, Some(p)) => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ApiError::bad_request(BAD_PORT))?;
            Ok(Some(Target {
                host: host.unwrap_or_default(),
                port,
            }))
        }
        (Some(_), None) => Err(ApiError::bad_request("host given without port")),
        (None, None) => Ok(None),
    }
}

/// Wakes the sprite for a tunnel; whether it was cold (dials then wait for
/// its listeners to come up).
pub(crate) async fn wake(st: &AppState, name: &str) -> ApiResult<(Activity, bool)> {
    let cold = upstream::is_cold(&st.mgr, name);
    Ok((st.mgr.wake(name).await?, cold))
}

/// A close frame's reason may not exceed 123 bytes (RFC 6455 §5.5).
const MAX_REASON: usize = 123;

/// The first text frame; `Err` is the 1003 reason, `Ok(None)` a client
/// that left.
async fn read_init<R: Stream<Item = Message> + Unpin>(rx: &mut R) -> Result<Option<Target>, &'static str> {
    loop {
        let msg = match tokio::time::timeout(INIT_TIMEOUT, rx.next()).await {
            Err(_) => return Err(NOT_JSON),
            Ok(None) | Ok(Some(Message::Close(_))) => return Ok(None),
            Ok(Some(m)) => m,
        };
        match msg {
            Message::Text(t) => return parse_init(t.as_str()).map(Some),
            Message::Ping(_) | Message::Pong(_) => continue,
            _ => return Err(NOT_JSON),
        }
    }
}

async fn tunnel(st: AppState, socket: WebSocket, activity: Activity, preset: Option<Target>, cold: bool) {
    let (mut tx, rx) = socket.split();
    let mut rx = crate::api::exec::client_messages(rx);
    let end = run_tunnel(&st, &mut tx, &mut rx, &activity, preset, cold).await;
    drop(activity);
    let Some((code, reason)) = end else {
        // The client went (a close from it is answered by the WebSocket layer).
        let _ = tx.close().await;
        return;
    };
    let frame = CloseFrame {
        code,
        reason: truncate_reason(reason).into(),
    };
    let _ = tx.send(Message::Close(Some(frame))).await;
    let _ = tx.close().await;
}

/// A close frame's reason may not exceed 123 bytes (RFC 6455 §5.5).
fn truncate_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

/// One tunnel over any client transport: the proxy WebSocket, or one
/// operation of the control channel. Reads the init frame unless `preset`
/// names the target, dials, answers `connected`, then relays. The answer is
/// the close code and reason that end the tunnel, `None` if the client left.
pub(crate) async fn run_tunnel<T, R>(
    st: &AppState,
    tx: &mut T,
    rx: &mut R,
    activity: &Activity,
    preset: Option<Target>,
    cold: bool,
) -> Option<(u16, String)>
where
    T: Sink<Message> + Unpin,
    R: Stream<Item = Message> + Unpin,
{
    let target = match preset {
        Some(t) => t,
        None => {
            let init = tokio::select! {
                r = read_init(rx) => r,
                _ = st.shutdown.cancelled() => {
                    return Some((close_code::AWAY, "server shutting down".into()));
                }
            };
            match init {
                Ok(Some(t)) => t,
                Ok(None) => return None,
                Err(reason) => return Some((close_code::UNSUPPORTED, reason.into())),
            }
        }
    };
    let runtime = st
        .mgr
        .get(activity.name())
        .map_or(Runtime::Native, |i| i.record.runtime);
    let Some(route) = resolve(&target.host, activity, runtime) else {
        let reason = format!(
            "Failed to connect to target: {}:{}: den only reaches the sprite itself",
            target.host, target.port
        );
        return Some((close_code::ERROR, reason));
    };
    let (dialed, tcp) = match &route {
        Route::Loopback(ns) => (
            Ipv4Addr::LOCALHOST,
            upstream::dial_loopback(ns, target.port, cold).await,
        ),
        Route::Addr(a) => (*a, upstream::dial(*a, target.port, cold).await),
    };
    let target = format!("{dialed}:{}", target.port);
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            return Some((
                close_code::ERROR,
                format!("Failed to connect to target: {target}: {e}"),
            ));
        }
    };
    let hello = json!({"status": "connected", "target": target});
    if tx.send(Message::Text(hello.to_string().into())).await.is_err() {
        return None;
    }
    let end = relay(st, tx, rx, tcp, tokio::time::Instant::now() + FIRST_DATA_GAP).await;
    match end {
        End::Client => None,
        End::UpstreamEof => Some((close_code::NORMAL, String::new())),
        End::UpstreamError => Some((close_code::AWAY, "upstream closed".into())),
        End::Shutdown => Some((close_code::AWAY, "server shutting down".into())),
    }
}

/// Why a tunnel ended.
enum End {
    /// The client closed or went away.
    Client,
    UpstreamEof,
    UpstreamError,
    Shutdown,
}

/// The official JS SDK attaches its data listener only after it has handled
/// the `connected` reply; a data frame arriving in the same read (a server
/// that speaks first: SSH, SMTP, a banner) is dropped. Upstream bytes are
/// therefore held this long after the reply, so they arrive on their own.
const FIRST_DATA_GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// Raw bytes both ways until either side ends. The two directions run
/// concurrently so a peer that only reads after writing cannot deadlock
/// the tunnel. Upstream bytes go to the client no earlier than `hold_until`.
async fn relay<T, R>(
    st: &AppState,
    tx: &mut T,
    rx: &mut R,
    tcp: TcpStream,
    hold_until: tokio::time::Instant,
) -> End
where
    T: Sink<Message> + Unpin,
    R: Stream<Item = Message> + Unpin,
{
    let (mut up_rd, mut up_wr) = tcp.into_split();
    let to_upstream = async {
        while let Some(msg) = rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                // Only binary frames carry data (the Go SDK does the same).
                _ => continue,
            };
            if up_wr.write_all(&data).await.is_err() {
                return End::UpstreamError;
            }
        }
        End::Client
    };
    let to_client = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match up_rd.read(&mut buf).await {
                Ok(0) => return End::UpstreamEof,
                Ok(n) => {
                    let data = bytes::Bytes::copy_from_slice(&buf[..n]);
                    tokio::time::sleep_until(hold_until).await;
                    if tx.send(Message::Binary(data)).await.is_err() {
                        return End::Client;
                    }
                }
                Err(_) => return End::UpstreamError,
            }
        }
    };
    tokio::select! {
        e = to_upstream => e,
        e = to_client => e,
        _ = st.shutdown.cancelled() => End::Shutdown,
    }
}
