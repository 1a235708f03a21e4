//! Bearer tokens: stored as BLAKE3 hashes (a token is 32 random bytes, so a
//! fast hash is enough), compared in constant time, kept in memory for the
//! per-request check and in SQLite for restarts.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub struct TokenStore {
    conn: Mutex<Connection>,
    /// hash → info
    by_hash: RwLock<HashMap<[u8; 32], TokenInfo>>,
}

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

impl TokenStore {
    pub fn open(path: &Path) -> Result<TokenStore, TokenError> {
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
                let mut key = [0u8; 32];
                if hex::decode_to_slice(&h, &mut key).is_ok() {
                    map.insert(key, info);
                }
            }
        }
        Ok(TokenStore {
            conn: Mutex::new(conn),
            by_hash: RwLock::new(map),
        })
    }

    /// Mint a token; the secret is returned once and never stored.
    pub fn create(&self, name: &str) -> Result<(TokenInfo, String), TokenError> {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let secret = format!("den_{}", hex::encode(raw));
        let info = TokenInfo {
            id: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
            name: name.to_string(),
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let h = hash(&secret);
        self.conn.lock().execute(
            "INSERT INTO tokens (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![info.id, info.name, hex::encode(h), info.created_at],
        )?;
        self.by_hash.write().insert(h, info.clone());
        Ok((info, secret))
    }

    pub fn list(&self) -> Vec<TokenInfo> {
        let mut v: Vec<TokenInfo> = self.by_hash.read().values().cloned().collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// Revoke by id; false if there is no such token.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let n = self
            .conn
            .lock()
            .execute("DELETE FROM tokens WHERE id = ?1", params![id])?;
        self.by_hash.write().retain(|_, t| t.id != id);
        Ok(n > 0)
    }

    /// The token a secret belongs to.
    pub fn verify(&self, secret: &str) -> Option<TokenInfo> {
        let h = hash(secret);
        let map = self.by_hash.read();
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
        self.by_hash.read().is_empty()
    }
}

/// First start: mint the admin token and write it to `DATA_DIR/admin-token`
/// (0600). Later starts leave an existing file alone.
pub fn ensure_admin_token(tokens: &TokenStore, data_dir: &Path) -> Result<Option<PathBuf>, TokenError> {
    let path = data_dir.join("admin-token");
    if !tokens.is_empty() && path.exists() {
        return Ok(None);
    }
    if !tokens.is_empty() {
        // Tokens exist but the file is gone: the operator removed it on purpose.
        return Ok(None);
    }
    let (_, secret) = tokens.create("admin")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    Ok(Some(path))
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
