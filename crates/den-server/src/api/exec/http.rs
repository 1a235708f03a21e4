//! The HTTP side of exec: `POST /exec` (a non-TTY command whose output is
//! streamed in the binary framing of §3.2) and `POST /exec/{id}/kill`
//! (NDJSON progress).

use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use den_agent::client::Event;
use futures::StreamExt;
use serde_json::json;

use super::params::{ExecParams, parse_go_duration};
use super::ws::wire_exit_code;
use super::{QueryPairs, query_pairs, sprite_env, wake_and_exec};
use crate::api::checkpoints::{async_stream, ndjson};
use crate::auth::SpriteRef;
use crate::conn_socket::ConnSocket;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// How long a killed session may take to go after SIGKILL.
const AFTER_SIGKILL: Duration = Duration::from_secs(5);
/// The framing has no lengths, and clients such as the official JS SDK take
/// each read of the body as one frame. An exit frame sent right behind the
/// output would reach them in the same read and be taken for output. So it
/// goes only once the output is on the wire (out of hyper's buffer and out
/// of the kernel's send queue: [`output_on_the_wire`]), and then this long
/// after, for the client to read the output first. Timing alone (this gap
/// after the output was handed to hyper) failed under load: the output could
/// still be queued when the gap was over, and both went out together.
const EXIT_FRAME_GAP: Duration = Duration::from_millis(10);
/// The longest the exit frame waits for the output to leave: a client that
/// stopped reading gets it behind the output after all.
const ON_THE_WIRE_MAX: Duration = Duration::from_secs(5);
/// How often the send queue is asked while it drains (the kernel tells no
/// one when it empties).
const SEND_QUEUE_POLL: Duration = Duration::from_millis(1);

fn framed(kind: u8, data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(kind);
    v.extend_from_slice(data);
    v.into()
}

/// Run a non-TTY command over plain HTTP. The body is stdin when
/// `stdin=true`. The response (`application/octet-stream`) streams
/// `0x01`+stdout and `0x02`+stderr chunks as they come and ends with
/// `0x03,<exit code>`. `tty`, `id`, `detachable` and `cc` are refused; the
/// den `timeout` extension applies as on the WebSocket.
#[utoipa::path(post, path = "/v1/sprites/{name}/exec", params(("name" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "stdin (with stdin=true)"),
    responses((status = 200, content_type = "application/octet-stream"),
        (status = 400, description = "No command specified, or a WebSocket-only parameter"),
        (status = 404)))]
pub async fn exec_http(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    query: QueryPairs,
    socket: Option<Extension<ConnSocket>>,
    body: Body,
) -> ApiResult<Response> {
    let info = st.mgr.get(&name)?;
    let p = ExecParams::parse(&query_pairs(query)?)?;
    for (set, what) in [
        (p.tty, "tty"),
        (p.id.is_some(), "id"),
        (p.detachable, "detachable"),
        (p.cc, "cc"),
    ] {
        if set {
            return Err(ApiError::bad_request(format!(
                "{what} is not supported by HTTP exec; use the WebSocket"
            )));
        }
    }
    let req = p.to_exec_request(sprite_env(&info), st.cfg.default_exec_timeout)?;
    let (activity, mut session) = wake_and_exec(&st, &name, req).await?;
    let mut stdin = p.stdin.then(|| body.into_data_stream());
    let shutdown = st.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        let _awake = activity;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = session.recv() => {
                    let frame = match ev {
                        Some(Event::Stdout(b)) => framed(0x01, &b),
                        Some(Event::Stderr(b)) => framed(0x02, &b),
                        Some(Event::Exit(e)) => {
                            let _ = tx.send(Bytes::from(vec![0x03, wire_exit_code(e.exit_code)])).await;
                            return;
                        }
                        Some(_) => continue,
                        None => return,
                    };
                    if tx.send(frame).await.is_err() {
                        return; // client gone: detach
                    }
                }
                chunk = async { stdin.as_mut()?.next().await }, if stdin.is_some() => {
                    match chunk {
                        Some(Ok(data)) => {
                            if !data.is_empty() {
                                let _ = session.send_stdin(&data).await;
                            }
                        }
                        _ => {
                            stdin = None;
                            let _ = session.close_stdin().await;
                        }
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(
        exit_frame_apart(stream, socket.map(|Extension(s)| s)).map(Ok::<_, std::convert::Infallible>),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

/// `frames` with the exit frame (`0x03`, always last) held back until the
/// frames before it are on the wire to `socket`, and then [`EXIT_FRAME_GAP`]
/// longer. Without a socket to ask (a request that did not come through the
/// listener), the gap counts from when the frame before was taken by hyper.
/// While it waits, the body is pending, and hyper writes out what it holds.
fn exit_frame_apart(
    frames: impl futures::Stream<Item = Bytes> + Send + 'static,
    socket: Option<ConnSocket>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    let frames = Box::pin(frames);
    // The last frame handed to hyper: when, and how many flushes had been
    // seen then.
    let handed: Option<(tokio::time::Instant, u64)> = None;
    futures::stream::unfold(
        (frames, handed, socket),
        |(mut frames, handed, socket)| async move {
            let frame = frames.next().await?;
            if frame.first() == Some(&0x03)
                && let Some((at, flushes)) = handed
            {
                let waited = match &socket {
                    Some(s) => output_on_the_wire(s, flushes).await,
                    None => false,
                };
                let from = if waited { tokio::time::Instant::now() } else { at };
                tokio::time::sleep_until(from + EXIT_FRAME_GAP).await;
            }
            let flushes = socket.as_ref().map_or(0, ConnSocket::flushes);
            Some((
                frame,
                (frames, Some((tokio::time::Instant::now(), flushes)), socket),
            ))
        },
    )
}

/// Returns once what was handed to hyper while `socket` had seen `flushes`
/// flushes is out of hyper's buffer and out of the kernel's send queue (or
/// after [`ON_THE_WIRE_MAX`]). `true` if that took waiting; `false` if it
/// had left already, so that its time of leaving is not known.
async fn output_on_the_wire(socket: &ConnSocket, flushes: u64) -> bool {
    let deadline = tokio::time::Instant::now() + ON_THE_WIRE_MAX;
    let mut waited = socket.flushes() <= flushes;
    if waited {
        let flushed = std::future::poll_fn(|cx| socket.poll_flushed_since(flushes, cx));
        let _ = tokio::time::timeout_at(deadline, flushed).await;
    }
    while socket.unsent().is_some_and(|n| n > 0) && tokio::time::Instant::now() < deadline {
        waited = true;
        tokio::time::sleep(SEND_QUEUE_POLL).await;
    }
    waited
}

fn line(v: serde_json::Value) -> Bytes {
    let mut b = serde_json::to_vec(&v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

fn gone(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "gone",
        format!("exec session {id} has already exited"),
    )
}

/// Signal a session's process group and wait up to `timeout` (default 10s)
/// for it to exit, then SIGKILL it. NDJSON: `signal`, then `exited` or
/// `timeout` + `killed`, then `complete` with the `exit_code` (or `error`).
/// `timeout=0s` only signals (the Go SDK's signal fallback) and completes
/// without waiting. An unknown or exited session is 410 Gone.
#[utoipa::path(post, path = "/v1/sprites/{name}/exec/{session_id}/kill",
    params(("name" = String, Path), ("session_id" = String, Path),
        ("signal" = Option<String>, Query, description = "default SIGTERM"),
        ("timeout" = Option<String>, Query, description = "Go duration, default 10s")),
    responses((status = 200, content_type = "application/x-ndjson"), (status = 400),
        (status = 404, description = "no such sprite"), (status = 410, description = "session already exited")))]
pub async fn kill(
    State(st): State<AppState>,
    Path((_sprite, id)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    query: QueryPairs,
) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let pairs = query_pairs(query)?;
    let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let signal_raw = get("signal").filter(|s| !s.is_empty()).unwrap_or("SIGTERM");
    let signal = den_agent::protocol::parse_signal(signal_raw)
        .ok_or_else(|| ApiError::bad_request(format!("unknown signal {signal_raw:?}")))?;
    let timeout = match get("timeout").filter(|s| !s.is_empty()) {
        None => Duration::from_secs(10),
        Some(t) => parse_go_duration(t)
            .ok_or_else(|| ApiError::bad_request(format!("timeout={t:?} is not a duration")))?,
    };
    let pid: i64 = id.parse().map_err(|_| gone(&id))?;
    let activity = st.mgr.wake(&name).await?;
    let agent = activity.agent().clone();
    let is_gone = |e: den_agent::Error, id: &str| match e {
        den_agent::Error::Agent { code, .. } if code == "not_found" => gone(id),
        e => e.into(),
    };
    // Attached before signalling, so the exit cannot slip by unseen.
    let mut watch = agent.attach(&id).await.map_err(|e| is_gone(e, &id))?;
    agent
        .kill(&id, signal.as_str())
        .await
        .map_err(|e| is_gone(e, &id))?;
    let sig = signal.as_str().to_string();
    let stream = async_stream(move |tx| async move {
        let _awake = activity;
        let _ = tx
            .send(line(json!({
                "type": "signal",
                "message": format!("Signaling {sig} to process group {pid}"),
                "pid": pid,
                "signal": sig,
            })))
            .await;
        if timeout.is_zero() {
            let _ = tx.send(line(json!({"type": "complete"}))).await;
            return;
        }
        let exit = match tokio::time::timeout(timeout, watch.wait_exit()).await {
            Ok(exit) => {
                if exit.is_some() {
                    let _ = tx
                        .send(line(json!({"type": "exited", "message": "Process exited"})))
                        .await;
                }
                exit
            }
            Err(_) => {
                let _ = tx
                    .send(line(json!({
                        "type": "timeout",
                        "message": format!("Process did not exit within {}", humantime::format_duration(timeout)),
                    })))
                    .await;
                let _ = agent.kill(&id, "SIGKILL").await;
                let _ = tx
                    .send(line(json!({
                        "type": "killed",
                        "message": format!("Sent SIGKILL to process group {pid}"),
                    })))
                    .await;
                tokio::time::timeout(AFTER_SIGKILL, watch.wait_exit())
                    .await
                    .ok()
                    .flatten()
            }
        };
        let last = match exit {
            Some(e) => json!({"type": "complete", "exit_code": e.exit_code}),
            None => json!({"type": "error", "message": "the process's exit was not observed"}),
        };
        let _ = tx.send(line(last)).await;
    });
    Ok(ndjson(stream))
}
