//! Cluster mode: many `den server` nodes over one PostgreSQL database and one
//! S3 bucket, with no consensus of their own.
//!
//! * [`nodes`]: the node registry. Every node upserts its row and renews
//!   `heartbeat_at` (PostgreSQL's clock, so no two clocks are compared). A
//!   node whose heartbeat is older than the TTL is dead.
//! * Ownership: a sprite runs on the node that owns its volume's lease in the
//!   metadata store (`den_store::VolumeOwner`). Claims are compare-and-swap
//!   on the lease epoch, which is also the fencing token: the PostgreSQL
//!   metadata backend refuses every change from a node that does not hold the
//!   current epoch, so a stale owner that comes back cannot write.
//! * [`Cluster::locate`]: where a request for a sprite must run. The owner if
//!   it is alive; otherwise this node claims the sprite, and adopts its
//!   volume (rolling back to the last durable sync point if the dead owner
//!   left writes that never reached S3).
//! * Self-fencing: a node that cannot renew its heartbeat for half the TTL
//!   freezes its sprites before anyone may claim them (other nodes wait a
//!   whole TTL); when the heartbeat comes back it thaws the ones it still
//!   owns and drops the ones that moved.
//! * Durability window: every `sync_interval` each running sprite gets a sync
//!   point (freeze, syncfs, snapshot, thaw, upload), so a host's death loses
//!   at most that window of writes. Cold sprites are flushed completely.
//! * [`peer`]: nodes prove to each other that a request comes from a node
//!   (a keyed MAC over the request with the cluster secret), so a client
//!   that claims to be a peer gains nothing.
//! * [`Cluster::drain`], placement by region ([`Cluster::place`]), and chunk
//!   GC run by one node at a time (a PostgreSQL advisory lock).

mod drain;
mod error;
mod gc;
mod locate;
mod nodes;
pub mod peer;
mod pg;
mod watchdog;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use den_sprite::SpriteManager;
use den_store::Store;
use tokio_util::sync::CancellationToken;

pub use drain::DrainReport;
pub use error::{ClusterError, Result};
pub use locate::Location;
pub use nodes::{NodeInfo, NodeState, SpritePlacement};
pub use peer::PeerKey;

/// How this node joins the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `postgres://…`
    pub db_url: String,
    /// Unique per process in the cluster.
    pub node: String,
    pub region: String,
    /// How other nodes reach this node's API (`http://host:port`).
    pub advertise_url: String,
    pub heartbeat_interval: Duration,
    /// A node silent this long is dead and its sprites may be claimed.
    pub node_ttl: Duration,
    /// The durability window of running sprites.
    pub sync_interval: Duration,
    /// How often some node collects unreferenced chunks.
    pub gc_interval: Duration,
    /// The cluster secret(s) from this file (see [`PeerKey::from_file`])
    /// instead of the one the first node stored in PostgreSQL.
    pub secret_file: Option<std::path::PathBuf>,
}

impl ClusterConfig {
    pub fn new(db_url: &str, node: &str, region: &str, advertise_url: &str) -> Self {
        ClusterConfig {
            db_url: db_url.to_string(),
            node: node.to_string(),
            region: region.to_string(),
            advertise_url: advertise_url.to_string(),
            heartbeat_interval: Duration::from_secs(1),
            node_ttl: Duration::from_secs(10),
            sync_interval: Duration::from_secs(30),
            gc_interval: Duration::from_secs(600),
            secret_file: None,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ClusterConfig,
    pub(crate) db: deadpool_postgres::Pool,
    pub(crate) mgr: SpriteManager,
    pub(crate) store: Store,
    pub(crate) peer_key: PeerKey,
    /// Set while this node cannot prove its heartbeat is fresh: its sprites
    /// are frozen and it claims nothing.
    pub(crate) fenced: AtomicBool,
    pub(crate) draining: AtomicBool,
    /// Remote owners recently looked up (sprite → location, when).
    pub(crate) routes: parking_lot::Mutex<std::collections::HashMap<String, (Location, std::time::Instant)>>,
    /// Serialises claims of one sprite on this node.
    pub(crate) claim_locks:
        parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) stop: CancellationToken,
}

/// This node's membership. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub(crate) inner: Arc<Inner>,
}

impl Cluster {
    /// Register this node, then start the heartbeat, the fencing watchdog,
    /// the sync-point loop and the GC loop.
    pub async fn join(cfg: ClusterConfig, mgr: SpriteManager) -> Result<Cluster> {
        // A bad secret file stops the start before this node registers.
        let file_key = cfg.secret_file.as_deref().map(PeerKey::from_file).transpose()?;
        let db = pg::pool(&cfg.db_url, &cfg.node)?;
        nodes::init_schema(&db).await?;
        let peer_key = match file_key {
            Some(k) => k,
            None => PeerKey::from_secret(&peer::stored_secret(&db).await?),
        };
        nodes::register(&db, &cfg).await?;
        let store = mgr.store().clone();
        let inner = Arc::new(Inner {
            cfg,
            db,
            mgr,
            store,
            peer_key,
            fenced: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            routes: Default::default(),
            claim_locks: Default::default(),
            stop: CancellationToken::new(),
        });
        let c = Cluster { inner };
        tokio::spawn(watchdog::run(c.clone()));
        tokio::spawn(watchdog::sync_loop(c.clone()));
        tokio::spawn(gc::run(c.clone()));
        tracing::info!(node = %c.node(), region = %c.region(), "joined the cluster");
        Ok(c)
    }

    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    pub fn region(&self) -> &str {
        &self.inner.cfg.region
    }

    /// Signs this node's requests to peers and checks theirs.
    pub fn peer_key(&self) -> &PeerKey {
        &self.inner.peer_key
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.cfg
    }

    /// How much of a sprite this node owns would survive losing this node:
    /// `(fully_durable, durable_at_ms)`. A running sprite is durable up to
    /// its last sync point only (its guest may hold unsynced writes in its
    /// page cache, which no state of the block device can vouch for); a
    /// cold one is fully durable once its volume has nothing local-only.
    pub async fn durability(&self, info: &den_sprite::SpriteInfo) -> (bool, Option<i64>) {
        let Ok(d) = self.inner.store.durability(&info.record.volume).await else {
            return (false, None);
        };
        if info.status == den_sprite::SpriteStatus::Cold && d.fully_durable {
            (true, Some(watchdog::now_ms()))
        } else {
            (false, d.durable_at_ms)
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::Acquire)
    }

    /// Placement info of every sprite the cluster knows about (for listings).
    pub async fn placements(&self) -> Result<std::collections::HashMap<String, nodes::SpritePlacement>> {
        Ok(nodes::placements(&self.inner.db, self.inner.cfg.node_ttl)
            .await?
            .into_iter()
            .collect())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        nodes::list(&self.inner.db, self.inner.cfg.node_ttl).await
    }

    /// Leave at shutdown, after the sprite manager has put every sprite to
    /// sleep and the store has flushed: release every lease this node holds
    /// whose volume has nothing left only here, and mark the node gone so
    /// others may claim at once instead of after the TTL.
    pub async fn leave(&self) {
        self.inner.stop.cancel();
        for info in self.inner.mgr.list() {
            let vol = info.record.volume.clone();
            if self.inner.store.held_epoch(&vol).is_none() {
                continue;
            }
            match self.inner.store.durability(&vol).await {
                Ok(d) if d.fully_durable => {
                    if let Err(e) = self.inner.store.release(&vol).await {
                        tracing::debug!(sprite = %info.record.name, error = %e, "releasing at shutdown");
                    }
                }
                Ok(_) => tracing::warn!(sprite = %info.record.name,
                    "keeping the lease at shutdown: some writes are only on this host"),
                Err(e) => tracing::debug!(sprite = %info.record.name, error = %e, "durability at shutdown"),
            }
        }
        if let Err(e) = nodes::set_state(&self.inner.db, &self.inner.cfg.node, NodeState::Left).await {
            tracing::warn!(error = %e, "marking the node as gone");
        }
    }
}
