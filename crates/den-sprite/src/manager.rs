//! [`SpriteManager`]: the sprites of one host and their lifecycle.
//!
//! ```text
//!            wake (exec, proxy, URL, API)             idle ≥ warm_after
//!   cold ───────────────────────────────► running ───────────────────► warm
//!    ▲         boot: disk, net, container    ▲  ◄────── wake (thaw) ────┘
//!    └────────── idle ≥ cold_after ──────────┴───────────────────────────┘
//! ```
//!
//! Every transition of one sprite runs under that sprite's phase lock, so a
//! wake can never race a freeze or a stop. Callers that use a sprite hold an
//! [`Activity`]: while one exists (or an exec session runs inside), the
//! sprite does not go to sleep.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use den_agent::client::Client;
use den_agent::protocol::ServiceDef;
use den_net::dns::DnsForwarder;
use den_net::{NetManager, NetworkPolicy};
use den_runtime::container::{ContainerBackend, ShimCommand};
use den_runtime::image::{Image, LogProgress};
use den_runtime::{Backend, Resources};
use den_store::{CheckpointRecord, Store, StoreError, VolumeSource};
use parking_lot::Mutex;
use tokio::sync::Mutex as AsyncMutex;

use crate::agent_bundle::AgentBundle;
use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{Admission, ManagerConfig};
use crate::disk;
use crate::error::{Result, SpriteError};
use crate::live::{self, BootContext, Live, SpritePaths, blocking};
use crate::record::{SpriteInfo, SpriteRecord, SpriteStatus, StorageStatus, now_ms, validate_key};

/// How long a node waits for another node's fresh template to be uploaded.
const TEMPLATE_DURABLE: Duration = Duration::from_secs(120);

/// What a new sprite starts with.
#[derive(Debug, Clone, Default)]
pub struct CreateSprite {
    /// API-owned attributes (url settings, labels, config, environment).
    pub attrs: serde_json::Value,
    /// Limits; the manager's defaults when `None`.
    pub resources: Option<Resources>,
    pub policy: Option<NetworkPolicy>,
}

pub(crate) enum Phase {
    Cold,
    Awake(Box<Live>),
}

/// One sprite's in-memory state.
pub(crate) struct Slot {
    name: String,
    record: Mutex<SpriteRecord>,
    phase: AsyncMutex<Phase>,
    status: AtomicU8,
    holds: AtomicUsize,
    last_active: Mutex<Instant>,
    deleted: AtomicBool,
}

impl Slot {
    fn new(rec: SpriteRecord) -> Arc<Slot> {
        Arc::new(Slot {
            name: rec.name.clone(),
            record: Mutex::new(rec),
            phase: AsyncMutex::new(Phase::Cold),
            status: AtomicU8::new(SpriteStatus::Cold as u8),
            holds: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            deleted: AtomicBool::new(false),
        })
    }

    fn status(&self) -> SpriteStatus {
        match self.status.load(Ordering::Acquire) {
            x if x == SpriteStatus::Running as u8 => SpriteStatus::Running,
            x if x == SpriteStatus::Warm as u8 => SpriteStatus::Warm,
            _ => SpriteStatus::Cold,
        }
    }

    fn set_status(&self, s: SpriteStatus) {
        self.status.store(s as u8, Ordering::Release);
    }

    fn touch(&self) {
        *self.last_active.lock() = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_active.lock().elapsed()
    }

    fn info(&self) -> SpriteInfo {
        SpriteInfo {
            record: self.record.lock().clone(),
            status: self.status(),
            storage: StorageStatus::Ok,
        }
    }
}

/// Keeps a sprite awake while it exists, and gives access to its agent.
pub struct Activity {
    slot: Arc<Slot>,
    agent: Client,
    addr: Ipv4Addr,
    netns: Option<String>,
}

impl Activity {
    /// The sprite's agent (exec, sessions, services, ports).
    pub fn agent(&self) -> &Client {
        &self.agent
    }

    /// The sprite's address, reachable from the host (for proxies and URLs).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// The sprite's network namespace (for [`den_net::netns::run_in`]):
    /// sockets made there reach the sprite's loopback listeners too.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.slot.touch();
        self.slot.holds.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ManagerConfig,
    store: Store,
    catalog: Arc<dyn Catalog>,
    backend: Arc<dyn Backend>,
    net: Arc<NetManager>,
    dns: AsyncMutex<Option<DnsForwarder>>,
    image: Image,
    lowers: Mutex<HashMap<String, PathBuf>>,
    bundle: AgentBundle,
    templates: AsyncMutex<HashMap<String, (String, String)>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    shutting_down: AtomicBool,
    /// Sprites admitted to wake whose status is not awake yet (see
    /// [`SpriteManager::admit`]); its lock is the admission lock.
    booting: Mutex<HashMap<String, den_runtime::Resources>>,
    admission: Mutex<Option<Arc<dyn Admission>>>,
}

/// A sprite's place among the awake ones while it boots.
struct Admitted {
    inner: Arc<Inner>,
    name: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.inner.booting.lock().remove(&self.name);
    }
}

/// The sprites of this host. Cheap to clone.
#[derive(Clone)]
pub struct SpriteManager {
    inner: Arc<Inner>,
}

impl SpriteManager {
    /// Open the catalog, make sure the base image exists (building it the
    /// first time, with progress in the log), clean up whatever a crashed
    /// earlier run left, and start the idle monitor. Every sprite starts cold.
    pub async fn start(cfg: ManagerConfig, store: Store) -> Result<SpriteManager> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| SpriteError::io(format!("creating {}", cfg.data_dir.display()), e))?;
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&cfg.data_dir.join("sprites.db"))?);
        Self::start_with_catalog(cfg, store, catalog).await
    }

    /// [`SpriteManager::start`] with records kept in `catalog` instead of the
    /// node-local `sprites.db` (cluster mode passes a shared one).
    pub async fn start_with_catalog(
        cfg: ManagerConfig,
        store: Store,
        catalog: Arc<dyn Catalog>,
    ) -> Result<SpriteManager> {
        for d in [&cfg.data_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| SpriteError::io(format!("creating {}", d.display()), e))?;
            traversable(d)?;
        }
        // The agent bundle lives under the data dir, disks and image views
        // under the run dir; a sprite's root must be able to walk to both.
        reachable_by_sprites(&[&cfg.data_dir, &cfg.run_dir], &cfg.idmap)?;
        // First: a predecessor stuck dying still holds ports and locks.
        let run_dir = cfg.run_dir.clone();
        blocking(move || disk::claim_run_dir(&run_dir)).await?;
        let base = cfg.base_image();
        let image = blocking(move || Ok(base.ensure(&LogProgress)?)).await?;
        let (exe, bundles) = (cfg.den_exe.clone(), cfg.data_dir.join("agent"));
        let bundle = blocking(move || AgentBundle::prepare(&bundles, &exe)).await?;
        let shim = ShimCommand {
            program: cfg.den_exe.clone(),
            args: vec![crate::helper_cmd::SHIM_SUBCOMMAND.into()],
        };
        let backend: Arc<dyn Backend> = Arc::new(ContainerBackend::new(cfg.run_dir.join("ctr"), shim)?);
        let netcfg = cfg.net.clone();
        let net = blocking(move || Ok(NetManager::new(netcfg)?)).await?;
        let dns = DnsForwarder::start(net.clone())?;

        let records = catalog.list().await?;
        recover(&cfg, backend.as_ref(), &net)?;
        disk::share_run_dir(&cfg.run_dir)?;
        let slots = records
            .into_iter()
            .map(|r| (r.name.clone(), Slot::new(r)))
            .collect();
        let inner = Arc::new(Inner {
            cfg,
            store,
            catalog,
            backend,
            net,
            dns: AsyncMutex::new(Some(dns)),
            image,
            lowers: Mutex::new(HashMap::new()),
            bundle,
            templates: AsyncMutex::new(HashMap::new()),
            slots: Mutex::new(slots),
            shutting_down: AtomicBool::new(false),
            booting: Mutex::new(HashMap::new()),
            admission: Mutex::new(None),
        });
        tokio::spawn(crate::idle::run(Arc::downgrade(&inner)));
        Ok(SpriteManager { inner })
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.inner.cfg
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Version of the base image new sprites get.
    pub fn image_version(&self) -> &str {
        self.inner.image.version()
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>> {
        self.inner
            .slots
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| SpriteError::NotFound(name.to_string()))
    }

    pub fn get(&self, name: &str) -> Result<SpriteInfo> {
        Ok(self.with_storage(self.slot(name)?.info()))
    }

    /// Every sprite, ordered by name.
    pub fn list(&self) -> Vec<SpriteInfo> {
        let mut v: Vec<SpriteInfo> = self.inner.slots.lock().values().map(|s| s.info()).collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v.into_iter().map(|i| self.with_storage(i)).collect()
    }

    /// Fill in whether the sprite's writes wait for space on the data disk.
    fn with_storage(&self, mut info: SpriteInfo) -> SpriteInfo {
        if self.inner.store.volume_blocked_on_disk(&info.record.volume) {
            info.storage = StorageStatus::DiskFull;
        }
        info
    }

    /// Create a sprite (cold). Its disk is a fork of the pre-formatted
    /// template: nothing is formatted or copied.
    /// `name` is the sprite's key ([`crate::sprite_key`]).
    pub async fn create(&self, name: &str, opts: CreateSprite) -> Result<SpriteInfo> {
        self.check_running()?;
        validate_key(name)?;
        if self.inner.slots.lock().contains_key(name) {
            return Err(SpriteError::Exists(name.to_string()));
        }
        let version = self.inner.image.version().to_string();
        let (tvol, tck) = self.template(&version).await?;
        let key = new_key();
        let volume = format!("sprite-{key}");
        self.inner
            .store
            .fork(
                &volume,
                VolumeSource::Checkpoint {
                    volume: tvol,
                    checkpoint: tck,
                },
            )
            .await?;
        let now = now_ms();
        let rec = SpriteRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            key,
            volume,
            image: version,
            created_at_ms: now,
            updated_at_ms: now,
            last_running_at_ms: None,
            last_warming_at_ms: None,
            policy: opts.policy,
            services: Vec::new(),
            active_checkpoint: None,
            resources: opts.resources.unwrap_or(self.inner.cfg.resources),
            attrs: opts.attrs,
        };
        self.insert(rec).await
    }

    /// Register a new record, undoing its volume if the name was taken meanwhile.
    async fn insert(&self, rec: SpriteRecord) -> Result<SpriteInfo> {
        let slot = {
            let mut slots = self.inner.slots.lock();
            if slots.contains_key(&rec.name) {
                None
            } else {
                let slot = Slot::new(rec.clone());
                slots.insert(rec.name.clone(), slot.clone());
                Some(slot)
            }
        };
        let Some(slot) = slot else {
            let _ = self.inner.store.delete_volume(&rec.volume).await;
            return Err(SpriteError::Exists(rec.name));
        };
        if let Err(e) = self.inner.catalog.insert(&rec).await {
            self.inner.slots.lock().remove(&rec.name);
            let _ = self.inner.store.delete_volume(&rec.volume).await;
            return Err(e);
        }
        Ok(slot.info())
    }

    /// The ext4 template for an image version: made once, then forked.
    async fn template(&self, version: &str) -> Result<(String, String)> {
        let mut cache = self.inner.templates.lock().await;
        if let Some(t) = cache.get(version) {
            return Ok(t.clone());
        }
        let gib = self.inner.cfg.disk_size >> 30;
        let name = format!("template-{version}-{gib}g");
        const MARK: &str = "den template";
        let store = &self.inner.store;
        // In a cluster another node may be making the same template right
        // now: its half-made volume is fenced against us, so wait for it.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let retry = match store.list_checkpoints(&name).await {
                Ok(cks) => {
                    if let Some(ck) = cks.iter().find(|c| c.comment == MARK) {
                        // Made by another node whose uploads may still run:
                        // a fork of it here must not name chunks only that
                        // node's disk has.
                        if !ck.durable {
                            tokio::time::timeout(TEMPLATE_DURABLE, store.wait_durable(&name, &ck.id))
                                .await
                                .map_err(|_| {
                                    SpriteError::Catalog(format!(
                                        "template {name} never reached the object store"
                                    ))
                                })??;
                        }
                        let t = (name.clone(), ck.id.clone());
                        cache.insert(version.to_string(), t.clone());
                        return Ok(t);
                    }
                    // Left half-made by a crash (or still being made elsewhere).
                    match store.delete_volume(&name).await {
                        Ok(()) => false,
                        Err(StoreError::Fenced(_)) => true,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(StoreError::VolumeNotFound(_)) => false,
                Err(e) => return Err(e.into()),
            };
            if !retry {
                match store
                    .create_volume(
                        &name,
                        den_store::CreateOptions {
                            size: Some(self.inner.cfg.disk_size),
                            ..Default::default()
                        },
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(StoreError::VolumeExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() > deadline {
                return Err(SpriteError::Catalog(format!("template {name} is never finished")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let t0 = Instant::now();
        let vol = store.open_volume(&name).await?;
        let dir = self.inner.cfg.run_dir.join("template");
        let (uid, gid) = (
            self.inner.cfg.idmap.uid_to_host(0).unwrap_or(0),
            self.inner.cfg.idmap.gid_to_host(0).unwrap_or(0),
        );
        blocking(move || disk::format_template(vol, &dir.join("fuse"), &dir.join("disk"), uid, gid)).await?;
        let ck = store.checkpoint(&name, MARK).await?;
        // Other nodes fork it from the shared store; a single host waits
        // only for its local chunk directory.
        store.wait_durable(&name, &ck.id).await?;
        tracing::info!(template = %name, ms = t0.elapsed().as_secs_f64() * 1e3, "made the sprite disk template");
        let t = (name, ck.id);
        cache.insert(version.to_string(), t.clone());
        Ok(t)
    }

    fn lower_for(&self, version: &str) -> Result<PathBuf> {
        if let Some(p) = self.inner.lowers.lock().get(version) {
            return Ok(p.clone());
        }
        let image = if version == self.inner.image.version() {
            self.inner.image.clone()
        } else {
            Image::open(
                self.inner
                    .image
                    .dir()
                    .parent()
                    .unwrap_or(std::path::Path::new("/")),
                version,
            )?
        };
        let lower = image.lower_dir_in(&self.inner.cfg.idmap, &self.inner.cfg.lowers_dir())?;
        self.inner
            .lowers
            .lock()
            .insert(version.to_string(), lower.path.clone());
        Ok(lower.path)
    }

    fn boot_context(&self, version: &str) -> Result<BootContext<'_>> {
        let i = &self.inner;
        Ok(BootContext {
            backend: &i.backend,
            net: &i.net,
            store: &i.store,
            lower: self.lower_for(version)?,
            init: i.bundle.init.clone(),
            bundle_dir: i.bundle.dir.clone(),
            run_dir: i.cfg.run_dir.clone(),
            idmap: i.cfg.idmap.clone(),
            timeout: i.cfg.boot_timeout,
            grace: i.cfg.stop_grace,
            container_prefix: i.cfg.container_prefix.clone(),
            fence_ttl: i.cfg.fence_ttl,
        })
    }

    fn check_running(&self) -> Result<()> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(SpriteError::ShuttingDown);
        }
        Ok(())
    }

    /// Make sure the sprite runs (booting or thawing it) and keep it awake
    /// while the returned [`Activity`] lives.
    pub async fn wake(&self, name: &str) -> Result<Activity> {
        self.check_running()?;
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if slot.deleted.load(Ordering::Acquire) {
            return Err(SpriteError::NotFound(name.to_string()));
        }
        self.check_running()?;
        if let Phase::Awake(live) = &*phase
            && live.init_exited()
        {
            tracing::warn!(
                sprite = %name,
                console = %live::tail(&live.paths.console_log(), 500),
                "the sprite's PID 1 exited on its own; booting it again"
            );
            self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await?;
        }
        // Holds this sprite's place among the awake ones until its status
        // says so (or the wake fails).
        let mut admitted = None;
        if matches!(*phase, Phase::Cold) {
            // Cluster mode: boot only a sprite whose lease this node holds
            // (checked under the phase lock, which hand-off also takes).
            let volume = slot.record.lock().volume.clone();
            if self.inner.store.config().node.is_some() && self.inner.store.held_epoch(&volume).is_none() {
                return Err(SpriteError::NotOwner(name.to_string()));
            }
            let rec = slot.record.lock().clone();
            admitted = Some(self.admit(&rec)?);
            let live = live::boot(&self.boot_context(&rec.image)?, &rec).await?;
            *phase = Phase::Awake(Box::new(live));
            self.update_record(&slot, |r| r.last_running_at_ms = Some(now_ms()))
                .await?;
        }
        let Phase::Awake(live) = &mut *phase else {
            unreachable!("booted above")
        };
        if live.frozen {
            if let Some(h) = &live.handle {
                self.inner.backend.thaw(h)?;
            }
            live.frozen = false;
        }
        slot.set_status(SpriteStatus::Running);
        drop(admitted);
        slot.holds.fetch_add(1, Ordering::AcqRel);
        slot.touch();
        Ok(Activity {
            agent: live.agent.clone(),
            addr: live.net.as_ref().map(|n| n.addr).unwrap_or(Ipv4Addr::UNSPECIFIED),
            netns: live.net.as_ref().map(|n| n.netns.clone()),
            slot: slot.clone(),
        })
    }

    /// Let a cold sprite boot, or refuse: the server-wide `max_awake`, then
    /// the admission hook. The check and the reservation happen under one
    /// lock, and the reservation lasts until the sprite's status is awake,
    /// so two wakes racing for the last place can't both pass (each sees
    /// the other either booting or awake).
    fn admit(&self, rec: &SpriteRecord) -> Result<Admitted> {
        let mut booting = self.inner.booting.lock();
        let mut awake: HashMap<String, den_runtime::Resources> = booting.clone();
        for s in self.inner.slots.lock().values() {
            if s.status() != SpriteStatus::Cold {
                awake.insert(s.name.clone(), s.record.lock().resources);
            }
        }
        awake.remove(&rec.name);
        if let Some(limit) = self.inner.cfg.max_awake
            && awake.len() >= limit
        {
            return Err(SpriteError::AwakeLimit {
                awake: awake.len(),
                limit,
            });
        }
        if let Some(hook) = self.inner.admission.lock().clone() {
            let awake: Vec<(String, den_runtime::Resources)> = awake.into_iter().collect();
            hook.admit(&rec.name, &rec.resources, &awake)?;
        }
        booting.insert(rec.name.clone(), rec.resources);
        Ok(Admitted {
            inner: self.inner.clone(),
            name: rec.name.clone(),
        })
    }

    /// Install the hook that decides, with `max_awake`, whether a sprite may
    /// wake (den-server: the organisations' quotas).
    pub fn set_admission(&self, hook: Arc<dyn Admission>) {
        *self.inner.admission.lock() = Some(hook);
    }

    /// Sprites that are running or warm.
    pub fn awake_count(&self) -> usize {
        self.inner
            .slots
            .lock()
            .values()
            .filter(|s| s.status() != SpriteStatus::Cold)
            .count()
    }

    /// Put a sprite to sleep now: `Warm` freezes it, `Cold` stops it.
    pub async fn sleep(&self, name: &str, level: SpriteStatus) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        self.sleep_locked(&slot, &mut phase, level).await
    }

    pub(crate) async fn sleep_locked(
        &self,
        slot: &Slot,
        phase: &mut Phase,
        level: SpriteStatus,
    ) -> Result<()> {
        match level {
            SpriteStatus::Running => Ok(()),
            SpriteStatus::Warm => {
                if let Phase::Awake(live) = phase
                    && !live.frozen
                {
                    if let Some(h) = &live.handle {
                        let (b, h) = (self.inner.backend.clone(), h.clone());
                        blocking(move || Ok(b.freeze(&h)?)).await?;
                    }
                    live.frozen = true;
                    slot.set_status(SpriteStatus::Warm);
                    self.update_record(slot, |r| r.last_warming_at_ms = Some(now_ms()))
                        .await?;
                }
                Ok(())
            }
            SpriteStatus::Cold => {
                if let Phase::Awake(_) = phase {
                    let Phase::Awake(live) = std::mem::replace(phase, Phase::Cold) else {
                        unreachable!()
                    };
                    slot.set_status(SpriteStatus::Cold);
                    let (b, n, g) = (
                        self.inner.backend.clone(),
                        self.inner.net.clone(),
                        self.inner.cfg.stop_grace,
                    );
                    blocking(move || live.teardown(b.as_ref(), &n, g)).await?;
                    if self.inner.cfg.flush_on_cold {
                        let volume = slot.record.lock().volume.clone();
                        self.inner.store.flush(&volume, |_| {}).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn update_record(&self, slot: &Slot, f: impl FnOnce(&mut SpriteRecord)) -> Result<SpriteInfo> {
        let rec = {
            let mut r = slot.record.lock();
            f(&mut r);
            r.updated_at_ms = now_ms();
            r.clone()
        };
        self.inner.catalog.update(&rec).await?;
        Ok(slot.info())
    }

    /// Change the API-owned attributes.
    pub async fn update_attrs(
        &self,
        name: &str,
        f: impl FnOnce(&mut serde_json::Value),
    ) -> Result<SpriteInfo> {
        let slot = self.slot(name)?;
        let _phase = slot.phase.lock().await;
        self.update_record(&slot, |r| f(&mut r.attrs)).await
    }

    /// Destroy a sprite: its processes, disk and checkpoints.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if slot.deleted.load(Ordering::Acquire) {
            return Err(SpriteError::NotFound(name.to_string()));
        }
        self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await?;
        let volume = slot.record.lock().volume.clone();
        match when_released(|| self.inner.store.delete_volume(&volume)).await {
            Ok(()) | Err(StoreError::VolumeNotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.inner.catalog.delete(name).await?;
        slot.deleted.store(true, Ordering::Release);
        self.inner.slots.lock().remove(name);
        let _ =
            std::fs::remove_dir_all(SpritePaths::new(&self.inner.cfg.run_dir, &slot.record.lock().key).root);
        Ok(())
    }

    /// Snapshot the sprite's disk. A running sprite is frozen for the moment
    /// it takes to sync its filesystem and record the chunk map; its
    /// processes see a pause, nothing else.
    pub async fn checkpoint(&self, name: &str, comment: &str) -> Result<CheckpointRecord> {
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let volume = slot.record.lock().volume.clone();
        match &*phase {
            Phase::Cold => Ok(self.inner.store.checkpoint(&volume, comment).await?),
            Phase::Awake(live) => {
                let comment = comment.to_string();
                self.while_frozen(live, move |vol| Ok(vol.checkpoint(&comment)?))
                    .await
            }
        }
    }

    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointRecord>> {
        let volume = self.slot(name)?.record.lock().volume.clone();
        let mut v = self.inner.store.list_checkpoints(&volume).await?;
        v.sort_by_key(|c| std::cmp::Reverse(c.seq));
        Ok(v)
    }

    pub async fn get_checkpoint(&self, name: &str, id: &str) -> Result<CheckpointRecord> {
        let volume = self.slot(name)?.record.lock().volume.clone();
        self.inner
            .store
            .get_checkpoint(&volume, id)
            .await
            .map_err(|e| ck_err(e, name, id))
    }

    /// Delete a checkpoint; the one the sprite was last restored to can't be.
    pub async fn delete_checkpoint(&self, name: &str, id: &str) -> Result<()> {
        let ck = self.get_checkpoint(name, id).await?;
        let slot = self.slot(name)?;
        let (volume, active) = {
            let r = slot.record.lock();
            (r.volume.clone(), r.active_checkpoint.clone())
        };
        if active.as_deref() == Some(ck.id.as_str()) {
            return Err(SpriteError::Conflict(format!(
                "cannot delete active checkpoint {}",
                ck.id
            )));
        }
        Ok(self.inner.store.delete_checkpoint(&volume, &ck.id).await?)
    }

    /// Rewind the sprite's disk to a checkpoint. An awake sprite is stopped
    /// (its sessions end), rewound and started again (services restart).
    pub async fn restore(&self, name: &str, id: &str) -> Result<CheckpointRecord> {
        let ck = self.get_checkpoint(name, id).await?;
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        let was_awake = matches!(*phase, Phase::Awake(_));
        self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await?;
        let volume = slot.record.lock().volume.clone();
        when_released(|| self.inner.store.restore(&volume, &ck.id)).await?;
        self.update_record(&slot, |r| r.active_checkpoint = Some(ck.id.clone()))
            .await?;
        if was_awake {
            let rec = slot.record.lock().clone();
            let live = live::boot(&self.boot_context(&rec.image)?, &rec).await?;
            *phase = Phase::Awake(Box::new(live));
            slot.set_status(SpriteStatus::Running);
            slot.touch();
        }
        Ok(ck)
    }

    /// A new sprite from a checkpoint of `source`, or from its live state
    /// (frozen and synced for the instant the fork takes). Settings (policy,
    /// services, limits, attributes) are copied; `attrs` replaces the latter.
    pub async fn fork(
        &self,
        source: &str,
        new_name: &str,
        checkpoint: Option<&str>,
        attrs: Option<serde_json::Value>,
    ) -> Result<SpriteInfo> {
        self.check_running()?;
        validate_key(new_name)?;
        if self.inner.slots.lock().contains_key(new_name) {
            return Err(SpriteError::Exists(new_name.to_string()));
        }
        let src = self.slot(source)?;
        let src_rec = src.record.lock().clone();
        let key = new_key();
        let volume = format!("sprite-{key}");
        let store = &self.inner.store;
        match checkpoint {
            Some(id) => {
                let ck = self.get_checkpoint(source, id).await?;
                store
                    .fork(
                        &volume,
                        VolumeSource::Checkpoint {
                            volume: src_rec.volume.clone(),
                            checkpoint: ck.id,
                        },
                    )
                    .await?;
            }
            None => {
                let phase = src.phase.lock().await;
                let live_src = VolumeSource::Volume(src_rec.volume.clone());
                match &*phase {
                    Phase::Cold => {
                        store.fork(&volume, live_src).await?;
                    }
                    Phase::Awake(live) => {
                        let (backend, handle, frozen) =
                            (self.inner.backend.clone(), live.handle.clone(), live.frozen);
                        let mp = live.disk.as_ref().expect("awake").mountpoint().to_path_buf();
                        let guard = blocking(move || {
                            let g = FreezeGuard::new(backend, handle, frozen)?;
                            disk::syncfs(&mp)?;
                            Ok(g)
                        })
                        .await?;
                        let res = store.fork(&volume, live_src).await;
                        drop(guard);
                        res?;
                    }
                }
            }
        }
        let now = now_ms();
        let rec = SpriteRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: new_name.to_string(),
            key,
            volume,
            image: src_rec.image,
            created_at_ms: now,
            updated_at_ms: now,
            last_running_at_ms: None,
            last_warming_at_ms: None,
            policy: src_rec.policy,
            services: src_rec.services,
            active_checkpoint: None,
            resources: src_rec.resources,
            attrs: attrs.unwrap_or(src_rec.attrs),
        };
        self.insert(rec).await
    }

    pub fn policy(&self, name: &str) -> Result<Option<NetworkPolicy>> {
        Ok(self.slot(name)?.record.lock().policy.clone())
    }

    /// Store a new egress policy and, if the sprite is awake, apply it live
    /// (connections it now forbids are cut).
    pub async fn set_policy(&self, name: &str, policy: NetworkPolicy) -> Result<()> {
        policy
            .compile()
            .map_err(|e| SpriteError::Invalid(format!("invalid policy config: {e}")))?;
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let stored = if policy.rules.is_empty() {
            None
        } else {
            Some(policy.clone())
        };
        self.update_record(&slot, |r| r.policy = stored.clone()).await?;
        if let Phase::Awake(live) = &*phase {
            let (net, key) = (self.inner.net.clone(), live.key.clone());
            let p = policy.clone();
            blocking(move || Ok(net.set_policy(&key, &p)?)).await?;
            live::write_policy_file(&live.paths, stored.as_ref())?;
        }
        Ok(())
    }

    pub fn services(&self, name: &str) -> Result<Vec<ServiceDef>> {
        Ok(self.slot(name)?.record.lock().services.clone())
    }

    /// Change the service definitions (validated by `f`), persist them and,
    /// if the sprite is awake, hand them to its agent.
    pub async fn update_services<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Vec<ServiceDef>) -> Result<T>,
    ) -> Result<T> {
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let mut services = slot.record.lock().services.clone();
        let out = f(&mut services)?;
        if let Phase::Awake(live) = &*phase {
            live.agent.services_set(&services).await?;
        }
        self.update_record(&slot, |r| r.services = services).await?;
        Ok(out)
    }

    /// Stop every sprite (they come back cold on the next start). New wakes
    /// are refused from now on.
    /// Cluster mode: re-read one sprite from the shared catalog, since
    /// another node may have created, changed or deleted it. An awake
    /// sprite keeps its record (this node owns it and is the only writer).
    /// `None` if it no longer exists.
    pub async fn refresh(&self, name: &str) -> Result<Option<SpriteInfo>> {
        let rec = self.inner.catalog.get(name).await?;
        Ok(self.adopt_record(name, rec))
    }

    /// Cluster mode: bring the whole list in line with the shared catalog
    /// (sprites made or deleted on other nodes).
    pub async fn refresh_all(&self) -> Result<()> {
        let mut recs: HashMap<String, SpriteRecord> = self
            .inner
            .catalog
            .list()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let known: Vec<String> = self.inner.slots.lock().keys().cloned().collect();
        for name in known {
            let rec = recs.remove(&name);
            self.adopt_record(&name, rec);
        }
        for (name, rec) in recs {
            self.adopt_record(&name, Some(rec));
        }
        Ok(())
    }

    /// Bring one slot in line with its catalog record (`None`: deleted
    /// elsewhere). Only a cold sprite nobody is working on here takes the
    /// catalog's word: one this node runs (or is booting, stopping, …) keeps
    /// its own record, since this node owns it and is its only writer.
    fn adopt_record(&self, name: &str, rec: Option<SpriteRecord>) -> Option<SpriteInfo> {
        let existing = self.inner.slots.lock().get(name).cloned();
        let Some(slot) = existing else {
            let rec = rec?;
            let mut slots = self.inner.slots.lock();
            return Some(
                slots
                    .entry(name.to_string())
                    .or_insert_with(|| Slot::new(rec))
                    .info(),
            );
        };
        let Ok(phase) = slot.phase.try_lock() else {
            return Some(slot.info());
        };
        if !matches!(*phase, Phase::Cold) {
            return Some(slot.info());
        }
        match rec {
            None => {
                slot.deleted.store(true, Ordering::Release);
                self.inner.slots.lock().remove(name);
                None
            }
            Some(rec) if rec.id == slot.record.lock().id => {
                *slot.record.lock() = rec;
                Some(slot.info())
            }
            // Deleted and made again under the same name elsewhere.
            Some(rec) => {
                let fresh = Slot::new(rec);
                let info = fresh.info();
                self.inner.slots.lock().insert(name.to_string(), fresh);
                Some(info)
            }
        }
    }

    /// Cluster mode: put the sprite to sleep, flush its disk to the object
    /// store and give up its lease, all under its phase lock, so no request
    /// can wake it here in between (wake refuses a sprite whose lease this
    /// node does not hold).
    pub async fn hand_off(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await?;
        let volume = slot.record.lock().volume.clone();
        self.inner.store.flush(&volume, |_| {}).await?;
        self.inner.store.release(&volume).await?;
        Ok(())
    }

    /// Freeze a running sprite without touching the catalog (which may be
    /// unreachable: this is how a node that lost its lease stops at once).
    pub async fn freeze(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if let Phase::Awake(live) = &mut *phase
            && !live.frozen
        {
            if let Some(h) = &live.handle {
                let (b, h) = (self.inner.backend.clone(), h.clone());
                blocking(move || Ok(b.freeze(&h)?)).await?;
            }
            live.frozen = true;
            slot.set_status(SpriteStatus::Warm);
        }
        Ok(())
    }

    /// Another node owns this sprite now: stop it here and throw away what
    /// this node had of its disk that never reached the shared store (the
    /// fencing epoch already refuses it).
    pub async fn evict(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if let Phase::Awake(_) = &*phase {
            let Phase::Awake(live) = std::mem::replace(&mut *phase, Phase::Cold) else {
                unreachable!()
            };
            slot.set_status(SpriteStatus::Cold);
            let (b, n) = (self.inner.backend.clone(), self.inner.net.clone());
            if let Err(e) = blocking(move || live.teardown(b.as_ref(), &n, Duration::ZERO)).await {
                tracing::warn!(sprite = name, error = %e, "stopping an evicted sprite");
            }
        }
        let volume = slot.record.lock().volume.clone();
        self.inner.store.discard_local(&volume).await?;
        Ok(())
    }

    /// Run `f` on the disk of an awake sprite while its processes are
    /// frozen and its filesystem is synced, so what `f` records of the
    /// volume is a consistent filesystem image. Always thaws.
    async fn while_frozen<T: Send + 'static>(
        &self,
        live: &Live,
        f: impl FnOnce(&den_store::Volume) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (backend, handle, frozen) = (self.inner.backend.clone(), live.handle.clone(), live.frozen);
        let disk = live.disk.as_ref().expect("an awake sprite has its disk");
        let (mp, vol) = (disk.mountpoint().to_path_buf(), disk.volume().clone());
        blocking(move || {
            let _frozen = FreezeGuard::new(backend, handle, frozen)?;
            disk::syncfs(&mp)?;
            f(&vol)
        })
        .await
    }

    /// Cluster durability window: take a sync point of the sprite's disk at a
    /// consistent moment (frozen, filesystem synced) and wait until it is all
    /// in the object store. A cold sprite is flushed instead. Returns the
    /// time (ms) up to which the sprite's writes are durable.
    pub async fn sync_point(&self, name: &str) -> Result<i64> {
        let slot = self.slot(name)?;
        let volume = slot.record.lock().volume.clone();
        let map = {
            let phase = slot.phase.lock().await;
            match &*phase {
                Phase::Cold => None,
                Phase::Awake(live) => Some(self.while_frozen(live, |vol| Ok(vol.sync_point()?)).await?),
            }
        };
        let at = now_ms();
        match map {
            Some(map) => self.inner.store.wait_sync_durable(&volume, map).await?,
            None => self.inner.store.flush(&volume, |_| {}).await?,
        }
        Ok(at)
    }

    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = self.inner.slots.lock().values().cloned().collect();
        for slot in slots {
            let mut phase = slot.phase.lock().await;
            if let Err(e) = self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await {
                tracing::warn!(sprite = %slot.name, error = %e, "stopping at shutdown");
            }
        }
        if let Some(dns) = self.inner.dns.lock().await.take() {
            dns.stop().await;
        }
        // The idmapped image mounts exist only for running sprites; leaving
        // them would pin the images directory (and keep it from being removed).
        // They are this server's own (under its run dir): other servers
        // sharing the images directory keep theirs.
        if let Err(e) = den_runtime::image::release_idmapped_in(&self.inner.cfg.lowers_dir()) {
            tracing::warn!(error = %e, "releasing the idmapped image mounts");
        }
        self.inner.lowers.lock().clear();
        disk::unshare_run_dir(&self.inner.cfg.run_dir);
    }

    /// Remove den's firewall table (sprites must be cold: see [`Self::shutdown`]).
    pub fn remove_firewall(&self) {
        if let Err(e) = self.inner.net.remove_firewall() {
            tracing::warn!(error = %e, "removing the firewall");
        }
    }

    pub(crate) fn from_inner(inner: Arc<Inner>) -> Self {
        SpriteManager { inner }
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        self.inner.slots.lock().values().cloned().collect()
    }
}

/// Idle-monitor access to slots.
impl Slot {
    pub(crate) fn holds(&self) -> usize {
        self.holds.load(Ordering::Acquire)
    }
    pub(crate) fn idle(&self) -> Duration {
        self.idle_for()
    }
    pub(crate) fn mark_active(&self) {
        self.touch()
    }
    pub(crate) fn try_phase(&self) -> Option<tokio::sync::MutexGuard<'_, Phase>> {
        self.phase.try_lock().ok()
    }
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

fn ck_err(e: StoreError, sprite: &str, id: &str) -> SpriteError {
    match e {
        StoreError::CheckpointNotFound { .. } => SpriteError::CheckpointNotFound {
            sprite: sprite.to_string(),
            checkpoint: id.to_string(),
        },
        other => other.into(),
    }
}

/// 12 hex digits: short enough for interface, netns and socket names.
fn new_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn traversable(d: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(d).map_err(|e| SpriteError::io(format!("stat {}", d.display()), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))
            .map_err(|e| SpriteError::io(format!("chmod {}", d.display()), e))?;
    }
    Ok(())
}

/// Sprites run as unprivileged host ids (the id map's root), and their
/// runtime walks down to their disk, image view and agent binary as those
/// ids. A directory above `dirs` that those ids may not search (`~` of root
/// is 0700) would let the server start and then fail every boot with
/// "failed to prepare rootfs"; refuse to start instead, naming the directory
/// and the fix.
fn reachable_by_sprites(dirs: &[&std::path::Path], idmap: &den_runtime::image::IdMap) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (
        idmap.uid_to_host(0).unwrap_or(0),
        idmap.gid_to_host(0).unwrap_or(0),
    );
    for d in dirs {
        let canon = d
            .canonicalize()
            .map_err(|e| SpriteError::io(format!("resolving {}", d.display()), e))?;
        for a in canon.ancestors() {
            let meta =
                std::fs::metadata(a).map_err(|e| SpriteError::io(format!("stat {}", a.display()), e))?;
            let mode = meta.mode();
            let search = if uid == 0 {
                true
            } else if meta.uid() == uid {
                mode & 0o100 != 0
            } else if meta.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !search {
                return Err(SpriteError::io(
                    format!(
                        "sprites cannot reach {}: {} (mode {:04o}) is not searchable by their host uid \
                         {uid}; run `chmod o+x {}`, or choose a data dir (and run_dir) outside it",
                        d.display(),
                        a.display(),
                        mode & 0o7777,
                        a.display()
                    ),
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ));
            }
        }
    }
    Ok(())
}

/// Freezes a running sprite (unless it already was) and always thaws it again.
struct FreezeGuard {
    backend: Arc<dyn Backend>,
    handle: Option<den_runtime::Handle>,
}

impl FreezeGuard {
    fn new(
        backend: Arc<dyn Backend>,
        handle: Option<den_runtime::Handle>,
        already_frozen: bool,
    ) -> Result<Self> {
        let handle = handle.filter(|_| !already_frozen);
        if let Some(h) = &handle {
            backend.freeze(h)?;
        }
        Ok(FreezeGuard { backend, handle })
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Some(h) = &self.handle
            && let Err(e) = self.backend.thaw(h)
        {
            tracing::error!(sprite = %h.id, error = %e, "thawing after a checkpoint failed");
        }
    }
}

/// Run an operation that needs a volume closed. A sprite that just went
/// cold may still have its volume held for a moment by background
/// write-back or an upload commit (`VolumeBusy`): wait for that, boundedly.
async fn when_released<T, F, Fut>(mut op: F) -> std::result::Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, StoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Err(StoreError::VolumeBusy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// A previous run may have died with sprites up: every sprite starts cold,
/// so remove every container, mount and network it left.
fn recover(cfg: &ManagerConfig, backend: &dyn Backend, net: &NetManager) -> Result<()> {
    // Before anything that could wait on a dead disk (removing a container
    // whose tasks are blocked in its I/O).
    disk::abort_stale_fuse(&cfg.run_dir);
    let bundles = cfg.run_dir.join("ctr").join("bundles");
    if let Ok(rd) = std::fs::read_dir(&bundles) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            match backend.open(&id) {
                Ok(Some(h)) => {
                    tracing::warn!(sprite = %id, "removing a container left by an earlier run");
                    if let Err(e) = backend.delete(&h) {
                        tracing::warn!(sprite = %id, error = %e, "removing a stale container");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(sprite = %id, error = %e, "inspecting a stale container"),
            }
        }
    }
    disk::cleanup_stale(&cfg.run_dir);
    net.cleanup_leftovers(&[])?;
    Ok(())
}
