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
