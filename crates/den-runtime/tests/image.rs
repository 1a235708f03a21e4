//! Base image tests. They need root (chroot, mounts, user namespaces, chown);
//! the Debian one needs mmdebstrap and the Debian mirror (about 100 s).
//!
//! Two-process tests re-run this test binary with `--exact gated_builder`; that
//! test is also a normal test on its own.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::Instant;

use den_runtime::image::{
    BaseImage, BuildEvent, BuildProgress, IdMap, Image, ImageError, LowerKind, NoProgress, SpinnerProgress,
    UserNamespace,
};

const HOST_BASE: u32 = 100_000;

fn sprite_map() -> IdMap {
    IdMap::root_at(HOST_BASE, 65_536)
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the image tests need root (chroot, mounts, user namespaces); run them via scripts/test.sh"
    );
}

/// A temp dir that a sprite's unprivileged root can traverse.
fn tempdir_0755() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("den-image-test-")
        .tempdir()
        .unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Records event kinds (and output lines) of a build.
#[derive(Default)]
struct Recorder {
    events: RefCell<Vec<String>>,
}

impl BuildProgress for Recorder {
    fn event(&self, e: &BuildEvent<'_>) {
        let s = match e {
            BuildEvent::Cached { version } => format!("cached {version}"),
            BuildEvent::WaitingForLock { .. } => "waiting".to_string(),
            BuildEvent::Started { version, .. } => format!("started {version}"),
            BuildEvent::Output { line } => format!("output {line}"),
            BuildEvent::Finished { version, .. } => format!("finished {version}"),
            BuildEvent::Failed { .. } => "failed".to_string(),
            _ => "other".to_string(),
        };
        self.events.borrow_mut().push(s);
    }
}

impl Recorder {
    fn kinds(&self) -> Vec<String> {
        self.events
            .borrow()
            .iter()
            .filter(|e| !e.starts_with("output "))
            .map(|e| e.split(' ').next().unwrap().to_string())
            .collect()
    }
    fn has_output(&self, needle: &str) -> bool {
        self.events
            .borrow()
            .iter()
            .any(|e| e.starts_with("output ") && e.contains(needle))
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chroot(root: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Entries of the images dir other than lock files.
fn published_or_temp(dir: &Path) -> Vec<String> {
    listing(dir)
        .into_iter()
        .filter(|n| !n.ends_with(".lock") && n != ".cache")
        .collect()
}

// ---------------------------------------------------------------- busybox image

#[test]
fn busybox_image_builds_fast_and_runs_sh() {
    require_root();
    let dir = tempdir_0755();
    let rec = Recorder::default();
    let t0 = Instant::now();
    let img = BaseImage::busybox(dir.path()).ensure(&rec).unwrap();
    let took = t0.elapsed();
    println!("busybox image {} built in {took:?}", img.version());
    assert!(took.as_secs_f64() < 5.0, "busybox image took {took:?}");
    assert_eq!(rec.kinds(), ["started", "finished"]);
    assert!(img.version().starts_with("busybox-"));
    assert_eq!(img.dir(), dir.path().join(img.version()));

    let root = img.rootfs();
    assert_eq!(chroot(&root, &["/bin/sh", "-c", "echo ok"]), "ok\n");
    assert_eq!(
        chroot(&root, &["/bin/sh", "-c", "id -u sprite; id -u root; ls /home"]),
        "1000\n0\nsprite\n"
    );
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"));
    assert!(passwd.contains("sprite:x:1000:1000:"));
    assert_eq!(fs::metadata(root.join("home/sprite")).unwrap().uid(), 1000);
    assert_eq!(fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777, 0o1777);

    let m = img.manifest();
    assert_eq!(m.kind, "busybox");
    assert_eq!(m.version, img.version());
    assert!(m.packages[0].starts_with("busybox-static="), "{:?}", m.packages);
    assert!(m.size_bytes > 1_000_000 && m.entries > 100, "{m:?}");
    assert_eq!(m.uids, [0, 1000]);
    let on_disk: serde_json::Value =
        serde_json::from_slice(&fs::read(img.dir().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk["version"], img.version());
    assert_eq!(published_or_temp(dir.path()), [img.version().to_string()]);
}

#[test]
fn cache_returns_same_version_without_rebuilding() {
    require_root();
    let dir = tempdir_0755();
    let base = BaseImage::busybox(dir.path());
    assert!(base.cached().unwrap().is_none());
    let first = base.ensure(&NoProgress).unwrap();
    let ino = fs::metadata(first.rootfs().join("bin/busybox")).unwrap().ino();

    let rec = Recorder::default();
    let again = BaseImage::busybox(dir.path()).ensure(&rec).unwrap();
    assert_eq!(rec.kinds(), ["cached"]);
    assert_eq!(again.version(), first.version());
    assert_eq!(again.manifest().created, first.manifest().created);
    assert_eq!(
        fs::metadata(again.rootfs().join("bin/busybox")).unwrap().ino(),
        ino
    );
    assert_eq!(base.cached().unwrap().unwrap().version(), first.version());
    assert_eq!(
        Image::open(dir.path(), first.version())
            .unwrap()
            .manifest()
            .created,
        first.manifest().created
    );
    assert!(matches!(
        Image::open(dir.path(), "busybox-000000000000"),
        Err(ImageError::NotFound { .. })
    ));

    // A different recipe is a different version, next to the first.
    let other = base.clone().customize_hook("echo extra > \"$1/etc/extra\"");
    assert_ne!(other.version(), first.version());
    let second = other.ensure(&NoProgress).unwrap();
    assert_eq!(
        fs::read_to_string(second.rootfs().join("etc/extra")).unwrap(),
        "extra\n"
    );
    assert_eq!(published_or_temp(dir.path()).len(), 2);
}

#[test]
fn failing_hook_leaves_no_image() {
    require_root();
    let dir = tempdir_0755();
    let base = BaseImage::busybox(dir.path())
        .customize_hook("echo 'hook: about to fail'; touch \"$1/half-done\"; exit 3");
    let rec = Recorder::default();
    let err = base.ensure(&rec).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::BuildFailed { .. }), "{msg}");
    assert!(
        msg.contains("hook: about to fail") && msg.contains("exit status: 3"),
        "{msg}"
    );
    assert_eq!(rec.kinds(), ["started", "failed"]);
    assert!(rec.has_output("hook: about to fail"));
    assert!(!dir.path().join(base.version()).exists());
    assert!(
        published_or_temp(dir.path()).is_empty(),
        "{:?}",
        listing(dir.path())
    );
    assert!(base.cached().unwrap().is_none());
}

// ---------------------------------------------------------------- two processes

/// Blocks in its customize hook while `DEN_TEST_GATE` names a FIFO, until a
/// line can be read from it; otherwise a no-op. The hook text is the same
/// either way, so gated and ungated builders build the same version.
const GATE_HOOK: &str = r#"if [ -n "${DEN_TEST_GATE:-}" ]; then echo "gate: waiting"; read _ < "$DEN_TEST_GATE"; fi; echo "gate: passed""#;

fn gated(dir: &Path) -> BaseImage {
    BaseImage::busybox(dir).customize_hook(GATE_HOOK)
}

/// The child side of the two-process tests (and a plain test when run alone):
/// builds the gated recipe in `DEN_TEST_IMAGES` and prints its events.
#[test]
fn gated_builder() {
    require_root();
    let own;
    let dir = match std::env::var_os("DEN_TEST_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => {
            own = tempdir_0755();
            own.path().to_path_buf()
        }
    };
    let print = |e: &BuildEvent<'_>| {
        let line = match e {
            BuildEvent::Cached { version } => format!("cached {version}"),
            BuildEvent::WaitingForLock { .. } => "waiting".into(),
            BuildEvent::Started { version, .. } => format!("started {version}"),
            BuildEvent::Output { line } => format!("output {line}"),
            BuildEvent::Finished { version, .. } => format!("finished {version}"),
            BuildEvent::Failed { error, .. } => format!("failed {error}"),
            _ => "other".into(),
        };
        println!("EVENT {line}");
    };
    let img = gated(&dir).ensure(&print).unwrap();
    assert!(img.rootfs().join("bin/sh").exists());
}

/// The event in a line of the child's stdout. libtest prints `test NAME ... `
/// without a newline before the test runs, so the first event shares its line.
fn event_of(line: &str) -> Option<&str> {
    line.find("EVENT ").map(|i| &line[i + "EVENT ".len()..])
}

/// A child process running `gated_builder`, killed (with its whole process
/// group, hooks included) when dropped.
struct Builder {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Builder {
    fn spawn(images: &Path, gate: Option<&Path>) -> Builder {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "gated_builder", "--nocapture", "--test-threads=1"])
            .env("DEN_TEST_IMAGES", images)
            .env_remove("DEN_TEST_GATE")
            .stdout(Stdio::piped())
            .process_group(0);
        if let Some(g) = gate {
            cmd.env("DEN_TEST_GATE", g);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Builder { child, lines }
    }

    /// Read event lines until one contains `needle`. Panics at EOF (the child
    /// exited), so a broken child can't hang the test.
    fn wait_for(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if let Some(ev) = event_of(&line) {
                seen.push(ev.to_string());
                if ev.contains(needle) {
                    return seen;
                }
            }
        }
        panic!("child exited before printing {needle:?}; events: {seen:?}");
    }

    fn finish(mut self) -> Vec<String> {
        let rest: Vec<String> = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .filter_map(|l| event_of(&l).map(str::to_string))
            .collect();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "child failed: {status}; events: {rest:?}");
        rest
    }

    fn kill_group(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
        }
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn killed_build_leaves_no_image_and_the_next_build_recovers() {
    require_root();
    let dir = tempdir_0755();
    let images = dir.path().join("images");
    let gate = dir.path().join("gate");
    mkfifo(&gate);
    let version = gated(&images).version();

    let mut child = Builder::spawn(&images, Some(&gate));
    child.wait_for("gate: waiting");
    // Mid-build: the rootfs is half made in a temp dir, nothing is published.
    let temps: Vec<String> = listing(&images)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert_eq!(temps.len(), 1, "{:?}", listing(&images));
    assert!(images.join(&temps[0]).join("rootfs/bin/busybox").exists());
    assert!(!images.join(&version).exists());

    child.kill_group();
    assert!(!images.join(&version).exists());
    assert!(gated(&images).cached().unwrap().is_none());

    // The next builder removes the leftovers and builds.
    let rec = Recorder::default();
    let img = gated(&images).ensure(&rec).unwrap();
    assert_eq!(img.version(), version);
    assert!(
        rec.has_output("removing leftovers of a killed build"),
        "{:?}",
        rec.events.borrow()
    );
    assert_eq!(published_or_temp(&images), [version]);
    assert_eq!(chroot(&img.rootfs(), &["/bin/sh", "-c", "echo ok"]), "ok\n");
}

#[test]
fn concurrent_builders_in_two_processes_build_once() {
    require_root();
    let dir = tempdir_0755();
    let images = dir.path().join("images");
    let gate = dir.path().join("gate");
    mkfifo(&gate);

    // A starts building and stops in its hook, holding the lock.
    let mut a = Builder::spawn(&images, Some(&gate));
    let a_events = a.wait_for("gate: waiting");
    assert!(a_events[0].starts_with("started "), "{a_events:?}");
    // B finds nothing published and waits for A's lock.
    let mut b = Builder::spawn(&images, None);
    let b_events = b.wait_for("waiting");
    assert_eq!(b_events, ["waiting"]);

    // Release A. O_RDWR never blocks on a FIFO, so this works whether or not
    // the hook has opened its end yet.
    let mut g = fs::OpenOptions::new().read(true).write(true).open(&gate).unwrap();
    writeln!(g, "go").unwrap();
    let a_rest = a.finish();
    let b_rest = b.finish();
    drop(g);

    let version = gated(&images).version();
    assert!(a_rest.contains(&format!("finished {version}")), "A: {a_rest:?}");
    assert_eq!(b_rest, [format!("cached {version}")], "B built again or failed");
    assert_eq!(published_or_temp(&images), [version]);
}

// ---------------------------------------------------------------- user namespace lower

/// Run `script` with `sh -eu` as root of a new user namespace with `map`, in a
/// new mount namespace owned by it (so it may mount overlayfs).
fn in_userns(map: &IdMap, script: &str) -> Output {
    let ns = UserNamespace::new(map).unwrap();
    let ns_path = format!("/proc/{}/fd/{}", std::process::id(), ns.fd().as_raw_fd());
    let out = run(Command::new("nsenter").arg(format!("--user={ns_path}")).args([
        "--setuid=0",
        "--setgid=0",
        "--",
        "unshare",
        "--mount",
        "--",
        "/bin/sh",
        "-euc",
        script,
    ]));
    drop(ns);
    out
}

/// upper, work and merged dirs owned by the container's root.
fn overlay_dirs(base: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dirs: Vec<PathBuf> = ["upper", "work", "merged"].iter().map(|n| base.join(n)).collect();
    for d in &dirs {
        fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(HOST_BASE), Some(HOST_BASE)).unwrap();
    }
    (dirs[0].clone(), dirs[1].clone(), dirs[2].clone())
}

fn mount_cmd(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> String {
    format!(
        "mount -t overlay overlay -o userxattr,lowerdir={},upperdir={},workdir={} {}",
        lower.display(),
        upper.display(),
        work.display(),
        merged.display()
    )
}

fn assert_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plain_image_as_lower_fails_copy_up_with_eoverflow_in_userns() {
    require_root();
    let dir = tempdir_0755();
    let img = BaseImage::busybox(dir.path().join("images"))
        .ensure(&NoProgress)
        .unwrap();
    let (upper, work, merged) = overlay_dirs(dir.path());
    let script = format!(
        "{}; stat -c %u {m}/tmp; touch {m}/tmp/x",
        mount_cmd(&img.rootfs(), &upper, &work, &merged),
        m = merged.display()
    );
    let out = in_userns(&sprite_map(), &script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Root-owned image files are nobody (65534) inside, and copying up /tmp
    // (1777, so writable by anyone) fails.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n");
    assert!(
        stderr.contains("Value too large for defined data type"),
        "{stderr}"
    );
}

#[test]
fn idmapped_lower_allows_copy_up_in_userns() {
    require_root();
    let dir = tempdir_0755();
    let img = BaseImage::busybox(dir.path().join("images"))
        .ensure(&NoProgress)
        .unwrap();
    let map = sprite_map();

    let t0 = Instant::now();
    let lower = img.lower_dir_for(&map).unwrap();
    println!("idmapped lower mounted in {:?}", t0.elapsed());
    assert_eq!(lower.kind, LowerKind::Idmapped);
    assert_eq!(
        lower.path,
        img.dir().join("idmapped/0-100000-65536").canonicalize().unwrap()
    );
    // Host view: owners shifted, read-only.
    assert_eq!(
        fs::metadata(lower.path.join("etc/passwd")).unwrap().uid(),
        HOST_BASE
    );
    assert_eq!(
        fs::metadata(lower.path.join("home/sprite")).unwrap().uid(),
        HOST_BASE + 1000
    );
    let err = fs::write(lower.path.join("etc/passwd"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    // Made once: a second call finds the same mount.
    let again = img.lower_dir_for(&map).unwrap();
    assert_eq!(again, lower);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let canon = lower.path.to_str().unwrap();
    assert_eq!(
        mounts
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(canon))
            .count(),
        1
    );

    let (upper, work, merged) = overlay_dirs(dir.path());
    let m = merged.display();
    let script = format!(
        "{mount}
         id -u
         stat -c %u:%g {m}/etc/passwd
         echo 'changed:x:7:7::/:/bin/sh' >> {m}/etc/passwd
         rm {m}/bin/ls
         chroot {m} /bin/sh -c 'echo hi > /root/new; cat /root/new; id -u; grep -c changed /etc/passwd'",
        mount = mount_cmd(&lower.path, &upper, &work, &merged),
    );
    let out = assert_ok(&in_userns(&map, &script));
    assert_eq!(out, "0\n0:0\nhi\n0\n1\n");

    // Copied-up and new files belong to the container's root on the host.
    let up = fs::metadata(upper.join("etc/passwd")).unwrap();
    assert_eq!((up.uid(), up.gid()), (HOST_BASE, HOST_BASE));
    assert!(
        fs::read_to_string(upper.join("etc/passwd"))
            .unwrap()
            .contains("changed:x:7:7")
    );
    assert_eq!(fs::metadata(upper.join("root/new")).unwrap().uid(), HOST_BASE);
    let whiteout = fs::symlink_metadata(upper.join("bin/ls")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &whiteout.file_type()
    ));
    assert_eq!(whiteout.rdev(), 0);
    // The image itself is untouched.
    assert!(
        !fs::read_to_string(img.rootfs().join("etc/passwd"))
            .unwrap()
            .contains("changed")
    );
    assert!(img.rootfs().join("bin/ls").exists());

    assert_eq!(img.release_idmapped().unwrap(), 1);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(canon));
}

#[test]
fn id_map_must_cover_the_image_owners() {
    require_root();
    let dir = tempdir_0755();
    let img = BaseImage::busybox(dir.path()).ensure(&NoProgress).unwrap();
    // 0..1000 leaves sprite (1000) unmapped.
    let err = img.lower_dir_for(&IdMap::root_at(HOST_BASE, 1000)).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::UnmappedId {
                kind: "uid",
                id: 1000
            }
        ),
        "{err}"
    );
    let ident = img.lower_dir_for(&IdMap::identity()).unwrap();
    assert_eq!((ident.path, ident.kind), (img.rootfs(), LowerKind::Plain));
}

/// setuid copy, a file with `cap_net_raw+ep` (as setcap writes it: v2) and a
/// hard link to it.
const SPECIAL_FILES_HOOK: &str = r#"cp "$1/bin/busybox" "$1/bin/suidbox" && chmod 4755 "$1/bin/suidbox" && cp "$1/bin/busybox" "$1/bin/capbox" && python3 -c 'import os, sys; os.setxattr(sys.argv[1], "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))' "$1/bin/capbox" && ln "$1/bin/capbox" "$1/bin/capbox-link""#;

fn caps_hex(path: &Path) -> String {
    run_ok(Command::new("python3").arg("-c").arg(
        "import os, sys; print(os.getxattr(sys.argv[1], 'security.capability', follow_symlinks=False).hex())",
    ).arg(path))
    .trim()
    .to_string()
}

#[test]
fn shifted_lower_allows_copy_up_in_userns_and_keeps_setuid_caps_and_links() {
    require_root();
    let dir = tempdir_0755();
    let img = BaseImage::busybox(dir.path().join("images"))
        .customize_hook(SPECIAL_FILES_HOOK)
        .ensure(&NoProgress)
        .unwrap();
    let map = sprite_map();
    let t0 = Instant::now();
    let lower = img.shifted_lower(&map).unwrap();
    println!("busybox image shifted in {:?}", t0.elapsed());
    assert_eq!(lower.kind, LowerKind::Shifted);
    assert_eq!(lower.path, img.dir().join("rootfs-shifted-0-100000-65536"));
    assert_eq!(img.shifted_lower(&map).unwrap(), lower);
    assert_eq!(
        listing(img.dir())
            .iter()
            .filter(|n| n.starts_with(".tmp"))
            .count(),
        0
    );

    let l = &lower.path;
    let meta = |p: &str| fs::symlink_metadata(l.join(p)).unwrap();
    assert_eq!((meta(".").uid(), meta(".").mode() & 0o7777), (HOST_BASE, 0o755));
    assert_eq!(
        (meta("bin/suidbox").uid(), meta("bin/suidbox").mode() & 0o7777),
        (HOST_BASE, 0o4755)
    );
    assert_eq!(
        (meta("home/sprite").uid(), meta("home/sprite").gid()),
        (HOST_BASE + 1000, HOST_BASE + 1000)
    );
    assert_eq!((meta("tmp").mode() & 0o7777), 0o1777);
    assert_eq!(
        fs::read_link(l.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(meta("bin/sh").uid(), HOST_BASE);
    assert_eq!(meta("bin/capbox").ino(), meta("bin/capbox-link").ino());
    assert_eq!(
        meta("etc/passwd").mtime(),
        fs::metadata(img.rootfs().join("etc/passwd")).unwrap().mtime()
    );
    // v2 caps became v3 with rootid 100000 (0x186a0).
    assert_eq!(
        caps_hex(&l.join("bin/capbox")),
        "0100000300200000000000000000000000000000a0860100"
    );

    let (upper, work, merged) = overlay_dirs(dir.path());
    let m = merged.display();
    let script = format!(
        "{mount}
         stat -c %u:%a {m}/bin/suidbox
         python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], \"security.capability\").hex())' {m}/bin/capbox
         echo more >> {m}/etc/group
         chroot {m} /bin/sh -c 'touch /etc/new; id -u'",
        mount = mount_cmd(l, &upper, &work, &merged),
    );
    let out = assert_ok(&in_userns(&map, &script));
    // Inside, the cap is an ordinary (v2) one of the namespace's root.
    assert_eq!(out, "0:4755\n0100000200200000000000000000000000000000\n0\n");
    assert_eq!(fs::metadata(upper.join("etc/group")).unwrap().uid(), HOST_BASE);
    assert_eq!(fs::metadata(upper.join("etc/new")).unwrap().uid(), HOST_BASE);
}

// ---------------------------------------------------------------- the real image

#[test]
fn full_debian_image() {
    require_root();
    let dir = tempdir_0755();
    let spinner = SpinnerProgress::new();
    let lines = Cell::new(0usize);
    let progress = |e: &BuildEvent<'_>| {
        if matches!(e, BuildEvent::Output { .. }) {
            lines.set(lines.get() + 1);
        }
        spinner.event(e);
    };
    let t0 = Instant::now();
    let img = BaseImage::debian(dir.path()).ensure(&progress).unwrap();
    let m = img.manifest();
    println!(
        "debian image {} built in {:?}: {} MB, {} entries, {} packages, {} output lines",
        img.version(),
        t0.elapsed(),
        m.size_bytes / 1_000_000,
        m.entries,
        m.packages.len(),
        lines.get()
    );
    assert!(
        lines.get() > 100,
        "mmdebstrap output should stream ({} lines)",
        lines.get()
    );
    assert!(img.version().starts_with("bookworm-"));
    assert!(
        m.size_bytes > 100_000_000 && m.size_bytes < 400_000_000,
        "{} bytes",
        m.size_bytes
    );
    for p in [
        "sudo=",
        "python3=",
        "git=",
        "curl=",
        "tmux=",
        "vim-tiny=",
        "locales=",
        "apt=",
        "gpgv=",
    ] {
        assert!(
            m.packages.iter().any(|x| x.starts_with(p)),
            "{p} not installed: {:?}",
            m.packages
        );
    }
    assert_eq!(m.env["LANG"], "C.UTF-8");

    let root = img.rootfs();
    chroot(&root, &["sudo", "-u", "sprite", "--", "sudo", "-n", "true"]);
    assert!(chroot(&root, &["python3", "--version"]).starts_with("Python 3."));
    assert!(chroot(&root, &["git", "--version"]).starts_with("git version"));
    assert!(chroot(&root, &["locale", "-a"]).lines().any(|l| l == "C.utf8"));
    assert_eq!(
        chroot(&root, &["id", "sprite"]),
        "uid=1000(sprite) gid=1000(sprite) groups=1000(sprite),27(sudo)\n"
    );
    assert_eq!(
        chroot(&root, &["getent", "passwd", "sprite"]),
        "sprite:x:1000:1000::/home/sprite:/bin/bash\n"
    );
    assert!(
        chroot(
            &root,
            &[
                "sh",
                "-c",
                "LANG=C.UTF-8 python3 -c 'import locale; print(locale.getpreferredencoding())'"
            ]
        )
        .contains("UTF-8")
    );
    for tool in [
        ["curl", "--version"],
        ["tmux", "-V"],
        ["ip", "-V"],
        ["vi", "--version"],
        ["ssh", "-V"],
        ["apt-get", "--version"],
    ] {
        chroot(&root, &tool);
    }
    // ps needs /proc, which a plain chroot does not have.
    chroot(&root, &["sh", "-c", "command -v ps pgrep top"]);
    chroot(&root, &["ping", "-V"]);
    chroot(&root, &["less", "--version"]);
    let sudoers = fs::metadata(root.join("etc/sudoers.d/sprite")).unwrap();
    assert_eq!((sudoers.mode() & 0o7777, sudoers.uid()), (0o440, 0));
    assert_eq!(
        fs::read_to_string(root.join("etc/default/locale"))
            .unwrap()
            .trim()
            .lines()
            .last(),
        Some("LANG=C.UTF-8")
    );
    assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "sprite\n");
    assert!(
        fs::read_to_string(root.join("etc/hosts"))
            .unwrap()
            .contains("127.0.1.1\tsprite")
    );
    assert!(
        fs::read_to_string(root.join("etc/resolv.conf"))
            .unwrap()
            .starts_with("# Placeholder")
    );
    let sources = fs::read_to_string(root.join("etc/apt/sources.list")).unwrap();
    for s in ["bookworm main", "bookworm-updates main", "bookworm-security main"] {
        assert!(sources.contains(s), "{sources}");
    }
    assert!(
        root.join("usr/share/keyrings/debian-archive-keyring.gpg")
            .exists()
    );
    assert!(
        listing(&root.join("var/lib/apt/lists"))
            .iter()
            .all(|n| n == "lock" || n == "partial")
    );
    assert!(
        listing(&root.join("var/cache/apt/archives"))
            .iter()
            .all(|n| n == "lock" || n == "partial")
    );
    assert!(!root.join("etc/dpkg/dpkg.cfg.d/00den-build-unsafe-io").exists());
    // Slim: the dpkg filters stay for later installs; what mmdebstrap unpacked
    // before they applied was removed.
    let slim = fs::read_to_string(root.join("etc/dpkg/dpkg.cfg.d/01den-slim")).unwrap();
    assert!(
        slim.lines().any(|l| l == "path-exclude=/usr/share/man/*"),
        "{slim}"
    );
    assert_eq!(listing(&root.join("usr/share/man")), Vec::<String>::new());
    assert_eq!(listing(&root.join("usr/share/locale")), ["locale.alias"]);
    let docs = run_ok(
        Command::new("find")
            .arg(root.join("usr/share/doc"))
            .args(["-type", "f"]),
    );
    assert!(
        docs.lines().count() > 50 && docs.lines().all(|l| l.ends_with("/copyright")),
        "{docs}"
    );
    assert!(
        !root.join("proc/self").exists(),
        "mmdebstrap's mounts must not leak"
    );

    // Cached now.
    let rec = Recorder::default();
    assert_eq!(
        BaseImage::debian(dir.path()).ensure(&rec).unwrap().version(),
        img.version()
    );
    assert_eq!(rec.kinds(), ["cached"]);

    // In a sprite's user namespace, over the idmapped lower: sudo works as sprite,
    // and root-owned files can be changed.
    let map = sprite_map();
    let t1 = Instant::now();
    let lower = img.lower_dir_for(&map).unwrap();
    println!("idmapped lower of the debian image in {:?}", t1.elapsed());
    assert_eq!(lower.kind, LowerKind::Idmapped);
    let check = |lower: &Path, sub: &str| {
        let base = dir.path().join(sub);
        fs::create_dir(&base).unwrap();
        let (upper, work, merged) = overlay_dirs(&base);
        let script = format!(
            "{mount}
             chroot {m} /usr/bin/sudo -u sprite -- sudo -n id -u
             chroot {m} /bin/sh -c 'echo sprite-1 > /etc/hostname; cat /etc/hostname; stat -c %U /usr/bin/sudo'",
            mount = mount_cmd(lower, &upper, &work, &merged),
            m = merged.display()
        );
        let out = assert_ok(&in_userns(&map, &script));
        assert_eq!(out, "0\nsprite-1\nroot\n");
        assert_eq!(fs::metadata(upper.join("etc/hostname")).unwrap().uid(), HOST_BASE);
    };
    check(&lower.path, "idmapped");
    img.release_idmapped().unwrap();

    // The fallback on the real image: setuid sudo survives the shift.
    let t2 = Instant::now();
    let shifted = img.shifted_lower(&map).unwrap();
    println!("debian image shifted in {:?}", t2.elapsed());
    let sudo = fs::metadata(shifted.path.join("usr/bin/sudo")).unwrap();
    assert_eq!((sudo.uid(), sudo.mode() & 0o7777), (HOST_BASE, 0o4755));
    check(&shifted.path, "shifted");
}
