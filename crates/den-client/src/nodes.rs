//! Cluster nodes (den extension: `/v1/nodes`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::seg;
use crate::{Client, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub region: String,
    pub url: String,
    /// `active`, `draining`, `drained` or `left`.
    pub state: String,
    pub alive: bool,
    #[serde(default)]
    pub heartbeat_age_ms: i64,
    #[serde(default)]
    pub awake: i64,
    #[serde(default)]
    pub sprites: i64,
}

#[derive(Debug, Clone, Deserialize)]
struct NodeList {
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainReport {
    pub node: String,
    pub released: Vec<String>,
    #[serde(default)]
    pub failed: Vec<(String, String)>,
}

impl Client {
    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        let list: NodeList = self.json(self.request(Method::GET, "/v1/nodes")?, None).await?;
        Ok(list.nodes)
    }

    /// Put every sprite of `node` to sleep, flush it and release it.
    pub async fn drain_node(&self, node: &str) -> Result<DrainReport> {
        let rb = self.request(Method::POST, &format!("/v1/nodes/{}/drain", seg(node)))?;
        self.json(rb, None).await
    }
}
