//! Chunk GC for the whole cluster, run by one node at a time. The store's GC
//! is safe against concurrent uploads and forks by itself (the `deleting`
//! chunk state, checked in the same transactions as uploads and forks); the
//! advisory lock only keeps nodes from doing the same work twice.

use crate::Cluster;

const GC_LOCK: i64 = 7_300_002;

pub(crate) async fn run(c: Cluster) {
    let inner = &c.inner;
    let mut tick = tokio::time::interval(inner.cfg.gc_interval);
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
        if let Err(e) = c.gc_once().await {
            tracing::warn!(error = %e, "cluster gc");
        }
    }
}

impl Cluster {
    /// Collect unreferenced chunks if no other node is doing it right now.
    /// Returns whether this node ran it.
    pub async fn gc_once(&self) -> crate::Result<bool> {
        // Session-level lock on one pooled connection: it is released when
        // that connection ends, so a node that dies mid-GC frees it.
        let conn = self.inner.db.get().await?;
        let got: bool = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&GC_LOCK])
            .await?
            .get(0);
        if !got {
            return Ok(false);
        }
        let res = self.inner.store.gc(false).await;
        let _ = conn.execute("SELECT pg_advisory_unlock($1)", &[&GC_LOCK]).await;
        let report = res?;
        tracing::info!(?report, "cluster gc");
        Ok(true)
    }
}
