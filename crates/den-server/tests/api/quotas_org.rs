//! Per-organisation quotas: each limit of an organisation refuses its own
//! creates, forks, checkpoints and wakes with the Sprites 429 shapes,
//! leaves other organisations alone, and gives way when raised; the
//! server's own limits still bound everyone.

use anyhow::{Result, ensure};
use den_sprite::SpriteStatus;
use reqwest::{Client, Response};
use serde_json::{Value, json};

use crate::common::{TestServer, WAIT};

/// Create organisation `slug` with `limits` and return a client with one of
/// its admin tokens.
async fn org(s: &TestServer, slug: &str, limits: Value) -> Result<Client> {
    let admin = s.client();
    let r = admin
        .post(s.api("/v1/orgs"))
        .json(&json!({"slug": slug, "limits": limits}))
        .send()
        .await?;
    ensure!(
        r.status() == 201,
        "create org {slug}: {} {}",
        r.status(),
        r.text().await?
    );
    let r = admin
        .post(s.api("/v1/tokens"))
        .json(&json!({"org": slug, "role": "admin"}))
        .send()
        .await?;
    ensure!(
        r.status() == 201,
        "token of {slug}: {} {}",
        r.status(),
        r.text().await?
    );
    let token = r.json::<Value>().await?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    Ok(Client::builder().default_headers(h).timeout(WAIT).build()?)
}

/// Replace organisation `slug`'s limits (server administrator).
async fn set_limits(s: &TestServer, slug: &str, limits: Value) -> Result<()> {
    let r = s
        .client()
        .put(s.api(&format!("/v1/orgs/{slug}")))
        .json(&json!({"limits": limits}))
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "limits of {slug}: {} {}",
        r.status(),
        r.text().await?
    );
    Ok(())
}

async fn create(s: &TestServer, c: &Client, name: &str, config: Value) -> Result<Response> {
    Ok(c.post(s.api("/v1/sprites"))
        .json(&json!({"name": name, "config": config}))
        .send()
        .await?)
}

async fn fork(s: &TestServer, c: &Client, from: &str, name: &str) -> Result<Response> {
    Ok(c.post(s.api(&format!("/v1/sprites/{from}/fork")))
        .json(&json!({"name": name}))
        .send()
        .await?)
}

async fn exec(s: &TestServer, c: &Client, name: &str) -> Result<Response> {
    Ok(c.post(s.api(&format!("/v1/sprites/{name}/exec?cmd=true")))
        .send()
        .await?)
}

async fn checkpoint(s: &TestServer, c: &Client, name: &str) -> Result<Response> {
    Ok(c.post(s.api(&format!("/v1/sprites/{name}/checkpoint")))
        .json(&json!({}))
        .send()
        .await?)
}

async fn expect_status(what: &str, r: Response, status: u16) -> Result<()> {
    let got = r.status();
    ensure!(got == status, "{what}: {got} (want {status}) {}", r.text().await?);
    Ok(())
}

/// A 429 with `code`, a `Retry-After` and the limit; returns the body.
async fn expect_limited(what: &str, r: Response, code: &str) -> Result<Value> {
    let status = r.status();
    let retry = r.headers().get("retry-after").cloned();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 429, "{what}: {status} {body}");
    ensure!(body["error"] == code, "{what}: {body}");
    ensure!(
        retry.is_some() && body["limit"].is_u64(),
        "{what}: no Retry-After or limit: {body}"
    );
    Ok(body)
}

async fn organization(s: &TestServer, c: &Client) -> Result<Value> {
    let r = c.get(s.api("/v1/organization")).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    Ok(r.json().await?)
}

pub async fn sprite_count_and_create_rate() -> Result<()> {
    let s = TestServer::start_with(|c| c.max_sprites = Some(9)).await?;
    let a = org(&s, "qa", json!({"max_sprites": 2})).await?;
    let b = org(&s, "qb", json!({})).await?;
    let c = org(&s, "qc", json!({"create_rate": "2/1h"})).await?;

    // max_sprites: A's third sprite is refused, by create and by fork.
    for n in ["a1", "a2"] {
        expect_status(n, create(&s, &a, n, json!({})).await?, 201).await?;
    }
    let body = expect_limited(
        "A's third",
        create(&s, &a, "a3", json!({})).await?,
        "sprite_limit_exceeded",
    )
    .await?;
    ensure!(body["limit"] == 2 && body["current_count"] == 2, "{body}");
    expect_limited(
        "A's fork",
        fork(&s, &a, "a1", "a3").await?,
        "sprite_limit_exceeded",
    )
    .await?;
    // B has no limit of its own.
    for n in ["b1", "b2"] {
        expect_status(n, create(&s, &b, n, json!({})).await?, 201).await?;
    }
    expect_status("B's fork", fork(&s, &b, "b1", "b3").await?, 201).await?;

    // create_rate: C's third create in the window is refused, fork too.
    for n in ["c1", "c2"] {
        expect_status(n, create(&s, &c, n, json!({})).await?, 201).await?;
    }
    let body = expect_limited(
        "C's third",
        create(&s, &c, "c3", json!({})).await?,
        "sprite_creation_rate_limited",
    )
    .await?;
    ensure!(body["window_seconds"] == 3600 && body["limit"] == 2, "{body}");
    expect_limited(
        "C's fork",
        fork(&s, &c, "c1", "c3").await?,
        "sprite_creation_rate_limited",
    )
    .await?;

    // Raised limits let both continue (a changed rate starts a new window).
    set_limits(&s, "qa", json!({"max_sprites": 3})).await?;
    expect_status("A's third, raised", create(&s, &a, "a3", json!({})).await?, 201).await?;
    set_limits(&s, "qc", json!({"create_rate": "5/1h"})).await?;
    expect_status("C's third, raised", create(&s, &c, "c3", json!({})).await?, 201).await?;
    let o = organization(&s, &a).await?;
    ensure!(
        o["usage"]["sprites"] == 3 && o["limits"]["max_sprites"] == 3,
        "{o}"
    );

    // A tenth sprite would pass every organisation's limit, not the server's 9.
    expect_limited(
        "server-wide",
        create(&s, &b, "b4", json!({})).await?,
        "sprite_limit_exceeded",
    )
    .await?;
    s.stop().await;
    Ok(())
}

pub async fn awake_memory_cpu_on_wake() -> Result<()> {
    let s = TestServer::start_with(|c| c.max_awake = Some(6)).await?;
    let a = org(&s, "wa", json!({"max_awake": 1})).await?;
    let b = org(&s, "wb", json!({})).await?;
    let m = org(&s, "wm", json!({"max_memory_mb": 400})).await?;
    let c = org(&s, "wc", json!({"max_cpus": 1.5})).await?;
    for (cl, n, cfg) in [
        (&a, "a1", json!({})),
        (&a, "a2", json!({})),
        (&b, "b1", json!({})),
        (&b, "b2", json!({})),
        (&m, "m1", json!({"ram_mb": 256})),
        (&m, "m2", json!({"ram_mb": 256})),
        (&c, "c1", json!({"cpus": 1})),
        (&c, "c2", json!({"cpus": 1})),
    ] {
        expect_status(n, create(&s, cl, n, cfg).await?, 201).await?;
    }

    // max_awake: of two wakes racing for A's one place, exactly one wins.
    let (r1, r2) = tokio::join!(exec(&s, &a, "a1"), exec(&s, &a, "a2"));
    let (r1, r2) = (r1?, r2?);
    let (won, lost) = match (r1.status().as_u16(), r2.status().as_u16()) {
        (200, 429) => (r1, r2),
        (429, 200) => (r2, r1),
        (x, y) => anyhow::bail!("racing wakes with max_awake 1 answered {x} and {y}"),
    };
    drop(won);
    expect_limited("A's second wake", lost, "concurrent_sprite_limit_exceeded").await?;
    expect_status("B wakes meanwhile", exec(&s, &b, "b1").await?, 200).await?;
    set_limits(&s, "wa", json!({"max_awake": 2})).await?;
    for n in ["a1", "a2"] {
        expect_status(n, exec(&s, &a, n).await?, 200).await?;
    }

    // max_memory_mb: 256 + 256 MiB exceed 400.
    expect_status("m1", exec(&s, &m, "m1").await?, 200).await?;
    let body = expect_limited(
        "m2",
        exec(&s, &m, "m2").await?,
        "concurrent_sprite_limit_exceeded",
    )
    .await?;
    ensure!(
        body["message"]
            .as_str()
            .is_some_and(|t| t.contains("max_memory_mb")),
        "{body}"
    );
    let o = organization(&s, &m).await?;
    ensure!(o["usage"]["awake"] == 1 && o["usage"]["memory_mb"] == 256, "{o}");
    let mgr = &s.running.as_ref().expect("running").state.mgr;
    mgr.sleep("m1@wm", SpriteStatus::Cold).await?;
    expect_status("m2 once m1 sleeps", exec(&s, &m, "m2").await?, 200).await?;

    // max_cpus: two 1-CPU sprites exceed 1.5 CPUs.
    expect_status("c1", exec(&s, &c, "c1").await?, 200).await?;
    let body = expect_limited(
        "c2",
        exec(&s, &c, "c2").await?,
        "concurrent_sprite_limit_exceeded",
    )
    .await?;
    ensure!(
        body["message"].as_str().is_some_and(|t| t.contains("max_cpus")),
        "{body}"
    );
    set_limits(&s, "wc", json!({"max_cpus": 2})).await?;
    expect_status("c2, raised", exec(&s, &c, "c2").await?, 200).await?;
    let o = organization(&s, &c).await?;
    ensure!(o["usage"]["awake"] == 2 && o["usage"]["cpus"] == 2.0, "{o}");

    // Six awake (a1 a2 b1 m2 c1 c2): the server's max_awake still holds for B.
    let body = expect_limited(
        "server-wide",
        exec(&s, &b, "b2").await?,
        "concurrent_sprite_limit_exceeded",
    )
    .await?;
    ensure!(body["limit"] == 6, "{body}");
    s.stop().await;
    Ok(())
}

pub async fn disk_bytes_on_create_fork_checkpoint() -> Result<()> {
    let s = TestServer::start().await?;
    let d = org(&s, "da", json!({})).await?;
    let b = org(&s, "db", json!({"max_disk_bytes": 1u64 << 40})).await?;
    expect_status("d1", create(&s, &d, "d1", json!({})).await?, 201).await?;
    expect_status("b1", create(&s, &b, "b1", json!({})).await?, 201).await?;

    // Every disk holds at least its file system, so 1 byte is already full.
    set_limits(&s, "da", json!({"max_disk_bytes": 1})).await?;
    let body = expect_limited(
        "create",
        create(&s, &d, "d2", json!({})).await?,
        "disk_quota_exceeded",
    )
    .await?;
    ensure!(body["current_count"].as_u64().is_some_and(|n| n >= 1), "{body}");
    expect_limited("fork", fork(&s, &d, "d1", "d2").await?, "disk_quota_exceeded").await?;
    expect_limited(
        "checkpoint",
        checkpoint(&s, &d, "d1").await?,
        "disk_quota_exceeded",
    )
    .await?;
    let o = organization(&s, &d).await?;
    ensure!(o["usage"]["disk_bytes"].as_u64().is_some_and(|n| n >= 1), "{o}");

    // Another organisation, under its own limit, carries on.
    let r = checkpoint(&s, &b, "b1").await?;
    ensure!(r.status() == 200 && r.text().await?.contains("\"complete\""));
    expect_status("B's fork", fork(&s, &b, "b1", "b2").await?, 201).await?;

    set_limits(&s, "da", json!({"max_disk_bytes": 1u64 << 40})).await?;
    expect_status("create, raised", create(&s, &d, "d2", json!({})).await?, 201).await?;
    let r = checkpoint(&s, &d, "d1").await?;
    ensure!(r.status() == 200 && r.text().await?.contains("\"complete\""));
    s.stop().await;
    Ok(())
}
