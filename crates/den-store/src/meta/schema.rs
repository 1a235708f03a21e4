//! What both metadata backends share verbatim: the tables, written once with
//! the few type words the engines spell differently, and the small rules
//! every backend applies the same way.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// The tables and indexes of the metadata contract. `{BLOB}`, `{SERIAL_KEY}`
/// and `{WITHOUT_ROWID}` are filled in per engine by [`tables`], and
/// `{CHUNKS_EXTRA}` with what only a cluster needs (PostgreSQL's
/// `chunks.gc_node`). A backend may add tables of its own, never change these.
const TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS volumes (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    size_bytes         BIGINT NOT NULL,
    chunk_size         BIGINT NOT NULL,
    head_map           BIGINT NOT NULL UNIQUE,
    next_seq           BIGINT NOT NULL DEFAULT 1,
    created_at_ms      BIGINT NOT NULL,
    owner              TEXT,
    epoch              BIGINT NOT NULL DEFAULT 0,
    sync_map           BIGINT,
    sync_at_ms         BIGINT,
    sync_pending_map   BIGINT,
    sync_pending_at_ms BIGINT
);
CREATE TABLE IF NOT EXISTS maps (
    id        {SERIAL_KEY},
    volume_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS maps_volume ON maps (volume_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    volume_id     TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    map_id        BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    comment       TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (volume_id, seq)
);
{MAP_ENTRIES}
CREATE INDEX IF NOT EXISTS map_entries_pending ON map_entries (pending) WHERE pending IS NOT NULL;
-- state: uploading | present | deleting. refs counts map_entries naming the hash.
CREATE TABLE IF NOT EXISTS chunks (
    hash          {BLOB} PRIMARY KEY,
    state         TEXT NOT NULL,
    refs          BIGINT NOT NULL DEFAULT 0,
    stored_len    BIGINT NOT NULL DEFAULT 0,
    updated_at_ms BIGINT NOT NULL{CHUNKS_EXTRA}
);
CREATE INDEX IF NOT EXISTS chunks_gc ON chunks (refs, state);
"#;

/// Kept apart because SQLite rebuilds this one table under another name when
/// it migrates (it cannot add the CHECK to an existing table).
const MAP_ENTRIES: &str = r#"-- One row per written chunk slot. Exactly one of hash/pending is set.
CREATE TABLE IF NOT EXISTS {NAME} (
    map_id  BIGINT NOT NULL,
    idx     BIGINT NOT NULL,
    hash    {BLOB},
    pending BIGINT,
    PRIMARY KEY (map_id, idx),
    CHECK ((hash IS NULL) <> (pending IS NULL))
){WITHOUT_ROWID};"#;

fn fill(d: Dialect, sql: &str) -> String {
    let (blob, serial_key, without_rowid, chunks_extra) = match d {
        // The slots are looked up by (map_id, idx) only: no rowid to keep.
        Dialect::Sqlite => ("BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", " WITHOUT ROWID", ""),
        Dialect::Postgres => (
            "BYTEA",
            "BIGSERIAL PRIMARY KEY",
            "",
            ",\n    -- The node whose GC moved the row to `deleting` (see gc_interrupted).\n    gc_node       TEXT",
        ),
    };
    sql.replace("{BLOB}", blob)
        .replace("{SERIAL_KEY}", serial_key)
        .replace("{WITHOUT_ROWID}", without_rowid)
        .replace("{CHUNKS_EXTRA}", chunks_extra)
}

/// `CREATE … IF NOT EXISTS` for every shared table and index.
pub(crate) fn tables(d: Dialect) -> String {
    fill(
        d,
        &TABLES.replace("{MAP_ENTRIES}", &map_entries(d, "map_entries")),
    )
}

/// The `map_entries` table, created as `name`.
pub(crate) fn map_entries(d: Dialect, name: &str) -> String {
    fill(d, &MAP_ENTRIES.replace("{NAME}", name))
}

/// An `uploading` row older than this with no references is a leftover of a
/// crashed uploader, and GC may reclaim it.
pub(crate) const STALE_UPLOAD_MS: i64 = 3_600_000;

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `v<seq>` exactly as checkpoints are printed: "v01" or "v+1" must not name
/// checkpoint v1.
pub(crate) fn parse_seq(volume: &str, id: &str) -> Result<i64> {
    id.strip_prefix('v')
        .filter(|n| !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<i64>().ok())
        .ok_or_else(|| StoreError::CheckpointNotFound {
            volume: volume.to_string(),
            checkpoint: id.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_type_words_differ_between_dialects() {
        let (s, p) = (tables(Dialect::Sqlite), tables(Dialect::Postgres));
        assert!(
            !s.contains('{') && !p.contains('{'),
            "a placeholder left unfilled"
        );
        let norm = |t: &str| {
            t.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "KEY")
                .replace("BIGSERIAL PRIMARY KEY", "KEY")
                .replace("BYTEA", "BLOB")
                .replace(" WITHOUT ROWID", "")
        };
        let p = p.replace(
            ",\n    -- The node whose GC moved the row to `deleting` (see gc_interrupted).\n    gc_node       TEXT",
            "",
        );
        assert_eq!(norm(&s), norm(&p));
        assert!(p.contains("CHECK ((hash IS NULL) <> (pending IS NULL))"));
    }

    #[test]
    fn checkpoint_ids_parse_only_in_their_printed_form() {
        assert_eq!(parse_seq("v", "v12").unwrap(), 12);
        for bad in ["v01", "v+1", "v", "1", "v1x", "v99999999999999999999"] {
            assert!(parse_seq("v", bad).is_err(), "{bad}");
        }
    }
}
