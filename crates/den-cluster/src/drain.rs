//! Retiring a node: every sprite it owns goes cold (which flushes it to the
//! object store), then its lease is released, so the next request anywhere
//! claims it with nothing lost.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::Cluster;
use crate::error::Result;
use crate::nodes::{self, NodeState};

#[derive(Clone, Debug, Default, Serialize)]
pub struct DrainReport {
    pub node: String,
    /// Sprites put to sleep and released.
    pub released: Vec<String>,
    /// Sprites that could not be released (still owned here), with why.
    pub failed: Vec<(String, String)>,
}

impl Cluster {
    pub async fn drain(&self) -> Result<DrainReport> {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::Release);
        nodes::set_state(&inner.db, &inner.cfg.node, NodeState::Draining).await?;
        let mut report = DrainReport {
            node: inner.cfg.node.clone(),
            ..Default::default()
        };
        for s in inner.mgr.list() {
            let (name, vol) = (s.record.name.clone(), s.record.volume.clone());
            if inner.store.held_epoch(&vol).is_none() {
                continue;
            }
            let res = async {
                inner.mgr.hand_off(&name).await?;
                nodes::forget_sprite(&inner.db, &name).await?;
                Ok::<_, crate::ClusterError>(())
            }
            .await;
            match res {
                Ok(()) => report.released.push(name),
                Err(e) => {
                    tracing::error!(sprite = %name, error = %e, "draining a sprite");
                    report.failed.push((name, e.to_string()))
                }
            }
        }
        if report.failed.is_empty() {
            nodes::set_state(&inner.db, &inner.cfg.node, NodeState::Drained).await?;
        }
        Ok(report)
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }
}
