//! The store under hostile conditions: races with GC, failing syncs, other
//! local users, a full disk, an object-store outage with one flooding volume,
//! and space that must come back after deletes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use den_store::meta::sqlite::SqliteMeta;
use den_store::meta::{
    CheckpointRecord, ClusterMeta, CommitOutcome, Entry, MapId, MapStats, MetaStore, PendingId, StoreStats,
    SyncState, UploadDecision, VolumeOwner, VolumeRecord,
};
use den_store::{ChunkHash, CreateOptions, ObjectBackend, Result, Store, StoreConfig, Volume};

const CS: u64 = 64 << 10;
const TIMEOUT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn block<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = Result<T>>) -> T {
    rt.block_on(async { tokio::time::timeout(TIMEOUT, f).await })
        .expect("store call timed out")
        .expect("store call failed")
}

fn local_config(root: &Path) -> StoreConfig {
    let mut c = StoreConfig::local(root.join("data"));
    c.objects = ObjectBackend::Local {
        dir: root.join("objects"),
    };
    c.dirty_limit = 64 << 20;
    c.writeback_delay = Duration::from_millis(50);
    c.fetch_timeout = Duration::from_secs(5);
    c
}

fn create(rt: &tokio::runtime::Runtime, store: &Store, name: &str, size: u64) -> Volume {
    block(
        rt,
        store.create_volume(
            name,
            CreateOptions {
                size: Some(size),
                chunk_size: Some(CS as u32),
                source: None,
            },
        ),
    );
    block(rt, store.open_volume(name))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

// ---- GC racing an upload -------------------------------------------------

/// The real SQLite metadata, with one interleaving forced: right before the
/// first upload commit, GC reclaims the chunk row and its object (as it does
/// for an `uploading` row it believes abandoned) and the pending file is
/// removed, so the commit answers `Retry` and the uploader must PUT again
/// without its pending file.
struct GcBeforeCommit {
    inner: SqliteMeta,
    db: PathBuf,
    pending_dir: PathBuf,
    objects: PathBuf,
    fired: AtomicBool,
}

impl GcBeforeCommit {
    fn race(&self, pending: PendingId, hash: &ChunkHash) {
        std::fs::remove_file(self.pending_dir.join(format!("{pending:016x}"))).unwrap();
        let db = rusqlite::Connection::open(&self.db).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let n = db
            .execute("DELETE FROM chunks WHERE hash = ?1 AND refs = 0", [&hash.0[..]])
            .unwrap();
        assert_eq!(n, 1, "the announced chunk row is there to reclaim");
        let key = hash.object_key("");
        std::fs::remove_file(self.objects.join(&key)).unwrap();
    }
}

#[async_trait]
impl MetaStore for GcBeforeCommit {
    async fn create_volume(
        &self,
        name: &str,
        size: u64,
        cs: u32,
        source: Option<MapId>,
    ) -> Result<VolumeRecord> {
        self.inner.create_volume(name, size, cs, source).await
    }
    async fn get_volume(&self, name: &str) -> Result<VolumeRecord> {
        self.inner.get_volume(name).await
    }
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.inner.list_volumes().await
    }
    async fn delete_volume(&self, id: &str) -> Result<()> {
        self.inner.delete_volume(id).await
    }
    async fn resize_volume(&self, id: &str, size: u64) -> Result<()> {
        self.inner.resize_volume(id, size).await
    }
    async fn load_map(&self, map: MapId) -> Result<Vec<(u64, Entry)>> {
        self.inner.load_map(map).await
    }
    async fn map_stats(&self, map: MapId) -> Result<MapStats> {
        self.inner.map_stats(map).await
    }
    async fn pending_count(&self, map: MapId) -> Result<u64> {
        self.inner.pending_count(map).await
    }
    async fn apply_seal(&self, head: MapId, seals: &[(u64, Option<PendingId>)]) -> Result<()> {
        self.inner.apply_seal(head, seals).await
    }
    async fn checkpoint(
        &self,
        id: &str,
        comment: &str,
        seals: &[(u64, Option<PendingId>)],
    ) -> Result<CheckpointRecord> {
        self.inner.checkpoint(id, comment, seals).await
    }
    async fn list_checkpoints(&self, id: &str) -> Result<Vec<CheckpointRecord>> {
        self.inner.list_checkpoints(id).await
    }
    async fn get_checkpoint(&self, vid: &str, id: &str) -> Result<CheckpointRecord> {
        self.inner.get_checkpoint(vid, id).await
    }
    async fn delete_checkpoint(&self, vid: &str, id: &str) -> Result<()> {
        self.inner.delete_checkpoint(vid, id).await
    }
    async fn restore(&self, vid: &str, id: &str) -> Result<()> {
        self.inner.restore(vid, id).await
    }
    async fn list_pending(&self) -> Result<Vec<PendingId>> {
        self.inner.list_pending().await
    }
    async fn pending_referenced(&self, p: PendingId) -> Result<bool> {
        self.inner.pending_referenced(p).await
    }
    async fn begin_upload(&self, hash: &ChunkHash) -> Result<UploadDecision> {
        self.inner.begin_upload(hash).await
    }
    async fn commit_upload(&self, p: PendingId, hash: &ChunkHash, stored_len: u64) -> Result<CommitOutcome> {
        if !self.fired.swap(true, Ordering::SeqCst) {
            self.race(p, hash);
        }
        self.inner.commit_upload(p, hash, stored_len).await
    }
    async fn commit_zero(&self, p: PendingId) -> Result<u64> {
        self.inner.commit_zero(p).await
    }
    async fn gc_begin(&self, limit: usize) -> Result<Vec<ChunkHash>> {
        self.inner.gc_begin(limit).await
    }
    async fn gc_finish(&self, hashes: &[ChunkHash]) -> Result<()> {
        self.inner.gc_finish(hashes).await
    }
    async fn gc_interrupted(&self) -> Result<Vec<ChunkHash>> {
        self.inner.gc_interrupted().await
    }
    async fn is_known_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        self.inner.is_known_chunk(hash).await
    }
    async fn stored_len_of(&self, hashes: &[ChunkHash]) -> Result<u64> {
        self.inner.stored_len_of(hashes).await
    }
    async fn stats(&self) -> Result<StoreStats> {
        self.inner.stats().await
    }
    async fn verify_refcounts(&self) -> Result<Vec<(ChunkHash, i64, i64)>> {
        self.inner.verify_refcounts().await
    }
}

#[async_trait]
impl ClusterMeta for GcBeforeCommit {
    async fn volume_owner(&self, id: &str) -> Result<VolumeOwner> {
        self.inner.volume_owner(id).await
    }
    async fn claim_volume(&self, id: &str, node: &str, seen: i64) -> Result<Option<i64>> {
        self.inner.claim_volume(id, node, seen).await
    }
    async fn release_volume(&self, id: &str, node: &str, epoch: i64) -> Result<bool> {
        self.inner.release_volume(id, node, epoch).await
    }
    async fn sync_point(&self, id: &str, seals: &[(u64, Option<PendingId>)]) -> Result<MapId> {
        self.inner.sync_point(id, seals).await
    }
    async fn promote_sync_point(&self, id: &str, map: MapId) -> Result<()> {
        self.inner.promote_sync_point(id, map).await
    }
    async fn rollback_to_sync_point(&self, id: &str) -> Result<Option<i64>> {
        self.inner.rollback_to_sync_point(id).await
    }
    async fn sync_state(&self, id: &str) -> Result<SyncState> {
        self.inner.sync_state(id).await
    }
}

/// An upload whose chunk row GC reclaimed between announce and commit is
/// PUT again from the bytes it hashed, never from a re-read of its pending
/// file: that file may be gone, and an empty object under the real hash,
/// marked present, would turn every later cold read of the chunk into EIO.
#[test]
fn upload_retried_after_gc_race_never_stores_an_empty_object() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = local_config(dir.path());
    std::fs::create_dir_all(&cfg.data_dir).unwrap();
    let db = cfg.data_dir.join("meta.db");
    let meta = Arc::new(GcBeforeCommit {
        inner: SqliteMeta::open(&db).unwrap(),
        db,
        pending_dir: cfg.data_dir.join("cache/pending"),
        objects: dir.path().join("objects"),
        fired: AtomicBool::new(false),
    });
    let rt = runtime();
    let store = block(&rt, Store::open_with_meta(cfg, meta.clone()));
    let v = create(&rt, &store, "v", 4 * CS);
    let data = pattern(7, CS as usize);
    v.write_at(0, &data).unwrap();
    block(&rt, store.flush("v", |_| {}));
    assert!(
        meta.fired.load(Ordering::SeqCst),
        "the upload went through the forced race"
    );
    assert!(rt.block_on(store.meta().verify_refcounts()).unwrap().is_empty());

    // Cold read: the only copy left is the object the retry stored.
    store.drop_read_cache();
    let mut got = vec![0u8; CS as usize];
    v.read_at(0, &mut got)
        .expect("the chunk reads back from the object store after the retried upload");
    assert!(
        got == data,
        "the retried upload stored other bytes than the chunk's"
    );
}

// ---- file modes ------------------------------------------------------------

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Other host users can read neither the metadata (which names every
/// sprite's chunks) nor the chunk data: `meta.db` and its WAL files are
/// 0600, including those an older den left world-readable, and the cache
/// and local object directories are 0700.
#[test]
fn metadata_and_chunk_files_are_private_to_den() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = local_config(dir.path());
    let rt = runtime();

    // A fresh store, under the usual 022 umask.
    let store = block(&rt, Store::open(cfg.clone()));
    let v = create(&rt, &store, "v", 4 * CS);
    v.write_at(0, &pattern(1, CS as usize)).unwrap();
    block(&rt, store.flush("v", |_| {}));
    let db = cfg.data_dir.join("meta.db");
    for f in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        assert_eq!(mode(&cfg.data_dir.join(f)), 0o600, "{f} of a new store");
    }
    assert_eq!(mode(&cfg.data_dir.join("cache")), 0o700, "cache dir");
    assert_eq!(mode(&dir.path().join("objects")), 0o700, "local object dir");
    drop(v);
    drop(store);
    drop(rt);

    // Files an older den created world-readable are narrowed at open.
    for f in ["meta.db", "meta.db-wal", "meta.db-shm"] {
        let p = cfg.data_dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::set_permissions(cfg.data_dir.join("cache"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = runtime();
    let store = block(&rt, Store::open(cfg.clone()));
    assert_eq!(mode(&db), 0o600, "meta.db left 0644 by an older den");
    for f in ["meta.db-wal", "meta.db-shm"] {
        let p = cfg.data_dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f} left 0644 by an older den");
        }
    }
    assert_eq!(mode(&cfg.data_dir.join("cache")), 0o700, "cache dir left 0755");
    drop(store);
}

// ---- space comes back -------------------------------------------------------

/// Files (chunk objects or read-cache entries) and their bytes under `dir`.
fn usage(dir: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += md.len();
            }
        }
    }
    (files, bytes)
}

/// Without anyone running `den volume gc`, the store's background GC gives
/// the space back: of data the guest discarded (`rm` with `discard`), and
/// of a deleted volume, objects and read-cache copies alike.
#[test]
fn background_gc_frees_discarded_and_deleted_chunks_without_manual_gc() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = local_config(dir.path());
    cfg.gc_interval = Some(Duration::from_millis(200));
    let objects = dir.path().join("objects");
    let clean = cfg.data_dir.join("cache/clean");
    let rt = runtime();
    let store = block(&rt, Store::open(cfg));
    store.start_background_gc();

    // 32 MiB of distinct chunks in two volumes, all uploaded.
    let a = create(&rt, &store, "a", 256 * CS);
    let b = create(&rt, &store, "b", 256 * CS);
    for i in 0..256u64 {
        let v = if i < 128 { &a } else { &b };
        v.write_at((i % 128) * CS, &pattern(i as u8 ^ 0x5a, CS as usize))
            .unwrap();
        v.write_at((i % 128) * CS, &(i as u32).to_le_bytes()).unwrap();
    }
    block(&rt, store.flush("a", |_| {}));
    block(&rt, store.flush("b", |_| {}));
    let (n0, bytes0) = usage(&objects);
    assert_eq!(n0, 256, "every chunk is an object");
    eprintln!(
        "stored: {n0} objects, {bytes0} bytes; read cache {:?}",
        usage(&clean)
    );

    // The guest discards half of `a` (what ext4 `discard` sends after an rm).
    a.discard(0, 64 * CS).unwrap();
    let freed = |want: u64| {
        den_testkit::wait_until(TIMEOUT, Duration::from_millis(50), || usage(&objects).0 == want).is_ok()
    };
    let t = std::time::Instant::now();
    assert!(
        freed(192),
        "discarded chunks were not freed: {} objects left",
        usage(&objects).0
    );
    eprintln!("discarded 64 chunks freed after {:?}", t.elapsed());

    // Deleting volume `b` frees all of its chunks, in the read cache too.
    drop(b);
    block(&rt, store.delete_volume("b"));
    let t = std::time::Instant::now();
    assert!(
        freed(64),
        "the deleted volume's chunks were not freed: {} objects left",
        usage(&objects).0
    );
    eprintln!("deleted volume's 128 chunks freed after {:?}", t.elapsed());
    let (_, bytes1) = usage(&objects);
    assert!(bytes1 * 3 < bytes0, "{bytes1} of {bytes0} object bytes remain");
    assert!(
        usage(&clean).0 <= 64,
        "read-cache copies of freed chunks remain: {:?}",
        usage(&clean)
    );
    // A run counts what it freed when it ends, which may be just after the
    // last object went.
    let _ = den_testkit::wait_until(TIMEOUT, Duration::from_millis(20), || {
        store.gc_stats().chunks_freed >= 192
    });
    let stats = store.gc_stats();
    assert_eq!(stats.chunks_freed, 192, "{stats:?}");
    assert!(stats.bytes_freed >= bytes0 - bytes1, "{stats:?}");
    assert!(stats.runs >= 2 && stats.failed_runs == 0, "{stats:?}");
    assert!(rt.block_on(store.meta().verify_refcounts()).unwrap().is_empty());

    // What is left reads back intact.
    store.drop_read_cache();
    let mut got = vec![0u8; CS as usize];
    for i in 64..128u64 {
        a.read_at(i * CS, &mut got).unwrap();
        let mut want = pattern(i as u8 ^ 0x5a, CS as usize);
        want[..4].copy_from_slice(&(i as u32).to_le_bytes());
        assert!(got == want, "chunk {i} of a");
    }
}

// ---- a full data disk --------------------------------------------------------

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_mount_point(p: &Path) -> bool {
    let want = p.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want))
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mount_point(&self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

/// ext4's own verdict on a mounted filesystem: errors it recorded (a
/// journal abort records one) and whether it is still mounted read-write.
fn ext4_health(dev: &Path, mnt: &Path) -> (u64, bool) {
    let name = dev.file_name().unwrap().to_str().unwrap();
    let errors = std::fs::read_to_string(format!("/sys/fs/ext4/{name}/errors_count"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0);
    let want = mnt.to_str().unwrap();
    let rw = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(want))
        .is_some_and(|l| l.split(' ').nth(3).unwrap().split(',').any(|o| o == "rw"));
    (errors, rw)
}

/// Incompressible bytes for block `n` of the writer's file.
fn noise(n: u64, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

const MIB: u64 = 1 << 20;
/// The writer's file: more than the data disk has room for.
const FLOOD: u64 = 128 * MIB;

/// A data disk that fills up never reaches a guest as a write error. Here
/// the data dir sits on a 256 MiB ext4 with 128 MiB of ballast; one guest
/// writes 160 MiB of incompressible data. The store evicts its read cache,
/// then blocks the writer (and says so), instead of failing the block
/// device; the other guest's filesystem is not aborted; once the ballast is
/// deleted the writer completes, both filesystems check clean and every
/// byte reads back. In local-object mode no chunk is kept twice.
#[test]
fn full_data_disk_blocks_writers_and_aborts_no_guest_filesystem() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("data.img");
    let datafs = tmp.path().join("datafs");
    std::fs::create_dir(&datafs).unwrap();
    std::fs::File::create(&img).unwrap().set_len(256 * MIB).unwrap();
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    run(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), datafs.to_str().unwrap()],
    );
    let _datafs = Mounted(datafs.clone());
    let ballast = datafs.join("ballast");
    {
        let mut f = std::fs::File::create(&ballast).unwrap();
        let block = vec![0xa5u8; MIB as usize];
        for _ in 0..128 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }

    let mut cfg = local_config(&datafs);
    cfg.min_free_bytes = Some(24 * MIB);
    // As in a server: chunks rewritten (the guests' journals) leave garbage
    // that GC frees, and write-back waits for writes to settle.
    cfg.gc_interval = Some(Duration::from_millis(500));
    cfg.writeback_delay = Duration::from_millis(500);
    let rt = runtime();
    let store = block(&rt, Store::open(cfg.clone()));
    store.start_background_gc();
    let mut guests = Vec::new();
    for (name, size) in [("writer", 512 * MIB), ("bystander", 128 * MIB)] {
        block(
            &rt,
            store.create_volume(
                name,
                CreateOptions {
                    size: Some(size),
                    chunk_size: Some(256 << 10),
                    source: None,
                },
            ),
        );
        let vol = block(&rt, store.open_volume(name));
        let export = den_block::FuseLoopFrontend::export(
            Arc::new(den_block::VolumeDevice(vol)),
            &tmp.path().join(format!("fuse-{name}")),
            &den_block::ExportOptions::default(),
        )
        .expect("export the volume through FUSE + loop");
        let dev = export.device_path().to_path_buf();
        let mnt = tmp.path().join(name);
        std::fs::create_dir(&mnt).unwrap();
        run("mkfs.ext4", &["-q", "-E", "nodiscard", dev.to_str().unwrap()]);
        run(
            "mount",
            &["-t", "ext4", dev.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        let mounted = Mounted(mnt.clone());
        guests.push((export, dev, mnt, mounted));
    }
    let (w_dev, w_mnt) = (guests[0].1.clone(), guests[0].2.clone());
    let (b_dev, b_mnt) = (guests[1].1.clone(), guests[1].2.clone());
    let keep = pattern(3, 4 * MIB as usize);
    std::fs::write(b_mnt.join("keep"), &keep).unwrap();
    run("sync", &["-f", b_mnt.to_str().unwrap()]);

    // The flood: 1 MiB writes, then fsync.
    let t0 = std::time::Instant::now();
    let path = w_mnt.join("flood");
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let f = std::fs::File::create(&path)?;
        for n in 0..FLOOD / MIB {
            f.write_all_at(&noise(n, MIB as usize), n * MIB)?;
        }
        f.sync_all()
    });
    den_testkit::wait_until(Duration::from_secs(90), Duration::from_millis(50), || {
        store.space_stats().writers_blocked || writer.is_finished()
    })
    .unwrap_or_else(|_| panic!("the disk never filled: {:?}", store.space_stats()));
    assert!(
        !writer.is_finished(),
        "the writer finished on a full disk: {:?}",
        writer.join()
    );
    let full = store.space_stats();
    eprintln!("writers blocked after {:?}: {full:?}", t0.elapsed());
    // The status says whose writes hang: the writer's, not the idle bystander's.
    assert!(
        store.volume_blocked_on_disk("writer") && !store.volume_blocked_on_disk("bystander"),
        "per-volume disk status while the writer waits: writer {}, bystander {}",
        store.volume_blocked_on_disk("writer"),
        store.volume_blocked_on_disk("bystander")
    );
    assert!(
        full.free_bytes >= 16 * MIB,
        "the reserve was eaten into: {full:?}"
    );
    // While the writer is blocked, nothing has failed anywhere.
    for (dev, mnt) in [(&w_dev, &w_mnt), (&b_dev, &b_mnt)] {
        assert_eq!(
            ext4_health(dev, mnt),
            (0, true),
            "{} while the disk is full",
            mnt.display()
        );
    }
    assert!(std::fs::read(b_mnt.join("keep")).unwrap() == keep);

    // Space comes back: the writer completes.
    std::fs::remove_file(&ballast).unwrap();
    let t = std::time::Instant::now();
    den_testkit::wait_until(Duration::from_secs(90), Duration::from_millis(50), || {
        writer.is_finished()
    })
    .expect("the writer did not complete after space came back");
    writer
        .join()
        .unwrap()
        .expect("the writer's writes and fsync succeeded");
    eprintln!("writer completed {:?} after space came back", t.elapsed());
    let after = store.space_stats();
    assert!(!after.writers_blocked && after.blocked_waits >= 1, "{after:?}");
    assert!(
        !store.volume_blocked_on_disk("writer"),
        "the writer's disk status stayed full after space came back"
    );

    for (dev, mnt) in [(&w_dev, &w_mnt), (&b_dev, &b_mnt)] {
        assert_eq!(
            ext4_health(dev, mnt),
            (0, true),
            "{} after the disk was full",
            mnt.display()
        );
        run("umount", &[mnt.to_str().unwrap()]);
        run("e2fsck", &["-fn", dev.to_str().unwrap()]);
        run(
            "mount",
            &["-t", "ext4", dev.to_str().unwrap(), mnt.to_str().unwrap()],
        );
    }
    {
        let f = std::fs::File::open(w_mnt.join("flood")).unwrap();
        let mut got = vec![0u8; MIB as usize];
        for n in 0..FLOOD / MIB {
            f.read_exact_at(&mut got, n * MIB).unwrap();
            assert!(got == noise(n, MIB as usize), "flood block {n} differs");
        }
    }
    assert!(std::fs::read(b_mnt.join("keep")).unwrap() == keep);

    // Uploaded chunks exist once: as their local object, not also in the read cache.
    block(&rt, store.flush("writer", |_| {}));
    let clean = cfg.data_dir.join("cache/clean");
    assert_eq!(usage(&clean).0, 0, "read-cache copies next to local objects");

    for (export, _, mnt, mounted) in guests {
        run("umount", &[mnt.to_str().unwrap()]);
        drop(mounted);
        export.shutdown().unwrap();
    }
}

// ---- an object-store outage with one flooding volume -------------------------

/// During an object-store outage one volume floods until it blocks on the
/// local-only budget. Another volume's 64 KiB write + fsync still completes
/// at once (it has a reserve the flood cannot take), and a checkpoint of
/// the flooding volume works while its writer is blocked. When the store
/// comes back, the flood completes and everything reads back.
#[test]
fn outage_flood_in_one_volume_leaves_room_for_anothers_small_fsync() {
    use std::sync::atomic::AtomicU64;
    let mut s3 = den_testkit::SeaweedS3::start().expect("start SeaweedFS");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = local_config(dir.path());
    cfg.objects = ObjectBackend::S3 {
        endpoint: s3.endpoint(),
        bucket: s3.bucket().to_string(),
        access_key: s3.access_key().to_string(),
        secret_key: s3.secret_key().to_string(),
        region: s3.region().to_string(),
        prefix: "den/fair".into(),
    };
    cfg.dirty_limit = 64 * MIB;
    cfg.gc_interval = None;
    let rt = runtime();
    let store = block(&rt, Store::open(cfg.clone()));
    let flood = create(&rt, &store, "flood", 4096 * CS);
    let small = create(&rt, &store, "small", 64 * CS);

    s3.stop().unwrap();
    // Twice the whole budget: the flood must block.
    let chunks = 2 * cfg.dirty_limit / CS;
    let written = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (flood, written) = (flood.clone(), written.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            for i in 0..chunks {
                flood.write_at(i * CS, &pattern(i as u8, CS as usize))?;
                written.store(i + 1, Ordering::SeqCst);
            }
            flood.fsync()
        })
    };
    // Blocked: the flood has made no progress for half a second, with at
    // least half the budget used (write-back seals, nothing uploads).
    let (mut last, mut since) = (u64::MAX, std::time::Instant::now());
    den_testkit::wait_until(TIMEOUT, Duration::from_millis(10), || {
        let w = written.load(Ordering::SeqCst);
        if w != last {
            (last, since) = (w, std::time::Instant::now());
        }
        since.elapsed() > Duration::from_millis(500) && store.local_only_bytes() > cfg.dirty_limit / 2
    })
    .unwrap_or_else(|_| panic!("the flood never blocked: {} bytes", store.local_only_bytes()));
    assert!(
        !flooder.is_finished(),
        "the flood finished with the object store down"
    );
    eprintln!(
        "flood blocked after {} chunks, {} local-only bytes",
        written.load(Ordering::SeqCst),
        store.local_only_bytes()
    );

    // The bystander's small write + fsync, timed from outside.
    let t = std::time::Instant::now();
    let bystander = {
        let small = small.clone();
        std::thread::spawn(move || {
            small.write_at(5 * CS + 100, &pattern(9, 64 << 10))?;
            small.fsync()
        })
    };
    let done = den_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(1), || {
        bystander.is_finished()
    });
    let took = t.elapsed();
    eprintln!("bystander's 64 KiB write + fsync during the flood: {took:?}");
    if done.is_err() {
        // Let it finish so the test ends, then fail.
        s3.restart().unwrap();
        panic!("the bystander's 64 KiB write + fsync was still blocked after {took:?}");
    }
    bystander.join().unwrap().unwrap();
    assert!(
        took < Duration::from_secs(1),
        "64 KiB write + fsync took {took:?}"
    );

    // A checkpoint of the flooding volume needs none of the budget its
    // blocked writer waits for.
    let before = written.load(Ordering::SeqCst);
    let t = std::time::Instant::now();
    let ck = {
        let flood = flood.clone();
        std::thread::spawn(move || flood.checkpoint("during the flood"))
    };
    den_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(1), || {
        ck.is_finished()
    })
    .expect("checkpoint of the blocked volume did not finish");
    let ck = ck
        .join()
        .unwrap()
        .expect("checkpoint while the writer is blocked");
    eprintln!("checkpoint {} with the writer blocked: {:?}", ck.id, t.elapsed());
    assert!(!ck.durable);
    assert!(!flooder.is_finished() && written.load(Ordering::SeqCst) >= before);

    // The object store comes back: the flood completes, nothing is lost.
    s3.restart().unwrap();
    den_testkit::wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
        flooder.is_finished()
    })
    .expect("the flood did not complete after the object store came back");
    flooder.join().unwrap().unwrap();
    block(&rt, store.flush("flood", |_| {}));
    block(&rt, store.flush("small", |_| {}));
    store.drop_read_cache();
    let mut got = vec![0u8; CS as usize];
    for i in (0..chunks).step_by(17) {
        flood.read_at(i * CS, &mut got).unwrap();
        assert!(got == pattern(i as u8, CS as usize), "flood chunk {i}");
    }
    let mut got = vec![0u8; 64 << 10];
    small.read_at(5 * CS + 100, &mut got).unwrap();
    assert!(got == pattern(9, 64 << 10), "the bystander's write");
}
