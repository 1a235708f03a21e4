//! A den volume as a benchmark target: the store in a local directory on the
//! same disk as the baselines, the volume exported through FUSE + loop, and
//! ext4 on top, made exactly as `den volume mount --format` does it.
//!
//! Teardown order is the reverse of setup: unmount ext4, stop the export
//! (loop device, then FUSE), close the volume, shut the store's runtime down,
//! delete the directory. Each layer is a field that is released in that
//! order on drop too, so an early `?` or a panic leaves nothing mounted.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use den_block::{BlockDevice, Export, ExportOptions, FuseLoopFrontend};
use den_store::{CreateOptions, DEFAULT_VOLUME_SIZE, Store, StoreConfig, Volume};

use crate::baselines::Target;
use crate::cancel::{self, EmergencyToken};
pub(crate) use crate::guards::WorkRoot;
use crate::guards::{MountGuard, run};

/// `mkfs.ext4 -E` options. The lazy-init part is what [`crate::NativeExt4`]
/// uses (no background ext4lazyinit I/O during the run); `nodiscard` is what
/// `den volume mount --format` uses. Discarding a fresh volume (or a fresh
/// sparse image) changes neither content nor layout, it only costs a pass
/// over every chunk slot, so both filesystems end up identical.
pub const MKFS_EXTENDED: &str = "nodiscard,lazy_itable_init=0,lazy_journal_init=0";

/// Name of the volume inside a target's private store.
pub const VOLUME_NAME: &str = "bench";

pub use den_block::VolumeDevice;
pub use den_block::freeze::{Frozen, freeze};

// ---------------------------------------------------------------------------
// A store with its own runtime
// ---------------------------------------------------------------------------

/// A [`Store`] and the tokio runtime its background tasks (write-back,
/// uploader) run on. Sync code calls async store methods through
/// [`DenStore::block_on`]; volume I/O is called directly.
pub struct DenStore {
    // Field order is drop order: the store before its runtime.
    store: Option<Store>,
    rt: Option<tokio::runtime::Runtime>,
}

impl DenStore {
    /// Open a store with local objects under `data_dir` (`StoreConfig::local`
    /// defaults, as `den` uses them), after `tweak` adjusts the config.
    pub fn open(data_dir: &Path, tweak: impl FnOnce(&mut StoreConfig)) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("den-bench-store")
            .build()
            .context("building the store runtime")?;
        let mut cfg = StoreConfig::local(data_dir);
        tweak(&mut cfg);
        let store = rt
            .block_on(Store::open(cfg))
            .with_context(|| format!("opening a den store in {}", data_dir.display()))?;
        Ok(Self {
            store: Some(store),
            rt: Some(rt),
        })
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    /// Run an async store call from sync code.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("runtime is running").block_on(f)
    }

    /// Upload everything `volume` holds locally and wait until it is in the
    /// object store.
    pub fn flush(&self, volume: &str) -> Result<()> {
        self.block_on(self.store().flush(volume, |_| {}))
            .with_context(|| format!("flushing volume {volume}"))
    }

    /// Drop the store, then stop its runtime (abandoning in-flight uploads,
    /// which is fine: the data is thrown away).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.store.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(10));
        }
    }
}

impl Drop for DenStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------

/// How to build a [`DenVolume`].
#[derive(Debug, Clone)]
pub struct DenVolumeOptions {
    /// Column name in reports.
    pub name: String,
    /// Virtual size of the (sparse) volume.
    pub volume_size: u64,
    /// Chunk size; `None` is the store default.
    pub chunk_size: Option<u32>,
    /// Adjust the store configuration (`StoreConfig::local` defaults) before
    /// opening, e.g. for experiments with write-back or compression.
    pub store_tweak: Option<fn(&mut StoreConfig)>,
}

impl Default for DenVolumeOptions {
    fn default() -> Self {
        Self {
            name: DenVolume::NAME.to_owned(),
            volume_size: DEFAULT_VOLUME_SIZE,
            chunk_size: None,
            store_tweak: None,
        }
    }
}

/// ext4 on a den volume exported as `/dev/loopN` over a FUSE file.
pub struct DenVolume {
    // Field order is drop order.
    mount: MountGuard,
    export: Option<Export>,
    volume: Option<Volume>,
    store: Option<DenStore>,
    root: WorkRoot,
    /// Emergency cleanup of the loop device and FUSE mount, dropped once the
    /// export is shut down.
    export_tokens: Vec<EmergencyToken>,
    name: String,
    mnt: PathBuf,
    device: PathBuf,
    chunk_size: u32,
}

impl DenVolume {
    pub const NAME: &'static str = "den-volume";

    /// Open a fresh store under `work`, create and export a volume, make ext4
    /// on it and mount it.
    pub fn setup(work: &Path, opts: &DenVolumeOptions) -> Result<Self> {
        let root = WorkRoot::create(work, "den-bench-den")?;
        let data = root.path().join("den-data");
        let fuse_dir = root.path().join("fuse");
        let mnt = root.path().join("mnt");
        for d in [&fuse_dir, &mnt] {
            fs::create_dir(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        let store = DenStore::open(&data, |cfg| {
            if let Some(tweak) = opts.store_tweak {
                tweak(cfg);
            }
        })?;
        let rec = store
            .block_on(store.store().create_volume(
                VOLUME_NAME,
                CreateOptions {
                    size: Some(opts.volume_size),
                    chunk_size: opts.chunk_size,
                    source: None,
                },
            ))
            .context("creating the benchmark volume")?;
        let volume = store
            .block_on(store.store().open_volume(VOLUME_NAME))
            .context("opening the benchmark volume")?;
        let device: Arc<dyn BlockDevice> = Arc::new(VolumeDevice(volume.clone()));
        let export = FuseLoopFrontend::export(device, &fuse_dir, &ExportOptions::default())
            .context("exporting the volume through FUSE + loop")?;
        let dev = export.device_path().to_path_buf();
        // Emergency order is newest first: the ext4 mount (registered by the
        // mount guard) goes before the loop device, then the FUSE mount.
        let fuse_token = cancel::register_unmount(&fuse_dir);
        let loop_token = cancel::register(cancel::Emergency::DetachLoop(dev.clone()));
        let mut this = Self {
            mount: MountGuard::none(),
            export: Some(export),
            volume: Some(volume),
            store: Some(store),
            root,
            export_tokens: vec![fuse_token, loop_token],
            name: opts.name.clone(),
            mnt,
            device: dev,
            chunk_size: rec.chunk_size,
        };
        cancel::check()?;

        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", MKFS_EXTENDED])
            .arg(&this.device))
        .context("mkfs.ext4 on the den volume")?;
        cancel::check()?;
        this.mount = MountGuard::mount_ext4(&this.device, &this.mnt)?.with_emergency_unmount();
        tracing::info!(dev = %this.device.display(), mnt = %this.mnt.display(), "den volume mounted");
        Ok(this)
    }

    pub fn den_store(&self) -> &DenStore {
        self.store.as_ref().expect("store is open")
    }

    pub fn volume(&self) -> &Volume {
        self.volume.as_ref().expect("volume is open")
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Request counters of the FUSE server since setup.
    pub fn fuse_stats(&self) -> den_block::FuseStats {
        self.export.as_ref().map(Export::stats).unwrap_or_default()
    }

    /// `/dev/loopN`.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Wait until background write-back is done: sync the filesystem, seal
    /// and upload every dirty chunk. Called between workloads of different
    /// targets so den's uploads are not billed to the next target.
    pub fn settle(&self) -> Result<()> {
        crate::workloads::syncfs(&self.mnt)?;
        self.den_store().flush(VOLUME_NAME)
    }

    /// Checkpoint the mounted volume the way `den volume checkpoint` does:
    /// freeze ext4 (which flushes it), checkpoint, thaw. Returns the time
    /// the whole sequence took.
    pub fn checkpoint_frozen(&self, comment: &str) -> Result<Duration> {
        let start = Instant::now();
        let frozen = freeze(&self.mnt).with_context(|| format!("FIFREEZE {}", self.mnt.display()))?;
        let ck = self.volume().checkpoint(comment);
        drop(frozen);
        let elapsed = start.elapsed();
        ck.context("checkpoint")?;
        Ok(elapsed)
    }

    /// Release everything in order; idempotent.
    fn close(&mut self) -> Result<()> {
        self.mount.unmount()?;
        if let Some(export) = self.export.take()
            && let Err(e) = export.shutdown()
        {
            // The loop device is still in use (or its detach failed): the
            // FUSE workers must keep serving, which needs the store and its
            // runtime. Leak them; they go away with the process.
            std::mem::forget(self.volume.take());
            std::mem::forget(self.store.take());
            self.root.keep();
            return Err(anyhow::Error::new(e).context("stopping the den volume export"));
        }
        self.export_tokens.clear();
        drop(self.volume.take());
        if let Some(store) = self.store.take() {
            store.close();
        }
        self.root.remove()
    }
}

impl Target for DenVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> &Path {
        &self.mnt
    }

    fn teardown(mut self: Box<Self>) -> Result<()> {
        self.close()
    }
}

impl Drop for DenVolume {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(target_name = %self.name, error = %format!("{e:#}"), "den volume teardown on drop");
        }
    }
}
