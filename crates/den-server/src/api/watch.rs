//! Port and filesystem watches over WebSocket (`sprite.watchPorts()`,
//! `sprite.filesystem().watch()` of the JS SDK). The agent inside the
//! sprite does the watching (see den-agent's `watch_ports` and `fs_watch`);
//! these handlers relay its JSON messages as text frames.
//!
//! A watch wakes the sprite to start but does not keep it awake: a frozen
//! sprite's stream pauses until it thaws, and a sprite that goes cold ends
//! the stream (close 1001 `the sprite stopped`), as its agent goes away.

use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use den_agent::client::JsonStream;
use serde_json::{Value, json};

use crate::auth::SpriteRef;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;

fn upgrade(ws: Upgrade) -> ApiResult<WebSocketUpgrade> {
    ws.map_err(|e| ApiError::bad_request(format!("expected a WebSocket upgrade: {e}")))
}

fn agent_error(e: den_agent::Error) -> ApiError {
    ApiError::internal_logged("reaching the sprite's agent", &e)
}

async fn send(socket: &mut WebSocket, v: &Value) -> bool {
    socket.send(Message::Text(v.to_string().into())).await.is_ok()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// A port event in the SDK's `PortNotification` shape (the agent's
/// `session` field left out).
fn port_note(kind: &str, p: &Value) -> Value {
    json!({"type": kind, "port": p["port"], "address": p["address"], "pid": p["pid"]})
}

/// Listening TCP ports of the sprite's processes (WebSocket): first
/// `{"type":"port_list","ports":[…]}`, then `{"type":"port_opened"|
/// "port_closed","port","address","pid"}`. `address` is the IP address the
/// socket is bound to inside the sprite (`127.0.0.1`, `0.0.0.0`, `::`), as
/// the SDKs' type says; the Sprites docs show a URL there instead.
#[utoipa::path(get, path = "/v1/sprites/{name}/ports/watch",
    responses((status = 101, description = "`port_list`, then `port_opened`/`port_closed` text frames"),
        (status = 400), (status = 404)))]
pub async fn ports(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    ws: Upgrade,
) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let ws = upgrade(ws)?;
    let stream = {
        let act = st.mgr.wake(&name).await?;
        act.agent().watch_ports().await.map_err(agent_error)?
    };
    Ok(ws.on_upgrade(move |socket| relay_ports(st, socket, stream)))
}

async fn relay_ports(st: AppState, mut socket: WebSocket, mut stream: JsonStream) {
    loop {
        tokio::select! {
            msg = stream.recv() => {
                let Some(m) = msg else {
                    return close(&mut socket, close_code::AWAY, "the sprite stopped").await;
                };
                let out = match m["type"].as_str() {
                    Some("port_list") => {
                        let ports: Vec<Value> = m["ports"]
                            .as_array()
                            .map(|a| a.iter().map(|p| port_note("port_opened", p)).collect())
                            .unwrap_or_default();
                        json!({"type": "port_list", "ports": ports})
                    }
                    Some(kind @ ("port_opened" | "port_closed")) => port_note(kind, &m),
                    _ => continue,
                };
                if !send(&mut socket, &out).await {
                    return;
                }
            }
            // Anything from the client but its close is ignored.
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = st.shutdown.cancelled() => {
                return close(&mut socket, close_code::AWAY, "server shutting down").await;
            }
        }
    }
}

/// How long a client may take to send its first `subscribe`.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client's `{"type":"subscribe","paths":[…],"recursive":bool,"workingDir":…}`.
struct Subscribe {
    paths: Vec<String>,
    recursive: bool,
    working_dir: Option<String>,
}

fn parse_subscribe(text: &str) -> Result<Subscribe, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("expected a JSON message: {e}"))?;
    if v["type"] != "subscribe" {
        return Err(format!(
            "unknown message type {}: expected \"subscribe\"",
            v["type"]
        ));
    }
    let paths = v["paths"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|p| !p.is_empty())
        .ok_or("paths must be a non-empty array of strings")?;
    let recursive = match &v["recursive"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        other => return Err(format!("recursive must be true or false, not {other}")),
    };
    let working_dir = match &v["workingDir"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => return Err(format!("workingDir must be a string, not {other}")),
    };
    Ok(Subscribe {
        paths,
        recursive,
        working_dir,
    })
}

fn error(message: impl Into<String>) -> Value {
    json!({"type": "error", "message": message.into()})
}

/// Filesystem changes under paths of the sprite (WebSocket). The client
/// sends `{"type":"subscribe","paths":[…],"recursive":bool,"workingDir":…}`;
/// den answers `{"type":"subscribed","paths":[absolute…]}`, then
/// `{"type":"event","path","event":"create"|"write"|"remove"|"rename"|
/// "chmod","timestamp","size","isDir"}` from inotify, and
/// `{"type":"error","message"}` for a refused subscription or lost events.
/// A later `subscribe` replaces the current one.
#[utoipa::path(get, path = "/v1/sprites/{name}/fs/watch",
    responses((status = 101, description = "`subscribe` from the client, then `subscribed`, `event` and `error` text frames"),
        (status = 400), (status = 404)))]
pub async fn fs(State(st): State<AppState>, SpriteRef(name): SpriteRef, ws: Upgrade) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let ws = upgrade(ws)?;
    // Woken before the upgrade, so a sprite that can't start is an HTTP error.
    drop(st.mgr.wake(&name).await?);
    Ok(ws.on_upgrade(move |socket| fs_session(st, socket, name)))
}

async fn next(stream: &mut Option<JsonStream>) -> Option<Value> {
    match stream {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn fs_session(st: AppState, mut socket: WebSocket, name: String) {
    let mut current: Option<JsonStream> = None;
    let first_deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) => {
                    let reply = match parse_subscribe(t.as_str()) {
                        Err(m) => error(m),
                        Ok(sub) => {
                            current = None;
                            match subscribe(&st, &name, &sub).await {
                                Ok((paths, stream)) => {
                                    current = Some(stream);
                                    json!({"type": "subscribed", "paths": paths})
                                }
                                Err(m) => error(m),
                            }
                        }
                    };
                    if !send(&mut socket, &reply).await {
                        return;
                    }
                }
                Some(Ok(_)) => {}
            },
            ev = next(&mut current) => match ev {
                Some(v) => {
                    if !send(&mut socket, &v).await {
                        return;
                    }
                }
                None => return close(&mut socket, close_code::AWAY, "the sprite stopped").await,
            },
            _ = tokio::time::sleep_until(first_deadline), if current.is_none() => {
                return close(&mut socket, close_code::POLICY, "no subscribe message").await;
            }
            _ = st.shutdown.cancelled() => {
                return close(&mut socket, close_code::AWAY, "server shutting down").await;
            }
        }
    }
}

/// Starts the agent's watch; `Err` is the message for the client.
async fn subscribe(st: &AppState, name: &str, sub: &Subscribe) -> Result<(Vec<String>, JsonStream), String> {
    let act = st.mgr.wake(name).await.map_err(|e| ApiError::from(e).message)?;
    act.agent()
        .fs_watch(&sub.paths, sub.working_dir.as_deref(), sub.recursive)
        .await
        .map_err(|e| match e {
            den_agent::Error::Agent { message, .. } => message,
            other => ApiError::internal_logged("watching files in the sprite", &other).message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_messages() {
        let s =
            parse_subscribe(r#"{"type":"subscribe","paths":["a","/b"],"recursive":true,"workingDir":"/x"}"#)
                .unwrap();
        assert_eq!(
            (s.paths, s.recursive, s.working_dir.as_deref()),
            (vec!["a".to_string(), "/b".to_string()], true, Some("/x"))
        );
        let s = parse_subscribe(r#"{"type":"subscribe","paths":["a"]}"#).unwrap();
        assert!(!s.recursive && s.working_dir.is_none());
        for bad in [
            "nope",
            r#"{"type":"unsubscribe","paths":["a"]}"#,
            r#"{"type":"subscribe","paths":[]}"#,
            r#"{"type":"subscribe","paths":"a"}"#,
            r#"{"type":"subscribe","paths":[1]}"#,
            r#"{"type":"subscribe","paths":["a"],"recursive":"yes"}"#,
            r#"{"type":"subscribe","paths":["a"],"workingDir":3}"#,
        ] {
            assert!(parse_subscribe(bad).is_err(), "{bad}");
        }
    }
}
