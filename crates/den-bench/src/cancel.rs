//! Ctrl-C support for long benchmark runs.
//!
//! The first interrupt only raises a flag: runners check it between steps
//! and return [`Interrupted`], so every target is torn down by the normal
//! (error-reporting) path. A second interrupt is the impatient case: the
//! caller runs [`emergency_cleanup`], which lazily unmounts and detaches
//! whatever was registered, and exits. Lazy is the only safe choice there:
//! a workload may still hold files open on the mount.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Result;
use std::sync::Mutex;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static REGISTRY: Mutex<Vec<(u64, Emergency)>> = Mutex::new(Vec::new());

/// The error a runner returns when it stopped because of [`interrupt`].
#[derive(Debug, Clone, Copy)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Ask every runner to stop at its next check.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once [`interrupt`] was called.
pub fn check() -> Result<()> {
    if is_interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Something to undo if the process has to exit without unwinding.
#[derive(Debug, Clone)]
pub enum Emergency {
    /// `umount -l` this mount point.
    Unmount(PathBuf),
    /// `losetup -d` this device (the kernel detaches a busy one on last close).
    DetachLoop(PathBuf),
}

/// Registered until dropped.
#[must_use = "the registration ends when the token is dropped"]
#[derive(Debug)]
pub struct EmergencyToken(u64);

impl Drop for EmergencyToken {
    fn drop(&mut self) {
        if let Ok(mut r) = REGISTRY.lock() {
            r.retain(|(id, _)| *id != self.0);
        }
    }
}

pub fn register(what: Emergency) -> EmergencyToken {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut r) = REGISTRY.lock() {
        r.push((id, what));
    }
    EmergencyToken(id)
}

pub fn register_unmount(point: &Path) -> EmergencyToken {
    register(Emergency::Unmount(point.to_owned()))
}

/// Undo every registration, newest first, without waiting for anyone.
/// Returns what was attempted, for the message the caller prints.
pub fn emergency_cleanup() -> Vec<String> {
    // try_lock: the interrupted thread may hold the lock; a stale view is
    // better than a hang here.
    let items: Vec<Emergency> = match REGISTRY.try_lock() {
        Ok(r) => r.iter().rev().map(|(_, e)| e.clone()).collect(),
        Err(_) => return vec!["registry busy; nothing cleaned".into()],
    };
    items
        .into_iter()
        .map(|e| {
            let (cmd, arg) = match &e {
                Emergency::Unmount(p) => (vec!["umount", "-l"], p),
                Emergency::DetachLoop(p) => (vec!["losetup", "-d"], p),
            };
            let ok = Command::new(cmd[0])
                .args(&cmd[1..])
                .arg(arg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            format!(
                "{} {}: {}",
                cmd.join(" "),
                arg.display(),
                if ok { "ok" } else { "failed" }
            )
        })
        .collect()
}
