//! Cross-organisation isolation through the official Python and JavaScript
//! SDKs (tests/sdk/test_isolation_{py.py,js.mjs}): org A's token, an
//! org B token restricted to one sprite and an org B viewer against org B's
//! and the default organisation's sprites, which must come out unchanged.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::TestServer;
use crate::org_tokens::{
    client_for, create_sprite, get, make_org, mint_ok, read_file, secret, serve_web, url_get, url_serves,
    write_file,
};
use crate::sdk::{node_and_sdk, python, run_suite};

/// What org A must not be able to change: the sprite, its checkpoints,
/// services, network policy, files and URL.
async fn snapshot(s: &TestServer, token: &str, name: &str) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let (st, sprite) = get(s, token, &format!("/v1/sprites/{name}")).await?;
    ensure!(st == 200, "{name}: {st} {sprite}");
    for k in ["id", "name", "organization", "url", "url_settings", "labels"] {
        out.insert(k.into(), sprite[k].clone());
    }
    let (_, cps) = get(s, token, &format!("/v1/sprites/{name}/checkpoints")).await?;
    let cps: Vec<Value> = cps
        .as_array()
        .context("checkpoints")?
        .iter()
        .map(|c| json!([c["id"], c["comment"], c["create_time"]]))
        .collect();
    out.insert("checkpoints".into(), cps.into());
    let (_, svcs) = get(s, token, &format!("/v1/sprites/{name}/services")).await?;
    let svcs: Vec<Value> = svcs
        .as_array()
        .context("services")?
        .iter()
        .map(|v| json!([v["name"], v["cmd"], v["args"], v["http_port"]]))
        .collect();
    out.insert("services".into(), svcs.into());
    out.insert(
        "policy".into(),
        get(s, token, &format!("/v1/sprites/{name}/policy/network"))
            .await?
            .1,
    );
    out.insert(
        "home".into(),
        get(s, token, &format!("/v1/sprites/{name}/fs/list?path=/home/sprite"))
            .await?
            .1,
    );
    out.insert(
        "note".into(),
        read_file(s, token, name, "/home/sprite/note.txt").await?.into(),
    );
    Ok(out.into())
}

/// A victim sprite: a file rewritten after its checkpoint (so a restore
/// would show), and a web service on its URL.
async fn victim(s: &TestServer, token: &str, name: &str, label: &str) -> Result<()> {
    create_sprite(s, token, name).await?;
    write_file(s, token, name, "/home/sprite/note.txt", "before\n").await?;
    write_file(
        s,
        token,
        name,
        "/home/sprite/www/index.html",
        &format!("{name} page\n"),
    )
    .await?;
    serve_web(s, token, name, "/home/sprite/www").await?;
    let r = client_for(token)
        .post(s.api(&format!("/v1/sprites/{name}/checkpoint")))
        .json(&json!({"comment": "victim"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "checkpoint {name}: {}", r.status());
    r.text().await?;
    write_file(s, token, name, "/home/sprite/note.txt", "after\n").await?;
    let page = url_serves(s, Some(token), label).await?;
    ensure!(page == format!("{name} page\n"), "{page}");
    Ok(())
}

pub async fn sdk_isolation(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    make_org(&s, "orga").await?;
    make_org(&s, "orgb").await?;
    let a = secret(&mint_ok(&s, &s.token, json!({"org": "orga", "role": "admin", "name": "a"})).await?);
    let b = secret(&mint_ok(&s, &s.token, json!({"org": "orgb", "role": "admin", "name": "b"})).await?);
    create_sprite(&s, &a, "mine").await?;
    // Org B's sprites are made with org B's token; `dflt` is the default
    // organisation's, whose keys are bare names.
    victim(&s, &b, "secret", "secret-orgb").await?;
    create_sprite(&s, &b, "other").await?;
    let admin = s.token.clone();
    victim(&s, &admin, "dflt", "dflt").await?;
    let restricted = secret(&mint_ok(&s, &b, json!({"role": "member", "sprites": ["secret"]})).await?);
    let viewer = secret(&mint_ok(&s, &b, json!({"role": "viewer"})).await?);
    let before = [
        snapshot(&s, &b, "secret").await?,
        snapshot(&s, &admin, "dflt").await?,
    ];

    let env = |mut cmd: Command| {
        cmd.env("DEN_TOKEN_A", &a)
            .env("DEN_TOKEN_RESTRICTED", &restricted)
            .env("DEN_TOKEN_VIEWER", &viewer)
            .env("DEN_VICTIMS", "secret=secret-orgb,dflt=dflt");
        cmd
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_isolation_py.py");
    let mut py = Command::new(python());
    py.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script]);
    let py_result = run_suite(&s, env(py), "pytest (isolation)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_isolation_js.mjs");
    let (node, sdk) = node_and_sdk();
    let mut js = Command::new(node);
    js.args(["--test", "--test-timeout=120000", "--test-reporter=spec", script])
        .env("DEN_SPRITES_JS", sdk);
    let js_result = run_suite(&s, env(js), "node --test (isolation)");

    // Whatever the SDKs saw, org B's and the default org's sprites are as they were.
    let after = [
        snapshot(&s, &b, "secret").await?,
        snapshot(&s, &admin, "dflt").await?,
    ];
    ensure!(
        before == after,
        "a victim changed:\nbefore {before:?}\nafter  {after:?}"
    );
    ensure!(
        after[0]["note"] == "after\n" && after[0]["checkpoints"].as_array().is_some_and(|c| !c.is_empty())
    );
    for (tok, name, label) in [(&b, "secret", "secret-orgb"), (&admin, "dflt", "dflt")] {
        ensure!(url_get(&s, None, label).await?.0 == 401, "{label} became public");
        ensure!(url_serves(&s, Some(tok.as_str()), label).await? == format!("{name} page\n"));
    }
    py_result?;
    js_result?;
    s.stop().await;
    Ok(())
}
