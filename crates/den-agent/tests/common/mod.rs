#![allow(dead_code)]

use std::time::Duration;

use den_agent::client::{Client, Event, ExecRequest, Session};
use den_agent::{AgentConfig, AgentHandle};

pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestAgent {
    pub handle: Option<AgentHandle>,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestAgent {
    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

pub async fn agent_with(tweak: impl FnOnce(&mut AgentConfig)) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path().join("run/agent.sock"));
    // Run commands as whoever runs the tests.
    cfg.default_user = nix::unistd::getuid().as_raw().to_string();
    cfg.default_cwd = dir.path().to_owned();
    tweak(&mut cfg);
    let handle = AgentHandle::start(cfg).await.unwrap();
    let client = den_agent::client::connect(handle.socket()).await.unwrap();
    TestAgent {
        handle: Some(handle),
        client,
        dir,
    }
}

pub async fn agent() -> TestAgent {
    agent_with(|_| {}).await
}

pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> ExecRequest {
    req(&["/bin/sh", "-c", script])
}

/// Next event within the bounded wait.
pub async fn next(s: &mut Session) -> Option<Event> {
    tokio::time::timeout(WAIT, s.recv())
        .await
        .expect("timed out waiting for an event")
}

/// Reads stdout until it contains `needle`; returns everything read.
pub async fn read_until(s: &mut Session, needle: &str) -> String {
    let mut acc = String::new();
    while !acc.contains(needle) {
        match next(s).await {
            Some(Event::Stdout(b)) => acc.push_str(&String::from_utf8_lossy(&b)),
            Some(Event::Stderr(_)) | Some(Event::PortOpened(_)) | Some(Event::PortClosed(_)) => {}
            other => panic!("expected {needle:?} in output, got {other:?} after {acc:?}"),
        }
    }
    acc
}

pub async fn collect(s: Session) -> den_agent::client::Output {
    tokio::time::timeout(WAIT, s.collect())
        .await
        .expect("timed out collecting output")
}
