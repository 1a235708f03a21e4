//! Filesystem calls on a den disk made from a forked child, never from a
//! thread of ours.
//!
//! Mounting, unmounting and syncing the ext4 on a den disk do I/O through
//! the loop device to the FUSE file this very process serves. Once such a
//! request is sent the caller waits uninterruptibly. Were we killed (-9)
//! meanwhile, a thread of ours stuck in that wait would keep the process,
//! its FUSE fd and so the connection that could fail the request alive
//! forever. A child that holds no fd but its report pipe has no such hold:
//! our death closes the connection, the child's request fails, it exits.
//!
//! This used to be done by running `mount`, `umount` and `sync -f`; a fork
//! that makes the one system call costs a fraction of their start-up (the
//! `umount` binary alone took 3–30 ms on a busy host, mostly after its
//! system call returned).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why a child's call failed: which step (`stage`, the caller's numbering)
/// and the errno.
#[derive(Debug)]
pub(crate) struct ChildFailed {
    pub stage: i32,
    pub error: io::Error,
}

/// Fork; in the child close every fd but `keep` and a report pipe, run
/// `body`, and `_exit`. `body` returns `Err((stage, errno))` to report.
///
/// # Safety
/// `body` runs in a forked child of a multi-threaded process: it may only
/// make async-signal-safe calls (raw system calls) on data made before the
/// fork. It must not allocate, lock, log or unwind.
pub(crate) unsafe fn run(
    keep: &[i32],
    body: impl FnOnce() -> Result<(), (i32, i32)>,
) -> Result<(), ChildFailed> {
    let failed = |e: io::Error| ChildFailed { stage: 0, error: e };
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed(e.into()))?;
    let wr_fd = wr.as_raw_fd();
    let mut kept = [-1i32; 8];
    assert!(keep.len() < kept.len(), "in_child::run keeps at most 7 fds");
    kept[..keep.len()].copy_from_slice(keep);
    kept[keep.len()] = wr_fd;
    let n = keep.len() + 1;
    // SAFETY: the child only runs `body` (async-signal-safe by the caller's
    // contract), close_range, write and _exit; it never returns.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: see above; this block never returns.
        unsafe {
            close_all_but(&mut kept[..n]);
            if let Err((stage, errno)) = body() {
                let report = [stage, errno];
                libc::write(wr_fd, report.as_ptr().cast(), std::mem::size_of_val(&report));
                libc::_exit(1);
            }
            libc::_exit(0);
        }
    }
    drop(wr);
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    let mut report = [0u8; 8];
    let got = nix::unistd::read(&rd, &mut report).unwrap_or(0);
    match status {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        _ if got == report.len() => Err(ChildFailed {
            stage: i32::from_ne_bytes(report[..4].try_into().expect("4 bytes")),
            error: io::Error::from_raw_os_error(i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"))),
        }),
        Ok(other) => Err(failed(io::Error::other(format!(
            "the child ended with {other:?}"
        )))),
        Err(e) => Err(failed(e.into())),
    }
}

/// The errno of the last failed call, in a forked child (no allocation).
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Close every fd of this (forked, single-threaded) process except `keep`.
///
/// # Safety
/// Only for a forked child that owns none of the closed fds' Rust wrappers.
unsafe fn close_all_but(keep: &mut [i32]) {
    keep.sort_unstable();
    let mut first: u32 = 3;
    for &k in keep.iter() {
        let k = k as u32;
        if k > first {
            // SAFETY: closes fds of this child only; see the function's contract.
            unsafe { libc::syscall(libc::SYS_close_range, first, k - 1, 0) };
        }
        first = first.max(k + 1);
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn c_str(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn context(what: String) -> impl FnOnce(ChildFailed) -> io::Error {
    move |f| io::Error::new(f.error.kind(), format!("{what}: {}", f.error))
}

/// `mount(2)` of `source` (a device) on `target` as `fstype` with `flags`
/// and the filesystem's own `options`, from a child.
pub fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    options: &str,
) -> io::Result<()> {
    let (src, dst, ty, data) = (c_path(source)?, c_path(target)?, c_str(fstype)?, c_str(options)?);
    let what = format!(
        "mount {fstype} {} on {} ({options})",
        source.display(),
        target.display()
    );
    // SAFETY: the body makes one system call on C strings made above.
    unsafe {
        run(&[], || {
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                ty.as_ptr(),
                flags,
                data.as_ptr().cast(),
            ) < 0
            {
                return Err((0, errno()));
            }
            Ok(())
        })
    }
    .map_err(context(what))
}

/// `umount2(2)` of `target` with `flags` (`MNT_DETACH` for a lazy one), from a child.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let dst = c_path(target)?;
    let what = format!("unmount {}", target.display());
    // SAFETY: the body makes one system call on a C string made above.
    unsafe {
        run(&[], || {
            if libc::umount2(dst.as_ptr(), flags) < 0 {
                return Err((0, errno()));
            }
            Ok(())
        })
    }
    .map_err(context(what))
}

/// `syncfs(2)` on the filesystem holding `path`, from a child: everything
/// written so far reaches the device and the journal is committed.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let p: CString = c_path(path)?;
    let what = format!("syncfs {}", path.display());
    sync_c(&p).map_err(context(what))
}

fn sync_c(p: &CStr) -> Result<(), ChildFailed> {
    // SAFETY: the body makes three system calls on a C string made by the caller.
    unsafe {
        run(&[], || {
            let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err((0, errno()));
            }
            if libc::syncfs(fd) < 0 {
                return Err((0, errno()));
            }
            libc::close(fd);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs as root (as every den-block test).
    #[test]
    fn mount_syncfs_umount_from_a_child_and_errors_name_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("mp");
        std::fs::create_dir(&mp).unwrap();
        mount(Path::new("tmpfs"), &mp, "tmpfs", 0, "size=1m").unwrap();
        assert!(
            crate::mountinfo::read()
                .unwrap()
                .iter()
                .any(|m| m.mount_point == mp)
        );
        std::fs::write(mp.join("f"), b"x").unwrap();
        syncfs(&mp).unwrap();
        umount(&mp, 0).unwrap();
        assert!(
            !crate::mountinfo::read()
                .unwrap()
                .iter()
                .any(|m| m.mount_point == mp)
        );

        let err = umount(&mp, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), None, "a message with context: {err}");
        assert!(
            err.to_string().contains("unmount") && err.to_string().contains("Invalid argument"),
            "{err}"
        );
        let err = mount(Path::new("none"), &mp, "nosuchfs", 0, "").unwrap_err();
        assert!(
            err.to_string().contains("nosuchfs") && err.to_string().contains("No such device"),
            "{err}"
        );
        let err = syncfs(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
