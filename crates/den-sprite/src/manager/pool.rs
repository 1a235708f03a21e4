//! The pre-booted pool: blank sprites kept fully booted (disk forked from
//! the template, network namespace, container, agent answering), so that a
//! create only gives one its identity instead of booting it.
//!
//! A pooled sprite is nobody's: it is not in the slots or the catalog, so
//! the API never lists it, quotas and `max_awake` never count it, and the
//! idle monitor never puts it to sleep. A claim gives it a record (name,
//! limits, policy, attributes), its hostname and `/etc` files, and moves it
//! into the slots as a running sprite; the filler then makes another.
//!
//! Crash safety: before a pooled sprite's volume exists, its key is written
//! to `<data_dir>/pool/`; a claim removes it once the record is in the
//! catalog. A start finds the keys a crash left and deletes every such
//! volume no record names (the containers, mounts and network namespaces
//! are removed with everything else the crashed run left).

use std::sync::Weak;
use std::sync::atomic::AtomicU64;

use super::create::{new_key, new_record};
use super::*;

/// How long the filler waits after a failed boot before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One blank, booted sprite.
pub(crate) struct Pooled {
    rec: SpriteRecord,
    live: Box<Live>,
}

#[derive(Default)]
pub(crate) struct Pool {
    ready: Mutex<Vec<Pooled>>,
    /// Wakes the filler: a sprite was claimed, or the manager stops.
    refill: Arc<tokio::sync::Notify>,
    /// Held while the filler makes a sprite, so a shutdown waits for it
    /// instead of leaving it half made.
    filling: AsyncMutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The configured size, changed at run time by [`SpriteManager::set_pool_size`].
    size: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(size: usize) -> Self {
        Pool {
            size: AtomicUsize::new(size),
            ..Default::default()
        }
    }
}

/// How the pool has done since the manager started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Creates served by a pre-booted sprite.
    pub hits: u64,
    /// Creates that found none (or none that fit) and made one cold.
    pub misses: u64,
    /// Sprites ready now.
    pub ready: usize,
}

fn ledger_dir(cfg: &ManagerConfig) -> PathBuf {
    cfg.data_dir.join("pool")
}

impl SpriteManager {
    /// Sprites the pool keeps ready: the configured size on a single host.
    /// A cluster node keeps none yet (a pooled sprite's lease and placement
    /// would need the router's say).
    pub fn pool_size(&self) -> usize {
        if self.inner.store.config().node.is_some() {
            0
        } else {
            self.inner.pool.size.load(Ordering::Relaxed)
        }
    }

    /// Change how many sprites the pool keeps; sprites beyond the new size
    /// are stopped and deleted now.
    pub async fn set_pool_size(&self, size: usize) {
        self.inner.pool.size.store(size, Ordering::Relaxed);
        let extra: Vec<Pooled> = {
            let mut ready = self.inner.pool.ready.lock();
            let keep = ready.len().min(size);
            ready.split_off(keep)
        };
        for p in extra {
            self.discard(p.rec, p.live).await;
        }
        self.inner.pool.refill.notify_waiters();
    }

    /// Creates served by the pool and sprites ready in it.
    pub fn pool_stats(&self) -> PoolStats {
        let p = &self.inner.pool;
        PoolStats {
            hits: p.hits.load(Ordering::Relaxed),
            misses: p.misses.load(Ordering::Relaxed),
            ready: p.ready.lock().len(),
        }
    }

    /// Wait until the pool holds its configured number of sprites (or
    /// `timeout` passes, then an error): for benchmarks and tests that need
    /// a hit.
    pub async fn pool_filled(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want = self.pool_size();
        loop {
            let refilled = self.inner.pool.refill.clone();
            let notified = refilled.notified();
            if self.inner.pool.ready.lock().len() >= want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SpriteError::Catalog(format!(
                    "the sprite pool did not reach {want} within {timeout:?}"
                )));
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    /// A pooled sprite for a create of `image` with `resources`, if one is
    /// ready and can take those limits.
    pub(super) fn take_pooled(
        &self,
        image: &str,
        runtime: den_runtime::Runtime,
        resources: &Resources,
    ) -> Option<Pooled> {
        let pool = &self.inner.pool;
        if self.pool_size() == 0 {
            return None;
        }
        let taken = {
            let mut ready = pool.ready.lock();
            ready
                .iter()
                .position(|p| {
                    p.rec.image == image
                        && p.rec.runtime == runtime
                        && limits_reachable(&p.rec.resources, resources)
                })
                .map(|i| ready.swap_remove(i))
        };
        match &taken {
            Some(_) => pool.hits.fetch_add(1, Ordering::Relaxed),
            None => pool.misses.fetch_add(1, Ordering::Relaxed),
        };
        pool.refill.notify_waiters();
        taken
    }

    /// Give a pooled sprite the identity of a new one and make it a running
    /// sprite under `name`. On an error the pooled sprite is destroyed
    /// (the caller falls back to a cold create).
    pub(super) async fn claim(&self, pooled: Pooled, name: &str, opts: &CreateSprite) -> Result<SpriteInfo> {
        let Pooled { mut rec, live } = pooled;
        let now = now_ms();
        rec.id = uuid::Uuid::new_v4().to_string();
        rec.name = name.to_string();
        rec.created_at_ms = now;
        rec.updated_at_ms = now;
        rec.last_running_at_ms = Some(now);
        rec.last_started_at_ms = Some(now);
        rec.policy = opts.policy.clone();
        rec.resources = opts.resources.unwrap_or(self.inner.cfg.resources);
        rec.attrs = opts.attrs.clone();
        // Counted among the awake from here, like a boot.
        let admitted = match self.admit(&rec) {
            Ok(a) => a,
            Err(e) => {
                self.discard(rec, live).await;
                return Err(e);
            }
        };
        if let Err(e) = self.give_identity(&rec, &live).await {
            self.discard(rec, live).await;
            return Err(e);
        }
        let slot = Slot::awake(rec.clone(), live);
        let inserted = {
            let mut slots = self.inner.slots.lock();
            !slots.contains_key(name) && slots.insert(name.to_string(), slot.clone()).is_none()
        };
        if !inserted {
            let live = slot.take_live().await;
            self.discard(rec, live).await;
            return Err(SpriteError::Exists(name.to_string()));
        }
        if let Err(e) = self.inner.catalog.insert(&rec).await {
            self.inner.slots.lock().remove(name);
            let live = slot.take_live().await;
            self.discard(rec, live).await;
            return Err(e);
        }
        drop(admitted);
        unledger(&self.inner.cfg, &rec.key);
        slot.touch();
        let info = self.with_storage(slot.info());
        let _ = self.inner.events.send(SpriteEvent::Changed(info.clone()));
        Ok(info)
    }

    /// Name, limits and policy of a claimed sprite, applied to the running
    /// sprite: what a boot would have given it.
    async fn give_identity(&self, rec: &SpriteRecord, live: &Live) -> Result<()> {
        let net = live.net.as_ref().expect("a pooled sprite is booted");
        live::write_etc(&live.paths, rec.short_name(), *net.dns.ip(), rec.policy.as_ref())?;
        let handle = live.handle.clone().expect("a pooled sprite is booted");
        let (backend, netm, key) = (live.backend.clone(), self.inner.net.clone(), live.key.clone());
        let (resources, pooled_with, policy) = (rec.resources, self.inner.cfg.resources, rec.policy.clone());
        let hostname = rec.short_name().to_string();
        blocking(move || {
            backend.set_hostname(&handle, &hostname)?;
            if resources != pooled_with {
                backend.update_resources(&handle, &resources)?;
            }
            if let Some(p) = policy {
                netm.set_policy(&key, &p)?;
            }
            Ok(())
        })
        .await
    }

    /// Stop a pooled (or half-claimed) sprite and delete its disk.
    async fn discard(&self, rec: SpriteRecord, live: Box<Live>) {
        let (n, g) = (self.inner.net.clone(), self.inner.cfg.stop_grace);
        if let Err(e) = blocking(move || live.teardown(&n, g)).await {
            tracing::warn!(sprite = %rec.name, error = %e, "stopping a pooled sprite");
        }
        self.forget_pooled_volume(&rec.key).await;
    }

    async fn forget_pooled_volume(&self, key: &str) {
        let volume = format!("sprite-{key}");
        match delete_volume_released(&self.inner.store, &volume).await {
            Ok(()) => unledger(&self.inner.cfg, key),
            Err(e) => tracing::warn!(volume, error = %e, "deleting a pooled sprite's disk"),
        }
        let _ = std::fs::remove_dir_all(SpritePaths::new(&self.inner.cfg.run_dir, key).root);
    }

    /// Make one pooled sprite: the create path, then a boot.
    async fn make_pooled(&self) -> Result<Pooled> {
        let version = self.inner.image.version().to_string();
        let key = new_key();
        let dir = ledger_dir(&self.inner.cfg);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(&key), b""))
            .map_err(|e| SpriteError::io(format!("writing {}", dir.display()), e))?;
        let volume = match self.fork_template(&version, &key).await {
            Ok(v) => v,
            Err(e) => {
                unledger(&self.inner.cfg, &key);
                return Err(e);
            }
        };
        let name = format!("pool-{key}");
        let rec = new_record(
            &name,
            key.clone(),
            volume,
            version,
            self.inner.cfg.runtime,
            self.inner.cfg.resources,
            serde_json::Value::Null,
        );
        match self.boot(&rec).await {
            Ok(live) => Ok(Pooled {
                rec,
                live: Box::new(live),
            }),
            Err(e) => {
                self.forget_pooled_volume(&key).await;
                Err(e)
            }
        }
    }

    /// Stop every pooled sprite and delete its disk (the manager stops).
    pub(super) async fn drain_pool(&self) {
        self.inner.pool.refill.notify_waiters();
        // A sprite being made is finished first, then found below.
        let _filling = self.inner.pool.filling.lock().await;
        let ready: Vec<Pooled> = std::mem::take(&mut *self.inner.pool.ready.lock());
        for p in ready {
            self.discard(p.rec, p.live).await;
        }
    }

    /// At start: delete the volumes of pooled sprites a crashed run left
    /// (those no record names; a claim may have got as far as the catalog).
    pub(super) async fn reclaim_pool_leftovers(&self, keys: &[String]) {
        let Ok(entries) = std::fs::read_dir(ledger_dir(&self.inner.cfg)) else {
            return;
        };
        for e in entries.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            if keys.contains(&key) {
                unledger(&self.inner.cfg, &key);
            } else if validate_key(&key).is_ok() {
                tracing::info!(key, "deleting a pre-booted sprite left by an earlier run");
                self.forget_pooled_volume(&key).await;
            }
        }
    }
}

/// Keep the pool full, one sprite at a time, until the manager stops.
pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let refill = i.pool.refill.clone();
        let notified = refill.notified();
        let mgr = SpriteManager::from_inner(i);
        let mut wait = None;
        if mgr.check_running().is_err() {
            return;
        }
        if mgr.inner.pool.ready.lock().len() < mgr.pool_size() {
            let filling = mgr.inner.pool.filling.lock().await;
            if mgr.check_running().is_err() {
                return;
            }
            match mgr.make_pooled().await {
                Ok(p) => {
                    mgr.inner.pool.ready.lock().push(p);
                    drop(filling);
                    mgr.inner.pool.refill.notify_waiters();
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pre-booting a sprite for the pool");
                    wait = Some(RETRY_AFTER);
                }
            }
        }
        // No strong reference while waiting: a dropped manager ends the task.
        drop(mgr);
        match wait {
            Some(d) => {
                let _ = tokio::time::timeout(d, notified).await;
            }
            None => notified.await,
        }
    }
}

/// Whether a sprite made with limits `from` can be given limits `to`: a
/// live update changes a limit but can't remove one.
fn limits_reachable(from: &Resources, to: &Resources) -> bool {
    (to.memory_bytes.is_some() || from.memory_bytes.is_none())
        && (to.pids.is_some() || from.pids.is_none())
        && (to.cpu.shares.is_some() || from.cpu.shares.is_none())
        && (to.cpu.quota_us.is_some() || from.cpu.quota_us.is_none())
}

fn unledger(cfg: &ManagerConfig, key: &str) {
    let _ = std::fs::remove_file(ledger_dir(cfg).join(key));
}
