//! The backend tests (root only; they never skip), one suite run against
//! both backends: every test runs as `native::NAME` (libcontainer) and
//! `gvisor::NAME` (runsc, which must be installed: `scripts/install-deps.sh
//! runsc`). Where gVisor behaves differently by design, the test says why
//! and asserts gVisor's behaviour instead.
//!
//! `harness = false`: `main` runs each test in turn and, when started with
//! [`SHIM_ARG`] as argv[1], acts as the runtime shim instead, so the backend
//! can spawn this very executable as its helper process (the `den` binary
//! does the same with `den runtime-shim`).
//!
//! Synchronisation is by bounded polling of files the sprite writes into its
//! upper directory (scripts write `x.tmp` then `mv` it, so a file that exists
//! is complete). Every sprite is deleted by a guard's `Drop`, also on failure.
//!
//! `cargo test -p den-runtime --test container -- NAME…` runs only the tests
//! whose names contain one of the NAMEs (`gvisor::`, `::isolation`,
//! `native::bench`); `bench` prints latency numbers (also against `runc run`).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use den_runtime::RuntimeError;
use den_runtime::backend::{Backend, BindMount, CpuLimit, Handle, Resources, SpriteSpec, SpriteState};
use den_runtime::cgroup::SpriteCgroup;
use den_runtime::cgroup::{self, CgroupMode};
use den_runtime::container::{ContainerBackend, ShimCommand, shim_main};
use den_runtime::gvisor::GvisorBackend;
use den_runtime::image::{BaseImage, IdMap, Image, Lower, NoProgress};

const SHIM_ARG: &str = "__den_runtime_shim";
const HOST_BASE: u32 = 100_000;

type TestResult = Result<(), String>;
type TestFn = fn(&Env) -> TestResult;

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The backend a test runs against: every test runs on both, as
/// `native::NAME` and `gvisor::NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Native,
    Gvisor,
}

enum Engine {
    Native(ContainerBackend),
    Gvisor(GvisorBackend),
}

struct Env {
    dir: tempfile::TempDir,
    image: Image,
    lower: Lower,
    engine: Engine,
    mode: CgroupMode,
    seq: std::cell::Cell<u32>,
}

impl Env {
    fn new(kind: Kind) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("den-ctr-test-")
            .tempdir()
            .unwrap();
        // PID 1 starts as the sprite's root, "other" to host-root-owned dirs.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        let image = BaseImage::busybox(dir.path().join("images"))
            .ensure(&NoProgress)
            .unwrap();
        let lower = image.lower_dir_for(&IdMap::root_at(HOST_BASE, 65_536)).unwrap();
        let shim = ShimCommand {
            program: std::env::current_exe().unwrap(),
            args: vec![SHIM_ARG.into()],
        };
        let state = dir.path().join("state");
        let (engine, mode) = match kind {
            Kind::Native => {
                let b = ContainerBackend::new(state, shim).unwrap();
                let mode = b.cgroup_mode();
                (Engine::Native(b), mode)
            }
            Kind::Gvisor => {
                let b = GvisorBackend::new(state, shim, "runsc").unwrap();
                let mode = b.cgroup_mode();
                (Engine::Gvisor(b), mode)
            }
        };
        Env {
            dir,
            image,
            lower,
            engine,
            mode,
            seq: 0.into(),
        }
    }

    fn kind(&self) -> Kind {
        match self.engine {
            Engine::Native(_) => Kind::Native,
            Engine::Gvisor(_) => Kind::Gvisor,
        }
    }

    fn backend(&self) -> &dyn Backend {
        match &self.engine {
            Engine::Native(b) => b,
            Engine::Gvisor(b) => b,
        }
    }

    /// The sprite's cgroup: the same `den/<id>` under both engines.
    fn cgroup(&self, id: &str) -> SpriteCgroup {
        SpriteCgroup::new(self.mode, id)
    }

    /// A spec with fresh upper/work dirs and a unique id.
    fn spec(&self, name: &str, script: &str) -> SpriteSpec {
        let n = self.seq.get() + 1;
        self.seq.set(n);
        let id = format!("t{}-{name}-{n}", std::process::id());
        let vol = self.dir.path().join("vol").join(&id);
        fs::create_dir_all(vol.join("upper")).unwrap();
        fs::create_dir_all(vol.join("work")).unwrap();
        SpriteSpec {
            id: id.clone(),
            rootfs_lower: self.lower.path.clone(),
            upper_dir: vol.join("upper"),
            work_dir: vol.join("work"),
            hostname: name.into(),
            idmap: IdMap::root_at(HOST_BASE, 65_536),
            netns_path: None,
            init: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            mounts: vec![],
            resources: Resources {
                memory_bytes: Some(256 << 20),
                pids: Some(256),
                ..Resources::default()
            },
            console_log: Some(vol.join("console.log")),
            agent_listener: None,
        }
    }

    /// Create and start in one step ([`Backend::run`], what den's boot uses);
    /// the separate `create` and `start` are exercised on their own below.
    fn run(&self, spec: &SpriteSpec) -> Result<Sprite<'_>, String> {
        let handle = self.backend().run(spec).map_err(e2s)?;
        Ok(Sprite {
            env: self,
            handle,
            upper: spec.upper_dir.clone(),
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.image.release_idmapped();
    }
}

/// Deletes the sprite when dropped (also when a test fails).
struct Sprite<'a> {
    env: &'a Env,
    handle: Handle,
    upper: PathBuf,
}

impl Sprite<'_> {
    fn backend(&self) -> &dyn Backend {
        self.env.backend()
    }

    /// Wait (bounded) for `name` to appear in the upper dir; return its text.
    fn wait_file(&self, name: &str, timeout: Duration) -> Result<String, String> {
        let p = self.upper.join(name);
        let t0 = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            if let Ok(s) = fs::read_to_string(&p) {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                let console =
                    fs::read_to_string(self.upper.parent().unwrap().join("console.log")).unwrap_or_default();
                return Err(format!(
                    "{} did not appear within {timeout:?}; console: {console}",
                    p.display()
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Result<i32, String> {
        self.backend()
            .pid(&self.handle)
            .map_err(e2s)?
            .ok_or_else(|| "PID 1 is not alive".to_string())
    }
}

impl Drop for Sprite<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.env.backend().delete(&self.handle) {
            eprintln!("cleanup of {} failed: {e}", self.handle.id);
        }
    }
}

fn poll<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let t0 = Instant::now();
    let mut pause = Duration::from_micros(200);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

const LONG: Duration = Duration::from_secs(30);
/// Keeps PID 1 alive after the script (busybox sleep accepts large numbers).
const STAY: &str = "exec sleep 1000000";

// ---------------------------------------------------------------- tests

fn lifecycle_and_persistence(env: &Env) -> TestResult {
    let spec = env.spec(
        "life",
        &format!("echo hello > /hello; id -u > /id.tmp; hostname >> /id.tmp; mv /id.tmp /id; {STAY}"),
    );
    let sprite = env.run(&spec)?;
    let id = sprite.wait_file("id", LONG)?;
    check!(id == "0\nlife\n", "id/hostname inside: {id:?}");
    check!(
        fs::read_to_string(spec.upper_dir.join("hello")).map_err(e2s)? == "hello\n",
        "hello in upper"
    );
    check!(
        sprite.backend().state(&sprite.handle).map_err(e2s)? == SpriteState::Running,
        "running"
    );

    // uid 0 inside is HOST_BASE outside.
    let pid = sprite.pid()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(e2s)?;
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string();
    check!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == HOST_BASE.to_string()),
        "host view of PID 1: {uid_line}"
    );
    let md = fs::metadata(spec.upper_dir.join("hello")).map_err(e2s)?;
    check!(
        md.uid() == HOST_BASE && md.gid() == HOST_BASE,
        "upper file owner {}:{}",
        md.uid(),
        md.gid()
    );

    // Cold stop: processes gone, the write stays in the upper dir.
    sprite
        .backend()
        .stop(&sprite.handle, Duration::ZERO)
        .map_err(e2s)?;
    check!(
        sprite.backend().state(&sprite.handle).map_err(e2s)? == SpriteState::Stopped,
        "stopped"
    );
    check!(
        sprite.backend().pid(&sprite.handle).map_err(e2s)?.is_none(),
        "no pid after stop"
    );
    check!(spec.upper_dir.join("hello").exists(), "upper kept after stop");
    drop(sprite);

    // Restart on the same upper (create again with the same id) sees it.
    let mut spec2 = spec.clone();
    spec2.init = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("cat /hello > /again.tmp; mv /again.tmp /again; {STAY}"),
    ];
    let sprite = env.run(&spec2)?;
    let again = sprite.wait_file("again", LONG)?;
    check!(again == "hello\n", "restart sees earlier write: {again:?}");
    // `open` finds it again (e.g. after den restarts).
    let h = sprite
        .backend()
        .open(&spec2.id)
        .map_err(e2s)?
        .ok_or("open found nothing")?;
    check!(h.pid == Some(sprite.pid()?), "open gives PID 1");
    Ok(())
}

fn isolation(env: &Env) -> TestResult {
    let marker = PathBuf::from(format!("/tmp/den-marker-{}", std::process::id()));
    fs::write(&marker, "host secret").map_err(e2s)?;
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(marker.clone());
    let script = format!(
        r#"{{
  echo "pids=$(ls /proc | grep '^[0-9][0-9]*$' | tr '\n' ' ')"
  echo "ps=$(ps -o pid | grep -c '[0-9]')"
  test -e {marker} && echo marker=visible || echo marker=hidden
  cat {marker} 2>/dev/null && echo markerread=ok || echo markerread=denied
  mknod /tmp/vda b 254 0 2>/dev/null && echo mknod=ok || echo mknod=denied
  echo "vdaread=$(head -c 16 /tmp/vda 2>/dev/null | wc -c)"
  mount -t ext4 /dev/vda /mnt 2>/dev/null && echo mountdev=ok || echo mountdev=denied
  mount -t tmpfs none /mnt 2>/dev/null && echo mounttmpfs=ok || echo mounttmpfs=denied
  (echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null && echo sysctl=ok || echo sysctl=denied
  (echo den > /proc/sys/kernel/hostname) 2>/dev/null && echo sysctlhost=ok || echo sysctlhost=denied
  echo junk > /tmp/m.ko
  insmod /tmp/m.ko 2>/dev/null && echo insmod=ok || echo insmod=denied
  unshare -m true 2>/dev/null && echo unshare=ok || echo unshare=denied
  echo "kcore=$(head -c 16 /proc/kcore 2>/dev/null | wc -c)"
  echo "devs=$(ls /dev | tr '\n' ' ')"
  grep -E '^(Seccomp|CapEff|CapBnd):' /proc/self/status | tr '\t' ' '
  echo "version=$(cat /proc/version)"
  echo "dmesgout=$(dmesg 2>&1 | head -n 2 | tr '\n' ' ')"
  dmesg 2>/dev/null | grep -q 'Starting gVisor' && echo dmesg=gvisor || echo dmesg=other
  echo end
}} > /res.tmp 2>&1; mv /res.tmp /res; {STAY}"#,
        marker = marker.display()
    );
    let spec = env.spec("iso", &script);
    let sprite = env.run(&spec)?;
    let res = sprite.wait_file("res", LONG)?;
    println!(
        "    sprite says:\n      {}",
        res.trim_end().replace('\n', "\n      ")
    );
    let kv = |k: &str| {
        res.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    // Only the sprite's own processes: PID 1, the script's subshells, ls.
    let pids: Vec<u32> = kv("pids")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    check!(pids.contains(&1), "PID 1 visible: {pids:?}");
    check!(
        pids.len() < 10 && pids.iter().all(|&p| p < 100),
        "only sprite pids: {pids:?}"
    );
    let host_pids = fs::read_dir("/proc").map_err(e2s)?.filter(|e| {
        e.as_ref().is_ok_and(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
    });
    check!(
        host_pids.count() > pids.len() + 10,
        "host has many more processes"
    );
    // gVisor lets root make device nodes, but in the sentry's own /tmp
    // (a tmpfs in the sandbox), where they reach no host device: reading one
    // gives nothing, as on native, where mknod itself is denied.
    let mknod = match env.kind() {
        Kind::Native => "denied",
        Kind::Gvisor => "ok",
    };
    for (k, v) in [
        ("marker", "hidden"),
        ("markerread", "denied"),
        ("mknod", mknod),
        ("vdaread", "0"),
        ("mountdev", "denied"),
        ("mounttmpfs", "denied"),
        ("sysctl", "denied"),
        ("sysctlhost", "denied"),
        ("insmod", "denied"),
        ("unshare", "denied"),
        ("kcore", "0"),
    ] {
        check!(kv(k) == v, "{k}: expected {v}, got {:?}", kv(k));
    }
    check!(res.contains("Seccomp: 2"), "seccomp filter active");
    // Docker's 14 capabilities = 0x00000000a80425fb. Under gVisor, runsc
    // drops NET_RAW (bit 13) unless started with --net-raw, and den adds
    // SYSLOG (bit 34) for the sentry's own kernel log: 0x00000004a80405fb.
    let caps = match env.kind() {
        Kind::Native => "00000000a80425fb",
        Kind::Gvisor => "00000004a80405fb",
    };
    check!(
        res.contains(&format!("CapEff: {caps}")),
        "Docker default capabilities"
    );
    check!(res.contains(&format!("CapBnd: {caps}")), "bounding set");
    let devs_line = kv("devs");
    let devs: Vec<&str> = devs_line.split_whitespace().collect();
    // gVisor adds its own fuse and net/tun: devices of the sentry, not the
    // host's.
    let extra: &[&str] = match env.kind() {
        Kind::Native => &[],
        Kind::Gvisor => &["fuse", "net"],
    };
    for d in &devs {
        check!(
            [
                "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue",
                "console", "fd", "stdin", "stdout", "stderr", "core"
            ]
            .contains(d)
                || extra.contains(d),
            "unexpected device /dev/{d} in {devs:?}"
        );
    }
    // Whose kernel answers: the host's, or gVisor's sentry (which reports
    // a fixed 4.4.0 and boots with its own kernel log).
    let host_release = fs::read_to_string("/proc/sys/kernel/osrelease").map_err(e2s)?;
    let version = kv("version");
    match env.kind() {
        Kind::Native => {
            check!(
                version.contains(host_release.trim()),
                "/proc/version is the host kernel's: {version:?}"
            );
            check!(kv("dmesg") == "other", "no gVisor kernel log on native");
        }
        Kind::Gvisor => {
            check!(
                version.starts_with("Linux version 4.4.0") && !version.contains(host_release.trim()),
                "/proc/version is gVisor's: {version:?}"
            );
            check!(kv("dmesg") == "gvisor", "dmesg shows gVisor's boot messages");
        }
    }
    check!(
        !devs.contains(&"vda") && devs.contains(&"null"),
        "devices: {devs:?}"
    );
    Ok(())
}

fn memory_limit(env: &Env) -> TestResult {
    let mut spec = env.spec(
        "mem",
        &format!(
            "head -c 300000000 /dev/zero | tail > /dev/null; echo rc=$? > /res.tmp; mv /res.tmp /res; {STAY}"
        ),
    );
    spec.resources.memory_bytes = Some(64 << 20);
    let sprite = env.run(&spec)?;
    match env.kind() {
        Kind::Native => {
            let res = sprite.wait_file("res", LONG)?;
            check!(res.trim() == "rc=137", "memory hog should be SIGKILLed: {res:?}");
        }
        // The sprite's memory is the sentry's (one memfd), so the host's
        // OOM killer can't pick the hog: it kills the sandbox, and the whole
        // sprite goes cold. The limit still holds, which is what matters to
        // the host.
        Kind::Gvisor => {
            poll(LONG, "the OOM-killed sandbox to be stopped", || {
                (sprite.backend().state(&sprite.handle).ok()? == SpriteState::Stopped).then_some(())
            })?;
            check!(
                !spec.upper_dir.join("res").exists(),
                "the hog's shell outlived the sandbox"
            );
        }
    }
    let cg = env.cgroup(&spec.id);
    let (limit, oom) = match cg.mode() {
        CgroupMode::V2 => (
            cg.read("memory", "memory.max").map_err(e2s)?,
            cg.read("memory", "memory.events").map_err(e2s)?,
        ),
        _ => (
            cg.read("memory", "memory.limit_in_bytes").map_err(e2s)?,
            cg.read("memory", "memory.oom_control").map_err(e2s)?,
        ),
    };
    check!(limit == (64u64 << 20).to_string(), "limit {limit}");
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    check!(kills >= 1, "oom_kill counter: {oom}");
    if env.kind() == Kind::Native {
        check!(sprite.pid().is_ok(), "PID 1 survives the OOM kill of the hog");
    }
    Ok(())
}

/// A live sprite's limits change in place (what a claimed pre-booted sprite
/// needs): the cgroup files say the new values. (That the kernel enforces
/// a memory limit is `memory_limit`'s test.)
fn update_limits(env: &Env) -> TestResult {
    let mut spec = env.spec("upd", STAY);
    spec.resources.memory_bytes = Some(1 << 30);
    spec.resources.pids = Some(512);
    let sprite = env.run(&spec)?;
    let mut limits = spec.resources;
    limits.memory_bytes = Some(64 << 20);
    limits.pids = Some(100);
    sprite
        .backend()
        .update_resources(&sprite.handle, &limits)
        .map_err(e2s)?;
    let cg = env.cgroup(&spec.id);
    let limit = match cg.mode() {
        CgroupMode::V2 => cg.read("memory", "memory.max").map_err(e2s)?,
        _ => cg.read("memory", "memory.limit_in_bytes").map_err(e2s)?,
    };
    check!(
        limit == (64u64 << 20).to_string(),
        "memory limit after the update: {limit}"
    );
    let pids = cg.read("pids", "pids.max").map_err(e2s)?;
    check!(pids == "100", "pids.max after the update: {pids}");
    check!(sprite.pid().is_ok(), "PID 1 lives on under the new limits");
    Ok(())
}

fn pids_limit(env: &Env) -> TestResult {
    let mut spec = env.spec("pids", &format!("f() {{ f | f & }}; f; {STAY}"));
    spec.resources.pids = Some(32);
    let sprite = env.run(&spec)?;
    let cg = env.cgroup(&spec.id);
    // The bomb has hit the limit once fork failures are counted.
    poll(LONG, "pids.events max > 0", || {
        let ev = cg.read("pids", "pids.events").ok()?;
        let n: u64 = ev
            .lines()
            .find_map(|l| l.strip_prefix("max "))?
            .trim()
            .parse()
            .ok()?;
        (n > 0).then_some(())
    })?;
    let current: u64 = cg
        .read("pids", "pids.current")
        .map_err(e2s)?
        .parse()
        .map_err(e2s)?;
    check!(current <= 32, "pids.current {current} > 32");
    // The host can still fork and exec promptly.
    let t0 = Instant::now();
    for _ in 0..5 {
        let ok = Command::new("/bin/true").status().map_err(e2s)?.success();
        check!(ok, "/bin/true on the host");
    }
    let host = t0.elapsed();
    check!(host < Duration::from_secs(5), "host fork+exec x5 took {host:?}");
    let t0 = Instant::now();
    sprite
        .backend()
        .stop(&sprite.handle, Duration::ZERO)
        .map_err(e2s)?;
    println!(
        "    host fork+exec x5 during the bomb: {host:?}; stopping the bomb: {:?}",
        t0.elapsed()
    );
    check!(cg.procs().map_err(e2s)?.is_empty(), "bomb killed");
    Ok(())
}

fn counter_script() -> String {
    format!("i=0; while true; do i=$((i+1)); echo $i > /c.tmp; mv /c.tmp /counter; usleep 2000; done; {STAY}")
}

fn read_counter(upper: &Path) -> Option<u64> {
    fs::read_to_string(upper.join("counter"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn freeze_thaw(env: &Env) -> TestResult {
    let spec = env.spec("frz", &counter_script());
    let sprite = env.run(&spec)?;
    let b = sprite.backend();
    let c0 = poll(LONG, "counter to start", || read_counter(&spec.upper_dir))?;
    poll(LONG, "counter to advance", || {
        read_counter(&spec.upper_dir).filter(|&c| c > c0)
    })?;
    b.freeze(&sprite.handle).map_err(e2s)?;
    check!(
        b.state(&sprite.handle).map_err(e2s)? == SpriteState::Frozen,
        "frozen state"
    );
    let c1 = read_counter(&spec.upper_dir).ok_or("counter")?;
    // Observation window, not synchronisation: a running loop advances every
    // ~2 ms, so 300 ms without change means it is stopped.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300) {
        let c = read_counter(&spec.upper_dir).ok_or("counter")?;
        check!(c == c1, "counter advanced while frozen: {c1} -> {c}");
        std::thread::sleep(Duration::from_millis(10));
    }
    b.thaw(&sprite.handle).map_err(e2s)?;
    check!(
        b.state(&sprite.handle).map_err(e2s)? == SpriteState::Running,
        "running after thaw"
    );
    poll(LONG, "counter to advance after thaw", || {
        read_counter(&spec.upper_dir).filter(|&c| c > c1)
    })?;
    // Thaw is idempotent, and stop works on a frozen sprite.
    b.thaw(&sprite.handle).map_err(e2s)?;
    b.freeze(&sprite.handle).map_err(e2s)?;
    b.stop(&sprite.handle, Duration::ZERO).map_err(e2s)?;
    check!(
        b.state(&sprite.handle).map_err(e2s)? == SpriteState::Stopped,
        "stopped from frozen"
    );
    Ok(())
}

fn cgroup_detection(env: &Env) -> TestResult {
    let mode = cgroup::detect().map_err(e2s)?;
    println!("    cgroup mode: {mode:?}");
    check!(mode == env.mode, "backend agrees");
    let mut spec = env.spec("cg", STAY);
    spec.resources.cpu = CpuLimit {
        shares: Some(512),
        quota_us: Some(50_000),
        period_us: Some(100_000),
    };
    let sprite = env.run(&spec)?;
    let cg = env.cgroup(&spec.id);
    let pid = sprite.pid()?;
    check!(cg.procs().map_err(e2s)?.contains(&pid), "PID 1 in den/<id>");
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(e2s)?;
    check!(own.contains(&format!("/den/{}", spec.id)), "PID 1 cgroups: {own}");
    match mode {
        CgroupMode::V2 => {
            let max = cg.read("cpu", "cpu.max").map_err(e2s)?;
            check!(max == "50000 100000", "cpu.max {max}");
        }
        _ => {
            let quota = cg.read("cpu", "cpu.cfs_quota_us").map_err(e2s)?;
            let shares = cg.read("cpu", "cpu.shares").map_err(e2s)?;
            check!(
                quota == "50000" && shares == "512",
                "cpu quota {quota} shares {shares}"
            );
        }
    }
    let pids = cg.read("pids", "pids.max").map_err(e2s)?;
    check!(pids == "256", "pids.max {pids}");
    Ok(())
}

/// Bind mounts (the agent's socket dir read-write, a file read-only) and
/// joining a prepared network namespace.
fn mounts_and_netns(env: &Env) -> TestResult {
    let host_dir = env.dir.path().join(format!("run-{}", env.seq.get()));
    fs::create_dir_all(&host_dir).map_err(e2s)?;
    // Writable by the sprite's root (host uid HOST_BASE).
    std::os::unix::fs::chown(&host_dir, Some(HOST_BASE), Some(HOST_BASE)).map_err(e2s)?;
    let ro_file = env.dir.path().join("agent-binary");
    fs::write(&ro_file, "#!/bin/sh\n").map_err(e2s)?;
    fs::set_permissions(&ro_file, fs::Permissions::from_mode(0o755)).map_err(e2s)?;

    let netns = format!("den-test-{}", std::process::id());
    let st = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .map_err(e2s)?;
    check!(st.success(), "ip netns add");
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = DelNs(netns.clone());
    // A veth pair that exists only in that netns shows we joined it.
    let st = Command::new("ip")
        .args([
            "-n", &netns, "link", "add", "den0", "type", "veth", "peer", "name", "den1",
        ])
        .status()
        .map_err(e2s)?;
    check!(st.success(), "add dummy link");
    // Up and addressed, as the network module leaves a sprite's netns:
    // gVisor's netstack takes over only interfaces that are up.
    for args in [
        &["addr", "add", "10.201.0.1/30", "dev", "den0"][..],
        &["addr", "add", "10.201.0.2/30", "dev", "den1"],
        &["link", "set", "den0", "up"],
        &["link", "set", "den1", "up"],
        &["link", "set", "lo", "up"],
    ] {
        let st = Command::new("ip")
            .args(["-n", &netns])
            .args(args)
            .status()
            .map_err(e2s)?;
        check!(st.success(), "ip {args:?}");
    }

    let mut spec = env.spec(
        "mnt",
        &format!(
            "{{ echo hi > /.sprite/run/from-sprite && echo rw=ok || echo rw=fail
  echo x > /.sprite/bin/den 2>/dev/null && echo ro=writable || echo ro=readonly
  echo sysnet=$(ls /sys/class/net)
  echo procnet=$(tail -n +3 /proc/net/dev | cut -d: -f1)
  echo iplink=$(ip -o link | cut -d: -f2 | cut -d@ -f1)
  echo addrs=$(ip -o -4 addr | grep -o '10.201.0.[0-9]*/30' | sort)
}} > /res.tmp 2>&1; mv /res.tmp /res; {STAY}"
        ),
    );
    spec.mounts = vec![
        BindMount {
            source: host_dir.clone(),
            destination: "/.sprite/run".into(),
            readonly: false,
        },
        BindMount {
            source: ro_file,
            destination: "/.sprite/bin/den".into(),
            readonly: true,
        },
    ];
    spec.netns_path = Some(PathBuf::from(format!("/run/netns/{netns}")));
    let sprite = env.run(&spec)?;
    let res = sprite.wait_file("res", LONG)?;
    println!(
        "    sprite says:\n      {}",
        res.trim_end().replace('\n', "\n      ")
    );
    check!(
        res.contains("rw=ok") && res.contains("ro=readonly"),
        "bind mounts: {res:?}"
    );
    // gVisor's sysfs has no /sys/class/net (its interfaces live in the
    // sentry's netstack); what the sprite sees there is /proc/net/dev and
    // netlink.
    let keys: &[&str] = match env.kind() {
        Kind::Native => &["sysnet=", "procnet=", "iplink="],
        Kind::Gvisor => &["procnet=", "iplink="],
    };
    check!(
        res.contains("addrs=10.201.0.1/30 10.201.0.2/30"),
        "the netns's addresses: {res:?}"
    );
    for k in keys {
        let line = res.lines().find(|l| l.starts_with(k)).unwrap_or_default();
        let mut ifs: Vec<&str> = line[k.len().min(line.len())..].split_whitespace().collect();
        ifs.sort();
        check!(ifs == ["den0", "den1", "lo"], "{k} joined netns only: {ifs:?}");
    }
    check!(
        fs::read_to_string(host_dir.join("from-sprite")).map_err(e2s)? == "hi\n",
        "sprite's write visible on the host"
    );
    Ok(())
}

/// Cold stop with a grace period: PID 1 that handles SIGTERM gets to finish
/// (the den agent stops services there), and stop returns when it exits,
/// not when the grace period ends.
fn graceful_stop(env: &Env) -> TestResult {
    let spec = env.spec(
        "term",
        "trap 'echo bye > /bye.tmp; mv /bye.tmp /bye; exit 0' TERM; echo > /up.tmp; mv /up.tmp /up; \
         while true; do sleep 1000 & wait; done",
    );
    let sprite = env.run(&spec)?;
    sprite.wait_file("up", LONG)?;
    let t0 = Instant::now();
    sprite
        .backend()
        .stop(&sprite.handle, Duration::from_secs(20))
        .map_err(e2s)?;
    let took = t0.elapsed();
    check!(
        took < Duration::from_secs(10),
        "stop waited for the grace period: {took:?}"
    );
    check!(
        spec.upper_dir.join("bye").exists(),
        "PID 1 ran its SIGTERM handler"
    );
    check!(
        sprite.backend().state(&sprite.handle).map_err(e2s)? == SpriteState::Stopped,
        "stopped"
    );
    Ok(())
}

/// Delete of a created-but-never-started sprite, and a failed create, leave
/// no cgroup, engine state or bundle behind.
fn cleanup_paths(env: &Env) -> TestResult {
    let leftovers = |id: &str| -> Vec<PathBuf> {
        let cg = env.cgroup(id);
        let state = env.dir.path().join("state");
        let mut left: Vec<PathBuf> = [
            cg.dir("freezer"),
            cg.dir("memory"),
            cg.dir("pids"),
            cg.dir("cpu"),
            state.join("engine").join(id),
            state.join("bundles").join(id),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
        // runsc's state files (`<id>_sandbox:<id>.state`, and its lock).
        if let Ok(rd) = fs::read_dir(state.join("runsc")) {
            left.extend(
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().contains(id))
                    .map(|e| e.path()),
            );
        }
        left
    };
    let spec = env.spec("created", STAY);
    let handle = env.backend().create(&spec).map_err(e2s)?;
    let guard = Sprite {
        env,
        handle: handle.clone(),
        upper: spec.upper_dir.clone(),
    };
    check!(
        env.backend().state(&handle).map_err(e2s)? == SpriteState::Created,
        "created state"
    );
    let pid = handle.pid.ok_or("pid after create")?;
    check!(
        env.backend().pid(&handle).map_err(e2s)? == Some(pid),
        "PID 1 waits for start"
    );
    env.backend().delete(&handle).map_err(e2s)?;
    drop(guard); // a second delete is harmless
    check!(
        leftovers(&spec.id).is_empty(),
        "left over: {:?}",
        leftovers(&spec.id)
    );
    check!(
        env.backend().open(&spec.id).map_err(e2s)?.is_none(),
        "open after delete"
    );

    // PID 1 that does not exist: the shim fails after the cgroups were made.
    let mut bad = env.spec("badinit", "");
    bad.init = vec!["/no/such/init".into()];
    let res = env.backend().create(&bad);
    if let Ok(h) = &res {
        // libcontainer may only notice at exec (start) time.
        let _guard = Sprite {
            env,
            handle: h.clone(),
            upper: bad.upper_dir.clone(),
        };
        check!(
            env.backend().start(h).is_err() || env.backend().pid(h).map_err(e2s)?.is_none(),
            "bad init runs"
        );
    }
    check!(
        leftovers(&bad.id).is_empty(),
        "left over after failure: {:?}",
        leftovers(&bad.id)
    );

    // Invalid specs are refused before anything is made.
    let mut ident = env.spec("ident", STAY);
    ident.idmap = IdMap::identity();
    check!(env.backend().create(&ident).is_err(), "identity map refused");
    check!(
        leftovers(&ident.id).is_empty(),
        "nothing made for an invalid spec"
    );
    Ok(())
}

/// A live sprite's hostname changes in place (what a claimed pre-booted
/// sprite needs when it gets its name).
fn set_hostname(env: &Env) -> TestResult {
    let spec = env.spec(
        "hn",
        &format!("while true; do hostname > /hn.tmp; mv /hn.tmp /hn; usleep 2000; done; {STAY}"),
    );
    let sprite = env.run(&spec)?;
    let first = sprite.wait_file("hn", LONG)?;
    check!(first.trim() == "hn", "hostname at create: {first:?}");
    sprite
        .backend()
        .set_hostname(&sprite.handle, "renamed-sprite")
        .map_err(e2s)?;
    poll(LONG, "the new hostname inside", || {
        fs::read_to_string(spec.upper_dir.join("hn"))
            .ok()
            .filter(|s| s.trim() == "renamed-sprite")
    })?;
    check!(
        sprite.backend().set_hostname(&sprite.handle, "").is_err(),
        "empty hostname refused"
    );
    Ok(())
}

/// A static program for the sprite (busybox has no unix-socket tool):
/// `listen fd` accepts one connection on descriptor 3, `listen PATH` binds
/// and listens at PATH first; either answers "ok\n".
fn listener_program(env: &Env) -> Result<PathBuf, String> {
    let dir = env.dir.path().join("listen-prog");
    let bin = dir.join("listen");
    if bin.exists() {
        return Ok(bin);
    }
    fs::create_dir_all(&dir).map_err(e2s)?;
    let src = dir.join("listen.c");
    fs::write(
        &src,
        r#"#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = 3;
    if (argc != 2) return 2;
    if (strcmp(argv[1], "fd") != 0) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
        s = socket(AF_UNIX, SOCK_STREAM, 0);
        unlink(argv[1]);
        if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4)) return 3;
    }
    int c = accept(s, 0, 0);
    if (c < 0) return 4;
    return write(c, "ok\n", 3) == 3 ? 0 : 5;
}
"#,
    )
    .map_err(e2s)?;
    // Rust's own linker driver, so present wherever this test was built.
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("cc: {e}"))?;
    check!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(bin)
}

/// The agent's socket, as the host reaches it. Native: the shim binds it on
/// the host and PID 1 accepts on descriptor 3 ([`SpriteSpec::agent_listener`]).
/// gVisor can't hand a listener over (`accept` on a donated socket fails
/// with EINVAL in this runsc), so that backend refuses `agent_listener`, and
/// the sprite binds the socket in a bind-mounted directory instead:
/// `--host-uds=create` makes it a real host socket the host connects to.
fn agent_socket(env: &Env) -> TestResult {
    let prog = listener_program(env)?;
    let host_dir = env.dir.path().join(format!("agent-{}", env.seq.get()));
    fs::create_dir_all(&host_dir).map_err(e2s)?;
    std::os::unix::fs::chown(&host_dir, Some(HOST_BASE), Some(HOST_BASE)).map_err(e2s)?;
    let sock = host_dir.join("agent.sock");
    let mut spec = env.spec("agent", "");
    spec.mounts = vec![BindMount {
        source: prog,
        destination: "/.sprite/bin/listen".into(),
        readonly: true,
    }];
    match env.kind() {
        Kind::Native => {
            spec.agent_listener = Some(sock.clone());
            spec.init = vec!["/.sprite/bin/listen".into(), "fd".into()];
        }
        Kind::Gvisor => {
            let mut refused = spec.clone();
            refused.agent_listener = Some(sock.clone());
            check!(
                matches!(env.backend().create(&refused), Err(RuntimeError::InvalidSpec(_))),
                "gVisor refuses agent_listener"
            );
            spec.mounts.push(BindMount {
                source: host_dir.clone(),
                destination: "/.sprite/run".into(),
                readonly: false,
            });
            spec.init = vec!["/.sprite/bin/listen".into(), "/.sprite/run/agent.sock".into()];
        }
    }
    let _sprite = env.run(&spec)?;
    let mut conn = poll(LONG, "the agent socket to accept", || {
        UnixStream::connect(&sock).ok()
    })?;
    conn.set_read_timeout(Some(LONG)).map_err(e2s)?;
    let mut got = String::new();
    conn.read_to_string(&mut got).map_err(e2s)?;
    check!(got == "ok\n", "answer through the agent socket: {got:?}");
    Ok(())
}

/// gVisor only (see `main`): memory checkpoint and restore. The counter
/// loop goes on from where it was (not from 1), so the processes' memory
/// came back.
fn checkpoint_restore(env: &Env) -> TestResult {
    let Engine::Gvisor(gv) = &env.engine else {
        return Err("checkpoint_restore needs the gVisor backend".into());
    };
    let spec = env.spec("ckpt", &counter_script());
    let sprite = env.run(&spec)?;
    let c0 = poll(LONG, "counter to pass 20", || {
        read_counter(&spec.upper_dir).filter(|&c| c > 20)
    })?;
    let images = spec.upper_dir.parent().unwrap().join("ckpt-image");
    let t0 = Instant::now();
    gv.checkpoint(&sprite.handle, &images).map_err(e2s)?;
    let took_ckpt = t0.elapsed();
    check!(
        gv.state(&sprite.handle).map_err(e2s)? == SpriteState::Stopped,
        "stopped after checkpoint"
    );
    let c1 = read_counter(&spec.upper_dir).ok_or("counter")?;
    check!(c1 >= c0, "counter {c1} < {c0}");
    let t0 = Instant::now();
    let handle = gv.restore(&spec.id, &images).map_err(e2s)?;
    let took_restore = t0.elapsed();
    let sprite = Sprite {
        env,
        handle,
        upper: spec.upper_dir.clone(),
    };
    check!(
        gv.state(&sprite.handle).map_err(e2s)? == SpriteState::Running,
        "running after restore"
    );
    let c2 = poll(LONG, "counter to advance after restore", || {
        read_counter(&spec.upper_dir).filter(|&c| c > c1)
    })?;
    // A fresh start would count from 1 again.
    check!(c2 > c1, "counter continued: {c1} -> {c2}");
    println!(
        "    checkpoint {} (image {} bytes), restore {}; counter {c1} -> {c2}",
        ms(took_ckpt),
        dir_size(&images),
        ms(took_restore)
    );

    // A checkpoint that leaves the sprite running, taken while it is paused
    // (as den takes one together with the disk): it stays paused until
    // thawed, then counts on.
    let b = sprite.backend();
    b.freeze(&sprite.handle).map_err(e2s)?;
    let c3 = read_counter(&spec.upper_dir).ok_or("counter")?;
    let running_images = spec.upper_dir.parent().unwrap().join("ckpt-image-running");
    let t0 = Instant::now();
    gv.checkpoint_running(&sprite.handle, &running_images)
        .map_err(e2s)?;
    let took_running = t0.elapsed();
    check!(
        b.state(&sprite.handle).map_err(e2s)? == SpriteState::Frozen,
        "still paused after a checkpoint that leaves it running"
    );
    // The disk as it was at that instant, as den keeps it (a disk
    // checkpoint taken while paused): a restore reopens the files the
    // processes held, and the loop may have held `/c.tmp`, which the
    // running counter then moves away.
    let upper_at_ckpt = spec.upper_dir.parent().unwrap().join("upper-at-ckpt");
    copy_tree(&spec.upper_dir, &upper_at_ckpt)?;
    b.thaw(&sprite.handle).map_err(e2s)?;
    let c4 = poll(LONG, "counter to advance after the running checkpoint", || {
        read_counter(&spec.upper_dir).filter(|&c| c > c3 + 20)
    })?;
    // Gone entirely (bundle and all, as after a den restart), then back from
    // that image on a bundle made afresh: it counts on from c3, not from c4.
    b.delete(&sprite.handle).map_err(e2s)?;
    let c5 = read_counter(&spec.upper_dir).ok_or("counter")?;
    fs::remove_dir_all(&spec.upper_dir).map_err(e2s)?;
    copy_tree(&upper_at_ckpt, &spec.upper_dir)?;
    let t0 = Instant::now();
    let handle = gv.restore_spec(&spec, &running_images).map_err(e2s)?;
    let took_fresh = t0.elapsed();
    let sprite = Sprite {
        env,
        handle,
        upper: spec.upper_dir.clone(),
    };
    let c6 = poll(LONG, "the restored counter to count from the checkpoint", || {
        read_counter(&spec.upper_dir).filter(|&c| c > c3 && c < c5)
    })?;
    drop(sprite);
    println!(
        "    running checkpoint {} (image {} bytes), restore on a fresh bundle {}; counter {c3} -> {c4}, {c5} -> {c6}",
        ms(took_running),
        dir_size(&running_images),
        ms(took_fresh)
    );
    Ok(())
}

/// `cp -a`: modes, owners and overlay whiteouts included.
fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(e2s)?;
    if !out.status.success() {
        return Err(format!("cp -a: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- bench

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A FIFO opened read-write, so `read` blocks until the sprite writes (a
/// read-only FIFO without a writer would return EOF at once).
fn fifo(path: &Path) -> Result<File, String> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(e2s)?;
    OpenOptions::new().read(true).write(true).open(path).map_err(e2s)
}

fn bench(env: &Env) -> TestResult {
    const N: usize = 20;
    let mut first_output = Vec::new();
    let mut create_only = Vec::new();
    for i in 0..N {
        let mut spec = env.spec("bench", "");
        spec.init = vec!["/bin/echo".into(), "hi".into()];
        let fifo_path = spec.upper_dir.parent().unwrap().join(format!("out{i}.fifo"));
        let mut out = fifo(&fifo_path)?;
        spec.console_log = Some(fifo_path);
        let t0 = Instant::now();
        let handle = env.backend().create(&spec).map_err(e2s)?;
        let sprite = Sprite {
            env,
            handle,
            upper: spec.upper_dir.clone(),
        };
        let t1 = Instant::now();
        env.backend().start(&sprite.handle).map_err(e2s)?;
        let mut b = [0u8; 1];
        out.read_exact(&mut b).map_err(e2s)?;
        first_output.push(t0.elapsed());
        create_only.push(t1 - t0);
        check!(b[0] == b'h', "output {b:?}");
    }

    // Freeze/thaw latency on a running sprite.
    let spec = env.spec("bfrz", &counter_script());
    let sprite = env.run(&spec)?;
    poll(LONG, "counter", || read_counter(&spec.upper_dir))?;
    let (mut fr, mut th) = (Vec::new(), Vec::new());
    for _ in 0..N {
        let t0 = Instant::now();
        env.backend().freeze(&sprite.handle).map_err(e2s)?;
        let t1 = Instant::now();
        env.backend().thaw(&sprite.handle).map_err(e2s)?;
        fr.push(t1 - t0);
        th.push(t1.elapsed());
    }
    drop(sprite);

    // fork+exec inside the sprite (what every command the agent runs pays):
    // EXECS runs of /bin/true, timed by the sprite's own clock, per round
    // (few rounds: under gVisor one round takes seconds).
    const EXECS: usize = 200;
    const ROUNDS: usize = 5;
    let spec = env.spec(
        "bexec",
        &format!(
            "r=0; while [ $r -lt {ROUNDS} ]; do t0=$(cat /proc/uptime); i=0; \
             while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done; \
             echo \"$t0 $(cat /proc/uptime)\" >> /exec.tmp; r=$((r+1)); done; mv /exec.tmp /exec; {STAY}"
        ),
    );
    let sprite = env.run(&spec)?;
    let text = sprite.wait_file("exec", Duration::from_secs(300))?;
    drop(sprite);
    let mut per_exec: Vec<Duration> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            // "<uptime> <idle> <uptime> <idle>"
            (v.len() == 4).then(|| Duration::from_secs_f64((v[2] - v[0]).max(0.0) / EXECS as f64))
        })
        .collect();
    check!(per_exec.len() == ROUNDS, "exec rounds: {text:?}");

    // The runc baseline is the same for both backends: measured once.
    let runc = match env.kind() {
        Kind::Native => runc_baseline(env, N)?,
        Kind::Gvisor => None,
    };
    let name = env.backend().name();
    println!("    BENCH {name} (median of {N}; 2 loaded cores, expect ±30 %):");
    println!(
        "      create                          : {}",
        ms(median(&mut create_only))
    );
    println!(
        "      create+start → first output     : {}",
        ms(median(&mut first_output))
    );
    println!("      freeze                          : {}", ms(median(&mut fr)));
    println!("      thaw                            : {}", ms(median(&mut th)));
    println!(
        "      fork+exec of /bin/true inside   : {:.2} ms (median of {ROUNDS} rounds of {EXECS})",
        median(&mut per_exec).as_secs_f64() * 1000.0
    );
    match runc {
        Some((mut run, mut pause, mut resume)) => {
            println!(
                "      runc run → output (no userns/overlay): {}",
                ms(median(&mut run))
            );
            println!(
                "      runc pause                           : {}",
                ms(median(&mut pause))
            );
            println!(
                "      runc resume                          : {}",
                ms(median(&mut resume))
            );
        }
        None if env.kind() == Kind::Gvisor => println!("      runc: see native::bench"),
        None => println!("      runc: not installed, no baseline"),
    }
    Ok(())
}

type RuncTimes = Option<(Vec<Duration>, Vec<Duration>, Vec<Duration>)>;

/// `runc run` of the same busybox rootfs (plain, read-only, runc's default
/// spec: no user namespace, no overlay) printing one line.
fn runc_baseline(env: &Env, n: usize) -> Result<RuncTimes, String> {
    if Command::new("runc").arg("--version").output().is_err() {
        return Ok(None);
    }
    let dir = env.dir.path().join("runc");
    let bundle = dir.join("bundle");
    let state = dir.join("state");
    fs::create_dir_all(&bundle).map_err(e2s)?;
    let st = Command::new("runc")
        .arg("spec")
        .arg("--bundle")
        .arg(&bundle)
        .status()
        .map_err(e2s)?;
    check!(st.success(), "runc spec");
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(&cfg_path).map_err(e2s)?).map_err(e2s)?;
    cfg["root"]["path"] = env.image.rootfs().to_string_lossy().into_owned().into();
    cfg["root"]["readonly"] = true.into();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!(["/bin/echo", "hi"]);
    fs::write(&cfg_path, serde_json::to_vec(&cfg).map_err(e2s)?).map_err(e2s)?;
    let mut run = Vec::new();
    for i in 0..n {
        let id = format!("den-bench-{}-{i}", std::process::id());
        let t0 = Instant::now();
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(e2s)?;
        let mut b = [0u8; 1];
        child.stdout.take().unwrap().read_exact(&mut b).map_err(e2s)?;
        run.push(t0.elapsed());
        child.wait().map_err(e2s)?;
    }
    // pause/resume of a running runc container.
    cfg["process"]["args"] = serde_json::json!(["/bin/sleep", "1000000"]);
    fs::write(&cfg_path, serde_json::to_vec(&cfg).map_err(e2s)?).map_err(e2s)?;
    let id = format!("den-bench-{}-p", std::process::id());
    let runc = |args: &[&str]| -> Result<(), String> {
        let st = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(e2s)?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("runc {args:?}: {st}"))
        }
    };
    let bundle_s = bundle.to_string_lossy().into_owned();
    runc(&["run", "-d", "--bundle", &bundle_s, &id])?;
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    let res = (|| {
        for _ in 0..n {
            let t0 = Instant::now();
            runc(&["pause", &id])?;
            let t1 = Instant::now();
            runc(&["resume", &id])?;
            pause.push(t1 - t0);
            resume.push(t1.elapsed());
        }
        Ok::<(), String>(())
    })();
    let _ = runc(&["delete", "--force", &id]);
    res?;
    Ok(Some((run, pause, resume)))
}

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == SHIM_ARG) {
        std::process::exit(shim_main(&args[2..]));
    }
    assert!(nix::unistd::geteuid().is_root(), "the container tests need root");
    let tests: &[(&str, TestFn)] = &[
        ("cgroup_detection", cgroup_detection),
        ("lifecycle_and_persistence", lifecycle_and_persistence),
        ("isolation", isolation),
        ("mounts_and_netns", mounts_and_netns),
        ("memory_limit", memory_limit),
        ("pids_limit", pids_limit),
        ("update_limits", update_limits),
        ("set_hostname", set_hostname),
        ("agent_socket", agent_socket),
        ("freeze_thaw", freeze_thaw),
        ("graceful_stop", graceful_stop),
        ("cleanup_paths", cleanup_paths),
        ("checkpoint_restore", checkpoint_restore),
        ("bench", bench),
    ];
    // One suite, two backends: `native::NAME` and `gvisor::NAME`, so a
    // filter can pick a backend, a test, or one test on one backend.
    let names: Vec<(String, Kind, TestFn)> = [(Kind::Native, "native"), (Kind::Gvisor, "gvisor")]
        .into_iter()
        .flat_map(|(kind, prefix)| {
            tests
                .iter()
                .map(move |&(n, t)| (format!("{prefix}::{n}"), kind, t))
        })
        // Memory checkpoint/restore is a gVisor feature (CRIU, which the
        // native backend would need, does not work on this kernel).
        .filter(|(n, kind, _)| !(*kind == Kind::Native && n.ends_with("::checkpoint_restore")))
        .collect();
    let selected: Vec<(&str, (Kind, TestFn))> =
        names.iter().map(|(n, k, t)| (n.as_str(), (*k, *t))).collect();
    // Each backend's environment (state root, image) is made on first use.
    let native = std::cell::OnceCell::new();
    let gvisor = std::cell::OnceCell::new();
    let ok = den_testkit::runner::run_named(&selected, |&(kind, t)| {
        let env = match kind {
            Kind::Native => native.get_or_init(|| Env::new(Kind::Native)),
            Kind::Gvisor => gvisor.get_or_init(|| Env::new(Kind::Gvisor)),
        };
        t(env).map_err(anyhow::Error::msg)
    });
    drop((native, gvisor));
    if !ok {
        std::process::exit(1);
    }
}
