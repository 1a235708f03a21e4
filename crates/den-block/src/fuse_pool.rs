//! One pool of FUSE worker threads for every disk file of the process.
//!
//! A server with hundreds of sprites has hundreds of FUSE connections, almost
//! all idle. Serving each with threads of its own (each with a request buffer
//! of a megabyte and, with glibc, a malloc arena) made idle volumes the bulk
//! of den's memory. Here every connection's `/dev/fuse` descriptor is
//! non-blocking and registered, one-shot, with a single epoll instance; one
//! poller thread hands ready connections to `workers` threads, and a worker
//! takes a request buffer from a shared free list only for the time it
//! serves one request. Threads and buffers are bounded by the pool size, not
//! by the number of volumes.
//!
//! When connections are ready and no worker is idle (requests blocked in a
//! slow device, or a burst), the poller adds workers, up to `max_workers`;
//! those extra workers exit after [`EXTRA_IDLE`] without work, and the free
//! list never keeps more buffers than there are workers.
//!
//! Each connection has one *reader token*: whoever holds it (the epoll
//! registration, the queue, or a worker about to read) is the only one that
//! reads the next request. A worker that read a request passes the token on
//! (re-arms the registration) before serving it, so one busy volume is served
//! by several workers at once, but only by up to its `limit`: past that the
//! token is parked until one of its requests finishes. A volume whose device
//! hangs therefore holds at most `limit` workers, and the others keep serving
//! the rest.
//!
//! A connection ends when a read fails with `ENODEV` (unmounted or aborted);
//! its `done` channel fires once its last in-flight request has finished and
//! the pool has let go of it (and so of its disk).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;

use parking_lot::{Condvar, Mutex};

use crate::error::{BlockError, Result};
use crate::fuse::{Answer, DiskFs, Worker};
use crate::fuse_abi;

/// How long an extra worker (beyond the permanent ones) waits for work
/// before it exits.
pub const EXTRA_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// What the pool looks like now; see [`fuse_pool_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusePoolStats {
    /// Permanent worker threads (fixed once the pool started).
    pub min_workers: usize,
    /// The most worker threads the pool will run.
    pub max_workers: usize,
    /// Worker threads alive now (permanent and extra).
    pub workers: usize,
    /// Connections being served.
    pub connections: usize,
    /// Request buffers that exist, in use or idle.
    pub buffers: usize,
    /// Of those, how many sit idle in the free list.
    pub idle_buffers: usize,
    /// Requests being served right now.
    pub in_flight: usize,
}

/// Requested pool size (permanent, most); `None` means the default.
static SIZE_WANTED: Mutex<Option<(usize, usize)>> = Mutex::new(None);
static POOL: OnceLock<Pool> = OnceLock::new();
/// Serialises starting the pool (`OnceLock::get_or_try_init` is unstable).
static START: Mutex<()> = Mutex::new(());

/// Default pool size: enough for a few volumes to do I/O at once, and twice
/// the cores so that workers blocked on the store do not idle the CPUs.
pub fn default_fuse_workers() -> usize {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).max(8)
}

/// Default most workers: room for several volumes blocked in their device at
/// once (each holds at most its own limit) before healthy ones wait.
pub fn default_max_fuse_workers() -> usize {
    64.max(2 * default_fuse_workers())
}

/// Size the FUSE worker pool shared by every disk file of this process:
/// `workers` threads always, up to `max_workers` while requests wait for a
/// free one. Only possible before the first file is served (setting the
/// sizes the pool already has is a no-op).
pub fn set_fuse_workers(workers: usize, max_workers: usize) -> Result<()> {
    if !(2..=1024).contains(&workers) || !(workers..=1024).contains(&max_workers) {
        return Err(BlockError::InvalidOption(format!(
            "FUSE pool sizes {workers}..{max_workers} must satisfy 2 <= workers <= max_workers <= 1024"
        )));
    }
    let _start = START.lock();
    if let Some(pool) = POOL.get() {
        if (pool.min_workers, pool.max_workers) != (workers, max_workers) {
            return Err(BlockError::InvalidOption(format!(
                "the FUSE pool already runs with {}..{} workers",
                pool.min_workers, pool.max_workers
            )));
        }
        return Ok(());
    }
    *SIZE_WANTED.lock() = Some((workers, max_workers));
    Ok(())
}

/// Counters of the process's FUSE pool (all zero before the first mount).
pub fn fuse_pool_stats() -> FusePoolStats {
    let Some(pool) = POOL.get() else {
        return FusePoolStats::default();
    };
    let bufs = pool.bufs.lock();
    FusePoolStats {
        min_workers: pool.min_workers,
        max_workers: pool.max_workers,
        workers: pool.alive.load(Ordering::Relaxed),
        connections: pool.conns.lock().len(),
        buffers: bufs.total,
        idle_buffers: bufs.free.len(),
        in_flight: pool.in_flight.load(Ordering::Relaxed),
    }
}

/// The pool, started on first use.
pub(crate) fn pool() -> io::Result<&'static Pool> {
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let _start = START.lock();
    if let Some(pool) = POOL.get() {
        return Ok(pool);
    }
    let (workers, max_workers) = SIZE_WANTED
        .lock()
        .unwrap_or_else(|| (default_fuse_workers(), default_max_fuse_workers()));
    let pool = POOL.get_or_init(|| Pool::new(workers, max_workers));
    pool.start()?;
    Ok(pool)
}

struct BufPool {
    free: Vec<Vec<u8>>,
    total: usize,
}

struct ConnState {
    /// Requests read and not yet answered.
    in_flight: usize,
    /// The reader token is out (armed in epoll, queued, or being read with).
    reading: bool,
    /// Set once a read failed for good; the connection is not re-armed.
    ended: Option<io::Result<()>>,
}

/// Reports a connection's outcome when the connection itself is dropped:
/// after the pool's last reference (a worker's, which outlives the last
/// answer by a moment) and after `Conn::fs`, declared before it, so whoever
/// waits on `Registration::done` knows the disk is no longer held.
struct DoneOnDrop {
    tx: mpsc::SyncSender<io::Result<()>>,
    outcome: Mutex<Option<io::Result<()>>>,
}

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Some(result) = self.outcome.get_mut().take() {
            let _ = self.tx.try_send(result);
        }
    }
}

/// One FUSE connection served by the pool.
pub(crate) struct Conn {
    key: u64,
    fd: OwnedFd,
    fs: DiskFs,
    limit: usize,
    state: Mutex<ConnState>,
    /// Last: fields drop in declaration order.
    done: DoneOnDrop,
}

/// Connections with a request to read, and the workers to read them.
struct Queue {
    ready: VecDeque<Arc<Conn>>,
    /// Workers waiting for a connection.
    idle: usize,
    /// Workers alive (permanent and extra).
    alive: usize,
    next_index: usize,
}

pub(crate) struct Pool {
    min_workers: usize,
    max_workers: usize,
    /// Mirror of `Queue::alive`, for the free list and stats.
    alive: AtomicUsize,
    epoll: OnceLock<OwnedFd>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    queue: Mutex<Queue>,
    ready: Condvar,
    bufs: Mutex<BufPool>,
    next_key: AtomicU64,
    in_flight: AtomicUsize,
}

/// A connection registered with the pool. Dropping it does not stop
/// serving: that ends with the connection itself (unmount or abort).
pub(crate) struct Registration {
    pub(crate) done: mpsc::Receiver<io::Result<()>>,
}

impl Pool {
    fn new(min_workers: usize, max_workers: usize) -> Self {
        Self {
            min_workers,
            max_workers,
            alive: AtomicUsize::new(0),
            epoll: OnceLock::new(),
            conns: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue {
                ready: VecDeque::new(),
                idle: 0,
                alive: 0,
                next_index: 0,
            }),
            ready: Condvar::new(),
            bufs: Mutex::new(BufPool {
                free: Vec::new(),
                total: 0,
            }),
            next_key: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn start(&'static self) -> io::Result<()> {
        if self.epoll.get().is_some() {
            return Ok(());
        }
        let epoll = epoll_create()?;
        let _ = self.epoll.set(epoll);
        thread::Builder::new()
            .name("den-fuse-poll".into())
            .spawn(move || self.poll_loop())?;
        let first = {
            let mut q = self.queue.lock();
            q.alive += self.min_workers;
            q.next_index += self.min_workers;
            self.alive.store(q.alive, Ordering::Relaxed);
            q.next_index - self.min_workers
        };
        for index in first..first + self.min_workers {
            thread::Builder::new()
                .name(format!("den-fuse-{index}"))
                .spawn(move || self.worker_loop(index, true))?;
        }
        tracing::info!(
            workers = self.min_workers,
            max_workers = self.max_workers,
            "FUSE worker pool started"
        );
        Ok(())
    }

    /// Start an extra worker; it exits after [`EXTRA_IDLE`] without work.
    fn spawn_extra(&'static self, index: usize) {
        let spawned = thread::Builder::new()
            .name(format!("den-fuse-{index}"))
            .spawn(move || self.worker_loop(index, false));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "FUSE pool: starting an extra worker failed");
            let mut q = self.queue.lock();
            q.alive -= 1;
            self.alive.store(q.alive, Ordering::Relaxed);
        }
    }

    fn epoll_fd(&self) -> RawFd {
        self.epoll.get().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Serve `fd` (a non-blocking `/dev/fuse` descriptor with a mount) with
    /// `fs`, at most `limit` requests at once.
    pub(crate) fn register(&self, fd: OwnedFd, fs: DiskFs, limit: usize) -> io::Result<Registration> {
        let (tx, rx) = mpsc::sync_channel(1);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            key,
            fd,
            fs,
            limit: limit.clamp(1, self.min_workers.saturating_sub(1).max(1)),
            state: Mutex::new(ConnState {
                in_flight: 0,
                reading: true,
                ended: None,
            }),
            done: DoneOnDrop {
                tx,
                outcome: Mutex::new(None),
            },
        });
        self.conns.lock().insert(key, conn.clone());
        if let Err(e) = epoll_ctl(
            self.epoll_fd(),
            libc::EPOLL_CTL_ADD,
            conn.fd.as_fd().as_raw_fd(),
            key,
        ) {
            self.conns.lock().remove(&key);
            return Err(e);
        }
        Ok(Registration { done: rx })
    }

    fn poll_loop(&'static self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let ready = match epoll_wait(self.epoll_fd(), &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // Nothing sensible is left to do: without the poller no
                    // volume is served. Say so loudly rather than spin.
                    tracing::error!(error = %e, "FUSE pool: epoll_wait failed; pool stops");
                    return;
                }
            };
            let conns = self.conns.lock();
            let mut q = self.queue.lock();
            for ev in &events[..ready] {
                let key = ev.u64;
                if let Some(conn) = conns.get(&key) {
                    q.ready.push_back(conn.clone());
                }
            }
            drop(conns);
            // More ready connections than idle workers: every worker is in a
            // request (a slow device, or a burst). Add workers, up to the
            // bound, so that healthy volumes are not starved.
            let extra = q
                .ready
                .len()
                .saturating_sub(q.idle)
                .min(self.max_workers - q.alive);
            let first = q.next_index;
            q.alive += extra;
            q.next_index += extra;
            self.alive.store(q.alive, Ordering::Relaxed);
            drop(q);
            self.ready.notify_all();
            for index in first..first + extra {
                self.spawn_extra(index);
            }
        }
    }

    fn worker_loop(&self, index: usize, permanent: bool) {
        let worker = Worker {
            index,
            io_flusher: crate::fuse::enter_worker(),
        };
        let mut out = Vec::with_capacity(256);
        loop {
            let conn = {
                let mut q = self.queue.lock();
                loop {
                    if let Some(conn) = q.ready.pop_front() {
                        break conn;
                    }
                    q.idle += 1;
                    let timed_out = if permanent {
                        self.ready.wait(&mut q);
                        false
                    } else {
                        self.ready.wait_for(&mut q, EXTRA_IDLE).timed_out()
                    };
                    q.idle -= 1;
                    if timed_out && q.ready.is_empty() {
                        q.alive -= 1;
                        self.alive.store(q.alive, Ordering::Relaxed);
                        drop(q);
                        self.trim_buffers();
                        return;
                    }
                }
            };
            self.serve_one(worker, &conn, &mut out);
        }
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock();
        let buf = match bufs.free.pop() {
            Some(buf) => buf,
            None => {
                bufs.total += 1;
                Vec::new()
            }
        };
        drop(bufs);
        let mut buf = buf;
        if buf.len() < len {
            // Zeroed memory comes straight from mmap: pages are only paid
            // for once a request touches them.
            buf.resize(len, 0);
        }
        buf
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.lock();
        // At most one buffer per worker is ever out; keep no more than one
        // per live worker, so buffers of exited extra workers are freed.
        if bufs.free.len() < self.alive.load(Ordering::Relaxed) {
            bufs.free.push(buf);
        } else {
            bufs.total -= 1;
        }
    }

    fn trim_buffers(&self) {
        let mut bufs = self.bufs.lock();
        let keep = self.alive.load(Ordering::Relaxed);
        while bufs.free.len() > keep {
            bufs.free.pop();
            bufs.total -= 1;
        }
    }

    /// Re-arm the connection's one-shot registration: hands the reader
    /// token back to epoll.
    fn arm(&self, conn: &Conn) {
        if let Err(e) = epoll_ctl(
            self.epoll_fd(),
            libc::EPOLL_CTL_MOD,
            conn.fd.as_raw_fd(),
            conn.key,
        ) {
            // Only possible if the descriptor is gone, which it is not while
            // we hold the connection; end it rather than leave it unserved.
            tracing::error!(error = %e, "FUSE pool: re-arming a connection failed");
            self.end(conn, Err(e));
        }
    }

    /// Read one request of `conn` (this worker holds its reader token),
    /// pass the token on, serve the request and answer it.
    fn serve_one(&self, worker: Worker, conn: &Conn, out: &mut Vec<u8>) {
        let mut buf = self.take_buffer(conn.fs.request_buffer_len());
        let read = read_fd(conn.fd.as_raw_fd(), &mut buf);
        let n = match read {
            Ok(n) => n,
            // Nothing (left) to read, or the request we were to get was
            // interrupted in the meantime: wait for the next one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR | libc::ENOENT)) => {
                self.give_buffer(buf);
                self.arm(conn);
                return;
            }
            Err(e) => {
                self.give_buffer(buf);
                let result = if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(())
                } else {
                    tracing::error!(error = %e, "FUSE pool: reading a request failed; connection dropped");
                    Err(e)
                };
                self.end(conn, result);
                return;
            }
        };
        {
            let mut st = conn.state.lock();
            st.in_flight += 1;
            if st.in_flight < conn.limit {
                drop(st);
                self.arm(conn);
            } else {
                st.reading = false;
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            conn.fs.serve(worker, &mut buf, n, out)
        }));
        let reply = match served {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!("FUSE request handler panicked; answering EIO");
                unique_of(&buf[..n]).map(|u| (u, Answer::Error(libc::EIO)))
            }
        };
        if let Some((unique, answer)) = reply {
            let result = match answer {
                Answer::Nothing => Ok(()),
                Answer::Error(errno) => write_reply(conn.fd.as_raw_fd(), unique, -errno, &[]),
                Answer::Payload => write_reply(conn.fd.as_raw_fd(), unique, 0, out),
                Answer::Data(len) => write_reply(conn.fd.as_raw_fd(), unique, 0, &buf[..len]),
            };
            // ENOENT: the request was interrupted and the kernel has dropped
            // it. ENODEV: the connection ended meanwhile; the next read sees it.
            if let Err(e) = result
                && !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
            {
                tracing::warn!(error = %e, "FUSE pool: writing a reply failed");
            }
        }
        self.give_buffer(buf);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.finish(conn);
    }

    /// A request of `conn` has been answered.
    fn finish(&self, conn: &Conn) {
        let mut st = conn.state.lock();
        st.in_flight -= 1;
        if st.ended.is_some() {
            if st.in_flight == 0 {
                signal_done(conn, &st);
            }
            return;
        }
        if !st.reading {
            st.reading = true;
            drop(st);
            self.arm(conn);
        }
    }

    /// The connection is over: stop watching it, and report once its last
    /// request is answered.
    fn end(&self, conn: &Conn, result: io::Result<()>) {
        let mut st = conn.state.lock();
        if st.ended.is_some() {
            return;
        }
        st.reading = false;
        st.ended = Some(result);
        let _ = epoll_ctl(
            self.epoll_fd(),
            libc::EPOLL_CTL_DEL,
            conn.fd.as_raw_fd(),
            conn.key,
        );
        self.conns.lock().remove(&conn.key);
        if st.in_flight == 0 {
            signal_done(conn, &st);
        }
    }
}

/// The connection is over and its last request answered: its outcome goes
/// out when the connection is dropped (see [`DoneOnDrop`]).
fn signal_done(conn: &Conn, st: &ConnState) {
    let result = match &st.ended {
        Some(Err(e)) => Err(io::Error::new(e.kind(), e.to_string())),
        _ => Ok(()),
    };
    conn.done.outcome.lock().get_or_insert(result);
}

fn unique_of(req: &[u8]) -> Option<u64> {
    let b = req.get(8..16)?;
    let mut u = [0u8; 8];
    u.copy_from_slice(b);
    Some(u64::from_ne_bytes(u))
}

fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by epoll_create1 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add or re-arm (`EPOLL_CTL_ADD`/`MOD`) `fd` for one readiness event, or
/// remove it (`EPOLL_CTL_DEL`).
fn epoll_ctl(epoll: RawFd, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
        u64: key,
    };
    // SAFETY: ev is a valid epoll_event for the duration of the call; the
    // kernel copies it.
    let ret = unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_wait(epoll: RawFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    let max = events.len().min(i32::MAX as usize) as libc::c_int;
    // SAFETY: events is valid for `max` entries, which the kernel fills.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), max, -1) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Answer request `unique` with `error` (0 or a negative errno) and
/// `payload`, in one write as `/dev/fuse` requires.
fn write_reply(fd: RawFd, unique: u64, error: i32, payload: &[u8]) -> io::Result<()> {
    let header = fuse_abi::out_header(unique, error, payload.len());
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: both iovecs point at live buffers of the given lengths, which
    // the kernel only reads.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
