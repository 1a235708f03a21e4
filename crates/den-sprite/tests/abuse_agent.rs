//! Abuse from inside a sprite aimed at its agent (PID 1) and at the host
//! side that talks to it, and a den killed under its sprites.
//!
//! The test binary doubles as the `den` binary inside the sprites (the
//! manager runs it as `runtime-shim` and as `agent`), and as the attacker:
//! it is reachable in every sprite at `/.sprite/bin/den`, so the attacks run
//! as real processes of the sprite's root (`abuse-*` subcommands, see `main`).

use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_runtime::Runtime;
use den_sprite::{CreateSprite, ManagerConfig, SpriteManager};
use den_testkit::net::TestNet;

mod common;

use common::*;

struct Env {
    runtime: Runtime,
    managers: Managers,
    dir: tempfile::TempDir,
    net: TestNet,
}

impl Env {
    /// Sprites on `runtime`.
    fn new(runtime: Runtime) -> Result<Env> {
        let dir = traversable_tempdir("den-abuse-agent-")?;
        Ok(Env {
            runtime,
            managers: Default::default(),
            net: TestNet::new()?,
            dir,
        })
    }

    fn config(&self) -> ManagerConfig {
        let mut cfg = test_config(
            self.dir.path(),
            &self.dir.path().join("images"),
            self.net.config.clone(),
        );
        cfg.runtime = self.runtime;
        cfg
    }

    async fn start(&self, cfg: ManagerConfig) -> Result<SpriteManager> {
        let mgr = start_at(cfg, self.dir.path()).await?;
        self.managers.add(&mgr);
        Ok(mgr)
    }
}

/// The sprite's own name, as its kernel reports it: which sprite answered.
async fn who_answers(mgr: &SpriteManager, name: &str) -> Result<String> {
    let out = exec(mgr, name, sh_req("cat /proc/sys/kernel/hostname")).await?;
    ensure!(out.code == 0, "hostname failed: {}{}", out.stdout, out.stderr);
    Ok(out.stdout.trim().to_string())
}

/// Unix sockets below `dir` on the host.
fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_socket() {
            out.push(e.path());
        } else if ft.is_dir() {
            out.extend(sockets_under(&e.path()));
        }
    }
    out
}

/// The host process that is the sprite's PID 1: the agent natively; under
/// gVisor the sandbox (the sentry), in which every sprite process is a task
/// the host never sees.
fn host_pid1(key: &str) -> Result<i32> {
    let cg = den_runtime::cgroup::SpriteCgroup::new(den_runtime::cgroup::detect()?, key);
    let cmdline = |pid: i32| std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cg.procs()?
        .into_iter()
        .find(|pid| {
            let sandbox = cmdline(*pid).starts_with(b"runsc-sandbox\0");
            let pid1 = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .is_some_and(|l| l.split_whitespace().last() == Some("1"))
            });
            sandbox || (pid1 && !cmdline(*pid).starts_with(b"runsc-"))
        })
        .context("the sprite has no PID 1")
}

// ------------------------------------------------------------------ tests

/// Sprite A's root points A's agent socket path at sprite B's socket (the
/// host path of B's socket, found on the host), then replaces it with a
/// listener of its own. Requests for A must still be served by A's agent.
async fn abuse_agent_socket_swap_is_never_followed(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("sa", CreateSprite::default()).await?;
    mgr.create("sb", CreateSprite::default()).await?;
    ensure!(who_answers(&mgr, "sb").await? == "sb");
    let key_b = mgr.get("sb")?.record.key;
    let b_sockets = sockets_under(&env.dir.path().join("run/s").join(&key_b));
    ensure!(!b_sockets.is_empty(), "found no socket of sprite B on the host");

    for b in &b_sockets {
        let out = root_sh(
            &mgr,
            "sa",
            &format!(
                "mkdir -p /.sprite/run && ln -sfn {} /.sprite/run/agent.sock && echo linked",
                b.display()
            ),
        )
        .await?;
        ensure!(out.stdout.contains("linked"), "{}{}", out.stdout, out.stderr);
        let who = who_answers(&mgr, "sa").await;
        ensure!(
            matches!(&who, Ok(w) if w == "sa"),
            "after A linked its socket to B's ({}), A's exec was answered by {who:?}",
            b.display()
        );
        let listing = mgr
            .wake("sa")
            .await?
            .agent()
            .fs_list("/proc/sys/kernel", None, false)
            .await;
        ensure!(
            listing.is_ok(),
            "the fs API of A failed after the swap: {listing:?}"
        );
    }

    // Replace the socket file with a listener of the sprite's own.
    let act = mgr.wake("sa").await?;
    let mut fake = sh_req(&format!(
        "rm -f /.sprite/run/agent.sock; {}",
        in_sprite_den("abuse-fake-agent /.sprite/run/agent.sock")
    ));
    fake.user = Some("root".into());
    fake.max_run_after_disconnect_ms = Some(0);
    let mut fake = act.agent().exec(fake).await?;
    // The impostor says when it listens.
    until_said(&mut fake, "listening", "the fake agent").await?;
    drop(act);
    let who = who_answers(&mgr, "sa").await;
    ensure!(
        matches!(&who, Ok(w) if w == "sa"),
        "with the sprite's own listener in place, A's exec got {who:?}"
    );
    ensure!(who_answers(&mgr, "sb").await? == "sb");
    drop(fake);
    Ok(())
}

/// Loop devices' backing files name host paths (every sprite's disk); a
/// sprite must not be able to read them.
async fn abuse_sprite_cannot_read_loop_backing_files(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("s1", CreateSprite::default()).await?;
    mgr.create("s2", CreateSprite::default()).await?;
    ensure!(who_answers(&mgr, "s2").await? == "s2");
    let out = root_sh(
        &mgr,
        "s1",
        "for f in /sys/block/*/loop/backing_file /sys/devices/virtual/block/*/loop/backing_file \
         /sys/class/block/*/loop/backing_file /sys/dev/block/*/loop/backing_file; do \
           cat \"$f\" 2>/dev/null; done; echo END",
    )
    .await?;
    ensure!(out.stdout.ends_with("END\n"), "{}{}", out.stdout, out.stderr);
    let leaked: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('/')).collect();
    ensure!(
        leaked.is_empty(),
        "the sprite read loop backing files: {leaked:?}"
    );
    // Nothing of the other sprite's host paths in this sprite's mount table.
    let key2 = mgr.get("s2")?.record.key;
    let out = root_sh(&mgr, "s1", "cat /proc/self/mountinfo").await?;
    ensure!(
        !out.stdout.contains(&key2),
        "s2's key in s1's mountinfo:\n{}",
        out.stdout
    );
    Ok(())
}

/// A sprite's mount table names no host path: its bind mounts (the agent
/// bundle at /.sprite/bin, /etc/resolv.conf, hosts, hostname, the policy
/// file) showed the data dir and run dir as their roots in mountinfo. Now
/// they come from read-only overlays named by descriptor; the binds still
/// work, and /sys/block stays masked.
async fn abuse_sprite_mountinfo_names_no_host_path(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let cfg = env.config();
    let host_paths = [
        env.dir.path().to_path_buf(),
        cfg.data_dir.clone(),
        cfg.run_dir.clone(),
        cfg.images_dir.clone(),
    ];
    let mgr = env.start(cfg).await?;
    mgr.create("m1", CreateSprite::default()).await?;
    let out = root_sh(
        &mgr,
        "m1",
        "cat /proc/self/mountinfo; echo =====; cat /proc/mounts; echo =====; \
         cat /etc/hostname; test -x /.sprite/bin/den && echo BIN; grep -c nameserver /etc/resolv.conf; \
         ls -A /sys/block | wc -l",
    )
    .await?;
    ensure!(out.code == 0, "{}{}", out.stdout, out.stderr);
    let parts: Vec<&str> = out.stdout.split("=====\n").collect();
    ensure!(parts.len() == 3, "{}", out.stdout);
    let (mountinfo, mounts, rest) = (parts[0], parts[1], parts[2]);
    for p in &host_paths {
        let p = p.to_string_lossy();
        for (what, table) in [("mountinfo", mountinfo), ("/proc/mounts", mounts)] {
            let leaked: Vec<&str> = table.lines().filter(|l| l.contains(p.as_ref())).collect();
            ensure!(
                leaked.is_empty(),
                "the sprite's {what} names the host path {p}:\n{}",
                leaked.join("\n")
            );
        }
    }
    // The key names the sprite's host directories (`<run>/s/<key>`).
    let key = mgr.get("m1")?.record.key;
    ensure!(!mountinfo.contains(&key), "its key in mountinfo:\n{mountinfo}");
    let rest: Vec<&str> = rest.lines().collect();
    ensure!(
        rest == ["m1", "BIN", "1", "0"],
        "hostname, agent bundle, resolv.conf, /sys/block entries: {rest:?}"
    );
    Ok(())
}

/// The sprite's root attacks PID 1: ptrace attach (which would stop the
/// agent and hang every exec), pidfd_getfd and /proc/1/fd (which would hand
/// out PID 1's descriptors, the host's console log among them). All are
/// refused, exec keeps working, and PID 1 holds no descriptor of the console
/// log.
async fn abuse_pid1_refuses_ptrace_and_pidfd_getfd(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("p1", CreateSprite::default()).await?;
    ensure!(who_answers(&mgr, "p1").await? == "p1");
    let out = root_sh(&mgr, "p1", &in_sprite_den("abuse-pid1")).await?;
    println!("  attacks on PID 1: {}", out.stdout.trim().replace('\n', ", "));
    let result = |attack: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{attack}=")))
            .with_context(|| format!("no {attack} result: {}{}", out.stdout, out.stderr))
    };
    let refused = |r: &str| r == "EPERM" || r == "EACCES";
    ensure!(
        refused(result("ptrace")?),
        "ptrace on PID 1 gave {}",
        result("ptrace")?
    );
    match rt {
        Runtime::Native => {
            for attack in ["getfd", "procfd"] {
                let r = result(attack)?;
                ensure!(refused(r), "{attack} on PID 1 gave {r}, want EPERM or EACCES");
            }
        }
        // PID 1 is a task of gVisor's sentry, which has no pidfd_open in
        // this runsc, and whose procfs lets the sprite's root open PID 1's
        // descriptors (it does not apply the dumpable check). What matters
        // is that there is no host file among them: the agent's output
        // already went to a file of the sprite's own.
        Runtime::Gvisor => {
            let r = result("getfd").or_else(|_| result("pidfd_open"))?;
            ensure!(refused(r) || r == "ENOSYS", "pidfd_getfd on PID 1 gave {r}");
            let r = result("procfd")?;
            ensure!(
                refused(r) || r == "OK:/.sprite/logs/agent.log",
                "PID 1's stdout, opened by the sprite's root, is {r}"
            );
        }
    }
    let t0 = Instant::now();
    ensure!(who_answers(&mgr, "p1").await? == "p1");
    let after = t0.elapsed();
    println!("  exec after the attacks: {after:?}");
    ensure!(after < Duration::from_secs(5), "exec took {after:?}");

    let key = mgr.get("p1")?.record.key;
    let console = env.dir.path().join("run/s").join(&key).join("console.log");
    let console = std::fs::metadata(&console).with_context(|| format!("{}", console.display()))?;
    let pid1 = host_pid1(&key)?;
    for fd in std::fs::read_dir(format!("/proc/{pid1}/fd"))?.flatten() {
        if let Ok(md) = std::fs::metadata(fd.path()) {
            ensure!(
                (md.dev(), md.ino()) != (console.dev(), console.ino()),
                "PID 1 still holds the host's console log as fd {:?}",
                fd.file_name()
            );
        }
    }
    Ok(())
}

/// Host kernel interfaces a root could use to read or steer the host's
/// kernel; a gVisor sprite's root must find none of them.
const HOST_KERNEL_INTERFACES: &[&str] = &[
    "/proc/kallsyms",
    "/proc/kcore",
    "/proc/modules",
    "/proc/sysrq-trigger",
    "/proc/config.gz",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/modprobe",
    "/proc/sys/vm/drop_caches",
    "/sys/kernel/debug",
    "/sys/kernel/security",
    "/sys/kernel/mm",
    "/sys/fs/cgroup",
    "/sys/firmware",
    "/sys/module",
    "/sys/block",
    "/dev/kmsg",
    "/dev/mem",
    "/dev/kvm",
    "/dev/loop-control",
    "/dev/fuse",
];

/// Under gVisor the sprite's root talks to the sentry, never the host's
/// kernel: it sees gVisor's kernel (its version, its boot log, its command
/// line, its boot id), nothing of the host's, and none of the host's
/// kernel interfaces; mounting debugfs or writing a sysctl changes nothing
/// on the host.
async fn abuse_gvisor_root_sees_only_the_sentry_kernel() -> Result<()> {
    let env = Env::new(Runtime::Gvisor)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("gk", CreateSprite::default()).await?;
    let script = format!(
        "cat /proc/version; echo =====; dmesg; echo =====; cat /proc/cmdline; echo =====; \
         cat /proc/sys/kernel/random/boot_id; echo =====; \
         for p in {}; do [ -e \"$p\" ] && echo \"$p $(ls -A $p 2>/dev/null | wc -l)\"; done; echo =====; \
         mkdir -p /tmp/dbg; mount -t debugfs none /tmp/dbg 2>/dev/null && echo MOUNTED; id -u",
        HOST_KERNEL_INTERFACES.join(" ")
    );
    let out = root_sh(&mgr, "gk", &script).await?;
    let parts: Vec<&str> = out.stdout.split("=====\n").collect();
    ensure!(parts.len() == 6, "{}{}", out.stdout, out.stderr);
    let host = |p: &str| std::fs::read_to_string(p).with_context(|| p.to_string());
    let release = host("/proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let (version, dmesg, cmdline, boot_id) = (parts[0], parts[1], parts[2], parts[3]);
    ensure!(
        version.starts_with("Linux version 4.4.0 "),
        "/proc/version: {version}"
    );
    ensure!(
        dmesg
            .lines()
            .next()
            .is_some_and(|l| l.ends_with("Starting gVisor...")),
        "dmesg: {dmesg}"
    );
    for (what, text) in [
        ("/proc/version", version),
        ("dmesg", dmesg),
        ("/proc/cmdline", cmdline),
    ] {
        ensure!(
            !text.contains(release),
            "the sprite's {what} names the host's kernel {release}: {text}"
        );
    }
    ensure!(
        cmdline.trim() != host("/proc/cmdline")?.trim(),
        "the host's /proc/cmdline"
    );
    ensure!(
        boot_id.trim() != host("/proc/sys/kernel/random/boot_id")?.trim(),
        "the host's boot id"
    );
    // What exists is the sentry's: empty directories, and two files it
    // implements itself (sysrq-trigger takes and ignores writes; its FUSE
    // device serves the sentry's own FUSE mounts).
    for line in parts[4].lines() {
        let (path, entries) = line.rsplit_once(' ').unwrap_or((line, ""));
        ensure!(
            entries == "0" || ["/proc/sysrq-trigger", "/dev/fuse"].contains(&path),
            "a gVisor sprite's root sees the host kernel interface {path} ({entries} entries)"
        );
    }
    ensure!(
        parts[5] == "0\n",
        "debugfs mounted, or not root: {}{}",
        parts[5],
        out.stderr
    );
    Ok(())
}

/// A sprite frozen (warm) for longer than the fence TTL is not fenced on
/// thaw while den is alive: the beats den sent meanwhile wait in the socket
/// and count. Its processes survive and it answers at once.
async fn abuse_long_frozen_sprite_is_not_fenced_on_thaw(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let mut cfg = env.config();
    cfg.fence_ttl = Duration::from_secs(1);
    let mgr = env.start(cfg).await?;
    mgr.create("warm", CreateSprite::default()).await?;
    let act = mgr.wake("warm").await?;
    let mut req = sh_req("sleep 1000");
    req.max_run_after_disconnect_ms = Some(0);
    act.agent().exec(req).await?.detach();
    drop(act);
    let key = mgr.get("warm")?.record.key;
    let pid1 = host_pid1(&key)?;
    mgr.freeze("warm").await?;
    // The scenario itself: frozen for three TTLs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    ensure!(who_answers(&mgr, "warm").await? == "warm");
    println!("  exec after a thaw past the fence TTL: {:?}", t0.elapsed());
    // Two more TTLs awake: the heartbeat keeps it alive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        host_pid1(&key)? == pid1,
        "PID 1 changed: the sprite was fenced and rebooted"
    );
    let out = exec(&mgr, "warm", sh_req("ps | grep -c '[s]leep 1000'")).await?;
    ensure!(
        out.stdout.trim() == "1",
        "the sleep did not survive: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

const CRASH_CHILD: &str = "abuse-crash-child";
const FENCE_TTL: Duration = Duration::from_secs(3);
/// The crash child's runtime, from its parent.
const CRASH_RUNTIME: &str = "DEN_ABUSE_CRASH_RUNTIME";

/// A den killed with SIGKILL leaves sprites behind; each must fence itself
/// (every process gone) within the fence TTL of den's last heartbeat.
async fn abuse_killed_den_sprites_fence_themselves(rt: Runtime) -> Result<()> {
    let env = Env::new(rt)?;
    let cfg = env.config();
    let n = &cfg.net;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(CRASH_CHILD)
        .arg(env.dir.path())
        .args(net_args(n))
        .env(CRASH_RUNTIME, rt.as_str())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut stdout, &mut line))?;
    let key = line
        .trim()
        .strip_prefix("ready ")
        .with_context(|| format!("child said {line:?}"))?
        .to_string();
    let cg = den_runtime::cgroup::SpriteCgroup::new(den_runtime::cgroup::detect()?, &key);
    let before = cg.procs()?.len();
    ensure!(
        before >= 2,
        "the sprite runs {before} processes, want the agent and a sleep"
    );

    child.kill()?;
    child.wait()?;
    let t0 = Instant::now();
    let deadline = FENCE_TTL + Duration::from_secs(3);
    let fenced_after = loop {
        let left = cg.procs().map(|p| p.len()).unwrap_or(0);
        if left == 0 {
            break Ok(t0.elapsed());
        }
        if t0.elapsed() > deadline {
            break Err(left);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A new manager cleans up what the dead one left (mounts, network, and
    // the container if it did not fence), before any verdict.
    let mgr = env.start(cfg).await?;
    let fenced_after = match fenced_after {
        Ok(t) => t,
        Err(left) => bail!(
            "{left} processes of the sprite still ran {deadline:?} after den was killed (fence TTL {FENCE_TTL:?})"
        ),
    };
    println!("  sprite fenced {fenced_after:?} after den's SIGKILL (TTL {FENCE_TTL:?})");
    ensure!(
        fenced_after >= FENCE_TTL / 2,
        "fenced after {fenced_after:?}: sooner than the TTL allows"
    );
    ensure!(who_answers(&mgr, "fenced").await? == "fenced");
    Ok(())
}

/// The crash child: a manager with a short fence TTL and one running sprite
/// with a detached `sleep`; prints "ready <key>" and waits to be killed.
fn crash_child(args: &[OsString]) -> ! {
    crash_child_main(
        args,
        |cfg| {
            cfg.fence_ttl = FENCE_TTL;
            cfg.runtime = std::env::var(CRASH_RUNTIME)
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(Runtime::Native);
        },
        async |mgr| {
            mgr.create("fenced", CreateSprite::default())
                .await
                .expect("create");
            let act = mgr.wake("fenced").await.expect("wake");
            let mut req = sh_req("sleep 1000");
            req.max_run_after_disconnect_ms = Some(0);
            act.agent().exec(req).await.expect("sleep").detach();
            println!("ready {}", mgr.get("fenced").expect("get").record.key);
        },
    )
}

// ------------------------------------------------- attackers, in the sprite

/// `abuse-pid1`: ptrace attach, pidfd_getfd and /proc/1/fd/1 against PID 1;
/// prints `name=OK` or `name=<errno name>` for each.
fn attack_pid1() -> ! {
    let errno = || std::io::Error::last_os_error();
    let name = |e: std::io::Error| match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".to_string(),
        Some(libc::EACCES) => "EACCES".to_string(),
        Some(libc::ESRCH) => "ESRCH".to_string(),
        Some(libc::ENOSYS) => "ENOSYS".to_string(),
        _ => format!("{e}"),
    };
    // SAFETY: plain syscalls on integers; no memory is passed.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
    if rc == 0 {
        println!("ptrace=OK");
        // Let the agent go again so the rest of the suite is not stuck.
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        unsafe { libc::waitpid(1, &mut status, libc::__WALL) };
        // SAFETY: as above, integers only.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, 1, 0, 0) };
    } else {
        println!("ptrace={}", name(errno()));
    }
    // SAFETY: pidfd_open takes a pid and flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, 1, 0) };
    if pidfd < 0 {
        println!("pidfd_open={}", name(errno()));
    } else {
        // SAFETY: pidfd_getfd takes descriptors and flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, 1, 0) };
        if fd >= 0 {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            println!("getfd=OK:{}", target.display());
        } else {
            println!("getfd={}", name(errno()));
        }
    }
    match std::fs::OpenOptions::new().append(true).open("/proc/1/fd/1") {
        Ok(_) => {
            let target = std::fs::read_link("/proc/1/fd/1").unwrap_or_default();
            println!("procfd=OK:{}", target.display())
        }
        Err(e) => println!("procfd={}", name(e)),
    }
    std::process::exit(0)
}

/// `abuse-fake-agent PATH`: listens at PATH and answers every request as
/// an agent would, with output naming the impostor.
fn fake_agent(path: &str) -> ! {
    use std::io::{BufRead, Write};
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
    println!("listening");
    for conn in l.incoming().flatten() {
        let mut rd = std::io::BufReader::new(&conn);
        let mut req = String::new();
        let _ = rd.read_line(&mut req);
        let mut w = &conn;
        let mut out = b"{\"ok\":true}\n".to_vec();
        out.extend(den_agent::protocol::encode_frame(
            den_agent::protocol::FRAME_STDOUT,
            b"impostor\n",
        ));
        let _ = w.write_all(&out);
    }
    std::process::exit(0)
}

// ------------------------------------------------------------------ main

fn main() {
    den_sprite::helper_cmd::dispatch();
    let args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some(CRASH_CHILD) => crash_child(&args[2..]),
        Some("abuse-pid1") => attack_pid1(),
        Some("abuse-fake-agent") => fake_agent(&args[2].to_string_lossy()),
        _ => {}
    }
    // Every attack runs against both runtimes' sprites.
    let each: &[(&str, RuntimeTestFn)] = &[
        ("abuse_agent_socket_swap_is_never_followed", |rt| {
            Box::pin(abuse_agent_socket_swap_is_never_followed(rt))
        }),
        ("abuse_sprite_cannot_read_loop_backing_files", |rt| {
            Box::pin(abuse_sprite_cannot_read_loop_backing_files(rt))
        }),
        ("abuse_sprite_mountinfo_names_no_host_path", |rt| {
            Box::pin(abuse_sprite_mountinfo_names_no_host_path(rt))
        }),
        ("abuse_pid1_refuses_ptrace_and_pidfd_getfd", |rt| {
            Box::pin(abuse_pid1_refuses_ptrace_and_pidfd_getfd(rt))
        }),
        ("abuse_long_frozen_sprite_is_not_fenced_on_thaw", |rt| {
            Box::pin(abuse_long_frozen_sprite_is_not_fenced_on_thaw(rt))
        }),
        ("abuse_killed_den_sprites_fence_themselves", |rt| {
            Box::pin(abuse_killed_den_sprites_fence_themselves(rt))
        }),
    ];
    // gVisor's own: its sentry is the kernel the sprite sees.
    let single: &[(&str, TestFn)] = &[("gvisor::abuse_gvisor_root_sees_only_the_sentry_kernel", || {
        Box::pin(abuse_gvisor_root_sees_only_the_sentry_kernel())
    })];
    run_runtime_tests(each, single);
}
