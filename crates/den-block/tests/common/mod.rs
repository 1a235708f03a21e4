//! Shared helpers for the den-block integration tests (they run as root).

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Route the crate's tracing output to the test harness (shown for failing
/// tests, or with `--nocapture`). `RUST_LOG` overrides the default level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("den_block=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Deterministic, never-all-zero test data (zeros would be optimised away by
/// `MemDevice` and hide bugs).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Run a command, panicking with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether anything is mounted on `path`, according to /proc/mounts.
pub fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let wanted = path.to_str().unwrap().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(wanted.as_str()))
}

/// Whether `losetup -a` lists a loop device bound to `file`.
///
/// Tests look for their (unique, temp-dir) backing file rather than for the
/// device node: concurrently running tests reuse freed loop numbers at once.
pub fn loop_bound_to(file: &Path) -> bool {
    let out = run("losetup", &["-a"]);
    let needle = format!("({})", file.to_str().unwrap());
    out.lines().any(|l| l.contains(&needle))
}

/// Poll a condition with a hard bound, for kernel state that has no event to
/// wait on. Returns whether it became true.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
