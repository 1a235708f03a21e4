//! Mounting, serving and unmounting the FUSE disk file.
//!
//! We mount with `mount(2)` ourselves and hand the `/dev/fuse` descriptor to
//! the process's shared worker pool ([`crate::fuse_pool`]): nothing unmounts
//! behind our back on drop, we choose the fstype (our own `fuse.den-block`,
//! which is how stale mounts from a crashed run are recognised), and we can
//! identify our mount by its mount id when tearing it down even if other
//! mounts got stacked on the same directory.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};
use parking_lot::Mutex;

use crate::BlockDevice;
use crate::error::{BlockError, Result};
use crate::fuse::{Counters, DiskFs, DiskFsConfig, FuseStats, Negotiated};
use crate::mountinfo::{self, MountEntry};
use crate::util::{errno, nix_to_io};

/// Filesystem type of our FUSE mounts as shown in `/proc/mounts`. Anything
/// with this type on a mount directory we are asked to use is a leftover of
/// ours and may be cleaned up.
pub const FUSE_FSTYPE: &str = "fuse.den-block";
const FUSE_SOURCE: &str = "den-block";

const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";

/// How long the workers may take to see the end of the connection before
/// we look for copies of the mount in other mount namespaces.
const FOREIGN_COPY_CHECK: Duration = Duration::from_millis(250);

/// Options for the FUSE half of an export.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Name of the disk file inside the mount directory.
    pub file_name: String,
    /// How many requests of this file the shared FUSE worker pool serves at
    /// once (capped below the pool size, so that one file whose device hangs
    /// cannot take every worker). The pool's size is set process-wide with
    /// [`crate::set_fuse_workers`].
    pub threads: usize,
    /// Largest WRITE we ask the kernel for. The kernel caps it at
    /// `fs.fuse.max_pages_limit` pages (1 MiB by default).
    pub max_write: u32,
    /// How many async requests (readahead, async direct I/O) the kernel may
    /// queue before throttling.
    pub max_background: u16,
    /// Refuse writes, discards and opens for writing.
    pub read_only: bool,
    /// Upper bound for unmounting (retrying while the file is briefly busy)
    /// and for the worker threads to finish, during shutdown.
    pub shutdown_timeout: Duration,
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self {
            file_name: "disk".to_string(),
            threads: 4,
            max_write: 1024 * 1024,
            max_background: 64,
            read_only: false,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl FuseOptions {
    fn validate(&self) -> Result<()> {
        let name = &self.file_name;
        if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
            return Err(BlockError::InvalidOption(format!(
                "file name {name:?} must be a single path component"
            )));
        }
        if !(1..=256).contains(&self.threads) {
            return Err(BlockError::InvalidOption(format!(
                "thread count {} must be between 1 and 256",
                self.threads
            )));
        }
        if self.max_write < 4096 {
            return Err(BlockError::InvalidOption(format!(
                "max_write {} is below one page",
                self.max_write
            )));
        }
        Ok(())
    }
}

/// A mounted FUSE filesystem serving one [`BlockDevice`] as a regular file.
///
/// Dropping it shuts it down (best effort); call [`FuseExport::shutdown`] to
/// see errors.
pub struct FuseExport {
    mount_dir: PathBuf,
    file_path: PathBuf,
    mount: MountEntry,
    /// Fires when the pool is done with the connection. In a mutex only so
    /// that `FuseExport` is `Sync` (the receiver is not); it is only ever
    /// touched through `&mut self`.
    session: Mutex<Option<mpsc::Receiver<io::Result<()>>>>,
    counters: Arc<Counters>,
    negotiated: Arc<OnceLock<Negotiated>>,
    shutdown_timeout: Duration,
    torn_down: bool,
}

impl std::fmt::Debug for FuseExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseExport")
            .field("file_path", &self.file_path)
            .field("mount_id", &self.mount.id)
            .finish_non_exhaustive()
    }
}

/// How to tear down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Teardown {
    /// Unmount properly, waiting a bounded time while the file is busy.
    Patient,
    /// Someone still uses the file: detach lazily, do not wait for workers.
    Deferred,
    /// The connection was aborted: nothing can be served any more, so detach
    /// lazily and wait for the workers, which exit right away.
    Aborted,
}

/// How our mount went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unmounted {
    /// Really gone: the FUSE connection ends and the workers exit.
    Clean,
    /// Detached from the namespace but still held open by someone; the
    /// connection lives until they let go.
    Lazy,
}

fn mount_dir_err(path: &Path) -> impl FnOnce(io::Error) -> BlockError + '_ {
    move |source| BlockError::MountDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Absolute, symlink-free path of the mount directory, computed without
/// touching the directory itself when it may be a dead FUSE mount (whose
/// `stat` fails with `ENOTCONN`): only the parent is canonicalised.
fn resolve_mount_dir(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(mount_dir_err(path))?.join(path)
    };
    let name = abs.file_name().ok_or_else(|| {
        BlockError::InvalidOption(format!(
            "mount directory {} must name a directory",
            path.display()
        ))
    })?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(mount_dir_err(path))?;
    let joined = parent.canonicalize().map_err(mount_dir_err(path))?.join(name);
    match std::fs::symlink_metadata(&joined) {
        Ok(meta) if meta.file_type().is_symlink() => joined.canonicalize().map_err(mount_dir_err(path)),
        _ => Ok(joined),
    }
}

fn umount(dir: &Path, flags: MntFlags) -> io::Result<()> {
    nix::mount::umount2(dir, flags).map_err(nix_to_io)
}

/// Remove leftovers of a previous run that died without shutting down: our
/// own FUSE mounts on `dir` (dead connections) and loop devices still bound to
/// the file in them. Foreign mounts are never touched.
fn cleanup_stale(dir: &Path, file: &Path) -> Result<()> {
    let stack = mountinfo::stack_at(&mountinfo::read()?, dir);
    if stack.is_empty() {
        return Ok(());
    }
    if let Some(foreign) = stack.iter().find(|m| m.fstype != FUSE_FSTYPE) {
        return Err(BlockError::MountDirInUse {
            path: dir.to_path_buf(),
            fstype: foreign.fstype.clone(),
        });
    }
    // While the stale mount is still attached, sysfs still reports the old
    // path for loop devices bound to the file, so look for them first.
    crate::loopdev::detach_stale(file);
    for m in stack.iter().rev() {
        tracing::warn!(dir = %dir.display(), mount_id = m.id, "removing stale FUSE mount");
        match umount(dir, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(BlockError::Unmount {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Make sure fusectl is mounted, so `/sys/fs/fuse/connections/<n>` exists.
fn ensure_fusectl() -> Result<()> {
    let mounted = mountinfo::read()?
        .iter()
        .any(|m| m.fstype == "fusectl" && m.mount_point == Path::new(FUSECTL_DIR));
    if !mounted {
        nix::mount::mount(
            Some("fusectl"),
            FUSECTL_DIR,
            Some("fusectl"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(nix_to_io)?;
    }
    Ok(())
}

/// Abort the FUSE connections of our mounts below `root`, left by a process
/// that is gone: call it only for a directory no live process serves (a
/// server's own run directory at its start-up). A den killed while one of its
/// threads waited on I/O through its own disk (a loop device on its own FUSE
/// file) can't exit: the thread waits for an answer only the dead workers
/// could give, and the connection stays open as long as the process exists.
/// Aborting fails that I/O, so the stuck task (and everything else touching
/// the mount) gets an error and can finish. Mounts of other types and other
/// directories are never touched. Returns how many connections were aborted.
pub fn abort_stale_connections(root: &Path) -> Result<usize> {
    let stale: Vec<MountEntry> = mountinfo::read()?
        .into_iter()
        .filter(|m| m.fstype == FUSE_FSTYPE && m.mount_point.starts_with(root))
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    ensure_fusectl()?;
    let mut n = 0;
    for m in stale {
        let conn = (m.major << 20) | m.minor;
        let abort = Path::new(FUSECTL_DIR).join(conn.to_string()).join("abort");
        // Gone already (the connection ended with its last user): fine.
        if std::fs::write(&abort, "1").is_ok() {
            tracing::warn!(mount = %m.mount_point.display(), connection = conn, "aborted a stale FUSE connection");
            n += 1;
        }
    }
    Ok(n)
}

impl FuseExport {
    /// Mount a FUSE filesystem on `mount_dir` (created if missing) exposing
    /// `device` as the file `opts.file_name`, and start serving it.
    ///
    /// Stale mounts of ours on `mount_dir` (left by a process that died) are
    /// removed first; a foreign mount there is an error.
    pub fn mount(device: Arc<dyn BlockDevice>, mount_dir: &Path, opts: &FuseOptions) -> Result<FuseExport> {
        opts.validate()?;
        let dir = resolve_mount_dir(mount_dir)?;
        let file_path = dir.join(&opts.file_name);
        cleanup_stale(&dir, &file_path)?;
        std::fs::create_dir_all(&dir).map_err(mount_dir_err(&dir))?;

        let mount_err = |source: io::Error| BlockError::Mount {
            path: dir.clone(),
            source,
        };
        // Non-blocking: the pool's workers read whatever request is there
        // and go back to the pool's epoll loop when there is none.
        let fuse_dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/fuse")
            .map_err(mount_err)?;
        let data = format!(
            "fd={},rootmode=40755,user_id={},group_id={}",
            fuse_dev.as_raw_fd(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        );
        nix::mount::mount(
            Some(FUSE_SOURCE),
            &dir,
            Some(FUSE_FSTYPE),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(data.as_str()),
        )
        .map_err(|e| mount_err(nix_to_io(e)))?;

        // From here on a mount exists; every failure path must remove it.
        let abandon = |err: BlockError| {
            let _ = umount(&dir, MntFlags::MNT_DETACH);
            err
        };
        let mount = mountinfo::read()
            .ok()
            .and_then(|all| mountinfo::stack_at(&all, &dir).pop())
            .filter(|m| m.fstype == FUSE_FSTYPE)
            .ok_or_else(|| {
                abandon(mount_err(io::Error::other(
                    "our mount does not show up in /proc/self/mountinfo",
                )))
            })?;

        let counters = Arc::new(Counters::default());
        let negotiated = Arc::new(OnceLock::new());
        let fs = DiskFs::new(
            device.clone(),
            DiskFsConfig {
                file_name: OsString::from(&opts.file_name),
                max_write: opts.max_write,
                max_background: opts.max_background,
                read_only: opts.read_only,
            },
            counters.clone(),
            negotiated.clone(),
        );
        let session_err = |source: io::Error| BlockError::Session {
            path: dir.clone(),
            source,
        };
        // The kernel queued FUSE_INIT during mount(2); the pool answers it.
        let registration = crate::fuse_pool::pool()
            .and_then(|pool| pool.register(OwnedFd::from(fuse_dev), fs, opts.threads))
            .map_err(|e| abandon(session_err(e)))?;

        let export = FuseExport {
            mount_dir: dir.clone(),
            file_path,
            mount,
            session: Mutex::new(Some(registration.done)),
            counters,
            negotiated,
            shutdown_timeout: opts.shutdown_timeout,
            torn_down: false,
        };
        // Round trip through the workers before handing the file out, so a
        // broken session fails here and not in the caller's first I/O.
        match std::fs::metadata(&export.file_path) {
            Ok(meta) if meta.len() == device.size() => {}
            Ok(meta) => {
                return Err(session_err(io::Error::other(format!(
                    "disk file reports {} bytes, device has {}",
                    meta.len(),
                    device.size()
                ))));
            }
            Err(e) => return Err(session_err(e)),
        }
        tracing::info!(
            file = %export.file_path.display(),
            size = device.size(),
            concurrency = opts.threads,
            "FUSE disk file served"
        );
        Ok(export)
    }

    /// The disk file.
    pub fn file_path(&self) -> &Path {
        &self.file_path
    }

    /// The (canonical) directory the FUSE filesystem is mounted on.
    pub fn mount_dir(&self) -> &Path {
        &self.mount_dir
    }

    /// Request counters.
    pub fn stats(&self) -> FuseStats {
        self.counters.snapshot()
    }

    /// Parameters agreed with the kernel (always set once `mount` returned).
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated.get().copied()
    }

    /// The FUSE connection number, as in `/sys/fs/fuse/connections/<n>`.
    pub fn connection(&self) -> u32 {
        (self.mount.major << 20) | self.mount.minor
    }

    /// Unmount and stop serving.
    ///
    /// Waits (bounded by `shutdown_timeout`) while the file is briefly busy.
    /// If it stays open (someone holds a descriptor) the mount is detached
    /// lazily and [`BlockError::Busy`] is returned: the workers keep serving
    /// the remaining user and exit when it closes the file.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown(Teardown::Patient)
    }

    /// Simulate the daemon dying: abort the FUSE connection, so every pending
    /// and future request on the file fails (`ENOTCONN`), then clean up.
    /// Nothing is flushed. Meant for crash tests.
    ///
    /// Needs fusectl; it is mounted on `/sys/fs/fuse/connections` if it is
    /// not already (as systemd does on most hosts).
    pub fn abort(mut self) -> Result<()> {
        let conn_dir = Path::new(FUSECTL_DIR).join(self.connection().to_string());
        if !conn_dir.exists() {
            ensure_fusectl()?;
        }
        std::fs::write(conn_dir.join("abort"), "1")?;
        tracing::warn!(file = %self.file_path.display(), "FUSE connection aborted");
        self.teardown(Teardown::Aborted)
    }

    /// Detach the mount now and let the workers run until the last user of
    /// the file (a loop device still in use) lets go. Never blocks.
    pub(crate) fn shutdown_deferred(mut self) {
        if let Err(e) = self.teardown(Teardown::Deferred) {
            match e {
                BlockError::Busy { .. } => {
                    tracing::info!(file = %self.file_path.display(), "FUSE teardown deferred until the disk file is closed")
                }
                e => tracing::warn!(file = %self.file_path.display(), error = %e, "deferred FUSE teardown"),
            }
        }
    }

    fn teardown(&mut self, how: Teardown) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let now = Instant::now();
        let unmount_deadline = now + self.shutdown_timeout / 2;
        let unmounted = match self.unmount(unmount_deadline, how != Teardown::Patient) {
            Ok(u) => u,
            Err(e) => {
                // Leave the session running: the mount (and its users) still
                // exist, and killing the server would fail their I/O.
                self.detach_session();
                return Err(e);
            }
        };
        let session_deadline = match (how, unmounted) {
            (Teardown::Deferred, _) => now,
            // Still held: the workers will not exit until the holder lets go.
            // Give a just-closed descriptor a moment, not the full timeout.
            (Teardown::Patient, Unmounted::Lazy) => Instant::now() + Duration::from_millis(200),
            // Clean unmount or aborted connection: the workers see ENODEV now.
            _ => now + self.shutdown_timeout,
        };
        self.join_session(session_deadline, unmounted)
    }

    /// Remove our mount, and any stale mounts of ours stacked on top of it.
    fn unmount(&self, deadline: Instant, lazy: bool) -> Result<Unmounted> {
        let dir = &self.mount_dir;
        let unmount_err = |source: io::Error| BlockError::Unmount {
            path: dir.clone(),
            source,
        };
        let mut outcome = Unmounted::Clean;
        let mut pause = Duration::from_millis(1);
        // Each pass either removes a mount, backs off on EBUSY, or returns;
        // the bound only guards against a mount table that keeps changing.
        for _ in 0..10_000 {
            let stack = mountinfo::stack_at(&mountinfo::read()?, dir);
            let ours = |m: &MountEntry| {
                m.id == self.mount.id && m.major == self.mount.major && m.minor == self.mount.minor
            };
            if !stack.iter().any(ours) {
                return Ok(outcome);
            }
            let Some(top) = stack.last() else {
                return Ok(outcome);
            };
            if !ours(top) {
                if top.fstype != FUSE_FSTYPE {
                    return Err(BlockError::MountShadowed {
                        path: dir.clone(),
                        fstype: top.fstype.clone(),
                    });
                }
                tracing::warn!(dir = %dir.display(), mount_id = top.id, "removing stale FUSE mount stacked on ours");
                match umount(dir, MntFlags::MNT_DETACH) {
                    Ok(()) => continue,
                    Err(e) if errno(&e) == Some(libc::EINVAL) => continue,
                    Err(e) => return Err(unmount_err(e)),
                }
            }
            if lazy {
                umount(dir, MntFlags::MNT_DETACH).map_err(unmount_err)?;
                outcome = Unmounted::Lazy;
                continue;
            }
            match umount(dir, MntFlags::empty()) {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::EBUSY) => {
                    // Typically the loop driver's release of the file is a
                    // moment behind its detach; otherwise someone holds it open.
                    let now = Instant::now();
                    if now >= deadline {
                        tracing::warn!(dir = %dir.display(), "disk file still open; detaching mount lazily");
                        umount(dir, MntFlags::MNT_DETACH).map_err(unmount_err)?;
                        outcome = Unmounted::Lazy;
                    } else {
                        thread::sleep(pause.min(deadline - now));
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                }
                // Raced with someone else unmounting it: re-read the table.
                Err(e) if errno(&e) == Some(libc::EINVAL) => {}
                Err(e) => return Err(unmount_err(e)),
            }
        }
        Err(BlockError::Timeout {
            what: format!("unmounting {}", dir.display()),
        })
    }

    fn join_session(&mut self, deadline: Instant, unmounted: Unmounted) -> Result<()> {
        let Some(session) = self.session.get_mut().take() else {
            return Ok(());
        };
        // The workers see ENODEV only once the last mount of the connection
        // is gone. A mount namespace cloned by another process while ours
        // was mounted holds a private copy that our unmount never reached:
        // detach those (they are ours by device number) while we wait.
        let waited = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match session.recv_timeout(left.min(FOREIGN_COPY_CHECK)) {
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {
                    if unmounted == Unmounted::Clean {
                        mountinfo::detach_foreign_copies(self.mount.major, self.mount.minor);
                    }
                }
                other => break other,
            }
        };
        let result = match waited {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(io::Error::other("FUSE pool dropped the connection"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The pool keeps serving the connection until it ends.
                return Err(match unmounted {
                    Unmounted::Lazy => BlockError::Busy {
                        path: self.file_path.clone(),
                    },
                    Unmounted::Clean => BlockError::Timeout {
                        what: format!("FUSE requests of {} to finish", self.file_path.display()),
                    },
                });
            }
        };
        tracing::info!(file = %self.file_path.display(), "FUSE disk file unmounted");
        result.map_err(|source| BlockError::Session {
            path: self.mount_dir.clone(),
            source,
        })
    }

    fn detach_session(&mut self) {
        self.session.get_mut().take();
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(e) = self.teardown(Teardown::Patient) {
            tracing::warn!(file = %self.file_path.display(), error = %e, "FUSE shutdown on drop");
        }
    }
}
