//! What a server stands on, by mode:
//!
//! * single host (default): SQLite metadata, sprite catalog and tokens
//!   under the data dir; chunks in `DATA_DIR/objects` or `--object-store`.
//! * cluster (`--cluster-db`): all of those in PostgreSQL, chunks in S3
//!   (required: every node must reach every chunk), and this node joins
//!   the cluster's registry.

use std::sync::Arc;

use den_cluster::{Cluster, ClusterConfig};
use den_sprite::{ManagerConfig, SpriteManager};
use den_store::{Store, StoreConfig};

use crate::auth::TokenStore;
use crate::config::ServerConfig;
use crate::error::ConfigError;
use crate::server::ServerError;

pub struct Backends {
    pub store: Store,
    pub mgr: SpriteManager,
    pub tokens: Arc<TokenStore>,
    pub cluster: Option<Cluster>,
}

/// The cluster settings, checked before anything is opened.
pub fn cluster_config(cfg: &ServerConfig) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(db) = &cfg.cluster_db else {
        return Ok(None);
    };
    if cfg.object_store.is_none() {
        return Err(ConfigError(
            "--cluster-db needs --object-store s3://…: every node must reach every chunk".into(),
        ));
    }
    let node = match &cfg.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConfigError("--node-name is required (no hostname to default to)".into()))?,
    };
    if node.is_empty() || node.len() > 63 || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ConfigError(format!(
            "node name {node:?}: use 1-63 letters, digits and '-'"
        )));
    }
    let advertise = match &cfg.advertise_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if cfg.listen.ip().is_unspecified() => {
            return Err(ConfigError(format!(
                "listening on {}: set --advertise-url to the address other nodes reach this one at",
                cfg.listen
            )));
        }
        None => format!("http://{}", cfg.listen),
    };
    let mut c = ClusterConfig::new(db, &node, &cfg.region, &advertise);
    c.sync_interval = cfg.durability_window;
    c.node_ttl = cfg.node_ttl;
    c.secret_file = cfg.cluster_secret_file.clone();
    c.heartbeat_interval = (cfg.node_ttl / 5).max(std::time::Duration::from_millis(100));
    Ok(Some(c))
}

pub async fn open(cfg: &ServerConfig, mut mcfg: ManagerConfig) -> Result<Backends, ServerError> {
    let ccfg = cluster_config(cfg)?;
    let mut scfg = StoreConfig::local(&cfg.data_dir);
    scfg.objects = cfg.object_backend()?;
    let Some(ccfg) = ccfg else {
        let store = Store::open(scfg).await?;
        store.start_background_gc();
        let mgr = SpriteManager::start(mcfg, store.clone()).await?;
        let tokens = Arc::new(TokenStore::open(&cfg.data_dir.join("tokens.db"))?);
        return Ok(Backends {
            store,
            mgr,
            tokens,
            cluster: None,
        });
    };
    let db = &ccfg.db_url;
    scfg.node = Some(ccfg.node.clone());
    let meta = den_store::meta::postgres::PgMeta::connect(db, &ccfg.node).await?;
    let store = Store::open_with_meta(scfg, Arc::new(meta)).await?;
    store.start_background_gc();
    let catalog = den_sprite::catalog_pg::PgCatalog::connect(db).await?;
    mcfg.flush_on_cold = true;
    mcfg.container_prefix = format!("{}-", ccfg.node);
    // Sprites of a dead den stop well before another node may claim them
    // (a whole node TTL after this node's last beat).
    mcfg.fence_ttl = cfg.node_ttl / 2;
    let mgr = SpriteManager::start_with_catalog(mcfg, store.clone(), Arc::new(catalog)).await?;
    let tokens = Arc::new(TokenStore::open_postgres(db).await?);
    let cluster = Cluster::join(ccfg, mgr.clone()).await?;
    Ok(Backends {
        store,
        mgr,
        tokens,
        cluster: Some(cluster),
    })
}
