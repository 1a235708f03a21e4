//! Sprites CRUD, list paging and counts, auth, tokens, restart persistence.

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::common::TestServer;

pub async fn crud_and_auth() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    // No or a wrong token: 401 everywhere except the health check.
    for (client, auth) in [(s.anonymous(), None), (s.anonymous(), Some("Bearer den_wrong"))] {
        let mut req = client.get(s.api("/v1/sprites"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await?;
        ensure!(r.status() == 401, "{}", r.status());
        let body: Value = r.json().await?;
        ensure!(body["error"] == "unauthorized");
    }
    ensure!(s.anonymous().get(s.api("/v1/health")).send().await?.status() == 200);

    let created = s.create("crud").await?;
    ensure!(
        created["name"] == "crud" && created["status"] == "cold",
        "{created}"
    );
    ensure!(created["url_settings"]["auth"] == "sprite");
    ensure!(
        created["url"]
            .as_str()
            .unwrap_or("")
            .starts_with("http://crud.localhost:"),
        "{created}"
    );
    // Duplicate and invalid names.
    let r = c
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "crud"}))
        .send()
        .await?;
    ensure!(r.status() == 409, "duplicate: {}", r.status());
    for bad in [json!({"name": "Bad Name"}), json!({}), json!({"name": 5})] {
        let r = c.post(s.api("/v1/sprites")).json(&bad).send().await?;
        ensure!(r.status() == 400, "{bad}: {}", r.status());
        let body: Value = r.json().await?;
        ensure!(body["error"].is_string() && body["message"].is_string(), "{body}");
    }
    let r = c.post(s.api("/v1/sprites")).body("{not json").send().await?;
    ensure!(r.status() == 400);
    let big = format!("{{\"name\": \"big\", \"labels\": [\"{}\"]}}", "x".repeat(3 << 20));
    let r = c.post(s.api("/v1/sprites")).body(big).send().await?;
    ensure!(r.status() == 413, "oversize body: {}", r.status());
    ensure!(
        r.headers().get("connection").is_some_and(|v| v == "close"),
        "413 must close the connection its unread body is still on: {:?}",
        r.headers()
    );
    ensure!(r.json::<Value>().await?["error"] == "payload_too_large");

    // Get, update, list, delete.
    let got: Value = c.get(s.api("/v1/sprites/crud")).send().await?.json().await?;
    ensure!(got["id"] == created["id"]);
    ensure!(c.get(s.api("/v1/sprites/nope")).send().await?.status() == 404);
    let upd: Value = c
        .put(s.api("/v1/sprites/crud"))
        .json(&json!({"url_settings": {"auth": "public"}, "labels": ["a", "b"]}))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        upd["url_settings"]["auth"] == "public" && upd["labels"] == json!(["a", "b"]),
        "{upd}"
    );
    let r = c
        .put(s.api("/v1/sprites/crud"))
        .json(&json!({"url_settings": {"auth": "everyone"}}))
        .send()
        .await?;
    ensure!(r.status() == 400);
    for n in ["page-a", "page-b", "page-c"] {
        s.create(n).await?;
    }
    let list: Value = c
        .get(s.api("/v1/sprites?prefix=page-&max_results=2"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(list["sprites"].as_array().map(Vec::len) == Some(2), "{list}");
    ensure!(
        list["has_more"] == true && list["cold"] == 4 && list["org"]["cold"] == 4,
        "{list}"
    );
    let token = list["next_continuation_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let rest: Value = c
        .get(s.api(&format!(
            "/v1/sprites?prefix=page-&max_results=2&continuation_token={token}"
        )))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        rest["sprites"][0]["name"] == "page-c" && rest["has_more"] == false,
        "{rest}"
    );
    ensure!(c.delete(s.api("/v1/sprites/page-c")).send().await?.status() == 204);
    ensure!(c.delete(s.api("/v1/sprites/page-c")).send().await?.status() == 404);
    s.stop().await;
    Ok(())
}

pub async fn tokens_and_restart() -> Result<()> {
    let mut s = TestServer::start().await?;
    let c = s.client();
    let t: Value = c
        .post(s.api("/v1/tokens"))
        .json(&json!({"name": "ci"}))
        .send()
        .await?
        .json()
        .await?;
    let secret = t["token"].as_str().unwrap_or_default().to_string();
    ensure!(secret.starts_with("den_"), "{t}");
    let with = |tok: &str| {
        s.anonymous()
            .get(s.api("/v1/sprites"))
            .header("authorization", format!("Bearer {tok}"))
    };
    ensure!(with(&secret).send().await?.status() == 200);
    s.create("keep").await?;
    c.put(s.api("/v1/sprites/keep"))
        .json(&json!({"url_settings": {"auth": "public"}}))
        .send()
        .await?;
    c.post(s.api("/v1/sprites/keep/policy/network"))
        .body(r#"{"rules":[{"domain":"example.com","action":"allow"}]}"#)
        .send()
        .await?;

    // Everything survives a restart: sprites, settings, policy, tokens.
    s.restart().await?;
    let c = s.client();
    let with = |tok: &str| {
        s.anonymous()
            .get(s.api("/v1/sprites"))
            .header("authorization", format!("Bearer {tok}"))
    };
    ensure!(
        with(&secret).send().await?.status() == 200,
        "token lost in restart"
    );
    let got: Value = c.get(s.api("/v1/sprites/keep")).send().await?.json().await?;
    ensure!(
        got["url_settings"]["auth"] == "public" && got["status"] == "cold",
        "{got}"
    );
    let pol: Value = c
        .get(s.api("/v1/sprites/keep/policy/network"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(pol["rules"][0]["domain"] == "example.com", "{pol}");
    let id = t["id"].as_str().unwrap_or_default();
    ensure!(
        c.delete(s.api(&format!("/v1/tokens/{id}")))
            .send()
            .await?
            .status()
            == 204
    );
    ensure!(
        with(&secret).send().await?.status() == 401,
        "revoked token still works"
    );
    s.stop().await;
    Ok(())
}

pub async fn policy_validation() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("pol").await?;
    let empty: Value = c
        .get(s.api("/v1/sprites/pol/policy/network"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(empty == json!({"rules": []}), "{empty}");
    for bad in [
        r#"{"rules":[{"domain":"x.com"}]}"#,
        r#"{"rules":[{"domain":"x.com","action":"maybe"}]}"#,
        r#"{"rulez":[]}"#,
        r#"{"rules":[{"include":"everything"}]}"#,
        r#"not json"#,
    ] {
        let r = c
            .post(s.api("/v1/sprites/pol/policy/network"))
            .body(bad)
            .send()
            .await?;
        ensure!(r.status() == 400, "{bad}: {}", r.status());
        ensure!(r.text().await? == "invalid policy config");
    }
    let r = c
        .post(s.api("/v1/sprites/pol/policy/network"))
        .body(r#"{"rules":[{"domain":"*.github.com","action":"allow"},{"include":"defaults"},{"domain":"*","action":"deny"}]}"#)
        .send()
        .await?;
    ensure!(r.status() == 204, "{}", r.status());
    s.stop().await;
    Ok(())
}

pub async fn checkpoints_ndjson() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("ck").await?;
    let r = c
        .post(s.api("/v1/sprites/ck/checkpoint"))
        .json(&json!({"comment": "first"}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    ensure!(r.headers()["content-type"] == "application/x-ndjson");
    let lines: Vec<Value> = r
        .text()
        .await?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let last = lines.last().cloned().unwrap_or_default();
    ensure!(
        last["type"] == "complete" && last["data"] == "Checkpoint v1 created",
        "{lines:?}"
    );
    c.post(s.api("/v1/sprites/ck/checkpoint"))
        .body("{}")
        .send()
        .await?
        .text()
        .await?;
    let list: Value = c
        .get(s.api("/v1/sprites/ck/checkpoints"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        list[0]["id"] == "v2" && list[1]["id"] == "v1" && list[1]["comment"] == "first",
        "{list}"
    );
    for id in ["v1", "1", "checkpoints%2Fv1"] {
        let r = c
            .get(s.api(&format!("/v1/sprites/ck/checkpoints/{id}")))
            .send()
            .await?;
        ensure!(r.status() == 200, "{id}: {}", r.status());
    }
    ensure!(
        c.get(s.api("/v1/sprites/ck/checkpoints/v9"))
            .send()
            .await?
            .status()
            == 404
    );
    // Restore of a missing checkpoint: 200 with an error line.
    let text = c
        .post(s.api("/v1/sprites/ck/checkpoints/v9/restore"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("\"type\":\"error\"")),
        "{text}"
    );
    let text = c
        .post(s.api("/v1/sprites/ck/checkpoints/v1/restore"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(text.contains("Restore from v1 complete"), "{text}");
    // The active checkpoint can't be deleted; another can.
    ensure!(
        c.delete(s.api("/v1/sprites/ck/checkpoints/v1"))
            .send()
            .await?
            .status()
            == 409
    );
    ensure!(
        c.delete(s.api("/v1/sprites/ck/checkpoints/v2"))
            .send()
            .await?
            .status()
            == 204
    );
    // Fork (den extension).
    let r = c
        .post(s.api("/v1/sprites/ck/fork"))
        .json(&json!({"name": "ck-fork", "checkpoint": "v1"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    let r = c
        .post(s.api("/v1/sprites/ck/fork"))
        .json(&json!({"name": "ck-live"}))
        .send()
        .await?;
    ensure!(r.status() == 201);
    let r = c
        .post(s.api("/v1/sprites/ck/fork"))
        .json(&json!({"name": "ck-x", "checkpoint": "v7"}))
        .send()
        .await?;
    ensure!(r.status() == 404, "{}", r.status());
    s.stop().await;
    Ok(())
}

/// Quotas and rate limits answer 429 with the Sprites codes and headers;
/// /metrics shows requests and sprite states; every answer has a request id.
pub async fn limits_metrics_request_ids() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.create_rate = Some("3/1h".parse().expect("rate"));
        c.max_awake = Some(1);
    })
    .await?;
    let c = s.client();
    for n in ["lim-a", "lim-b", "lim-c"] {
        s.create(n).await?;
    }
    let r = c
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "lim-d"}))
        .send()
        .await?;
    ensure!(r.status() == 429, "{}", r.status());
    ensure!(r.headers().contains_key("retry-after") && r.headers()["x-ratelimit-limit"] == "3");
    let body: Value = r.json().await?;
    ensure!(
        body["error"] == "sprite_creation_rate_limited" && body["limit"] == 3,
        "{body}"
    );
    ensure!(
        c.get(s.api("/v1/sprites/lim-d")).send().await?.status() == 404,
        "a refused create left a sprite"
    );

    // One sprite may be awake: waking a second is refused until the first sleeps.
    let exec = |name: &str| c.post(s.api(&format!("/v1/sprites/{name}/exec?cmd=true"))).send();
    ensure!(exec("lim-a").await?.status() == 200);
    let r = exec("lim-b").await?;
    ensure!(r.status() == 429, "{}", r.status());
    let body: Value = r.json().await?;
    ensure!(body["error"] == "concurrent_sprite_limit_exceeded", "{body}");
    let mgr = &s.running.as_ref().expect("running").state.mgr;
    mgr.sleep("lim-a", den_sprite::SpriteStatus::Cold).await?;
    ensure!(exec("lim-b").await?.status() == 200);

    // Request ids: generated, or the client's own echoed back.
    let r = c.get(s.api("/v1/sprites")).send().await?;
    let id = r
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap_or("").to_string());
    ensure!(id.as_deref().is_some_and(|i| i.len() >= 32), "{id:?}");
    let r = c
        .get(s.api("/v1/sprites"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await?;
    ensure!(r.headers()["x-request-id"] == "trace-me-42");

    // Metrics: token required; requests by route template, sprites by state, exec streams.
    ensure!(s.anonymous().get(s.api("/metrics")).send().await?.status() == 401);
    let text = c.get(s.api("/metrics")).send().await?.text().await?;
    for want in [
        "den_http_requests_total{method=\"POST\",route=\"/v1/sprites\",status=\"429\"}",
        "den_sprites{status=\"running\"} 1",
        "den_sprites{status=\"cold\"} 2",
        "den_storage_local_only_bytes",
        "den_http_request_duration_seconds",
    ] {
        ensure!(text.contains(want), "/metrics lacks {want}:\n{text}");
    }
    // The running sprite booted once at least, and its agent took time to answer.
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ensure!(value("den_sprite_boots_total") >= 1.0, "{text}");
    ensure!(
        value("den_sprite_boot_phase_microseconds_total{phase=\"agent\"}") > 0.0,
        "{text}"
    );
    s.stop().await;
    Ok(())
}
