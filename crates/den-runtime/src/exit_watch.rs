//! Noticing that a sprite's PID 1 has exited, without racing pid reuse.
//!
//! A pid alone can be recycled by an unrelated host process once the old one
//! is reaped, so "is pid N alive" can lie. A pidfd names exactly one process
//! and becomes readable when it exits, so a zero-timeout poll is an exact,
//! allocation-free liveness check cheap enough for every request.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Watches one process for its exit.
#[derive(Debug)]
pub struct ExitWatch {
    pidfd: OwnedFd,
}

impl ExitWatch {
    /// Fails with `ESRCH` if `pid` no longer exists.
    pub fn new(pid: i32) -> io::Result<ExitWatch> {
        Ok(ExitWatch {
            pidfd: pidfd_open(pid)?,
        })
    }

    /// Whether the process has exited (a zombie counts as exited).
    pub fn exited(&self) -> bool {
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) => n > 0,
            // poll on a valid fd with no timeout only fails on EINTR/ENOMEM;
            // saying "alive" then just defers the answer to the next check.
            Err(_) => false,
        }
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); no pointers are involved. The descriptor is owned by nobody
    // else, so handing it to OwnedFd is sound.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_child_exit_and_not_before() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let w = ExitWatch::new(child.id() as i32).unwrap();
        assert!(!w.exited());
        child.kill().unwrap();
        // Readable from the moment it is a zombie, before and after the reap.
        child.wait().unwrap();
        assert!(w.exited());
        assert_eq!(
            ExitWatch::new(child.id() as i32).unwrap_err().raw_os_error(),
            Some(libc::ESRCH)
        );
    }
}
