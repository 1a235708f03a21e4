//! The multiplexed control channel (`WSS /v1/sprites/{name}/control`):
//! the official JS SDK in control mode (tests/sdk/test_control_js.mjs), and
//! the protocol's edges from a raw WebSocket client: who may open it, bad
//! frames, one operation at a time, frame size, backpressure, and what
//! closing the channel does to a running command.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::{TestServer, WAIT};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(s: &TestServer, sprite: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = s
        .ws(&format!("/v1/sprites/{sprite}/control"))
        .into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("header"));
    }
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// The status and JSON body of a refused handshake.
async fn refused(s: &TestServer, sprite: &str, token: Option<&str>) -> Result<(u16, Value)> {
    match open(s, sprite, token).await {
        Err(tungstenite::Error::Http(r)) => {
            let body = r.body().as_deref().unwrap_or_default();
            Ok((
                r.status().as_u16(),
                serde_json::from_slice(body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => bail!("{sprite}: {e}"),
        Ok(_) => bail!("{sprite}: the channel opened"),
    }
}

async fn mint(s: &TestServer, body: Value) -> Result<String> {
    let r = s.client().post(s.api("/v1/tokens")).json(&body).send().await?;
    ensure!(r.status() == 201, "mint {body}: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["token"].as_str().context("token")?.to_string())
}

async fn send_ctl(ws: &mut Ws, v: Value) -> Result<()> {
    ws.send(Message::Text(format!("control:{v}").into())).await?;
    Ok(())
}

/// Next frame that is not a ping or pong, within [`WAIT`].
async fn next(ws: &mut Ws) -> Result<Message> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no frame in time")?
        {
            None => bail!("the channel ended"),
            Some(Err(e)) => bail!("websocket: {e}"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Ok(m),
        }
    }
}

/// The next frame as a `control:` message.
async fn next_ctl(ws: &mut Ws) -> Result<Value> {
    match next(ws).await? {
        Message::Text(t) => {
            let rest = t
                .as_str()
                .strip_prefix("control:")
                .with_context(|| format!("not a control frame: {t}"))?;
            Ok(serde_json::from_str(rest)?)
        }
        m => bail!("expected a control frame, got {m:?}"),
    }
}

async fn expect_error(ws: &mut Ws, code: &str) -> Result<Value> {
    let v = next_ctl(ws).await?;
    ensure!(
        v["type"] == "op.error" && v["args"]["code"] == code,
        "expected {code}: {v}"
    );
    ensure!(
        v["args"]["error"].is_string() && v["args"]["message"] == v["args"]["error"],
        "{v}"
    );
    Ok(v)
}

/// Runs a non-TTY exec op to its end: (stdout, op.complete).
async fn run_exec(ws: &mut Ws, args: Value) -> Result<(Vec<u8>, Value)> {
    send_ctl(ws, json!({"type": "op.start", "op": "exec", "args": args})).await?;
    let ack = next_ctl(ws).await?;
    ensure!(ack["type"] == "op.ack", "{ack}");
    ws.send(Message::Binary(vec![4].into())).await?;
    let mut out = Vec::new();
    loop {
        match next(ws).await? {
            Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Message::Text(t) if t.as_str().starts_with("control:") => {
                let v: Value = serde_json::from_str(&t.as_str()["control:".len()..])?;
                ensure!(v["type"] == "op.complete", "{v}");
                return Ok((out, v));
            }
            _ => {}
        }
    }
}

/// The JS SDK in control mode, unchanged: exec (output, exit codes, stdin,
/// TTY, resize, signals, concurrency through its pool), a proxy tunnel and
/// filesystem operations. The audit log then shows every command and
/// tunnel went over the channel, none over the direct routes the SDK falls
/// back to.
pub async fn js_sdk() -> Result<()> {
    let (node, sdk) = crate::sdk::node_and_sdk();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_control_js.mjs");
    let s = TestServer::start().await?;
    let mut cmd = Command::new(node);
    cmd.args(["--test", "--test-timeout=120000", "--test-reporter=spec", script])
        .env("DEN_SPRITES_JS", sdk);
    crate::sdk::run_suite(&s, cmd, "node --test (control mode)")?;

    over_the_channel_only(&s, "js-ctl", 18, &[("CONTROL proxy", 1), ("CONTROL fs.write", 2)]).await?;
    s.stop().await;
    Ok(())
}

/// The Python SDK with `control_mode=True`, unchanged: streams, exit codes,
/// env, cwd, stdin, TTY size, fast and concurrent commands; none falls back
/// to the direct exec WebSocket.
pub async fn python_sdk() -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/test_control_py.py");
    let s = TestServer::start().await?;
    let mut cmd = Command::new(crate::sdk::python());
    cmd.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script]);
    crate::sdk::run_suite(&s, cmd, "pytest (control mode)")?;
    over_the_channel_only(&s, "py-ctl", 45, &[]).await?;
    s.stop().await;
    Ok(())
}

/// The audit log shows no exec, proxy or upload of `sprite` on the direct
/// routes the SDKs fall back to, at least `execs` exec operations over the
/// channel, and at least the given count of other operations.
async fn over_the_channel_only(
    s: &TestServer,
    sprite: &str,
    execs: usize,
    others: &[(&str, usize)],
) -> Result<()> {
    let audit: Value = s
        .client()
        .get(s.api("/v1/orgs/den/audit?limit=1000"))
        .send()
        .await?
        .json()
        .await?;
    let entries = audit["entries"].as_array().context("entries")?;
    let count = |action: &str| {
        entries
            .iter()
            .filter(|e| e["sprite"] == sprite && e["action"] == action)
            .count()
    };
    for direct in [
        "GET /v1/sprites/{name}/exec",
        "POST /v1/sprites/{name}/exec",
        "GET /v1/sprites/{name}/proxy",
        "PUT /v1/sprites/{name}/fs/write",
    ] {
        ensure!(count(direct) == 0, "{direct} was used: {audit}");
    }
    let n = count("CONTROL exec");
    println!("  {sprite}: {n} exec operations over the channel");
    ensure!(n >= execs, "{n} exec operations: {audit}");
    for (action, min) in others {
        ensure!(count(action) >= *min, "{action}: {audit}");
    }
    Ok(())
}

/// Who may open the channel (the route's rule, once, before the upgrade),
/// and how it answers bad frames: an `op.error`, and the channel goes on.
pub async fn frames_and_access() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("ctl").await?;
    s.create("other").await?;

    // Refused before the upgrade: a missing sprite, no token, no upgrade,
    // a viewer (the direct exec route refuses viewers too), and a token
    // scoped to another sprite, which gets a missing sprite's very answer.
    let (st, missing) = refused(&s, "nope", Some(&s.token)).await?;
    ensure!(st == 404, "missing sprite: {st}");
    ensure!(refused(&s, "ctl", None).await?.0 == 401);
    let r = s.client().get(s.api("/v1/sprites/ctl/control")).send().await?;
    ensure!(r.status() == 400, "plain GET: {}", r.status());
    let viewer = mint(&s, json!({"name": "v", "role": "viewer"})).await?;
    let (st, body) = refused(&s, "ctl", Some(&viewer)).await?;
    ensure!(st == 403 && body["error"] == "forbidden", "viewer: {st} {body}");
    let scoped = mint(&s, json!({"name": "o", "role": "member", "sprites": ["other"]})).await?;
    let (st, body) = refused(&s, "ctl", Some(&scoped)).await?;
    let same = body.to_string().replace("ctl", "NAME") == missing.to_string().replace("nope", "NAME");
    ensure!(st == 404 && same, "out of scope: {st} {body} vs {missing}");
    ensure!(open(&s, "other", Some(&scoped)).await.is_ok());

    let mut ws = open(&s, "ctl", Some(&s.token)).await?;
    // Bad control frames: an error frame each, the channel survives.
    ws.send(Message::Text("control:{not json".into())).await?;
    expect_error(&mut ws, "op.invalid").await?;
    send_ctl(&mut ws, json!({"type": "op.start", "id": 1})).await?;
    let v = expect_error(&mut ws, "op.invalid").await?;
    ensure!(v["id"] == 1, "the id comes back: {v}");
    send_ctl(&mut ws, json!({"type": "op.start", "op": "rm -rf"})).await?;
    expect_error(&mut ws, "op.not_found").await?;
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "op": "exec", "args": {"tty": "maybe"}}),
    )
    .await?;
    expect_error(&mut ws, "op.invalid").await?;
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "op": "exec", "args": {"cmd": {"a": 1}}}),
    )
    .await?;
    expect_error(&mut ws, "op.invalid").await?;
    send_ctl(&mut ws, json!({"type": "op.start", "op": "exec", "args": 5})).await?;
    expect_error(&mut ws, "op.invalid").await?;
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "op": "proxy", "args": {"port": "99999"}}),
    )
    .await?;
    expect_error(&mut ws, "op.invalid").await?;
    send_ctl(&mut ws, json!({"type": "bogus"})).await?;
    expect_error(&mut ws, "op.invalid").await?;
    // A command that can't start fails its operation only.
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "op": "exec", "args": {"cmd": ["/no/such/program"]}}),
    )
    .await?;
    ensure!(next_ctl(&mut ws).await?["type"] == "op.ack");
    expect_error(&mut ws, "op.failed").await?;
    // Data outside an operation is dropped without an answer (a late
    // stdin EOF is normal): the next frame is the next op's ack.
    ws.send(Message::Binary(vec![4].into())).await?;
    ws.send(Message::Text("stray text".into())).await?;

    // One operation at a time: a second op.start gets op.busy (with its
    // id), the running one is undisturbed.
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "id": "e1", "op": "exec", "args": {"cmd": ["cat"], "stdin": "true"}}),
    )
    .await?;
    let ack = next_ctl(&mut ws).await?;
    ensure!(ack == json!({"type": "op.ack", "id": "e1"}), "{ack}");
    let info = match next(&mut ws).await? {
        Message::Text(t) => serde_json::from_str::<Value>(t.as_str())?,
        m => bail!("expected session_info, got {m:?}"),
    };
    ensure!(info["type"] == "session_info" && info["tty"] == false, "{info}");
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "id": "e2", "op": "fs.list", "args": {"path": "/"}}),
    )
    .await?;
    let busy = expect_error(&mut ws, "op.busy").await?;
    ensure!(busy["id"] == "e2", "{busy}");
    ws.send(Message::Binary([&[0u8][..], b"still here\n"].concat().into()))
        .await?;
    ws.send(Message::Binary(vec![4].into())).await?;
    let mut out = Vec::new();
    let done = loop {
        match next(&mut ws).await? {
            Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Message::Binary(b) if b.first() == Some(&3) => ensure!(b[1..] == [0], "exit frame {b:?}"),
            Message::Text(t) if t.as_str().starts_with("control:") => {
                break serde_json::from_str::<Value>(&t.as_str()["control:".len()..])?;
            }
            m => bail!("unexpected {m:?}"),
        }
    };
    ensure!(out == b"still here\n", "{:?}", String::from_utf8_lossy(&out));
    ensure!(
        done == json!({"type": "op.complete", "id": "e1", "args": {"ok": true, "exitCode": 0}}),
        "{done}"
    );

    // Exit codes; args as a URL-encoded string.
    let (out, done) = run_exec(&mut ws, json!("cmd=sh&cmd=-c&cmd=echo+x%3B+exit+42")).await?;
    ensure!(out == b"x\n" && done["args"]["exitCode"] == 42, "{done}");

    // The Go SDK's plain-JSON form: answered in plain JSON, with no ack.
    ws.send(Message::Text(
        json!({"type": "op.start", "op": "fs.list", "args": "path=%2Fhome"})
            .to_string()
            .into(),
    ))
    .await?;
    let list: Value = match next(&mut ws).await? {
        Message::Text(t) => serde_json::from_str(t.as_str())?,
        m => bail!("{m:?}"),
    };
    ensure!(
        list["path"] == "/home" && list["count"].as_u64() > Some(0),
        "{list}"
    );
    let done: Value = match next(&mut ws).await? {
        Message::Text(t) => serde_json::from_str(t.as_str())?,
        m => bail!("{m:?}"),
    };
    ensure!(
        done["type"] == "op.complete" && done["args"]["ok"] == true,
        "{done}"
    );
    ws.send(Message::Text(json!({"type": "release"}).to_string().into()))
        .await?;
    // The Go SDK's proxy start; nothing listens on that port.
    let start = json!({"type": "start", "operation": "proxy", "params": {"host": "localhost", "port": 9, "keep_alive": true}});
    ws.send(Message::Text(start.to_string().into())).await?;
    let failed: Value = match next(&mut ws).await? {
        Message::Text(t) => serde_json::from_str(t.as_str())?,
        m => bail!("{m:?}"),
    };
    let reason = failed["args"]["error"].as_str().unwrap_or_default();
    ensure!(
        failed["type"] == "op.error" && reason.starts_with("Failed to connect to target: 127.0.0.1:9"),
        "{failed}"
    );

    // The channel still works after all that.
    let (out, _) = run_exec(&mut ws, json!({"cmd": ["echo", "alive"]})).await?;
    ensure!(out == b"alive\n");
    ws.close(None).await?;
    s.stop().await;
    Ok(())
}

/// Starts `sleep 600` in a TTY over the channel; its session id.
async fn start_sleeper(ws: &mut Ws) -> Result<String> {
    send_ctl(
        ws,
        json!({"type": "op.start", "op": "exec", "args": {"cmd": ["sleep", "600"], "tty": "true"}}),
    )
    .await?;
    ensure!(next_ctl(ws).await?["type"] == "op.ack");
    match next(ws).await? {
        Message::Text(t) => {
            let v: Value = serde_json::from_str(t.as_str())?;
            Ok(v["session_id"].as_str().context("session_id")?.to_string())
        }
        m => bail!("expected session_info, got {m:?}"),
    }
}

/// Frame size and backpressure bounds, and closing the channel: a command
/// detaches as when its exec WebSocket closes.
pub async fn limits_and_detach() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("lim").await?;

    // A frame over the limit closes the channel with 1009 (message too big).
    let mut ws = open(&s, "lim", Some(&s.token)).await?;
    let (out, _) = run_exec(&mut ws, json!({"cmd": ["echo", "warm"]})).await?;
    ensure!(out == b"warm\n");
    ws.send(Message::Binary(vec![0u8; (1 << 20) + 1].into())).await?;
    let closed = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.context("no close")? {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break None,
        }
    };
    ensure!(closed == Some(1009), "close code {closed:?}");

    // Closing the channel detaches a TTY command (it runs on, as with the
    // exec WebSocket); op.cancel does the same without closing the channel.
    let mut ws = open(&s, "lim", Some(&s.token)).await?;
    let cancelled = start_sleeper(&mut ws).await?;
    send_ctl(&mut ws, json!({"type": "op.cancel"})).await?;
    let done = next_ctl(&mut ws).await?;
    ensure!(
        done["type"] == "op.complete" && done["args"]["ok"] == true,
        "{done}"
    );
    let closed = start_sleeper(&mut ws).await?;
    ws.close(None).await?;
    drop(ws);
    let sessions: Value = s
        .client()
        .get(s.api("/v1/sprites/lim/exec"))
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<String> = sessions["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .map(|x| x["id"].to_string().trim_matches('"').to_string())
        .collect();
    ensure!(
        ids.contains(&cancelled) && ids.contains(&closed),
        "{cancelled} and {closed} run on: {sessions}"
    );
    // A detached session is attached again over the channel (`id`, no `cmd`).
    let mut ws = open(&s, "lim", Some(&s.token)).await?;
    send_ctl(
        &mut ws,
        json!({"type": "op.start", "op": "exec", "args": {"id": cancelled}}),
    )
    .await?;
    ensure!(next_ctl(&mut ws).await?["type"] == "op.ack");
    let info: Value = match next(&mut ws).await? {
        Message::Text(t) => serde_json::from_str(t.as_str())?,
        m => bail!("expected session_info, got {m:?}"),
    };
    ensure!(
        info["session_id"] == cancelled.as_str() && info["is_owner"] == false && info["tty"] == true,
        "{info}"
    );
    ws.send(Message::Text(
        json!({"type": "signal", "signal": "KILL"}).to_string().into(),
    ))
    .await?;
    let done = loop {
        if let Message::Text(t) = next(&mut ws).await?
            && let Some(rest) = t.as_str().strip_prefix("control:")
        {
            break serde_json::from_str::<Value>(rest)?;
        }
    };
    ensure!(done["args"]["exitCode"] == 137, "{done}");

    // Channels whose client never reads: backpressure reaches the command
    // (`yes`), so den's memory stays bounded per channel.
    const CHANNELS: usize = 10;
    // Measured 12–15 MiB for ten channels; 381 MiB with an unbounded queue.
    const PER_CHANNEL: u64 = 4 << 20;
    let base = crate::abuse_exec::rss_bytes()?;
    let mut unread = Vec::new();
    for _ in 0..CHANNELS {
        let mut ws = open(&s, "lim", Some(&s.token)).await?;
        send_ctl(
            &mut ws,
            json!({"type": "op.start", "op": "exec", "args": {"cmd": ["yes"]}}),
        )
        .await?;
        unread.push(ws);
    }
    let t0 = Instant::now();
    let mut peak = base;
    while t0.elapsed() < Duration::from_secs(6) {
        peak = peak.max(crate::abuse_exec::rss_bytes()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(base);
    println!(
        "  {CHANNELS} unread control channels running `yes`: den grew {:.1} MiB",
        grown as f64 / (1 << 20) as f64
    );
    ensure!(grown < PER_CHANNEL * CHANNELS as u64, "den grew {grown} bytes");
    // Another channel still answers meanwhile.
    let mut ws = open(&s, "lim", Some(&s.token)).await?;
    let (out, _) = run_exec(&mut ws, json!({"cmd": ["echo", "bystander"]})).await?;
    ensure!(out == b"bystander\n");

    // Shutdown with the channels still unread: den lets go of them (their
    // sockets and agent connections) instead of waiting on clients that
    // never read.
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count());
    let open_before = fds()?;
    let t = Instant::now();
    s.stop().await;
    let stop = t.elapsed();
    let released = open_before.saturating_sub(fds()?);
    println!("  shutdown with {CHANNELS} unread channels: {stop:?}, {released} descriptors released");
    ensure!(stop < Duration::from_secs(30), "shutdown took {stop:?}");
    ensure!(
        released >= 4 * CHANNELS,
        "den kept the sockets of unread channels after shutdown (released {released})"
    );
    drop(unread);
    Ok(())
}
