//! The one process-wide child reaper.
//!
//! As PID 1 we inherit every orphan, so we must `waitpid(-1)`; a second
//! waiter (tokio::process, `Child::wait`) would race us for statuses. Hence
//! nothing else in the agent waits for children: spawning goes through
//! [`Reaper::spawn`], which registers the PID for its exit status, and every
//! PID we do not know is simply reaped.
//!
//! The reaper lives on its own thread with its own small runtime, so that it
//! is shared by every agent in the process (tests run several) and outlives
//! any caller's runtime.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// Decoded termination of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Code(i32),
    Signal(nix::sys::signal::Signal),
}

pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ChildExit>>>,
}

static REAPER: OnceLock<&'static Reaper> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper, started on first use.
    pub fn global() -> &'static Reaper {
        REAPER.get_or_init(|| {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                waiters: Mutex::new(HashMap::new()),
            }));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("den-agent-reaper".into())
                .spawn(move || reaper.thread_main(ready_tx))
                .expect("spawning the reaper thread");
            // Children spawned before the SIGCHLD handler exists would
            // only be reaped by the periodic sweep; wait for it instead.
            let _ = ready_rx.recv_timeout(Duration::from_secs(5));
            reaper
        })
    }

    fn thread_main(&'static self, ready: std::sync::mpsc::Sender<()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("reaper runtime");
        rt.block_on(async move {
            let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
                .expect("installing the SIGCHLD handler");
            let _ = ready.send(());
            loop {
                self.reap_all();
                // The timeout is a safety net for statuses that became
                // available while the handler was being installed.
                let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
            }
        });
    }

    fn reap_all(&self) {
        // Holding the registry lock across waitpid closes the window where a
        // child exits between fork and registration (see `spawn`).
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ChildExit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ChildExit::Signal(sig)),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            match waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?exit, "reaped orphan"),
            }
        }
    }

    /// Runs `spawn` (which must fork exactly one child and return its PID)
    /// while holding the registry lock, and registers the PID.
    ///
    /// The lock also keeps the reaper from stealing the status of a child
    /// whose exec failed, which std's `Command::spawn` waits for itself and
    /// would panic on if the status were gone.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
    ) -> std::io::Result<(T, i32, oneshot::Receiver<ChildExit>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let (value, pid) = spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(pid, tx);
        Ok((value, pid, rx))
    }
}
