//! The backend trait: what the sprite manager needs from an isolation engine.
//!
//! A backend turns a [`SpriteSpec`] (root filesystem layers, id map, network
//! namespace, PID 1, bind mounts, limits) into a running, isolated process
//! tree and drives its lifecycle:
//!
//! ```text
//! create ──► Created ──start──► Running ──freeze──► Frozen (warm)
//!                                  ▲ └──────thaw───────┘
//!                                  └──stop──► Stopped (cold) ──delete──► gone
//! ```
//!
//! The native container backend ([`crate::container::ContainerBackend`]) is
//! the first implementation, gVisor ([`crate::gvisor::GvisorBackend`]) the
//! second; a microVM backend can follow behind the same trait, because
//! everything above it talks to the den agent (PID 1 of the sprite) over the
//! bind-mounted socket, not to the engine.
//!
//! All methods block (they fork helpers and poll cgroup files for bounded
//! times); async callers should use `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::IdMap;

/// Errors of the runtime backends.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sprite spec: {0}")]
    InvalidSpec(String),
    #[error("sprite {0} does not exist")]
    NotFound(String),
    #[error("sprite {id} is {state:?}, which does not allow {op}")]
    BadState {
        id: String,
        state: SpriteState,
        op: &'static str,
    },
    #[error("the runtime shim failed ({status}): {stderr}")]
    Shim { status: String, stderr: String },
    #[error("libcontainer: {0}")]
    Engine(String),
    #[error("runsc: {0}")]
    Runsc(String),
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// One bind mount from the host into the sprite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// Host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the sprite; created if missing.
    pub destination: PathBuf,
    pub readonly: bool,
}

/// CPU limit. Both knobs are optional; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuLimit {
    /// Relative weight (v1 `cpu.shares`, 2..=262144, default 1024; converted
    /// to `cpu.weight` on v2 by libcgroups).
    pub shares: Option<u64>,
    /// Hard cap: `quota_us` of CPU time per `period_us` (e.g. 50000/100000 =
    /// half a core).
    pub quota_us: Option<i64>,
    pub period_us: Option<u64>,
}

/// Per-sprite cgroup limits. `None` means unlimited (inherits the parent's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu: CpuLimit,
    /// Memory limit in bytes (v1 `memory.limit_in_bytes`, v2 `memory.max`).
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (`pids.max`); contains fork bombs.
    pub pids: Option<i64>,
}

impl Resources {
    /// Defaults for a sprite: 1 CPU's worth of quota, 2 GiB, 4096 tasks.
    pub fn sprite_default() -> Self {
        Resources {
            cpu: CpuLimit {
                shares: Some(1024),
                quota_us: Some(100_000),
                period_us: Some(100_000),
            },
            memory_bytes: Some(2 << 30),
            pids: Some(4096),
        }
    }
}

/// Everything a backend needs to run a sprite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpriteSpec {
    /// Sprite id: `[A-Za-z0-9_-]{1,64}`. Names the cgroup (`den/<id>`) and the
    /// engine's state.
    pub id: String,
    /// Read-only lower layer, already usable in the sprite's user namespace:
    /// `Image::lower_dir_for(&spec.idmap)`.
    pub rootfs_lower: PathBuf,
    /// Overlay upper directory (ext4 on the sprite's volume, mounted by the
    /// caller). Everything the sprite changes lands here.
    pub upper_dir: PathBuf,
    /// Overlay work directory: same filesystem as `upper_dir`, empty or left
    /// over from an earlier run of this sprite.
    pub work_dir: PathBuf,
    pub hostname: String,
    /// uid/gid mapping of the sprite's user namespace. One range each (more
    /// would need `newuidmap`, which libcontainer insists on for several ranges).
    pub idmap: IdMap,
    /// Join this network namespace (e.g. `/run/netns/den-<id>`, prepared with
    /// a veth by the network module); `None` gives a new one with only `lo`.
    pub netns_path: Option<PathBuf>,
    /// argv of PID 1 (the den agent); `init[0]` is a path inside the sprite.
    pub init: Vec<String>,
    /// Environment of PID 1 (`KEY=value`).
    pub env: Vec<String>,
    pub mounts: Vec<BindMount>,
    pub resources: Resources,
    /// Host file that receives PID 1's stdout and stderr (appended; may be a
    /// FIFO). `None` sends them to /dev/null.
    pub console_log: Option<PathBuf>,
    /// Host path of the agent's listening socket. The shim binds it as host
    /// root, before entering any of the sprite's namespaces, and hands the
    /// listener to PID 1 as descriptor [`AGENT_LISTEN_FD`]. The host then
    /// only ever connects to a socket it created, in a directory the sprite
    /// can neither see nor write: a path inside the sprite (which its root
    /// could turn into a symlink to another sprite's socket) is never
    /// followed. `None`: no descriptor is passed. (The gVisor backend refuses
    /// it: see [`crate::gvisor`].)
    #[serde(default)]
    pub agent_listener: Option<PathBuf>,
}

/// The descriptor number PID 1 finds [`SpriteSpec::agent_listener`] at.
pub const AGENT_LISTEN_FD: i32 = 3;

impl SpriteSpec {
    /// Check what can be checked without touching the system.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::InvalidSpec(m));
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!("id {:?} must match [A-Za-z0-9_-]{{1,64}}", self.id));
        }
        if self.init.is_empty() {
            return bad("init argv is empty".into());
        }
        if self.idmap.uids.len() != 1 || self.idmap.gids.len() != 1 {
            return bad("the id map must have exactly one uid and one gid range".into());
        }
        self.idmap
            .validate()
            .map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?;
        if self.idmap.is_identity() {
            // Root in the sprite must not be root on the host.
            return bad("the id map must not be the identity (sprite root would be host root)".into());
        }
        for p in [&self.rootfs_lower, &self.upper_dir, &self.work_dir] {
            if !p.is_absolute() {
                return bad(format!("{} is not absolute", p.display()));
            }
        }
        if self.agent_listener.as_ref().is_some_and(|p| !p.is_absolute()) {
            return bad("the agent listener path is not absolute".into());
        }
        for m in &self.mounts {
            if !m.destination.is_absolute() || !m.source.is_absolute() {
                return bad(format!("bind mount {m:?} needs absolute paths"));
            }
        }
        if self.hostname.is_empty() || self.hostname.len() > 64 {
            return bad("hostname must be 1..=64 bytes".into());
        }
        Ok(())
    }
}

/// Lifecycle state as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpriteState {
    /// Namespaces and rootfs are set up; PID 1 waits for `start`.
    Created,
    Running,
    /// Frozen by the cgroup freezer (warm sleep): memory kept, no CPU.
    Frozen,
    /// No process left (cold); `delete` or create again.
    Stopped,
}

/// Which isolation engine runs a sprite: den's own containers on the host
/// kernel, or gVisor's user-space kernel (see [`crate::gvisor`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Native,
    Gvisor,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Native => "native",
            Runtime::Gvisor => "gvisor",
        }
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Runtime::Native),
            "gvisor" => Ok(Runtime::Gvisor),
            other => Err(format!("unknown runtime {other:?}: use \"native\" or \"gvisor\"")),
        }
    }
}

/// A created sprite. Plain data, so the manager can keep it in its tables and
/// get it back after a restart with [`Backend::open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    pub id: String,
    /// Host pid of PID 1 (`None` once the engine has forgotten it).
    pub pid: Option<i32>,
    /// Name of the backend that created it.
    pub backend: String,
}

/// An isolation engine.
pub trait Backend: Send + Sync {
    /// Short name, stored in [`Handle::backend`].
    fn name(&self) -> &'static str;
    /// Can PID 1 be handed the host-made listening socket of
    /// [`SpriteSpec::agent_listener`]? If not, it binds its socket in a
    /// bind-mounted directory, and the host must connect to it without
    /// following anything the sprite may have put there.
    fn passes_listeners(&self) -> bool {
        true
    }
    /// Does every process of a sprite run with no_new_privs, so that setuid
    /// binaries (`sudo`) can't elevate? Then the agent brokers `sudo`.
    fn no_new_privs(&self) -> bool {
        false
    }
    /// Set up the sprite and leave PID 1 waiting (state [`SpriteState::Created`]).
    fn create(&self, spec: &SpriteSpec) -> Result<Handle, RuntimeError>;
    /// Let PID 1 exec.
    fn start(&self, handle: &Handle) -> Result<(), RuntimeError>;
    /// [`Self::create`] then [`Self::start`]; on a failed start the sprite is
    /// deleted again. A backend may do both in one step.
    fn run(&self, spec: &SpriteSpec) -> Result<Handle, RuntimeError> {
        let h = self.create(spec)?;
        if let Err(e) = self.start(&h) {
            let _ = self.delete(&h);
            return Err(e);
        }
        Ok(h)
    }
    fn state(&self, handle: &Handle) -> Result<SpriteState, RuntimeError>;
    /// Host pid of PID 1, if it is alive.
    fn pid(&self, handle: &Handle) -> Result<Option<i32>, RuntimeError>;
    /// Warm sleep: stop every process, keep memory. Returns once all are frozen.
    fn freeze(&self, handle: &Handle) -> Result<(), RuntimeError>;
    /// Wake from warm sleep. Always safe to call (also when not frozen).
    fn thaw(&self, handle: &Handle) -> Result<(), RuntimeError>;
    /// Cold stop: SIGTERM to PID 1, SIGKILL to everything after `grace`.
    /// Returns once no process of the sprite is left.
    fn stop(&self, handle: &Handle, grace: Duration) -> Result<(), RuntimeError>;
    /// Forget the sprite (stopping it first if needed): cgroups, engine state.
    /// The upper directory is the caller's and is left alone.
    fn delete(&self, handle: &Handle) -> Result<(), RuntimeError>;
    /// Find a sprite created earlier (e.g. before den restarted).
    fn open(&self, id: &str) -> Result<Option<Handle>, RuntimeError>;
    /// Change the limits of a live sprite to `resources`, as if it had been
    /// created with them. A limit can be changed but not removed: `None`
    /// leaves that limit as it is.
    fn update_resources(&self, handle: &Handle, resources: &Resources) -> Result<(), RuntimeError>;
    /// Rename a live sprite's host (`uname -n`), as if it had been created
    /// with `hostname` (checked like [`SpriteSpec::hostname`]).
    fn set_hostname(&self, handle: &Handle, hostname: &str) -> Result<(), RuntimeError>;
    /// Memory snapshots, on engines that have them (gVisor).
    fn memory(&self) -> Option<&dyn MemorySnapshots> {
        None
    }
}

/// Saving a running sprite's memory and processes, and starting a sprite
/// from such an image instead of booting it.
pub trait MemorySnapshots: Send + Sync {
    /// Save the sprite's whole state into `image_dir` (created if missing).
    /// With `keep_running` the sprite goes on (a frozen one stays frozen);
    /// otherwise it is stopped afterwards. Its disk is not in the image: a
    /// restore needs the disk as it was at this moment.
    fn save(&self, handle: &Handle, image_dir: &Path, keep_running: bool) -> Result<(), RuntimeError>;
    /// Start `spec` from `image_dir` ([`Self::save`]): its processes go on
    /// where they were. Like [`Backend::run`], the sprite must not exist.
    fn restore(&self, spec: &SpriteSpec, image_dir: &Path) -> Result<Handle, RuntimeError>;
    /// Send `signal` to the sprite's PID 1 (how den's agent learns that it
    /// runs again after a save or a restore).
    fn signal_init(&self, handle: &Handle, signal: i32) -> Result<(), RuntimeError>;
}
