//! Freeze a mounted filesystem for the instant of a checkpoint, so the
//! snapshot is a clean filesystem image rather than a crash image.
//!
//! fsfreeze can leave writers in D state forever if nobody thaws; the guard
//! below thaws on every path, including panics and errors.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

pub struct Frozen {
    dir: File,
}

fn fs_ioctl(f: &File, req: libc::c_ulong) -> io::Result<()> {
    // SAFETY: FIFREEZE/FITHAW take no argument pointer that is dereferenced
    // (the int argument is ignored); `f` is an open descriptor we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Flush and freeze the filesystem mounted at `mountpoint`.
pub fn freeze(mountpoint: &Path) -> io::Result<Frozen> {
    let dir = File::open(mountpoint)?;
    fs_ioctl(&dir, FIFREEZE)?;
    Ok(Frozen { dir })
}

/// Thaw the filesystem at `mountpoint` if it is frozen (best effort: a
/// filesystem that is not frozen answers EINVAL).
pub fn thaw(mountpoint: &Path) {
    if let Ok(dir) = File::open(mountpoint) {
        let _ = fs_ioctl(&dir, FITHAW);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = fs_ioctl(&self.dir, FITHAW) {
            tracing::error!("thawing the volume's filesystem failed: {e}");
        }
    }
}
