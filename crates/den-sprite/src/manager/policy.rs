//! A sprite's egress policy, stored and applied live.

use super::*;

impl SpriteManager {
    pub fn policy(&self, name: &str) -> Result<Option<NetworkPolicy>> {
        Ok(self.slot(name)?.record.lock().policy.clone())
    }

    /// Store a new egress policy and, if the sprite is awake, apply it live
    /// (connections it now forbids are cut).
    pub async fn set_policy(&self, name: &str, policy: NetworkPolicy) -> Result<()> {
        policy
            .compile()
            .map_err(|e| SpriteError::Invalid(format!("invalid policy config: {e}")))?;
        let slot = self.slot(name)?;
        let phase = slot.phase.lock().await;
        let stored = if policy.rules.is_empty() {
            None
        } else {
            Some(policy.clone())
        };
        self.update_record(&slot, |r| r.policy = stored.clone()).await?;
        if let Phase::Awake(live) = &*phase {
            let (net, key) = (self.inner.net.clone(), live.key.clone());
            let p = policy.clone();
            blocking(move || Ok(net.set_policy(&key, &p)?)).await?;
            live::write_policy_file(&live.paths, stored.as_ref())?;
        }
        Ok(())
    }
}
