//! The store: volumes, checkpoints, forks and GC over one metadata backend,
//! one object store and one local cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};

use crate::budget::DirtyBudget;
use crate::cache::{Cache, CacheStats};
use crate::chunk::{self, ChunkHash, Compression};
use crate::error::{Result, StoreError};
use crate::meta::sqlite::SqliteMeta;
use crate::meta::{CheckpointRecord, MapId, Metadata, PendingId, StoreStats, VolumeOwner, VolumeRecord};
use crate::objects::{ObjectBackend, Objects};
use crate::space::{Space, SpaceStats};
use crate::volume::Volume;

pub const DEFAULT_VOLUME_SIZE: u64 = 100 << 30;
/// See docs/storage.md for the measurement behind this default.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// How long opening a volume waits for this process's own, no longer used
/// handle of it (held for a moment by write-back or an upload commit) to
/// let go of the volume lock.
const LOCK_HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a restore or fork waits for another node to upload the
/// checkpoint it names before refusing with [`StoreError::NotDurable`].
const FOREIGN_UPLOAD_WAIT: Duration = Duration::from_secs(10);
/// Decoded chunks kept in memory in local-object mode (see `Shared::hot`):
/// enough for a few sequential readers.
const HOT_CHUNKS: usize = 16;

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StoreConfig {
    /// Holds `meta.db` (SQLite) and `cache/`.
    pub data_dir: PathBuf,
    pub objects: ObjectBackend,
    /// Size bound of the clean read cache.
    pub cache_limit: u64,
    /// Bound on bytes that exist only locally (dirty + not yet uploaded).
    pub dirty_limit: u64,
    /// A dirty chunk untouched this long is sealed and uploaded.
    pub writeback_delay: Duration,
    pub compression: Compression,
    pub upload_concurrency: usize,
    /// How long a read of a missing chunk keeps retrying the object store
    /// before the guest gets EIO.
    pub fetch_timeout: Duration,
    /// This node's name in cluster mode, used to claim volumes; `None` on a
    /// single host.
    #[serde(default)]
    pub node: Option<String>,
    /// How often [`Store::start_background_gc`] frees chunks that no map
    /// references any more (deleted sprites, overwritten or discarded
    /// data); `None` leaves it to `den volume gc`.
    #[serde(default = "default_gc_interval")]
    pub gc_interval: Option<Duration>,
    /// Free space writers leave on the data disk (see `space.rs`); `None`:
    /// 1 GiB or 5 % of the disk, whichever is larger, at most a quarter.
    #[serde(default)]
    pub min_free_bytes: Option<u64>,
}

/// Short enough that a deleted sprite's space is back within a minute; an
/// idle run is one indexed query.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(20);

fn default_gc_interval() -> Option<Duration> {
    Some(DEFAULT_GC_INTERVAL)
}

impl StoreConfig {
    /// Embedded defaults: SQLite and chunks in a local directory under `data_dir`.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        StoreConfig {
            objects: ObjectBackend::Local {
                dir: data_dir.join("objects"),
            },
            data_dir,
            cache_limit: 8 << 30,
            dirty_limit: 2 << 30,
            writeback_delay: Duration::from_secs(2),
            compression: Compression::Zstd,
            upload_concurrency: 4,
            fetch_timeout: Duration::from_secs(60),
            node: None,
            gc_interval: default_gc_interval(),
            min_free_bytes: None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum VolumeSource {
    /// Fork of a checkpoint (`volume`, `v3`).
    Checkpoint { volume: String, checkpoint: String },
    /// Fork of the live state of another volume.
    Volume(String),
}

#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Defaults to 100 GiB, or the source's size for forks.
    pub size: Option<u64>,
    pub chunk_size: Option<u32>,
    pub source: Option<VolumeSource>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    #[serde(flatten)]
    pub record: VolumeRecord,
    pub mapped_chunks: u64,
    pub pending_chunks: u64,
    pub checkpoints: usize,
    pub open_here: bool,
}

/// What [`Store::adopt`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AdoptReport {
    /// The head was replaced by the durable sync point.
    pub rolled_back: bool,
    /// When that sync point was taken (ms since the epoch).
    pub sync_at_ms: Option<i64>,
    /// Head slots that named chunks only the previous owner's disk held.
    pub foreign_pending: u64,
}

/// How much of a volume would survive losing this node's disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Durability {
    /// Everything the volume holds is in the object store.
    pub fully_durable: bool,
    /// When the durable sync point was taken: what a new owner would roll
    /// back to if this node died now (`None`: no sync point yet).
    pub durable_at_ms: Option<i64>,
    /// Chunk slots whose current content exists only on this node: pending
    /// in the head, dirty, or discarded but not yet sealed.
    pub local_only_slots: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub chunks_deleted: u64,
    /// Stored (compressed) size of the deleted chunks.
    pub bytes_deleted: u64,
    pub orphan_objects_deleted: u64,
}

/// What the background GC has done since the store opened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcStats {
    pub runs: u64,
    pub failed_runs: u64,
    pub chunks_freed: u64,
    pub bytes_freed: u64,
}

pub(crate) struct Shared {
    pub(crate) cfg: StoreConfig,
    pub(crate) meta: Arc<dyn Metadata>,
    pub(crate) objects: Objects,
    pub(crate) cache: Cache,
    pub(crate) budget: DirtyBudget,
    pub(crate) space: Space,
    /// Chunks live in a local directory: the object file is the only copy
    /// kept (no read-cache copy next to it), and `hot` spares re-decoding
    /// it for every small read of the same chunk.
    local_objects: bool,
    hot: Mutex<std::collections::VecDeque<(ChunkHash, Bytes)>>,
    rt: tokio::runtime::Handle,
    open: Mutex<HashMap<String, Weak<crate::volume::VolumeInner>>>,
    upload_tx: mpsc::UnboundedSender<PendingId>,
    queued: Mutex<std::collections::HashSet<PendingId>>,
    uploads_done: watch::Sender<u64>,
    writeback_kick: Notify,
    gc_lock: tokio::sync::Mutex<()>,
    /// Orders upload commits against volume opens. The uploader holds it
    /// shared from its metadata commit until open volumes have been told
    /// (`upload_committed`); `open_volume` holds it exclusively from loading
    /// the head map until the volume is registered. Without it, a commit
    /// landing in between leaves the new volume pointing at a pending file
    /// that is then deleted, and reads of that chunk fail.
    pub(crate) commit_gate: tokio::sync::RwLock<()>,
    /// Volume id → the epoch this store holds it at (cluster mode).
    held: Mutex<HashMap<String, i64>>,
    gc_stats: Mutex<GcStats>,
    pub(crate) upload_counters: crate::uploader::UploadCounters,
    /// One `Store::sync` per volume at a time, so a sync never sees its
    /// sync point replaced by a concurrent one before promoting it.
    sync_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    /// Run a future from synchronous code (FUSE threads, blocking tasks).
    pub(crate) fn block_on<F: std::future::Future>(&self, f: F) -> Result<F::Output> {
        // block_in_place lets this be called from a multi-thread runtime
        // worker too; on blocking-pool and foreign threads it is a no-op.
        Ok(tokio::task::block_in_place(|| self.rt.block_on(f)))
    }

    pub(crate) fn local_objects(&self) -> bool {
        self.local_objects
    }

    pub(crate) fn nudge_writeback(&self) {
        self.writeback_kick.notify_one();
    }

    pub(crate) fn enqueue_upload(&self, p: PendingId) {
        if self.queued.lock().insert(p) {
            let _ = self.upload_tx.send(p);
        }
    }

    pub(crate) fn forget_volume(&self, id: &str) {
        let mut open = self.open.lock();
        if open.get(id).is_some_and(|w| w.strong_count() == 0) {
            open.remove(id);
        }
    }

    fn open_volumes(&self) -> Vec<Volume> {
        let weak: Vec<_> = self.open.lock().values().cloned().collect();
        weak.into_iter()
            .filter_map(|w| w.upgrade().map(|inner| inner.internal_handle()))
            .collect()
    }

    /// Fetch a chunk from the object store into the clean cache, retrying
    /// with backoff until `fetch_timeout`.
    pub(crate) fn fetch_chunk(&self, h: &ChunkHash) -> std::io::Result<Bytes> {
        if self.local_objects
            && let Some((_, data)) = self.hot.lock().iter().find(|(k, _)| k == h)
        {
            return Ok(data.clone());
        }
        let deadline = std::time::Instant::now() + self.cfg.fetch_timeout;
        let mut delay = Duration::from_millis(50);
        loop {
            // Bound each attempt too: a server that accepts connections but
            // never answers would otherwise hold the read for the HTTP
            // client's own timeout, far past `fetch_timeout`.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let res = self
                // The timer is created inside the runtime: readers are FUSE
                // threads with no runtime context of their own.
                .block_on(async { tokio::time::timeout(left, self.objects.get(h)).await })
                .and_then(|r| {
                    r.map_err(|_| StoreError::ObjectStore(format!("no answer within {left:?}")))
                        .and_then(|r| r)
                })
                .and_then(|obj| chunk::decode(&obj, h));
            match res {
                Ok(data) => {
                    let data = Bytes::from(data);
                    if self.local_objects {
                        let mut hot = self.hot.lock();
                        if hot.len() >= HOT_CHUNKS {
                            hot.pop_back();
                        }
                        hot.push_front((*h, data.clone()));
                    } else if self.space.has_room(data.len() as u64) {
                        // The read cache never eats into the disk reserve.
                        self.cache.insert_clean(h, &data)?;
                    }
                    return Ok(data);
                }
                Err(e @ StoreError::CorruptChunk { .. }) => return Err(e.into()),
                Err(e) if std::time::Instant::now() + delay > deadline => {
                    return Err(std::io::Error::other(format!("fetching chunk {h}: {e}")));
                }
                Err(e) => {
                    tracing::warn!("fetching chunk {h} failed, retrying: {e}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// The volume store. Cheap to clone; background tasks (uploader, write-back)
/// run on the tokio runtime that opened it.
#[derive(Clone)]
pub struct Store {
    pub(crate) shared: Arc<Shared>,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(format!(
            "invalid volume name {name:?}: use 1-63 of a-z 0-9 - _ . (not starting with - or .)"
        )))
    }
}

fn validate_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(StoreError::InvalidArgument(format!(
            "volume size {size} must be a positive multiple of 4096 bytes"
        )));
    }
    if size > (1u64 << 50) {
        return Err(StoreError::InvalidArgument(format!(
            "volume size {size} exceeds 1 PiB"
        )));
    }
    Ok(())
}

fn validate_chunk_size(cs: u32) -> Result<()> {
    if !cs.is_power_of_two() || !(4096..=(64 << 20)).contains(&cs) {
        return Err(StoreError::InvalidArgument(format!(
            "chunk size {cs} must be a power of two between 4 KiB and 64 MiB"
        )));
    }
    Ok(())
}

impl Store {
    /// Open with SQLite metadata at `data_dir/meta.db`.
    pub async fn open(cfg: StoreConfig) -> Result<Store> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let meta: Arc<dyn Metadata> = Arc::new(SqliteMeta::open(&cfg.data_dir.join("meta.db"))?);
        Self::open_with_meta(cfg, meta).await
    }

    pub async fn open_with_meta(cfg: StoreConfig, meta: Arc<dyn Metadata>) -> Result<Store> {
        if cfg.dirty_limit < (64 << 20) {
            return Err(StoreError::InvalidArgument(
                "dirty_limit must be at least 64 MiB".into(),
            ));
        }
        let objects = Objects::open(&cfg.objects)?;
        let cache = Cache::open(&cfg.data_dir.join("cache"), cfg.cache_limit)?;
        let space = Space::new(&cfg.data_dir, cfg.min_free_bytes)?;
        let local_objects = matches!(cfg.objects, ObjectBackend::Local { .. });
        if local_objects {
            // Copies an older den kept next to the local objects.
            cache.clear_clean();
        }
        let (upload_tx, upload_rx) = mpsc::unbounded_channel();
        let (uploads_done, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            budget: DirtyBudget::new(cfg.dirty_limit),
            space,
            local_objects,
            hot: Mutex::new(Default::default()),
            cfg,
            meta,
            objects,
            cache,
            rt: tokio::runtime::Handle::current(),
            open: Mutex::new(HashMap::new()),
            upload_tx,
            queued: Mutex::new(Default::default()),
            uploads_done,
            writeback_kick: Notify::new(),
            gc_lock: tokio::sync::Mutex::new(()),
            commit_gate: tokio::sync::RwLock::new(()),
            held: Mutex::new(HashMap::new()),
            gc_stats: Mutex::new(GcStats::default()),
            upload_counters: Default::default(),
            sync_locks: Mutex::new(HashMap::new()),
        });
        let store = Store { shared };
        store.recover_pending().await?;
        crate::uploader::spawn(Arc::downgrade(&store.shared), upload_rx);
        spawn_writeback(Arc::downgrade(&store.shared));
        Ok(store)
    }

    /// Re-queue every pending chunk the metadata knows, and delete pending
    /// files no metadata names (a crash between link and commit). Files
    /// linked in the last minute are left alone: another process may be
    /// about to commit them.
    async fn recover_pending(&self) -> Result<()> {
        let s = &self.shared;
        let known: std::collections::HashSet<PendingId> = s.meta.list_pending().await?.into_iter().collect();
        for p in s.cache.list_pending_files()? {
            let path = s.cache.pending_path(p);
            if known.contains(&p) {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                s.budget.adopt_pending(p, len);
                s.enqueue_upload(p);
            } else {
                use std::os::unix::fs::MetadataExt;
                let old = std::fs::metadata(&path)
                    .map(|m| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs() as i64)
                            .unwrap_or(0);
                        now - m.ctime() > 60
                    })
                    .unwrap_or(false);
                if old {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if s.cfg.node.is_some() {
            // In a cluster the metadata names every node's pending chunks;
            // one missing here is usually on the node that owns its volume
            // (and `adopt` deals with those whose owner died).
            return Ok(());
        }
        for p in known {
            // Another process sharing this cache (a mount daemon) may have
            // uploaded it since we listed: only a chunk still named after the
            // file is gone is lost.
            if !s.cache.pending_path(p).exists() && s.meta.pending_referenced(p).await? {
                tracing::error!("pending chunk {p:016x} is named by metadata but missing from the cache");
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &StoreConfig {
        &self.shared.cfg
    }

    pub fn meta(&self) -> &Arc<dyn Metadata> {
        &self.shared.meta
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.shared.cache.stats()
    }

    /// Bytes that exist only in the local cache right now. An uploaded
    /// chunk counts until its pending file is gone, so 0 also means that no
    /// upload has anything left to do locally: after it, `drop_read_cache`
    /// leaves no local copy of any uploaded chunk.
    pub fn local_only_bytes(&self) -> u64 {
        self.shared.budget.used()
    }

    /// The data disk: free space, the reserve, and whether writers are
    /// blocked waiting for space (a status for every sprite on this host).
    pub fn space_stats(&self) -> SpaceStats {
        self.shared.space.stats()
    }

    /// Whether writes to `volume` are waiting for space on the data disk
    /// right now (below the reserve, read cache already evicted): the
    /// "disk full" status of the sprite that owns it.
    pub fn volume_blocked_on_disk(&self, volume: &str) -> bool {
        self.shared.space.volume_blocked(volume)
    }

    /// Drop the clean read cache, so the next reads come from the object store.
    pub fn drop_read_cache(&self) {
        self.shared.cache.clear_clean();
        self.shared.hot.lock().clear();
    }

    pub async fn stats(&self) -> Result<StoreStats> {
        self.shared.meta.stats().await
    }

    fn open_here(&self, id: &str) -> Option<Arc<crate::volume::VolumeInner>> {
        let w = self.shared.open.lock().get(id).cloned();
        w.and_then(|w| w.upgrade())
    }

    /// Whether this process registered `id` and has not finished dropping
    /// it: its volume lock is then ours, held or about to be released.
    fn registered_here(&self, id: &str) -> bool {
        self.shared.open.lock().contains_key(id)
    }

    /// Open the volume's lock and state without registering it, retrying
    /// while a handle of this process that no user holds any more (a
    /// background task's, or one being dropped) still has the lock.
    async fn open_unregistered(&self, rec: &VolumeRecord, give_up_if_used: bool) -> Result<Volume> {
        let mut delay = Duration::from_millis(1);
        let deadline = std::time::Instant::now() + LOCK_HANDOVER_TIMEOUT;
        loop {
            if give_up_if_used && self.open_here(&rec.id).is_some_and(|v| v.has_users()) {
                return Err(StoreError::VolumeBusy(rec.name.clone()));
            }
            let (shared, r) = (self.shared.clone(), rec.clone());
            let res = tokio::task::spawn_blocking(move || Volume::open(shared, r))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
            match res {
                Err(StoreError::VolumeBusy(_))
                    if self.registered_here(&rec.id) && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(20));
                }
                res => return res,
            }
        }
    }

    /// Open a volume for I/O. Returns the same handle if this process already
    /// has it open; fails with `VolumeBusy` if another process does.
    pub async fn open_volume(&self, name: &str) -> Result<Volume> {
        let rec = self.shared.meta.get_volume(name).await?;
        if let Some(inner) = self.open_here(&rec.id) {
            return Ok(inner.user_handle());
        }
        // No upload may commit between loading the head map and registering
        // the volume (see `commit_gate`). The gate also serialises openers,
        // so look again once we hold it.
        let _gate = self.shared.commit_gate.write().await;
        if let Some(inner) = self.open_here(&rec.id) {
            return Ok(inner.user_handle());
        }
        let vol = self.open_unregistered(&rec, false).await?;
        let mut open = self.shared.open.lock();
        if let Some(existing) = open.get(&vol.inner.rec.id).and_then(|w| w.upgrade()) {
            // Lost a race with another opener in this process; ours can't hold
            // the flock anyway, so hand out theirs.
            drop(open);
            return Ok(existing.user_handle());
        }
        open.insert(vol.inner.rec.id.clone(), Arc::downgrade(&vol.inner));
        Ok(vol.inner.user_handle())
    }

    /// Run `f` on the volume, opening it for the duration if needed.
    async fn with_volume<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&Volume) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let vol = self.open_volume(name).await?;
        tokio::task::spawn_blocking(move || f(&vol))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    /// Like `with_volume`, but the caller must be the only user: refuses a
    /// volume that is open (mounted) anywhere, this process included.
    async fn with_exclusive<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce(&Volume) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let rec = self.shared.meta.get_volume(name).await?;
        // Opened privately, never registered: no background task can pick the
        // handle up and keep it (with a head map the operation is about to
        // replace) alive after we return.
        let vol = self.open_unregistered(&rec, true).await?;
        tokio::task::spawn_blocking(move || f(&vol))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    pub async fn create_volume(&self, name: &str, opts: CreateOptions) -> Result<VolumeRecord> {
        let rec = self.create_volume_record(name, opts).await?;
        if let Some(node) = self.shared.cfg.node.clone() {
            self.take_new_volume(&rec, &node).await?;
        }
        Ok(rec)
    }

    /// The creator owns a new volume. A fencing backend made it the owner
    /// already; a single-host one left it unowned, so claim it, and both
    /// backends then agree on who holds it at which epoch.
    async fn take_new_volume(&self, rec: &VolumeRecord, node: &str) -> Result<()> {
        let owner = self.shared.meta.volume_owner(&rec.id).await?;
        let epoch = match owner.node.as_deref() {
            Some(n) if n == node => Some(owner.epoch),
            None => self.shared.meta.claim_volume(&rec.id, node, owner.epoch).await?,
            Some(_) => None,
        };
        match epoch {
            Some(e) => {
                self.shared.held.lock().insert(rec.name.clone(), e);
            }
            None => tracing::warn!(
                "new volume {} is owned by {:?}, not by this node",
                rec.name,
                owner.node
            ),
        }
        Ok(())
    }

    async fn create_volume_record(&self, name: &str, opts: CreateOptions) -> Result<VolumeRecord> {
        validate_name(name)?;
        if let Some(s) = opts.size {
            validate_size(s)?;
        }
        if let Some(cs) = opts.chunk_size {
            validate_chunk_size(cs)?;
        }
        let meta = &self.shared.meta;
        match opts.source {
            None => {
                let size = opts.size.unwrap_or(DEFAULT_VOLUME_SIZE);
                let cs = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
                meta.create_volume(name, size, cs, None).await
            }
            Some(src) => {
                let (src_vol, map) = match &src {
                    VolumeSource::Checkpoint { volume, checkpoint } => {
                        let v = meta.get_volume(volume).await?;
                        let ck = meta
                            .get_checkpoint(&v.id, checkpoint)
                            .await
                            .map_err(|e| match e {
                                StoreError::CheckpointNotFound { .. } => StoreError::CheckpointNotFound {
                                    volume: volume.clone(),
                                    checkpoint: checkpoint.clone(),
                                },
                                e => e,
                            })?;
                        self.readable_here(volume, checkpoint, ck.map_id).await?;
                        (v, ck.map_id)
                    }
                    VolumeSource::Volume(volume) => {
                        // Seal the live state so the metadata head is complete.
                        self.with_volume(volume, |v| v.seal_all()).await?;
                        let v = meta.get_volume(volume).await?;
                        let m = v.head_map;
                        (v, m)
                    }
                };
                if opts.chunk_size.is_some_and(|cs| cs != src_vol.chunk_size) {
                    return Err(StoreError::InvalidArgument(
                        "a fork keeps the chunk size of its source".into(),
                    ));
                }
                let size = opts.size.unwrap_or(src_vol.size);
                if size < src_vol.size {
                    return Err(StoreError::InvalidArgument(format!(
                        "a fork cannot be smaller than its source ({} bytes)",
                        src_vol.size
                    )));
                }
                meta.create_volume(name, size, src_vol.chunk_size, Some(map))
                    .await
            }
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.shared.meta.list_volumes().await
    }

    pub async fn volume(&self, name: &str) -> Result<VolumeRecord> {
        self.shared.meta.get_volume(name).await
    }

    pub async fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let rec = self.shared.meta.get_volume(name).await?;
        let stats = self.shared.meta.map_stats(rec.head_map).await?;
        let checkpoints = self.shared.meta.list_checkpoints(&rec.id).await?.len();
        Ok(VolumeInfo {
            open_here: self.open_here(&rec.id).is_some_and(|v| v.has_users()),
            record: rec,
            mapped_chunks: stats.entries,
            pending_chunks: stats.pending,
            checkpoints,
        })
    }

    /// Delete a volume and its checkpoints. Refused while it is open.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let meta = self.shared.meta.clone();
        let shared = self.shared.clone();
        let id = self
            .with_exclusive(name, move |v| {
                shared.block_on(meta.delete_volume(&v.record().id))??;
                v.drop_local_state()?;
                Ok(v.record().id.clone())
            })
            .await?;
        self.shared.held.lock().remove(name);
        self.shared.sync_locks.lock().remove(&id);
        Ok(())
    }

    /// Snapshot a volume. Returns as soon as the snapshot is in metadata; it
    /// becomes `durable` when its chunks are uploaded.
    pub async fn checkpoint(&self, name: &str, comment: &str) -> Result<CheckpointRecord> {
        let comment = comment.to_string();
        self.with_volume(name, move |v| v.checkpoint(&comment)).await
    }

    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointRecord>> {
        let rec = self.shared.meta.get_volume(name).await?;
        self.shared.meta.list_checkpoints(&rec.id).await
    }

    /// What one volume keeps stored: each distinct chunk its head and its
    /// checkpoints name, once (uploaded chunks at their stored, compressed
    /// size; chunks still waiting for upload at the chunk size). A chunk
    /// shared with another volume (a template, a fork's source) counts in
    /// each: this is what the volume holds, not what deleting it would free.
    pub async fn stored_bytes(&self, name: &str) -> Result<u64> {
        let s = &self.shared;
        let rec = s.meta.get_volume(name).await?;
        let mut maps = vec![rec.head_map];
        maps.extend(s.meta.list_checkpoints(&rec.id).await?.iter().map(|c| c.map_id));
        let (mut chunks, mut pending) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for map in maps {
            for (_, e) in s.meta.load_map(map).await? {
                match e {
                    crate::meta::Entry::Chunk(h) => {
                        chunks.insert(h);
                    }
                    crate::meta::Entry::Pending(p) => {
                        pending.insert(p);
                    }
                }
            }
        }
        let chunks: Vec<_> = chunks.into_iter().collect();
        let stored = s.meta.stored_len_of(&chunks).await?;
        Ok(stored.saturating_add(pending.len() as u64 * rec.chunk_size as u64))
    }

    pub async fn get_checkpoint(&self, name: &str, id: &str) -> Result<CheckpointRecord> {
        let rec = self.shared.meta.get_volume(name).await?;
        self.shared
            .meta
            .get_checkpoint(&rec.id, id)
            .await
            .map_err(|e| match e {
                StoreError::CheckpointNotFound { checkpoint, .. } => StoreError::CheckpointNotFound {
                    volume: name.to_string(),
                    checkpoint,
                },
                e => e,
            })
    }

    pub async fn delete_checkpoint(&self, name: &str, id: &str) -> Result<()> {
        let rec = self.shared.meta.get_volume(name).await?;
        self.get_checkpoint(name, id).await?;
        self.shared.meta.delete_checkpoint(&rec.id, id).await
    }

    /// The volume's content becomes the checkpoint's. Refused while the
    /// volume is open (mounted): the guest's view would change under it.
    pub async fn restore(&self, name: &str, checkpoint: &str) -> Result<()> {
        let ck = self.get_checkpoint(name, checkpoint).await?;
        self.readable_here(name, checkpoint, ck.map_id).await?;
        let meta = self.shared.meta.clone();
        let shared = self.shared.clone();
        let checkpoint = checkpoint.to_string();
        self.with_exclusive(name, move |v| {
            // Seal first: if we crash mid-way, the head is consistent either
            // way and no fsynced data was dropped before the restore committed.
            v.seal_all()?;
            shared.block_on(meta.restore(&v.record().id, &checkpoint))??;
            v.drop_local_state()?;
            Ok(())
        })
        .await
    }

    /// Fork: a new volume from a checkpoint or from another volume's live state.
    pub async fn fork(&self, new_name: &str, source: VolumeSource) -> Result<VolumeRecord> {
        self.create_volume(
            new_name,
            CreateOptions {
                source: Some(source),
                ..Default::default()
            },
        )
        .await
    }

    /// Read a checkpoint in place (export, verification) without touching the volume.
    pub async fn read_checkpoint(&self, name: &str, id: &str) -> Result<crate::snapshot::CheckpointReader> {
        let rec = self.shared.meta.get_volume(name).await?;
        let ck = self.get_checkpoint(name, id).await?;
        let entries = self.shared.meta.load_map(ck.map_id).await?;
        Ok(crate::snapshot::CheckpointReader::new(
            self.shared.clone(),
            ck,
            rec.size,
            rec.chunk_size as u64,
            entries,
        ))
    }

    /// Upload everything dirty in `name` and wait until the object store holds
    /// the whole head map. `progress(remaining)` is called as uploads land.
    pub async fn flush(&self, name: &str, progress: impl Fn(u64) + Send) -> Result<()> {
        self.with_volume(name, |v| v.seal_all()).await?;
        let rec = self.shared.meta.get_volume(name).await?;
        self.wait_uploaded(rec.head_map, progress).await
    }

    /// Cluster mode: a checkpoint whose chunks are still pending on the node
    /// that took it would read as EIO here. Give that node a moment to upload
    /// them (a fresh checkpoint on a live node is durable within seconds),
    /// then refuse rather than hand out a volume with holes.
    async fn readable_here(&self, volume: &str, checkpoint: &str, map: MapId) -> Result<()> {
        if self.shared.cfg.node.is_none() {
            // One host: every pending chunk is in this cache.
            return Ok(());
        }
        if self.foreign_pending(map).await? == 0 {
            return Ok(());
        }
        if tokio::time::timeout(FOREIGN_UPLOAD_WAIT, self.wait_uploaded(map, |_| {}))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return Ok(());
        }
        Err(StoreError::NotDurable {
            volume: volume.to_string(),
            checkpoint: checkpoint.to_string(),
            chunks: self.foreign_pending(map).await?,
        })
    }

    /// Slots of `map` naming pending chunks that are not in this node's cache:
    /// another node sealed them and has not uploaded them.
    async fn foreign_pending(&self, map: MapId) -> Result<u64> {
        let s = &self.shared;
        let mut slots: HashMap<PendingId, u64> = HashMap::new();
        for (_, e) in s.meta.load_map(map).await? {
            if let crate::meta::Entry::Pending(p) = e {
                *slots.entry(p).or_default() += 1;
            }
        }
        let mut foreign = 0;
        for (p, n) in slots {
            // A file missing now may have been uploaded (and removed) by this
            // process since the map was loaded: the upload commits before the
            // file goes, so the metadata then no longer names it.
            if !s.cache.pending_path(p).exists() && s.meta.pending_referenced(p).await? {
                foreign += n;
            }
        }
        Ok(foreign)
    }

    /// Wait until a checkpoint is durable.
    pub async fn wait_durable(&self, name: &str, checkpoint: &str) -> Result<()> {
        let ck = self.get_checkpoint(name, checkpoint).await?;
        self.wait_uploaded(ck.map_id, |_| {}).await
    }

    async fn wait_uploaded(&self, map: crate::meta::MapId, progress: impl Fn(u64) + Send) -> Result<()> {
        let mut rx = self.shared.uploads_done.subscribe();
        loop {
            rx.borrow_and_update();
            let pending = self.shared.meta.pending_count(map).await?;
            progress(pending);
            if pending == 0 {
                return Ok(());
            }
            // Woken by every upload commit; the timeout covers pending chunks
            // being uploaded by another process sharing this cache.
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        }
    }

    /// Flush every volume open in this process (used at shutdown).
    pub async fn flush_all(&self) -> Result<()> {
        for v in self.shared.open_volumes() {
            let name = v.name().to_string();
            drop(v);
            self.flush(&name, |_| {}).await?;
        }
        Ok(())
    }

    /// Delete chunks no map references. Safe against concurrent checkpoints,
    /// forks and uploads: rows move to `deleting` in one transaction, and an
    /// uploader that meets a `deleting` row waits instead of reusing it.
    pub async fn gc(&self, sweep_orphans: bool) -> Result<GcReport> {
        let _g = self.shared.gc_lock.lock().await;
        let s = &self.shared;
        let mut report = GcReport::default();
        let mut batch = s.meta.gc_interrupted().await?;
        loop {
            if batch.is_empty() {
                batch = s.meta.gc_begin(1000).await?;
                if batch.is_empty() {
                    break;
                }
            }
            report.bytes_deleted += s.meta.stored_len_of(&batch).await?;
            for h in &batch {
                s.objects.delete(h).await?;
                s.cache.remove_clean(h);
            }
            s.meta.gc_finish(&batch).await?;
            report.chunks_deleted += batch.len() as u64;
            batch.clear();
        }
        if sweep_orphans {
            // Objects with no row at all: a row is written before every PUT,
            // so these can only be leftovers of deleted rows.
            for h in s.objects.list_chunks().await? {
                if !s.meta.is_known_chunk(&h).await? {
                    s.objects.delete(&h).await?;
                    report.orphan_objects_deleted += 1;
                }
            }
        }
        Ok(report)
    }

    /// Run [`Store::gc`] every `gc_interval` (if set) for as long as the
    /// store is open, so space comes back without an operator. Several
    /// processes may collect at once: GC is safe against concurrent GCs.
    pub fn start_background_gc(&self) {
        let Some(interval) = self.shared.cfg.gc_interval else {
            return;
        };
        let shared = Arc::downgrade(&self.shared);
        // On the store's runtime, so any thread may start it.
        self.shared.rt.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = shared.upgrade() else { return };
                let store = Store { shared };
                let res = store.gc(false).await;
                let mut st = store.shared.gc_stats.lock();
                st.runs += 1;
                match res {
                    Ok(r) => {
                        st.chunks_freed += r.chunks_deleted;
                        st.bytes_freed += r.bytes_deleted;
                        if r.chunks_deleted > 0 {
                            tracing::info!(
                                "background gc freed {} chunks ({} bytes stored)",
                                r.chunks_deleted,
                                r.bytes_deleted
                            );
                        }
                    }
                    Err(e) => {
                        st.failed_runs += 1;
                        tracing::warn!("background gc failed, retrying in {interval:?}: {e}");
                    }
                }
            }
        });
    }

    pub fn gc_stats(&self) -> GcStats {
        self.shared.gc_stats.lock().clone()
    }

    /// Upload commits since the store opened, and how many metadata
    /// transactions they took (uploads finishing together share one).
    pub fn upload_stats(&self) -> crate::uploader::UploadStats {
        self.shared.upload_counters.snapshot()
    }

    // ---- cluster: ownership ---------------------------------------------

    fn node(&self) -> Result<&str> {
        self.shared
            .cfg
            .node
            .as_deref()
            .ok_or_else(|| StoreError::InvalidArgument("this store has no node name (single host)".into()))
    }

    pub async fn owner(&self, name: &str) -> Result<VolumeOwner> {
        let rec = self.shared.meta.get_volume(name).await?;
        self.shared.meta.volume_owner(&rec.id).await
    }

    /// Make this node the volume's owner if its epoch is still `seen_epoch`.
    /// Returns the new epoch, or `None` if another claim got there first.
    pub async fn claim(&self, name: &str, seen_epoch: i64) -> Result<Option<i64>> {
        let node = self.node()?;
        let rec = self.shared.meta.get_volume(name).await?;
        let epoch = self.shared.meta.claim_volume(&rec.id, node, seen_epoch).await?;
        if let Some(e) = epoch {
            self.shared.held.lock().insert(rec.name, e);
        }
        Ok(epoch)
    }

    /// Hold the volume's lease, taking it from whichever node has it. Only
    /// for a volume that belongs with one this node holds (a sprite's
    /// memory images go with its disk), whose writer has handed it over or
    /// died. A single-host store fences nothing: a no-op.
    pub async fn take_over(&self, name: &str) -> Result<()> {
        let Some(node) = self.shared.cfg.node.as_deref() else {
            return Ok(());
        };
        // Each failed claim means another node moved the epoch meanwhile.
        for _ in 0..8 {
            let owner = self.owner(name).await?;
            if owner.node.as_deref() == Some(node) && self.held_epoch(name) == Some(owner.epoch) {
                return Ok(());
            }
            if self.claim(name, owner.epoch).await?.is_some() {
                return Ok(());
            }
        }
        Err(StoreError::Meta(format!(
            "the lease of volume {name} kept moving"
        )))
    }

    /// Give up the volume with the epoch this store holds. False if this
    /// store holds no epoch for it or the lease had already moved on.
    pub async fn release(&self, name: &str) -> Result<bool> {
        let node = self.node()?;
        let rec = self.shared.meta.get_volume(name).await?;
        let Some(epoch) = self.shared.held.lock().get(name).copied() else {
            return Ok(false);
        };
        let released = self.shared.meta.release_volume(&rec.id, node, epoch).await?;
        // Either way the epoch is no longer ours to use.
        let mut held = self.shared.held.lock();
        if held.get(name) == Some(&epoch) {
            held.remove(name);
        }
        Ok(released)
    }

    /// Stop holding the volume's lease without touching the database (the
    /// lease already moved to another node).
    pub fn forget_lease(&self, name: &str) {
        self.shared.held.lock().remove(name);
    }

    /// The epoch this store holds the volume (by name) at, if any.
    pub fn held_epoch(&self, name: &str) -> Option<i64> {
        self.shared.held.lock().get(name).copied()
    }

    // ---- cluster: sync points -------------------------------------------

    /// Take a sync point of the volume's current state. The caller makes
    /// the moment consistent (freezes the guest and syncs its filesystem
    /// first). Metadata only: the chunks upload in the background.
    pub async fn sync_point(&self, name: &str) -> Result<MapId> {
        let rec = self.shared.meta.get_volume(name).await?;
        match self.open_here(&rec.id) {
            Some(inner) => {
                let vol = inner.internal_handle();
                tokio::task::spawn_blocking(move || vol.sync_point())
                    .await
                    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
            }
            None => self.shared.meta.sync_point(&rec.id, &[]).await,
        }
    }

    /// Wait until every chunk of sync point `map` is in the object store,
    /// then make it the volume's durable sync point.
    pub async fn wait_sync_durable(&self, name: &str, map: MapId) -> Result<()> {
        let rec = self.shared.meta.get_volume(name).await?;
        // Sealing queued this process's pending chunks already, and opening
        // the store queued those of earlier runs; this catches any the
        // uploader gave up on. Only ids the map names: a pending file that no
        // metadata names yet may be another process's seal in progress.
        for (_, e) in self.shared.meta.load_map(map).await? {
            if let crate::meta::Entry::Pending(p) = e
                && self.shared.cache.pending_path(p).exists()
            {
                self.shared.enqueue_upload(p);
            }
        }
        self.wait_uploaded(map, |_| {}).await?;
        self.shared.meta.promote_sync_point(&rec.id, map).await
    }

    /// Take a sync point and wait until it is durable. Returns its time (ms
    /// since the epoch): a new owner would lose at most the writes after it.
    pub async fn sync(&self, name: &str) -> Result<i64> {
        let rec = self.shared.meta.get_volume(name).await?;
        let lock = self
            .shared
            .sync_locks
            .lock()
            .entry(rec.id.clone())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let map = self.sync_point(name).await?;
        self.wait_sync_durable(name, map).await?;
        let st = self.shared.meta.sync_state(&rec.id).await?;
        match (st.durable_map, st.durable_at_ms) {
            (Some(m), Some(at)) if m == map => Ok(at),
            _ => Err(StoreError::Meta(format!(
                "sync point {map} of {name} was replaced before it became durable"
            ))),
        }
    }

    /// Make a volume this node just claimed safe to open: if its head names
    /// pending chunks that are not in this node's cache, the previous owner
    /// died before uploading them, and the head goes back to the durable
    /// sync point. Call before opening the volume.
    pub async fn adopt(&self, name: &str) -> Result<AdoptReport> {
        let rec = self.shared.meta.get_volume(name).await?;
        let s = &self.shared;
        let foreign_pending = self.foreign_pending(rec.head_map).await?;
        let mut report = AdoptReport {
            foreign_pending,
            ..Default::default()
        };
        if foreign_pending == 0 {
            return Ok(report);
        }
        if self.open_here(&rec.id).is_some() {
            return Err(StoreError::VolumeBusy(rec.name));
        }
        // The previous owner may have finished the uploads of its newest
        // sync point and died before promoting it.
        let st = s.meta.sync_state(&rec.id).await?;
        if let Some(m) = st.pending_map
            && s.meta.pending_count(m).await? == 0
        {
            s.meta.promote_sync_point(&rec.id, m).await?;
        }
        let meta = s.meta.clone();
        let shared = s.clone();
        let at = self
            .with_exclusive(name, move |v| {
                let at = shared.block_on(meta.rollback_to_sync_point(&v.record().id))??;
                if at.is_some() {
                    // Local dirty chunks of this volume predate the foreign
                    // writes; on top of the rolled-back head they would tear it.
                    v.drop_local_state()?;
                }
                Ok(at)
            })
            .await?;
        match at {
            Some(at) => {
                report.rolled_back = true;
                report.sync_at_ms = Some(at);
                tracing::warn!(
                    "volume {name}: {foreign_pending} slots named chunks lost with the previous owner; \
                     rolled back to the sync point of {at} ms"
                );
            }
            None => tracing::warn!(
                "volume {name}: {foreign_pending} slots name chunks lost with the previous owner, \
                 and there is no durable sync point to roll back to"
            ),
        }
        Ok(report)
    }

    /// Forget this node's local, never-committed state of a volume (dirty
    /// chunks, discard markers): another node owns it now, and that state
    /// would tear the newer head if this node ever opened the volume again.
    /// The volume must not be open in this process.
    pub async fn discard_local(&self, name: &str) -> Result<()> {
        self.with_exclusive(name, |v| Ok(v.drop_local_state()?)).await
    }

    /// How much of the volume is safe from losing this node.
    pub async fn durability(&self, name: &str) -> Result<Durability> {
        let rec = self.shared.meta.get_volume(name).await?;
        let s = &self.shared;
        let pending = s.meta.pending_count(rec.head_map).await?;
        // Dirty files and discard markers live in the dirty directory whether
        // or not the volume is open right now.
        let mut local: std::collections::HashSet<u64> = std::collections::HashSet::new();
        match std::fs::read_dir(s.cache.dirty_dir(&rec.id)) {
            Ok(dir) => {
                for ent in dir {
                    let ent = ent?;
                    let name = ent.file_name();
                    let name = name.to_str().unwrap_or("");
                    let idx = name.strip_suffix(crate::volume::UNMAP_SUFFIX).unwrap_or(name);
                    if let Ok(idx) = idx.parse::<u64>() {
                        local.insert(idx);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let local_only_slots = if pending == 0 {
            local.len() as u64
        } else if local.is_empty() {
            pending
        } else {
            // A slot rewritten after its seal is both pending and dirty.
            for (idx, e) in s.meta.load_map(rec.head_map).await? {
                if matches!(e, crate::meta::Entry::Pending(_)) {
                    local.insert(idx);
                }
            }
            local.len() as u64
        };
        let st = s.meta.sync_state(&rec.id).await?;
        Ok(Durability {
            fully_durable: local_only_slots == 0,
            durable_at_ms: st.durable_at_ms,
            local_only_slots,
        })
    }
}

impl Shared {
    /// The uploader committed pending chunk `p` as `hash`: open volumes
    /// swap it for the hash. Called under the commit gate, while the
    /// pending file still exists (readers that resolved `p` find it).
    pub(crate) fn upload_committed(&self, p: PendingId, hash: Option<ChunkHash>) {
        for v in self.open_volumes() {
            v.pending_committed(p, hash);
        }
    }

    /// The pending file of committed upload `p` is gone: only now do its
    /// bytes stop counting as local-only. So `local_only_bytes() == 0`
    /// means no upload has anything left to do here: every uploaded chunk
    /// is in the read cache (where `drop_read_cache` finds it) or nowhere
    /// local, never still in `pending/` (where a checkpoint reader that
    /// loaded its map before the commit would be served from).
    pub(crate) fn upload_finished(&self, p: PendingId) {
        self.queued.lock().remove(&p);
        self.budget.release_pending(p);
        self.uploads_done.send_modify(|n| *n += 1);
    }

    pub(crate) fn upload_abandoned(&self, p: PendingId) {
        self.queued.lock().remove(&p);
        self.budget.release_pending(p);
    }
}

fn spawn_writeback(shared: Weak<Shared>) {
    tokio::spawn(async move {
        loop {
            let Some(s) = shared.upgrade() else { return };
            let delay = s.cfg.writeback_delay;
            // Holding the Arc for at most one tick delays a store's teardown by that much.
            let _ = tokio::time::timeout(Duration::from_millis(250), s.writeback_kick.notified()).await;
            let vols = s.open_volumes();
            let pressure = s.budget.over_high_water();
            drop(s);
            if vols.is_empty() {
                continue;
            }
            let res = tokio::task::spawn_blocking(move || {
                for v in &vols {
                    if let Err(e) = v.writeback(delay, pressure) {
                        tracing::warn!("write-back of {} failed: {e}", v.name());
                    }
                }
            })
            .await;
            if let Err(e) = res {
                tracing::error!("write-back task failed: {e}");
            }
        }
    });
}
