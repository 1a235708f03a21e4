//! Host-side client for the agent socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, mpsc};

use crate::Error;
use crate::protocol::{
    Control, FRAME_CONTROL, FRAME_STDERR, FRAME_STDIN, FRAME_STDIN_EOF, FRAME_STDOUT, Request, Response,
    encode_control, encode_frame, read_frame,
};
pub use crate::protocol::{
    ExecRequest, ExitInfo, PortEvent, ServiceDef, ServiceEvent, ServiceEventType, ServiceState,
    ServiceStatus, SessionInfo, SessionSummary,
};

/// What an exec/attach connection yields after `session_info`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    PortOpened(PortEvent),
    PortClosed(PortEvent),
    /// Always the last event of a session that ran to completion.
    Exit(ExitInfo),
}

/// Output chunks (each up to a 64 KiB frame) buffered per exec session or
/// byte stream before reading from the agent pauses. Small, so a caller that
/// stops reading (an exec client that never reads) costs little memory; the
/// agent then stops reading the command's output in turn.
const STREAM_QUEUE: usize = 4;

/// Handle on the agent socket; each call opens its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// The socket file of the last successful connection by path, held
    /// `O_PATH` and shared by every clone: later connections go to that
    /// inode, never to whatever the path names by then. Under gVisor the
    /// sprite's root can write the socket's directory and replace the file
    /// (with a listener of its own, or with nothing); the agent keeps
    /// listening on the original, which stays reachable through this
    /// descriptor. Only once nothing listens there any more (the agent
    /// bound anew, as after a restore) is the path looked up again.
    pinned: Arc<std::sync::Mutex<Option<Arc<std::fs::File>>>>,
}

/// Connects and pings, so a missing or dead agent is reported here.
pub async fn connect(socket_path: impl AsRef<Path>) -> Result<Client, Error> {
    let client = Client::new(socket_path);
    client.ping().await?;
    Ok(client)
}

/// The socket file at `path`, opened `O_PATH` without following a symlink
/// in its last component, checked to be a socket.
fn open_socket_file(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_socket() {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        )));
    }
    Ok(file)
}

/// Connect to the socket inode `file` holds (`/proc/self/fd/N` names
/// exactly it, linked or not).
async fn connect_file(file: &std::fs::File) -> Result<UnixStream, Error> {
    use std::os::fd::AsRawFd;
    Ok(UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd())).await?)
}

/// Connect to the agent's socket at `path` without following a symlink in
/// its last component. Under gVisor the socket lives in a directory the
/// sprite can write to, so its root could replace it with a symlink to
/// another sprite's socket; the directories above are the host's own. The
/// file is opened `O_PATH | O_NOFOLLOW`, checked to be a socket, and
/// connected to through `/proc/self/fd`, which names exactly that inode.
pub async fn connect_socket(path: &Path) -> Result<UnixStream, Error> {
    connect_file(&open_socket_file(path)?).await
}

async fn request(
    client: &Client,
    req: &Request,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf), Error> {
    request_full(client, req).await.map(|(_, rd, wr)| (rd, wr))
}

/// Sends `req` and returns the successful response with the open connection.
async fn request_full(
    client: &Client,
    req: &Request,
) -> Result<(Response, BufReader<OwnedReadHalf>, OwnedWriteHalf), Error> {
    let stream = client.open().await?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut rd = BufReader::new(rd);
    let mut resp = String::new();
    if rd.read_line(&mut resp).await? == 0 {
        return Err(Error::Protocol(
            "agent closed the connection without answering".into(),
        ));
    }
    let resp: Response = serde_json::from_str(resp.trim_end())?;
    if !resp.ok {
        return Err(Error::Agent {
            code: resp.code.unwrap_or_default(),
            message: resp.error.unwrap_or_default(),
        });
    }
    Ok((resp, rd, wr))
}

impl Client {
    /// Does not connect; use [`connect`] to also check the agent is alive.
    pub fn new(socket_path: impl AsRef<Path>) -> Client {
        Client {
            socket: socket_path.as_ref().to_owned(),
            pinned: Arc::default(),
        }
    }

    /// A new connection to the agent: to the pinned socket once there is
    /// one, else to the path (no symlink followed), pinning what answered.
    async fn open(&self) -> Result<UnixStream, Error> {
        let pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(file) = pinned {
            match connect_file(&file).await {
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                done => return done,
            }
        }
        let file = Arc::new(open_socket_file(&self.socket)?);
        let stream = connect_file(&file).await?;
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        Ok(stream)
    }

    pub async fn ping(&self) -> Result<(), Error> {
        request(self, &Request::Ping).await.map(|_| ())
    }

    /// See [`Request::Quiesce`]: the agent is unreachable afterwards until
    /// it gets [`crate::server::RESUME_SIGNAL`], when it binds a new socket.
    /// Every clone forgets the old one here: under gVisor its host side may
    /// still accept connections that nobody answers.
    pub async fn quiesce(&self) -> Result<(), Error> {
        let (mut rd, _wr) = request(self, &Request::Quiesce).await?;
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // The agent answers once its every other socket is closed, and then
        // closes this one: at the end, it holds none that a snapshot could
        // trip on.
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await?;
        Ok(())
    }

    /// Sends den's heartbeat every `interval` until the agent goes away (an
    /// error then). An agent started with a fence TTL stops its sprite when
    /// no heartbeat arrived for that long; beats sent while the sprite is
    /// frozen wait in the socket and count on thaw.
    pub async fn heartbeat(&self, interval: Duration) -> Result<(), Error> {
        let (mut rd, mut wr) = request(self, &Request::Heartbeat).await?;
        let mut probe = [0u8; 1];
        loop {
            // A frozen agent reads nothing; with its socket buffer full a
            // write would wait until thaw, which is fine: the beats queued
            // before already prove we are alive.
            wr.write_all(b"\n").await?;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                r = tokio::io::AsyncReadExt::read(&mut rd, &mut probe) => {
                    r?;
                    return Err(Error::Protocol("the agent closed the heartbeat".into()));
                }
            }
        }
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionSummary>, Error> {
        let stream = self.open().await?;
        let (rd, mut wr) = stream.into_split();
        let mut line = serde_json::to_vec(&Request::ListSessions)?;
        line.push(b'\n');
        wr.write_all(&line).await?;
        let mut resp = String::new();
        BufReader::new(rd).read_line(&mut resp).await?;
        let resp: Response = serde_json::from_str(resp.trim_end())?;
        if !resp.ok {
            return Err(Error::Agent {
                code: resp.code.unwrap_or_default(),
                message: resp.error.unwrap_or_default(),
            });
        }
        Ok(resp.sessions.unwrap_or_default())
    }

    /// Signals the session's process group.
    pub async fn kill(&self, session: &str, signal: &str) -> Result<(), Error> {
        request(
            self,
            &Request::Kill {
                session: session.into(),
                signal: signal.into(),
            },
        )
        .await
        .map(|_| ())
    }

    /// Signals the session's process group and waits up to `timeout` for the
    /// exit, then escalates to SIGKILL (the semantics of the Sprites
    /// `POST …/exec/{id}/kill?signal=&timeout=` endpoint). `Ok(None)` if the
    /// exit was not observed even after SIGKILL.
    pub async fn kill_and_wait(
        &self,
        session: &str,
        signal: &str,
        timeout: std::time::Duration,
    ) -> Result<Option<ExitInfo>, Error> {
        // Attach first so the exit cannot slip by between signal and wait.
        let mut attached = self.attach(session).await?;
        self.kill(session, signal).await?;
        if let Ok(exit) = tokio::time::timeout(timeout, attached.wait_exit()).await {
            return Ok(exit);
        }
        match self.kill(session, "KILL").await {
            Ok(()) | Err(Error::Agent { .. }) => {}
            Err(e) => return Err(e),
        }
        Ok(
            tokio::time::timeout(std::time::Duration::from_secs(5), attached.wait_exit())
                .await
                .ok()
                .flatten(),
        )
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<Session, Error> {
        let (rd, wr) = request(self, &Request::Exec(req)).await?;
        Session::start(rd, wr).await
    }

    pub async fn attach(&self, session: &str) -> Result<Session, Error> {
        let (rd, wr) = request(
            self,
            &Request::Attach {
                session: session.into(),
            },
        )
        .await?;
        Session::start(rd, wr).await
    }

    /// Port events of every process; the receiver ends when the agent goes away.
    pub async fn subscribe_ports(&self) -> Result<PortSubscription, Error> {
        let (rd, wr) = request(self, &Request::SubscribePorts).await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(read_events(rd, tx));
        Ok(PortSubscription {
            events: rx,
            _wr: wr,
            task,
        })
    }

    /// The listeners open now (a `port_list` message), then
    /// `port_opened`/`port_closed` messages, as JSON control messages.
    pub async fn watch_ports(&self) -> Result<JsonStream, Error> {
        let (rd, wr) = request(self, &Request::WatchPorts).await?;
        Ok(json_stream(rd, wr))
    }

    /// inotify watches on `paths` (relative ones against `working_dir`):
    /// returns the absolute paths watched and the stream of Sprites
    /// `fs/watch` messages (`{"type":"event",…}`, `{"type":"error",…}`).
    pub async fn fs_watch(
        &self,
        paths: &[String],
        working_dir: Option<&str>,
        recursive: bool,
    ) -> Result<(Vec<String>, JsonStream), Error> {
        let req = Request::FsWatch {
            paths: paths.to_vec(),
            working_dir: working_dir.map(str::to_owned),
            recursive,
        };
        let (resp, rd, wr) = request_full(self, &req).await?;
        let watched = resp
            .fs
            .as_ref()
            .and_then(|v| v.get("paths"))
            .and_then(|p| serde_json::from_value(p.clone()).ok())
            .unwrap_or_default();
        Ok((watched, json_stream(rd, wr)))
    }
}

/// The JSON control messages of a subscription; dropping it closes the
/// connection (and so the subscription).
pub struct JsonStream {
    rx: mpsc::Receiver<serde_json::Value>,
    _wr: OwnedWriteHalf,
    task: tokio::task::JoinHandle<()>,
}

impl JsonStream {
    /// Next message; `None` once the agent ended the subscription.
    pub async fn recv(&mut self) -> Option<serde_json::Value> {
        self.rx.recv().await
    }
}

impl Drop for JsonStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_stream(mut rd: BufReader<OwnedReadHalf>, wr: OwnedWriteHalf) -> JsonStream {
    // Small: a slow reader pushes back on the socket, and the agent then
    // drops (and reports) what does not fit in its own bounded queue.
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let task = tokio::spawn(async move {
        while let Ok(Some((kind, payload))) = read_frame(&mut rd).await {
            if kind != FRAME_CONTROL {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&payload) else {
                continue;
            };
            if tx.send(v).await.is_err() {
                return;
            }
        }
    });
    JsonStream { rx, _wr: wr, task }
}

impl Client {
    /// Replaces the desired set of services; returns once new and changed
    /// services were spawned (or failed to) and removed ones stopped.
    pub async fn services_set(&self, services: &[ServiceDef]) -> Result<(), Error> {
        request(
            self,
            &Request::ServicesSet {
                services: services.to_vec(),
            },
        )
        .await
        .map(|_| ())
    }

    /// Status of every defined service, sorted by name.
    pub async fn services_status(&self) -> Result<Vec<ServiceStatus>, Error> {
        let (resp, _, _) = request_full(self, &Request::ServicesStatus).await?;
        Ok(resp.services.unwrap_or_default())
    }

    /// Signals the service's process group; `not_found` / `not_running` errors.
    pub async fn service_signal(&self, name: &str, signal: &str) -> Result<(), Error> {
        request(
            self,
            &Request::ServiceSignal {
                name: name.into(),
                signal: signal.into(),
            },
        )
        .await
        .map(|_| ())
    }

    /// The last `lines` (default 100) lines of the combined log, then with
    /// `follow` whatever is appended until the stream is dropped.
    pub async fn service_logs(
        &self,
        name: &str,
        lines: Option<usize>,
        follow: bool,
    ) -> Result<ServiceLogStream, Error> {
        let (rd, wr) = request(
            self,
            &Request::ServiceLogs {
                name: name.into(),
                lines,
                follow,
            },
        )
        .await?;
        Ok(byte_stream(rd, wr))
    }

    /// Events of one service (or all) from now on.
    pub async fn service_events(&self, name: Option<&str>) -> Result<ServiceEventStream, Error> {
        let (mut rd, wr) = request(
            self,
            &Request::ServiceEvents {
                name: name.map(str::to_owned),
            },
        )
        .await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            while let Ok(Some((kind, payload))) = read_frame(&mut rd).await {
                if kind != FRAME_CONTROL {
                    continue;
                }
                if let Ok(Control::Service { event }) = serde_json::from_slice::<Control>(&payload)
                    && tx.send(event).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(ServiceEventStream { rx, _wr: wr, task })
    }
}

/// Stdout frames until an EOF frame or the end of the connection.
fn byte_stream(mut rd: BufReader<OwnedReadHalf>, wr: OwnedWriteHalf) -> ByteStream {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let task = tokio::spawn(async move {
        while let Ok(Some((kind, payload))) = read_frame(&mut rd).await {
            match kind {
                FRAME_STDOUT if tx.send(payload).await.is_err() => return,
                FRAME_STDIN_EOF => return,
                _ => {}
            }
        }
    });
    ByteStream { rx, _wr: wr, task }
}

/// Options of [`Client::fs_write`].
#[derive(Debug, Clone, Default)]
pub struct FsWriteOptions {
    /// Permission bits; default the replaced file's, or 0644.
    pub mode: Option<u32>,
    pub mkdir_parents: bool,
    /// Keep new files owned by root rather than the default user.
    pub as_root: bool,
}

/// An `fs_write` in progress: send the content, then [`FsWriter::finish`].
/// Dropping it without finishing abandons the write (the old file stays).
pub struct FsWriter {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl FsWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        // Well below MAX_FRAME, so any input size is accepted.
        for chunk in data.chunks(1 << 20) {
            self.wr.write_all(&encode_frame(FRAME_STDIN, chunk)).await?;
        }
        Ok(())
    }

    /// Ends the content; returns `{"path","size","mode"}` once the file was
    /// renamed into place.
    pub async fn finish(mut self) -> Result<serde_json::Value, Error> {
        self.wr.write_all(&encode_frame(FRAME_STDIN_EOF, &[])).await?;
        let mut line = String::new();
        if self.rd.read_line(&mut line).await? == 0 {
            return Err(Error::Protocol(
                "agent closed the connection during fs_write".into(),
            ));
        }
        fs_body(serde_json::from_str(line.trim_end())?)
    }
}

fn fs_body(resp: Response) -> Result<serde_json::Value, Error> {
    if !resp.ok {
        return Err(Error::Agent {
            code: resp.code.unwrap_or_default(),
            message: resp.error.unwrap_or_default(),
        });
    }
    Ok(resp.fs.unwrap_or_default())
}

impl Client {
    async fn fs_request(&self, req: Request) -> Result<serde_json::Value, Error> {
        let (resp, _, _) = request_full(self, &req).await?;
        fs_body(resp)
    }

    /// Bytes `[start, end)` of a file (clamped to its size). The value is
    /// `{"path","size","start","end"}`, `size` being the whole file's.
    pub async fn fs_read(
        &self,
        path: &str,
        working_dir: Option<&str>,
        start: Option<u64>,
        end: Option<u64>,
    ) -> Result<(serde_json::Value, ByteStream), Error> {
        let req = Request::FsRead {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            start,
            end,
        };
        let (resp, rd, wr) = request_full(self, &req).await?;
        Ok((resp.fs.unwrap_or_default(), byte_stream(rd, wr)))
    }

    /// [`Client::fs_read`] collected into memory.
    pub async fn fs_read_all(
        &self,
        path: &str,
        working_dir: Option<&str>,
        start: Option<u64>,
        end: Option<u64>,
    ) -> Result<(serde_json::Value, Vec<u8>), Error> {
        let (info, stream) = self.fs_read(path, working_dir, start, end).await?;
        Ok((info, stream.read_to_end().await))
    }

    /// Starts an atomic replace of `path`; errors about the target (missing
    /// parent, a directory there) are reported here, before any content.
    pub async fn fs_write_stream(
        &self,
        path: &str,
        working_dir: Option<&str>,
        opts: &FsWriteOptions,
    ) -> Result<FsWriter, Error> {
        let req = Request::FsWrite {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            mode: opts.mode,
            mkdir_parents: opts.mkdir_parents,
            as_root: opts.as_root,
        };
        let (rd, wr) = request(self, &req).await?;
        Ok(FsWriter { rd, wr })
    }

    /// Writes `data` to `path` atomically; returns `{"path","size","mode"}`.
    pub async fn fs_write(
        &self,
        path: &str,
        working_dir: Option<&str>,
        opts: &FsWriteOptions,
        data: &[u8],
    ) -> Result<serde_json::Value, Error> {
        let mut w = self.fs_write_stream(path, working_dir, opts).await?;
        w.write(data).await?;
        w.finish().await
    }

    /// `{"path","entries":[{"name","path","type","size","mode","modTime","isDir"}],"count"}`;
    /// a file gives one entry for itself.
    pub async fn fs_list(
        &self,
        path: &str,
        working_dir: Option<&str>,
        recursive: bool,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsList {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            recursive,
        })
        .await
    }

    /// `{"deleted":[paths],"count"}`.
    pub async fn fs_delete(
        &self,
        path: &str,
        working_dir: Option<&str>,
        recursive: bool,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsDelete {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            recursive,
        })
        .await
    }

    /// `{"source","dest"}`.
    pub async fn fs_rename(
        &self,
        source: &str,
        dest: &str,
        working_dir: Option<&str>,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsRename {
            source: source.into(),
            dest: dest.into(),
            working_dir: working_dir.map(str::to_owned),
        })
        .await
    }

    /// `{"copied":[{"source","dest"}],"count","totalBytes"}`.
    pub async fn fs_copy(
        &self,
        source: &str,
        dest: &str,
        working_dir: Option<&str>,
        recursive: bool,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsCopy {
            source: source.into(),
            dest: dest.into(),
            working_dir: working_dir.map(str::to_owned),
            recursive,
        })
        .await
    }

    /// `{"affected":[{"path","uid","gid"}],"count"}`; `uid`/`gid` are
    /// numbers or names of the sprite's users and groups.
    pub async fn fs_chown(
        &self,
        path: &str,
        working_dir: Option<&str>,
        uid: Option<&str>,
        gid: Option<&str>,
        recursive: bool,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsChown {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            uid: uid.map(str::to_owned),
            gid: gid.map(str::to_owned),
            recursive,
        })
        .await
    }

    /// `{"affected":[{"path","mode"}],"count"}`.
    pub async fn fs_chmod(
        &self,
        path: &str,
        working_dir: Option<&str>,
        mode: u32,
        recursive: bool,
    ) -> Result<serde_json::Value, Error> {
        self.fs_request(Request::FsChmod {
            path: path.into(),
            working_dir: working_dir.map(str::to_owned),
            mode,
            recursive,
        })
        .await
    }
}

/// Log bytes of a service; dropping it ends a follow.
pub type ServiceLogStream = ByteStream;

/// Bytes streamed by the agent (service logs, file reads); dropping it
/// closes the connection.
pub struct ByteStream {
    rx: mpsc::Receiver<Bytes>,
    _wr: OwnedWriteHalf,
    task: tokio::task::JoinHandle<()>,
}

impl ByteStream {
    /// Next chunk; `None` after the end of a non-follow tail or when the
    /// agent goes away.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Everything until the end (only ends for non-follow streams).
    pub async fn read_to_end(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = self.recv().await {
            out.extend_from_slice(&b);
        }
        out
    }
}

impl Drop for ByteStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `service_events` subscription; dropping it unsubscribes.
pub struct ServiceEventStream {
    rx: mpsc::Receiver<ServiceEvent>,
    _wr: OwnedWriteHalf,
    task: tokio::task::JoinHandle<()>,
}

impl ServiceEventStream {
    /// Next event; `None` once the agent closed the subscription.
    pub async fn recv(&mut self) -> Option<ServiceEvent> {
        self.rx.recv().await
    }
}

impl Drop for ServiceEventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct PortSubscription {
    events: mpsc::Receiver<Event>,
    _wr: OwnedWriteHalf,
    task: tokio::task::JoinHandle<()>,
}

impl PortSubscription {
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for PortSubscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_events(mut rd: BufReader<OwnedReadHalf>, tx: mpsc::Sender<Event>) {
    while let Ok(Some((kind, payload))) = read_frame(&mut rd).await {
        let ev = match kind {
            FRAME_STDOUT => Event::Stdout(payload),
            FRAME_STDERR => Event::Stderr(payload),
            FRAME_CONTROL => match serde_json::from_slice::<Control>(&payload) {
                Ok(Control::Exit(e)) => Event::Exit(e),
                Ok(Control::PortOpened(p)) => Event::PortOpened(p),
                Ok(Control::PortClosed(p)) => Event::PortClosed(p),
                _ => continue,
            },
            _ => continue,
        };
        // Awaiting here pushes back on the socket when the caller is slow.
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

/// An attached exec session. Dropping it detaches (the command keeps running
/// per its `max_run_after_disconnect`).
pub struct Session {
    pub info: SessionInfo,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    events: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
}

/// Everything a session produced, for callers that just want the result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub ports: Vec<Event>,
    /// `None` if the connection ended without an exit message.
    pub exit: Option<ExitInfo>,
}

impl Session {
    async fn start(mut rd: BufReader<OwnedReadHalf>, wr: OwnedWriteHalf) -> Result<Session, Error> {
        let info = match read_frame(&mut rd).await? {
            Some((FRAME_CONTROL, payload)) => match serde_json::from_slice::<Control>(&payload)? {
                Control::SessionInfo(i) => i,
                other => return Err(Error::Protocol(format!("expected session_info, got {other:?}"))),
            },
            other => {
                return Err(Error::Protocol(format!(
                    "expected session_info frame, got {other:?}"
                )));
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let task = tokio::spawn(read_events(rd, tx));
        Ok(Session {
            info,
            writer: Arc::new(Mutex::new(wr)),
            events: rx,
            task,
        })
    }

    pub fn id(&self) -> &str {
        &self.info.session_id
    }

    /// Next event; `None` once the connection is closed.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    async fn send(&self, frame: Vec<u8>) -> Result<(), Error> {
        self.writer.lock().await.write_all(&frame).await?;
        Ok(())
    }

    pub async fn send_stdin(&self, data: &[u8]) -> Result<(), Error> {
        self.send(encode_frame(FRAME_STDIN, data)).await
    }

    pub async fn close_stdin(&self) -> Result<(), Error> {
        self.send(encode_frame(FRAME_STDIN_EOF, &[])).await
    }

    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), Error> {
        self.send(encode_control(&Control::Resize { cols, rows })).await
    }

    pub async fn signal(&self, signal: &str) -> Result<(), Error> {
        self.send(encode_control(&Control::Signal {
            signal: signal.into(),
        }))
        .await
    }

    /// Skips output until the exit message; `None` if the connection ends first.
    pub async fn wait_exit(&mut self) -> Option<ExitInfo> {
        while let Some(ev) = self.recv().await {
            if let Event::Exit(e) = ev {
                return Some(e);
            }
        }
        None
    }

    /// Reads events until the connection ends.
    pub async fn collect(mut self) -> Output {
        let mut out = Output::default();
        while let Some(ev) = self.recv().await {
            match ev {
                Event::Stdout(b) => out.stdout.extend_from_slice(&b),
                Event::Stderr(b) => out.stderr.extend_from_slice(&b),
                Event::Exit(e) => out.exit = Some(e),
                p => out.ports.push(p),
            }
        }
        out
    }

    /// Closes the connection; the command keeps running.
    pub fn detach(self) {}
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host reaches a gVisor sprite's agent through a directory the
    /// sprite can write: a symlink there (to another sprite's socket) or
    /// something that is not a socket must be refused, a socket connected.
    #[tokio::test]
    async fn connect_socket_follows_no_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.sock");
        let listener = tokio::net::UnixListener::bind(&other).unwrap();

        let link = dir.path().join("agent.sock");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let _plain = tokio::net::UnixStream::connect(&link).await;
        assert!(
            _plain.is_ok() && listener.accept().await.is_ok(),
            "a plain connect follows the link (what this guards against)"
        );
        let err = connect_socket(&link).await.expect_err("a symlink is refused");
        assert!(matches!(err, Error::Io(_)), "{err}");

        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, b"not a socket").unwrap();
        let err = connect_socket(&link)
            .await
            .expect_err("a regular file is refused");
        assert!(err.to_string().contains("is not a socket"), "{err}");

        let mut stream = connect_socket(&other).await.expect("a real socket connects");
        let (mut peer, _) = listener.accept().await.unwrap();
        stream.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"hi");
    }

    /// Once a client reached the agent, replacing the socket file (removed,
    /// a listener of the sprite's own, a symlink to another sprite's
    /// socket) changes nothing: it keeps reaching the original listener.
    #[tokio::test]
    async fn client_keeps_to_the_socket_it_first_reached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let agent = tokio::net::UnixListener::bind(&path).unwrap();
        let client = Client::new(&path);
        let _first = client.open().await.unwrap();
        assert!(reached(&agent), "the first connection reaches the agent");

        let clone = client.clone();
        std::fs::remove_file(&path).unwrap();
        let _s = clone.open().await.expect("a removed path: still the agent");
        assert!(reached(&agent));

        let impostor = tokio::net::UnixListener::bind(&path).unwrap();
        let _s = client.open().await.unwrap();
        assert!(reached(&agent) && !reached(&impostor), "the impostor got it");

        let other = dir.path().join("other.sock");
        let other_l = tokio::net::UnixListener::bind(&other).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&other, &path).unwrap();
        let _s = client.open().await.unwrap();
        assert!(reached(&agent) && !reached(&other_l), "the link was followed");
        drop(impostor);

        // A fresh client follows no symlink either.
        assert!(Client::new(&path).open().await.is_err());

        // The agent gone and bound anew (a restore): the path again.
        drop(agent);
        std::fs::remove_file(&path).unwrap();
        let rebound = tokio::net::UnixListener::bind(&path).unwrap();
        let _s = client.open().await.expect("the agent's new socket");
        assert!(reached(&rebound));
    }

    /// Whether `l` has a connection waiting (accepting it).
    fn reached(l: &tokio::net::UnixListener) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        l.poll_accept(&mut cx).is_ready()
    }
}
