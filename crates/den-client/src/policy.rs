//! Network (egress) policy of a sprite.

use reqwest::Method;

use crate::client::seg;
use crate::{Client, NetworkPolicy, Result};

impl Client {
    pub async fn get_policy(&self, sprite: &str) -> Result<NetworkPolicy> {
        let path = format!("/v1/sprites/{}/policy/network", seg(sprite));
        self.json(self.request(Method::GET, &path)?, Some(sprite)).await
    }

    /// Replace the policy; the server validates it (400 `invalid policy config`).
    pub async fn set_policy(&self, sprite: &str, policy: &NetworkPolicy) -> Result<()> {
        let path = format!("/v1/sprites/{}/policy/network", seg(sprite));
        let rb = self.request(Method::POST, &path)?.json(policy);
        self.send(rb, Some(sprite)).await.map(drop)
    }
}
