//! Where a request must run: placement of new sprites and ownership of
//! existing ones.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::Cluster;
use den_sprite::SpriteStatus;

use crate::error::{ClusterError, Result};
use crate::nodes::{self, NodeInfo, NodeState};

/// How long a forwarder trusts a remote owner it looked up.
const ROUTE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// Serve here: this node owns the sprite (or the sprite does not exist,
    /// and the local handler answers 404).
    Local,
    Remote {
        node: String,
        url: String,
    },
}

impl Cluster {
    /// Where requests for `sprite` must be served. Claims it for this node
    /// when its owner is gone (or it has none).
    pub async fn locate(&self, sprite: &str) -> Result<Location> {
        let inner = &self.inner;
        let known = inner.mgr.get(sprite).ok();
        // Fast path, no database: a sprite running here on a lease this
        // node holds. The watchdog re-checks those leases every heartbeat,
        // and a node that misses heartbeats is fenced before anyone may
        // claim, so the lease cannot have moved unnoticed.
        if let Some(info) = &known
            && info.status != SpriteStatus::Cold
            && !self.is_fenced()
            && inner.store.held_epoch(&info.record.volume).is_some()
        {
            return Ok(Location::Local);
        }
        if let Some(l) = self.cached_route(sprite) {
            return Ok(l);
        }
        // Another node may have created it (unknown here yet); its volume
        // never changes, so a known sprite needs no catalog read to route.
        let info = match known {
            Some(i) => i,
            None => match inner.mgr.refresh(sprite).await? {
                Some(i) => i,
                None => return Ok(Location::Local),
            },
        };
        let vol = info.record.volume.clone();
        for _ in 0..4 {
            let owner = match inner.store.owner(&vol).await {
                Ok(o) => o,
                // Deleted (perhaps on another node): the local handler
                // answers 404 once the refresh has dropped it.
                Err(den_store::StoreError::VolumeNotFound(_)) => {
                    inner.mgr.refresh(sprite).await?;
                    return Ok(Location::Local);
                }
                Err(e) => return Err(e.into()),
            };
            match owner.node.as_deref() {
                Some(n) if n == inner.cfg.node => {
                    if self.is_fenced() {
                        return Err(ClusterError::Fenced);
                    }
                    if inner.store.held_epoch(&vol) == Some(owner.epoch) {
                        return Ok(Location::Local);
                    }
                    // This node owned it in an earlier life (a restart):
                    // move the epoch on so nothing of that life can write.
                }
                Some(n) => {
                    if let Some(peer) = nodes::get(&inner.db, n, inner.cfg.node_ttl).await?
                        && peer.alive
                    {
                        let l = Location::Remote {
                            node: peer.name,
                            url: peer.url,
                        };
                        self.inner
                            .routes
                            .lock()
                            .insert(sprite.to_string(), (l.clone(), std::time::Instant::now()));
                        return Ok(l);
                    }
                }
                None => {}
            }
            // Unowned, or its owner is dead (or is this node's former self).
            if self.is_fenced() {
                return Err(ClusterError::Fenced);
            }
            if inner.draining.load(Ordering::Acquire) {
                // A draining node takes nothing: hand it to the node that
                // would get a new sprite of its region.
                let region = sprite_region(&info.record.attrs);
                return match self.best_node(region.as_deref(), true).await? {
                    Some(peer) => Ok(Location::Remote {
                        node: peer.name,
                        url: peer.url,
                    }),
                    None => Err(ClusterError::NoNode),
                };
            }
            let lock = self.claim_lock(sprite);
            let _g = lock.lock().await;
            // Someone on this node may have claimed it while we waited.
            if inner.store.owner(&vol).await? != owner {
                continue;
            }
            if let Some(epoch) = inner.store.claim(&vol, owner.epoch).await? {
                // Whatever this node kept of the volume from an earlier
                // ownership predates the last owner's writes.
                if owner.node.as_deref().is_some_and(|n| n != inner.cfg.node) {
                    inner.store.discard_local(&vol).await?;
                }
                let report = inner.store.adopt(&vol).await?;
                if report.rolled_back {
                    tracing::warn!(sprite, epoch, sync_at_ms = ?report.sync_at_ms,
                        "claimed a sprite whose owner died with unflushed writes; rolled back to its last sync point");
                } else {
                    tracing::info!(sprite, epoch, from = ?owner.node, "claimed sprite");
                }
                // The record may have changed on the old owner.
                inner.mgr.refresh(sprite).await?;
                return Ok(Location::Local);
            }
            // Lost the race: look again.
        }
        Err(ClusterError::Db(format!("ownership of {sprite} kept moving")))
    }

    /// A remote owner found less than [`ROUTE_TTL`] ago. A stale answer is
    /// safe: the old owner answers `sprite_moved` (or is unreachable), and
    /// the forwarder then drops the entry and asks again.
    fn cached_route(&self, sprite: &str) -> Option<Location> {
        let mut routes = self.inner.routes.lock();
        match routes.get(sprite) {
            Some((l, at)) if at.elapsed() < ROUTE_TTL => Some(l.clone()),
            Some(_) => {
                routes.remove(sprite);
                None
            }
            None => None,
        }
    }

    pub fn forget_route(&self, sprite: &str) {
        self.inner.routes.lock().remove(sprite);
    }

    fn claim_lock(&self, sprite: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .claim_locks
            .lock()
            .entry(sprite.to_string())
            .or_default()
            .clone()
    }

    /// The node a new sprite in `region` (any region when `None`) goes to:
    /// live, active, in the region, fewest awake sprites, then fewest sprites.
    pub async fn place(&self, region: Option<&str>) -> Result<Location> {
        if !self.inner.draining.load(Ordering::Acquire)
            && !self.is_fenced()
            && let Some(best) = self.best_node(region, false).await?
        {
            if best.name == self.inner.cfg.node {
                return Ok(Location::Local);
            }
            return Ok(Location::Remote {
                node: best.name,
                url: best.url,
            });
        }
        match self.best_node(region, true).await? {
            Some(peer) => Ok(Location::Remote {
                node: peer.name,
                url: peer.url,
            }),
            None => Err(match region {
                Some(r) => ClusterError::NoNodeInRegion(r.to_string()),
                None => ClusterError::NoNode,
            }),
        }
    }

    async fn best_node(&self, region: Option<&str>, exclude_self: bool) -> Result<Option<NodeInfo>> {
        let nodes = self.nodes().await?;
        let best = nodes
            .into_iter()
            .filter(|n| n.alive && n.state == NodeState::Active)
            .filter(|n| !exclude_self || n.name != self.inner.cfg.node)
            .filter(|n| region.is_none_or(|r| n.region == r))
            .min_by(|a, b| (a.awake, a.sprites, &a.name).cmp(&(b.awake, b.sprites, &b.name)));
        Ok(best)
    }
}

/// A sprite's primary region: `config.region` of the API attributes.
pub(crate) fn sprite_region(attrs: &serde_json::Value) -> Option<String> {
    attrs
        .get("config")
        .and_then(|c| c.get("region"))
        .and_then(|r| r.as_str())
        .map(str::to_string)
}
