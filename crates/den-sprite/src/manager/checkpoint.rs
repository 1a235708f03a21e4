//! Checkpoints of a sprite's disk, taken at a consistent moment.

use super::*;

impl SpriteManager {
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

    /// Snapshot the sprite's disk and memory together (den extension,
    /// gVisor sprites): restoring the checkpoint, or forking it, brings
    /// back its running processes. A cold sprite is woken first (with the
    /// processes it went cold with, if any). The memory image goes into the
    /// store next to the disk: it is as durable, and deduplicated.
    pub async fn checkpoint_memory(&self, name: &str, comment: &str) -> Result<CheckpointRecord> {
        let activity = self.wake(name).await?;
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let Phase::Awake(live) = &*phase else {
            return Err(SpriteError::Conflict(format!("sprite {name} went to sleep")));
        };
        let (Some(handle), Some(_)) = (live.handle.clone(), live.backend.memory()) else {
            return Err(SpriteError::Invalid(format!(
                "memory checkpoints need a gvisor sprite; {name} runs on {}",
                slot.record.lock().runtime
            )));
        };
        let volume = slot.record.lock().volume.clone();
        let hostname = slot.record.lock().short_name().to_string();
        let dir = live.paths.memory_image();
        let t0 = Instant::now();
        // The agent's host socket and connections can't be in the image: it
        // closes them until told that the sprite runs on.
        tokio::time::timeout(self.inner.cfg.boot_timeout, live.agent.quiesce())
            .await
            .map_err(|_| SpriteError::Conflict(format!("the agent of {name} did not answer")))??;
        let quiesced = t0.elapsed();
        // Disk and memory at the same instant: both while it is frozen.
        let (backend, comment, image_dir, h) = (
            live.backend.clone(),
            comment.to_string(),
            dir.clone(),
            handle.clone(),
        );
        let taken = self
            .while_frozen(live, move |vol| {
                let ck = vol.checkpoint(&comment)?;
                let _ = std::fs::remove_dir_all(&image_dir);
                let memory = backend.memory().expect("checked above");
                Ok((ck, memory.save(&h, &image_dir, true)))
            })
            .await;
        let saved_at = t0.elapsed();
        let image = taken
            .as_ref()
            .ok()
            .map(|(ck, _)| memory_image::volume_name(&volume, &ck.id));
        // The sprite runs on while its image goes into the store. Still
        // under the phase lock: nothing else may use the image directory.
        let store_image = async {
            match (&taken, &image) {
                (Ok((_, Ok(()))), Some(image)) => {
                    Some(memory_image::save(&self.inner.store, image, &dir, &hostname).await)
                }
                _ => None,
            }
        };
        let ((), stored) = tokio::join!(self.resume_agent(live, &handle), store_image);
        let _ = std::fs::remove_dir_all(&dir);
        drop(phase);
        drop(activity);
        tracing::debug!(
            sprite = name,
            quiesce_ms = quiesced.as_millis() as u64,
            frozen_ms = (saved_at - quiesced).as_millis() as u64,
            resumed_and_stored_ms = (t0.elapsed() - saved_at).as_millis() as u64,
            "memory checkpoint"
        );
        let (ck, saved) = taken?;
        let failed = match (saved, stored) {
            (Err(e), _) => Some(SpriteError::Invalid(format!(
                "the sprite's memory could not be saved: {e}"
            ))),
            (Ok(()), Some(Err(e))) => Some(e),
            _ => None,
        };
        if let Some(e) = failed {
            if let Some(image) = &image {
                let _ = memory_image::delete(&self.inner.store, image).await;
            }
            let _ = self.inner.store.delete_checkpoint(&volume, &ck.id).await;
            return Err(e);
        }
        Ok(ck)
    }

    /// Have a quiesced agent serve again, and wait until it does.
    async fn resume_agent(&self, live: &Live, handle: &den_runtime::Handle) {
        let mut resume = crate::live::AgentResume::new(live.backend.clone(), handle.clone());
        let deadline = Instant::now() + self.inner.cfg.boot_timeout;
        loop {
            if let Err(e) = resume.nudge().await {
                tracing::warn!(error = %e, "waking the agent after a memory checkpoint");
                return;
            }
            if live.agent.ping().await.is_ok() || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The memory image of checkpoint `id`: its bytes, and what the store
    /// holds of them (compressed, and without chunks it shares with other
    /// volumes counted twice: see `Store::stored_bytes`). `None` without one.
    pub async fn memory_image_bytes(&self, name: &str, id: &str) -> Result<Option<(u64, u64)>> {
        let volume = self.slot(name)?.record.lock().volume.clone();
        let image = memory_image::volume_name(&volume, id);
        if !memory_image::exists(&self.inner.store, &image).await? {
            return Ok(None);
        }
        let logical = memory_image::logical_bytes(&self.inner.store, &image).await?;
        // Chunks count at their stored (compressed) size once uploaded.
        self.inner.store.flush(&image, |_| {}).await?;
        let stored = self.inner.store.stored_bytes(&image).await?;
        Ok(Some((logical, stored)))
    }

    /// Bytes the sprites `names` keep in the store: their disks with their
    /// checkpoints, and their memory images (what quotas count). A sprite
    /// deleted meanwhile counts nothing.
    pub async fn stored_bytes(&self, names: &[&str]) -> Result<u64> {
        let store = &self.inner.store;
        let volumes: std::collections::HashSet<String> = names
            .iter()
            .filter_map(|n| self.slot(n).ok())
            .map(|s| s.record.lock().volume.clone())
            .collect();
        let all = store.list_volumes().await?;
        let mut total = 0u64;
        for v in &all {
            let owner = memory_image::owner_and_tag(&v.name).map_or(v.name.as_str(), |(o, _)| o);
            if volumes.contains(owner) {
                match store.stored_bytes(&v.name).await {
                    Ok(b) => total = total.saturating_add(b),
                    Err(StoreError::VolumeNotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(total)
    }

    /// The ids of the sprite's checkpoints that carry a memory image.
    pub async fn memory_checkpoints(&self, name: &str) -> Result<std::collections::HashSet<String>> {
        let volume = self.slot(name)?.record.lock().volume.clone();
        Ok(memory_image::images_of(&self.inner.store, &volume)
            .await?
            .into_iter()
            .filter_map(|(_, tag)| (tag != memory_image::SLEEP_TAG).then_some(tag))
            .collect())
    }

    /// Remove every memory image of `volume` (a sprite being deleted).
    pub(super) async fn delete_memory_images(&self, volume: &str) -> Result<()> {
        for (image, _) in memory_image::images_of(&self.inner.store, volume).await? {
            memory_image::delete(&self.inner.store, &image).await?;
        }
        Ok(())
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
        self.inner.store.delete_checkpoint(&volume, &ck.id).await?;
        let image = memory_image::volume_name(&volume, &ck.id);
        memory_image::delete(&self.inner.store, &image).await
    }

    /// Run `f` on the disk of an awake sprite while its processes are
    /// frozen and its filesystem is synced, so what `f` records of the
    /// volume is a consistent filesystem image. Always thaws.
    pub(super) async fn while_frozen<T: Send + 'static>(
        &self,
        live: &Live,
        f: impl FnOnce(&den_store::Volume) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let guard = self.freeze_synced(live).await?;
        let vol = live
            .disk
            .as_ref()
            .expect("an awake sprite has its disk")
            .volume()
            .clone();
        blocking(move || {
            let res = f(&vol);
            // Thawing waits on the engine: here, off the async threads.
            drop(guard);
            res
        })
        .await
    }

    /// Freeze an awake sprite with everything it wrote on its disk: the
    /// filesystem synced, so the volume holds a consistent image until the
    /// guard thaws the sprite.
    pub(super) async fn freeze_synced(&self, live: &Live) -> Result<FreezeGuard> {
        let (backend, handle, frozen) = (live.backend.clone(), live.handle.clone(), live.frozen);
        let mp = live
            .disk
            .as_ref()
            .expect("an awake sprite has its disk")
            .mountpoint()
            .to_path_buf();
        blocking(move || {
            let guard = FreezeGuard::new(backend, handle, frozen)?;
            disk::syncfs(&mp)?;
            Ok(guard)
        })
        .await
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

/// Freezes a running sprite (unless it already was) and always thaws it again.
pub(super) struct FreezeGuard {
    backend: Arc<dyn Backend>,
    handle: Option<den_runtime::Handle>,
}

impl FreezeGuard {
    pub(super) fn new(
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
