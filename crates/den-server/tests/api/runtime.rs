//! The isolation engine through the API (den extension): `config.runtime`
//! on create, the server's default (`ServerConfig::runtime`), forks, the
//! pool and restarts. A sprite proves its engine from inside: gVisor's
//! sentry reports its own kernel (`Linux version 4.4.0`), a native sprite
//! the host's.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::TestServer;
use crate::exec::{run, sh, text};

/// What gVisor's sentry puts in /proc/version; the host runs 6.x.
const GVISOR_KERNEL: &str = "Linux version 4.4.0";

async fn create_with(s: &TestServer, body: Value) -> Result<(u16, Value)> {
    let r = s.client().post(s.api("/v1/sprites")).json(&body).send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn get(s: &TestServer, name: &str) -> Result<Value> {
    Ok(s.client()
        .get(s.api(&format!("/v1/sprites/{name}")))
        .send()
        .await?
        .json()
        .await?)
}

/// The kernel the sprite's processes see, and whether it is gVisor's.
async fn kernel(s: &TestServer, name: &str) -> Result<(bool, String)> {
    let out = run(s, name, &sh("cat /proc/version")).await?;
    ensure!(out.exit == Some(0), "cat /proc/version in {name}: {out:?}");
    let v = text(&out.stdout);
    Ok((v.starts_with(GVISOR_KERNEL), v))
}

/// The sprite runs on `want` by its JSON (create answer and GET) and by
/// the kernel its processes see.
async fn ensure_runtime(s: &TestServer, name: &str, answer: &Value, want: &str) -> Result<()> {
    ensure!(
        answer["config"]["runtime"] == want,
        "{name}: create answer {answer}"
    );
    let got = get(s, name).await?;
    ensure!(got["config"]["runtime"] == want, "{name}: GET {got}");
    let (gvisor, version) = kernel(s, name).await?;
    ensure!(
        gvisor == (want == "gvisor"),
        "{name} should run on {want}, /proc/version: {version}"
    );
    Ok(())
}

/// A native-default server: per-sprite choice, refusals, fork, pool, restart.
pub async fn per_sprite_choice() -> Result<()> {
    // One pooled sprite (native, the server's default): a gVisor create
    // must not be handed it.
    let mut s = TestServer::start_with(|c| c.pool_size = 1).await?;
    crate::pool::pool_ready(&s, 1.0).await?;

    let (code, gv) = create_with(&s, json!({"name": "gv", "config": {"runtime": "gvisor"}})).await?;
    ensure!(code == 201, "gvisor create: {code} {gv}");
    ensure_runtime(&s, "gv", &gv, "gvisor").await?;
    // The sentry's boot log, never the host's ring buffer.
    let dmesg = run(&s, "gv", &sh("dmesg")).await?;
    ensure!(
        text(&dmesg.stdout).contains("Starting gVisor"),
        "dmesg in a gVisor sprite: {dmesg:?}"
    );

    for (name, body) in [
        ("nat", json!({"name": "nat"})),
        ("nul", json!({"name": "nul", "config": {"runtime": null}})),
        ("exp", json!({"name": "exp", "config": {"runtime": "native"}})),
    ] {
        let (code, v) = create_with(&s, body).await?;
        ensure!(code == 201, "{name}: {code} {v}");
        ensure_runtime(&s, name, &v, "native").await?;
    }

    // Anything else is a 400 that names the setting, and creates nothing.
    for (name, bad) in [
        ("k", json!("kvm")),
        ("n", json!(5)),
        ("u", json!("GVISOR ")),
        ("o", json!({"kind": "gvisor"})),
        ("e", json!("")),
    ] {
        let (code, body) = create_with(&s, json!({"name": name, "config": {"runtime": bad}})).await?;
        ensure!(code == 400, "runtime {bad}: {code} {body}");
        let msg = body["message"].as_str().unwrap_or_default();
        ensure!(
            body["error"].is_string() && msg.contains("config.runtime") && msg.contains("gvisor"),
            "runtime {bad}: {body}"
        );
        let r = s
            .client()
            .get(s.api(&format!("/v1/sprites/{name}")))
            .send()
            .await?;
        ensure!(r.status() == 404, "runtime {bad} created {name}: {}", r.status());
    }

    // A fork of a gVisor sprite (live state, then a checkpoint) is gVisor,
    // and keeps the files.
    let w = run(&s, "gv", &sh("echo kept > /home/sprite/mark")).await?;
    ensure!(w.exit == Some(0), "{w:?}");
    let r = s
        .client()
        .post(s.api("/v1/sprites/gv/fork"))
        .json(&json!({"name": "gvf"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "fork: {}", r.status());
    let f: Value = r.json().await?;
    ensure_runtime(&s, "gvf", &f, "gvisor").await?;
    let m = run(&s, "gvf", &sh("cat /home/sprite/mark")).await?;
    ensure!(m.stdout == b"kept\n", "{m:?}");
    let r = s
        .client()
        .post(s.api("/v1/sprites/gv/checkpoint"))
        .json(&json!({}))
        .send()
        .await?;
    let lines = r.text().await?;
    ensure!(lines.contains("Checkpoint v1 created"), "checkpoint: {lines}");
    let r = s
        .client()
        .post(s.api("/v1/sprites/gv/fork"))
        .json(&json!({"name": "gvc", "checkpoint": "v1"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "fork from v1: {}", r.status());
    let f: Value = r.json().await?;
    ensure_runtime(&s, "gvc", &f, "gvisor").await?;

    // The record keeps the engine across a restart.
    s.restart().await?;
    for (name, want) in [("gv", "gvisor"), ("gvc", "gvisor"), ("nat", "native")] {
        let v = get(&s, name).await?;
        ensure_runtime(&s, name, &v, want).await?;
    }
    let list: Value = s.client().get(s.api("/v1/sprites")).send().await?.json().await?;
    let sprites = list["sprites"].as_array().context("sprites")?;
    ensure!(
        sprites.iter().all(|v| v["config"]["runtime"].is_string()),
        "every listed sprite shows its runtime: {list}"
    );
    s.stop().await;
    Ok(())
}

/// A server whose default is gVisor creates gVisor sprites unless asked.
pub async fn server_default_gvisor() -> Result<()> {
    let s = TestServer::start_with(|c| c.runtime = den_runtime::Runtime::Gvisor).await?;
    let d = s.create("dflt").await?;
    ensure_runtime(&s, "dflt", &d, "gvisor").await?;
    let (code, n) = create_with(&s, json!({"name": "nat", "config": {"runtime": "native"}})).await?;
    ensure!(code == 201, "native create: {code} {n}");
    ensure_runtime(&s, "nat", &n, "native").await?;
    s.stop().await;
    Ok(())
}
