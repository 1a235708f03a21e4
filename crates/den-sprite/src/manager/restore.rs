//! Rewinding a sprite's disk to a checkpoint.

use super::*;

impl SpriteManager {
    /// Rewind the sprite's disk to a checkpoint. An awake sprite is stopped
    /// (its sessions end), rewound and started again (services restart).
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
}
