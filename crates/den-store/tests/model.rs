//! Model-based property test of the volume store.
//!
//! Random sequences of writes, discards, fsyncs, checkpoints, restores,
//! forks, deletes, GC, flushes, handle closes and store reopens run against a
//! real `Store` (local-directory object store) and against a trivial model: one `Vec<u8>` per volume and one snapshot per checkpoint.
//! Volumes and checkpoints are read back and compared byte for byte, and the
//! chunk reference counts are checked after every operation.
//!
//! The same test runs once per metadata backend: SQLite (the single-host
//! default) and PostgreSQL (a real server started for the test, one fresh
//! database per case; a reopen is a node restart that claims its volumes
//! again).
//!
//! `PROPTEST_CASES` sets the number of cases per backend (default
//! [`DEFAULT_CASES`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use den_store::meta::postgres::PgMeta;
use den_store::meta::{ClusterMeta, MetaStore};
use den_store::{Compression, CreateOptions, ObjectBackend, Store, StoreConfig, Volume, VolumeSource};
use den_testkit::postgres::TestPostgres;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

const DEFAULT_CASES: u32 = 48;
const MAX_VOLUMES: usize = 5;
const MAX_CHECKPOINTS: usize = 10;
const SIZES: [u64; 4] = [256 << 10, 512 << 10, 1 << 20, 260 << 10];
/// Long enough for any legitimate wait; a hang is a failure, not a stuck CI job.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Pos {
    /// Near the start of chunk `chunk % chunks`, shifted by `delta` bytes.
    Boundary { chunk: u16, delta: i16 },
    /// Anywhere (`n % size`).
    Any(u32),
}

#[derive(Clone, Copy, Debug)]
enum Len {
    Chunks(u8),
    Bytes(u16),
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    /// Every byte `b` (0 makes zero chunks; equal fills dedup across volumes).
    Fill(u8),
    /// Depends on the absolute offset, so equal writes at equal offsets dedup.
    Mix(u8),
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        vol: u8,
        pos: Pos,
        len: Len,
        pattern: Pattern,
    },
    Discard {
        vol: u8,
        pos: Pos,
        len: Len,
    },
    Fsync {
        vol: u8,
    },
    Checkpoint {
        vol: u8,
        via_handle: bool,
    },
    Restore {
        vol: u8,
        ck: u8,
    },
    ForkCheckpoint {
        ck: u8,
    },
    ForkLive {
        vol: u8,
    },
    DeleteCheckpoint {
        ck: u8,
    },
    DeleteVolume {
        vol: u8,
    },
    Gc {
        sweep: bool,
    },
    Flush {
        vol: u8,
    },
    /// Drop this process's handle; the next op on the volume reopens it.
    Close {
        vol: u8,
    },
    /// Drop every handle, the store and its runtime, then open it again.
    Reopen,
    DropReadCache,
    /// Read back every volume and every checkpoint.
    Verify,
}

#[derive(Clone, Debug)]
struct Setup {
    /// (size index, 16 KiB chunks instead of 4 KiB)
    volumes: Vec<(usize, bool)>,
    writeback: u8,
    compression: u8,
    upload_concurrency: usize,
}

fn pos() -> impl Strategy<Value = Pos> {
    prop_oneof![
        (any::<u16>(), -40i16..40).prop_map(|(chunk, delta)| Pos::Boundary { chunk, delta }),
        (any::<u16>(), Just(0i16)).prop_map(|(chunk, delta)| Pos::Boundary { chunk, delta }),
        any::<u32>().prop_map(Pos::Any),
    ]
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        (1u8..=3).prop_map(Len::Chunks),
        (0u16..300).prop_map(Len::Bytes),
        any::<u16>().prop_map(Len::Bytes),
    ]
}

fn pattern() -> impl Strategy<Value = Pattern> {
    prop_oneof![
        prop_oneof![Just(0u8), Just(0xaa), any::<u8>()].prop_map(Pattern::Fill),
        (0u8..4).prop_map(Pattern::Mix),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let vol = any::<u8>;
    prop_oneof![
        14 => (vol(), pos(), len(), pattern())
            .prop_map(|(vol, pos, len, pattern)| Op::Write { vol, pos, len, pattern }),
        4 => (vol(), pos(), len()).prop_map(|(vol, pos, len)| Op::Discard { vol, pos, len }),
        2 => vol().prop_map(|vol| Op::Fsync { vol }),
        4 => (vol(), any::<bool>()).prop_map(|(vol, via_handle)| Op::Checkpoint { vol, via_handle }),
        3 => (vol(), any::<u8>()).prop_map(|(vol, ck)| Op::Restore { vol, ck }),
        1 => any::<u8>().prop_map(|ck| Op::ForkCheckpoint { ck }),
        1 => vol().prop_map(|vol| Op::ForkLive { vol }),
        1 => any::<u8>().prop_map(|ck| Op::DeleteCheckpoint { ck }),
        1 => vol().prop_map(|vol| Op::DeleteVolume { vol }),
        1 => any::<bool>().prop_map(|sweep| Op::Gc { sweep }),
        1 => vol().prop_map(|vol| Op::Flush { vol }),
        2 => vol().prop_map(|vol| Op::Close { vol }),
        1 => Just(Op::Reopen),
        1 => Just(Op::DropReadCache),
        1 => Just(Op::Verify),
    ]
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        proptest::collection::vec((0..SIZES.len(), any::<bool>()), 2..=3),
        0u8..3,
        0u8..3,
        prop_oneof![Just(1usize), Just(4)],
    )
        .prop_map(|(volumes, writeback, compression, upload_concurrency)| Setup {
            volumes,
            writeback,
            compression,
            upload_concurrency,
        })
}

fn fill(pattern: Pattern, offset: u64, len: usize) -> Vec<u8> {
    match pattern {
        Pattern::Fill(b) => vec![b; len],
        Pattern::Mix(s) => (0..len as u64)
            .map(|i| {
                let x = (offset + i).wrapping_mul(0x9e37_79b9) ^ (s as u64).wrapping_mul(0x85eb_ca6b);
                (x >> 11) as u8
            })
            .collect(),
    }
}

struct VolModel {
    data: Vec<u8>,
    cs: u64,
}

struct CkModel {
    vol: String,
    id: String,
    data: Vec<u8>,
}

struct Harness {
    meta: Meta,
    _dir: tempfile::TempDir,
    cfg: StoreConfig,
    rt: Option<tokio::runtime::Runtime>,
    store: Option<Store>,
    handles: HashMap<String, Volume>,
    vols: BTreeMap<String, VolModel>,
    cks: Vec<CkModel>,
    next_fork: u32,
}

type R<T = ()> = Result<T, TestCaseError>;

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn first_diff(what: &str, got: &[u8], want: &[u8]) -> R {
    if got.len() != want.len() {
        return Err(fail(format!("{what}: length {} != {}", got.len(), want.len())));
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        return Err(fail(format!(
            "{what}: first difference at byte {i}: got {:02x?}, want {:02x?}",
            &got[i..end],
            &want[i..end]
        )));
    }
    Ok(())
}

impl Harness {
    fn new(meta: Meta, setup: &Setup) -> R<Harness> {
        let dir = tempfile::tempdir().map_err(fail)?;
        let mut cfg = StoreConfig::local(dir.path().join("data"));
        cfg.objects = ObjectBackend::Local {
            dir: dir.path().join("objects"),
        };
        cfg.dirty_limit = 64 << 20;
        cfg.writeback_delay = match setup.writeback {
            0 => Duration::ZERO,
            1 => Duration::from_millis(30),
            _ => Duration::from_secs(3600),
        };
        cfg.compression = match setup.compression {
            0 => Compression::Zstd,
            1 => Compression::Lz4,
            _ => Compression::None,
        };
        cfg.upload_concurrency = setup.upload_concurrency;
        cfg.fetch_timeout = Duration::from_secs(5);
        let mut h = Harness {
            _dir: dir,
            meta,
            cfg,
            rt: Some(runtime()),
            store: None,
            handles: HashMap::new(),
            vols: BTreeMap::new(),
            cks: Vec::new(),
            next_fork: 0,
        };
        h.open_store()?;
        for (i, &(size, big)) in setup.volumes.iter().enumerate() {
            let name = ["a", "b", "c"][i];
            let cs: u32 = if big { 16 << 10 } else { 4 << 10 };
            let size = SIZES[size];
            let store = h.store().clone();
            h.block(store.create_volume(
                name,
                CreateOptions {
                    size: Some(size),
                    chunk_size: Some(cs),
                    source: None,
                },
            ))?;
            h.vols.insert(
                name.to_string(),
                VolModel {
                    data: vec![0; size as usize],
                    cs: cs as u64,
                },
            );
        }
        Ok(h)
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("store is open")
    }

    fn block<T, E: std::fmt::Display>(&self, f: impl Future<Output = Result<T, E>>) -> R<T> {
        let rt = self.rt.as_ref().expect("runtime");
        match rt.block_on(async { tokio::time::timeout(OP_TIMEOUT, f).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(fail(e)),
            Err(_) => Err(fail("store operation timed out")),
        }
    }

    fn open_store(&mut self) -> R {
        let cfg = self.cfg.clone();
        let store = match &self.meta {
            Meta::Sqlite => self.block(Store::open(cfg))?,
            Meta::Postgres { url } => {
                let url = url.clone();
                self.block(async move {
                    let m = PgMeta::connect(&url, NODE).await?;
                    // A restarted node holds no epochs: it claims its volumes again.
                    for v in m.list_volumes().await? {
                        let e = m.volume_owner(&v.id).await?.epoch;
                        if m.claim_volume(&v.id, NODE, e).await?.is_none() {
                            return Err(den_store::StoreError::Meta(format!("claiming {} failed", v.name)));
                        }
                    }
                    Store::open_with_meta(cfg, Arc::new(m)).await
                })?
            }
        };
        self.store = Some(store);
        Ok(())
    }

    fn handle(&mut self, name: &str) -> R<Volume> {
        if let Some(v) = self.handles.get(name) {
            return Ok(v.clone());
        }
        let store = self.store().clone();
        let v = self.block(store.open_volume(name))?;
        self.handles.insert(name.to_string(), v.clone());
        Ok(v)
    }

    fn pick_vol(&self, i: u8) -> String {
        let n = self.vols.len();
        self.vols.keys().nth(i as usize % n).expect("a volume").clone()
    }

    fn range(&self, name: &str, pos: Pos, len: Len) -> (u64, u64) {
        let m = &self.vols[name];
        let size = m.data.len() as u64;
        let chunks = size.div_ceil(m.cs);
        let off = match pos {
            Pos::Boundary { chunk, delta } => {
                ((chunk as u64 % chunks) * m.cs).saturating_add_signed(delta as i64)
            }
            Pos::Any(n) => n as u64 % size,
        }
        .min(size - 1);
        let want = match len {
            Len::Chunks(n) => n as u64 * m.cs,
            Len::Bytes(n) => n as u64 + 1,
        };
        (off, want.min(size - off))
    }

    fn verify_volume(&mut self, name: &str) -> R {
        let v = self.handle(name)?;
        let mut buf = vec![0u8; self.vols[name].data.len()];
        v.read_at(0, &mut buf).map_err(fail)?;
        first_diff(&format!("volume {name}"), &buf, &self.vols[name].data)
    }

    fn verify_refcounts(&self) -> R {
        let bad = self.block(self.store().meta().verify_refcounts())?;
        if !bad.is_empty() {
            return Err(fail(format!("refcounts wrong (hash, actual, stored): {bad:?}")));
        }
        Ok(())
    }

    fn verify_checkpoint(&mut self, i: usize) -> R {
        let (vol, id) = (self.cks[i].vol.clone(), self.cks[i].id.clone());
        let store = self.store().clone();
        let rec = self.block(store.get_checkpoint(&vol, &id))?;
        prop_assert_eq!(&rec.id, &id);
        self.block(store.fork(
            "ckv",
            VolumeSource::Checkpoint {
                volume: vol.clone(),
                checkpoint: id.clone(),
            },
        ))?;
        let v = self.block(store.open_volume("ckv"))?;
        let mut buf = vec![0u8; self.cks[i].data.len()];
        let read = v.read_at(0, &mut buf).map_err(fail);
        drop(v);
        self.block(store.delete_volume("ckv"))?;
        read?;
        first_diff(&format!("checkpoint {vol}/{id}"), &buf, &self.cks[i].data)
    }

    fn verify_all(&mut self) -> R {
        let names: Vec<String> = self.vols.keys().cloned().collect();
        for name in &names {
            self.verify_volume(name)?;
        }
        let store = self.store().clone();
        let listed = self.block(store.list_volumes())?;
        let listed: Vec<String> = listed.into_iter().map(|r| r.name).collect();
        prop_assert_eq!(&listed, &names);
        for name in &names {
            let mut got: Vec<String> = self
                .block(store.list_checkpoints(name))?
                .into_iter()
                .map(|c| c.id)
                .collect();
            got.sort();
            let mut want: Vec<String> = self
                .cks
                .iter()
                .filter(|c| &c.vol == name)
                .map(|c| c.id.clone())
                .collect();
            want.sort();
            prop_assert_eq!(got, want, "checkpoints of {}", name);
        }
        for i in 0..self.cks.len() {
            self.verify_checkpoint(i)?;
        }
        self.verify_refcounts()
    }

    fn reopen(&mut self) -> R {
        self.handles.clear();
        self.store = None;
        // Dropping the runtime cancels in-flight uploads and write-back, which
        // is as close to a crash of the background work as a test gets.
        self.rt = None;
        self.rt = Some(runtime());
        self.open_store()
    }

    fn fork_name(&mut self) -> String {
        self.next_fork += 1;
        format!("f{}", self.next_fork)
    }

    /// Apply one op to the store and the model. Returns the volume whose
    /// content the op may have changed, for an immediate read-back.
    fn apply(&mut self, op: &Op) -> R<Option<String>> {
        let store = self.store().clone();
        match *op {
            Op::Write {
                vol,
                pos,
                len,
                pattern,
            } => {
                let name = self.pick_vol(vol);
                let (off, len) = self.range(&name, pos, len);
                let data = fill(pattern, off, len as usize);
                self.handle(&name)?.write_at(off, &data).map_err(fail)?;
                self.vols.get_mut(&name).expect("model").data[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
                Ok(Some(name))
            }
            Op::Discard { vol, pos, len } => {
                let name = self.pick_vol(vol);
                let (off, len) = self.range(&name, pos, len);
                self.handle(&name)?.discard(off, len).map_err(fail)?;
                self.vols.get_mut(&name).expect("model").data[off as usize..(off + len) as usize].fill(0);
                Ok(Some(name))
            }
            Op::Fsync { vol } => {
                let name = self.pick_vol(vol);
                self.handle(&name)?.fsync().map_err(fail)?;
                Ok(Some(name))
            }
            Op::Checkpoint { vol, via_handle } => {
                if self.cks.len() >= MAX_CHECKPOINTS {
                    return Ok(None);
                }
                let name = self.pick_vol(vol);
                let rec = if via_handle {
                    self.handle(&name)?.checkpoint("model").map_err(fail)?
                } else {
                    self.block(store.checkpoint(&name, "model"))?
                };
                prop_assert!(
                    !self.cks.iter().any(|c| c.vol == name && c.id == rec.id),
                    "checkpoint id {} reused",
                    rec.id
                );
                let data = self.vols[&name].data.clone();
                self.cks.push(CkModel {
                    vol: name.clone(),
                    id: rec.id,
                    data,
                });
                Ok(Some(name))
            }
            Op::Restore { vol, ck } => {
                let name = self.pick_vol(vol);
                let mine: Vec<usize> = (0..self.cks.len()).filter(|&i| self.cks[i].vol == name).collect();
                if mine.is_empty() {
                    return Ok(None);
                }
                let i = mine[ck as usize % mine.len()];
                self.handles.remove(&name);
                let id = self.cks[i].id.clone();
                self.block(store.restore(&name, &id))?;
                let data = self.cks[i].data.clone();
                self.vols.get_mut(&name).expect("model").data = data;
                Ok(Some(name))
            }
            Op::ForkCheckpoint { ck } => {
                if self.cks.is_empty() || self.vols.len() >= MAX_VOLUMES {
                    return Ok(None);
                }
                let i = ck as usize % self.cks.len();
                let new = self.fork_name();
                let (vol, id) = (self.cks[i].vol.clone(), self.cks[i].id.clone());
                self.block(store.fork(
                    &new,
                    VolumeSource::Checkpoint {
                        volume: vol.clone(),
                        checkpoint: id,
                    },
                ))?;
                let m = VolModel {
                    data: self.cks[i].data.clone(),
                    cs: self.vols[&vol].cs,
                };
                self.vols.insert(new.clone(), m);
                Ok(Some(new))
            }
            Op::ForkLive { vol } => {
                if self.vols.len() >= MAX_VOLUMES {
                    return Ok(None);
                }
                let name = self.pick_vol(vol);
                let new = self.fork_name();
                self.block(store.fork(&new, VolumeSource::Volume(name.clone())))?;
                let m = VolModel {
                    data: self.vols[&name].data.clone(),
                    cs: self.vols[&name].cs,
                };
                self.vols.insert(new.clone(), m);
                Ok(Some(new))
            }
            Op::DeleteCheckpoint { ck } => {
                if self.cks.is_empty() {
                    return Ok(None);
                }
                let i = ck as usize % self.cks.len();
                let c = self.cks.remove(i);
                self.block(store.delete_checkpoint(&c.vol, &c.id))?;
                Ok(None)
            }
            Op::DeleteVolume { vol } => {
                if self.vols.len() <= 1 {
                    return Ok(None);
                }
                let name = self.pick_vol(vol);
                self.handles.remove(&name);
                self.block(store.delete_volume(&name))?;
                self.vols.remove(&name);
                self.cks.retain(|c| c.vol != name);
                Ok(None)
            }
            Op::Gc { sweep } => {
                self.block(store.gc(sweep))?;
                Ok(None)
            }
            Op::Flush { vol } => {
                let name = self.pick_vol(vol);
                self.block(store.flush(&name, |_| {}))?;
                let info = self.block(store.volume_info(&name))?;
                prop_assert_eq!(info.pending_chunks, 0, "pending chunks after flushing {}", name);
                Ok(Some(name))
            }
            Op::Close { vol } => {
                let name = self.pick_vol(vol);
                self.handles.remove(&name);
                Ok(Some(name))
            }
            Op::Reopen => {
                self.reopen()?;
                Ok(None)
            }
            Op::DropReadCache => {
                store.drop_read_cache();
                Ok(None)
            }
            Op::Verify => {
                self.verify_all()?;
                Ok(None)
            }
        }
    }

    /// Everything durable, garbage collected, and still readable from the
    /// object store alone after a reopen with an empty read cache.
    fn finish(&mut self) -> R {
        self.verify_all()?;
        let store = self.store().clone();
        let names: Vec<String> = self.vols.keys().cloned().collect();
        for name in &names {
            self.block(store.flush(name, |_| {}))?;
        }
        for c in &self.cks {
            self.block(store.wait_durable(&c.vol, &c.id))?;
            let rec = self.block(store.get_checkpoint(&c.vol, &c.id))?;
            prop_assert!(
                rec.durable,
                "checkpoint {}/{} not durable after wait_durable",
                c.vol,
                c.id
            );
        }
        self.block(store.gc(true))?;
        self.verify_refcounts()?;
        self.reopen()?;
        self.store().drop_read_cache();
        self.verify_all()?;
        let stats = self.block(self.store().stats())?;
        prop_assert_eq!(stats.volumes as usize, self.vols.len());
        prop_assert_eq!(stats.checkpoints as usize, self.cks.len());
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handles.clear();
        self.store = None;
        // Stop the background tasks before the directory goes away.
        self.rt = None;
    }
}

fn run(meta: Meta, setup: Setup, ops: Vec<Op>) -> R {
    let mut h = Harness::new(meta, &setup)?;
    for (step, op) in ops.iter().enumerate() {
        let touched = h
            .apply(op)
            .map_err(|e| fail(format!("step {step} {op:?}: {e}")))?;
        let check = (|| {
            if let Some(name) = touched {
                h.verify_volume(&name)?;
            }
            h.verify_refcounts()
        })();
        check.map_err(|e| fail(format!("after step {step} {op:?}: {e}")))?;
    }
    h.finish().map_err(|e| fail(format!("final check: {e}")))
}

/// Where the store under test keeps its metadata.
#[derive(Clone, Debug)]
enum Meta {
    Sqlite,
    Postgres { url: String },
}

/// The node name the PostgreSQL store runs as.
const NODE: &str = "m";

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Run the property with `meta()` giving each case its backend; a failure
/// panics with the minimal failing input.
fn check(cases: u32, meta: impl Fn() -> Meta) {
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        max_shrink_time: 300_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (setup(), proptest::collection::vec(op(), 1..60));
    if let Err(e) = runner.run(&strategy, |(setup, ops)| run(meta(), setup, ops)) {
        panic!("{e}");
    }
}

#[test]
fn store_matches_model() {
    check(cases(), || Meta::Sqlite);
}

#[test]
fn store_matches_model_on_postgres() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let n = AtomicU32::new(0);
    check(cases(), || {
        let db = format!("model{}", n.fetch_add(1, Ordering::Relaxed));
        Meta::Postgres {
            url: pg.create_database(&db).expect("create database"),
        }
    });
}
