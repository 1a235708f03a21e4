//! A new sprite from another one's checkpoint or live state.

use super::create::{new_key, new_record};
use super::*;

impl SpriteManager {
    /// A new sprite from a checkpoint of `source`, or from its live state
    /// (frozen and synced for the instant the fork takes). Settings (policy,
    /// services, limits, attributes) are copied; `attrs` replaces the latter.
    pub async fn fork(
        &self,
        source: &str,
        new_name: &str,
        checkpoint: Option<&str>,
        attrs: Option<serde_json::Value>,
    ) -> Result<SpriteInfo> {
        self.check_running()?;
        validate_key(new_name)?;
        if self.inner.slots.lock().contains_key(new_name) {
            return Err(SpriteError::Exists(new_name.to_string()));
        }
        let src = self.slot(source)?;
        let src_rec = src.record.lock().clone();
        let key = new_key();
        let volume = format!("sprite-{key}");
        let store = &self.inner.store;
        match checkpoint {
            Some(id) => {
                let ck = self.get_checkpoint(source, id).await?;
                store
                    .fork(
                        &volume,
                        VolumeSource::Checkpoint {
                            volume: src_rec.volume.clone(),
                            checkpoint: ck.id.clone(),
                        },
                    )
                    .await?;
                // A checkpoint with memory: the fork wakes with its processes.
                if let Err(e) = self
                    .memory_follows_checkpoint(&volume, &src_rec.volume, &ck.id)
                    .await
                {
                    let _ = store.delete_volume(&volume).await;
                    return Err(e);
                }
            }
            None => {
                let phase = src.phase.lock().await;
                let live_src = VolumeSource::Volume(src_rec.volume.clone());
                match &*phase {
                    Phase::Cold => {
                        store.fork(&volume, live_src).await?;
                    }
                    Phase::Awake(live) => {
                        let guard = self.freeze_synced(live).await?;
                        let res = store.fork(&volume, live_src).await;
                        // Thawing waits on the engine: off the async threads.
                        blocking(move || {
                            drop(guard);
                            Ok(())
                        })
                        .await?;
                        res?;
                    }
                }
            }
        }
        let mut rec = new_record(
            new_name,
            key,
            volume,
            src_rec.image,
            src_rec.runtime,
            src_rec.resources,
            attrs.unwrap_or(src_rec.attrs),
        );
        rec.policy = src_rec.policy;
        rec.services = src_rec.services;
        self.insert(rec).await
    }
}
