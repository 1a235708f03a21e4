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
//! * **Services**: declared long-running processes, started in `needs`
//!   order, restarted on crashes with backoff, logged to files (see
//!   [Services](#services) below).
//! * **Filesystem**: read, atomic write, list, delete, rename, copy, chmod
//!   (see [Filesystem](#filesystem) below).
//! * **Port watcher**: LISTEN sockets appearing/disappearing in
//!   `/proc/net/tcp{,6}` are reported to the owning session's clients and to
//!   `subscribe_ports` connections; `watch_ports` first sends
//!   `{"type":"port_list","ports":[…]}` of the listeners open now.
//! * **Filesystem watches**: `{"type":"fs_watch","paths":[…],"working_dir":…,
//!   "recursive":bool}` answers `fs: {"paths":[absolute…]}`, then control
//!   frames with the Sprites `fs/watch` messages (`event`, `error`), from
//!   inotify, bounded (see the `fswatch` module).
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
//! `ping`, `list_sessions`, `kill`, `services_set`, `services_status`,
//! `service_signal` and the filesystem requests other than `fs_read` and
//! `fs_write` then close.
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
//! # Services
//!
//! Sprites §2.6 semantics; the host persists the definitions and always sends
//! the whole desired set:
//!
//! ```text
//! {"type":"services_set","services":[{"name":"web","cmd":"python3","args":["-m","http.server"],
//!   "env":{"K":"v"},"dir":"/srv","needs":["db"],"http_port":8000,"stopped":false}, ...]}
//! {"type":"services_status"}
//! {"type":"service_signal","name":"web","signal":"HUP"}
//! {"type":"service_logs","name":"web","lines":100,"follow":false}
//! {"type":"service_events","name":"web"}          (name omitted or null: all services)
//! ```
//!
//! * `services_set` validates first: names `[A-Za-z0-9_.-]{1,64}` (not `.`
//!   or `..`), non-empty `cmd`, unique names, `needs` naming services of the
//!   set, no cycles; otherwise `{"ok":false,"code":"bad_request"}` and nothing
//!   changes. Then: an unchanged definition is left alone; a new or changed
//!   one (any field differs) is (re)started, the old process being stopped
//!   first; a removed one is stopped and forgotten (logs stay). Stopping is
//!   SIGTERM to the process group, SIGKILL after `service_stop_grace` (5 s).
//!   `stopped:true` is the sticky stop: not started, not restarted by
//!   crashes; setting it back to false starts the service. A service is
//!   spawned only once every service it `needs` is running. The answer
//!   (`{"ok":true}`) comes once removed services stopped and every new or
//!   changed one was spawned, failed to spawn, is stopped, or waits on a need
//!   that is itself not running after its own attempt.
//! * Processes run as `default_user` with exec's default environment (PATH,
//!   HOME, USER, LOGNAME, LANG) plus `env`, in `dir` or the user's home,
//!   stdin `/dev/null`, in their own session/process group.
//! * Any exit not caused by a stop (including signals) is a crash: the
//!   service restarts after 1 s, 2 s, 4 s, … capped at 30 s
//!   (`service_backoff_base`/`_max`); the delay starts over after a run of at
//!   least the cap. Each restart increments `restart_count`; meanwhile the
//!   status is `starting` with `error` ("exited with code 3", "killed by
//!   SIGKILL") and `next_restart_at`. A failed spawn (e.g. command not found)
//!   makes it `failed` with `error`, retried the same way.
//! * `services_status` answers `{"ok":true,"services":[{"name":"web",
//!   "status":"stopped"|"starting"|"running"|"stopping"|"failed","pid":N|null,
//!   "started_at":unix_ms|null,"error":str|null,"restart_count":N,
//!   "next_restart_at":unix_ms|null}]}`, sorted by name.
//! * `service_signal` signals the process group; errors `not_found` (no such
//!   service), `not_running`, `bad_request` (bad signal name).
//! * Output goes to `<services_log_dir>/<name>.log` (default
//!   `/.sprite/logs/services`) as `2026-01-05T08:01:00.123Z [stdout] line`
//!   (or `[stderr]`), and raw to `<name>.stdout.log` / `<name>.stderr.log`.
//!   `service_logs` answers ok (or `not_found` if the service is neither
//!   defined nor has a log), then stdout frames with the last `lines`
//!   (default 100) lines of `<name>.log`; without `follow` an EOF frame
//!   (`0x04`) and close, with `follow` appended data until the client closes.
//! * `service_events` answers ok, then control frames until the client
//!   closes: `{"type":"service","event":{"name":"web","type":"started"|
//!   "stopping"|"stopped"|"exit"|"stdout"|"stderr"|"error","data":"line or
//!   error"?,"exit_code":N?,"timestamp":unix_ms}}`. `started` always precedes
//!   the run's output, which precedes its `exit`; a stop yields `stopping`,
//!   `exit`, `stopped`. A subscriber more than 4096 events behind is
//!   disconnected.
//! * On agent shutdown services are stopped like removed ones.
//!
//! # Filesystem
//!
//! Sprites §2.10 operations, run inside the sprite (so confined to its
//! root). Paths may not contain NUL; relative ones resolve against
//! `working_dir` (default `/`), and `.`/`..` are normalised away. Results are
//! in the response's `fs` field, shaped like the Sprites JSON bodies:
//!
//! ```text
//! {"type":"fs_list","path":"x","working_dir":"/home/sprite","recursive":false}
//!   → {"ok":true,"fs":{"path":"/home/sprite/x","count":1,"entries":[{"name":"a",
//!      "path":"/home/sprite/x/a","type":"file"|"directory"|"symlink","size":12,"mode":"0644",
//!      "modTime":"2026-01-05T08:01:00Z","isDir":false}]}}
//! {"type":"fs_delete","path":"/x","recursive":true}  → fs: {"deleted":["/x/a","/x"],"count":2}
//! {"type":"fs_rename","source":"a","dest":"b","working_dir":"/x"}  → fs: {"source":"/x/a","dest":"/x/b"}
//! {"type":"fs_copy","source":"/a","dest":"/b","recursive":true}
//!   → fs: {"copied":[{"source":"/a","dest":"/b"},…],"count":N,"totalBytes":N}
//! {"type":"fs_chmod","path":"/x","mode":493,"recursive":true}
//!   → fs: {"affected":[{"path":"/x","mode":"0755"}],"count":N}
//! {"type":"fs_chown","path":"/x","uid":"sprite","gid":"1000","recursive":true}
//!   → fs: {"affected":[{"path":"/x","uid":1000,"gid":1000}],"count":N}
//! {"type":"fs_read","path":"/x","start":0,"end":100}
//!   → {"ok":true,"fs":{"path":"/x","size":FILE_SIZE,"start":0,"end":100}},
//!     stdout frames, EOF frame (0x04)
//! {"type":"fs_write","path":"/x","mode":420,"mkdir_parents":true,"as_root":false}
//!   → {"ok":true}; the client sends stdin frames and an EOF frame;
//!   → {"ok":true,"fs":{"path":"/x","size":N,"mode":"0644"}}
//! ```
//!
//! * `mode` is numeric in requests (the API parses `"0755"`), an octal string
//!   in results.
//! * Listing a file (or a symlink not pointing to a directory) gives one
//!   entry for it; recursive walks do not follow symlinks.
//! * `fs_read`'s range is `[start, end)`, clamped to the file; a file that
//!   reports size 0 (`/proc`) is read to EOF when no `end` is given. FIFOs
//!   and devices are refused.
//! * `fs_write` writes a temp file in the target's directory and renames it
//!   over the target, so readers see the old or the new content; a client
//!   hanging up before the EOF frame abandons the write. Default mode: the
//!   replaced file's, else 0644. New files and the parents `mkdir_parents`
//!   created belong to the default user unless `as_root`; a replaced file
//!   keeps its owner. `fs_copy` copies belong to the default user too.
//! * `fs_delete` of a directory needs `recursive` unless it is empty; `/`
//!   is refused. `fs_copy` of a directory needs `recursive` and a `dest`
//!   that does not exist yet; symlinks are copied as links.
//! * Errors: `{"ok":false,"code":C,"error":"ENOENT: /x: No such file or
//!   directory"}`; the message starts with the errno name. `C` is
//!   `not_found` (ENOENT), `permission_denied` (EACCES, EPERM, EROFS),
//!   `is_directory` (EISDIR), `not_directory` (ENOTDIR), `exists` (EEXIST),
//!   `bad_request` (EINVAL for bad input, ENOTEMPTY, EXDEV, ENAMETOOLONG,
//!   ELOOP) or `io_error` (anything else).
//!
//! # Caveat for embedders
//!
//! The agent reaps with `waitpid(-1)`. A process running the agent must not
//! use `tokio::process` or `std::process::Child::wait` for other children.
//! The [`client`] module has no such restriction.

pub mod client;
mod fs;
mod fswatch;
mod ports;
pub mod protocol;
mod reaper;
mod server;
pub use server::RESUME_SIGNAL;
pub mod service_def;
mod services;
mod session;
pub mod sudo;
mod sys;
mod tree;
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
    #[error("fenced: no heartbeat from den for {0:?}")]
    Fenced(Duration),
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
    /// Where `<name>.log`, `<name>.stdout.log` and `<name>.stderr.log` go.
    pub services_log_dir: PathBuf,
    /// SIGTERM → SIGKILL grace when a service is stopped or removed.
    pub service_stop_grace: Duration,
    /// First restart delay after a crash; doubles per consecutive crash.
    pub service_backoff_base: Duration,
    /// Cap of the restart delay; a service that stayed up this long starts
    /// over at `service_backoff_base`.
    pub service_backoff_max: Duration,
    /// Serve on this inherited listening socket (made by the host) instead
    /// of binding `socket`.
    pub listen_fd: Option<std::os::fd::RawFd>,
    /// Once serving, [`run`] points stdout and stderr here (a file inside the
    /// sprite), so PID 1 keeps no descriptor of the host's console log.
    pub log_file: Option<PathBuf>,
    /// Self-fencing: when den's heartbeat (see [`client::Client::heartbeat`])
    /// has been missing this long (counted from start before the first one),
    /// every process of the sprite is killed and [`run`] returns
    /// [`Error::Fenced`], so PID 1 exits. `None`: never.
    pub fence_ttl: Option<Duration>,
    /// Serve `sudo` for the sprite's users on this abstract socket (see
    /// [`sudo`]), where setuid can't work.
    pub sudo_broker: Option<String>,
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
            services_log_dir: "/.sprite/logs/services".into(),
            service_stop_grace: Duration::from_secs(5),
            service_backoff_base: Duration::from_secs(1),
            service_backoff_max: Duration::from_secs(30),
            listen_fd: None,
            log_file: None,
            fence_ttl: None,
            sudo_broker: None,
        }
    }
}

fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Serves until SIGTERM or SIGINT, then shuts sessions down. PID 1 is made
/// non-dumpable first (see `sys::set_not_dumpable`).
pub async fn run(config: AgentConfig) -> Result<(), Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    sys::set_not_dumpable()?;
    let log_file = config.log_file.clone();
    let handle = AgentHandle::start(config).await?;
    tracing::info!(socket = %handle.socket().display(), pid = std::process::id(), "den agent serving");
    if let Some(path) = log_file {
        // Only now: a start-up failure above still reaches the host's console.
        if let Err(e) = open_log(&path).and_then(|f| sys::redirect_stdio(&f)) {
            tracing::warn!(path = %path.display(), error = %e, "moving the agent's output into the sprite");
        }
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = handle.fenced() => {
            let ttl = handle.fence_ttl().unwrap_or_default();
            handle.kill_everything().await;
            // As PID 1, returning ends the sprite: the kernel kills whatever
            // is left in its pid namespace.
            return Err(Error::Fenced(ttl));
        }
    }
    tracing::info!("shutting down: forwarding SIGTERM to sessions");
    handle.shutdown().await;
    Ok(())
}
