//! The volume store when its object store fails: a server that is down,
//! hung, or refuses our credentials. Nothing written may be lost, writes
//! block only at the dirty bound, and reads fail within `fetch_timeout`
//! instead of hanging.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use den_store::{ObjectBackend, Store, VolumeSource};
use den_testkit::{SeaweedS3, wait_until};

const VOL: u64 = 64 * MIB;

fn start_s3() -> SeaweedS3 {
    let t = Instant::now();
    let s3 = SeaweedS3::start().expect("start SeaweedFS");
    eprintln!("SeaweedFS S3 ready on {} after {:?}", s3.endpoint(), t.elapsed());
    s3
}

/// The ids of the pending (sealed, not yet uploaded) files in the cache.
fn pending_files(host: &std::path::Path) -> Vec<i64> {
    std::fs::read_dir(host.join("cache/pending"))
        .unwrap()
        .map(|e| i64::from_str_radix(e.unwrap().file_name().to_str().unwrap(), 16).unwrap())
        .collect()
}

/// The process group of the `weed` server behind `s3` (its leader's pid):
/// found by the S3 port on its command line.
fn weed_pgid(s3: &SeaweedS3) -> libc::pid_t {
    let flag = format!("-s3.port={}", s3.ports().s3);
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == flag.as_bytes()) {
            // SAFETY: getpgid has no memory-safety preconditions.
            let pgid = unsafe { libc::getpgid(pid) };
            assert!(pgid > 0, "getpgid({pid})");
            return pgid;
        }
    }
    panic!("no weed process with {flag}");
}

fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain syscall on the process group of a server this test started.
    let rc = unsafe { libc::kill(-pgid, sig) };
    assert_eq!(rc, 0, "kill(-{pgid}, {sig}): {}", std::io::Error::last_os_error());
}

/// The threads of process group `pgid` that are not stopped (state `T`),
/// as `(tid, state)`. Threads that have exited (`Z`, `X`) run nothing.
fn running_threads(pgid: libc::pid_t) -> Vec<(String, char)> {
    // `/proc/…/stat` is `pid (comm) state ppid pgrp …`; comm may hold
    // spaces and parentheses, so fields are counted after the last ')'.
    fn fields(stat: &str) -> Vec<&str> {
        stat.rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect())
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if fields(&stat).get(2).and_then(|g| g.parse::<libc::pid_t>().ok()) != Some(pgid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(e.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let state = fields(&stat)
                .first()
                .and_then(|s| s.chars().next())
                .unwrap_or('?');
            if !matches!(state, 'T' | 't' | 'Z' | 'X') {
                out.push((t.file_name().to_string_lossy().into_owned(), state));
            }
        }
    }
    out
}

/// SIGSTOP process group `pgid` and wait until every thread in it has
/// stopped. `kill` returning does not mean that: it only queues the signal,
/// one thread of each process takes it and only then tells the others to
/// stop. Until each of them gets a CPU, the rest of a multi-threaded server
/// (Go's `weed` runs dozens of threads) keeps serving requests: on this
/// 2-core machine under load, a GET sent right after `kill` was answered
/// within 5–7 ms about once in 20–40 runs.
fn stop_group(pgid: libc::pid_t) {
    signal_group(pgid, libc::SIGSTOP);
    let t = Instant::now();
    let first = running_threads(pgid);
    wait_until(Duration::from_secs(30), Duration::from_millis(1), || {
        running_threads(pgid).is_empty()
    })
    .unwrap_or_else(|_| panic!("process group {pgid} still runs {:?}", running_threads(pgid)));
    eprintln!(
        "process group {pgid}: {} threads still running right after SIGSTOP, all stopped after {:?}",
        first.len(),
        t.elapsed()
    );
}

/// (a) With the object store down, writes (below the dirty bound) and
/// checkpoints go on; checkpoints are not durable until the server is back,
/// then every one becomes durable and reads back from S3 on a new host.
#[test]
fn outage_keeps_writes_and_checkpoints_going_and_loses_nothing() {
    let mut s3 = start_s3();
    let backend = s3_backend(&s3, "den/outage");
    let host = tempfile::tempdir().unwrap();
    let cfg = config(host.path(), backend.clone());
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg.clone())).unwrap();
    create(&rt, &store, "a", VOL);
    let v = open(&rt, &store, "a");
    let mut m = Model::new(VOL);
    for idx in 0..256 {
        let kind = if idx % 2 == 0 {
            Kind::Random
        } else {
            Kind::Compressible
        };
        m.write(&v, idx * CS, &content(kind, idx, CS as usize));
    }
    within(
        &rt,
        UPLOAD_TIMEOUT,
        "flush before outage",
        store.flush("a", |_| {}),
    )
    .unwrap();
    settle(&store);

    s3.stop().unwrap();
    let mut cks = Vec::new();
    for round in 0..3u64 {
        // Overwrites of uploaded chunks (partial and whole), new chunks, discards.
        m.scribble(&v, &mut Rng::new(10 + round), 40);
        for i in 0..32 {
            let idx = 300 + round * 40 + i;
            m.write(&v, idx * CS, &content(Kind::Random, 77 * idx, CS as usize));
        }
        let ck = if round == 1 {
            rt.block_on(store.checkpoint("a", "during outage")).unwrap()
        } else {
            v.checkpoint("during outage").unwrap()
        };
        assert!(
            !ck.durable,
            "checkpoint {} cannot be durable while S3 is down",
            ck.id
        );
        assert!(store.local_only_bytes() > 0);
        assert!(store.local_only_bytes() <= cfg.dirty_limit);
        cks.push((ck, m.clone()));
    }
    m.scribble(&v, &mut Rng::new(20), 40);
    // Still down: nothing becomes durable, and all data reads from the cache.
    assert!(
        still_running_after(&rt, Duration::from_secs(1), store.wait_durable("a", &cks[0].0.id)),
        "wait_durable returned while S3 is down"
    );
    for (ck, _) in &cks {
        assert!(!rt.block_on(store.get_checkpoint("a", &ck.id)).unwrap().durable);
    }
    assert_volume_eq(&v, &m.data, "read while S3 is down");

    s3.restart().unwrap();
    let t = Instant::now();
    for (ck, _) in &cks {
        within(
            &rt,
            UPLOAD_TIMEOUT,
            "wait_durable after restart",
            store.wait_durable("a", &ck.id),
        )
        .unwrap();
        assert!(rt.block_on(store.get_checkpoint("a", &ck.id)).unwrap().durable);
    }
    eprintln!("checkpoints durable {:?} after the restart", t.elapsed());
    within(
        &rt,
        UPLOAD_TIMEOUT,
        "flush after restart",
        store.flush("a", |_| {}),
    )
    .unwrap();
    settle(&store);
    drop(v);
    drop(store);
    drop(rt);

    // A new host: same metadata, empty cache.
    std::fs::remove_dir_all(host.path().join("cache")).unwrap();
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg)).unwrap();
    for (ck, want) in &cks {
        let name = format!("fork-{}", ck.id);
        rt.block_on(store.fork(
            &name,
            VolumeSource::Checkpoint {
                volume: "a".into(),
                checkpoint: ck.id.clone(),
            },
        ))
        .unwrap();
        let f = open(&rt, &store, &name);
        assert_volume_eq(&f, &want.data, &format!("cold read of checkpoint {}", ck.id));
    }
    let v = open(&rt, &store, "a");
    assert_volume_eq(&v, &m.data, "cold read of head");
    let (objects, referenced) = (list_objects(&rt, &backend), referenced_hashes(&rt, &store));
    assert_eq!(
        referenced.difference(&objects).count(),
        0,
        "referenced chunks missing from the bucket"
    );
    assert_refcounts_ok(&rt, &store);
}

/// (b) Every PUT is refused (wrong secret key): uploads keep failing and
/// retrying, the data stays pending in the cache; a store reopened on the
/// same host with the right credentials uploads all of it.
#[test]
fn refused_uploads_survive_reopen_with_right_credentials() {
    let s3 = start_s3();
    let good = s3_backend(&s3, "den/creds");
    let bad = match good.clone() {
        ObjectBackend::S3 {
            endpoint,
            bucket,
            access_key,
            region,
            prefix,
            ..
        } => ObjectBackend::S3 {
            endpoint,
            bucket,
            access_key,
            secret_key: "not-the-secret".into(),
            region,
            prefix,
        },
        _ => unreachable!(),
    };
    let host = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = rt.block_on(Store::open(config(host.path(), bad))).unwrap();
    create(&rt, &store, "a", VOL);
    let v = open(&rt, &store, "a");
    let mut m = Model::new(VOL);
    for idx in 0..128 {
        let kind = [Kind::Random, Kind::Compressible, Kind::Zero][(idx % 3) as usize];
        m.write(&v, idx * CS, &content(kind, idx, CS as usize));
    }
    let ck1 = v.checkpoint("one").unwrap();
    let m1 = m.clone();
    m.scribble(&v, &mut Rng::new(5), 100);
    let ck2 = rt.block_on(store.checkpoint("a", "two")).unwrap();
    m.scribble(&v, &mut Rng::new(6), 50);
    v.fsync().unwrap();

    assert!(
        still_running_after(&rt, Duration::from_secs(2), store.wait_durable("a", &ck1.id)),
        "wait_durable returned although every PUT is refused"
    );
    assert!(list_objects(&rt, &good).is_empty(), "nothing reached the bucket");
    assert!(rt.block_on(store.stats()).unwrap().pending > 0);
    assert!(!pending_files(host.path()).is_empty());
    // The store goes away with uploads failing and dirty chunks unsealed.
    // Its retrying uploads must not keep it alive (the metadata handle is
    // shared with the store, so its count shows when the store is gone).
    let meta = store.meta().clone();
    drop(v);
    drop(store);
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        Arc::strong_count(&meta) == 1
    })
    .expect("a dropped store with failing uploads is torn down");
    drop(meta);

    // Same process, same host, right credentials.
    let store = rt
        .block_on(Store::open(config(host.path(), good.clone())))
        .unwrap();
    for ck in [&ck1, &ck2] {
        within(
            &rt,
            UPLOAD_TIMEOUT,
            "wait_durable",
            store.wait_durable("a", &ck.id),
        )
        .unwrap();
    }
    within(&rt, UPLOAD_TIMEOUT, "flush", store.flush("a", |_| {})).unwrap();
    settle(&store);
    // Every pending file the metadata names was uploaded and removed. Files
    // sealed by the first store and superseded before their (refused)
    // upload are named by nothing: the reopened store leaves them alone
    // until they are a minute old (another process might be about to
    // commit them), so they may still be here.
    let leftovers = pending_files(host.path());
    for p in &leftovers {
        assert!(
            !rt.block_on(store.meta().pending_referenced(*p)).unwrap(),
            "pending file {p:016x} is still referenced after flush"
        );
    }
    eprintln!("{} superseded pending files left in the cache", leftovers.len());
    store.drop_read_cache();
    let v = open(&rt, &store, "a");
    assert_volume_eq(&v, &m.data, "head after reopen");
    rt.block_on(store.fork(
        "f1",
        VolumeSource::Checkpoint {
            volume: "a".into(),
            checkpoint: ck1.id.clone(),
        },
    ))
    .unwrap();
    let f1 = open(&rt, &store, "f1");
    assert_volume_eq(&f1, &m1.data, "checkpoint one after reopen");
    let (objects, referenced) = (list_objects(&rt, &good), referenced_hashes(&rt, &store));
    assert_eq!(
        referenced.difference(&objects).count(),
        0,
        "referenced chunks missing from the bucket"
    );
    assert_refcounts_ok(&rt, &store);
}

/// (c) A read of a chunk that is only in the object store fails within
/// `fetch_timeout` while the server is down (and so does a partial write,
/// which needs the old content), and works again after a restart.
#[test]
fn reads_fail_within_fetch_timeout_while_down_and_recover() {
    let mut s3 = start_s3();
    let host = tempfile::tempdir().unwrap();
    let mut cfg = config(host.path(), s3_backend(&s3, "den/fetch"));
    cfg.fetch_timeout = Duration::from_secs(2);
    let limit = cfg.fetch_timeout + Duration::from_secs(3);
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg)).unwrap();
    create(&rt, &store, "c", VOL);
    let v = open(&rt, &store, "c");
    let mut m = Model::new(VOL);
    for idx in 0..32 {
        m.write(&v, idx * CS, &content(Kind::Random, idx, CS as usize));
    }
    within(&rt, UPLOAD_TIMEOUT, "flush", store.flush("c", |_| {})).unwrap();
    settle(&store);
    store.drop_read_cache();

    s3.stop().unwrap();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let err = v.read_at(3 * CS + 100, &mut buf).unwrap_err();
    let took = t.elapsed();
    eprintln!("read while down failed after {took:?}: {err}");
    assert!(took < limit, "read took {took:?}");

    let t = Instant::now();
    let err = v.write_at(4 * CS + 10, b"xyz").unwrap_err();
    let took = t.elapsed();
    eprintln!("partial write while down failed after {took:?}: {err}");
    assert!(took < limit, "partial write took {took:?}");
    assert_eq!(
        store.local_only_bytes(),
        0,
        "a failed write gives its budget back"
    );
    assert_eq!(v.dirty_chunks(), 0);

    // Whole-chunk writes need no old content; never-written chunks read as zeros.
    m.write(&v, 5 * CS, &content(Kind::Compressible, 555, CS as usize));
    let mut z = vec![1u8; 4096];
    v.read_at(40 * CS, &mut z).unwrap();
    assert!(z.iter().all(|b| *b == 0));

    s3.restart().unwrap();
    v.read_at(3 * CS + 100, &mut buf).unwrap();
    assert_eq!(
        &buf[..],
        &m.data[(3 * CS + 100) as usize..(3 * CS + 100 + 4096) as usize]
    );
    m.write(&v, 4 * CS + 10, b"xyz");
    assert_volume_eq(&v, &m.data, "after restart");
    within(&rt, UPLOAD_TIMEOUT, "flush", store.flush("c", |_| {})).unwrap();
    settle(&store);
    store.drop_read_cache();
    assert_volume_eq(&v, &m.data, "cold after restart");
    assert_refcounts_ok(&rt, &store);
}

/// (c') A server that accepts connections but never answers (SIGSTOPped):
/// a read must still fail within `fetch_timeout`, not after the HTTP
/// client's own request timeout.
#[test]
fn reads_fail_within_fetch_timeout_when_server_hangs() {
    let s3 = start_s3();
    let host = tempfile::tempdir().unwrap();
    let mut cfg = config(host.path(), s3_backend(&s3, "den/hang"));
    cfg.fetch_timeout = Duration::from_secs(2);
    let limit = cfg.fetch_timeout + Duration::from_secs(3);
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg)).unwrap();
    create(&rt, &store, "h", VOL);
    let v = open(&rt, &store, "h");
    let mut m = Model::new(VOL);
    for idx in 0..8 {
        m.write(&v, idx * CS, &content(Kind::Random, idx, CS as usize));
    }
    within(&rt, UPLOAD_TIMEOUT, "flush", store.flush("h", |_| {})).unwrap();
    settle(&store);
    store.drop_read_cache();

    let pgid = weed_pgid(&s3);
    stop_group(pgid);
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    let res = v.read_at(2 * CS, &mut buf);
    let took = t.elapsed();
    signal_group(pgid, libc::SIGCONT);
    eprintln!("read from a hung server returned after {took:?}: {res:?}");
    assert!(res.is_err(), "read cannot succeed while the server is stopped");
    assert!(took < limit, "read from a hung server took {took:?}");

    assert_volume_eq(&v, &m.data, "after SIGCONT");
}

/// (d) The dirty bound: with S3 down, a writer of 200 MiB of new chunks
/// stops at `dirty_limit` (local-only bytes never exceed it) and finishes
/// once the server is back.
#[test]
fn dirty_bound_blocks_writer_until_store_returns() {
    const TOTAL: u64 = 200 * MIB;
    let mut s3 = start_s3();
    let host = tempfile::tempdir().unwrap();
    let cfg = config(host.path(), s3_backend(&s3, "den/bound"));
    let limit = cfg.dirty_limit;
    assert_eq!(limit, 64 * MIB);
    let rt = runtime();
    let store = rt.block_on(Store::open(cfg)).unwrap();
    create(&rt, &store, "d", 256 * MIB);
    let v = open(&rt, &store, "d");
    let chunk = |i: u64| content(Kind::Compressible, 0xd000 + i, CS as usize);

    s3.stop().unwrap();
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let (v, progress) = (v.clone(), progress.clone());
        std::thread::spawn(move || {
            for i in 0..TOTAL / CS {
                v.write_at(i * CS, &chunk(i)).unwrap();
                progress.store((i + 1) * CS, Ordering::SeqCst);
            }
        })
    };
    wait_until(Duration::from_secs(60), Duration::from_millis(10), || {
        store.local_only_bytes() + CS > limit
    })
    .expect("the writer fills the dirty budget");
    let reached = progress.load(Ordering::SeqCst);
    eprintln!(
        "writer blocked at {} MiB written, {} MiB local-only",
        reached / MIB,
        store.local_only_bytes() / MIB
    );
    // Watch for a while: the writer makes no progress past the bound.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        let used = store.local_only_bytes();
        let done = progress.load(Ordering::SeqCst);
        assert!(
            used <= limit + CS,
            "local-only bytes {used} exceed the bound {limit}"
        );
        assert!(
            done <= limit + CS,
            "writer got {done} bytes past the bound {limit}"
        );
        assert!(!writer.is_finished(), "writer finished while S3 is down");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reads don't need budget.
    let mut buf = vec![0u8; CS as usize];
    v.read_at(CS, &mut buf).unwrap();
    assert_eq!(buf, chunk(1));

    s3.restart().unwrap();
    let t = Instant::now();
    wait_until(UPLOAD_TIMEOUT, Duration::from_millis(50), || writer.is_finished())
        .expect("writer finishes after the restart");
    writer.join().unwrap();
    eprintln!("writer finished {:?} after the restart", t.elapsed());
    within(&rt, UPLOAD_TIMEOUT, "flush", store.flush("d", |_| {})).unwrap();
    settle(&store);
    store.drop_read_cache();
    for i in 0..256 * MIB / CS {
        v.read_at(i * CS, &mut buf).unwrap();
        if i < TOTAL / CS {
            assert!(buf == chunk(i), "chunk {i} differs after the outage");
        } else {
            assert!(buf.iter().all(|b| *b == 0), "chunk {i} was never written");
        }
    }
    assert_refcounts_ok(&rt, &store);
}

/// A volume opened while its pending chunks are being uploaded and committed
/// must read them correctly: the uploader's commit races with the open.
#[test]
fn volume_opened_during_uploads_reads_correctly() {
    let s3 = start_s3();
    let host = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = rt
        .block_on(Store::open(config(host.path(), s3_backend(&s3, ""))))
        .unwrap();
    create(&rt, &store, "r", VOL);
    let mut m = Model::new(VOL);
    {
        let v = open(&rt, &store, "r");
        for idx in 0..VOL / CS {
            m.write(&v, idx * CS, &content(Kind::Random, idx, CS as usize));
        }
        v.checkpoint("all").unwrap();
    }
    let mut opens = 0;
    let t = Instant::now();
    while rt.block_on(store.stats()).unwrap().pending > 0 {
        assert!(t.elapsed() < UPLOAD_TIMEOUT, "uploads did not finish");
        let v = open(&rt, &store, "r");
        opens += 1;
        assert_volume_eq(&v, &m.data, &format!("open #{opens} during uploads"));
    }
    eprintln!("{opens} opens while uploading");
    settle(&store);
    let v = open(&rt, &store, "r");
    store.drop_read_cache();
    assert_volume_eq(&v, &m.data, "cold after uploads");
}
