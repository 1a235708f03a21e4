//! The exec WebSocket (§3.2): bridges one agent session to one client.
//!
//! Server → client, in this order: a `session_info` text frame; output
//! (non-TTY: binary frames prefixed `0x01` stdout / `0x02` stderr; TTY: raw
//! bytes); `port_opened`/`port_closed` text frames as listeners come and go;
//! then, if the den `timeout` limit killed the command, a text frame
//! `{"type":"timeout","message":…}`; then the exit (non-TTY: binary
//! `[0x03, code]`; TTY: text `{"type":"exit","exit_code":N}`) and a close
//! with 1000. Client → server: non-TTY `0x00`+stdin bytes and `0x04` (stdin
//! EOF); TTY raw stdin bytes; text `resize` and `signal` messages.
//!
//! A client that goes away detaches: the command runs on per its
//! `max_run_after_disconnect`. Server shutdown closes with 1001.

use std::net::Ipv4Addr;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use den_agent::client::{Event, Session};
use den_agent::protocol::{ExitInfo, PortEvent, SessionInfo};
use den_sprite::Activity;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const STDIN: u8 = 0x00;
const STDOUT: u8 = 0x01;
const STDERR: u8 = 0x02;
const EXIT: u8 = 0x03;
const STDIN_EOF: u8 = 0x04;

/// WebSocket close codes.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_INTERNAL: u16 = 1011;

/// How long to wait for the client's answer to our close frame; the client
/// already has everything, this only lets the handshake finish cleanly.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Exit codes on the wire are one byte; signals are already 128 + n.
pub fn wire_exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

pub fn session_info_json(info: &SessionInfo) -> serde_json::Value {
    let mut v = json!({
        "type": "session_info",
        "session_id": info.session_id,
        "command": info.command,
        "created": info.created,
        "is_owner": info.is_owner,
        "tty": info.tty,
    });
    if info.tty {
        v["cols"] = json!(info.cols);
        v["rows"] = json!(info.rows);
    }
    v
}

/// Loopback and wildcard listeners are reached through the sprite's own
/// address from the host, so that is what clients forward to.
fn port_json(kind: &str, p: &PortEvent, sprite_addr: Ipv4Addr) -> serde_json::Value {
    let address = match p.address.as_str() {
        "127.0.0.1" | "0.0.0.0" | "::1" | "::" | "" => sprite_addr.to_string(),
        a => a.to_string(),
    };
    json!({"type": kind, "port": p.port, "address": address, "pid": p.pid})
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientText {
    Resize { cols: u16, rows: u16 },
    Signal { signal: String },
}

/// Everything one WebSocket needs; the [`Activity`] keeps the sprite awake
/// for as long as the client is attached.
pub struct Bridge {
    pub session: Session,
    pub activity: Activity,
    pub shutdown: CancellationToken,
    /// The limit the command runs under, for the timeout message.
    pub timeout: Option<std::time::Duration>,
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// How a bridged session ended on the client's side of the bridge.
pub enum Ended {
    /// The command exited; its exit frames were sent. The wire exit code.
    Exited(u8),
    /// The client sent a close frame: it detaches.
    ClientClosed,
    /// The client went away (or stopped reading at shutdown): it detaches.
    ClientGone,
    /// The agent went away (sprite stopped or crashed).
    AgentGone,
    Shutdown,
}

impl Bridge {
    pub async fn run(self, socket: WebSocket) {
        let (mut tx, rx) = socket.split();
        let mut rx = client_messages(rx);
        let shutdown = self.shutdown.clone();
        let _live = crate::metrics::ExecStreamGauge::start();
        let (ended, activity) = self.pump(&mut tx, &mut rx).await;
        let closing = match ended {
            Ended::Exited(_) => {
                if !send(&mut tx, close(CLOSE_NORMAL, ""), &shutdown).await {
                    return;
                }
                None
            }
            Ended::Shutdown => Some(close(CLOSE_GOING_AWAY, "server shutting down")),
            Ended::AgentGone => Some(close(CLOSE_INTERNAL, "session ended without an exit status")),
            Ended::ClientClosed => {
                // Sends the close reply tungstenite has queued.
                let _ = tx.flush().await;
                return;
            }
            Ended::ClientGone => return,
        };
        if let Some(msg) = closing
            && tx.send(msg).await.is_err()
        {
            return;
        }
        // Let the client's close reply arrive, briefly; it has all it needs.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(m) = rx.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        drop(activity);
    }

    /// Bridges the session to any client transport: the exec WebSocket, or
    /// one operation of the control channel. Sends `session_info`, output
    /// and the exit frames, and never a close frame; that is the caller's.
    /// The [`Activity`] comes back so the caller decides when the sprite
    /// may sleep.
    pub async fn pump<T, R>(self, tx: &mut T, rx: &mut R) -> (Ended, Activity)
    where
        T: Sink<Message> + Unpin,
        R: Stream<Item = Message> + Unpin,
    {
        let Bridge {
            mut session,
            activity,
            shutdown,
            timeout,
        } = self;
        let tty = session.info.tty;
        let info = session_info_json(&session.info).to_string();
        if tx.send(Message::Text(info.into())).await.is_err() {
            return (Ended::ClientGone, activity);
        }
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ended::Shutdown,
                ev = session.recv() => {
                    let msgs = match ev {
                        Some(Event::Stdout(b)) if tty => vec![Message::Binary(b)],
                        Some(Event::Stdout(b)) => vec![Message::Binary(prefixed(STDOUT, &b))],
                        Some(Event::Stderr(b)) => vec![Message::Binary(prefixed(STDERR, &b))],
                        Some(Event::PortOpened(p)) => {
                            vec![Message::Text(port_json("port_opened", &p, activity.addr()).to_string().into())]
                        }
                        Some(Event::PortClosed(p)) => {
                            vec![Message::Text(port_json("port_closed", &p, activity.addr()).to_string().into())]
                        }
                        Some(Event::Exit(e)) => {
                            for msg in exit_messages(&e, tty, timeout) {
                                if !send(tx, msg, &shutdown).await {
                                    return (Ended::ClientGone, activity);
                                }
                            }
                            break Ended::Exited(wire_exit_code(e.exit_code));
                        }
                        None => break Ended::AgentGone,
                    };
                    for msg in msgs {
                        if !send(tx, msg, &shutdown).await {
                            // Client gone (or never reading at shutdown): detach.
                            return (Ended::ClientGone, activity);
                        }
                    }
                }
                msg = rx.next() => {
                    let Some(msg) = msg else { break Ended::ClientGone };
                    match msg {
                        Message::Binary(b) => {
                            let r = if tty {
                                session.send_stdin(&b).await
                            } else {
                                match b.first() {
                                    Some(&STDIN) if b.len() > 1 => session.send_stdin(&b[1..]).await,
                                    Some(&STDIN_EOF) => session.close_stdin().await,
                                    _ => Ok(()),
                                }
                            };
                            if let Err(e) = r {
                                tracing::debug!(error = %e, "forwarding stdin");
                            }
                        }
                        Message::Text(t) => match serde_json::from_str::<ClientText>(t.as_str()) {
                            Ok(ClientText::Resize { cols, rows }) if cols > 0 && rows > 0 => {
                                let _ = session.resize(cols, rows).await;
                            }
                            Ok(ClientText::Signal { signal }) => {
                                if den_agent::protocol::parse_signal(&signal).is_some() {
                                    let _ = session.signal(&signal).await;
                                } else {
                                    tracing::debug!(%signal, "unknown signal from exec client");
                                }
                            }
                            // Other text (control:… on plain exec, malformed) is ignored.
                            _ => {}
                        },
                        Message::Close(_) => break Ended::ClientClosed,
                        // tungstenite answers pings itself.
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
            }
        };
        (ended, activity)
    }
}

/// A WebSocket's incoming messages, ending at its first error.
pub(crate) fn client_messages<S>(rx: S) -> impl Stream<Item = Message> + Unpin
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    rx.take_while(|r| std::future::ready(r.is_ok()))
        .filter_map(|r| std::future::ready(r.ok()))
}

/// Sends one message; false if the client is gone, or if the server shuts
/// down while the send waits on a client that does not read (it would
/// otherwise hold this task, its socket and the sprite for ever).
async fn send<T: Sink<Message> + Unpin>(tx: &mut T, msg: Message, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        r = tx.send(msg) => r.is_ok(),
        _ = shutdown.cancelled() => false,
    }
}

fn prefixed(kind: u8, data: &[u8]) -> bytes::Bytes {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(kind);
    v.extend_from_slice(data);
    v.into()
}

/// The frames that end a session: the den timeout notice, then the exit.
fn exit_messages(e: &ExitInfo, tty: bool, timeout: Option<std::time::Duration>) -> Vec<Message> {
    let code = wire_exit_code(e.exit_code);
    let mut out = Vec::new();
    if e.timed_out {
        let limit = match timeout {
            Some(t) => format!("its {} time limit", humantime::format_duration(t)),
            None => "its time limit".into(),
        };
        let msg = json!({
            "type": "timeout",
            "message": format!("command exceeded {limit} and was killed"),
        });
        out.push(Message::Text(msg.to_string().into()));
    }
    if tty {
        out.push(Message::Text(
            json!({"type": "exit", "exit_code": code}).to_string().into(),
        ));
    } else {
        out.push(Message::Binary(vec![EXIT, code].into()));
    }
    out
}
