//! A real `den server` for API tests: started in-process on 127.0.0.1 with a
//! busybox image, its own data dir and a network sandbox (den_testkit::net),
//! so sprites only ever reach namespaces the test created.
//!
//! The test binary doubles as the `den` binary the server runs inside
//! sprites (`runtime-shim`, `agent`): see [`dispatch_subcommands`].

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, Result};
use den_server::{Running, ServerConfig};
use den_testkit::net::TestNet;

pub const WAIT: Duration = Duration::from_secs(30);

/// If this process was started as `runtime-shim` or `agent`, be that and exit.
pub fn dispatch_subcommands() {
    den_sprite::helper_cmd::dispatch();
}

pub struct TestServer {
    pub running: Option<Running>,
    /// `http://127.0.0.1:PORT` (`https://` with TLS)
    pub url: String,
    pub token: String,
    pub net: TestNet,
    pub cfg: ServerConfig,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Result<TestServer> {
        Self::start_with(|_| {}).await
    }

    /// Start with settings changed by `tweak` (idle timings and the like).
    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<TestServer> {
        let dir = tempfile::Builder::new().prefix("den-api-test-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let net = TestNet::new()?;
        let mut cfg = ServerConfig::new(dir.path().join("data"));
        cfg.listen = "127.0.0.1:0".parse()?;
        cfg.image = "busybox".into();
        cfg.run_dir = Some(dir.path().join("run"));
        let n = &net.config;
        cfg.subnet = Some(n.subnet.to_string());
        cfg.net_table = Some(n.table.clone());
        cfg.net_ifprefix = Some(n.ifprefix.clone());
        cfg.net_netns_prefix = Some(n.netns_prefix.clone());
        cfg.uplinks = n.uplinks.clone();
        cfg.blocked = Some(n.blocked.iter().map(|b| b.to_string()).collect());
        cfg.allowed_host_networks = n.allowed_host_networks.iter().map(|b| b.to_string()).collect();
        cfg.upstream_dns = Some(n.upstream_dns);
        // Long idle timings: tests that want sleep ask for it.
        cfg.warm_after = Duration::from_secs(3600);
        cfg.cold_after = Duration::from_secs(7200);
        cfg.cold_after_keeping_memory = Duration::from_secs(7200);
        // No pre-booted pool: these tests pin what a create does on its
        // own; the pool's tests and the official SDK suites turn it on.
        cfg.pool_size = 0;
        tweak(&mut cfg);
        let mut s = TestServer {
            running: None,
            url: String::new(),
            token: String::new(),
            net,
            cfg,
            dir,
        };
        s.boot().await?;
        Ok(s)
    }

    async fn boot(&mut self) -> Result<()> {
        let exe = std::env::current_exe()?;
        let running = den_server::start(self.cfg.clone(), exe).await?;
        let scheme = if self.cfg.tls() { "https" } else { "http" };
        self.url = format!("{scheme}://{}", running.addr);
        // Later starts keep the port, so URLs in earlier answers stay valid.
        self.cfg.listen = running.addr;
        self.token = std::fs::read_to_string(self.cfg.data_dir.join("admin-token"))
            .context("reading the admin token")?
            .trim()
            .to_string();
        self.running = Some(running);
        Ok(())
    }

    /// Stop gracefully and start again on the same data dir and port.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        self.boot().await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// A client that sends the admin token.
    pub fn client(&self) -> reqwest::Client {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", self.token).parse().expect("header"),
        );
        reqwest::Client::builder()
            .default_headers(h)
            .timeout(WAIT)
            .build()
            .expect("client")
    }

    /// A client without credentials.
    pub fn anonymous(&self) -> reqwest::Client {
        reqwest::Client::builder().timeout(WAIT).build().expect("client")
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `ws://…` (`wss://…` with TLS) form of an API path.
    pub fn ws(&self, path: &str) -> String {
        format!("ws{}{path}", self.url.trim_start_matches("http"))
    }

    /// Create a sprite; panics with the server's answer if that fails.
    pub async fn create(&self, name: &str) -> Result<serde_json::Value> {
        let r = self
            .client()
            .post(self.api("/v1/sprites"))
            .json(&serde_json::json!({"name": name}))
            .send()
            .await?;
        anyhow::ensure!(
            r.status() == 201,
            "create {name}: {} {}",
            r.status(),
            r.text().await?
        );
        Ok(r.json().await?)
    }
}

impl Drop for TestServer {
    /// A failed test still stops its server (sprites, mounts, firewall)
    /// before the temporary directory goes away.
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(r.stop()));
        }
    }
}
