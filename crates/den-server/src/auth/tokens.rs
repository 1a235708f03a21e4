//! Bearer tokens and the organisations they belong to: stored as BLAKE3
//! hashes (a token is 32 random bytes, so a fast hash is enough), compared
//! in constant time, kept in memory for the per-request check and in a
//! database for restarts: SQLite on a single node, PostgreSQL in cluster
//! mode (shared by every node).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::Pool;
use parking_lot::{Mutex, RwLock};
use rand::RngCore;
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{OrgLimits, Role};

/// A token as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// The organisation the token acts in.
    pub org: String,
    pub role: Role,
    /// When set, the token reaches only these sprites (names in its org).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sprites: Option<Vec<String>>,
    /// RFC 3339; the token is refused from then on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The server's administrator: acts on every organisation, manages them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub server_admin: bool,
}

impl TokenInfo {
    fn expired(&self, now: std::time::SystemTime) -> bool {
        self.expires_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|t| t <= now)
    }
}

/// What a new token may do.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub name: String,
    pub org: String,
    pub role: Role,
    pub sprites: Option<Vec<String>>,
    pub expires_at: Option<std::time::SystemTime>,
    pub server_admin: bool,
}

impl TokenSpec {
    /// An admin token of the default organisation: what every token was
    /// before organisations.
    pub fn named(name: &str) -> TokenSpec {
        TokenSpec {
            name: name.into(),
            server_admin: false,
            ..TokenSpec::server_admin()
        }
    }

    /// The bootstrap token: the server's administrator, in the default organisation.
    pub fn server_admin() -> TokenSpec {
        TokenSpec {
            name: "admin".into(),
            org: den_sprite::DEFAULT_ORG.into(),
            role: Role::Admin,
            sprites: None,
            expires_at: None,
            server_admin: true,
        }
    }
}

/// An organisation: its sprites, tokens and quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Org {
    /// Immutable identifier: in sprite keys and URLs (`<name>-<slug>`).
    pub slug: String,
    /// Display name.
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    pub limits: OrgLimits,
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
type OrgMap = BTreeMap<String, Org>;

/// What `verify` reads, shared with the PostgreSQL refresh task.
struct Shared {
    /// hash → info
    by_hash: RwLock<TokenMap>,
    /// slug → organisation
    orgs: RwLock<OrgMap>,
    /// Bumped, under the map's write lock, by every local create/revoke. A
    /// refresh whose query started before a bump may predate that change, so
    /// it discards its snapshot instead of undoing the change.
    local_changes: AtomicU64,
}

impl Shared {
    fn new(tokens: TokenMap, orgs: OrgMap) -> Arc<Shared> {
        Arc::new(Shared {
            by_hash: RwLock::new(tokens),
            orgs: RwLock::new(orgs),
            local_changes: AtomicU64::new(0),
        })
    }

    fn apply(&self, f: impl FnOnce(&mut TokenMap)) {
        let mut map = self.by_hash.write();
        f(&mut map);
        self.local_changes.fetch_add(1, Ordering::AcqRel);
    }

    fn apply_orgs(&self, f: impl FnOnce(&mut OrgMap, &mut TokenMap)) {
        let mut tokens = self.by_hash.write();
        let mut orgs = self.orgs.write();
        f(&mut orgs, &mut tokens);
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

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A fresh token: its listing, its secret and the secret's hash.
fn mint(spec: &TokenSpec) -> (TokenInfo, String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let secret = format!("den_{}", hex::encode(raw));
    let info = TokenInfo {
        id: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
        name: spec.name.clone(),
        created_at: rfc3339(std::time::SystemTime::now()),
        org: spec.org.clone(),
        role: spec.role,
        sprites: spec.sprites.clone(),
        expires_at: spec.expires_at.map(rfc3339),
        server_admin: spec.server_admin,
    };
    let h = hash(&secret);
    (info, secret, h)
}

/// The token table's columns, in the order [`token_row`] reads them.
const TOKEN_COLUMNS: &str = "id, name, hash, created_at, org, role, sprites, expires_at, server_admin";

/// One token row as stored: every column is text or an integer flag, so both
/// databases read it the same way.
struct TokenRow {
    id: String,
    name: String,
    hash: String,
    created_at: String,
    org: String,
    role: String,
    sprites: Option<String>,
    expires_at: Option<String>,
    server_admin: bool,
}

impl TokenRow {
    fn of(info: &TokenInfo, h: &[u8; 32]) -> TokenRow {
        TokenRow {
            id: info.id.clone(),
            name: info.name.clone(),
            hash: hex::encode(h),
            created_at: info.created_at.clone(),
            org: info.org.clone(),
            role: info.role.as_str().to_string(),
            sprites: info
                .sprites
                .as_ref()
                .map(|s| serde_json::to_string(s).expect("a list of strings encodes")),
            expires_at: info.expires_at.clone(),
            server_admin: info.server_admin,
        }
    }

    /// `None` for a row this version can't read (unknown role, bad hash):
    /// such a token is refused rather than guessed at.
    fn decode(self) -> Option<([u8; 32], TokenInfo)> {
        let key = decode_hash(&self.hash)?;
        let role = self.role.parse().ok()?;
        let sprites = match self.sprites {
            Some(s) => Some(serde_json::from_str(&s).ok()?),
            None => None,
        };
        Some((
            key,
            TokenInfo {
                id: self.id,
                name: self.name,
                created_at: self.created_at,
                org: self.org,
                role,
                sprites,
                expires_at: self.expires_at,
                server_admin: self.server_admin,
            },
        ))
    }
}

fn org_of(slug: String, name: String, created_at: String, limits: &str) -> Org {
    Org {
        slug,
        name,
        created_at,
        // Limits this version can't read fall back to none rather than
        // locking the organisation out; the server-wide limits still hold.
        limits: serde_json::from_str(limits).unwrap_or_default(),
    }
}

fn default_org() -> Org {
    Org {
        slug: den_sprite::DEFAULT_ORG.into(),
        name: den_sprite::DEFAULT_ORG.into(),
        created_at: rfc3339(std::time::SystemTime::now()),
        limits: OrgLimits::default(),
    }
}

async fn pg_insert_token(c: &impl deadpool_postgres::GenericClient, r: &TokenRow) -> Result<(), TokenError> {
    c.execute(
        &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
        &[
            &r.id,
            &r.name,
            &r.hash,
            &r.created_at,
            &r.org,
            &r.role,
            &r.sprites,
            &r.expires_at,
            &r.server_admin,
        ],
    )
    .await?;
    Ok(())
}

async fn pg_load(pool: &Pool) -> Result<(TokenMap, OrgMap), TokenError> {
    let client = pool.get().await?;
    let rows = client
        .query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"), &[])
        .await?;
    let mut map = HashMap::with_capacity(rows.len());
    for r in rows {
        let row = TokenRow {
            id: r.get(0),
            name: r.get(1),
            hash: r.get(2),
            created_at: r.get(3),
            org: r.get(4),
            role: r.get(5),
            sprites: r.get(6),
            expires_at: r.get(7),
            server_admin: r.get(8),
        };
        if let Some((k, info)) = row.decode() {
            map.insert(k, info);
        }
    }
    let mut orgs = BTreeMap::new();
    for r in client
        .query("SELECT slug, name, created_at, limits FROM orgs", &[])
        .await?
    {
        let org = org_of(r.get(0), r.get(1), r.get(2), r.get::<_, &str>(3));
        orgs.insert(org.slug.clone(), org);
    }
    Ok((map, orgs))
}

/// Replace the map with the database's tokens, unless a local change raced the query.
async fn pg_refresh(pool: &Pool, shared: &Shared) -> Result<(), TokenError> {
    // A local change between this load and the swap means the snapshot may lack it;
    // retry at once rather than wait a whole interval.
    for _ in 0..3 {
        let before = shared.local_changes.load(Ordering::Acquire);
        let (map, orgs) = pg_load(pool).await?;
        let mut current = shared.by_hash.write();
        let mut current_orgs = shared.orgs.write();
        if shared.local_changes.load(Ordering::Acquire) == before {
            *current = map;
            *current_orgs = orgs;
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

/// The schema of both databases before organisations; [`tenancy_columns`]
/// completes `tokens`.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS orgs (
        slug TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        limits TEXT NOT NULL
    )";

/// Columns added by organisations. Every token of an older data dir was an
/// administrator of the only tenant, so it lands in the default organisation
/// as an admin; [`MARK_BOOTSTRAP_ADMIN`] then gives the server back its
/// administrator.
fn tenancy_columns(flag: &str, falsy: &str) -> [String; 5] {
    [
        format!("org TEXT NOT NULL DEFAULT '{}'", den_sprite::DEFAULT_ORG),
        "role TEXT NOT NULL DEFAULT 'admin'".into(),
        "sprites TEXT".into(),
        "expires_at TEXT".into(),
        format!("server_admin {flag} NOT NULL DEFAULT {falsy}"),
    ]
}

/// The token the first start minted (`admin`, the oldest of that name) is
/// the one in `DATA_DIR/admin-token`: it becomes the server administrator.
const MARK_BOOTSTRAP_ADMIN: &str = "UPDATE tokens SET server_admin = {truthy} WHERE id = \
     (SELECT id FROM tokens WHERE name = 'admin' ORDER BY created_at, id LIMIT 1)";

impl TokenStore {
    pub fn open(path: &Path) -> Result<TokenStore, TokenError> {
        den_store::meta::sqlite::restrict_db_files(path)?;
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA)?;
            let migrated: bool = tx.query_row(
                "SELECT count(*) FROM pragma_table_info('tokens') WHERE name = 'server_admin'",
                [],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if !migrated {
                for col in tenancy_columns("INTEGER", "0") {
                    tx.execute_batch(&format!("ALTER TABLE tokens ADD COLUMN {col}"))?;
                }
                tx.execute_batch(&MARK_BOOTSTRAP_ADMIN.replace("{truthy}", "1"))?;
            }
            let d = default_org();
            tx.execute(
                "INSERT INTO orgs (slug, name, created_at, limits) VALUES (?1, ?2, ?3, '{}') ON CONFLICT DO NOTHING",
                params![d.slug, d.name, d.created_at],
            )?;
            tx.commit()?;
        }
        let mut map = HashMap::new();
        {
            let mut stmt = conn.prepare(&format!("SELECT {TOKEN_COLUMNS} FROM tokens"))?;
            let rows = stmt.query_map([], |r| {
                Ok(TokenRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    hash: r.get(2)?,
                    created_at: r.get(3)?,
                    org: r.get(4)?,
                    role: r.get(5)?,
                    sprites: r.get(6)?,
                    expires_at: r.get(7)?,
                    server_admin: r.get(8)?,
                })
            })?;
            for row in rows {
                if let Some((k, info)) = row?.decode() {
                    map.insert(k, info);
                }
            }
        }
        let mut orgs = BTreeMap::new();
        {
            let mut stmt = conn.prepare("SELECT slug, name, created_at, limits FROM orgs")?;
            let rows = stmt.query_map([], |r| {
                Ok(org_of(r.get(0)?, r.get(1)?, r.get(2)?, &r.get::<_, String>(3)?))
            })?;
            for org in rows {
                let org = org?;
                orgs.insert(org.slug.clone(), org);
            }
        }
        Ok(TokenStore {
            backend: Backend::Sqlite(Mutex::new(conn)),
            shared: Shared::new(map, orgs),
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
            tx.batch_execute(&format!(
                "{};
                CREATE TABLE IF NOT EXISTS cluster_markers (
                    name TEXT PRIMARY KEY,
                    value TEXT NOT NULL,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
                )",
                SCHEMA
            ))
            .await?;
            let migrated = tx
                .query_opt(
                    "SELECT 1 FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = 'tokens' AND column_name = 'server_admin'",
                    &[],
                )
                .await?
                .is_some();
            if !migrated {
                for col in tenancy_columns("BOOLEAN", "false") {
                    tx.batch_execute(&format!("ALTER TABLE tokens ADD COLUMN {col}"))
                        .await?;
                }
                tx.batch_execute(&MARK_BOOTSTRAP_ADMIN.replace("{truthy}", "true"))
                    .await?;
            }
            let d = default_org();
            tx.execute(
                "INSERT INTO orgs (slug, name, created_at, limits) VALUES ($1, $2, $3, '{}') ON CONFLICT DO NOTHING",
                &[&d.slug, &d.name, &d.created_at],
            )
            .await?;
            tx.commit().await?;
        }
        let (tokens, orgs) = pg_load(&pool).await?;
        let shared = Shared::new(tokens, orgs);
        let refresher = tokio::spawn(refresh_loop(pool.clone(), Arc::downgrade(&shared))).abort_handle();
        Ok(TokenStore {
            backend: Backend::Postgres { pool, refresher },
            shared,
        })
    }

    async fn insert_token(&self, info: &TokenInfo, h: &[u8; 32]) -> Result<(), TokenError> {
        let r = TokenRow::of(info, h);
        match &self.backend {
            Backend::Sqlite(conn) => {
                conn.lock().execute(
                    &format!(
                        "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                    ),
                    params![
                        r.id,
                        r.name,
                        r.hash,
                        r.created_at,
                        r.org,
                        r.role,
                        r.sprites,
                        r.expires_at,
                        r.server_admin
                    ],
                )?;
            }
            Backend::Postgres { pool, .. } => {
                let client = pool.get().await?;
                pg_insert_token(&client, &r).await?;
            }
        }
        Ok(())
    }

    /// Mint a token; the secret is returned once and never stored.
    pub async fn create(&self, spec: &TokenSpec) -> Result<(TokenInfo, String), TokenError> {
        let (info, secret, h) = mint(spec);
        self.insert_token(&info, &h).await?;
        self.shared.apply(|m| {
            m.insert(h, info.clone());
        });
        Ok((info, secret))
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self.shared.by_hash.read().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// The token with this id.
    pub fn get(&self, id: &str) -> Option<TokenInfo> {
        self.shared.by_hash.read().values().find(|t| t.id == id).cloned()
    }

    /// Revoke by id; false if there is no such token.
    pub async fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let n = self.exec_text("DELETE FROM tokens WHERE id = $1", &[id]).await?;
        self.shared.apply(|m| m.retain(|_, t| t.id != id));
        Ok(n > 0)
    }

    /// The token a secret belongs to, unless it expired.
    pub fn verify(&self, secret: &str) -> Option<TokenInfo> {
        let h = hash(secret);
        let map = self.shared.by_hash.read();
        // Compare against every stored hash so timing says nothing about
        // which (or whether one) matched.
        let mut found = None;
        for (k, info) in map.iter() {
            if bool::from(k.ct_eq(&h)) {
                found = Some(info);
            }
        }
        let info = found?;
        // A token of a deleted organisation is dead even before the refresh
        // that removes it reaches this node.
        if info.expired(std::time::SystemTime::now()) || !self.shared.orgs.read().contains_key(&info.org) {
            return None;
        }
        Some(info.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.shared.by_hash.read().is_empty()
    }

    /// Every organisation, by slug.
    pub fn orgs(&self) -> Vec<Org> {
        self.shared.orgs.read().values().cloned().collect()
    }

    pub fn org(&self, slug: &str) -> Option<Org> {
        self.shared.orgs.read().get(slug).cloned()
    }

    /// Run one statement whose parameters are all text, on whichever
    /// database holds the tokens; `sql` numbers them `$1…` (PostgreSQL's
    /// form, which SQLite reads as `?1…`). Returns the rows changed.
    async fn exec_text(&self, sql: &str, args: &[&str]) -> Result<u64, TokenError> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let sql = sql.replace('$', "?");
                Ok(conn
                    .lock()
                    .execute(&sql, rusqlite::params_from_iter(args.iter()))? as u64)
            }
            Backend::Postgres { pool, .. } => {
                let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
                    .iter()
                    .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                Ok(pool.get().await?.execute(sql, &args).await?)
            }
        }
    }

    /// Create an organisation; false if the slug is taken.
    pub async fn create_org(&self, org: &Org) -> Result<bool, TokenError> {
        let limits = serde_json::to_string(&org.limits).expect("limits encode");
        let n = self
            .exec_text(
                "INSERT INTO orgs (slug, name, limits, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&org.slug, &org.name, &limits, &org.created_at],
            )
            .await?;
        Ok(self.remember_org(n, org))
    }

    /// Replace an organisation's name and limits; false if there is none.
    pub async fn update_org(&self, org: &Org) -> Result<bool, TokenError> {
        let limits = serde_json::to_string(&org.limits).expect("limits encode");
        let n = self
            .exec_text(
                "UPDATE orgs SET name = $2, limits = $3 WHERE slug = $1",
                &[&org.slug, &org.name, &limits],
            )
            .await?;
        Ok(self.remember_org(n, org))
    }

    /// After a write of `org` that changed `n` rows: this node's view, and
    /// whether there was anything to change.
    fn remember_org(&self, n: u64, org: &Org) -> bool {
        if n > 0 {
            self.shared.apply_orgs(|orgs, _| {
                orgs.insert(org.slug.clone(), org.clone());
            });
        }
        n > 0
    }

    /// Delete an organisation and every token of it, in one transaction;
    /// false if there is none. Its sprites are the caller's business.
    pub async fn delete_org(&self, slug: &str) -> Result<bool, TokenError> {
        let n = match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = conn.lock();
                let tx = conn.transaction()?;
                tx.execute("DELETE FROM tokens WHERE org = ?1", params![slug])?;
                let n = tx.execute("DELETE FROM orgs WHERE slug = ?1", params![slug])?;
                tx.commit()?;
                n as u64
            }
            Backend::Postgres { pool, .. } => {
                let mut client = pool.get().await?;
                let tx = client.transaction().await?;
                tx.execute("DELETE FROM tokens WHERE org = $1", &[&slug]).await?;
                let n = tx.execute("DELETE FROM orgs WHERE slug = $1", &[&slug]).await?;
                tx.commit().await?;
                n
            }
        };
        self.shared.apply_orgs(|orgs, tokens| {
            orgs.remove(slug);
            tokens.retain(|_, t| t.org != slug);
        });
        Ok(n > 0)
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
    let (_, secret) = tokens.create(&TokenSpec::server_admin()).await?;
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
    let (info, secret, h) = mint(&TokenSpec::server_admin());
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
        pg_insert_token(&tx, &TokenRow::of(&info, &h)).await?;
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
