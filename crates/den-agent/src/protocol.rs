//! Wire protocol shared by the agent server and [`crate::client`].
//!
//! See the crate documentation for the full description.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Client → agent: bytes for the session's stdin.
pub const FRAME_STDIN: u8 = 0x00;
/// Agent → client: stdout bytes (all output in TTY mode).
pub const FRAME_STDOUT: u8 = 0x01;
/// Agent → client: stderr bytes (non-TTY only).
pub const FRAME_STDERR: u8 = 0x02;
/// Client → agent: close stdin (non-TTY only; ignored for TTY sessions).
pub const FRAME_STDIN_EOF: u8 = 0x04;
/// Either direction: one JSON [`Control`] message.
pub const FRAME_CONTROL: u8 = 0x10;

/// Frames larger than this are a protocol violation; it bounds what a
/// misbehaving peer can make us allocate.
pub const MAX_FRAME: u32 = 16 * 1024 * 1024;

/// The single JSON line a client sends first on every connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Exec(ExecRequest),
    Attach {
        session: String,
    },
    ListSessions,
    Kill {
        session: String,
        signal: String,
    },
    SubscribePorts,
    /// Like `subscribe_ports`, but the first control frame is a
    /// [`Control::PortList`] of the listeners open now.
    WatchPorts,
    /// inotify watches on `paths` (see [`crate`]'s Filesystem section):
    /// after the ok, control frames carrying the Sprites `fs/watch` JSON
    /// messages (`event`, `error`) until the client closes.
    FsWatch {
        paths: Vec<String>,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
    Ping,
    /// Before a memory snapshot (gVisor): answer, then close every
    /// connection and the listening socket (a host socket, which the
    /// snapshot can't hold) and stop counting missed heartbeats, until
    /// [`crate::server::RESUME_SIGNAL`] arrives, when the agent binds its
    /// socket again. Its processes run on meanwhile.
    Quiesce,
    /// den's heartbeat: after the answer, any byte the host sends proves it
    /// is alive (see [`crate::AgentConfig::fence_ttl`]).
    Heartbeat,
    /// The full desired set of services; the agent reconciles to it.
    ServicesSet {
        services: Vec<ServiceDef>,
    },
    ServicesStatus,
    /// Signals the service's process group.
    ServiceSignal {
        name: String,
        signal: String,
    },
    /// Tail (default 100 lines) of the combined log, then EOF or, with
    /// `follow`, appended data until the client closes.
    ServiceLogs {
        name: String,
        #[serde(default)]
        lines: Option<usize>,
        #[serde(default)]
        follow: bool,
    },
    /// Stream of [`Control::Service`] frames for one service, or all.
    ServiceEvents {
        #[serde(default)]
        name: Option<String>,
    },
    /// Bytes `[start, end)` of a file (clamped to its size).
    FsRead {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        start: Option<u64>,
        #[serde(default)]
        end: Option<u64>,
    },
    /// Replaces a file atomically with the stdin frames sent after the ok.
    FsWrite {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        /// Permission bits; default the replaced file's, or 0644.
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        mkdir_parents: bool,
        /// Leave new files and directories owned by root instead of the
        /// default user.
        #[serde(default)]
        as_root: bool,
    },
    FsList {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
    FsDelete {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
    FsRename {
        source: String,
        dest: String,
        #[serde(default)]
        working_dir: Option<String>,
    },
    FsCopy {
        source: String,
        dest: String,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
    FsChmod {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        mode: u32,
        #[serde(default)]
        recursive: bool,
    },
    /// Changes the owner and/or group; each is a number or a name from the
    /// sprite's passwd/group files. Symlinks themselves are changed, never
    /// followed.
    FsChown {
        path: String,
        #[serde(default)]
        working_dir: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        gid: Option<String>,
        #[serde(default)]
        recursive: bool,
    },
}

pub use crate::service_def::{InvalidService, ServiceDef};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    #[default]
    Stopped,
    /// Waiting for its needs, or for the restart backoff after a crash.
    Starting,
    Running,
    Stopping,
    /// The last spawn attempt failed (see `error`); it is retried with backoff.
    Failed,
}

/// Runtime state of one service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ServiceStatus {
    pub name: String,
    pub status: ServiceState,
    pub pid: Option<i32>,
    /// Unix milliseconds of the current process's start.
    pub started_at: Option<u64>,
    /// Why the last run ended or the last spawn failed.
    pub error: Option<String>,
    /// Restarts after crashes or failed spawns since the definition was set.
    pub restart_count: u32,
    /// Unix milliseconds of the pending restart, while backing off.
    pub next_restart_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceEventType {
    Started,
    Stopping,
    Stopped,
    Exit,
    Stdout,
    Stderr,
    Error,
}

/// What the host turns into Sprites' NDJSON `ServiceLogEvent` lines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceEvent {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ServiceEventType,
    /// The output line (stdout/stderr) or error message (error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Exit status, or 128 + signal number (exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Unix milliseconds.
    pub timestamp: u64,
}

/// Parameters of a new command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ExecRequest {
    /// argv; `argv[0]` is looked up in the command's `PATH`.
    pub argv: Vec<String>,
    /// Replaces the default environment when present.
    pub env: Option<BTreeMap<String, String>>,
    /// Added on top of the default environment when `env` is absent (the
    /// sprite's own `environment` attribute), so the host need not know the
    /// agent's defaults.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_env: BTreeMap<String, String>,
    /// Working directory; default `/home/sprite`, `/` if that does not exist.
    pub cwd: Option<String>,
    /// User name or numeric uid; default is the agent's `default_user`.
    pub user: Option<String>,
    pub tty: bool,
    /// Whether the client will send stdin. TTY sessions always get the pty;
    /// non-TTY sessions without stdin read `/dev/null`.
    pub stdin: bool,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
    /// Milliseconds to keep running with no attached client; `0` = forever.
    /// Default: forever for TTY, 10 s otherwise.
    pub max_run_after_disconnect_ms: Option<u64>,
    /// Hard limit on the run time (den extension). On expiry the process group
    /// gets SIGTERM, then SIGKILL after `kill_grace_ms`.
    pub timeout_ms: Option<u64>,
    /// Default 5000.
    pub kill_grace_ms: Option<u64>,
}

/// The JSON line the agent answers every request with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine-readable error class: `not_found`, `bad_request`, `spawn_failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionSummary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceStatus>>,
    /// Result of a filesystem request, shaped like the Sprites §2.10 bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<serde_json::Value>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(code: &str, error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(error.into()),
            code: Some(code.to_owned()),
            ..Default::default()
        }
    }
}

/// One entry of `list_sessions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SessionSummary {
    pub id: String,
    pub pid: i32,
    pub command: String,
    pub workdir: String,
    /// Unix seconds.
    pub created: u64,
    pub tty: bool,
    pub cols: u16,
    pub rows: u16,
    /// Number of currently attached clients.
    pub clients: usize,
    /// Unix seconds of the last output or input.
    pub last_activity: u64,
    pub bytes_out: u64,
}

/// Exit of a session's main process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ExitInfo {
    /// The exit status, or 128 + signal number when killed by a signal.
    pub exit_code: i32,
    /// Signal name (`SIGKILL`) when the process died from a signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The hard run-time limit expired and the agent killed the command.
    pub timed_out: bool,
}

/// A TCP listener appearing or disappearing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(default)]
pub struct PortEvent {
    pub port: u16,
    /// The bound address as seen inside the sprite (`127.0.0.1`, `::`, ...);
    /// mapping to proxy bridge addresses is the host's business.
    pub address: String,
    pub pid: i32,
    /// Session owning `pid`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// JSON messages carried in [`FRAME_CONTROL`] frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    // client → agent
    Resize {
        cols: u16,
        rows: u16,
    },
    Signal {
        signal: String,
    },
    // agent → client
    SessionInfo(SessionInfo),
    Exit(ExitInfo),
    PortOpened(PortEvent),
    PortClosed(PortEvent),
    /// The listeners open when a `watch_ports` subscription started.
    PortList {
        ports: Vec<PortEvent>,
    },
    /// A struct variant because the event has its own `type` field.
    Service {
        event: ServiceEvent,
    },
}

/// First frame on every exec/attach connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SessionInfo {
    /// The PID as a decimal string.
    pub session_id: String,
    pub command: String,
    pub created: u64,
    pub cols: u16,
    pub rows: u16,
    pub is_owner: bool,
    pub tty: bool,
}

/// Serialises one frame into a single buffer so that concurrent writers on
/// different connections never see a torn frame and we issue one write.
pub fn encode_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(payload);
    buf
}

pub fn encode_control(msg: &Control) -> Vec<u8> {
    // Serialising our own enum cannot fail.
    let json = serde_json::to_vec(msg).unwrap_or_default();
    encode_frame(FRAME_CONTROL, &json)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> Result<(), Error> {
    w.write_all(&encode_frame(kind, payload)).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean EOF at a frame boundary.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, Bytes)>, Error> {
    let mut hdr = [0u8; 5];
    let mut got = 0;
    while got < hdr.len() {
        let n = r.read(&mut hdr[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::Protocol("truncated frame header".into()))
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    if len > MAX_FRAME {
        return Err(Error::Protocol(format!("frame of {len} bytes exceeds limit")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok(Some((hdr[0], Bytes::from(payload))))
}

/// Accepts `TERM`, `SIGTERM`, `sigterm` and numbers.
pub fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok();
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("SIGINT"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("usr1"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("9"), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("BOGUS"), None);
    }

    #[test]
    fn control_json_shape() {
        let s = serde_json::to_string(&Control::Exit(ExitInfo {
            exit_code: 3,
            signal: None,
            timed_out: false,
        }))
        .unwrap();
        assert_eq!(s, r#"{"type":"exit","exit_code":3,"timed_out":false}"#);
        let s = serde_json::to_string(&Control::Service {
            event: ServiceEvent {
                name: "web".into(),
                kind: ServiceEventType::Exit,
                data: None,
                exit_code: Some(1),
                timestamp: 5,
            },
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"type":"service","event":{"name":"web","type":"exit","exit_code":1,"timestamp":5}}"#
        );
        let r: Request = serde_json::from_str(r#"{"type":"service_logs","name":"web"}"#).unwrap();
        assert_eq!(
            r,
            Request::ServiceLogs {
                name: "web".into(),
                lines: None,
                follow: false
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"type":"services_set","services":[{"name":"a","cmd":"x"}]}"#).unwrap();
        let Request::ServicesSet { services } = r else {
            panic!()
        };
        assert_eq!((services[0].stopped, services[0].http_port), (false, None));
        let r: Request = serde_json::from_str(r#"{"type":"attach","session":"12"}"#).unwrap();
        assert_eq!(r, Request::Attach { session: "12".into() });
        let s = serde_json::to_string(&Control::PortList {
            ports: vec![PortEvent {
                port: 80,
                address: "0.0.0.0".into(),
                pid: 7,
                session: None,
            }],
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"type":"port_list","ports":[{"port":80,"address":"0.0.0.0","pid":7}]}"#
        );
        let r: Request = serde_json::from_str(r#"{"type":"fs_watch","paths":["a"]}"#).unwrap();
        assert_eq!(
            r,
            Request::FsWatch {
                paths: vec!["a".into()],
                working_dir: None,
                recursive: false
            }
        );
        let r: Request = serde_json::from_str(r#"{"type":"fs_chown","path":"/x","uid":"sprite"}"#).unwrap();
        assert!(matches!(
            r,
            Request::FsChown {
                gid: None,
                recursive: false,
                ..
            }
        ));
    }
}
