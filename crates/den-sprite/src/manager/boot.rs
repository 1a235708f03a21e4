//! Waking a sprite: admission, boot, thaw, restart.

use super::*;

impl SpriteManager {
    /// Boot a sprite (cold → running) and account for the time it took.
    ///
    /// A sprite that went cold with its processes (gVisor) comes back from
    /// its memory image. Once the sprite runs, from the image or afresh, the
    /// image is deleted: nothing may resurrect those processes over a disk
    /// that has moved on. If the image can't be restored, the sprite boots
    /// afresh (and the log says so); if that fails too, nothing ran and the
    /// image stays for the next try.
    pub(super) async fn boot(&self, rec: &SpriteRecord) -> Result<Live> {
        let mut ctx = self.boot_context(rec)?;
        let store = &self.inner.store;
        let image = memory_image::volume_name(&rec.volume, memory_image::SLEEP_TAG);
        let has_image = ctx.backend.memory().is_some() && memory_image::exists(store, &image).await?;
        let mut live = None;
        if has_image {
            ctx.memory_image = Some(image.clone());
            match live::boot(&ctx, rec).await {
                Ok(l) => live = Some(l),
                Err(e) => tracing::warn!(sprite = %rec.name, error = %e,
                    "the sprite's processes could not be restored from memory; booting it afresh"),
            }
            ctx.memory_image = None;
        }
        let live = match live {
            Some(l) => l,
            None => live::boot(&ctx, rec).await?,
        };
        if has_image {
            let deleted = memory_image::delete(store, &image).await;
            if let Err(e) = deleted {
                // Running on with the image in place could bring its
                // processes back over a disk that has moved on.
                let net = self.inner.net.clone();
                let _ = blocking(move || live.teardown(&net, Duration::ZERO)).await;
                return Err(e);
            }
        }
        self.inner.boots.record(live.phases);
        Ok(live)
    }

    /// Boots since this manager started, phase by phase.
    pub fn boot_totals(&self) -> BootTotals {
        self.inner.boots.totals()
    }

    /// A cursor for [`Self::boots_since`].
    pub fn boot_cursor(&self) -> u64 {
        self.inner.boots.cursor()
    }

    /// The boots after `cursor` (the most recent few thousand at most).
    pub fn boots_since(&self, cursor: u64) -> Vec<BootPhases> {
        self.inner.boots.since(cursor)
    }

    pub(super) fn boot_context(&self, rec: &SpriteRecord) -> Result<BootContext<'_>> {
        let i = &self.inner;
        let version = &rec.image;
        Ok(BootContext {
            backend: i.engines.get(rec.runtime)?,
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
            memory_image: None,
        })
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
            self.stop_locked(&slot, &mut phase, self.inner.cfg.stop_grace)
                .await?;
        }
        if matches!(*phase, Phase::Cold) {
            self.boot_locked(&slot, &mut phase).await?;
        }
        let Phase::Awake(live) = &mut *phase else {
            unreachable!("booted above")
        };
        if live.frozen {
            if let Some(h) = &live.handle {
                live.backend.thaw(h)?;
            }
            live.frozen = false;
        }
        self.status_to(&slot, SpriteStatus::Running);
        slot.holds.fetch_add(1, Ordering::AcqRel);
        slot.touch();
        Ok(Activity {
            agent: live.agent.clone(),
            addr: live.net.as_ref().map(|n| n.addr).unwrap_or(Ipv4Addr::UNSPECIFIED),
            netns: live.net.as_ref().map(|n| n.netns.clone()),
            boot_id: live.boot_id,
            slot: slot.clone(),
        })
    }

    /// Boot a cold sprite (its phase lock held): admission, container,
    /// record, status.
    pub(super) async fn boot_locked(&self, slot: &Slot, phase: &mut Phase) -> Result<()> {
        // Cluster mode: boot only a sprite whose lease this node holds
        // (checked under the phase lock, which hand-off also takes).
        let volume = slot.record.lock().volume.clone();
        if self.inner.store.config().node.is_some() && self.inner.store.held_epoch(&volume).is_none() {
            return Err(SpriteError::NotOwner(slot.name.clone()));
        }
        let rec = slot.record.lock().clone();
        // Holds this sprite's place among the awake ones until its status
        // says so (or the boot fails).
        let admitted = self.admit(&rec)?;
        let live = self.boot(&rec).await?;
        *phase = Phase::Awake(Box::new(live));
        let now = now_ms();
        self.update_record(slot, |r| {
            r.last_running_at_ms = Some(now);
            r.last_started_at_ms = Some(now);
        })
        .await?;
        self.status_to(slot, SpriteStatus::Running);
        drop(admitted);
        Ok(())
    }

    /// Stop the sprite's container and boot it again: every process
    /// restarts (services too), the disk is kept. A cold sprite is booted.
    pub async fn restart(&self, name: &str) -> Result<SpriteInfo> {
        self.check_running()?;
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if slot.deleted.load(Ordering::Acquire) {
            return Err(SpriteError::NotFound(name.to_string()));
        }
        // A restart restarts every process: none is kept in memory.
        self.stop_locked(&slot, &mut phase, self.inner.cfg.stop_grace)
            .await?;
        self.check_running()?;
        self.boot_locked(&slot, &mut phase).await?;
        slot.touch();
        Ok(self.with_storage(slot.info()))
    }

    /// The agent of a sprite that is running now (not frozen, not cold),
    /// without waking it or keeping it awake; `None` otherwise, and while
    /// the sprite is in a transition (booting, stopping, a checkpoint), so a
    /// health check never waits for a boot.
    pub async fn running_agent(&self, name: &str) -> Result<Option<Client>> {
        let slot = self.slot(name)?;
        let Ok(phase) = slot.phase.try_lock() else {
            return Ok(None);
        };
        Ok(match &*phase {
            Phase::Awake(live) if !live.frozen && !live.init_exited() => Some(live.agent.clone()),
            _ => None,
        })
    }

    /// Let a cold sprite boot, or refuse: the server-wide `max_awake`, then
    /// the admission hook. The check and the reservation happen under one
    /// lock, and the reservation lasts until the sprite's status is awake,
    /// so two wakes racing for the last place can't both pass (each sees
    /// the other either booting or awake).
    pub(super) fn admit(&self, rec: &SpriteRecord) -> Result<Admitted> {
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
}

/// A sprite's place among the awake ones while it boots.
pub(super) struct Admitted {
    inner: Arc<Inner>,
    name: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.inner.booting.lock().remove(&self.name);
    }
}
