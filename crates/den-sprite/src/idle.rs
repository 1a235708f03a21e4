//! The idle monitor: running sprites nobody uses go warm after
//! `warm_after`, warm ones go cold after `cold_after`, or after
//! `cold_after_keeping_memory` on an engine that keeps their processes
//! through a cold sleep (gVisor): going cold loses them nothing and frees
//! their memory on the host.
//!
//! "Used" means an [`crate::Activity`] is held (an API request, exec stream,
//! proxied connection or URL request in flight) or an exec session is
//! running inside the sprite, even with no client attached. Services alone
//! don't keep a sprite awake.

use std::sync::Weak;
use std::time::Duration;

use crate::manager::{Inner, Phase, SpriteManager};
use crate::record::SpriteStatus;

pub(crate) async fn run(inner: Weak<Inner>) {
    loop {
        let tick = match inner.upgrade() {
            Some(i) => tick_for(
                i.cfg
                    .warm_after
                    .min(i.cfg.cold_after)
                    .min(i.cfg.cold_after_keeping_memory),
            ),
            None => return,
        };
        tokio::time::sleep(tick).await;
        let Some(i) = inner.upgrade() else { return };
        let mgr = SpriteManager::from_inner(i);
        sweep(&mgr).await;
    }
}

/// Check often enough that a sprite sleeps within a quarter of its timeout.
fn tick_for(shortest: Duration) -> Duration {
    (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

async fn sweep(mgr: &SpriteManager) {
    let (warm_after, cold_after) = (mgr.config().warm_after, mgr.config().cold_after);
    for slot in mgr.slots() {
        if slot.holds() > 0 {
            continue;
        }
        // A sprite in the middle of a transition is busy, not idle.
        let Some(mut phase) = slot.try_phase() else {
            continue;
        };
        let Phase::Awake(live) = &*phase else { continue };
        if live.init_exited() {
            // Dead, not idle: report it cold now rather than "running" until
            // the next request finds out (which would boot it again anyway).
            tracing::warn!(sprite = %slot.name(), "the sprite's PID 1 exited on its own; stopping it");
            let grace = mgr.config().stop_grace;
            if let Err(e) = mgr.stop_locked(&slot, &mut phase, grace).await {
                tracing::warn!(sprite = %slot.name(), error = %e, "cleaning up a sprite whose PID 1 exited");
            }
            continue;
        }
        let idle = slot.idle();
        let cold_after = if live.backend.memory().is_some() {
            cold_after.min(mgr.config().cold_after_keeping_memory)
        } else {
            cold_after
        };
        if idle < warm_after.min(cold_after) {
            continue;
        }
        let target = if idle >= cold_after {
            SpriteStatus::Cold
        } else if !live.frozen {
            SpriteStatus::Warm
        } else {
            continue;
        };
        if !live.frozen {
            match live.agent.list_sessions().await {
                Ok(sessions) if !sessions.is_empty() => {
                    slot.mark_active();
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    // An agent that doesn't answer can't be serving anyone;
                    // sleeping is the safe way to recover it.
                    tracing::warn!(sprite = %slot.name(), error = %e, "agent did not list its sessions");
                }
            }
        }
        // Re-check: a wake may have taken a hold while we asked the agent.
        if slot.holds() > 0 {
            continue;
        }
        if let Err(e) = mgr.sleep_locked(&slot, &mut phase, target).await {
            tracing::warn!(sprite = %slot.name(), ?target, error = %e, "putting an idle sprite to sleep");
        } else {
            tracing::info!(sprite = %slot.name(), status = target.as_str(), idle_ms = idle.as_millis() as u64, "idle sprite went to sleep");
        }
    }
}
