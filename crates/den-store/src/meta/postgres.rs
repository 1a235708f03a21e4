//! PostgreSQL metadata for cluster mode: several `den server` nodes share
//! one database (and one object store), each with its own local cache.
//!
//! The schema and the bookkeeping are those of [`super::sqlite`]; what is new
//! is concurrency between processes. Every mutating method runs as one
//! SERIALIZABLE transaction and is retried on serialization failure or
//! deadlock, so the outcome is always that of some serial order of whole
//! methods, exactly the guarantee SQLite's single writer gives. That is what
//! keeps reference counts exact when, say, a fork on node A copies a map
//! while node B deletes the checkpoint it names and runs GC, or an upload
//! commit on A replaces a pending id while a fork on A copies that pending
//! slot: under READ COMMITTED both would need hand-made lock orders, and a
//! missed one silently loses a chunk.
//!
//! On top of that, rows are locked explicitly where it turns a likely abort
//! into a wait (the volume row for every change to a volume, the source map
//! of a copy), and the volume row lock is also where fencing is checked.
//!
//! The races this has to get right (tests/postgres.rs exercises them; its
//! two-node stress test fails within seconds under READ COMMITTED):
//! - fork (copy of a live head or a checkpoint) against the owner changing
//!   or dropping that map and GC on another node: the copy's reference
//!   increments must land before the count can reach zero, or GC deletes a
//!   chunk the fork names. Serializable ordering, plus the share lock on the
//!   source map row.
//! - commit_upload against a fork copying the same pending slot: either the
//!   copy sees the hash, or the commit sees the copied pending slot; never a
//!   pending slot left behind for a file the uploader then deletes.
//! - commit_upload against gc_begin: the chunk row is locked by both; GC
//!   only marks rows still at zero references, and a commit that finds the
//!   row `deleting` (or gone) answers Retry.
//! - claim against a change by the old owner: the claim updates the volume
//!   row every change locks first, so the change either commits before the
//!   claim or sees the new epoch and is fenced.
//! - two nodes' GCs: each only finishes batches it marked (see
//!   gc_interrupted).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Pool};
use parking_lot::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::schema::{self, Dialect, STALE_UPLOAD_MS, now_ms, parse_seq};
use super::*;
use crate::error::StoreError;

const SCHEMA_VERSION: i64 = 1;

/// Key of the advisory lock that serialises schema creation: `CREATE TABLE
/// IF NOT EXISTS` run by two nodes at once can still collide in the catalog.
const SCHEMA_LOCK: i64 = 0x64656e_6d657461; // "denmeta"

/// The shared tables ([`schema::tables`]) plus what only a cluster needs.
fn ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT NOT NULL
);
{}
-- Pending ids name files in one node's cache: only that node may upload them.
CREATE TABLE IF NOT EXISTS pending_owner (
    pending BIGINT PRIMARY KEY,
    node    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_owner_node ON pending_owner (node);
",
        schema::tables(Dialect::Postgres)
    )
}

/// A `deleting` batch of another node untouched for this long belongs to a
/// GC that died; any node may finish it.
const GC_TAKEOVER_MS: i64 = 600_000;

/// Serialization failures are expected under contention and cheap to retry;
/// the bound only keeps a pathological livelock from hanging a caller.
const MAX_ATTEMPTS: u32 = 40;
/// A connection that broke before COMMIT was sent lost nothing; retrying on a
/// fresh one is safe. Past this many, the server is really down.
const MAX_BROKEN_ATTEMPTS: u32 = 2;

const POOL_SIZE: usize = 16;

/// Why a transaction attempt failed, kept apart from [`StoreError`] until
/// the retry loop has decided whether to try again.
enum TxError {
    Store(StoreError),
    Pg(tokio_postgres::Error),
    /// Failed at COMMIT: unless the server said the transaction was rolled
    /// back (serialization), we cannot know whether it committed.
    Commit(tokio_postgres::Error),
    Pool(String),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            // Two nodes inserting the same key (a volume name, a chunk row):
            // the retry sees the winner's row and answers accordingly.
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

/// The connection is gone (server restarted or unreachable): nothing was
/// committed by this attempt, and a fresh connection may well work.
fn is_broken(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08")
        )
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => format!("postgres: {e}"),
    }
}

impl TxError {
    fn retry(&self, attempt: u32) -> bool {
        match self {
            TxError::Pg(e) => {
                (is_conflict(e) && attempt < MAX_ATTEMPTS) || (is_broken(e) && attempt < MAX_BROKEN_ATTEMPTS)
            }
            TxError::Commit(e) => {
                attempt < MAX_ATTEMPTS
                    && matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE)
            }
            TxError::Store(_) | TxError::Pool(_) => false,
        }
    }

    fn into_store(self) -> StoreError {
        match self {
            TxError::Store(e) => e,
            TxError::Pg(e) => StoreError::Meta(pg_message(&e)),
            TxError::Commit(e) => {
                StoreError::Meta(format!("commit failed (outcome unknown): {}", pg_message(&e)))
            }
            TxError::Pool(e) => StoreError::Meta(format!("postgres connection: {e}")),
        }
    }
}

type R<T> = std::result::Result<T, TxError>;

/// Runs `$body` (a block using `$tx` and `?`) in a transaction at
/// `$iso`, retrying the whole block on conflicts. The body must not have
/// side effects outside the database: it may run several times.
macro_rules! in_tx {
    ($self:ident, $iso:expr, |$tx:ident| $body:block) => {{
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let res: R<_> = async {
                let mut client = $self.client().await?;
                let $tx = client.build_transaction().isolation_level($iso).start().await?;
                let out = $body;
                $tx.commit().await.map_err(TxError::Commit)?;
                Ok(out)
            }
            .await;
            match res {
                Ok(v) => break Ok(v),
                Err(e) if e.retry(attempt) => {
                    $self.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    backoff(attempt).await
                }
                Err(e) => break Err(e.into_store()),
            }
        }
    }};
}

/// A mutating transaction.
macro_rules! write_tx {
    ($self:ident, |$tx:ident| $body:block) => {
        in_tx!($self, IsolationLevel::Serializable, |$tx| $body)
    };
}

/// A read: one consistent snapshot, never a serialization failure.
macro_rules! read_tx {
    ($self:ident, |$tx:ident| $body:block) => {
        in_tx!($self, IsolationLevel::RepeatableRead, |$tx| $body)
    };
}

async fn backoff(attempt: u32) {
    use rand::Rng;
    let cap_ms = 1u64 << attempt.min(7);
    let ms = rand::rng().random_range(0..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn query<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<Vec<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query(&st, params).await?)
}

async fn query_opt<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<Option<Row>> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&st, params).await?)
}

async fn query_one<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<Row> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.query_one(&st, params).await?)
}

async fn execute<C: GenericClient>(c: &C, sql: &str, params: &[&(dyn ToSql + Sync)]) -> R<u64> {
    let st = c.prepare_cached(sql).await?;
    Ok(c.execute(&st, params).await?)
}

/// One upload commit inside a caller's transaction (see `commit_upload`).
async fn commit_one<C: GenericClient>(
    tx: &C,
    pending: PendingId,
    hash: &ChunkHash,
    stored_len: u64,
) -> R<CommitOutcome> {
    let h = &hash.0[..];
    // Row lock: GC on another node moving this chunk to `deleting`
    // either happened before (we answer Retry) or waits for us and
    // then sees refs > 0.
    let state: Option<String> = query_opt(tx, "SELECT state FROM chunks WHERE hash = $1 FOR UPDATE", &[&h])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    Ok(match state.as_deref() {
        Some("uploading") | Some("present") => {
            let n = execute(
                tx,
                "UPDATE map_entries SET hash = $1, pending = NULL WHERE pending = $2",
                &[&h, &pending],
            )
            .await? as i64;
            execute(
                tx,
                "UPDATE chunks SET state = 'present', refs = refs + $2, updated_at_ms = $3,
                     stored_len = CASE WHEN $4::BIGINT > 0 THEN $4::BIGINT ELSE stored_len END
                 WHERE hash = $1",
                &[&h, &n, &now_ms(), &(stored_len as i64)],
            )
            .await?;
            execute(tx, "DELETE FROM pending_owner WHERE pending = $1", &[&pending]).await?;
            CommitOutcome::Committed {
                entries_updated: n as u64,
            }
        }
        _ => CommitOutcome::Retry,
    })
}

async fn commit_zero_one<C: GenericClient>(tx: &C, pending: PendingId) -> R<u64> {
    let n = execute(tx, "DELETE FROM map_entries WHERE pending = $1", &[&pending]).await?;
    execute(tx, "DELETE FROM pending_owner WHERE pending = $1", &[&pending]).await?;
    Ok(n)
}

const VOLUME_COLS: &str = "id, name, size_bytes, chunk_size, head_map, created_at_ms, owner, epoch, \
                           sync_map, sync_at_ms, sync_pending_map, sync_pending_at_ms";

/// A volume row with the cluster columns.
struct VolRow {
    rec: VolumeRecord,
    owner: Option<String>,
    epoch: i64,
    sync_map: Option<MapId>,
    sync_at_ms: Option<i64>,
    sync_pending_map: Option<MapId>,
    sync_pending_at_ms: Option<i64>,
}

fn row_to_vol(r: &Row) -> R<VolRow> {
    Ok(VolRow {
        rec: VolumeRecord {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            size: r.try_get::<_, i64>(2)? as u64,
            chunk_size: r.try_get::<_, i64>(3)? as u32,
            head_map: r.try_get(4)?,
            created_at_ms: r.try_get(5)?,
        },
        owner: r.try_get(6)?,
        epoch: r.try_get(7)?,
        sync_map: r.try_get(8)?,
        sync_at_ms: r.try_get(9)?,
        sync_pending_map: r.try_get(10)?,
        sync_pending_at_ms: r.try_get(11)?,
    })
}

async fn volume_where<C: GenericClient>(
    c: &C,
    cond: &str,
    arg: &(dyn ToSql + Sync),
    lock: bool,
) -> R<Option<VolRow>> {
    let sql = format!(
        "SELECT {VOLUME_COLS} FROM volumes WHERE {cond} = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    query_opt(c, &sql, &[arg])
        .await?
        .as_ref()
        .map(row_to_vol)
        .transpose()
}

async fn volume_by_id<C: GenericClient>(c: &C, id: &str) -> R<VolRow> {
    volume_where(c, "id", &id, false)
        .await?
        .ok_or_else(|| StoreError::VolumeNotFound(id.to_string()).into())
}

const CHECKPOINT_COLS: &str = "c.volume_id, c.seq, c.map_id, c.created_at_ms, c.comment, \
     NOT EXISTS (SELECT 1 FROM map_entries e WHERE e.map_id = c.map_id AND e.pending IS NOT NULL)";

fn row_to_checkpoint(r: &Row) -> R<CheckpointRecord> {
    let seq: i64 = r.try_get(1)?;
    Ok(CheckpointRecord {
        volume_id: r.try_get(0)?,
        id: format!("v{seq}"),
        seq,
        map_id: r.try_get(2)?,
        created_at_ms: r.try_get(3)?,
        comment: r.try_get(4)?,
        durable: r.try_get(5)?,
    })
}

async fn checkpoint_row<C: GenericClient>(c: &C, volume_id: &str, id: &str) -> R<CheckpointRecord> {
    let seq = parse_seq(volume_id, id)?;
    let sql = format!("SELECT {CHECKPOINT_COLS} FROM checkpoints c WHERE c.volume_id = $1 AND c.seq = $2");
    match query_opt(c, &sql, &[&volume_id, &seq]).await? {
        Some(r) => row_to_checkpoint(&r),
        None => Err(StoreError::CheckpointNotFound {
            volume: volume_id.to_string(),
            checkpoint: id.to_string(),
        }
        .into()),
    }
}

async fn new_map<C: GenericClient>(c: &C, volume_id: &str) -> R<MapId> {
    Ok(query_one(
        c,
        "INSERT INTO maps (volume_id) VALUES ($1) RETURNING id",
        &[&volume_id],
    )
    .await?
    .try_get(0)?)
}

/// Copy every slot of `src` into the empty map `dst`, counting the new references.
async fn copy_map<C: GenericClient>(c: &C, src: MapId, dst: MapId) -> R<()> {
    // The share lock makes a concurrent drop of `src` (checkpoint deleted on
    // another node) wait for this copy instead of aborting one of the two.
    if query_opt(c, "SELECT id FROM maps WHERE id = $1 FOR SHARE", &[&src])
        .await?
        .is_none()
    {
        return Err(StoreError::Meta(format!("map {src} does not exist (deleted meanwhile?)")).into());
    }
    execute(
        c,
        "INSERT INTO map_entries (map_id, idx, hash, pending) SELECT $2::BIGINT, idx, hash, pending FROM map_entries WHERE map_id = $1",
        &[&src, &dst],
    )
    .await?;
    adjust_refs_for_map(c, dst, 1).await
}

async fn adjust_refs_for_map<C: GenericClient>(c: &C, map: MapId, sign: i64) -> R<()> {
    execute(
        c,
        "UPDATE chunks SET refs = chunks.refs + $2::BIGINT * c.n FROM
            (SELECT hash, COUNT(*) AS n FROM map_entries WHERE map_id = $1 AND hash IS NOT NULL GROUP BY hash) AS c
         WHERE chunks.hash = c.hash",
        &[&map, &sign],
    )
    .await?;
    Ok(())
}

async fn clear_map<C: GenericClient>(c: &C, map: MapId) -> R<()> {
    adjust_refs_for_map(c, map, -1).await?;
    execute(c, "DELETE FROM map_entries WHERE map_id = $1", &[&map]).await?;
    Ok(())
}

async fn drop_map<C: GenericClient>(c: &C, map: MapId) -> R<()> {
    // The maps row first: it waits for copies holding it (see copy_map)
    // before any chunk row is touched, so the two never deadlock.
    execute(c, "DELETE FROM maps WHERE id = $1", &[&map]).await?;
    clear_map(c, map).await
}

async fn apply_seals<C: GenericClient>(
    c: &C,
    node: &str,
    head: MapId,
    seals: &[(u64, Option<PendingId>)],
) -> R<()> {
    if seals.is_empty() {
        return Ok(());
    }
    // Applied in order, a later seal of a slot wins; the earlier one only
    // ever put a pending id there, which holds no reference.
    let mut last: HashMap<u64, Option<PendingId>> = HashMap::with_capacity(seals.len());
    for &(idx, p) in seals {
        last.insert(idx, p);
    }
    let idxs: Vec<i64> = last.keys().map(|&i| i as i64).collect();
    let (put_idx, put_pending): (Vec<i64>, Vec<i64>) =
        last.iter().filter_map(|(&i, p)| p.map(|p| (i as i64, p))).unzip();
    execute(
        c,
        "UPDATE chunks SET refs = chunks.refs - c.n FROM
            (SELECT hash, COUNT(*) AS n FROM map_entries
              WHERE map_id = $1 AND idx = ANY($2) AND hash IS NOT NULL GROUP BY hash) AS c
         WHERE chunks.hash = c.hash",
        &[&head, &idxs],
    )
    .await?;
    execute(
        c,
        "DELETE FROM map_entries WHERE map_id = $1 AND idx = ANY($2)",
        &[&head, &idxs],
    )
    .await?;
    if !put_idx.is_empty() {
        execute(
            c,
            "INSERT INTO map_entries (map_id, idx, hash, pending)
             SELECT $1::BIGINT, i, NULL, p FROM unnest($2::BIGINT[], $3::BIGINT[]) AS t(i, p)",
            &[&head, &put_idx, &put_pending],
        )
        .await?;
        execute(
            c,
            "INSERT INTO pending_owner (pending, node) SELECT DISTINCT unnest($1::BIGINT[]), $2::TEXT
             ON CONFLICT (pending) DO UPDATE SET node = excluded.node",
            &[&put_pending, &node],
        )
        .await?;
    }
    Ok(())
}

fn hash_of(b: &[u8]) -> R<ChunkHash> {
    Ok(ChunkHash::from_slice(b)?)
}

pub struct PgMeta {
    pool: Pool,
    node: String,
    /// Epochs this process holds, by volume id: the fencing token it
    /// presents. Only ever set after the claiming transaction committed.
    held: Mutex<HashMap<String, i64>>,
    retries: std::sync::atomic::AtomicU64,
}

impl PgMeta {
    /// Connect to `url` as node `node`, creating the schema if it is missing.
    pub async fn connect(url: &str, node: &str) -> Result<PgMeta> {
        let pool = crate::pg::pool(url, POOL_SIZE, &format!("den-{node}")).map_err(|e| match e {
            crate::pg::PoolError::Url(m) => StoreError::InvalidArgument(format!("postgres url: {m}")),
            other => StoreError::Meta(other.to_string()),
        })?;
        let meta = PgMeta {
            pool,
            node: node.to_string(),
            held: Mutex::new(HashMap::new()),
            retries: Default::default(),
        };
        meta.init_schema().await?;
        Ok(meta)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Transactions retried so far (serialization failures, deadlocks,
    /// broken connections): a measure of contention between nodes.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn client(&self) -> R<deadpool_postgres::Client> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => TxError::Pool(pg_message(&e)),
            e => TxError::Pool(e.to_string()),
        })
    }

    async fn init_schema(&self) -> Result<()> {
        in_tx!(self, IsolationLevel::ReadCommitted, |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await?;
            tx.batch_execute(&ddl()).await?;
            let v: Option<i64> = tx
                .query_opt("SELECT max(version) FROM schema_version", &[])
                .await?
                .and_then(|r| r.get(0));
            match v {
                None => {
                    tx.execute(
                        "INSERT INTO schema_version (version) VALUES ($1)",
                        &[&SCHEMA_VERSION],
                    )
                    .await?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Meta(format!(
                        "metadata schema version {v} is newer than this den ({SCHEMA_VERSION})"
                    ))
                    .into());
                }
                Some(_) => {}
            }
        })
    }

    /// Lock the volume row and check that this node holds its current epoch.
    fn check_fence(&self, v: &VolRow) -> R<()> {
        let held = self.held.lock().get(&v.rec.id).copied();
        if v.owner.as_deref() == Some(self.node.as_str()) && held == Some(v.epoch) {
            Ok(())
        } else {
            Err(StoreError::Fenced(v.rec.name.clone()).into())
        }
    }

    async fn lock_volume<C: GenericClient>(&self, c: &C, volume_id: &str) -> R<VolRow> {
        let v = volume_where(c, "id", &volume_id, true)
            .await?
            .ok_or_else(|| StoreError::VolumeNotFound(volume_id.to_string()))?;
        self.check_fence(&v)?;
        Ok(v)
    }
}

#[async_trait]
impl MetaStore for PgMeta {
    async fn create_volume(
        &self,
        name: &str,
        size: u64,
        chunk_size: u32,
        source: Option<MapId>,
    ) -> Result<VolumeRecord> {
        let rec = write_tx!(self, |tx| {
            if volume_where(&tx, "name", &name, false).await?.is_some() {
                return Err(StoreError::VolumeExists(name.to_string()).into());
            }
            let id = uuid::Uuid::now_v7().to_string();
            let head = new_map(&tx, &id).await?;
            if let Some(src) = source {
                copy_map(&tx, src, head).await?;
            }
            execute(
                &tx,
                "INSERT INTO volumes (id, name, size_bytes, chunk_size, head_map, created_at_ms, owner, epoch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 1)",
                &[&id, &name, &(size as i64), &(chunk_size as i64), &head, &now_ms(), &self.node],
            )
            .await?;
            volume_by_id(&tx, &id).await?.rec
        })?;
        self.held.lock().insert(rec.id.clone(), 1);
        Ok(rec)
    }

    async fn get_volume(&self, name: &str) -> Result<VolumeRecord> {
        read_tx!(self, |tx| {
            volume_where(&tx, "name", &name, false)
                .await?
                .ok_or_else(|| StoreError::VolumeNotFound(name.to_string()))?
                .rec
        })
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        read_tx!(self, |tx| {
            let sql = format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY name COLLATE \"C\"");
            let rows = query(&tx, &sql, &[]).await?;
            rows.iter()
                .map(|r| row_to_vol(r).map(|v| v.rec))
                .collect::<R<Vec<_>>>()?
        })
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<()> {
        write_tx!(self, |tx| {
            self.lock_volume(&tx, volume_id).await?;
            let maps: Vec<MapId> = query(
                &tx,
                "SELECT id FROM maps WHERE volume_id = $1 ORDER BY id",
                &[&volume_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
            for m in maps {
                drop_map(&tx, m).await?;
            }
            execute(&tx, "DELETE FROM checkpoints WHERE volume_id = $1", &[&volume_id]).await?;
            execute(&tx, "DELETE FROM volumes WHERE id = $1", &[&volume_id]).await?;
        })?;
        self.held.lock().remove(volume_id);
        Ok(())
    }

    async fn resize_volume(&self, volume_id: &str, size: u64) -> Result<()> {
        write_tx!(self, |tx| {
            self.lock_volume(&tx, volume_id).await?;
            execute(
                &tx,
                "UPDATE volumes SET size_bytes = $2 WHERE id = $1",
                &[&volume_id, &(size as i64)],
            )
            .await?;
        })
    }

    async fn load_map(&self, map: MapId) -> Result<Vec<(u64, Entry)>> {
        read_tx!(self, |tx| {
            let rows = query(
                &tx,
                "SELECT idx, hash, pending FROM map_entries WHERE map_id = $1",
                &[&map],
            )
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let idx: i64 = r.try_get(0)?;
                let hash: Option<&[u8]> = r.try_get(1)?;
                let pending: Option<i64> = r.try_get(2)?;
                let e = match (hash, pending) {
                    (Some(h), _) => Entry::Chunk(hash_of(h)?),
                    (None, Some(p)) => Entry::Pending(p),
                    (None, None) => {
                        return Err(StoreError::Meta(format!("map {map} slot {idx} is empty")).into());
                    }
                };
                out.push((idx as u64, e));
            }
            out
        })
    }

    async fn map_stats(&self, map: MapId) -> Result<MapStats> {
        read_tx!(self, |tx| {
            let r = query_one(
                &tx,
                "SELECT COUNT(*), COUNT(pending), COUNT(DISTINCT hash) FROM map_entries WHERE map_id = $1",
                &[&map],
            )
            .await?;
            MapStats {
                entries: r.try_get::<_, i64>(0)? as u64,
                pending: r.try_get::<_, i64>(1)? as u64,
                distinct_chunks: r.try_get::<_, i64>(2)? as u64,
            }
        })
    }

    async fn pending_count(&self, map: MapId) -> Result<u64> {
        read_tx!(self, |tx| {
            query_one(
                &tx,
                "SELECT COUNT(*) FROM map_entries WHERE pending IS NOT NULL AND map_id = $1",
                &[&map],
            )
            .await?
            .try_get::<_, i64>(0)? as u64
        })
    }

    async fn apply_seal(&self, head: MapId, seals: &[(u64, Option<PendingId>)]) -> Result<()> {
        if seals.is_empty() {
            return Ok(());
        }
        write_tx!(self, |tx| {
            let v = volume_where(&tx, "head_map", &head, true)
                .await?
                .ok_or_else(|| StoreError::VolumeNotFound(format!("volume with head map {head}")))?;
            self.check_fence(&v)?;
            apply_seals(&tx, &self.node, head, seals).await?;
        })
    }

    async fn checkpoint(
        &self,
        volume_id: &str,
        comment: &str,
        seals: &[(u64, Option<PendingId>)],
    ) -> Result<CheckpointRecord> {
        write_tx!(self, |tx| {
            let v = self.lock_volume(&tx, volume_id).await?;
            apply_seals(&tx, &self.node, v.rec.head_map, seals).await?;
            let seq: i64 = query_one(&tx, "SELECT next_seq FROM volumes WHERE id = $1", &[&volume_id])
                .await?
                .try_get(0)?;
            let map = new_map(&tx, volume_id).await?;
            copy_map(&tx, v.rec.head_map, map).await?;
            execute(
                &tx,
                "INSERT INTO checkpoints (volume_id, seq, map_id, created_at_ms, comment) VALUES ($1, $2, $3, $4, $5)",
                &[&volume_id, &seq, &map, &now_ms(), &comment],
            )
            .await?;
            execute(
                &tx,
                "UPDATE volumes SET next_seq = $2 WHERE id = $1",
                &[&volume_id, &(seq + 1)],
            )
            .await?;
            checkpoint_row(&tx, volume_id, &format!("v{seq}")).await?
        })
    }

    async fn list_checkpoints(&self, volume_id: &str) -> Result<Vec<CheckpointRecord>> {
        read_tx!(self, |tx| {
            let sql = format!(
                "SELECT {CHECKPOINT_COLS} FROM checkpoints c WHERE c.volume_id = $1 ORDER BY c.seq DESC"
            );
            query(&tx, &sql, &[&volume_id])
                .await?
                .iter()
                .map(row_to_checkpoint)
                .collect::<R<Vec<_>>>()?
        })
    }

    async fn get_checkpoint(&self, volume_id: &str, id: &str) -> Result<CheckpointRecord> {
        read_tx!(self, |tx| { checkpoint_row(&tx, volume_id, id).await? })
    }

    async fn delete_checkpoint(&self, volume_id: &str, id: &str) -> Result<()> {
        write_tx!(self, |tx| {
            self.lock_volume(&tx, volume_id).await?;
            let ck = checkpoint_row(&tx, volume_id, id).await?;
            drop_map(&tx, ck.map_id).await?;
            execute(
                &tx,
                "DELETE FROM checkpoints WHERE volume_id = $1 AND seq = $2",
                &[&volume_id, &ck.seq],
            )
            .await?;
        })
    }

    async fn restore(&self, volume_id: &str, checkpoint_id: &str) -> Result<()> {
        write_tx!(self, |tx| {
            let v = self.lock_volume(&tx, volume_id).await?;
            let ck = checkpoint_row(&tx, volume_id, checkpoint_id).await?;
            clear_map(&tx, v.rec.head_map).await?;
            copy_map(&tx, ck.map_id, v.rec.head_map).await?;
        })
    }

    async fn list_pending(&self) -> Result<Vec<PendingId>> {
        read_tx!(self, |tx| {
            query(
                &tx,
                "SELECT DISTINCT e.pending FROM map_entries e JOIN pending_owner o ON o.pending = e.pending
                 WHERE e.pending IS NOT NULL AND o.node = $1 ORDER BY e.pending",
                &[&self.node],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<Vec<PendingId>, _>>()?
        })
    }

    async fn pending_referenced(&self, pending: PendingId) -> Result<bool> {
        read_tx!(self, |tx| {
            query_one(
                &tx,
                "SELECT EXISTS (SELECT 1 FROM map_entries WHERE pending = $1)",
                &[&pending],
            )
            .await?
            .try_get::<_, bool>(0)?
        })
    }

    async fn begin_upload(&self, hash: &ChunkHash) -> Result<UploadDecision> {
        let h = &hash.0[..];
        write_tx!(self, |tx| {
            // No need to wait for the WAL flush (see the trait): a later
            // synchronous commit flushes the log past this one anyway.
            tx.batch_execute("SET LOCAL synchronous_commit = off").await?;
            // One statement: insert `uploading`, or refresh the time of an
            // existing `uploading` row (so GC does not take it for stale),
            // and either way learn the state.
            let state: String = query_one(
                &tx,
                "INSERT INTO chunks (hash, state, refs, stored_len, updated_at_ms) VALUES ($1, 'uploading', 0, 0, $2)
                 ON CONFLICT (hash) DO UPDATE SET updated_at_ms =
                     CASE WHEN chunks.state = 'uploading' THEN excluded.updated_at_ms ELSE chunks.updated_at_ms END
                 RETURNING state",
                &[&h, &now_ms()],
            )
            .await?
            .try_get(0)?;
            match state.as_str() {
                "present" => UploadDecision::AlreadyPresent,
                "deleting" => UploadDecision::Busy,
                _ => UploadDecision::MustUpload,
            }
        })
    }

    async fn commit_upload(
        &self,
        pending: PendingId,
        hash: &ChunkHash,
        stored_len: u64,
    ) -> Result<CommitOutcome> {
        write_tx!(self, |tx| { commit_one(&tx, pending, hash, stored_len).await? })
    }

    async fn commit_zero(&self, pending: PendingId) -> Result<u64> {
        write_tx!(self, |tx| { commit_zero_one(&tx, pending).await? })
    }

    async fn commit_uploads(&self, items: &[UploadCommit]) -> Result<Vec<CommitOutcome>> {
        // Row locks are taken in hash order, so two nodes committing
        // overlapping batches wait for each other instead of deadlocking.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].hash.map(|h| h.0));
        write_tx!(self, |tx| {
            let mut out = vec![CommitOutcome::Retry; items.len()];
            for &i in &order {
                let it = &items[i];
                out[i] = match &it.hash {
                    Some(h) => commit_one(&tx, it.pending, h, it.stored_len).await?,
                    None => CommitOutcome::Committed {
                        entries_updated: commit_zero_one(&tx, it.pending).await?,
                    },
                };
            }
            out
        })
    }

    async fn gc_begin(&self, limit: usize) -> Result<Vec<ChunkHash>> {
        let limit = limit as i64;
        let marked = write_tx!(self, |tx| {
            let now = now_ms();
            // SKIP LOCKED: rows a commit on another node holds are in use
            // anyway; the outer `refs = 0` is checked again on the locked row.
            let rows = query(
                &tx,
                "UPDATE chunks SET state = 'deleting', updated_at_ms = $3, gc_node = $4
                 WHERE hash IN (SELECT hash FROM chunks WHERE refs = 0 AND
                                  (state = 'present' OR (state = 'uploading' AND updated_at_ms < $1))
                                LIMIT $2 FOR UPDATE SKIP LOCKED)
                   AND refs = 0
                 RETURNING hash",
                &[&(now - STALE_UPLOAD_MS), &limit, &now, &self.node],
            )
            .await?;
            rows.iter()
                .map(|r| hash_of(r.try_get::<_, &[u8]>(0)?))
                .collect::<R<Vec<_>>>()?
        })?;
        if marked.is_empty() {
            // Owner rows of pending ids that were overwritten before their
            // upload: nothing names them any more. Best effort.
            let swept: Result<u64> = write_tx!(self, |tx| {
                execute(
                    &tx,
                    "DELETE FROM pending_owner o WHERE NOT EXISTS (SELECT 1 FROM map_entries e WHERE e.pending = o.pending)",
                    &[],
                )
                .await?
            });
            if let Err(e) = swept {
                tracing::debug!("sweeping pending owners: {e}");
            }
        }
        Ok(marked)
    }

    async fn gc_finish(&self, hashes: &[ChunkHash]) -> Result<()> {
        let hs: Vec<&[u8]> = hashes.iter().map(|h| &h.0[..]).collect();
        write_tx!(self, |tx| {
            execute(
                &tx,
                "DELETE FROM chunks WHERE hash = ANY($1) AND state = 'deleting'",
                &[&hs],
            )
            .await?;
        })
    }

    async fn gc_interrupted(&self) -> Result<Vec<ChunkHash>> {
        // Only this node's own batches (or long-abandoned ones), taken over
        // atomically. Finishing another node's live batch would be unsafe:
        // it may finish first, the chunk be uploaded afresh, and our late
        // DELETE of the object then remove a chunk that is present again.
        write_tx!(self, |tx| {
            let now = now_ms();
            query(
                &tx,
                "UPDATE chunks SET gc_node = $1, updated_at_ms = $2
                 WHERE state = 'deleting' AND (gc_node = $1 OR gc_node IS NULL OR updated_at_ms < $3)
                 RETURNING hash",
                &[&self.node, &now, &(now - GC_TAKEOVER_MS)],
            )
            .await?
            .iter()
            .map(|r| hash_of(r.try_get::<_, &[u8]>(0)?))
            .collect::<R<Vec<_>>>()?
        })
    }

    async fn stored_len_of(&self, hashes: &[ChunkHash]) -> Result<u64> {
        let hs: Vec<&[u8]> = hashes.iter().map(|h| &h.0[..]).collect();
        read_tx!(self, |tx| {
            let n = query_one(
                &tx,
                "SELECT COALESCE(SUM(stored_len), 0)::BIGINT FROM chunks WHERE hash = ANY($1)",
                &[&hs],
            )
            .await?
            .try_get::<_, i64>(0)?;
            n.max(0) as u64
        })
    }

    async fn is_known_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        let h = &hash.0[..];
        read_tx!(self, |tx| {
            query_one(&tx, "SELECT EXISTS (SELECT 1 FROM chunks WHERE hash = $1)", &[&h])
                .await?
                .try_get::<_, bool>(0)?
        })
    }

    async fn stats(&self) -> Result<StoreStats> {
        read_tx!(self, |tx| {
            let r = query_one(
                &tx,
                "SELECT (SELECT COUNT(*) FROM volumes), (SELECT COUNT(*) FROM checkpoints),
                        (SELECT COUNT(*) FROM chunks WHERE state = 'present'),
                        (SELECT COALESCE(SUM(stored_len), 0)::BIGINT FROM chunks WHERE state = 'present'),
                        (SELECT COUNT(DISTINCT pending) FROM map_entries WHERE pending IS NOT NULL)",
                &[],
            )
            .await?;
            StoreStats {
                volumes: r.try_get::<_, i64>(0)? as u64,
                checkpoints: r.try_get::<_, i64>(1)? as u64,
                chunks: r.try_get::<_, i64>(2)? as u64,
                stored_bytes: r.try_get::<_, i64>(3)? as u64,
                pending: r.try_get::<_, i64>(4)? as u64,
            }
        })
    }

    async fn verify_refcounts(&self) -> Result<Vec<(ChunkHash, i64, i64)>> {
        read_tx!(self, |tx| {
            let rows = query(
                &tx,
                "SELECT COALESCE(a.hash, b.hash), COALESCE(a.n, 0), COALESCE(b.refs, -1) FROM
                    (SELECT hash, COUNT(*) AS n FROM map_entries WHERE hash IS NOT NULL GROUP BY hash) AS a
                 FULL OUTER JOIN chunks AS b ON a.hash = b.hash
                 WHERE COALESCE(a.n, 0) <> COALESCE(b.refs, -1)",
                &[],
            )
            .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        hash_of(r.try_get::<_, &[u8]>(0)?)?,
                        r.try_get::<_, i64>(1)?,
                        r.try_get::<_, i64>(2)?,
                    ))
                })
                .collect::<R<Vec<_>>>()?
        })
    }
}

#[async_trait]
impl ClusterMeta for PgMeta {
    async fn volume_owner(&self, volume_id: &str) -> Result<VolumeOwner> {
        read_tx!(self, |tx| {
            let v = volume_by_id(&tx, volume_id).await?;
            VolumeOwner {
                node: v.owner,
                epoch: v.epoch,
            }
        })
    }

    async fn claim_volume(&self, volume_id: &str, node: &str, seen_epoch: i64) -> Result<Option<i64>> {
        let epoch = write_tx!(self, |tx| {
            let row = query_opt(
                &tx,
                "UPDATE volumes SET owner = $2, epoch = epoch + 1 WHERE id = $1 AND epoch = $3 RETURNING epoch",
                &[&volume_id, &node, &seen_epoch],
            )
            .await?;
            match row {
                Some(r) => Some(r.try_get::<_, i64>(0)?),
                None => {
                    volume_by_id(&tx, volume_id).await?;
                    None
                }
            }
        })?;
        if let Some(e) = epoch {
            self.held.lock().insert(volume_id.to_string(), e);
        }
        Ok(epoch)
    }

    async fn release_volume(&self, volume_id: &str, node: &str, epoch: i64) -> Result<bool> {
        let released = write_tx!(self, |tx| {
            let n = execute(
                &tx,
                "UPDATE volumes SET owner = NULL WHERE id = $1 AND owner = $2 AND epoch = $3",
                &[&volume_id, &node, &epoch],
            )
            .await?;
            if n == 0 {
                volume_by_id(&tx, volume_id).await?;
            }
            n > 0
        })?;
        if released {
            let mut held = self.held.lock();
            if held.get(volume_id) == Some(&epoch) {
                held.remove(volume_id);
            }
        }
        Ok(released)
    }

    async fn sync_point(&self, volume_id: &str, seals: &[(u64, Option<PendingId>)]) -> Result<MapId> {
        write_tx!(self, |tx| {
            let v = self.lock_volume(&tx, volume_id).await?;
            apply_seals(&tx, &self.node, v.rec.head_map, seals).await?;
            let map = new_map(&tx, volume_id).await?;
            copy_map(&tx, v.rec.head_map, map).await?;
            if let Some(old) = v.sync_pending_map {
                drop_map(&tx, old).await?;
            }
            execute(
                &tx,
                "UPDATE volumes SET sync_pending_map = $2, sync_pending_at_ms = $3 WHERE id = $1",
                &[&volume_id, &map, &now_ms()],
            )
            .await?;
            map
        })
    }

    async fn promote_sync_point(&self, volume_id: &str, map: MapId) -> Result<()> {
        write_tx!(self, |tx| {
            let v = self.lock_volume(&tx, volume_id).await?;
            if v.sync_pending_map == Some(map) {
                // A durable sync point with pending slots would name files
                // of a cache that a new owner never sees.
                let pending: i64 = query_one(
                    &tx,
                    "SELECT COUNT(*) FROM map_entries WHERE pending IS NOT NULL AND map_id = $1",
                    &[&map],
                )
                .await?
                .try_get(0)?;
                if pending > 0 {
                    return Err(StoreError::InvalidArgument(format!(
                        "sync point map {map} of {} still has {pending} pending slots",
                        v.rec.name
                    ))
                    .into());
                }
                if let Some(old) = v.sync_map {
                    drop_map(&tx, old).await?;
                }
                execute(
                    &tx,
                    "UPDATE volumes SET sync_map = sync_pending_map, sync_at_ms = sync_pending_at_ms,
                         sync_pending_map = NULL, sync_pending_at_ms = NULL
                     WHERE id = $1",
                    &[&volume_id],
                )
                .await?;
            }
        })
    }

    async fn rollback_to_sync_point(&self, volume_id: &str) -> Result<Option<i64>> {
        write_tx!(self, |tx| {
            let v = self.lock_volume(&tx, volume_id).await?;
            match v.sync_map {
                Some(sync) => {
                    clear_map(&tx, v.rec.head_map).await?;
                    copy_map(&tx, sync, v.rec.head_map).await?;
                    v.sync_at_ms
                }
                None => None,
            }
        })
    }

    async fn sync_state(&self, volume_id: &str) -> Result<SyncState> {
        read_tx!(self, |tx| {
            let v = volume_by_id(&tx, volume_id).await?;
            SyncState {
                durable_map: v.sync_map,
                durable_at_ms: v.sync_at_ms,
                pending_map: v.sync_pending_map,
                pending_at_ms: v.sync_pending_at_ms,
            }
        })
    }
}
