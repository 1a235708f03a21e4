//! Services (§2.6): NDJSON create/start/stop, needs order, crash restarts,
//! sticky stop across a cold sleep, logs, errors, persistence.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_sprite::SpriteStatus;
use serde_json::{Value, json};

use crate::common::{TestServer, WAIT};

/// Parses an NDJSON body, checking the ServiceLogEvent shape of every line
/// and that the last one is `complete` with the service's log files.
fn events(service: &str, text: &str) -> Result<Vec<Value>> {
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("not NDJSON: {text}"))?;
    for l in &lines {
        ensure!(
            l["type"].is_string() && l["timestamp"].as_u64().is_some_and(|t| t > 1_700_000_000_000),
            "bad event {l}"
        );
    }
    let last = lines.last().context("empty stream")?;
    ensure!(last["type"] == "complete", "{text}");
    let dir = "/.sprite/logs/services";
    ensure!(
        last["log_files"]
            == json!({
                "combined": format!("{dir}/{service}.log"),
                "stdout": format!("{dir}/{service}.stdout.log"),
                "stderr": format!("{dir}/{service}.stderr.log"),
            }),
        "{last}"
    );
    Ok(lines)
}

fn has(evs: &[Value], kind: &str) -> bool {
    evs.iter().any(|e| e["type"] == kind)
}

async fn put(s: &TestServer, sprite: &str, service: &str, body: Value, q: &str) -> Result<reqwest::Response> {
    Ok(s.client()
        .put(s.api(&format!("/v1/sprites/{sprite}/services/{service}{q}")))
        .json(&body)
        .send()
        .await?)
}

/// PUT that must succeed; returns its events.
async fn create(s: &TestServer, sprite: &str, service: &str, body: Value, q: &str) -> Result<Vec<Value>> {
    let r = put(s, sprite, service, body, q).await?;
    ensure!(
        r.status() == 200,
        "PUT {service}: {} {}",
        r.status(),
        r.text().await?
    );
    ensure!(r.headers()["content-type"] == "application/x-ndjson");
    events(service, &r.text().await?)
}

async fn get_all(s: &TestServer, sprite: &str) -> Result<Vec<Value>> {
    let r = s
        .client()
        .get(s.api(&format!("/v1/sprites/{sprite}/services")))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    Ok(serde_json::from_value(r.json().await?)?)
}

async fn get_one(s: &TestServer, sprite: &str, service: &str) -> Result<Value> {
    let r = s
        .client()
        .get(s.api(&format!("/v1/sprites/{sprite}/services/{service}")))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    Ok(r.json().await?)
}

/// Polls the service until `ok` holds on it.
async fn wait_for(s: &TestServer, sprite: &str, service: &str, ok: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = get_one(s, sprite, service).await?;
        if ok(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post(s: &TestServer, path: &str, body: Option<Value>) -> Result<reqwest::Response> {
    let mut req = s.client().post(s.api(path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    Ok(req.send().await?)
}

fn status(v: &Value) -> &str {
    v["state"]["status"].as_str().unwrap_or("")
}

fn pid(v: &Value) -> i64 {
    v["state"]["pid"].as_i64().unwrap_or(-1)
}

pub async fn lifecycle() -> Result<()> {
    let mut s = TestServer::start().await?;
    let c = s.client();
    s.create("svc").await?;
    let sleeper = |tag: &str| json!({"cmd": "sh", "args": ["-c", format!("echo {tag}-up; exec sleep 1000")]});

    // Create: NDJSON with started, the service's output, then complete.
    let evs = create(&s, "svc", "b", sleeper("b"), "?duration=1s").await?;
    ensure!(evs[0]["type"] == "started", "{evs:?}");
    ensure!(
        evs.iter()
            .any(|e| e["type"] == "stdout" && e["data"].as_str().is_some_and(|d| d.contains("b-up"))),
        "{evs:?}"
    );
    // env in the CLI's string form, and the one http_port.
    let web = json!({"cmd": "sh", "args": ["-c", "echo \"greeting=$GREETING\"; exec httpd -f -p 8000"],
        "env": "GREETING=hi,OTHER=x", "http_port": 8000});
    let evs = create(&s, "svc", "web", web, "?duration=1.0s").await?;
    ensure!(
        evs.iter().any(|e| e["data"] == "greeting=hi"),
        "env not applied: {evs:?}"
    );
    create(&s, "svc", "a", sleeper("a"), "?duration=0s").await?;
    // Replacing `a` keeps its place before `b` in the set, so only `needs`
    // can make `b` start first at boot.
    let mut a_needs_b = sleeper("a");
    a_needs_b["needs"] = json!(["b"]);
    create(&s, "svc", "a", a_needs_b, "?duration=0s").await?;

    let all = get_all(&s, "svc").await?;
    ensure!(all.len() == 3, "{all:?}");
    let web = get_one(&s, "svc", "web").await?;
    ensure!(
        web["name"] == "web"
            && web["cmd"] == "sh"
            && web["http_port"] == 8000
            && web["needs"] == json!([])
            && web["env"] == json!({"GREETING": "hi", "OTHER": "x"})
            && web["dir"].is_null()
            && web["state"]["name"] == "web"
            && status(&web) == "running"
            && pid(&web) > 0
            && web["state"]["restart_count"] == 0
            && web["state"]["error"].is_null()
            && web["state"]["next_restart_at"].is_null(),
        "{web}"
    );
    let started = web["state"]["started_at"].as_str().unwrap_or("");
    ensure!(started.len() == 20 && started.ends_with('Z'), "{web}");
    let b = get_one(&s, "svc", "b").await?;
    ensure!(b["http_port"].is_null(), "{b}");

    // Crash restarts climb restart_count; the stream shows exit and restart.
    let crash = json!({"cmd": "sh", "args": ["-c", "echo boom; echo oops >&2; exit 3"]});
    let evs = create(&s, "svc", "crash", crash, "?duration=2500ms").await?;
    let exit = evs.iter().find(|e| e["type"] == "exit").context("no exit")?;
    ensure!(exit["exit_code"] == 3, "{exit}");
    ensure!(
        evs.iter().filter(|e| e["type"] == "started").count() >= 2,
        "no restart within 2.5 s: {evs:?}"
    );
    ensure!(
        evs.iter().any(|e| e["type"] == "stderr" && e["data"] == "oops"),
        "{evs:?}"
    );
    let cr = wait_for(&s, "svc", "crash", |v| {
        v["state"]["restart_count"].as_u64() >= Some(2)
    })
    .await?;
    ensure!(
        cr["state"]["error"].as_str().is_some_and(|e| e.contains('3')),
        "{cr}"
    );

    // Logs: a text tail of the combined log.
    let r = c
        .get(s.api("/v1/sprites/svc/services/crash/logs?lines=2"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    ensure!(r.headers()["content-type"].to_str()?.starts_with("text/plain"));
    let tail = r.text().await?;
    ensure!(tail.lines().count() == 2, "{tail:?}");
    let full = c
        .get(s.api("/v1/sprites/svc/services/crash/logs"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        full.contains("[stdout] boom") && full.contains("[stderr] oops"),
        "{full}"
    );
    let r = c
        .get(s.api("/v1/sprites/svc/services/crash/logs?lines=x"))
        .send()
        .await?;
    ensure!(r.status() == 400);

    // Signal: killing a service is a crash, so it comes back.
    let r = post(
        &s,
        "/v1/sprites/svc/services/signal",
        Some(json!({"name": "b", "signal": "KILL"})),
    )
    .await?;
    ensure!(r.status() == 204, "{}", r.status());
    let b2 = wait_for(&s, "svc", "b", |v| {
        v["state"]["restart_count"] == 1 && status(v) == "running"
    })
    .await?;
    ensure!(pid(&b2) != pid(&b), "{b2}");

    // Sticky stop.
    let r = post(&s, "/v1/sprites/svc/services/web/stop?timeout=10s", None).await?;
    ensure!(r.status() == 200);
    let evs = events("web", &r.text().await?)?;
    ensure!(has(&evs, "stopping") && has(&evs, "stopped"), "{evs:?}");
    ensure!(status(&get_one(&s, "svc", "web").await?) == "stopped");
    let r = post(&s, "/v1/sprites/svc/services/web/stop", None).await?;
    ensure!(r.status() == 409, "second stop: {}", r.status());
    let r = post(
        &s,
        "/v1/sprites/svc/services/signal",
        Some(json!({"name": "web", "signal": "HUP"})),
    )
    .await?;
    ensure!(r.status() == 409, "signal stopped: {}", r.status());

    // Cold: answered from the definitions, without waking the sprite.
    let mgr = s.running.as_ref().context("running")?.state.mgr.clone();
    mgr.sleep("svc", SpriteStatus::Cold).await?;
    let all = get_all(&s, "svc").await?;
    ensure!(
        all.len() == 4
            && all
                .iter()
                .all(|v| status(v) == "stopped" && v["state"]["pid"].is_null())
    );
    let sprite: Value = c.get(s.api("/v1/sprites/svc")).send().await?.json().await?;
    ensure!(
        sprite["status"] == "cold",
        "GET services woke the sprite: {sprite}"
    );
    let r = post(&s, "/v1/sprites/svc/services/b/stop", None).await?;
    ensure!(r.status() == 409, "stop on a cold sprite: {}", r.status());

    // Wake: services come back in needs order, the stopped one stays stopped
    // (the boot waited for every start attempt).
    let act = mgr.wake("svc").await?;
    drop(act);
    let a = wait_for(&s, "svc", "a", |v| status(v) == "running").await?;
    let b = wait_for(&s, "svc", "b", |v| status(v) == "running").await?;
    ensure!(pid(&b) < pid(&a), "b should start before a: b={b} a={a}");
    ensure!(status(&get_one(&s, "svc", "web").await?) == "stopped");

    // Start clears the sticky stop.
    let r = post(&s, "/v1/sprites/svc/services/web/start?duration=1s", None).await?;
    ensure!(r.status() == 200);
    let evs = events("web", &r.text().await?)?;
    ensure!(has(&evs, "started"), "{evs:?}");
    ensure!(status(&get_one(&s, "svc", "web").await?) == "running");

    // Errors.
    let r = put(&s, "svc", "x", json!({"args": ["1"]}), "").await?;
    ensure!(r.status() == 400);
    let body: Value = r.json().await?;
    ensure!(body["message"] == "cmd field is required", "{body}");
    let r = put(&s, "svc", "x", json!({"cmd": "sleep", "needs": ["nope"]}), "").await?;
    ensure!(r.status() == 400, "unknown needs: {}", r.status());
    let r = put(&s, "svc", "x", json!({"cmd": "sleep", "http_port": 9000}), "").await?;
    ensure!(r.status() == 409, "second http_port: {}", r.status());
    ensure!(
        r.json::<Value>().await?["message"]
            .as_str()
            .unwrap_or("")
            .contains("HTTP port")
    );
    let r = put(&s, "svc", "x", json!({"cmd": "sleep"}), "?duration=forever").await?;
    ensure!(r.status() == 400, "bad duration: {}", r.status());
    let r = put(&s, "svc", "bad%20name", json!({"cmd": "sleep"}), "").await?;
    ensure!(r.status() == 400, "bad name: {}", r.status());
    ensure!(
        get_all(&s, "svc").await?.len() == 4,
        "a refused PUT changed the set"
    );
    for (method, path) in [
        ("GET", "/v1/sprites/svc/services/nope"),
        ("DELETE", "/v1/sprites/svc/services/nope"),
        ("POST", "/v1/sprites/svc/services/nope/start"),
        ("POST", "/v1/sprites/svc/services/nope/stop"),
        ("GET", "/v1/sprites/nosprite/services"),
    ] {
        let r = c.request(method.parse()?, s.api(path)).send().await?;
        ensure!(r.status() == 404, "{method} {path}: {}", r.status());
    }
    let r = post(
        &s,
        "/v1/sprites/svc/services/signal",
        Some(json!({"name": "a", "signal": "BOGUS"})),
    )
    .await?;
    ensure!(r.status() == 400, "bad signal: {}", r.status());
    let r = post(
        &s,
        "/v1/sprites/svc/services/signal",
        Some(json!({"name": "nope", "signal": "TERM"})),
    )
    .await?;
    ensure!(r.status() == 404, "signal unknown: {}", r.status());
    let r = c.delete(s.api("/v1/sprites/svc/services/b")).send().await?;
    ensure!(r.status() == 409, "deleting a need: {}", r.status());

    // Persistence across a server restart (sprites come back cold).
    s.restart().await?;
    let c = s.client();
    let all = get_all(&s, "svc").await?;
    let names: Vec<&str> = all.iter().filter_map(|v| v["name"].as_str()).collect();
    ensure!(names == ["b", "web", "a", "crash"], "{names:?}");
    ensure!(
        all[2]["needs"] == json!(["b"]) && all[1]["http_port"] == 8000,
        "{all:?}"
    );
    let r = post(&s, "/v1/sprites/svc/services/b/start?duration=0s", None).await?;
    ensure!(r.status() == 200);
    r.text().await?;
    wait_for(&s, "svc", "a", |v| status(v) == "running").await?;

    // A service may be called `signal`, like the signal endpoint.
    create(
        &s,
        "svc",
        "signal",
        json!({"cmd": "sleep", "args": ["1000"]}),
        "?duration=0s",
    )
    .await?;
    ensure!(get_one(&s, "svc", "signal").await?["cmd"] == "sleep");
    ensure!(
        c.delete(s.api("/v1/sprites/svc/services/signal"))
            .send()
            .await?
            .status()
            == 204
    );

    // Delete keeps the logs.
    ensure!(
        c.delete(s.api("/v1/sprites/svc/services/crash"))
            .send()
            .await?
            .status()
            == 204
    );
    ensure!(
        c.get(s.api("/v1/sprites/svc/services/crash"))
            .send()
            .await?
            .status()
            == 404
    );
    let logs = c
        .get(s.api("/v1/sprites/svc/services/crash/logs"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(logs.contains("boom"), "{logs}");
    s.stop().await;
    Ok(())
}
