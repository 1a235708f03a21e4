//! Putting a sprite to sleep: frozen (warm) or stopped (cold).

use super::*;

impl SpriteManager {
    /// Put a sprite to sleep now: `Warm` freezes it, `Cold` stops it (a
    /// gVisor sprite keeps its processes: see [`Self::sleep_locked`]).
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
            SpriteStatus::Cold => {
                let note = match phase {
                    Phase::Awake(live) if live.backend.memory().is_some() => {
                        Some(self.save_processes(slot, live).await.err())
                    }
                    _ => None,
                };
                self.stop_locked(slot, phase, self.inner.cfg.stop_grace).await?;
                if self.inner.cfg.flush_on_cold && note == Some(None) {
                    // Where the disk goes, the processes go: a node that
                    // claims the sprite after this one died restores them.
                    let volume = slot.record.lock().volume.clone();
                    let image = memory_image::volume_name(&volume, memory_image::SLEEP_TAG);
                    self.inner.store.flush(&image, |_| {}).await?;
                }
                if let Some(note) = note {
                    // The sprite says whether its processes were kept: one
                    // short line (runsc's errors can carry a goroutine dump).
                    let note = note.map(|n| {
                        let line = n.lines().next().unwrap_or_default();
                        line.chars().take(300).collect::<String>()
                    });
                    self.update_record(slot, |r| r.sleep_note = note).await?;
                }
                Ok(())
            }
        }
    }

    /// On an engine with memory snapshots, save the awake sprite's memory
    /// into the store (where the next boot, here or on another node, finds
    /// it) and stop its processes; the disk stays as they left it. Where the
    /// memory can't be saved the sprite goes cold the plain way: its
    /// processes get SIGTERM and are gone.
    /// Returns why not, if not.
    async fn save_processes(&self, slot: &Slot, live: &mut Live) -> std::result::Result<(), String> {
        let (Some(handle), Some(_)) = (live.handle.clone(), live.backend.memory()) else {
            return Err("the engine keeps no memory".into());
        };
        if live.init_exited() {
            return Err("its PID 1 had exited".into());
        }
        let t0 = Instant::now();
        // A warm sprite's agent must answer the quiesce.
        if live.frozen {
            let (b, h) = (live.backend.clone(), handle.clone());
            if let Err(e) = blocking(move || Ok(b.thaw(&h)?)).await {
                tracing::warn!(sprite = %slot.name, error = %e,
                    "thawing to save its memory; the sprite goes cold without its processes");
                return Err(format!("thawing it failed: {e}"));
            }
            live.frozen = false;
        }
        // The agent's host socket can't be in the image (see `quiesce`).
        let quiesced = tokio::time::timeout(self.inner.cfg.boot_timeout, live.agent.quiesce()).await;
        if let Err(e) = quiesced
            .map_err(|_| "no answer".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(sprite = %slot.name, error = %e,
                "the agent could not be quiesced; the sprite goes cold without its processes");
            return Err(format!("its agent could not be quiesced: {e}"));
        }
        let (backend, dir) = (live.backend.clone(), live.paths.memory_image());
        let saved = blocking({
            let dir = dir.clone();
            move || {
                let _ = std::fs::remove_dir_all(&dir);
                let memory = backend.memory().expect("checked above");
                Ok(memory.save(&handle, &dir, false)?)
            }
        })
        .await;
        let volume = slot.record.lock().volume.clone();
        let image = memory_image::volume_name(&volume, memory_image::SLEEP_TAG);
        let stored = match saved {
            Ok(()) => {
                let hostname = slot.record.lock().short_name().to_string();
                memory_image::save(&self.inner.store, &image, &dir, &hostname).await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&dir);
        match stored {
            Ok(bytes) => {
                tracing::info!(
                    sprite = %slot.name, bytes, ms = t0.elapsed().as_millis() as u64,
                    "went cold with its processes (memory image saved)"
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(sprite = %slot.name, error = %e,
                    "the sprite's memory could not be saved; it goes cold without its processes");
                let _ = memory_image::delete(&self.inner.store, &image).await;
                Err(format!("its memory could not be saved: {e}"))
            }
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
