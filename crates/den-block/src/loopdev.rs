//! Loop devices: turning the FUSE-served disk file into `/dev/loopN`.
//!
//! We talk to the loop driver with raw ioctls instead of shelling out to
//! `losetup`, so we learn exactly which device we got, whether direct I/O was
//! accepted, and can detach precisely the binding we made.
//!
//! Direct I/O matters here: without it every block is cached twice, once in
//! the loop device's page cache (which ext4 sits on) and once in the page cache
//! of the backing file. The FUSE file is opened with `FOPEN_DIRECT_IO`, so the
//! second cache is already bypassed; `LO_FLAGS_DIRECT_IO` additionally lets the
//! loop driver submit asynchronous, unbuffered requests, which is faster.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{BlockError, Result};
use crate::util::{errno, poll_until};

const LOOP_CONTROL: &str = "/dev/loop-control";

// From <linux/loop.h>; the libc crate does not carry them.
const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
const LOOP_SET_BLOCK_SIZE: u32 = 0x4C09;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;

/// Another process may grab the free device between `LOOP_CTL_GET_FREE` and
/// `LOOP_CONFIGURE`; the kernel then says `EBUSY` and we simply ask again.
const ATTACH_ATTEMPTS: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The ioctls below hand these structs to the kernel by pointer; a layout slip
// would be memory corruption, so pin the sizes from the UAPI header.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }

    /// Only informational (what `losetup -l` prints); the kernel reports the real
    /// path via sysfs. Truncated to fit, always NUL-terminated.
    fn set_file_name(&mut self, path: &Path) {
        let bytes = path.as_os_str().as_bytes();
        let n = bytes.len().min(LO_NAME_SIZE - 1);
        self.lo_file_name[..n].copy_from_slice(&bytes[..n]);
    }

    fn identity(&self) -> (u64, u64) {
        (self.lo_device, self.lo_inode)
    }
}

/// Loop ioctls whose argument is passed by value (or ignored), so the kernel
/// never dereferences it. Keeping them in an enum means the by-value wrapper
/// cannot be called with a request that expects a pointer.
#[derive(Clone, Copy, Debug)]
enum ValueIoctl {
    CtlGetFree,
    SetFd,
    ClrFd,
    SetDirectIo,
    SetBlockSize,
}

impl ValueIoctl {
    fn request(self) -> u32 {
        match self {
            ValueIoctl::CtlGetFree => LOOP_CTL_GET_FREE,
            ValueIoctl::SetFd => LOOP_SET_FD,
            ValueIoctl::ClrFd => LOOP_CLR_FD,
            ValueIoctl::SetDirectIo => LOOP_SET_DIRECT_IO,
            ValueIoctl::SetBlockSize => LOOP_SET_BLOCK_SIZE,
        }
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn ioctl_value(fd: BorrowedFd<'_>, op: ValueIoctl, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: `fd` is borrowed, so it stays open for the duration of the call,
    // and every `ValueIoctl` request takes its argument by value: the kernel
    // reads no memory through `arg`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), op.request() as libc::Ioctl, arg) })
}

fn ioctl_configure(fd: BorrowedFd<'_>, config: &LoopConfig) -> io::Result<()> {
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `LoopConfig`
    // mirrors exactly (size asserted above); the reference outlives the call.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            LOOP_CONFIGURE as libc::Ioctl,
            config as *const LoopConfig,
        )
    })
    .map(drop)
}

fn ioctl_set_status(fd: BorrowedFd<'_>, info: &LoopInfo64) -> io::Result<()> {
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64`, mirrored by
    // `LoopInfo64` (size asserted above); the reference outlives the call.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            LOOP_SET_STATUS64 as libc::Ioctl,
            info as *const LoopInfo64,
        )
    })
    .map(drop)
}

fn ioctl_get_status(fd: BorrowedFd<'_>) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` into the
    // pointed-to memory, which is our own properly sized and aligned value.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            LOOP_GET_STATUS64 as libc::Ioctl,
            &mut info as *mut LoopInfo64,
        )
    })?;
    Ok(info)
}

/// How the loop driver reaches the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopMode {
    /// `LO_FLAGS_DIRECT_IO`: asynchronous, unbuffered I/O on the backing file.
    DirectIo,
    /// Plain `read_iter`/`write_iter` on the backing file. Still single-cached,
    /// because the FUSE file itself bypasses the page cache.
    Buffered,
}

impl fmt::Display for LoopMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoopMode::DirectIo => "direct-io",
            LoopMode::Buffered => "buffered",
        })
    }
}

/// Options for [`LoopDevice::attach`].
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Ask for direct I/O. If the kernel refuses we fall back to buffered and
    /// report it through [`LoopDevice::mode`].
    pub direct_io: bool,
    /// Logical block size of the loop device; 0 keeps the kernel default (512).
    /// 4096 makes every request page aligned all the way down to the
    /// [`BlockDevice`](crate::BlockDevice), so it never sees sub-4K writes.
    pub block_size: u32,
    /// Export read-only.
    pub read_only: bool,
    /// How long [`LoopDevice::detach`] waits for the kernel to finish releasing
    /// the device before reporting it busy.
    pub detach_timeout: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            direct_io: true,
            block_size: 4096,
            read_only: false,
            detach_timeout: Duration::from_secs(10),
        }
    }
}

impl LoopOptions {
    fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        if bs != 0 && (!bs.is_power_of_two() || !(512..=65536).contains(&bs)) {
            return Err(BlockError::InvalidOption(format!(
                "loop block size {bs} must be 0 or a power of two between 512 and 65536"
            )));
        }
        Ok(())
    }
}

/// What clearing a loop binding found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleared {
    Now,
    AlreadyGone,
    NotOurs,
}

/// A loop device bound to a file. Dropping it detaches (best effort).
#[derive(Debug)]
pub struct LoopDevice {
    index: u32,
    path: PathBuf,
    backing: PathBuf,
    mode: LoopMode,
    read_only: bool,
    /// `(lo_device, lo_inode)` of the binding we made, so a later detach can
    /// tell our binding from someone else's reuse of the same device number.
    identity: (u64, u64),
    detach_timeout: Duration,
    attached: bool,
}

fn node_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{index}"))
}

fn sys_dir(index: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{index}"))
}

/// The kernel creates `/sys/block/loopN/loop/` on bind and removes it when the
/// binding is really gone (after any deferred release), which makes it the one
/// observable signal that needs no open file descriptor (an open descriptor
/// would itself delay a deferred release).
fn is_bound(index: u32) -> bool {
    sys_dir(index).join("loop").exists()
}

/// Whether loop device `index` is bound to the file identified by `identity`
/// (to anything, when `None`).
fn bound_to(index: u32, identity: Option<(u64, u64)>) -> bool {
    let Some(identity) = identity else {
        return is_bound(index);
    };
    if !is_bound(index) {
        return false;
    }
    match open_node(&node_path(index), false, false) {
        Ok(dev) => match ioctl_get_status(dev.as_fd()) {
            Ok(info) => info.identity() == identity,
            Err(e) => errno(&e) != Some(libc::ENXIO),
        },
        // Refused while the kernel runs the release down: still ours until
        // sysfs says it is unbound.
        Err(_) => is_bound(index),
    }
}

/// devtmpfs normally creates the node; in a container with a static /dev it
/// may be missing, so create it from the numbers sysfs reports.
fn ensure_node(index: u32) -> io::Result<PathBuf> {
    let path = node_path(index);
    if path.exists() {
        return Ok(path);
    }
    let dev = std::fs::read_to_string(sys_dir(index).join("dev"))?;
    let (major, minor) = dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad dev {dev:?}")))?;
    match nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o660),
        libc::makedev(major, minor),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(path),
        Err(e) => Err(crate::util::nix_to_io(e)),
    }
}

fn open_node(path: &Path, write: bool, exclusive: bool) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if exclusive {
        flags |= libc::O_EXCL;
    }
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
}

impl LoopDevice {
    /// Bind a free loop device to `file`.
    ///
    /// `LO_FLAGS_AUTOCLEAR` is deliberately not set: the binding must survive
    /// short gaps with no opener (between `mkfs` and `mount`, say); we detach
    /// explicitly.
    pub fn attach(file: &Path, opts: &LoopOptions) -> Result<LoopDevice> {
        opts.validate()?;
        let attach_err = |device: &Path, source: io::Error| BlockError::LoopAttach {
            device: device.to_path_buf(),
            file: file.to_path_buf(),
            source,
        };
        let file_c = std::ffi::CString::new(file.as_os_str().as_bytes()).map_err(|_| {
            attach_err(
                Path::new(LOOP_CONTROL),
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(LOOP_CONTROL)
            .map_err(BlockError::LoopControl)?;

        let mut last_busy = None;
        for _ in 0..ATTACH_ATTEMPTS {
            let index = ioctl_value(control.as_fd(), ValueIoctl::CtlGetFree, 0)
                .map_err(BlockError::LoopControl)? as u32;
            let path = ensure_node(index).map_err(|e| attach_err(&node_path(index), e))?;
            let dev = open_node(&path, !opts.read_only, false).map_err(|e| attach_err(&path, e))?;
            match bind_in_child(dev.as_fd(), &file_c, file, opts) {
                Ok(()) => {}
                Err(BindError::Open(e)) => return Err(attach_err(Path::new(LOOP_CONTROL), e)),
                Err(BindError::Bind(e)) if errno(&e) == Some(libc::EBUSY) => {
                    tracing::debug!(device = %path.display(), "loop device taken concurrently, retrying");
                    last_busy = Some(e);
                    continue;
                }
                Err(BindError::Bind(e)) => return Err(attach_err(&path, e)),
            }
            let info = match ioctl_get_status(dev.as_fd()) {
                Ok(info) => info,
                Err(e) => {
                    // Do not leave a half-configured binding behind.
                    let _ = ioctl_value(dev.as_fd(), ValueIoctl::ClrFd, 0);
                    return Err(attach_err(&path, e));
                }
            };
            let mode = if info.lo_flags & LO_FLAGS_DIRECT_IO != 0 {
                LoopMode::DirectIo
            } else {
                // Refusal is not an error: buffered mode is correct, only slower.
                if opts.direct_io {
                    tracing::warn!(device = %path.display(), "loop driver refused direct I/O; using buffered I/O");
                }
                LoopMode::Buffered
            };
            tracing::info!(
                device = %path.display(),
                file = %file.display(),
                %mode,
                "loop device attached"
            );
            return Ok(LoopDevice {
                index,
                path,
                backing: file.to_path_buf(),
                mode,
                read_only: opts.read_only,
                identity: info.identity(),
                detach_timeout: opts.detach_timeout,
                attached: true,
            });
        }
        Err(attach_err(
            Path::new(LOOP_CONTROL),
            last_busy.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
        ))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `N` in `/dev/loopN`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The file the device is bound to.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// Whether direct I/O is active.
    pub fn mode(&self) -> LoopMode {
        self.mode
    }

    /// Whether the device was bound read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether something holds the device exclusively, which is what a mounted
    /// filesystem (or `mkfs`, `e2fsck`) does. Detaching then cannot complete
    /// until it lets go.
    pub fn is_busy(&self) -> bool {
        matches!(
            open_node(&self.path, false, true),
            Err(e) if errno(&e) == Some(libc::EBUSY)
        )
    }

    /// Unbind the device and wait until the kernel has released the backing file.
    ///
    /// If the device is still open elsewhere (e.g. a filesystem on it is still
    /// mounted) the kernel defers the release to the last close; we then return
    /// [`BlockError::Busy`] and the detach completes by itself later.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    /// Ask for the detach but do not wait for it. Used when we already know the
    /// device is busy and teardown is being deferred.
    pub(crate) fn detach_deferred(mut self) {
        self.attached = false;
        match clear(self.index, Some(self.identity), None) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(device = %self.path.display(), error = %e, "deferred loop detach failed")
            }
        }
    }

    fn detach_inner(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        // Held exclusively (a mounted filesystem): the release can only happen
        // on its last close, so arm it and say so instead of waiting in vain.
        let wait_until = if self.is_busy() {
            None
        } else {
            Some(Instant::now() + self.detach_timeout)
        };
        let result = match clear(self.index, Some(self.identity), wait_until) {
            Ok(Cleared::Now) if wait_until.is_none() => Err(BlockError::Busy {
                path: self.path.clone(),
            }),
            other => other,
        };
        // Busy still counts as detached from our side: the kernel finishes it.
        if matches!(result, Ok(_) | Err(BlockError::Busy { .. })) {
            self.attached = false;
        }
        match result? {
            Cleared::Now => tracing::info!(device = %self.path.display(), "loop device detached"),
            Cleared::AlreadyGone => {
                tracing::debug!(device = %self.path.display(), "loop device was already detached")
            }
            Cleared::NotOurs => tracing::warn!(
                device = %self.path.display(),
                "loop device was rebound by someone else; left alone"
            ),
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::warn!(device = %self.path.display(), error = %e, "detaching loop device on drop");
        }
    }
}

/// Why binding failed: opening the backing file, or the binding itself.
enum BindError {
    Open(io::Error),
    Bind(io::Error),
}

/// Bind `dev` to `file` (and switch on direct I/O if wanted) from a child
/// process ([`crate::in_child`]), never from a thread of ours.
///
/// Binding does I/O on the backing file: opening it, `statfs` for the discard
/// limits, an fsync when direct I/O is switched on. When `file` is a FUSE file
/// served by this very process (every den disk is), the kernel waits for our
/// own FUSE workers, uninterruptibly once a request is sent. Were we killed
/// (-9) meanwhile, a thread of ours stuck in that wait would keep the process,
/// its FUSE fd and so the connection that could fail the request alive
/// forever: a wedged server until the next start aborted the connection. The
/// child holds no FUSE fd (it closes every fd but the loop device's), so our
/// death closes the connection and the child's request fails; it exits.
fn bind_in_child(
    dev: BorrowedFd<'_>,
    file_c: &std::ffi::CStr,
    file: &Path,
    opts: &LoopOptions,
) -> std::result::Result<(), BindError> {
    const OPEN: i32 = 1;
    const BIND: i32 = 2;
    let mut config = LoopConfig {
        fd: 0,
        block_size: opts.block_size,
        info: LoopInfo64::zeroed(),
        reserved: [0; 8],
    };
    config.info.set_file_name(file);
    if opts.read_only {
        config.info.lo_flags |= LO_FLAGS_READ_ONLY;
    }
    if opts.direct_io {
        config.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    }
    let open_flags = libc::O_CLOEXEC
        | if opts.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
    let dev_fd = dev.as_raw_fd();
    // SAFETY: the body only makes raw system calls (open, ioctl) on an fd, a
    // C string and a struct made before the call; it allocates nothing.
    let res = unsafe {
        crate::in_child::run(&[dev_fd], || {
            let backing = libc::open(file_c.as_ptr(), open_flags);
            if backing < 0 {
                return Err((OPEN, crate::in_child::errno()));
            }
            let dev = BorrowedFd::borrow_raw(dev_fd);
            if let Err(e) = configure(dev, BorrowedFd::borrow_raw(backing), &mut config) {
                // The error configure returns, not errno: a fallback's cleanup
                // may have made another call since.
                return Err((BIND, e.raw_os_error().unwrap_or(libc::EIO)));
            }
            // Some kernels take LO_FLAGS_DIRECT_IO from LOOP_CONFIGURE only as
            // a wish; ask again. A refusal leaves buffered mode, which the
            // parent reports.
            if opts.direct_io
                && ioctl_get_status(dev).is_ok_and(|info| info.lo_flags & LO_FLAGS_DIRECT_IO == 0)
            {
                let _ = ioctl_value(dev, ValueIoctl::SetDirectIo, 1);
            }
            Ok(())
        })
    };
    res.map_err(|f| {
        if f.stage == OPEN {
            BindError::Open(f.error)
        } else {
            BindError::Bind(f.error)
        }
    })
}

/// LOOP_CONFIGURE with `config` (one atomic call), falling back to the
/// legacy ioctl sequence as the kernel requires. Runs in the child of
/// [`bind_in_child`]: no allocation, no logging.
fn configure(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>, config: &mut LoopConfig) -> io::Result<()> {
    config.fd = backing.as_raw_fd() as u32;
    match ioctl_configure(dev, config) {
        Ok(()) => Ok(()),
        // Some kernels reject the whole configure when direct I/O cannot be
        // used; a failed LOOP_CONFIGURE leaves the device unbound, so retry
        // without it (the parent reports the mode that took).
        Err(e) if errno(&e) == Some(libc::EINVAL) && config.info.lo_flags & LO_FLAGS_DIRECT_IO != 0 => {
            config.info.lo_flags &= !LO_FLAGS_DIRECT_IO;
            ioctl_configure(dev, config)
        }
        // Kernels before 5.8 have no LOOP_CONFIGURE.
        Err(e) if errno(&e) == Some(libc::ENOTTY) => bind_legacy(dev, backing, config),
        Err(e) => Err(e),
    }
}

fn bind_legacy(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>, config: &LoopConfig) -> io::Result<()> {
    ioctl_value(dev, ValueIoctl::SetFd, backing.as_raw_fd() as libc::c_ulong)?;
    let rest = (|| {
        let mut info = LoopInfo64::zeroed();
        info.lo_file_name = config.info.lo_file_name;
        ioctl_set_status(dev, &info)?;
        if config.block_size != 0 {
            ioctl_value(dev, ValueIoctl::SetBlockSize, config.block_size.into())?;
        }
        Ok(())
    })();
    if rest.is_err() {
        let _ = ioctl_value(dev, ValueIoctl::ClrFd, 0);
    }
    rest
}

/// Issue `LOOP_CLR_FD` on loop device `index` if it is still bound to the file
/// identified by `identity` (any binding when `None`), then optionally wait
/// until the kernel has actually released it.
fn clear(index: u32, identity: Option<(u64, u64)>, wait_until: Option<Instant>) -> Result<Cleared> {
    let path = node_path(index);
    let detach_err = |source: io::Error| BlockError::LoopDetach {
        device: path.clone(),
        source,
    };
    if !is_bound(index) {
        return Ok(Cleared::AlreadyGone);
    }
    let dev = match open_node(&path, false, false) {
        Ok(dev) => dev,
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ENXIO)) => return Ok(Cleared::AlreadyGone),
        Err(e) => return Err(detach_err(e)),
    };
    match ioctl_get_status(dev.as_fd()) {
        Ok(info) => {
            if identity.is_some_and(|id| id != info.identity()) {
                return Ok(Cleared::NotOurs);
            }
        }
        Err(e) if errno(&e) == Some(libc::ENXIO) => return Ok(Cleared::AlreadyGone),
        Err(e) => return Err(detach_err(e)),
    }
    match ioctl_value(dev.as_fd(), ValueIoctl::ClrFd, 0) {
        Ok(_) => {}
        Err(e) if errno(&e) == Some(libc::ENXIO) => return Ok(Cleared::AlreadyGone),
        // Kernels before 5.x refuse outright instead of deferring.
        Err(e) if errno(&e) == Some(libc::EBUSY) => return Err(BlockError::Busy { path }),
        Err(e) => return Err(detach_err(e)),
    }
    // Our own descriptor counts as an opener; the kernel releases the binding on
    // the last close, so close before waiting.
    drop(dev);
    let Some(deadline) = wait_until else {
        return Ok(Cleared::Now);
    };
    // Another process may bind the freed index the moment the kernel lets go
    // of ours; that binding is not ours to wait for.
    if poll_until(deadline, || !bound_to(index, identity)) {
        Ok(Cleared::Now)
    } else {
        Err(BlockError::Busy { path })
    }
}

/// Wait (up to `timeout`) until nothing holds block device `dev`
/// exclusively. After unmounting a filesystem from it, a mount namespace
/// cloned while it was mounted (a container starting anywhere on the host)
/// may keep it alive for a moment; stopping the export under it would find
/// the device busy. Returns whether it was released in time.
pub fn wait_unclaimed(dev: &Path, timeout: Duration) -> bool {
    poll_until(
        Instant::now() + timeout,
        || !matches!(open_node(dev, false, true), Err(e) if errno(&e) == Some(libc::EBUSY)),
    )
}

/// The file loop device `dev` (`/dev/loopN`) is bound to, as the kernel
/// names it (without its " (deleted)" suffix); `None` if it is unbound.
pub fn backing_file(dev: &Path) -> Option<PathBuf> {
    let index = dev
        .file_name()?
        .to_str()?
        .strip_prefix("loop")?
        .parse::<u32>()
        .ok()?;
    backing_of(index)
}

fn backing_of(index: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(sys_dir(index).join("loop/backing_file")).ok()?;
    let s = s.trim_end_matches('\n');
    Some(PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(s)))
}

/// Loop devices whose backing file (by the path the kernel reports) passes `pred`.
pub fn devices_backed(pred: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let index = entry
                .file_name()
                .to_str()?
                .strip_prefix("loop")?
                .parse::<u32>()
                .ok()?;
            backing_of(index).filter(|b| pred(b)).map(|_| node_path(index))
        })
        .collect()
}

/// Loop devices currently bound to `file` (by the path the kernel reports).
pub fn devices_backed_by(file: &Path) -> Vec<PathBuf> {
    devices_backed(|b| b == file)
}

/// Detach loop devices left bound to `file` by a previous run that crashed.
/// Best effort: a device that is still mounted only gets its release deferred.
pub(crate) fn detach_stale(file: &Path) {
    for dev in devices_backed_by(file) {
        let Some(index) = dev
            .to_str()
            .and_then(|p| p.strip_prefix("/dev/loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        tracing::warn!(device = %dev.display(), file = %file.display(), "detaching stale loop device");
        if let Err(e) = clear(index, None, None) {
            tracing::warn!(device = %dev.display(), error = %e, "could not detach stale loop device");
        }
    }
}
