//! Where the store lives: flags and environment shared by every command.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use den_store::{Compression, ObjectBackend, StoreConfig, parse_size};

#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// Data directory: metadata (meta.db), the local cache, and local chunk objects.
    #[arg(long, env = "DEN_DATA_DIR", default_value = "/var/lib/den", global = true)]
    pub data_dir: PathBuf,
    /// S3-compatible endpoint for chunk objects (default: a local directory).
    #[arg(long, env = "DEN_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "DEN_S3_BUCKET", global = true)]
    pub s3_bucket: Option<String>,
    #[arg(long, env = "DEN_S3_ACCESS_KEY", global = true, hide_env_values = true)]
    pub s3_access_key: Option<String>,
    #[arg(long, env = "DEN_S3_SECRET_KEY", global = true, hide_env_values = true)]
    pub s3_secret_key: Option<String>,
    #[arg(long, env = "DEN_S3_REGION", default_value = "us-east-1", global = true)]
    pub s3_region: String,
    #[arg(long, env = "DEN_S3_PREFIX", default_value = "", global = true)]
    pub s3_prefix: String,
    /// Size bound of the clean read cache, e.g. 8G.
    #[arg(long, env = "DEN_CACHE_LIMIT", default_value = "8G", value_parser = parse_size, global = true)]
    pub cache_limit: u64,
    /// Bound on data that exists only in the local cache, e.g. 2G.
    #[arg(long, env = "DEN_DIRTY_LIMIT", default_value = "2G", value_parser = parse_size, global = true)]
    pub dirty_limit: u64,
    /// none, zstd or lz4.
    #[arg(long, env = "DEN_COMPRESSION", default_value = "zstd", global = true)]
    pub compression: String,
}

impl StoreArgs {
    pub fn config(&self) -> anyhow::Result<StoreConfig> {
        let mut cfg = StoreConfig::local(&self.data_dir);
        if let Some(endpoint) = &self.s3_endpoint {
            let need = |v: &Option<String>, name: &str| {
                v.clone()
                    .ok_or_else(|| anyhow::anyhow!("--s3-endpoint needs {name} as well"))
            };
            cfg.objects = ObjectBackend::S3 {
                endpoint: endpoint.clone(),
                bucket: need(&self.s3_bucket, "--s3-bucket")?,
                access_key: need(&self.s3_access_key, "--s3-access-key")?,
                secret_key: need(&self.s3_secret_key, "--s3-secret-key")?,
                region: self.s3_region.clone(),
                prefix: self.s3_prefix.clone(),
            };
        }
        cfg.cache_limit = self.cache_limit;
        cfg.dirty_limit = self.dirty_limit;
        cfg.compression = Compression::parse(&self.compression)?;
        cfg.writeback_delay = Duration::from_secs(2);
        Ok(cfg)
    }
}
