//! The pre-formatted disk template and the image views sprites boot from.

use super::*;

impl SpriteManager {
    /// The ext4 template for an image version: made once, then forked.
    pub(super) async fn template(&self, version: &str) -> Result<(String, String)> {
        let mut cache = self.inner.templates.lock().await;
        if let Some(t) = cache.get(version) {
            return Ok(t.clone());
        }
        let gib = self.inner.cfg.disk_size >> 30;
        let name = format!("template-{version}-{gib}g");
        const MARK: &str = "den template";
        let store = &self.inner.store;
        // In a cluster another node may be making the same template right
        // now: its half-made volume is fenced against us, so wait for it.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let retry = match store.list_checkpoints(&name).await {
                Ok(cks) => {
                    if let Some(ck) = cks.iter().find(|c| c.comment == MARK) {
                        // Made by another node whose uploads may still run:
                        // a fork of it here must not name chunks only that
                        // node's disk has.
                        if !ck.durable {
                            tokio::time::timeout(TEMPLATE_DURABLE, store.wait_durable(&name, &ck.id))
                                .await
                                .map_err(|_| {
                                    SpriteError::Catalog(format!(
                                        "template {name} never reached the object store"
                                    ))
                                })??;
                        }
                        let t = (name.clone(), ck.id.clone());
                        cache.insert(version.to_string(), t.clone());
                        return Ok(t);
                    }
                    // Left half-made by a crash (or still being made elsewhere).
                    match store.delete_volume(&name).await {
                        Ok(()) => false,
                        Err(StoreError::Fenced(_)) => true,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(StoreError::VolumeNotFound(_)) => false,
                Err(e) => return Err(e.into()),
            };
            if !retry {
                match store
                    .create_volume(
                        &name,
                        den_store::CreateOptions {
                            size: Some(self.inner.cfg.disk_size),
                            ..Default::default()
                        },
                    )
                    .await
                {
                    Ok(_) => break,
                    Err(StoreError::VolumeExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() > deadline {
                return Err(SpriteError::Catalog(format!("template {name} is never finished")));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let t0 = Instant::now();
        let vol = store.open_volume(&name).await?;
        let dir = self.inner.cfg.run_dir.join("template");
        let (uid, gid) = (
            self.inner.cfg.idmap.uid_to_host(0).unwrap_or(0),
            self.inner.cfg.idmap.gid_to_host(0).unwrap_or(0),
        );
        blocking(move || disk::format_template(vol, &dir.join("fuse"), &dir.join("disk"), uid, gid)).await?;
        let ck = store.checkpoint(&name, MARK).await?;
        // Other nodes fork it from the shared store; a single host waits
        // only for its local chunk directory.
        store.wait_durable(&name, &ck.id).await?;
        tracing::info!(template = %name, ms = t0.elapsed().as_secs_f64() * 1e3, "made the sprite disk template");
        let t = (name, ck.id);
        cache.insert(version.to_string(), t.clone());
        Ok(t)
    }

    pub(super) fn lower_for(&self, version: &str) -> Result<PathBuf> {
        if let Some(p) = self.inner.lowers.lock().get(version) {
            return Ok(p.clone());
        }
        let image = if version == self.inner.image.version() {
            self.inner.image.clone()
        } else {
            Image::open(
                self.inner
                    .image
                    .dir()
                    .parent()
                    .unwrap_or(std::path::Path::new("/")),
                version,
            )?
        };
        let lower = image.lower_dir_in(&self.inner.cfg.idmap, &self.inner.cfg.lowers_dir())?;
        self.inner
            .lowers
            .lock()
            .insert(version.to_string(), lower.path.clone());
        Ok(lower.path)
    }
}
