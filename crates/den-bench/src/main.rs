//! `den-bench …`: den's benchmarks, with their baselines measured in the
//! same run, on the same disk. A binary of its own, so that the product
//! binary `den` carries no benchmark or test-harness code; the sprite, API
//! and cluster benchmarks run the `den` binary next to this one (or
//! `--den PATH`) as agent, runtime shim and server.
//!
//! Everything is mounted in a private mount namespace (see
//! [`suite::private_mount_namespace`]): the mounts are invisible from other
//! shells while the benchmark runs, and vanish with the process. `den-bench
//! sprites` and `den-bench api` are the exceptions: they run a sprite manager
//! (`den-bench api`: a whole `den server`) in the host's mount namespace, as
//! `den server` does, and shut it down (every sprite deleted,
//! firewall removed) on success, error and the first Ctrl-C; after a forced
//! exit the next run's manager start cleans up what was left. `den-bench
//! cluster` also stays in the host's mount namespace: its nodes are `den
//! server` processes, each in a network namespace of its own.
//!
//! The first Ctrl-C (or SIGTERM) stops at the next step and tears every
//! target down through the normal path; a second one lazily unmounts and
//! detaches what is still set up and exits at once.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use den_bench::api_bench::{self, ApiBenchOptions};
use den_bench::cancel::{self, Interrupted};
use den_bench::cluster_bench::{self, ClusterBenchOptions};
use den_bench::latency_bench::fmt_size;
use den_bench::sprite_bench::{self, BenchImage, SpriteBenchOptions};
use den_bench::suite::{
    self, ChunkSizeOptions, StorageOptions, TextTable, chunk_size_table, cold_table, goals_table,
    latency_table,
};
use den_bench::{LatencyConfig, WorkloadConfig};
use den_store::DEFAULT_VOLUME_SIZE;
use tokio::signal::unix::{SignalKind, signal};

use den_store::parse_size;

const DEFAULT_WORK: &str = "/var/tmp/den-bench";
const DEFAULT_SPRITES_WORK: &str = "/var/tmp/den-bench-sprites";
const DEFAULT_API_WORK: &str = "/var/tmp/den-bench-api";
const DEFAULT_CLUSTER_WORK: &str = "/var/tmp/den-bench-cluster";
/// Volume (and native image) size with `--quick`: mkfs with eager inode
/// tables writes ~2 % of the device, which is 2 GiB for 100 GiB.
const QUICK_VOLUME_SIZE: u64 = 4 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "den-bench",
    version,
    about = "den's benchmarks: tables and ratios against baselines measured in the same run"
)]
struct Cli {
    /// The `den` binary the sprite, API and cluster benchmarks run (default:
    /// `den` next to this binary, then on PATH).
    #[arg(long, env = "DEN_BIN", global = true)]
    den: Option<PathBuf>,
    #[command(subcommand)]
    cmd: BenchCmd,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Den volume vs native ext4 vs JuiceFS throughput, checkpoint/fork/restore latency,
    /// write-back and cold reads, with the spec's goals next to them. Needs root.
    Storage(StorageArgs),
    /// Throughput, map size, object count and checkpoint latency per chunk size. Needs root.
    ChunkSize(ChunkSizeArgs),
    /// Sprite runtime: create/exec/wake/restore/fork → output latency, checkpoint, density,
    /// with runc on the same rootfs as the baseline. Needs root.
    Sprites(SpritesArgs),
    /// The HTTP + WebSocket API of an in-process `den server`: exec round trip (Rust client and
    /// the Python SDK), concurrent exec streams and creates, sprite URL proxy vs direct. Needs root.
    Api(ApiArgs),
    /// Cluster mode: PostgreSQL, SeaweedFS S3 and 1 or 3 `den server` nodes in network
    /// namespaces, all started here: create throughput 1 vs 3 nodes, cold wake on the same node
    /// vs on another node after a drain, exec through the owner vs forwarded. Needs root.
    Cluster(ClusterArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ImageArg {
    /// Debian bookworm, the product image (built on the first run, then cached).
    Debian,
    /// busybox: small and quick to build.
    Busybox,
}

impl From<ImageArg> for BenchImage {
    fn from(a: ImageArg) -> Self {
        match a {
            ImageArg::Debian => BenchImage::Debian,
            ImageArg::Busybox => BenchImage::Busybox,
        }
    }
}

#[derive(Args, Debug)]
struct SpritesArgs {
    /// Work directory: the manager's data dir (store, catalog) and the cached images.
    #[arg(long, default_value = DEFAULT_SPRITES_WORK)]
    pub work: PathBuf,
    /// Mounts and sockets of running sprites (keep it short: socket paths are limited).
    #[arg(long, default_value = "/run/den-bench")]
    pub run_dir: PathBuf,
    /// Base image of the sprites (and of the runc baseline).
    #[arg(long, value_enum, default_value = "debian")]
    pub image: ImageArg,
    /// Few samples and 10 sprites for density: checks everything end to end.
    #[arg(long)]
    pub quick: bool,
    /// Samples of each boot-sized figure [default: 20, 3 with --quick].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Samples of the exec round trip [default: 200, 20 with --quick].
    #[arg(long)]
    pub exec_samples: Option<usize>,
    /// Sprites in the density test; 0 skips it [default: 100, 10 with --quick].
    #[arg(long)]
    pub density: Option<usize>,
    /// Pre-booted sprites the manager keeps for creates; 0: no pool-hit row.
    #[arg(long, default_value_t = 2)]
    pub pool: usize,
    /// Leave the runc baseline out.
    #[arg(long)]
    pub skip_runc: bool,
    /// The sprites' engine: native or gvisor (adds the memory rows).
    #[arg(long, default_value = "native")]
    pub runtime: den_runtime::Runtime,
    /// gVisor: MiB a sprite holds in memory while its memory is checkpointed.
    #[arg(long, default_value_t = 100)]
    pub resident_mib: u64,
    /// Also time file-, process- and I/O-heavy workloads on native and on
    /// `--runtime` (their ratio, same run).
    #[arg(long)]
    pub workloads: bool,
    /// Also write every table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ApiArgs {
    /// Work directory: the server's data dir (`<work>/data`: store, catalog, images, tokens).
    #[arg(long, default_value = DEFAULT_API_WORK)]
    pub work: PathBuf,
    /// Mounts and sockets of running sprites (keep it short: socket paths are limited).
    #[arg(long, default_value = "/run/den-bench-api")]
    pub run_dir: PathBuf,
    /// Base image of the sprites.
    #[arg(long, value_enum, default_value = "debian")]
    pub image: ImageArg,
    /// Few samples, small load and a 32 MiB file: checks everything end to end.
    #[arg(long)]
    pub quick: bool,
    /// Exec round trips from the Rust client [default: 200, 20 with --quick].
    #[arg(long)]
    pub exec_samples: Option<usize>,
    /// Exec round trips from the Python SDK; 0 skips it [default: 100, 10 with --quick].
    #[arg(long)]
    pub sdk_samples: Option<usize>,
    /// Python with sprites-py installed.
    #[arg(long, default_value = "/opt/den-venv/bin/python")]
    pub python: PathBuf,
    /// Concurrent exec streams in the load test [default: 50, 10 with --quick].
    #[arg(long)]
    pub streams: Option<usize>,
    /// Execs per stream [default: 10, 2 with --quick].
    #[arg(long)]
    pub stream_reps: Option<usize>,
    /// Concurrent creates during the load test [default: 10, 3 with --quick].
    #[arg(long)]
    pub creates: Option<usize>,
    /// Size of the file served through the sprite URL, in MiB; 0 skips the proxy test
    /// [default: 256, 32 with --quick].
    #[arg(long)]
    pub file_mib: Option<u64>,
    /// Also write every table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// Work directory: the nodes' data dirs (`<work>/nodes/NAME`; their built images are kept).
    #[arg(long, default_value = DEFAULT_CLUSTER_WORK)]
    pub work: PathBuf,
    /// Few creates, wake sprites and exec samples: checks everything end to end.
    #[arg(long)]
    pub quick: bool,
    /// Creates per cluster size [default: 30, 10 with --quick].
    #[arg(long)]
    pub creates: Option<usize>,
    /// Creates in flight at once [default: 6].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Sprites in the cold-wake test [default: 5, 2 with --quick].
    #[arg(long)]
    pub wake_sprites: Option<usize>,
    /// Data per wake sprite in MiB, written as 4 MiB files [default: 32].
    #[arg(long)]
    pub wake_mib: Option<u64>,
    /// Exec round trips per path in the forwarding test [default: 100, 20 with --quick].
    #[arg(long)]
    pub exec_samples: Option<usize>,
    /// Also write every table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct StorageArgs {
    /// Work directory; every target (image, den store, JuiceFS bucket) lives here, on one disk.
    #[arg(long, default_value = DEFAULT_WORK)]
    pub work: PathBuf,
    /// Small sizes and few samples: checks everything end to end in a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each workload per target; the median is shown [default: 3, 1 with --quick].
    #[arg(long)]
    pub reps: Option<u32>,
    /// Chunk size of the den volumes, e.g. 1M [default: the store default].
    #[arg(long, value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Size of the den volume and of the native ext4 image [default: 100G, 4G with --quick].
    #[arg(long, value_parser = parse_size)]
    pub volume_size: Option<u64>,
    /// Samples per latency figure [default: 20, 5 with --quick].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Leave JuiceFS out of the throughput table.
    #[arg(long)]
    pub skip_juicefs: bool,
    /// Also write every table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ChunkSizeArgs {
    /// Work directory for the den stores.
    #[arg(long, default_value = DEFAULT_WORK)]
    pub work: PathBuf,
    /// Chunk sizes to compare.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64K,256K,1M,4M")]
    pub sizes: Vec<u64>,
    /// Small sizes and few samples.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each workload per chunk size [default: 3, 1 with --quick].
    #[arg(long)]
    pub reps: Option<u32>,
    /// Size of each volume [default: 100G, 4G with --quick].
    #[arg(long, value_parser = parse_size)]
    pub volume_size: Option<u64>,
    /// Checkpoint samples per chunk size [default: 20, 5 with --quick].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEN_LOG")
        .unwrap_or_else(|_| "warn,fuser=error,libcgroups=error".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The api and cluster benchmarks build reqwest clients, which take the
    // process's default rustls provider (reqwest has none of its own here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    run(cli.cmd, cli.den)
}

/// `den` next to this binary (a cargo target dir, an install prefix), then
/// on PATH.
fn den_binary(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating den-bench")?;
    let sibling = exe.with_file_name("den");
    if sibling.is_file() {
        return Ok(sibling);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("den"))
        .find(|p| p.is_file());
    on_path.context(
        "no den binary next to den-bench or on PATH: build it (cargo build --release -p den) or pass --den PATH",
    )
}

fn run(cmd: BenchCmd, den: Option<PathBuf>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("den-bench needs root (loop devices, mount, FUSE, dropping the page cache)");
    }
    // Before any thread exists: unshare(CLONE_NEWNS) needs a single thread.
    // Sprites run in the host's mount namespace, as under `den server`.
    if !matches!(
        cmd,
        BenchCmd::Sprites(_) | BenchCmd::Api(_) | BenchCmd::Cluster(_)
    ) && let Err(e) = suite::private_mount_namespace()
    {
        eprintln!("warning: running in the shared mount namespace: {e:#}");
    }
    install_interrupt_handler()?;
    let result = match cmd {
        BenchCmd::Storage(a) => storage(a),
        BenchCmd::ChunkSize(a) => chunk_size(a),
        BenchCmd::Sprites(a) => sprites(a, den_binary(den)?),
        BenchCmd::Api(a) => api(a, den_binary(den)?),
        BenchCmd::Cluster(a) => cluster(a, den_binary(den)?),
    };
    if let Err(e) = &result
        && e.chain().any(|c| c.is::<Interrupted>())
    {
        eprintln!("interrupted: every target was torn down");
        std::process::exit(130);
    }
    result
}

fn install_interrupt_handler() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term) = {
        let _guard = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::Builder::new()
        .name("den-bench-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut count = 0;
                loop {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                    count += 1;
                    if count == 1 {
                        eprintln!(
                            "\ninterrupted: stopping after the current step and tearing everything down \
                             (interrupt again to force)"
                        );
                        cancel::interrupt();
                    } else {
                        eprintln!("\nforced: lazily unmounting and detaching what is still set up");
                        for line in cancel::emergency_cleanup() {
                            eprintln!("  {line}");
                        }
                        std::process::exit(130);
                    }
                }
            })
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("==> {msg}");
}

fn chunk_size_arg(cs: Option<u64>) -> Result<Option<u32>> {
    cs.map(|c| u32::try_from(c).context("chunk size too large"))
        .transpose()
}

fn workload_config(quick: bool, reps: Option<u32>) -> WorkloadConfig {
    let mut cfg = if quick {
        WorkloadConfig::tiny()
    } else {
        WorkloadConfig::default()
    };
    cfg.reps = reps.unwrap_or(if quick { 1 } else { 3 });
    cfg
}

fn storage(a: StorageArgs) -> Result<()> {
    let started = Instant::now();
    let date = now();
    let chunk_size = chunk_size_arg(a.chunk_size)?;
    let volume_size = a.volume_size.unwrap_or(if a.quick {
        QUICK_VOLUME_SIZE
    } else {
        DEFAULT_VOLUME_SIZE
    });
    let mut latency = if a.quick {
        LatencyConfig::quick()
    } else {
        LatencyConfig::full()
    };
    latency.chunk_size = chunk_size;
    latency.volume_size = volume_size;
    if let Some(s) = a.samples {
        latency.samples = s;
    }
    let opts = StorageOptions {
        work: a.work.clone(),
        workloads: workload_config(a.quick, a.reps),
        volume_size,
        chunk_size,
        juicefs: !a.skip_juicefs,
        latency,
    };
    if opts.juicefs {
        den_bench::find_juicefs().context("JuiceFS is a baseline (use --skip-juicefs to leave it out)")?;
    }
    let r = suite::run_storage(&opts, &mut progress)?;

    let lat_table = latency_table(&r.latency);
    let cold = cold_table(&r.latency);
    let goals = goals_table(Some(&r.report), &r.den_name, Some(&r.latency));
    let tput_note = format!(
        "{} (den volume and native ext4 image: {} sparse; ext4 made with `-E lazy_itable_init=0,lazy_journal_init=0`, \
         plus `nodiscard` on the fresh den volume, as `den volume mount --format` does)",
        opts.workloads.describe(),
        fmt_size(volume_size)
    );
    let sections: Vec<(&str, String, Section)> = vec![
        (
            "Throughput: den volume vs native ext4 vs JuiceFS (same run, same disk)",
            tput_note,
            Section::Report(&r.report),
        ),
        (
            "Checkpoint, fork and restore latency (raw volume)",
            r.latency.config.describe(),
            Section::Table(&lat_table),
        ),
        (
            "Write-back and cold read (raw volume, local object store)",
            "Cold reads start with den's read cache and the kernel page cache dropped. \
             Throughput in MB/s = 10^6 bytes/s."
                .to_owned(),
            Section::Table(&cold),
        ),
        ("Goals", GOALS_NOTE.to_owned(), Section::Table(&goals)),
    ];
    finish(
        started,
        &date,
        "den-bench storage",
        &a.work,
        a.markdown.as_deref(),
        &sections,
        false,
    )
}

const GOALS_NOTE: &str = "Ratios are den volume / native ext4 medians from the throughput table; \
     latencies are the worst p50 over the levels of the latency table.";

fn chunk_size(a: ChunkSizeArgs) -> Result<()> {
    let started = Instant::now();
    let date = now();
    let mut opts = ChunkSizeOptions::new(a.work.clone());
    opts.sizes = a
        .sizes
        .iter()
        .map(|&s| u32::try_from(s).context("chunk size too large"))
        .collect::<Result<_>>()?;
    opts.workloads = workload_config(a.quick, a.reps);
    opts.volume_size = a.volume_size.unwrap_or(if a.quick {
        QUICK_VOLUME_SIZE
    } else {
        DEFAULT_VOLUME_SIZE
    });
    if a.quick {
        opts.fill_bytes = 128 << 20;
        opts.samples = 5;
    }
    if let Some(s) = a.samples {
        opts.samples = s;
    }
    let r = suite::run_chunk_sizes(&opts, &mut progress)?;
    let table = chunk_size_table(&r);
    let note = format!(
        "Each chunk size on its own den volume ({} sparse) with ext4, all mounted at once and run \
         interleaved. Map entries and objects: live ones (after GC) once the fresh filesystem and then a \
         {} file are in the object store. Checkpoint: FIFREEZE + checkpoint + thaw of the mounted volume, \
         each after a 1 MiB pwrite + fdatasync into that file. Workloads: {}",
        fmt_size(opts.volume_size),
        fmt_size(opts.fill_bytes),
        opts.workloads.describe()
    );
    let sections = vec![("Chunk size comparison", note, Section::Table(&table))];
    finish(
        started,
        &date,
        "den-bench chunk-size",
        &a.work,
        a.markdown.as_deref(),
        &sections,
        false,
    )
}

fn sprites(a: SpritesArgs, exe: PathBuf) -> Result<()> {
    let started = Instant::now();
    let date = now();
    let mut opts = SpriteBenchOptions::new(a.work.clone(), exe, a.quick);
    opts.run_dir = a.run_dir.clone();
    opts.image = a.image.into();
    if let Some(s) = a.samples {
        opts.samples = s;
    }
    if let Some(s) = a.exec_samples {
        opts.exec_samples = s;
    }
    if let Some(d) = a.density {
        opts.density = d;
    }
    opts.runc = !a.skip_runc;
    opts.pool = a.pool;
    opts.runtime = a.runtime;
    opts.resident_mib = a.resident_mib;
    opts.workloads = a.workloads;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = rt.block_on(sprite_bench::run(&opts, &mut progress))?;
    drop(rt);

    let lat = sprite_bench::latency_table(&r);
    let mut lat_note = format!(
        "{} (version {}). \"→ output\": until the first stdout byte of `echo hi` is back at the host \
         through the agent socket. Exec round trip: `true` until its exit status is back. \
         Create samples start after a warm-up create (the disk template is made once per image). \
         Pool hit: a create claims one of {} pre-booted sprites (the pool refilled before each sample; \
         {} hits, {} misses counted by the manager). Pool miss: the same create with the pool off, \
         which boots the sprite on its first exec. Everything after the creates runs with the pool off.",
        opts.describe(),
        r.image_version,
        opts.pool,
        r.pool_hits,
        r.pool_misses
    );
    if let Some((logical, stored)) = r.memory_image {
        let _ = write!(
            lat_note,
            " Memory rows: a sprite holding {} MiB of random bytes in /tmp (the sandbox's memory); its last memory image \
             is {:.1} MiB of files, {:.1} MiB in the store after compression and zero elision.",
            opts.resident_mib,
            logical as f64 / (1 << 20) as f64,
            stored as f64 / (1 << 20) as f64
        );
    }
    match &r.runc_error {
        Some(e) => {
            let _ = write!(lat_note, " runc baseline: not measured ({e}).");
        }
        None => lat_note.push_str(
            " runc: `runc run`/`exec` of the same image rootfs (read-only, no user namespace, \
             no overlay, no network set-up, loopback-only netns); ratios are den p50 / runc p50.",
        ),
    }
    let density = r.density.as_ref().map(sprite_bench::density_table);
    let workloads = (!r.workloads.is_empty()).then(|| sprite_bench::workload_table(&r, opts.runtime));
    let boots = sprite_bench::boot_phase_table(&r);
    let mut sections: Vec<(&str, String, Section)> = vec![
        (
            "Sprite latency (p50/p99) vs goals and runc",
            lat_note,
            Section::Table(&lat),
        ),
        (
            "Boot phases",
            "Each boot of the operations above, phase by phase, as the sprite manager timed it: \
             disk (open the volume, FUSE, loop device, mount ext4), network (namespace, veth, firewall, /etc files), \
             container (create and start, PID 1 = the agent), agent (until it answers), services (hand them over). \
             The rest of an operation's time is outside the boot (create: the disk fork; restore: stop and rewind; \
             all: the exec of `echo hi`)."
                .into(),
            Section::Table(&boots),
        ),
    ];
    if let Some(t) = &workloads {
        sections.push((
            "Workloads",
            format!(
                "One sprite per engine, the same image; each workload run {} times, engine after engine \
                 (so host load hits both alike), timed from exec to exit status. No compiler: the \
                 bench image has none.",
                r.workloads.first().map_or(0, |w| w.native.len())
            ),
            Section::Table(t),
        ));
    }
    if let (Some(t), Some(d)) = (&density, &r.density) {
        sections.push((
            "Density",
            format!(
                "{} sprites created one after another, each woken with `exec true` and put to warm \
                 (frozen), all present at once. Host memory: MemAvailable before − after.",
                d.requested
            ),
            Section::Table(t),
        ));
    }
    finish(
        started,
        &date,
        "den-bench sprites",
        &a.work,
        a.markdown.as_deref(),
        &sections,
        false,
    )
}

fn api(a: ApiArgs, exe: PathBuf) -> Result<()> {
    let started = Instant::now();
    let date = now();
    let mut opts = ApiBenchOptions::new(a.work.clone(), exe, a.quick);
    opts.run_dir = a.run_dir.clone();
    opts.image = a.image.into();
    opts.python = a.python.clone();
    if let Some(s) = a.exec_samples {
        opts.exec_samples = s;
    }
    if let Some(s) = a.sdk_samples {
        opts.sdk_samples = s;
    }
    if let Some(s) = a.streams {
        opts.streams = s;
    }
    if let Some(s) = a.stream_reps {
        opts.stream_reps = s;
    }
    if let Some(c) = a.creates {
        opts.creates = c;
    }
    if let Some(m) = a.file_mib {
        opts.file_mib = m;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = rt.block_on(api_bench::run(&opts, &mut progress))?;
    drop(rt);

    let exec = api_bench::exec_table(&r);
    let load = api_bench::load_table(&r, &opts);
    let proxy = api_bench::proxy_table(&r, &opts);
    let mut sections: Vec<(&str, String, Section)> = vec![
        (
            "Exec round trip through the API",
            format!(
                "{}. `true` on a running sprite, one exec at a time, each on a new WebSocket \
                 (`/v1/sprites/{{name}}/exec?cmd=true`): from TCP connect to the server's close frame. \
                 The SDK loop is timed in Python (`time.perf_counter` around `run()`), after 5 untimed runs. \
                 The hosted figure is a reference (sprites-py PR #26: per-call exec overhead of the hosted \
                 service, client to fly.io over the internet), not measured in this run.",
                opts.describe()
            ),
            Section::Table(&exec),
        ),
        (
            "Load: concurrent exec streams and creates",
            format!(
                "{} streams on one running sprite, each running its command {} times in a row, \
                 all at once; {} creates (create, then the first exec `true`, which boots the sprite) \
                 start at the same moment. An exec counts as an error unless it exits 0, closes with 1000 \
                 and all its output arrived in order.",
                opts.streams, opts.stream_reps, opts.creates
            ),
            Section::Table(&load),
        ),
    ];
    if opts.file_mib > 0 {
        sections.push((
            "Sprite URL proxy vs direct",
            format!(
                "A {} MiB file from /dev/urandom and a 6-byte file in /home/sprite/www, served by {} \
                 on port 8080 in the sprite. Via sprite URL: `http://<name>.localhost:<port>/…` to the \
                 server on 127.0.0.1 with the admin token (the server keeps its upstream connections). \
                 Direct: `http://<sprite ip>:8080/…` from the host. One client each, downloads interleaved \
                 after one untimed download per path. MB/s = 10^6 bytes/s.",
                opts.file_mib,
                match opts.image {
                    BenchImage::Debian => "Python's `http.server` (HTTP/1.1, keep-alive)",
                    BenchImage::Busybox => "busybox httpd",
                }
            ),
            Section::Table(&proxy),
        ));
    }
    finish(
        started,
        &date,
        "den-bench api",
        &a.work,
        a.markdown.as_deref(),
        &sections,
        false,
    )
}

fn cluster(a: ClusterArgs, exe: PathBuf) -> Result<()> {
    let started = Instant::now();
    let date = now();
    let mut opts = ClusterBenchOptions::new(a.work.clone(), exe, a.quick);
    if let Some(n) = a.creates {
        opts.creates = n;
    }
    if let Some(n) = a.concurrency {
        opts.concurrency = n;
    }
    if let Some(n) = a.wake_sprites {
        opts.wake_sprites = n;
    }
    if let Some(m) = a.wake_mib {
        opts.wake_mib = m;
    }
    if let Some(n) = a.exec_samples {
        opts.exec_samples = n;
    }
    let r = cluster_bench::run(&opts, &mut progress)?;

    let creates = cluster_bench::create_table(&r);
    let wake = cluster_bench::wake_table(&r, &opts);
    let fwd = cluster_bench::forward_table(&r);
    let summary = cluster_bench::summary_table(&r);
    let debug_note = if cfg!(debug_assertions) {
        " This `den` is a debug build: absolute times are worse than a release build's."
    } else {
        ""
    };
    let sections: Vec<(&str, String, Section)> = vec![
        (
            "Create throughput: 1-node vs 3-node cluster",
            format!(
                "{}.{debug_note} {} creates through node a, {} at a time: each is POST /v1/sprites \
                 (placed on the least-loaded live node), then the first exec `true` through a (forwarded to \
                 the sprite's node when it was placed elsewhere), which boots the sprite. creates/s = completed creates / wall time. Before each run, \
                 untimed warm-up creates make every node's disk template. All nodes share this machine's \
                 CPUs and disk, so more nodes add no hardware here.",
                opts.describe(),
                opts.creates,
                opts.concurrency
            ),
            Section::Table(&creates),
        ),
        (
            "Cold wake: same node vs another node",
            format!(
                "{} sprites created on a (alone then), {} MiB of /dev/urandom in 4 MiB files each, waited until \
                 durable in S3. After each went cold (stopped, status `cold`): the first exec of \
                 `{}` through a, which wakes it on a with its chunks in a's local cache. Then all \
                 cold again, POST /v1/nodes/a/drain, and the first exec through b or c (alternating), \
                 which never ran them: ownership claim in PostgreSQL, then the chunks fetched lazily \
                 from S3. Timed from the WebSocket connect to the close frame; the byte count is checked, then \
                 (untimed) the data's sha256 against the one taken when it was written. \
                 S3 runs on this machine, so no network latency is included.",
                opts.wake_sprites,
                opts.wake_bytes() >> 20,
                cluster_bench::read_script(),
            ),
            Section::Table(&wake),
        ),
        (
            "Forwarding overhead",
            format!(
                "Exec `true` on a running sprite over the WebSocket, one at a time, after 5 untimed rounds: \
                 through the node that owns it and through another live node, which forwards the exec \
                 to the owner; {} samples per path, interleaved.",
                opts.exec_samples
            ),
            Section::Table(&fwd),
        ),
        (
            "Summary",
            format!("Command: `{}`", command_line()),
            Section::Table(&summary),
        ),
    ];
    finish(
        started,
        &date,
        "den-bench cluster",
        &a.work,
        a.markdown.as_deref(),
        &sections,
        true,
    )
}

enum Section<'a> {
    Report(&'a den_bench::Report),
    Table(&'a TextTable),
}

impl Section<'_> {
    fn terminal(&self) -> String {
        match self {
            Section::Report(r) => r.table().to_string(),
            Section::Table(t) => t.table().to_string(),
        }
    }

    fn markdown(&self) -> String {
        match self {
            Section::Report(r) => r.markdown(),
            Section::Table(t) => t.markdown(),
        }
    }
}

/// Print a bench command's report (and the command line, if `show_command`),
/// and write it as Markdown if asked.
fn finish(
    started: Instant,
    date: &str,
    title: &str,
    work: &Path,
    markdown: Option<&Path>,
    sections: &[(&str, String, Section)],
    show_command: bool,
) -> Result<()> {
    print_sections(sections);
    if show_command {
        println!("\ncommand: {}", command_line());
    }
    eprintln!("total wall time: {:.1?}", started.elapsed());
    if let Some(path) = markdown {
        write_markdown(path, title, date, work, sections)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn print_sections(sections: &[(&str, String, Section)]) {
    for (title, note, body) in sections {
        println!("\n{title}\n{note}\n{}", body.terminal());
    }
}

fn write_markdown(
    path: &Path,
    title: &str,
    date: &str,
    work: &Path,
    sections: &[(&str, String, Section)],
) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(md, "## `{title}` — {date}\n");
    let _ = writeln!(md, "- Command: `{}`", command_line());
    let _ = writeln!(md, "- Date: {date}");
    let _ = writeln!(md, "- Host: {}", host_description());
    let _ = writeln!(md, "- Work dir: {}", describe_work_dir(work));
    for (heading, note, body) in sections {
        let _ = writeln!(md, "\n### {heading}\n\n{note}\n\n{}", body.markdown());
    }
    fs::write(path, md).with_context(|| format!("writing {}", path.display()))
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The command as typed, with the binary shown as `den`.
fn command_line() -> String {
    let quote = |s: String| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@%+".contains(c))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once("den-bench".to_owned())
        .chain(std::env::args().skip(1).map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

fn host_description() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |kib| format!("{:.0}", kib as f64 / (1 << 20) as f64),
        );
    format!("Linux {kernel}, {cpus} × {model}, {mem_gib} GiB RAM")
}

/// `/var/tmp/den-bench (ext4 on /dev/vda)`: the filesystem every target's
/// data lands on.
fn describe_work_dir(work: &Path) -> String {
    let canon = fs::canonicalize(work).unwrap_or_else(|_| work.to_owned());
    let best = fs::read_to_string("/proc/self/mounts").ok().and_then(|text| {
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let (src, point, fstype) = (f.next()?, f.next()?, f.next()?);
                canon
                    .starts_with(point)
                    .then(|| (point.len(), format!("{fstype} on {src}")))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, d)| d)
    });
    match best {
        Some(d) => format!("{} ({d})", work.display()),
        None => work.display().to_string(),
    }
}
