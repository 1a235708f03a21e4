//! Deleting a sprite: processes, disk and checkpoints.

use super::*;

impl SpriteManager {
    /// Destroy a sprite: its processes, disk and checkpoints.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        if slot.deleted.load(Ordering::Acquire) {
            return Err(SpriteError::NotFound(name.to_string()));
        }
        self.stop_locked(&slot, &mut phase, self.inner.cfg.stop_grace)
            .await?;
        let volume = slot.record.lock().volume.clone();
        self.delete_memory_images(&volume).await?;
        delete_volume_released(&self.inner.store, &volume).await?;
        self.inner.catalog.delete(name).await?;
        slot.deleted.store(true, Ordering::Release);
        self.inner.slots.lock().remove(name);
        let _ = self.inner.events.send(SpriteEvent::Deleted(slot.info()));
        let _ =
            std::fs::remove_dir_all(SpritePaths::new(&self.inner.cfg.run_dir, &slot.record.lock().key).root);
        Ok(())
    }
}
