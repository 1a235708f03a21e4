//! Host-level abuse: several den servers on one host, other processes that
//! clone mount namespaces, a data dir nobody else may enter, and a server
//! killed in the middle of its own disk I/O. In each test the measure is what
//! the *other* server, sprite or process sees.
//!
//! Each "server" is a `SpriteManager` (in this process, or in a child
//! process of this binary when it must be killed with -9), with its own data
//! dir, run dir and `TestNet`; the image cache is shared, as on a real host.
//! The test binary doubles as the `den` binary inside the sprites.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_runtime::Runtime;
use den_sprite::{CreateSprite, ManagerConfig, SpriteManager, SpriteStatus, StorageStatus};
use den_store::{Store, StoreConfig};
use den_testkit::net::TestNet;

mod common;

use common::*;

const CHILD: &str = "abuse-child";
/// The child server's runtime, from its parent.
const CHILD_RUNTIME: &str = "DEN_ABUSE_CHILD_RUNTIME";
/// Local-only budget of the child server that loses its object store.
const DIRTY_LIMIT: u64 = 64 << 20;

/// One server's directories and network; the image cache may be shared.
struct Server {
    runtime: Runtime,
    managers: Managers,
    dir: tempfile::TempDir,
    images: PathBuf,
    net: TestNet,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.managers.close_all();
        // A test that failed after killing a server child: nothing restarted
        // it, so its devices and mounts (the run dir's own bind too) are
        // still there. Devices first, while their files still have paths.
        let run = self.run_dir();
        for dev in loops_below(self.dir.path()) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&dev).status();
        }
        let mut left = mounts_below(&run);
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in left {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Server {
    fn new(images: &Path) -> Result<Server> {
        Self::on(Runtime::Native, images)
    }

    /// A server whose sprites run on `runtime`.
    fn on(runtime: Runtime, images: &Path) -> Result<Server> {
        let dir = traversable_tempdir("den-abuse-host-")?;
        Ok(Server {
            runtime,
            managers: Default::default(),
            dir,
            images: images.to_path_buf(),
            net: TestNet::new()?,
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn config(&self) -> ManagerConfig {
        let mut cfg = test_config(self.dir.path(), &self.images, self.net.config.clone());
        cfg.runtime = self.runtime;
        cfg
    }

    async fn start(&self) -> Result<SpriteManager> {
        let mgr = start_at(self.config(), self.dir.path()).await?;
        self.managers.add(&mgr);
        Ok(mgr)
    }
}

fn shared_images() -> Result<tempfile::TempDir> {
    traversable_tempdir("den-abuse-images-")
}

/// A bystander's view: stop its sprite, boot it again and run a command
/// (a cold boot mounts a new overlay over the image); and create, boot and
/// run a brand-new one. Returns the cold boot → output time.
async fn bystander_boots(mgr: &SpriteManager, name: &str, fresh: &str) -> Result<Duration> {
    mgr.sleep(name, SpriteStatus::Cold).await?;
    let t0 = Instant::now();
    let out = sh(mgr, name, "cat /home/sprite/mark")
        .await
        .context("cold boot of the bystander")?;
    let took = t0.elapsed();
    ensure!(out == "kept\n", "{out:?}");
    mgr.create(fresh, CreateSprite::default()).await?;
    ensure!(sh(mgr, fresh, "echo new").await.context("booting a new sprite")? == "new\n");
    Ok(took)
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    den_block::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn loops_below(dir: &Path) -> Vec<PathBuf> {
    den_block::loopdev::devices_backed(|b| b.starts_with(dir))
}

// ------------------------------------------------------------------ tests

/// Two servers share the host's image cache. Stopping one (SIGTERM's
/// graceful path) used to unmount the idmapped image views in that shared
/// cache, so the other failed every boot with "failed to prepare rootfs".
async fn stopping_one_server_keeps_the_other_booting(rt: Runtime) -> Result<()> {
    let images = shared_images()?;
    let (a, b) = (Server::on(rt, images.path())?, Server::on(rt, images.path())?);
    let (ma, mb) = (a.start().await?, b.start().await?);
    ma.create("a1", CreateSprite::default()).await?;
    mb.create("b1", CreateSprite::default()).await?;
    ensure!(sh(&ma, "a1", "echo a").await? == "a\n");
    ensure!(sh(&mb, "b1", "echo kept > /home/sprite/mark; echo b").await? == "b\n");

    close(ma).await;
    ensure!(
        mounts_below(&a.run_dir()).is_empty(),
        "the stopped server left mounts: {:?}",
        mounts_below(&a.run_dir())
    );
    let took = bystander_boots(&mb, "b1", "b2").await?;
    println!("  bystander cold boot → output after the other server stopped: {took:?}");

    // The other way round, and a restart of the stopped one in between.
    let ma = a.start().await?;
    ensure!(sh(&ma, "a1", "echo again").await? == "again\n");
    close(mb).await;
    ma.sleep("a1", SpriteStatus::Cold).await?;
    ensure!(sh(&ma, "a1", "echo still").await? == "still\n");
    close(ma).await;
    Ok(())
}

/// A server killed with -9 while its sprite runs, then restarted (crash
/// recovery) and stopped: the other server's sprites still boot, and its
/// mounts are untouched throughout.
async fn killed_server_recovery_leaves_the_other_alone(rt: Runtime) -> Result<()> {
    let images = shared_images()?;
    let (a, b) = (Server::on(rt, images.path())?, Server::on(rt, images.path())?);
    let mb = b.start().await?;
    mb.create("b1", CreateSprite::default()).await?;
    ensure!(sh(&mb, "b1", "echo kept > /home/sprite/mark; echo b").await? == "b\n");
    // A process of the bystander that must live through the other's crash
    // and recovery (which removes the containers the dead server left).
    let act = mb.wake("b1").await?;
    let mut req = sh_req("sleep 1000");
    req.max_run_after_disconnect_ms = Some(0);
    act.agent().exec(req).await?.detach();
    drop(act);
    let b_mounts = mounts_below(&b.run_dir());

    let mut child = spawn_child(&a, "run-sprite")?;
    wait_ready(&mut child)?;
    ensure!(!mounts_below(&a.run_dir()).is_empty(), "the child runs no sprite");
    child.kill()?;
    child.wait()?;

    let ma = a.start().await?;
    ensure!(ma.get("crashy")?.status == SpriteStatus::Cold);
    ensure!(sh(&ma, "crashy", "cat /home/sprite/synced").await? == "synced\n");
    close(ma).await;
    ensure!(
        loops_below(&a.run_dir()).is_empty(),
        "loop devices of the killed server: {:?}",
        loops_below(&a.run_dir())
    );
    for m in &b_mounts {
        ensure!(
            mounts_below(&b.run_dir()).contains(m),
            "{} of the bystander was unmounted",
            m.display()
        );
    }
    let alive = sh(&mb, "b1", "ps | grep -c '[s]leep 1000'").await?;
    ensure!(
        alive == "1\n",
        "the bystander's process did not survive: {alive:?}"
    );
    let took = bystander_boots(&mb, "b1", "b2").await?;
    println!("  bystander cold boot → output after the other server's crash and recovery: {took:?}");
    close(mb).await;
    Ok(())
}

/// `den server --data-dir ~/den` as root (home 0700): the sprites' host uid
/// cannot walk into it. The manager used to start and then fail every boot;
/// it must refuse to start, naming the directory and the fix, and work
/// once the directory is searchable.
async fn data_dir_under_0700_parent_is_refused_with_the_fix() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let images = shared_images()?;
    let s = Server::new(images.path())?;
    let home = s.dir.path().join("home");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))?;
    let mut cfg = s.config();
    cfg.data_dir = home.join("den");
    cfg.run_dir = home.join("den/run");
    let err = match start_at(cfg.clone(), &home.join("den")).await {
        Ok(mgr) => {
            let booted = match mgr.create("x", CreateSprite::default()).await {
                Ok(_) => sh(&mgr, "x", "echo ok").await.map(|_| ()),
                Err(e) => Err(e.into()),
            };
            close(mgr).await;
            bail!("the manager started under a 0700 parent (a boot then gave {booted:?})");
        }
        Err(e) => format!("{e:#}"),
    };
    println!("  refused: {err}");
    ensure!(
        err.contains(&home.display().to_string()),
        "the error does not name {}: {err}",
        home.display()
    );
    ensure!(
        err.contains("chmod o+x"),
        "the error does not say how to fix it: {err}"
    );

    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711))?;
    let mgr = start_at(cfg, &home.join("den")).await?;
    s.managers.add(&mgr);
    mgr.create("x", CreateSprite::default()).await?;
    ensure!(sh(&mgr, "x", "echo ok").await? == "ok\n");
    close(mgr).await;
    Ok(())
}

/// Processes that clone their mount namespace while sprites run (a test
/// runner, a container starting, `unshare -m`) get copies of the sprites'
/// disk mounts. They used to pin the disks: a delete took ~60 s and failed
/// "volume … is in use", and a stop left mounts and loop devices behind.
/// Now delete and stop are quick and leave nothing, in our namespace or
/// theirs, whatever propagation the clone chose.
async fn cloned_mount_namespaces_do_not_pin_sprite_disks() -> Result<()> {
    let images = shared_images()?;
    let s = Server::new(images.path())?;
    let run = s.run_dir();
    let mgr = s.start().await?;
    for n in ["p1", "p2", "p3"] {
        mgr.create(n, CreateSprite::default()).await?;
        ensure!(sh(&mgr, n, "echo up").await? == "up\n");
    }
    // Clones of the namespace as it is now, with every sprite mounted.
    let mut holders = Holders(Vec::new());
    for prop in ["unchanged", "private", "slave"] {
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", prop, "sleep", "120"])
            .spawn()?;
        holders.0.push(child);
    }
    for h in &holders.0 {
        let pid = h.id();
        den_testkit::wait_until(WAIT, Duration::from_millis(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .is_ok_and(|t| t.contains(&format!("{}/", run.display())) && t.lines().count() > 5)
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("sleep"))
        })
        .context("a holder never started")?;
    }

    // The sprites' loop devices and the FUSE files they are bound to.
    let disks: Vec<(PathBuf, PathBuf)> = den_block::mountinfo::read()?
        .into_iter()
        .filter(|m| m.fstype == "ext4" && m.mount_point.starts_with(&run))
        .filter_map(|m| {
            let dev = PathBuf::from(&m.source);
            den_block::loopdev::backing_file(&dev).map(|b| (dev, b))
        })
        .collect();
    ensure!(disks.len() == 3, "sprite disks: {disks:?}");
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), mgr.delete("p1"))
        .await
        .context("deleting a sprite whose disk another namespace holds took over 20 s")??;
    let delete_took = t0.elapsed();
    println!("  delete with 3 foreign namespace copies: {delete_took:?}");
    mgr.sleep("p2", SpriteStatus::Cold).await?;
    ensure!(
        sh(&mgr, "p2", "echo back").await? == "back\n",
        "p2 did not boot again"
    );
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), close(mgr))
        .await
        .context("stopping the server took over 30 s")?;
    let stop_took = t0.elapsed();
    println!("  stop with 3 foreign namespace copies: {stop_took:?}");

    ensure!(
        mounts_below(&run).is_empty(),
        "mounts left: {:?}",
        mounts_below(&run)
    );
    ensure!(
        loops_below(&run).is_empty(),
        "loop devices left: {:?}",
        loops_below(&run)
    );
    for (dev, file) in &disks {
        let now = den_block::loopdev::backing_file(dev);
        ensure!(
            now.as_deref() != Some(file.as_path()) && now.as_deref() != Some(Path::new("/disk")),
            "{} is still bound to a sprite's disk file ({now:?})",
            dev.display()
        );
    }
    for h in &holders.0 {
        let text = std::fs::read_to_string(format!("/proc/{}/mountinfo", h.id()))?;
        let pinned: Vec<String> = den_block::mountinfo::parse(&text)
            .into_iter()
            // Disks and their FUSE files; views of the host's own disk (the
            // run dir's bind, the image's idmapped view) pin nothing. Only
            // below our run dir: a freed loop device may already carry
            // another server's disk, which reaches the holder by propagation.
            .filter(|m| {
                m.mount_point.starts_with(&run)
                    && (m.fstype == den_block::FUSE_FSTYPE
                        || disks.iter().any(|(dev, _)| Path::new(&m.source) == dev))
            })
            .map(|m| format!("{} {} {}", m.mount_point.display(), m.fstype, m.source))
            .collect();
        ensure!(
            pinned.is_empty(),
            "holder {} still has our mounts: {pinned:?}",
            h.id()
        );
        ensure!(
            std::fs::read_link(format!("/proc/{}/exe", h.id())).is_ok(),
            "a holder died (it must be left running)"
        );
    }
    ensure!(
        delete_took < Duration::from_secs(10),
        "delete took {delete_took:?}"
    );
    ensure!(stop_took < Duration::from_secs(20), "stop took {stop_took:?}");
    Ok(())
}

/// A server killed with -9 while its own disk I/O waits: the object store is
/// down, the sprite's writer has filled the local-only budget, and a
/// checkpoint is syncing the sprite's filesystem. The sync used to run on a
/// thread of the server, which then sat in uninterruptible sleep on a loop
/// device backed by the server's own (now dead) FUSE workers: the process
/// never exited and everything touching the mount hung. Now it exits at
/// once; the next start aborts what is left of its FUSE connections and
/// recovers the sprite with its synced data; a bystander server is untouched.
async fn killed_during_own_disk_io_exits_and_recovers() -> Result<()> {
    let images = shared_images()?;
    let (a, b) = (Server::new(images.path())?, Server::new(images.path())?);
    let mb = b.start().await?;
    mb.create("b1", CreateSprite::default()).await?;
    ensure!(sh(&mb, "b1", "echo kept > /home/sprite/mark; echo b").await? == "b\n");
    // A process of the bystander that must live through the other's crash
    // and recovery (which removes the containers the dead server left).
    let act = mb.wake("b1").await?;
    let mut req = sh_req("sleep 1000");
    req.max_run_after_disconnect_ms = Some(0);
    act.agent().exec(req).await?.detach();
    drop(act);
    let b_mounts = mounts_below(&b.run_dir());

    let mut child = spawn_child(&a, "checkpoint-store-down")?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    expect_line(&mut stdout, "ready")?;
    // The object store goes down: uploads fail (EROFS) and are retried.
    let outage = ReadOnly::bind(&a.dir.path().join("data/store/objects"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    std::io::Write::write_all(&mut stdin, b"go\n")?;
    expect_line(&mut stdout, "checkpointing")?;
    // Wait until the sync is stuck in the kernel (in the server or in a
    // helper process of it).
    let pid = child.id() as i32;
    den_testkit::wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        tasks_in_d(pid)
    })
    .context("the checkpoint's sync never blocked")?;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let t0 = Instant::now();
    let mut exited = false;
    while t0.elapsed() < Duration::from_secs(10) {
        if child.try_wait()?.is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exit_took = t0.elapsed();
    drop(outage);
    // Recovery (also what frees a stuck process when the test fails).
    let t1 = Instant::now();
    let ma = a.start().await?;
    let recovered_in = t1.elapsed();
    if !exited {
        let _ = tokio::task::block_in_place(|| child.wait());
        bail!("the killed server was still alive {exit_took:?} after SIGKILL (stuck in its own disk I/O)");
    }
    println!("  killed server exited {exit_took:?} after SIGKILL; restart took {recovered_in:?}");
    ensure!(ma.get("crashy")?.status == SpriteStatus::Cold);
    ensure!(sh(&ma, "crashy", "cat /home/sprite/synced").await? == "synced\n");
    close(ma).await;
    ensure!(
        loops_below(&a.run_dir()).is_empty(),
        "loop devices left: {:?}",
        loops_below(&a.run_dir())
    );
    for m in &b_mounts {
        ensure!(
            mounts_below(&b.run_dir()).contains(m),
            "{} of the bystander was unmounted",
            m.display()
        );
    }
    let alive = sh(&mb, "b1", "ps | grep -c '[s]leep 1000'").await?;
    ensure!(
        alive == "1\n",
        "the bystander's process did not survive: {alive:?}"
    );
    let took = bystander_boots(&mb, "b1", "b2").await?;
    println!("  bystander cold boot → output afterwards: {took:?}");
    close(mb).await;
    Ok(())
}

/// Whether a task of process `pid`, or of one of its children, is in
/// uninterruptible sleep.
/// Poll `cond` every 50 ms without blocking the runtime, up to `limit`.
async fn poll(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !cond() {
        ensure!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A loop-mounted ext4 of its own, unmounted (lazily, so a failed test
/// never leaves it behind) when dropped.
struct LoopFs(PathBuf);

impl LoopFs {
    fn new(dir: &Path, mib: u64) -> Result<LoopFs> {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::File::create(&img)?.set_len(mib << 20)?;
        std::fs::create_dir(&mnt)?;
        for (prog, args) in [
            ("mkfs.ext4", vec!["-q", "-F", img.to_str().unwrap()]),
            (
                "mount",
                vec!["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
            ),
        ] {
            let st = std::process::Command::new(prog).args(&args).status()?;
            ensure!(st.success(), "{prog} {args:?}: {st}");
        }
        Ok(LoopFs(mnt))
    }

    fn free(&self) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.0)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Issue 10, "a full data disk": writers block instead of failing, but the
/// user saw only a hang. Now the sprite whose writes wait for space says
/// `disk_full` (`storage_status` in the API), the others `ok`, and it goes
/// back to `ok` and the writer completes once space is freed.
async fn full_data_disk_shows_on_the_writing_sprite() -> Result<()> {
    const MIB: u64 = 1 << 20;
    const MIN_FREE: u64 = 48 * MIB;
    // Dropped after the server (whose managers close first).
    let disk_dir = traversable_tempdir("den-abuse-fulldisk-")?;
    let disk = LoopFs::new(disk_dir.path(), 512)?;
    let images = shared_images()?;
    let s = Server::new(images.path())?;
    let mut store_cfg = StoreConfig::local(disk.0.join("store"));
    store_cfg.min_free_bytes = Some(MIN_FREE);
    let mgr = SpriteManager::start(s.config(), Store::open(store_cfg).await?).await?;
    s.managers.add(&mgr);
    mgr.create("writer", CreateSprite::default()).await?;
    mgr.create("idle", CreateSprite::default()).await?;
    ensure!(sh(&mgr, "writer", "echo up").await? == "up\n");
    ensure!(sh(&mgr, "idle", "echo up").await? == "up\n");
    ensure!(mgr.get("writer")?.storage == StorageStatus::Ok);

    // Leave the writer about 24 MiB above the reserve, then write 96 MiB.
    // Removed on every way out: a writer still blocked would hold up the
    // managers' shutdown.
    let ballast = RemoveOnDrop(disk.0.join("ballast"));
    let fill = disk.free()?.saturating_sub(MIN_FREE + 24 * MIB);
    let st = std::process::Command::new("fallocate")
        .args(["-l", &fill.to_string()])
        .arg(&ballast.0)
        .status()?;
    ensure!(st.success(), "fallocate: {st}");
    let writer = tokio::spawn({
        let mgr = mgr.clone();
        async move {
            sh(
                &mgr,
                "writer",
                "dd if=/dev/urandom of=/home/sprite/big bs=1M count=96 conv=fsync 2>/dev/null && echo written",
            )
            .await
        }
    });
    let t0 = Instant::now();
    poll(
        Duration::from_secs(30),
        "the writer's status to become disk_full",
        || {
            writer.is_finished()
                || mgr
                    .get("writer")
                    .is_ok_and(|i| i.storage == StorageStatus::DiskFull)
        },
    )
    .await?;
    ensure!(
        !writer.is_finished(),
        "the writer finished on a full disk: {:?}",
        writer.await
    );
    println!("  writer's status disk_full after {:?}", t0.elapsed());
    ensure!(
        mgr.get("idle")?.storage == StorageStatus::Ok,
        "the idle sprite's status on the full disk"
    );
    ensure!(
        mgr.list()
            .iter()
            .find(|i| i.record.name == "writer")
            .is_some_and(|i| i.storage == StorageStatus::DiskFull),
        "list() disagrees with get()"
    );

    drop(ballast);
    let t0 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the writer's status to be ok again",
        || mgr.get("writer").is_ok_and(|i| i.storage == StorageStatus::Ok),
    )
    .await?;
    println!("  back to ok {:?} after space came back", t0.elapsed());
    let out = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .context("the writer never completed after space came back")???;
    ensure!(out == "written\n", "dd: {out:?}");
    Ok(())
}

fn tasks_in_d(pid: i32) -> bool {
    let in_d = |p: &str| {
        std::fs::read_dir(format!("/proc/{p}/task")).is_ok_and(|rd| {
            rd.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('D')))
            })
        })
    };
    if in_d(&pid.to_string()) {
        return true;
    }
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.parse::<i32>().is_ok()
            && std::fs::read_to_string(format!("/proc/{name}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<i32>().ok())
                    == Some(pid)
            })
            && in_d(&name)
    })
}

/// A directory made read-only (a bind of itself, remounted `ro`) until drop:
/// a local object store that refuses every upload.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn bind(dir: &Path) -> Result<ReadOnly> {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all(dir)?;
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
        let guard = ReadOnly(dir.to_path_buf());
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
        Ok(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Kills the clone holders when a test ends, also on failure.
struct Holders(Vec<std::process::Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ------------------------------------------------------------------ child

fn spawn_child(s: &Server, mode: &str) -> Result<std::process::Child> {
    let n = &s.net.config;
    Ok(std::process::Command::new(std::env::current_exe()?)
        .arg(CHILD)
        .arg(mode)
        .arg(s.dir.path())
        .arg(&s.images)
        .args(net_args(n))
        .env(CHILD_RUNTIME, s.runtime.as_str())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

fn wait_ready(child: &mut std::process::Child) -> Result<()> {
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    expect_line(&mut stdout, "ready")
}

fn expect_line(from: &mut impl std::io::BufRead, want: &str) -> Result<()> {
    let mut line = String::new();
    tokio::task::block_in_place(|| from.read_line(&mut line))?;
    ensure!(line.trim() == want, "child said {line:?}, not {want:?}");
    Ok(())
}

/// A server in a child process, to be killed with -9. Both modes start a
/// sprite that wrote and synced a file and print "ready". `run-sprite` then
/// waits. `checkpoint-store-down` waits for "go" on stdin (the parent has
/// taken the object store down), fills the local-only budget from inside the
/// sprite, starts a checkpoint, prints "checkpointing" and waits.
fn child_main(args: &[OsString]) -> ! {
    let a = strings(args);
    let (mode, dir, images) = (a[0].as_str(), PathBuf::from(&a[1]), PathBuf::from(&a[2]));
    let net = net_from_args(&a[3..]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut cfg = test_config(&dir, &images, net);
        cfg.runtime = std::env::var(CHILD_RUNTIME)
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(Runtime::Native);
        let mut scfg = StoreConfig::local(dir.join("data/store"));
        scfg.dirty_limit = DIRTY_LIMIT;
        let store = Store::open(scfg).await.expect("store");
        let mgr = SpriteManager::start(cfg, store).await.expect("manager");
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
        println!("ready");
        if mode == "checkpoint-store-down" {
            let mut go = String::new();
            std::io::stdin().read_line(&mut go).expect("stdin");
            // Far more than the budget, into the sprite's page cache (far
            // below the kernel's dirty thresholds, so the writer finishes
            // and the checkpoint's freeze succeeds): its sync then waits
            // for uploads that never succeed.
            sh(
                &mgr,
                "crashy",
                &format!(
                    "dd if=/dev/urandom of=/home/sprite/big bs=1M count={}",
                    2 * (DIRTY_LIMIT >> 20)
                ),
            )
            .await
            .expect("dd");
            let m = mgr.clone();
            tokio::spawn(async move { m.checkpoint("crashy", "during the outage").await });
            println!("checkpointing");
        }
        std::future::pending::<()>().await;
    });
    unreachable!()
}

// ------------------------------------------------------------------ main

fn main() {
    den_sprite::helper_cmd::dispatch();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == CHILD) {
        child_main(&args[2..]);
    }
    // Two servers of one runtime: neither's stop, crash or recovery may
    // touch the other's sprites (under gVisor, its sandboxes).
    let each: &[(&str, RuntimeTestFn)] = &[
        ("stopping_one_server_keeps_the_other_booting", |rt| {
            Box::pin(stopping_one_server_keeps_the_other_booting(rt))
        }),
        ("killed_server_recovery_leaves_the_other_alone", |rt| {
            Box::pin(killed_server_recovery_leaves_the_other_alone(rt))
        }),
    ];
    // Host storage and mount mechanics, the same for both runtimes.
    let tests: &[(&str, TestFn)] = &[
        ("data_dir_under_0700_parent_is_refused_with_the_fix", || {
            Box::pin(data_dir_under_0700_parent_is_refused_with_the_fix())
        }),
        ("cloned_mount_namespaces_do_not_pin_sprite_disks", || {
            Box::pin(cloned_mount_namespaces_do_not_pin_sprite_disks())
        }),
        ("killed_during_own_disk_io_exits_and_recovers", || {
            Box::pin(killed_during_own_disk_io_exits_and_recovers())
        }),
        ("full_data_disk_shows_on_the_writing_sprite", || {
            Box::pin(full_data_disk_shows_on_the_writing_sprite())
        }),
    ];
    run_runtime_tests(each, tests);
}
