//! What every handler shares.

use std::sync::Arc;

use den_sprite::SpriteManager;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenStore;
use crate::config::ServerConfig;

#[derive(Clone)]
pub struct AppState {
    pub mgr: SpriteManager,
    /// Tokens and organisations.
    pub tokens: Arc<TokenStore>,
    pub audit: Arc<crate::audit::AuditLog>,
    pub cfg: Arc<ServerConfig>,
    /// Cancelled when the server starts shutting down: long-lived streams
    /// (exec sessions, proxies, log follows) end and tell their clients.
    pub shutdown: CancellationToken,
    pub create_limiter: Arc<crate::limits::CreateLimiter>,
    /// The organisations' own quotas on creates, forks and checkpoints.
    pub quotas: Arc<crate::limits::OrgQuotas>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cluster mode: where each sprite is served. `None` on a single node,
    /// where every request is served here.
    pub router: Option<Arc<dyn crate::forward::Router>>,
    /// Cluster mode: this node's membership (nodes, drain, placement info).
    pub cluster: Option<den_cluster::Cluster>,
    /// Idle connections to sprites' URL ports.
    pub upstreams: Arc<crate::upstream_pool::UpstreamPool>,
}
