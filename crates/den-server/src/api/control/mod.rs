//! The multiplexed control channel (§2.12): `WSS /v1/sprites/{name}/control`,
//! one WebSocket that carries many operations, one at a time.
//!
//! Control frames are text frames `control:{json}`. The client starts an
//! operation with `{"type":"op.start","id"?,"op":…,"args":{…}}`; den answers
//! `op.ack`, then every frame that is not a control frame belongs to the
//! operation (exec and proxy use their own WebSocket framing, §3.2 and
//! §2.11), until den ends it with `op.complete`
//! (`{"ok","exitCode"?,"error"?}`) or `op.error` (`{"code","message","error"}`).
//! `op.cancel` (or the Go SDK's plain `{"type":"release"}`) ends the input of
//! the running operation, as closing a direct WebSocket would: an exec
//! detaches, a tunnel closes.
//!
//! Operations call the very functions of the direct endpoints: `exec`
//! ([`crate::api::exec`]), `proxy` ([`crate::api::proxy`]) and `fs.read`,
//! `fs.write`, `fs.list`, `fs.delete`, `fs.rename`, `fs.copy`, `fs.chmod`
//! ([`crate::api::fs`]). The route's rule lets the token in once; each
//! operation is checked again against the token's role, as its direct route
//! would be, and recorded in the audit log.
//!
//! Bounds: one operation at a time (a second `op.start` gets `op.busy`);
//! client frames of at most [`MAX_FRAME`]; a few frames queued each way, so
//! a client that does not read stops the operation (and the command's
//! output) instead of growing den's memory, and an operation that does not
//! read stops den reading the socket.
//!
//! Data frames that arrive while no operation runs are dropped without an
//! answer: a stdin EOF a client sent before it saw `op.complete` is normal,
//! and an error frame for it would land on the client's next operation.

mod ops;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::audit::AuditEntry;
use crate::auth::{Principal, SpriteRef};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use ops::{Op, OpEnd};

/// The prefix of control frames.
const PREFIX: &str = "control:";

/// The largest frame (and message) a client may send: stdin chunks, tunnel
/// data, `fs.write` content. Larger uploads go in several frames
/// (`fs.write` with `size`) or through `PUT /fs/write`.
pub const MAX_FRAME: usize = 1 << 20;

/// Frames queued between the socket and the running operation, each way.
const QUEUE: usize = 8;

/// Plain JSON text frames (no `control:` prefix) that are control frames
/// all the same: the Go SDK sends its fs operations, its proxy (`start`)
/// and its release so.
const BARE_TYPES: &[&str] = &["op.start", "start", "op.cancel", "release"];

/// A control frame from the client.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    op: Option<String>,
    /// An object of strings (or arrays of strings), or a URL-encoded string.
    #[serde(default)]
    args: Option<Value>,
    /// The Go SDK's proxy start names `op` and `args` so.
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    params: Option<Value>,
}

/// What one client frame is.
enum Frame {
    Control {
        env: Envelope,
        bare: bool,
    },
    /// A `control:` frame that is not valid; the reason.
    BadControl(String),
    /// Belongs to the running operation.
    Data(Message),
    Close,
    Ignore,
}

fn classify(msg: Message) -> Frame {
    match msg {
        Message::Text(t) => {
            if let Some(rest) = t.as_str().strip_prefix(PREFIX) {
                return match serde_json::from_str::<Envelope>(rest) {
                    Ok(env) => Frame::Control { env, bare: false },
                    Err(e) => Frame::BadControl(format!("malformed control frame: {e}")),
                };
            }
            match serde_json::from_str::<Envelope>(t.as_str()) {
                Ok(env) if BARE_TYPES.contains(&env.kind.as_str()) => Frame::Control { env, bare: true },
                _ => Frame::Data(Message::Text(t)),
            }
        }
        Message::Binary(b) => Frame::Data(Message::Binary(b)),
        Message::Close(_) => Frame::Close,
        Message::Ping(_) | Message::Pong(_) => Frame::Ignore,
    }
}

fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// A control frame to the client, framed the way the client framed its
/// own: `control:`-prefixed, or plain JSON for a client that sent plain.
fn control_frame(bare: bool, v: Value) -> Message {
    let text = if bare {
        v.to_string()
    } else {
        format!("{PREFIX}{v}")
    };
    Message::Text(text.into())
}

fn op_error(bare: bool, id: &Option<Value>, code: &str, message: &str) -> Message {
    control_frame(
        bare,
        json!({"type": "op.error", "id": id, "args": {"code": code, "message": message, "error": message}}),
    )
}

/// Open the multiplexed control channel (WebSocket).
#[utoipa::path(get, path = "/v1/sprites/{name}/control",
    params(("name" = String, Path, description = "sprite name")),
    responses(
        (status = 101, description = "Control channel: `control:` JSON frames start and end operations \
            (exec, proxy, fs.*); other frames belong to the running operation"),
        (status = 400, description = "not a WebSocket upgrade"), (status = 401), (status = 403),
        (status = 404, description = "no such sprite")))]
pub async fn control(
    State(st): State<AppState>,
    principal: Principal,
    SpriteRef(key): SpriteRef,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // A missing sprite answers first, as on every sprite route. The sprite
    // is not woken: the Go SDK dials the channel for every sprite it
    // touches, and each operation wakes it when it runs.
    st.mgr.get(&key)?;
    let ws =
        ws.map_err(|e| ApiError::bad_request(format!("expected a WebSocket upgrade: {}", e.body_text())))?;
    let channel = Channel { st, principal, key };
    // Frames up to twice the limit are read, and answered with a close
    // frame that says why (1009); larger ones end the connection in the
    // WebSocket layer.
    Ok(ws
        .max_message_size(2 * MAX_FRAME)
        .max_frame_size(2 * MAX_FRAME)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "control websocket upgrade failed"))
        .on_upgrade(move |socket| channel.run(socket)))
}

struct Channel {
    st: AppState,
    principal: Principal,
    /// The sprite's key (organisation and name).
    key: String,
}

/// The operation that runs, as the channel sees it. Its task and output
/// are held apart (see [`Channel::run`]) so the loop can wait on both.
struct Running {
    id: Option<Value>,
    bare: bool,
    /// Client frames to it; `None` once its input ended (`op.cancel`).
    input: Option<mpsc::Sender<Message>>,
}

async fn next_output(out: &mut Option<mpsc::Receiver<Message>>) -> Option<Message> {
    match out {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn ended(task: &mut Option<JoinHandle<OpEnd>>) -> Result<OpEnd, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn input_room(input: Option<mpsc::Sender<Message>>) -> Option<mpsc::OwnedPermit<Message>> {
    match input {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

impl Channel {
    async fn run(self, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        let shutdown = self.st.shutdown.clone();
        let mut op: Option<Running> = None;
        let mut task: Option<JoinHandle<OpEnd>> = None;
        let mut output: Option<mpsc::Receiver<Message>> = None;
        // A client frame waiting for room in the operation's queue; the
        // socket is not read meanwhile.
        let mut pending: Option<Message> = None;
        loop {
            let input = op.as_ref().and_then(|r| r.input.clone());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let frame = CloseFrame { code: close_code::AWAY, reason: "server shutting down".into() };
                    let _ = send(&mut tx, Message::Close(Some(frame)), &shutdown).await;
                    break;
                }
                out = next_output(&mut output) => match out {
                    Some(m) => {
                        if !send(&mut tx, m, &shutdown).await {
                            break;
                        }
                    }
                    // The operation dropped its sender; its end follows.
                    None => output = None,
                },
                end = ended(&mut task) => {
                    task = None;
                    pending = None;
                    let Some(r) = op.take() else { continue };
                    // Its last frames go before the frame that ends it.
                    let mut gone = false;
                    if let Some(mut out) = output.take() {
                        while let Some(m) = out.recv().await {
                            if !send(&mut tx, m, &shutdown).await {
                                gone = true;
                                break;
                            }
                        }
                    }
                    if gone || !send(&mut tx, end_frame(r.bare, &r.id, end), &shutdown).await {
                        break;
                    }
                }
                permit = input_room(input), if pending.is_some() => {
                    match (permit, pending.take()) {
                        (Some(p), Some(m)) => {
                            p.send(m);
                        }
                        // The operation no longer reads: it is ending.
                        _ => {
                            if let Some(r) = op.as_mut() {
                                r.input = None;
                            }
                        }
                    }
                }
                msg = rx.next(), if pending.is_none() => {
                    let Some(Ok(msg)) = msg else { break };
                    if frame_len(&msg) > MAX_FRAME {
                        let reason = format!("frames are limited to {MAX_FRAME} bytes");
                        let frame = CloseFrame { code: close_code::SIZE, reason: reason.into() };
                        let _ = send(&mut tx, Message::Close(Some(frame)), &shutdown).await;
                        break;
                    }
                    match classify(msg) {
                        Frame::Data(m) => {
                            if op.as_ref().is_some_and(|r| r.input.is_some()) {
                                pending = Some(m);
                            } else {
                                tracing::debug!("control: data frame outside an operation dropped");
                            }
                        }
                        Frame::Control { env, bare } => {
                            let reply = match env.kind.as_str() {
                                "op.start" | "start" if op.is_some() => {
                                    Some(op_error(bare, &env.id, "op.busy", "an operation is already running on this channel"))
                                }
                                "op.start" | "start" => match self.start(env, bare) {
                                    Ok((running, t, out, ack)) => {
                                        op = Some(running);
                                        task = Some(t);
                                        output = Some(out);
                                        ack
                                    }
                                    Err(e) => Some(e),
                                },
                                "op.cancel" | "release" => {
                                    // Idle, it means nothing: the Go SDK releases after every operation.
                                    if let Some(r) = op.as_mut() {
                                        r.input = None;
                                        pending = None;
                                    }
                                    None
                                }
                                "keepalive" => None,
                                other => Some(op_error(
                                    bare,
                                    &env.id,
                                    "op.invalid",
                                    &format!("unknown control frame type {other:?}"),
                                )),
                            };
                            if let Some(reply) = reply
                                && !send(&mut tx, reply, &shutdown).await
                            {
                                break;
                            }
                        }
                        Frame::BadControl(why) => {
                            if !send(&mut tx, op_error(false, &None, "op.invalid", &why), &shutdown).await {
                                break;
                            }
                        }
                        Frame::Close => {
                            // Sends the close reply tungstenite has queued.
                            let _ = tx.flush().await;
                            break;
                        }
                        Frame::Ignore => {}
                    }
                }
            }
        }
        // Dropping the operation's queues ends its input and output: a
        // command detaches as when its exec WebSocket closes, a tunnel
        // closes, an upload is abandoned. Its task finishes on its own.
    }

    /// Starts the operation an `op.start` names: its state, task, output
    /// queue and the ack to send; or the `op.error` answer.
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        env: Envelope,
        bare: bool,
    ) -> Result<
        (
            Running,
            JoinHandle<OpEnd>,
            mpsc::Receiver<Message>,
            Option<Message>,
        ),
        Message,
    > {
        let id = env.id;
        let args = env.args.or(env.params);
        let Some(name) = env.op.or(env.operation).filter(|o| !o.is_empty()) else {
            return Err(op_error(bare, &id, "op.invalid", "op.start needs an \"op\""));
        };
        let parsed = ops::Args::from_value(args).and_then(|args| Op::parse(&name, &args));
        let parsed = match parsed {
            Ok(o) => o,
            Err(e) => {
                self.audit(&name, e.status);
                return Err(op_error(bare, &id, e.code, &e.message));
            }
        };
        if let Err(e) = self.principal.check(parsed.need()) {
            self.audit(&name, e.status.as_u16());
            return Err(op_error(bare, &id, "op.forbidden", &e.message));
        }
        self.audit(&name, 200);
        let (in_tx, in_rx) = mpsc::channel(QUEUE);
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(ops::run(
            self.st.clone(),
            self.key.clone(),
            parsed,
            ops::OpIo::new(in_rx, out_tx),
        ));
        // The Go SDK's plain-JSON fs operations read their answer as the
        // next frame: they get no ack.
        let ack = (!bare).then(|| control_frame(false, json!({"type": "op.ack", "id": id})));
        let running = Running {
            id,
            bare,
            input: Some(in_tx),
        };
        Ok((running, task, out_rx, ack))
    }

    /// Operations are recorded like the direct requests they stand for.
    fn audit(&self, op: &str, status: u16) {
        let (_, name) = den_sprite::key_parts(&self.key);
        self.st.audit.record(AuditEntry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            org: self.principal.org.clone(),
            token_id: self.principal.token.id.clone(),
            token_name: self.principal.token.name.clone(),
            action: format!("CONTROL {}", ops::audit_name(op)),
            sprite: Some(name.to_string()),
            status,
            request_id: None,
        });
    }
}

/// Sends one frame; false if the client is gone, or if the server shuts
/// down while the send waits on a client that does not read (it would
/// otherwise hold this task and its socket for ever).
async fn send(
    tx: &mut futures::stream::SplitSink<WebSocket, Message>,
    m: Message,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    // Biased: at shutdown a frame still goes if the socket takes it at once.
    tokio::select! {
        biased;
        r = tx.send(m) => r.is_ok(),
        _ = shutdown.cancelled() => false,
    }
}

/// The frame that ends an operation.
fn end_frame(bare: bool, id: &Option<Value>, end: Result<OpEnd, tokio::task::JoinError>) -> Message {
    let end = end.unwrap_or_else(|e| {
        tracing::error!(error = %e, "control operation task failed");
        OpEnd::Error {
            code: "op.failed",
            message: "internal error".into(),
        }
    });
    match end {
        OpEnd::Complete { exit_code, error } => {
            let mut args = json!({"ok": error.is_none()});
            if let Some(c) = exit_code {
                args["exitCode"] = json!(c);
            }
            if let Some(e) = error {
                args["error"] = json!(e);
            }
            control_frame(bare, json!({"type": "op.complete", "id": id, "args": args}))
        }
        OpEnd::Error { code, message } => op_error(bare, id, code, &message),
    }
}
