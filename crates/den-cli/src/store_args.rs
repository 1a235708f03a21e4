//! Where the store lives: flags and environment shared by every command.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use den_store::{Compression, ObjectBackend, StoreConfig};

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

/// `100G`, `512M`, `4096`, `64K`: binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 100G, 512M, 4096)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100G").unwrap(), 100 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
