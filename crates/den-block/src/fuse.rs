//! The FUSE filesystem: one directory holding one regular file whose bytes are
//! the [`BlockDevice`].
//!
//! The file is what the loop driver binds to. Everything here is shaped by that
//! consumer: the size never changes, `fsync` is the only durability barrier the
//! loop driver can express, and `fallocate(PUNCH_HOLE)` is how it forwards
//! discards. Handlers never panic: device errors (and device panics) become
//! errnos, because a FUSE request that never gets an answer hangs the loop
//! device and every filesystem on top of it.

use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::BlockDevice;

/// Inode of the disk file (the root directory is `INodeNo::ROOT`, 1).
pub(crate) const FILE_INO: INodeNo = INodeNo(2);

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

thread_local! {
    /// fuser spawns the worker threads itself, so per-thread setup happens on
    /// the first request each thread serves.
    static WORKER_READY: Cell<bool> = const { Cell::new(false) };
    /// Reused read buffer: avoids a large allocation per request in the
    /// middle of writeback.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
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
    /// Worker threads that have served at least one request.
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

/// Map an I/O error from the device to the errno the kernel passes on.
pub(crate) fn to_errno(err: &io::Error) -> Errno {
    if let Some(code) = err.raw_os_error().filter(|c| *c > 0) {
        return Errno::from_i32(code);
    }
    use io::ErrorKind as K;
    Errno::from_i32(match err.kind() {
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
    })
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

/// The parts of a SETATTR request we act on.
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

/// Settings [`DiskFs`] needs from the caller.
#[derive(Debug, Clone)]
pub(crate) struct DiskFsConfig {
    pub(crate) file_name: OsString,
    pub(crate) max_write: u32,
    pub(crate) max_background: u16,
    pub(crate) read_only: bool,
}

/// The `fuser` filesystem.
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

    fn enter_worker(&self) {
        WORKER_READY.with(|ready| {
            if ready.get() {
                return;
            }
            ready.set(true);
            self.counters.worker_threads.fetch_add(1, Ordering::Relaxed);
            match set_io_flusher() {
                Ok(()) => {
                    self.counters.io_flusher_threads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => {
                    if !IO_FLUSHER_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "PR_SET_IO_FLUSHER unavailable; FUSE workers may deadlock under memory pressure"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "PR_SET_IO_FLUSHER failed");
                }
            }
        });
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn file_attr(&self) -> FileAttr {
        let meta = *self.meta.lock();
        FileAttr {
            ino: FILE_INO,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: meta.atime,
            mtime: meta.mtime,
            ctime: meta.ctime,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: meta.perm,
            nlink: 1,
            uid: meta.uid,
            gid: meta.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
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
                Errno::EIO
            }
        };
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        Err(result)
    }

    fn fail(&self, errno: Errno) -> Errno {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        errno
    }

    fn do_read(&self, ino: INodeNo, offset: u64, size: u32, reply: ReplyData) {
        if ino != FILE_INO {
            return reply.error(self.fail(Errno::EISDIR));
        }
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters.largest_read.fetch_max(size, Ordering::Relaxed);
        // Direct I/O means the kernel does not clip reads at EOF for us.
        if offset >= self.size {
            return reply.data(&[]);
        }
        let len = (self.size - offset).min(u64::from(size)) as usize;
        READ_BUF.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else {
                // Cannot happen (handlers do not nest), but never panic here.
                return reply.error(self.fail(Errno::EIO));
            };
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match self.device_call("read", || self.device.read_at(offset, &mut buf[..len])) {
                Ok(()) => reply.data(&buf[..len]),
                Err(errno) => reply.error(errno),
            }
        });
    }

    fn do_write(&self, ino: INodeNo, offset: u64, data: &[u8], reply: ReplyWrite) {
        if ino != FILE_INO {
            return reply.error(self.fail(Errno::EISDIR));
        }
        if self.config.read_only {
            return reply.error(self.fail(Errno::from_i32(libc::EROFS)));
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .largest_write
            .fetch_max(data.len() as u32, Ordering::Relaxed);
        if data.is_empty() {
            return reply.written(0);
        }
        // A block device cannot grow: writing at or past the end is ENOSPC,
        // a write straddling the end is cut short, as on a real disk.
        if offset >= self.size {
            return reply.error(self.fail(Errno::from_i32(libc::ENOSPC)));
        }
        let len = (self.size - offset).min(data.len() as u64) as usize;
        match self.device_call("write", || self.device.write_at(offset, &data[..len])) {
            Ok(()) => reply.written(len as u32),
            Err(errno) => reply.error(errno),
        }
    }

    fn do_fallocate(&self, ino: INodeNo, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        if ino != FILE_INO {
            return Err(self.fail(Errno::EISDIR));
        }
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let known = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 {
            return Err(self.fail(Errno::from_i32(libc::EOPNOTSUPP)));
        }
        let end = offset
            .checked_add(length)
            .ok_or_else(|| self.fail(Errno::EINVAL))?;
        if !punch && !zero {
            // Plain preallocation: every byte of a block device already
            // exists, so only a request to grow the file is a problem.
            if end > self.size && !keep_size {
                return Err(self.fail(Errno::EPERM));
            }
            return Ok(());
        }
        if self.config.read_only {
            return Err(self.fail(Errno::from_i32(libc::EROFS)));
        }
        if zero && end > self.size && !keep_size {
            return Err(self.fail(Errno::EPERM));
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

    fn do_setattr(&self, ino: INodeNo, change: AttrChange) -> Result<FileAttr, Errno> {
        if ino == INodeNo::ROOT {
            return Ok(self.root_attr());
        }
        if ino != FILE_INO {
            return Err(self.fail(Errno::ENOENT));
        }
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        if size.is_some_and(|s| s != self.size) {
            // truncate/ftruncate/O_TRUNC would resize the disk under the loop
            // device (or wipe it); refuse.
            return Err(self.fail(Errno::EPERM));
        }
        let now = SystemTime::now();
        let resolve = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        let mut meta = self.meta.lock();
        if let Some(mode) = mode {
            meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            meta.uid = uid;
        }
        if let Some(gid) = gid {
            meta.gid = gid;
        }
        if let Some(t) = atime {
            meta.atime = resolve(t);
        }
        if let Some(t) = mtime {
            meta.mtime = resolve(t);
        }
        meta.ctime = now;
        drop(meta);
        Ok(self.file_attr())
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let max_write = match config.set_max_write(self.config.max_write) {
            Ok(_) => self.config.max_write,
            Err(nearest) => {
                let _ = config.set_max_write(nearest);
                nearest
            }
        };
        // With direct I/O there is no readahead, but the kernel still sizes
        // max_pages from max(max_write, max_readahead); take what it offers.
        let max_readahead = match config.set_max_readahead(u32::MAX) {
            Ok(_) => u32::MAX,
            Err(max) => {
                let _ = config.set_max_readahead(max);
                max
            }
        };
        // The loop driver in direct-I/O mode submits async kiocbs; with
        // ASYNC_DIO the kernel keeps several of our requests in flight for them.
        let async_dio = config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO)
            && config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_ok();
        let _ = config.set_max_background(self.config.max_background);
        let abi = config.kernel_abi();
        let negotiated = Negotiated {
            kernel_abi: (abi.0, abi.1),
            max_write,
            max_readahead,
            max_pages_limit: max_pages_limit(),
            async_dio,
        };
        tracing::debug!(?negotiated, "FUSE connection initialised");
        let _ = self.negotiated.set(negotiated);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.enter_worker();
        if parent == INodeNo::ROOT && name == self.config.file_name.as_os_str() {
            reply.entry(&ATTR_TTL, &self.file_attr(), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.enter_worker();
        match self.attr_of(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.enter_worker();
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.do_setattr(ino, change) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.enter_worker();
        if ino == INodeNo::ROOT {
            return reply.error(Errno::EISDIR);
        }
        if ino != FILE_INO {
            return reply.error(Errno::ENOENT);
        }
        if self.config.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        // DIRECT_IO: the loop device already has a page cache; caching the
        // same blocks again in the FUSE file's cache would double memory use
        // and add a copy. PARALLEL_DIRECT_WRITES: the file never grows, so the
        // kernel need not serialise writes on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.enter_worker();
        self.do_read(ino, offset, size, reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.enter_worker();
        self.do_write(ino, offset, data, reply);
    }

    /// FLUSH is sent on every close(); close carries no durability promise,
    /// and treating it as one would turn every `cat` into a device flush.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.enter_worker();
        reply.ok();
    }

    /// The loop driver turns REQ_PREFLUSH/REQ_FUA into `vfs_fsync` on the
    /// backing file, so this is where ext4's journal barriers arrive.
    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.enter_worker();
        if ino != FILE_INO {
            return reply.ok();
        }
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match self.device_call("flush", || self.device.flush()) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.enter_worker();
        match self.do_fallocate(ino, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.enter_worker();
        if ino == INodeNo::ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.enter_worker();
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.config.file_name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            // The offset handed back is "where to resume", i.e. the next index.
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.enter_worker();
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.enter_worker();
        // The disk file occupies the whole filesystem; nothing else fits.
        let blocks = self.size.div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.enter_worker();
        match self.attr_of(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    // The namespace is fixed: one directory, one file.

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }
}
