//! The heartbeat, self-fencing, and the durability window.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use den_sprite::SpriteStatus;

use crate::{Cluster, nodes};

/// Renew the heartbeat every interval. If it cannot be renewed for half the
/// TTL, freeze every sprite of this node: other nodes may claim them only
/// after a whole TTL (by the database's clock), so this node stops first.
/// When the heartbeat comes back, sprites that moved meanwhile are dropped.
pub(crate) async fn run(c: Cluster) {
    let inner = &c.inner;
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(inner.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let fence_after = inner.cfg.node_ttl / 2;
    let mut published_cold: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Every node knows every sprite (the catalog is shared): count the
        // ones this node holds the lease of.
        let sprites = inner.mgr.list();
        let awake = sprites.iter().filter(|s| s.status != SpriteStatus::Cold).count() as i64;
        let owned = sprites
            .iter()
            .filter(|s| inner.store.held_epoch(&s.record.volume).is_some())
            .count();
        // A beat that takes longer than the fencing deadline counts as failed.
        let beat = tokio::time::timeout(
            fence_after,
            nodes::heartbeat(&inner.db, &inner.cfg.node, awake, owned as i64),
        )
        .await;
        match beat {
            Ok(Ok(())) => {
                last_ok = Instant::now();
                if inner.fenced.load(Ordering::Acquire) {
                    c.unfence().await;
                } else {
                    c.drop_moved_sprites(false).await;
                }
                c.publish(&mut published_cold).await;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
            Err(_) => tracing::warn!("heartbeat timed out"),
        }
        if last_ok.elapsed() >= fence_after && !inner.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(
                silent_ms = last_ok.elapsed().as_millis() as u64,
                "lost the cluster database: freezing every sprite of this node until it is back"
            );
            c.freeze_all().await;
        }
    }
}

impl Cluster {
    async fn freeze_all(&self) {
        for s in self.inner.mgr.list() {
            if s.status == SpriteStatus::Running
                && let Err(e) = self.inner.mgr.freeze(&s.record.name).await
            {
                tracing::error!(sprite = %s.record.name, error = %e, "freezing a sprite while fenced");
            }
        }
    }

    /// Back in touch: keep what is still ours (it stays frozen until the
    /// next request wakes it), drop what another node claimed meanwhile.
    async fn unfence(&self) {
        self.drop_moved_sprites(true).await;
        self.inner.fenced.store(false, Ordering::Release);
        tracing::warn!("cluster database reachable again: serving sprites");
    }

    /// Awake sprites whose lease moved to another node (this node was cut
    /// off long enough for a claim) are stopped here and their local,
    /// never-committed state is discarded: the new owner has the truth.
    /// After a partition (`after_partition`), cold sprites this node held
    /// are checked too, and the leases that moved are forgotten.
    async fn drop_moved_sprites(&self, after_partition: bool) {
        let inner = &self.inner;
        for s in inner.mgr.list() {
            let held = inner.store.held_epoch(&s.record.volume).is_some();
            if s.status == SpriteStatus::Cold && !(after_partition && held) {
                continue;
            }
            let vol = &s.record.volume;
            let owner = match inner.store.owner(vol).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(sprite = %s.record.name, error = %e, "checking a lease");
                    continue;
                }
            };
            let ours = owner.node.as_deref() == Some(inner.cfg.node.as_str())
                && inner.store.held_epoch(vol) == Some(owner.epoch);
            if !ours {
                tracing::error!(sprite = %s.record.name, owner = ?owner.node, epoch = owner.epoch,
                    "another node owns this sprite now: stopping it here");
                if let Err(e) = inner.mgr.evict(&s.record.name).await {
                    tracing::error!(sprite = %s.record.name, error = %e, "evicting a moved sprite");
                }
                inner.store.forget_lease(vol);
            }
        }
    }

    async fn publish(&self, published_cold: &mut HashSet<String>) {
        let inner = &self.inner;
        let mut rows = Vec::new();
        for s in inner.mgr.list() {
            let name = s.record.name.clone();
            if s.status == SpriteStatus::Cold {
                if published_cold.contains(&name) {
                    continue;
                }
                // Only sprites this node owns.
                if inner.store.held_epoch(&s.record.volume).is_none() {
                    continue;
                }
                published_cold.insert(name.clone());
            } else {
                published_cold.remove(&name);
            }
            let (_, durable_at) = self.durability(&s).await;
            rows.push((name, s.status.as_str().to_string(), durable_at));
        }
        if rows.is_empty() {
            return;
        }
        if let Err(e) = nodes::publish_sprites(&inner.db, &inner.cfg.node, &rows).await {
            tracing::debug!(error = %e, "publishing sprite status");
            for (n, st, _) in &rows {
                if st == "cold" {
                    published_cold.remove(n);
                }
            }
        }
    }
}

/// Every `sync_interval`, give each awake sprite a sync point: this bounds
/// what a dead host can lose to that interval.
pub(crate) async fn sync_loop(c: Cluster) {
    let inner = &c.inner;
    let mut tick = tokio::time::interval(inner.cfg.sync_interval.max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if c.is_fenced() {
            continue;
        }
        for s in inner.mgr.list() {
            if s.status == SpriteStatus::Cold {
                continue;
            }
            match inner.mgr.sync_point(&s.record.name).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(sprite = %s.record.name, error = %e, "sync point"),
            }
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
