//! The catalog in PostgreSQL, for cluster mode: every node sees the same
//! sprites, and the database (not a node) decides who gets a name.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::catalog::Catalog;
use crate::error::{Result, SpriteError};
use crate::record::SpriteRecord;

/// Key of the advisory lock that serialises schema creation: two nodes
/// running `CREATE TABLE IF NOT EXISTS` at once can both pass the existence
/// check and one then fails on the catalog's unique index.
const SCHEMA_LOCK: i64 = 0x6465_6e5f_7370_7231; // "den_spr1"

const MAX_CONNECTIONS: usize = 8;

/// Records as JSONB documents in the `sprites` table of a shared database.
///
/// Connections come from a pool that verifies each one before handing it
/// out, so after a database restart the next call reconnects instead of
/// failing on a dead socket.
pub struct PgCatalog {
    pool: Pool,
}

fn pg_err(context: &str, e: impl std::fmt::Display) -> SpriteError {
    SpriteError::Catalog(format!("{context}: {e}"))
}

impl PgCatalog {
    /// Connect to `url` (`postgres://user@host:port/db`) and create the
    /// schema if it is missing. Fails if the database is unreachable.
    pub async fn connect(url: &str) -> Result<PgCatalog> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| SpriteError::Invalid(format!("PostgreSQL URL: {e}")))?;
        if cfg.get_connect_timeout().is_none() {
            // An unreachable host must fail a request, not hang it.
            cfg.connect_timeout(Duration::from_secs(10));
        }
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(MAX_CONNECTIONS)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| pg_err("building the connection pool", e))?;
        let cat = PgCatalog { pool };
        cat.create_schema().await?;
        Ok(cat)
    }

    async fn create_schema(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_err("creating the catalog schema", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(|e| pg_err("creating the catalog schema", e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sprites (
                name TEXT PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                record JSONB NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(|e| pg_err("creating the catalog schema", e))?;
        tx.commit()
            .await
            .map_err(|e| pg_err("creating the catalog schema", e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| pg_err("connecting to PostgreSQL", e))
    }

    fn decode(name: &str, json: &str) -> Result<SpriteRecord> {
        serde_json::from_str(json)
            .map_err(|e| SpriteError::Catalog(format!("record of {name} is unreadable: {e}")))
    }

    fn encode(rec: &SpriteRecord) -> Result<String> {
        serde_json::to_string(rec).map_err(|e| SpriteError::Catalog(e.to_string()))
    }
}

// JSON travels as text (`$n::text::jsonb` in, `record::text` out) so the
// driver needs no serde_json feature and the record decodes exactly as the
// SQLite catalog's does. `list` sorts by byte order (COLLATE "C"), as SQLite
// does, whatever the database's locale.
#[async_trait]
impl Catalog for PgCatalog {
    async fn insert(&self, rec: &SpriteRecord) -> Result<()> {
        let json = Self::encode(rec)?;
        // One statement: the unique indexes decide between racing nodes, and
        // DO NOTHING turns the loser's conflict into "0 rows" instead of an error.
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO sprites (name, id, record) VALUES ($1, $2, $3::text::jsonb)
                 ON CONFLICT DO NOTHING",
                &[&rec.name, &rec.id, &json],
            )
            .await
            .map_err(|e| pg_err(&format!("inserting {}", rec.name), e))?;
        if n == 0 {
            return Err(SpriteError::Exists(rec.name.clone()));
        }
        Ok(())
    }

    async fn update(&self, rec: &SpriteRecord) -> Result<()> {
        let json = Self::encode(rec)?;
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE sprites SET record = $2::text::jsonb, updated_at = now() WHERE name = $1",
                &[&rec.name, &json],
            )
            .await
            .map_err(|e| pg_err(&format!("updating {}", rec.name), e))?;
        if n == 0 {
            return Err(SpriteError::NotFound(rec.name.clone()));
        }
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<SpriteRecord>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT record::text FROM sprites WHERE name = $1", &[&name])
            .await
            .map_err(|e| pg_err(&format!("reading {name}"), e))?;
        row.map(|r| Self::decode(name, r.get(0))).transpose()
    }

    async fn list(&self) -> Result<Vec<SpriteRecord>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, record::text FROM sprites ORDER BY name COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(|e| pg_err("listing sprites", e))?;
        rows.iter().map(|r| Self::decode(r.get(0), r.get(1))).collect()
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.client()
            .await?
            .execute("DELETE FROM sprites WHERE name = $1", &[&name])
            .await
            .map_err(|e| pg_err(&format!("deleting {name}"), e))?;
        Ok(())
    }
}
