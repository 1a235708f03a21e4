//! How every part of den that keeps state in PostgreSQL (volume metadata,
//! the sprite catalog, tokens, the cluster registry) connects to it.

use std::time::Duration;

pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("PostgreSQL URL: {0}")]
    Url(String),
    #[error("building the PostgreSQL connection pool: {0}")]
    Build(String),
}

/// A pool of at most `max_size` connections to `url`, shown to the server
/// as `application_name`.
///
/// * Connections are verified before reuse: after a database restart the
///   next checkout replaces a dead connection instead of failing on it.
/// * Connecting, checking a connection and waiting for a free one are all
///   bounded, so an unreachable or partitioned database fails a call within
///   seconds instead of hanging it (cluster fencing depends on noticing).
pub fn pool(url: &str, max_size: usize, application_name: &str) -> Result<Pool, PoolError> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(|e| PoolError::Url(format!("{e}")))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(application_name);
    }
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(mgr)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| PoolError::Build(e.to_string()))
}
