//! `kill -9` in the middle of heavy writing: whole-chunk writes (written in
//! place into fresh chunks, or linked from a nameless file over mapped ones),
//! 4 KiB writes and discards, with write-back sealing and the uploader's
//! batched commits running underneath. After every kill the store is
//! reopened and each 4 KiB page must hold what a real disk could hold: the
//! version the last acknowledged fsync covered, or a version written after
//! it — never zeros where fsynced data was, never an older version.
//!
//! A custom runner (harness = false): the same binary is the writer child
//! when `DEN_KILL9_CHILD` names its data dir.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use den_store::{CreateOptions, ObjectBackend, Store, StoreConfig, Volume};

const CS: u64 = 256 << 10;
const CHUNKS: u64 = 32;
const PAGE: u64 = 4096;
const PAGES: u64 = CS * CHUNKS / PAGE;
const PAGES_PER_CHUNK: u64 = CS / PAGE;
const OPS_PER_ROUND: usize = 6;
const KILLS: u32 = 6;
const CHILD_ENV: &str = "DEN_KILL9_CHILD";
const SEED_ENV: &str = "DEN_KILL9_SEED";

/// splitmix64: the child and the parent derive the same write sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Chunk, version: every page of the chunk gets the version.
    Whole(u64, u32),
    /// Page, version.
    Page(u64, u32),
    /// Chunk discarded: its pages read as zeros (version 0).
    Discard(u64),
}

/// The writes of round `round` (from 1) of run `run`. Versions are unique
/// over the whole test and never 0 (0 stands for zeros).
fn round_ops(seed: u64, run: u32, round: u64) -> Vec<Op> {
    let mut rng = Rng(seed ^ (u64::from(run) << 40) ^ round.wrapping_mul(0x1000_0001));
    (0..OPS_PER_ROUND)
        .map(|i| {
            let version = (run << 24) | ((round as u32 & 0x3_ffff) << 4) | i as u32;
            match rng.below(100) {
                0..60 => Op::Whole(rng.below(CHUNKS), version),
                60..95 => Op::Page(rng.below(PAGES), version),
                _ => Op::Discard(rng.below(CHUNKS)),
            }
        })
        .collect()
}

fn page_bytes(page: u64, version: u32) -> Vec<u8> {
    if version == 0 {
        return vec![0; PAGE as usize];
    }
    let mut unit = [0u8; 8];
    unit[..4].copy_from_slice(&(page as u32).to_le_bytes());
    unit[4..].copy_from_slice(&version.to_le_bytes());
    unit.repeat((PAGE / 8) as usize)
}

/// The version a page holds, or why it holds nothing we ever wrote.
fn page_version(page: u64, b: &[u8]) -> Result<u32, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    let version = u32::from_le_bytes(b[4..8].try_into().unwrap());
    if b != page_bytes(page, version).as_slice() {
        return Err(format!("page {page} holds bytes no write produced (torn page?)"));
    }
    Ok(version)
}

fn config(data: &Path) -> StoreConfig {
    let mut c = StoreConfig::local(data.join("data"));
    c.objects = ObjectBackend::Local {
        dir: data.join("objects"),
    };
    c.dirty_limit = 64 << 20;
    // Seals and uploads (and so batched upload commits) run all the time,
    // racing the writes and the kill.
    c.writeback_delay = Duration::from_millis(20);
    c.upload_concurrency = 4;
    c.gc_interval = None;
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn apply(v: &Volume, op: Op) {
    match op {
        Op::Whole(c, version) => {
            let data: Vec<u8> = (0..PAGES_PER_CHUNK)
                .flat_map(|p| page_bytes(c * PAGES_PER_CHUNK + p, version))
                .collect();
            v.write_at(c * CS, &data).unwrap();
        }
        Op::Page(p, version) => v.write_at(p * PAGE, &page_bytes(p, version)).unwrap(),
        Op::Discard(c) => v.discard(c * CS, CS).unwrap(),
    }
}

/// The writer: rounds of writes, each followed by an fsync it reports on
/// stdout, until it is killed.
fn child(data: &Path, seed: u64, run: u32) {
    let rt = runtime();
    let store = rt.block_on(Store::open(config(data))).unwrap();
    if run == 0 {
        let opts = CreateOptions {
            size: Some(CS * CHUNKS),
            chunk_size: Some(CS as u32),
            source: None,
        };
        rt.block_on(store.create_volume("v", opts)).unwrap();
    }
    let v = rt.block_on(store.open_volume("v")).unwrap();
    println!("ready");
    for round in 1..=1_000_000u64 {
        for op in round_ops(seed, run, round) {
            apply(&v, op);
        }
        v.fsync().unwrap();
        println!("synced {round}");
    }
    panic!("the parent never killed the writer");
}

/// Per page: the version the last fsync covered, and every version written after it.
struct Model {
    synced: Vec<u32>,
    later: Vec<Vec<u32>>,
}

impl Model {
    fn advance(&mut self, seed: u64, run: u32, synced_rounds: u64, started_rounds: u64) {
        let mut set = |p: u64, ver: u32, is_synced: bool| {
            if is_synced {
                self.synced[p as usize] = ver;
            } else {
                self.later[p as usize].push(ver);
            }
        };
        for round in 1..=started_rounds {
            for op in round_ops(seed, run, round) {
                let s = round <= synced_rounds;
                match op {
                    Op::Whole(c, ver) => {
                        (0..PAGES_PER_CHUNK).for_each(|i| set(c * PAGES_PER_CHUNK + i, ver, s))
                    }
                    Op::Page(p, ver) => set(p, ver, s),
                    Op::Discard(c) => (0..PAGES_PER_CHUNK).for_each(|i| set(c * PAGES_PER_CHUNK + i, 0, s)),
                }
            }
        }
    }

    /// Check the reopened volume and make what it holds the new synced state.
    fn check(&mut self, v: &Volume, ctx: &str) {
        let mut buf = vec![0u8; CS as usize];
        let mut newer = 0;
        for c in 0..CHUNKS {
            v.read_at(c * CS, &mut buf).unwrap();
            for i in 0..PAGES_PER_CHUNK {
                let p = c * PAGES_PER_CHUNK + i;
                let b = &buf[(i * PAGE) as usize..((i + 1) * PAGE) as usize];
                let got = page_version(p, b).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let want = self.synced[p as usize];
                if got != want {
                    assert!(
                        self.later[p as usize].contains(&got),
                        "{ctx}: page {p} (chunk {c}) holds version {got:#x}; fsynced was {want:#x}, \
                         written since: {:x?}",
                        self.later[p as usize]
                    );
                    newer += 1;
                }
                self.synced[p as usize] = got;
                self.later[p as usize].clear();
            }
        }
        eprintln!("{ctx}: all {PAGES} pages consistent ({newer} hold writes newer than the last fsync)");
    }
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            s ^ u64::from(std::process::id())
        });
    eprintln!("kill9_writes: seed {seed} (rerun with {SEED_ENV}={seed})");
    let mut rng = Rng(seed);
    let mut model = Model {
        synced: vec![0; PAGES as usize],
        later: vec![Vec::new(); PAGES as usize],
    };
    for run in 0..KILLS {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .env(CHILD_ENV, dir.path())
            .env(SEED_ENV, seed.to_string())
            .env("DEN_KILL9_RUN", run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let target = 3 + rng.below(20);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut synced = 0u64;
        while synced < target {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("run {run}: the writer exited before round {target}"))
                .unwrap();
            if let Some(n) = line.strip_prefix("synced ") {
                synced = n.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "run {run}: the writer is too slow");
        }
        // Kill somewhere inside the next rounds' writes (or their fsync).
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Rounds whose fsync was reported before the kill.
        for line in lines {
            if let Some(n) = line.unwrap().strip_prefix("synced ") {
                synced = n.parse().unwrap();
            }
        }
        // Only the round after the last reported fsync can have written
        // since: the writer reports each fsync before starting the next round.
        model.advance(seed, run, synced, synced + 1);

        let rt = runtime();
        let store = rt.block_on(Store::open(config(dir.path()))).unwrap();
        let v = rt.block_on(store.open_volume("v")).unwrap();
        model.check(&v, &format!("run {run}, killed after fsync {synced}"));
        // Everything the crash left behind uploads and commits cleanly.
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), store.flush("v", |_| {})).await })
            .expect("flush after the crash timed out")
            .unwrap();
        assert!(
            rt.block_on(store.meta().verify_refcounts()).unwrap().is_empty(),
            "run {run}: reference counts"
        );
        store.drop_read_cache();
        model.check(&v, &format!("run {run}, after flushing to the object store"));
        drop(v);
        drop(store);
    }
}

fn main() {
    if let Some(data) = std::env::var_os(CHILD_ENV) {
        let seed = std::env::var(SEED_ENV).unwrap().parse().unwrap();
        let run = std::env::var("DEN_KILL9_RUN").unwrap().parse().unwrap();
        child(Path::new(&data), seed, run);
        return;
    }
    // The libtest convention for a filter: run only when named (or unfiltered).
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if !args.is_empty()
        && !args
            .iter()
            .any(|a| "kill9_whole_chunk_writes_keep_fsynced_data".contains(a.as_str()))
    {
        return;
    }
    let started = Instant::now();
    parent();
    eprintln!(
        "test kill9_whole_chunk_writes_keep_fsynced_data ... ok ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
}
