//! The volume store on a real S3 server (SeaweedFS on 127.0.0.1): cold reads
//! on a "new host" (same metadata, empty cache), checkpoint/restore/fork, GC
//! of bucket objects and content deduplication.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::*;
use den_store::objects::Objects;
use den_store::{ChunkHash, Store, VolumeSource};
use den_testkit::SeaweedS3;

const VOL: u64 = 64 * MIB;

fn start_s3() -> SeaweedS3 {
    let t = Instant::now();
    let s3 = SeaweedS3::start().expect("start SeaweedFS");
    eprintln!("SeaweedFS S3 ready on {} after {:?}", s3.endpoint(), t.elapsed());
    s3
}

/// Writes to every chunk of a fresh volume (random, compressible and zero
/// chunks in turn) and then a mixed workload on top.
fn fill(m: &mut Model, v: &den_store::Volume, seed: u64) {
    let chunks = v.size() / CS;
    for idx in 0..chunks {
        let kind = [Kind::Random, Kind::Compressible, Kind::Zero][(idx % 3) as usize];
        m.write(v, idx * CS, &content(kind, seed ^ idx, CS as usize));
    }
    m.scribble(v, &mut Rng::new(seed), 300);
}

#[test]
fn cold_read_on_new_host_then_restore_and_fork() {
    let t0 = Instant::now();
    let s3 = start_s3();
    let backend = s3_backend(&s3, "den/cold");
    let host = tempfile::tempdir().unwrap();
    let cfg = config(host.path(), backend.clone());

    // Host 1: write, checkpoint, write more, flush.
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg.clone())).unwrap();
    create(&rt, &store, "a", VOL);
    let v = open(&rt, &store, "a");
    let mut m = Model::new(VOL);
    fill(&mut m, &v, 1);
    let v1 = v.checkpoint("first").unwrap();
    let m1 = m.clone();
    m.scribble(&v, &mut Rng::new(2), 200);
    let v2 = rt.block_on(store.checkpoint("a", "second")).unwrap();
    let m2 = m.clone();
    m.scribble(&v, &mut Rng::new(3), 100);
    within(&rt, UPLOAD_TIMEOUT, "flush a", store.flush("a", |_| {})).unwrap();
    for ck in [&v1, &v2] {
        within(
            &rt,
            UPLOAD_TIMEOUT,
            "wait_durable",
            store.wait_durable("a", &ck.id),
        )
        .unwrap();
        assert!(rt.block_on(store.get_checkpoint("a", &ck.id)).unwrap().durable);
    }
    settle(&store);
    assert_volume_eq(&v, &m.data, "warm read on host 1");
    let objects = list_objects(&rt, &backend);
    let referenced = referenced_hashes(&rt, &store);
    let missing = referenced.difference(&objects).count();
    assert_eq!(missing, 0, "{missing} referenced chunks are not in the bucket");
    assert!(
        referenced.len() > 500,
        "many chunks were uploaded: {}",
        referenced.len()
    );
    eprintln!("host 1 wrote {} objects in {:?}", objects.len(), t0.elapsed());
    drop(v);
    drop(store);
    drop(rt);

    // Host 2: same metadata and bucket, no cache at all.
    std::fs::remove_dir_all(host.path().join("cache")).unwrap();
    let t1 = Instant::now();
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg)).unwrap();
    assert_eq!(store.cache_stats().clean_chunks, 0);
    let v = open(&rt, &store, "a");
    assert_volume_eq(&v, &m.data, "cold read of head on host 2");
    let fetched = store.cache_stats().clean_chunks;
    assert!(fetched > 500, "head was read from S3 ({fetched} chunks fetched)");
    eprintln!("cold read of {fetched} chunks took {:?}", t1.elapsed());

    // Fork from checkpoints and from the live volume.
    rt.block_on(store.fork(
        "from-v1",
        VolumeSource::Checkpoint {
            volume: "a".into(),
            checkpoint: v1.id.clone(),
        },
    ))
    .unwrap();
    rt.block_on(store.fork("from-live", VolumeSource::Volume("a".into())))
        .unwrap();
    store.drop_read_cache();
    let f1 = open(&rt, &store, "from-v1");
    assert_volume_eq(&f1, &m1.data, "cold read of fork of v1");
    let live = open(&rt, &store, "from-live");
    assert_volume_eq(&live, &m.data, "fork of live a");
    // Forks are independent of their source.
    let mut mf = m.clone();
    mf.scribble(&live, &mut Rng::new(4), 100);
    within(
        &rt,
        UPLOAD_TIMEOUT,
        "flush from-live",
        store.flush("from-live", |_| {}),
    )
    .unwrap();
    settle(&store);
    store.drop_read_cache();
    assert_volume_eq(&v, &m.data, "source after writes to its fork");
    assert_volume_eq(&live, &mf.data, "fork after its own writes");

    // Restore a to v2, then to v1, reading from S3 each time.
    drop(v);
    rt.block_on(store.restore("a", &v2.id)).unwrap();
    store.drop_read_cache();
    let v = open(&rt, &store, "a");
    assert_volume_eq(&v, &m2.data, "a restored to v2");
    drop(v);
    rt.block_on(store.restore("a", &v1.id)).unwrap();
    store.drop_read_cache();
    let v = open(&rt, &store, "a");
    assert_volume_eq(&v, &m1.data, "a restored to v1");

    // Nothing referenced may be collected.
    drop((v, f1, live));
    let report = rt.block_on(store.gc(true)).unwrap();
    eprintln!("gc after restores: {report:?}");
    let referenced = referenced_hashes(&rt, &store);
    assert!(report.chunks_deleted > 0, "overwritten chunks are garbage");
    assert_same_chunks(&list_objects(&rt, &backend), &referenced, "bucket after gc");
    store.drop_read_cache();
    for (name, want) in [("a", &m1), ("from-v1", &m1), ("from-live", &mf)] {
        let v = open(&rt, &store, name);
        assert_volume_eq(&v, &want.data, &format!("{name} after gc"));
    }
    assert_refcounts_ok(&rt, &store);
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn gc_deletes_unreferenced_objects_and_keeps_referenced() {
    let s3 = start_s3();
    let prefix = "den/gc";
    let backend = s3_backend(&s3, prefix);
    let host = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = rt
        .block_on(Store::open(config(host.path(), backend.clone())))
        .unwrap();
    create(&rt, &store, "g", VOL);
    let v = open(&rt, &store, "g");
    let mut m = Model::new(VOL);
    // 64 distinct chunks, checkpoint, then overwrite half of them.
    for idx in 0..64 {
        m.write(&v, idx * CS, &content(Kind::Random, 1000 + idx, CS as usize));
    }
    let ck = v.checkpoint("before overwrite").unwrap();
    let old_half: Vec<Vec<u8>> = (0..32)
        .map(|i| m.data[(i * 2 * CS) as usize..((i * 2 + 1) * CS) as usize].to_vec())
        .collect();
    for i in 0..32u64 {
        m.write(
            &v,
            i * 2 * CS,
            &content(Kind::Compressible, 2000 + i, CS as usize),
        );
    }
    within(&rt, UPLOAD_TIMEOUT, "flush g", store.flush("g", |_| {})).unwrap();
    within(
        &rt,
        UPLOAD_TIMEOUT,
        "wait_durable",
        store.wait_durable("g", &ck.id),
    )
    .unwrap();
    settle(&store);

    let objects = list_objects(&rt, &backend);
    assert_eq!(objects.len(), 96);
    assert_same_chunks(&objects, &referenced_hashes(&rt, &store), "bucket before gc");
    // The bucket, listed by the server itself, holds the same keys under the prefix.
    let keys = bucket_keys(&s3, &format!("{prefix}/"));
    let expected: BTreeSet<String> = objects
        .iter()
        .map(|h| h.object_key(&format!("{prefix}/")))
        .collect();
    assert_eq!(keys.iter().cloned().collect::<BTreeSet<_>>(), expected);

    // Everything is referenced (by head or checkpoint): GC deletes nothing.
    let r = rt.block_on(store.gc(true)).unwrap();
    assert_eq!((r.chunks_deleted, r.orphan_objects_deleted), (0, 0), "{r:?}");
    assert_same_chunks(
        &list_objects(&rt, &backend),
        &objects,
        "bucket after a gc that found nothing",
    );

    // Dropping the checkpoint unreferences the 32 overwritten chunks.
    rt.block_on(store.delete_checkpoint("g", &ck.id)).unwrap();
    let r = rt.block_on(store.gc(false)).unwrap();
    assert_eq!(r.chunks_deleted, 32, "{r:?}");
    let after = list_objects(&rt, &backend);
    assert_eq!(after.len(), 64);
    assert_same_chunks(&after, &referenced_hashes(&rt, &store), "bucket after gc");
    for old in &old_half {
        assert!(
            !after.contains(&ChunkHash::of(old)),
            "overwritten chunk still in the bucket"
        );
    }
    assert_eq!(bucket_keys(&s3, &format!("{prefix}/")).len(), 64);
    store.drop_read_cache();
    assert_volume_eq(&v, &m.data, "cold read after gc");

    // An object no metadata row names (e.g. left by a crash after GC's
    // metadata commit) is an orphan; only the sweep removes it.
    let stray = content(Kind::Random, 9999, CS as usize);
    let stray_hash = ChunkHash::of(&stray);
    let objs = Objects::open(&backend).unwrap();
    rt.block_on(objs.put(
        &stray_hash,
        den_store::chunk::encode(&stray, den_store::Compression::Zstd),
    ))
    .unwrap();
    let r = rt.block_on(store.gc(false)).unwrap();
    assert_eq!((r.chunks_deleted, r.orphan_objects_deleted), (0, 0), "{r:?}");
    assert!(list_objects(&rt, &backend).contains(&stray_hash));
    let r = rt.block_on(store.gc(true)).unwrap();
    assert_eq!((r.chunks_deleted, r.orphan_objects_deleted), (0, 1), "{r:?}");
    assert_same_chunks(
        &list_objects(&rt, &backend),
        &after,
        "bucket after the orphan sweep",
    );

    // Content collected by GC is uploaded again when it is written again.
    m.write(&v, 100 * CS, &old_half[0]);
    within(&rt, UPLOAD_TIMEOUT, "flush g", store.flush("g", |_| {})).unwrap();
    settle(&store);
    assert!(list_objects(&rt, &backend).contains(&ChunkHash::of(&old_half[0])));
    store.drop_read_cache();
    assert_volume_eq(&v, &m.data, "cold read after re-upload");
    assert_refcounts_ok(&rt, &store);

    // Deleting the volume makes every chunk garbage.
    drop(v);
    rt.block_on(store.delete_volume("g")).unwrap();
    let r = rt.block_on(store.gc(true)).unwrap();
    assert_eq!(r.chunks_deleted, 65, "{r:?}");
    assert!(list_objects(&rt, &backend).is_empty());
    assert!(bucket_keys(&s3, &format!("{prefix}/")).is_empty());
    assert_refcounts_ok(&rt, &store);
    assert_eq!(rt.block_on(store.stats()).unwrap().chunks, 0);
}

#[test]
fn same_content_in_two_volumes_is_one_object() {
    let s3 = start_s3();
    let backend = s3_backend(&s3, "");
    let host = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = rt
        .block_on(Store::open(config(host.path(), backend.clone())))
        .unwrap();
    create(&rt, &store, "d1", VOL);
    create(&rt, &store, "d2", VOL);
    let d1 = open(&rt, &store, "d1");
    let d2 = open(&rt, &store, "d2");
    let mut m1 = Model::new(VOL);
    let mut m2 = Model::new(VOL);
    let shared: Vec<Vec<u8>> = (0..16)
        .map(|i| {
            content(
                if i % 2 == 0 {
                    Kind::Random
                } else {
                    Kind::Compressible
                },
                500 + i,
                CS as usize,
            )
        })
        .collect();
    for (i, c) in shared.iter().enumerate() {
        let i = i as u64;
        m1.write(&d1, i * CS, c);
        m2.write(&d2, (100 + i) * CS, c);
        // Twice within one volume too.
        m1.write(&d1, (600 + i) * CS, c);
    }
    // Seal both volumes at once so their uploads of equal content race.
    let c1 = d1.checkpoint("d1").unwrap();
    let c2 = d2.checkpoint("d2").unwrap();
    within(&rt, UPLOAD_TIMEOUT, "wait d1", store.wait_durable("d1", &c1.id)).unwrap();
    within(&rt, UPLOAD_TIMEOUT, "wait d2", store.wait_durable("d2", &c2.id)).unwrap();
    settle(&store);

    let want: BTreeSet<ChunkHash> = shared.iter().map(|c| ChunkHash::of(c)).collect();
    assert_same_chunks(
        &list_objects(&rt, &backend),
        &want,
        "one object per distinct content",
    );
    assert_eq!(bucket_keys(&s3, "chunks/").len(), 16);
    let stats = rt.block_on(store.stats()).unwrap();
    assert_eq!((stats.chunks, stats.pending), (16, 0), "{stats:?}");
    // 16 contents, each referenced by 2 slots of d1 + 1 of d2, in head and checkpoint maps.
    assert_refcounts_ok(&rt, &store);
    let head1 = rt
        .block_on(
            store
                .meta()
                .map_stats(rt.block_on(store.volume("d1")).unwrap().head_map),
        )
        .unwrap();
    assert_eq!((head1.entries, head1.distinct_chunks), (32, 16));

    // A fork adds references, never objects.
    rt.block_on(store.fork("d3", VolumeSource::Volume("d1".into())))
        .unwrap();
    assert_eq!(list_objects(&rt, &backend).len(), 16);

    store.drop_read_cache();
    assert_volume_eq(&d1, &m1.data, "d1 cold");
    assert_volume_eq(&d2, &m2.data, "d2 cold");
    let d3 = open(&rt, &store, "d3");
    assert_volume_eq(&d3, &m1.data, "d3 cold");
    // Reading the shared content once filled the cache for all volumes.
    assert_eq!(store.cache_stats().clean_chunks, 16);

    // Removing one user of the content keeps the object for the others.
    drop((d1, d3));
    rt.block_on(store.delete_volume("d1")).unwrap();
    rt.block_on(store.delete_volume("d3")).unwrap();
    let r = rt.block_on(store.gc(true)).unwrap();
    assert_eq!((r.chunks_deleted, r.orphan_objects_deleted), (0, 0), "{r:?}");
    store.drop_read_cache();
    assert_volume_eq(&d2, &m2.data, "d2 cold after d1 is gone");
    assert_refcounts_ok(&rt, &store);
}
