//! Starting and stopping the manager, and recovering from a crashed run.

use super::*;

impl SpriteManager {
    /// Open the catalog, make sure the base image exists (building it the
    /// first time, with progress in the log), clean up whatever a crashed
    /// earlier run left, and start the idle monitor. Every sprite starts cold.
    pub async fn start(cfg: ManagerConfig, store: Store) -> Result<SpriteManager> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| SpriteError::io(format!("creating {}", cfg.data_dir.display()), e))?;
        let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&cfg.data_dir.join("sprites.db"))?);
        Self::start_with_catalog(cfg, store, catalog).await
    }

    /// [`SpriteManager::start`] with records kept in `catalog` instead of the
    /// node-local `sprites.db` (cluster mode passes a shared one).
    pub async fn start_with_catalog(
        cfg: ManagerConfig,
        store: Store,
        catalog: Arc<dyn Catalog>,
    ) -> Result<SpriteManager> {
        for d in [&cfg.data_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| SpriteError::io(format!("creating {}", d.display()), e))?;
            traversable(d)?;
        }
        // The agent bundle lives under the data dir, disks and image views
        // under the run dir; a sprite's root must be able to walk to both.
        reachable_by_sprites(&[&cfg.data_dir, &cfg.run_dir], &cfg.idmap)?;
        // First: a predecessor stuck dying still holds ports and locks.
        let run_dir = cfg.run_dir.clone();
        blocking(move || disk::claim_run_dir(&run_dir)).await?;
        let base = cfg.base_image();
        let image = blocking(move || Ok(base.ensure(&LogProgress)?)).await?;
        let (exe, bundles) = (cfg.den_exe.clone(), cfg.data_dir.join("agent"));
        let bundle = blocking(move || AgentBundle::prepare(&bundles, &exe)).await?;
        let shim = ShimCommand {
            program: cfg.den_exe.clone(),
            args: vec![crate::helper_cmd::SHIM_SUBCOMMAND.into()],
        };
        let engines = Engines::new(&cfg, shim)?;
        let netcfg = cfg.net.clone();
        let net = blocking(move || Ok(NetManager::new(netcfg)?)).await?;
        let dns = DnsForwarder::start(net.clone())?;

        let records = catalog.list().await?;
        recover(&cfg, &engines, &net)?;
        disk::share_run_dir(&cfg.run_dir)?;
        let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
        let cfg_pool_size = cfg.pool_size;
        let slots = records
            .into_iter()
            .map(|r| (r.name.clone(), Slot::new(r)))
            .collect();
        let inner = Arc::new(Inner {
            cfg,
            store,
            catalog,
            engines,
            net,
            dns: AsyncMutex::new(Some(dns)),
            image,
            lowers: Mutex::new(HashMap::new()),
            bundle,
            templates: AsyncMutex::new(HashMap::new()),
            slots: Mutex::new(slots),
            shutting_down: AtomicBool::new(false),
            booting: Mutex::new(HashMap::new()),
            admission: Mutex::new(None),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
            boots: BootStats::default(),
            pool: super::pool::Pool::new(cfg_pool_size),
        });
        let mgr = SpriteManager { inner };
        mgr.reclaim_pool_leftovers(&keys).await;
        tokio::spawn(crate::idle::run(Arc::downgrade(&mgr.inner)));
        tokio::spawn(super::pool::run(Arc::downgrade(&mgr.inner)));
        Ok(mgr)
    }

    /// Stop every sprite (they come back cold on the next start). New wakes
    /// are refused from now on.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.drain_pool().await;
        let slots: Vec<Arc<Slot>> = self.inner.slots.lock().values().cloned().collect();
        for slot in slots {
            let mut phase = slot.phase.lock().await;
            if let Err(e) = self.sleep_locked(&slot, &mut phase, SpriteStatus::Cold).await {
                tracing::warn!(sprite = %slot.name, error = %e, "stopping at shutdown");
            }
        }
        if let Some(dns) = self.inner.dns.lock().await.take() {
            dns.stop().await;
        }
        // The idmapped image mounts exist only for running sprites; leaving
        // them would pin the images directory (and keep it from being removed).
        // They are this server's own (under its run dir): other servers
        // sharing the images directory keep theirs.
        if let Err(e) = den_runtime::image::release_idmapped_in(&self.inner.cfg.lowers_dir()) {
            tracing::warn!(error = %e, "releasing the idmapped image mounts");
        }
        self.inner.lowers.lock().clear();
        disk::unshare_run_dir(&self.inner.cfg.run_dir);
    }

    /// Remove den's firewall table (sprites must be cold: see [`Self::shutdown`]).
    pub fn remove_firewall(&self) {
        if let Err(e) = self.inner.net.remove_firewall() {
            tracing::warn!(error = %e, "removing the firewall");
        }
    }
}

fn traversable(d: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(d).map_err(|e| SpriteError::io(format!("stat {}", d.display()), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011))
            .map_err(|e| SpriteError::io(format!("chmod {}", d.display()), e))?;
    }
    Ok(())
}

/// Sprites run as unprivileged host ids (the id map's root), and their
/// runtime walks down to their disk, image view and agent binary as those
/// ids. A directory above `dirs` that those ids may not search (`~` of root
/// is 0700) would let the server start and then fail every boot with
/// "failed to prepare rootfs"; refuse to start instead, naming the directory
/// and the fix.
fn reachable_by_sprites(dirs: &[&std::path::Path], idmap: &den_runtime::image::IdMap) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (
        idmap.uid_to_host(0).unwrap_or(0),
        idmap.gid_to_host(0).unwrap_or(0),
    );
    for d in dirs {
        let canon = d
            .canonicalize()
            .map_err(|e| SpriteError::io(format!("resolving {}", d.display()), e))?;
        for a in canon.ancestors() {
            let meta =
                std::fs::metadata(a).map_err(|e| SpriteError::io(format!("stat {}", a.display()), e))?;
            let mode = meta.mode();
            let search = if uid == 0 {
                true
            } else if meta.uid() == uid {
                mode & 0o100 != 0
            } else if meta.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !search {
                return Err(SpriteError::io(
                    format!(
                        "sprites cannot reach {}: {} (mode {:04o}) is not searchable by their host uid \
                         {uid}; run `chmod o+x {}`, or choose a data dir (and run_dir) outside it",
                        d.display(),
                        a.display(),
                        mode & 0o7777,
                        a.display()
                    ),
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ));
            }
        }
    }
    Ok(())
}

/// A previous run may have died with sprites up: every sprite starts cold,
/// so remove every container, mount and network it left.
fn recover(cfg: &ManagerConfig, engines: &Engines, net: &NetManager) -> Result<()> {
    // Before anything that could wait on a dead disk (removing a container
    // whose tasks are blocked in its I/O).
    disk::abort_stale_fuse(&cfg.run_dir);
    for (backend, bundles) in engines.available(&cfg.run_dir) {
        recover_engine(backend.as_ref(), &bundles);
    }
    disk::cleanup_stale(&cfg.run_dir);
    net.cleanup_leftovers(&[])?;
    Ok(())
}

/// Remove every sprite `backend` still holds (one bundle each in `bundles`).
fn recover_engine(backend: &dyn Backend, bundles: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(bundles) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            match backend.open(&id) {
                Ok(Some(h)) => {
                    tracing::warn!(sprite = %id, "removing a container left by an earlier run");
                    if let Err(e) = backend.delete(&h) {
                        tracing::warn!(sprite = %id, error = %e, "removing a stale container");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(sprite = %id, error = %e, "inspecting a stale container"),
            }
        }
    }
}
