//! The official Python SDK (`sprites-py`, installed by scripts/install-deps.sh)
//! against a real den server: tests/sdk/test_sprites_py.py, in two phases
//! around a server restart.

use std::process::Command;

use anyhow::{Result, ensure};

use crate::common::TestServer;

fn python() -> String {
    std::env::var("DEN_TEST_PYTHON").unwrap_or_else(|_| "/opt/den-venv/bin/python".into())
}

fn pytest(s: &TestServer, phase: &str) -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_sprites_py.py");
    let url = s.url.clone();
    let token = s.token.clone();
    let phase = phase.to_string();
    // pytest runs while this runtime keeps serving the API.
    let out = tokio::task::block_in_place(move || {
        Command::new(python())
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script])
            .env("DEN_TEST_URL", url)
            .env("DEN_TEST_TOKEN", token)
            .env("DEN_TEST_PHASE", phase)
            .output()
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", text.trim_end());
    ensure!(out.status.success(), "pytest failed in this phase");
    Ok(())
}

pub async fn python_sdk() -> Result<()> {
    let mut s = TestServer::start().await?;
    pytest(&s, "main")?;
    s.restart().await?;
    pytest(&s, "restart")?;
    s.stop().await;
    Ok(())
}
