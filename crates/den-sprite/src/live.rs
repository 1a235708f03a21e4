//! Booting a sprite (cold → running) and taking it down again.
//!
//! Boot, in order, each step undone if a later one fails:
//! 1. open the volume and mount its ext4 ([`Disk`]), and meanwhile
//! 2. set up the network namespace, veth and firewall entry (den-net);
//! 3. write the sprite's `/etc/resolv.conf`, `/etc/hosts` and policy file;
//! 4. create and start the container (backend), PID 1 = the den agent;
//! 5. wait for the agent to answer on its socket, push the services.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use den_agent::client::Client;
use den_net::{NetManager, NetworkPolicy, SpriteNet};
use den_runtime::{Backend, BindMount, ExitWatch, Handle, SpriteSpec};

use crate::agent_bundle::{AGENT_RUN_DIR, SPRITE_BIN};
use crate::boot_stats::BootPhases;
use crate::disk::Disk;
use crate::error::{Result, SpriteError};
use crate::record::SpriteRecord;

/// Host paths of one sprite while it is awake: `<run>/s/<key>/…`.
#[derive(Debug, Clone)]
pub(crate) struct SpritePaths {
    pub root: PathBuf,
}

impl SpritePaths {
    pub fn new(run_dir: &Path, key: &str) -> Self {
        SpritePaths {
            root: run_dir.join("s").join(key),
        }
    }
    pub fn fuse(&self) -> PathBuf {
        self.root.join("fuse")
    }
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk")
    }
    /// The agent's socket, native backend: made by the runtime shim in this
    /// host-only directory (root's, 0711, never mounted into the sprite) and
    /// passed to PID 1 as a listening descriptor, so no path the sprite can
    /// change (such as a symlink to another sprite's socket) is ever followed.
    pub fn socket(&self) -> PathBuf {
        self.root.join("agent.sock")
    }
    /// Engines that can't pass a listener (gVisor): this directory is the
    /// sprite's `/.sprite/run`, where the agent binds its socket itself. The
    /// sprite can write here, so the host connects with
    /// [`den_agent::client::connect_socket`], which follows no symlink.
    pub fn agent_run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Where the host reaches the agent of a sprite on `backend`.
    pub fn agent_socket(&self, backend: &dyn Backend) -> PathBuf {
        if backend.passes_listeners() {
            self.socket()
        } else {
            self.agent_run_dir().join("agent.sock")
        }
    }
    pub fn etc(&self) -> PathBuf {
        self.root.join("etc")
    }
    pub fn policy_file(&self) -> PathBuf {
        self.etc().join("network.json")
    }
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }
    /// Where a memory image is unpacked for the engine, saving or restoring.
    pub fn memory_image(&self) -> PathBuf {
        self.root.join("memory")
    }
}

/// A sprite that is running or warm.
pub(crate) struct Live {
    pub key: String,
    /// The engine the sprite runs on.
    pub backend: Arc<dyn Backend>,
    pub paths: SpritePaths,
    pub handle: Option<Handle>,
    pub disk: Option<Disk>,
    pub net: Option<SpriteNet>,
    pub agent: Client,
    pub frozen: bool,
    /// PID 1 (the agent). If it exits, the kernel has killed every process of
    /// the sprite and nothing in it can answer again.
    pub init: Option<ExitWatch>,
    /// den's heartbeat to the agent; stops when the sprite is dropped.
    pub heartbeat: Option<Heartbeat>,
    /// How long each phase of this boot took.
    pub phases: BootPhases,
    /// Unique to this boot in this process: whatever was tied to an earlier
    /// boot of the sprite (a connection into its old network namespace) is
    /// recognisably stale.
    pub boot_id: u64,
}

/// Source of [`Live::boot_id`].
static BOOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The task beating the agent's fence timer (see [`den_agent::AgentConfig::fence_ttl`]).
pub(crate) struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(agent: Client, ttl: Duration) -> Heartbeat {
        let every = ttl / 4;
        Heartbeat(tokio::spawn(async move {
            // A failed connection is retried: only a den that is gone (or
            // stuck for the whole TTL) may let the sprite fence itself.
            loop {
                if let Err(e) = agent.heartbeat(every).await {
                    tracing::debug!(error = %e, "agent heartbeat interrupted");
                }
                tokio::time::sleep(every / 2).await;
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Live {
    /// PID 1 is gone: the sprite is dead although nobody stopped it (the
    /// agent crashed, the OOM killer chose it, someone on the host killed it).
    pub fn init_exited(&self) -> bool {
        self.init.as_ref().is_some_and(ExitWatch::exited)
    }
}

/// What boot needs from the manager.
pub(crate) struct BootContext<'a> {
    pub backend: Arc<dyn Backend>,
    pub net: &'a Arc<NetManager>,
    pub store: &'a den_store::Store,
    pub lower: PathBuf,
    pub init: Vec<String>,
    pub bundle_dir: PathBuf,
    pub run_dir: PathBuf,
    pub idmap: den_runtime::image::IdMap,
    pub timeout: Duration,
    pub grace: Duration,
    /// Prepended to the sprite's key to name its container (and cgroup).
    pub container_prefix: String,
    pub fence_ttl: Duration,
    /// Start the sprite from this memory image (a volume of
    /// [`crate::memory_image`]) instead of booting it: its processes go on.
    pub memory_image: Option<String>,
}

/// Run blocking work (mounts, cgroup writes, engine calls) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(SpriteError::join)?
}

pub(crate) async fn boot(ctx: &BootContext<'_>, rec: &SpriteRecord) -> Result<Live> {
    let t0 = Instant::now();
    let paths = SpritePaths::new(&ctx.run_dir, &rec.key);
    prepare_dirs(&paths, ctx.backend.as_ref(), &ctx.idmap)?;
    // The disk and the network don't depend on each other: set them up side
    // by side (each phase is timed from the start of the boot).
    let disk = async {
        let volume = ctx.store.open_volume(&rec.volume).await?;
        let (fuse, mp) = (paths.fuse(), paths.disk());
        let disk = blocking(move || Disk::mount(volume, &fuse, &mp)).await?;
        Ok::<_, SpriteError>((disk, t0.elapsed()))
    };
    let net = async {
        let policy = rec.policy.clone().unwrap_or_else(NetworkPolicy::unrestricted);
        let (netm, key) = (ctx.net.clone(), rec.key.clone());
        let net = blocking(move || Ok(netm.setup_sprite(&key, None, &policy)?)).await?;
        Ok::<_, SpriteError>((net, t0.elapsed()))
    };
    // A memory image comes out of the store meanwhile.
    let image = async {
        match &ctx.memory_image {
            Some(name) => {
                let dir = paths.memory_image();
                let hostname = crate::memory_image::load(ctx.store, name, &dir).await?;
                Ok(Some((dir, hostname)))
            }
            None => Ok(None),
        }
    };
    let (disk, net, image) = tokio::join!(disk, net, image);
    let mut live = Live {
        key: rec.key.clone(),
        backend: ctx.backend.clone(),
        paths: paths.clone(),
        handle: None,
        disk: None,
        net: None,
        agent: Client::new(paths.agent_socket(ctx.backend.as_ref())),
        frozen: false,
        init: None,
        heartbeat: None,
        phases: BootPhases::default(),
        boot_id: BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    };
    let mut failed = None;
    let image = match image {
        Ok(dir) => dir,
        Err(e) => {
            failed = Some(e);
            None
        }
    };
    match disk {
        Ok((disk, took)) => (live.disk, live.phases.disk) = (Some(disk), took),
        Err(e) => failed = Some(e),
    }
    match net {
        Ok((net, took)) => (live.net, live.phases.network) = (Some(net), took),
        Err(e) => {
            failed.get_or_insert(e);
        }
    }
    let res = match failed {
        Some(e) => Err(e),
        None => boot_rest(ctx, rec, &mut live, image.as_ref()).await,
    };
    if let Some((dir, _)) = &image {
        // In the store still; the local copy was only for runsc.
        let _ = std::fs::remove_dir_all(dir);
    }
    match res {
        Ok(()) => {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let p = &live.phases;
            tracing::info!(
                sprite = %rec.name,
                disk_ms = ms(p.disk),
                network_ms = ms(p.network),
                container_ms = ms(p.container),
                agent_ms = ms(p.agent),
                services_ms = ms(p.services),
                total_ms = ms(t0.elapsed()),
                "sprite booted"
            );
            Ok(live)
        }
        Err(e) => {
            let (net, grace) = (ctx.net.clone(), ctx.grace);
            if let Err(e2) = blocking(move || live.teardown(&net, grace)).await {
                tracing::warn!(sprite = %rec.name, error = %e2, "cleaning up after a failed boot");
            }
            Err(e)
        }
    }
}

async fn boot_rest(
    ctx: &BootContext<'_>,
    rec: &SpriteRecord,
    live: &mut Live,
    memory_image: Option<&(PathBuf, String)>,
) -> Result<()> {
    let mut t = Instant::now();
    let mut lap = || {
        let now = Instant::now();
        std::mem::replace(&mut t, now).elapsed()
    };
    let net = live.net.as_ref().expect("boot sets up the network first");
    let netns_path = net.netns_path.clone();
    write_etc(&live.paths, rec.short_name(), *net.dns.ip(), rec.policy.as_ref())?;

    let disk = live.disk.as_ref().expect("boot mounts the disk first");
    let etc = live.paths.etc();
    let file = |name: &str, dest: &str| BindMount {
        source: etc.join(name),
        destination: dest.into(),
        readonly: true,
    };
    let backend = ctx.backend.clone();
    let mut init = ctx.init.clone();
    init.extend(["--fence-ttl-ms".into(), ctx.fence_ttl.as_millis().to_string()]);
    let mut mounts = vec![
        BindMount {
            source: ctx.bundle_dir.clone(),
            destination: SPRITE_BIN.into(),
            readonly: true,
        },
        file("resolv.conf", "/etc/resolv.conf"),
        file("hosts", "/etc/hosts"),
        file("hostname", "/etc/hostname"),
        file("network.json", "/.sprite/policy/network.json"),
    ];
    if backend.no_new_privs() {
        init.extend(["--sudo-broker".into(), den_agent::sudo::DEFAULT_SOCKET.into()]);
        // Only over an image's own sudo: nothing appears where none was.
        if ctx.lower.join("usr/bin/sudo").exists() {
            mounts.push(BindMount {
                source: ctx.bundle_dir.join(crate::agent_bundle::SUDO_SCRIPT),
                destination: "/usr/bin/sudo".into(),
                readonly: true,
            });
        }
    }
    let agent_listener = if backend.passes_listeners() {
        init.extend(["--listen-fd".into(), den_runtime::AGENT_LISTEN_FD.to_string()]);
        Some(live.paths.socket())
    } else {
        mounts.push(BindMount {
            source: live.paths.agent_run_dir(),
            destination: AGENT_RUN_DIR.into(),
            readonly: false,
        });
        None
    };
    let spec = SpriteSpec {
        id: format!("{}{}", ctx.container_prefix, rec.key),
        rootfs_lower: ctx.lower.clone(),
        upper_dir: disk.upper(),
        work_dir: disk.work(),
        hostname: rec.short_name().to_string(),
        idmap: ctx.idmap.clone(),
        netns_path: Some(netns_path),
        init,
        env: vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "LANG=C.UTF-8".into(),
        ],
        mounts,
        resources: rec.resources,
        console_log: Some(live.paths.console_log()),
        agent_listener,
    };
    let image = memory_image.cloned();
    let hostname = spec.hostname.clone();
    let handle = blocking(move || match image {
        Some((dir, saved_as)) => {
            let memory = memory_of(backend.as_ref())?;
            let handle = memory.restore(&spec, &dir)?;
            // The image may be another sprite's (a fork of a memory
            // checkpoint): its kernel still has that sprite's name. Then
            // the agent, quiesced when the image was saved, serves again.
            let renamed = if saved_as == hostname {
                Ok(())
            } else {
                backend.set_hostname(&handle, &hostname)
            };
            if let Err(e) = renamed {
                let _ = backend.delete(&handle);
                return Err(e.into());
            }
            Ok((handle, true))
        }
        None => Ok((backend.run(&spec)?, false)),
    })
    .await?;
    let (handle, restored) = handle;
    let mut resume = restored.then(|| AgentResume::new(ctx.backend.clone(), handle.clone()));
    live.handle = Some(handle.clone());
    let init = handle
        .pid
        .ok_or_else(|| SpriteError::BootFailed {
            sprite: rec.name.clone(),
            detail: "the engine reported no PID 1".into(),
        })
        .and_then(|pid| {
            ExitWatch::new(pid).map_err(|e| SpriteError::BootFailed {
                sprite: rec.name.clone(),
                detail: format!(
                    "PID 1 ({pid}) exited at once: {e}; console: {}",
                    tail(&live.paths.console_log(), 2000)
                ),
            })
        })?;
    live.phases.container = lap();
    wait_for_agent(ctx, rec, &live.agent, &init, &live.paths, resume.as_mut()).await?;
    live.phases.agent = lap();
    live.init = Some(init);
    live.heartbeat = Some(Heartbeat::start(live.agent.clone(), ctx.fence_ttl));
    if !rec.services.is_empty() {
        live.agent.services_set(&rec.services).await?;
    }
    live.phases.services = lap();
    Ok(())
}

/// The engine's memory snapshots, or why there are none.
fn memory_of(backend: &dyn Backend) -> Result<&dyn den_runtime::MemorySnapshots> {
    backend
        .memory()
        .ok_or_else(|| SpriteError::Invalid(format!("the {} engine keeps no memory images", backend.name())))
}

/// Has a quiesced agent (in a sprite restored from memory, or after a
/// memory checkpoint) serve again: [`den_agent::RESUME_SIGNAL`], repeated
/// while the agent does not answer. Once, in CI, a single signal sent just
/// after `runsc restore` returned was never acted on; the agent forgets
/// extra ones when it next quiesces.
pub(crate) struct AgentResume {
    backend: Arc<dyn Backend>,
    handle: Handle,
    next: Instant,
}

impl AgentResume {
    const AGAIN_AFTER: Duration = Duration::from_millis(250);

    pub(crate) fn new(backend: Arc<dyn Backend>, handle: Handle) -> Self {
        AgentResume {
            backend,
            handle,
            next: Instant::now(),
        }
    }

    /// Signals the agent, unless it was signalled less than
    /// [`Self::AGAIN_AFTER`] ago.
    pub(crate) async fn nudge(&mut self) -> Result<()> {
        if Instant::now() < self.next {
            return Ok(());
        }
        let (backend, handle) = (self.backend.clone(), self.handle.clone());
        blocking(move || {
            let memory = memory_of(backend.as_ref())?;
            Ok(memory.signal_init(&handle, den_agent::RESUME_SIGNAL)?)
        })
        .await?;
        self.next = Instant::now() + Self::AGAIN_AFTER;
        Ok(())
    }
}

/// The agent binds its socket as soon as it runs; poll it (a connect costs
/// microseconds) and give up early if PID 1 died. `resume` wakes an agent
/// that was restored quiesced.
async fn wait_for_agent(
    ctx: &BootContext<'_>,
    rec: &SpriteRecord,
    agent: &Client,
    init: &ExitWatch,
    paths: &SpritePaths,
    mut resume: Option<&mut AgentResume>,
) -> Result<()> {
    let deadline = Instant::now() + ctx.timeout;
    loop {
        if let Some(r) = resume.as_deref_mut() {
            r.nudge().await?;
        }
        let last_err = match agent.ping().await {
            Ok(()) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if init.exited() {
            return Err(SpriteError::BootFailed {
                sprite: rec.name.clone(),
                detail: format!("PID 1 exited; console: {}", tail(&paths.console_log(), 2000)),
            });
        }
        if Instant::now() >= deadline {
            return Err(SpriteError::BootTimeout {
                sprite: rec.name.clone(),
                after: ctx.timeout,
                detail: format!("{last_err}; console: {}", tail(&paths.console_log(), 2000)),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(crate) fn tail(p: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].trim().to_string()
}

fn prepare_dirs(paths: &SpritePaths, backend: &dyn Backend, idmap: &den_runtime::image::IdMap) -> Result<()> {
    let mk = |p: &Path, mode: u32| -> Result<()> {
        std::fs::create_dir_all(p).map_err(|e| SpriteError::io(format!("creating {}", p.display()), e))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| SpriteError::io(format!("chmod {}", p.display()), e))
    };
    // PID 1 starts as the sprite's root, an unprivileged host uid: it must be
    // able to traverse to its bind-mount sources.
    mk(&paths.root, 0o711)?;
    mk(&paths.etc(), 0o755)?;
    // The agent directory of older versions, writable by the sprite's root.
    let _ = std::fs::remove_dir_all(paths.root.join("agent"));
    let _ = std::fs::remove_file(paths.socket());
    // Made afresh for each boot: nothing an earlier boot's root left there
    // (a symlink, a socket of its own) survives.
    let run = paths.agent_run_dir();
    let _ = std::fs::remove_dir_all(&run);
    if !backend.passes_listeners() {
        mk(&run, 0o700)?;
        // The agent binds its socket here as the sprite's root.
        let (uid, gid) = (idmap.uid_to_host(0), idmap.gid_to_host(0));
        std::os::unix::fs::chown(&run, uid, gid)
            .map_err(|e| SpriteError::io(format!("chown {}", run.display()), e))?;
    }
    Ok(())
}

pub(crate) fn write_etc(
    paths: &SpritePaths,
    name: &str,
    dns: std::net::Ipv4Addr,
    policy: Option<&NetworkPolicy>,
) -> Result<()> {
    let w = |file: &str, text: String| -> Result<()> {
        let p = paths.etc().join(file);
        std::fs::write(&p, text).map_err(|e| SpriteError::io(format!("writing {}", p.display()), e))
    };
    w("resolv.conf", format!("nameserver {dns}\noptions edns0\n"))?;
    // The image's own /etc/hostname names no sprite; tools that read the file
    // instead of uname must see the same name as `hostname`.
    w("hostname", format!("{name}\n"))?;
    w(
        "hosts",
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    )?;
    write_policy_file(paths, policy)
}

/// The sprite can read its policy (not change it) at `/.sprite/policy/network.json`.
/// Written in place, so the bind mount of a running sprite sees the change.
pub(crate) fn write_policy_file(paths: &SpritePaths, policy: Option<&NetworkPolicy>) -> Result<()> {
    let p = paths.policy_file();
    let unrestricted = NetworkPolicy::unrestricted();
    let text = serde_json::to_string_pretty(policy.unwrap_or(&unrestricted)).unwrap_or_default();
    std::fs::write(&p, text + "\n").map_err(|e| SpriteError::io(format!("writing {}", p.display()), e))
}

impl Live {
    /// Stop everything (blocking): processes, filesystem, network. Keeps going
    /// after a failed step so nothing is left behind, and reports the first error.
    pub fn teardown(mut self, net: &NetManager, grace: Duration) -> Result<()> {
        let backend = self.backend.clone();
        let mut first: Option<SpriteError> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "sprite teardown step failed");
                first.get_or_insert(e);
            }
        };
        if let Some(h) = self.handle.take() {
            // A frozen sprite can't handle SIGTERM.
            let _ = backend.thaw(&h);
            note(backend.stop(&h, grace).map_err(Into::into));
            note(backend.delete(&h).map_err(Into::into));
        }
        // With every process gone, the filesystem and the network no longer
        // depend on each other: take them down side by side.
        let (disk, had_net, key) = (self.disk.take(), self.net.take().is_some(), &self.key);
        let (unmounted, net_down) = std::thread::scope(|s| {
            let net_down = had_net.then(|| s.spawn(|| net.teardown_sprite(key)));
            let unmounted = disk.map(Disk::unmount);
            (unmounted, net_down.map(|t| t.join()))
        });
        if let Some(r) = unmounted {
            note(r);
        }
        match net_down {
            Some(Ok(r)) => note(r.map_err(Into::into)),
            Some(Err(_)) => note(Err(SpriteError::io(
                "taking the network down",
                std::io::Error::other("the teardown thread panicked"),
            ))),
            None => {}
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
