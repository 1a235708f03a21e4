//! Rewinding a sprite's disk to a checkpoint.

use super::*;

impl SpriteManager {
    /// Rewind the sprite's disk to a checkpoint. An awake sprite is stopped
    /// (its sessions end), rewound and started again (services restart).
    /// A checkpoint with memory (gVisor) brings back its processes instead:
    /// at once if the sprite was awake, else at its next wake.
    pub async fn restore(&self, name: &str, id: &str) -> Result<CheckpointRecord> {
        let ck = self.get_checkpoint(name, id).await?;
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        let was_awake = matches!(*phase, Phase::Awake(_));
        // No grace for SIGTERM: whatever the sprite's programs would save
        // on the way out is about to be rewound away.
        self.stop_locked(&slot, &mut phase, Duration::ZERO).await?;
        let volume = slot.record.lock().volume.clone();
        when_released(|| self.inner.store.restore(&volume, &ck.id)).await?;
        self.memory_follows_checkpoint(&volume, &volume, &ck.id).await?;
        self.update_record(&slot, |r| r.active_checkpoint = Some(ck.id.clone()))
            .await?;
        if was_awake {
            let rec = slot.record.lock().clone();
            let live = self.boot(&rec).await?;
            *phase = Phase::Awake(Box::new(live));
            self.status_to(&slot, SpriteStatus::Running);
            slot.touch();
            self.update_record(&slot, |r| r.last_started_at_ms = Some(now_ms()))
                .await?;
        }
        Ok(ck)
    }

    /// `volume`'s disk now holds `source`'s checkpoint `id`: the processes
    /// it went cold with belong to a disk that is gone, and the
    /// checkpoint's memory image (if it has one) is what its next boot
    /// starts from. Copying the image is a fork: metadata only.
    pub(super) async fn memory_follows_checkpoint(&self, volume: &str, source: &str, id: &str) -> Result<()> {
        let store = &self.inner.store;
        let sleep = memory_image::volume_name(volume, memory_image::SLEEP_TAG);
        memory_image::delete(store, &sleep).await?;
        let image = memory_image::volume_name(source, id);
        if memory_image::exists(store, &image).await? {
            store.fork(&sleep, VolumeSource::Volume(image)).await?;
        }
        Ok(())
    }
}
