//! Block front ends: how a den volume becomes something ext4 can live on.
//!
//! The store knows nothing about FUSE or loop devices; it only implements
//! [`BlockDevice`]. A [`Frontend`] exports such a device to the kernel. On hosts
//! without NBD/ublk (like our CI machines) that is a FUSE-served file with a
//! loop device attached; ublk or vhost-user-blk can implement the same trait.
//!
//! ```no_run
//! # use std::{path::Path, sync::Arc};
//! # use den_block::{mem::MemDevice, ExportOptions, FuseLoopFrontend};
//! let disk = Arc::new(MemDevice::new(1 << 30));
//! let export = FuseLoopFrontend::export(disk, Path::new("/run/den/vol0"), &ExportOptions::default())?;
//! println!("{} ({})", export.device_path().display(), export.loop_mode()); // /dev/loopN
//! // ... mkfs / mount / use the device, unmount it ...
//! export.shutdown()?;
//! # Ok::<(), den_block::BlockError>(())
//! ```
//!
//! Layout: `fuse` is the FUSE filesystem (one directory, one file),
//! `fuse_abi` the kernel protocol it speaks, `fuse_pool` the worker threads
//! shared by every mount, `fuse_session` mounts it, [`loopdev`] binds a loop
//! device to the file, `frontend` ties both together behind [`Frontend`];
//! [`mem::MemDevice`] is a sparse RAM disk for tests.

use std::io;

mod error;
pub mod freeze;
mod frontend;
mod fuse;
mod fuse_abi;
mod fuse_pool;
mod fuse_session;
pub mod in_child;
pub mod loopdev;
pub mod mem;
pub mod mountinfo;
mod util;
#[cfg(feature = "store")]
mod volume_device;

pub use error::BlockError;
pub use frontend::{Export, ExportHandle, ExportOptions, Frontend, FuseLoopFrontend};
pub use fuse::{FuseStats, Negotiated, set_io_flusher};
pub use fuse_pool::{
    EXTRA_IDLE, FusePoolStats, default_fuse_workers, default_max_fuse_workers, fuse_pool_stats,
    set_fuse_workers,
};
pub use fuse_session::{FUSE_FSTYPE, FuseExport, FuseOptions, abort_stale_connections};
pub use loopdev::{LoopDevice, LoopMode, LoopOptions};
#[cfg(feature = "store")]
pub use volume_device::VolumeDevice;

/// A byte-addressed virtual disk. Implementations must be safe to call from
/// several threads at once.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Reads past the end are an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make every write that completed before this call durable (in the local cache).
    fn flush(&self) -> io::Result<()>;
    /// The range no longer holds data; it reads back as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}
