//! Checkpoints: create and restore stream NDJSON progress.

use reqwest::Method;
use serde_json::json;

use crate::client::seg;
use crate::{Checkpoint, Client, NdjsonStream, Result};

impl Client {
    /// With `memory`, the sprite's running processes too (den extension,
    /// gVisor sprites).
    pub async fn create_checkpoint(
        &self,
        sprite: &str,
        comment: Option<&str>,
        memory: bool,
    ) -> Result<NdjsonStream> {
        let mut body = match comment {
            Some(c) => json!({"comment": c}),
            None => json!({}),
        };
        if memory {
            body["memory"] = true.into();
        }
        let rb = self
            .request(Method::POST, &format!("/v1/sprites/{}/checkpoint", seg(sprite)))?
            .json(&body);
        Ok(NdjsonStream::new(self.send(rb, Some(sprite)).await?))
    }

    pub async fn list_checkpoints(&self, sprite: &str) -> Result<Vec<Checkpoint>> {
        let rb = self.request(Method::GET, &format!("/v1/sprites/{}/checkpoints", seg(sprite)))?;
        self.json(rb, Some(sprite)).await
    }

    pub async fn get_checkpoint(&self, sprite: &str, id: &str) -> Result<Checkpoint> {
        let path = format!("/v1/sprites/{}/checkpoints/{}", seg(sprite), seg(id));
        self.json(self.request(Method::GET, &path)?, Some(sprite)).await
    }

    pub async fn delete_checkpoint(&self, sprite: &str, id: &str) -> Result<()> {
        let path = format!("/v1/sprites/{}/checkpoints/{}", seg(sprite), seg(id));
        self.send(self.request(Method::DELETE, &path)?, Some(sprite))
            .await
            .map(drop)
    }

    pub async fn restore_checkpoint(&self, sprite: &str, id: &str) -> Result<NdjsonStream> {
        let path = format!("/v1/sprites/{}/checkpoints/{}/restore", seg(sprite), seg(id));
        let resp = self
            .send(self.request(Method::POST, &path)?, Some(sprite))
            .await?;
        Ok(NdjsonStream::new(resp))
    }
}
