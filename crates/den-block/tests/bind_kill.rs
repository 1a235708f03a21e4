//! A process that serves a FUSE file and binds a loop device to it dies when
//! killed, even while the kernel's bind waits on that very FUSE server.
//!
//! Binding does I/O on the backing file (the fsync before direct I/O starts).
//! When a thread of the serving process issued the bind, a kill -9 left that
//! thread in an uninterruptible wait for an answer only the process's own,
//! now dead, FUSE workers could give: the process never finished dying, and
//! den servers hung until their next start aborted the connection.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use den_block::mem::MemDevice;
use den_block::{BlockDevice, ExportOptions, FuseLoopFrontend};

const TEST: &str = "killed_mid_bind_the_process_still_exits";
/// Set in the child: the directory it exports in.
const CHILD_DIR: &str = "DEN_BLOCK_BIND_KILL_DIR";

/// A device whose flushes stall forever once armed, like a store that
/// cannot reach its object storage.
struct StallingFlush {
    inner: MemDevice,
    armed: AtomicBool,
}

impl BlockDevice for StallingFlush {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> std::io::Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            // A raw write: the harness may hold Rust's stdout lock.
            say("\n<stalled>\n");
            loop {
                std::thread::park();
            }
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
}

/// The child: export a device whose first flush stalls. Binding the loop
/// device flushes the FUSE file, so the export never returns.
fn child(dir: PathBuf) -> ! {
    let dev = Arc::new(StallingFlush {
        inner: MemDevice::new(64 << 20),
        armed: AtomicBool::new(true),
    });
    let export = FuseLoopFrontend::export(dev, &dir, &ExportOptions::default());
    // Reaching this line means the bind did no flush: nothing to kill in.
    say(if export.is_ok() {
        "\n<exported>\n"
    } else {
        "\n<export failed>\n"
    });
    std::process::exit(0)
}

fn say(line: &str) {
    // SAFETY: writes a borrowed buffer to fd 1, which stays open.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

fn fuse_file(dir: &Path) -> PathBuf {
    dir.join(den_block::FuseOptions::default().file_name)
}

#[test]
fn killed_mid_bind_the_process_still_exits() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child(PathBuf::from(dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fuse");
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, &dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    for line in BufReader::new(proc.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // The harness's "test NAME ... " precedes the child's own lines.
        if line.starts_with('<') {
            said = line;
            break;
        }
    }
    assert_eq!(said, "<stalled>", "the bind never flushed the FUSE file");

    proc.kill().unwrap();
    let exited = common::eventually(Duration::from_secs(10), || proc.try_wait().unwrap().is_some());
    // Cleanup either way: free a wedged process, then the loop device and
    // the dead mount.
    if !exited {
        let _ = den_block::abort_stale_connections(tmp.path());
        let _ = proc.wait();
    }
    let file = fuse_file(&dir.canonicalize().unwrap_or(dir.clone()));
    common::eventually(Duration::from_secs(10), || {
        for dev in den_block::loopdev::devices_backed_by(&file) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        den_block::loopdev::devices_backed_by(&file).is_empty()
    });
    let _ = Command::new("umount").arg("-l").arg(&dir).status();
    assert!(
        exited,
        "the killed process did not exit: a thread of it waited on its own FUSE server"
    );
}
