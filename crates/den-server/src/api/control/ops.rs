//! The operations of the control channel, each a thin adapter over the
//! direct endpoint's own functions.
//!
//! - `exec`: args as the exec query (§3.1: `cmd`, `env`, `dir`, `tty`,
//!   `stdin`, `rows`, `cols`, `id`, …); then the exec framing of §3.2, and
//!   `op.complete` carries `exitCode`.
//! - `proxy`: args `host`/`port`, or the `{"host","port"}` init frame; then
//!   the `connected` reply and raw binary frames (§2.11).
//! - `fs.list`, `fs.delete`, `fs.rename`, `fs.copy`, `fs.chmod`: args as
//!   the HTTP routes' parameters; one JSON text frame answers (the HTTP
//!   body, or `{"error","code","path"}`).
//! - `fs.read` (`path`, `start`, `end`): a JSON frame
//!   `{"path","size","start","end"}`, then the bytes in binary frames of at
//!   most [`READ_FRAME`] (at least one, empty for an empty file).
//! - `fs.write` (`path`, `mode`, `mkdirParents` (default true), `asRoot`,
//!   `size`): the content follows in binary frames; without `size` the
//!   first binary frame is all of it. Then the JSON answer.
//!
//! fs paths resolve against `workingDir`, default `/home/sprite` here as
//! in the SDKs' control operations.

use axum::extract::ws::Message;
use futures::{Stream, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::api::exec::{self, Ended};
use crate::api::{fs, proxy};
use crate::auth::rules::Need;
use crate::error::ApiError;
use crate::state::AppState;

/// The largest binary frame `fs.read` sends.
pub const READ_FRAME: usize = super::MAX_FRAME;

/// The working directory of fs operations that name none.
const FS_WORKING_DIR: &str = "/home/sprite";

/// Why an `op.start` was refused.
#[derive(Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    /// The HTTP status the same mistake gets on a direct route (audit log).
    pub status: u16,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal {
        code: "op.invalid",
        message: message.into(),
        status: 400,
    }
}

/// An operation's arguments: `(key, value)` pairs, repeated keys allowed,
/// like a query string.
#[derive(Debug, Default)]
pub struct Args(Vec<(String, String)>);

impl Args {
    /// From `args`: an object whose values are strings, numbers, booleans
    /// or arrays of those, or a URL-encoded string (the Go SDK's form).
    pub fn from_value(v: Option<Value>) -> Result<Args, Refusal> {
        let mut pairs = Vec::new();
        match v {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                pairs.extend(url::form_urlencoded::parse(s.as_bytes()).into_owned());
            }
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let items = match v {
                        Value::Array(a) => a,
                        v => vec![v],
                    };
                    for item in items {
                        let s = match item {
                            Value::String(s) => s,
                            Value::Number(n) => n.to_string(),
                            Value::Bool(b) => b.to_string(),
                            Value::Null => continue,
                            _ => {
                                return Err(invalid(format!(
                                    "args.{k} must be a string or a list of strings"
                                )));
                            }
                        };
                        pairs.push((k.clone(), s));
                    }
                }
            }
            Some(_) => return Err(invalid("args must be an object or a URL-encoded string")),
        }
        Ok(Args(pairs))
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    fn flag(&self, key: &str) -> Result<Option<bool>, Refusal> {
        match self.get(key).as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(invalid(format!("{key} must be true or false, not {other:?}"))),
        }
    }

    fn working_dir(&self) -> Option<String> {
        Some(self.get("workingDir").unwrap_or_else(|| FS_WORKING_DIR.into()))
    }
}

/// A parsed operation.
pub enum Op {
    Exec(Vec<(String, String)>),
    Proxy(Option<proxy::Target>),
    FsRead(fs::ReadQuery),
    FsWrite(fs::WriteQuery, Option<u64>),
    FsList(fs::PathQuery),
    FsDelete(fs::PathQuery),
    FsRename(fs::RenameRequest),
    FsCopy(fs::CopyRequest),
    FsChmod(fs::ChmodRequest),
}

/// The operation names, for the audit log (never the client's string).
pub fn audit_name(op: &str) -> &'static str {
    match op {
        "exec" => "exec",
        "proxy" => "proxy",
        "fs.read" => "fs.read",
        "fs.write" => "fs.write",
        "fs.list" => "fs.list",
        "fs.delete" => "fs.delete",
        "fs.rename" => "fs.rename",
        "fs.copy" => "fs.copy",
        "fs.chmod" => "fs.chmod",
        _ => "unknown",
    }
}

impl Op {
    pub fn parse(op: &str, a: &Args) -> Result<Op, Refusal> {
        let wd = a.working_dir();
        Ok(match op {
            "exec" => {
                // The same checks as the exec WebSocket's query, up front.
                exec::ExecParams::parse(&a.0).map_err(|e| invalid(e.message))?;
                Op::Exec(a.0.clone())
            }
            "proxy" => Op::Proxy(
                proxy::preset_target(a.get("host"), a.get("port").as_deref())
                    .map_err(|e| invalid(e.message))?,
            ),
            "fs.read" => Op::FsRead(fs::ReadQuery {
                path: a.get("path"),
                working_dir: wd,
                start: a.get("start"),
                end: a.get("end"),
            }),
            "fs.write" => {
                let size = match a.get("size") {
                    None => None,
                    Some(s) => Some(
                        s.trim()
                            .parse()
                            .map_err(|_| invalid(format!("size {s:?} is not a byte count")))?,
                    ),
                };
                // The SDKs' control write makes parents unless told not to.
                let mkdir = a.get("mkdirParents").or_else(|| a.get("mkdir"));
                Op::FsWrite(
                    fs::WriteQuery {
                        path: a.get("path"),
                        working_dir: wd,
                        mode: a.get("mode"),
                        mkdir_parents: Some(mkdir.unwrap_or_else(|| "true".into())),
                        mkdir: None,
                        as_root: a.get("asRoot"),
                    },
                    size,
                )
            }
            "fs.list" => Op::FsList(fs::PathQuery {
                path: a.get("path"),
                working_dir: wd,
                recursive: a.get("recursive"),
            }),
            "fs.delete" => Op::FsDelete(fs::PathQuery {
                path: a.get("path"),
                working_dir: wd,
                recursive: a.get("recursive"),
            }),
            "fs.rename" => Op::FsRename(fs::RenameRequest {
                source: a.get("source"),
                dest: a.get("dest"),
                working_dir: wd,
                as_root: a.flag("asRoot")?,
            }),
            "fs.copy" => Op::FsCopy(fs::CopyRequest {
                source: a.get("source"),
                dest: a.get("dest"),
                working_dir: wd,
                recursive: a.flag("recursive")?,
                preserve_attrs: a.flag("preserveAttrs")?,
                as_root: a.flag("asRoot")?,
            }),
            "fs.chmod" => Op::FsChmod(fs::ChmodRequest {
                path: a.get("path"),
                working_dir: wd,
                mode: a.get("mode").map(Value::String),
                recursive: a.flag("recursive")?,
            }),
            other => {
                return Err(Refusal {
                    code: "op.not_found",
                    message: format!(
                        "unknown operation {other:?}: den offers exec, proxy, fs.read, fs.write, \
                         fs.list, fs.delete, fs.rename, fs.copy and fs.chmod"
                    ),
                    status: 404,
                });
            }
        })
    }

    /// What the direct route of this operation needs of the token.
    pub fn need(&self) -> Need {
        match self {
            Op::Exec(_) | Op::Proxy(_) => Need::Exec,
            Op::FsRead(_) | Op::FsList(_) => Need::Read,
            Op::FsWrite(..) | Op::FsDelete(_) | Op::FsRename(_) | Op::FsCopy(_) | Op::FsChmod(_) => {
                Need::Write
            }
        }
    }
}

/// How an operation ended.
pub enum OpEnd {
    Complete {
        exit_code: Option<u8>,
        error: Option<String>,
    },
    Error {
        code: &'static str,
        message: String,
    },
}

impl OpEnd {
    fn ok() -> OpEnd {
        OpEnd::Complete {
            exit_code: None,
            error: None,
        }
    }

    fn failed(message: impl Into<String>) -> OpEnd {
        OpEnd::Error {
            code: "op.failed",
            message: message.into(),
        }
    }
}

impl From<ApiError> for OpEnd {
    fn from(e: ApiError) -> OpEnd {
        OpEnd::failed(e.message)
    }
}

/// An operation's side of the channel: frames from the client, and a sink
/// to it whose queue is bounded, so a client that does not read stops the
/// operation.
pub struct OpIo {
    pub rx: std::pin::Pin<Box<dyn Stream<Item = Message> + Send>>,
    pub tx: PollSender<Message>,
}

impl OpIo {
    pub fn new(mut rx: mpsc::Receiver<Message>, tx: mpsc::Sender<Message>) -> OpIo {
        OpIo {
            rx: Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))),
            tx: PollSender::new(tx),
        }
    }

    /// False if the client is gone.
    async fn send(&mut self, m: Message) -> bool {
        use futures::SinkExt;
        self.tx.send(m).await.is_ok()
    }

    async fn send_json(&mut self, v: &Value) -> bool {
        self.send(Message::Text(v.to_string().into())).await
    }
}

pub async fn run(st: AppState, key: String, op: Op, mut io: OpIo) -> OpEnd {
    match op {
        Op::Exec(pairs) => run_exec(&st, &key, &pairs, &mut io).await,
        Op::Proxy(preset) => {
            let (activity, cold) = match proxy::wake(&st, &key).await {
                Ok(w) => w,
                Err(e) => return e.into(),
            };
            let end = proxy::run_tunnel(&st, &mut io.tx, &mut io.rx, &activity, preset, cold).await;
            drop(activity);
            match end {
                None => OpEnd::ok(),
                Some((code, _)) if code == axum::extract::ws::close_code::NORMAL => OpEnd::ok(),
                Some((_, reason)) => OpEnd::failed(reason),
            }
        }
        Op::FsRead(q) => run_read(&st, &key, &q, &mut io).await,
        Op::FsWrite(q, size) => run_write(&st, &key, &q, size, &mut io).await,
        Op::FsList(q) => answer(&mut io, fs::list_in(&st, &key, q).await).await,
        Op::FsDelete(q) => answer(&mut io, fs::delete_in(&st, &key, q, Default::default()).await).await,
        Op::FsRename(b) => answer(&mut io, fs::rename_in(&st, &key, b).await).await,
        Op::FsCopy(b) => answer(&mut io, fs::copy_in(&st, &key, b).await).await,
        Op::FsChmod(b) => answer(&mut io, fs::chmod_in(&st, &key, b).await).await,
    }
}

/// An fs result as its JSON frame, then the end of the operation.
async fn answer(io: &mut OpIo, r: Result<Value, fs::FsFail>) -> OpEnd {
    match r {
        Ok(v) => {
            io.send_json(&v).await;
            OpEnd::ok()
        }
        Err(f) => fs_failed(io, f).await,
    }
}

async fn fs_failed(io: &mut OpIo, f: fs::FsFail) -> OpEnd {
    let v = f.to_json();
    io.send_json(&v).await;
    OpEnd::Complete {
        exit_code: None,
        error: Some(v["error"].as_str().unwrap_or("failed").to_string()),
    }
}

async fn run_exec(st: &AppState, key: &str, pairs: &[(String, String)], io: &mut OpIo) -> OpEnd {
    let info = match st.mgr.get(key) {
        Ok(i) => i,
        Err(e) => return ApiError::from(e).into(),
    };
    let bridge = match exec::open_session(st, key, &info, pairs).await {
        Ok(b) => b,
        Err(e) => return e.into(),
    };
    let _live = crate::metrics::ExecStreamGauge::start();
    let mut rx = (&mut io.rx).map(resize_or_signal_as_text);
    let (ended, activity) = bridge.pump(&mut io.tx, &mut rx).await;
    drop(activity);
    match ended {
        Ended::Exited(code) => OpEnd::Complete {
            exit_code: Some(code),
            error: None,
        },
        Ended::AgentGone => OpEnd::failed("session ended without an exit status"),
        Ended::Shutdown => OpEnd::failed("server shutting down"),
        // The input ended (op.cancel, or the channel closed): detached.
        Ended::ClientClosed | Ended::ClientGone => OpEnd::ok(),
    }
}

/// The JS SDK sends `resize` and `signal` over the control channel as
/// binary frames holding the JSON; the exec framing has them as text. A
/// binary frame that is exactly such an object is taken as one (in non-TTY
/// framing `{` is no stream id; in a TTY it would be keystrokes that spell
/// that very JSON in one frame).
fn resize_or_signal_as_text(m: Message) -> Message {
    let Message::Binary(b) = m else { return m };
    if b.first() == Some(&b'{')
        && let Ok(v) = serde_json::from_slice::<Value>(&b)
        && matches!(v["type"].as_str(), Some("resize" | "signal"))
    {
        return Message::Text(v.to_string().into());
    }
    Message::Binary(b)
}

async fn run_read(st: &AppState, key: &str, q: &fs::ReadQuery, io: &mut OpIo) -> OpEnd {
    let (info, mut content, act) = match fs::read_in(st, key, q).await {
        Ok(r) => r,
        Err(f) => return fs_failed(io, f).await,
    };
    let size = info["size"].as_u64().unwrap_or(0);
    let want = info["end"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(info["start"].as_u64().unwrap_or(0));
    if !io.send_json(&info).await {
        return OpEnd::ok();
    }
    // Chunks are gathered into frames of up to READ_FRAME, so a file that
    // fits goes in one frame (the Go SDK reads exactly one).
    let mut buf = Vec::new();
    let mut sent = 0u64;
    let mut frames = 0;
    while let Some(chunk) = content.recv().await {
        let mut chunk = &chunk[..];
        while !chunk.is_empty() {
            let room = READ_FRAME - buf.len();
            let (head, rest) = chunk.split_at(room.min(chunk.len()));
            buf.extend_from_slice(head);
            chunk = rest;
            if buf.len() == READ_FRAME {
                sent += buf.len() as u64;
                frames += 1;
                if !io.send(Message::Binary(std::mem::take(&mut buf).into())).await {
                    return OpEnd::ok();
                }
            }
        }
    }
    if !buf.is_empty() || frames == 0 {
        sent += buf.len() as u64;
        if !io.send(Message::Binary(buf.into())).await {
            return OpEnd::ok();
        }
    }
    drop(act);
    // Files that report size 0 (/proc) are read to EOF: no length to check.
    if size > 0 && sent < want {
        return OpEnd::failed(format!("read ended after {sent} of {want} bytes"));
    }
    OpEnd::ok()
}

async fn run_write(st: &AppState, key: &str, q: &fs::WriteQuery, size: Option<u64>, io: &mut OpIo) -> OpEnd {
    let mut upload = match fs::open_write(st, key, q).await {
        Ok(u) => u,
        Err(f) => return fs_failed(io, f).await,
    };
    let mut got = 0u64;
    loop {
        if size.is_some_and(|n| got >= n) {
            break;
        }
        // The input ended before the content did: the write is abandoned
        // (the file is replaced atomically, so it is unchanged).
        let Some(m) = io.rx.next().await else {
            return OpEnd::ok();
        };
        let Message::Binary(b) = m else { continue };
        got += b.len() as u64;
        if let Some(n) = size
            && got > n
        {
            let f = fs::invalid(
                format!("more than the {n} bytes announced"),
                q.path.as_deref().unwrap_or(""),
            );
            return fs_failed(io, f).await;
        }
        if let Err(f) = upload.write(&b).await {
            return fs_failed(io, f).await;
        }
        if size.is_none() {
            break;
        }
    }
    answer(io, upload.finish().await).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_forms() {
        let a = Args::from_value(Some(
            json!({"cmd": ["echo", "hi"], "tty": "true", "rows": 24, "x": null}),
        ))
        .unwrap();
        let mut pairs = a.0.clone();
        pairs.sort();
        assert_eq!(
            pairs,
            [("cmd", "echo"), ("cmd", "hi"), ("rows", "24"), ("tty", "true")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let a = Args::from_value(Some(json!("path=%2Ftmp%2Fa+b&recursive=true"))).unwrap();
        assert_eq!(a.get("path").as_deref(), Some("/tmp/a b"));
        assert_eq!(a.flag("recursive").unwrap(), Some(true));
        assert!(Args::from_value(Some(json!({"cmd": {"a": 1}}))).is_err());
        assert!(Args::from_value(Some(json!(7))).is_err());
    }

    #[test]
    fn binary_resize_and_signal_become_text() {
        let bin = |s: &str| Message::Binary(s.as_bytes().to_vec().into());
        let m = resize_or_signal_as_text(bin(r#"{"type":"resize","cols":100,"rows":30}"#));
        assert!(matches!(m, Message::Text(t) if t.as_str().contains("resize")));
        let m = resize_or_signal_as_text(bin(r#"{"type":"signal","signal":"KILL"}"#));
        assert!(matches!(m, Message::Text(_)));
        for keep in [r#"{"type":"other"}"#, "{not json", "\u{0}hello"] {
            assert!(
                matches!(resize_or_signal_as_text(bin(keep)), Message::Binary(_)),
                "{keep}"
            );
        }
    }

    #[test]
    fn parse_checks_up_front() {
        let args = |v: Value| Args::from_value(Some(v)).unwrap();
        assert_eq!(
            Op::parse("nope", &args(json!({}))).err().unwrap().code,
            "op.not_found"
        );
        assert_eq!(
            Op::parse("exec", &args(json!({"tty": "maybe"})))
                .err()
                .unwrap()
                .code,
            "op.invalid"
        );
        assert_eq!(
            Op::parse("proxy", &args(json!({"port": "0"})))
                .err()
                .unwrap()
                .code,
            "op.invalid"
        );
        assert!(matches!(
            Op::parse("fs.list", &args(json!({}))).unwrap().need(),
            Need::Read
        ));
        assert!(matches!(
            Op::parse("fs.write", &args(json!({}))).unwrap().need(),
            Need::Write
        ));
        assert!(matches!(
            Op::parse("exec", &args(json!({"cmd": "true"}))).unwrap().need(),
            Need::Exec
        ));
    }
}
