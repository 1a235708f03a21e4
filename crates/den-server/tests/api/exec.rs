//! Exec (§2.4, §3): the WebSocket protocol, attach, sessions, HTTP exec,
//! kill and the den `timeout` extension, against real busybox sprites.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::{TestServer, WAIT};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `cmd=…&cmd=…` for an argv.
fn cmd(argv: &[&str]) -> String {
    argv.iter()
        .map(|a| format!("cmd={}", enc(a)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn sh(script: &str) -> String {
    cmd(&["sh", "-c", script])
}

/// Open a WebSocket with the admin token; returns the upgrade response too.
async fn connect(s: &TestServer, path: &str) -> Result<(Ws, tungstenite::handshake::client::Response)> {
    let mut req = s.ws(path).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.token).parse()?);
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .context("websocket handshake timed out")??;
    Ok((ws, resp))
}

/// The HTTP status (and body) of a refused upgrade.
async fn refused(s: &TestServer, path: &str, token: bool) -> Result<(u16, String)> {
    let mut req = s.ws(path).into_client_request()?;
    if token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {}", s.token).parse()?);
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => bail!("{path}: upgrade unexpectedly accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            Ok((resp.status().as_u16(), body))
        }
        Err(e) => bail!("{path}: {e}"),
    }
}

/// What one exec WebSocket produced, in order.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Text frames other than session_info and exit.
    texts: Vec<Value>,
    pub(crate) exit: Option<u8>,
    close: Option<u16>,
    /// Time from the exit frame to the close frame.
    close_delay: Option<Duration>,
    /// Binary or text frames that arrived after the exit.
    after_exit: usize,
}

async fn next(ws: &mut Ws) -> Result<Option<Message>> {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Err(_) => bail!("no frame within {WAIT:?}"),
        Ok(None) => Ok(None),
        Ok(Some(m)) => Ok(Some(m?)),
    }
}

/// Reads `session_info`, which must be the first frame.
async fn session_info(ws: &mut Ws) -> Result<Value> {
    match next(ws).await? {
        Some(Message::Text(t)) => {
            let v: Value = serde_json::from_str(&t)?;
            ensure!(v["type"] == "session_info", "first frame: {v}");
            ensure!(v["session_id"].is_string(), "session_id must be a string: {v}");
            Ok(v)
        }
        other => bail!("first frame is not session_info: {other:?}"),
    }
}

/// Reads frames until the connection ends.
async fn drain(ws: &mut Ws, info: Value) -> Result<Run> {
    let tty = info["tty"] == true;
    let mut run = Run::default();
    let mut exit_at = None;
    while let Some(m) = next(ws).await? {
        if exit_at.is_some() && matches!(m, Message::Binary(_) | Message::Text(_)) {
            run.after_exit += 1;
        }
        match m {
            Message::Binary(b) if tty => run.stdout.extend_from_slice(&b),
            Message::Binary(b) => match b.first() {
                Some(1) => run.stdout.extend_from_slice(&b[1..]),
                Some(2) => run.stderr.extend_from_slice(&b[1..]),
                Some(3) => {
                    ensure!(b.len() == 2, "exit frame {b:?}");
                    run.exit = Some(b[1]);
                    exit_at = Some(Instant::now());
                }
                _ => bail!("unexpected binary frame {b:?}"),
            },
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "exit" {
                    run.exit = Some(v["exit_code"].as_u64().context("exit_code")? as u8);
                    exit_at = Some(Instant::now());
                } else {
                    run.texts.push(v);
                }
            }
            Message::Close(f) => {
                run.close = f.map(|f| u16::from(f.code));
                run.close_delay = exit_at.map(|t| t.elapsed());
                break;
            }
            _ => {}
        }
    }
    Ok(run)
}

/// Runs a command to completion with no stdin.
pub(crate) async fn run(s: &TestServer, sprite: &str, query: &str) -> Result<Run> {
    let (mut ws, _) = connect(s, &format!("/v1/sprites/{sprite}/exec?{query}")).await?;
    let info = session_info(&mut ws).await?;
    drain(&mut ws, info).await
}

/// A run that exited `code` with a prompt 1000 close and nothing after the exit.
fn ok_run(r: &Run, code: u8) -> Result<()> {
    ensure!(r.exit == Some(code), "exit {:?}, want {code}: {r:?}", r.exit);
    ensure!(r.close == Some(1000), "close {:?}: {r:?}", r.close);
    ensure!(r.after_exit == 0, "frames after the exit: {r:?}");
    let delay = r.close_delay.context("no close delay")?;
    ensure!(delay < Duration::from_secs(1), "close {delay:?} after exit");
    Ok(())
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

async fn status(s: &TestServer, sprite: &str) -> Result<String> {
    let v: Value = s
        .client()
        .get(s.api(&format!("/v1/sprites/{sprite}")))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["status"].as_str().unwrap_or_default().to_string())
}

/// Frame order, output of fast commands, concurrency, stdin, stderr, exit
/// codes, environment, working directory, signals, the timeout extension,
/// ports, errors, and the 1001 close at shutdown.
pub async fn ws_protocol(runtime: den_runtime::Runtime) -> Result<()> {
    let mut s = crate::sdk::start_on(runtime, |_| {}).await?;
    let c = s.client();
    let r = c
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "ex", "environment": {"SPRITE_VAR": "from-sprite"}}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    ensure!(status(&s, "ex").await? == "cold");

    // Errors before the upgrade: plain HTTP statuses with JSON bodies.
    let (code, body) = refused(&s, "/v1/sprites/ex/exec", true).await?;
    ensure!(
        code == 400 && body.contains("No command specified"),
        "{code} {body}"
    );
    let (code, body) = refused(&s, "/v1/sprites/nope/exec?cmd=true", true).await?;
    ensure!(code == 404 && body.contains("\"error\""), "{code} {body}");
    let (code, _) = refused(&s, "/v1/sprites/ex/exec?cmd=true", false).await?;
    ensure!(code == 401, "{code}");
    let (code, body) = refused(
        &s,
        "/v1/sprites/ex/exec?cmd=true&max_run_after_disconnect=soon",
        true,
    )
    .await?;
    ensure!(code == 400, "{code} {body}");

    // Frame order and headers; exec wakes the cold sprite.
    let (mut ws, resp) = connect(
        &s,
        &format!(
            "/v1/sprites/ex/exec?{}&path=sh&detachable=true&cc=false&args=ignored",
            sh("echo out; echo err >&2; exit 3")
        ),
    )
    .await?;
    ensure!(resp.status() == 101);
    ensure!(resp.headers().get("sprite-version").is_some(), "{resp:?}");
    ensure!(
        resp.headers()
            .get("x-sprite-capabilities")
            .and_then(|v| v.to_str().ok())
            == Some("signal"),
        "{resp:?}"
    );
    let info = session_info(&mut ws).await?;
    ensure!(info["is_owner"] == true && info["tty"] == false, "{info}");
    ensure!(
        info["session_id"]
            .as_str()
            .is_some_and(|id| id.parse::<u32>().is_ok()),
        "{info}"
    );
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 3)?;
    ensure!(r.stdout == b"out\n" && r.stderr == b"err\n", "{r:?}");
    ensure!(status(&s, "ex").await? == "running");

    // 50 fast commands in a row: never lose output or the exit.
    for i in 0..50 {
        let r = run(&s, "ex", &cmd(&["echo", &i.to_string()])).await?;
        ok_run(&r, 0).with_context(|| format!("echo {i}"))?;
        ensure!(text(&r.stdout) == format!("{i}\n"), "echo {i}: {r:?}");
    }
    // 10 at once.
    let runs = futures::future::join_all((0..10).map(|i| {
        let s = &s;
        async move { run(s, "ex", &sh(&format!("echo c{i}; echo e{i} >&2"))).await }
    }))
    .await;
    for (i, r) in runs.into_iter().enumerate() {
        let r = r?;
        ok_run(&r, 0)?;
        ensure!(
            text(&r.stdout) == format!("c{i}\n") && text(&r.stderr) == format!("e{i}\n"),
            "{r:?}"
        );
    }

    // stdin, then EOF as a lone 0x04 frame.
    let (mut ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=cat&stdin=true").await?;
    let info = session_info(&mut ws).await?;
    ws.send(Message::Binary(b"\x00hello\n".to_vec().into())).await?;
    ws.send(Message::Binary(vec![0x00].into())).await?;
    ws.send(Message::Binary(b"\x00world".to_vec().into())).await?;
    ws.send(Message::Binary(vec![0x04].into())).await?;
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 0)?;
    ensure!(r.stdout == b"hello\nworld", "{r:?}");
    // Bulk stdin while output flows back: 4 MiB through `cat`.
    let (ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=cat&stdin=true").await?;
    let (mut sink, mut stream) = ws.split();
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let input = big.clone();
    let writer = tokio::spawn(async move {
        for chunk in input.chunks(60_000) {
            let mut frame = vec![0x00];
            frame.extend_from_slice(chunk);
            sink.send(Message::Binary(frame.into())).await?;
        }
        sink.send(Message::Binary(vec![0x04].into())).await?;
        // Returned, not dropped: closing it would detach before the output is in.
        anyhow::Ok(sink)
    });
    let mut got = Vec::new();
    let mut exit = None;
    while let Some(m) = tokio::time::timeout(WAIT, stream.next()).await? {
        match m? {
            Message::Binary(b) if b.first() == Some(&1) => got.extend_from_slice(&b[1..]),
            Message::Binary(b) if b.first() == Some(&3) => exit = b.get(1).copied(),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let _sink = writer.await??;
    ensure!(
        exit == Some(0) && got.len() == big.len() && got == big,
        "{} bytes, exit {exit:?}",
        got.len()
    );
    // Without stdin=true a non-TTY command reads nothing (EOF at once).
    let r = run(&s, "ex", "cmd=cat").await?;
    ok_run(&r, 0)?;
    ensure!(r.stdout.is_empty());

    // Signals become 128 + n.
    let r = run(&s, "ex", &sh("kill -9 $$")).await?;
    ok_run(&r, 137)?;

    // env replaces the default environment; without it the default plus the
    // sprite's environment attribute apply.
    let r = run(&s, "ex", "cmd=env&env=FOO=bar&env=EMPTY=").await?;
    ok_run(&r, 0)?;
    let mut lines: Vec<String> = text(&r.stdout).lines().map(str::to_string).collect();
    lines.sort();
    ensure!(lines == ["EMPTY=", "FOO=bar"], "{lines:?}");
    let r = run(&s, "ex", "cmd=env").await?;
    ok_run(&r, 0)?;
    let out = text(&r.stdout);
    for want in ["HOME=/home/sprite", "SPRITE_VAR=from-sprite", "PATH="] {
        ensure!(out.lines().any(|l| l.starts_with(want)), "{want} missing: {out}");
    }

    // Working directory: /home/sprite by default.
    let r = run(&s, "ex", "cmd=pwd").await?;
    ensure!(text(&r.stdout) == "/home/sprite\n", "{r:?}");
    let r = run(&s, "ex", "cmd=pwd&dir=/tmp").await?;
    ensure!(text(&r.stdout) == "/tmp\n", "{r:?}");
    let (code, body) = refused(&s, "/v1/sprites/ex/exec?cmd=pwd&dir=/nonexistent", true).await?;
    ensure!(code == 400, "{code} {body}");

    // A signal frame ends `sleep`; pings are answered.
    let (mut ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=sleep&cmd=30").await?;
    let info = session_info(&mut ws).await?;
    ws.send(Message::Ping(b"p1".to_vec().into())).await?;
    match next(&mut ws).await? {
        Some(Message::Pong(p)) => ensure!(&p[..] == b"p1"),
        other => bail!("expected a pong, got {other:?}"),
    }
    let t0 = Instant::now();
    ws.send(Message::Text(r#"{"type":"signal","signal":"SIGTERM"}"#.into()))
        .await?;
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 143)?;
    ensure!(t0.elapsed() < Duration::from_secs(5));
    let (mut ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=sleep&cmd=30").await?;
    let info = session_info(&mut ws).await?;
    ws.send(Message::Text(r#"{"type":"signal","signal":"INT"}"#.into()))
        .await?;
    ok_run(&drain(&mut ws, info).await?, 130)?;

    // den extension: a hard run-time limit, reported before the exit.
    let t0 = Instant::now();
    let r = run(&s, "ex", &format!("{}&timeout=1s", sh("echo started; sleep 30"))).await?;
    ok_run(&r, 143)?;
    ensure!(text(&r.stdout) == "started\n", "{r:?}");
    ensure!(
        r.texts.len() == 1 && r.texts[0]["type"] == "timeout" && r.texts[0]["message"].is_string(),
        "{r:?}"
    );
    ensure!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let r = run(&s, "ex", "cmd=true&timeout=5s").await?;
    ok_run(&r, 0)?;
    ensure!(r.texts.is_empty(), "{r:?}");

    // Listening ports are announced with an address the host can reach.
    let (mut ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=nc&cmd=-l&cmd=-p&cmd=7777").await?;
    let info = session_info(&mut ws).await?;
    let opened = loop {
        match next(&mut ws).await? {
            Some(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "port_opened" {
                    break v;
                }
            }
            Some(_) => {}
            None => bail!("closed before port_opened"),
        }
    };
    let addr: std::net::Ipv4Addr = opened["address"].as_str().unwrap_or_default().parse()?;
    ensure!(
        opened["port"] == 7777 && !addr.is_loopback() && !addr.is_unspecified() && opened["pid"].is_number(),
        "{opened}"
    );
    ws.send(Message::Text(r#"{"type":"signal","signal":"TERM"}"#.into()))
        .await?;
    let r = drain(&mut ws, info).await?;
    ensure!(r.exit == Some(143) && r.close == Some(1000), "{r:?}");

    // Shutdown closes attached clients with 1001.
    let (mut ws, _) = connect(&s, "/v1/sprites/ex/exec?cmd=sleep&cmd=60").await?;
    session_info(&mut ws).await?;
    let running = s.running.take().context("server running")?;
    let stopper = tokio::spawn(running.stop());
    let close = loop {
        match next(&mut ws).await? {
            Some(Message::Close(f)) => break f.map(|f| f.code),
            Some(_) => {}
            None => break None,
        }
    };
    ensure!(close == Some(CloseCode::Away), "{close:?}");
    stopper.await?;
    Ok(())
}

/// Reads frames until the accumulated stdout contains `want`.
async fn read_until(ws: &mut Ws, tty: bool, want: &str) -> Result<String> {
    let mut out = Vec::new();
    while !text(&out).contains(want) {
        match next(ws).await? {
            Some(Message::Binary(b)) if tty => out.extend_from_slice(&b),
            Some(Message::Binary(b)) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Some(Message::Binary(b)) if b.first() == Some(&3) => {
                bail!("exited waiting for {want:?}: {}", text(&out))
            }
            Some(Message::Close(_)) | None => bail!("closed waiting for {want:?}: {}", text(&out)),
            Some(_) => {}
        }
    }
    Ok(text(&out))
}

async fn wait_sessions<F: Fn(&Value) -> bool>(s: &TestServer, sprite: &str, pred: F) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v: Value = s
            .client()
            .get(s.api(&format!("/v1/sprites/{sprite}/exec")))
            .send()
            .await?
            .json()
            .await?;
        if pred(&v) {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "sessions never matched: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ndjson(body: &str) -> Result<Vec<Value>> {
    body.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad NDJSON line {l:?}")))
        .collect()
}

/// TTY mode, attach (path and legacy `?id=`) with replay, the session list,
/// HTTP exec, kill, HEAD.
pub async fn tty_attach_http(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    s.create("tt").await?;
    let c = s.client();

    // TTY: the pty has the requested size, follows resizes, merges output,
    // and the exit is a text frame.
    let (mut ws, _) = connect(
        &s,
        &format!(
            "/v1/sprites/tt/exec?{}&tty=true&rows=30&cols=100",
            sh("stty size; read x; stty size; exit 4")
        ),
    )
    .await?;
    let info = session_info(&mut ws).await?;
    ensure!(
        info["tty"] == true && info["rows"] == 30 && info["cols"] == 100,
        "{info}"
    );
    read_until(&mut ws, true, "30 100").await?;
    ws.send(Message::Text(r#"{"type":"resize","cols":120,"rows":40}"#.into()))
        .await?;
    ws.send(Message::Binary(b"go\r".to_vec().into())).await?;
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 4)?;
    ensure!(text(&r.stdout).contains("40 120"), "{r:?}");

    // Attach by path: replay of earlier output, then live output; the
    // attacher can type.
    let script = "echo first; read x; echo second $x";
    let (mut ws, _) = connect(
        &s,
        &format!(
            "/v1/sprites/tt/exec?{}&stdin=true&max_run_after_disconnect=0",
            sh(script)
        ),
    )
    .await?;
    let info = session_info(&mut ws).await?;
    let id = info["session_id"].as_str().context("id")?.to_string();
    read_until(&mut ws, false, "first").await?;
    // Detach with a close handshake; the server answers it.
    ws.close(None).await?;
    loop {
        match next(&mut ws).await? {
            Some(Message::Close(_)) => break,
            Some(_) => {}
            None => bail!("no close reply"),
        }
    }
    let listed = wait_sessions(&s, "tt", |v| {
        v["sessions"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["id"] == id.as_str() && x["is_active"] == false)
        })
    })
    .await?;
    let entry = listed["sessions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == id.as_str()))
        .context("listed")?;
    ensure!(listed["count"].as_u64() == listed["sessions"].as_array().map(|a| a.len() as u64));
    ensure!(
        entry["tty"] == false && entry["workdir"] == "/home/sprite",
        "{entry}"
    );
    ensure!(
        entry["command"].as_str().is_some_and(|c| c.contains("sh")),
        "{entry}"
    );
    for k in ["created", "last_activity"] {
        let t = entry[k].as_str().unwrap_or_default();
        ensure!(
            t.len() >= 20 && t.ends_with('Z') && t.contains('T'),
            "{k}: {entry}"
        );
    }
    ensure!(entry["bytes_per_second"].is_number(), "{entry}");

    let (mut ws, _) = connect(&s, &format!("/v1/sprites/tt/exec/{id}")).await?;
    let info = session_info(&mut ws).await?;
    ensure!(
        info["is_owner"] == false && info["session_id"] == id.as_str(),
        "{info}"
    );
    read_until(&mut ws, false, "first").await?;
    ws.send(Message::Binary(b"\x00typed\n".to_vec().into())).await?;
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 0)?;
    ensure!(text(&r.stdout).contains("second typed"), "{r:?}");

    // Legacy attach: ?id=.
    let (mut ws, _) = connect(
        &s,
        &format!(
            "/v1/sprites/tt/exec?{}&stdin=true&max_run_after_disconnect=0",
            sh(script)
        ),
    )
    .await?;
    let info = session_info(&mut ws).await?;
    let id2 = info["session_id"].as_str().context("id")?.to_string();
    read_until(&mut ws, false, "first").await?;
    drop(ws);
    let (mut ws, _) = connect(&s, &format!("/v1/sprites/tt/exec?id={id2}")).await?;
    let info = session_info(&mut ws).await?;
    ensure!(info["is_owner"] == false, "{info}");
    read_until(&mut ws, false, "first").await?;
    ws.send(Message::Binary(b"\x00legacy\n".to_vec().into())).await?;
    ws.send(Message::Binary(vec![0x04].into())).await?;
    let r = drain(&mut ws, info).await?;
    ok_run(&r, 0)?;
    ensure!(text(&r.stdout).contains("second legacy"), "{r:?}");
    let (code, _) = refused(&s, "/v1/sprites/tt/exec/999999", true).await?;
    ensure!(code == 404, "{code}");

    // Kill: SIGTERM ends a detached sleep; NDJSON progress.
    let (mut ws, _) = connect(
        &s,
        "/v1/sprites/tt/exec?cmd=sleep&cmd=300&max_run_after_disconnect=0",
    )
    .await?;
    let info = session_info(&mut ws).await?;
    let id3 = info["session_id"].as_str().context("id")?.to_string();
    drop(ws);
    let r = c
        .post(s.api(&format!(
            "/v1/sprites/tt/exec/{id3}/kill?signal=SIGTERM&timeout=10s"
        )))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.headers().get("content-type").and_then(|v| v.to_str().ok()) == Some("application/x-ndjson"));
    let ev = ndjson(&r.text().await?)?;
    let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    ensure!(types == ["signal", "exited", "complete"], "{ev:?}");
    ensure!(
        ev[0]["pid"].as_u64().map(|p| p.to_string()) == Some(id3.clone())
            && ev[0]["signal"] == "SIGTERM"
            && ev[0]["message"] == format!("Signaling SIGTERM to process group {id3}"),
        "{ev:?}"
    );
    ensure!(ev[2]["exit_code"] == 143, "{ev:?}");
    let r = c
        .post(s.api(&format!("/v1/sprites/tt/exec/{id3}/kill")))
        .send()
        .await?;
    ensure!(r.status() == 410, "{}", r.status());
    let r = c.post(s.api("/v1/sprites/nope/exec/1/kill")).send().await?;
    ensure!(r.status() == 404, "{}", r.status());
    // A process that ignores SIGTERM is killed after the timeout.
    let (mut ws, _) = connect(
        &s,
        &format!(
            "/v1/sprites/tt/exec?{}&max_run_after_disconnect=0",
            sh("trap '' TERM; echo ready; while :; do sleep 1; done")
        ),
    )
    .await?;
    let info = session_info(&mut ws).await?;
    let id4 = info["session_id"].as_str().context("id")?.to_string();
    read_until(&mut ws, false, "ready").await?;
    drop(ws);
    let ev = ndjson(
        &c.post(s.api(&format!("/v1/sprites/tt/exec/{id4}/kill?timeout=1s")))
            .send()
            .await?
            .text()
            .await?,
    )?;
    let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    ensure!(types == ["signal", "timeout", "killed", "complete"], "{ev:?}");
    ensure!(ev[3]["exit_code"] == 137, "{ev:?}");

    // timeout=0s only signals (the Go SDK's fallback for the signal frame).
    let (mut ws, _) = connect(&s, "/v1/sprites/tt/exec?cmd=sleep&cmd=300").await?;
    let info = session_info(&mut ws).await?;
    let id5 = info["session_id"].as_str().context("id")?.to_string();
    let ev = ndjson(
        &c.post(s.api(&format!("/v1/sprites/tt/exec/{id5}/kill?signal=INT&timeout=0s")))
            .send()
            .await?
            .text()
            .await?,
    )?;
    let types: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    ensure!(
        types == ["signal", "complete"] && ev[0]["signal"] == "SIGINT",
        "{ev:?}"
    );
    ok_run(&drain(&mut ws, info).await?, 130)?;

    // HTTP exec: stdin from the body, concatenated framing, exit last.
    let r = c
        .post(s.api(&format!(
            "/v1/sprites/tt/exec?{}&stdin=true",
            sh("cat; echo oops >&2; exit 5")
        )))
        .body("abc")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(
        r.headers().get("content-type").and_then(|v| v.to_str().ok()) == Some("application/octet-stream")
    );
    let body = r.bytes().await?;
    ensure!(body.ends_with(&[0x03, 5]), "{body:?}");
    let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    ensure!(find(b"\x01abc") && find(b"\x02oops\n"), "{body:?}");
    let body = c
        .post(s.api("/v1/sprites/tt/exec?cmd=echo&cmd=hi"))
        .send()
        .await?
        .bytes()
        .await?;
    ensure!(&body[..] == b"\x01hi\n\x03\x00", "{body:?}");
    for bad in [
        "cmd=sh&tty=true",
        "cmd=sh&id=1",
        "cmd=sh&detachable=true",
        "cmd=sh&cc=true",
        "stdin=true",
    ] {
        let r = c
            .post(s.api(&format!("/v1/sprites/tt/exec?{bad}")))
            .send()
            .await?;
        ensure!(r.status() == 400, "{bad}: {}", r.status());
        let v: Value = r.json().await?;
        ensure!(v["error"].is_string() && v["message"].is_string(), "{v}");
    }

    // HEAD is a version probe.
    let r = c.head(s.api("/v1/sprites/tt/exec")).send().await?;
    ensure!(r.status() == 200 && r.headers().get("sprite-version").is_some());
    // The OpenAPI document describes the timeout extension.
    let doc: Value = c.get(s.api("/v1/openapi.json")).send().await?.json().await?;
    let exec = &doc["paths"]["/v1/sprites/{name}/exec"];
    ensure!(
        exec["get"].is_object() && exec["post"].is_object() && exec["head"].is_object(),
        "{exec}"
    );
    ensure!(exec["get"].to_string().contains("timeout"), "{exec}");
    s.stop().await;
    Ok(())
}

/// `ServerConfig::default_exec_timeout` limits commands that set no
/// `timeout`; a request's own `timeout` wins.
pub async fn default_timeout() -> Result<()> {
    let s = TestServer::start_with(|c| c.default_exec_timeout = Some(Duration::from_secs(1))).await?;
    s.create("dt").await?;
    let t0 = Instant::now();
    let r = run(&s, "dt", "cmd=sleep&cmd=30").await?;
    ok_run(&r, 143)?;
    ensure!(r.texts.len() == 1 && r.texts[0]["type"] == "timeout", "{r:?}");
    ensure!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let r = run(&s, "dt", &format!("{}&timeout=10s", sh("sleep 2; echo done"))).await?;
    ok_run(&r, 0)?;
    ensure!(text(&r.stdout) == "done\n" && r.texts.is_empty(), "{r:?}");
    s.stop().await;
    Ok(())
}

/// HTTP/1.1 chunked decoding that keeps the socket's read boundaries: the
/// body bytes each `feed` (one socket read) yields, as a client that takes
/// a read of the body for a frame (the JS SDK's `execFileHTTP`) sees them.
#[derive(Default)]
struct Chunked {
    /// The chunk-size line read so far, or the data left in this chunk.
    line: Vec<u8>,
    data_left: usize,
    /// CR LF still to skip after a chunk's data.
    crlf_left: usize,
    done: bool,
}

impl Chunked {
    fn feed(&mut self, mut buf: &[u8]) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        while !buf.is_empty() && !self.done {
            if self.data_left > 0 {
                let n = self.data_left.min(buf.len());
                body.extend_from_slice(&buf[..n]);
                self.data_left -= n;
                buf = &buf[n..];
                if self.data_left == 0 {
                    self.crlf_left = 2;
                }
            } else if self.crlf_left > 0 {
                self.crlf_left -= 1;
                buf = &buf[1..];
            } else {
                self.line.push(buf[0]);
                buf = &buf[1..];
                if self.line.ends_with(b"\r\n") {
                    let hex = std::str::from_utf8(&self.line[..self.line.len() - 2])?;
                    let size = usize::from_str_radix(hex.split(';').next().unwrap_or(""), 16)
                        .with_context(|| format!("chunk size {hex:?}"))?;
                    self.line.clear();
                    self.data_left = size;
                    self.done = size == 0;
                }
            }
        }
        Ok(body)
    }
}

/// The HTTP exec exit frame reaches a slow client in a read of its own,
/// also when the output is still queued (the client reads slower than the
/// command writes) when the command exits. It used to follow the output
/// 10 ms after the last output frame was handed to hyper, which then still
/// held or queued output: the exit frame left with it, and a client that
/// takes a read for a frame (the JS SDK) lost the exit code.
pub async fn http_exit_frame_apart_from_queued_output(runtime: den_runtime::Runtime) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    s.create("slow").await?;
    const OUTPUT: usize = 8_000_000;
    for _ in 0..3 {
        let sock = tokio::net::TcpSocket::new_v4()?;
        // A small window: what the client has not read stays queued in den.
        sock.set_recv_buffer_size(32 << 10)?;
        let mut tcp = sock.connect(s.cfg.listen).await?;
        let req = format!(
            "POST /v1/sprites/slow/exec?{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\n\r\n",
            cmd(&["head", "-c", &OUTPUT.to_string(), "/dev/zero"]),
            s.token
        );
        tcp.write_all(req.as_bytes()).await?;
        let head = crate::proxy::read_head(&mut tcp).await?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        ensure!(
            head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
            "{head}"
        );
        let mut chunked = Chunked::default();
        let mut buf = vec![0u8; 64 << 10];
        let (mut output, mut last) = (0usize, Vec::new());
        let deadline = Instant::now() + WAIT;
        while !chunked.done {
            ensure!(Instant::now() < deadline, "the exec did not end in time");
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await??;
            ensure!(n > 0, "closed before the end of the body");
            let body = chunked.feed(&buf[..n])?;
            if !body.is_empty() {
                output += body.len();
                last = body;
            }
            // A slow reader: at most 64 KiB a millisecond (the load that
            // queues the output is this pace, not a wait for anything).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Every output frame is 0x01 + zeros; what ends it must be the exit
        // frame alone.
        ensure!(output > OUTPUT, "{output} body bytes");
        ensure!(
            last == [0x03, 0x00],
            "the last read held {} body bytes, not only the exit frame (ends {:?})",
            last.len(),
            &last[last.len().saturating_sub(4)..]
        );
    }
    s.stop().await;
    Ok(())
}
