//! Bearer tokens: stored as BLAKE3 hashes (a token is 32 random bytes, so a
//! fast hash is enough), compared in constant time, kept in memory for the
//! per-request check and in a database for restarts: SQLite on a single node,
//! PostgreSQL in cluster mode (shared by every node).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Pool;
use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use rusqlite::{Connection, params};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// A token as listed (never with its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("token database (PostgreSQL): {0}")]
    Postgres(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<tokio_postgres::Error> for TokenError {
    fn from(e: tokio_postgres::Error) -> Self {
        TokenError::Postgres(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for TokenError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        TokenError::Postgres(format!("connecting: {e}"))
    }
}

/// How often a PostgreSQL-backed store reloads its map: the delay before a
/// token minted or revoked on another node takes effect here.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A refresh that takes longer than this is abandoned (a half-dead TCP
/// connection must not stop later refreshes).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Advisory lock key serialising schema creation between nodes starting together.
const SCHEMA_LOCK: i64 = 0x6465_6e5f_746f_6b31; // "den_tok1"

/// Row of `cluster_markers` whose existence means the cluster's admin token was minted.
const ADMIN_MARKER: &str = "admin-token-created";

type TokenMap = HashMap<[u8; 32], TokenInfo>;

/// What `verify` reads, shared with the PostgreSQL refresh task.
struct Shared {
    /// hash → info
    by_hash: RwLock<TokenMap>,
    /// Bumped, under the map's write lock, by every local create/revoke. A
    /// refresh whose query started before a bump may predate that change, so
    /// it discards its snapshot instead of undoing the change.
    local_changes: AtomicU64,
}

impl Shared {
    fn apply(&self, f: impl FnOnce(&mut TokenMap)) {
        let mut map = self.by_hash.write();
        f(&mut map);
        self.local_changes.fetch_add(1, Ordering::AcqRel);
    }
}

enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres {
        pool: Pool,
        refresher: tokio::task::AbortHandle,
    },
}

/// The API tokens.
///
/// [`TokenStore::verify`] is synchronous and constant-time over an in-memory
/// map, whatever the backend. With SQLite ([`TokenStore::open`]) this node
/// owns the tokens and the map is always exact. With PostgreSQL
/// ([`TokenStore::open_postgres`], cluster mode) every node shares the
/// `tokens` table: `create`/`revoke` write the database and update this
/// node's map at once, and a background task reloads the map from the
/// database every [`REFRESH_INTERVAL`] (one second). So a token minted on one
/// node is accepted by every other node within about a second, and a revoked
/// one is refused everywhere within about a second. While the database is
/// unreachable the last loaded map stays in force (requests keep working;
/// changes made on other nodes arrive once it is back).
pub struct TokenStore {
    backend: Backend,
    shared: Arc<Shared>,
}

impl Drop for TokenStore {
    fn drop(&mut self) {
        if let Backend::Postgres { refresher, .. } = &self.backend {
            refresher.abort();
        }
    }
}

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

fn decode_hash(h: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(h, &mut key).ok().map(|_| key)
}

/// A fresh token: its listing, its secret and the secret's hash.
fn mint(name: &str) -> (TokenInfo, String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let secret = format!("den_{}", hex::encode(raw));
    let info = TokenInfo {
        id: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
        name: name.to_string(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let h = hash(&secret);
    (info, secret, h)
}

async fn pg_load(pool: &Pool) -> Result<TokenMap, TokenError> {
    let rows = pool
        .get()
        .await?
        .query("SELECT id, name, hash, created_at FROM tokens", &[])
        .await?;
    let mut map = HashMap::with_capacity(rows.len());
    for r in rows {
        if let Some(key) = decode_hash(r.get(2)) {
            map.insert(
                key,
                TokenInfo {
                    id: r.get(0),
                    name: r.get(1),
                    created_at: r.get(3),
                },
            );
        }
    }
    Ok(map)
}

/// Replace the map with the database's tokens, unless a local change raced the query.
async fn pg_refresh(pool: &Pool, shared: &Shared) -> Result<(), TokenError> {
    // A local change between this load and the swap means the snapshot may lack it;
    // retry at once rather than wait a whole interval.
    for _ in 0..3 {
        let before = shared.local_changes.load(Ordering::Acquire);
        let map = pg_load(pool).await?;
        let mut current = shared.by_hash.write();
        if shared.local_changes.load(Ordering::Acquire) == before {
            *current = map;
            return Ok(());
        }
    }
    Ok(())
}

async fn refresh_loop(pool: Pool, shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let res = match tokio::time::timeout(REFRESH_TIMEOUT, pg_refresh(&pool, &shared)).await {
            Ok(r) => r,
            Err(_) => Err(TokenError::Postgres(format!(
                "no answer within {REFRESH_TIMEOUT:?}"
            ))),
        };
        // Log the start and the end of an outage, not every second of it.
        match res {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("token refresh from PostgreSQL works again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "token refresh from PostgreSQL failed; keeping the last tokens");
            }
            Err(_) => {}
        }
    }
}

fn pg_pool(url: &str) -> Result<Pool, TokenError> {
    den_store::pg::pool(url, 4, "den-tokens").map_err(|e| TokenError::Postgres(e.to_string()))
}

impl TokenStore {
    pub fn open(path: &Path) -> Result<TokenStore, TokenError> {
        den_store::meta::sqlite::restrict_db_files(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                hash TEXT NOT NULL UNIQUE,
                created_at TEXT NOT NULL
            )",
        )?;
        let mut map = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT id, name, hash, created_at FROM tokens")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    TokenInfo {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        created_at: r.get(3)?,
                    },
                    r.get::<_, String>(2)?,
                ))
            })?;
            for row in rows {
                let (info, h) = row?;
                if let Some(key) = decode_hash(&h) {
                    map.insert(key, info);
                }
            }
        }
        Ok(TokenStore {
            backend: Backend::Sqlite(Mutex::new(conn)),
            shared: Arc::new(Shared {
                by_hash: RwLock::new(map),
                local_changes: AtomicU64::new(0),
            }),
        })
    }

    /// Cluster mode: tokens in the PostgreSQL database at `url`, shared by
    /// every node (see the type's documentation for how fast changes
    /// propagate). Creates the schema if missing, loads the tokens and starts
    /// the refresh task, which ends when the store is dropped. Must be called
    /// inside a Tokio runtime.
    pub async fn open_postgres(url: &str) -> Result<TokenStore, TokenError> {
        let pool = pg_pool(url)?;
        {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS tokens (
                    id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    hash TEXT NOT NULL UNIQUE,
                    created_at TEXT NOT NULL
                );
                CREATE TABLE IF NOT EXISTS cluster_markers (
                    name TEXT PRIMARY KEY,
                    value TEXT NOT NULL,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
            )
            .await?;
            tx.commit().await?;
        }
        let shared = Arc::new(Shared {
            by_hash: RwLock::new(pg_load(&pool).await?),
            local_changes: AtomicU64::new(0),
        });
        let refresher = tokio::spawn(refresh_loop(pool.clone(), Arc::downgrade(&shared))).abort_handle();
        Ok(TokenStore {
            backend: Backend::Postgres { pool, refresher },
            shared,
        })
    }

    /// Mint a token; the secret is returned once and never stored.
    pub async fn create(&self, name: &str) -> Result<(TokenInfo, String), TokenError> {
        let (info, secret, h) = mint(name);
        match &self.backend {
            Backend::Sqlite(conn) => {
                conn.lock().execute(
                    "INSERT INTO tokens (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![info.id, info.name, hex::encode(h), info.created_at],
                )?;
            }
            Backend::Postgres { pool, .. } => {
                pool.get()
                    .await?
                    .execute(
                        "INSERT INTO tokens (id, name, hash, created_at) VALUES ($1, $2, $3, $4)",
                        &[&info.id, &info.name, &hex::encode(h), &info.created_at],
                    )
                    .await?;
            }
        }
        self.shared.apply(|m| {
            m.insert(h, info.clone());
        });
        Ok((info, secret))
    }

    pub fn list(&self) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self.shared.by_hash.read().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Revoke by id; false if there is no such token.
    pub async fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let n = match &self.backend {
            Backend::Sqlite(conn) => {
                conn.lock()
                    .execute("DELETE FROM tokens WHERE id = ?1", params![id])? as u64
            }
            Backend::Postgres { pool, .. } => {
                pool.get()
                    .await?
                    .execute("DELETE FROM tokens WHERE id = $1", &[&id])
                    .await?
            }
        };
        self.shared.apply(|m| m.retain(|_, t| t.id != id));
        Ok(n > 0)
    }

    /// The token a secret belongs to.
    pub fn verify(&self, secret: &str) -> Option<TokenInfo> {
        let h = hash(secret);
        let map = self.shared.by_hash.read();
        // Compare against every stored hash so timing says nothing about
        // which (or whether one) matched.
        let mut found = None;
        for (k, info) in map.iter() {
            if bool::from(k.ct_eq(&h)) {
                found = Some(info.clone());
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.shared.by_hash.read().is_empty()
    }
}

/// Write `secret` to `path`, 0600, durably.
fn write_secret(path: &Path, secret: &str) -> Result<(), TokenError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// First start: mint the admin token and write it to `DATA_DIR/admin-token`
/// (0600). Later starts leave an existing file alone.
///
/// In cluster mode (PostgreSQL) the whole cluster gets one admin token: the
/// first node to record `admin-token-created` in the database mints it and
/// holds its file; every other node writes no file and logs where it is.
/// The row (table `cluster_markers`) names the holder as `host:path`;
/// deleting it lets the next node to start mint a fresh admin token.
pub async fn ensure_admin_token(tokens: &TokenStore, data_dir: &Path) -> Result<Option<PathBuf>, TokenError> {
    let path = data_dir.join("admin-token");
    if let Backend::Postgres { pool, .. } = &tokens.backend {
        return ensure_cluster_admin_token(tokens, pool, &path).await;
    }
    if !tokens.is_empty() && path.exists() {
        return Ok(None);
    }
    if !tokens.is_empty() {
        // Tokens exist but the file is gone: the operator removed it on purpose.
        return Ok(None);
    }
    let (_, secret) = tokens.create("admin").await?;
    write_secret(&path, &secret)?;
    Ok(Some(path))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

async fn ensure_cluster_admin_token(
    tokens: &TokenStore,
    pool: &Pool,
    path: &Path,
) -> Result<Option<PathBuf>, TokenError> {
    let mut client = pool.get().await?;
    let existing = client
        .query_opt(
            "SELECT value FROM cluster_markers WHERE name = $1",
            &[&ADMIN_MARKER],
        )
        .await?;
    if let Some(row) = existing {
        if !path.exists() {
            let holder: String = row.get(0);
            tracing::info!(
                holder = %holder,
                "the cluster's admin token lives with the node that created it; this node writes no admin-token file"
            );
        }
        return Ok(None);
    }
    let (info, secret, h) = mint("admin");
    // The secret is on disk before the database says it exists, so a crash
    // between the two can't leave a cluster whose admin token nobody has.
    let tmp = path.with_extension("tmp");
    write_secret(&tmp, &secret)?;
    let holder = format!("{}:{}", hostname(), path.display());
    let won = async {
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "INSERT INTO cluster_markers (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&ADMIN_MARKER, &holder],
            )
            .await?;
        if n == 0 {
            tx.rollback().await?;
            return Ok::<_, TokenError>(None);
        }
        tx.execute(
            "INSERT INTO tokens (id, name, hash, created_at) VALUES ($1, $2, $3, $4)",
            &[&info.id, &info.name, &hex::encode(h), &info.created_at],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(()))
    }
    .await;
    match won {
        Ok(Some(())) => {
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            tokens.shared.apply(|m| {
                m.insert(h, info);
            });
            Ok(Some(path.to_path_buf()))
        }
        Ok(None) => {
            let _ = std::fs::remove_file(&tmp);
            let holder = client
                .query_opt(
                    "SELECT value FROM cluster_markers WHERE name = $1",
                    &[&ADMIN_MARKER],
                )
                .await?
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_default();
            tracing::info!(
                holder = %holder,
                "another node minted the cluster's admin token at the same time; it lives with that node, this node writes no admin-token file"
            );
            Ok(None)
        }
        Err(e) => {
            // The commit's outcome is unknown if the connection broke during it:
            // keep the file so the secret is not lost if the token did land.
            tracing::warn!(file = %tmp.display(), "minting the cluster admin token failed; its secret stays in this file in case the commit landed");
            Err(e)
        }
    }
}

/// The secret from `Authorization: Bearer <t>`.
pub fn bearer(req: &Request) -> Option<String> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

/// Middleware: every API route requires a valid token (WebSocket upgrades too).
pub async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match bearer(&req).and_then(|t| state.tokens.verify(&t)) {
        Some(_) => next.run(req).await,
        None => ApiError::unauthorized().into_response(),
    }
}
