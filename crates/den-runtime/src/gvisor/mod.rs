//! The gVisor backend: each sprite is a `runsc` sandbox (systrap platform),
//! so the sprite's system calls are served by gVisor's user-space kernel (the
//! sentry) instead of the host's.
//!
//! # How a sprite is run
//!
//! * **Spec:** [`spec::build_gvisor`](crate::container::spec) — the native
//!   container's process, user namespace id map, limits, capabilities and
//!   seccomp profile (`--oci-seccomp` makes the sentry enforce it).
//! * **Root filesystem:** the same overlay as the native backend (idmapped
//!   image lower, the sprite's upper/work), mounted by den's shim in a private
//!   mount namespace that it then `exec`s `runsc create` in, so only runsc's
//!   gofer (which serves the sandbox its files) ever sees it. gVisor's own
//!   root overlay is off (`--overlay2=none`): writes must reach the upper
//!   directory on the sprite's volume, not the sandbox's memory.
//! * **Network:** `--network=sandbox`: the sentry's netstack takes over the
//!   interfaces of [`SpriteSpec::netns_path`], named in the spec (runsc
//!   starts the sandbox in it), or of a new, empty netns.
//! * **cgroups:** runsc creates `den/<id>` (same path as native, v1 or v2)
//!   and applies memory, pids and cpu there; the host enforces them on the
//!   sandbox's processes (sentry, gofer, systrap stubs), and
//!   [`Backend::update_resources`] rewrites the same files.
//! * **State:** `runsc --root <state_root>/runsc`, so den servers on one
//!   host never see each other's sandboxes.
//!
//! # Differences from the native backend
//!
//! * Freeze/thaw are `runsc pause`/`resume` (the sentry stops its tasks),
//!   not the cgroup freezer.
//! * [`Handle::pid`] is the sandbox process (`runsc-sandbox`), not the
//!   sprite's PID 1: sprite processes are sentry tasks, invisible on the host.
//! * [`Backend::set_hostname`] runs `hostname NAME` in the sprite with
//!   `runsc exec --cap CAP_SYS_ADMIN` (the sprite's `/bin/hostname`, so the
//!   sprite's root could put something else there and get that capability
//!   inside the sandbox; the next stage should exec den's own read-only
//!   agent binary instead).
//! * [`SpriteSpec::agent_listener`] is refused: runsc can donate descriptors
//!   only at `run`/`exec`, and `accept(2)` on a donated listening socket fails
//!   with `EINVAL` in this runsc (0.0~20240729). The agent can instead bind
//!   its socket in a bind-mounted directory (`--host-uds=create` makes it a
//!   real host socket).
//!
//! # Files
//!
//! ```text
//! <state_root>/bundles/<id>/config.json   OCI spec
//! <state_root>/bundles/<id>/sprite.json   the SpriteSpec (read by the shim)
//! <state_root>/bundles/<id>/rootfs/       overlay mount point (mounted only
//!                                         in the gofer's mount namespace)
//! <state_root>/bundles/<id>/runsc.log     runsc's own log (errors of create)
//! <state_root>/runsc/                     runsc's state (--root)
//! ```

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::backend::{Backend, Handle, MemorySnapshots, Resources, RuntimeError, SpriteSpec, SpriteState};
use crate::cgroup::{self, CgroupMode, SpriteCgroup, poll_until};
use crate::container::{
    self, KILL_TIMEOUT, ROOTFS_DIR, SPRITE_JSON, ShimCommand, alive, apply_limits, mkdir_traversable, shim,
    spec,
};

const RUNSC_LOG: &str = "runsc.log";

/// How long one runsc command may take (create and restore normally take
/// 150–250 ms).
const RUNSC_TIMEOUT: Duration = Duration::from_secs(60);

/// Sprites as gVisor sandboxes, driven through the `runsc` CLI.
#[derive(Debug, Clone)]
pub struct GvisorBackend {
    root: PathBuf,
    shim: ShimCommand,
    runsc: PathBuf,
    cgroup_mode: CgroupMode,
}

/// What `runsc state` says (the fields den reads).
#[derive(Debug, Deserialize)]
struct RunscState {
    status: String,
    #[serde(default)]
    pid: i32,
}

impl GvisorBackend {
    /// `state_root` holds the bundles and runsc's state; `shim` is den's
    /// runtime shim (it mounts the root filesystem and becomes runsc);
    /// `runsc` the runsc binary (e.g. `/usr/bin/runsc`).
    pub fn new(
        state_root: impl Into<PathBuf>,
        shim: ShimCommand,
        runsc: impl Into<PathBuf>,
    ) -> Result<Self, RuntimeError> {
        let root: PathBuf = state_root.into();
        for d in [root.clone(), root.join("bundles"), root.join("runsc")] {
            mkdir_traversable(&d)?;
        }
        Ok(GvisorBackend {
            root,
            shim,
            runsc: runsc.into(),
            cgroup_mode: cgroup::detect()?,
        })
    }

    pub fn cgroup_mode(&self) -> CgroupMode {
        self.cgroup_mode
    }

    /// The sandbox's cgroup (for counters such as `memory.failcnt`).
    pub fn cgroup(&self, id: &str) -> SpriteCgroup {
        SpriteCgroup::new(self.cgroup_mode, id)
    }

    /// runsc's state directory (`--root`).
    pub fn runsc_root(&self) -> PathBuf {
        self.root.join("runsc")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.root.join("bundles").join(id)
    }

    /// The flags every runsc command of this backend gets: runsc checks that
    /// later commands agree with the ones the sandbox was created with.
    fn global_args(&self) -> Vec<OsString> {
        let mut root = OsString::from("--root=");
        root.push(self.runsc_root());
        let mut args = vec![
            root,
            "--platform=systrap".into(),
            "--network=sandbox".into(),
            "--overlay2=none".into(),
            "--oci-seccomp".into(),
            "--host-uds=create".into(),
            // A memory checkpoint resets the sprite's open TCP connections
            // (they can't follow it anyway) instead of failing; without it
            // even a connection in TIME_WAIT refuses every checkpoint.
            "--net-disconnect-ok".into(),
        ];
        // For operators chasing a sandbox that dies: runsc's own debug logs
        // (sentry, gofer, every command) go to this directory.
        if let Some(dir) = std::env::var_os("DEN_RUNSC_DEBUG_LOG") {
            let mut log = OsString::from("--debug-log=");
            log.push(dir);
            log.push("/");
            args.extend(["--debug".into(), log]);
        }
        args
    }

    /// Run `runsc <global flags> args…`, its output captured, killed after
    /// [`RUNSC_TIMEOUT`].
    fn runsc(&self, args: &[&OsStr]) -> Result<Output, RuntimeError> {
        let child = Command::new(&self.runsc)
            .args(self.global_args())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RuntimeError::io(format!("spawn {}", self.runsc.display()), e))?;
        wait_bounded(child)
    }

    /// `runsc args…`, failing with its stderr unless it exits 0.
    fn runsc_ok(&self, args: &[&OsStr]) -> Result<Output, RuntimeError> {
        let out = self.runsc(args)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(RuntimeError::Runsc(format!(
                "{}: {}: {}",
                args.first().map(|a| a.to_string_lossy()).unwrap_or_default(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The sandbox's state, `None` if runsc does not know `id`.
    fn runsc_state(&self, id: &str) -> Result<Option<RunscState>, RuntimeError> {
        // runsc keeps one `<sandbox>_sandbox:<id>.state` file per container
        // (den's sandboxes have one container, of the same id); no file, no
        // container (cheaper and less ambiguous than parsing runsc's "does
        // not exist" message).
        if !self.has_state_file(id)? {
            return Ok(None);
        }
        let out = self.runsc(&["state".as_ref(), id.as_ref()])?;
        if !out.status.success() {
            if !self.has_state_file(id)? {
                // Deleted meanwhile.
                return Ok(None);
            }
            return Err(RuntimeError::Runsc(format!(
                "state {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| RuntimeError::Runsc(format!("state {id}: {e}")))
    }

    fn has_state_file(&self, id: &str) -> Result<bool, RuntimeError> {
        let p = self.runsc_root().join(format!("{id}_sandbox:{id}.state"));
        p.try_exists()
            .map_err(|e| RuntimeError::io(format!("stat {}", p.display()), e))
    }

    fn existing_state(&self, id: &str) -> Result<RunscState, RuntimeError> {
        self.runsc_state(id)?
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    /// Start the shim, which mounts the root filesystem in a mount namespace
    /// of its own and becomes `runsc <global flags> args…`. runsc's stdio is
    /// the sprite's console, so its errors are read from its log file.
    fn runsc_in_shim(&self, verb: &str, id: &str, args: &[&OsStr]) -> Result<(), RuntimeError> {
        let log = self.bundle(id).join(RUNSC_LOG);
        let mut log_arg = OsString::from("--log=");
        log_arg.push(&log);
        let child = Command::new(&self.shim.program)
            .args(&self.shim.args)
            .arg(verb)
            .arg(&self.root)
            .arg(id)
            .arg(&self.runsc)
            .args(self.global_args())
            .arg(log_arg)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RuntimeError::io(format!("spawn shim {}", self.shim.program.display()), e))?;
        let out = wait_bounded(child)?;
        if out.status.success() {
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Ok(text) = fs::read_to_string(&log) {
            // The log's last lines carry runsc's reason.
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            for l in tail.into_iter().rev() {
                stderr.push('\n');
                stderr.push_str(l);
            }
        }
        Err(RuntimeError::Shim {
            status: out.status.to_string(),
            stderr,
        })
    }

    /// Remove runsc's state, the cgroup and the bundle, after the processes
    /// are gone.
    fn forget(&self, id: &str) -> Result<(), RuntimeError> {
        self.forget_sandbox(id)?;
        let bundle = self.bundle(id);
        if bundle.exists() {
            fs::remove_dir_all(&bundle)
                .map_err(|e| RuntimeError::io(format!("remove {}", bundle.display()), e))?;
        }
        Ok(())
    }

    /// Remove runsc's state of `id` and its cgroup (not the bundle).
    ///
    /// When the sandbox is dead, this is what `runsc delete -force` does,
    /// without its wait: this runsc polls a sandbox that is already gone for
    /// a fixed ~1.7 s before it cleans up, which would make every delete and
    /// restore that slow. den's sandboxes are single-container, so their
    /// state is exactly `<id>_sandbox:<id>.{state,lock}` and the control
    /// socket `runsc-<id>.sock` under runsc's root. A live sandbox (only if
    /// the caller did not stop it) still goes through `runsc delete`.
    fn forget_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(st) = self.runsc_state(id)?
            && st.pid > 0
            && alive(st.pid)
        {
            self.runsc_ok(&["delete".as_ref(), "-force".as_ref(), id.as_ref()])?;
        }
        // Whatever is left: the gofer and systrap stubs of a sandbox killed
        // from outside, or a half-made create.
        let cg = self.cgroup(id);
        if cg.exists() {
            cg.kill_all(KILL_TIMEOUT)?;
        }
        cg.remove()?;
        let root = self.runsc_root();
        for name in [
            format!("{id}_sandbox:{id}.state"),
            format!("{id}_sandbox:{id}.lock"),
            format!("runsc-{id}.sock"),
        ] {
            let p = root.join(name);
            match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RuntimeError::io(format!("remove {}", p.display()), e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Make `sprite`'s bundle (OCI spec, its own spec, the rootfs mount
    /// point), replacing whatever an earlier, stopped sandbox of that id
    /// left; refuses a live one.
    fn prepare_bundle(&self, sprite: &SpriteSpec) -> Result<PathBuf, RuntimeError> {
        sprite.validate()?;
        if sprite.agent_listener.is_some() {
            return Err(RuntimeError::InvalidSpec(
                "the gVisor backend can't hand a listening socket to PID 1 (accept on a donated \
                 socket fails in the sandbox); bind the agent's socket in a bind-mounted directory"
                    .into(),
            ));
        }
        let id = sprite.id.as_str();
        match self.runsc_state(id)? {
            Some(st) if state_of(&st) != SpriteState::Stopped => {
                return Err(RuntimeError::BadState {
                    id: id.into(),
                    state: state_of(&st),
                    op: "create",
                });
            }
            // Left over from an earlier run, or a half-made one: replace it.
            _ => self.forget(id)?,
        }
        let bundle = self.bundle(id);
        mkdir_traversable(&bundle)?;
        let rootfs = bundle.join(ROOTFS_DIR);
        mkdir_traversable(&rootfs)?;
        let oci = spec::build_gvisor(sprite, &rootfs)?;
        container::write_bundle(&bundle, &oci, sprite)?;
        Ok(bundle)
    }

    fn handle(&self, id: &str, st: &RunscState) -> Handle {
        Handle {
            id: id.into(),
            pid: (st.pid > 0).then_some(st.pid),
            backend: self.name().into(),
        }
    }

    /// Save the sprite's memory and processes to `image_dir` (created if
    /// missing) and stop it: the sprite is [`SpriteState::Stopped`]
    /// afterwards, its bundle kept for [`GvisorBackend::restore`]. The
    /// upper directory is not part of the image; restore expects it
    /// unchanged.
    pub fn checkpoint(&self, handle: &Handle, image_dir: &Path) -> Result<(), RuntimeError> {
        self.save(handle, image_dir, false)
    }

    /// [`Self::checkpoint`], but the sprite goes on running (a paused one
    /// stays paused): its state at the moment of the call is in the image.
    pub fn checkpoint_running(&self, handle: &Handle, image_dir: &Path) -> Result<(), RuntimeError> {
        self.save(handle, image_dir, true)
    }

    fn save(&self, handle: &Handle, image_dir: &Path, leave_running: bool) -> Result<(), RuntimeError> {
        match self.state(handle)? {
            SpriteState::Running | SpriteState::Frozen => {}
            state => {
                return Err(RuntimeError::BadState {
                    id: handle.id.clone(),
                    state,
                    op: "checkpoint",
                });
            }
        }
        fs::create_dir_all(image_dir)
            .map_err(|e| RuntimeError::io(format!("mkdir {}", image_dir.display()), e))?;
        let mut image = OsString::from("--image-path=");
        image.push(image_dir);
        // Uncompressed: den's store compresses and deduplicates by chunk,
        // which a compressed stream would defeat.
        let mut args: Vec<&OsStr> = vec![
            "checkpoint".as_ref(),
            "--compression=none".as_ref(),
            image.as_os_str(),
        ];
        if leave_running {
            args.push("--leave-running".as_ref());
        }
        args.push(handle.id.as_ref());
        self.runsc_ok(&args)?;
        if leave_running {
            return Ok(());
        }
        // runsc stops the sandbox after a checkpoint (without
        // --leave-running), but its state can still say "running" for a
        // moment; make sure nothing of it is left.
        self.stop(handle, Duration::ZERO)
    }

    /// Start `sprite` from a memory image ([`Self::checkpoint`]) instead of
    /// booting it: its processes go on where they were. The bundle is made
    /// afresh from `sprite` (as by create), so this works after den
    /// restarted or on another host; the root filesystem (lower and upper)
    /// must be what it was when the image was saved.
    pub fn restore_spec(&self, sprite: &SpriteSpec, image_dir: &Path) -> Result<Handle, RuntimeError> {
        self.prepare_bundle(sprite)?;
        self.restore(&sprite.id, image_dir)
    }

    /// Bring a sprite back from [`GvisorBackend::checkpoint`]'s `image_dir`,
    /// on the same bundle (spec, root filesystem layers): its processes go on
    /// where they were. Returns the new handle (state
    /// [`SpriteState::Running`]).
    pub fn restore(&self, id: &str, image_dir: &Path) -> Result<Handle, RuntimeError> {
        let bundle = self.bundle(id);
        if !bundle.join(SPRITE_JSON).exists() {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        if let Some(st) = self.runsc_state(id)? {
            let state = state_of(&st);
            if state != SpriteState::Stopped {
                return Err(RuntimeError::BadState {
                    id: id.into(),
                    state,
                    op: "restore",
                });
            }
            // The old container's state; the bundle stays.
            self.forget_sandbox(id)?;
        }
        let mut image = OsString::from("--image-path=");
        image.push(image_dir);
        let mut bundle_arg = OsString::from("--bundle=");
        bundle_arg.push(&bundle);
        let res = self.runsc_in_shim(
            "gvisor-restore",
            id,
            &[
                "restore".as_ref(),
                "--detach".as_ref(),
                image.as_os_str(),
                bundle_arg.as_os_str(),
                id.as_ref(),
            ],
        );
        if let Err(e) = res {
            let _ = self.cgroup(id).kill_all(KILL_TIMEOUT);
            let _ = self.forget_sandbox(id);
            return Err(e);
        }
        let st = self.existing_state(id)?;
        tracing::debug!(id, pid = st.pid, "gVisor sandbox restored");
        Ok(self.handle(id, &st))
    }
}

/// The sprite's state from runsc's, which can say "running" for a sandbox
/// that died under it (OOM-killed, or killed by `stop`, or just after a
/// checkpoint): a sandbox process that is gone means stopped.
fn state_of(st: &RunscState) -> SpriteState {
    match st.status.as_str() {
        "creating" | "created" if st.pid > 0 && alive(st.pid) => SpriteState::Created,
        "running" if st.pid > 0 && alive(st.pid) => SpriteState::Running,
        "paused" if st.pid > 0 && alive(st.pid) => SpriteState::Frozen,
        _ => SpriteState::Stopped,
    }
}

/// [`crate::container::wait_bounded`] with [`RUNSC_TIMEOUT`]: a wedged runsc
/// (e.g. a gofer blocked on a hung FUSE lower) can't hold the caller's thread.
fn wait_bounded(child: std::process::Child) -> Result<Output, RuntimeError> {
    crate::container::wait_bounded(child, RUNSC_TIMEOUT, "runsc")
}

impl Backend for GvisorBackend {
    fn name(&self) -> &'static str {
        "gvisor"
    }

    fn passes_listeners(&self) -> bool {
        false
    }

    /// This runsc sets no_new_privs on every process, whatever the spec says.
    fn no_new_privs(&self) -> bool {
        true
    }

    fn memory(&self) -> Option<&dyn MemorySnapshots> {
        Some(self)
    }

    fn create(&self, sprite: &SpriteSpec) -> Result<Handle, RuntimeError> {
        let id = sprite.id.as_str();
        let bundle = self.prepare_bundle(sprite)?;
        let mut bundle_arg = OsString::from("--bundle=");
        bundle_arg.push(&bundle);
        let res = self.runsc_in_shim(
            "gvisor-create",
            id,
            &["create".as_ref(), bundle_arg.as_os_str(), id.as_ref()],
        );
        let st = match res.and_then(|()| self.existing_state(id)) {
            Ok(st) => st,
            Err(e) => {
                // Best effort: don't leave a half-made sandbox behind.
                let _ = self.cgroup(id).kill_all(KILL_TIMEOUT);
                let _ = self.forget(id);
                return Err(e);
            }
        };
        tracing::debug!(id, pid = st.pid, "gVisor sandbox created");
        Ok(self.handle(id, &st))
    }

    fn start(&self, handle: &Handle) -> Result<(), RuntimeError> {
        // Through the shim: start sets up the sandbox's network, see
        // `mask_proc_sys_net`.
        self.runsc_in_shim(
            "gvisor-start",
            &handle.id,
            &["start".as_ref(), handle.id.as_ref()],
        )
    }

    fn state(&self, handle: &Handle) -> Result<SpriteState, RuntimeError> {
        Ok(state_of(&self.existing_state(&handle.id)?))
    }

    fn pid(&self, handle: &Handle) -> Result<Option<i32>, RuntimeError> {
        let st = self.existing_state(&handle.id)?;
        Ok((state_of(&st) != SpriteState::Stopped && st.pid > 0 && alive(st.pid)).then_some(st.pid))
    }

    fn freeze(&self, handle: &Handle) -> Result<(), RuntimeError> {
        match self.state(handle)? {
            SpriteState::Running => self.runsc_ok(&["pause".as_ref(), handle.id.as_ref()]).map(drop),
            SpriteState::Frozen => Ok(()),
            state => Err(RuntimeError::BadState {
                id: handle.id.clone(),
                state,
                op: "freeze",
            }),
        }
    }

    fn thaw(&self, handle: &Handle) -> Result<(), RuntimeError> {
        match self.runsc_state(&handle.id)? {
            Some(st) if state_of(&st) == SpriteState::Frozen => {
                self.runsc_ok(&["resume".as_ref(), handle.id.as_ref()]).map(drop)
            }
            // Not paused (or gone): nothing to wake.
            _ => Ok(()),
        }
    }

    fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError> {
        let cg = self.cgroup(&handle.id);
        let pid = match self.runsc_state(&handle.id)? {
            Some(st) => {
                if state_of(&st) == SpriteState::Frozen {
                    // Paused tasks can't act on signals.
                    self.thaw(handle)?;
                }
                Some(st.pid).filter(|&p| p > 0)
            }
            None => handle.pid,
        };
        if let Some(pid) = pid.filter(|&p| alive(p)) {
            if !grace.is_zero() {
                // To the sprite's PID 1 (a sentry task); the sandbox exits
                // with it.
                if self
                    .runsc(&["kill".as_ref(), handle.id.as_ref(), "TERM".as_ref()])
                    .is_ok_and(|o| o.status.success())
                {
                    let _ = poll_until(grace, "PID 1 to exit", || Ok(!alive(pid)));
                }
            }
            // The sandbox process is the whole sprite kernel: killing it
            // ends every sprite process at once.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            poll_until(KILL_TIMEOUT, "the sandbox to exit", || Ok(!alive(pid)))?;
        }
        // The gofer and systrap stubs.
        if cg.exists() {
            cg.kill_all(KILL_TIMEOUT)?;
        }
        Ok(())
    }

    fn delete(&self, handle: &Handle) -> Result<(), RuntimeError> {
        self.stop(handle, Duration::ZERO)?;
        self.forget(&handle.id)
    }

    fn open(&self, id: &str) -> Result<Option<Handle>, RuntimeError> {
        Ok(self.runsc_state(id)?.map(|st| self.handle(id, &st)))
    }

    fn update_resources(&self, handle: &Handle, resources: &Resources) -> Result<(), RuntimeError> {
        // This runsc has no `update`; the host cgroup is what enforces the
        // limits. (The sentry keeps the memory size it reports in
        // /proc/meminfo from create.)
        apply_limits(&handle.id, resources)
    }

    fn set_hostname(&self, handle: &Handle, hostname: &str) -> Result<(), RuntimeError> {
        if hostname.is_empty() || hostname.len() > 64 {
            return Err(RuntimeError::InvalidSpec("hostname must be 1..=64 bytes".into()));
        }
        // The sentry's UTS namespace is not the host's, so the native
        // backend's setns does not reach it; a process in the sprite with
        // CAP_SYS_ADMIN does (see the module docs for the caveat).
        self.runsc_ok(&[
            "exec".as_ref(),
            "--cap=CAP_SYS_ADMIN".as_ref(),
            handle.id.as_ref(),
            "hostname".as_ref(),
            hostname.as_ref(),
        ])
        .map(drop)
    }
}

impl MemorySnapshots for GvisorBackend {
    fn save(&self, handle: &Handle, image_dir: &Path, keep_running: bool) -> Result<(), RuntimeError> {
        GvisorBackend::save(self, handle, image_dir, keep_running)
    }

    fn restore(&self, spec: &SpriteSpec, image_dir: &Path) -> Result<Handle, RuntimeError> {
        self.restore_spec(spec, image_dir)
    }

    fn signal_init(&self, handle: &Handle, signal: i32) -> Result<(), RuntimeError> {
        // PID 1 is a sentry task, out of reach of the host's kill(2).
        let signal = signal.to_string();
        self.runsc_ok(&["kill".as_ref(), handle.id.as_ref(), signal.as_ref()])
            .map(drop)
    }
}

/// What the shim prepares before it becomes runsc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShimVerb {
    /// `runsc create`: the sprite's root filesystem; the console
    /// as standard output and error (the sandbox inherits them).
    Create,
    /// `runsc start`: only the `/proc/sys/net` mask (see [`mask_proc_sys_net`]).
    Start,
    /// `runsc restore`: both.
    Restore,
}

/// The shim's `gvisor-{create,start,restore} STATE_ROOT ID RUNSC ARGS…`:
/// prepare what `verb` needs, then become `RUNSC ARGS…`. Returns only on
/// failure.
pub(crate) fn shim_exec(verb: &str, root: &Path, id: &str, runsc: &[&str]) -> RuntimeError {
    let verb = match verb {
        "gvisor-create" => ShimVerb::Create,
        "gvisor-start" => ShimVerb::Start,
        "gvisor-restore" => ShimVerb::Restore,
        other => return RuntimeError::InvalidSpec(format!("unknown shim verb {other}")),
    };
    match prepare_and_exec(verb, root, id, runsc) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn prepare_and_exec(
    verb: ShimVerb,
    root: &Path,
    id: &str,
    runsc: &[&str],
) -> Result<std::convert::Infallible, RuntimeError> {
    let (program, args) = runsc
        .split_first()
        .ok_or_else(|| RuntimeError::InvalidSpec("no runsc command".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let bundle = root.join("bundles").join(id);
    if verb != ShimVerb::Start {
        let spec_path = bundle.join(SPRITE_JSON);
        let text =
            fs::read(&spec_path).map_err(|e| RuntimeError::io(format!("read {}", spec_path.display()), e))?;
        let sprite: SpriteSpec = serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::InvalidSpec(format!("{}: {e}", spec_path.display())))?;
        shim::private_mount_ns()?;
        shim::prepare_upper(&sprite)?;
        shim::mount_overlay(&sprite, &bundle.join(ROOTFS_DIR))?;
        let (stdin, stdout, stderr) = shim::console_stdio(&sprite)?;
        cmd.stdin(stdin).stdout(stdout).stderr(stderr);
    } else {
        shim::private_mount_ns()?;
    }
    if verb != ShimVerb::Create {
        mask_proc_sys_net()?;
    }
    // exec only returns on failure.
    let err = cmd.exec();
    Err(RuntimeError::io(format!("exec {program}"), err))
}

/// Hide `/proc/sys/net` (an empty read-only tmpfs over it, in the shim's own
/// mount namespace) from `runsc start` and `runsc restore`, which set up the
/// sandbox's network. This runsc (0.0~20240729) decides that it runs in the
/// host's network namespace when `/proc/sys/net/core/rmem_default` exists,
/// and refuses `--network=sandbox` there; since Linux made that sysctl per
/// network namespace, it exists in every netns, so every sprite would be
/// refused. The mask is the old kernels' view. It only ever exists in the
/// runsc command's mount namespace (a restored sandbox is born in it too:
/// the sentry has no use for the host's /proc).
fn mask_proc_sys_net() -> Result<(), RuntimeError> {
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        "/proc/sys/net",
        Some("tmpfs"),
        flags,
        Some("size=4k,mode=0555"),
    )
    .map_err(|e| RuntimeError::io("mount a tmpfs over /proc/sys/net", e.into()))
}
