//! A sprite's disk on the host: its den volume served as a block device
//! (FUSE file + loop device) with the ext4 filesystem mounted.
//!
//! ```text
//! <run>/fuse/disk.img   FUSE file backed by the volume
//! /dev/loopN            loop device on it (direct I/O: no second page cache)
//! <run>/disk/           ext4, holding upper/ and work/ of the sprite's overlay
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use den_block::{ExportOptions, FuseLoopFrontend, VolumeDevice};
use den_store::Volume;

use crate::error::{Result, SpriteError};

/// Generic mount flags of a sprite's ext4: `noatime`.
const MOUNT_FLAGS: libc::c_ulong = libc::MS_NOATIME;
/// ext4's own mount options. The template's inode tables and journal were
/// never written (they read as zeros from a sparse volume), so the kernel's
/// lazy initialisation would only write zeros over zeros, chunk by chunk, in
/// every sprite. `noinit_itable` turns that off. `discard`: blocks a guest
/// frees (an `rm` in the sprite) reach the volume as a punch-hole, whose
/// whole chunks are unmapped and then freed by the store's GC; without it
/// a sprite's disk usage only ever grows.
const MOUNT_DATA: &str = "noinit_itable,discard";

/// Upper and work directory names on the sprite's ext4.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";

pub struct Disk {
    export: Option<den_block::Export>,
    mountpoint: PathBuf,
    volume: Volume,
}

/// `mount -t ext4 -o noatime,noinit_itable,discard dev mountpoint`, from a
/// child process (see [`den_block::in_child`]: never from a thread of ours).
fn mount_ext4(dev: &Path, mountpoint: &Path) -> Result<()> {
    den_block::in_child::mount(dev, mountpoint, "ext4", MOUNT_FLAGS, MOUNT_DATA)
        .map_err(|e| SpriteError::io("mounting the sprite's disk", e))
}

/// `umount` (or `umount -l` when `lazy`), from a child process.
fn umount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    den_block::in_child::umount(mountpoint, flags)
        .map_err(|e| SpriteError::io("unmounting the sprite's disk", e))
}

pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| SpriteError::io(format!("running {cmd:?}"), e))?;
    if !out.status.success() {
        return Err(SpriteError::io(
            format!("{cmd:?}"),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Disk {
    /// Export `volume` and mount its ext4 on `mountpoint` (blocking).
    pub fn mount(volume: Volume, fuse_dir: &Path, mountpoint: &Path) -> Result<Disk> {
        let device: Arc<dyn den_block::BlockDevice> = Arc::new(VolumeDevice(volume.clone()));
        let export = FuseLoopFrontend::export(device, fuse_dir, &ExportOptions::default())?;
        let mut disk = Disk {
            export: Some(export),
            mountpoint: mountpoint.to_path_buf(),
            volume,
        };
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| SpriteError::io("creating the disk mountpoint", e))?;
        let dev = disk.device().to_path_buf();
        mount_ext4(&dev, mountpoint).inspect_err(|_| disk.release_export())?;
        Ok(disk)
    }

    pub fn device(&self) -> &Path {
        self.export
            .as_ref()
            .map(|e| e.device_path())
            .unwrap_or(Path::new(""))
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    pub fn upper(&self) -> PathBuf {
        self.mountpoint.join(UPPER)
    }

    pub fn work(&self) -> PathBuf {
        self.mountpoint.join(WORK)
    }

    /// Unmount the filesystem and stop the export (blocking). Everything the
    /// filesystem wrote is in the volume's local cache when this returns.
    pub fn unmount(mut self) -> Result<()> {
        let res = umount(&self.mountpoint, false);
        if res.is_ok() {
            // The sprite's mount namespace held its own reference to the
            // filesystem; the kernel drops it shortly after the last task
            // exits. Wait for that, so the export stops now and the volume is
            // free for a restore or the next boot.
            wait_released(self.device());
        } else {
            // Something in the host still uses it (a shell cd'ed into the run
            // directory): detach lazily so the sprite can still go cold; the
            // kernel finishes the unmount when the last user leaves.
            let _ = umount(&self.mountpoint, true);
        }
        self.release_export();
        res
    }

    fn release_export(&mut self) {
        if let Some(e) = self.export.take()
            && let Err(e) = e.shutdown()
        {
            tracing::warn!(error = %e, "stopping the block export");
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.export.is_some() {
            let _ = umount(&self.mountpoint, true);
            self.release_export();
        }
    }
}

/// Generous: on a loaded host the dying namespace can take seconds, and booting
/// again before the old filesystem let go is refused by the export (two ext4
/// instances on one volume would corrupt it).
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the kernel may take to drop the sprite's own mount namespace
/// before we look for other namespaces holding a copy of the filesystem.
const FOREIGN_COPY_CHECK: std::time::Duration = std::time::Duration::from_millis(300);

/// Wait until nothing holds loop device `dev` after its filesystem was
/// unmounted here. Another process on the host that cloned its mount
/// namespace while the filesystem was mounted (and made its copy private, as
/// `unshare -m` does) would hold it for as long as it lives, making the
/// sprite's delete fail as "in use" and its shutdown leak the device: such
/// copies of our own device are detached in their namespaces. Returns
/// whether the device was released within [`RELEASE_TIMEOUT`].
fn wait_released(dev: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let deadline = std::time::Instant::now() + RELEASE_TIMEOUT;
    let rdev = std::fs::metadata(dev).map(|m| m.rdev()).ok();
    loop {
        if den_block::loopdev::wait_unclaimed(dev, FOREIGN_COPY_CHECK) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        if let Some(rdev) = rdev {
            let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            den_block::mountinfo::detach_foreign_copies(major as u32, minor as u32);
        }
    }
}

/// `syncfs(2)` on the filesystem holding `path`. On a sprite's disk: everything
/// written so far reaches the volume and the journal is committed, so a volume
/// checkpoint taken while the sprite's processes are frozen is a clean
/// filesystem image.
///
/// Runs in a child process ([`den_block::in_child`]), never on a thread of ours: the
/// filesystem sits on a loop device on our own FUSE file, and if we are
/// killed (-9) while the sync waits for that I/O (an object store outage
/// blocks writers at the dirty limit), a thread of ours stuck in
/// uninterruptible sleep would keep the process, and so the FUSE connection
/// that could fail the I/O, alive forever. A child stuck there instead gets
/// an error as soon as we are gone, and exits.
pub fn syncfs(path: &Path) -> Result<()> {
    den_block::in_child::syncfs(path).map_err(|e| SpriteError::io("syncing the sprite's disk", e))
}

/// Format a fresh volume as the template every sprite's disk is forked from:
/// ext4 with empty `upper/` and `work/` directories owned by the sprite's
/// root (`root_uid`/`root_gid` on the host).
///
/// Inode tables and the journal are left to read as zeros (`lazy_*_init`):
/// on a sparse volume that costs nothing and keeps the template to a few
/// MiB of metadata whatever the disk size.
pub fn format_template(
    volume: Volume,
    fuse_dir: &Path,
    mountpoint: &Path,
    root_uid: u32,
    root_gid: u32,
) -> Result<()> {
    let device: Arc<dyn den_block::BlockDevice> = Arc::new(VolumeDevice(volume.clone()));
    let export = FuseLoopFrontend::export(device, fuse_dir, &ExportOptions::default())?;
    let res = (|| {
        run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "1",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                "-L",
                "sprite",
            ])
            .arg(export.device_path()))?;
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| SpriteError::io("creating the template mountpoint", e))?;
        mount_ext4(export.device_path(), mountpoint)?;
        // In a child process, like every I/O through a filesystem on our own
        // FUSE file (see `syncfs`). The root of the merged filesystem shows
        // the upper dir's mode.
        let res = run(Command::new("install")
            .args([
                "-d",
                "-m",
                "0755",
                "-o",
                &root_uid.to_string(),
                "-g",
                &root_gid.to_string(),
            ])
            .arg(mountpoint.join(UPPER))
            .arg(mountpoint.join(WORK)))
        .and_then(|_| syncfs(mountpoint));
        let umount = umount(mountpoint, false);
        if umount.is_ok() {
            // A mount namespace cloned meanwhile (any container starting on
            // this host, den's or another process's) holds its own reference
            // until it pivots away; stopping the export under it would fail
            // as busy and let its last superblock write land after the
            // template is sealed.
            wait_released(export.device_path());
        }
        res.and(umount)
    })();
    let shut = export.shutdown().map_err(SpriteError::from);
    res.and(shut)?;
    volume.fsync().map_err(|e| SpriteError::io("fsync template", e))?;
    Ok(())
}

/// Make `run_dir` a mount point (a bind of itself) with shared propagation,
/// so every mount den makes below it (sprite disks, their FUSE files, image
/// views) is shared too.
///
/// Any process on the host that clones its mount namespace gets a copy of
/// our mounts. With the host's usual private propagation, such a copy was
/// private and our unmount never reached it: the copy kept the sprite's
/// filesystem, loop device and volume busy for as long as that process
/// lived (a delete took 70 s and failed "in use"; a stop leaked devices).
/// A copy of a shared mount is a peer (or a slave, as container runtimes
/// make it), so our unmount reaches it. Copies made private on purpose are
/// detached by [`Disk::unmount`] instead.
pub fn share_run_dir(run_dir: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    let dir = run_dir
        .canonicalize()
        .map_err(|e| SpriteError::io(format!("resolving {}", run_dir.display()), e))?;
    let mounts = den_block::mountinfo::read().map_err(|e| SpriteError::io("reading mountinfo", e))?;
    if !mounts.iter().any(|m| m.mount_point == dir) {
        nix::mount::mount(Some(&dir), &dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| SpriteError::io(format!("bind-mounting {} on itself", dir.display()), e.into()))?;
    }
    nix::mount::mount(None::<&str>, &dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .map_err(|e| SpriteError::io(format!("making {} a shared mount", dir.display()), e.into()))?;
    Ok(())
}

/// Undo [`share_run_dir`] at shutdown: remove the bind of `run_dir` on
/// itself, unless something is still mounted below it (a leftover the next
/// start must find and clean up) or the mount there is not our bind (an
/// operator's tmpfs, recognised by its device differing from its parent's).
pub fn unshare_run_dir(run_dir: &Path) {
    let Ok(dir) = run_dir.canonicalize() else { return };
    if !mounts_below(&dir).is_empty() {
        return;
    }
    let mounts = den_block::mountinfo::read().unwrap_or_default();
    let ours = mounts.iter().filter(|m| m.mount_point == dir).any(|m| {
        mounts
            .iter()
            .find(|p| p.id == m.parent_id)
            .is_some_and(|p| (p.major, p.minor) == (m.major, m.minor))
    });
    if ours && let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing the run directory's bind mount");
    }
}

/// Every mount below `root`, deepest first (from /proc/self/mountinfo).
pub fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = den_block::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root) && p != root)
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// After a crash of the host process: abort the FUSE connections it left
/// below `root` (only ours: `root` is this server's run directory, which no
/// live process serves at start-up), so anything still waiting on one (even
/// a thread of the dead process, which then can finally exit, or a sprite
/// process of a container about to be removed) fails now instead of never.
pub fn abort_stale_fuse(root: &Path) {
    match den_block::abort_stale_connections(root) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(connections = n, "aborted the FUSE connections of an earlier run"),
        Err(e) => tracing::warn!(error = %e, "aborting the FUSE connections of an earlier run"),
    }
}

/// Records which process serves a run directory: `<run_dir>/den.pid`.
const PID_FILE: &str = "den.pid";

/// How long a killed predecessor may take to finish dying once its FUSE
/// connections are aborted.
const PREDECESSOR_EXIT: std::time::Duration = std::time::Duration::from_secs(20);

/// `(state, start time)` of process `pid` from `/proc/PID/stat`.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(") ")?;
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    Some((state, f.nth(18)?.parse().ok()?))
}

/// Take over `run_dir` at start-up, before anything else touches it.
///
/// A predecessor killed with -9 while one of its threads waited on I/O
/// through its own disk can't finish dying: that thread waits for its own
/// dead FUSE workers, and keeps the process, its FUSE connections, its
/// sockets (the DNS forwarder's port) and its locks alive. Its FUSE
/// connections are aborted here (only those mounted below `run_dir`, which is
/// this server's alone) and its exit awaited, boundedly. A predecessor that
/// is still running normally is never touched.
pub fn claim_run_dir(run_dir: &Path) -> Result<()> {
    let pid_file = run_dir.join(PID_FILE);
    let me = std::process::id() as i32;
    let previous = std::fs::read_to_string(&pid_file).ok().and_then(|t| {
        let mut w = t.split_whitespace();
        Some((w.next()?.parse::<i32>().ok()?, w.next()?.parse::<u64>().ok()?))
    });
    if let Some((pid, started)) = previous
        && pid != me
        && let Some((state, now_started)) = proc_stat(pid)
        && now_started == started
    {
        // A thread group whose leader is a zombie is exiting (-9 kills every
        // thread; the leader goes first): only a stuck thread keeps it.
        if state != 'Z' {
            // Running (or not yet dead): its disks are not ours to abort.
            tracing::warn!(pid, dir = %run_dir.display(), "another den process still uses this run directory");
            return write_pid_file(&pid_file, me);
        }
        tracing::warn!(
            pid,
            "the previous den of this run directory is stuck dying; aborting its disks"
        );
        abort_stale_fuse(run_dir);
        let deadline = std::time::Instant::now() + PREDECESSOR_EXIT;
        while proc_stat(pid).is_some_and(|(_, s)| s == started) {
            if std::time::Instant::now() >= deadline {
                tracing::error!(pid, "the previous den of this run directory does not exit");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    } else {
        abort_stale_fuse(run_dir);
    }
    write_pid_file(&pid_file, me)
}

fn write_pid_file(pid_file: &Path, me: i32) -> Result<()> {
    let started = proc_stat(me).map(|(_, s)| s).unwrap_or(0);
    std::fs::write(pid_file, format!("{me} {started}\n"))
        .map_err(|e| SpriteError::io(format!("writing {}", pid_file.display()), e))
}

/// After a crash of the host process: detach every filesystem and FUSE
/// mount it left below `root` (lazily: a dead FUSE mount can't be unmounted
/// cleanly), then free the loop devices bound to files below it.
pub fn cleanup_stale(root: &Path) {
    abort_stale_fuse(root);
    let mounts = mounts_below(root);
    // Loop devices first, while their FUSE files still have their paths: once
    // the FUSE mount is detached the kernel reports the file as `/disk` and
    // the device could never be found again (a leak per crash). On a device
    // whose ext4 is still mounted the detach is deferred until that goes.
    for m in &mounts {
        for dev in den_block::loopdev::devices_backed_by(&m.join(den_block::FuseOptions::default().file_name))
        {
            let _ = run(Command::new("losetup").arg("-d").arg(&dev));
        }
    }
    for m in &mounts {
        tracing::warn!(mount = %m.display(), "removing a mount left by an earlier run");
        let _ = umount(m, true);
    }
}
