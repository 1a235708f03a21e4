//! Cluster groundwork on the single-host backend: sync points (the recovery
//! point a new owner rolls back to when the old one died with writes that
//! never left its disk), volume ownership claims, and durability reports.
//!
//! A "node" here is a `Store` with its own cache directory. Nodes share one
//! `meta.db` and one local objects directory, the way cluster nodes share
//! PostgreSQL and S3. A node that dies with unuploaded chunks is a store
//! whose object store is unreachable (a loopback port nobody listens on),
//! dropped while its chunks are still pending.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use den_store::meta::sqlite::SqliteMeta;
use den_store::{
    AdoptReport, ChunkHash, ClusterMeta, CreateOptions, ObjectBackend, Store, StoreConfig, StoreError,
    Volume, VolumeOwner,
};

const CS: u64 = 16 << 10;
const SLOTS: u64 = 16;
const TIMEOUT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Run an async store call with a deadline, so a hang fails the test.
fn block<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = den_store::Result<T>>) -> T {
    rt.block_on(async { tokio::time::timeout(TIMEOUT, f).await })
        .expect("store call timed out")
        .expect("store call failed")
}

fn local_objects(root: &Path) -> ObjectBackend {
    ObjectBackend::Local {
        dir: root.join("objects"),
    }
}

/// An S3 endpoint on a loopback port with no listener: every upload fails.
fn dead_objects() -> ObjectBackend {
    let port = den_testkit::free_port().unwrap();
    ObjectBackend::S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "unreachable".into(),
        access_key: "x".into(),
        secret_key: "x".into(),
        region: "us-east-1".into(),
        prefix: String::new(),
    }
}

fn config(data_dir: PathBuf, objects: ObjectBackend, node: Option<&str>) -> StoreConfig {
    let mut c = StoreConfig::local(data_dir);
    c.objects = objects;
    c.dirty_limit = 64 << 20;
    // Nothing is sealed behind the test's back: seals happen only at the
    // sync points, flushes and checkpoints the test asks for.
    c.writeback_delay = Duration::from_secs(3600);
    c.fetch_timeout = Duration::from_secs(5);
    c.node = node.map(str::to_string);
    c
}

/// A node's store: its own cache under `root/<node>`, metadata in `root/a/meta.db`.
fn node_store(rt: &tokio::runtime::Runtime, root: &Path, node: &str, objects: ObjectBackend) -> Store {
    let data = root.join(node);
    std::fs::create_dir_all(root.join("a")).unwrap();
    let meta: Arc<dyn den_store::Metadata> = Arc::new(SqliteMeta::open(&root.join("a/meta.db")).unwrap());
    block(rt, Store::open_with_meta(config(data, objects, Some(node)), meta))
}

fn create(rt: &tokio::runtime::Runtime, store: &Store, name: &str) {
    block(
        rt,
        store.create_volume(
            name,
            CreateOptions {
                size: Some(SLOTS * CS),
                chunk_size: Some(CS as u32),
                source: None,
            },
        ),
    );
}

/// Open, waiting out a handle of a just-dropped store that a background task
/// may still hold for a moment.
fn open(rt: &tokio::runtime::Runtime, store: &Store, name: &str) -> Volume {
    let mut vol = None;
    den_testkit::wait_until(TIMEOUT, Duration::from_millis(10), || {
        match rt.block_on(store.open_volume(name)) {
            Ok(v) => {
                vol = Some(v);
                true
            }
            Err(StoreError::VolumeBusy(_)) => false,
            Err(e) => panic!("open {name}: {e}"),
        }
    })
    .unwrap();
    vol.unwrap()
}

/// A whole chunk whose content is determined by `n` alone.
fn chunk(n: u32) -> Vec<u8> {
    (0..CS as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503)).to_le_bytes()[1])
        .collect()
}

/// The volume as a list of per-slot contents (`None`: zeros).
type Model = Vec<Option<u32>>;

fn write(v: &Volume, model: &mut Model, slot: u64, n: u32) {
    v.write_at(slot * CS, &chunk(n)).unwrap();
    model[slot as usize] = Some(n);
}

fn assert_content(what: &str, v: &Volume, model: &Model) {
    let zeros = vec![0u8; CS as usize];
    for (slot, want) in model.iter().enumerate() {
        let mut got = vec![0u8; CS as usize];
        v.read_at(slot as u64 * CS, &mut got).unwrap();
        let want = want.map(chunk).unwrap_or_else(|| zeros.clone());
        assert!(
            got == want,
            "{what}: slot {slot} holds the wrong content (want {:?})",
            model[slot]
        );
    }
}

fn objects_in(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), out);
            } else if let Some(n) = e.file_name().to_str()
                && n.len() == 64
                && n.bytes().all(|b| b.is_ascii_hexdigit())
            {
                out.insert(n.to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root.join("objects"), &mut out);
    out
}

fn hash_hex(n: u32) -> String {
    ChunkHash::of(&chunk(n))
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn assert_refcounts(rt: &tokio::runtime::Runtime, store: &Store) {
    let bad = block(rt, store.meta().verify_refcounts());
    assert!(bad.is_empty(), "refcounts wrong (hash, actual, stored): {bad:?}");
}

fn db(root: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(root.join("a/meta.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
}

fn maps_of(root: &Path, volume_id: &str) -> i64 {
    db(root)
        .query_row(
            "SELECT COUNT(*) FROM maps WHERE volume_id = ?1",
            [volume_id],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn sync_points_hold_references_until_replaced_and_gc_respects_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let store = node_store(&rt, root, "a", local_objects(root));
    create(&rt, &store, "v");
    let id = block(&rt, store.volume("v")).id;
    let v = open(&rt, &store, "v");
    let mut model: Model = vec![None; SLOTS as usize];
    for slot in 0..4 {
        write(&v, &mut model, slot, 1);
    }
    let t1 = block(&rt, store.sync("v"));
    let st = block(&rt, store.meta().sync_state(&id));
    assert!(st.durable_map.is_some() && st.pending_map.is_none(), "{st:?}");
    assert_eq!(st.durable_at_ms, Some(t1));
    assert_refcounts(&rt, &store);

    // Overwritten and flushed: chunk 1 is now needed only by the sync point.
    for slot in 0..4 {
        write(&v, &mut model, slot, 2);
    }
    block(&rt, store.flush("v", |_| {}));
    block(&rt, store.gc(true));
    assert!(
        objects_in(root).contains(&hash_hex(1)),
        "GC deleted a chunk the sync point needs"
    );
    assert_refcounts(&rt, &store);

    // The sync point still reads as it was: roll the head back to it, and
    // look from another node (this store's background tasks may still hold
    // the volume, with the head from before, for a moment).
    drop(v);
    assert_eq!(block(&rt, store.meta().rollback_to_sync_point(&id)), Some(t1));
    drop(store);
    let store = node_store(&rt, root, "b", local_objects(root));
    let v = open(&rt, &store, "v");
    let mut at_sync = model.clone();
    at_sync[..4].fill(Some(1));
    assert_content("after rollback to the sync point", &v, &at_sync);
    assert_refcounts(&rt, &store);

    // A newer durable sync point replaces the old one, and chunk 1 goes.
    for slot in 0..4 {
        write(&v, &mut model, slot, 3);
    }
    let t2 = block(&rt, store.sync("v"));
    assert!(t2 >= t1);
    assert_refcounts(&rt, &store);
    block(&rt, store.gc(true));
    let objs = objects_in(root);
    assert!(
        !objs.contains(&hash_hex(1)),
        "the replaced sync point's chunk was not collected"
    );
    assert!(objs.contains(&hash_hex(3)));
    // head + durable sync point
    assert_eq!(maps_of(root, &id), 2);

    // A pending sync point replaced by another before it became durable.
    write(&v, &mut model, 7, 4);
    let p1 = block(&rt, store.sync_point("v"));
    write(&v, &mut model, 8, 5);
    let p2 = block(&rt, store.sync_point("v"));
    assert_ne!(p1, p2);
    let st = block(&rt, store.meta().sync_state(&id));
    assert_eq!(st.pending_map, Some(p2));
    assert_eq!(
        maps_of(root, &id),
        3,
        "the replaced pending sync point's map was not dropped"
    );
    // Promoting the replaced one does nothing.
    block(&rt, store.meta().promote_sync_point(&id, p1));
    assert_eq!(block(&rt, store.meta().sync_state(&id)).pending_map, Some(p2));
    block(&rt, store.wait_sync_durable("v", p2));
    let st = block(&rt, store.meta().sync_state(&id));
    assert_eq!((st.durable_map, st.pending_map), (Some(p2), None));
    assert_refcounts(&rt, &store);
    assert_content("after sync points", &v, &model);

    // Checkpoints and sync points side by side, then the volume goes.
    block(&rt, store.checkpoint("v", "c"));
    write(&v, &mut model, 9, 6);
    block(&rt, store.sync("v"));
    block(&rt, store.gc(true));
    assert_refcounts(&rt, &store);
    drop(v);
    block(&rt, store.delete_volume("v"));
    assert_eq!(maps_of(root, &id), 0);
    let entries: i64 = db(root)
        .query_row("SELECT COUNT(*) FROM map_entries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(entries, 0);
    assert_refcounts(&rt, &store);
    block(&rt, store.gc(true));
    assert!(
        objects_in(root).is_empty(),
        "objects left after deleting the only volume"
    );
    assert_eq!(block(&rt, store.stats()).chunks, 0);
}

#[test]
fn new_owner_rolls_back_writes_lost_with_the_dead_owner() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let mut model: Model = vec![None; SLOTS as usize];

    // Node a: data A, durable at a sync point.
    let a1 = node_store(&rt, root, "a", local_objects(root));
    create(&rt, &a1, "v");
    let id = block(&rt, a1.volume("v")).id;
    assert_eq!(
        block(&rt, a1.owner("v")),
        VolumeOwner {
            node: Some("a".into()),
            epoch: 1
        }
    );
    let v = open(&rt, &a1, "v");
    for slot in 0..8 {
        write(&v, &mut model, slot, 10 + slot as u32);
    }
    let t = block(&rt, a1.sync("v"));
    let want_after_rollback = model.clone();
    drop(v);
    drop(a1);

    // Node a again, now cut off from the object store: B is sealed into the
    // head (pending) at a sync point that never becomes durable, C is dirty.
    let a2 = node_store(&rt, root, "a", dead_objects());
    let v = open(&rt, &a2, "v");
    for slot in 2..6 {
        write(&v, &mut model, slot, 100 + slot as u32);
    }
    write(&v, &mut model, 10, 200);
    block(&rt, a2.sync_point("v"));
    write(&v, &mut model, 12, 300);
    let d = block(&rt, a2.durability("v"));
    assert!(!d.fully_durable);
    assert_eq!(d.durable_at_ms, Some(t));
    assert_eq!(d.local_only_slots, 6, "{d:?}");
    // Rewritten after its seal: still one slot.
    write(&v, &mut model, 10, 201);
    assert_eq!(block(&rt, a2.durability("v")).local_only_slots, 6);
    drop(v);
    drop(a2);

    // The same node restarting finds its pending and dirty chunks: no
    // rollback. (Only those are checked: the chunks uploaded by `a1` are
    // in the local object directory, which this store cannot reach, and
    // local-object mode keeps no read-cache copy of them.)
    let a3 = node_store(&rt, root, "a", dead_objects());
    assert_eq!(block(&rt, a3.adopt("v")), AdoptReport::default());
    let v = open(&rt, &a3, "v");
    for slot in [2usize, 3, 4, 5, 10, 12] {
        let mut got = vec![0u8; CS as usize];
        v.read_at(slot as u64 * CS, &mut got).unwrap();
        assert!(
            got == chunk(model[slot].unwrap()),
            "same node after restart: slot {slot}"
        );
    }
    drop(v);
    drop(a3);

    // Node b takes over with a cache of its own: a's disk is gone.
    let b = node_store(&rt, root, "b", local_objects(root));
    assert_eq!(block(&rt, b.claim("v", 0)), None, "a stale epoch must not win");
    assert_eq!(block(&rt, b.claim("v", 1)), Some(2));
    let report = block(&rt, b.adopt("v"));
    assert_eq!(
        report,
        AdoptReport {
            rolled_back: true,
            sync_at_ms: Some(t),
            foreign_pending: 5
        }
    );
    let v = open(&rt, &b, "v");
    assert_content("new owner after rollback", &v, &want_after_rollback);
    b.drop_read_cache();
    assert_content("new owner after rollback, cold", &v, &want_after_rollback);
    assert_refcounts(&rt, &b);
    // The dead owner's pending chunks are named nowhere any more.
    assert_eq!(block(&rt, b.stats()).pending, 0);
    let st = block(&rt, b.meta().sync_state(&id));
    assert_eq!(st.pending_map, None);
    let d = block(&rt, b.durability("v"));
    assert!(d.fully_durable && d.local_only_slots == 0, "{d:?}");
    // Adopting again changes nothing.
    assert_eq!(block(&rt, b.adopt("v")), AdoptReport::default());

    // b carries on from there.
    let mut model = want_after_rollback;
    write(&v, &mut model, 15, 400);
    block(&rt, b.sync("v"));
    assert!(block(&rt, b.durability("v")).fully_durable);
    assert_content("new owner after its own writes", &v, &model);
    assert_refcounts(&rt, &b);
}

#[test]
fn without_a_durable_sync_point_adopt_leaves_the_head_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let a = node_store(&rt, root, "a", dead_objects());
    create(&rt, &a, "v");
    let v = open(&rt, &a, "v");
    let mut model: Model = vec![None; SLOTS as usize];
    for slot in 0..3 {
        write(&v, &mut model, slot, 7 + slot as u32);
    }
    block(&rt, a.sync_point("v"));
    let d = block(&rt, a.durability("v"));
    assert_eq!(
        (d.fully_durable, d.durable_at_ms, d.local_only_slots),
        (false, None, 3)
    );
    drop(v);
    drop(a);

    let b = node_store(&rt, root, "b", local_objects(root));
    let owner = block(&rt, b.owner("v"));
    assert_eq!(block(&rt, b.claim("v", owner.epoch)), Some(owner.epoch + 1));
    let report = block(&rt, b.adopt("v"));
    assert_eq!(
        report,
        AdoptReport {
            rolled_back: false,
            sync_at_ms: None,
            foreign_pending: 3
        }
    );
    let rec = block(&rt, b.volume("v"));
    assert_eq!(
        block(&rt, b.meta().pending_count(rec.head_map)),
        3,
        "head must stay unchanged"
    );
    assert_refcounts(&rt, &b);
}

#[test]
fn flushed_volume_changes_owner_without_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let a = node_store(&rt, root, "a", local_objects(root));
    create(&rt, &a, "v");
    let v = open(&rt, &a, "v");
    let mut model: Model = vec![None; SLOTS as usize];
    for slot in 0..5 {
        write(&v, &mut model, slot * 3, 50 + slot as u32);
    }
    block(&rt, a.sync("v"));
    write(&v, &mut model, 1, 60);
    block(&rt, a.flush("v", |_| {}));
    let d = block(&rt, a.durability("v"));
    assert!(d.fully_durable && d.local_only_slots == 0, "{d:?}");
    drop(v);
    assert!(block(&rt, a.release("v")));
    drop(a);

    let b = node_store(&rt, root, "b", local_objects(root));
    assert_eq!(block(&rt, b.owner("v")), VolumeOwner { node: None, epoch: 1 });
    assert_eq!(block(&rt, b.claim("v", 1)), Some(2));
    assert_eq!(block(&rt, b.adopt("v")), AdoptReport::default());
    let v = open(&rt, &b, "v");
    assert_content("new owner after a flush", &v, &model);
}

#[test]
fn claims_are_compare_and_swap_on_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let a = node_store(&rt, root, "a", local_objects(root));
    let b = node_store(&rt, root, "b", local_objects(root));
    create(&rt, &a, "v");
    let id = block(&rt, a.volume("v")).id;
    assert_eq!(a.held_epoch("v"), Some(1));
    assert_eq!(b.held_epoch("v"), None);
    // b holds nothing, so it has nothing to release.
    assert!(!block(&rt, b.release("v")));

    // Both saw epoch 1; only one claim wins.
    assert_eq!(block(&rt, b.claim("v", 1)), Some(2));
    assert_eq!(block(&rt, a.claim("v", 1)), None);
    assert_eq!(
        block(&rt, a.owner("v")),
        VolumeOwner {
            node: Some("b".into()),
            epoch: 2
        }
    );
    // a's epoch is stale: its release must not clear b's lease.
    assert!(!block(&rt, a.release("v")));
    assert_eq!(block(&rt, a.owner("v")).node.as_deref(), Some("b"));
    assert!(!block(&rt, a.meta().release_volume(&id, "a", 2)));
    assert!(block(&rt, b.release("v")));
    assert!(!block(&rt, b.release("v")), "released twice");
    assert_eq!(block(&rt, a.owner("v")), VolumeOwner { node: None, epoch: 2 });
    assert_eq!(block(&rt, a.claim("v", 2)), Some(3));
    assert_eq!(a.held_epoch("v"), Some(3));

    // Forks are owned by their creator too.
    block(&rt, b.fork("w", den_store::VolumeSource::Volume("v".into())));
    assert_eq!(block(&rt, b.owner("w")).node.as_deref(), Some("b"));

    // A single-host store has no node name to claim with.
    let single = block(
        &rt,
        Store::open_with_meta(
            config(root.join("single"), local_objects(root), None),
            Arc::new(SqliteMeta::open(&root.join("a/meta.db")).unwrap()),
        ),
    );
    let err = rt.block_on(single.claim("v", 3)).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    create(&rt, &single, "s");
    assert_eq!(
        block(&rt, single.owner("s")),
        VolumeOwner { node: None, epoch: 0 }
    );
    let err = rt.block_on(a.claim("nope", 0)).unwrap_err();
    assert!(matches!(err, StoreError::VolumeNotFound(_)), "{err}");
}

#[test]
fn databases_from_before_sync_points_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        // The volumes table as the first release created it.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE volumes (
                id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, size_bytes BIGINT NOT NULL,
                chunk_size BIGINT NOT NULL, head_map BIGINT NOT NULL, next_seq BIGINT NOT NULL DEFAULT 1,
                created_at_ms BIGINT NOT NULL);
             CREATE TABLE maps (id INTEGER PRIMARY KEY AUTOINCREMENT, volume_id TEXT NOT NULL);
             INSERT INTO maps (volume_id) VALUES ('old');
             INSERT INTO volumes (id, name, size_bytes, chunk_size, head_map, created_at_ms)
                 VALUES ('old', 'old', 1048576, 65536, 1, 0);",
        )
        .unwrap();
    }
    let rt = runtime();
    let meta = SqliteMeta::open(&path).unwrap();
    assert_eq!(
        block(&rt, meta.volume_owner("old")),
        VolumeOwner { node: None, epoch: 0 }
    );
    let st = block(&rt, meta.sync_state("old"));
    assert!(st.durable_map.is_none() && st.pending_map.is_none());
    assert_eq!(block(&rt, meta.rollback_to_sync_point("old")), None);
    assert_eq!(block(&rt, meta.claim_volume("old", "n", 0)), Some(1));
    drop(meta);
    // Opening a migrated database again keeps what it holds.
    let meta = SqliteMeta::open(&path).unwrap();
    assert_eq!(
        block(&rt, meta.volume_owner("old")),
        VolumeOwner {
            node: Some("n".into()),
            epoch: 1
        }
    );
    let map = block(&rt, meta.sync_point("old", &[]));
    block(&rt, meta.promote_sync_point("old", map));
    assert_eq!(block(&rt, meta.sync_state("old")).durable_map, Some(map));
}

#[test]
fn adopt_promotes_a_sync_point_whose_uploads_finished_before_the_owner_died() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let mut model: Model = vec![None; SLOTS as usize];

    let a1 = node_store(&rt, root, "a", local_objects(root));
    create(&rt, &a1, "v");
    let id = block(&rt, a1.volume("v")).id;
    let v = open(&rt, &a1, "v");
    write(&v, &mut model, 0, 1);
    let t1 = block(&rt, a1.sync("v"));
    // A newer sync point whose chunks all reach the object store, but the
    // owner dies before promoting it.
    write(&v, &mut model, 1, 2);
    let newer = block(&rt, a1.sync_point("v"));
    den_testkit::wait_until(TIMEOUT, Duration::from_millis(5), || {
        block(&rt, a1.meta().pending_count(newer)) == 0
    })
    .unwrap();
    let t2 = block(&rt, a1.meta().sync_state(&id)).pending_at_ms.unwrap();
    assert!(t2 >= t1);
    let want = model.clone();
    drop(v);
    drop(a1);

    // Back without an object store: a checkpoint seals more into the head.
    let a2 = node_store(&rt, root, "a", dead_objects());
    let v = open(&rt, &a2, "v");
    write(&v, &mut model, 2, 3);
    block(&rt, a2.checkpoint("v", "never uploaded"));
    drop(v);
    drop(a2);

    let b = node_store(&rt, root, "b", local_objects(root));
    let owner = block(&rt, b.owner("v"));
    block(&rt, b.claim("v", owner.epoch)).unwrap();
    let report = block(&rt, b.adopt("v"));
    assert_eq!(
        report,
        AdoptReport {
            rolled_back: true,
            sync_at_ms: Some(t2),
            foreign_pending: 1
        }
    );
    let st = block(&rt, b.meta().sync_state(&id));
    assert_eq!((st.durable_map, st.pending_map), (Some(newer), None));
    let v = open(&rt, &b, "v");
    b.drop_read_cache();
    assert_content("rolled back to the newer sync point", &v, &want);
    assert_refcounts(&rt, &b);
}

#[test]
fn a_checkpoint_still_pending_on_another_node_is_refused_then_served_once_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let rt = runtime();
    let mut model: Model = vec![None; SLOTS as usize];

    // Node a, cut off from the object store, checkpoints: the checkpoint's
    // chunks exist only in a's cache.
    let a1 = node_store(&rt, root, "a", dead_objects());
    create(&rt, &a1, "v");
    let v = open(&rt, &a1, "v");
    for slot in 0..3 {
        write(&v, &mut model, slot, 50 + slot as u32);
    }
    let ck = block(&rt, a1.checkpoint("v", "pending")).id;
    drop(v);
    drop(a1);

    // Node b owns the volume now. Restoring or forking that checkpoint would
    // hand out a disk with holes (EIO): both are refused, and change nothing.
    let b = node_store(&rt, root, "b", local_objects(root));
    let owner = block(&rt, b.owner("v"));
    block(&rt, b.claim("v", owner.epoch)).unwrap();
    let head_before = block(&rt, b.volume("v")).head_map;
    let (restored, forked) = rt.block_on(async {
        tokio::join!(
            b.restore("v", &ck),
            b.fork(
                "w",
                den_store::VolumeSource::Checkpoint {
                    volume: "v".into(),
                    checkpoint: ck.clone(),
                }
            )
        )
    });
    for (what, r) in [("restore", restored.map(|_| ())), ("fork", forked.map(|_| ()))] {
        match r {
            Err(StoreError::NotDurable { chunks: 3, .. }) => {}
            other => panic!("{what} of a checkpoint pending on a dead node: {other:?}"),
        }
    }
    assert_eq!(block(&rt, b.volume("v")).head_map, head_before);
    assert!(matches!(
        rt.block_on(b.volume("w")),
        Err(StoreError::VolumeNotFound(_))
    ));

    // Node a comes back with a working object store and uploads what it
    // sealed; b's restore waits for that instead of failing.
    let _a2 = node_store(&rt, root, "a", local_objects(root));
    block(&rt, b.restore("v", &ck));
    let v = open(&rt, &b, "v");
    b.drop_read_cache();
    assert_content("restored on b from a's late uploads", &v, &model);
    drop(v);
    assert_refcounts(&rt, &b);
}
