//! Exec sessions: spawning, output fan-out with scrollback, lifecycle timers.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::protocol::{
    Control, ExecRequest, ExitInfo, FRAME_STDERR, FRAME_STDOUT, SessionInfo, SessionSummary, encode_control,
    encode_frame,
};
use crate::reaper::{ChildExit, Reaper};
use crate::server::AgentInner;
use crate::{Error, sys, user};

/// What a connection's writer receives: a ready-to-send frame, or the
/// instruction to close after the exit frame.
#[derive(Debug)]
pub(crate) enum Out {
    Frame(Bytes),
    Close,
}

pub(crate) type ClientTx = mpsc::Sender<Out>;

/// Frames (each at most 64 KiB) queued per attached client. A client this
/// far behind is disconnected rather than letting a chatty command grow the
/// agent's memory without bound; it can re-attach and gets the scrollback.
pub(crate) const CLIENT_QUEUE: usize = 1024;

/// Frames queued for the client that started the command (the owner). When
/// they are full the output pumps wait instead: the pipe or pty fills and the
/// command blocks on its writes, as with a terminal nobody reads. So an
/// owner that does not read costs at most this many frames, here and in den.
pub(crate) const OWNER_QUEUE: usize = 16;

/// The owner's client id.
const OWNER: u64 = 0;

/// Queues a frame; false if the client is gone or too slow and must be dropped.
pub(crate) fn offer(tx: &ClientTx, frame: &Bytes) -> bool {
    match tx.try_send(Out::Frame(frame.clone())) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!("client fell {CLIENT_QUEUE} frames behind; disconnecting it");
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

pub(crate) enum StdinMsg {
    Data(Bytes),
    Eof,
}

/// Byte-capped ring of output chunks kept for replay on attach.
struct Scrollback {
    chunks: VecDeque<(u8, Bytes)>,
    bytes: usize,
    cap: usize,
}

impl Scrollback {
    fn push(&mut self, kind: u8, data: Bytes) {
        self.bytes += data.len();
        self.chunks.push_back((kind, data));
        while self.bytes > self.cap {
            let Some((k, front)) = self.chunks.pop_front() else {
                break;
            };
            let excess = self.bytes - self.cap;
            if front.len() > excess {
                // Keep the tail of a partially evicted chunk.
                self.chunks.push_front((k, front.slice(excess..)));
                self.bytes -= excess;
            } else {
                self.bytes -= front.len();
            }
        }
    }
}

struct State {
    scrollback: Scrollback,
    clients: HashMap<u64, ClientTx>,
    next_client: u64,
    exited: bool,
    /// Bumped on every attach/detach so a stale disconnect timer can tell
    /// that the session was re-attached meanwhile.
    detach_generation: u64,
    last_activity: u64,
    bytes_out: u64,
    cols: u16,
    rows: u16,
}

pub(crate) struct Session {
    pub id: String,
    pub pid: i32,
    pub command: String,
    pub workdir: String,
    pub tty: bool,
    pub created: u64,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    stdin_tx: mpsc::UnboundedSender<StdinMsg>,
    max_run_after_disconnect: Option<Duration>,
    timed_out: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The user a command runs as: `name`, or the agent's default user.
pub(crate) fn resolve_user(cfg: &crate::AgentConfig, name: Option<&str>) -> Result<user::UserInfo, Error> {
    match name {
        Some(name) => user::lookup(name, &cfg.passwd_path, &cfg.group_path),
        // A sprite image without the default user should still run
        // commands, as root, rather than refuse every exec.
        None => user::lookup(&cfg.default_user, &cfg.passwd_path, &cfg.group_path).or_else(|e| {
            tracing::warn!(error = %e, "default user missing; running as root");
            user::lookup("0", &cfg.passwd_path, &cfg.group_path)
        }),
    }
}

/// Credentials to switch to in the child; `None` when no switch is needed.
pub(crate) fn spawn_creds(user: &user::UserInfo) -> Result<Option<sys::Creds>, Error> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(Some(user.creds()))
    } else if euid.as_raw() == user.uid {
        // An unprivileged agent (tests, development) can only run
        // commands as itself.
        Ok(None)
    } else {
        Err(Error::User(format!(
            "agent is not root; cannot run as uid {}",
            user.uid
        )))
    }
}

pub(crate) fn default_env(user: &user::UserInfo, tty: bool) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), user.home.clone()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if tty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    env
}

impl Session {
    /// Spawns the command and registers `owner` as its first client before any
    /// output can be produced, so the owner sees everything.
    pub(crate) fn spawn(
        agent: &Arc<AgentInner>,
        req: &ExecRequest,
        owner: ClientTx,
    ) -> Result<(Arc<Session>, u64), Error> {
        let cfg = &agent.config;
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(Error::BadRequest("empty argv".into()));
        }
        let user = resolve_user(cfg, req.user.as_deref())?;
        let cwd = match &req.cwd {
            Some(c) if std::path::Path::new(c).is_dir() => c.clone(),
            Some(c) => {
                return Err(Error::BadRequest(format!(
                    "working directory {c:?} does not exist"
                )));
            }
            None if cfg.default_cwd.is_dir() => cfg.default_cwd.display().to_string(),
            None => "/".into(),
        };
        let (cols, rows) = (req.cols.unwrap_or(80), req.rows.unwrap_or(24));

        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..]).current_dir(&cwd).env_clear();
        match &req.env {
            Some(env) => {
                cmd.envs(env);
            }
            None => {
                cmd.envs(default_env(&user, req.tty));
                cmd.envs(&req.extra_env);
            }
        }
        let creds = spawn_creds(&user)?;

        let master = if req.tty {
            let (master, slave) = open_pty().map_err(|e| Error::Spawn(format!("opening a pty: {e}")))?;
            sys::set_winsize(master.as_fd(), rows, cols)?;
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            Some(master)
        } else {
            cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        };
        // A command with a time limit adopts its own orphans, so a
        // double-forked descendant is still found under it at expiry.
        sys::configure_child(&mut cmd, req.tty, creds, req.timeout_ms.is_some());

        let spawned = Reaper::global().spawn(|| {
            let child = cmd.spawn()?;
            let pid = child.id() as i32;
            Ok((child, pid))
        });
        // Dropping the command closes our copies of the pty slave, so the
        // master reports EOF once the session's processes are gone.
        drop(cmd);
        let (mut child, pid, exit_rx) = spawned.map_err(|e| Error::Spawn(format!("{}: {e}", req.argv[0])))?;

        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let master = match master {
            Some(m) => {
                nix::fcntl::fcntl(
                    m.as_fd(),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )
                .map_err(std::io::Error::from)?;
                Some(Arc::new(sys::async_fd(m)?))
            }
            None => None,
        };
        let max_run_after_disconnect = match req.max_run_after_disconnect_ms {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None if req.tty => None,
            None => Some(cfg.non_tty_max_run_after_disconnect),
        };
        let mut clients = HashMap::new();
        clients.insert(0, owner);
        let session = Arc::new(Session {
            id: pid.to_string(),
            pid,
            command: req.argv.join(" "),
            workdir: cwd,
            tty: req.tty,
            created: now_secs(),
            master: master.clone(),
            stdin_tx,
            max_run_after_disconnect,
            timed_out: false.into(),
            state: Mutex::new(State {
                scrollback: Scrollback {
                    chunks: VecDeque::new(),
                    bytes: 0,
                    cap: cfg.scrollback_bytes,
                },
                clients,
                next_client: 1,
                exited: false,
                detach_generation: 0,
                last_activity: now_secs(),
                bytes_out: 0,
                cols,
                rows,
            }),
        });

        // Registered before the supervisor exists, so its removal on exit can
        // never precede the insertion.
        agent.lock_sessions().insert(session.id.clone(), session.clone());

        let drain = cfg.exit_drain_timeout;
        let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
        let mut pumps = Vec::new();
        match &master {
            Some(m) => {
                pumps.push(tokio::spawn(pump_pty(
                    Arc::downgrade(&session),
                    m.clone(),
                    exited_rx.clone(),
                    drain,
                )));
                tokio::spawn(stdin_pty(m.clone(), stdin_rx));
            }
            None => {
                let out = pipe_receiver(child.stdout.take())?;
                let err = pipe_receiver(child.stderr.take())?;
                pumps.push(tokio::spawn(pump_pipe(
                    Arc::downgrade(&session),
                    out,
                    FRAME_STDOUT,
                    exited_rx.clone(),
                    drain,
                )));
                pumps.push(tokio::spawn(pump_pipe(
                    Arc::downgrade(&session),
                    err,
                    FRAME_STDERR,
                    exited_rx,
                    drain,
                )));
                let input = match child.stdin.take() {
                    Some(s) => Some(tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(s))?),
                    None => None,
                };
                tokio::spawn(stdin_pipe(input, stdin_rx));
            }
        }
        // The Child handle must never be waited on (the reaper owns the
        // status); dropping it neither waits nor kills.
        drop(child);

        let timeout_task = req.timeout_ms.map(|ms| {
            let grace = req
                .kill_grace_ms
                .map(Duration::from_millis)
                .unwrap_or(cfg.default_kill_grace);
            let weak = Arc::downgrade(&session);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let Some(s) = weak.upgrade() else { return };
                s.timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                // The whole tree, not only the process group: descendants
                // that called setsid left the group but not the tree.
                let tree = crate::tree::descendants(&[s.pid]);
                s.signal_group(Signal::SIGTERM);
                crate::tree::signal(&tree, Signal::SIGTERM);
                drop(s);
                let deadline = tokio::time::Instant::now() + grace;
                while tokio::time::Instant::now() < deadline && tree.iter().any(crate::tree::alive) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Members of the command's group are in its tree too (it
                // adopts orphans), so no killpg, whose id may be reused by
                // then.
                crate::tree::kill_all(&tree);
            })
        });

        let agent_weak = Arc::downgrade(agent);
        let sess = session.clone();
        tokio::spawn(async move {
            let exit = exit_rx.await.unwrap_or(ChildExit::Code(255));
            // Once the time limit hit, the timer still has the rest of the
            // tree to kill; the command's own exit does not end that.
            if let Some(t) = timeout_task
                && !sess.timed_out.load(std::sync::atomic::Ordering::SeqCst)
            {
                t.abort();
            }
            // Output written before the exit is already in the pipe/pty; the
            // pumps read it to EOF, or until it stays quiet for the drain
            // time (a background process inherited the descriptors).
            let _ = exited_tx.send(true);
            for p in pumps {
                let _ = p.await;
            }
            let info = match exit {
                ChildExit::Code(c) => ExitInfo {
                    exit_code: c,
                    signal: None,
                    timed_out: false,
                },
                ChildExit::Signal(s) => ExitInfo {
                    exit_code: 128 + s as i32,
                    signal: Some(s.as_str().to_owned()),
                    timed_out: false,
                },
            };
            let info = ExitInfo {
                timed_out: sess.timed_out.load(std::sync::atomic::Ordering::SeqCst),
                ..info
            };
            sess.finish(info);
            if let Some(agent) = agent_weak.upgrade() {
                agent.remove_session(&sess.id);
            }
        });

        Ok((session, 0))
    }

    pub(crate) fn info(&self, is_owner: bool) -> SessionInfo {
        let st = self.lock();
        SessionInfo {
            session_id: self.id.clone(),
            command: self.command.clone(),
            created: self.created,
            cols: st.cols,
            rows: st.rows,
            is_owner,
            tty: self.tty,
        }
    }

    pub(crate) fn summary(&self) -> SessionSummary {
        let st = self.lock();
        SessionSummary {
            id: self.id.clone(),
            pid: self.pid,
            command: self.command.clone(),
            workdir: self.workdir.clone(),
            created: self.created,
            tty: self.tty,
            cols: st.cols,
            rows: st.rows,
            clients: st.clients.len(),
            last_activity: st.last_activity,
            bytes_out: st.bytes_out,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a client and returns its id with the scrollback to replay.
    /// Snapshot and registration happen under one lock, so the replay and the
    /// live stream neither overlap nor leave a gap.
    pub(crate) fn attach(&self, tx: ClientTx) -> Option<(u64, Vec<Bytes>)> {
        let mut st = self.lock();
        if st.exited {
            return None;
        }
        let replay = st
            .scrollback
            .chunks
            .iter()
            .map(|(k, d)| Bytes::from(encode_frame(*k, d)))
            .collect();
        let id = st.next_client;
        st.next_client += 1;
        st.detach_generation += 1;
        st.clients.insert(id, tx);
        Some((id, replay))
    }

    pub(crate) fn detach(self: &Arc<Self>, client: u64) {
        let mut st = self.lock();
        if st.clients.remove(&client).is_none() {
            return;
        }
        self.arm_disconnect_timer(st);
    }

    /// Starts the max_run_after_disconnect countdown if nobody is attached.
    fn arm_disconnect_timer(self: &Arc<Self>, mut st: std::sync::MutexGuard<'_, State>) {
        if !st.clients.is_empty() || st.exited {
            return;
        }
        st.detach_generation += 1;
        let generation = st.detach_generation;
        drop(st);
        let Some(after) = self.max_run_after_disconnect else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(s) = weak.upgrade() else { return };
            let st = s.lock();
            if st.clients.is_empty() && !st.exited && st.detach_generation == generation {
                drop(st);
                tracing::info!(session = %s.id, "no client for max_run_after_disconnect; killing");
                s.signal_group(Signal::SIGKILL);
            }
        });
    }

    /// Fans a chunk out; waits while the owner's queue is full (backpressure
    /// to the command), drops other clients that are too far behind.
    async fn output(self: &Arc<Self>, kind: u8, data: Bytes) {
        let frame = Bytes::from(encode_frame(kind, &data));
        let owner = {
            let mut st = self.lock();
            st.bytes_out += data.len() as u64;
            st.last_activity = now_secs();
            st.scrollback.push(kind, data);
            let before = st.clients.len();
            let mut owner = None;
            st.clients.retain(|id, tx| {
                if *id != OWNER {
                    return offer(tx, &frame);
                }
                match tx.try_send(Out::Frame(frame.clone())) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(out)) => {
                        owner = Some((tx.clone(), out));
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            });
            if st.clients.len() < before {
                self.arm_disconnect_timer(st);
            }
            owner
        };
        if let Some((tx, out)) = owner
            && tx.send(out).await.is_err()
        {
            self.detach(OWNER);
        }
    }

    /// Sends a control message to attached clients without keeping it in the
    /// scrollback (port events are live-only). An owner with a full queue
    /// misses it rather than being dropped.
    pub(crate) fn broadcast_control(&self, msg: &Control) {
        let frame = Bytes::from(encode_control(msg));
        let mut st = self.lock();
        st.clients.retain(|id, tx| {
            if *id == OWNER {
                !matches!(
                    tx.try_send(Out::Frame(frame.clone())),
                    Err(mpsc::error::TrySendError::Closed(_))
                )
            } else {
                offer(tx, &frame)
            }
        });
    }

    fn finish(&self, info: ExitInfo) {
        let frame = Bytes::from(encode_control(&Control::Exit(info)));
        let clients: Vec<ClientTx> = {
            let mut st = self.lock();
            st.exited = true;
            st.clients.drain().map(|(_, tx)| tx).collect()
        };
        for tx in clients {
            match tx.try_send(Out::Frame(frame.clone())) {
                Ok(()) => {
                    let _ = tx.try_send(Out::Close);
                }
                // The exit must not be dropped for a client that is merely
                // behind, so wait for queue space.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let frame = frame.clone();
                    tokio::spawn(async move {
                        if tx.send(Out::Frame(frame)).await.is_ok() {
                            let _ = tx.send(Out::Close).await;
                        }
                    });
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    pub(crate) fn signal_group(&self, sig: Signal) {
        if let Err(e) = killpg(Pid::from_raw(self.pid), sig) {
            tracing::debug!(session = %self.id, ?sig, error = %e, "killpg failed");
        }
    }

    pub(crate) fn stdin(&self, msg: StdinMsg) {
        if matches!(msg, StdinMsg::Data(_)) {
            self.lock().last_activity = now_secs();
        }
        let _ = self.stdin_tx.send(msg);
    }

    pub(crate) fn resize(&self, cols: u16, rows: u16) {
        let Some(m) = &self.master else { return };
        if let Err(e) = sys::set_winsize(m.get_ref().as_fd(), rows, cols) {
            tracing::debug!(session = %self.id, error = %e, "resize failed");
            return;
        }
        let mut st = self.lock();
        st.cols = cols;
        st.rows = rows;
    }
}

/// Opens a pty pair with close-on-exec set atomically: openpty(3) leaves
/// both ends inheritable, and a concurrent exec forking in between would keep
/// our slave open (the master would then never report EOF) or leak the master.
fn open_pty() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = nix::pty::ptsname_r(&master)?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok((OwnedFd::from(master), slave))
}

fn pipe_receiver<T: Into<OwnedFd>>(p: Option<T>) -> Result<tokio::net::unix::pipe::Receiver, Error> {
    let fd: OwnedFd = p.ok_or_else(|| Error::Spawn("missing pipe".into()))?.into();
    Ok(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?)
}

/// Waits for `read`, unless the command exited: then only `drain` more per
/// read, for descriptors a background process inherited and keeps open.
/// Time spent waiting for a slow owner does not count, so output written
/// before the exit is never cut off by backpressure. `None`: drained.
async fn read_until_drained<T>(
    read: impl std::future::Future<Output = T>,
    exited: &mut tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) -> Option<T> {
    tokio::pin!(read);
    if !*exited.borrow() {
        tokio::select! {
            r = &mut read => return Some(r),
            _ = exited.wait_for(|e| *e) => {}
        }
    }
    tokio::time::timeout(drain, read).await.ok()
}

async fn pump_pipe(
    session: Weak<Session>,
    mut rx: tokio::net::unix::pipe::Receiver,
    kind: u8,
    mut exited: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_until_drained(rx.read(&mut buf), &mut exited, drain).await {
            None | Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(n)) => match session.upgrade() {
                Some(s) => s.output(kind, Bytes::copy_from_slice(&buf[..n])).await,
                None => return,
            },
        }
    }
}

async fn pump_pty(
    session: Weak<Session>,
    master: Arc<AsyncFd<OwnedFd>>,
    mut exited: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Some(Ok(mut guard)) = read_until_drained(master.readable(), &mut exited, drain).await else {
            return;
        };
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)) {
            // EIO is how the master reports that every slave descriptor is
            // closed; Linux returns buffered data before it, so this is EOF.
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => match session.upgrade() {
                Some(s) => s.output(FRAME_STDOUT, Bytes::copy_from_slice(&buf[..n])).await,
                None => return,
            },
            Err(_would_block) => continue,
        }
    }
}

async fn stdin_pipe(
    mut input: Option<tokio::net::unix::pipe::Sender>,
    mut rx: mpsc::UnboundedReceiver<StdinMsg>,
) {
    while let Some(msg) = rx.recv().await {
        match msg {
            StdinMsg::Data(d) => {
                if let Some(w) = &mut input
                    && w.write_all(&d).await.is_err()
                {
                    // The reader went away; drop further input.
                    input = None;
                }
            }
            StdinMsg::Eof => input = None,
        }
    }
}

async fn stdin_pty(master: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::UnboundedReceiver<StdinMsg>) {
    while let Some(msg) = rx.recv().await {
        // A pty has no half-close; EOF is the client typing ^D.
        let StdinMsg::Data(d) = msg else { continue };
        let mut off = 0;
        while off < d.len() {
            let Ok(mut guard) = master.writable().await else {
                return;
            };
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), &d[off..]).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => off += n,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_keeps_the_newest_bytes() {
        let mut sb = Scrollback {
            chunks: VecDeque::new(),
            bytes: 0,
            cap: 10,
        };
        sb.push(FRAME_STDOUT, Bytes::from_static(b"abcdef"));
        sb.push(FRAME_STDERR, Bytes::from_static(b"ghij"));
        assert_eq!(sb.bytes, 10);
        sb.push(FRAME_STDOUT, Bytes::from_static(b"klm"));
        let all: Vec<u8> = sb.chunks.iter().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(all, b"defghijklm");
        assert_eq!(sb.bytes, 10);
        sb.push(FRAME_STDOUT, Bytes::from_static(b"0123456789abc"));
        let all: Vec<u8> = sb.chunks.iter().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(all, b"3456789abc");
    }
}
