//! The [`Frontend`] abstraction and its FUSE + loop implementation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::BlockDevice;
use crate::error::{BlockError, Result};
use crate::fuse::{FuseStats, Negotiated};
use crate::fuse_session::{FuseExport, FuseOptions};
use crate::loopdev::{LoopDevice, LoopMode, LoopOptions};

/// Hands a [`BlockDevice`] to a consumer outside this process.
///
/// Everything specific to one mechanism (mount directory, queue depth, socket
/// path, ...) lives in the implementing type, so that callers only deal with
/// "export this device, later shut it down". Today that is a FUSE file with a
/// loop device on it ([`FuseLoopFrontend`]); a ublk front end would hand back
/// `/dev/ublkbN`, a vhost-user-blk one the socket a VMM connects to.
pub trait Frontend: Send + Sync {
    /// Handle that keeps the export alive.
    type Export: ExportHandle;

    /// Start serving `device`.
    fn export(&self, device: Arc<dyn BlockDevice>) -> Result<Self::Export>;
}

/// A running export.
///
/// Dropping the handle must tear the export down on a best-effort basis;
/// [`ExportHandle::shutdown`] does the same but reports what went wrong.
pub trait ExportHandle: Send {
    /// What the consumer attaches to: a block device node for kernel front
    /// ends (`/dev/loop3`, `/dev/ublkb0`), a socket for vhost-user.
    fn device_path(&self) -> &Path;

    /// Stop serving. Must not lose data that consumers still depend on: if
    /// the device is still in use, return [`BlockError::Busy`] rather than
    /// pull it out from under them.
    fn shutdown(self) -> Result<()>
    where
        Self: Sized;
}

/// Options for [`FuseLoopFrontend`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The FUSE file.
    pub fuse: FuseOptions,
    /// The loop device on top of it.
    pub loop_dev: LoopOptions,
}

/// Exports a device as `/dev/loopN` bound to a FUSE-served file, for hosts
/// without NBD or ublk.
#[derive(Debug, Clone)]
pub struct FuseLoopFrontend {
    mount_dir: PathBuf,
    opts: ExportOptions,
}

impl FuseLoopFrontend {
    /// A front end that mounts its FUSE filesystem on `mount_dir`. Each
    /// export needs its own directory.
    pub fn new(mount_dir: impl Into<PathBuf>, opts: ExportOptions) -> Self {
        Self {
            mount_dir: mount_dir.into(),
            opts,
        }
    }

    /// Serve `device` as the file `<mount_dir>/<opts.fuse.file_name>` and bind a
    /// loop device to it.
    pub fn export(device: Arc<dyn BlockDevice>, mount_dir: &Path, opts: &ExportOptions) -> Result<Export> {
        let size = device.size();
        let granule = u64::from(opts.loop_dev.block_size.max(512));
        if size == 0 || !size.is_multiple_of(granule) {
            return Err(BlockError::InvalidOption(format!(
                "device size {size} must be a non-zero multiple of the {granule} byte loop block size"
            )));
        }
        let mut fuse_opts = opts.fuse.clone();
        fuse_opts.read_only |= opts.loop_dev.read_only;
        let fuse = FuseExport::mount(device, mount_dir, &fuse_opts)?;
        let loop_dev = match LoopDevice::attach(fuse.file_path(), &opts.loop_dev) {
            Ok(l) => l,
            Err(e) => {
                if let Err(e2) = fuse.shutdown() {
                    tracing::warn!(error = %e2, "cleaning up FUSE mount after failed loop attach");
                }
                return Err(e);
            }
        };
        Ok(Export {
            device_path: loop_dev.path().to_path_buf(),
            file_path: fuse.file_path().to_path_buf(),
            mode: loop_dev.mode(),
            fuse: Some(fuse),
            loop_dev: Some(loop_dev),
        })
    }

    /// Serve `device` as a FUSE file only, without a loop device. For tests,
    /// and for harnesses that drive the file directly (e.g. crash tests that
    /// [`FuseExport::abort`] the connection).
    pub fn export_file(
        device: Arc<dyn BlockDevice>,
        mount_dir: &Path,
        opts: &FuseOptions,
    ) -> Result<FuseExport> {
        FuseExport::mount(device, mount_dir, opts)
    }
}

impl Frontend for FuseLoopFrontend {
    type Export = Export;

    fn export(&self, device: Arc<dyn BlockDevice>) -> Result<Export> {
        FuseLoopFrontend::export(device, &self.mount_dir, &self.opts)
    }
}

/// A device exported as a loop device over a FUSE file.
///
/// Teardown order matters: the loop device first (it holds the file open),
/// then the FUSE mount, then the worker threads.
#[derive(Debug)]
pub struct Export {
    device_path: PathBuf,
    file_path: PathBuf,
    mode: LoopMode,
    fuse: Option<FuseExport>,
    loop_dev: Option<LoopDevice>,
}

impl Export {
    /// `/dev/loopN`.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// The FUSE-served file the loop device is bound to.
    pub fn file_path(&self) -> &Path {
        &self.file_path
    }

    /// Whether the loop device runs with direct I/O.
    pub fn loop_mode(&self) -> LoopMode {
        self.mode
    }

    /// Request counters of the FUSE server.
    pub fn stats(&self) -> FuseStats {
        self.fuse.as_ref().map(FuseExport::stats).unwrap_or_default()
    }

    /// Parameters agreed with the kernel's FUSE driver.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.fuse.as_ref().and_then(FuseExport::negotiated)
    }

    /// Detach the loop device, unmount the FUSE file and join its workers.
    ///
    /// If the loop device is still in use (a filesystem on it is mounted),
    /// nothing is forced: the loop device is marked to detach on last close,
    /// the FUSE mount is detached lazily, the workers keep serving until then,
    /// and [`BlockError::Busy`] is returned. Everything disappears by itself
    /// once the user lets go.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(fuse) = self.fuse.take() else {
            return Ok(());
        };
        if let Some(loop_dev) = self.loop_dev.take() {
            let busy = BlockError::Busy {
                path: self.device_path.clone(),
            };
            if loop_dev.is_busy() {
                loop_dev.detach_deferred();
                fuse.shutdown_deferred();
                return Err(busy);
            }
            match loop_dev.detach() {
                Ok(()) => {}
                Err(BlockError::Busy { .. }) => {
                    fuse.shutdown_deferred();
                    return Err(busy);
                }
                Err(e) => {
                    // The binding may still hold the file; do not yank it.
                    fuse.shutdown_deferred();
                    return Err(e);
                }
            }
        }
        fuse.shutdown()
    }
}

impl ExportHandle for Export {
    fn device_path(&self) -> &Path {
        &self.device_path
    }

    fn shutdown(self) -> Result<()> {
        Export::shutdown(self)
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(device = %self.device_path.display(), error = %e, "export shutdown on drop");
        }
    }
}
