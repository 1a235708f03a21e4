//! Shared helpers for den's CLI end-to-end tests: run `den volume …` against
//! a private data dir, run `den volume mount` daemons, and clean up the kernel
//! state they leave behind (mounts, loop devices) even when a test fails.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use den_testkit::wait_until;

/// How long a daemon may take to print its ready line (mkfs included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to unmount and flush after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// A deterministic PRNG (SplitMix64), so a failing run can be replayed from
/// its printed seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi` exclusive, `lo < hi`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// A seed from `DEN_TEST_SEED` (to replay a failure) or from the clock.
pub fn seed_from_env() -> u64 {
    match std::env::var("DEN_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("DEN_TEST_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(42),
    }
}

/// A den data dir of its own, and a way to run `den` against it.
pub struct Den {
    dir: tempfile::TempDir,
    pub data_dir: PathBuf,
}

impl Den {
    pub fn new() -> Den {
        den_testkit::require_root();
        let dir = tempfile::Builder::new()
            .prefix("den-e2e-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = dir.path().join("data");
        fs::create_dir(&data_dir).expect("create data dir");
        Den { dir, data_dir }
    }

    /// The test's temp dir (the data dir is `data/` inside it).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `den` with this data dir and no other `DEN_*` settings from the
    /// environment (an S3 endpoint there must not redirect the test).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_den"));
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("DEN_")) {
                cmd.env_remove(k);
            }
        }
        cmd.env("DEN_DATA_DIR", &self.data_dir).stdin(Stdio::null());
        cmd
    }

    /// Run `den volume ARGS…` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .arg("volume")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawning den volume {args:?}: {e}"))
    }

    /// Run `den volume ARGS…`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "den volume {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `den volume ARGS…`, which must fail with a non-zero exit code and
    /// an `error: …` line; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && out.status.code().is_some_and(|c| c != 0),
            "den volume {args:?} should have failed but exited {}:\nstdout: {}\nstderr: {stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
        assert!(
            stderr.contains("error:"),
            "den volume {args:?} failed without an error message:\n{stderr}"
        );
        stderr
    }

    /// `den volume checkpoint NAME --json`; returns the checkpoint id.
    pub fn checkpoint(&self, name: &str, comment: &str) -> String {
        let out = self.ok(&["checkpoint", name, "--json", "-c", comment]);
        checkpoint_id(&out).unwrap_or_else(|| panic!("no checkpoint id in {out:?}"))
    }

    /// Checkpoint ids listed by `den volume checkpoints NAME --json`.
    pub fn checkpoint_ids(&self, name: &str) -> Vec<String> {
        let out = self.ok(&["checkpoints", name, "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"));
        v.as_array()
            .unwrap_or_else(|| panic!("checkpoints --json is not an array: {out}"))
            .iter()
            .map(|c| c["id"].as_str().expect("checkpoint id").to_string())
            .collect()
    }

    /// Start `den volume mount NAME ARGS…` and wait for its ready line.
    pub fn mount(&self, name: &str, args: &[&str]) -> Daemon {
        Daemon::start(self, name, args)
    }
}

impl Drop for Den {
    /// Remove every mount and loop device left under the temp dir (a failed
    /// or crashed test), so the temp dir can go and nothing leaks.
    fn drop(&mut self) {
        let root = self.dir.path().to_path_buf();
        let under = |p: &Path| p.starts_with(&root);
        // Filesystems on loop devices first (thawed, in case a daemon died
        // while checkpointing), then loop devices, then the FUSE mounts.
        for (mp, fstype) in mounts().into_iter().rev() {
            if under(&mp) && !fstype.starts_with("fuse") {
                let _ = Command::new("fsfreeze")
                    .arg("--unfreeze")
                    .arg(&mp)
                    .stderr(Stdio::null())
                    .status();
                let _ = Command::new("umount").arg("-l").arg(&mp).status();
            }
        }
        if let Ok(entries) = fs::read_dir("/sys/block") {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
                    continue;
                };
                let dev = PathBuf::from(format!("/dev/{name}"));
                if loop_backing_file(&dev).is_some_and(|f| under(&f)) {
                    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
                }
            }
        }
        for (mp, _) in mounts().into_iter().rev() {
            if under(&mp) {
                let _ = Command::new("umount").arg("-l").arg(&mp).status();
            }
        }
    }
}

/// The id in the output of `den volume checkpoint --json`.
pub fn checkpoint_id(json_line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json_line.trim()).ok()?;
    v["checkpoint"]["id"].as_str().map(str::to_string)
}

/// What `den volume mount` reported when it became ready.
#[derive(Debug, Clone)]
pub struct Ready {
    pub device: Option<PathBuf>,
    pub file: PathBuf,
    pub mountpoint: Option<PathBuf>,
    pub socket: PathBuf,
}

impl Ready {
    pub fn fuse_dir(&self) -> &Path {
        self.file.parent().expect("disk file has a parent")
    }
}

/// A running `den volume mount`. Dropping it stops the daemon (SIGTERM, then
/// SIGKILL if it does not exit in time) and removes whatever kernel state it
/// left behind.
pub struct Daemon {
    child: Option<Child>,
    pub ready: Ready,
    pub log: PathBuf,
    name: String,
}

impl Daemon {
    fn start(den: &Den, name: &str, args: &[&str]) -> Daemon {
        let log = den.root().join(format!("mount-{name}.log"));
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open daemon log");
        let mut cmd = den.command();
        cmd.args(["volume", "mount", name])
            .args(args)
            .env("DEN_LOG", "info,fuser=error")
            .stdout(Stdio::piped())
            .stderr(log_file);
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // If the test process dies without dropping the guard, the
                // daemon still unmounts and exits by itself.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn den volume mount");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the daemon never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "den volume mount {name} {args:?} did not become ready ({e}; exit {status:?}); log:\n{}",
                    read_lossy(&log)
                );
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad ready line {line:?}: {e}; log:\n{}", read_lossy(&log)));
        assert_eq!(v["ready"], true, "ready line {line}");
        let path = |k: &str| v[k].as_str().map(PathBuf::from);
        let ready = Ready {
            device: path("device"),
            file: path("file").expect("ready line has file"),
            mountpoint: path("mountpoint"),
            socket: path("socket").expect("ready line has socket"),
        };
        Daemon {
            child: Some(child),
            ready,
            log,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: plain syscall on our own (not yet reaped) child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        let _ = wait_until(timeout, POLL, || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            Ok(None) => false,
            Err(_) => true,
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGTERM and wait: the daemon unmounts, stops the export and flushes.
    /// Panics unless it exits successfully in time.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(STOP_TIMEOUT);
        let log = self.log_text();
        match status {
            Some(s) if s.success() => {}
            other => panic!(
                "den volume mount {} did not stop cleanly: {other:?}; log:\n{log}",
                self.name
            ),
        }
        // The loop driver releases the file a moment after its detach.
        let r = self.ready.clone();
        let released = || {
            !is_mount_point(r.fuse_dir())
                && r.mountpoint.as_deref().is_none_or(|mp| !is_mount_point(mp))
                && r.device
                    .as_deref()
                    .is_none_or(|dev| loop_backing_file(dev).as_deref() != Some(r.file.as_path()))
        };
        if wait_until(Duration::from_secs(30), POLL, released).is_err() {
            panic!(
                "den volume mount {} left something behind after a clean stop: FUSE dir mounted: {}, \
                 mountpoint mounted: {:?}, loop device still bound: {:?} ({r:?}); log:\n{}",
                self.name,
                is_mount_point(r.fuse_dir()),
                r.mountpoint.as_deref().map(is_mount_point),
                r.device.as_deref().map(loop_backing_file),
                self.log_text()
            );
        }
    }

    /// SIGKILL and reap. Leaves the kernel state (dead FUSE mount, loop
    /// device, filesystem mount) as a crash would; see [`cleanup_crash`].
    pub fn kill9(mut self) -> Ready {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(status.is_some(), "daemon did not die after SIGKILL");
        self.ready.clone()
    }
}

impl Drop for Daemon {
    /// Only reached with the daemon still running when a test fails (or
    /// forgets to stop it): stop it, and clean up if it had to be killed.
    /// [`Den`]'s drop sweeps whatever is left under the test's temp dir.
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(STOP_TIMEOUT).is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(30));
        }
        cleanup_crash(&self.ready);
    }
}

/// Remove what a killed daemon leaves behind: a (possibly frozen) filesystem
/// on the mountpoint, the loop device bound to the dead FUSE file, and the
/// dead FUSE mount. Idempotent and best effort.
pub fn cleanup_crash(r: &Ready) {
    if let Some(mp) = &r.mountpoint
        && is_mount_point(mp)
    {
        // A daemon killed during a checkpoint leaves the filesystem frozen.
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(mp)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount").arg("-l").arg(mp).status();
    }
    if let Some(dev) = &r.device
        && loop_backing_file(dev).as_deref() == Some(r.file.as_path())
    {
        let _ = Command::new("losetup").arg("-d").arg(dev).status();
    }
    while is_mount_point(r.fuse_dir()) {
        if !Command::new("umount")
            .arg("-l")
            .arg(r.fuse_dir())
            .status()
            .is_ok_and(|s| s.success())
        {
            break;
        }
    }
}

/// The backing file of loop device `dev` (`/dev/loopN`), if it is bound.
pub fn loop_backing_file(dev: &Path) -> Option<PathBuf> {
    den_block::loopdev::backing_file(dev)
}

/// Mount points with their fstype, in mount order.
pub fn mounts() -> Vec<(PathBuf, String)> {
    den_block::mountinfo::read()
        .expect("read mountinfo")
        .into_iter()
        .map(|m| (m.mount_point, m.fstype))
        .collect()
}

/// How many mounts are stacked on `path`.
pub fn mount_count(path: &Path) -> usize {
    mounts().iter().filter(|(p, _)| p == path).count()
}

pub fn is_mount_point(path: &Path) -> bool {
    mount_count(path) > 0
}

pub fn read_lossy(p: &Path) -> String {
    let mut s = Vec::new();
    match File::open(p).and_then(|mut f| f.read_to_end(&mut s)) {
        Ok(_) => String::from_utf8_lossy(&s).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", p.display()),
    }
}

/// Run a command, panicking with its output unless it succeeds.
pub fn run(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    let show = || {
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        out.status.success(),
        "{program} {:?} failed ({}):\nstdout: {}\nstderr: {}",
        show(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `e2fsck -fn IMAGE` must report a clean filesystem (exit 0).
pub fn assert_fsck_clean(image: &Path, what: &str) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .expect("spawn e2fsck");
    assert!(
        out.status.code() == Some(0),
        "e2fsck -fn of {what} ({}) is not clean (exit {:?}):\n{}\n{}",
        image.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A read-only loop mount of an ext4 image, unmounted (and its loop device
/// freed) on drop.
pub struct ImageMount {
    pub dir: PathBuf,
}

impl ImageMount {
    pub fn new(image: &Path, dir: &Path) -> ImageMount {
        fs::create_dir_all(dir).expect("create image mount dir");
        run("mount", &[&"-t", &"ext4", &"-o", &"loop,ro,noload", &image, &dir]);
        ImageMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for ImageMount {
    fn drop(&mut self) {
        if is_mount_point(&self.dir) {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// A directory tree's content: relative path → `None` for directories, the
/// bytes for regular files.
pub type Tree = BTreeMap<PathBuf, Option<Vec<u8>>>;

/// Read the tree under `root`, skipping ext4's `lost+found`.
pub fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                out.insert(rel, None);
                walk(root, &path, out);
            } else if ft.is_file() {
                let data = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                out.insert(rel, Some(data));
            } else {
                panic!("unexpected file type at {}", path.display());
            }
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

/// Compare two trees and describe the first differences.
pub fn assert_tree_eq(actual: &Tree, expected: &Tree, what: &str) {
    let mut problems = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => problems.push(format!("missing {}", p.display())),
            Some(a) if a == e => {}
            Some(a) => problems.push(describe_diff(p, a.as_deref(), e.as_deref())),
        }
    }
    for p in actual.keys() {
        if !expected.contains_key(p) {
            problems.push(format!("unexpected {}", p.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: {} differences:\n  {}",
        problems.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
    );
}

fn describe_diff(p: &Path, actual: Option<&[u8]>, expected: Option<&[u8]>) -> String {
    match (actual, expected) {
        (Some(a), Some(e)) => {
            let first = a.iter().zip(e).position(|(x, y)| x != y);
            format!(
                "{}: {} bytes, expected {} (first difference at {:?})",
                p.display(),
                a.len(),
                e.len(),
                first
            )
        }
        (a, e) => format!(
            "{}: is {}, expected {}",
            p.display(),
            if a.is_some() { "a file" } else { "a directory" },
            if e.is_some() { "a file" } else { "a directory" }
        ),
    }
}

/// Write `data` to `path` (creating parents) and fsync the file and its directory.
pub fn write_synced(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all_at(data, 0)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    sync_dir(path.parent().unwrap());
}

pub fn sync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", dir.display()));
}

/// `syncfs(2)` on the filesystem holding `path`.
pub fn syncfs(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    assert_eq!(
        r,
        0,
        "syncfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Apply `tree` (directories and files) under `root`, fsyncing everything.
pub fn write_tree(root: &Path, tree: &Tree) {
    for (p, content) in tree {
        let path = root.join(p);
        match content {
            None => fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display())),
            Some(data) => write_synced(&path, data),
        }
    }
    syncfs(root);
}
