//! Socket server: one request per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{
    Control, FRAME_CONTROL, FRAME_STDIN, FRAME_STDIN_EOF, Request, Response, encode_control, parse_signal,
    read_frame,
};
use crate::session::{ClientTx, Out, Session, StdinMsg};
use crate::{AgentConfig, Error};

pub(crate) struct AgentInner {
    pub config: AgentConfig,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Port subscribers; the poller changes `ports_known` and notifies
    /// them under this lock, so a new subscriber's snapshot and its events
    /// neither overlap nor leave a gap.
    pub port_subscribers: Mutex<Vec<ClientTx>>,
    /// The listeners the port poller knows of, by socket inode.
    pub ports_known: Mutex<HashMap<u64, crate::protocol::PortEvent>>,
    /// `fs_watch` subscriptions being served.
    pub fs_watches: std::sync::atomic::AtomicUsize,
    sessions_changed: Notify,
    /// Exec/attach connections still being served; shutdown waits for them
    /// so exit frames are flushed before the process ends.
    streaming: std::sync::atomic::AtomicUsize,
    streaming_done: Notify,
    pub services: Arc<crate::services::Services>,
    /// When den's heartbeat was last heard (or the agent started).
    last_heartbeat: Mutex<tokio::time::Instant>,
    /// Set once the agent fenced itself.
    fenced: tokio::sync::watch::Sender<bool>,
    /// Set while the agent serves nothing (see [`Request::Quiesce`]).
    quiesced: tokio::sync::watch::Sender<bool>,
    /// Whether the listening socket is open (it is closed while quiesced).
    listening: tokio::sync::watch::Sender<bool>,
    /// The connections being served, by number, so a quiesce can end them
    /// and wait until they are gone.
    connections: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    connections_changed: Notify,
}

/// Takes a served connection off [`AgentInner::connections`] when its task
/// ends (also when aborted).
struct ConnectionGuard(Arc<AgentInner>, u64);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.lock_connections().remove(&self.1);
        self.0.connections_changed.notify_waiters();
    }
}

struct StreamingGuard(Arc<AgentInner>);

impl StreamingGuard {
    fn new(inner: &Arc<AgentInner>) -> Self {
        inner.streaming.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StreamingGuard(inner.clone())
    }
}

impl Drop for StreamingGuard {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.streaming_done.notify_waiters();
    }
}

impl AgentInner {
    pub(crate) fn remove_session(&self, id: &str) {
        self.lock_sessions().remove(id);
        self.sessions_changed.notify_waiters();
    }

    pub(crate) fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches whether the agent is quiesced ([`Request::Quiesce`]).
    pub(crate) fn quiesced_rx(&self) -> tokio::sync::watch::Receiver<bool> {
        self.quiesced.subscribe()
    }

    pub(crate) fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.lock_sessions().get(id).cloned()
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<u64, tokio::task::AbortHandle>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Request::Quiesce`], asked on connection `me`: once this returns,
    /// the listening socket is closed and so is every other connection. A
    /// memory snapshot can hold none of them (host sockets), and one taken
    /// while they were still closing was seen to fail or not to restore.
    async fn quiesce(&self, me: u64) {
        self.quiesced.send_replace(true);
        let mut listening = self.listening.subscribe();
        let _ = listening.wait_for(|l| !*l).await.map(drop);
        loop {
            let changed = self.connections_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let others: Vec<_> = self
                .lock_connections()
                .iter()
                // A task dropped before it ran never unlisted itself.
                .filter(|(id, task)| **id != me && !task.is_finished())
                .map(|(_, task)| task.clone())
                .collect();
            if others.is_empty() {
                return;
            }
            for task in others {
                task.abort();
            }
            changed.await;
        }
    }
}

/// A running agent; dropping it does not stop it, call [`AgentHandle::shutdown`].
pub struct AgentHandle {
    inner: Arc<AgentInner>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    /// Binds the socket and serves in the background on the current runtime.
    pub async fn start(config: AgentConfig) -> Result<AgentHandle, Error> {
        crate::reaper::Reaper::global();
        if config.subreaper && std::process::id() != 1 {
            crate::sys::set_child_subreaper()?;
        }
        let listener = match config.listen_fd {
            // The host made this socket, outside the sprite: serve on it and
            // bind no path of our own.
            Some(fd) => UnixListener::from_std(crate::sys::adopt_listener(fd)?)?,
            None => bind(&config.socket)?,
        };
        if let Some(name) = &config.sudo_broker {
            // The sprite's own files: the agent runs at its root.
            let broker = crate::sudo::Broker { root: "/".into() };
            if let Err(e) = broker.start(name) {
                tracing::warn!(error = %e, "the sudo broker could not start");
            }
        }
        // Before anything can quiesce the agent: a resume must not be lost.
        let mut resume =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(RESUME_SIGNAL))?;
        let services = crate::services::Services::new(config.clone());
        let inner = Arc::new(AgentInner {
            config,
            services,
            sessions: Mutex::new(HashMap::new()),
            port_subscribers: Mutex::new(Vec::new()),
            ports_known: Mutex::new(HashMap::new()),
            fs_watches: 0.into(),
            sessions_changed: Notify::new(),
            streaming: 0.into(),
            streaming_done: Notify::new(),
            last_heartbeat: Mutex::new(tokio::time::Instant::now()),
            fenced: tokio::sync::watch::channel(false).0,
            quiesced: tokio::sync::watch::channel(false).0,
            listening: tokio::sync::watch::channel(true).0,
            connections: Mutex::new(HashMap::new()),
            connections_changed: Notify::new(),
        });
        let stop = Arc::new(Notify::new());
        let ports = tokio::spawn(crate::ports::watch(Arc::downgrade(&inner)));
        if let Some(ttl) = inner.config.fence_ttl {
            tokio::spawn(fence_watchdog(Arc::downgrade(&inner), ttl));
        }
        let task = {
            let inner = inner.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut listener = Some(listener);
                let mut quiesced = inner.quiesced.subscribe();
                let mut next_connection = 0u64;
                loop {
                    let Some(l) = &listener else {
                        // Quiesced: nothing bound until den says the sprite
                        // runs again.
                        tokio::select! {
                            _ = stop.notified() => break,
                            _ = resume.recv() => {}
                        }
                        match bind(&inner.config.socket) {
                            Ok(l) => {
                                listener = Some(l);
                                *inner.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner()) =
                                    tokio::time::Instant::now();
                                inner.listening.send_replace(true);
                                inner.quiesced.send_replace(false);
                                tracing::info!("serving again");
                            }
                            Err(e) => tracing::warn!(error = %e, "binding the socket again"),
                        }
                        continue;
                    };
                    tokio::select! {
                        _ = stop.notified() => break,
                        _ = wait_quiesced(&mut quiesced) => {
                            listener = None;
                            let _ = std::fs::remove_file(&inner.config.socket);
                            // den repeats the resume signal until it hears
                            // from us: one that came after we served again
                            // must not end this quiesce at once.
                            drain(&mut resume);
                            inner.listening.send_replace(false);
                        }
                        accepted = l.accept() => match accepted {
                            Ok((stream, _)) => {
                                let id = next_connection;
                                next_connection += 1;
                                let served = inner.clone();
                                // Listed before its task can end and unlist it.
                                // The guard is made in the task: a runtime
                                // shutting down drops an unpolled task inside
                                // `spawn`, where its drop could not take the
                                // lock held here.
                                let mut connections = inner.lock_connections();
                                let task = tokio::spawn(async move {
                                    let _guard = ConnectionGuard(served.clone(), id);
                                    if let Err(e) = handle_connection(served, stream, id).await {
                                        tracing::debug!(error = %e, "connection ended with error");
                                    }
                                });
                                connections.insert(id, task.abort_handle());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                    }
                }
                ports.abort();
            })
        };
        Ok(AgentHandle { inner, stop, task })
    }

    /// Stops accepting, stops services, sends SIGTERM to every session's
    /// process group, waits up to `shutdown_grace` for them to exit, then
    /// SIGKILLs the rest.
    pub async fn shutdown(mut self) {
        self.stop.notify_one();
        let _ = (&mut self.task).await;
        if self.inner.config.listen_fd.is_none() {
            let _ = std::fs::remove_file(&self.inner.config.socket);
        }
        let services = self.inner.services.clone();
        tokio::join!(services.shutdown(), self.shutdown_sessions());
    }

    async fn shutdown_sessions(&self) {
        let all: Vec<_> = self.inner.lock_sessions().values().cloned().collect();
        for s in &all {
            s.signal_group(Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.shutdown_grace;
        loop {
            let notified = self.inner.sessions_changed.notified();
            if self.inner.lock_sessions().is_empty() {
                wait_for_streams(&self.inner, deadline + Duration::from_secs(1)).await;
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        for s in self.inner.lock_sessions().values() {
            s.signal_group(Signal::SIGKILL);
        }
        wait_for_streams(&self.inner, deadline + Duration::from_secs(1)).await;
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.inner.config.socket
    }

    pub fn fence_ttl(&self) -> Option<Duration> {
        self.inner.config.fence_ttl
    }

    /// Resolves once the agent fenced itself (den's heartbeat was missing
    /// for `fence_ttl`); never without a `fence_ttl`.
    pub async fn fenced(&self) {
        let mut rx = self.inner.fenced.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    /// Fencing: SIGKILL every session's process tree and every service at
    /// once, no grace (the sprite may already run elsewhere).
    pub async fn kill_everything(self) {
        self.stop.notify_one();
        let sessions: Vec<_> = self.inner.lock_sessions().values().cloned().collect();
        let roots: Vec<i32> = sessions.iter().map(|s| s.pid).collect();
        crate::tree::kill_all(&crate::tree::descendants(&roots));
        let services = self.inner.services.clone();
        services.kill_all();
    }
}

/// Resolves once the agent is quiesced.
async fn wait_quiesced(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = rx.wait_for(|q| *q).await.map(drop);
}

/// The signal that ends a quiesce ([`Request::Quiesce`]).
pub const RESUME_SIGNAL: i32 = libc::SIGUSR2;

/// Forgets the deliveries of `signal` that are already in.
fn drain(signal: &mut tokio::signal::unix::Signal) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Some(())) = signal.poll_recv(&mut cx) {}
}

/// Bind the agent's socket at `path` (root's only), replacing a stale one.
fn bind(path: &std::path::Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A stale socket from a previous boot would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Fences the sprite when den has not been heard from for `ttl`: a den that
/// was killed (or lost its node lease and whose sprite may now run on another
/// node) must not leave the sprite acting on the world.
async fn fence_watchdog(inner: std::sync::Weak<AgentInner>, ttl: Duration) {
    // After a thaw the timer fires at once although beats sent meanwhile
    // wait in the socket: give the readers a moment to see them first.
    let recheck = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        let Some(last) = inner
            .upgrade()
            .map(|i| *i.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner()))
        else {
            return;
        };
        let due = last + ttl;
        if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
            continue;
        }
        tokio::time::sleep(recheck).await;
        let Some(i) = inner.upgrade() else { return };
        let last = *i.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        // Quiesced for a memory snapshot, the agent hears no heartbeat by
        // design, and a sprite restored from that snapshot (hours later,
        // elsewhere) must not fence before den could reach it.
        if *i.quiesced.borrow() {
            tokio::time::sleep(recheck).await;
            continue;
        }
        if last.elapsed() >= ttl {
            tracing::error!(?ttl, "no heartbeat from den: fencing the sprite");
            i.fenced.send_replace(true);
            return;
        }
    }
}

async fn wait_for_streams(inner: &AgentInner, deadline: tokio::time::Instant) {
    loop {
        let done = inner.streaming_done.notified();
        if inner.streaming.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        if tokio::time::timeout_at(deadline, done).await.is_err() {
            return;
        }
    }
}

pub(crate) async fn write_response(w: &mut OwnedWriteHalf, resp: &Response) -> Result<(), Error> {
    let mut line = serde_json::to_vec(resp)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

async fn handle_connection(inner: Arc<AgentInner>, stream: UnixStream, id: u64) -> Result<(), Error> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    // Bound the request line so a peer cannot make us buffer forever.
    let n = tokio::io::AsyncReadExt::take(&mut rd, 1 << 20)
        .read_line(&mut line)
        .await?;
    if n == 0 {
        return Ok(());
    }
    let req: Request = match serde_json::from_str(line.trim_end()) {
        Ok(r) => r,
        Err(e) => return write_response(&mut wr, &Response::err("bad_request", e.to_string())).await,
    };
    match req {
        Request::Ping => write_response(&mut wr, &Response::ok()).await,
        Request::Quiesce => {
            if inner.config.listen_fd.is_some() {
                return write_response(
                    &mut wr,
                    &Response::err("bad_request", "this agent serves a socket it did not bind"),
                )
                .await;
            }
            inner.quiesce(id).await;
            // den reads to the end: then this connection is gone too.
            write_response(&mut wr, &Response::ok()).await
        }
        Request::Heartbeat => {
            write_response(&mut wr, &Response::ok()).await?;
            let mut buf = [0u8; 256];
            loop {
                match tokio::io::AsyncReadExt::read(&mut rd, &mut buf).await {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {
                        *inner.last_heartbeat.lock().unwrap_or_else(|p| p.into_inner()) =
                            tokio::time::Instant::now();
                    }
                }
            }
        }
        Request::FsRead {
            path,
            working_dir,
            start,
            end,
        } => {
            drop(inner);
            crate::fs::serve_read(path, working_dir, start, end, wr).await
        }
        Request::FsWrite {
            path,
            working_dir,
            mode,
            mkdir_parents,
            as_root,
        } => {
            let params = crate::fs::WriteParams {
                path,
                working_dir,
                mode,
                mkdir_parents,
                as_root,
            };
            crate::fs::serve_write(&inner.config, params, rd, wr).await
        }
        req @ (Request::FsList { .. }
        | Request::FsDelete { .. }
        | Request::FsRename { .. }
        | Request::FsCopy { .. }
        | Request::FsChmod { .. }
        | Request::FsChown { .. }) => {
            let resp = crate::fs::run(inner.config.clone(), req).await;
            write_response(&mut wr, &resp).await
        }
        Request::ListSessions => {
            let mut sessions: Vec<_> = inner.lock_sessions().values().map(|s| s.summary()).collect();
            sessions.sort_by_key(|s| s.pid);
            write_response(
                &mut wr,
                &Response {
                    sessions: Some(sessions),
                    ..Response::ok()
                },
            )
            .await
        }
        Request::Kill { session, signal } => {
            let Some(sig) = parse_signal(&signal) else {
                return write_response(
                    &mut wr,
                    &Response::err("bad_request", format!("bad signal {signal:?}")),
                )
                .await;
            };
            match inner.session(&session) {
                Some(s) => {
                    s.signal_group(sig);
                    write_response(&mut wr, &Response::ok()).await
                }
                None => write_response(&mut wr, &Response::err("not_found", "no such session")).await,
            }
        }
        req @ (Request::SubscribePorts | Request::WatchPorts) => {
            let (tx, mut rx) = mpsc::channel(crate::session::CLIENT_QUEUE);
            let snapshot = {
                let mut subs = inner.port_subscribers.lock().unwrap_or_else(|p| p.into_inner());
                subs.push(tx);
                let known = inner.ports_known.lock().unwrap_or_else(|p| p.into_inner());
                let mut ports: Vec<_> = known.values().cloned().collect();
                ports.sort_by(|a, b| (a.port, &a.address).cmp(&(b.port, &b.address)));
                ports
            };
            write_response(&mut wr, &Response::ok()).await?;
            drop(inner);
            if matches!(req, Request::WatchPorts) {
                wr.write_all(&encode_control(&Control::PortList { ports: snapshot }))
                    .await?;
            }
            // Watch for the peer hanging up so a quiet subscription does not
            // linger until the next port event.
            let mut probe = [0u8; 1];
            loop {
                tokio::select! {
                    out = rx.recv() => match out {
                        Some(Out::Frame(f)) => wr.write_all(&f).await?,
                        Some(Out::Close) | None => return Ok(()),
                    },
                    r = tokio::io::AsyncReadExt::read(&mut rd, &mut probe) => {
                        if matches!(r, Ok(0) | Err(_)) { return Ok(()); }
                    }
                }
            }
        }
        Request::FsWatch {
            paths,
            working_dir,
            recursive,
        } => crate::fswatch::serve(inner, paths, working_dir, recursive, rd, wr).await,
        Request::ServicesSet { services } => {
            let resp = match crate::services::set_detached(inner.services.clone(), services).await {
                Ok(()) => Response::ok(),
                Err(e) => Response::err("bad_request", e),
            };
            write_response(&mut wr, &resp).await
        }
        Request::ServicesStatus => {
            let resp = Response {
                services: Some(inner.services.status()),
                ..Response::ok()
            };
            write_response(&mut wr, &resp).await
        }
        Request::ServiceSignal { name, signal } => {
            let resp = match parse_signal(&signal) {
                None => Response::err("bad_request", format!("bad signal {signal:?}")),
                Some(sig) => match inner.services.signal(&name, sig) {
                    Ok(()) => Response::ok(),
                    Err((code, msg)) => Response::err(code, msg),
                },
            };
            write_response(&mut wr, &resp).await
        }
        Request::ServiceLogs { name, lines, follow } => {
            let services = inner.services.clone();
            drop(inner);
            services.serve_logs(name, lines, follow, rd, wr).await
        }
        Request::ServiceEvents { name } => {
            let services = inner.services.clone();
            drop(inner);
            services.serve_events(name, rd, wr).await
        }
        Request::Exec(exec) => {
            let _guard = StreamingGuard::new(&inner);
            let (tx, rx) = mpsc::channel(crate::session::OWNER_QUEUE);
            let (session, client) = match Session::spawn(&inner, &exec, tx) {
                Ok(s) => s,
                Err(e) => {
                    let code = match e {
                        Error::BadRequest(_) | Error::User(_) => "bad_request",
                        _ => "spawn_failed",
                    };
                    return write_response(&mut wr, &Response::err(code, e.to_string())).await;
                }
            };
            write_response(&mut wr, &Response::ok()).await?;
            let info = encode_control(&Control::SessionInfo(session.info(true)));
            wr.write_all(&info).await?;
            serve_client(session, client, rd, wr, rx).await
        }
        Request::Attach { session } => {
            let _guard = StreamingGuard::new(&inner);
            let Some(s) = inner.session(&session) else {
                return write_response(&mut wr, &Response::err("not_found", "no such session")).await;
            };
            let (tx, rx) = mpsc::channel(crate::session::CLIENT_QUEUE);
            let Some((client, replay)) = s.attach(tx) else {
                return write_response(&mut wr, &Response::err("not_found", "session has exited")).await;
            };
            let res = async {
                write_response(&mut wr, &Response::ok()).await?;
                let mut head = encode_control(&Control::SessionInfo(s.info(false)));
                for f in replay {
                    head.extend_from_slice(&f);
                }
                wr.write_all(&head).await?;
                Ok::<_, Error>(())
            }
            .await;
            if let Err(e) = res {
                s.detach(client);
                return Err(e);
            }
            serve_client(s, client, rd, wr, rx).await
        }
    }
}

async fn serve_client(
    session: Arc<Session>,
    client: u64,
    mut rd: BufReader<OwnedReadHalf>,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Out>,
) -> Result<(), Error> {
    let reader = {
        let session = session.clone();
        tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some((FRAME_STDIN, data))) => session.stdin(StdinMsg::Data(data)),
                    Ok(Some((FRAME_STDIN_EOF, _))) => session.stdin(StdinMsg::Eof),
                    Ok(Some((FRAME_CONTROL, data))) => handle_control(&session, &data),
                    Ok(Some((kind, _))) => tracing::debug!(kind, "ignoring unknown frame kind"),
                    Ok(None) | Err(_) => break,
                }
            }
            // Hanging up is how a client detaches.
            session.detach(client);
        })
    };
    let mut result = Ok(());
    while let Some(out) = rx.recv().await {
        match out {
            Out::Frame(f) => {
                if let Err(e) = wr.write_all(&f).await {
                    result = Err(e.into());
                    break;
                }
            }
            Out::Close => {
                let _ = wr.shutdown().await;
                break;
            }
        }
    }
    reader.abort();
    session.detach(client);
    result
}

fn handle_control(session: &Session, data: &Bytes) {
    match serde_json::from_slice::<Control>(data) {
        Ok(Control::Resize { cols, rows }) => session.resize(cols, rows),
        Ok(Control::Signal { signal }) => match parse_signal(&signal) {
            Some(sig) => session.signal_group(sig),
            None => tracing::debug!(%signal, "unknown signal name"),
        },
        Ok(other) => tracing::debug!(?other, "ignoring agent-bound control message"),
        Err(e) => tracing::debug!(error = %e, "bad control frame"),
    }
}
