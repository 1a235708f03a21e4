//! HTTPS on den's own port: one certificate chain and key (PEM), served by
//! rustls for the API and the sprite URLs alike (a wildcard certificate
//! `*.<url_domain>` covers the sprite hosts).
//!
//! The certificate can change while den runs ([`Tls::reload`], on SIGHUP):
//! the rustls configuration is built once and asks [`Tls`] for the current
//! certificate on every handshake, so a reload affects only handshakes that
//! start after it. Established connections keep their session, and an
//! exec WebSocket or a kept-alive connection never notices. A reload that
//! fails (a missing file, a key that does not match the certificate) keeps
//! the old certificate: a typo during a renewal must not take the server
//! off the air.
//!
//! ALPN offers only `http/1.1`: den's server speaks HTTP/1.1, and
//! WebSocket upgrades (exec, proxy, sprite URLs) need it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS key {key} does not belong to certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// The certificate files, read again on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The serving TLS state: the acceptor for new connections and the
/// certificate it currently hands out.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The certificate every new handshake gets.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    /// One certificate for every name: SNI picks nothing, and a client
    /// without SNI (an IP address) gets the same chain.
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The crypto provider, named rather than the process default so the
/// server's TLS doesn't depend on who installed a default first. ring, the
/// only one compiled in: aws-lc-rs is a large C build (issue 15).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: files.cert.clone(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        // A key type whose public half rustls cannot derive: nothing to compare.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(e) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        }),
    }
}

impl Tls {
    /// Read the files and build the acceptor; fails on anything unusable,
    /// so a bad certificate stops the start instead of every handshake.
    pub fn new(files: TlsFiles) -> Result<Tls, TlsError> {
        let provider = provider();
        let key = load(&files, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            files,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Read the files again; new handshakes get the new certificate. On
    /// error the old certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.files, &provider())?;
        *self.current.0.write() = Arc::new(key);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The certificate chain new handshakes get (DER, leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.0.read().cert.clone()
    }
}

/// Marks a request that arrived over a TLS connection den terminated.
#[derive(Debug, Clone, Copy)]
pub struct ViaTls;

/// Both files or neither.
pub fn files(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<TlsFiles>, TlsError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some(TlsFiles {
            cert: c.to_path_buf(),
            key: k.to_path_buf(),
        })),
        _ => Err(TlsError::Setup(
            "tls_cert and tls_key go together: give both or neither".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServerConfig;

    #[test]
    fn cert_and_key_go_together() {
        let p = Path::new("/x.pem");
        assert!(files(None, None).unwrap().is_none());
        assert!(files(Some(p), Some(p)).unwrap().is_some());
        assert!(files(Some(p), None).is_err());
        assert!(files(None, Some(p)).is_err());
    }

    #[test]
    fn sprite_urls_are_https_with_tls_and_drop_port_443() {
        let mut c = ServerConfig::new("/d");
        c.url_domain = "den.example".into();
        c.url_port = Some(443);
        assert_eq!(c.sprite_url("a"), "http://a.den.example:443/");
        c.tls_cert = Some("/c.pem".into());
        c.tls_key = Some("/k.pem".into());
        assert_eq!(c.sprite_url("a"), "https://a.den.example/");
        c.url_port = Some(8443);
        assert_eq!(c.sprite_url("a"), "https://a.den.example:8443/");
    }

    #[test]
    fn config_file_takes_tls_cert_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("den.toml");
        std::fs::write(
            &f,
            "tls_cert = \"/etc/den/cert.pem\"\ntls_key = \"/etc/den/key.pem\"\n",
        )
        .unwrap();
        let mut c = ServerConfig::new("/d");
        c.apply_file(&f).unwrap();
        assert_eq!(c.tls_cert.as_deref(), Some(Path::new("/etc/den/cert.pem")));
        assert_eq!(c.tls_key.as_deref(), Some(Path::new("/etc/den/key.pem")));
    }
}
