//! The two benchmark suites behind `den-bench storage` and
//! `den-bench chunk-size`, and the tables they print.
//!
//! Both run the workloads rep by rep across targets (so a slow patch on a
//! noisy machine hits every target), check for Ctrl-C between steps, and let
//! a den target finish its background uploads before the next target runs,
//! so den's write-back is not billed to someone else.

use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use den_store::DEFAULT_VOLUME_SIZE;
use rand::Rng;
use serde::Serialize;

use crate::baselines::{JuiceFs, NativeExt4, Target};
use crate::cancel::{self, Emergency, EmergencyToken};
use crate::den_target::{DenVolume, DenVolumeOptions, VOLUME_NAME};
use crate::latency_bench::{self, BLOCK, LatencyConfig, LatencyResults, LevelLatency, Payload, fmt_size, ms};
pub use crate::report::TextTable;
use crate::report::{Latency, Report, latency};
use crate::workloads::{BYTES_PER_MB, RepResult, Summary, TargetResult, WorkloadConfig, WorkloadSet, syncfs};

// ---------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------

/// Move this process into a mount namespace of its own, with every mount
/// private, before anything is mounted.
///
/// Otherwise a mount namespace that someone else creates while the
/// benchmark runs (a container start, `unshare -m`, a build tool) gets a
/// copy of our ext4 and FUSE mounts, which then keeps the den volume's loop
/// device busy after we unmount ours, and the export cannot be stopped. A
/// private namespace also means a killed benchmark leaves no mounts behind:
/// they go when the namespace's last process exits.
///
/// Must run while the process is single-threaded (`unshare` refuses
/// otherwise).
pub fn private_mount_namespace() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
    }
    let root = c"/";
    // SAFETY: valid NUL-terminated strings; null source/fstype/data are
    // allowed for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("making / private in the new mount namespace");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Interleaved runner
// ---------------------------------------------------------------------------

/// One repetition of every workload in a fresh scratch directory under
/// `dir`, checking for Ctrl-C between workloads.
pub fn run_rep(set: &WorkloadSet, dir: &Path) -> Result<RepResult> {
    let scratch = dir.join(format!("den-bench.{}", std::process::id()));
    match fs::remove_dir_all(&scratch) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", scratch.display()));
        }
        _ => {}
    }
    fs::create_dir(&scratch).with_context(|| format!("mkdir {}", scratch.display()))?;
    let result = (|| -> Result<RepResult> {
        let seq_write = set.seq_write(&scratch)?;
        cancel::check()?;
        let seq_read = set.seq_read(&scratch)?;
        cancel::check()?;
        let rand_write = set.rand_write(&scratch)?;
        cancel::check()?;
        let small_files = set.small_files(&scratch)?;
        Ok(RepResult {
            seq_write,
            seq_read,
            rand_write,
            small_files,
        })
    })();
    let removed = fs::remove_dir_all(&scratch).with_context(|| format!("remove {}", scratch.display()));
    let rep = result?;
    removed?;
    // Deleting a GiB is real work for the target; finish it here.
    syncfs(dir)?;
    Ok(rep)
}

/// All repetitions on all targets, interleaved: rep 0 on every target, then
/// rep 1, ... `settle(i)` runs after target `i`'s repetition.
pub fn run_interleaved(
    set: &WorkloadSet,
    targets: &[&dyn Target],
    settle: &mut dyn FnMut(usize) -> Result<()>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TargetResult>> {
    let reps = set.config().reps;
    let mut results: Vec<TargetResult> = targets
        .iter()
        .map(|t| TargetResult {
            name: t.name().to_owned(),
            reps: Vec::with_capacity(reps as usize),
        })
        .collect();
    for rep in 0..reps {
        for (i, (t, result)) in targets.iter().zip(&mut results).enumerate() {
            cancel::check()?;
            let r = run_rep(set, t.dir()).with_context(|| format!("{}: rep {rep}", t.name()))?;
            progress(&format!(
                "rep {}/{reps} {:<12} seq write {:7.1} MB/s  seq read {:7.1} MB/s  rand 4K {:6.0} IOPS  small files {:6.0}/s",
                rep + 1,
                t.name(),
                r.seq_write.mb_per_s,
                r.seq_read.mb_per_s,
                r.rand_write.iops,
                r.small_files.files_per_s,
            ));
            result.reps.push(r);
            settle(i).with_context(|| format!("{}: settling after rep {rep}", t.name()))?;
        }
    }
    Ok(results)
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn f1(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "n/a".into()
    }
}

fn f0(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "n/a".into()
    }
}

fn msf(d: Duration) -> String {
    format!("{:.2}", ms(d))
}

/// Checkpoint / fork / restore latency per level.
pub fn latency_table(r: &LatencyResults) -> TextTable {
    let mut t = TextTable::new(
        &[
            "Written",
            "Map entries",
            "Fill MB/s",
            "Checkpoint p50 ms",
            "Checkpoint p99 ms",
            "Fork (checkpoint) p50 ms",
            "Fork (checkpoint) p99 ms",
            "Fork (live) p50 ms",
            "Fork (live) p99 ms",
            "Restore p50 ms",
            "Restore p99 ms",
        ],
        1,
    );
    for l in &r.levels {
        t.push(vec![
            fmt_size(l.written),
            l.map_entries.to_string(),
            l.fill_mb_s.map_or_else(|| "–".into(), f1),
            msf(l.checkpoint.p50),
            msf(l.checkpoint.p99),
            msf(l.fork_checkpoint.p50),
            msf(l.fork_checkpoint.p99),
            msf(l.fork_live.p50),
            msf(l.fork_live.p99),
            msf(l.restore.p50),
            msf(l.restore.p99),
        ]);
    }
    t
}

/// Write-back and cold-read figures.
pub fn cold_table(r: &LatencyResults) -> TextTable {
    let c = &r.cold;
    let size = fmt_size(c.bytes);
    let mut t = TextTable::new(&["Operation", "Result", "Unit"], 1);
    let mut row = |op: String, v: String, unit: &str| t.push(vec![op, v, unit.to_owned()]);
    row(
        format!("Write {size} into the volume (local cache) + fsync"),
        f1(c.write_mb_s),
        "MB/s",
    );
    row(
        format!("Write-back: flush {size} to the object store"),
        format!("{:.2}", c.flush.as_secs_f64()),
        "s",
    );
    row(
        format!("Write-back throughput ({size})"),
        f1(c.flush_mb_s),
        "MB/s",
    );
    row(
        format!("Cold read {size}, 1 reader, 1 MiB reads (object store)"),
        f1(c.cold_read_mb_s),
        "MB/s",
    );
    row(
        format!(
            "Cold read {size}, {} readers, 1 MiB reads (object store)",
            c.readers
        ),
        f1(c.cold_read_parallel_mb_s),
        "MB/s",
    );
    row(
        format!("Warm read {size}, 1 reader (den read cache)"),
        f1(c.warm_read_mb_s),
        "MB/s",
    );
    row(
        "Objects in the store after the run".into(),
        c.objects.to_string(),
        "objects",
    );
    t
}

/// Ratio of `name`'s metric to the native baseline's, if both ran.
fn ratio_of(report: &Report, name: &str, metric: fn(&Summary) -> f64) -> Option<f64> {
    let mut den = None;
    let mut native = None;
    for (n, s) in report.summaries() {
        if n == name {
            den = Some(metric(s));
        } else if n == NativeExt4::NAME {
            native = Some(metric(s));
        }
    }
    Some(den? / native?)
}

type SummaryMetric = fn(&Summary) -> f64;
type LevelMetric = fn(&LevelLatency) -> Duration;

/// The spec's goals next to what was measured.
pub fn goals_table(report: Option<&Report>, den_name: &str, lat: Option<&LatencyResults>) -> TextTable {
    let mut t = TextTable::new(&["Goal", "Target", "Measured", "Status"], 2);
    let status = |ok: Option<bool>| match ok {
        Some(true) => "PASS".to_owned(),
        Some(false) => "FAIL".to_owned(),
        None => "not measured".to_owned(),
    };
    if let Some(report) = report {
        let ratios: [(&str, f64, SummaryMetric); 3] = [
            ("Sequential write vs native ext4", 0.70, |s| s.seq_write_mb_s),
            ("Random 4K write + fdatasync vs native ext4", 0.50, |s| {
                s.rand_write_iops
            }),
            ("Small-file create vs native ext4", 0.80, |s| s.small_files_per_s),
        ];
        for (label, goal, metric) in ratios {
            let r = ratio_of(report, den_name, metric);
            t.push(vec![
                label.to_owned(),
                format!("≥ {:.0} %", goal * 100.0),
                r.map_or_else(|| "n/a".into(), |r| format!("{:.0} %", r * 100.0)),
                status(r.map(|r| r >= goal)),
            ]);
        }
    }
    if let Some(lat) = lat
        && let (Some(first), Some(last)) = (lat.levels.first(), lat.levels.last())
    {
        let worst = |f: LevelMetric| {
            lat.levels
                .iter()
                .map(|l| (f(l), l.written))
                .max_by_key(|(d, _)| *d)
                .expect("levels")
        };
        let goal = Duration::from_millis(20);
        let ops: [(&str, LevelMetric); 3] = [
            ("Checkpoint p50", |l| l.checkpoint.p50),
            ("Fork from checkpoint p50", |l| l.fork_checkpoint.p50),
            ("Fork from live volume p50", |l| l.fork_live.p50),
        ];
        for (label, f) in ops {
            let (d, at) = worst(f);
            t.push(vec![
                format!("{label} (worst level)"),
                "≤ 20 ms".into(),
                format!("{:.2} ms at {}", ms(d), fmt_size(at)),
                status(Some(d <= goal)),
            ]);
        }
        for (label, f) in ops {
            let (a, b) = (f(first), f(last));
            let growth = ms(b) / ms(a);
            // "Flat": at most 2× the empty volume's p50, or at most 1 ms above it
            // (sub-millisecond figures double from noise alone).
            let flat = growth <= 2.0 || b.saturating_sub(a) <= Duration::from_millis(1);
            t.push(vec![
                format!(
                    "{label} flat from {} to {}",
                    fmt_size(first.written),
                    fmt_size(last.written)
                ),
                "≤ 2× (or ≤ +1 ms)".into(),
                format!("{:.2} → {:.2} ms ({growth:.2}×)", ms(a), ms(b)),
                status(Some(flat)),
            ]);
        }
    }
    t
}

// ---------------------------------------------------------------------------
// den-bench storage
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub work: PathBuf,
    pub workloads: WorkloadConfig,
    /// Size of the den volume and of the native ext4 image (same geometry).
    pub volume_size: u64,
    pub chunk_size: Option<u32>,
    pub juicefs: bool,
    pub latency: LatencyConfig,
}

pub struct StorageResults {
    pub report: Report,
    pub den_name: String,
    pub latency: LatencyResults,
}

/// Throughput (den volume vs native ext4 vs JuiceFS), then the raw-volume
/// latency and cold-read measurements.
pub fn run_storage(opts: &StorageOptions, progress: &mut dyn FnMut(&str)) -> Result<StorageResults> {
    let set = WorkloadSet::new(opts.workloads.clone())?;
    let mut native: Option<NativeExt4> = None;
    let mut den: Option<DenVolume> = None;
    let mut juice: Option<JuiceFs> = None;
    let mut tokens: Vec<EmergencyToken> = Vec::new();

    let run = (|| -> Result<Vec<TargetResult>> {
        progress(&format!(
            "setting up native ext4 ({} sparse image)",
            fmt_size(opts.volume_size)
        ));
        let n = native.insert(NativeExt4::setup(&opts.work, opts.volume_size)?);
        tokens.push(cancel::register(Emergency::DetachLoop(n.device().to_owned())));
        tokens.push(cancel::register_unmount(n.dir()));
        cancel::check()?;

        progress(&format!(
            "setting up the den volume ({} sparse, chunk size {})",
            fmt_size(opts.volume_size),
            opts.chunk_size
                .map_or_else(|| "default".into(), |c| fmt_size(u64::from(c)))
        ));
        let d = den.insert(DenVolume::setup(
            &opts.work,
            &DenVolumeOptions {
                volume_size: opts.volume_size,
                chunk_size: opts.chunk_size,
                ..Default::default()
            },
        )?);
        progress("den volume: waiting for mkfs data to reach the object store");
        d.settle()?;
        cancel::check()?;

        if opts.juicefs {
            progress("setting up JuiceFS (local bucket, SQLite metadata)");
            let j = juice.insert(JuiceFs::setup(&opts.work)?);
            tokens.push(cancel::register_unmount(j.dir()));
            cancel::check()?;
        }

        let mut targets: Vec<&dyn Target> =
            vec![native.as_ref().expect("native"), den.as_ref().expect("den")];
        if let Some(j) = &juice {
            targets.push(j);
        }
        let den_ref = den.as_ref().expect("den");
        progress(&format!("workloads: {}", set.config().describe()));
        run_interleaved(
            &set,
            &targets,
            &mut |i| if i == 1 { den_ref.settle() } else { Ok(()) },
            progress,
        )
    })();

    let den_name = den
        .as_ref()
        .map_or_else(|| DenVolume::NAME.to_owned(), |d| d.name().to_owned());
    if let Some(d) = &den {
        progress(&fuse_summary(d));
    }
    progress("tearing down the throughput targets");
    let mut teardown_err: Option<anyhow::Error> = None;
    let mut record = |r: Result<()>| {
        if let Err(e) = r {
            eprintln!("teardown failed: {e:#}");
            teardown_err.get_or_insert(e);
        }
    };
    if let Some(j) = juice.take() {
        record(Box::new(j).teardown());
    }
    if let Some(d) = den.take() {
        record(Box::new(d).teardown());
    }
    if let Some(n) = native.take() {
        record(Box::new(n).teardown());
    }
    drop(tokens);
    let results = run?;
    if let Some(e) = teardown_err {
        return Err(e);
    }
    let report = Report::new(results).with_range(true);

    cancel::check()?;
    progress(&format!("latency: {}", opts.latency.describe()));
    let latency = latency_bench::run(&opts.work, &opts.latency, progress)?;
    Ok(StorageResults {
        report,
        den_name,
        latency,
    })
}

// ---------------------------------------------------------------------------
// den-bench chunk-size
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ChunkSizeOptions {
    pub work: PathBuf,
    pub sizes: Vec<u32>,
    pub volume_size: u64,
    pub workloads: WorkloadConfig,
    /// Bytes written into a file on each volume before counting map entries
    /// and objects and timing checkpoints.
    pub fill_bytes: u64,
    pub samples: usize,
}

impl ChunkSizeOptions {
    pub fn new(work: PathBuf) -> Self {
        Self {
            work,
            sizes: vec![64 << 10, 256 << 10, 1 << 20, 4 << 20],
            volume_size: DEFAULT_VOLUME_SIZE,
            workloads: WorkloadConfig::default(),
            fill_bytes: 1 << 30,
            samples: 20,
        }
    }
}

/// What one chunk size did.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkSizeRow {
    pub chunk_size: u32,
    pub summary: Summary,
    /// Head-map entries and live objects of the freshly made filesystem.
    pub mkfs_entries: u64,
    pub mkfs_objects: u64,
    /// The same after `fill_bytes` more were written into a file.
    pub fill_entries: u64,
    pub fill_objects: u64,
    pub fill_stored_bytes: u64,
    pub fill_mb_s: f64,
    /// FIFREEZE + checkpoint + thaw of the mounted volume after the fill.
    pub checkpoint: Latency,
}

pub struct ChunkSizeResults {
    pub rows: Vec<ChunkSizeRow>,
    pub fill_bytes: u64,
    pub results: Vec<TargetResult>,
}

/// The per-volume measurements taken before the workloads.
struct FillStats {
    mkfs_entries: u64,
    mkfs_objects: u64,
    fill_entries: u64,
    fill_objects: u64,
    fill_stored_bytes: u64,
    fill_mb_s: f64,
    checkpoint: Latency,
}

pub fn run_chunk_sizes(opts: &ChunkSizeOptions, progress: &mut dyn FnMut(&str)) -> Result<ChunkSizeResults> {
    if opts.sizes.is_empty() {
        bail!("no chunk sizes given");
    }
    let set = WorkloadSet::new(opts.workloads.clone())?;
    let payload = Payload::new();
    let mut dens: Vec<DenVolume> = Vec::new();
    let run = (|| -> Result<(Vec<TargetResult>, Vec<FillStats>)> {
        let mut fills = Vec::new();
        for &cs in &opts.sizes {
            cancel::check()?;
            let name = format!("den-{}", fmt_size(u64::from(cs)).replace(' ', ""));
            progress(&format!(
                "{name}: setting up ({} sparse)",
                fmt_size(opts.volume_size)
            ));
            let d = DenVolume::setup(
                &opts.work,
                &DenVolumeOptions {
                    name,
                    volume_size: opts.volume_size,
                    chunk_size: Some(cs),
                    store_tweak: None,
                },
            )?;
            dens.push(d);
            let d = dens.last().expect("just pushed");
            d.settle()?;
            let (mkfs_entries, mkfs_objects, _) = volume_counts(d)?;
            progress(&format!(
                "{}: mkfs left {mkfs_entries} map entries, {mkfs_objects} objects; writing {}",
                d.name(),
                fmt_size(opts.fill_bytes)
            ));
            let fill_mb_s = fill_file(d, &payload, opts.fill_bytes)?;
            d.settle()?;
            let (fill_entries, fill_objects, stored) = volume_counts(d)?;
            let ck = checkpoint_samples(d, &payload, opts.fill_bytes, opts.samples)?;
            progress(&format!(
                "{}: {fill_entries} map entries, {fill_objects} objects after the fill; checkpoint p50 {:.2} ms",
                d.name(),
                ms(ck.p50)
            ));
            d.settle()?;
            fills.push(FillStats {
                mkfs_entries,
                mkfs_objects,
                fill_entries,
                fill_objects,
                fill_stored_bytes: stored,
                fill_mb_s,
                checkpoint: ck,
            });
        }
        let targets: Vec<&dyn Target> = dens.iter().map(|d| d as &dyn Target).collect();
        progress(&format!("workloads: {}", set.config().describe()));
        let results = run_interleaved(&set, &targets, &mut |i| dens[i].settle(), progress)?;
        Ok((results, fills))
    })();

    for d in &dens {
        progress(&fuse_summary(d));
    }
    progress("tearing down");
    let mut teardown_err = None;
    for d in dens.drain(..).rev() {
        if let Err(e) = Box::new(d).teardown() {
            eprintln!("teardown failed: {e:#}");
            teardown_err.get_or_insert(e);
        }
    }
    let (results, fills) = run?;
    if let Some(e) = teardown_err {
        return Err(e);
    }
    let rows = opts
        .sizes
        .iter()
        .zip(&results)
        .zip(fills)
        .map(|((&cs, r), f)| ChunkSizeRow {
            chunk_size: cs,
            summary: r.summary(),
            mkfs_entries: f.mkfs_entries,
            mkfs_objects: f.mkfs_objects,
            fill_entries: f.fill_entries,
            fill_objects: f.fill_objects,
            fill_stored_bytes: f.fill_stored_bytes,
            fill_mb_s: f.fill_mb_s,
            checkpoint: f.checkpoint,
        })
        .collect();
    Ok(ChunkSizeResults {
        rows,
        fill_bytes: opts.fill_bytes,
        results,
    })
}

/// One line of FUSE request counters, to see what the kernel sent.
pub fn fuse_summary(d: &DenVolume) -> String {
    let s = d.fuse_stats();
    format!(
        "{} FUSE requests since setup: {} reads (largest {} KiB), {} writes (largest {} KiB), {} fsyncs, \
         {} discards, {} errors",
        d.name(),
        s.reads,
        s.largest_read / 1024,
        s.writes,
        s.largest_write / 1024,
        s.fsyncs,
        s.discards,
        s.errors
    )
}

/// Live head-map entries, live objects and their stored bytes (after a GC,
/// so overwritten chunk versions are not counted).
fn volume_counts(d: &DenVolume) -> Result<(u64, u64, u64)> {
    let st = d.den_store();
    let s = st.store();
    st.block_on(s.gc(false)).context("gc")?;
    let info = st.block_on(s.volume_info(VOLUME_NAME))?;
    let stats = st.block_on(s.stats())?;
    Ok((info.mapped_chunks, stats.chunks, stats.stored_bytes))
}

const FILL_FILE: &str = "fill.dat";

/// Write `bytes` of fresh data into a file on the volume's ext4; MB/s.
fn fill_file(d: &DenVolume, payload: &Payload, bytes: u64) -> Result<f64> {
    let path = d.dir().join(FILL_FILE);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; BLOCK];
    let t = Instant::now();
    let mut off = 0u64;
    let mut n = 1 << 32;
    while off < bytes {
        payload.fill(n, &mut buf);
        n += 1;
        f.write_all_at(&buf, off)?;
        off += BLOCK as u64;
        if off.is_multiple_of(256 << 20) {
            cancel::check()?;
        }
    }
    f.sync_all()?;
    Ok(off as f64 / BYTES_PER_MB / t.elapsed().as_secs_f64())
}

/// Checkpoints of the mounted volume, each after overwriting 1 MiB of the
/// fill file (pwrite + fdatasync, untimed).
fn checkpoint_samples(d: &DenVolume, payload: &Payload, bytes: u64, samples: usize) -> Result<Latency> {
    let path = d.dir().join(FILL_FILE);
    let f = OpenOptions::new().write(true).open(&path)?;
    let mut buf = vec![0u8; BLOCK];
    let blocks = (bytes / BLOCK as u64).max(1);
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        cancel::check()?;
        payload.fill((2 << 32) + i as u64, &mut buf);
        let off = rand::rng().random_range(0..blocks) * BLOCK as u64;
        f.write_all_at(&buf, off)?;
        f.sync_data()?;
        out.push(d.checkpoint_frozen(&format!("sample {i}"))?);
    }
    latency(&out).context("no checkpoint samples")
}

/// The chunk-size comparison table.
pub fn chunk_size_table(r: &ChunkSizeResults) -> TextTable {
    let fill = fmt_size(r.fill_bytes);
    let mut t = TextTable::new(
        &[
            "Chunk size",
            "Rand 4K write+fdatasync IOPS",
            "Rand 4K p50 ms",
            "Small-file create files/s",
            "Seq write MB/s",
            "Seq read MB/s",
            &format!("Map entries (empty fs → +{fill})"),
            &format!("Objects (empty fs → +{fill})"),
            &format!("Stored after +{fill}"),
            &format!("Checkpoint p50 ms @ {fill}"),
            &format!("Checkpoint p99 ms @ {fill}"),
        ],
        1,
    );
    for row in &r.rows {
        let s = &row.summary;
        t.push(vec![
            fmt_size(u64::from(row.chunk_size)),
            f0(s.rand_write_iops),
            msf(s.rand_write_p50),
            f0(s.small_files_per_s),
            f1(s.seq_write_mb_s),
            f1(s.seq_read_mb_s),
            format!("{} → {}", row.mkfs_entries, row.fill_entries),
            format!("{} → {}", row.mkfs_objects, row.fill_objects),
            format!("{:.0} MiB", row.fill_stored_bytes as f64 / (1u64 << 20) as f64),
            msf(row.checkpoint.p50),
            msf(row.checkpoint.p99),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_aligns_and_escapes() {
        let mut t = TextTable::new(&["A", "B"], 1);
        t.push(vec!["x|y".into(), "1".into()]);
        assert_eq!(t.markdown(), "| A | B |\n| :--- | ---: |\n| x\\|y | 1 |\n");
    }
}
