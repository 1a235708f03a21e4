//! Memory checkpoints through the API (den extension, gVisor sprites): the
//! running processes come back with the disk, a server behind the sprite
//! URL included.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::TestServer;
use crate::proxy::{busybox_service, host, put_file, sh, url};

/// `POST …/checkpoint` with `body`; the `complete` line's text, or the
/// `error` line's.
async fn checkpoint(
    s: &TestServer,
    sprite: &str,
    body: Value,
) -> Result<std::result::Result<String, String>> {
    let r = s
        .client()
        .post(s.api(&format!("/v1/sprites/{sprite}/checkpoint")))
        .json(&body)
        .send()
        .await?;
    ensure!(
        r.status() == 200,
        "checkpoint: {} {}",
        r.status(),
        r.text().await?
    );
    last_line(&r.text().await?)
}

/// The outcome of an NDJSON progress stream.
fn last_line(body: &str) -> Result<std::result::Result<String, String>> {
    let last: Value = serde_json::from_str(body.lines().last().context("empty stream")?)?;
    Ok(match last["type"].as_str() {
        Some("complete") => Ok(last["data"].as_str().unwrap_or_default().to_string()),
        _ => Err(last.to_string()),
    })
}

async fn get_page(s: &TestServer, sprite: &str) -> Result<String> {
    let r = s
        .client()
        .get(url(s, "/"))
        .header("host", host(s, sprite))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    Ok(r.text().await?)
}

/// Sends one line to the sprite's shell "REPL" (a shell reading a FIFO in
/// the sandbox's memory-backed /tmp) and returns what it printed since.
async fn repl(s: &TestServer, sprite: &str, line: &str) -> Result<String> {
    sh(
        s,
        sprite,
        &format!(
            ": > /tmp/repl.out; echo '{line}; echo =done=' > /tmp/repl.in;
             while ! grep -q =done= /tmp/repl.out; do sleep 0.01; done; grep -v =done= /tmp/repl.out || true"
        ),
    )
    .await
}

async fn count(s: &TestServer, sprite: &str) -> Result<u64> {
    Ok(sh(s, sprite, "cat /srv/count").await?.trim().parse()?)
}

pub async fn memory_checkpoint_restore() -> Result<()> {
    let s = TestServer::start_with(|c| c.runtime = den_runtime::Runtime::Gvisor).await?;
    let created = s.create("m").await?;
    ensure!(created["config"]["runtime"] == "gvisor", "{created}");
    put_file(&s, "m", "/srv/www/index.html", "hello\n").await?;
    busybox_service(
        &s,
        "m",
        "web",
        &["httpd", "-f", "-p", "8080", "-h", "/srv/www"],
        8080,
    )
    .await?;
    sh(
        &s,
        "m",
        "(i=0; while :; do i=$((i+1)); echo $i > /srv/count.new; mv /srv/count.new /srv/count; sleep 0.02; done) >/dev/null 2>&1 &
         mkfifo /tmp/repl.in; (exec 3>/tmp/repl.in; exec sleep 100000) >/dev/null 2>&1 &
         (exec sh </tmp/repl.in >>/tmp/repl.out 2>&1) &
         (exec 4>/srv/open; echo unflushed >&4; exec sleep 100000) >/dev/null 2>&1 &
         while [ ! -s /srv/count ] || [ ! -s /srv/open ]; do sleep 0.01; done",
    )
    .await?;
    ensure!(get_page(&s, "m").await? == "hello\n");
    repl(&s, "m", "x=41").await?;

    let done = checkpoint(&s, "m", json!({"comment": "live", "memory": true}))
        .await?
        .map_err(anyhow::Error::msg)?;
    ensure!(done.contains("v1"), "{done}");
    let c_ck = count(&s, "m").await?;
    let plain = checkpoint(&s, "m", json!({"comment": "disk"})).await?;
    ensure!(plain.is_ok(), "{plain:?}");
    let list: Value = s
        .client()
        .get(s.api("/v1/sprites/m/checkpoints"))
        .send()
        .await?
        .json()
        .await?;
    let memory: Vec<(String, bool)> = list
        .as_array()
        .context("a list")?
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["memory"] == true,
            )
        })
        .collect();
    ensure!(
        memory == [("v2".to_string(), false), ("v1".to_string(), true)],
        "{memory:?}"
    );

    // Changes after the checkpoint: the REPL's variable, the page, time.
    repl(&s, "m", "x=0").await?;
    put_file(&s, "m", "/srv/www/index.html", "changed\n").await?;
    while count(&s, "m").await? < c_ck + 30 {}

    let r = s
        .client()
        .post(s.api("/v1/sprites/m/checkpoints/v1/restore"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    last_line(&r.text().await?)?.map_err(anyhow::Error::msg)?;
    // The same server process answers through the URL, from the rewound disk.
    ensure!(get_page(&s, "m").await? == "hello\n");
    let answer = repl(&s, "m", "echo $((x+1))").await?;
    ensure!(answer == "42\n", "the REPL's state: {answer:?}");
    let c = count(&s, "m").await?;
    ensure!(c >= c_ck && c < c_ck + 30, "the counter went on from {c_ck}: {c}");
    ensure!(sh(&s, "m", "cat /srv/open").await? == "unflushed\n");

    // A native sprite has no memory to save: a clean 400, nothing made.
    let r = s
        .client()
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "n", "config": {"runtime": "native"}}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    let r = s
        .client()
        .post(s.api("/v1/sprites/n/checkpoint"))
        .json(&json!({"memory": true}))
        .send()
        .await?;
    ensure!(r.status() == 400, "{}", r.status());
    let body: Value = r.json().await?;
    ensure!(
        body.to_string()
            .contains("memory checkpoints need a gvisor sprite"),
        "{body}"
    );
    let list: Value = s
        .client()
        .get(s.api("/v1/sprites/n/checkpoints"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(list.as_array().is_some_and(|l| l.is_empty()), "{list}");
    s.stop().await;
    Ok(())
}
