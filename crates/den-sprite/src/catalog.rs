//! The catalog: every sprite's durable record (name, ids, volume, policy,
//! services, API attributes). Everything a sprite is, besides its disk,
//! lives here, so a host restart brings every sprite back (cold).
//!
//! [`Catalog`] is a trait so that cluster mode can keep records in
//! PostgreSQL; [`SqliteCatalog`] is the embedded single-node default.

use std::path::Path;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Result, SpriteError};
use crate::record::SpriteRecord;

#[async_trait]
pub trait Catalog: Send + Sync {
    /// Insert a new record; [`SpriteError::Exists`] if the name is taken.
    async fn insert(&self, rec: &SpriteRecord) -> Result<()>;
    /// Replace the record with the same name; [`SpriteError::NotFound`] if there is none.
    async fn update(&self, rec: &SpriteRecord) -> Result<()>;
    async fn get(&self, name: &str) -> Result<Option<SpriteRecord>>;
    /// All records, ordered by name.
    async fn list(&self) -> Result<Vec<SpriteRecord>>;
    async fn delete(&self, name: &str) -> Result<()>;
}

/// Records as JSON documents in one SQLite table (`sprites.db`, WAL,
/// `synchronous=FULL`: an acknowledged change survives a power cut).
pub struct SqliteCatalog {
    conn: Mutex<Connection>,
}

impl SqliteCatalog {
    pub fn open(path: &Path) -> Result<Self> {
        den_store::meta::sqlite::restrict_db_files(path)
            .map_err(|e| SpriteError::io(format!("securing {}", path.display()), e))?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sprites (
                name TEXT PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                record TEXT NOT NULL
            )",
        )?;
        Ok(SqliteCatalog {
            conn: Mutex::new(conn),
        })
    }

    fn decode(name: &str, json: &str) -> Result<SpriteRecord> {
        decode_record(name, json)
    }

    fn encode(rec: &SpriteRecord) -> Result<String> {
        encode_record(rec)
    }
}

/// Records are stored as JSON documents by every catalog backend.
pub(crate) fn decode_record(name: &str, json: &str) -> Result<SpriteRecord> {
    serde_json::from_str(json)
        .map_err(|e| SpriteError::Catalog(format!("record of {name} is unreadable: {e}")))
}

pub(crate) fn encode_record(rec: &SpriteRecord) -> Result<String> {
    serde_json::to_string(rec).map_err(|e| SpriteError::Catalog(e.to_string()))
}

// The statements touch one small row, so they run inline rather than on the
// blocking pool: a commit is a WAL append plus one fsync.
#[async_trait]
impl Catalog for SqliteCatalog {
    async fn insert(&self, rec: &SpriteRecord) -> Result<()> {
        let json = Self::encode(rec)?;
        let conn = self.conn.lock();
        let n = conn.execute(
            "INSERT INTO sprites (name, id, record) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![rec.name, rec.id, json],
        )?;
        if n == 0 {
            return Err(SpriteError::Exists(rec.name.clone()));
        }
        Ok(())
    }

    async fn update(&self, rec: &SpriteRecord) -> Result<()> {
        let json = Self::encode(rec)?;
        let n = self.conn.lock().execute(
            "UPDATE sprites SET record = ?2 WHERE name = ?1",
            params![rec.name, json],
        )?;
        if n == 0 {
            return Err(SpriteError::NotFound(rec.name.clone()));
        }
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<SpriteRecord>> {
        let json: Option<String> = self
            .conn
            .lock()
            .query_row("SELECT record FROM sprites WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .optional()?;
        json.map(|j| Self::decode(name, &j)).transpose()
    }

    async fn list(&self) -> Result<Vec<SpriteRecord>> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare("SELECT name, record FROM sprites ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json) = row?;
            out.push(Self::decode(&name, &json)?);
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.conn
            .lock()
            .execute("DELETE FROM sprites WHERE name = ?1", params![name])?;
        Ok(())
    }
}
