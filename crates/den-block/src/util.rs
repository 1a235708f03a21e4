//! Small helpers shared by the front-end modules.

use std::io;
use std::time::{Duration, Instant};

/// Re-check `done` with a growing back-off until it holds or `deadline` passes.
///
/// Used only for kernel state that has no notification we could block on (a loop
/// device finishing its deferred release, a mount disappearing from the table).
/// Returns whether `done` became true.
pub(crate) fn poll_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The raw errno of an I/O error, if it has one.
pub(crate) fn errno(err: &io::Error) -> Option<i32> {
    err.raw_os_error()
}

pub(crate) fn nix_to_io(err: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(err as i32)
}
