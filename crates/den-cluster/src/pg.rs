use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::error::{ClusterError, Result};

/// A small pool whose connections are checked before reuse, so a restarted
/// PostgreSQL costs one failed call, not a poisoned pool.
pub(crate) fn pool(url: &str) -> Result<Pool> {
    let mut cfg = deadpool_postgres::Config::new();
    cfg.url = Some(url.to_string());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Verified,
    });
    cfg.pool = Some(deadpool_postgres::PoolConfig::new(8));
    cfg.create_pool(Some(Runtime::Tokio1), NoTls)
        .map_err(|e| ClusterError::Config(format!("cluster database url: {e}")))
}
