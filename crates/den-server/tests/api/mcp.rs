//! `/mcp`, den's MCP server: the official Python SDK as a real client
//! (tests/mcp/test_mcp_py.py), and from here what an agent must never get
//! through it: no token or a bad one is 401, a foreign browser Origin is
//! refused, malformed JSON-RPC is a JSON-RPC error, and a viewer or a token
//! limited to some sprites gets exactly the REST API's refusal.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::TestServer;
use crate::org_tokens::make_org;
use crate::sdk::{python, run_suite};

const LATEST: &str = "2026-07-28";

pub async fn python_sdk() -> Result<()> {
    let s = TestServer::start().await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp/test_mcp_py.py");
    let mut cmd = Command::new(python());
    // -s: the suite prints what MCP adds to an exec's round trip.
    cmd.args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", script]);
    run_suite(&s, cmd, "pytest (MCP Python SDK)")?;
    s.stop().await;
    Ok(())
}

/// A `tools/call` at the latest revision: one self-contained POST.
fn tool_call(id: u64, name: &str, args: Value) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {
            "name": name, "arguments": args,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": LATEST,
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    })
}

/// POST a JSON-RPC message to `/mcp`: the status and the JSON-RPC answer
/// (from a JSON body or the SSE event that carries it).
async fn post(
    s: &TestServer,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(StatusCode, Value)> {
    let mut r = s
        .anonymous()
        .post(s.api("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    let json_text = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .find(|d| d.contains("\"jsonrpc\""))
        .unwrap_or(text.trim());
    Ok((
        status,
        serde_json::from_str(json_text).unwrap_or_else(|_| Value::String(text.clone())),
    ))
}

/// Call a tool as `token`: `(isError, the text it answered)`.
async fn call(s: &TestServer, token: &str, name: &str, args: Value) -> Result<(bool, String)> {
    let headers = [
        ("mcp-protocol-version", LATEST),
        ("mcp-method", "tools/call"),
        ("mcp-name", name),
    ];
    let (st, v) = post(s, Some(token), &headers, tool_call(7, name, args).to_string()).await?;
    ensure!(st == 200, "{name}: {st} {v}");
    let result = &v["result"];
    let text = result["content"][0]["text"]
        .as_str()
        .with_context(|| format!("{name}: no text in {v}"))?;
    Ok((result["isError"] == true, text.to_string()))
}

/// The REST API's message for the same request with the same token.
async fn rest_message(
    s: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<(u16, String)> {
    let r = s
        .anonymous()
        .request(method, s.api(path))
        .bearer_auth(token)
        .send()
        .await?;
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    Ok((st, v["message"].as_str().unwrap_or_default().to_string()))
}

async fn mint(s: &TestServer, body: Value) -> Result<String> {
    let r = s.client().post(s.api("/v1/tokens")).json(&body).send().await?;
    ensure!(r.status() == 201, "mint {body}: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["token"].as_str().context("token secret")?.to_string())
}

pub async fn refuses_what_rest_refuses() -> Result<()> {
    let s = TestServer::start().await?;
    let list = tool_call(1, "list_sprites", json!({})).to_string();
    let latest = [
        ("mcp-protocol-version", LATEST),
        ("mcp-method", "tools/call"),
        ("mcp-name", "list_sprites"),
    ];

    // No token, a bad token: 401 before any MCP.
    let (st, _) = post(&s, None, &latest, list.clone()).await?;
    ensure!(st == 401, "no token: {st}");
    let (st, _) = post(&s, Some("den_not-a-token"), &latest, list.clone()).await?;
    ensure!(st == 401, "bad token: {st}");

    // A browser page of another origin (DNS rebinding) is refused; the
    // server's own origin and non-browser clients are not.
    let mut foreign = latest.to_vec();
    foreign.push(("origin", "http://evil.example"));
    let (st, _) = post(&s, Some(&s.token), &foreign, list.clone()).await?;
    ensure!(st == 403, "foreign origin: {st}");
    let own = format!("http://{}", s.cfg.listen);
    let mut same = latest.to_vec();
    same.push(("origin", &own));
    let (st, v) = post(&s, Some(&s.token), &same, list.clone()).await?;
    ensure!(
        st == 200 && v["result"]["isError"] == false,
        "own origin: {st} {v}"
    );

    // Malformed JSON-RPC: a JSON-RPC error, never a panic or a 500.
    let (st, v) = post(&s, Some(&s.token), &latest, "{not json".into()).await?;
    ensure!(st.is_client_error(), "malformed: {st} {v}");
    ensure!(v["error"]["code"] == -32700, "malformed: {v}");
    let (st, v) = post(&s, Some(&s.token), &latest, r#"{"jsonrpc":"2.0","id":1}"#.into()).await?;
    ensure!(
        st.is_client_error() && v["error"]["code"].is_i64(),
        "no method: {st} {v}"
    );
    let (st, v) = post(&s, Some(&s.token), &latest, "[1,2]".into()).await?;
    ensure!(
        st.is_client_error() && v["error"]["code"].is_i64(),
        "batch of junk: {st} {v}"
    );
    // A tool that does not exist is a protocol error too.
    let headers = [
        ("mcp-protocol-version", LATEST),
        ("mcp-method", "tools/call"),
        ("mcp-name", "nope"),
    ];
    let (_, v) = post(
        &s,
        Some(&s.token),
        &headers,
        tool_call(2, "nope", json!({})).to_string(),
    )
    .await?;
    ensure!(v["error"]["code"] == -32602, "unknown tool: {v}");
    // The server still answers after all that.
    let (st, _) = post(&s, Some(&s.token), &latest, list.clone()).await?;
    ensure!(st == 200);

    // Tenancy: acme's sprites web and other; a viewer, and a member limited to web.
    make_org(&s, "acme").await?;
    for name in ["web", "other"] {
        let r = s
            .client()
            .post(s.api("/v1/sprites"))
            .header("den-org", "acme")
            .json(&json!({"name": name}))
            .send()
            .await?;
        ensure!(r.status() == 201, "create {name}: {}", r.status());
    }
    let viewer = mint(&s, json!({"org": "acme", "role": "viewer"})).await?;
    let web_only = mint(&s, json!({"org": "acme", "role": "member", "sprites": ["web"]})).await?;

    // The viewer sees both, and may not run anything: REST's very refusal.
    let (err, text) = call(&s, &viewer, "list_sprites", json!({})).await?;
    ensure!(
        !err && text.contains("\"web\"") && text.contains("\"other\""),
        "{text}"
    );
    let (err, text) = call(&s, &viewer, "exec", json!({"sprite": "web", "command": "true"})).await?;
    let (st, rest) = rest_message(
        &s,
        &viewer,
        reqwest::Method::POST,
        "/v1/sprites/web/exec?cmd=true",
    )
    .await?;
    ensure!(
        st == 403 && err && text == rest,
        "viewer exec: {text} vs REST {st} {rest}"
    );
    let (err, text) = call(&s, &viewer, "delete_sprite", json!({"sprite": "web"})).await?;
    ensure!(err && text.contains("viewer"), "viewer delete: {text}");
    let (err, _) = call(
        &s,
        &viewer,
        "fs_write",
        json!({"sprite": "web", "path": "x", "content": "y"}),
    )
    .await?;
    ensure!(err, "a viewer wrote a file");

    // The limited member: `other` does not exist for it, exactly as over REST.
    let (err, text) = call(&s, &web_only, "list_sprites", json!({})).await?;
    ensure!(
        !err && text.contains("\"web\"") && !text.contains("\"other\""),
        "{text}"
    );
    let (err, text) = call(
        &s,
        &web_only,
        "exec",
        json!({"sprite": "other", "command": "true"}),
    )
    .await?;
    let (st, rest) = rest_message(&s, &web_only, reqwest::Method::GET, "/v1/sprites/other").await?;
    ensure!(
        st == 404 && err && text == rest,
        "hidden sprite: {text} vs REST {st} {rest}"
    );
    let (err, text) = call(
        &s,
        &web_only,
        "exec",
        json!({"sprite": "web", "argv": ["echo", "mine"]}),
    )
    .await?;
    ensure!(!err && text.contains("mine\\n"), "own sprite: {text}");
    let (err, text) = call(&s, &web_only, "create_sprite", json!({"name": "fresh"})).await?;
    ensure!(err, "a token limited to web created another sprite: {text}");

    // Nothing was changed by the refused calls.
    let r = s
        .client()
        .get(s.api("/v1/sprites/web"))
        .header("den-org", "acme")
        .send()
        .await?;
    ensure!(r.status() == 200);
    s.stop().await;
    Ok(())
}

/// The handshake revisions: `initialize` at each gets its own revision back
/// and an `Mcp-Session-Id`; the session then serves requests until DELETE,
/// an unknown session is 404 (the client must initialize again), and so is
/// a session presented by another token than the one that opened it.
pub async fn sessions_at_the_handshake_revisions() -> Result<()> {
    let s = TestServer::start().await?;
    let other = mint(&s, json!({"name": "other", "role": "admin"})).await?;
    let http = s.client();
    let send = |session: Option<&str>, version: &str, body: Value| {
        let mut r = http
            .post(s.api("/mcp"))
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", version)
            .json(&body);
        if let Some(id) = session {
            r = r.header("mcp-session-id", id);
        }
        r.send()
    };
    let answer = |text: &str| -> Value {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .find(|d| d.contains("\"jsonrpc\""))
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_else(|| serde_json::from_str(text).unwrap_or(Value::Null))
    };
    for version in ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"] {
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "den-test", "version": "1"},
        }});
        let r = send(None, version, init).await?;
        ensure!(r.status() == 200, "initialize {version}: {}", r.status());
        let session = r
            .headers()
            .get("mcp-session-id")
            .context("no Mcp-Session-Id")?
            .to_str()?
            .to_string();
        let v = answer(&r.text().await?);
        ensure!(v["result"]["protocolVersion"] == version, "{version}: {v}");
        ensure!(v["result"]["serverInfo"]["name"] == "den", "{v}");
        let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let r = send(Some(&session), version, done).await?;
        ensure!(r.status() == 202, "initialized: {}", r.status());
        let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
        let r = send(Some(&session), version, list.clone()).await?;
        let v = answer(&r.text().await?);
        ensure!(
            v["result"]["tools"].as_array().map(Vec::len) == Some(14),
            "{version}: {v}"
        );

        let r = send(Some("no-such-session"), version, list.clone()).await?;
        ensure!(r.status() == 404, "unknown session: {}", r.status());
        // A session is its token's: another valid token is told it does not exist.
        let r = s
            .anonymous()
            .post(s.api("/mcp"))
            .bearer_auth(&other)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", version)
            .header("mcp-session-id", &session)
            .json(&list)
            .send()
            .await?;
        ensure!(r.status() == 404, "another token's session: {}", r.status());
        let r = http
            .delete(s.api("/mcp"))
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", version)
            .send()
            .await?;
        ensure!(r.status().is_success(), "DELETE: {}", r.status());
        let r = send(Some(&session), version, list).await?;
        ensure!(r.status() == 404, "ended session: {}", r.status());
    }
    s.stop().await;
    Ok(())
}
