//! Putting a sprite to sleep: frozen (warm) or stopped (cold).

use super::*;

impl SpriteManager {
    /// Put a sprite to sleep now: `Warm` freezes it, `Cold` stops it.
    pub async fn sleep(&self, name: &str, level: SpriteStatus) -> Result<()> {
        let slot = self.slot(name)?;
        let mut phase = slot.phase.lock().await;
        self.sleep_locked(&slot, &mut phase, level).await
    }

    pub(crate) async fn sleep_locked(
        &self,
        slot: &Slot,
        phase: &mut Phase,
        level: SpriteStatus,
    ) -> Result<()> {
        match level {
            SpriteStatus::Running => Ok(()),
            SpriteStatus::Warm => {
                if let Phase::Awake(live) = phase
                    && !live.frozen
                {
                    if let Some(h) = &live.handle {
                        let (b, h) = (live.backend.clone(), h.clone());
                        blocking(move || Ok(b.freeze(&h)?)).await?;
                    }
                    live.frozen = true;
                    // The record first, so the event and whoever reads the
                    // sprite after it see the times of this transition.
                    let active = slot.last_active_ms();
                    let recorded = self
                        .update_record(slot, |r| {
                            r.last_warming_at_ms = Some(now_ms());
                            r.last_active_at_ms = Some(active);
                        })
                        .await;
                    self.status_to(slot, SpriteStatus::Warm);
                    recorded?;
                }
                Ok(())
            }
            SpriteStatus::Cold => self.stop_locked(slot, phase, self.inner.cfg.stop_grace).await,
        }
    }

    /// Stop an awake sprite (cold), giving PID 1 `grace` to stop its
    /// services and sessions after SIGTERM before everything is killed.
    pub(crate) async fn stop_locked(&self, slot: &Slot, phase: &mut Phase, grace: Duration) -> Result<()> {
        let Phase::Awake(_) = phase else {
            return Ok(());
        };
        let Phase::Awake(live) = std::mem::replace(phase, Phase::Cold) else {
            unreachable!()
        };
        let active = slot.last_active_ms();
        slot.record.lock().last_active_at_ms = Some(active);
        self.status_to(slot, SpriteStatus::Cold);
        let n = self.inner.net.clone();
        blocking(move || live.teardown(&n, grace)).await?;
        // Kept for the API once the sprite's live state is gone;
        // a lost write loses only this timestamp.
        if let Err(e) = self
            .update_record(slot, |r| r.last_active_at_ms = Some(active))
            .await
        {
            tracing::warn!(sprite = %slot.name, error = %e, "recording the last activity");
        }
        if self.inner.cfg.flush_on_cold {
            let volume = slot.record.lock().volume.clone();
            self.inner.store.flush(&volume, |_| {}).await?;
        }
        Ok(())
    }
}
