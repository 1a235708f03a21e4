//! Filesystem workloads run against a mounted directory.
//!
//! The workloads are plain Rust syscalls rather than fio jobs so that the
//! numbers do not depend on which fio version (or none) a machine has, and so
//! that every target is driven by byte-for-byte the same I/O pattern.
//!
//! Throughput is reported in MB/s with MB = 10^6 bytes (the unit fio calls
//! "MB/s"), so 1 GiB written in one second is 1073.7 MB/s.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, RngCore};
use serde::Serialize;

use crate::baselines::Target;
use crate::report::latency;

/// Bytes per MB in every MB/s figure this crate reports.
pub const BYTES_PER_MB: f64 = 1_000_000.0;
const MIB: u64 = 1 << 20;
/// Size of one random write; 4 KiB is the ext4 block size, so each write
/// touches exactly one block and never needs a read-modify-write.
pub const RAND_BLOCK: usize = 4096;
/// Upper bound on the pre-generated random pool. Large enough that the small
/// file workload (10,000 × 4 KiB = 40 MiB) gets unique content per file, small
/// enough not to matter for memory.
const MAX_POOL: usize = 64 << 20;

const SEQ_FILE: &str = "seq.dat";
const RAND_FILE: &str = "rand.dat";
const TREE_DIR: &str = "tree";

/// Sizes and counts for one [`WorkloadSet`].
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadConfig {
    /// Bytes written by the sequential write (and read back by the read).
    pub seq_bytes: u64,
    /// Block size of each sequential `write`/`read` call.
    pub seq_block: usize,
    /// Size of the preallocated file the random writes land in.
    pub rand_file_bytes: u64,
    /// The random-write run stops after this many writes...
    pub rand_max_writes: u64,
    /// ...or after this long, whichever comes first.
    pub rand_max_duration: Duration,
    /// The small-file tree is `small_dirs` directories...
    pub small_dirs: u32,
    /// ...of `small_files_per_dir` files each...
    pub small_files_per_dir: u32,
    /// ...of this many bytes each.
    pub small_file_bytes: usize,
    /// Repetitions per target; the report shows the median.
    pub reps: u32,
    /// Drop the kernel page cache before the sequential read. Only disable
    /// when not root, and expect the read figure to measure RAM, not disk.
    pub drop_caches: bool,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seq_bytes: 1 << 30,
            seq_block: MIB as usize,
            rand_file_bytes: 256 * MIB,
            rand_max_writes: 2000,
            rand_max_duration: Duration::from_secs(10),
            small_dirs: 100,
            small_files_per_dir: 100,
            small_file_bytes: 4096,
            reps: 3,
            drop_caches: true,
        }
    }
}

impl WorkloadConfig {
    /// A configuration that finishes in seconds, for tests and smoke runs.
    pub fn tiny() -> Self {
        Self {
            seq_bytes: 8 * MIB,
            rand_file_bytes: 16 * MIB,
            rand_max_writes: 200,
            rand_max_duration: Duration::from_secs(10),
            small_dirs: 4,
            small_files_per_dir: 50,
            reps: 1,
            ..Self::default()
        }
    }

    /// Total number of files the small-file workload creates.
    pub fn small_files(&self) -> u64 {
        u64::from(self.small_dirs) * u64::from(self.small_files_per_dir)
    }

    /// One-line description of the parameters, for report footers.
    pub fn describe(&self) -> String {
        format!(
            "seq {} MiB in {} KiB blocks (+fsync); random {} B pwrite+fdatasync into a {} MiB file, \
             max {} writes or {:?}; {} files of {} B in {} dirs (+syncfs); {} rep(s), median shown",
            self.seq_bytes / MIB,
            self.seq_block / 1024,
            RAND_BLOCK,
            self.rand_file_bytes / MIB,
            self.rand_max_writes,
            self.rand_max_duration,
            self.small_files(),
            self.small_file_bytes,
            self.small_dirs,
            self.reps,
        )
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.seq_block > 0, "seq_block must be > 0");
        ensure!(
            self.seq_bytes >= self.seq_block as u64,
            "seq_bytes ({}) must be at least one block ({})",
            self.seq_bytes,
            self.seq_block
        );
        ensure!(
            self.rand_file_bytes >= RAND_BLOCK as u64,
            "rand_file_bytes must hold at least one {RAND_BLOCK} B block"
        );
        ensure!(self.rand_max_writes > 0, "rand_max_writes must be > 0");
        ensure!(!self.rand_max_duration.is_zero(), "rand_max_duration must be > 0");
        ensure!(self.small_files() > 0, "small-file tree must have files");
        ensure!(self.reps > 0, "reps must be > 0");
        Ok(())
    }
}

/// Sequential write of `bytes` in `seq_block` chunks, then one `fsync`.
#[derive(Debug, Clone, Serialize)]
pub struct SeqWriteResult {
    pub bytes: u64,
    /// Includes the final `fsync`.
    pub elapsed: Duration,
    pub mb_per_s: f64,
}

/// Sequential read of the file the write produced, starting from a cold
/// page cache.
#[derive(Debug, Clone, Serialize)]
pub struct SeqReadResult {
    pub bytes: u64,
    pub elapsed: Duration,
    pub mb_per_s: f64,
}

/// 4 KiB `pwrite` + `fdatasync` at random aligned offsets.
#[derive(Debug, Clone, Serialize)]
pub struct RandWriteResult {
    pub writes: u64,
    pub elapsed: Duration,
    pub iops: f64,
    /// Per-write latency (pwrite + fdatasync).
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Creating a tree of small files, including the `syncfs` that makes them
/// durable.
#[derive(Debug, Clone, Serialize)]
pub struct SmallFilesResult {
    pub files: u64,
    pub elapsed: Duration,
    pub files_per_s: f64,
}

/// One repetition of every workload on one target.
#[derive(Debug, Clone, Serialize)]
pub struct RepResult {
    pub seq_write: SeqWriteResult,
    pub seq_read: SeqReadResult,
    pub rand_write: RandWriteResult,
    pub small_files: SmallFilesResult,
}

/// Medians over repetitions; what the report prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seq_write_mb_s: f64,
    pub seq_read_mb_s: f64,
    pub rand_write_iops: f64,
    pub rand_write_p50: Duration,
    pub rand_write_p99: Duration,
    pub small_files_per_s: f64,
}

/// All repetitions for one named target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub name: String,
    pub reps: Vec<RepResult>,
}

impl TargetResult {
    /// Median of each metric across repetitions. Medians are taken per
    /// metric, so the figures may come from different repetitions; that is
    /// the point on a noisy machine, where one slow rep should not drag every
    /// number with it.
    pub fn summary(&self) -> Summary {
        let f = |get: fn(&RepResult) -> f64| median(self.reps.iter().map(get).collect());
        let d = |get: fn(&RepResult) -> Duration| {
            Duration::from_secs_f64(median(self.reps.iter().map(|r| get(r).as_secs_f64()).collect()))
        };
        Summary {
            seq_write_mb_s: f(|r| r.seq_write.mb_per_s),
            seq_read_mb_s: f(|r| r.seq_read.mb_per_s),
            rand_write_iops: f(|r| r.rand_write.iops),
            rand_write_p50: d(|r| r.rand_write.p50),
            rand_write_p99: d(|r| r.rand_write.p99),
            small_files_per_s: f(|r| r.small_files.files_per_s),
        }
    }
}

/// Median of `values`; the mean of the middle two for an even count, and NaN
/// for none (which only happens if a caller builds a `TargetResult` by hand).
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The workload suite: a configuration plus a pool of random bytes generated
/// once up front, so RNG cost is never inside a timed region.
pub struct WorkloadSet {
    config: WorkloadConfig,
    pool: Vec<u8>,
}

impl WorkloadSet {
    pub fn new(config: WorkloadConfig) -> Result<Self> {
        config.validate()?;
        let wanted = (config.seq_bytes as usize)
            .max(config.small_files() as usize * config.small_file_bytes)
            .min(MAX_POOL);
        let len = wanted
            .max(config.seq_block)
            .max(config.small_file_bytes)
            .max(RAND_BLOCK);
        let mut pool = vec![0u8; len];
        // Random, hence incompressible and non-dedupable within the pool, so
        // a target that compresses cannot win by shrinking the payload.
        rand::rng().fill_bytes(&mut pool);
        Ok(Self { config, pool })
    }

    pub fn config(&self) -> &WorkloadConfig {
        &self.config
    }

    /// The `index`-th `len`-byte chunk of the pool, wrapping around. Chunks
    /// are aligned to `len`, so consecutive indexes never overlap until the
    /// pool wraps.
    fn chunk(&self, index: u64, len: usize) -> &[u8] {
        let chunks = (self.pool.len() / len) as u64;
        let start = (index % chunks) as usize * len;
        &self.pool[start..start + len]
    }

    /// Write `seq_bytes` to `dir/seq.dat` and fsync it.
    pub fn seq_write(&self, dir: &Path) -> Result<SeqWriteResult> {
        let path = dir.join(SEQ_FILE);
        remove_if_exists(&path)?;
        syncfs(dir)?;
        let block = self.config.seq_block;
        let total = self.config.seq_bytes;
        let mut file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let start = Instant::now();
        let mut written = 0u64;
        let mut i = 0u64;
        while written < total {
            let n = block.min((total - written) as usize);
            file.write_all(&self.chunk(i, block)[..n])
                .with_context(|| format!("write {}", path.display()))?;
            written += n as u64;
            i += 1;
        }
        file.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
        let elapsed = start.elapsed();
        Ok(SeqWriteResult {
            bytes: written,
            elapsed,
            mb_per_s: mb_per_s(written, elapsed),
        })
    }

    /// Read back `dir/seq.dat` (left by [`Self::seq_write`]) from a cold cache.
    pub fn seq_read(&self, dir: &Path) -> Result<SeqReadResult> {
        let path = dir.join(SEQ_FILE);
        let expected = fs::metadata(&path)
            .with_context(|| format!("{} missing: run seq_write first", path.display()))?
            .len();
        if self.config.drop_caches {
            drop_caches()?;
        }
        let mut buf = vec![0u8; self.config.seq_block];
        let mut file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let start = Instant::now();
        let mut read = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => read += n as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
            }
        }
        let elapsed = start.elapsed();
        ensure!(
            read == expected,
            "short read of {}: {read} of {expected} bytes",
            path.display()
        );
        Ok(SeqReadResult {
            bytes: read,
            elapsed,
            mb_per_s: mb_per_s(read, elapsed),
        })
    }

    /// Random 4 KiB `pwrite` + `fdatasync` into a fully written
    /// `rand_file_bytes` file (`dir/rand.dat`).
    pub fn rand_write(&self, dir: &Path) -> Result<RandWriteResult> {
        let path = dir.join(RAND_FILE);
        remove_if_exists(&path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("create {}", path.display()))?;
        // Written for real rather than fallocated: a sparse or unwritten
        // extent would turn each measured write into an allocation, which is
        // a different (and target-dependent) workload.
        let block = self.config.seq_block;
        let mut off = 0u64;
        let mut i = 0u64;
        while off < self.config.rand_file_bytes {
            let n = block.min((self.config.rand_file_bytes - off) as usize);
            file.write_all_at(&self.chunk(i, block)[..n], off)
                .with_context(|| format!("prefill {}", path.display()))?;
            off += n as u64;
            i += 1;
        }
        file.sync_all()
            .with_context(|| format!("fsync {}", path.display()))?;
        syncfs(dir)?;

        let slots = self.config.rand_file_bytes / RAND_BLOCK as u64;
        let max = self.config.rand_max_writes;
        let mut rng = rand::rng();
        let offsets: Vec<u64> = (0..max)
            .map(|_| rng.random_range(0..slots) * RAND_BLOCK as u64)
            .collect();
        let mut samples = Vec::with_capacity(max as usize);

        let start = Instant::now();
        for (n, &offset) in offsets.iter().enumerate() {
            let t = Instant::now();
            file.write_all_at(self.chunk(n as u64, RAND_BLOCK), offset)
                .with_context(|| format!("pwrite {} @ {offset}", path.display()))?;
            file.sync_data()
                .with_context(|| format!("fdatasync {}", path.display()))?;
            samples.push(t.elapsed());
            if start.elapsed() >= self.config.rand_max_duration {
                break;
            }
        }
        let elapsed = start.elapsed();
        let lat = latency(&samples).context("no random writes completed")?;
        let writes = samples.len() as u64;
        Ok(RandWriteResult {
            writes,
            elapsed,
            iops: writes as f64 / elapsed.as_secs_f64(),
            p50: lat.p50,
            p99: lat.p99,
            max: lat.max,
        })
    }

    /// Create `small_dirs × small_files_per_dir` files under a fresh
    /// `dir/tree`, then `syncfs`.
    pub fn small_files(&self, dir: &Path) -> Result<SmallFilesResult> {
        let tree = dir.join(TREE_DIR);
        remove_if_exists(&tree)?;
        fs::create_dir(&tree).with_context(|| format!("mkdir {}", tree.display()))?;
        syncfs(dir)?;
        let size = self.config.small_file_bytes;
        // Paths are built before the clock starts so that only filesystem
        // work is timed.
        let dirs: Vec<(PathBuf, Vec<OsString>)> = (0..self.config.small_dirs)
            .map(|d| {
                let names = (0..self.config.small_files_per_dir)
                    .map(|f| OsString::from(format!("f{f:05}")))
                    .collect();
                (tree.join(format!("d{d:05}")), names)
            })
            .collect();

        let start = Instant::now();
        let mut n = 0u64;
        for (sub, names) in &dirs {
            fs::create_dir(sub).with_context(|| format!("mkdir {}", sub.display()))?;
            for name in names {
                let path = sub.join(name);
                let mut f = File::create(&path).with_context(|| format!("create {}", path.display()))?;
                f.write_all(self.chunk(n, size))
                    .with_context(|| format!("write {}", path.display()))?;
                n += 1;
            }
        }
        syncfs(&tree)?;
        let elapsed = start.elapsed();
        Ok(SmallFilesResult {
            files: n,
            elapsed,
            files_per_s: n as f64 / elapsed.as_secs_f64(),
        })
    }

    /// One repetition of every workload in a private scratch directory under
    /// `dir`, which is removed afterwards.
    pub fn run_once(&self, dir: &Path) -> Result<RepResult> {
        let scratch = Scratch::create(dir)?;
        let d = scratch.path();
        let seq_write = self.seq_write(d)?;
        let seq_read = self.seq_read(d)?;
        let rand_write = self.rand_write(d)?;
        let small_files = self.small_files(d)?;
        scratch.remove()?;
        Ok(RepResult {
            seq_write,
            seq_read,
            rand_write,
            small_files,
        })
    }

    /// All repetitions on one directory.
    pub fn run(&self, name: &str, dir: &Path) -> Result<TargetResult> {
        let mut reps = Vec::with_capacity(self.config.reps as usize);
        for rep in 0..self.config.reps {
            tracing::info!(target_name = name, rep, "running workloads");
            reps.push(self.run_once(dir).with_context(|| format!("{name}: rep {rep}"))?);
        }
        Ok(TargetResult {
            name: name.to_owned(),
            reps,
        })
    }

    /// All repetitions on several targets, interleaved (rep 0 on every
    /// target, then rep 1, ...) so that a slow patch on a noisy machine hits
    /// every target rather than skewing one of them.
    pub fn run_targets(&self, targets: &[&dyn Target]) -> Result<Vec<TargetResult>> {
        let mut results: Vec<TargetResult> = targets
            .iter()
            .map(|t| TargetResult {
                name: t.name().to_owned(),
                reps: Vec::with_capacity(self.config.reps as usize),
            })
            .collect();
        for rep in 0..self.config.reps {
            for (t, result) in targets.iter().zip(&mut results) {
                tracing::info!(target_name = t.name(), rep, "running workloads");
                let r = self
                    .run_once(t.dir())
                    .with_context(|| format!("{}: rep {rep}", t.name()))?;
                tracing::info!(
                    target_name = t.name(),
                    rep,
                    seq_write_mb_s = r.seq_write.mb_per_s,
                    seq_read_mb_s = r.seq_read.mb_per_s,
                    rand_iops = r.rand_write.iops,
                    files_per_s = r.small_files.files_per_s,
                    "rep done"
                );
                result.reps.push(r);
            }
        }
        Ok(results)
    }
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / BYTES_PER_MB / elapsed.as_secs_f64()
}

fn remove_if_exists(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    res.with_context(|| format!("remove {}", path.display()))
}

/// `syncfs(2)` on the filesystem holding `path`.
pub fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {} for syncfs", path.display()))?;
    // SAFETY: the fd is valid for the lifetime of `f`.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(())
}

/// Flush everything and drop the page cache, dentries and inodes, so the next
/// read comes from the device (or, for FUSE targets, from the daemon).
pub fn drop_caches() -> Result<()> {
    // Dirty pages cannot be dropped; sync first so "3" empties the cache.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3")
        .context("write /proc/sys/vm/drop_caches (needs root; set drop_caches = false to skip)")
}

/// A uniquely named scratch directory that is removed on drop unless
/// [`Scratch::remove`] already did so (and reported any error).
struct Scratch {
    path: Option<PathBuf>,
}

impl Scratch {
    fn create(parent: &Path) -> Result<Self> {
        for attempt in 0..100u32 {
            let path = parent.join(format!("den-bench.{}.{attempt}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path: Some(path) }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("mkdir {}", path.display()));
                }
            }
        }
        bail!("could not create a scratch directory in {}", parent.display())
    }

    fn path(&self) -> &Path {
        self.path.as_deref().expect("scratch dir already removed")
    }

    fn remove(mut self) -> Result<()> {
        let path = self.path.take().expect("scratch dir already removed");
        fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        // Deleting a GiB of data is real work for the target; finish it here
        // so it is not billed to whatever runs next.
        syncfs(path.parent().unwrap_or(Path::new("/")))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(e) = fs::remove_dir_all(&path)
        {
            tracing::warn!(path = %path.display(), error = %e, "leaving scratch dir behind");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn chunks_wrap_and_stay_aligned() {
        let set = WorkloadSet::new(WorkloadConfig::tiny()).unwrap();
        let len = set.pool.len();
        let chunks = (len / RAND_BLOCK) as u64;
        assert_eq!(set.chunk(0, RAND_BLOCK), set.chunk(chunks, RAND_BLOCK));
        assert_ne!(set.chunk(0, RAND_BLOCK), set.chunk(1, RAND_BLOCK));
    }

    #[test]
    fn config_validation() {
        assert!(WorkloadConfig::default().validate().is_ok());
        let bad = WorkloadConfig {
            reps: 0,
            ..WorkloadConfig::tiny()
        };
        assert!(WorkloadSet::new(bad).is_err());
    }
}
