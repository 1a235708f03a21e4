//! The pre-booted pool through the API: a create claims a booted sprite
//! that takes the request's name, environment and limits; pooled sprites
//! are never listed and never count against the quotas.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::{TestServer, WAIT};
use crate::exec::{run, sh};

/// One sample (a counter or gauge without labels) of the server's /metrics.
async fn metric(s: &TestServer, name: &str) -> Result<f64> {
    let text = s.client().get(s.api("/metrics")).send().await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("/metrics has no {name}"))
}

/// Wait (bounded) until the pool holds `n` sprites.
pub(crate) async fn pool_ready(s: &TestServer, n: f64) -> Result<()> {
    let t0 = std::time::Instant::now();
    while metric(s, "den_sprite_pool_ready").await.unwrap_or(0.0) < n {
        ensure!(t0.elapsed() < WAIT, "the pool never held {n} sprites");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn pool_create_claims_a_hidden_sprite() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.pool_size = 2;
        c.max_sprites = Some(2);
    })
    .await?;
    pool_ready(&s, 2.0).await?;
    let list: Value = s.client().get(s.api("/v1/sprites")).send().await?.json().await?;
    ensure!(
        list["sprites"] == json!([]) && list["running"] == 0 && list["cold"] == 0,
        "pooled sprites are listed: {list}"
    );

    let r = s
        .client()
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "pa", "environment": {"GREETING": "hi"}, "config": {"ram_mb": 300}}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {}", r.status());
    let made: Value = r.json().await?;
    ensure!(
        made["name"] == "pa" && made["status"] == "running",
        "a pool hit is running: {made}"
    );
    let out = run(&s, "pa", &sh("hostname; echo $GREETING")).await?;
    ensure!(
        out.stdout == b"pa\nhi\n",
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mgr = &s.running.as_ref().context("running")?.state.mgr;
    let key = mgr
        .get(&den_sprite::sprite_key(den_sprite::DEFAULT_ORG, "pa"))?
        .record
        .key;
    let mode = den_runtime::cgroup::detect()?;
    let cg = den_runtime::cgroup::SpriteCgroup::new(mode, &key);
    let limit = match mode {
        den_runtime::cgroup::CgroupMode::V2 => cg.read("memory", "memory.max")?,
        _ => cg.read("memory", "memory.limit_in_bytes")?,
    };
    ensure!(limit == (300u64 << 20).to_string(), "memory limit {limit}");
    ensure!(metric(&s, "den_sprite_pool_hits_total").await? == 1.0);

    // max_sprites = 2 counts only sprites someone made, never the pool.
    s.create("pb").await?;
    let third = s
        .client()
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "pc"}))
        .send()
        .await?;
    ensure!(third.status() == 429, "a third sprite: {}", third.status());
    let list: Value = s.client().get(s.api("/v1/sprites")).send().await?.json().await?;
    let names: Vec<&str> = list["sprites"]
        .as_array()
        .context("sprites")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(names == ["pa", "pb"], "{names:?}");
    s.stop().await;
    Ok(())
}
