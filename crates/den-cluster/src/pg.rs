use deadpool_postgres::Pool;

use crate::error::{ClusterError, Result};

pub(crate) fn pool(url: &str, node: &str) -> Result<Pool> {
    den_store::pg::pool(url, 8, &format!("den-cluster-{node}"))
        .map_err(|e| ClusterError::Config(e.to_string()))
}
