//! SQLite databases written before the metadata schema was shared with
//! PostgreSQL (ownership in `owner_node`, no one-of-hash-or-pending CHECK,
//! no `user_version`) open with the current code, are migrated in place, and
//! read back everything they held.

mod common;

use common::{CS, MIB, runtime};
use den_store::meta::sqlite::SqliteMeta;
use den_store::meta::{ClusterMeta, Entry, MetaStore};
use den_store::{ChunkHash, VolumeOwner};

/// The schema as the previous release created it (a copy of its `SCHEMA`),
/// followed by the columns its migration added to `volumes`.
const OLD_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS volumes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    size_bytes    BIGINT NOT NULL,
    chunk_size    BIGINT NOT NULL,
    head_map      BIGINT NOT NULL,
    next_seq      BIGINT NOT NULL DEFAULT 1,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS maps (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    volume_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    volume_id     TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    map_id        BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    comment       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (volume_id, seq)
);
-- One row per written chunk slot. Exactly one of hash/pending is set.
CREATE TABLE IF NOT EXISTS map_entries (
    map_id  BIGINT NOT NULL,
    idx     BIGINT NOT NULL,
    hash    BLOB,
    pending BIGINT,
    PRIMARY KEY (map_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS map_entries_pending ON map_entries (pending) WHERE pending IS NOT NULL;
-- state: uploading | present | deleting. refs counts map_entries naming the hash.
CREATE TABLE IF NOT EXISTS chunks (
    hash          BLOB PRIMARY KEY,
    state         TEXT NOT NULL,
    refs          BIGINT NOT NULL DEFAULT 0,
    stored_len    BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_gc ON chunks (refs, state);
ALTER TABLE volumes ADD COLUMN owner_node TEXT;
ALTER TABLE volumes ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE volumes ADD COLUMN sync_map BIGINT;
ALTER TABLE volumes ADD COLUMN sync_at_ms BIGINT;
ALTER TABLE volumes ADD COLUMN sync_pending_map BIGINT;
ALTER TABLE volumes ADD COLUMN sync_pending_at_ms BIGINT;
"#;

#[test]
fn databases_with_the_old_schema_are_migrated_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    let (h1, h2) = (ChunkHash::of(b"one"), ChunkHash::of(b"two"));
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL").unwrap();
        c.execute_batch(OLD_DDL).unwrap();
        // Volume `v` (head map 1, checkpoint v1 on map 2, durable sync point
        // on map 3), owned by node n at epoch 3; volume `w` never claimed.
        c.execute_batch(&format!(
            "INSERT INTO maps (volume_id) VALUES ('v'), ('v'), ('v'), ('w');
             INSERT INTO volumes (id, name, size_bytes, chunk_size, head_map, next_seq, created_at_ms,
                                  owner_node, epoch, sync_map, sync_at_ms)
                 VALUES ('v', 'v', {MIB}, {CS}, 1, 2, 1000, 'n', 3, 3, 2000);
             INSERT INTO volumes (id, name, size_bytes, chunk_size, head_map, created_at_ms)
                 VALUES ('w', 'w', {MIB}, {CS}, 4, 1001);
             INSERT INTO checkpoints (volume_id, seq, map_id, created_at_ms, comment)
                 VALUES ('v', 1, 2, 1500, 'before');
             INSERT INTO map_entries (map_id, idx, hash, pending) VALUES
                 (1, 0, X'{h1}', NULL), (1, 1, NULL, 77),
                 (2, 0, X'{h1}', NULL), (2, 3, X'{h2}', NULL),
                 (3, 0, X'{h1}', NULL);
             INSERT INTO chunks (hash, state, refs, stored_len, updated_at_ms) VALUES
                 (X'{h1}', 'present', 3, 10, 0), (X'{h2}', 'present', 1, 20, 0);",
            h1 = hex::encode(h1.0),
            h2 = hex::encode(h2.0),
        ))
        .unwrap();
    }

    let rt = runtime();
    for round in 0..2 {
        // The second round opens the migrated file again: nothing changes.
        let m = SqliteMeta::open(&path).unwrap();
        let ctx = format!("round {round}");
        let v = rt.block_on(m.get_volume("v")).unwrap();
        assert_eq!(
            (
                v.id.as_str(),
                v.size,
                v.chunk_size as u64,
                v.head_map,
                v.created_at_ms
            ),
            ("v", MIB, CS, 1, 1000),
            "{ctx}"
        );
        let names: Vec<String> = rt
            .block_on(m.list_volumes())
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["v", "w"], "{ctx}");
        assert_eq!(
            rt.block_on(m.volume_owner("v")).unwrap(),
            VolumeOwner {
                node: Some("n".into()),
                epoch: 3
            },
            "{ctx}"
        );
        assert_eq!(
            rt.block_on(m.volume_owner("w")).unwrap(),
            VolumeOwner { node: None, epoch: 0 },
            "{ctx}"
        );
        let st = rt.block_on(m.sync_state("v")).unwrap();
        assert_eq!(
            (st.durable_map, st.durable_at_ms, st.pending_map),
            (Some(3), Some(2000), None),
            "{ctx}"
        );
        let cks = rt.block_on(m.list_checkpoints("v")).unwrap();
        assert_eq!(cks.len(), 1, "{ctx}");
        assert_eq!(
            (
                cks[0].id.as_str(),
                cks[0].map_id,
                cks[0].comment.as_str(),
                cks[0].durable
            ),
            ("v1", 2, "before", true),
            "{ctx}"
        );
        let mut head = rt.block_on(m.load_map(1)).unwrap();
        head.sort_by_key(|e| e.0);
        assert_eq!(
            head,
            vec![(0, Entry::Chunk(h1)), (1, Entry::Pending(77))],
            "{ctx}"
        );
        let mut ck = rt.block_on(m.load_map(2)).unwrap();
        ck.sort_by_key(|e| e.0);
        assert_eq!(ck, vec![(0, Entry::Chunk(h1)), (3, Entry::Chunk(h2))], "{ctx}");
        assert_eq!(rt.block_on(m.list_pending()).unwrap(), vec![77], "{ctx}");
        assert!(rt.block_on(m.verify_refcounts()).unwrap().is_empty(), "{ctx}");
        let stats = rt.block_on(m.stats()).unwrap();
        assert_eq!(
            (
                stats.volumes,
                stats.checkpoints,
                stats.chunks,
                stats.stored_bytes,
                stats.pending
            ),
            (2, 1, 2, 30, 1),
            "{ctx}"
        );
    }

    // Migrated: the shared schema's column and constraint, and the version.
    let c = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 1);
    let cols: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('volumes')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        cols.iter().any(|c| c == "owner") && !cols.iter().any(|c| c == "owner_node"),
        "{cols:?}"
    );
    assert!(
        c.execute(
            "INSERT INTO map_entries (map_id, idx, hash, pending) VALUES (1, 9, NULL, NULL)",
            []
        )
        .is_err(),
        "the CHECK is in place"
    );
    drop(c);

    // And the migrated database keeps working: claim, checkpoint, delete.
    let m = SqliteMeta::open(&path).unwrap();
    assert_eq!(rt.block_on(m.claim_volume("v", "o", 3)).unwrap(), Some(4));
    let ck = rt.block_on(m.checkpoint("v", "after", &[(1, None)])).unwrap();
    assert_eq!(ck.id, "v2");
    rt.block_on(m.delete_volume("v")).unwrap();
    assert!(rt.block_on(m.verify_refcounts()).unwrap().is_empty());
    assert_eq!(rt.block_on(m.list_pending()).unwrap(), Vec::<i64>::new());
}

#[test]
fn a_database_from_a_newer_den_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    drop(SqliteMeta::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let err = SqliteMeta::open(&path).err().expect("refused");
    assert!(err.to_string().contains("newer"), "{err}");
}
