//! Sprite-level tests: the whole stack (volume, FUSE + loop + ext4, overlay,
//! container, agent, network) driven through `SpriteManager`, as root.
//!
//! The test binary doubles as the `den` binary inside the sprites: the
//! manager runs it as `runtime-shim` and as `agent` (see `main`).

use std::ffi::OsString;
use std::net::{SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_agent::protocol::ServiceDef;
use den_net::NetworkPolicy;
use den_runtime::{Resources, Runtime};
use den_sprite::{CreateSprite, ImageSource, ManagerConfig, SpriteError, SpriteManager, SpriteStatus};
use den_store::{Store, StoreConfig};
use den_testkit::net::TestNet;

mod common;

use common::*;

struct Env {
    runtime: Runtime,
    managers: Managers,
    dir: tempfile::TempDir,
    net: TestNet,
    images: PathBuf,
    image: ImageSource,
}

impl Env {
    fn new() -> Result<Env> {
        Self::on(Runtime::Native)
    }

    /// Sprites on `runtime`.
    fn on(runtime: Runtime) -> Result<Env> {
        Self::with_image(runtime, ImageSource::Busybox, None)
    }

    fn with_image(runtime: Runtime, image: ImageSource, images: Option<PathBuf>) -> Result<Env> {
        let dir = traversable_tempdir("den-sprite-test-")?;
        let images = images.unwrap_or_else(|| dir.path().join("images"));
        Ok(Env {
            runtime,
            managers: Default::default(),
            net: TestNet::new()?,
            images,
            image,
            dir,
        })
    }

    fn config(&self) -> ManagerConfig {
        let mut cfg = test_config(self.dir.path(), &self.images, self.net.config.clone());
        cfg.image = self.image.clone();
        cfg.runtime = self.runtime;
        cfg
    }

    async fn store(&self) -> Result<Store> {
        Ok(Store::open(StoreConfig::local(self.dir.path().join("data/store"))).await?)
    }

    async fn start(&self, cfg: ManagerConfig) -> Result<SpriteManager> {
        let mgr = SpriteManager::start(cfg, self.store().await?).await?;
        self.managers.add(&mgr);
        Ok(mgr)
    }
}

async fn wait_status(
    mgr: &SpriteManager,
    name: &str,
    want: SpriteStatus,
    within: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if mgr.get(name)?.status == want {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!(
                "{name} is {:?}, not {want:?}, after {within:?}",
                mgr.get(name)?.status
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ------------------------------------------------------------------ tests

/// Create, write, stop the runtime, start it again: the file is there.
/// Checkpoint, change, restore: the change is gone. Fork: both diverge.
async fn lifecycle(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mgr = env.start(env.config()).await?;
    let t0 = Instant::now();
    let info = mgr.create("alpha", CreateSprite::default()).await?;
    println!("  create: {:?}", t0.elapsed());
    ensure!(info.status == SpriteStatus::Cold);
    let t0 = Instant::now();
    let who = sh(&mgr, "alpha", "id -un; id -u; pwd; hostname; cat /etc/hostname").await?;
    println!("  first command (cold boot): {:?}", t0.elapsed());
    ensure!(who == "sprite\n1000\n/home/sprite\nalpha\nalpha\n", "{who:?}");
    sh(
        &mgr,
        "alpha",
        "echo persisted > /home/sprite/file; mkdir -p /home/sprite/d",
    )
    .await?;
    let out = root_sh(&mgr, "alpha", "echo root-change > /etc/motd && cat /etc/motd").await?;
    ensure!(out.code == 0 && out.stdout == "root-change\n", "{}", out.stderr);

    // Restart the whole runtime: sprites come back cold and intact. (A long
    // stop grace from here on: the restore below must not wait for it.)
    close(mgr).await;
    let grace = Duration::from_secs(10);
    let mut cfg = env.config();
    cfg.stop_grace = grace;
    let mgr = env.start(cfg).await?;
    ensure!(mgr.get("alpha")?.status == SpriteStatus::Cold);
    ensure!(sh(&mgr, "alpha", "cat /home/sprite/file /etc/motd").await? == "persisted\nroot-change\n");

    // Checkpoint a running sprite, change, restore.
    let ck = mgr.checkpoint("alpha", "before").await?;
    ensure!(mgr.get("alpha")?.status == SpriteStatus::Running);
    sh(
        &mgr,
        "alpha",
        "echo changed > /home/sprite/file; touch /home/sprite/new",
    )
    .await?;
    // A command that ignores SIGTERM holds a graceful stop for the agent's own
    // 5 s session grace (and den's up to `grace`); a restore rewinds whatever
    // it could save, so it doesn't wait.
    let stubborn = mgr
        .wake("alpha")
        .await?
        .agent()
        .exec(sh_req("trap '' TERM; echo ready; exec sleep 600"))
        .await?;
    let t0 = Instant::now();
    mgr.restore("alpha", &ck.id).await?;
    ensure!(
        t0.elapsed() < Duration::from_secs(3),
        "restore waited {:?} for a program that ignores SIGTERM",
        t0.elapsed()
    );
    drop(stubborn);
    ensure!(
        mgr.get("alpha")?.status == SpriteStatus::Running,
        "restore restarts an awake sprite"
    );
    let after = sh(&mgr, "alpha", "cat /home/sprite/file; ls /home/sprite").await?;
    println!("  restore → output: {:?}", t0.elapsed());
    ensure!(after == "persisted\nd\nfile\n", "{after:?}");
    let cks = mgr.list_checkpoints("alpha").await?;
    ensure!(cks.first().map(|c| c.id.as_str()) == Some(ck.id.as_str()));
    match mgr.delete_checkpoint("alpha", &ck.id).await {
        Err(den_sprite::SpriteError::Conflict(_)) => {}
        other => bail!("deleting the active checkpoint gave {other:?}"),
    }

    // Fork from the live state and from the checkpoint; all three diverge.
    sh(&mgr, "alpha", "echo live > /home/sprite/state").await?;
    let t0 = Instant::now();
    mgr.fork("alpha", "beta", None, None).await?;
    ensure!(sh(&mgr, "beta", "cat /home/sprite/state").await? == "live\n");
    println!("  live fork → output: {:?}", t0.elapsed());
    mgr.fork("alpha", "gamma", Some(&ck.id), None).await?;
    ensure!(sh(&mgr, "gamma", "ls /home/sprite").await? == "d\nfile\n");
    sh(&mgr, "beta", "echo beta > /home/sprite/state").await?;
    sh(&mgr, "alpha", "echo alpha > /home/sprite/state").await?;
    ensure!(sh(&mgr, "beta", "cat /home/sprite/state").await? == "beta\n");
    ensure!(sh(&mgr, "alpha", "cat /home/sprite/state").await? == "alpha\n");

    // What a running program wrote and neither flushed nor closed is in a
    // live fork and survives going cold (under gVisor too, where the
    // sprite's kernel is a process of its own).
    sh(
        &mgr,
        "alpha",
        "(exec 3>/home/sprite/open; echo unflushed >&3; exec sleep 600) >/dev/null 2>&1 &
         while [ ! -s /home/sprite/open ]; do sleep 0.01; done",
    )
    .await?;
    mgr.fork("alpha", "delta", None, None).await?;
    ensure!(sh(&mgr, "delta", "cat /home/sprite/open").await? == "unflushed\n");
    mgr.sleep("alpha", SpriteStatus::Cold).await?;
    ensure!(sh(&mgr, "alpha", "cat /home/sprite/open").await? == "unflushed\n");

    // Bad input is refused and changes nothing.
    ensure!(matches!(
        mgr.create("alpha", CreateSprite::default()).await,
        Err(den_sprite::SpriteError::Exists(_))
    ));
    ensure!(matches!(
        mgr.create("Bad_Name", CreateSprite::default()).await,
        Err(den_sprite::SpriteError::Invalid(_))
    ));
    ensure!(matches!(
        mgr.restore("alpha", "v999").await,
        Err(den_sprite::SpriteError::CheckpointNotFound { .. })
    ));
    ensure!(matches!(
        mgr.wake("nope").await,
        Err(den_sprite::SpriteError::NotFound(_))
    ));

    // Delete removes the sprite and its disk.
    let vol = mgr.get("gamma")?.record.volume;
    mgr.delete("gamma").await?;
    ensure!(mgr.get("gamma").is_err());
    ensure!(
        mgr.store().volume(&vol).await.is_err(),
        "volume {vol} survived delete"
    );
    close(mgr).await;
    Ok(())
}

/// Idle sprites go warm (frozen, processes kept) then cold (stopped); an
/// exec wakes them; data stays.
async fn sleep_and_wake(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mut cfg = env.config();
    cfg.warm_after = Duration::from_millis(300);
    cfg.cold_after = Duration::from_millis(2500);
    let mgr = env.start(cfg).await?;
    mgr.create("sleepy", CreateSprite::default()).await?;
    // A background process that outlives its session and counts. Each value
    // is renamed into place: a reader never meets the file half written.
    sh(
        &mgr,
        "sleepy",
        "echo data > /home/sprite/keep; (i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.02; done) >/dev/null 2>&1 &",
    )
    .await?;
    let warm_in = wait_status(&mgr, "sleepy", SpriteStatus::Warm, WAIT).await?;
    println!("  went warm after {warm_in:?} idle");
    let before: u64 = sh(&mgr, "sleepy", "cat /tmp/count").await?.trim().parse()?;
    // Woken: the counter process survived the freeze and keeps counting.
    let t0 = Instant::now();
    loop {
        let now: u64 = sh(&mgr, "sleepy", "cat /tmp/count").await?.trim().parse()?;
        if now > before {
            break;
        }
        ensure!(t0.elapsed() < WAIT, "the counter never moved after the wake");
    }
    ensure!(mgr.get("sleepy")?.status == SpriteStatus::Running);

    // A running exec session keeps the sprite awake, even detached.
    let act = mgr.wake("sleepy").await?;
    let mut req = sh_req("sleep 1.5");
    req.max_run_after_disconnect_ms = Some(0);
    act.agent().exec(req).await?.detach();
    drop(act);
    let t0 = Instant::now();
    let warm_again = wait_status(&mgr, "sleepy", SpriteStatus::Warm, WAIT).await?;
    ensure!(
        t0.elapsed() >= Duration::from_millis(1400),
        "went warm after {warm_again:?} although a session was running"
    );

    let last = sh(&mgr, "sleepy", "cat /tmp/count").await?;
    let cold_in = wait_status(&mgr, "sleepy", SpriteStatus::Cold, WAIT).await?;
    println!("  went cold {cold_in:?} after warm");
    let t0 = Instant::now();
    let out = sh(
        &mgr,
        "sleepy",
        "cat /home/sprite/keep; ps -o comm | grep -c sleep || true",
    )
    .await?;
    println!("  cold wake → output: {:?}", t0.elapsed());
    match rt {
        // The data is kept, the counter is gone.
        Runtime::Native => ensure!(out == "data\n0\n", "after a cold wake: {out:?}"),
        // gVisor went cold with its processes: the counter counts on from
        // where it was (its /tmp is the sandbox's memory, kept too).
        Runtime::Gvisor => {
            ensure!(out.starts_with("data\n"), "after a cold wake: {out:?}");
            let last: u64 = last.trim().parse()?;
            let t0 = Instant::now();
            loop {
                let now: u64 = sh(&mgr, "sleepy", "cat /tmp/count").await?.trim().parse()?;
                if now > last {
                    break;
                }
                ensure!(
                    t0.elapsed() < WAIT,
                    "the counter stopped at {now} (it was {last})"
                );
            }
        }
    }
    close(mgr).await;
    Ok(())
}

/// The next status change of `name` from a `subscribe` receiver.
async fn next_change(
    rx: &mut tokio::sync::broadcast::Receiver<den_sprite::SpriteEvent>,
    name: &str,
) -> Result<den_sprite::SpriteEvent> {
    loop {
        let ev = tokio::time::timeout(WAIT, rx.recv())
            .await
            .context("no sprite event")??;
        let (den_sprite::SpriteEvent::Changed(i) | den_sprite::SpriteEvent::Deleted(i)) = &ev;
        if i.record.name == name {
            return Ok(ev);
        }
    }
}

fn changed_to(ev: &den_sprite::SpriteEvent) -> Option<SpriteStatus> {
    match ev {
        den_sprite::SpriteEvent::Changed(i) => Some(i.status),
        den_sprite::SpriteEvent::Deleted(_) => None,
    }
}

/// `subscribe` reports a sprite's creation, every status change (idle
/// sleeps and a restart included) and its deletion, in order; restart
/// restarts the processes and keeps the disk; the activity times follow.
async fn events_restart_and_times(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mut cfg = env.config();
    cfg.warm_after = Duration::from_millis(300);
    cfg.cold_after = Duration::from_millis(1500);
    let mgr = env.start(cfg).await?;
    let mut rx = mgr.subscribe();
    mgr.create("ev", CreateSprite::default()).await?;
    ensure!(changed_to(&next_change(&mut rx, "ev").await?) == Some(SpriteStatus::Cold));
    ensure!(mgr.get("ev")?.record.last_active_at_ms.is_none());

    sh(
        &mgr,
        "ev",
        "echo kept > /home/sprite/kept; sleep 1000 </dev/null >/dev/null 2>&1 &",
    )
    .await?;
    ensure!(changed_to(&next_change(&mut rx, "ev").await?) == Some(SpriteStatus::Running));
    let rec = mgr.get("ev")?.record;
    let started = rec.last_started_at_ms.context("last_started_at after a boot")?;
    ensure!(
        rec.last_active_at_ms.is_some(),
        "an awake sprite reports its last use"
    );

    ensure!(changed_to(&next_change(&mut rx, "ev").await?) == Some(SpriteStatus::Warm));
    let warm = mgr.get("ev")?.record;
    let idle_since = warm.last_active_at_ms.context("last_active_at once warm")?;
    ensure!(
        warm.last_warming_at_ms.is_some_and(|w| w - idle_since >= 250),
        "went warm about warm_after past the last use: {warm:?}"
    );
    ensure!(changed_to(&next_change(&mut rx, "ev").await?) == Some(SpriteStatus::Cold));
    let cold = mgr
        .get("ev")?
        .record
        .last_active_at_ms
        .context("last_active_at once cold")?;
    // The same instant, taken again on the way down (millisecond jitter).
    ensure!((cold - idle_since).abs() <= 5, "{idle_since} then {cold}");

    mgr.restart("ev").await?;
    ensure!(changed_to(&next_change(&mut rx, "ev").await?) == Some(SpriteStatus::Running));
    ensure!(mgr.get("ev")?.record.last_started_at_ms > Some(started));
    // Awake and running: restart again, now from running.
    sh(&mgr, "ev", "sleep 1000 </dev/null >/dev/null 2>&1 &").await?;
    mgr.restart("ev").await?;
    let out = sh(
        &mgr,
        "ev",
        "cat /home/sprite/kept; ps -o comm | grep -c sleep || true",
    )
    .await?;
    ensure!(out == "kept\n0\n", "after a restart: {out:?}");
    ensure!(mgr.running_agent("ev").await?.is_some());

    mgr.delete("ev").await?;
    loop {
        match next_change(&mut rx, "ev").await? {
            den_sprite::SpriteEvent::Deleted(_) => break,
            den_sprite::SpriteEvent::Changed(_) => {}
        }
    }
    close(mgr).await;
    Ok(())
}

/// Root in a sprite is not root on the host, and the host, its devices,
/// its loopback services and other sprites are out of reach.
async fn security() -> Result<()> {
    let env = Env::new()?;
    let mut cfg = env.config();
    cfg.resources = Resources {
        memory_bytes: Some(64 << 20),
        pids: Some(128),
        ..Resources::default()
    };
    let mgr = env.start(cfg).await?;
    mgr.create("s1", CreateSprite::default()).await?;
    mgr.create("s2", CreateSprite::default()).await?;

    // Host processes are invisible: PID 1 is the agent, and few processes exist.
    let out = root_sh(
        &mgr,
        "s1",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    )
    .await?;
    let mut lines = out.stdout.lines();
    ensure!(lines.next().unwrap_or("").contains("agent"), "{}", out.stdout);
    let nprocs: usize = lines.next().unwrap_or("999").trim().parse()?;
    ensure!(nprocs < 10, "the sprite sees {nprocs} processes");

    // uid 0 inside maps to an unprivileged host uid.
    let act = mgr.wake("s1").await?;
    let session = act
        .agent()
        .exec({
            let mut r = sh_req("sleep 30");
            r.user = Some("root".into());
            r
        })
        .await?;
    let key = mgr.get("s1")?.record.key;
    let host_uids = host_uids_of_sprite(&key)?;
    ensure!(
        !host_uids.is_empty(),
        "no processes found for the sprite's cgroup"
    );
    ensure!(host_uids.iter().all(|u| *u >= 100_000), "host uids {host_uids:?}");
    drop(session);
    drop(act);

    // Host files, devices, sysctls and modules.
    let data_db = env.dir.path().join("data/sprites.db");
    let script = format!(
        "test -e {db} && echo SEES-HOST-FILE; \
         mknod /tmp/sda b 8 0 2>/dev/null && echo MKNOD; \
         mount -t ext4 /dev/vda /mnt 2>/dev/null && echo MOUNTED; \
         echo 1 > /proc/sys/kernel/sysrq 2>/dev/null && echo SYSCTL; \
         echo 1 > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ; \
         insmod /nonexistent.ko 2>&1 | grep -qi 'not permitted' || echo INSMOD-NOT-REFUSED; \
         grep CapEff /proc/self/status; echo done",
        db = data_db.display()
    );
    let out = root_sh(&mgr, "s1", &script).await?;
    for bad in ["SEES-HOST-FILE", "MKNOD", "MOUNTED", "SYSCTL", "SYSRQ"] {
        ensure!(
            !out.stdout.contains(bad),
            "sprite root could {bad}: {}",
            out.stdout
        );
    }
    let capeff = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    let caps = u64::from_str_radix(capeff.trim(), 16)?;
    for (bit, name) in [
        (16, "CAP_SYS_MODULE"),
        (21, "CAP_SYS_ADMIN"),
        (17, "CAP_SYS_RAWIO"),
        (12, "CAP_NET_ADMIN"),
    ] {
        ensure!(caps & (1 << bit) == 0, "sprite root has {name}");
    }

    // Host loopback services and other sprites are unreachable; the host
    // can reach a sprite (that is how URLs and proxies work).
    let host = TcpListener::bind("0.0.0.0:0")?;
    let port = host.local_addr()?.port();
    let gw = env.net.config.gateway();
    let out = sh(
        &mgr,
        "s1",
        &format!("nc -w 2 {gw} {port} </dev/null && echo CONNECTED-HOST || echo refused"),
    )
    .await?;
    ensure!(out.trim() == "refused", "{out}");
    let out = sh(
        &mgr,
        "s1",
        &format!("nc -w 2 127.0.0.1 {port} </dev/null && echo CONNECTED-LO || echo refused"),
    )
    .await?;
    ensure!(out.trim() == "refused", "sprite loopback is its own: {out}");
    let s2 = mgr.wake("s2").await?;
    let listener = s2.agent().exec(sh_req("echo hi-from-s2 | nc -l -p 7000")).await?;
    let s2_addr = SocketAddrV4::new(s2.addr(), 7000);
    wait_tcp(s2_addr)?;
    let out = sh(
        &mgr,
        "s1",
        &format!(
            "nc -w 2 {} 7000 </dev/null && echo CONNECTED-S2 || echo refused",
            s2.addr()
        ),
    )
    .await?;
    ensure!(
        !out.contains("CONNECTED-S2") && !out.contains("hi-from-s2"),
        "{out}"
    );
    drop(listener);
    drop(s2);

    // A fork bomb and a memory hog stay inside their limits; the host and the
    // other sprite keep answering.
    let act = mgr.wake("s1").await?;
    let mut bomb = sh_req("bomb() { bomb | bomb & }; bomb; sleep 5");
    bomb.timeout_ms = Some(6000);
    let bomb = act.agent().exec(bomb).await?;
    let t0 = Instant::now();
    ensure!(sh(&mgr, "s2", "echo alive").await? == "alive\n");
    let during = t0.elapsed();
    println!("  exec in another sprite during a fork bomb: {during:?}");
    ensure!(during < Duration::from_secs(5), "the neighbour took {during:?}");
    let pids = count_sprite_tasks(&key)?;
    ensure!(pids <= 128, "the bomb has {pids} tasks, limit 128");
    drop(bomb);
    drop(act);
    // Going cold kills every task of the sprite, bomb included.
    mgr.sleep("s1", SpriteStatus::Cold).await?;
    let hog = exec(&mgr, "s1", sh_req("dd if=/dev/zero of=/dev/null bs=200M count=1")).await?;
    ensure!(hog.code != 0, "a 200 MB buffer fit under a 64 MB limit");
    close(mgr).await;
    Ok(())
}

/// A sprite whose PID 1 dies on its own (an agent crash, the OOM killer, a
/// host admin's `kill -9`) is noticed: the next request boots it again, and
/// with no request the idle monitor reports it cold. The disk is kept.
async fn init_death(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("phoenix", CreateSprite::default()).await?;
    sh(&mgr, "phoenix", "echo kept > /home/sprite/f").await?;
    let key = mgr.get("phoenix")?.record.key;

    kill_init(&key)?;
    ensure!(mgr.get("phoenix")?.status == SpriteStatus::Running);
    let t0 = Instant::now();
    let out = sh(&mgr, "phoenix", "cat /home/sprite/f").await?;
    println!("  request after PID 1 died → output: {:?}", t0.elapsed());
    ensure!(out == "kept\n", "{out:?}");

    kill_init(&key)?;
    let noticed = wait_status(&mgr, "phoenix", SpriteStatus::Cold, WAIT).await?;
    println!("  idle monitor reported it cold after {noticed:?}");
    ensure!(sh(&mgr, "phoenix", "cat /home/sprite/f").await? == "kept\n");
    close(mgr).await;
    Ok(())
}

/// Any process on the host that clones its mount namespace while the disk
/// template is mounted (a container starting, den's own or another's) keeps
/// that ext4 alive until it lets go. Making the template must wait for it,
/// not fail with "loop device still in use" (CI saw exactly that with test
/// servers running side by side).
async fn template_vs_cloned_mount_namespace() -> Result<()> {
    for attempt in 1..=10 {
        let env = Env::new()?;
        let cfg = env.config();
        let template = cfg.run_dir.join("template/disk");
        let mgr = env.start(cfg).await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Catch the template's mount and clone the mount namespace under it,
        // holding the copy for a while (`unshare` makes it private, so the
        // host's unmount does not reach it).
        let watcher = {
            let stop = stop.clone();
            std::thread::spawn(move || -> Option<std::process::Child> {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mounted = den_block::mountinfo::read()
                        .unwrap_or_default()
                        .iter()
                        .any(|m| m.mount_point == template && m.fstype == "ext4");
                    if mounted {
                        return std::process::Command::new("unshare")
                            .args(["--mount", "sleep", "0.5"])
                            .spawn()
                            .ok();
                    }
                }
                None
            })
        };
        let created = mgr.create("tpl", CreateSprite::default()).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let holder = watcher.join().expect("watcher thread");
        created.context("creating the first sprite (and so the template)")?;
        let Some(mut holder) = holder else {
            println!("  attempt {attempt}: the template mount came and went unseen; again");
            continue;
        };
        let _ = holder.wait();
        ensure!(sh(&mgr, "tpl", "echo ok").await? == "ok\n");
        println!("  attempt {attempt}: a namespace clone held the template; create waited for it");
        close(mgr).await;
        return Ok(());
    }
    bail!("never caught the template while it was mounted")
}

/// SIGKILL a sprite's PID 1 from the host, and wait until it has exited.
/// Under gVisor the sprite's processes are tasks of one host process, the
/// sandbox (`runsc-sandbox`): its death is the sprite's.
fn kill_init(key: &str) -> Result<()> {
    let cg = den_runtime::cgroup::SpriteCgroup::new(den_runtime::cgroup::detect()?, key);
    let init = cg
        .procs()?
        .into_iter()
        .find(|pid| {
            let sandbox = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"runsc-sandbox\0"));
            let pid1 = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .is_some_and(|l| l.split_whitespace().last() == Some("1"))
            });
            sandbox || (pid1 && !is_runsc(*pid))
        })
        .context("the sprite has no PID 1")?;
    let watch = den_runtime::ExitWatch::new(init)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let t0 = Instant::now();
    while !watch.exited() {
        ensure!(t0.elapsed() < WAIT, "PID 1 ({init}) survived SIGKILL");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// One of gVisor's host processes (sandbox, gofer).
fn is_runsc(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"runsc-"))
}

fn host_uids_of_sprite(key: &str) -> Result<Vec<u32>> {
    let cg = den_runtime::cgroup::SpriteCgroup::new(den_runtime::cgroup::detect()?, key);
    let mut uids = Vec::new();
    for pid in cg.procs()? {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(line) = s.lines().find(|l| l.starts_with("Uid:"))
        {
            uids.extend(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    Ok(uids)
}

fn count_sprite_tasks(key: &str) -> Result<usize> {
    let cg = den_runtime::cgroup::SpriteCgroup::new(den_runtime::cgroup::detect()?, key);
    Ok(cg.procs()?.len())
}

fn wait_tcp(addr: SocketAddrV4) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        ensure!(t0.elapsed() < WAIT, "{addr} never accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The Sprites egress policy, end to end from inside a sprite: allowed
/// names resolve and connect, denied ones fail DNS, raw IPs are blocked,
/// and a change applies live.
async fn egress_policy(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mgr = env.start(env.config()).await?;
    let policy = NetworkPolicy::from_json(
        r#"{"rules":[{"domain":"allowed.test","action":"allow"},{"domain":"*","action":"deny"}]}"#,
    )?;
    mgr.create(
        "egress",
        CreateSprite {
            policy: Some(policy),
            ..Default::default()
        },
    )
    .await?;
    let (allowed, denied) = (env.net.inet.allowed_ip, env.net.inet.denied_ip);
    let out = sh(
        &mgr,
        "egress",
        "nslookup allowed.test 2>&1; echo ---; nc -w 3 allowed.test 80 </dev/null",
    )
    .await?;
    ensure!(
        out.contains(&allowed.to_string()),
        "allowed.test did not resolve: {out}"
    );
    ensure!(
        out.contains(&format!("hello from {allowed}")),
        "could not connect to allowed.test: {out}"
    );
    let out = sh(
        &mgr,
        "egress",
        "nslookup denied.test >/dev/null 2>&1 && echo RESOLVED || echo refused",
    )
    .await?;
    ensure!(out.trim() == "refused", "denied.test resolved: {out}");
    let out = sh(
        &mgr,
        "egress",
        &format!("nc -w 2 {denied} 80 </dev/null && echo CONNECTED || echo blocked"),
    )
    .await?;
    ensure!(out.trim() == "blocked", "raw IP reachable: {out}");
    // The sprite can read its policy but not change it.
    let out = root_sh(
        &mgr,
        "egress",
        "cat /.sprite/policy/network.json; echo x > /.sprite/policy/network.json && echo WROTE",
    )
    .await?;
    ensure!(
        out.stdout.contains("allowed.test") && !out.stdout.contains("WROTE"),
        "{}",
        out.stdout
    );

    // Live change: deny everything; the name no longer resolves.
    mgr.set_policy(
        "egress",
        NetworkPolicy::from_json(r#"{"rules":[{"domain":"*","action":"deny"}]}"#)?,
    )
    .await?;
    let out = sh(
        &mgr,
        "egress",
        "nslookup allowed.test >/dev/null 2>&1 && echo RESOLVED || echo refused",
    )
    .await?;
    ensure!(out.trim() == "refused", "{out}");
    let out = sh(
        &mgr,
        "egress",
        &format!("nc -w 2 {allowed} 80 </dev/null && echo CONNECTED || echo blocked"),
    )
    .await?;
    ensure!(out.trim() == "blocked", "{out}");
    ensure!(
        root_sh(&mgr, "egress", "cat /.sprite/policy/network.json")
            .await?
            .stdout
            .contains("deny")
    );
    // And it is stored with the sprite.
    ensure!(mgr.policy("egress")?.is_some_and(|p| p.rules.len() == 1));
    close(mgr).await;
    Ok(())
}

/// Services start in `needs` order, restart on crash, stay stopped when
/// stopped, log to /.sprite/logs/services, and come back after a cold boot.
async fn services(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("svc", CreateSprite::default()).await?;
    let def = |name: &str, script: &str, needs: &[&str]| ServiceDef {
        name: name.into(),
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        needs: needs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let _wake = mgr.wake("svc").await?;
    // `web` needs `db`, which doesn't exist yet: refused, nothing stored.
    let web = def(
        "web",
        "test -e /tmp/db.started && echo ordered > /tmp/web.order; echo web up; exec sleep 1000",
        &["db"],
    );
    ensure!(matches!(
        mgr.put_service("svc", web.clone()).await,
        Err(SpriteError::Invalid(_))
    ));
    ensure!(mgr.services("svc")?.is_empty());
    mgr.put_service(
        "svc",
        def(
            "db",
            "date +%s%N > /tmp/db.started; echo db up; exec sleep 1000",
            &[],
        ),
    )
    .await?;
    mgr.put_service("svc", web).await?;
    mgr.put_service("svc", def("crashy", "echo crash >&2; exit 3", &[]))
        .await?;
    let act = mgr.wake("svc").await?;
    let agent = act.agent().clone();
    use den_agent::protocol::{ServiceState, ServiceStatus};
    let is = |name: &'static str, state: ServiceState| {
        move |st: &[ServiceStatus]| st.iter().any(|s| s.name == name && s.status == state)
    };
    wait_services(&agent, "web running", is("web", ServiceState::Running)).await?;
    ensure!(sh(&mgr, "svc", "cat /tmp/web.order").await? == "ordered\n");
    wait_services(&agent, "crashy restarted", |st| {
        st.iter().any(|s| s.name == "crashy" && s.restart_count >= 2)
    })
    .await?;
    let log = sh(&mgr, "svc", "cat /.sprite/logs/services/crashy.log").await?;
    ensure!(log.contains("[stderr] crash"), "{log:?}");
    // Sticky stop.
    drop(mgr.stop_service("svc", "web").await?);
    wait_services(&agent, "web stopped", is("web", ServiceState::Stopped)).await?;
    // `db` can't go while `web` needs it.
    ensure!(matches!(
        mgr.delete_service("svc", "db").await,
        Err(SpriteError::Conflict(_))
    ));
    drop(act);
    drop(_wake);
    // A cold boot restarts db but not the stopped web.
    mgr.sleep("svc", SpriteStatus::Cold).await?;
    let act = mgr.wake("svc").await?;
    wait_services(
        act.agent(),
        "db back, web still stopped after a cold boot",
        |st| is("db", ServiceState::Running)(st) && is("web", ServiceState::Stopped)(st),
    )
    .await?;
    drop(act);
    // A bad definition is refused before anything wakes: a cycle keeps the
    // cold sprite cold.
    mgr.sleep("svc", SpriteStatus::Cold).await?;
    let cycle = def("db", "exec sleep 1000", &["web"]);
    ensure!(matches!(
        mgr.put_service("svc", cycle).await,
        Err(SpriteError::Invalid(m)) if m.contains("cycle")
    ));
    ensure!(mgr.get("svc")?.status == SpriteStatus::Cold);
    ensure!(mgr.service("svc", "db")?.needs.is_empty());
    close(mgr).await;
    Ok(())
}

async fn wait_services(
    agent: &den_agent::client::Client,
    what: &str,
    done: impl Fn(&[den_agent::protocol::ServiceStatus]) -> bool,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let st = agent.services_status().await?;
        if done(&st) {
            return Ok(());
        }
        ensure!(t0.elapsed() < WAIT, "{what}: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CRASH_CHILD: &str = "crash-child";
const POOL_CHILD: &str = "pool-child";

/// The manager's process is killed with SIGKILL while a sprite runs (its
/// FUSE server dies with it, leaving a dead disk under a live container).
/// A new manager cleans everything up, and the sprite comes back cold with
/// every synced byte.
async fn host_crash_recovery() -> Result<()> {
    let env = Env::new()?;
    let cfg = env.config();
    let n = &cfg.net;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(CRASH_CHILD)
        .arg(env.dir.path())
        .args(net_args(n))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut stdout, &mut line))?;
    ensure!(line.trim() == "ready", "child said {line:?}");
    // The dead process's loop devices must not outlive the recovery. They
    // are found by what is mounted on them, not by the backing-file path the
    // kernel reports: that path is rendered from the reader's root and, once
    // a mount namespace holding the FUSE mount goes away, reads as `/disk`.
    let run_dir = std::fs::canonicalize(env.dir.path())?.join("run");
    let ours: Vec<den_block::mountinfo::MountEntry> = den_block::mountinfo::read()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&run_dir))
        .collect();
    let fuse_files: Vec<PathBuf> = ours
        .iter()
        .filter(|m| m.fstype.starts_with("fuse"))
        .map(|m| m.mount_point.join(den_block::FuseOptions::default().file_name))
        .collect();
    let old_loops: Vec<PathBuf> = ours
        .iter()
        .filter(|m| m.source.starts_with("/dev/loop"))
        .map(|m| PathBuf::from(&m.source))
        .collect();
    ensure!(
        !old_loops.is_empty() && !fuse_files.is_empty(),
        "the crashed sprite had no loop device on a FUSE file; mounts under {}: {ours:?}",
        run_dir.display()
    );
    child.kill()?;
    child.wait()?;

    let mgr = env.start(cfg).await?;
    ensure!(mgr.get("crashy")?.status == SpriteStatus::Cold);
    let out = sh(&mgr, "crashy", "cat /home/sprite/synced; ls /home/sprite").await?;
    ensure!(out == "synced\nsynced\n", "after the crash: {out:?}");
    // The orphaned container of the dead process is gone: only the new one runs.
    let key = mgr.get("crashy")?.record.key;
    let procs = count_sprite_tasks(&key)?;
    ensure!(procs >= 1, "no task in the new container");
    ensure!(
        sh(&mgr, "crashy", "ps -o comm | grep -c sleep || true").await? == "0\n",
        "the old sleep survived"
    );
    close(mgr).await;
    for dev in &old_loops {
        // Unbound, or reused by someone else since; not still on a dead FUSE file.
        ensure!(
            den_block::loopdev::backing_file(dev)
                .is_none_or(|b| b != Path::new("/disk") && !fuse_files.contains(&b)),
            "{} is still bound to the crashed process's FUSE file",
            dev.display()
        );
    }
    Ok(())
}

/// 20 creates at once against a pool of 3: the first take pre-booted
/// sprites, the rest boot cold. Every sprite has exactly its own name,
/// hostname, limits, attributes and a fresh disk, whichever path it took,
/// and no pooled sprite is ever listed.
async fn pool_concurrent_creates() -> Result<()> {
    let env = Env::new()?;
    let mut cfg = env.config();
    cfg.pool_size = 3;
    let mgr = env.start(cfg).await?;
    mgr.pool_filled(WAIT).await?;
    ensure!(
        mgr.list().is_empty(),
        "pooled sprites are listed: {:?}",
        mgr.list()
    );
    let names: Vec<String> = (0..20).map(|i| format!("p{i:02}")).collect();
    let limits = |i: usize| Resources {
        memory_bytes: Some((200 + i as u64) << 20),
        pids: Some(300 + i as i64),
        ..Resources::default()
    };
    let creates: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (mgr, n) = (mgr.clone(), n.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let info = mgr
                    .create(
                        &n,
                        CreateSprite {
                            runtime: None,
                            attrs: serde_json::json!({ "i": i }),
                            resources: Some(limits(i)),
                            policy: None,
                        },
                    )
                    .await?;
                // A pool hit is running at once; then everyone marks its disk.
                let hit = info.status == SpriteStatus::Running;
                sh(&mgr, &n, &format!("echo {n} > /home/sprite/owner-{n}")).await?;
                anyhow::Ok((hit, t0.elapsed()))
            })
        })
        .collect();
    let mut hits = 0;
    for c in creates {
        let (hit, took) = c.await??;
        hits += usize::from(hit);
        if hit {
            println!("  pool hit: create + first output {took:?}");
        }
    }
    let stats = mgr.pool_stats();
    ensure!(
        stats.hits as usize == hits && (3..20).contains(&hits) && stats.hits + stats.misses == 20,
        "{stats:?}, {hits} created running"
    );
    let mode = den_runtime::cgroup::detect()?;
    for (i, n) in names.iter().enumerate() {
        let out = sh(
            &mgr,
            n,
            "hostname; cat /etc/hostname; grep -c \"$(hostname)\" /etc/hosts; ls /home/sprite",
        )
        .await?;
        ensure!(out == format!("{n}\n{n}\n1\nowner-{n}\n"), "{n} sees {out:?}");
        let rec = mgr.get(n)?.record;
        ensure!(
            rec.attrs == serde_json::json!({ "i": i }) && rec.resources == limits(i),
            "{rec:?}"
        );
        let cg = den_runtime::cgroup::SpriteCgroup::new(mode, &rec.key);
        let mem = match mode {
            den_runtime::cgroup::CgroupMode::V2 => cg.read("memory", "memory.max")?,
            _ => cg.read("memory", "memory.limit_in_bytes")?,
        };
        ensure!(
            mem == ((200 + i as u64) << 20).to_string()
                && cg.read("pids", "pids.max")? == (300 + i).to_string(),
            "{n}: memory {mem}"
        );
    }
    // Refilled in the background, and still not listed.
    mgr.pool_filled(WAIT).await?;
    ensure!(mgr.list().len() == 20);
    close(mgr).await;
    Ok(())
}

/// What a sprite pool holds on the host, found from its ledger: the keys,
/// and for each whether a volume, a cgroup task, a netns, a mount or a loop
/// device is left.
fn pool_leftovers(env: &Env, keys: &[String], volumes: &[String]) -> Result<Vec<String>> {
    let mut left = Vec::new();
    let run_dir = env.dir.path().join("run");
    for m in den_block::mountinfo::read()? {
        // The run dir's own (shared) bind mount is the running manager's.
        if m.mount_point.starts_with(&run_dir) && m.mount_point != run_dir {
            left.push(format!("mount {}", m.mount_point.display()));
            let file = m.mount_point.join(den_block::FuseOptions::default().file_name);
            for d in den_block::loopdev::devices_backed_by(&file) {
                left.push(format!("loop device {}", d.display()));
            }
        }
    }
    let prefix = &env.config().net.netns_prefix;
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix.as_str()) {
            left.push(format!("netns {name}"));
        }
    }
    let mode = den_runtime::cgroup::detect()?;
    for k in keys {
        let cg = den_runtime::cgroup::SpriteCgroup::new(mode, k);
        if cg.exists() {
            left.push(format!("cgroup of {k} ({} tasks)", cg.procs()?.len()));
        }
        if volumes.contains(&format!("sprite-{k}")) {
            left.push(format!("volume sprite-{k}"));
        }
    }
    let ledger = env.dir.path().join("data/pool");
    for e in std::fs::read_dir(&ledger).into_iter().flatten().flatten() {
        left.push(format!("ledger entry {}", e.file_name().to_string_lossy()));
    }
    Ok(left)
}

fn pool_keys(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.dir.path().join("data/pool"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

async fn volume_names(env: &Env) -> Result<Vec<String>> {
    Ok(env
        .store()
        .await?
        .list_volumes()
        .await?
        .into_iter()
        .map(|v| v.name)
        .collect())
}

/// A full pool stopped cleanly, and a full pool whose server is killed with
/// SIGKILL, leave no loop device, mount, network namespace, cgroup or
/// volume behind (the second after the next start).
async fn pool_stop_and_kill_leak_nothing() -> Result<()> {
    let env = Env::new()?;
    let mut cfg = env.config();
    cfg.pool_size = 2;
    let mgr = env.start(cfg.clone()).await?;
    mgr.pool_filled(WAIT).await?;
    let keys = pool_keys(&env);
    ensure!(keys.len() == 2, "ledger: {keys:?}");
    for k in &keys {
        ensure!(count_sprite_tasks(k)? >= 1, "pooled sprite {k} is not running");
        ensure!(volume_names(&env).await?.contains(&format!("sprite-{k}")));
    }
    close(mgr).await;
    let left = pool_leftovers(&env, &keys, &volume_names(&env).await?)?;
    ensure!(left.is_empty(), "after a clean stop: {left:?}");

    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg(POOL_CHILD)
        .arg(env.dir.path())
        .args(net_args(&cfg.net))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::task::block_in_place(|| std::io::BufRead::read_line(&mut stdout, &mut line))?;
    ensure!(line.trim() == "ready", "child said {line:?}");
    let keys = pool_keys(&env);
    ensure!(keys.len() == 2, "ledger of the killed server: {keys:?}");
    child.kill()?;
    child.wait()?;
    ensure!(
        !pool_leftovers(&env, &keys, &volume_names(&env).await?)?.is_empty(),
        "the killed server left nothing to clean up: the check below proves nothing"
    );
    cfg.pool_size = 0;
    let mgr = env.start(cfg).await?;
    let left = pool_leftovers(&env, &keys, &volume_names(&env).await?)?;
    ensure!(left.is_empty(), "after the restart: {left:?}");
    close(mgr).await;
    let left = pool_leftovers(&env, &keys, &volume_names(&env).await?)?;
    ensure!(left.is_empty(), "after the restart and a stop: {left:?}");
    Ok(())
}

/// The pool child: a manager with a full pool of 2; prints "ready" and
/// waits to be killed.
fn pool_child(args: &[OsString]) -> ! {
    crash_child_main(
        args,
        |cfg| cfg.pool_size = 2,
        async |mgr| {
            mgr.pool_filled(WAIT).await.expect("pool");
            println!("ready");
        },
    )
}

/// The crash child: a manager with one running sprite that wrote and synced
/// a file and runs a `sleep`; prints "ready" and waits to be killed.
fn crash_child(args: &[OsString]) -> ! {
    crash_child_main(
        args,
        |_| {},
        async |mgr| {
            mgr.create("crashy", CreateSprite::default())
                .await
                .expect("create");
            // `sync -f`: a plain `sync` reaches every filesystem on the host,
            // and hangs on any other test's stuck disk.
            sh(
                &mgr,
                "crashy",
                "echo synced > /home/sprite/synced && sync -f /home/sprite/synced",
            )
            .await
            .expect("write");
            let act = mgr.wake("crashy").await.expect("wake");
            let mut req = sh_req("sleep 1000");
            req.max_run_after_disconnect_ms = Some(0);
            act.agent().exec(req).await.expect("sleep").detach();
            println!("ready");
        },
    )
}

/// What a program wrote to a file it still holds open, without fsync, is
/// in a checkpoint, a live fork and a cold sprite's disk: under gVisor the
/// sentry may hold such writes in its own page cache, where a sync of the
/// host's filesystem does not reach.
async fn held_writes_reach_the_disk(rt: Runtime) -> Result<()> {
    let env = Env::on(rt)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("w", CreateSprite::default()).await?;
    sh(
        &mgr,
        "w",
        "(exec 3>/home/sprite/held; printf first >&3; echo > /home/sprite/ready; exec sleep 600) >/dev/null 2>&1 &
         while [ ! -e /home/sprite/ready ]; do sleep 0.01; done",
    )
    .await?;
    let ck = mgr.checkpoint("w", "held").await?;
    mgr.fork("w", "from-ck", Some(&ck.id), None).await?;
    mgr.fork("w", "live", None, None).await?;
    for f in ["from-ck", "live"] {
        let got = sh(&mgr, f, "cat /home/sprite/held").await?;
        ensure!(got == "first", "{f} sees {got:?} of the held file");
    }
    // Restored over a later state, and cold: the disk has it too.
    sh(&mgr, "w", "echo later > /home/sprite/later").await?;
    mgr.restore("w", &ck.id).await?;
    let got = sh(&mgr, "w", "cat /home/sprite/held; ls /home/sprite").await?;
    ensure!(
        got.starts_with("first") && !got.contains("later"),
        "after the restore: {got:?}"
    );
    close(mgr).await;
    Ok(())
}

/// The real Debian userland: `sprite` with passwordless sudo, home, apt.
async fn debian_userland(rt: Runtime) -> Result<()> {
    let images = std::env::var_os("DEN_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/den-test-images"));
    std::fs::create_dir_all(&images)?;
    let env = Env::with_image(rt, ImageSource::Debian, Some(images))?;
    let mgr = env.start(env.config()).await?;
    let t0 = Instant::now();
    mgr.create("deb", CreateSprite::default()).await?;
    let out = sh(
        &mgr,
        "deb",
        "whoami; echo $HOME; sudo -n id -u 2>&1; bash --version | head -1 | cut -c1-13; apt-get --version | head -1 | cut -d' ' -f1; python3 -c 'print(6*7)'",
    )
    .await?;
    println!("  create → output (Debian): {:?}", t0.elapsed());
    // Under gVisor every process has no_new_privs (this runsc sets it), so
    // setuid can't elevate: the agent brokers `sudo` there. The same
    // commands give the same answers on both runtimes.
    ensure!(
        out == "sprite\n/home/sprite\n0\nGNU bash, ver\napt\n42\n",
        "{out:?}"
    );
    let out = sh(
        &mgr,
        "deb",
        "cd /tmp && echo piped | sudo cat; sudo -u nobody id -un; sudo sh -c 'exit 3'; echo \"exit $?\";
         sudo pwd; sudo -i pwd; sudo -E env | grep -c '^HOME=/home/sprite$'; sudo env | grep '^HOME='; sudo FOO=bar sh -c 'echo $FOO $SUDO_USER'",
    )
    .await?;
    ensure!(
        out == "piped\nnobody\nexit 3\n/tmp\n/root\n1\nHOME=/root\nbar sprite\n",
        "sudo on {rt:?}: {out:?}"
    );
    // A signal to sudo reaches the command.
    let out = sh(
        &mgr,
        "deb",
        "cd /tmp && sudo sh -c 'echo $$ > /tmp/sudo.pid; exec sleep 600' & spid=$!
         while [ ! -s /tmp/sudo.pid ]; do sleep 0.01; done
         kill -TERM $spid; wait $spid; echo \"status $?\"
         [ -d /proc/$(cat /tmp/sudo.pid) ] && echo running || echo gone",
    )
    .await?;
    ensure!(out == "status 143\ngone\n", "sudo and SIGTERM on {rt:?}: {out:?}");
    // Only those the sprite's sudoers allow: not `nobody`.
    let denied = exec(
        &mgr,
        "deb",
        den_agent::client::ExecRequest {
            user: Some("nobody".into()),
            ..sh_req("cd /tmp && sudo -n id -u")
        },
    )
    .await?;
    ensure!(
        denied.code != 0 && !denied.stdout.contains('0'),
        "nobody got root through sudo on {rt:?}: {denied:?}"
    );
    let root = root_sh(&mgr, "deb", "id -u").await?;
    ensure!(
        root.code == 0 && root.stdout == "0\n",
        "root exec: {}",
        root.stderr
    );
    // Pages a program changed through a shared mapping, never synced, are
    // in a live fork.
    sh(
        &mgr,
        "deb",
        "python3 -c 'import mmap,os,time
f=open(\"/home/sprite/mapped\",\"w+b\"); f.truncate(4096)
m=mmap.mmap(f.fileno(),4096); m[:7]=b\"mmapped\"; print(\"ok\",flush=True); time.sleep(600)' >/tmp/mm.out 2>&1 &
         while [ ! -s /tmp/mm.out ]; do sleep 0.01; done",
    )
    .await?;
    mgr.fork("deb", "deb2", None, None).await?;
    ensure!(sh(&mgr, "deb2", "head -c 7 /home/sprite/mapped").await? == "mmapped");
    // Root changes under /usr/local persist across a cold boot.
    let made = root_sh(
        &mgr,
        "deb",
        "echo tool > /usr/local/bin/mytool && chmod +x /usr/local/bin/mytool",
    )
    .await?;
    ensure!(made.code == 0, "{}", made.stderr);
    mgr.sleep("deb", SpriteStatus::Cold).await?;
    ensure!(
        sh(
            &mgr,
            "deb",
            "cat /usr/local/bin/mytool; ls -ld /home/sprite | cut -d' ' -f3"
        )
        .await?
            == "tool\nsprite\n"
    );
    close(mgr).await;
    Ok(())
}

/// A gVisor sprite, which keeps its processes through a cold sleep, goes
/// cold after `cold_after_keeping_memory`; a native one only after
/// `cold_after`.
async fn gvisor_goes_cold_early() -> Result<()> {
    let env = Env::on(Runtime::Gvisor)?;
    let mut cfg = env.config();
    cfg.warm_after = Duration::from_millis(200);
    cfg.cold_after = Duration::from_secs(3600);
    cfg.cold_after_keeping_memory = Duration::from_millis(800);
    let mgr = env.start(cfg).await?;
    mgr.create("gv", CreateSprite::default()).await?;
    let native = CreateSprite {
        runtime: Some(Runtime::Native),
        ..Default::default()
    };
    mgr.create("nat", native).await?;
    sh(&mgr, "nat", "true").await?;
    sh(&mgr, "gv", "echo kept > /tmp/state").await?;
    let took = wait_status(&mgr, "gv", SpriteStatus::Cold, WAIT).await?;
    println!("  gVisor sprite cold after {took:?} idle");
    ensure!(
        mgr.get("nat")?.status == SpriteStatus::Warm,
        "the native sprite is {:?}",
        mgr.get("nat")?.status
    );
    // Nothing lost: its /tmp is the sandbox's memory.
    ensure!(sh(&mgr, "gv", "cat /tmp/state").await? == "kept\n");
    close(mgr).await;
    Ok(())
}

/// Inside a sprite: bind a unix socket at the path given, say so, and wait.
const BIND_UNIX: &str = "bind-unix";

fn bind_unix(args: &[OsString]) -> ! {
    let path = args.first().expect("bind-unix PATH");
    let _listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    println!("listening");
    loop {
        std::thread::park();
    }
}

/// A gVisor sprite holding something runsc can't save (a host-backed
/// socket: the sprite's root bound one in the directory the host shares
/// with it) goes cold the plain way and says why on the sprite; its next
/// cold sleep keeps its processes again and clears the note.
async fn cold_without_processes_says_why() -> Result<()> {
    let env = Env::on(Runtime::Gvisor)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("note", CreateSprite::default()).await?;
    let act = mgr.wake("note").await?;
    let mut req = sh_req(&in_sprite_den(&format!("{BIND_UNIX} /.sprite/run/mine.sock")));
    req.user = Some("root".into());
    req.max_run_after_disconnect_ms = Some(0);
    let mut session = act.agent().exec(req).await?;
    until_said(&mut session, "listening", "bind-unix").await?;
    session.detach();
    drop(act);
    mgr.sleep("note", SpriteStatus::Cold).await?;
    let note = mgr.get("note")?.record.sleep_note.unwrap_or_default();
    ensure!(note.contains("could not be saved"), "sleep note: {note:?}");
    ensure!(
        !note.contains('\n') && note.len() <= 300,
        "one short line: {note:?}"
    );
    // Woken afresh (the socket's process is gone); without it, memory is
    // kept again, and the note goes.
    sh(&mgr, "note", "echo kept > /tmp/state").await?;
    mgr.sleep("note", SpriteStatus::Cold).await?;
    ensure!(mgr.get("note")?.record.sleep_note.is_none());
    ensure!(sh(&mgr, "note", "cat /tmp/state").await? == "kept\n");
    close(mgr).await;
    Ok(())
}

/// The count a sprite's counter process last wrote.
async fn count(mgr: &SpriteManager, name: &str) -> Result<u64> {
    Ok(sh(mgr, name, "cat /home/sprite/count").await?.trim().parse()?)
}

/// Waits until `name`'s counter writes a value other than `not`, and returns it.
async fn next_count(mgr: &SpriteManager, name: &str, not: u64) -> Result<u64> {
    let t0 = Instant::now();
    loop {
        let c = count(mgr, name).await?;
        if c != not {
            return Ok(c);
        }
        ensure!(t0.elapsed() < WAIT, "{name}'s counter stays at {c}");
    }
}

/// gVisor: checkpoints with memory, cold sleep with processes, and forks
/// of a memory checkpoint. The counter is a shell loop (its count lives in
/// the process's memory and is written to the disk each round); a file is
/// held open with written, unflushed data; a server listens.
async fn memory_checkpoints() -> Result<()> {
    let env = Env::on(Runtime::Gvisor)?;
    let mgr = env.start(env.config()).await?;
    mgr.create("mem", CreateSprite::default()).await?;
    sh(
        &mgr,
        "mem",
        "mkdir -p /home/sprite/www && echo served > /home/sprite/www/index.html &&
         httpd -p 8080 -h /home/sprite/www &&
         (i=0; while :; do i=$((i+1)); echo $i > /home/sprite/count.new; mv /home/sprite/count.new /home/sprite/count; sleep 0.02; done) >/dev/null 2>&1 &
         (exec 3>/home/sprite/open; echo before >&3; exec sleep 600) >/dev/null 2>&1 &
         while [ ! -s /home/sprite/count ] || [ ! -s /home/sprite/open ]; do sleep 0.01; done",
    )
    .await?;
    let serve = |mgr: SpriteManager| async move {
        let addr = mgr.wake("mem").await?.addr();
        let got = tokio::task::spawn_blocking(move || http_get(SocketAddrV4::new(addr, 8080))).await??;
        ensure!(got.ends_with("served\n"), "the server answered {got:?}");
        anyhow::Ok(())
    };
    serve(mgr.clone()).await?;

    // Memory and disk together; the sprite runs on.
    let c0 = count(&mgr, "mem").await?;
    let t0 = Instant::now();
    let ck = mgr.checkpoint_memory("mem", "with memory").await?;
    println!("  memory checkpoint: {:?}", t0.elapsed());
    let c_ck = count(&mgr, "mem").await?;
    ensure!(c_ck >= c0);
    ensure!(mgr.memory_checkpoints("mem").await?.contains(&ck.id));
    // Its image counts in what the sprite stores (quotas use this).
    let disk_only = mgr.store().stored_bytes(&mgr.get("mem")?.record.volume).await?;
    let with_memory = mgr.stored_bytes(&["mem"]).await?;
    let image = mgr.memory_image_bytes("mem", &ck.id).await?;
    ensure!(
        with_memory > disk_only,
        "the memory image is not counted: {with_memory} with, {disk_only} without; image {image:?}"
    );
    let plain = mgr.checkpoint("mem", "disk only").await?;
    ensure!(!mgr.memory_checkpoints("mem").await?.contains(&plain.id));
    let c1 = next_count(&mgr, "mem", c_ck).await?;
    ensure!(c1 > c_ck, "the counter runs on after the checkpoint");
    while count(&mgr, "mem").await? < c_ck + 30 {}
    sh(
        &mgr,
        "mem",
        "echo after >> /home/sprite/open.other; pkill httpd || killall httpd",
    )
    .await?;

    // Restore: the processes come back as they were at the checkpoint.
    let t0 = Instant::now();
    mgr.restore("mem", &ck.id).await?;
    let before = count(&mgr, "mem").await?;
    println!("  memory restore → output: {:?}", t0.elapsed());
    let c2 = next_count(&mgr, "mem", before).await?;
    ensure!(
        c2 >= c_ck && c2 < c_ck + 30,
        "after the restore the counter went on from {c_ck} (at the checkpoint): {c2}"
    );
    serve(mgr.clone()).await?;
    let files = sh(&mgr, "mem", "ls /home/sprite; cat /home/sprite/open").await?;
    ensure!(!files.contains("open.other"), "the disk was rewound: {files}");
    ensure!(files.contains("before\n"), "the open file's data: {files}");

    // Cold with its processes, a den restart in between.
    let c3 = count(&mgr, "mem").await?;
    let t0 = Instant::now();
    mgr.sleep("mem", SpriteStatus::Cold).await?;
    println!("  cold sleep with processes: {:?}", t0.elapsed());
    let c_cold = count_on_disk(&env, &mgr, "mem").await?;
    ensure!(c_cold >= c3);
    close(mgr).await;
    let mgr = env.start(env.config()).await?;
    ensure!(mgr.get("mem")?.status == SpriteStatus::Cold);
    let t0 = Instant::now();
    let c4 = count(&mgr, "mem").await?;
    println!("  cold wake with processes → output: {:?}", t0.elapsed());
    // It went on from where it stopped (a fresh boot would run no counter).
    ensure!(
        c4 >= c_cold && c4 < c_cold + 50,
        "the counter went on from {c_cold} (when it went cold): {c4}"
    );
    let c5 = next_count(&mgr, "mem", c4).await?;
    ensure!(c5 > c4, "the counter runs after the wake");
    serve(mgr.clone()).await?;

    // Three forks of the memory checkpoint, each running on its own.
    for f in ["f1", "f2", "f3"] {
        mgr.fork("mem", f, Some(&ck.id), None).await?;
    }
    for f in ["f1", "f2", "f3"] {
        let c = next_count(&mgr, f, 0).await?;
        let host = sh(&mgr, f, "hostname").await?;
        ensure!(host == format!("{f}\n"), "{f} is called {host:?}");
        ensure!(c >= c_ck && c < c_ck + 200, "{f} went on from {c_ck}: {c}");
    }
    // Each fork answers on its own address, with the server it inherited.
    for f in ["f1", "f2"] {
        let addr = mgr.wake(f).await?.addr();
        let got = tokio::task::spawn_blocking(move || http_get(SocketAddrV4::new(addr, 8080))).await??;
        ensure!(got.ends_with("served\n"), "{f}'s server answered {got:?}");
    }
    sh(&mgr, "f1", "pkill -f 'while' ; true").await?;
    let f2a = count(&mgr, "f2").await?;
    ensure!(next_count(&mgr, "f2", f2a).await? > f2a, "f2 runs on its own");
    close(mgr).await;
    Ok(())
}

/// The count as the disk has it, read without waking the sprite's
/// processes from memory: through a fork of its live disk.
async fn count_on_disk(_env: &Env, mgr: &SpriteManager, name: &str) -> Result<u64> {
    let probe = format!("{name}-probe");
    mgr.fork(name, &probe, None, None).await?;
    let c = sh(mgr, &probe, "cat /home/sprite/count").await?.trim().parse()?;
    mgr.delete(&probe).await?;
    Ok(c)
}

/// One HTTP/1.0 GET of `/` (busybox httpd), the whole answer.
fn http_get(addr: SocketAddrV4) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr.into(), WAIT)?;
    s.set_read_timeout(Some(WAIT))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

// ------------------------------------------------------------------ main

fn main() {
    den_sprite::helper_cmd::dispatch();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == CRASH_CHILD) {
        crash_child(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == POOL_CHILD) {
        pool_child(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == BIND_UNIX) {
        bind_unix(&args[2..]);
    }
    // On both runtimes: what a sprite does, through the same agent and API.
    let each: &[(&str, RuntimeTestFn)] = &[
        ("lifecycle", |rt| Box::pin(lifecycle(rt))),
        ("sleep_and_wake", |rt| Box::pin(sleep_and_wake(rt))),
        ("events_restart_and_times", |rt| {
            Box::pin(events_restart_and_times(rt))
        }),
        ("egress_policy", |rt| Box::pin(egress_policy(rt))),
        ("services", |rt| Box::pin(services(rt))),
        ("init_death", |rt| Box::pin(init_death(rt))),
        ("debian_userland", |rt| Box::pin(debian_userland(rt))),
        ("held_writes_reach_the_disk", |rt| {
            Box::pin(held_writes_reach_the_disk(rt))
        }),
    ];
    // The native engine's own mechanics (host uids and mounts, pool).
    let single: &[(&str, TestFn)] = &[
        ("security", || Box::pin(security())),
        ("host_crash_recovery", || Box::pin(host_crash_recovery())),
        ("template_vs_cloned_mount_namespace", || {
            Box::pin(template_vs_cloned_mount_namespace())
        }),
        ("pool_concurrent_creates", || Box::pin(pool_concurrent_creates())),
        ("pool_stop_and_kill_leak_nothing", || {
            Box::pin(pool_stop_and_kill_leak_nothing())
        }),
        ("gvisor::memory_checkpoints", || Box::pin(memory_checkpoints())),
        ("gvisor::gvisor_goes_cold_early", || {
            Box::pin(gvisor_goes_cold_early())
        }),
        ("gvisor::cold_without_processes_says_why", || {
            Box::pin(cold_without_processes_says_why())
        }),
    ];
    run_runtime_tests(each, single);
}
