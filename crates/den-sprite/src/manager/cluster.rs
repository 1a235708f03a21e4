//! Cluster hooks: catalog refresh, hand-off, fencing, durability.

use super::*;

impl SpriteManager {
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
    pub(super) fn adopt_record(&self, name: &str, rec: Option<SpriteRecord>) -> Option<SpriteInfo> {
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
    /// A gVisor sprite's processes go along in its memory image, which the
    /// next owner restores from the object store.
    pub async fn hand_off(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await?;
        let volume = slot.record.lock().volume.clone();
        self.inner.store.flush(&volume, |_| {}).await?;
        let image = memory_image::volume_name(&volume, memory_image::SLEEP_TAG);
        if memory_image::exists(&self.inner.store, &image).await? {
            self.inner.store.flush(&image, |_| {}).await?;
            self.inner.store.release(&image).await?;
        }
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
                let (b, h) = (live.backend.clone(), h.clone());
                blocking(move || Ok(b.freeze(&h)?)).await?;
            }
            live.frozen = true;
            self.status_to(&slot, SpriteStatus::Warm);
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
            self.status_to(&slot, SpriteStatus::Cold);
            let n = self.inner.net.clone();
            if let Err(e) = blocking(move || live.teardown(&n, Duration::ZERO)).await {
                tracing::warn!(sprite = name, error = %e, "stopping an evicted sprite");
            }
        }
        let volume = slot.record.lock().volume.clone();
        self.inner.store.discard_local(&volume).await?;
        Ok(())
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
}
