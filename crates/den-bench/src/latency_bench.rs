//! Metadata-operation latency and object-store throughput of a raw den
//! volume (no filesystem): checkpoint, fork and restore after growing
//! amounts of written data, write-back (flush) time, and cold reads from the
//! object store.
//!
//! Everything runs on one store in a private directory under the work dir,
//! with the defaults `den` itself uses (`StoreConfig::local`). Data written
//! is incompressible and never repeats at any 4 KiB granularity, so neither
//! compression nor dedup can shrink it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_store::{CreateOptions, DEFAULT_VOLUME_SIZE, StoreError, Volume, VolumeSource};
use rand::{Rng, RngCore};
use serde::Serialize;

use crate::cancel;
use crate::den_target::{DenStore, WorkRoot};
use crate::report::{Latency, latency};
use crate::workloads::{BYTES_PER_MB, drop_caches};

const MIB: u64 = 1 << 20;
/// Every write and read here is one 1 MiB call.
pub const BLOCK: usize = MIB as usize;
const STAMP_EVERY: usize = 4096;
const POOL: usize = 64 << 20;
const LAT_VOLUME: &str = "lat";
const COLD_VOLUME: &str = "cold";
/// Payload sequence numbers of the cold-read volume, apart from the rest.
const COLD_BASE: u64 = 1 << 40;

/// Incompressible, never-repeating block content: a slice of a random pool,
/// with every 4 KiB stamped with `(sequence number, position)` so that no
/// two 4 KiB blocks ever written are equal (no dedup at any chunk size), and
/// block `n` can be regenerated to verify a read.
pub struct Payload {
    pool: Vec<u8>,
}

impl Default for Payload {
    fn default() -> Self {
        Self::new()
    }
}

impl Payload {
    pub fn new() -> Self {
        let mut pool = vec![0u8; POOL];
        rand::rng().fill_bytes(&mut pool);
        Self { pool }
    }

    /// Fill `buf` (at most 1 MiB) with the content of block `n`.
    pub fn fill(&self, n: u64, buf: &mut [u8]) {
        assert!(buf.len() <= BLOCK, "payload blocks are at most {BLOCK} bytes");
        let slices = (POOL / BLOCK) as u64;
        let start = (n % slices) as usize * BLOCK;
        buf.copy_from_slice(&self.pool[start..start + buf.len()]);
        for (i, piece) in buf.chunks_mut(STAMP_EVERY).enumerate() {
            let stamp = Self::stamp(n, i);
            let k = piece.len().min(8);
            piece[..k].copy_from_slice(&stamp[..k]);
        }
    }

    fn stamp(n: u64, i: usize) -> [u8; 8] {
        (n.wrapping_mul(1 << 12) ^ i as u64 ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes()
    }

    /// Cheap check that `buf` is block `n`: compares only the stamps.
    pub fn stamps_match(n: u64, buf: &[u8]) -> bool {
        buf.chunks(STAMP_EVERY).enumerate().all(|(i, piece)| {
            let stamp = Self::stamp(n, i);
            let k = piece.len().min(8);
            piece[..k] == stamp[..k]
        })
    }
}

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyConfig {
    /// Total bytes written into the volume before each round of samples
    /// (cumulative, ascending).
    pub levels: Vec<u64>,
    /// Samples per operation per level.
    pub samples: usize,
    pub chunk_size: Option<u32>,
    pub volume_size: u64,
    /// Size of the volume written, flushed and read back cold.
    pub cold_bytes: u64,
    /// Readers for the parallel cold read.
    pub cold_readers: usize,
}

impl LatencyConfig {
    pub fn full() -> Self {
        Self {
            levels: vec![0, 100 * MIB, 1 << 30, 4 << 30],
            samples: 20,
            chunk_size: None,
            volume_size: DEFAULT_VOLUME_SIZE,
            cold_bytes: 1 << 30,
            cold_readers: 4,
        }
    }

    pub fn quick() -> Self {
        Self {
            levels: vec![0, 16 * MIB, 64 * MIB],
            samples: 5,
            cold_bytes: 64 * MIB,
            ..Self::full()
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "raw volume of {} (sparse), chunk size {}, {} samples per operation and level; \
             before each checkpoint, live fork and restore sample 1 MiB of fresh data is written at a \
             random offset and fsynced (untimed); levels are flushed to the object store before sampling; \
             restore is timed with the volume closed",
            fmt_size(self.volume_size),
            self.chunk_size
                .map_or_else(|| "default".to_owned(), |c| fmt_size(u64::from(c))),
            self.samples
        )
    }
}

/// Latencies after `written` bytes.
#[derive(Debug, Clone, Serialize)]
pub struct LevelLatency {
    pub written: u64,
    /// Raw write throughput of the data added to reach this level
    /// (`None` when nothing was added).
    pub fill_mb_s: Option<f64>,
    /// Chunk-map entries of the volume's head at this level.
    pub map_entries: u64,
    pub checkpoint: Latency,
    pub fork_checkpoint: Latency,
    pub fork_live: Latency,
    pub restore: Latency,
}

/// Write-back and cold-read figures for `bytes` of data.
#[derive(Debug, Clone, Serialize)]
pub struct ColdRead {
    pub bytes: u64,
    /// Writing the data into the volume (local cache), including fsync.
    pub write_mb_s: f64,
    /// `Store::flush` right after the write: seal and upload all of it.
    pub flush: Duration,
    pub flush_mb_s: f64,
    /// Sequential 1 MiB reads, one reader, after dropping den's read cache
    /// and the kernel page cache: every chunk comes from the object store.
    pub cold_read_mb_s: f64,
    /// The same with `readers` threads.
    pub cold_read_parallel_mb_s: f64,
    pub readers: usize,
    /// Reading again: every chunk is in den's local read cache.
    pub warm_read_mb_s: f64,
    pub objects: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResults {
    pub config: LatencyConfig,
    pub levels: Vec<LevelLatency>,
    pub cold: ColdRead,
}

/// Run the latency and cold-read measurements in a private store under `work`.
pub fn run(work: &Path, cfg: &LatencyConfig, progress: &mut dyn FnMut(&str)) -> Result<LatencyResults> {
    ensure!(cfg.samples > 0, "need at least one sample");
    ensure!(
        cfg.levels.windows(2).all(|w| w[0] <= w[1]),
        "levels must be ascending"
    );
    let max_level = cfg.levels.iter().copied().max().unwrap_or(0);
    ensure!(
        max_level < cfg.volume_size && cfg.cold_bytes < cfg.volume_size,
        "the volume ({}) must be larger than what is written into it",
        fmt_size(cfg.volume_size)
    );
    let mut root = WorkRoot::create(work, "den-bench-latency")?;
    let store = DenStore::open(&root.path().join("den-data"), |_| {})?;
    let payload = Payload::new();
    let result = (|| -> Result<LatencyResults> {
        let levels = run_levels(&store, &payload, cfg, progress)?;
        progress(&format!("cold read: writing {}", fmt_size(cfg.cold_bytes)));
        let cold = run_cold(&store, &payload, cfg)?;
        Ok(LatencyResults {
            config: cfg.clone(),
            levels,
            cold,
        })
    })();
    store.close();
    let removed = root.remove();
    let out = result?;
    removed?;
    Ok(out)
}

struct Sampler<'a> {
    store: &'a DenStore,
    payload: &'a Payload,
    next_block: u64,
    buf: Vec<u8>,
}

impl Sampler<'_> {
    /// Write one fresh 1 MiB block at a random block offset below `limit`
    /// (at 0 when `limit` is below one block) and fsync.
    fn dirty(&mut self, vol: &Volume, limit: u64) -> Result<()> {
        let blocks = (limit / BLOCK as u64).max(1);
        let off = rand::rng().random_range(0..blocks) * BLOCK as u64;
        self.payload.fill(self.next_block, &mut self.buf);
        self.next_block += 1;
        vol.write_at(off, &self.buf).context("write_at")?;
        vol.fsync().context("fsync")?;
        Ok(())
    }

    fn open(&self, name: &str) -> Result<Volume> {
        self.store
            .block_on(self.store.store().open_volume(name))
            .with_context(|| format!("opening {name}"))
    }
}

fn run_levels(
    store: &DenStore,
    payload: &Payload,
    cfg: &LatencyConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<LevelLatency>> {
    let s = store.store();
    store
        .block_on(s.create_volume(
            LAT_VOLUME,
            CreateOptions {
                size: Some(cfg.volume_size),
                chunk_size: cfg.chunk_size,
                source: None,
            },
        ))
        .context("creating the latency volume")?;
    let mut sampler = Sampler {
        store,
        payload,
        next_block: 0,
        buf: vec![0u8; BLOCK],
    };
    let mut vol = Some(sampler.open(LAT_VOLUME)?);
    let mut written = 0u64;
    let mut out = Vec::new();

    for (li, &level) in cfg.levels.iter().enumerate() {
        cancel::check()?;
        let v = vol.as_ref().expect("volume is open");
        // Grow the volume to `level` with fresh data.
        let fill_start = Instant::now();
        let before = written;
        while written < level {
            payload.fill(sampler.next_block, &mut sampler.buf);
            sampler.next_block += 1;
            v.write_at(written, &sampler.buf).context("write_at")?;
            written += BLOCK as u64;
            if written.is_multiple_of(256 * MIB) {
                cancel::check()?;
            }
        }
        v.fsync().context("fsync")?;
        let fill_mb_s = (written > before)
            .then(|| (written - before) as f64 / BYTES_PER_MB / fill_start.elapsed().as_secs_f64());
        progress(&format!(
            "latency @ {}: flushing to the object store",
            fmt_size(written)
        ));
        store.flush(LAT_VOLUME)?;
        let base = v.checkpoint(&format!("base {li}")).context("base checkpoint")?;
        let mut checkpoints = Vec::new();
        let mut forks = Vec::new();

        progress(&format!(
            "latency @ {}: {} checkpoints, forks, restores",
            fmt_size(written),
            cfg.samples
        ));
        let mut ck_samples = Vec::with_capacity(cfg.samples);
        for i in 0..cfg.samples {
            cancel::check()?;
            sampler.dirty(v, written)?;
            let t = Instant::now();
            let ck = v.checkpoint(&format!("sample {li}.{i}")).context("checkpoint")?;
            ck_samples.push(t.elapsed());
            checkpoints.push(ck.id);
        }

        let mut fork_ck_samples = Vec::with_capacity(cfg.samples);
        for i in 0..cfg.samples {
            cancel::check()?;
            let name = format!("fc-{li}-{i}");
            let src = VolumeSource::Checkpoint {
                volume: LAT_VOLUME.to_owned(),
                checkpoint: base.id.clone(),
            };
            let t = Instant::now();
            store
                .block_on(s.fork(&name, src))
                .context("fork from checkpoint")?;
            fork_ck_samples.push(t.elapsed());
            forks.push(name);
        }

        let mut fork_live_samples = Vec::with_capacity(cfg.samples);
        for i in 0..cfg.samples {
            cancel::check()?;
            sampler.dirty(v, written)?;
            let name = format!("fl-{li}-{i}");
            let t = Instant::now();
            store
                .block_on(s.fork(&name, VolumeSource::Volume(LAT_VOLUME.to_owned())))
                .context("fork from live volume")?;
            fork_live_samples.push(t.elapsed());
            forks.push(name);
        }

        let mut restore_samples = Vec::with_capacity(cfg.samples);
        for _ in 0..cfg.samples {
            cancel::check()?;
            sampler.dirty(vol.as_ref().expect("volume is open"), written)?;
            // Restore needs the volume closed: this drops the only handle.
            drop(vol.take());
            restore_samples.push(timed_restore(store, LAT_VOLUME, &base.id)?);
            vol = Some(sampler.open(LAT_VOLUME)?);
        }

        let info = store.block_on(s.volume_info(LAT_VOLUME)).context("volume info")?;

        // Untimed cleanup, so every level starts from the same amount of
        // metadata besides the data itself.
        for f in &forks {
            store
                .block_on(s.delete_volume(f))
                .with_context(|| format!("deleting fork {f}"))?;
        }
        for ck in checkpoints.iter().chain(std::iter::once(&base.id)) {
            store
                .block_on(s.delete_checkpoint(LAT_VOLUME, ck))
                .with_context(|| format!("deleting checkpoint {ck}"))?;
        }

        let lat = |v: &[Duration]| latency(v).expect("samples > 0");
        let r = LevelLatency {
            written,
            fill_mb_s,
            map_entries: info.mapped_chunks,
            checkpoint: lat(&ck_samples),
            fork_checkpoint: lat(&fork_ck_samples),
            fork_live: lat(&fork_live_samples),
            restore: lat(&restore_samples),
        };
        progress(&format!(
            "latency @ {}: checkpoint p50 {:.2} ms, fork p50 {:.2} ms (live {:.2} ms), restore p50 {:.2} ms",
            fmt_size(written),
            ms(r.checkpoint.p50),
            ms(r.fork_checkpoint.p50),
            ms(r.fork_live.p50),
            ms(r.restore.p50),
        ));
        out.push(r);
    }
    Ok(out)
}

/// `Store::restore` on a closed volume. The store's write-back task holds a
/// handle for a moment every 250 ms, which makes the volume look open; such
/// attempts are retried and not counted.
fn timed_restore(store: &DenStore, name: &str, checkpoint: &str) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = Instant::now();
        match store.block_on(store.store().restore(name, checkpoint)) {
            Ok(()) => return Ok(t.elapsed()),
            Err(StoreError::VolumeBusy(_)) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).context("restore"),
        }
    }
}

fn run_cold(store: &DenStore, payload: &Payload, cfg: &LatencyConfig) -> Result<ColdRead> {
    let s = store.store();
    store
        .block_on(s.create_volume(
            COLD_VOLUME,
            CreateOptions {
                size: Some(cfg.volume_size),
                chunk_size: cfg.chunk_size,
                source: None,
            },
        ))
        .context("creating the cold-read volume")?;
    let vol = store.block_on(s.open_volume(COLD_VOLUME))?;
    let blocks = cfg.cold_bytes.div_ceil(BLOCK as u64);
    let bytes = blocks * BLOCK as u64;
    let mut buf = vec![0u8; BLOCK];

    let t = Instant::now();
    for i in 0..blocks {
        payload.fill(COLD_BASE + i, &mut buf);
        vol.write_at(i * BLOCK as u64, &buf).context("write_at")?;
        if i % 256 == 255 {
            cancel::check()?;
        }
    }
    vol.fsync()?;
    let write_elapsed = t.elapsed();

    let t = Instant::now();
    store.flush(COLD_VOLUME)?;
    let flush = t.elapsed();
    let stats = store.block_on(s.stats())?;
    cancel::check()?;

    // One reader: every read is a fetch from the object store.
    go_cold(store)?;
    let mut expected = vec![0u8; BLOCK];
    let mut read_time = Duration::ZERO;
    for i in 0..blocks {
        let t = Instant::now();
        vol.read_at(i * BLOCK as u64, &mut buf).context("read_at")?;
        read_time += t.elapsed();
        payload.fill(COLD_BASE + i, &mut expected);
        if buf != expected {
            bail!("cold read of block {i} returned wrong data");
        }
        if i % 256 == 255 {
            cancel::check()?;
        }
    }
    let cold_read_mb_s = bytes as f64 / BYTES_PER_MB / read_time.as_secs_f64();

    // Several readers, as a guest's readahead would issue.
    go_cold(store)?;
    let readers = cfg.cold_readers.max(1);
    let parallel = parallel_read(&vol, blocks, readers)?;
    let cold_read_parallel_mb_s = bytes as f64 / BYTES_PER_MB / parallel.as_secs_f64();

    // Warm: den's read cache now holds every chunk.
    let warm = parallel_read(&vol, blocks, 1)?;
    let warm_read_mb_s = bytes as f64 / BYTES_PER_MB / warm.as_secs_f64();

    Ok(ColdRead {
        bytes,
        write_mb_s: bytes as f64 / BYTES_PER_MB / write_elapsed.as_secs_f64(),
        flush,
        flush_mb_s: bytes as f64 / BYTES_PER_MB / flush.as_secs_f64(),
        cold_read_mb_s,
        cold_read_parallel_mb_s,
        readers,
        warm_read_mb_s,
        objects: stats.chunks,
        stored_bytes: stats.stored_bytes,
    })
}

/// Empty den's read cache and the kernel's page cache (which holds the
/// local object files).
fn go_cold(store: &DenStore) -> Result<()> {
    store.store().drop_read_cache();
    drop_caches()
}

/// Read blocks `0..blocks` with `readers` threads taking the next block from
/// a shared counter; checks every block's stamps. Returns the wall time.
fn parallel_read(vol: &Volume, blocks: u64, readers: usize) -> Result<Duration> {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..readers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; BLOCK];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= blocks {
                            return Ok(());
                        }
                        if cancel::is_interrupted() {
                            return cancel::check();
                        }
                        vol.read_at(i * BLOCK as u64, &mut buf).context("read_at")?;
                        ensure!(
                            Payload::stamps_match(COLD_BASE + i, &buf),
                            "read of block {i} returned wrong data"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(t.elapsed())
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `0 MiB`, `100 MiB`, `1 GiB`, `64 KiB`.
pub fn fmt_size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (u, name) in UNITS {
        if n >= u && n.is_multiple_of(u) {
            return format!("{} {name}", n / u);
        }
    }
    if n == 0 {
        return "0 MiB".to_owned();
    }
    for (u, name) in UNITS {
        if n >= u {
            return format!("{:.1} {name}", n as f64 / u as f64);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_blocks_are_unique_and_checkable() {
        let p = Payload::new();
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        p.fill(1, &mut a);
        p.fill(1 + (POOL / BLOCK) as u64, &mut b);
        assert_ne!(a, b, "same pool slice, different stamps");
        let mut seen = std::collections::HashSet::new();
        for piece in a.chunks(STAMP_EVERY).chain(b.chunks(STAMP_EVERY)) {
            assert!(seen.insert(piece.to_vec()), "a 4 KiB block repeats");
        }
        assert!(Payload::stamps_match(1, &a));
        assert!(!Payload::stamps_match(2, &a));
    }

    #[test]
    fn sizes_format() {
        assert_eq!(fmt_size(0), "0 MiB");
        assert_eq!(fmt_size(100 << 20), "100 MiB");
        assert_eq!(fmt_size(4 << 30), "4 GiB");
        assert_eq!(fmt_size(64 << 10), "64 KiB");
        assert_eq!(fmt_size(1536 << 20), "1536 MiB");
        assert_eq!(fmt_size(1000), "1000 B");
    }
}
