//! Thin, safe wrappers around the few syscalls std and nix do not cover:
//! the new mount API (`open_tree`, `mount_setattr`, `move_mount`), path-based
//! xattrs, `syncfs`, and the fork of the user-namespace helper.
//!
//! Every `unsafe` block of the image module lives here, each in a small
//! function with its own SAFETY comment.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn cpath(path: &Path) -> io::Result<CString> {
    cstr(path.as_os_str().as_bytes())
}

/// Turn a raw syscall return value into `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)`: a detached
/// bind mount of `path` (not recursive). Dropping the fd before it is attached
/// with [`move_mount_to`] unmounts it again.
pub(crate) fn open_tree_clone(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; the
    // syscall takes (int dfd, const char *path, unsigned flags) and does not
    // keep the pointer.
    let fd = check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) })?;
    // SAFETY: a successful open_tree returned a fresh descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `struct mount_attr` from `<linux/mount.h>` (MOUNT_ATTR_SIZE_VER0 = 32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Make the detached mount `tree` idmapped through the user namespace
/// `userns` (and read-only if asked), with `mount_setattr(2)`.
pub(crate) fn mount_setattr_idmap(
    tree: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    read_only: bool,
) -> io::Result<()> {
    let mut set = libc::MOUNT_ATTR_IDMAP;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: both fds are borrowed and open for the duration of the call; `attr`
    // is a properly laid out `struct mount_attr` whose size we pass; the kernel
    // only reads it. `empty` is a static NUL-terminated string.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attach the detached mount `tree` at `dst` (`move_mount(2)` with
/// `MOVE_MOUNT_F_EMPTY_PATH`).
pub(crate) fn move_mount_to(tree: BorrowedFd<'_>, dst: &Path) -> io::Result<()> {
    let c = cpath(dst)?;
    let empty = c"";
    // SAFETY: `tree` is open for the call; both strings are NUL-terminated and
    // outlive the call; the kernel does not keep the pointers.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// `syncfs(2)`: flush the whole filesystem that `fd` lives on.
pub(crate) fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed, open descriptor.
    if unsafe { libc::syncfs(fd.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Names of the extended attributes of `path` (not following symlinks).
pub(crate) fn llistxattr(path: &Path) -> io::Result<Vec<OsString>> {
    let c = cpath(path)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `c` is NUL-terminated; `buf` is writable for `buf.len()` bytes.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(err),
        }
    }
    Ok(buf
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| OsString::from_vec(name.to_vec()))
        .collect())
}

/// Value of the extended attribute `name` of `path` (not following symlinks).
pub(crate) fn lgetxattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cpath(path)?;
    let n = cstr(name.as_bytes())?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len >= 0 {
            buf.truncate(len as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
        } else {
            return Err(err);
        }
    }
}

/// Set the extended attribute `name` of `path` (not following symlinks).
pub(crate) fn lsetxattr(path: &Path, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = cstr(name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated; `value` is readable for its length.
    let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fork a child that unshares a new user namespace, reports on `ready`, then
/// blocks reading one byte from `go` and exits.
///
/// What the child reports on `ready`: 4 bytes, `0` on success or the errno of
/// `unshare(CLONE_NEWUSER)`.
///
/// Returns the child's pid. The caller must write a byte to (or close its copy
/// of) `go`, and reap the child.
pub(crate) fn fork_userns_holder(
    ready: (BorrowedFd<'_>, BorrowedFd<'_>),
    go: (BorrowedFd<'_>, BorrowedFd<'_>),
) -> io::Result<libc::pid_t> {
    let (ready_r, ready_w) = (ready.0.as_raw_fd(), ready.1.as_raw_fd());
    let (go_r, go_w) = (go.0.as_raw_fd(), go.1.as_raw_fd());
    // SAFETY: fork in a possibly multi-threaded process is sound as long as the
    // child only calls async-signal-safe functions until it exits. The child
    // below only uses close, unshare, __errno_location, write, read and _exit on
    // plain integers and a stack buffer; it allocates nothing, takes no locks and
    // never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; this block never returns.
        unsafe {
            libc::close(ready_r);
            libc::close(go_w);
            let rc = libc::unshare(libc::CLONE_NEWUSER);
            let code: i32 = if rc == 0 { 0 } else { *libc::__errno_location() };
            let bytes = code.to_ne_bytes();
            libc::write(ready_w, bytes.as_ptr().cast(), bytes.len());
            let mut b = 0u8;
            libc::read(go_r, (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    Ok(pid)
}

/// Borrow helper for tuples of owned fds.
pub(crate) fn pair<'a>(a: &'a OwnedFd, b: &'a OwnedFd) -> (BorrowedFd<'a>, BorrowedFd<'a>) {
    (a.as_fd(), b.as_fd())
}
