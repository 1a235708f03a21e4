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
//!
//! One file per operation, as the state machine's transitions: [`start`]
//! (and crash recovery), [`create`], [`template`], [`boot`] (wake, restart),
//! [`sleep`], [`delete`], [`checkpoint`], [`restore`], [`fork`],
//! [`policy`], [`services`], [`pool`] (pre-booted sprites), [`cluster`]
//! (hooks for a cluster node). This
//! file holds the state they share: slots, activities and events.

mod boot;
mod checkpoint;
mod cluster;
mod create;
mod delete;
mod fork;
mod policy;
mod pool;
mod restore;
mod services;
mod sleep;
mod start;
mod template;
pub use pool::PoolStats;
pub use services::ServiceWatch;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use den_agent::client::Client;
use den_net::dns::DnsForwarder;
use den_net::{NetManager, NetworkPolicy};
use den_runtime::container::ShimCommand;
use den_runtime::image::{Image, LogProgress};
use den_runtime::{Backend, Resources};
use den_store::{CheckpointRecord, Store, StoreError, VolumeSource};
use parking_lot::Mutex;
use tokio::sync::Mutex as AsyncMutex;

use crate::agent_bundle::AgentBundle;
use crate::boot_stats::{BootPhases, BootStats, BootTotals};
use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{Admission, ManagerConfig};
use crate::disk;
use crate::engines::Engines;
use crate::error::{Result, SpriteError};
use crate::live::{self, BootContext, Live, SpritePaths, blocking};
use crate::memory_image;
use crate::record::{SpriteInfo, SpriteRecord, SpriteStatus, StorageStatus, now_ms, validate_key};

/// How long a node waits for another node's fresh template to be uploaded.
const TEMPLATE_DURABLE: Duration = Duration::from_secs(120);

/// A change of a sprite, as [`SpriteManager::subscribe`] reports it.
#[derive(Debug, Clone)]
pub enum SpriteEvent {
    /// Created, or its status changed; the sprite as it is now.
    Changed(SpriteInfo),
    /// Deleted; the sprite as it was.
    Deleted(SpriteInfo),
}

/// Events kept for slow subscribers before they lag (and resync).
const EVENT_BUFFER: usize = 1024;

/// What a new sprite starts with.
#[derive(Debug, Clone, Default)]
pub struct CreateSprite {
    /// API-owned attributes (url settings, labels, config, environment).
    pub attrs: serde_json::Value,
    /// Limits; the manager's defaults when `None`.
    pub resources: Option<Resources>,
    pub policy: Option<NetworkPolicy>,
    /// The engine; the manager's default when `None`.
    pub runtime: Option<den_runtime::Runtime>,
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

    /// A sprite that is running already (a claimed pre-booted one).
    fn awake(rec: SpriteRecord, live: Box<Live>) -> Arc<Slot> {
        let slot = Slot::new(rec);
        slot.status.store(SpriteStatus::Running as u8, Ordering::Release);
        *slot.phase.try_lock().expect("a new slot is nobody's") = Phase::Awake(live);
        slot
    }

    /// The live state of a slot that is being given up (and is cold from now).
    async fn take_live(&self) -> Box<Live> {
        self.deleted.store(true, Ordering::Release);
        self.status.store(SpriteStatus::Cold as u8, Ordering::Release);
        match std::mem::replace(&mut *self.phase.lock().await, Phase::Cold) {
            Phase::Awake(live) => live,
            Phase::Cold => unreachable!("only an awake slot is given up this way"),
        }
    }

    fn status(&self) -> SpriteStatus {
        match self.status.load(Ordering::Acquire) {
            x if x == SpriteStatus::Running as u8 => SpriteStatus::Running,
            x if x == SpriteStatus::Warm as u8 => SpriteStatus::Warm,
            _ => SpriteStatus::Cold,
        }
    }

    /// Whether the status changed.
    fn set_status(&self, s: SpriteStatus) -> bool {
        self.status.swap(s as u8, Ordering::AcqRel) != s as u8
    }

    fn touch(&self) {
        *self.last_active.lock() = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_active.lock().elapsed()
    }

    /// Wall-clock time of the last use, for an awake sprite.
    fn last_active_ms(&self) -> i64 {
        if self.holds.load(Ordering::Acquire) > 0 {
            return now_ms();
        }
        now_ms() - self.idle_for().as_millis() as i64
    }

    fn info(&self) -> SpriteInfo {
        let mut record = self.record.lock().clone();
        let status = self.status();
        if status != SpriteStatus::Cold {
            record.last_active_at_ms = Some(self.last_active_ms());
        }
        SpriteInfo {
            record,
            status,
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
    boot_id: u64,
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

    /// Identifies the sprite's current boot: connections made to an earlier
    /// one (before a cold sleep or a restore) must not be reused.
    pub fn boot_id(&self) -> u64 {
        self.boot_id
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
    engines: Engines,
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
    /// Sprite changes of this node, for watchers (see [`SpriteManager::subscribe`]).
    events: tokio::sync::broadcast::Sender<SpriteEvent>,
    boots: BootStats,
    pool: pool::Pool,
}

/// The sprites of this host. Cheap to clone.
#[derive(Clone)]
pub struct SpriteManager {
    inner: Arc<Inner>,
}

impl SpriteManager {
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

    fn check_running(&self) -> Result<()> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(SpriteError::ShuttingDown);
        }
        Ok(())
    }

    /// Changes of this node's sprites from now on: creations, status
    /// changes, deletions. A receiver that falls more than
    /// [`EVENT_BUFFER`] events behind gets `Lagged` and should resync from
    /// [`SpriteManager::list`]. Sprites created, deleted or running on other
    /// nodes of a cluster are not reported here.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<SpriteEvent> {
        self.inner.events.subscribe()
    }

    fn status_to(&self, slot: &Slot, status: SpriteStatus) {
        if slot.set_status(status) {
            let _ = self
                .inner
                .events
                .send(SpriteEvent::Changed(self.with_storage(slot.info())));
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

/// Delete volume `name` once nothing holds it (see [`when_released`]); one
/// that is gone already is fine.
pub(crate) async fn delete_volume_released(store: &Store, name: &str) -> std::result::Result<(), StoreError> {
    match when_released(|| store.delete_volume(name)).await {
        Ok(()) | Err(StoreError::VolumeNotFound(_)) => Ok(()),
        Err(e) => Err(e),
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
            Err(StoreError::VolumeBusy(v)) if Instant::now() < deadline => {
                tracing::debug!(volume = %v, "volume still busy; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}
