//! The single-host metadata backend: one SQLite file in WAL mode.
//!
//! rusqlite is synchronous, so every call runs on the blocking pool behind a
//! mutex. That is fine: metadata is touched on checkpoints, seals and upload
//! commits, never on the read/write data path.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::schema::{self, Dialect, STALE_UPLOAD_MS, now_ms, parse_seq};
use super::*;
use crate::error::StoreError;

/// The schema this code writes (`PRAGMA user_version`). Version 0 is every
/// database from before the metadata contract was shared with PostgreSQL:
/// ownership in `owner_node`, cluster columns added one by one, and no CHECK
/// that a slot holds exactly one of hash/pending. [`migrate`] brings those up.
const SCHEMA_VERSION: i64 = 1;

pub struct SqliteMeta {
    conn: Arc<Mutex<Connection>>,
}

/// Make an SQLite database readable by its owner only, before opening it.
///
/// den's databases hold what other host users must not read: chunk maps
/// (which name every sprite's data), the sprite catalog, API token hashes.
/// A new file is created 0600, and SQLite gives its `-wal` and `-shm` files
/// the database's mode; files an older den created world-readable are
/// narrowed here. Only the files change: the directory holding them may
/// need to stay traversable for sprites' user-namespaced containers.
pub fn restrict_db_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl SqliteMeta {
    pub fn open(path: &Path) -> Result<Self> {
        restrict_db_files(path)?;
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        // WAL + FULL: every commit is fsynced. Sealing unlinks a dirty file
        // right after its commit, so a commit that rolled back on power loss
        // could lose data the guest had fsynced.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&conn)?;
        Ok(SqliteMeta {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock();
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Meta(format!("metadata task failed: {e}")))?
    }

    async fn tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.with(move |c| {
            // IMMEDIATE: take the write lock up front so two processes never
            // deadlock upgrading read locks.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Like `tx`, but the commit does not wait for the disk
    /// (`synchronous=NORMAL` for this one transaction). Only for changes
    /// whose loss on power failure is harmless: in WAL mode the next FULL
    /// commit fsyncs the log up to itself, this commit included, so it can
    /// never be lost while a later commit survives.
    async fn tx_relaxed<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T> + Send + 'static,
    {
        self.with(move |c| {
            c.pragma_update(None, "synchronous", "NORMAL")?;
            let res = (|| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&tx)?;
                tx.commit()?;
                Ok(out)
            })();
            // Back to FULL even after a failure: every other commit relies on it.
            c.pragma_update(None, "synchronous", "FULL")?;
            res
        })
        .await
    }
}

/// One upload commit inside a caller's transaction (see `commit_upload`).
fn commit_one(
    tx: &Transaction<'_>,
    pending: PendingId,
    hash: &ChunkHash,
    stored_len: u64,
) -> Result<CommitOutcome> {
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM chunks WHERE hash = ?1")?
        .query_row(params![&hash.0[..]], |r| r.get(0))
        .optional()?;
    match state.as_deref() {
        Some("uploading") | Some("present") => {}
        _ => return Ok(CommitOutcome::Retry),
    }
    let n = tx
        .prepare_cached("UPDATE map_entries SET hash = ?1, pending = NULL WHERE pending = ?2")?
        .execute(params![&hash.0[..], pending])? as i64;
    tx.prepare_cached(
        "UPDATE chunks SET state = 'present', refs = refs + ?2, updated_at_ms = ?3,
             stored_len = CASE WHEN ?4 > 0 THEN ?4 ELSE stored_len END
         WHERE hash = ?1",
    )?
    .execute(params![&hash.0[..], n, now_ms(), stored_len as i64])?;
    Ok(CommitOutcome::Committed {
        entries_updated: n as u64,
    })
}

fn commit_zero_one(tx: &Transaction<'_>, pending: PendingId) -> Result<u64> {
    Ok(tx
        .prepare_cached("DELETE FROM map_entries WHERE pending = ?1")?
        .execute(params![pending])? as u64)
}

/// Cluster columns of `volumes` that version-0 databases may lack (they were
/// added one release at a time), under their current names.
const V0_VOLUME_COLUMNS: &[(&str, &str)] = &[
    ("owner", "TEXT"),
    ("epoch", "BIGINT NOT NULL DEFAULT 0"),
    ("sync_map", "BIGINT"),
    ("sync_at_ms", "BIGINT"),
    ("sync_pending_map", "BIGINT"),
    ("sync_pending_at_ms", "BIGINT"),
];

/// Bring a database created by an older release up to [`SCHEMA_VERSION`],
/// then create whatever is missing. One IMMEDIATE transaction, so two
/// processes opening the same file at once migrate it once, and a crash
/// mid-way leaves the old schema intact.
fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let res = (|| -> Result<()> {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Meta(format!(
                "metadata schema version {version} is newer than this den ({SCHEMA_VERSION})"
            )));
        }
        if version == 0 {
            migrate_v0(conn)?;
        }
        conn.execute_batch(&schema::tables(Dialect::Sqlite))?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    })();
    match res {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(())
}

/// Version 0 to 1: `owner_node` becomes `owner`, missing cluster columns are
/// added, and `map_entries` is rebuilt with the one-of-hash-or-pending CHECK
/// (SQLite cannot add a constraint to an existing table). A fresh, empty
/// file has no tables yet and needs none of it.
fn migrate_v0(conn: &Connection) -> Result<()> {
    let table_sql = |name: &str| -> Result<Option<String>> {
        Ok(conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?)
    };
    if table_sql("volumes")?.is_some() {
        let columns = || -> Result<Vec<String>> {
            Ok(conn
                .prepare("SELECT name FROM pragma_table_info('volumes')")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?)
        };
        if columns()?.iter().any(|h| h == "owner_node") {
            conn.execute_batch("ALTER TABLE volumes RENAME COLUMN owner_node TO owner")?;
        }
        let have = columns()?;
        for (col, ty) in V0_VOLUME_COLUMNS {
            if !have.iter().any(|h| h == col) {
                conn.execute_batch(&format!("ALTER TABLE volumes ADD COLUMN {col} {ty}"))?;
            }
        }
        // The shared schema's `head_map UNIQUE`, which an existing table
        // can only get as an index.
        conn.execute_batch("CREATE UNIQUE INDEX IF NOT EXISTS volumes_head_map ON volumes (head_map)")?;
    }
    if let Some(sql) = table_sql("map_entries")?
        && !sql.contains("CHECK")
    {
        // A slot that breaks the invariant cannot be repaired by guessing;
        // the INSERT fails on it and the open reports the constraint.
        conn.execute_batch(&format!(
            "{}
             INSERT INTO map_entries_v1 (map_id, idx, hash, pending)
                 SELECT map_id, idx, hash, pending FROM map_entries;
             DROP TABLE map_entries;
             ALTER TABLE map_entries_v1 RENAME TO map_entries;",
            schema::map_entries(Dialect::Sqlite, "map_entries_v1")
        ))?;
    }
    Ok(())
}

fn volume_by_name(tx: &Connection, name: &str) -> Result<VolumeRecord> {
    tx.query_row(
        "SELECT id, name, size_bytes, chunk_size, head_map, created_at_ms FROM volumes WHERE name = ?1",
        params![name],
        row_to_volume,
    )
    .optional()?
    .ok_or_else(|| StoreError::VolumeNotFound(name.to_string()))
}

fn volume_by_id(tx: &Connection, id: &str) -> Result<VolumeRecord> {
    tx.query_row(
        "SELECT id, name, size_bytes, chunk_size, head_map, created_at_ms FROM volumes WHERE id = ?1",
        params![id],
        row_to_volume,
    )
    .optional()?
    .ok_or_else(|| StoreError::VolumeNotFound(id.to_string()))
}

fn row_to_volume(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        chunk_size: r.get::<_, i64>(3)? as u32,
        head_map: r.get(4)?,
        created_at_ms: r.get(5)?,
    })
}

fn checkpoint_row(tx: &Connection, volume_id: &str, id: &str) -> Result<CheckpointRecord> {
    let seq = parse_seq(volume_id, id)?;
    let rec = tx
        .query_row(
            "SELECT volume_id, seq, map_id, created_at_ms, comment FROM checkpoints WHERE volume_id = ?1 AND seq = ?2",
            params![volume_id, seq],
            row_to_checkpoint,
        )
        .optional()?
        .ok_or_else(|| StoreError::CheckpointNotFound {
            volume: volume_id.to_string(),
            checkpoint: id.to_string(),
        })?;
    with_durability(tx, rec)
}

fn row_to_checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRecord> {
    let seq: i64 = r.get(1)?;
    Ok(CheckpointRecord {
        volume_id: r.get(0)?,
        id: format!("v{seq}"),
        seq,
        map_id: r.get(2)?,
        created_at_ms: r.get(3)?,
        comment: r.get(4)?,
        durable: false,
    })
}

fn with_durability(tx: &Connection, mut rec: CheckpointRecord) -> Result<CheckpointRecord> {
    let pending: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM map_entries WHERE map_id = ?1 AND pending IS NOT NULL)",
        params![rec.map_id],
        |r| r.get(0),
    )?;
    rec.durable = !pending;
    Ok(rec)
}

fn new_map(tx: &Connection, volume_id: &str) -> Result<MapId> {
    tx.execute("INSERT INTO maps (volume_id) VALUES (?1)", params![volume_id])?;
    Ok(tx.last_insert_rowid())
}

/// Copy every slot of `src` into the empty map `dst`, counting the new references.
fn copy_map(tx: &Connection, src: MapId, dst: MapId) -> Result<()> {
    tx.execute(
        "INSERT INTO map_entries (map_id, idx, hash, pending) SELECT ?2, idx, hash, pending FROM map_entries WHERE map_id = ?1",
        params![src, dst],
    )?;
    adjust_refs_for_map(tx, dst, 1)
}

fn adjust_refs_for_map(tx: &Connection, map: MapId, sign: i64) -> Result<()> {
    tx.execute(
        "UPDATE chunks SET refs = refs + ?2 * c.n FROM
            (SELECT hash, COUNT(*) AS n FROM map_entries WHERE map_id = ?1 AND hash IS NOT NULL GROUP BY hash) AS c
         WHERE chunks.hash = c.hash",
        params![map, sign],
    )?;
    Ok(())
}

fn clear_map(tx: &Connection, map: MapId) -> Result<()> {
    adjust_refs_for_map(tx, map, -1)?;
    tx.execute("DELETE FROM map_entries WHERE map_id = ?1", params![map])?;
    Ok(())
}

fn drop_map(tx: &Connection, map: MapId) -> Result<()> {
    clear_map(tx, map)?;
    tx.execute("DELETE FROM maps WHERE id = ?1", params![map])?;
    Ok(())
}

fn apply_seals(tx: &Connection, head: MapId, seals: &[(u64, Option<PendingId>)]) -> Result<()> {
    let mut old = tx.prepare_cached("SELECT hash FROM map_entries WHERE map_id = ?1 AND idx = ?2")?;
    let mut dec = tx.prepare_cached("UPDATE chunks SET refs = refs - 1 WHERE hash = ?1")?;
    let mut put = tx.prepare_cached(
        "INSERT INTO map_entries (map_id, idx, hash, pending) VALUES (?1, ?2, NULL, ?3)
         ON CONFLICT (map_id, idx) DO UPDATE SET hash = NULL, pending = excluded.pending",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM map_entries WHERE map_id = ?1 AND idx = ?2")?;
    for &(idx, pending) in seals {
        let prev: Option<Option<Vec<u8>>> = old
            .query_row(params![head, idx as i64], |r| r.get(0))
            .optional()?;
        if let Some(Some(h)) = prev {
            dec.execute(params![h])?;
        }
        match pending {
            Some(p) => put.execute(params![head, idx as i64, p])?,
            None => del.execute(params![head, idx as i64])?,
        };
    }
    Ok(())
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn create_volume(
        &self,
        name: &str,
        size: u64,
        chunk_size: u32,
        source: Option<MapId>,
    ) -> Result<VolumeRecord> {
        let name = name.to_string();
        self.tx(move |tx| {
            let exists: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM volumes WHERE name = ?1)", params![name], |r| r.get(0))?;
            if exists {
                return Err(StoreError::VolumeExists(name));
            }
            let id = uuid::Uuid::now_v7().to_string();
            let head = new_map(tx, &id)?;
            if let Some(src) = source {
                copy_map(tx, src, head)?;
            }
            tx.execute(
                "INSERT INTO volumes (id, name, size_bytes, chunk_size, head_map, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, name, size as i64, chunk_size as i64, head, now_ms()],
            )?;
            volume_by_id(tx, &id)
        })
        .await
    }

    async fn get_volume(&self, name: &str) -> Result<VolumeRecord> {
        let name = name.to_string();
        self.with(move |c| volume_by_name(c, &name)).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, name, size_bytes, chunk_size, head_map, created_at_ms FROM volumes ORDER BY name",
            )?;
            let rows = st
                .query_map([], row_to_volume)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<()> {
        let volume_id = volume_id.to_string();
        self.tx(move |tx| {
            volume_by_id(tx, &volume_id)?;
            let maps: Vec<MapId> = tx
                .prepare("SELECT id FROM maps WHERE volume_id = ?1")?
                .query_map(params![volume_id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for m in maps {
                drop_map(tx, m)?;
            }
            tx.execute("DELETE FROM checkpoints WHERE volume_id = ?1", params![volume_id])?;
            tx.execute("DELETE FROM volumes WHERE id = ?1", params![volume_id])?;
            Ok(())
        })
        .await
    }

    async fn resize_volume(&self, volume_id: &str, size: u64) -> Result<()> {
        let volume_id = volume_id.to_string();
        self.tx(move |tx| {
            let n = tx.execute(
                "UPDATE volumes SET size_bytes = ?2 WHERE id = ?1",
                params![volume_id, size as i64],
            )?;
            if n == 0 {
                return Err(StoreError::VolumeNotFound(volume_id));
            }
            Ok(())
        })
        .await
    }

    async fn load_map(&self, map: MapId) -> Result<Vec<(u64, Entry)>> {
        self.with(move |c| {
            let mut st = c.prepare("SELECT idx, hash, pending FROM map_entries WHERE map_id = ?1")?;
            let mut rows = st.query(params![map])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let idx: i64 = r.get(0)?;
                let hash: Option<Vec<u8>> = r.get(1)?;
                let pending: Option<i64> = r.get(2)?;
                let e = match (hash, pending) {
                    (Some(h), _) => Entry::Chunk(ChunkHash::from_slice(&h)?),
                    (None, Some(p)) => Entry::Pending(p),
                    (None, None) => return Err(StoreError::Meta(format!("map {map} slot {idx} is empty"))),
                };
                out.push((idx as u64, e));
            }
            Ok(out)
        })
        .await
    }

    async fn map_stats(&self, map: MapId) -> Result<MapStats> {
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*), COUNT(pending), COUNT(DISTINCT hash) FROM map_entries WHERE map_id = ?1",
                params![map],
                |r| {
                    Ok(MapStats {
                        entries: r.get::<_, i64>(0)? as u64,
                        pending: r.get::<_, i64>(1)? as u64,
                        distinct_chunks: r.get::<_, i64>(2)? as u64,
                    })
                },
            )?)
        })
        .await
    }

    async fn pending_count(&self, map: MapId) -> Result<u64> {
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM map_entries INDEXED BY map_entries_pending WHERE pending IS NOT NULL AND map_id = ?1",
                params![map],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }

    async fn apply_seal(&self, head: MapId, seals: &[(u64, Option<PendingId>)]) -> Result<()> {
        if seals.is_empty() {
            return Ok(());
        }
        let seals = seals.to_vec();
        self.tx(move |tx| apply_seals(tx, head, &seals)).await
    }

    async fn checkpoint(
        &self,
        volume_id: &str,
        comment: &str,
        seals: &[(u64, Option<PendingId>)],
    ) -> Result<CheckpointRecord> {
        let (volume_id, comment, seals) = (volume_id.to_string(), comment.to_string(), seals.to_vec());
        self.tx(move |tx| {
            let vol = volume_by_id(tx, &volume_id)?;
            apply_seals(tx, vol.head_map, &seals)?;
            let seq: i64 = tx.query_row("SELECT next_seq FROM volumes WHERE id = ?1", params![volume_id], |r| r.get(0))?;
            let map = new_map(tx, &volume_id)?;
            copy_map(tx, vol.head_map, map)?;
            tx.execute(
                "INSERT INTO checkpoints (volume_id, seq, map_id, created_at_ms, comment) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![volume_id, seq, map, now_ms(), comment],
            )?;
            tx.execute("UPDATE volumes SET next_seq = ?2 WHERE id = ?1", params![volume_id, seq + 1])?;
            checkpoint_row(tx, &volume_id, &format!("v{seq}"))
        })
        .await
    }

    async fn list_checkpoints(&self, volume_id: &str) -> Result<Vec<CheckpointRecord>> {
        let volume_id = volume_id.to_string();
        self.with(move |c| {
            let recs: Vec<CheckpointRecord> = c
                .prepare(
                    "SELECT volume_id, seq, map_id, created_at_ms, comment FROM checkpoints WHERE volume_id = ?1 ORDER BY seq DESC",
                )?
                .query_map(params![volume_id], row_to_checkpoint)?
                .collect::<rusqlite::Result<_>>()?;
            recs.into_iter().map(|r| with_durability(c, r)).collect()
        })
        .await
    }

    async fn get_checkpoint(&self, volume_id: &str, id: &str) -> Result<CheckpointRecord> {
        let (volume_id, id) = (volume_id.to_string(), id.to_string());
        self.with(move |c| checkpoint_row(c, &volume_id, &id)).await
    }

    async fn delete_checkpoint(&self, volume_id: &str, id: &str) -> Result<()> {
        let (volume_id, id) = (volume_id.to_string(), id.to_string());
        self.tx(move |tx| {
            let ck = checkpoint_row(tx, &volume_id, &id)?;
            drop_map(tx, ck.map_id)?;
            tx.execute(
                "DELETE FROM checkpoints WHERE volume_id = ?1 AND seq = ?2",
                params![volume_id, ck.seq],
            )?;
            Ok(())
        })
        .await
    }

    async fn restore(&self, volume_id: &str, checkpoint_id: &str) -> Result<()> {
        let (volume_id, checkpoint_id) = (volume_id.to_string(), checkpoint_id.to_string());
        self.tx(move |tx| {
            let vol = volume_by_id(tx, &volume_id)?;
            let ck = checkpoint_row(tx, &volume_id, &checkpoint_id)?;
            clear_map(tx, vol.head_map)?;
            copy_map(tx, ck.map_id, vol.head_map)
        })
        .await
    }

    async fn list_pending(&self) -> Result<Vec<PendingId>> {
        self.with(|c| {
            Ok(c.prepare(
                "SELECT DISTINCT pending FROM map_entries WHERE pending IS NOT NULL ORDER BY pending",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn pending_referenced(&self, pending: PendingId) -> Result<bool> {
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM map_entries WHERE pending = ?1)",
                params![pending],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn begin_upload(&self, hash: &ChunkHash) -> Result<UploadDecision> {
        let hash = *hash;
        self.tx_relaxed(move |tx| {
            let state: Option<String> = tx
                .query_row("SELECT state FROM chunks WHERE hash = ?1", params![&hash.0[..]], |r| r.get(0))
                .optional()?;
            Ok(match state.as_deref() {
                None => {
                    tx.execute(
                        "INSERT INTO chunks (hash, state, refs, stored_len, updated_at_ms) VALUES (?1, 'uploading', 0, 0, ?2)",
                        params![&hash.0[..], now_ms()],
                    )?;
                    UploadDecision::MustUpload
                }
                Some("present") => UploadDecision::AlreadyPresent,
                Some("deleting") => UploadDecision::Busy,
                Some(_) => {
                    tx.execute(
                        "UPDATE chunks SET updated_at_ms = ?2 WHERE hash = ?1",
                        params![&hash.0[..], now_ms()],
                    )?;
                    UploadDecision::MustUpload
                }
            })
        })
        .await
    }

    async fn commit_upload(
        &self,
        pending: PendingId,
        hash: &ChunkHash,
        stored_len: u64,
    ) -> Result<CommitOutcome> {
        let hash = *hash;
        self.tx(move |tx| commit_one(tx, pending, &hash, stored_len))
            .await
    }

    async fn commit_zero(&self, pending: PendingId) -> Result<u64> {
        self.tx(move |tx| commit_zero_one(tx, pending)).await
    }

    async fn commit_uploads(&self, items: &[UploadCommit]) -> Result<Vec<CommitOutcome>> {
        let items = items.to_vec();
        self.tx(move |tx| {
            items
                .iter()
                .map(|it| match it.hash {
                    Some(h) => commit_one(tx, it.pending, &h, it.stored_len),
                    None => Ok(CommitOutcome::Committed {
                        entries_updated: commit_zero_one(tx, it.pending)?,
                    }),
                })
                .collect()
        })
        .await
    }

    async fn gc_begin(&self, limit: usize) -> Result<Vec<ChunkHash>> {
        self.tx(move |tx| {
            let stale_before = now_ms() - STALE_UPLOAD_MS;
            let hashes: Vec<Vec<u8>> = tx
                .prepare(
                    "SELECT hash FROM chunks WHERE refs = 0 AND
                        (state = 'present' OR (state = 'uploading' AND updated_at_ms < ?1)) LIMIT ?2",
                )?
                .query_map(params![stale_before, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut mark = tx
                .prepare_cached("UPDATE chunks SET state = 'deleting', updated_at_ms = ?2 WHERE hash = ?1")?;
            let now = now_ms();
            let mut out = Vec::with_capacity(hashes.len());
            for h in hashes {
                mark.execute(params![h, now])?;
                out.push(ChunkHash::from_slice(&h)?);
            }
            Ok(out)
        })
        .await
    }

    async fn gc_finish(&self, hashes: &[ChunkHash]) -> Result<()> {
        let hashes = hashes.to_vec();
        self.tx(move |tx| {
            let mut del = tx.prepare_cached("DELETE FROM chunks WHERE hash = ?1 AND state = 'deleting'")?;
            for h in hashes {
                del.execute(params![&h.0[..]])?;
            }
            Ok(())
        })
        .await
    }

    async fn gc_interrupted(&self) -> Result<Vec<ChunkHash>> {
        self.with(|c| {
            let rows: Vec<Vec<u8>> = c
                .prepare("SELECT hash FROM chunks WHERE state = 'deleting'")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            rows.iter().map(|h| ChunkHash::from_slice(h)).collect()
        })
        .await
    }

    async fn stored_len_of(&self, hashes: &[ChunkHash]) -> Result<u64> {
        let hashes = hashes.to_vec();
        self.with(move |c| {
            let mut q = c.prepare_cached("SELECT stored_len FROM chunks WHERE hash = ?1")?;
            let mut total = 0u64;
            for h in hashes {
                let n: Option<i64> = q.query_row(params![&h.0[..]], |r| r.get(0)).optional()?;
                total += n.unwrap_or(0).max(0) as u64;
            }
            Ok(total)
        })
        .await
    }

    async fn is_known_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        let hash = *hash;
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM chunks WHERE hash = ?1)",
                params![&hash.0[..]],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT (SELECT COUNT(*) FROM volumes), (SELECT COUNT(*) FROM checkpoints),
                        (SELECT COUNT(*) FROM chunks WHERE state = 'present'),
                        (SELECT COALESCE(SUM(stored_len), 0) FROM chunks WHERE state = 'present'),
                        (SELECT COUNT(DISTINCT pending) FROM map_entries WHERE pending IS NOT NULL)",
                [],
                |r| {
                    Ok(StoreStats {
                        volumes: r.get::<_, i64>(0)? as u64,
                        checkpoints: r.get::<_, i64>(1)? as u64,
                        chunks: r.get::<_, i64>(2)? as u64,
                        stored_bytes: r.get::<_, i64>(3)? as u64,
                        pending: r.get::<_, i64>(4)? as u64,
                    })
                },
            )?)
        })
        .await
    }

    async fn verify_refcounts(&self) -> Result<Vec<(ChunkHash, i64, i64)>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT COALESCE(a.hash, b.hash), COALESCE(a.n, 0), COALESCE(b.refs, -1) FROM
                    (SELECT hash, COUNT(*) AS n FROM map_entries WHERE hash IS NOT NULL GROUP BY hash) AS a
                 FULL OUTER JOIN chunks AS b ON a.hash = b.hash
                 WHERE COALESCE(a.n, 0) <> COALESCE(b.refs, -1)",
            )?;
            let rows: Vec<(Vec<u8>, i64, i64)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(h, actual, stored)| Ok((ChunkHash::from_slice(&h)?, actual, stored)))
                .collect()
        })
        .await
    }
}

#[async_trait]
impl ClusterMeta for SqliteMeta {
    async fn volume_owner(&self, volume_id: &str) -> Result<VolumeOwner> {
        let volume_id = volume_id.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT owner, epoch FROM volumes WHERE id = ?1",
                params![volume_id],
                |r| {
                    Ok(VolumeOwner {
                        node: r.get(0)?,
                        epoch: r.get(1)?,
                    })
                },
            )
            .optional()?
            .ok_or(StoreError::VolumeNotFound(volume_id))
        })
        .await
    }

    async fn claim_volume(&self, volume_id: &str, node: &str, seen_epoch: i64) -> Result<Option<i64>> {
        let (volume_id, node) = (volume_id.to_string(), node.to_string());
        self.tx(move |tx| {
            let n = tx.execute(
                "UPDATE volumes SET owner = ?2, epoch = epoch + 1 WHERE id = ?1 AND epoch = ?3",
                params![volume_id, node, seen_epoch],
            )?;
            if n == 1 {
                return Ok(Some(seen_epoch + 1));
            }
            volume_by_id(tx, &volume_id)?;
            Ok(None)
        })
        .await
    }

    async fn release_volume(&self, volume_id: &str, node: &str, epoch: i64) -> Result<bool> {
        let (volume_id, node) = (volume_id.to_string(), node.to_string());
        self.tx(move |tx| {
            let n = tx.execute(
                "UPDATE volumes SET owner = NULL WHERE id = ?1 AND owner = ?2 AND epoch = ?3",
                params![volume_id, node, epoch],
            )?;
            if n == 1 {
                return Ok(true);
            }
            volume_by_id(tx, &volume_id)?;
            Ok(false)
        })
        .await
    }

    async fn sync_point(&self, volume_id: &str, seals: &[(u64, Option<PendingId>)]) -> Result<MapId> {
        let (volume_id, seals) = (volume_id.to_string(), seals.to_vec());
        self.tx(move |tx| {
            let vol = volume_by_id(tx, &volume_id)?;
            apply_seals(tx, vol.head_map, &seals)?;
            let state = sync_state_of(tx, &volume_id)?;
            let map = new_map(tx, &volume_id)?;
            copy_map(tx, vol.head_map, map)?;
            if let Some(old) = state.pending_map {
                drop_map(tx, old)?;
            }
            tx.execute(
                "UPDATE volumes SET sync_pending_map = ?2, sync_pending_at_ms = ?3 WHERE id = ?1",
                params![volume_id, map, now_ms()],
            )?;
            Ok(map)
        })
        .await
    }

    async fn promote_sync_point(&self, volume_id: &str, map: MapId) -> Result<()> {
        let volume_id = volume_id.to_string();
        self.tx(move |tx| {
            let state = sync_state_of(tx, &volume_id)?;
            if state.pending_map != Some(map) {
                return Ok(());
            }
            // A durable sync point that names a chunk living only on some
            // node's disk would break the one promise rollback makes.
            let pending: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM map_entries WHERE map_id = ?1 AND pending IS NOT NULL)",
                params![map],
                |r| r.get(0),
            )?;
            if pending {
                return Err(StoreError::InvalidArgument(format!(
                    "sync point {map} of volume {volume_id} still has chunks waiting for upload"
                )));
            }
            if let Some(old) = state.durable_map {
                drop_map(tx, old)?;
            }
            tx.execute(
                "UPDATE volumes SET sync_map = sync_pending_map, sync_at_ms = sync_pending_at_ms,
                     sync_pending_map = NULL, sync_pending_at_ms = NULL WHERE id = ?1",
                params![volume_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn rollback_to_sync_point(&self, volume_id: &str) -> Result<Option<i64>> {
        let volume_id = volume_id.to_string();
        self.tx(move |tx| {
            let vol = volume_by_id(tx, &volume_id)?;
            let state = sync_state_of(tx, &volume_id)?;
            let Some(durable) = state.durable_map else {
                return Ok(None);
            };
            clear_map(tx, vol.head_map)?;
            copy_map(tx, durable, vol.head_map)?;
            // A pending sync point is the dead owner's, taken after the durable
            // one; its pending slots can never be uploaded now.
            if let Some(p) = state.pending_map {
                drop_map(tx, p)?;
                tx.execute(
                    "UPDATE volumes SET sync_pending_map = NULL, sync_pending_at_ms = NULL WHERE id = ?1",
                    params![volume_id],
                )?;
            }
            Ok(state.durable_at_ms)
        })
        .await
    }

    async fn sync_state(&self, volume_id: &str) -> Result<SyncState> {
        let volume_id = volume_id.to_string();
        self.with(move |c| sync_state_of(c, &volume_id)).await
    }
}

fn sync_state_of(c: &Connection, volume_id: &str) -> Result<SyncState> {
    c.query_row(
        "SELECT sync_map, sync_at_ms, sync_pending_map, sync_pending_at_ms FROM volumes WHERE id = ?1",
        params![volume_id],
        |r| {
            Ok(SyncState {
                durable_map: r.get(0)?,
                durable_at_ms: r.get(1)?,
                pending_map: r.get(2)?,
                pending_at_ms: r.get(3)?,
            })
        },
    )
    .optional()?
    .ok_or_else(|| StoreError::VolumeNotFound(volume_id.to_string()))
}
