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
