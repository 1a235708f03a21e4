//! Exec (§2.4, §3): commands over WebSocket and HTTP, attach, the session
//! list and kill. Every command is an agent session whose id is its PID.
//!
//! den extension: `timeout` (a Go duration such as `30s`) is a hard limit on
//! a command's run time; `ServerConfig::default_exec_timeout` applies when a
//! request gives none. On expiry the process group gets SIGTERM, then SIGKILL
//! after a grace period, and the WebSocket sends a text frame
//! `{"type":"timeout","message":…}` just before the exit frame.

mod http;
mod params;
mod sessions;
mod ws;

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use den_sprite::SpriteInfo;

pub use http::{__path_exec_http, __path_kill, exec_http, kill};
pub use params::{ExecParams, parse_go_duration};
pub use sessions::{__path_head, head};

use crate::auth::SpriteRef;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
pub(crate) use ws::{Bridge, Ended, client_messages};

type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;
type Upgrade = Result<WebSocketUpgrade, WebSocketUpgradeRejection>;

fn query_pairs(q: QueryPairs) -> ApiResult<Vec<(String, String)>> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The sprite's `environment` attribute (set at create/update).
fn sprite_env(info: &SpriteInfo) -> BTreeMap<String, String> {
    info.record
        .attrs
        .get("environment")
        .and_then(|e| e.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Agent errors on starting a command are the request's fault (no such
/// program or directory), not the server's.
fn start_error(e: den_agent::Error) -> ApiError {
    match &e {
        den_agent::Error::Agent { code, message } if code == "spawn_failed" => {
            ApiError::bad_request(message.clone())
        }
        _ => e.into(),
    }
}

/// How often a command start is tried when the sprite's agent goes away
/// under it.
const START_TRIES: usize = 3;

/// Wake `name` and start `req` in it. A restore or stop that wins a race
/// with this request stops the sprite between the wake and the start, and
/// the start fails on the dead agent connection (broken pipe). The sprite is
/// then woken again, which waits for the restore or stop to finish, and the
/// start is tried again; past [`START_TRIES`] the client gets a 503 with
/// `Retry-After`, never a 500.
async fn wake_and_exec(
    st: &AppState,
    name: &str,
    req: den_agent::protocol::ExecRequest,
) -> ApiResult<(den_sprite::Activity, den_agent::client::Session)> {
    let mut tries = 1;
    loop {
        let activity = st.mgr.wake(name).await?;
        match activity.agent().exec(req.clone()).await {
            Ok(session) => return Ok((activity, session)),
            Err(e) if crate::error::agent_gone(&e) && tries < START_TRIES => {
                tracing::debug!(sprite = name, error = %e, "agent went away at exec start; waking again");
                tries += 1;
            }
            Err(e) => return Err(start_error(e)),
        }
    }
}

/// Answer the upgrade and hand the socket to the bridge.
fn upgrade(ws: WebSocketUpgrade, bridge: Bridge) -> Response {
    let mut resp = ws
        .protocols([crate::auth::WS_PROTOCOL])
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "exec websocket upgrade failed"))
        .on_upgrade(move |socket| bridge.run(socket));
    resp.headers_mut()
        .insert("x-sprite-capabilities", HeaderValue::from_static("signal"));
    resp
}

/// A bridge to the running session `id`.
async fn attach_session(st: &AppState, name: &str, id: &str) -> ApiResult<Bridge> {
    let activity = st.mgr.wake(name).await?;
    let session = activity.agent().attach(id).await.map_err(|e| match e {
        den_agent::Error::Agent { code, .. } if code == "not_found" => {
            ApiError::not_found(format!("exec session {id} not found"))
        }
        e => e.into(),
    })?;
    Ok(Bridge {
        session,
        activity,
        shutdown: st.shutdown.clone(),
        timeout: None,
    })
}

/// The session an exec request's parameters (§3.1) name: a new command, or
/// (`id` without `cmd`) an attach. The exec WebSocket and the control
/// channel's `exec` operation both start theirs here.
pub(crate) async fn open_session(
    st: &AppState,
    name: &str,
    info: &SpriteInfo,
    pairs: &[(String, String)],
) -> ApiResult<Bridge> {
    let p = ExecParams::parse(pairs)?;
    if let Some(id) = &p.id
        && p.cmd.is_empty()
    {
        return attach_session(st, name, id).await;
    }
    let req = p.to_exec_request(sprite_env(info), st.cfg.default_exec_timeout)?;
    let timeout = req.timeout_ms.map(std::time::Duration::from_millis);
    let (activity, session) = wake_and_exec(st, name, req).await?;
    Ok(Bridge {
        session,
        activity,
        shutdown: st.shutdown.clone(),
        timeout,
    })
}

/// Run a command over a WebSocket (§3) or, without an upgrade, list the
/// sprite's exec sessions. `?id=` attaches (legacy form). The upgrade answer
/// carries `X-Sprite-Capabilities: signal`. Query: `cmd` (repeated), `path`,
/// `env` (repeated `K=V`, replaces the default environment), `dir` (default
/// `/home/sprite`), `tty`, `stdin`, `cols`/`rows`, `max_run_after_disconnect`
/// and the den extension `timeout` (Go duration; hard run-time limit: the
/// command gets SIGTERM then SIGKILL, and a text frame
/// `{"type":"timeout","message":…}` precedes the exit frame).
#[utoipa::path(get, path = "/v1/sprites/{name}/exec",
    params(("name" = String, Path, description = "sprite name")),
    responses(
        (status = 101, description = "WebSocket exec session"),
        (status = 200, description = "sessions list (no upgrade)"),
        (status = 400, description = "No command specified, or a bad parameter"),
        (status = 404, description = "no such sprite")))]
pub async fn exec_get(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    headers: HeaderMap,
    query: QueryPairs,
    ws: Upgrade,
) -> ApiResult<Response> {
    let info = st.mgr.get(&name)?;
    if !wants_websocket(&headers) {
        return sessions::list(&st, &name, &info)
            .await
            .map(IntoResponse::into_response);
    }
    let ws = ws.map_err(|e| ApiError::bad_request(format!("websocket upgrade: {}", e.body_text())))?;
    let bridge = open_session(&st, &name, &info, &query_pairs(query)?).await?;
    Ok(upgrade(ws, bridge))
}

/// Attach to a running exec session (WebSocket): `session_info` with
/// `is_owner: false`, the scrollback replay, then live output.
#[utoipa::path(get, path = "/v1/sprites/{name}/exec/{session_id}",
    params(("name" = String, Path), ("session_id" = String, Path, description = "the session's PID")),
    responses((status = 101), (status = 400, description = "not a WebSocket upgrade"),
        (status = 404, description = "no such sprite or session")))]
pub async fn attach(
    State(st): State<AppState>,
    Path((_sprite, id)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    ws: Upgrade,
) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let ws = ws
        .map_err(|e| ApiError::bad_request(format!("attach needs a WebSocket upgrade: {}", e.body_text())))?;
    Ok(upgrade(ws, attach_session(&st, &name, &id).await?))
}
