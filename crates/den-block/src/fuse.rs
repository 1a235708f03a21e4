//! The FUSE filesystem: one directory holding one regular file whose bytes are
//! the [`BlockDevice`].
//!
//! The file is what the loop driver binds to. Everything here is shaped by that
//! consumer: the size never changes, `fsync` is the only durability barrier the
//! loop driver can express, and `fallocate(PUNCH_HOLE)` is how it forwards
//! discards. Handlers never panic: device errors (and device panics) become
//! errnos, because a FUSE request that never gets an answer hangs the loop
//! device and every filesystem on top of it.

use std::ffi::OsString;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::BlockDevice;
use crate::fuse_abi::{self as abi, Attr, Cursor, InHeader, Malformed, ROOT_INO, opcode};

/// Inode of the disk file (the root directory is inode 1).
pub(crate) const FILE_INO: u64 = 2;

/// Attributes only change through our own `setattr`, which returns the new
/// values, so the kernel may cache them for as long as it likes.
const ATTR_TTL: Duration = Duration::from_secs(24 * 3600);

/// Reported as `st_blksize` and `f_bsize`. The loop driver uses `f_bsize` as
/// its discard granularity, so it must be a sensible block size, not 512.
const BLOCK_SIZE: u32 = 4096;

const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as an I/O flusher (`PR_SET_IO_FLUSHER`).
///
/// The FUSE workers sit *inside* the writeback path of the loop device: when
/// the kernel cleans dirty ext4 pages it sends them through the loop driver
/// to the FUSE file, and waits for these threads to answer. If one of these
/// threads then allocates memory while memory is tight, direct reclaim may try
/// to write back dirty pages, or throttle the thread until writeback makes
/// progress, which is writeback that only this thread can complete: a
/// deadlock. `PR_SET_IO_FLUSHER` sets `PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE`
/// on the thread, so its allocations never recurse into I/O and it is not
/// throttled on other devices' dirty pages. This is what userspace block
/// daemons (tcmu-runner, NBD servers, ublk servers) do. It needs
/// `CAP_SYS_RESOURCE`.
pub fn set_io_flusher() -> io::Result<()> {
    // prctl is variadic and the kernel reads full registers: pass every
    // argument as unsigned long, or the unused ones may carry garbage (EINVAL).
    let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_IO_FLUSHER takes plain integers (no pointers) and only
    // changes flags of the calling thread.
    let ret = unsafe { libc::prctl(PR_SET_IO_FLUSHER, on, unused, unused, unused) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Warn once per process, not once per worker thread.
static IO_FLUSHER_WARNED: AtomicBool = AtomicBool::new(false);

/// Make the calling pool worker an I/O flusher; whether it worked.
pub(crate) fn enter_worker() -> bool {
    match set_io_flusher() {
        Ok(()) => true,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => {
            if !IO_FLUSHER_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %e,
                    "PR_SET_IO_FLUSHER unavailable; FUSE workers may deadlock under memory pressure"
                );
            }
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "PR_SET_IO_FLUSHER failed");
            false
        }
    }
}

/// Counters of requests served; see [`FuseStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    fsyncs: AtomicU64,
    discards: AtomicU64,
    errors: AtomicU64,
    largest_read: AtomicU32,
    largest_write: AtomicU32,
    worker_threads: AtomicU32,
    io_flusher_threads: AtomicU32,
    /// Bit i set: pool worker i has served this volume (workers past 63
    /// are not told apart).
    workers_seen: AtomicU64,
}

/// What the FUSE server has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuseStats {
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// FSYNC requests (each one a [`BlockDevice::flush`]).
    pub fsyncs: u64,
    /// FALLOCATE requests turned into [`BlockDevice::discard`].
    pub discards: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Largest single READ, in bytes.
    pub largest_read: u32,
    /// Largest single WRITE, in bytes: the effective `max_write`, once the
    /// kernel has sent a big enough write.
    pub largest_write: u32,
    /// Pool worker threads that have served at least one request of this
    /// file (the pool is shared by every file of the process).
    pub worker_threads: u32,
    /// Of those, how many run with `PR_SET_IO_FLUSHER`.
    pub io_flusher_threads: u32,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> FuseStats {
        FuseStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            discards: self.discards.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            largest_read: self.largest_read.load(Ordering::Relaxed),
            largest_write: self.largest_write.load(Ordering::Relaxed),
            worker_threads: self.worker_threads.load(Ordering::Relaxed),
            io_flusher_threads: self.io_flusher_threads.load(Ordering::Relaxed),
        }
    }
}

/// Connection parameters agreed with the kernel in FUSE_INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Kernel FUSE ABI version (major, minor).
    pub kernel_abi: (u32, u32),
    /// `max_write` we answered with.
    pub max_write: u32,
    /// `max_readahead` we answered with.
    pub max_readahead: u32,
    /// `/proc/sys/fs/fuse/max_pages_limit`, which caps `max_write` further.
    pub max_pages_limit: Option<u32>,
    /// Whether asynchronous direct I/O (several requests in flight per
    /// `read_iter`/`write_iter`) is on.
    pub async_dio: bool,
}

impl Negotiated {
    /// The largest WRITE the kernel will actually send.
    pub fn effective_max_write(&self) -> u32 {
        let page = 4096u32;
        match self.max_pages_limit {
            Some(pages) => self.max_write.min(pages.saturating_mul(page)),
            None => self.max_write,
        }
    }
}

fn max_pages_limit() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A positive errno, as answered to the kernel (negated on the wire).
pub(crate) type Errno = i32;

/// Map an I/O error from the device to the errno the kernel passes on.
pub(crate) fn to_errno(err: &io::Error) -> Errno {
    if let Some(code) = err.raw_os_error().filter(|c| *c > 0) {
        return code;
    }
    use io::ErrorKind as K;
    match err.kind() {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::InvalidInput => libc::EINVAL,
        K::OutOfMemory => libc::ENOMEM,
        K::TimedOut => libc::ETIMEDOUT,
        K::Interrupted => libc::EINTR,
        K::WouldBlock => libc::EAGAIN,
        K::Unsupported => libc::EOPNOTSUPP,
        K::StorageFull => libc::ENOSPC,
        K::ReadOnlyFilesystem => libc::EROFS,
        _ => libc::EIO,
    }
}

/// Seconds and nanoseconds since the epoch, as `struct fuse_attr` has them.
fn wire_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

fn from_wire_time((secs, nanos): (i64, u32)) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// Mutable metadata of the disk file. Size is not here: it never changes.
#[derive(Debug, Clone, Copy)]
struct FileMeta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

/// Settings [`DiskFs`] needs from the caller.
#[derive(Debug, Clone)]
pub(crate) struct DiskFsConfig {
    pub(crate) file_name: OsString,
    pub(crate) max_write: u32,
    pub(crate) max_background: u16,
    pub(crate) read_only: bool,
}

/// How a request is answered; see [`DiskFs::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// FORGET and INTERRUPT: the kernel expects no reply.
    Nothing,
    Error(Errno),
    /// The payload is in the `out` buffer given to `serve`.
    Payload,
    /// The payload is the first n bytes of the request buffer (READ).
    Data(usize),
}

/// The pool worker serving a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) io_flusher: bool,
}

/// The filesystem of one volume: one directory, one file.
pub(crate) struct DiskFs {
    device: Arc<dyn BlockDevice>,
    size: u64,
    config: DiskFsConfig,
    meta: Mutex<FileMeta>,
    created: SystemTime,
    uid: u32,
    gid: u32,
    counters: Arc<Counters>,
    negotiated: Arc<OnceLock<Negotiated>>,
}

const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;
const DT_DIR: u32 = 4;
const DT_REG: u32 = 8;

impl DiskFs {
    pub(crate) fn new(
        device: Arc<dyn BlockDevice>,
        config: DiskFsConfig,
        counters: Arc<Counters>,
        negotiated: Arc<OnceLock<Negotiated>>,
    ) -> Self {
        let now = SystemTime::now();
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        // Captured once: the loop device would not notice a size change
        // anyway, and a stable size keeps every bounds check consistent.
        let size = device.size();
        Self {
            device,
            size,
            meta: Mutex::new(FileMeta {
                perm: if config.read_only { 0o400 } else { 0o600 },
                uid,
                gid,
                atime: now,
                mtime: now,
                ctime: now,
            }),
            config,
            created: now,
            uid,
            gid,
            counters,
            negotiated,
        }
    }

    /// The largest request the kernel may send us (a WRITE of `max_write`
    /// bytes with its headers), rounded up to a page.
    pub(crate) fn request_buffer_len(&self) -> usize {
        self.config.max_write as usize + 4096
    }

    fn note_worker(&self, worker: Worker) {
        let bit = 1u64 << worker.index.min(63);
        if self.counters.workers_seen.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.counters.worker_threads.fetch_add(1, Ordering::Relaxed);
            if worker.io_flusher {
                self.counters.io_flusher_threads.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn root_attr(&self) -> Attr {
        let t = wire_time(self.created);
        Attr {
            ino: ROOT_INO,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            mode: S_IFDIR | 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            blksize: BLOCK_SIZE,
        }
    }

    fn file_attr(&self) -> Attr {
        let meta = *self.meta.lock();
        Attr {
            ino: FILE_INO,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: wire_time(meta.atime),
            mtime: wire_time(meta.mtime),
            ctime: wire_time(meta.ctime),
            mode: S_IFREG | u32::from(meta.perm),
            nlink: 1,
            uid: meta.uid,
            gid: meta.gid,
            blksize: BLOCK_SIZE,
        }
    }

    fn attr_of(&self, ino: u64) -> Option<Attr> {
        if ino == ROOT_INO {
            Some(self.root_attr())
        } else if ino == FILE_INO {
            Some(self.file_attr())
        } else {
            None
        }
    }

    /// Run a device call, turning errors and panics into an errno.
    fn device_call<T>(&self, what: &'static str, f: impl FnOnce() -> io::Result<T>) -> Result<T, Errno> {
        let result = match panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                tracing::warn!(op = what, error = %e, "block device error");
                to_errno(&e)
            }
            Err(_) => {
                tracing::error!(op = what, "block device panicked; answering EIO");
                libc::EIO
            }
        };
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Err(result)
    }

    fn fail(&self, errno: Errno) -> Errno {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        errno
    }

    /// Serve one request: `buf[..n]` is what the kernel wrote. Small replies
    /// are encoded into `out`; READ data goes into `buf` itself (grown if a
    /// read is larger than it), so no request needs a buffer of its own.
    /// Returns the request's `unique` (None if even that is unreadable).
    pub(crate) fn serve(
        &self,
        worker: Worker,
        buf: &mut Vec<u8>,
        n: usize,
        out: &mut Vec<u8>,
    ) -> Option<(u64, Answer)> {
        self.note_worker(worker);
        let req = buf.get(..n)?;
        let (header, arg) = match InHeader::parse(req) {
            Ok(parsed) => parsed,
            Err(Malformed) => {
                // The unique id is the third field; answer EIO if we can.
                let unique = req.get(8..16)?;
                let mut u = [0u8; 8];
                u.copy_from_slice(unique);
                tracing::warn!(len = n, "malformed FUSE request header");
                return Some((u64::from_ne_bytes(u), Answer::Error(self.fail(libc::EIO))));
            }
        };
        let unique = header.unique;
        if header.opcode == opcode::READ {
            let answer = match abi::ReadIn::parse(arg) {
                Ok(r) => self.do_read(header.nodeid, r.offset, r.size, buf),
                Err(Malformed) => Answer::Error(self.fail(libc::EINVAL)),
            };
            return Some((unique, answer));
        }
        out.clear();
        let answer = match self.dispatch(header, arg, out) {
            Ok(answer) => answer,
            Err(Malformed) => {
                tracing::warn!(opcode = header.opcode, len = header.len, "malformed FUSE request");
                Answer::Error(self.fail(libc::EINVAL))
            }
        };
        Some((unique, answer))
    }

    fn dispatch(&self, h: InHeader, arg: &[u8], out: &mut Vec<u8>) -> Result<Answer, Malformed> {
        let ino = h.nodeid;
        let result: Result<(), Errno> = match h.opcode {
            opcode::INIT => {
                let init = abi::InitIn::parse(arg)?;
                self.init(init).map(|o| o.encode(out))
            }
            opcode::LOOKUP => {
                let name = Cursor::new(arg).c_str()?;
                if ino == ROOT_INO && name == self.config.file_name.as_encoded_bytes() {
                    abi::encode_entry(out, &self.file_attr(), ATTR_TTL);
                    Ok(())
                } else {
                    Err(libc::ENOENT)
                }
            }
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT => return Ok(Answer::Nothing),
            opcode::GETATTR | opcode::SETATTR if self.attr_of(ino).is_none() => Err(libc::ENOENT),
            opcode::GETATTR => {
                abi::encode_attr(out, &self.attr_of(ino).unwrap_or_default(), ATTR_TTL);
                Ok(())
            }
            opcode::SETATTR => {
                let change = abi::SetattrIn::parse(arg)?;
                self.do_setattr(ino, change)
                    .map(|attr| abi::encode_attr(out, &attr, ATTR_TTL))
            }
            opcode::OPEN => self
                .do_open(ino, abi::parse_open_flags(arg)?)
                .map(|flags| abi::encode_open(out, 0, flags)),
            opcode::WRITE => {
                let w = abi::WriteIn::parse(arg)?;
                self.do_write(ino, w.offset, w.data)
                    .map(|written| abi::encode_written(out, written))
            }
            opcode::STATFS => {
                // The disk file occupies the whole filesystem; nothing else fits.
                let blocks = self.size.div_ceil(u64::from(BLOCK_SIZE));
                abi::encode_statfs(out, blocks, 2, BLOCK_SIZE, 255);
                Ok(())
            }
            // FLUSH is sent on every close(); close carries no durability
            // promise, and treating it as one would turn every `cat` into a
            // device flush.
            opcode::FLUSH | opcode::RELEASE | opcode::RELEASEDIR | opcode::FSYNCDIR | opcode::DESTROY => {
                Ok(())
            }
            // The loop driver turns REQ_PREFLUSH/REQ_FUA into `vfs_fsync` on
            // the backing file, so this is where ext4's journal barriers arrive.
            opcode::FSYNC if ino != FILE_INO => Ok(()),
            opcode::FSYNC => {
                self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.device_call("flush", || self.device.flush())
            }
            opcode::FALLOCATE => {
                let f = abi::FallocateIn::parse(arg)?;
                self.do_fallocate(ino, f.offset, f.length, f.mode)
            }
            opcode::OPENDIR if ino == ROOT_INO => {
                abi::encode_open(out, 0, 0);
                Ok(())
            }
            opcode::OPENDIR => Err(libc::ENOTDIR),
            opcode::READDIR => {
                let r = abi::ReadIn::parse(arg)?;
                self.do_readdir(ino, r.offset, r.size, out)
            }
            opcode::ACCESS => self.attr_of(ino).map(|_| ()).ok_or(libc::ENOENT),
            // The namespace is fixed: one directory, one file.
            opcode::MKNOD
            | opcode::MKDIR
            | opcode::UNLINK
            | opcode::RMDIR
            | opcode::RENAME
            | opcode::RENAME2
            | opcode::LINK
            | opcode::SYMLINK
            | opcode::CREATE => Err(libc::EPERM),
            // xattrs, locks, ioctl, lseek, ...: the kernel falls back to its
            // defaults (and stops asking) on ENOSYS.
            _ => Err(libc::ENOSYS),
        };
        Ok(match result {
            Ok(()) => Answer::Payload,
            Err(errno) => Answer::Error(errno),
        })
    }

    fn init(&self, init: abi::InitIn) -> Result<abi::InitOut, Errno> {
        use abi::init_flags as f;
        if init.major != abi::KERNEL_VERSION || init.minor < 23 {
            tracing::error!(
                major = init.major,
                minor = init.minor,
                "unsupported FUSE kernel ABI"
            );
            return Err(libc::EPROTO);
        }
        let max_write = self.config.max_write;
        // With direct I/O there is no readahead, but the kernel still sizes
        // max_pages from max(max_write, max_readahead); take what it offers.
        let max_readahead = init.max_readahead;
        // The loop driver in direct-I/O mode submits async kiocbs; with
        // ASYNC_DIO the kernel keeps several of our requests in flight for them.
        let wanted = f::ASYNC_READ | f::BIG_WRITES | f::MAX_PAGES | f::ASYNC_DIO;
        let flags = wanted & init.flags;
        let async_dio = flags & f::ASYNC_DIO != 0;
        let max_pages =
            ((max_write.max(max_readahead).max(1) - 1) / 4096 + 1).min(u32::from(u16::MAX)) as u16;
        let negotiated = Negotiated {
            kernel_abi: (init.major, init.minor),
            max_write,
            max_readahead,
            max_pages_limit: max_pages_limit(),
            async_dio,
        };
        tracing::debug!(?negotiated, "FUSE connection initialised");
        let _ = self.negotiated.set(negotiated);
        let max_background = self.config.max_background;
        Ok(abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION.min(init.minor),
            max_readahead,
            flags,
            max_background,
            congestion_threshold: (u32::from(max_background) * 3 / 4) as u16,
            max_write,
            time_gran: 1,
            max_pages,
        })
    }

    fn do_open(&self, ino: u64, flags: u32) -> Result<u32, Errno> {
        if ino == ROOT_INO {
            return Err(libc::EISDIR);
        }
        if ino != FILE_INO {
            return Err(libc::ENOENT);
        }
        if self.config.read_only && flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(libc::EROFS);
        }
        // DIRECT_IO: the loop device already has a page cache; caching the
        // same blocks again in the FUSE file's cache would double memory use
        // and add a copy. PARALLEL_DIRECT_WRITES: the file never grows, so the
        // kernel need not serialise writes on the inode lock.
        Ok(abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES)
    }

    fn do_read(&self, ino: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Answer {
        if ino != FILE_INO {
            return Answer::Error(self.fail(libc::EISDIR));
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.largest_read.fetch_max(size, Ordering::Relaxed);
        // Direct I/O means the kernel does not clip reads at EOF for us.
        if offset >= self.size {
            return Answer::Data(0);
        }
        let len = (self.size - offset).min(u64::from(size)) as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        match self.device_call("read", || self.device.read_at(offset, &mut buf[..len])) {
            Ok(()) => Answer::Data(len),
            Err(errno) => Answer::Error(errno),
        }
    }

    fn do_write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if ino != FILE_INO {
            return Err(self.fail(libc::EISDIR));
        }
        if self.config.read_only {
            return Err(self.fail(libc::EROFS));
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .largest_write
            .fetch_max(data.len() as u32, Ordering::Relaxed);
        if data.is_empty() {
            return Ok(0);
        }
        // A block device cannot grow: writing at or past the end is ENOSPC,
        // a write straddling the end is cut short, as on a real disk.
        if offset >= self.size {
            return Err(self.fail(libc::ENOSPC));
        }
        let len = (self.size - offset).min(data.len() as u64) as usize;
        self.device_call("write", || self.device.write_at(offset, &data[..len]))?;
        Ok(len as u32)
    }

    fn do_fallocate(&self, ino: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if ino != FILE_INO {
            return Err(self.fail(libc::EISDIR));
        }
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let known = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 {
            return Err(self.fail(libc::EOPNOTSUPP));
        }
        let end = offset
            .checked_add(length)
            .ok_or_else(|| self.fail(libc::EINVAL))?;
        if !punch && !zero {
            // Plain preallocation: every byte of a block device already
            // exists, so only a request to grow the file is a problem.
            if end > self.size && !keep_size {
                return Err(self.fail(libc::EPERM));
            }
            return Ok(());
        }
        if self.config.read_only {
            return Err(self.fail(libc::EROFS));
        }
        if zero && end > self.size && !keep_size {
            return Err(self.fail(libc::EPERM));
        }
        // PUNCH_HOLE (the loop driver's DISCARD) and ZERO_RANGE (its
        // WRITE_ZEROES) both mean "reads return zeros afterwards", which is
        // exactly the discard contract. Clip to the device like a disk would.
        if offset >= self.size {
            return Ok(());
        }
        let len = end.min(self.size) - offset;
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        self.device_call("discard", || self.device.discard(offset, len))
    }

    fn do_setattr(&self, ino: u64, change: abi::SetattrIn) -> Result<Attr, Errno> {
        use abi::fattr;
        if ino == ROOT_INO {
            return Ok(self.root_attr());
        }
        if ino != FILE_INO {
            return Err(self.fail(libc::ENOENT));
        }
        let valid = change.valid;
        if valid & fattr::SIZE != 0 && change.size != self.size {
            // truncate/ftruncate/O_TRUNC would resize the disk under the loop
            // device (or wipe it); refuse.
            return Err(self.fail(libc::EPERM));
        }
        let now = SystemTime::now();
        let mut meta = self.meta.lock();
        if valid & fattr::MODE != 0 {
            meta.perm = (change.mode & 0o7777) as u16;
        }
        if valid & fattr::UID != 0 {
            meta.uid = change.uid;
        }
        if valid & fattr::GID != 0 {
            meta.gid = change.gid;
        }
        if valid & fattr::ATIME != 0 {
            meta.atime = if valid & fattr::ATIME_NOW != 0 {
                now
            } else {
                from_wire_time(change.atime)
            };
        }
        if valid & fattr::MTIME != 0 {
            meta.mtime = if valid & fattr::MTIME_NOW != 0 {
                now
            } else {
                from_wire_time(change.mtime)
            };
        }
        meta.ctime = now;
        drop(meta);
        Ok(self.file_attr())
    }

    fn do_readdir(&self, ino: u64, offset: u64, size: u32, out: &mut Vec<u8>) -> Result<(), Errno> {
        if ino != ROOT_INO {
            return Err(libc::ENOTDIR);
        }
        let entries: [(u64, u32, &[u8]); 3] = [
            (ROOT_INO, DT_DIR, b"."),
            (ROOT_INO, DT_DIR, b".."),
            (FILE_INO, DT_REG, self.config.file_name.as_encoded_bytes()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.min(3) as usize) {
            // The offset handed back is "where to resume", i.e. the next index.
            if !abi::push_dirent(out, size as usize, *ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_time_round_trips_before_and_after_the_epoch() {
        for t in [
            UNIX_EPOCH + Duration::new(1_700_000_000, 123),
            UNIX_EPOCH - Duration::new(5, 250),
            UNIX_EPOCH - Duration::from_secs(7),
        ] {
            assert_eq!(from_wire_time(wire_time(t)), t);
        }
    }
}
