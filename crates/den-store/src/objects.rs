//! Where chunk objects live: a local directory (default), S3-compatible
//! storage, or memory (unit tests), all behind `object_store`.
//!
//! Correctness never depends on conditional PUT: keys are content hashes, so
//! a repeated PUT writes the same bytes, and commit points live in metadata.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkHash;
use crate::error::{Result, StoreError};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ObjectBackend {
    Local {
        dir: PathBuf,
    },
    S3 {
        endpoint: String,
        bucket: String,
        access_key: String,
        secret_key: String,
        #[serde(default = "default_region")]
        region: String,
        #[serde(default)]
        prefix: String,
    },
    Memory,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// The chunk object store plus the key prefix den owns inside it.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl Objects {
    pub fn open(backend: &ObjectBackend) -> Result<Self> {
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match backend {
            ObjectBackend::Local { dir } => {
                std::fs::create_dir_all(dir)?;
                // Chunk objects are sprites' disk content: den's alone.
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
                }
                (Arc::new(LocalFileSystem::new_with_prefix(dir)?), String::new())
            }
            ObjectBackend::Memory => (Arc::new(InMemory::new()), String::new()),
            ObjectBackend::S3 {
                endpoint,
                bucket,
                access_key,
                secret_key,
                region,
                prefix,
            } => {
                // object_store retries only briefly: the uploader has its own
                // unbounded backoff loop, and reads surface an error to the
                // guest after their own deadline instead of hanging forever.
                let retry = RetryConfig {
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(50),
                        max_backoff: Duration::from_secs(1),
                        base: 2.0,
                    },
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(10),
                };
                // object_store's reqwest has no crypto provider of its own
                // (aws-lc-rs is a large C build, issue 15) and panics
                // without a process default; an existing one is kept.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let s3 = AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_bucket_name(bucket)
                    .with_access_key_id(access_key)
                    .with_secret_access_key(secret_key)
                    .with_region(region)
                    .with_allow_http(true)
                    .with_conditional_put(S3ConditionalPut::Disabled)
                    .with_retry(retry)
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(3))
                            .with_timeout(Duration::from_secs(30))
                            .with_allow_http(true),
                    )
                    .build()?;
                let mut p = prefix.trim_matches('/').to_string();
                if !p.is_empty() {
                    p.push('/');
                }
                (Arc::new(s3), p)
            }
        };
        Ok(Objects { store, prefix })
    }

    fn path(&self, hash: &ChunkHash) -> ObjPath {
        ObjPath::from(hash.object_key(&self.prefix))
    }

    pub async fn put(&self, hash: &ChunkHash, data: impl Into<Bytes>) -> Result<()> {
        self.store
            .put(&self.path(hash), PutPayload::from(data.into()))
            .await?;
        Ok(())
    }

    pub async fn get(&self, hash: &ChunkHash) -> Result<Bytes> {
        let r = self.store.get(&self.path(hash)).await?;
        Ok(r.bytes().await?)
    }

    pub async fn exists(&self, hash: &ChunkHash) -> Result<bool> {
        match self.store.head(&self.path(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, hash: &ChunkHash) -> Result<()> {
        match self.store.delete(&self.path(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::from(e)),
        }
    }

    /// Every chunk object under den's prefix (for orphan sweeps and tests).
    pub async fn list_chunks(&self) -> Result<Vec<ChunkHash>> {
        use futures::TryStreamExt;
        let prefix = ObjPath::from(format!("{}chunks", self.prefix));
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .iter()
            .filter_map(|m| m.location.filename().and_then(|f| ChunkHash::from_hex(f).ok()))
            .collect())
    }
}
