//! The PostgreSQL metadata backend (`PgMeta`) on a real PostgreSQL 15:
//! reference counts and GC through a `Store`, volume ownership with fencing
//! between two nodes, two nodes sharing one database and one S3 bucket while
//! GC runs on the other node, a server restart mid-run, node-scoped pending
//! ids. The contract both backends share is tested in tests/meta_contract.rs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use den_store::meta::postgres::PgMeta;
use den_store::meta::{ClusterMeta, MetaStore};
use den_store::{ChunkHash, ObjectBackend, Store, StoreError, VolumeSource};
use den_testkit::SeaweedS3;
use den_testkit::postgres::TestPostgres;
use tokio::runtime::Runtime;

const T: Duration = Duration::from_secs(120);

fn pg() -> TestPostgres {
    TestPostgres::start().expect("start PostgreSQL")
}

fn meta(rt: &Runtime, pg: &TestPostgres, node: &str) -> Arc<PgMeta> {
    Arc::new(
        rt.block_on(PgMeta::connect(&pg.url(), node))
            .unwrap_or_else(|e| panic!("connect {node}: {e}")),
    )
}

fn store(rt: &Runtime, dir: &std::path::Path, objects: ObjectBackend, m: Arc<PgMeta>) -> Store {
    let mut cfg = config(dir, objects);
    cfg.writeback_delay = Duration::from_millis(50);
    rt.block_on(Store::open_with_meta(cfg, m)).expect("open store")
}

fn local_objects(dir: &std::path::Path) -> ObjectBackend {
    ObjectBackend::Local {
        dir: dir.join("objects"),
    }
}

fn ok<T>(rt: &Runtime, what: &str, f: impl std::future::Future<Output = den_store::Result<T>>) -> T {
    within(rt, T, what, f).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn fenced<T: std::fmt::Debug>(what: &str, r: den_store::Result<T>) {
    match r {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("{what}: expected Fenced, got {other:?}"),
    }
}

fn refs_in_db(pg: &TestPostgres, h: &ChunkHash) -> i64 {
    let out = pg
        .psql(&format!(
            "SELECT COALESCE((SELECT refs FROM chunks WHERE hash = '\\x{}'::bytea AND state = 'present'), 0)",
            hex::encode(h.0)
        ))
        .unwrap();
    out.parse().unwrap_or_else(|_| panic!("refs: {out:?}"))
}

fn read_all(v: &den_store::Volume) -> Vec<u8> {
    let mut buf = vec![0u8; v.size() as usize];
    v.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn refcounts_checkpoint_fork_delete_and_gc() {
    let pg = pg();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let objects = local_objects(dir.path());
    let s = store(&rt, dir.path(), objects.clone(), meta(&rt, &pg, "a"));
    create(&rt, &s, "a", MIB);
    create(&rt, &s, "b", MIB);
    let (a, b) = (open(&rt, &s, "a"), open(&rt, &s, "b"));
    let data = content(Kind::Random, 7, CS as usize);
    let h = ChunkHash::of(&data);
    let mut ma = Model::new(MIB);
    ma.write(&a, 0, &data);
    ma.write(&a, 3 * CS, &data);
    b.write_at(5 * CS, &data).unwrap();
    ok(&rt, "flush a", s.flush("a", |_| {}));
    ok(&rt, "flush b", s.flush("b", |_| {}));
    // Deduplicated: one chunk, three references.
    assert_eq!(ok(&rt, "stats", s.stats()).chunks, 1);
    assert_eq!(refs_in_db(&pg, &h), 3);

    let ck = a.checkpoint("one").unwrap();
    assert!(ck.durable);
    ok(
        &rt,
        "fork",
        s.fork(
            "f",
            VolumeSource::Checkpoint {
                volume: "a".into(),
                checkpoint: ck.id.clone(),
            },
        ),
    );
    assert_eq!(refs_in_db(&pg, &h), 7);
    let f = open(&rt, &s, "f");
    assert_volume_eq(&f, &ma.data, "fork of a/v1");
    drop(f);
    drop(b);
    ok(&rt, "delete b", s.delete_volume("b"));
    ok(&rt, "delete f", s.delete_volume("f"));
    assert_eq!(refs_in_db(&pg, &h), 4);
    ok(&rt, "delete v1", s.delete_checkpoint("a", &ck.id));
    assert_eq!(refs_in_db(&pg, &h), 2);

    // Overwrite both slots: the chunk loses its last references and GC takes it.
    ma.write(&a, 0, &content(Kind::Compressible, 8, CS as usize));
    ma.write(&a, 3 * CS, &content(Kind::Random, 9, CS as usize));
    ok(&rt, "flush a", s.flush("a", |_| {}));
    assert_eq!(refs_in_db(&pg, &h), 0);
    assert!(list_objects(&rt, &objects).contains(&h));
    let report = ok(&rt, "gc", s.gc(true));
    assert_eq!(report.chunks_deleted, 1, "{report:?}");
    assert!(!ok(&rt, "known", s.meta().is_known_chunk(&h)));
    let objs = list_objects(&rt, &objects);
    assert!(!objs.contains(&h));
    assert_same_chunks(&objs, &referenced_hashes(&rt, &s), "objects after gc");
    assert_refcounts_ok(&rt, &s);

    settle(&s);
    s.drop_read_cache();
    assert_volume_eq(&a, &ma.data, "a from the object store");
}

#[test]
fn fencing_refuses_every_change_from_the_old_owner() {
    let pg = pg();
    let rt = runtime();
    let a = meta(&rt, &pg, "a");
    let b = meta(&rt, &pg, "b");
    let v = ok(&rt, "create", a.create_volume("v", MIB, CS as u32, None));
    let h = ChunkHash::of(b"fencing");
    ok(
        &rt,
        "seal",
        a.apply_seal(v.head_map, &[(0, Some(100)), (1, Some(101))]),
    );
    ok(&rt, "begin", a.begin_upload(&h));
    ok(&rt, "commit", a.commit_upload(100, &h, 10));
    let v1 = ok(&rt, "checkpoint", a.checkpoint(&v.id, "c1", &[]));
    let sp = ok(&rt, "sync point", a.sync_point(&v.id, &[]));
    assert_eq!(
        ok(&rt, "owner", b.volume_owner(&v.id)),
        den_store::VolumeOwner {
            node: Some("a".into()),
            epoch: 1
        }
    );

    assert_eq!(ok(&rt, "claim", b.claim_volume(&v.id, "b", 1)), Some(2));

    let before = |m: &PgMeta| {
        rt.block_on(async {
            (
                m.get_volume("v").await.unwrap().size,
                m.load_map(v.head_map).await.unwrap(),
                m.list_checkpoints(&v.id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|c| c.id)
                    .collect::<Vec<_>>(),
                format!("{:?}", m.sync_state(&v.id).await.unwrap()),
                m.list_pending().await.unwrap(),
            )
        })
    };
    let snap = before(&a);
    fenced(
        "apply_seal",
        rt.block_on(a.apply_seal(v.head_map, &[(2, Some(102))])),
    );
    fenced("clear slot", rt.block_on(a.apply_seal(v.head_map, &[(0, None)])));
    fenced(
        "checkpoint",
        rt.block_on(a.checkpoint(&v.id, "c2", &[(3, Some(103))])),
    );
    fenced(
        "delete_checkpoint",
        rt.block_on(a.delete_checkpoint(&v.id, &v1.id)),
    );
    fenced("restore", rt.block_on(a.restore(&v.id, &v1.id)));
    fenced("resize", rt.block_on(a.resize_volume(&v.id, 2 * MIB)));
    fenced("delete", rt.block_on(a.delete_volume(&v.id)));
    fenced("sync_point", rt.block_on(a.sync_point(&v.id, &[(4, Some(104))])));
    fenced("promote", rt.block_on(a.promote_sync_point(&v.id, sp)));
    fenced("rollback", rt.block_on(a.rollback_to_sync_point(&v.id)));
    assert!(!ok(&rt, "stale release", a.release_volume(&v.id, "a", 1)));
    assert_eq!(before(&a), snap, "a fenced node changed the volume");
    assert_eq!(before(&b).1, snap.1);
    assert!(ok(&rt, "verify", a.verify_refcounts()).is_empty());

    // The new owner may change it; a claim with a stale epoch loses.
    ok(&rt, "checkpoint by b", b.checkpoint(&v.id, "by b", &[]));
    assert_eq!(ok(&rt, "stale claim", a.claim_volume(&v.id, "a", 1)), None);
    assert_eq!(
        ok(&rt, "owner", a.volume_owner(&v.id)),
        den_store::VolumeOwner {
            node: Some("b".into()),
            epoch: 2
        }
    );

    // Released, nobody may change it, then a claim with the seen epoch works.
    assert!(ok(&rt, "release", b.release_volume(&v.id, "b", 2)));
    assert_eq!(ok(&rt, "owner", a.volume_owner(&v.id)).node, None);
    fenced("b after release", rt.block_on(b.resize_volume(&v.id, 2 * MIB)));
    // Two nodes racing for the same epoch: exactly one wins.
    let (ra, rb) =
        rt.block_on(async { tokio::join!(a.claim_volume(&v.id, "a", 2), b.claim_volume(&v.id, "b", 2)) });
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.is_some() != rb.is_some(), "{ra:?} {rb:?}");
    let (winner, loser) = if ra.is_some() { (&a, &b) } else { (&b, &a) };
    assert_eq!(ra.or(rb), Some(3));
    ok(&rt, "resize by winner", winner.resize_volume(&v.id, 2 * MIB));
    fenced(
        "resize by loser",
        rt.block_on(loser.resize_volume(&v.id, 4 * MIB)),
    );
    assert_eq!(ok(&rt, "get", a.get_volume("v")).size, 2 * MIB);
    ok(&rt, "delete by winner", winner.delete_volume(&v.id));
    assert!(ok(&rt, "verify", a.verify_refcounts()).is_empty());
    assert!(ok(&rt, "list", b.list_volumes()).is_empty());
}

#[test]
fn pending_ids_are_listed_only_on_the_node_that_sealed_them() {
    let pg = pg();
    let rt = runtime();
    let a = meta(&rt, &pg, "a");
    let b = meta(&rt, &pg, "b");
    let va = ok(&rt, "create", a.create_volume("va", MIB, CS as u32, None));
    let vb = ok(&rt, "create", b.create_volume("vb", MIB, CS as u32, None));
    ok(
        &rt,
        "seal a",
        a.apply_seal(va.head_map, &[(0, Some(11)), (1, Some(10))]),
    );
    ok(&rt, "checkpoint a", a.checkpoint(&va.id, "", &[(2, Some(12))]));
    ok(&rt, "sync point b", b.sync_point(&vb.id, &[(0, Some(20))]));
    assert_eq!(ok(&rt, "list a", a.list_pending()), vec![10, 11, 12]);
    assert_eq!(ok(&rt, "list b", b.list_pending()), vec![20]);
    // By id, any node sees and commits them.
    assert!(ok(&rt, "referenced", b.pending_referenced(11)));
    // Slot 0 of the head and of the checkpoint.
    assert_eq!(ok(&rt, "zero", a.commit_zero(11)), 2);
    let h = ChunkHash::of(b"twelve");
    ok(&rt, "begin", a.begin_upload(&h));
    assert_eq!(
        ok(&rt, "commit", a.commit_upload(12, &h, 6)),
        den_store::meta::CommitOutcome::Committed { entries_updated: 2 }
    );
    assert_eq!(ok(&rt, "list a", a.list_pending()), vec![10]);
    // A fork copies the pending slot; it stays the sealing node's to upload.
    ok(
        &rt,
        "fork",
        b.create_volume("fork", MIB, CS as u32, Some(va.head_map)),
    );
    assert_eq!(ok(&rt, "list a", a.list_pending()), vec![10]);
    assert_eq!(ok(&rt, "list b", b.list_pending()), vec![20]);
    assert_eq!(ok(&rt, "stats", b.stats()).pending, 2);
    assert!(ok(&rt, "verify", a.verify_refcounts()).is_empty());
}

#[test]
fn store_keeps_working_across_a_postgres_restart() {
    let mut pg = pg();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let s = store(&rt, dir.path(), local_objects(dir.path()), meta(&rt, &pg, "a"));
    create(&rt, &s, "a", 4 * MIB);
    let v = open(&rt, &s, "a");
    let mut m = Model::new(4 * MIB);
    m.scribble(&v, &mut Rng::new(1), 50);
    ok(&rt, "flush", s.flush("a", |_| {}));
    let ck = v.checkpoint("before").unwrap();
    let before = m.clone();

    pg.restart().expect("restart PostgreSQL");

    // The first call may meet a dead connection; after that the pool must
    // have reconnected on its own.
    let first = within(&rt, T, "first call", s.list_volumes());
    eprintln!("first call after restart: {:?}", first.as_ref().map(|v| v.len()));
    m.scribble(&v, &mut Rng::new(2), 50);
    ok(&rt, "flush", s.flush("a", |_| {}));
    let ck2 = ok(&rt, "checkpoint", s.checkpoint("a", "after"));
    assert!(ok(&rt, "durable", s.get_checkpoint("a", &ck2.id)).durable);
    ok(
        &rt,
        "fork",
        s.fork(
            "f",
            VolumeSource::Checkpoint {
                volume: "a".into(),
                checkpoint: ck.id.clone(),
            },
        ),
    );
    let f = open(&rt, &s, "f");
    assert_volume_eq(
        &f,
        &before.data,
        "fork of the checkpoint taken before the restart",
    );
    settle(&s);
    s.drop_read_cache();
    assert_volume_eq(&v, &m.data, "a after the restart");
    ok(&rt, "gc", s.gc(true));
    assert_refcounts_ok(&rt, &s);
}

#[test]
fn postgres_restart_during_writes_and_uploads_loses_nothing() {
    let mut pg = pg();
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let s = store(&rt, dir.path(), local_objects(dir.path()), meta(&rt, &pg, "a"));
    create(&rt, &s, "busy", 4 * MIB);
    let restarted = AtomicBool::new(false);
    let failed_fsyncs = AtomicU32::new(0);
    let handle = rt.handle().clone();
    let m = std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            let v = handle.block_on(s.open_volume("busy")).unwrap();
            let mut m = Model::new(4 * MIB);
            let mut rng = Rng::new(5);
            let mut after = 0;
            // Write-back seals and uploads run all the time (50 ms delay);
            // keep going well past the restart.
            while after < 30 {
                m.scribble(&v, &mut rng, 5);
                // Seals may fail while the server is down; the data stays
                // dirty in the cache and is sealed again later.
                if v.fsync().is_err() {
                    failed_fsyncs.fetch_add(1, Ordering::Relaxed);
                }
                if restarted.load(Ordering::SeqCst) {
                    after += 1;
                }
            }
            m
        });
        den_testkit::wait_until(T, Duration::from_millis(10), || {
            handle
                .block_on(s.stats())
                .map(|st| st.chunks > 20)
                .unwrap_or(false)
        })
        .expect("uploads before the restart");
        pg.restart().expect("restart PostgreSQL");
        restarted.store(true, Ordering::SeqCst);
        writer.join().unwrap()
    });
    eprintln!(
        "fsyncs failed during the restart: {}",
        failed_fsyncs.load(Ordering::Relaxed)
    );
    let v = open(&rt, &s, "busy");
    ok(&rt, "flush after restart", s.flush("busy", |_| {}));
    assert_volume_eq(&v, &m.data, "busy after the restart");
    settle(&s);
    s.drop_read_cache();
    assert_volume_eq(&v, &m.data, "busy from the object store");
    ok(&rt, "gc", s.gc(true));
    assert_refcounts_ok(&rt, &s);
    assert!(ok(&rt, "pending", s.meta().list_pending()).is_empty());
}

#[test]
fn two_nodes_share_postgres_and_s3_with_gc_on_the_other_node() {
    let pg = pg();
    let s3 = SeaweedS3::start().expect("start SeaweedFS");
    let backend = s3_backend(&s3, "den/cluster");
    let rt = runtime();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ma, mb) = (meta(&rt, &pg, "a"), meta(&rt, &pg, "b"));
    let sa = store(&rt, da.path(), backend.clone(), ma.clone());
    let sb = store(&rt, db.path(), backend.clone(), mb.clone());

    // Node a writes a volume, makes it durable and lets go of it.
    const SIZE: u64 = 8 * MIB;
    create(&rt, &sa, "shared", SIZE);
    let v = open(&rt, &sa, "shared");
    let mut shared = Model::new(SIZE);
    shared.scribble(&v, &mut Rng::new(10), 150);
    ok(&rt, "flush shared", sa.flush("shared", |_| {}));
    settle(&sa);
    drop(v);
    let rec = ok(&rt, "get", sa.volume("shared"));
    assert!(ok(&rt, "release", ma.release_volume(&rec.id, "a", 1)));

    // Node b takes it over and reads it cold from S3.
    let epoch = ok(&rt, "owner", mb.volume_owner(&rec.id)).epoch;
    assert_eq!(ok(&rt, "claim", mb.claim_volume(&rec.id, "b", epoch)), Some(2));
    let vb = open(&rt, &sb, "shared");
    assert_volume_eq(&vb, &shared.data, "shared on node b");
    shared.scribble(&vb, &mut Rng::new(11), 40);
    ok(&rt, "flush shared on b", sb.flush("shared", |_| {}));

    // Node a keeps writing, checkpointing and forking another volume while
    // node b collects garbage in a loop.
    create(&rt, &sa, "work", SIZE);
    let done = AtomicBool::new(false);
    let gcs = AtomicU32::new(0);
    let handle = rt.handle().clone();
    let (work, cks) = std::thread::scope(|sc| {
        let gc = sc.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                handle.block_on(sb.gc(false)).expect("gc on node b");
                gcs.fetch_add(1, Ordering::Relaxed);
                let bad = handle.block_on(mb.verify_refcounts()).unwrap();
                assert!(bad.is_empty(), "refcounts wrong mid-run: {bad:?}");
            }
        });
        let writer = sc.spawn(|| {
            let v = handle.block_on(sa.open_volume("work")).unwrap();
            let mut m = Model::new(SIZE);
            let mut rng = Rng::new(20);
            let mut cks = Vec::new();
            for round in 0..12 {
                // Overwrites with repeating contents: chunks lose their last
                // reference and come back while GC runs.
                for i in 0..20u64 {
                    let idx = rng.below(SIZE / CS);
                    let kind = if i % 4 == 0 { Kind::Zero } else { Kind::Random };
                    m.write(&v, idx * CS, &content(kind, rng.below(8), CS as usize));
                }
                m.scribble(&v, &mut rng, 10);
                let ck = v.checkpoint(&format!("round {round}")).unwrap();
                cks.push((ck.id.clone(), m.clone()));
                let name = format!("fk{round}");
                handle
                    .block_on(sa.fork(
                        &name,
                        VolumeSource::Checkpoint {
                            volume: "work".into(),
                            checkpoint: ck.id.clone(),
                        },
                    ))
                    .unwrap();
                let f = handle.block_on(sa.open_volume(&name)).unwrap();
                assert_volume_eq(&f, &m.data, &format!("fork {name}"));
                drop(f);
                handle.block_on(sa.delete_volume(&name)).unwrap();
                if round % 3 == 2 {
                    handle.block_on(sa.flush("work", |_| {})).unwrap();
                    let (old, _) = cks.remove(0);
                    handle.block_on(sa.delete_checkpoint("work", &old)).unwrap();
                }
            }
            handle.block_on(sa.flush("work", |_| {})).unwrap();
            done.store(true, Ordering::SeqCst);
            (m, cks)
        });
        let r = writer.join();
        done.store(true, Ordering::SeqCst);
        gc.join().unwrap();
        r.unwrap()
    });
    assert!(gcs.load(Ordering::Relaxed) > 0);
    for (id, _) in &cks {
        ok(&rt, "wait durable", sa.wait_durable("work", id));
    }
    settle(&sa);
    settle(&sb);
    ok(&rt, "final gc", sb.gc(true));
    assert_refcounts_ok(&rt, &sa);
    assert_same_chunks(
        &list_objects(&rt, &backend),
        &referenced_hashes(&rt, &sa),
        "bucket vs metadata",
    );

    // Everything reads back from S3 alone.
    sa.drop_read_cache();
    sb.drop_read_cache();
    let w = open(&rt, &sa, "work");
    assert_volume_eq(&w, &work.data, "work on node a");
    assert_volume_eq(&vb, &shared.data, "shared on node b");
    for (id, want) in &cks {
        let name = format!("check-{id}");
        ok(
            &rt,
            "fork on b",
            sb.fork(
                &name,
                VolumeSource::Checkpoint {
                    volume: "work".into(),
                    checkpoint: id.clone(),
                },
            ),
        );
        let f = open(&rt, &sb, &name);
        assert_eq!(read_all(&f), want.data, "checkpoint work/{id} read on node b");
    }
}

/// Map entries naming a chunk that is not `present` (being deleted or gone):
/// a read of such a slot would fail. Must be zero at every moment.
fn dangling_refs(pg: &TestPostgres) -> i64 {
    pg.psql(
        "SELECT COUNT(*) FROM map_entries e LEFT JOIN chunks c ON c.hash = e.hash
         WHERE e.hash IS NOT NULL AND (c.hash IS NULL OR c.state <> 'present')",
    )
    .unwrap()
    .parse()
    .unwrap()
}

/// The uploader's protocol for one pending chunk, straight on the trait.
async fn upload(m: &PgMeta, p: i64, h: &ChunkHash) {
    use den_store::meta::{CommitOutcome, UploadDecision};
    loop {
        match m.begin_upload(h).await.unwrap() {
            UploadDecision::Busy => {
                tokio::task::yield_now().await;
                continue;
            }
            UploadDecision::AlreadyPresent | UploadDecision::MustUpload => {}
        }
        match m.commit_upload(p, h, 100).await.unwrap() {
            CommitOutcome::Committed { .. } => return,
            CommitOutcome::Retry => continue,
        }
    }
}

#[test]
fn concurrent_seals_uploads_forks_and_gc_on_two_nodes_keep_refcounts_exact() {
    let pg = pg();
    let rt = runtime();
    let a = meta(&rt, &pg, "a");
    let b = meta(&rt, &pg, "b");
    const WORKERS: u64 = 4;
    const ROUNDS: u64 = 40;
    let done = AtomicBool::new(false);
    let next_pending = std::sync::atomic::AtomicI64::new(1);
    let gcs = AtomicU32::new(0);
    let deleted = std::sync::atomic::AtomicU64::new(0);
    let handle = rt.handle().clone();
    std::thread::scope(|sc| {
        let gc = sc.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                handle.block_on(async {
                    let batch = b.gc_begin(50).await.unwrap();
                    deleted.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    b.gc_finish(&batch).await.unwrap();
                });
                gcs.fetch_add(1, Ordering::Relaxed);
                assert_eq!(dangling_refs(&pg), 0, "a map names a chunk GC took");
            }
        });
        // Node b forks the live heads of node a's volumes (not fenced: it
        // only reads them) while a keeps changing them.
        let forker = sc.spawn(|| {
            let mut rng = Rng::new(99);
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                n += 1;
                handle.block_on(async {
                    let Ok(src) = b.get_volume(&format!("w{}", rng.below(WORKERS))).await else {
                        return;
                    };
                    match b
                        .create_volume(&format!("bf{n}"), 64 * CS, CS as u32, Some(src.head_map))
                        .await
                    {
                        Ok(f) => b.delete_volume(&f.id).await.unwrap(),
                        // The source volume went away meanwhile.
                        Err(StoreError::Meta(_)) => {}
                        Err(e) => panic!("fork on b: {e}"),
                    }
                });
            }
            n
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (a, handle, next_pending) = (&a, handle.clone(), &next_pending);
                sc.spawn(move || {
                    handle.block_on(async move {
                        let mut rng = Rng::new(w + 1);
                        let v = a
                            .create_volume(&format!("w{w}"), 64 * CS, CS as u32, None)
                            .await
                            .unwrap();
                        let mut cks: Vec<String> = Vec::new();
                        for round in 0..ROUNDS {
                            // Contents shared by all workers and slots: chunks keep
                            // dropping to zero references and coming back.
                            let seals: Vec<(u64, Option<i64>)> = (0..4)
                                .map(|_| {
                                    let idx = rng.below(64);
                                    if rng.below(5) == 0 {
                                        (idx, None)
                                    } else {
                                        (idx, Some(next_pending.fetch_add(1, Ordering::SeqCst)))
                                    }
                                })
                                .collect();
                            a.apply_seal(v.head_map, &seals).await.unwrap();
                            for (_, p) in &seals {
                                if let Some(p) = *p {
                                    let h = ChunkHash::of(&rng.below(40).to_le_bytes());
                                    upload(a, p, &h).await;
                                }
                            }
                            match round % 4 {
                                0 => cks.push(a.checkpoint(&v.id, "", &[]).await.unwrap().id),
                                1 => {
                                    let src = if let Some(id) = cks.last() {
                                        a.get_checkpoint(&v.id, id).await.unwrap().map_id
                                    } else {
                                        v.head_map
                                    };
                                    let f = a
                                        .create_volume(
                                            &format!("f{w}-{round}"),
                                            64 * CS,
                                            CS as u32,
                                            Some(src),
                                        )
                                        .await
                                        .unwrap();
                                    // Only this worker changes its maps, so the copy is exact.
                                    let mut want = a.load_map(src).await.unwrap();
                                    let mut got = a.load_map(f.head_map).await.unwrap();
                                    want.sort_by_key(|e| e.0);
                                    got.sort_by_key(|e| e.0);
                                    assert_eq!(got, want);
                                    a.delete_volume(&f.id).await.unwrap();
                                }
                                2 if cks.len() > 2 => {
                                    let id = cks.remove(0);
                                    a.delete_checkpoint(&v.id, &id).await.unwrap();
                                }
                                3 if !cks.is_empty() => {
                                    a.restore(&v.id, &cks[cks.len() - 1]).await.unwrap();
                                }
                                _ => {}
                            }
                        }
                    })
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        gc.join().unwrap();
        assert!(forker.join().unwrap() > 1);
    });
    eprintln!(
        "gc passes {}, chunks deleted {}, retries a {} b {}",
        gcs.load(Ordering::Relaxed),
        deleted.load(Ordering::Relaxed),
        a.retries(),
        b.retries()
    );
    assert!(ok(&rt, "verify", a.verify_refcounts()).is_empty());
    assert_eq!(dangling_refs(&pg), 0);
    assert!(ok(&rt, "pending", a.list_pending()).is_empty());
    assert!(
        deleted.load(Ordering::Relaxed) > 0,
        "GC never found garbage: the test raced nothing"
    );
}

#[test]
fn gc_batches_belong_to_the_node_that_marked_them() {
    let pg = pg();
    let rt = runtime();
    let a = meta(&rt, &pg, "a");
    let b = meta(&rt, &pg, "b");
    let v = ok(&rt, "create", a.create_volume("v", MIB, CS as u32, None));
    let h = ChunkHash::of(b"garbage");
    ok(&rt, "seal", a.apply_seal(v.head_map, &[(0, Some(1))]));
    ok(&rt, "begin", a.begin_upload(&h));
    ok(&rt, "commit", a.commit_upload(1, &h, 7));
    ok(&rt, "overwrite", a.apply_seal(v.head_map, &[(0, None)]));
    // a's GC marks the chunk and "dies" before finishing.
    assert_eq!(ok(&rt, "gc a", a.gc_begin(10)), vec![h]);
    // b's GC must not finish a's live batch, nor mark it again.
    assert!(ok(&rt, "interrupted b", b.gc_interrupted()).is_empty());
    assert!(ok(&rt, "gc b", b.gc_begin(10)).is_empty());
    assert_eq!(ok(&rt, "interrupted a", a.gc_interrupted()), vec![h]);
    // Abandoned long ago: any node takes it over.
    pg.psql("UPDATE chunks SET updated_at_ms = 0").unwrap();
    assert_eq!(ok(&rt, "take over", b.gc_interrupted()), vec![h]);
    assert!(ok(&rt, "interrupted a", a.gc_interrupted()).is_empty());
    ok(&rt, "finish b", b.gc_finish(&[h]));
    assert!(!ok(&rt, "known", a.is_known_chunk(&h)));
    assert!(ok(&rt, "verify", a.verify_refcounts()).is_empty());
}

#[test]
fn random_operations_match_a_model_across_node_restarts() {
    let pg = pg();
    let mut rt = runtime();
    for seed in 1..=3u64 {
        // Each seed in its own database and directory.
        let url = pg.create_database(&format!("model{seed}")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(seed);
        // A node restarting: a fresh `PgMeta` under the same node name claims
        // its volumes again (held epochs die with the process).
        let connect = |rt: &Runtime| -> Store {
            let m = Arc::new(rt.block_on(PgMeta::connect(&url, "m")).unwrap());
            rt.block_on(async {
                for v in m.list_volumes().await.unwrap() {
                    let e = m.volume_owner(&v.id).await.unwrap().epoch;
                    assert!(m.claim_volume(&v.id, "m", e).await.unwrap().is_some());
                }
            });
            store(rt, dir.path(), local_objects(dir.path()), m)
        };
        let mut s = connect(&rt);
        const SIZE: u64 = MIB;
        let mut vols: std::collections::BTreeMap<String, Model> = Default::default();
        let mut handles: std::collections::HashMap<String, den_store::Volume> = Default::default();
        let mut cks: Vec<(String, String, Vec<u8>)> = Vec::new();
        for name in ["a", "b"] {
            create(&rt, &s, name, SIZE);
            vols.insert(name.into(), Model::new(SIZE));
        }
        for step in 0..80 {
            let names: Vec<String> = vols.keys().cloned().collect();
            let name = names[rng.below(names.len() as u64) as usize].clone();
            let what = format!("seed {seed} step {step}");
            match rng.below(10) {
                0..=3 => {
                    let v = handles
                        .entry(name.clone())
                        .or_insert_with(|| open(&rt, &s, &name))
                        .clone();
                    vols.get_mut(&name).unwrap().scribble(&v, &mut rng, 6);
                }
                4 => {
                    let ck = ok(&rt, &what, s.checkpoint(&name, "model"));
                    cks.push((name.clone(), ck.id, vols[&name].data.clone()));
                }
                5 if !cks.is_empty() => {
                    let (vol, id, data) = cks[rng.below(cks.len() as u64) as usize].clone();
                    handles.remove(&vol);
                    ok(&rt, &what, s.restore(&vol, &id));
                    vols.get_mut(&vol).unwrap().data = data;
                }
                6 => {
                    let fork = format!("f{step}");
                    let (src, data) = match cks.last() {
                        Some((vol, id, data)) if rng.below(2) == 0 => (
                            VolumeSource::Checkpoint {
                                volume: vol.clone(),
                                checkpoint: id.clone(),
                            },
                            data.clone(),
                        ),
                        _ => (VolumeSource::Volume(name.clone()), vols[&name].data.clone()),
                    };
                    ok(&rt, &what, s.fork(&fork, src));
                    vols.insert(fork, Model { data });
                }
                7 if name.starts_with('f') => {
                    handles.remove(&name);
                    ok(&rt, &what, s.delete_volume(&name));
                    vols.remove(&name);
                    cks.retain(|c| c.0 != name);
                }
                8 if !cks.is_empty() => {
                    let (vol, id, _) = cks.remove(rng.below(cks.len() as u64) as usize);
                    ok(&rt, &what, s.delete_checkpoint(&vol, &id));
                }
                9 => {
                    if rng.below(2) == 0 {
                        ok(&rt, &what, s.gc(rng.below(2) == 0));
                    } else {
                        // Restart the node, uploads in flight or not.
                        // Dropping the runtime cancels its background work
                        // (which holds volume handles and their locks), as
                        // the end of a process would.
                        handles.clear();
                        drop(s);
                        drop(rt);
                        rt = runtime();
                        s = connect(&rt);
                    }
                }
                _ => {}
            }
            if let Some(m) = vols.get(&name) {
                let v = open(&rt, &s, &name);
                assert_volume_eq(&v, &m.data, &what);
            }
            assert_refcounts_ok(&rt, &s);
        }
        handles.clear();
        for name in vols.keys() {
            ok(&rt, "flush", s.flush(name, |_| {}));
        }
        for (vol, id, _) in &cks {
            ok(&rt, "wait durable", s.wait_durable(vol, id));
        }
        ok(&rt, "gc", s.gc(true));
        assert_refcounts_ok(&rt, &s);
        settle(&s);
        drop(s);
        let s = connect(&rt);
        s.drop_read_cache();
        for (name, m) in &vols {
            assert_volume_eq(
                &open(&rt, &s, name),
                &m.data,
                &format!("seed {seed}: {name} at the end"),
            );
        }
        for (i, (vol, id, data)) in cks.iter().enumerate() {
            let name = format!("check{i}");
            ok(
                &rt,
                "fork",
                s.fork(
                    &name,
                    VolumeSource::Checkpoint {
                        volume: vol.clone(),
                        checkpoint: id.clone(),
                    },
                ),
            );
            assert_volume_eq(&open(&rt, &s, &name), data, &format!("seed {seed}: {vol}/{id}"));
        }
        assert!(ok(&rt, "pending", s.meta().list_pending()).is_empty());
    }
}
