//! A sprite's disk on the host: its den volume served as a block device
//! (FUSE file + loop device) with the ext4 filesystem mounted.
//!
//! ```text
//! <run>/fuse/disk.img   FUSE file backed by the volume
//! /dev/loopN            loop device on it (direct I/O: no second page cache)
//! <run>/disk/           ext4, holding upper/ and work/ of the sprite's overlay
//! ```

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use den_block::{ExportOptions, FuseLoopFrontend, VolumeDevice};
use den_store::Volume;

use crate::error::{Result, SpriteError};

/// Mount options: the template's inode tables and journal were never
/// written (they read as zeros from a sparse volume), so the kernel's lazy
/// initialisation would only write zeros over zeros, chunk by chunk, in
/// every sprite. `noinit_itable` turns that off. `discard`: blocks a guest
/// frees (an `rm` in the sprite) reach the volume as a punch-hole, whose
/// whole chunks are unmapped and then freed by the store's GC; without it
/// a sprite's disk usage only ever grows.
const MOUNT_OPTIONS: &str = "noatime,noinit_itable,discard";

/// Upper and work directory names on the sprite's ext4.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";

pub struct Disk {
    export: Option<den_block::Export>,
    mountpoint: PathBuf,
    volume: Volume,
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
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", MOUNT_OPTIONS])
            .arg(&dev)
            .arg(mountpoint))
        .inspect_err(|_| disk.release_export())?;
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
        let res = run(Command::new("umount").arg(&self.mountpoint)).map(|_| ());
        if res.is_ok() {
            // The sprite's mount namespace held its own reference to the
            // filesystem; the kernel drops it shortly after the last task
            // exits. Wait for that, so the export stops now and the volume is
            // free for a restore or the next boot.
            den_block::loopdev::wait_unclaimed(self.device(), RELEASE_TIMEOUT);
        } else {
            // Something in the host still uses it (a shell cd'ed into the run
            // directory): detach lazily so the sprite can still go cold; the
            // kernel finishes the unmount when the last user leaves.
            let _ = run(Command::new("umount").arg("-l").arg(&self.mountpoint));
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
            let _ = run(Command::new("umount").arg("-l").arg(&self.mountpoint));
            self.release_export();
        }
    }
}

/// Generous: on a loaded host the dying namespace can take seconds, and booting
/// again before the old filesystem let go is refused by the export (two ext4
/// instances on one volume would corrupt it).
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `syncfs(2)` on the filesystem holding `path`. On a sprite's disk: everything
/// written so far reaches the volume and the journal is committed, so a volume
/// checkpoint taken while the sprite's processes are frozen is a clean
/// filesystem image.
pub fn syncfs(path: &Path) -> Result<()> {
    let dir = std::fs::File::open(path).map_err(|e| SpriteError::io("opening the disk", e))?;
    // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(SpriteError::io("syncfs", std::io::Error::last_os_error()));
    }
    Ok(())
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
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", MOUNT_OPTIONS])
            .arg(export.device_path())
            .arg(mountpoint))?;
        let res = (|| {
            for d in [UPPER, WORK] {
                let p = mountpoint.join(d);
                std::fs::create_dir(&p)
                    .map_err(|e| SpriteError::io(format!("creating {}", p.display()), e))?;
                std::os::unix::fs::chown(&p, Some(root_uid), Some(root_gid))
                    .map_err(|e| SpriteError::io(format!("chown {}", p.display()), e))?;
            }
            // The root of the merged filesystem shows the upper dir's mode.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(mountpoint.join(UPPER), std::fs::Permissions::from_mode(0o755))
                .map_err(|e| SpriteError::io("chmod upper", e))?;
            syncfs(mountpoint)
        })();
        let umount = run(Command::new("umount").arg(mountpoint)).map(|_| ());
        if umount.is_ok() {
            // A mount namespace cloned meanwhile (any container starting on
            // this host, den's or another process's) holds its own reference
            // until it pivots away; stopping the export under it would fail
            // as busy and let its last superblock write land after the
            // template is sealed.
            den_block::loopdev::wait_unclaimed(export.device_path(), RELEASE_TIMEOUT);
        }
        res.and(umount)
    })();
    let shut = export.shutdown().map_err(SpriteError::from);
    res.and(shut)?;
    volume.fsync().map_err(|e| SpriteError::io("fsync template", e))?;
    Ok(())
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

/// After a crash of the host process: detach every filesystem and FUSE
/// mount it left below `root` (lazily: a dead FUSE mount can't be unmounted
/// cleanly), then free the loop devices bound to files below it.
pub fn cleanup_stale(root: &Path) {
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
        let _ = run(Command::new("umount").arg("-l").arg(m));
    }
}
