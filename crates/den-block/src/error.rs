//! Error type shared by every front end.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while exporting or tearing down a block device.
///
/// Variants carry the path involved because the same process usually runs many
/// exports at once and an error without a path is useless in a log.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The caller asked for something the front end cannot do.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// The mount directory could not be prepared (created, resolved, ...).
    #[error("preparing mount directory {path}: {source}")]
    MountDir {
        /// Directory we were asked to mount on.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// Something that is not ours is mounted on the mount directory. We refuse to
    /// stack on top of (or tear down) a filesystem we did not create.
    #[error("{path} already has a foreign {fstype} mount on it")]
    MountDirInUse {
        /// Mount directory.
        path: PathBuf,
        /// Filesystem type of the foreign mount.
        fstype: String,
    },

    /// Mounting the FUSE filesystem failed.
    #[error("mounting FUSE on {path}: {source}")]
    Mount {
        /// Mount directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// The FUSE session could not be set up or ended with an error.
    #[error("FUSE session on {path}: {source}")]
    Session {
        /// Mount directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// Unmounting the FUSE filesystem failed.
    #[error("unmounting {path}: {source}")]
    Unmount {
        /// Mount directory.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// Our FUSE mount is covered by a foreign mount, so it cannot be reached to be
    /// unmounted without tearing down something we do not own.
    #[error("our mount on {path} is covered by a foreign {fstype} mount")]
    MountShadowed {
        /// Mount directory.
        path: PathBuf,
        /// Filesystem type of the covering mount.
        fstype: String,
    },

    /// Talking to `/dev/loop-control` failed.
    #[error("loop control: {0}")]
    LoopControl(io::Error),

    /// Binding a loop device to the backing file failed.
    #[error("attaching {device} to {file}: {source}")]
    LoopAttach {
        /// Loop device node.
        device: PathBuf,
        /// Backing file.
        file: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// Unbinding a loop device failed.
    #[error("detaching {device}: {source}")]
    LoopDetach {
        /// Loop device node.
        device: PathBuf,
        /// Underlying error.
        source: io::Error,
    },

    /// Teardown could not finish because something still uses the device (a
    /// mounted filesystem, an open file descriptor). Nothing was forced: the
    /// rest of the teardown happens by itself when the last user goes away.
    #[error("{path} is still in use; teardown deferred until its last user closes it")]
    Busy {
        /// The loop device or FUSE file that is still held.
        path: PathBuf,
    },

    /// A bounded wait ran out.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
    },

    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;
