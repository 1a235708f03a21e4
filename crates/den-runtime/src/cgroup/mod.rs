//! cgroup layout detection and the per-sprite cgroup operations den does
//! itself (freeze/thaw, listing and killing tasks, reading counters).
//!
//! Limits are applied by libcontainer's libcgroups from the OCI spec; den only
//! needs the freezer for warm sleep and the task list for a reliable stop.
//! Both are a few cgroupfs files, so they are written here directly: that
//! keeps the thaw path free of the engine (it must work even if the engine's
//! state is damaged, see [`SpriteCgroup::thaw`]).
//!
//! Sprites live in `den/<id>` under each hierarchy root (v1: one per
//! controller, e.g. `/sys/fs/cgroup/freezer/den/<id>`; v2:
//! `/sys/fs/cgroup/den/<id>`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::backend::RuntimeError;

/// Where cgroupfs is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The host's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Only v1 hierarchies.
    V1,
    /// v1 hierarchies plus a cgroup2 mount at `unified` (this dev host: the
    /// v2 mount has no controllers, so everything is done on v1).
    Hybrid,
    /// A single cgroup2 hierarchy at the root (most production hosts).
    V2,
}

/// Detect the layout from the filesystem types under [`CGROUP_ROOT`].
pub fn detect() -> Result<CgroupMode, RuntimeError> {
    detect_at(Path::new(CGROUP_ROOT))
}

fn detect_at(root: &Path) -> Result<CgroupMode, RuntimeError> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    let fs_type = |p: &Path| {
        statfs(p)
            .map(|s| s.filesystem_type())
            .map_err(|e| RuntimeError::io(format!("statfs {}", p.display()), e.into()))
    };
    if fs_type(root)? == CGROUP2_SUPER_MAGIC {
        return Ok(CgroupMode::V2);
    }
    let unified = root.join("unified");
    if unified.is_dir() && fs_type(&unified)? == CGROUP2_SUPER_MAGIC {
        return Ok(CgroupMode::Hybrid);
    }
    Ok(CgroupMode::V1)
}

/// The OCI `linux.cgroupsPath` of a sprite: absolute, so it is the same
/// whatever cgroup the den server itself runs in.
pub fn sprite_cgroup_path(id: &str) -> String {
    format!("/den/{id}")
}

/// One sprite's cgroup (as created by the engine).
#[derive(Debug, Clone)]
pub struct SpriteCgroup {
    mode: CgroupMode,
    rel: PathBuf,
}

/// How long freeze/thaw/kill may take before we call it a failure. Freezing
/// normally takes well under 10 ms; tasks in uninterruptible sleep (NFS, FUSE)
/// can delay it.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

impl SpriteCgroup {
    pub fn new(mode: CgroupMode, id: &str) -> Self {
        SpriteCgroup {
            mode,
            rel: PathBuf::from(sprite_cgroup_path(id).trim_start_matches('/')),
        }
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// Directory of the sprite's cgroup for a v1 `controller` (ignored on v2).
    pub fn dir(&self, controller: &str) -> PathBuf {
        match self.mode {
            CgroupMode::V2 => Path::new(CGROUP_ROOT).join(&self.rel),
            CgroupMode::V1 | CgroupMode::Hybrid => Path::new(CGROUP_ROOT).join(controller).join(&self.rel),
        }
    }

    /// Read one cgroup file of `controller`, trimmed.
    pub fn read(&self, controller: &str, file: &str) -> Result<String, RuntimeError> {
        let p = self.dir(controller).join(file);
        fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .map_err(|e| RuntimeError::io(format!("read {}", p.display()), e))
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), RuntimeError> {
        let p = self.dir(controller).join(file);
        fs::write(&p, value).map_err(|e| RuntimeError::io(format!("write {} to {}", value, p.display()), e))
    }

    /// Whether the cgroup exists (the engine created it and nobody removed it).
    pub fn exists(&self) -> bool {
        self.dir("freezer").is_dir()
    }

    /// Host pids of every task in the sprite (empty if the cgroup is gone).
    pub fn procs(&self) -> Result<Vec<i32>, RuntimeError> {
        // pids is the controller every sprite has on v1; on v2 there is one tree.
        let p = self.dir("pids").join("cgroup.procs");
        match fs::read_to_string(&p) {
            Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(RuntimeError::io(format!("read {}", p.display()), e)),
        }
    }

    /// Whether the freezer says the cgroup is (completely) frozen.
    pub fn is_frozen(&self) -> Result<bool, RuntimeError> {
        match self.mode {
            CgroupMode::V2 => Ok(self
                .read("", "cgroup.events")?
                .lines()
                .any(|l| l.trim() == "frozen 1")),
            _ => Ok(self.read("freezer", "freezer.state")? == "FROZEN"),
        }
    }

    /// Freeze every task and wait (bounded) until the kernel reports the
    /// whole cgroup frozen. On timeout the cgroup is thawed again, so a failed
    /// freeze never leaves a half-frozen sprite behind.
    pub fn freeze(&self) -> Result<(), RuntimeError> {
        match self.mode {
            CgroupMode::V2 => self.write("", "cgroup.freeze", "1")?,
            _ => self.write("freezer", "freezer.state", "FROZEN")?,
        }
        let res = poll_until(FREEZE_TIMEOUT, "the freezer to report FROZEN", || {
            if self.mode != CgroupMode::V2 {
                // v1 can stay in FREEZING when a task raced with the write;
                // writing FROZEN again retries the freeze of the stragglers.
                let _ = self.write("freezer", "freezer.state", "FROZEN");
            }
            self.is_frozen()
        });
        if res.is_err() {
            let _ = self.thaw();
        }
        res
    }

    /// Thaw. Needs nothing but the cgroup directory, so it works even when the
    /// engine's state is lost: the always-available unfreeze path.
    pub fn thaw(&self) -> Result<(), RuntimeError> {
        if !self.exists() {
            return Ok(());
        }
        match self.mode {
            CgroupMode::V2 => self.write("", "cgroup.freeze", "0")?,
            _ => self.write("freezer", "freezer.state", "THAWED")?,
        }
        poll_until(FREEZE_TIMEOUT, "the freezer to report THAWED", || {
            Ok(!self.is_frozen()?)
        })
    }

    /// Remove the (empty) cgroup from every hierarchy that has it. For an
    /// engine that left it behind (libcontainer and runsc remove their own).
    pub fn remove(&self) -> Result<(), RuntimeError> {
        let dirs: Vec<PathBuf> = match self.mode {
            CgroupMode::V2 => vec![self.dir("")],
            CgroupMode::V1 | CgroupMode::Hybrid => {
                let root = Path::new(CGROUP_ROOT);
                let entries = fs::read_dir(root)
                    .map_err(|e| RuntimeError::io(format!("read {}", root.display()), e))?;
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path().join(&self.rel))
                    .collect()
            }
        };
        for d in dirs {
            match fs::remove_dir(&d) {
                // Also the second name of a co-mounted hierarchy (cpu, cpuacct).
                Err(e) if e.kind() != io::ErrorKind::NotFound && e.raw_os_error() != Some(libc::ENOTDIR) => {
                    return Err(RuntimeError::io(format!("rmdir {}", d.display()), e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// SIGKILL every task and wait until the cgroup is empty. Tasks are frozen
    /// while being killed so that a fork bomb can't refill the cgroup between
    /// reading `cgroup.procs` and the kills (v2 has `cgroup.kill` for this).
    pub fn kill_all(&self, timeout: Duration) -> Result<(), RuntimeError> {
        if !self.exists() {
            return Ok(());
        }
        let kill_file = self.dir("").join("cgroup.kill");
        if self.mode == CgroupMode::V2 && kill_file.exists() {
            self.write("", "cgroup.kill", "1")?;
        } else {
            let frozen = self.freeze().is_ok();
            for pid in self.procs()? {
                // ESRCH: already gone. Nothing else can fail for root.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if frozen {
                self.thaw()?;
            }
        }
        poll_until(timeout, "the sprite's tasks to exit", || {
            let left = self.procs()?;
            for &pid in &left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            Ok(left.is_empty())
        })
    }
}

/// Poll `cond` with a short, growing interval until it holds or `timeout`
/// passes. This is how den waits for kernel state that has no notification
/// (freezer state, process exit of a non-child).
pub(crate) fn poll_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool, RuntimeError>,
) -> Result<(), RuntimeError> {
    let t0 = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        if cond()? {
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            return Err(RuntimeError::Timeout {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_host() {
        // Any Linux host with cgroupfs mounted gives an answer.
        if Path::new(CGROUP_ROOT).is_dir() {
            detect().unwrap();
        }
    }

    #[test]
    fn paths() {
        let v1 = SpriteCgroup::new(CgroupMode::Hybrid, "abc");
        assert_eq!(v1.dir("freezer"), Path::new("/sys/fs/cgroup/freezer/den/abc"));
        let v2 = SpriteCgroup::new(CgroupMode::V2, "abc");
        assert_eq!(v2.dir("freezer"), Path::new("/sys/fs/cgroup/den/abc"));
        assert_eq!(sprite_cgroup_path("abc"), "/den/abc");
    }
}
