//! `den-bench sprites`: the sprite runtime, end to end, through
//! [`SpriteManager`] — create, exec, warm and cold wake, checkpoint, restore,
//! fork and density — with `runc` on the same image rootfs as the baseline
//! ([`crate::runc`]), measured in the same run.
//!
//! Every "→ output" figure runs until the first stdout byte of `echo hi`
//! arrives at the host through the agent socket, so it includes everything a
//! user waits for: boot (disk, network, container, agent) or thaw, the exec
//! request, spawning the process and its output coming back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use den_agent::client::{Event, ExecRequest};
use den_net::{Ipv4Net, NetConfig};
use den_runtime::Resources;
use den_runtime::image::{BaseImage, LogProgress};
use den_sprite::{BootPhases, CreateSprite, ImageSource, ManagerConfig, SpriteManager, SpriteStatus};
use den_store::{Store, StoreConfig};
use rand::Rng;

use crate::cancel;
use crate::report::{Latency, TextTable, latency};
use crate::runc::{self, RuncBundle};

/// How long one command may take before the run fails.
const WAIT: Duration = Duration::from_secs(60);

/// Which base image the sprites (and runc) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchImage {
    Debian,
    Busybox,
}

impl BenchImage {
    pub(crate) fn base(self, images_dir: &Path) -> BaseImage {
        match self {
            BenchImage::Debian => BaseImage::debian(images_dir),
            BenchImage::Busybox => BaseImage::busybox(images_dir),
        }
    }

    fn source(self) -> ImageSource {
        match self {
            BenchImage::Debian => ImageSource::Debian,
            BenchImage::Busybox => ImageSource::Busybox,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BenchImage::Debian => "debian",
            BenchImage::Busybox => "busybox",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpriteBenchOptions {
    /// Data dir of the manager (store, catalog, images).
    pub work: PathBuf,
    /// Mounts and sockets of running sprites: keep it short.
    pub run_dir: PathBuf,
    /// The `den` binary (runs as `runtime-shim` and `agent`).
    pub den_exe: PathBuf,
    pub image: BenchImage,
    /// Samples of the boot-sized figures (create, wakes, restore, fork, checkpoint).
    pub samples: usize,
    /// Samples of the exec round trip (and of the runc exec/pause/resume baseline).
    pub exec_samples: usize,
    /// Sprites in the density test (0: skip it).
    pub density: usize,
    /// Measure the runc baseline.
    pub runc: bool,
    /// Pre-booted sprites kept for creates (0: no pool, no pool-hit row).
    pub pool: usize,
    /// The sprites' network: by default one no den server or test uses.
    pub net: NetConfig,
    /// The engine the sprites run on.
    pub runtime: den_runtime::Runtime,
    /// gVisor: MiB of memory a process in the sprite holds (random bytes in
    /// the sandbox's /tmp, a tmpfs in its memory) while its memory is checkpointed.
    pub resident_mib: u64,
    /// Time the syscall- and I/O-heavy [`WORKLOADS`] in a sprite on each
    /// engine (native, and `runtime` if it is another), same run.
    pub workloads: bool,
}

impl SpriteBenchOptions {
    pub fn new(work: PathBuf, den_exe: PathBuf, quick: bool) -> Self {
        SpriteBenchOptions {
            work,
            run_dir: PathBuf::from("/run/den-bench"),
            den_exe,
            image: BenchImage::Debian,
            samples: if quick { 3 } else { 20 },
            exec_samples: if quick { 20 } else { 200 },
            density: if quick { 10 } else { 100 },
            runc: true,
            pool: 2,
            net: net_config(),
            runtime: den_runtime::Runtime::Native,
            resident_mib: 100,
            workloads: false,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} sprites, {} image; {} samples per boot-sized figure, {} per exec round trip",
            self.runtime,
            self.image.name(),
            self.samples,
            self.exec_samples
        )
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct SpriteBenchResults {
    pub image_version: String,
    /// Creates served by a pre-booted sprite (the pool full before each).
    pub create_hit_to_output: Vec<Duration>,
    /// Creates with the pool off: the cold path a pool miss takes.
    pub create_to_output: Vec<Duration>,
    /// Pool hits and misses the manager counted over the create samples.
    pub pool_hits: u64,
    pub pool_misses: u64,
    pub exec_true: Vec<Duration>,
    pub freeze: Vec<Duration>,
    pub thaw: Vec<Duration>,
    pub warm_to_output: Vec<Duration>,
    pub cold_to_output: Vec<Duration>,
    pub checkpoint: Vec<Duration>,
    pub restore_to_output: Vec<Duration>,
    pub fork_to_output: Vec<Duration>,
    /// gVisor: checkpoints with memory of a sprite holding `resident_mib`.
    pub memory_checkpoint: Vec<Duration>,
    /// gVisor: restores of such a checkpoint, until an exec answers.
    pub memory_restore_to_output: Vec<Duration>,
    /// gVisor: the last memory image, its files' bytes and what the store
    /// holds of it after compression and deduplication.
    pub memory_image: Option<(u64, u64)>,
    /// The boots inside each measured operation, phase by phase.
    pub boots: Vec<(&'static str, Vec<BootPhases>)>,
    pub runc: Option<RuncResults>,
    /// Why the runc baseline is missing, if it is.
    pub runc_error: Option<String>,
    pub density: Option<DensityResults>,
    /// Each of [`WORKLOADS`]: its times on native, and on `runtime` when
    /// that is another engine.
    pub workloads: Vec<WorkloadResults>,
}

#[derive(Debug, Default)]
pub struct WorkloadResults {
    pub name: &'static str,
    pub native: Vec<Duration>,
    pub other: Vec<Duration>,
}

/// What a coding agent makes a sprite do, as shell scripts the busybox and
/// Debian images both run, in order (the stat walks the tree the first
/// made), in the default user's home on the sprite's disk. Timed from
/// the host: exec to exit status (the exec round trip is in its own row).
pub const WORKLOADS: &[(&str, &str)] = &[
    (
        "create 20,000 empty files in 200 directories",
        "rm -rf wl && mkdir wl && cd wl && i=0; while [ $i -lt 200 ]; do mkdir d$i; j=0; \
         while [ $j -lt 100 ]; do : > d$i/f$j; j=$((j+1)); done; i=$((i+1)); done",
    ),
    (
        "stat them all (`ls -lR`: what `git status` does to a tree)",
        "ls -lR wl > /dev/null",
    ),
    (
        "fork + exec `/bin/true` 500 times",
        "i=0; while [ $i -lt 500 ]; do /bin/true; i=$((i+1)); done",
    ),
    (
        "write 256 MiB and sync",
        "dd if=/dev/zero of=wl.io bs=1048576 count=256 2>/dev/null && sync",
    ),
    (
        "read them back",
        "dd if=wl.io of=/dev/null bs=1048576 2>/dev/null",
    ),
];

#[derive(Debug, Default)]
pub struct RuncResults {
    pub run_to_output: Vec<Duration>,
    pub exec_true: Vec<Duration>,
    pub pause: Vec<Duration>,
    pub resume: Vec<Duration>,
}

#[derive(Debug, Default)]
pub struct DensityResults {
    pub requested: usize,
    /// Sprites that were created, woken and put to Warm.
    pub reached: usize,
    /// The first failure, with the count at which it happened.
    pub failure: Option<String>,
    pub total: Duration,
    /// MemAvailable before − after, in bytes (all `reached` sprites warm).
    pub mem_available_drop: i64,
    /// Growth of this process's RSS (FUSE servers and store caches of the disks live here).
    pub rss_growth: i64,
    /// Growth of the page cache (`Cached` in /proc/meminfo).
    pub cached_growth: i64,
    /// Sum of the sprites' cgroup `memory.current`, in bytes (`None` if unreadable).
    pub cgroup_memory: Option<u64>,
    /// Within `rss_growth`: anonymous memory (heap, thread stacks, FUSE
    /// request buffers), from /proc/self/smaps_rollup.
    pub anon_growth: i64,
    /// Threads this process gained (FUSE workers, per-sprite tasks).
    pub threads_growth: i64,
    /// The process's FUSE worker pool at the end.
    pub fuse_pool: den_block::FusePoolStats,
    /// Kernel memory outside any page cache: slab, kernel stacks and page
    /// tables (/proc/meminfo), growth.
    pub kernel_growth: i64,
    /// Warm wake → output of one random sprite with all of them present.
    pub warm_to_output: Option<Duration>,
    /// How many were `Warm` at the end.
    pub warm_count: usize,
    /// Deleting all of them.
    pub delete_total: Duration,
}

impl DensityResults {
    pub fn mem_per_sprite(&self) -> Option<f64> {
        (self.reached > 0).then(|| self.mem_available_drop as f64 / self.reached as f64)
    }
}

/// A NetConfig that cannot collide with a den server or the tests.
fn net_config() -> NetConfig {
    let upstream = den_sprite::host_upstream_dns().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 53)));
    let mut cfg = NetConfig::new(upstream);
    cfg.subnet = "10.201.0.0/16".parse::<Ipv4Net>().expect("literal");
    cfg.table = "denbench".into();
    cfg.ifprefix = "db".into();
    cfg.netns_prefix = "denbench-".into();
    cfg
}

fn echo_hi() -> ExecRequest {
    ExecRequest {
        argv: vec!["echo".into(), "hi".into()],
        ..Default::default()
    }
}

fn run_true() -> ExecRequest {
    ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    }
}

/// Wake `name` (boot or thaw as needed), run `echo hi` and return when its
/// first stdout byte is back; the rest of the session is drained untimed.
async fn wake_to_output(mgr: &SpriteManager, name: &str, t0: Instant) -> Result<Duration> {
    let act = mgr.wake(name).await.with_context(|| format!("waking {name}"))?;
    let mut session = act.agent().exec(echo_hi()).await.context("exec echo")?;
    let first = tokio::time::timeout(WAIT, async {
        while let Some(ev) = session.recv().await {
            match ev {
                Event::Stdout(_) => return Ok(t0.elapsed()),
                Event::Exit(e) => bail!("echo exited {} before any output", e.exit_code),
                _ => {}
            }
        }
        bail!("the session ended without output")
    })
    .await
    .context("no output from echo")??;
    let exit = tokio::time::timeout(WAIT, session.wait_exit())
        .await
        .context("echo did not exit")?
        .context("no exit status")?;
    if exit.exit_code != 0 {
        bail!("echo exited {}", exit.exit_code);
    }
    Ok(first)
}

/// `true` until its exit status is back, on an awake sprite.
async fn exec_true(mgr: &SpriteManager, name: &str) -> Result<()> {
    let act = mgr.wake(name).await?;
    let mut session = act.agent().exec(run_true()).await?;
    let exit = tokio::time::timeout(WAIT, session.wait_exit())
        .await
        .context("true did not exit")?
        .context("no exit status")?;
    if exit.exit_code != 0 {
        bail!("true exited {}", exit.exit_code);
    }
    Ok(())
}

/// A `Key:  123 kB` line of a /proc file, in bytes.
fn proc_kib(file: &str, key: &str) -> Result<i64> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no {key} in {file}"))
}

/// A `Key:  123` line of a /proc file (a plain count).
fn proc_count(file: &str, key: &str) -> Result<i64> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().parse().ok())
        .with_context(|| format!("no {key} in {file}"))
}

/// Slab, kernel stacks and page tables: what sprites cost the kernel
/// besides page cache.
fn kernel_memory() -> Result<i64> {
    Ok(proc_kib("/proc/meminfo", "Slab")?
        + proc_kib("/proc/meminfo", "KernelStack")?
        + proc_kib("/proc/meminfo", "PageTables")?)
}

fn mem_available() -> Result<i64> {
    proc_kib("/proc/meminfo", "MemAvailable")
}

/// Memory charged to a sprite's cgroup `/den/<key>`: `memory.current`
/// (cgroup v2) or `memory.usage_in_bytes` (v1; includes its page cache).
fn cgroup_memory(key: &str) -> Option<u64> {
    [
        format!("/sys/fs/cgroup/den/{key}/memory.current"),
        format!("/sys/fs/cgroup/memory/den/{key}/memory.usage_in_bytes"),
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
}

/// Delete every sprite of this bench (names start with `b-`): leftovers of an
/// interrupted earlier run, or of this one.
pub(crate) async fn delete_all(mgr: &SpriteManager) {
    for info in mgr.list() {
        if let Err(e) = mgr.delete(&info.record.name).await {
            tracing::warn!(sprite = %info.record.name, error = %e, "deleting a bench sprite");
        }
    }
}

/// Run the whole benchmark. The manager is always shut down and its firewall
/// removed, also on errors and Ctrl-C.
pub async fn run(opts: &SpriteBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<SpriteBenchResults> {
    std::fs::create_dir_all(&opts.work).with_context(|| format!("creating {}", opts.work.display()))?;
    let images_dir = opts.work.join("images");
    progress(&format!(
        "preparing the {} image (built once, then cached in {})",
        opts.image.name(),
        images_dir.display()
    ));
    let base = opts.image.base(&images_dir);
    let image = tokio::task::spawn_blocking(move || base.ensure(&LogProgress))
        .await?
        .context("building the base image")?;
    cancel::check()?;

    let mut res = SpriteBenchResults {
        image_version: image.version().to_string(),
        ..Default::default()
    };

    if opts.runc {
        if runc::available() {
            progress("runc baseline (same rootfs)");
            let dir = opts.work.join("runc");
            let rootfs = image.rootfs();
            let (n, m) = (opts.samples, opts.exec_samples);
            let r = tokio::task::spawn_blocking(move || -> Result<RuncResults> {
                let mut b = RuncBundle::new(&dir, &rootfs)?;
                let run_to_output = b.run_to_output(n)?;
                let (exec_true, pause, resume) = b.exec_pause_resume(m)?;
                Ok(RuncResults {
                    run_to_output,
                    exec_true,
                    pause,
                    resume,
                })
            })
            .await?;
            match r {
                Ok(r) => res.runc = Some(r),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "runc baseline failed");
                    res.runc_error = Some(format!("{e:#}"));
                }
            }
        } else {
            res.runc_error = Some("runc is not installed".into());
        }
        cancel::check()?;
    }

    let mut cfg = ManagerConfig::new(opts.work.join("data"), &opts.den_exe, opts.net.clone());
    cfg.run_dir = opts.run_dir.clone();
    cfg.images_dir = images_dir;
    cfg.image = opts.image.source();
    cfg.resources = Resources::sprite_default();
    // The bench decides when sprites sleep.
    cfg.warm_after = Duration::from_secs(24 * 3600);
    cfg.cold_after = Duration::from_secs(48 * 3600);
    cfg.cold_after_keeping_memory = cfg.cold_after;
    cfg.pool_size = opts.pool;
    cfg.runtime = opts.runtime;
    let store = Store::open(StoreConfig::local(opts.work.join("data/store")))
        .await
        .context("opening the bench's store")?;
    progress("starting the sprite manager");
    let mgr = SpriteManager::start(cfg, store)
        .await
        .context("starting the sprite manager")?;
    delete_all(&mgr).await;
    let outcome = measure(&mgr, opts, &mut res, progress).await;
    progress("deleting the bench's sprites and shutting the manager down");
    delete_all(&mgr).await;
    mgr.shutdown().await;
    mgr.remove_firewall();
    drop(mgr);
    // The manager leaves the image's idmapped lower mounted for the next
    // start; the bench's image dir is its own, so release it.
    if let Err(e) = image.release_idmapped() {
        tracing::warn!(error = %e, "unmounting the idmapped image");
    }
    outcome?;
    Ok(res)
}

async fn measure(
    mgr: &SpriteManager,
    opts: &SpriteBenchOptions,
    res: &mut SpriteBenchResults,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let n = opts.samples.max(1);

    // The disk template is made on the first create of an image version:
    // once per data dir, not part of any figure.
    progress("warm-up: first create (makes the disk template once)");
    mgr.create("b-warmup", CreateSprite::default()).await?;
    wake_to_output(mgr, "b-warmup", Instant::now()).await?;
    mgr.delete("b-warmup").await?;

    if opts.pool > 0 {
        progress(&format!("create → first output, pool hit ×{n}"));
        let before = mgr.pool_stats();
        for i in 0..n {
            cancel::check()?;
            // A full pool, and no refill boot running beside the sample.
            mgr.pool_filled(Duration::from_secs(120)).await?;
            let name = format!("b-h{i}");
            let t0 = Instant::now();
            mgr.create(&name, CreateSprite::default()).await?;
            res.create_hit_to_output
                .push(wake_to_output(mgr, &name, t0).await?);
            mgr.delete(&name).await?;
        }
        let after = mgr.pool_stats();
        res.pool_hits = after.hits - before.hits;
        res.pool_misses = after.misses - before.misses;
        // With the pool full before each create, a miss is a bug, not noise.
        anyhow::ensure!(
            res.pool_hits == n as u64 && res.pool_misses == 0,
            "the pool served {} of {n} creates ({} misses) although it was full before each",
            res.pool_hits,
            res.pool_misses
        );
    }
    // The rest runs without the pool: its refills would boot beside the
    // measurements, and the cold create is the path of a pool miss.
    mgr.set_pool_size(0).await;

    progress(&format!("create → first output, pool miss (cold create) ×{n}"));
    let boots = mgr.boot_cursor();
    for i in 0..n {
        cancel::check()?;
        let name = format!("b-c{i}");
        let t0 = Instant::now();
        mgr.create(&name, CreateSprite::default()).await?;
        res.create_to_output.push(wake_to_output(mgr, &name, t0).await?);
        mgr.delete(&name).await?;
    }
    res.boots.push(("create → first output", mgr.boots_since(boots)));

    let main = "b-main";
    mgr.create(main, CreateSprite::default()).await?;
    wake_to_output(mgr, main, Instant::now()).await?;

    let m = opts.exec_samples.max(1);
    progress(&format!("exec `true` round trip ×{m}"));
    for _ in 0..m {
        cancel::check()?;
        let t0 = Instant::now();
        exec_true(mgr, main).await?;
        res.exec_true.push(t0.elapsed());
    }

    progress(&format!("freeze, thaw, warm wake → output ×{n}"));
    for _ in 0..n {
        cancel::check()?;
        let t0 = Instant::now();
        mgr.sleep(main, SpriteStatus::Warm).await?;
        res.freeze.push(t0.elapsed());
        if mgr.get(main)?.status != SpriteStatus::Warm {
            bail!("{main} is not warm after sleep(Warm)");
        }
        let t0 = Instant::now();
        drop(mgr.wake(main).await?);
        res.thaw.push(t0.elapsed());
        mgr.sleep(main, SpriteStatus::Warm).await?;
        let t0 = Instant::now();
        res.warm_to_output.push(wake_to_output(mgr, main, t0).await?);
    }

    progress(&format!("cold wake → output ×{n}"));
    let boots = mgr.boot_cursor();
    for _ in 0..n {
        cancel::check()?;
        mgr.sleep(main, SpriteStatus::Cold).await?;
        let t0 = Instant::now();
        res.cold_to_output.push(wake_to_output(mgr, main, t0).await?);
    }
    res.boots.push(("cold wake → output", mgr.boots_since(boots)));

    progress(&format!("checkpoint of a running sprite ×{n}"));
    let mut checkpoints = Vec::new();
    for i in 0..n {
        cancel::check()?;
        exec_true(mgr, main).await?;
        let t0 = Instant::now();
        let ck = mgr.checkpoint(main, &format!("bench {i}")).await?;
        res.checkpoint.push(t0.elapsed());
        checkpoints.push(ck.id);
    }

    progress(&format!("restore of a running sprite → output ×{n}"));
    let boots = mgr.boot_cursor();
    for i in 0..n {
        cancel::check()?;
        exec_true(mgr, main).await?;
        let ck = &checkpoints[i % checkpoints.len()];
        let t0 = Instant::now();
        mgr.restore(main, ck).await?;
        res.restore_to_output.push(wake_to_output(mgr, main, t0).await?);
    }
    res.boots.push(("restore → output", mgr.boots_since(boots)));

    progress(&format!("live fork → output in the fork ×{n}"));
    let boots = mgr.boot_cursor();
    for i in 0..n {
        cancel::check()?;
        exec_true(mgr, main).await?;
        let name = format!("b-f{i}");
        let t0 = Instant::now();
        mgr.fork(main, &name, None, None).await?;
        res.fork_to_output.push(wake_to_output(mgr, &name, t0).await?);
        mgr.delete(&name).await?;
    }
    res.boots.push(("live fork → output", mgr.boots_since(boots)));

    if opts.runtime == den_runtime::Runtime::Gvisor {
        let mib = opts.resident_mib;
        progress(&format!("memory checkpoint with {mib} MiB resident ×{n}"));
        let fill = ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("dd if=/dev/urandom of=/tmp/resident bs=1048576 count={mib}"),
            ],
            user: Some("root".into()),
            ..Default::default()
        };
        let out = mgr.wake(main).await?.agent().exec(fill).await?.collect().await;
        anyhow::ensure!(
            out.exit.as_ref().is_some_and(|e| e.exit_code == 0),
            "filling /tmp: {:?}: {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut memory = Vec::new();
        for i in 0..n {
            cancel::check()?;
            exec_true(mgr, main).await?;
            let t0 = Instant::now();
            let ck = mgr.checkpoint_memory(main, &format!("bench memory {i}")).await?;
            res.memory_checkpoint.push(t0.elapsed());
            memory.push(ck.id);
        }
        if let Some(last) = memory.last() {
            res.memory_image = mgr.memory_image_bytes(main, last).await?;
        }
        progress(&format!("memory restore → output ×{n}"));
        let boots = mgr.boot_cursor();
        for i in 0..n {
            cancel::check()?;
            let ck = &memory[i % memory.len()];
            let t0 = Instant::now();
            mgr.restore(main, ck).await?;
            res.memory_restore_to_output
                .push(wake_to_output(mgr, main, t0).await?);
        }
        res.boots
            .push(("memory restore → output", mgr.boots_since(boots)));
    }
    mgr.delete(main).await?;

    if opts.workloads {
        res.workloads = workloads(mgr, opts, n.min(3), progress).await?;
    }

    if opts.density > 0 {
        progress(&format!(
            "density: {} sprites, woken and put to warm",
            opts.density
        ));
        res.density = Some(density(mgr, opts.density, progress).await?);
    }
    Ok(())
}

/// [`WORKLOADS`] in one sprite per engine, each `n` times, interleaved
/// engine by engine so that load on the host hits both alike.
async fn workloads(
    mgr: &SpriteManager,
    opts: &SpriteBenchOptions,
    n: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<WorkloadResults>> {
    use den_runtime::Runtime;
    let mut engines = vec![Runtime::Native];
    if opts.runtime != Runtime::Native {
        engines.push(opts.runtime);
    }
    for rt in &engines {
        let opts = CreateSprite {
            runtime: Some(*rt),
            ..Default::default()
        };
        mgr.create(&format!("wl-{rt}"), opts).await?;
    }
    let mut out: Vec<WorkloadResults> = WORKLOADS
        .iter()
        .map(|(name, _)| WorkloadResults {
            name,
            ..Default::default()
        })
        .collect();
    for i in 0..n {
        for (w, (name, script)) in WORKLOADS.iter().enumerate() {
            for rt in &engines {
                cancel::check()?;
                progress(&format!("workload {}/{n} on {rt}: {name}", i + 1));
                let sprite = format!("wl-{rt}");
                let act = mgr.wake(&sprite).await?;
                let req = ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), (*script).into()],
                    ..Default::default()
                };
                let t0 = Instant::now();
                let done = act.agent().exec(req).await?.collect().await;
                let took = t0.elapsed();
                anyhow::ensure!(
                    done.exit.as_ref().is_some_and(|e| e.exit_code == 0),
                    "{name} on {rt}: {:?}: {}",
                    done.exit,
                    String::from_utf8_lossy(&done.stderr)
                );
                match rt {
                    Runtime::Native => out[w].native.push(took),
                    _ => out[w].other.push(took),
                }
            }
        }
    }
    for rt in &engines {
        mgr.delete(&format!("wl-{rt}")).await?;
    }
    Ok(out)
}

/// Workloads: p50 on each engine and their ratio (native alone when
/// `other` is native).
pub fn workload_table(r: &SpriteBenchResults, other: den_runtime::Runtime) -> TextTable {
    let alone = other == den_runtime::Runtime::Native;
    let other_p50 = format!("{other} p50 ms");
    let ratio_head = format!("{other} / native");
    let mut head = vec!["Workload", "n", "native p50 ms"];
    if !alone {
        head.extend([other_p50.as_str(), ratio_head.as_str()]);
    }
    let mut t = TextTable::new(&head, 1);
    for w in &r.workloads {
        let (a, b) = (latency(&w.native), latency(&w.other));
        let cell = |x: Option<Latency>| x.map_or("—".into(), |l| fmt_ms(l.p50));
        let mut row = vec![w.name.into(), w.native.len().to_string(), cell(a)];
        if !alone {
            row.extend([cell(b), ratio(b, a)]);
        }
        t.push(row);
    }
    t
}

async fn density(
    mgr: &SpriteManager,
    count: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<DensityResults> {
    let mut d = DensityResults {
        requested: count,
        ..Default::default()
    };
    // Let the deletes of the earlier phases settle before the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = mem_available()?;
    let rss_before = proc_kib("/proc/self/status", "VmRSS")?;
    let cached_before = proc_kib("/proc/meminfo", "Cached")?;
    let anon_before = proc_kib("/proc/self/smaps_rollup", "Anonymous")?;
    let threads_before = proc_count("/proc/self/status", "Threads")?;
    let kernel_before = kernel_memory()?;
    let t0 = Instant::now();
    let mut names = Vec::new();
    for i in 0..count {
        cancel::check()?;
        let name = format!("b-d{i:04}");
        let step = async {
            mgr.create(&name, CreateSprite::default())
                .await
                .context("create")?;
            exec_true(mgr, &name).await.context("wake + exec true")?;
            mgr.sleep(&name, SpriteStatus::Warm)
                .await
                .context("sleep(Warm)")?;
            anyhow::Ok(())
        };
        match step.await {
            Ok(()) => {
                names.push(name);
                d.reached += 1;
                if (i + 1) % 10 == 0 {
                    progress(&format!("  {} warm sprites after {:.1?}", i + 1, t0.elapsed()));
                }
            }
            Err(e) => {
                let msg = format!("sprite #{} ({name}) failed with {} up: {e:#}", i + 1, d.reached);
                tracing::error!("{msg}");
                d.failure = Some(msg);
                break;
            }
        }
    }
    d.total = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.mem_available_drop = before - mem_available()?;
    d.rss_growth = proc_kib("/proc/self/status", "VmRSS")? - rss_before;
    d.cached_growth = proc_kib("/proc/meminfo", "Cached")? - cached_before;
    d.anon_growth = proc_kib("/proc/self/smaps_rollup", "Anonymous")? - anon_before;
    d.threads_growth = proc_count("/proc/self/status", "Threads")? - threads_before;
    d.kernel_growth = kernel_memory()? - kernel_before;
    d.fuse_pool = den_block::fuse_pool_stats();
    let keys: Vec<String> = names
        .iter()
        .filter_map(|n| mgr.get(n).ok().map(|i| i.record.key))
        .collect();
    let sizes: Vec<u64> = keys.iter().filter_map(|k| cgroup_memory(k)).collect();
    d.cgroup_memory = (!sizes.is_empty() && sizes.len() == keys.len()).then(|| sizes.iter().sum());
    d.warm_count = names
        .iter()
        .filter(|n| mgr.get(n).is_ok_and(|i| i.status == SpriteStatus::Warm))
        .count();
    if !names.is_empty() {
        let pick = &names[rand::rng().random_range(0..names.len())];
        let t0 = Instant::now();
        d.warm_to_output = Some(wake_to_output(mgr, pick, t0).await?);
        mgr.sleep(pick, SpriteStatus::Warm).await?;
    }
    progress(&format!("  deleting {} sprites", names.len()));
    let t0 = Instant::now();
    for n in &names {
        mgr.delete(n).await?;
    }
    d.delete_total = t0.elapsed();
    Ok(d)
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

pub(crate) fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn ratio(den: Option<Latency>, base: Option<Latency>) -> String {
    match (den, base) {
        (Some(d), Some(b)) if !b.p50.is_zero() => {
            format!("{:.2}×", d.p50.as_secs_f64() / b.p50.as_secs_f64())
        }
        _ => "—".into(),
    }
}

/// Label, den samples, goal in ms, runc counterpart's label and samples.
type Row<'a> = (
    &'a str,
    &'a [Duration],
    Option<f64>,
    &'a str,
    Option<&'a [Duration]>,
);

/// The main table: p50/p99 per figure, the goal, and den / runc (p50) where
/// runc has a counterpart.
pub fn latency_table(r: &SpriteBenchResults) -> TextTable {
    let mut t = TextTable::new(
        &[
            "Measure",
            "n",
            "p50 ms",
            "p99 ms",
            "Goal (p50)",
            "Met",
            "runc counterpart",
            "runc p50 ms",
            "den / runc",
        ],
        1,
    );
    let runc = r.runc.as_ref();
    let rows: Vec<Row> = vec![
        (
            "create → first output, pool hit (claim + exec echo)",
            &r.create_hit_to_output,
            Some(25.0),
            "runc run echo → output",
            runc.map(|x| x.run_to_output.as_slice()),
        ),
        (
            "create → first output, pool miss (create + boot + exec echo)",
            &r.create_to_output,
            Some(80.0),
            "runc run echo → output",
            runc.map(|x| x.run_to_output.as_slice()),
        ),
        (
            "exec `true` round trip (running sprite)",
            &r.exec_true,
            Some(5.0),
            "runc exec true",
            runc.map(|x| x.exec_true.as_slice()),
        ),
        (
            "warm wake → output (thaw + exec echo)",
            &r.warm_to_output,
            Some(20.0),
            "",
            None,
        ),
        (
            "cold wake → output (boot + exec echo)",
            &r.cold_to_output,
            Some(50.0),
            "runc run echo → output",
            runc.map(|x| x.run_to_output.as_slice()),
        ),
        (
            "restore of a running sprite → output",
            &r.restore_to_output,
            Some(80.0),
            "",
            None,
        ),
        (
            "live fork → output in the fork",
            &r.fork_to_output,
            Some(60.0),
            "",
            None,
        ),
        ("checkpoint of a running sprite", &r.checkpoint, None, "", None),
        (
            "memory checkpoint (gVisor, resident memory as noted)",
            &r.memory_checkpoint,
            Some(150.0),
            "",
            None,
        ),
        (
            "memory restore → output (gVisor, processes kept)",
            &r.memory_restore_to_output,
            Some(250.0),
            "",
            None,
        ),
        (
            "freeze (sleep Warm)",
            &r.freeze,
            None,
            "runc pause",
            runc.map(|x| x.pause.as_slice()),
        ),
        (
            "thaw (wake of a warm sprite, no exec)",
            &r.thaw,
            None,
            "runc resume",
            runc.map(|x| x.resume.as_slice()),
        ),
    ];
    for (label, samples, goal, base_label, base) in rows {
        let l = latency(samples);
        let b = base.and_then(latency);
        let cell = |x: Option<Latency>, f: fn(&Latency) -> Duration| {
            x.as_ref().map_or("—".into(), |l| fmt_ms(f(l)))
        };
        let met = match (goal, l) {
            (Some(g), Some(l)) => {
                if l.p50.as_secs_f64() * 1e3 <= g {
                    "yes"
                } else {
                    "no"
                }
            }
            _ => "",
        };
        t.push(vec![
            label.into(),
            l.map_or(0, |l| l.count).to_string(),
            cell(l, |l| l.p50),
            cell(l, |l| l.p99),
            goal.map_or(String::new(), |g| format!("≤ {g:.0} ms")),
            met.into(),
            if base.is_some() {
                base_label.into()
            } else {
                String::new()
            },
            if base.is_some() {
                cell(b, |l| l.p50)
            } else {
                String::new()
            },
            if base.is_some() {
                ratio(l, b)
            } else {
                String::new()
            },
        ]);
    }
    t
}

fn fmt_bytes(b: f64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if b.abs() >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// The boots inside each operation, p50 per phase: what a faster boot has
/// to remove.
pub fn boot_phase_table(r: &SpriteBenchResults) -> TextTable {
    let mut head = vec!["Boots inside", "n"];
    head.extend(BootPhases::NAMES.iter().map(|p| match *p {
        "disk" => "disk p50 ms",
        "network" => "network p50 ms",
        "container" => "container p50 ms",
        "agent" => "agent p50 ms",
        _ => "services p50 ms",
    }));
    head.push("boot total p50 ms");
    let mut t = TextTable::new(&head, 1);
    for (op, boots) in &r.boots {
        let p50 = |f: &dyn Fn(&BootPhases) -> Duration| {
            let v: Vec<Duration> = boots.iter().map(f).collect();
            crate::cluster_bench::percentile(&v, 50.0).map_or("—".into(), fmt_ms)
        };
        let mut row = vec![op.to_string(), boots.len().to_string()];
        for i in 0..BootPhases::NAMES.len() {
            row.push(p50(&|b| b.each()[i]));
        }
        row.push(p50(&|b| b.total()));
        t.push(row);
    }
    t
}

pub fn density_table(d: &DensityResults) -> TextTable {
    let mut t = TextTable::new(&["Density", "Value"], 1);
    let reached = if d.reached == d.requested {
        format!("{} of {}", d.reached, d.requested)
    } else {
        format!("{} of {} (stopped: see below)", d.reached, d.requested)
    };
    t.push(vec![
        "sprites created, woken (exec true), put to warm".into(),
        reached,
    ]);
    t.push(vec![
        "total time (create + wake + exec + freeze, one after another)".into(),
        format!("{:.1} s", d.total.as_secs_f64()),
    ]);
    if d.reached > 0 {
        t.push(vec![
            "per sprite".into(),
            format!("{} ms", fmt_ms(d.total / d.reached as u32)),
        ]);
    }
    t.push(vec![
        "host memory per warm sprite (MemAvailable drop / N)".into(),
        d.mem_per_sprite().map_or("—".into(), fmt_bytes),
    ]);
    t.push(vec![
        "host MemAvailable drop, total".into(),
        fmt_bytes(d.mem_available_drop as f64),
    ]);
    let per = |b: i64| {
        format!(
            "{} ({} per sprite)",
            fmt_bytes(b as f64),
            fmt_bytes(b as f64 / d.reached.max(1) as f64)
        )
    };
    t.push(vec![
        "den process RSS growth (FUSE servers, store caches)".into(),
        per(d.rss_growth),
    ]);
    t.push(vec![
        "  of which anonymous (heap, stacks, FUSE buffers)".into(),
        per(d.anon_growth),
    ]);
    let pool = &d.fuse_pool;
    t.push(vec![
        "  threads added (FUSE pool: workers, request buffers)".into(),
        format!(
            "{} ({:.2} per sprite; pool: {} workers, {} buffers)",
            d.threads_growth,
            d.threads_growth as f64 / d.reached.max(1) as f64,
            pool.workers,
            pool.buffers
        ),
    ]);
    t.push(vec![
        "page cache growth (meminfo Cached)".into(),
        per(d.cached_growth),
    ]);
    t.push(vec![
        "kernel growth (meminfo Slab + KernelStack + PageTables)".into(),
        per(d.kernel_growth),
    ]);
    t.push(vec![
        "sum of the sprites' cgroup memory (v2 memory.current / v1 memory.usage_in_bytes)".into(),
        d.cgroup_memory.map_or("—".into(), |b| {
            format!(
                "{} ({} per sprite)",
                fmt_bytes(b as f64),
                fmt_bytes(b as f64 / d.reached.max(1) as f64)
            )
        }),
    ]);
    t.push(vec![
        format!("warm wake → output of a random one, {} present", d.reached),
        d.warm_to_output
            .map_or("—".into(), |x| format!("{} ms", fmt_ms(x))),
    ]);
    t.push(vec![
        "warm at the end".into(),
        format!("{} of {}", d.warm_count, d.reached),
    ]);
    t.push(vec![
        "deleting all of them".into(),
        format!("{:.1} s", d.delete_total.as_secs_f64()),
    ]);
    if let Some(f) = &d.failure {
        t.push(vec!["failure".into(), f.clone()]);
    }
    t
}
