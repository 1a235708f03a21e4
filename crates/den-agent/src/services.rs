//! Services: declared long-running processes supervised by the agent
//! (Sprites §2.6).
//!
//! The host persists definitions and sends the whole desired set; every
//! definition gets its own supervisor task, and a changed definition gets a
//! new supervisor that first waits for its predecessor to finish stopping, so
//! two generations of one service never run at once. The supervisors of one
//! name share a [`Runtime`], which is what `services_status` reports and what
//! `needs` checks look at.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::protocol::{
    Control, FRAME_STDIN_EOF, FRAME_STDOUT, Response, ServiceDef, ServiceEvent, ServiceEventType,
    ServiceState, ServiceStatus, encode_control, encode_frame,
};
use crate::reaper::{ChildExit, Reaper};
use crate::server::write_response;
use crate::{AgentConfig, Error, session, sys};

/// Events buffered per `service_events` subscriber before it is dropped.
const EVENT_QUEUE: usize = 4096;
/// A line longer than this is logged in pieces rather than buffered whole.
const MAX_LINE: usize = 64 * 1024;
/// Upper bound on how long `services_set` waits for first spawn attempts; it
/// only matters when a spawn hangs (e.g. a stuck filesystem).
const SET_SETTLE_LIMIT: Duration = Duration::from_secs(30);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// State shared by the successive supervisors of one service name.
#[derive(Debug, Default)]
struct Runtime {
    status: ServiceStatus,
    /// The generation (supervisor instance) that settled: its first spawn was
    /// attempted, it is (sticky) stopped, or it is blocked on a need that
    /// settled without running. `services_set` answers once every changed
    /// service settled. A generation rather than a flag, because the
    /// predecessor may still be settling (stopping) after its successor was
    /// installed.
    settled: u64,
    /// Blocked on needs. `services_set` also waits for blocked services whose
    /// needs have just come up, so an answer means they were spawned too.
    waiting: bool,
}

struct Entry {
    def: ServiceDef,
    generation: u64,
    rt: Arc<Mutex<Runtime>>,
    stop: watch::Sender<bool>,
    /// Taken by the successor (which awaits it) or by whoever removes it.
    task: Option<JoinHandle<()>>,
}

pub(crate) struct Services {
    config: AgentConfig,
    entries: Mutex<HashMap<String, Entry>>,
    /// Signalled whenever any runtime status changes (for `needs` waits and
    /// `services_set` settling).
    changed: Notify,
    events: broadcast::Sender<ServiceEvent>,
    /// Signalled after every log write, for `service_logs` followers.
    log_written: Notify,
    /// One reconciliation at a time, so a removal finishes stopping before a
    /// later set could start the same name again.
    set_lock: tokio::sync::Mutex<()>,
    shutting_down: watch::Sender<bool>,
    next_generation: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether every need is running; `Err(())` when some need settled without
/// running, i.e. the dependent is blocked for now.
fn needs_state(entries: &HashMap<String, Entry>, def: &ServiceDef) -> Result<bool, ()> {
    let mut all = true;
    for n in &def.needs {
        let Some(e) = entries.get(n) else { return Err(()) };
        let r = lock(&e.rt);
        if r.status.status != ServiceState::Running {
            if r.settled == e.generation {
                return Err(());
            }
            all = false;
        }
    }
    Ok(all)
}

impl Services {
    pub(crate) fn new(config: AgentConfig) -> Arc<Services> {
        if let Err(e) = std::fs::create_dir_all(&config.services_log_dir) {
            // Spawns report the problem per service when they open their logs.
            tracing::warn!(dir = %config.services_log_dir.display(), error = %e, "creating the services log dir");
        }
        Arc::new(Services {
            config,
            entries: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            events: broadcast::channel(EVENT_QUEUE).0,
            log_written: Notify::new(),
            set_lock: tokio::sync::Mutex::new(()),
            shutting_down: watch::channel(false).0,
            next_generation: 1.into(),
        })
    }

    fn emit(&self, name: &str, kind: ServiceEventType, data: Option<String>, exit_code: Option<i32>) {
        // No subscribers is not an error.
        let _ = self.events.send(ServiceEvent {
            name: name.to_owned(),
            kind,
            data,
            exit_code,
            timestamp: now_ms(),
        });
    }

    /// Updates a runtime and wakes everyone watching statuses. The event, if
    /// any, is sent under the runtime lock so that no one can observe the new
    /// status (and, say, start a dependent) before the event is out.
    fn update(
        &self,
        rt: &Mutex<Runtime>,
        event: Option<(ServiceEventType, Option<String>)>,
        f: impl FnOnce(&mut Runtime),
    ) {
        {
            let mut r = lock(rt);
            f(&mut r);
            if let Some((kind, data)) = event {
                self.emit(&r.status.name, kind, data, None);
            }
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn status(&self) -> Vec<ServiceStatus> {
        let entries = lock(&self.entries);
        let mut out: Vec<_> = entries.values().map(|e| lock(&e.rt).status.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub(crate) fn signal(&self, name: &str, sig: Signal) -> Result<(), (&'static str, String)> {
        let pid = {
            let entries = lock(&self.entries);
            let e = entries
                .get(name)
                .ok_or(("not_found", format!("no service {name:?}")))?;
            lock(&e.rt).status.pid
        };
        let pid = pid.ok_or(("not_running", format!("service {name:?} is not running")))?;
        killpg(Pid::from_raw(pid), sig).map_err(|e| ("not_running", format!("signalling {name:?}: {e}")))
    }

    /// Reconciles to `defs`; returns once changed services have settled and
    /// removed ones have stopped.
    pub(crate) async fn set(self: &Arc<Self>, defs: Vec<ServiceDef>) -> Result<(), String> {
        crate::service_def::validate_set(&defs).map_err(|e| e.to_string())?;
        let _serial = self.set_lock.lock().await;
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        {
            let mut entries = lock(&self.entries);
            let wanted: HashSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
            let gone: Vec<String> = entries
                .keys()
                .filter(|n| !wanted.contains(n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                if let Some(mut e) = entries.remove(&name) {
                    let _ = e.stop.send(true);
                    removed.extend(e.task.take());
                }
            }
            for def in defs {
                let prev = entries.remove(&def.name);
                if let Some(p) = &prev
                    && p.def == def
                {
                    entries.insert(def.name.clone(), prev.unwrap_or_else(|| unreachable!()));
                    continue;
                }
                let (rt, prev_task) = match prev {
                    Some(mut p) => {
                        let _ = p.stop.send(true);
                        (p.rt.clone(), p.task.take())
                    }
                    None => (
                        Arc::new(Mutex::new(Runtime {
                            status: ServiceStatus {
                                name: def.name.clone(),
                                ..Default::default()
                            },
                            settled: 0,
                            waiting: false,
                        })),
                        None,
                    ),
                };
                let generation = self
                    .next_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (stop, stop_rx) = watch::channel(false);
                let task = tokio::spawn(self.clone().supervise(
                    def.clone(),
                    generation,
                    rt.clone(),
                    stop_rx,
                    prev_task,
                ));
                changed.push((rt.clone(), generation));
                entries.insert(
                    def.name.clone(),
                    Entry {
                        def,
                        generation,
                        rt,
                        stop,
                        task: Some(task),
                    },
                );
            }
        }
        self.changed.notify_waiters();
        for t in removed {
            let _ = t.await;
        }
        let deadline = tokio::time::Instant::now() + SET_SETTLE_LIMIT;
        loop {
            let notified = self.changed.notified();
            if self.settled(&changed) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::warn!("services did not settle in time; answering anyway");
                return Ok(());
            }
        }
    }

    /// Fencing: SIGKILLs every service's process tree at once and restarts
    /// none of them.
    pub(crate) fn kill_all(&self) {
        let _ = self.shutting_down.send(true);
        let pids: Vec<i32> = lock(&self.entries)
            .values()
            .filter_map(|e| lock(&e.rt).status.pid)
            .collect();
        crate::tree::kill_all(&crate::tree::descendants(&pids));
    }

    /// Stops every service and waits for them.
    pub(crate) async fn shutdown(&self) {
        let _ = self.shutting_down.send(true);
        let tasks: Vec<_> = {
            let mut entries = lock(&self.entries);
            entries
                .drain()
                .filter_map(|(_, mut e)| {
                    let _ = e.stop.send(true);
                    e.task.take()
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Every changed service settled, and no blocked service is about to be
    /// spawned because its needs came up.
    fn settled(&self, changed: &[(Arc<Mutex<Runtime>>, u64)]) -> bool {
        if !changed.iter().all(|(rt, g)| lock(rt).settled == *g) {
            return false;
        }
        let entries = lock(&self.entries);
        entries.values().all(|e| {
            let waiting = lock(&e.rt).waiting;
            !waiting || needs_state(&entries, &e.def) != Ok(true)
        })
    }

    /// Whether every need is running; `Err(())` when some need settled
    /// without running, i.e. this service is blocked for now.
    fn needs_state(&self, def: &ServiceDef) -> Result<bool, ()> {
        needs_state(&lock(&self.entries), def)
    }

    async fn supervise(
        self: Arc<Self>,
        def: ServiceDef,
        generation: u64,
        rt: Arc<Mutex<Runtime>>,
        mut stop: watch::Receiver<bool>,
        prev: Option<JoinHandle<()>>,
    ) {
        // Always, even if we are stopped meanwhile: whoever awaits us must be
        // able to rely on the predecessor being gone too.
        if let Some(p) = prev {
            let _ = p.await;
        }
        let name = def.name.clone();
        if def.stopped {
            self.update(&rt, None, |r| {
                r.status = ServiceStatus {
                    name: name.clone(),
                    ..Default::default()
                };
                r.settled = generation;
            });
            return;
        }
        self.update(&rt, None, |r| {
            r.status = ServiceStatus {
                name: name.clone(),
                status: ServiceState::Starting,
                ..Default::default()
            };
        });
        let cfg = &self.config;
        let mut consecutive_failures = 0u32;
        loop {
            // Wait for needs.
            loop {
                let notified = self.changed.notified();
                let blocked = match self.needs_state(&def) {
                    Ok(true) => break,
                    Ok(false) => false,
                    Err(()) => true,
                };
                let (was_settled, was_waiting) = {
                    let r = lock(&rt);
                    (r.settled == generation, r.waiting)
                };
                if blocked && !was_settled {
                    // Only on the transition: an update wakes this very loop.
                    self.update(&rt, None, |r| {
                        r.settled = generation;
                        r.waiting = true;
                    });
                } else if !was_waiting {
                    lock(&rt).waiting = true;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = until_true(&mut stop) => return self.stopped(&rt, generation),
                }
            }
            let spawned = self.spawn(&def);
            let failure = match spawned {
                Err(e) => {
                    self.update(&rt, Some((ServiceEventType::Error, Some(e.clone()))), |r| {
                        r.status.status = ServiceState::Failed;
                        r.status.pid = None;
                        r.status.error = Some(e.clone());
                        r.settled = generation;
                        r.waiting = false;
                    });
                    None
                }
                Ok(mut proc) => {
                    let started = Instant::now();
                    self.update(&rt, Some((ServiceEventType::Started, None)), |r| {
                        r.status.status = ServiceState::Running;
                        r.status.pid = Some(proc.pid);
                        r.status.started_at = Some(now_ms());
                        r.status.error = None;
                        r.status.next_restart_at = None;
                        r.settled = generation;
                        r.waiting = false;
                    });
                    let pumps = self.start_pumps(&name, &mut proc);
                    let Process { pid, mut exit, .. } = proc;
                    tokio::select! {
                        e = &mut exit => {
                            let e = e.unwrap_or(ChildExit::Code(255));
                            self.drain(pumps).await;
                            if started.elapsed() >= cfg.service_backoff_max {
                                consecutive_failures = 0;
                            }
                            Some(e)
                        }
                        _ = until_true(&mut stop) => {
                            self.stop_process(&rt, pid, exit, pumps).await;
                            return self.stopped(&rt, generation);
                        }
                    }
                }
            };
            let delay = cfg
                .service_backoff_base
                .saturating_mul(1u32 << consecutive_failures.min(16))
                .min(cfg.service_backoff_max);
            consecutive_failures += 1;
            let exit_code = failure.map(exit_code);
            {
                let mut r = lock(&rt);
                r.status.restart_count += 1;
                r.status.next_restart_at = Some(now_ms() + delay.as_millis() as u64);
                if let Some(e) = failure {
                    r.status.status = ServiceState::Starting;
                    r.status.pid = None;
                    r.status.error = Some(describe_exit(e));
                    self.emit(&name, ServiceEventType::Exit, None, exit_code);
                }
            }
            self.changed.notify_waiters();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = until_true(&mut stop) => return self.stopped(&rt, generation),
            }
            self.update(&rt, None, |r| r.status.next_restart_at = None);
        }
    }

    fn stopped(&self, rt: &Mutex<Runtime>, generation: u64) {
        self.update(rt, Some((ServiceEventType::Stopped, None)), |r| {
            let name = std::mem::take(&mut r.status.name);
            r.status = ServiceStatus {
                name,
                ..Default::default()
            };
            r.settled = generation;
            r.waiting = false;
        });
    }

    /// SIGTERM to the group, SIGKILL after the grace, then waits for the exit.
    async fn stop_process(
        &self,
        rt: &Mutex<Runtime>,
        pid: i32,
        mut exit: oneshot::Receiver<ChildExit>,
        pumps: Vec<JoinHandle<()>>,
    ) {
        self.update(rt, Some((ServiceEventType::Stopping, None)), |r| {
            r.status.status = ServiceState::Stopping;
        });
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        let e = match tokio::time::timeout(self.config.service_stop_grace, &mut exit).await {
            Ok(e) => e,
            Err(_) => {
                let _ = killpg(group, Signal::SIGKILL);
                exit.await
            }
        };
        self.drain(pumps).await;
        let code = exit_code(e.unwrap_or(ChildExit::Code(255)));
        let name = lock(rt).status.name.clone();
        self.emit(&name, ServiceEventType::Exit, None, Some(code));
    }

    /// Lets the log pumps read what the process wrote before exiting. The
    /// bound matters only when a background process keeps the pipes open; the
    /// pumps then keep logging on their own.
    async fn drain(&self, pumps: Vec<JoinHandle<()>>) {
        let _ = tokio::time::timeout(self.config.exit_drain_timeout, async {
            for p in pumps {
                let _ = p.await;
            }
        })
        .await;
    }

    fn log_path(&self, name: &str, suffix: &str) -> PathBuf {
        self.config.services_log_dir.join(format!("{name}{suffix}"))
    }

    fn spawn(self: &Arc<Self>, def: &ServiceDef) -> Result<Process, String> {
        let cfg = &self.config;
        let user = session::resolve_user(cfg, None).map_err(|e| e.to_string())?;
        let creds = session::spawn_creds(&user).map_err(|e| e.to_string())?;
        // A relative `dir` is taken from the home, like a login shell's cwd.
        let dir = def
            .dir
            .as_ref()
            .map(|d| std::path::Path::new(&user.home).join(d).display().to_string());
        let cwd = match &dir {
            Some(d) if std::path::Path::new(d).is_dir() => d.clone(),
            Some(d) => return Err(format!("working directory {d:?} does not exist")),
            None if std::path::Path::new(&user.home).is_dir() => user.home.clone(),
            None => "/".into(),
        };
        std::fs::create_dir_all(&cfg.services_log_dir).map_err(|e| format!("creating the log dir: {e}"))?;
        let open = |suffix: &str| {
            let path = self.log_path(&def.name, suffix);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))
        };
        let logs = Arc::new(LogFiles {
            combined: Mutex::new(open(".log")?),
            stdout: Mutex::new(open(".stdout.log")?),
            stderr: Mutex::new(open(".stderr.log")?),
        });

        let mut env = session::default_env(&user, false);
        env.extend(def.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut cmd = Command::new(&def.cmd);
        cmd.args(&def.args)
            .current_dir(&cwd)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sys::configure_child(&mut cmd, false, creds, false);
        let (mut child, pid, exit) = Reaper::global()
            .spawn(|| {
                let child = cmd.spawn()?;
                let pid = child.id() as i32;
                Ok((child, pid))
            })
            .map_err(|e| format!("{}: {e}", def.cmd))?;
        let mut pipes = Vec::new();
        for (pipe, stream) in [
            (
                child.stdout.take().map(std::os::fd::OwnedFd::from),
                Stream::Stdout,
            ),
            (
                child.stderr.take().map(std::os::fd::OwnedFd::from),
                Stream::Stderr,
            ),
        ] {
            let Some(fd) = pipe else { continue };
            match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                Ok(rx) => pipes.push((rx, stream)),
                Err(e) => tracing::warn!(service = %def.name, error = %e, "registering an output pipe"),
            }
        }
        // Never waited on: the reaper owns the status.
        drop(child);
        Ok(Process {
            pid,
            exit,
            pipes,
            logs,
        })
    }

    /// Started only after the `started` event went out, so that no output
    /// event can precede it.
    fn start_pumps(self: &Arc<Self>, name: &str, proc: &mut Process) -> Vec<JoinHandle<()>> {
        proc.pipes
            .drain(..)
            .map(|(rx, stream)| {
                tokio::spawn(pump(self.clone(), name.to_owned(), proc.logs.clone(), rx, stream))
            })
            .collect()
    }

    /// Serves `service_logs`: the tail, then EOF or appended data.
    pub(crate) async fn serve_logs(
        self: Arc<Self>,
        name: String,
        lines: Option<usize>,
        follow: bool,
        mut rd: BufReader<OwnedReadHalf>,
        mut wr: OwnedWriteHalf,
    ) -> Result<(), Error> {
        let path = self.log_path(&name, ".log");
        let known = lock(&self.entries).contains_key(&name);
        if !crate::service_def::valid_service_name(&name) || (!known && !path.exists()) {
            return write_response(
                &mut wr,
                &Response::err("not_found", format!("no service {name:?}")),
            )
            .await;
        }
        write_response(&mut wr, &Response::ok()).await?;
        let lines = lines.unwrap_or(100);
        let mut pos = None;
        let mut shutting_down = self.shutting_down.subscribe();
        let mut probe = [0u8; 1];
        loop {
            let notified = self.log_written.notified();
            // The file may not exist yet for a service that never started.
            if let Ok(file) = std::fs::File::open(&path) {
                let len = file.metadata()?.len();
                let from = match pos {
                    Some(p) if p <= len => p,
                    // First read, or the file was replaced: start at the tail.
                    _ => tail_offset(&file, len, lines)?,
                };
                send_range(&file, from, len, &mut wr).await?;
                pos = Some(len);
            } else if pos.is_none() {
                pos = Some(0);
            }
            if !follow {
                wr.write_all(&encode_frame(FRAME_STDIN_EOF, &[])).await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = until_true(&mut shutting_down) => return Ok(()),
                r = rd.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) { return Ok(()) },
            }
        }
    }

    /// Serves `service_events` until the client closes or falls behind.
    pub(crate) async fn serve_events(
        self: Arc<Self>,
        name: Option<String>,
        mut rd: BufReader<OwnedReadHalf>,
        mut wr: OwnedWriteHalf,
    ) -> Result<(), Error> {
        let mut rx = self.events.subscribe();
        let mut shutting_down = self.shutting_down.subscribe();
        write_response(&mut wr, &Response::ok()).await?;
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if name.as_ref().is_none_or(|n| *n == ev.name) {
                            wr.write_all(&encode_control(&Control::Service { event: ev })).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "service events subscriber fell behind; disconnecting it");
                        return Ok(());
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = until_true(&mut shutting_down) => return Ok(()),
                r = rd.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) { return Ok(()) },
            }
        }
    }
}

/// Resolves once the flag is set or its sender is gone (which also means
/// stop). Drops the watch guard before returning so callers stay `Send`.
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

struct Process {
    pid: i32,
    exit: oneshot::Receiver<ChildExit>,
    pipes: Vec<(tokio::net::unix::pipe::Receiver, Stream)>,
    logs: Arc<LogFiles>,
}

fn exit_code(e: ChildExit) -> i32 {
    match e {
        ChildExit::Code(c) => c,
        ChildExit::Signal(s) => 128 + s as i32,
    }
}

fn describe_exit(e: ChildExit) -> String {
    match e {
        ChildExit::Code(c) => format!("exited with code {c}"),
        ChildExit::Signal(s) => format!("killed by {}", s.as_str()),
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

struct LogFiles {
    combined: Mutex<std::fs::File>,
    stdout: Mutex<std::fs::File>,
    stderr: Mutex<std::fs::File>,
}

impl LogFiles {
    fn raw(&self, stream: Stream, data: &[u8]) {
        let f = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        if let Err(e) = lock(f).write_all(data) {
            tracing::debug!(error = %e, "writing a service log");
        }
    }

    fn line(&self, stream: Stream, line: &[u8]) {
        let tag = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let ts = humantime::format_rfc3339_millis(SystemTime::now());
        let mut buf = format!("{ts} [{tag}] ").into_bytes();
        buf.extend_from_slice(line);
        buf.push(b'\n');
        // One write per line keeps stdout and stderr lines whole.
        if let Err(e) = lock(&self.combined).write_all(&buf) {
            tracing::debug!(error = %e, "writing a service log");
        }
    }
}

/// Copies one output pipe into the logs, line by line, and emits events.
async fn pump(
    svc: Arc<Services>,
    name: String,
    logs: Arc<LogFiles>,
    mut rx: tokio::net::unix::pipe::Receiver,
    stream: Stream,
) {
    let kind = match stream {
        Stream::Stdout => ServiceEventType::Stdout,
        Stream::Stderr => ServiceEventType::Stderr,
    };
    let emit_line = |line: &[u8]| {
        logs.line(stream, line);
        svc.emit(
            &name,
            kind,
            Some(String::from_utf8_lossy(line).into_owned()),
            None,
        );
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        logs.raw(stream, &buf[..n]);
        carry.extend_from_slice(&buf[..n]);
        let mut start = 0;
        while let Some(i) = carry[start..].iter().position(|b| *b == b'\n') {
            emit_line(&carry[start..start + i]);
            start += i + 1;
        }
        carry.drain(..start);
        while carry.len() >= MAX_LINE {
            emit_line(&carry[..MAX_LINE]);
            carry.drain(..MAX_LINE);
        }
        svc.log_written.notify_waiters();
    }
    if !carry.is_empty() {
        emit_line(&carry);
        svc.log_written.notify_waiters();
    }
}

/// Offset at which the last `lines` lines of a file of length `len` start.
fn tail_offset(file: &std::fs::File, len: u64, lines: usize) -> std::io::Result<u64> {
    if lines == 0 {
        return Ok(len);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = len;
    let mut seen = 0;
    while pos > 0 {
        let n = buf.len().min(pos as usize);
        pos -= n as u64;
        file.read_exact_at(&mut buf[..n], pos)?;
        for i in (0..n).rev() {
            let at = pos + i as u64;
            // The final newline ends the last line rather than starting one.
            if buf[i] == b'\n' && at + 1 != len {
                seen += 1;
                if seen == lines {
                    return Ok(at + 1);
                }
            }
        }
    }
    Ok(0)
}

async fn send_range(
    file: &std::fs::File,
    mut from: u64,
    to: u64,
    wr: &mut OwnedWriteHalf,
) -> Result<(), Error> {
    let mut buf = vec![0u8; 64 * 1024];
    while from < to {
        let n = buf.len().min((to - from) as usize);
        file.read_exact_at(&mut buf[..n], from)?;
        wr.write_all(&encode_frame(FRAME_STDOUT, &buf[..n])).await?;
        from += n as u64;
    }
    Ok(())
}

/// Used by the server to answer `services_set` even if the client hangs up
/// half way: reconciliation must not be cancelled midway.
pub(crate) async fn set_detached(svc: Arc<Services>, defs: Vec<ServiceDef>) -> Result<(), String> {
    tokio::spawn(async move { svc.set(defs).await })
        .await
        .unwrap_or_else(|e| Err(format!("reconciliation failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(tail_offset(&f, 6, 1).unwrap(), 4);
        assert_eq!(tail_offset(&f, 6, 2).unwrap(), 2);
        assert_eq!(tail_offset(&f, 6, 3).unwrap(), 0);
        assert_eq!(tail_offset(&f, 6, 10).unwrap(), 0);
        assert_eq!(tail_offset(&f, 6, 0).unwrap(), 6);
        // An unterminated last line counts as a line.
        assert_eq!(tail_offset(&f, 5, 1).unwrap(), 4);
    }
}
