//! The native Linux container backend: youki's `libcontainer`, driven from a
//! helper process (see [`shim_main`]).
//!
//! # What a sprite container gets
//!
//! * **Namespaces:** user (one uid and one gid range from
//!   [`SpriteSpec::idmap`], root = an unprivileged host uid), pid, mount,
//!   network (joins [`SpriteSpec::netns_path`] or gets a new one), uts, ipc,
//!   cgroup.
//! * **Root filesystem:** overlayfs with the idmapped image as lower layer and
//!   the caller's `upper_dir`/`work_dir`, mounted by the shim in a private
//!   mount namespace (host root mounts it, so no `EOVERFLOW` trouble; the
//!   idmapped lower gives the image's files their in-sprite owners) with
//!   `userxattr`. libcontainer then bind-mounts it as the container root and
//!   `pivot_root`s into it.
//! * **Security profile:** Docker's default capabilities
//!   ([`spec::CAPABILITIES`]), Docker's default seccomp policy
//!   ([`seccomp::DENIED`]), devices limited to null, zero, full, random,
//!   urandom, tty, ptmx and a private devpts (bind-mounted from the host, as
//!   `mknod` does not work in a user namespace; the devices cgroup allows
//!   only those), masked and read-only `/proc` and `/sys` paths.
//! * **Resources:** cpu shares/quota, memory, pids via libcgroups in
//!   `den/<id>` (v1, hybrid → v1, or v2, detected by libcgroups; den's own
//!   view is [`crate::cgroup::detect`]).
//!
//! # Files
//!
//! ```text
//! <state_root>/bundles/<id>/config.json    OCI spec
//! <state_root>/bundles/<id>/sprite.json    the SpriteSpec (read by the shim)
//! <state_root>/bundles/<id>/rootfs/        overlay mount point (mounted only
//!                                          in the sprite's mount namespace)
//! <state_root>/bundles/<id>/sys/           sysfs mount point, same (only for
//!                                          sprites that join a netns)
//! <state_root>/bundles/<id>/stage/N/       read-only overlays the sprite's
//!                                          read-only bind mounts come from,
//!                                          same (see `spec::Staged`)
//! <state_root>/engine/<id>/                libcontainer's state
//! ```
//!
//! # Measured (dev host: 2 loaded vCPUs, cgroup v1 hybrid; median of 20)
//!
//! | | den (this backend) | `runc run` / `pause` / `resume` |
//! |---|---|---|
//! | create (shim) | 19–41 ms | – |
//! | create + start → first byte of PID 1's output | 20–44 ms | 39–55 ms (no userns, no overlay) |
//! | freeze (until FROZEN) / thaw | 0.3–0.8 ms / 0.1–0.2 ms | 5–8 ms / 5–10 ms (CLI) |
//!
//! # Process tree
//!
//! The shim exits once PID 1 is created, so PID 1 is reparented to the
//! nearest child subreaper (make the den server one with
//! `PR_SET_CHILD_SUBREAPER` to collect exit statuses) or the host's init.
//! Liveness is read from `/proc`, so either works.

mod seccomp;
pub(crate) mod shim;
pub mod spec;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use libcontainer::container::{Container, ContainerStatus};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use seccomp::DENIED as SECCOMP_DENIED;
pub use shim::shim_main;

use crate::backend::{Backend, Handle, Resources, RuntimeError, SpriteSpec, SpriteState};
use crate::cgroup::{self, CgroupMode, SpriteCgroup, poll_until};

// A bundle's files, the same for every backend.
pub(crate) const SPRITE_JSON: &str = "sprite.json";
const CONFIG_JSON: &str = "config.json";
pub(crate) const ROOTFS_DIR: &str = "rootfs";
const SYSFS_DIR: &str = "sys";
const STAGE_DIR: &str = "stage";

/// How long a shim `create` may take before it is killed (normally 20–50 ms).
const SHIM_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `stop` waits for the tasks to disappear after SIGKILL.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Write a bundle's OCI spec (`config.json`, for the engine) and the sprite
/// spec it came from (`sprite.json`, for den's shim and for recovery).
pub(crate) fn write_bundle<T: serde::Serialize>(
    bundle: &Path,
    oci: &T,
    sprite: &SpriteSpec,
) -> Result<(), RuntimeError> {
    let write = |name: &str, bytes: Vec<u8>| {
        let p = bundle.join(name);
        fs::write(&p, bytes).map_err(|e| RuntimeError::io(format!("write {}", p.display()), e))
    };
    write(
        CONFIG_JSON,
        serde_json::to_vec_pretty(oci).map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?,
    )?;
    write(
        SPRITE_JSON,
        serde_json::to_vec(sprite).map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?,
    )
}

/// Paths under the backend's state root.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: &Path) -> Self {
        Layout { root: root.into() }
    }
    pub(crate) fn bundle(&self, id: &str) -> PathBuf {
        self.root.join("bundles").join(id)
    }
    pub(crate) fn engine_root(&self) -> PathBuf {
        self.root.join("engine")
    }
    fn engine_dir(&self, id: &str) -> PathBuf {
        self.engine_root().join(id)
    }
}

/// How to start the shim: `program args… create <state_root> <id>`.
#[derive(Debug, Clone)]
pub struct ShimCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl ShimCommand {
    /// The running `den` binary: `den runtime-shim`.
    pub fn current_exe_subcommand(subcommand: &str) -> io::Result<Self> {
        Ok(ShimCommand {
            program: std::env::current_exe()?,
            args: vec![subcommand.into()],
        })
    }
}

/// Native containers (namespaces + cgroups + seccomp) through libcontainer.
#[derive(Debug, Clone)]
pub struct ContainerBackend {
    layout: Layout,
    shim: ShimCommand,
    cgroup_mode: CgroupMode,
}

impl ContainerBackend {
    /// Run the shim's `verb` (`create`, or `run`: create and start).
    fn create_with(&self, sprite: &SpriteSpec, verb: &str) -> Result<Handle, RuntimeError> {
        sprite.validate()?;
        let id = sprite.id.as_str();
        if let Some(c) = self.load(id)? {
            match self.state_of(id, &c)? {
                // Left over from an earlier run (e.g. den restarted while it
                // was cold): replace it.
                SpriteState::Stopped => self.forget(id)?,
                state => {
                    return Err(RuntimeError::BadState {
                        id: id.into(),
                        state,
                        op: "create",
                    });
                }
            }
        } else {
            // A half-created sprite (shim crashed) or a stale bundle.
            self.forget(id)?;
        }
        let bundle = self.layout.bundle(id);
        mkdir_traversable(&bundle)?;
        let rootfs = bundle.join(ROOTFS_DIR);
        mkdir_traversable(&rootfs)?;
        let sysfs = bundle.join(SYSFS_DIR);
        if sprite.netns_path.is_some() {
            mkdir_traversable(&sysfs)?;
        }
        let oci = spec::build(sprite, &rootfs, &sysfs, &bundle.join(STAGE_DIR))?;
        write_bundle(&bundle, &oci, sprite)?;

        let child = Command::new(&self.shim.program)
            .args(&self.shim.args)
            .arg(verb)
            .arg(&self.layout.root)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RuntimeError::io(format!("spawn shim {}", self.shim.program.display()), e))?;
        // A wedged shim (e.g. blocked on a hung FUSE lower) must not hold the
        // caller's thread forever.
        let out = wait_bounded(child, SHIM_TIMEOUT, "the shim")?;
        if !out.status.success() {
            let err = RuntimeError::Shim {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            };
            // Best effort: don't leave a half-made container behind.
            let _ = self.cgroup(id).kill_all(KILL_TIMEOUT);
            let _ = self.forget(id);
            return Err(err);
        }
        let pid: i32 =
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| RuntimeError::Shim {
                    status: "bad output".into(),
                    stderr: String::from_utf8_lossy(&out.stdout).into_owned(),
                })?;
        tracing::debug!(id, pid, "sprite container created");
        Ok(Handle {
            id: id.into(),
            pid: Some(pid),
            backend: self.name().into(),
        })
    }

    /// `state_root` holds bundles and engine state (e.g. `/run/den/ctr`: it
    /// does not need to survive a host reboot, sprites come back cold).
    pub fn new(state_root: impl Into<PathBuf>, shim: ShimCommand) -> Result<Self, RuntimeError> {
        let root: PathBuf = state_root.into();
        let layout = Layout::new(&root);
        for d in [root.clone(), root.join("bundles"), layout.engine_root()] {
            mkdir_traversable(&d)?;
        }
        Ok(ContainerBackend {
            layout,
            shim,
            cgroup_mode: cgroup::detect()?,
        })
    }

    pub fn cgroup_mode(&self) -> CgroupMode {
        self.cgroup_mode
    }

    /// The sprite's cgroup (for counters such as `memory.failcnt`).
    pub fn cgroup(&self, id: &str) -> SpriteCgroup {
        SpriteCgroup::new(self.cgroup_mode, id)
    }

    fn load(&self, id: &str) -> Result<Option<Container>, RuntimeError> {
        let dir = self.layout.engine_dir(id);
        if !dir.join("state.json").exists() {
            return Ok(None);
        }
        let mut c = Container::load(dir).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        c.refresh_status()
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        Ok(Some(c))
    }

    fn load_existing(&self, id: &str) -> Result<Container, RuntimeError> {
        self.load(id)?
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    fn state_of(&self, id: &str, c: &Container) -> Result<SpriteState, RuntimeError> {
        Ok(match c.status() {
            ContainerStatus::Creating | ContainerStatus::Created => SpriteState::Created,
            ContainerStatus::Stopped => SpriteState::Stopped,
            ContainerStatus::Paused => SpriteState::Frozen,
            ContainerStatus::Running => {
                // den freezes through the cgroup directly, so the engine's
                // status does not know about it.
                let cg = self.cgroup(id);
                if cg.exists() && cg.is_frozen()? {
                    SpriteState::Frozen
                } else {
                    SpriteState::Running
                }
            }
        })
    }

    /// Remove engine state and bundle (after the processes are gone).
    fn forget(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(mut c) = self.load(id)? {
            // Removes the cgroups and the engine's directory.
            c.delete(true).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        }
        let dir = self.layout.engine_dir(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| RuntimeError::io(format!("remove {}", dir.display()), e))?;
        }
        let bundle = self.layout.bundle(id);
        if bundle.exists() {
            // The overlay was only ever mounted in the sprite's own mount
            // namespace, so this is a plain directory here.
            fs::remove_dir_all(&bundle)
                .map_err(|e| RuntimeError::io(format!("remove {}", bundle.display()), e))?;
        }
        Ok(())
    }
}

/// Write `resources` into the sprite's cgroup `den/<id>` with libcgroups'
/// own controllers, as at create: the same files and the same conversions
/// (shares to cpu.weight on v2, memsw on v1). Engine-independent: runsc puts
/// its sandbox in the same cgroup path.
pub(crate) fn apply_limits(id: &str, resources: &Resources) -> Result<(), RuntimeError> {
    let mut v = serde_json::json!({});
    spec::merge_limits(&mut v, resources);
    let linux: oci_spec::runtime::LinuxResources =
        serde_json::from_value(v).map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?;
    let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: cgroup::sprite_cgroup_path(id).into(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| RuntimeError::Cgroup(e.to_string()))?;
    libcgroups::common::CgroupManager::apply(
        &manager,
        &libcgroups::common::ControllerOpt {
            resources: &linux,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        },
    )
    .map_err(|e| RuntimeError::Cgroup(e.to_string()))
}

/// Create `dir` as 0711 (and fix the mode if it exists): PID 1 starts as root
/// of the sprite's user namespace, which is "other" for host-root-owned
/// directories, and must be able to walk to the bundle's rootfs.
pub(crate) fn mkdir_traversable(dir: &Path) -> Result<(), RuntimeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(|e| RuntimeError::io(format!("mkdir {}", dir.display()), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
        .map_err(|e| RuntimeError::io(format!("chmod {}", dir.display()), e))
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the last ')' (the command name may contain any byte).
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|st| st != 'Z' && st != 'X'),
        Err(_) => false,
    }
}

/// Wait for `child`'s output; SIGKILL it after `timeout`, so a wedged helper
/// (the shim, runsc) can't hold the caller's thread forever. Dropping `done`
/// ends the watchdog at once.
pub(crate) fn wait_bounded(
    child: std::process::Child,
    timeout: Duration,
    what: &str,
) -> Result<std::process::Output, RuntimeError> {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let pid = Pid::from_raw(child.id() as i32);
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output();
    drop(done);
    let _ = watchdog.join();
    out.map_err(|e| RuntimeError::io(format!("wait for {what}"), e))
}

impl Backend for ContainerBackend {
    fn name(&self) -> &'static str {
        "container"
    }

    fn create(&self, sprite: &SpriteSpec) -> Result<Handle, RuntimeError> {
        self.create_with(sprite, "create")
    }

    /// One shim does both: PID 1 execs as soon as it is set up, which saves
    /// the second round trip (state file, notify socket) of a separate start.
    fn run(&self, sprite: &SpriteSpec) -> Result<Handle, RuntimeError> {
        self.create_with(sprite, "run")
    }

    fn start(&self, handle: &Handle) -> Result<(), RuntimeError> {
        // `start` only signals PID 1 through the engine's notify socket and
        // saves the state file: no fork, no namespace change, so it is safe
        // in the calling process.
        let mut c = self.load_existing(&handle.id)?;
        c.start().map_err(|e| RuntimeError::Engine(e.to_string()))
    }

    fn state(&self, handle: &Handle) -> Result<SpriteState, RuntimeError> {
        let c = self.load_existing(&handle.id)?;
        self.state_of(&handle.id, &c)
    }

    fn pid(&self, handle: &Handle) -> Result<Option<i32>, RuntimeError> {
        let c = self.load_existing(&handle.id)?;
        Ok(c.pid().map(|p| p.as_raw()).filter(|&p| alive(p)))
    }

    fn freeze(&self, handle: &Handle) -> Result<(), RuntimeError> {
        match self.state(handle)? {
            SpriteState::Running | SpriteState::Frozen => self.cgroup(&handle.id).freeze(),
            state => Err(RuntimeError::BadState {
                id: handle.id.clone(),
                state,
                op: "freeze",
            }),
        }
    }

    fn update_resources(&self, handle: &Handle, resources: &Resources) -> Result<(), RuntimeError> {
        apply_limits(&handle.id, resources)
    }

    fn set_hostname(&self, handle: &Handle, hostname: &str) -> Result<(), RuntimeError> {
        if hostname.is_empty() || hostname.len() > 64 {
            return Err(RuntimeError::InvalidSpec("hostname must be 1..=64 bytes".into()));
        }
        let pid = self
            .pid(handle)?
            .ok_or_else(|| RuntimeError::NotFound(handle.id.clone()))?;
        let path = format!("/proc/{pid}/ns/uts");
        let ns = fs::File::open(&path).map_err(|e| RuntimeError::io(format!("open {path}"), e))?;
        let name = hostname.to_string();
        // setns moves only the calling thread: a thread of its own, which
        // ends right after, so no other work ever runs in the sprite's UTS
        // namespace. The sprite's root can't do this itself (no SYS_ADMIN).
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS)?;
            nix::unistd::sethostname(&name)
        })
        .join()
        .map_err(|_| RuntimeError::Engine("the hostname thread panicked".into()))?
        .map_err(|e| RuntimeError::io("sethostname in the sprite", e.into()))
    }

    fn thaw(&self, handle: &Handle) -> Result<(), RuntimeError> {
        // Deliberately independent of the engine's state.
        self.cgroup(&handle.id).thaw()
    }

    fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError> {
        let cg = self.cgroup(&handle.id);
        // Frozen tasks can't act on signals.
        cg.thaw()?;
        let pid = match self.load(&handle.id)? {
            Some(c) => c.pid().map(|p| p.as_raw()),
            None => handle.pid,
        };
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            if !grace.is_zero() {
                // PID 1 of a pid namespace only gets signals it handles; the
                // den agent handles SIGTERM by stopping services cleanly.
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                let _ = poll_until(grace, "PID 1 to exit", || Ok(!alive(pid)));
            }
            // Killing PID 1 makes the kernel kill the whole pid namespace.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            poll_until(KILL_TIMEOUT, "PID 1 to exit", || Ok(!alive(pid)))?;
        }
        // Anything that escaped the pid namespace's teardown (nothing should).
        cg.kill_all(KILL_TIMEOUT)
    }

    fn delete(&self, handle: &Handle) -> Result<(), RuntimeError> {
        self.stop(handle, Duration::ZERO)?;
        self.forget(&handle.id)
    }

    fn open(&self, id: &str) -> Result<Option<Handle>, RuntimeError> {
        Ok(self.load(id)?.map(|c| Handle {
            id: id.into(),
            pid: c.pid().map(|p| p.as_raw()),
            backend: self.name().into(),
        }))
    }
}
