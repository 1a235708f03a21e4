//! Peer proofs: how a node shows another node that a request comes from a
//! member of the same cluster, and not from a client that merely says so.
//!
//! Every node holds the cluster secret (made once by the first node and
//! kept in PostgreSQL, or read from `--cluster-secret-file`). A request one
//! node sends another carries [`PEER`]:
//!
//! ```text
//! x-den-peer: <node>:<unix-ms>:<hex BLAKE3-keyed(node, unix-ms, method, target, client)>
//! ```
//!
//! where `target` is the path and query and `client` the address of the
//! client the forwarder served (also sent as [`CLIENT`], so the owner sees
//! the real client). A receiver accepts the proof only within
//! [`PROOF_WINDOW`] of its own clock, in either direction, and compares the
//! MAC in constant time. A proof is bound to its method, target and client,
//! so a proof seen on the wire only vouches for that same request, and only
//! for the window.
//!
//! The secret never leaves this type: [`PeerKey`]'s `Debug` prints nothing
//! of it, and the key used is derived from it (so a secret file of any
//! length works).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use rand::RngCore;

use crate::error::{ClusterError, Result};

/// The proof header (see the module docs).
pub const PEER: &str = "x-den-peer";
/// The address of the client a forwarding node served; trusted only under
/// a verified [`PEER`] proof, which covers it.
pub const CLIENT: &str = "x-den-client";
/// How far a proof's time may be from the receiver's clock. Node clocks
/// must agree this closely (NTP does far better).
pub const PROOF_WINDOW: Duration = Duration::from_secs(60);
/// Fewest bytes a secret file must hold: 32 random bytes, or their 64 hex
/// digits, are the expected content.
pub const MIN_SECRET_LEN: usize = 32;

const KDF_CONTEXT: &str = "den cluster 2026 peer proof v1";

/// Why a proof was refused (never says anything about the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("malformed peer proof")]
    Malformed,
    #[error("peer proof is {age_ms} ms away from this node's clock (window {window_ms} ms)")]
    OutsideWindow { age_ms: i64, window_ms: i64 },
    #[error("peer proof does not verify with the cluster secret")]
    Mismatch,
}

/// The keys derived from the cluster secret(s): the first signs, every one
/// verifies (so a secret can be rotated without a flag day). Cheap to clone.
#[derive(Clone)]
pub struct PeerKey {
    keys: Arc<[[u8; 32]]>,
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerKey({} key(s), redacted)", self.keys.len())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl PeerKey {
    /// A key from one secret.
    pub fn from_secret(secret: &[u8]) -> PeerKey {
        PeerKey::from_secrets(&[secret])
    }

    /// Keys from several secrets; the first one signs. Empty secrets are
    /// the caller's mistake: [`PeerKey::from_file`] refuses them.
    pub fn from_secrets(secrets: &[&[u8]]) -> PeerKey {
        let keys: Vec<[u8; 32]> = secrets
            .iter()
            .map(|s| blake3::derive_key(KDF_CONTEXT, s))
            .collect();
        PeerKey { keys: keys.into() }
    }

    /// Secrets from a file: one per non-empty line (surrounding whitespace
    /// ignored), each at least [`MIN_SECRET_LEN`] bytes; the first signs.
    pub fn from_file(path: &Path) -> Result<PeerKey> {
        let bad =
            |why: String| ClusterError::Config(format!("cluster secret file {}: {why}", path.display()));
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let secrets: Vec<&[u8]> = text
            .split(|b| *b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|l| !l.is_empty())
            .collect();
        if secrets.is_empty() {
            return Err(bad("holds no secret".into()));
        }
        if let Some(i) = secrets.iter().position(|s| s.len() < MIN_SECRET_LEN) {
            // Which line, never what it holds.
            return Err(bad(format!(
                "secret on line {} is shorter than {MIN_SECRET_LEN} bytes (use e.g. `openssl rand -hex 32`)",
                i + 1
            )));
        }
        Ok(PeerKey::from_secrets(&secrets))
    }

    fn mac(
        key: &[u8; 32],
        node: &str,
        unix_ms: i64,
        method: &str,
        target: &str,
        client: &str,
    ) -> blake3::Hash {
        // Newline-separated: no field can hold one (node names are checked,
        // a method is a token, a request target and an address have none).
        let mut h = blake3::Hasher::new_keyed(key);
        for part in [node, &unix_ms.to_string(), method, target, client] {
            h.update(part.as_bytes());
            h.update(b"\n");
        }
        h.finalize()
    }

    /// The [`PEER`] header value for a request `node` sends now.
    pub fn prove(&self, node: &str, method: &str, target: &str, client: Option<SocketAddr>) -> String {
        self.prove_at(node, now_ms(), method, target, client)
    }

    /// [`PeerKey::prove`] at a given time (tests make stale proofs with it).
    pub fn prove_at(
        &self,
        node: &str,
        unix_ms: i64,
        method: &str,
        target: &str,
        client: Option<SocketAddr>,
    ) -> String {
        let client = client.map(|c| c.to_string()).unwrap_or_default();
        let mac = PeerKey::mac(&self.keys[0], node, unix_ms, method, target, &client);
        format!("{node}:{unix_ms}:{}", mac.to_hex())
    }

    /// The node that sent this request, if `proof` verifies for it now.
    pub fn verify(
        &self,
        proof: &str,
        method: &str,
        target: &str,
        client: Option<SocketAddr>,
    ) -> Result<String, ProofError> {
        self.verify_at(proof, now_ms(), method, target, client)
    }

    pub fn verify_at(
        &self,
        proof: &str,
        now_ms: i64,
        method: &str,
        target: &str,
        client: Option<SocketAddr>,
    ) -> Result<String, ProofError> {
        let mut parts = proof.rsplitn(3, ':');
        let (Some(mac), Some(ms), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ProofError::Malformed);
        };
        let unix_ms: i64 = ms.parse().map_err(|_| ProofError::Malformed)?;
        let Ok(mac) = blake3::Hash::from_hex(mac) else {
            return Err(ProofError::Malformed);
        };
        if node.is_empty() {
            return Err(ProofError::Malformed);
        }
        let window_ms = PROOF_WINDOW.as_millis() as i64;
        let age_ms = now_ms.saturating_sub(unix_ms);
        if age_ms.unsigned_abs() > window_ms as u64 {
            return Err(ProofError::OutsideWindow { age_ms, window_ms });
        }
        let client = client.map(|c| c.to_string()).unwrap_or_default();
        // `blake3::Hash`'s equality is constant-time.
        let ok = self
            .keys
            .iter()
            .any(|k| PeerKey::mac(k, node, unix_ms, method, target, &client) == mac);
        if ok {
            Ok(node.to_string())
        } else {
            Err(ProofError::Mismatch)
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cluster_secret (
    id         INT PRIMARY KEY CHECK (id = 1),
    secret     BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

/// The cluster's secret in PostgreSQL, made by the first node that asks:
/// 32 random bytes in the single row of `cluster_secret`. Nodes starting
/// at once agree: each offers its own bytes, exactly one insert wins, and
/// every node reads the winner's.
pub async fn stored_secret(db: &Pool) -> Result<Vec<u8>> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    // CREATE TABLE IF NOT EXISTS is not safe against itself (see nodes.rs).
    tx.execute("SELECT pg_advisory_xact_lock(7300002)", &[]).await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    let mut offer = [0u8; 32];
    rand::rng().fill_bytes(&mut offer);
    c.execute(
        "INSERT INTO cluster_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&&offer[..]],
    )
    .await?;
    let row = c
        .query_one("SELECT secret FROM cluster_secret WHERE id = 1", &[])
        .await?;
    let secret: Vec<u8> = row.get(0);
    if secret.len() < MIN_SECRET_LEN {
        return Err(ClusterError::Config(format!(
            "the cluster_secret row holds {} bytes, fewer than {MIN_SECRET_LEN}",
            secret.len()
        )));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn client() -> Option<SocketAddr> {
        Some("192.0.2.7:40000".parse().expect("addr"))
    }

    #[test]
    fn a_proof_verifies_only_for_its_own_request() {
        let k = PeerKey::from_secret(SECRET);
        let p = k.prove_at("node-a", 1_000_000, "GET", "/v1/sprites/x?y=1", client());
        assert_eq!(
            k.verify_at(&p, 1_000_000, "GET", "/v1/sprites/x?y=1", client()),
            Ok("node-a".into())
        );
        for (method, target, c) in [
            ("POST", "/v1/sprites/x?y=1", client()),
            ("GET", "/v1/sprites/x?y=2", client()),
            ("GET", "/v1/sprites/x?y=1", None),
            (
                "GET",
                "/v1/sprites/x?y=1",
                Some("192.0.2.8:40000".parse().expect("addr")),
            ),
        ] {
            assert_eq!(
                k.verify_at(&p, 1_000_000, method, target, c),
                Err(ProofError::Mismatch)
            );
        }
        // Another node's name under the same MAC.
        let forged = p.replacen("node-a", "node-b", 1);
        assert_eq!(
            k.verify_at(&forged, 1_000_000, "GET", "/v1/sprites/x?y=1", client()),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn a_proof_from_another_secret_or_outside_the_window_is_refused() {
        let k = PeerKey::from_secret(SECRET);
        let other = PeerKey::from_secret(b"another secret of at least 32 bytes");
        let p = other.prove_at("node-a", 5_000_000, "GET", "/", None);
        assert_eq!(
            k.verify_at(&p, 5_000_000, "GET", "/", None),
            Err(ProofError::Mismatch)
        );
        let p = k.prove_at("node-a", 5_000_000, "GET", "/", None);
        let w = PROOF_WINDOW.as_millis() as i64;
        assert!(k.verify_at(&p, 5_000_000 + w, "GET", "/", None).is_ok());
        assert!(k.verify_at(&p, 5_000_000 - w, "GET", "/", None).is_ok());
        assert!(matches!(
            k.verify_at(&p, 5_000_000 + w + 1, "GET", "/", None),
            Err(ProofError::OutsideWindow { .. })
        ));
        assert!(matches!(
            k.verify_at(&p, 5_000_000 - w - 1, "GET", "/", None),
            Err(ProofError::OutsideWindow { .. })
        ));
        for junk in ["", "node-a", "node-a:12", "node-a:x:00", ":1:00", "a:1:zz"] {
            assert_eq!(
                k.verify_at(junk, 1, "GET", "/", None),
                Err(ProofError::Malformed),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn rotation_signs_with_the_first_secret_and_verifies_with_any() {
        let old = PeerKey::from_secret(SECRET);
        let both = PeerKey::from_secrets(&[b"the new secret, 32 bytes or more!", SECRET]);
        let new = PeerKey::from_secret(b"the new secret, 32 bytes or more!");
        let by_old = old.prove_at("n", 1, "GET", "/", None);
        let by_both = both.prove_at("n", 1, "GET", "/", None);
        assert!(both.verify_at(&by_old, 1, "GET", "/", None).is_ok());
        assert!(new.verify_at(&by_both, 1, "GET", "/", None).is_ok());
        assert!(old.verify_at(&by_both, 1, "GET", "/", None).is_err());
    }

    #[test]
    fn secret_files_need_a_long_enough_secret_and_never_echo_it() {
        let dir = std::env::temp_dir().join(format!("den-peer-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("secret");
        std::fs::write(&f, "short-secret-value\n").expect("write");
        let e = PeerKey::from_file(&f).expect_err("short").to_string();
        assert!(e.contains("line 1") && !e.contains("short-secret-value"), "{e}");
        std::fs::write(&f, "\n  \n").expect("write");
        assert!(PeerKey::from_file(&f).is_err());
        let hex64 = "ab".repeat(32);
        std::fs::write(&f, format!("{hex64}\n\n")).expect("write");
        let k = PeerKey::from_file(&f).expect("key");
        assert!(!format!("{k:?}").contains(&hex64[..8]));
        let p = PeerKey::from_secret(hex64.as_bytes()).prove_at("n", 1, "GET", "/", None);
        assert!(k.verify_at(&p, 1, "GET", "/", None).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
