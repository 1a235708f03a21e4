//! The den in-sprite agent.
//!
//! It runs as PID 1 inside every sprite (`den agent --socket
//! /.sprite/run/agent.sock`) and serves the host over one unix socket:
//!
//! * **PID 1 duties**: a single SIGCHLD-driven reaper (`waitpid(-1)`) owns
//!   every child status; exec'd commands are registered with it, orphans are
//!   just reaped. On SIGTERM/SIGINT the agent forwards SIGTERM to every
//!   session's process group and SIGKILLs stragglers after a grace period.
//! * **Exec sessions**: every command is a session whose id is its PID as a
//!   decimal string. Sessions run in their own kernel session/process group,
//!   keep a scrollback ring for replay on attach, fan output out to any number
//!   of attached clients, and survive client disconnects for
//!   `max_run_after_disconnect` (TTY: forever, otherwise 10 s).
//! * **Port watcher**: LISTEN sockets appearing/disappearing in
//!   `/proc/net/tcp{,6}` are reported to the owning session's clients and to
//!   `subscribe_ports` connections.
//!
//! # Protocol
//!
//! One connection per request. The client first writes one JSON line, a
//! [`protocol::Request`] tagged by `type`:
//!
//! ```text
//! {"type":"exec","argv":["sh","-c","echo hi"],"tty":false,"stdin":true, ...}
//! {"type":"attach","session":"1234"}
//! {"type":"list_sessions"}
//! {"type":"kill","session":"1234","signal":"TERM"}
//! {"type":"subscribe_ports"}
//! {"type":"ping"}
//! ```
//!
//! The agent answers with one JSON line, a [`protocol::Response`]:
//! `{"ok":true}` (plus `sessions` for `list_sessions`) or
//! `{"ok":false,"code":"not_found"|"bad_request"|"spawn_failed","error":"…"}`.
//! `ping`, `list_sessions` and `kill` then close.
//!
//! After a successful `exec`, `attach` or `subscribe_ports` both directions
//! carry binary frames `[kind u8][len u32 big-endian][payload]`:
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | `0x00` stdin | client → agent | bytes |
//! | `0x01` stdout | agent → client | bytes (all output in TTY mode) |
//! | `0x02` stderr | agent → client | bytes (non-TTY only) |
//! | `0x04` stdin EOF | client → agent | empty; closes the stdin pipe (ignored for TTY) |
//! | `0x10` control | both | one JSON [`protocol::Control`] |
//!
//! Control messages: from the client `{"type":"resize","cols":C,"rows":R}`
//! and `{"type":"signal","signal":"TERM"}` (any of `TERM`/`SIGTERM`/`15`,
//! delivered to the process group). From the agent
//! `{"type":"session_info","session_id":"1234","command":…,"created":unix_s,
//! "cols":…,"rows":…,"is_owner":bool,"tty":bool}`, `{"type":"exit",
//! "exit_code":N,"signal":"SIGKILL"?,"timed_out":bool}` and
//! `{"type":"port_opened"|"port_closed","port":P,"address":"127.0.0.1",
//! "pid":N,"session":"1234"?}`.
//!
//! On exec/attach the first frame is always `session_info`; on attach the
//! scrollback replay follows, then live frames. All output the process wrote
//! before exiting precedes the `exit` frame, after which the agent closes the
//! connection. A client detaches by closing the connection. Exit codes are the
//! process's status or 128 + signal number.
//!
//! A client that falls more than 1024 frames behind is disconnected instead
//! of being buffered without bound; it can re-attach and gets the scrollback
//! (256 KiB by default). Output still buffered in a pipe or pty when the
//! process exits is read to EOF first; if a background process keeps the
//! descriptors open, reading stops `exit_drain_timeout` (500 ms) after the
//! exit.
//!
//! # Caveat for embedders
//!
//! The agent reaps with `waitpid(-1)`. A process running the agent must not
//! use `tokio::process` or `std::process::Child::wait` for other children.
//! The [`client`] module has no such restriction.

pub mod client;
mod ports;
pub mod protocol;
mod reaper;
mod server;
mod session;
mod sys;
pub mod user;

use std::path::PathBuf;
use std::time::Duration;

pub use server::AgentHandle;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("user: {0}")]
    User(String),
    #[error("spawn: {0}")]
    Spawn(String),
    /// The agent answered a request with `ok: false`.
    #[error("agent refused ({code}): {message}")]
    Agent { code: String, message: String },
}

/// Agent settings; [`AgentConfig::new`] gives the in-sprite defaults.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub socket: PathBuf,
    pub passwd_path: PathBuf,
    pub group_path: PathBuf,
    pub default_user: String,
    pub default_cwd: PathBuf,
    /// Per-session replay buffer.
    pub scrollback_bytes: usize,
    pub non_tty_max_run_after_disconnect: Duration,
    /// How long to keep reading output after the process exited, for
    /// descriptors inherited by still-running background processes.
    pub exit_drain_timeout: Duration,
    pub port_poll_interval: Duration,
    /// SIGTERM → SIGKILL grace for the hard run-time limit.
    pub default_kill_grace: Duration,
    /// SIGTERM → SIGKILL grace for sessions on agent shutdown.
    pub shutdown_grace: Duration,
    /// Become a child subreaper when not PID 1, so orphans still come to us.
    pub subreaper: bool,
}

impl AgentConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentConfig {
            socket: socket.into(),
            passwd_path: "/etc/passwd".into(),
            group_path: "/etc/group".into(),
            default_user: "sprite".into(),
            default_cwd: "/home/sprite".into(),
            scrollback_bytes: 256 * 1024,
            non_tty_max_run_after_disconnect: Duration::from_secs(10),
            exit_drain_timeout: Duration::from_millis(500),
            port_poll_interval: Duration::from_millis(200),
            default_kill_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            subreaper: true,
        }
    }
}

/// Serves until SIGTERM or SIGINT, then shuts sessions down.
pub async fn run(config: AgentConfig) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let handle = AgentHandle::start(config).await?;
    tracing::info!(socket = %handle.socket().display(), pid = std::process::id(), "den agent serving");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: forwarding SIGTERM to sessions");
    handle.shutdown().await;
    Ok(())
}
