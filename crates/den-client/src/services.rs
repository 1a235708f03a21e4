//! Services (§2.6): long-running processes the sprite supervises.

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::client::seg;
use crate::{Client, NdjsonStream, Result};

/// A service definition (the PUT body).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// A service with its state (`state.status`: stopped, starting, running, stopping, failed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default)]
    pub http_port: Option<u16>,
    #[serde(default)]
    pub state: Value,
}

impl Service {
    pub fn status(&self) -> &str {
        self.state["status"].as_str().unwrap_or("-")
    }
}

impl Client {
    fn svc_path(name: &str, service: &str, tail: &str) -> String {
        format!("/v1/sprites/{}/services/{}{tail}", seg(name), seg(service))
    }

    pub async fn list_services(&self, name: &str) -> Result<Vec<Service>> {
        let rb = self.request(Method::GET, &format!("/v1/sprites/{}/services", seg(name)))?;
        self.json(rb, Some(name)).await
    }

    /// Create or replace, and start; NDJSON events while it starts.
    pub async fn put_service(&self, name: &str, service: &str, spec: &ServiceSpec) -> Result<NdjsonStream> {
        let rb = self
            .request(Method::PUT, &Self::svc_path(name, service, ""))?
            .json(spec);
        Ok(NdjsonStream::new(self.send(rb, Some(name)).await?))
    }

    pub async fn start_service(&self, name: &str, service: &str) -> Result<NdjsonStream> {
        let rb = self.request(Method::POST, &Self::svc_path(name, service, "/start"))?;
        Ok(NdjsonStream::new(self.send(rb, Some(name)).await?))
    }

    pub async fn stop_service(&self, name: &str, service: &str) -> Result<NdjsonStream> {
        let rb = self.request(Method::POST, &Self::svc_path(name, service, "/stop"))?;
        Ok(NdjsonStream::new(self.send(rb, Some(name)).await?))
    }

    pub async fn delete_service(&self, name: &str, service: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, &Self::svc_path(name, service, ""))?;
        self.send(rb, Some(name)).await.map(drop)
    }

    /// The tail of the combined log, as text.
    pub async fn service_logs(&self, name: &str, service: &str, lines: usize) -> Result<String> {
        let mut url = self.url(&Self::svc_path(name, service, "/logs"))?;
        url.query_pairs_mut().append_pair("lines", &lines.to_string());
        let resp = self.send(self.request_url(Method::GET, url)?, Some(name)).await?;
        resp.text().await.map_err(|e| self.transport(e))
    }
}
