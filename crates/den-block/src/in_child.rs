//! Filesystem calls on a den disk made from a child process, never from a
//! thread of ours.
//!
//! Mounting, unmounting and syncing the ext4 on a den disk do I/O through
//! the loop device to the FUSE file this very process serves. Once such a
//! request is sent the caller waits uninterruptibly. Were we killed (-9)
//! meanwhile, a thread of ours stuck in that wait would keep the process,
//! its FUSE fd and so the connection that could fail the request alive
//! forever. A child that holds none of our fds has no such hold: our death
//! closes the connection, the child's request fails, it exits.
//!
//! This used to be done by running `mount`, `umount` and `sync -f`; a child
//! that makes the one system call ([`run`]) saves their exec and start-up.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why a child's call failed: which step (`stage`, the caller's numbering)
/// and the errno.
#[derive(Debug)]
pub(crate) struct ChildFailed {
    pub stage: i32,
    pub error: io::Error,
}

/// What [`run`] hands its child, on the parent's memory (the child shares it).
struct Call<'a, F> {
    keep: &'a mut [i32],
    body: Option<F>,
    /// `(stage, errno)` of a failure, written by the child before it exits.
    report: (i32, i32),
}

/// Size of the child's stack: `body` makes a few system calls.
const CHILD_STACK: usize = 64 << 10;

/// Run `body` in a child process that holds no fd but `keep`: `clone` with
/// `CLONE_VM | CLONE_VFORK`, like `posix_spawn` without the exec. The child
/// shares our memory (no page tables copied, no copy-on-write faults for
/// our other threads afterwards, as a `fork` of a large busy process would
/// cost) and this thread waits until it has exited. It has its own fd
/// table, closes every fd but `keep`, runs `body` and `_exit`s. `body`
/// returns `Err((stage, errno))` to report.
///
/// # Safety
/// `body` runs in a child that shares this process's memory while the
/// other threads go on: it may only make async-signal-safe calls (raw
/// system calls) on data made before the call. It must not allocate, lock,
/// log, unwind or write to memory other threads use.
pub(crate) unsafe fn run<F: FnOnce() -> Result<(), (i32, i32)>>(
    keep: &[i32],
    body: F,
) -> Result<(), ChildFailed> {
    let failed = |e: io::Error| ChildFailed { stage: 0, error: e };
    let mut kept = [-1i32; 8];
    assert!(keep.len() <= kept.len(), "in_child::run keeps at most 8 fds");
    kept[..keep.len()].copy_from_slice(keep);
    let mut call = Call {
        keep: &mut kept[..keep.len()],
        body: Some(body),
        report: (0, 0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    extern "C" fn child<F: FnOnce() -> Result<(), (i32, i32)>>(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's `Call`, alive until we exit (the
        // parent is suspended by CLONE_VFORK); we are its only user meanwhile.
        unsafe {
            let call = &mut *(arg as *mut Call<'_, F>);
            close_all_but(call.keep);
            let outcome = match call.body.take() {
                Some(body) => body(),
                None => Err((0, libc::EINVAL)),
            };
            if let Err(r) = outcome {
                std::ptr::write_volatile(&mut call.report, r);
                libc::_exit(1);
            }
            libc::_exit(0)
        }
    }

    // The child starts with every signal blocked (it inherits this thread's
    // mask): a handler of ours running in it would write to our memory.
    let all = nix::sys::signal::SigSet::all();
    let mut before = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&all),
        Some(&mut before),
    )
    .map_err(|e| failed(e.into()))?;
    // SAFETY: the child runs on its own stack (`stack`, alive until it
    // exits) with its own fd table, and only touches `call`; this thread
    // stays suspended until the child has exited (CLONE_VFORK).
    let pid = unsafe {
        libc::clone(
            child::<F>,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut call as *mut Call<'_, F>).cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&before), None);
    if pid < 0 {
        return Err(failed(clone_error));
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    drop(stack);
    // SAFETY: the child has exited; nothing else writes `report`.
    let (stage, errno) = unsafe { std::ptr::read_volatile(&call.report) };
    match status {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        Ok(nix::sys::wait::WaitStatus::Exited(_, _)) if errno != 0 => Err(ChildFailed {
            stage,
            error: io::Error::from_raw_os_error(errno),
        }),
        Ok(other) => Err(failed(io::Error::other(format!(
            "the child ended with {other:?}"
        )))),
        Err(e) => Err(failed(e.into())),
    }
}

/// The errno of the last failed call, in the child (no allocation).
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// A system call's return value as a child's outcome (stage 0).
fn check(rc: libc::c_int) -> Result<(), (i32, i32)> {
    if rc < 0 { Err((0, errno())) } else { Ok(()) }
}

/// Close every fd of this child (its own fd table) except `keep`.
///
/// # Safety
/// Only in [`run`]'s child, whose fd table is its own copy.
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
            check(libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                ty.as_ptr(),
                flags,
                data.as_ptr().cast(),
            ))
        })
    }
    .map_err(context(what))
}

/// `umount2(2)` of `target` with `flags` (`MNT_DETACH` for a lazy one), from a child.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let dst = c_path(target)?;
    let what = format!("unmount {}", target.display());
    // SAFETY: the body makes one system call on a C string made above.
    unsafe { run(&[], || check(libc::umount2(dst.as_ptr(), flags))) }.map_err(context(what))
}

/// `syncfs(2)` on the filesystem holding `path`, from a child: everything
/// written so far reaches the device and the journal is committed.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let what = format!("syncfs {}", path.display());
    // SAFETY: the body makes three system calls on a C string made above.
    unsafe {
        run(&[], || {
            let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
            check(fd)?;
            check(libc::syncfs(fd))?;
            libc::close(fd);
            Ok(())
        })
    }
    .map_err(context(what))
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
