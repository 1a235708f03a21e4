//! Creating a sprite: a fork of the template disk, a record, a slot.

use super::*;

impl SpriteManager {
    /// Create a sprite: a pre-booted one from the pool, running, if one is
    /// ready; otherwise a cold one, whose disk is a fork of the
    /// pre-formatted template (nothing is formatted or copied).
    /// `name` is the sprite's key ([`crate::sprite_key`]).
    pub async fn create(&self, name: &str, opts: CreateSprite) -> Result<SpriteInfo> {
        self.check_running()?;
        validate_key(name)?;
        if self.inner.slots.lock().contains_key(name) {
            return Err(SpriteError::Exists(name.to_string()));
        }
        let version = self.inner.image.version().to_string();
        let resources = opts.resources.unwrap_or(self.inner.cfg.resources);
        let runtime = opts.runtime.unwrap_or(self.inner.cfg.runtime);
        // Refuse a runtime this server can't run before anything is made.
        self.inner.engines.get(runtime)?;
        if let Some(pooled) = self.take_pooled(&version, runtime, &resources) {
            match self.claim(pooled, name, &opts).await {
                Ok(info) => return Ok(info),
                Err(SpriteError::Exists(n)) => return Err(SpriteError::Exists(n)),
                // Refused admission or a broken pooled sprite: a cold one
                // needs neither.
                Err(e) => tracing::warn!(sprite = name, error = %e, "claiming a pre-booted sprite"),
            }
        }
        let key = new_key();
        let volume = self.fork_template(&version, &key).await?;
        let mut rec = new_record(name, key, volume, version, runtime, resources, opts.attrs);
        rec.policy = opts.policy;
        self.insert(rec).await
    }

    /// A new sprite's disk `sprite-<key>`: a fork of the image's template.
    pub(super) async fn fork_template(&self, version: &str, key: &str) -> Result<String> {
        let (tvol, tck) = self.template(version).await?;
        let volume = format!("sprite-{key}");
        let source = VolumeSource::Checkpoint {
            volume: tvol,
            checkpoint: tck,
        };
        self.inner.store.fork(&volume, source).await?;
        Ok(volume)
    }

    /// Register a new record, undoing its volume if the name was taken meanwhile.
    pub(super) async fn insert(&self, rec: SpriteRecord) -> Result<SpriteInfo> {
        let slot = {
            let mut slots = self.inner.slots.lock();
            if slots.contains_key(&rec.name) {
                None
            } else {
                let slot = Slot::new(rec.clone());
                slots.insert(rec.name.clone(), slot.clone());
                Some(slot)
            }
        };
        let Some(slot) = slot else {
            let _ = self.inner.store.delete_volume(&rec.volume).await;
            let _ = self.delete_memory_images(&rec.volume).await;
            return Err(SpriteError::Exists(rec.name));
        };
        if let Err(e) = self.inner.catalog.insert(&rec).await {
            self.inner.slots.lock().remove(&rec.name);
            let _ = self.inner.store.delete_volume(&rec.volume).await;
            let _ = self.delete_memory_images(&rec.volume).await;
            return Err(e);
        }
        let info = self.with_storage(slot.info());
        let _ = self.inner.events.send(SpriteEvent::Changed(info.clone()));
        Ok(info)
    }
}

/// 12 hex digits: short enough for interface, netns and socket names.
/// A new sprite's record: a fresh id, made now, never run, no policy and
/// no services.
pub(super) fn new_record(
    name: &str,
    key: String,
    volume: String,
    image: String,
    runtime: den_runtime::Runtime,
    resources: Resources,
    attrs: serde_json::Value,
) -> SpriteRecord {
    let now = now_ms();
    SpriteRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_string(),
        key,
        volume,
        image,
        created_at_ms: now,
        updated_at_ms: now,
        last_running_at_ms: None,
        last_warming_at_ms: None,
        last_started_at_ms: None,
        last_active_at_ms: None,
        policy: None,
        services: Vec::new(),
        active_checkpoint: None,
        resources,
        runtime,
        sleep_note: None,
        attrs,
    }
}

pub(super) fn new_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
