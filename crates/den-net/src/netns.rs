//! Doing things inside a named network namespace from a multi-threaded process.
//!
//! `setns(CLONE_NEWNET)` only affects the calling thread, so we do it on a fresh thread that
//! exits afterwards; the rest of the process (tokio workers included) never changes netns.
//! Sockets keep the namespace they were created in, so a socket made here can be handed back
//! and used from any thread.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::NetError;
use crate::rtnl::Rtnl;

/// Where `ip netns` keeps its bind mounts; a container runtime joins a sprite's netns by
/// opening this path (OCI `linux.namespaces[{type: network, path}]`).
pub const NETNS_DIR: &str = "/run/netns";

/// Path of the bind mount for a named netns.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Run `f` on a new thread that has joined the network namespace `name`, and return its
/// result. Blocking: call it from `spawn_blocking` in async code.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(name);
    let file = File::open(&path).map_err(|e| NetError::Netns {
        name: name.to_string(),
        reason: format!("open {}: {e}", path.display()),
    })?;
    let ns = name.to_string();
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Netns {
            name: ns,
            reason: format!("setns: {e}"),
        })?;
        Ok(f())
    })
    .join()
    .map_err(|_| NetError::Netns {
        name: name.to_string(),
        reason: "closure panicked".into(),
    })?
}

/// What is at a netns path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NsState {
    Missing,
    /// A network namespace is bind-mounted there.
    Mounted,
    /// A plain file: a crash between creating the file and the bind mount left it.
    Stale,
}

/// A path whose filesystem is nsfs is a bind-mounted namespace (a plain file is on tmpfs).
pub(crate) fn state(name: &str) -> NsState {
    let path = netns_path(name);
    match nix::sys::statfs::statfs(&path) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => NsState::Mounted,
        Ok(_) => NsState::Stale,
        Err(nix::errno::Errno::ENOENT) => NsState::Missing,
        // Unreadable: treat as broken, so setup rebuilds it.
        Err(_) => NsState::Stale,
    }
}

fn ns_err(name: &str, what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Netns {
        name: name.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Create the network namespace `name` as `ip netns add` does (so `ip netns` lists it and
/// `ip netns exec` works): the directory is made a shared mount point (so an unmount in one
/// mount namespace reaches the others and the namespace can be freed), an empty file is
/// created, a short-lived thread unshares its network namespace, brings `lo` up in it, and
/// bind-mounts it onto the file. Returns a route netlink socket inside the new namespace.
/// Fails if the path exists.
pub(crate) fn add(name: &str) -> Result<Rtnl, NetError> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| ns_err(name, "mkdir", e))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => {}
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: make it one (a bind mount onto itself), then shared.
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| ns_err(name, "bind mount /run/netns", e))?;
            shared().map_err(|e| ns_err(name, "make /run/netns shared", e))?;
        }
        Err(e) => return Err(ns_err(name, "make /run/netns shared", e)),
    }
    let path = netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| ns_err(name, &format!("create {}", path.display()), e))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<Rtnl, String> {
        // Only this thread moves: the namespace lives on in the bind mount after it exits.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind mount: {e}"))?;
        let mut rtnl = Rtnl::open().map_err(|e| format!("netlink socket: {e}"))?;
        rtnl.set_up(LOOPBACK_INDEX)
            .map_err(|e| format!("set lo up: {e}"))?;
        Ok(rtnl)
    })
    .join()
    .unwrap_or_else(|_| Err("thread panicked".into()));
    made.map_err(|reason| {
        let _ = del(name);
        NetError::Netns {
            name: name.to_string(),
            reason,
        }
    })
}

/// The loopback device is always the first link of a network namespace.
pub(crate) const LOOPBACK_INDEX: u32 = 1;

/// Delete the namespace `name` as `ip netns del` does: detach the bind mount and remove
/// the file (the namespace itself goes when its last process or mount does). Missing is
/// fine.
pub(crate) fn del(name: &str) -> Result<(), NetError> {
    let path = netns_path(name);
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a stale file).
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(ns_err(name, "umount", e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ns_err(name, "remove", e)),
    }
}

/// A route netlink socket inside the existing namespace `name`.
pub(crate) fn rtnl_in(name: &str) -> Result<Rtnl, NetError> {
    run_in(name, Rtnl::open)?.map_err(|e| ns_err(name, "netlink socket", e))
}
