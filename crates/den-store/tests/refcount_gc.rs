//! Chunk maps, reference counts and garbage collection.
//!
//! Reference counts are read straight from `meta.db` (a second, read-only
//! SQLite connection) and objects are counted in an `ObjectBackend::Local`
//! directory, so these tests check the store's bookkeeping from the outside.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use den_store::{ChunkHash, CreateOptions, ObjectBackend, Store, StoreConfig, Volume, VolumeSource};
use rand::{Rng, SeedableRng};
use rusqlite::OptionalExtension;

const CS: u64 = 16 << 10;
const TIMEOUT: Duration = Duration::from_secs(60);

struct Env {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    store: Store,
}

fn config(root: &Path, writeback: Duration) -> StoreConfig {
    let mut c = StoreConfig::local(root.join("data"));
    c.objects = ObjectBackend::Local {
        dir: root.join("objects"),
    };
    c.dirty_limit = 64 << 20;
    c.writeback_delay = writeback;
    c.fetch_timeout = Duration::from_secs(5);
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

impl Env {
    fn new(writeback: Duration) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let store = rt.block_on(Store::open(config(dir.path(), writeback))).unwrap();
        Env { dir, rt, store }
    }

    /// Run an async store call with a deadline, so a hang fails the test.
    fn block<T>(&self, f: impl std::future::Future<Output = den_store::Result<T>>) -> T {
        self.rt
            .block_on(async { tokio::time::timeout(TIMEOUT, f).await })
            .expect("store call timed out")
            .expect("store call failed")
    }

    fn create(&self, name: &str, size: u64) {
        self.block(self.store.create_volume(
            name,
            CreateOptions {
                size: Some(size),
                chunk_size: Some(CS as u32),
                source: None,
            },
        ));
    }

    fn open(&self, name: &str) -> Volume {
        self.block(self.store.open_volume(name))
    }

    fn flush(&self, name: &str) {
        self.block(self.store.flush(name, |_| {}));
    }

    fn meta_db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.dir.path().join("data/meta.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    /// `(state, refs)` of a chunk row, or `None` if there is none.
    fn chunk_row(&self, h: &ChunkHash) -> Option<(String, i64)> {
        self.meta_db()
            .query_row(
                "SELECT state, refs FROM chunks WHERE hash = ?1",
                [&h.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .unwrap()
    }

    fn refs(&self, h: &ChunkHash) -> i64 {
        match self.chunk_row(h) {
            Some((state, refs)) => {
                assert_eq!(state, "present", "chunk {h:?}");
                refs
            }
            None => 0,
        }
    }

    fn present_chunks(&self) -> BTreeSet<String> {
        let db = self.meta_db();
        let mut st = db
            .prepare("SELECT hash FROM chunks WHERE state = 'present'")
            .unwrap();
        st.query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|h| hex(&h.unwrap()))
            .collect()
    }

    fn objects(&self) -> BTreeSet<String> {
        object_files(&self.dir.path().join("objects/chunks"))
            .into_iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect()
    }

    fn assert_refcounts(&self) {
        let bad = self.block(self.store.meta().verify_refcounts());
        assert!(bad.is_empty(), "refcounts wrong (hash, actual, stored): {bad:?}");
    }

    fn chunks_stat(&self) -> u64 {
        self.block(self.store.stats()).chunks
    }
}

/// `block_on` with a deadline, for threads that are not the test's own.
fn blk<T>(h: &tokio::runtime::Handle, f: impl std::future::Future<Output = T>) -> T {
    h.block_on(async { tokio::time::timeout(TIMEOUT, f).await })
        .expect("store call timed out")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn object_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(object_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A whole chunk whose content is determined by `n` alone.
fn chunk(n: u32) -> Vec<u8> {
    (0..CS as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503)).to_le_bytes()[1])
        .collect()
}

fn read_all(v: &Volume) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (chunk {})", i as u64 / CS);
    }
}

#[test]
fn identical_chunks_are_stored_once() {
    let env = Env::new(Duration::from_secs(3600));
    env.create("a", 1 << 20);
    env.create("b", 1 << 20);
    let data = chunk(7);
    let (a, b) = (env.open("a"), env.open("b"));
    a.write_at(0, &data).unwrap();
    b.write_at(5 * CS, &data).unwrap();
    // The same content twice within one volume as well.
    a.write_at(3 * CS, &data).unwrap();
    env.flush("a");
    env.flush("b");
    let h = ChunkHash::of(&data);
    assert_eq!(env.chunks_stat(), 1);
    assert_eq!(env.refs(&h), 3);
    assert_eq!(env.objects().len(), 1);
    assert!(env.objects().contains(&h.to_hex()));
    let stats = env.block(env.store.stats());
    assert!(
        stats.stored_bytes > 0 && stats.stored_bytes <= CS + 64,
        "{stats:?}"
    );
    env.assert_refcounts();
    env.store.drop_read_cache();
    let mut buf = vec![0u8; CS as usize];
    b.read_at(5 * CS, &mut buf).unwrap();
    assert_same("b chunk 5", &buf, &data);
}

#[test]
fn refs_follow_checkpoints_forks_restores_and_deletes() {
    let env = Env::new(Duration::from_secs(3600));
    env.create("a", 1 << 20);
    let (x, y, z) = (chunk(1), chunk(2), chunk(3));
    let (hx, hy, hz) = (ChunkHash::of(&x), ChunkHash::of(&y), ChunkHash::of(&z));

    let a = env.open("a");
    a.write_at(0, &x).unwrap();
    env.flush("a");
    assert_eq!(env.refs(&hx), 1);

    let ck1 = a.checkpoint("one").unwrap();
    assert!(ck1.durable, "a checkpoint of an uploaded head is durable at once");
    assert_eq!(env.refs(&hx), 2);
    env.block(env.store.fork(
        "f1",
        VolumeSource::Checkpoint {
            volume: "a".into(),
            checkpoint: ck1.id.clone(),
        },
    ));
    assert_eq!(env.refs(&hx), 3);
    env.block(env.store.fork("f2", VolumeSource::Volume("a".into())));
    assert_eq!(env.refs(&hx), 4);
    env.assert_refcounts();

    env.block(env.store.delete_checkpoint("a", &ck1.id));
    assert_eq!(env.refs(&hx), 3);
    env.block(env.store.delete_volume("f1"));
    assert_eq!(env.refs(&hx), 2);

    // Overwriting drops the head's reference once the new chunk is sealed.
    a.write_at(0, &y).unwrap();
    env.flush("a");
    assert_eq!((env.refs(&hx), env.refs(&hy)), (1, 1));
    env.assert_refcounts();

    // Checkpoint of a pending chunk: both maps gain the reference on upload.
    a.write_at(CS, &z).unwrap();
    let ck2 = a.checkpoint("two").unwrap();
    assert!(
        !ck2.durable,
        "checkpoint with an unuploaded chunk is not durable yet"
    );
    env.block(env.store.wait_durable("a", &ck2.id));
    assert!(env.block(env.store.get_checkpoint("a", &ck2.id)).durable);
    assert_eq!((env.refs(&hy), env.refs(&hz)), (2, 2));

    // Restore swaps the head's references for the checkpoint's.
    a.write_at(CS, &x).unwrap();
    env.flush("a");
    assert_eq!((env.refs(&hx), env.refs(&hz)), (2, 1));
    drop(a);
    env.block(env.store.restore("a", &ck2.id));
    assert_eq!((env.refs(&hx), env.refs(&hy), env.refs(&hz)), (1, 2, 2));
    env.assert_refcounts();

    // The last reference to x goes with f2; GC then removes exactly x.
    env.block(env.store.delete_volume("f2"));
    assert_eq!(env.chunk_row(&hx), Some(("present".into(), 0)));
    assert!(env.objects().contains(&hx.to_hex()));
    let report = env.block(env.store.gc(false));
    assert_eq!(report.chunks_deleted, 1);
    assert_eq!(env.chunk_row(&hx), None);
    assert_eq!(
        env.objects(),
        [hy.to_hex(), hz.to_hex()].into_iter().collect::<BTreeSet<_>>()
    );

    // Discarding unmaps: the head's references go at the next seal.
    let a = env.open("a");
    a.discard(0, 2 * CS).unwrap();
    env.flush("a");
    assert_eq!((env.refs(&hy), env.refs(&hz)), (1, 1));
    env.block(env.store.delete_checkpoint("a", &ck2.id));
    assert_eq!((env.refs(&hy), env.refs(&hz)), (0, 0));
    assert_eq!(env.block(env.store.gc(false)).chunks_deleted, 2);
    assert!(env.objects().is_empty());
    assert_eq!(env.chunks_stat(), 0);
    assert_same("a after discard", &read_all(&a), &vec![0u8; 1 << 20]);
    env.assert_refcounts();
}

#[test]
fn gc_deletes_exactly_the_unreferenced_chunks() {
    let env = Env::new(Duration::from_secs(3600));
    env.create("a", 1 << 20);
    let a = env.open("a");
    let mut model = vec![0u8; 1 << 20];
    let mut put = |v: &Volume, idx: u64, n: u32| {
        let d = chunk(n);
        v.write_at(idx * CS, &d).unwrap();
        model[(idx * CS) as usize..((idx + 1) * CS) as usize].copy_from_slice(&d);
    };
    for i in 0..8 {
        put(&a, i, 100 + i as u32);
    }
    env.flush("a");
    assert_eq!(env.objects().len(), 8);
    assert_eq!(env.chunks_stat(), 8);

    let ck = a.checkpoint("keep the old chunks").unwrap();
    for i in 0..4 {
        put(&a, i, 200 + i as u32);
    }
    env.flush("a");
    assert_eq!(env.objects().len(), 12);
    assert_eq!(
        env.block(env.store.gc(true)).chunks_deleted,
        0,
        "checkpoint still refers"
    );
    assert_eq!(env.objects().len(), 12);
    assert_eq!(env.objects(), env.present_chunks());

    env.block(env.store.delete_checkpoint("a", &ck.id));
    let report = env.block(env.store.gc(false));
    assert_eq!(report.chunks_deleted, 4);
    assert_eq!(env.objects().len(), 8);
    assert_eq!(env.objects(), env.present_chunks());
    for i in 0..4 {
        assert!(!env.objects().contains(&ChunkHash::of(&chunk(100 + i)).to_hex()));
    }

    // Chunk 5 becomes a duplicate of chunk 6: its old content goes, 6's stays.
    put(&a, 5, 106);
    env.flush("a");
    assert_eq!(env.refs(&ChunkHash::of(&chunk(106))), 2);
    assert_eq!(env.block(env.store.gc(false)).chunks_deleted, 1);
    assert_eq!(env.objects().len(), 7);
    assert_eq!(env.objects(), env.present_chunks());

    // An object no row names is an orphan: only the sweep removes it.
    let fake = ChunkHash::of(b"nobody refers to this").to_hex();
    let fake_dir = env.dir.path().join("objects/chunks").join(&fake[..2]);
    std::fs::create_dir_all(&fake_dir).unwrap();
    std::fs::write(fake_dir.join(&fake), b"junk").unwrap();
    assert_eq!(env.block(env.store.gc(false)).orphan_objects_deleted, 0);
    assert_eq!(env.objects().len(), 8);
    let report = env.block(env.store.gc(true));
    assert_eq!((report.chunks_deleted, report.orphan_objects_deleted), (0, 1));
    assert_eq!(env.objects(), env.present_chunks());

    // Nothing referenced went: everything reads back from the object store.
    env.store.drop_read_cache();
    assert_same("a", &read_all(&a), &model);
    env.assert_refcounts();
}

#[test]
fn gc_racing_uploads_checkpoints_and_forks_loses_nothing() {
    // Write-back as eager as it gets, so uploads run all the time.
    let mut env = Env::new(Duration::ZERO);
    const SIZE: u64 = 1 << 20;
    const PATTERNS: u32 = 6;
    const WRITES: usize = 150;
    env.create("a", SIZE);
    env.create("b", SIZE);
    // (volume, checkpoint id, content)
    let cks: Mutex<Vec<(String, String, Vec<u8>)>> = Mutex::new(Vec::new());
    let writers_left = AtomicU32::new(2);
    let failed = AtomicBool::new(false);
    let forks = AtomicU32::new(0);
    let gcs = AtomicU32::new(0);
    let handle = env.rt.handle().clone();
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let writer = |name: &'static str, seed: u64| {
            let (store, cks, writers_left, failed) = (&env.store, &cks, &writers_left, &failed);
            let handle = handle.clone();
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let v = handle.block_on(store.open_volume(name)).unwrap();
                let mut model = vec![0u8; SIZE as usize];
                for i in 0..WRITES {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let idx = rng.random_range(0..SIZE / CS);
                    // Contents repeat across chunks and volumes, so GC keeps
                    // deleting content that is about to be uploaded again.
                    let mut d = chunk(rng.random_range(0..PATTERNS));
                    let (off, len) = if rng.random_bool(0.2) {
                        let off = rng.random_range(0..CS - 100);
                        (idx * CS + off, rng.random_range(1..100))
                    } else {
                        (idx * CS, CS)
                    };
                    d.truncate(len as usize);
                    v.write_at(off, &d).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    if i % 15 == 14 {
                        let ck = v.checkpoint("race").unwrap();
                        cks.lock().unwrap().push((name.to_string(), ck.id, model.clone()));
                    }
                    if i % 40 == 39 {
                        v.fsync().unwrap();
                    }
                    if i % 25 == 24 {
                        v.discard(idx * CS, CS).unwrap();
                        model[(idx * CS) as usize..((idx + 1) * CS) as usize].fill(0);
                    }
                }
                writers_left.fetch_sub(1, Ordering::SeqCst);
                model
            })
        };
        let wa = writer("a", 1);
        let wb = writer("b", 2);
        // Forks of checkpoints (checked at once) and of live volumes, deleted
        // again; old checkpoints deleted too.
        let forker = s.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut n = 0;
            while writers_left.load(Ordering::SeqCst) > 0 && !failed.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("fk{n}");
                let pick = {
                    let l = cks.lock().unwrap();
                    (!l.is_empty()).then(|| l[rng.random_range(0..l.len())].clone())
                };
                match pick {
                    Some((vol, id, want)) if rng.random_bool(0.7) => {
                        let src = VolumeSource::Checkpoint {
                            volume: vol.clone(),
                            checkpoint: id.clone(),
                        };
                        match blk(&handle, env.store.fork(&name, src)) {
                            Ok(_) => {}
                            // Deleted by this thread a moment ago is fine.
                            Err(den_store::StoreError::CheckpointNotFound { .. }) => continue,
                            Err(e) => panic!("fork of {vol}/{id}: {e}"),
                        }
                        let v = blk(&handle, env.store.open_volume(&name)).unwrap();
                        let got = read_all(&v);
                        drop(v);
                        if got != want {
                            failed.store(true, Ordering::Relaxed);
                        }
                        assert_same(&format!("fork of {vol}/{id}"), &got, &want);
                    }
                    _ => {
                        let src = if rng.random_bool(0.5) { "a" } else { "b" };
                        blk(&handle, env.store.fork(&name, VolumeSource::Volume(src.into()))).unwrap();
                    }
                }
                blk(&handle, env.store.delete_volume(&name)).unwrap();
                forks.fetch_add(1, Ordering::Relaxed);
                if rng.random_bool(0.3) {
                    let victim = {
                        let mut l = cks.lock().unwrap();
                        (l.len() > 3).then(|| l.remove(0))
                    };
                    if let Some((vol, id, _)) = victim {
                        blk(&handle, env.store.delete_checkpoint(&vol, &id)).unwrap();
                    }
                }
            }
        });
        let gc = s.spawn(|| {
            let mut i = 0u32;
            while writers_left.load(Ordering::SeqCst) > 0 && !failed.load(Ordering::Relaxed) {
                i += 1;
                blk(&handle, env.store.gc(i.is_multiple_of(4))).unwrap();
                gcs.fetch_add(1, Ordering::Relaxed);
                let bad = blk(&handle, env.store.meta().verify_refcounts()).unwrap();
                assert!(bad.is_empty(), "refcounts wrong mid-run: {bad:?}");
            }
        });
        let models = vec![wa.join().unwrap(), wb.join().unwrap()];
        forker.join().unwrap();
        gc.join().unwrap();
        models
    });
    assert!(forks.load(Ordering::Relaxed) > 0 && gcs.load(Ordering::Relaxed) > 0);

    let check = |env: &Env| {
        for (name, model) in ["a", "b"].iter().zip(&models) {
            let v = env.open(name);
            assert_same(name, &read_all(&v), model);
        }
        for (i, (vol, id, want)) in cks.lock().unwrap().iter().enumerate() {
            let name = format!("check{i}");
            env.block(env.store.fork(
                &name,
                VolumeSource::Checkpoint {
                    volume: vol.clone(),
                    checkpoint: id.clone(),
                },
            ));
            let v = env.open(&name);
            assert_same(&format!("checkpoint {vol}/{id}"), &read_all(&v), want);
            drop(v);
            env.block(env.store.delete_volume(&name));
        }
        env.assert_refcounts();
    };
    check(&env);
    env.flush("a");
    env.flush("b");
    for (vol, id, _) in cks.lock().unwrap().iter() {
        env.block(env.store.wait_durable(vol, id));
    }
    env.block(env.store.gc(true));
    check(&env);

    // Everything again from the object store alone, in a fresh process state.
    let root = env.dir.path().to_path_buf();
    env.store.drop_read_cache();
    env.rt = runtime();
    env.store = env
        .rt
        .block_on(Store::open(config(&root, Duration::ZERO)))
        .unwrap();
    env.store.drop_read_cache();
    check(&env);
}

#[test]
fn checkpoint_becomes_durable_after_wait_or_flush() {
    let env = Env::new(Duration::from_secs(3600));
    env.create("a", 1 << 20);
    let a = env.open("a");

    let empty = a.checkpoint("nothing written").unwrap();
    assert!(empty.durable);

    a.write_at(4096, b"not yet uploaded").unwrap();
    let ck1 = a.checkpoint("one").unwrap();
    assert!(!ck1.durable);
    env.block(env.store.wait_durable("a", &ck1.id));
    assert!(env.block(env.store.get_checkpoint("a", &ck1.id)).durable);

    a.write_at(3 * CS + 10, b"again").unwrap();
    let ck2 = env.block(env.store.checkpoint("a", "two"));
    assert!(!ck2.durable);
    // Flushing the head uploads the same pending chunks the checkpoint names.
    env.flush("a");
    let listed = env.block(env.store.list_checkpoints("a"));
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|c| c.durable), "{listed:?}");
}

#[test]
fn discards_survive_closing_the_volume() {
    let env = Env::new(Duration::from_secs(3600));
    env.create("a", 1 << 20);
    let a = env.open("a");
    for i in 0..4 {
        a.write_at(i * CS, &chunk(10 + i as u32)).unwrap();
    }
    env.flush("a");
    // Chunk 0: discarded. Chunk 1: discarded, rewritten, discarded again.
    // Chunk 2: discarded, then partly rewritten. Chunk 3 stays.
    a.discard(0, 3 * CS).unwrap();
    a.write_at(CS + 5, b"brief").unwrap();
    a.discard(CS, CS).unwrap();
    a.write_at(2 * CS + 7, b"new").unwrap();
    a.fsync().unwrap();
    let mut want = vec![0u8; 1 << 20];
    want[(2 * CS + 7) as usize..(2 * CS + 10) as usize].copy_from_slice(b"new");
    want[(3 * CS) as usize..(4 * CS) as usize].copy_from_slice(&chunk(13));
    assert_same("before close", &read_all(&a), &want);
    // Closed without a seal: the unmaps must not be forgotten.
    drop(a);
    let a = env.open("a");
    assert_same("after reopen", &read_all(&a), &want);
    // And what a checkpoint captures is what the volume showed.
    let ck = a.checkpoint("after discards").unwrap();
    env.block(env.store.fork(
        "f",
        VolumeSource::Checkpoint {
            volume: "a".into(),
            checkpoint: ck.id,
        },
    ));
    assert_same("fork of checkpoint", &read_all(&env.open("f")), &want);
    env.flush("a");
    env.block(env.store.gc(false));
    env.store.drop_read_cache();
    assert_same("from the object store", &read_all(&a), &want);
    env.assert_refcounts();
}

#[test]
fn closed_volume_can_be_restored_and_deleted_at_once() {
    // Eager write-back and a steady stream of uploads: background tasks hold
    // handles of open volumes for moments all the time.
    let env = Env::new(Duration::ZERO);
    env.create("a", 1 << 20);
    env.create("noise", 1 << 20);
    let noise = env.open("noise");
    let a = env.open("a");
    a.write_at(0, &chunk(1)).unwrap();
    let ck = a.checkpoint("base").unwrap();
    drop(a);
    for i in 0..40u32 {
        noise.write_at((i as u64 % 64) * CS, &chunk(1000 + i)).unwrap();
        let a = env.open("a");
        a.write_at(0, &chunk(100 + i)).unwrap();
        a.write_at(CS * (1 + i as u64 % 8), &chunk(200 + i)).unwrap();
        drop(a);
        // The handle is gone, so the volume is not open: restore must not
        // see a background task's handle as "busy", and must not leave one
        // with the old head map behind for the next open to pick up.
        env.block(env.store.restore("a", &ck.id));
        let a = env.open("a");
        let mut want = vec![0u8; 1 << 20];
        want[..CS as usize].copy_from_slice(&chunk(1));
        assert_same(&format!("round {i}"), &read_all(&a), &want);
        drop(a);
        let name = format!("tmp{i}");
        env.block(env.store.fork(&name, VolumeSource::Volume("a".into())));
        let t = env.open(&name);
        t.write_at(0, b"x").unwrap();
        drop(t);
        env.block(env.store.delete_volume(&name));
    }
    env.assert_refcounts();
}

#[test]
fn concurrent_opens_of_one_volume_share_a_handle() {
    let env = Env::new(Duration::ZERO);
    env.create("a", 1 << 20);
    for round in 0..20 {
        let handles: Vec<Volume> = std::thread::scope(|s| {
            let ts: Vec<_> = (0..4)
                .map(|_| s.spawn(|| blk(env.rt.handle(), env.store.open_volume("a")).unwrap()))
                .collect();
            ts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        handles[0].write_at(round * 10, b"0123456789").unwrap();
        for h in &handles {
            let mut b = [0u8; 10];
            h.read_at(round * 10, &mut b).unwrap();
            assert_eq!(&b, b"0123456789");
        }
    }
}
