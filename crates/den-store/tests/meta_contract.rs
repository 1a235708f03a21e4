//! The metadata contract: one set of tests that every metadata backend runs.
//!
//! Each test is a plain function over a [`Backend`] (a factory for metadata
//! handles on one fresh database), and `contract_tests!` instantiates every
//! one of them for SQLite (a file in a temp dir) and for PostgreSQL (a real
//! server of its own, see `den_testkit::postgres`). A second handle on the
//! same database stands in for a second process or node.
//!
//! What differs between the backends on purpose is not tested here:
//! PostgreSQL fences changes from a node that does not hold the volume's
//! epoch and scopes pending ids to the node that sealed them
//! (tests/postgres.rs); SQLite serves one host and does neither.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{CS, MIB, check_batched_upload_commit, runtime};
use den_store::meta::postgres::PgMeta;
use den_store::meta::sqlite::SqliteMeta;
use den_store::meta::{CommitOutcome, Entry, UploadDecision};
use den_store::{ChunkHash, Metadata, StoreError};
use den_testkit::postgres::TestPostgres;
use tokio::runtime::Runtime;

const T: Duration = Duration::from_secs(60);

/// One fresh, empty database and a way to open handles on it.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestPostgres),
}

struct Backend {
    db: Db,
    rt: Runtime,
}

impl Backend {
    fn sqlite() -> Backend {
        Backend {
            db: Db::Sqlite(tempfile::tempdir().expect("temp dir")),
            rt: runtime(),
        }
    }

    fn postgres() -> Backend {
        Backend {
            db: Db::Postgres(TestPostgres::start().expect("start PostgreSQL")),
            rt: runtime(),
        }
    }

    fn sqlite_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("meta.db")
    }

    /// A handle as node `node`: a new connection (pool) to the same database.
    fn meta(&self, node: &str) -> Arc<dyn Metadata> {
        match &self.db {
            Db::Sqlite(dir) => Arc::new(SqliteMeta::open(&Self::sqlite_path(dir)).expect("open sqlite")),
            Db::Postgres(pg) => Arc::new(
                self.rt
                    .block_on(PgMeta::connect(&pg.url(), node))
                    .unwrap_or_else(|e| panic!("connect {node}: {e}")),
            ),
        }
    }

    /// The stored reference count of a present chunk (0 if it is not
    /// present), read behind the backend's back.
    fn refs(&self, h: &ChunkHash) -> i64 {
        const SQL: &str =
            "SELECT COALESCE((SELECT refs FROM chunks WHERE hash = HASH AND state = 'present'), 0)";
        match &self.db {
            Db::Sqlite(dir) => {
                let c = rusqlite::Connection::open(Self::sqlite_path(dir)).expect("open sqlite");
                c.query_row(&SQL.replace("HASH", "?1"), [&h.0[..]], |r| r.get(0))
                    .expect("read refs")
            }
            Db::Postgres(pg) => {
                let sql = SQL.replace("HASH", &format!("'\\x{}'::bytea", hex::encode(h.0)));
                let out = pg.psql(&sql).expect("psql");
                out.parse().unwrap_or_else(|_| panic!("refs: {out:?}"))
            }
        }
    }

    fn ok<T>(&self, what: &str, f: impl Future<Output = den_store::Result<T>>) -> T {
        common::within(&self.rt, T, what, f).unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    fn err<T: std::fmt::Debug>(
        &self,
        what: &str,
        f: impl Future<Output = den_store::Result<T>>,
    ) -> StoreError {
        match common::within(&self.rt, T, what, f) {
            Ok(v) => panic!("{what}: expected an error, got {v:?}"),
            Err(e) => e,
        }
    }
}

/// Upload `h` for pending id `p` the way the uploader does.
fn upload(b: &Backend, m: &dyn Metadata, p: i64, h: &ChunkHash) {
    assert_eq!(b.ok("begin", m.begin_upload(h)), UploadDecision::MustUpload);
    b.ok("commit", m.commit_upload(p, h, 3));
}

fn sorted(mut v: Vec<(u64, Entry)>) -> Vec<(u64, Entry)> {
    v.sort_by_key(|e| e.0);
    v
}

fn volumes_are_created_listed_resized_and_deleted(b: &Backend) {
    let m = b.meta("a");
    let v = b.ok("create", m.create_volume("vol-b", MIB, CS as u32, None));
    assert_eq!((v.name.as_str(), v.size, v.chunk_size), ("vol-b", MIB, CS as u32));
    b.ok("create", m.create_volume("vol-a", 2 * MIB, CS as u32, None));
    let e = b.err("create twice", m.create_volume("vol-b", MIB, CS as u32, None));
    assert!(
        matches!(e, StoreError::VolumeExists(ref n) if n == "vol-b"),
        "{e}"
    );

    let got = b.ok("get", m.get_volume("vol-b"));
    assert_eq!((got.id.as_str(), got.head_map), (v.id.as_str(), v.head_map));
    let e = b.err("get missing", m.get_volume("nope"));
    assert!(matches!(e, StoreError::VolumeNotFound(_)), "{e}");
    let names: Vec<String> = b
        .ok("list", m.list_volumes())
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["vol-a", "vol-b"], "listed by name");

    b.ok("resize", m.resize_volume(&v.id, 3 * MIB));
    // Another handle (process, node) sees the committed change.
    assert_eq!(b.ok("get", b.meta("b").get_volume("vol-b")).size, 3 * MIB);

    b.ok("delete", m.delete_volume(&v.id));
    let e = b.err("get deleted", m.get_volume("vol-b"));
    assert!(matches!(e, StoreError::VolumeNotFound(_)), "{e}");
    let e = b.err("delete deleted", m.delete_volume(&v.id));
    assert!(matches!(e, StoreError::VolumeNotFound(_)), "{e}");
    let st = b.ok("stats", m.stats());
    assert_eq!((st.volumes, st.checkpoints), (1, 0));
}

fn seals_uploads_and_reference_counts(b: &Backend) {
    let m = b.meta("a");
    let v = b.ok("create", m.create_volume("v", MIB, CS as u32, None));
    let (h1, h2) = (ChunkHash::of(b"one"), ChunkHash::of(b"two"));
    b.ok(
        "seal",
        m.apply_seal(v.head_map, &[(0, Some(1)), (1, Some(2)), (2, Some(3))]),
    );
    assert_eq!(b.ok("pending count", m.pending_count(v.head_map)), 3);
    assert_eq!(b.ok("list pending", m.list_pending()), vec![1, 2, 3]);
    assert!(b.ok("referenced", m.pending_referenced(2)));

    upload(b, m.as_ref(), 1, &h1);
    // Same content again: already there, nothing to PUT.
    assert_eq!(
        b.ok("begin again", m.begin_upload(&h1)),
        UploadDecision::AlreadyPresent
    );
    assert_eq!(
        b.ok("commit dedup", m.commit_upload(2, &h1, 3)),
        CommitOutcome::Committed { entries_updated: 1 }
    );
    assert_eq!(b.ok("zero", m.commit_zero(3)), 1);
    assert!(!b.ok("referenced", m.pending_referenced(3)));
    assert_eq!(
        sorted(b.ok("load", m.load_map(v.head_map))),
        vec![(0, Entry::Chunk(h1)), (1, Entry::Chunk(h1))]
    );
    let ms = b.ok("map stats", m.map_stats(v.head_map));
    assert_eq!((ms.entries, ms.pending, ms.distinct_chunks), (2, 0, 1));
    assert_eq!(b.refs(&h1), 2);
    assert!(b.ok("known", m.is_known_chunk(&h1)));
    assert!(!b.ok("unknown", m.is_known_chunk(&h2)));

    // Overwriting a slot drops its reference; clearing one too.
    b.ok("seal over", m.apply_seal(v.head_map, &[(0, Some(4)), (1, None)]));
    assert_eq!(b.refs(&h1), 0);
    upload(b, m.as_ref(), 4, &h2);
    assert_eq!(
        sorted(b.ok("load", m.load_map(v.head_map))),
        vec![(0, Entry::Chunk(h2))]
    );
    assert_eq!(b.refs(&h2), 1);
    assert!(b.ok("verify", m.verify_refcounts()).is_empty());
    let st = b.ok("stats", m.stats());
    assert_eq!((st.chunks, st.stored_bytes, st.pending), (2, 6, 0));
}

fn batched_upload_commit_gives_each_item_its_own_outcome(b: &Backend) {
    let m = b.meta("a");
    b.rt.block_on(check_batched_upload_commit(m.as_ref()));
}

fn checkpoints_restore_and_fork_count_references(b: &Backend) {
    let m = b.meta("a");
    let v = b.ok("create", m.create_volume("v", MIB, CS as u32, None));
    let h = ChunkHash::of(b"data");
    b.ok("seal", m.apply_seal(v.head_map, &[(0, Some(1))]));
    // The seals passed to checkpoint land in the head first.
    let c1 = b.ok("checkpoint", m.checkpoint(&v.id, "first", &[(1, Some(2))]));
    assert_eq!((c1.id.as_str(), c1.seq, c1.comment.as_str()), ("v1", 1, "first"));
    assert!(!c1.durable, "pending slots: not durable");
    upload(b, m.as_ref(), 1, &h);
    b.ok("commit same", m.commit_upload(2, &h, 3));
    assert!(b.ok("get", m.get_checkpoint(&v.id, "v1")).durable);
    // Head and v1, two slots each.
    assert_eq!(b.refs(&h), 4);

    let c2 = b.ok("checkpoint 2", m.checkpoint(&v.id, "", &[(0, None)]));
    assert_eq!(c2.id, "v2");
    let ids: Vec<String> = b
        .ok("list", m.list_checkpoints(&v.id))
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["v2", "v1"], "newest first");
    for bad in ["v01", "v+1", "1", "v", "v3", "x1"] {
        let e = b.err(bad, m.get_checkpoint(&v.id, bad));
        assert!(matches!(e, StoreError::CheckpointNotFound { .. }), "{bad}: {e}");
    }

    // A fork of a checkpoint's map holds its own references.
    let f = b.ok("fork", m.create_volume("f", MIB, CS as u32, Some(c1.map_id)));
    assert_eq!(
        sorted(b.ok("load fork", m.load_map(f.head_map))),
        vec![(0, Entry::Chunk(h)), (1, Entry::Chunk(h))]
    );
    assert_eq!(b.refs(&h), 6);

    b.ok("restore", m.restore(&v.id, "v1"));
    assert_eq!(
        sorted(b.ok("load head", m.load_map(v.head_map))),
        vec![(0, Entry::Chunk(h)), (1, Entry::Chunk(h))]
    );
    assert_eq!(b.refs(&h), 7);
    b.ok("delete v1", m.delete_checkpoint(&v.id, "v1"));
    let e = b.err("delete v1 again", m.delete_checkpoint(&v.id, "v1"));
    assert!(matches!(e, StoreError::CheckpointNotFound { .. }), "{e}");
    let e = b.err("restore v1", m.restore(&v.id, "v1"));
    assert!(matches!(e, StoreError::CheckpointNotFound { .. }), "{e}");
    assert_eq!(b.refs(&h), 5);
    assert_eq!(b.ok("stats", m.stats()).checkpoints, 1);

    // Deleting a volume releases its head and its checkpoints.
    b.ok("delete v", m.delete_volume(&v.id));
    assert_eq!(b.refs(&h), 2);
    b.ok("delete f", m.delete_volume(&f.id));
    assert_eq!(b.refs(&h), 0);
    assert!(b.ok("verify", m.verify_refcounts()).is_empty());
    assert_eq!(b.ok("stats", m.stats()).checkpoints, 0);
}

fn gc_takes_only_unreferenced_chunks(b: &Backend) {
    let m = b.meta("a");
    let v = b.ok("create", m.create_volume("v", MIB, CS as u32, None));
    let (kept, dropped) = (ChunkHash::of(b"kept"), ChunkHash::of(b"dropped"));
    b.ok("seal", m.apply_seal(v.head_map, &[(0, Some(1)), (1, Some(2))]));
    upload(b, m.as_ref(), 1, &kept);
    upload(b, m.as_ref(), 2, &dropped);
    // A fresh `uploading` row is an upload in progress, not garbage.
    let fresh = ChunkHash::of(b"in flight");
    assert_eq!(b.ok("begin", m.begin_upload(&fresh)), UploadDecision::MustUpload);
    assert!(b.ok("gc nothing", m.gc_begin(100)).is_empty());

    b.ok("overwrite", m.apply_seal(v.head_map, &[(1, None)]));
    assert_eq!(b.ok("gc", m.gc_begin(100)), vec![dropped]);
    assert_eq!(b.ok("stored len", m.stored_len_of(&[dropped, kept])), 6);
    // Mid-GC: a new upload of it must wait, and the batch is found again
    // after a crash (by another handle of the same node).
    assert_eq!(b.ok("begin busy", m.begin_upload(&dropped)), UploadDecision::Busy);
    assert_eq!(b.ok("interrupted", b.meta("a").gc_interrupted()), vec![dropped]);
    // A commit of a chunk GC is deleting must upload again.
    b.ok("seal", m.apply_seal(v.head_map, &[(2, Some(3))]));
    assert_eq!(
        b.ok("commit deleting", m.commit_upload(3, &dropped, 3)),
        CommitOutcome::Retry
    );
    assert_eq!(b.ok("pending", m.pending_count(v.head_map)), 1);

    b.ok("finish", m.gc_finish(&[dropped]));
    assert!(!b.ok("known", m.is_known_chunk(&dropped)));
    assert!(b.ok("interrupted", m.gc_interrupted()).is_empty());
    assert_eq!(
        b.ok("commit gone", m.commit_upload(3, &dropped, 3)),
        CommitOutcome::Retry
    );
    upload(b, m.as_ref(), 3, &dropped);
    assert_eq!(b.ok("pending", m.pending_count(v.head_map)), 0);
    assert!(b.ok("gc nothing", m.gc_begin(100)).is_empty());
    assert!(b.ok("verify", m.verify_refcounts()).is_empty());
}

fn claims_are_compare_and_swap_on_the_epoch(b: &Backend) {
    let (a, other) = (b.meta("a"), b.meta("b"));
    let v = b.ok("create", a.create_volume("v", MIB, CS as u32, None));
    let o = b.ok("owner", other.volume_owner(&v.id));
    let e = o.epoch;
    assert_eq!(b.ok("claim", other.claim_volume(&v.id, "b", e)), Some(e + 1));
    assert_eq!(b.ok("stale claim", a.claim_volume(&v.id, "a", e)), None);
    assert_eq!(
        b.ok("owner", a.volume_owner(&v.id)),
        den_store::VolumeOwner {
            node: Some("b".into()),
            epoch: e + 1
        }
    );
    assert!(!b.ok("release by other node", a.release_volume(&v.id, "a", e + 1)));
    assert!(!b.ok("release stale epoch", other.release_volume(&v.id, "b", e)));
    assert!(b.ok("release", other.release_volume(&v.id, "b", e + 1)));
    // The epoch stays, so the next claim moves it on.
    assert_eq!(
        b.ok("owner", a.volume_owner(&v.id)),
        den_store::VolumeOwner {
            node: None,
            epoch: e + 1
        }
    );
    // Two claims for the same epoch at once: exactly one wins.
    let (ra, rb) = b.rt.block_on(async {
        tokio::join!(
            a.claim_volume(&v.id, "a", e + 1),
            other.claim_volume(&v.id, "b", e + 1)
        )
    });
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.is_some() != rb.is_some(), "{ra:?} {rb:?}");
    assert_eq!(ra.or(rb), Some(e + 2));

    for r in [
        b.err("owner", a.volume_owner("nope")),
        b.err("claim", a.claim_volume("nope", "a", 0)),
        b.err("release", a.release_volume("nope", "a", 0)),
        b.err("sync state", a.sync_state("nope")),
    ] {
        assert!(matches!(r, StoreError::VolumeNotFound(_)), "{r}");
    }
}

/// Sync points hold references like checkpoints, a newer one replaces the
/// pending one, promotion needs every slot uploaded, and a new owner rolls
/// the head back to the durable one.
fn sync_points_hold_references_and_roll_back(b: &Backend) {
    let (a, other) = (b.meta("a"), b.meta("b"));
    let v = b.ok("create", a.create_volume("v", MIB, CS as u32, None));
    let (h1, h2) = (ChunkHash::of(b"one"), ChunkHash::of(b"two"));
    assert_eq!(b.ok("no sync point", a.rollback_to_sync_point(&v.id)), None);
    let sp1 = b.ok("sync point", a.sync_point(&v.id, &[(0, Some(1))]));
    let st = b.ok("state", a.sync_state(&v.id));
    assert_eq!((st.pending_map, st.durable_map), (Some(sp1), None));
    assert!(st.pending_at_ms.is_some());
    // Pending slots left: not durable yet.
    let e = b.err("promote early", a.promote_sync_point(&v.id, sp1));
    assert!(matches!(e, StoreError::InvalidArgument(_)), "{e}");
    upload(b, a.as_ref(), 1, &h1);
    b.ok("promote", a.promote_sync_point(&v.id, sp1));
    let st = b.ok("state", a.sync_state(&v.id));
    assert_eq!((st.pending_map, st.durable_map), (None, Some(sp1)));
    // Head, sync point: two references.
    assert_eq!(b.refs(&h1), 2);

    // A newer sync point replaces the pending one, and promoting it drops the old durable one.
    let sp2 = b.ok("sync point 2", a.sync_point(&v.id, &[(1, Some(2))]));
    let sp3 = b.ok("sync point 3", a.sync_point(&v.id, &[]));
    assert!(
        b.ok("load", a.load_map(sp2)).is_empty(),
        "replaced sync point map is dropped"
    );
    b.ok("stale promote is a no-op", a.promote_sync_point(&v.id, sp2));
    assert_eq!(b.ok("state", a.sync_state(&v.id)).durable_map, Some(sp1));
    upload(b, a.as_ref(), 2, &h2);
    b.ok("promote 3", a.promote_sync_point(&v.id, sp3));
    assert_eq!(b.refs(&h1), 2);
    assert_eq!(b.refs(&h2), 2);
    assert!(b.ok("load", a.load_map(sp1)).is_empty());
    assert!(b.ok("verify", a.verify_refcounts()).is_empty());

    // The owner dies after more writes; the next owner rolls back.
    b.ok(
        "seal",
        a.apply_seal(v.head_map, &[(0, Some(3)), (1, None), (5, Some(4))]),
    );
    assert_eq!(b.refs(&h1), 1);
    // GC must not take what only the sync point references.
    assert!(b.ok("gc", other.gc_begin(100)).is_empty());
    let epoch = b.ok("owner", other.volume_owner(&v.id)).epoch;
    assert_eq!(
        b.ok("claim", other.claim_volume(&v.id, "b", epoch)),
        Some(epoch + 1)
    );
    let at = b.ok("rollback", other.rollback_to_sync_point(&v.id));
    assert_eq!(at, b.ok("state", other.sync_state(&v.id)).durable_at_ms);
    assert!(at.is_some());
    assert_eq!(
        sorted(b.ok("head", other.load_map(v.head_map))),
        vec![(0, Entry::Chunk(h1)), (1, Entry::Chunk(h2))]
    );
    assert!(b.ok("verify", other.verify_refcounts()).is_empty());
    b.ok("delete", other.delete_volume(&v.id));
    assert_eq!(b.refs(&h1), 0);
    assert!(b.ok("verify", other.verify_refcounts()).is_empty());
    assert_eq!(b.ok("gc", other.gc_begin(100)).len(), 2);
}

/// The schema itself: one slot never names both a chunk and a pending id,
/// or neither, whichever backend wrote it.
fn a_slot_holds_exactly_one_of_hash_or_pending(b: &Backend) {
    let m = b.meta("a");
    let v = b.ok("create", m.create_volume("v", MIB, CS as u32, None));
    b.ok("seal", m.apply_seal(v.head_map, &[(0, Some(1))]));
    let map = v.head_map;
    let blob = match &b.db {
        Db::Sqlite(_) => "X'78'",
        Db::Postgres(_) => "'\\x78'::bytea",
    };
    let bad = [
        format!("INSERT INTO map_entries (map_id, idx, hash, pending) VALUES ({map}, 1, NULL, NULL)"),
        format!("UPDATE map_entries SET pending = NULL WHERE map_id = {map} AND idx = 0"),
        format!("UPDATE map_entries SET hash = {blob} WHERE map_id = {map} AND idx = 0"),
    ];
    for sql in &bad {
        let refused = match &b.db {
            Db::Sqlite(dir) => {
                let c = rusqlite::Connection::open(Backend::sqlite_path(dir)).unwrap();
                c.execute(sql, []).is_err()
            }
            Db::Postgres(pg) => pg.psql(sql).is_err(),
        };
        assert!(refused, "the schema accepted {sql}");
    }
    assert_eq!(b.ok("load", m.load_map(map)), vec![(0, Entry::Pending(1))]);
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Backend::sqlite()); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Backend::postgres()); })*
        }
    };
}

contract_tests!(
    volumes_are_created_listed_resized_and_deleted,
    seals_uploads_and_reference_counts,
    batched_upload_commit_gives_each_item_its_own_outcome,
    checkpoints_restore_and_fork_count_references,
    gc_takes_only_unreferenced_chunks,
    claims_are_compare_and_swap_on_the_epoch,
    sync_points_hold_references_and_roll_back,
    a_slot_holds_exactly_one_of_hash_or_pending,
);
