//! The Sprites routes added for the JS SDK's `restartSprite`, `checkSprite`,
//! `watchSprites`, `watchPorts`, `filesystem().watch` and `chown`: what they
//! answer, and what they never show (another organisation's sprites).

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{TestServer, WAIT};
use crate::exec::{run, sh};
use crate::org_tokens::{client_for, make_org, mint_ok, secret};
use den_server::auth::{Principal, Role, TokenInfo};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn get_json(s: &TestServer, path: &str) -> Result<Value> {
    let r = s.client().get(s.api(path)).send().await?;
    ensure!(r.status() == 200, "GET {path}: {}", r.status());
    Ok(r.json().await?)
}

async fn ws(s: &TestServer, path: &str) -> Result<Ws> {
    let mut req = s.ws(path).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.token).parse()?);
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .context("websocket handshake timed out")??;
    Ok(ws)
}

/// Text messages until one satisfies `want`.
async fn ws_until(ws: &mut Ws, what: &str, want: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .with_context(|| format!("no {what} among {seen:?}"))?;
        match m {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                if want(&v) {
                    return Ok(v);
                }
                seen.push(v);
            }
            Some(Ok(Message::Close(c))) => bail!("closed ({c:?}) before {what}; saw {seen:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("{what}: {e}"),
            None => bail!("ended before {what}; saw {seen:?}"),
        }
    }
}

async fn status_of(s: &TestServer, name: &str) -> Result<String> {
    let v = get_json(s, &format!("/v1/sprites/{name}")).await?;
    Ok(v["status"].as_str().unwrap_or_default().to_string())
}

/// restart stops and starts the container (processes restart, the disk
/// stays); check probes the agent of a running sprite and does not wake a
/// cold one; the new timestamps follow.
pub async fn restart_check_and_timestamps() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    let created = s.create("rs").await?;
    ensure!(
        created["last_started_at"].is_null() && created["last_active_at"].is_null(),
        "a new sprite never ran: {created}"
    );

    let chk = get_json(&s, "/v1/sprites/rs/check").await?;
    ensure!(chk["status"] == "cold" && chk["reason"].is_string(), "{chk}");
    ensure!(
        chk["sprite_name"] == "rs" && chk["sprite_id"] == created["id"],
        "{chk}"
    );
    ensure!(chk["checked_at"].is_string(), "{chk}");
    ensure!(status_of(&s, "rs").await? == "cold", "check woke the sprite");

    // A file on the disk and a process that only lives until a restart.
    let out = run(
        &s,
        "rs",
        &sh("echo kept > /home/sprite/kept; sleep 1000 </dev/null >/dev/null 2>&1 & echo started"),
    )
    .await?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains("started"));
    let out = run(&s, "rs", &sh("ps | grep -c '[s]leep 1000'")).await?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "1",
        "the process runs before"
    );
    let before = get_json(&s, "/v1/sprites/rs").await?;
    let started1 = before["last_started_at"]
        .as_str()
        .context("last_started_at after a boot")?
        .to_string();
    ensure!(before["last_active_at"].is_string(), "{before}");
    let chk = get_json(&s, "/v1/sprites/rs/check").await?;
    ensure!(chk["status"] == "healthy" && chk["elapsed"].is_number(), "{chk}");

    let r = c.post(s.api("/v1/sprites/rs/restart")).send().await?;
    ensure!(r.status() == 200, "restart: {} {}", r.status(), r.text().await?);
    let v: Value = r.json().await?;
    ensure!(
        v["sprite_name"] == "rs" && v["machine_id"].is_string() && v["message"].is_string(),
        "{v}"
    );
    ensure!(status_of(&s, "rs").await? == "running");
    let out = run(
        &s,
        "rs",
        &sh("cat /home/sprite/kept; ps | grep -c '[s]leep 1000'"),
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        text.starts_with("kept\n0"),
        "the disk stays and the processes go: {text:?}"
    );
    // Seconds in the JSON, so only never earlier here; den-sprite's
    // `events_restart_and_times` checks the milliseconds move.
    let after = get_json(&s, "/v1/sprites/rs").await?;
    ensure!(
        after["last_started_at"].as_str() >= Some(started1.as_str()),
        "{started1} then {after}"
    );

    // A missing sprite.
    for (m, p) in [
        ("POST", "/v1/sprites/nope/restart"),
        ("GET", "/v1/sprites/nope/check"),
    ] {
        let r = c.request(m.parse()?, s.api(p)).send().await?;
        ensure!(r.status() == 404, "{m} {p}: {}", r.status());
    }
    s.stop().await;
    Ok(())
}

/// One NDJSON line of a `watchSprites` stream.
async fn next_line<E: std::error::Error + Send + Sync + 'static>(
    body: &mut (impl futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin),
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Result<Value> {
    loop {
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return Ok(serde_json::from_slice(&line)?);
        }
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .context("no line in time")?
            .context("stream ended")??;
        buf.extend_from_slice(&chunk);
    }
}

/// `GET /v1/sprites` with `Accept: application/x-ndjson`: the token's
/// sprites first, then their changes as they happen; another
/// organisation's sprites, and sprites outside a scoped token's list, never
/// appear.
pub async fn watch_sprites_keeps_to_the_tokens_reach() -> Result<()> {
    let s = TestServer::start().await?;
    make_org(&s, "acme").await?;
    make_org(&s, "beta").await?;
    let acme = secret(&mint_ok(&s, &s.token, json!({"org": "acme", "role": "admin"})).await?);
    let beta = secret(&mint_ok(&s, &s.token, json!({"org": "beta", "role": "admin"})).await?);
    let scoped = secret(&mint_ok(&s, &acme, json!({"role": "viewer", "sprites": ["seen"]})).await?);
    let create = |token: String, name: &'static str| {
        let url = s.api("/v1/sprites");
        async move {
            let r = client_for(&token)
                .post(url)
                .json(&json!({"name": name}))
                .send()
                .await?;
            ensure!(r.status() == 201, "create {name}: {}", r.status());
            anyhow::Ok(())
        }
    };
    create(acme.clone(), "seen").await?;
    create(beta.clone(), "theirs").await?;

    let open = |token: &str| {
        client_for(token)
            .get(s.api("/v1/sprites"))
            .header("accept", "application/x-ndjson")
            .send()
    };
    let r = open(&acme).await?;
    ensure!(r.status() == 200);
    ensure!(
        r.headers()["content-type"] == "application/x-ndjson",
        "{:?}",
        r.headers()
    );
    let mut acme_body = r.bytes_stream();
    let mut scoped_body = open(&scoped).await?.bytes_stream();
    let (mut ab, mut sb) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + WAIT;
    let first = next_line(&mut acme_body, &mut ab, deadline).await?;
    ensure!(
        first["type"] == "sprite" && first["name"] == "seen" && first["status"] == "cold",
        "{first}"
    );
    ensure!(
        first["org"]["name"] == "acme" && first["org"]["cold"] == 1 && first["org"]["running"] == 0,
        "{first}"
    );
    let first = next_line(&mut scoped_body, &mut sb, deadline).await?;
    ensure!(first["name"] == "seen", "{first}");

    // Changes: beta's sprite and acme's `other` (outside the scoped
    // token's list) are made and woken first; each stream's next lines
    // must still be about sprites it may see.
    create(beta.clone(), "theirs2").await?;
    create(acme.clone(), "other").await?;
    let wake = |token: String, name: &'static str| {
        let url = s.api(&format!("/v1/sprites/{name}/exec?cmd=true"));
        async move {
            let r = client_for(&token).post(url).send().await?;
            ensure!(r.status() == 200, "exec in {name}: {}", r.status());
            r.bytes().await?;
            anyhow::Ok(())
        }
    };
    wake(beta.clone(), "theirs").await?;
    wake(acme.clone(), "seen").await?;
    let mut acme_saw = Vec::new();
    loop {
        let v = next_line(&mut acme_body, &mut ab, deadline).await?;
        ensure!(v["org"]["name"] == "acme", "{v}");
        ensure!(
            v["type"] == "heartbeat" || ["seen", "other"].contains(&v["name"].as_str().unwrap_or("")),
            "{v}"
        );
        acme_saw.push(v["name"].as_str().unwrap_or("").to_string());
        if v["name"] == "seen" && v["status"] == "running" {
            ensure!(v["last_running_at"].is_string(), "{v}");
            break;
        }
    }
    ensure!(
        acme_saw.contains(&"other".to_string()),
        "acme's creation was reported: {acme_saw:?}"
    );
    loop {
        let v = next_line(&mut scoped_body, &mut sb, deadline).await?;
        ensure!(
            v["type"] == "heartbeat" || v["name"] == "seen",
            "the scoped token saw {v}"
        );
        if v["name"] == "seen" && v["status"] == "running" {
            // Counts are over what the token sees.
            ensure!(v["org"]["running"] == 1 && v["org"]["cold"] == 0, "{v}");
            break;
        }
    }
    // A deletion is reported too.
    let r = client_for(&acme)
        .delete(s.api("/v1/sprites/other"))
        .send()
        .await?;
    ensure!(r.status() == 204);
    loop {
        let v = next_line(&mut acme_body, &mut ab, deadline).await?;
        ensure!(v["name"] != "theirs" && v["name"] != "theirs2", "{v}");
        if v["name"] == "other" && v["type"] == "deleted" {
            break;
        }
    }
    // A plain list is still JSON.
    let v: Value = client_for(&acme)
        .get(s.api("/v1/sprites"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(v["sprites"].is_array(), "{v}");
    s.stop().await;
    Ok(())
}

/// `ports/watch` lists the listeners and reports a new one and its end;
/// `fs/watch` answers a subscribe and reports changes made through the API.
pub async fn ports_and_fs_watch() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("pw").await?;

    let mut ports = ws(&s, "/v1/sprites/pw/ports/watch").await?;
    let list = ws_until(&mut ports, "port_list", |v| v["type"] == "port_list").await?;
    ensure!(list["ports"].is_array(), "{list}");
    let c = s.client();
    // A listener left running in the background.
    run(&s, "pw", &sh("nc -l -p 7007 </dev/null >/dev/null 2>&1 &")).await?;
    let opened = ws_until(&mut ports, "port_opened 7007", |v| {
        v["type"] == "port_opened" && v["port"] == 7007
    })
    .await?;
    // nc binds the wildcard address, IPv4 or IPv6.
    ensure!(
        opened["pid"].as_u64().unwrap_or(0) > 0
            && ["0.0.0.0", "::"].contains(&opened["address"].as_str().unwrap_or("")),
        "{opened}"
    );
    ensure!(opened.get("session").is_none(), "{opened}");
    let pid = opened["pid"].as_u64().unwrap_or(0);
    run(&s, "pw", &sh(&format!("kill {pid}"))).await?;
    ws_until(&mut ports, "port_closed 7007", |v| {
        v["type"] == "port_closed" && v["port"] == 7007
    })
    .await?;

    let mut fsw = ws(&s, "/v1/sprites/pw/fs/watch").await?;
    fsw.send(Message::Text("{\"type\":\"nope\"}".into())).await?;
    let e = ws_until(&mut fsw, "an error", |v| v["type"] == "error").await?;
    ensure!(e["message"].as_str().unwrap_or("").contains("subscribe"), "{e}");
    let sub = json!({"type": "subscribe", "paths": ["w"], "recursive": true, "workingDir": "/tmp"});
    fsw.send(Message::Text(sub.to_string().into())).await?;
    let e = ws_until(&mut fsw, "ENOENT", |v| v["type"] == "error").await?;
    ensure!(e["message"].as_str().unwrap_or("").starts_with("ENOENT"), "{e}");
    run(&s, "pw", &sh("mkdir -p /tmp/w")).await?;
    fsw.send(Message::Text(sub.to_string().into())).await?;
    let ok = ws_until(&mut fsw, "subscribed", |v| v["type"] == "subscribed").await?;
    ensure!(ok["paths"] == json!(["/tmp/w"]), "{ok}");
    // A directory made after the subscription is watched once reported.
    run(&s, "pw", &sh("mkdir /tmp/w/d")).await?;
    let d = ws_until(&mut fsw, "create d", |v| {
        v["event"] == "create" && v["path"] == "/tmp/w/d"
    })
    .await?;
    ensure!(d["isDir"] == true, "{d}");
    let r = c
        .put(s.api("/v1/sprites/pw/fs/write?path=/tmp/w/d/f.txt"))
        .body("hello")
        .send()
        .await?;
    ensure!(r.status() == 200, "write: {}", r.status());
    let f = ws_until(&mut fsw, "create f.txt", |v| {
        v["event"] == "create" && v["path"] == "/tmp/w/d/f.txt"
    })
    .await?;
    ensure!(
        f["size"] == 5 && f["isDir"] == false && f["timestamp"].is_string(),
        "{f}"
    );
    let r = c
        .delete(s.api("/v1/sprites/pw/fs/delete?path=/tmp/w/d/f.txt"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    ws_until(&mut fsw, "remove", |v| {
        v["event"] == "remove" && v["path"] == "/tmp/w/d/f.txt"
    })
    .await?;

    // Not a WebSocket: 400; a missing sprite: 404.
    let r = c.get(s.api("/v1/sprites/pw/ports/watch")).send().await?;
    ensure!(r.status() == 400, "{}", r.status());
    let r = c.get(s.api("/v1/sprites/nope/fs/watch")).send().await?;
    ensure!(r.status() == 404, "{}", r.status());
    s.stop().await;
    Ok(())
}

/// chown through the API: numbers and names, and its errors in the
/// Sprites filesystem shape.
pub async fn chown_route() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("co").await?;
    run(&s, "co", &sh("mkdir -p /tmp/o/sub && touch /tmp/o/sub/f")).await?;
    let chown = |body: Value| c.post(s.api("/v1/sprites/co/fs/chown")).json(&body).send();
    let r = chown(json!({"path": "o", "workingDir": "/tmp", "uid": "sprite", "gid": 0, "recursive": true}))
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let v: Value = r.json().await?;
    ensure!(v["count"] == 3, "{v}");
    let out = run(&s, "co", &sh("stat -c '%U:%g' /tmp/o/sub/f")).await?;
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "sprite:0");
    let started = Instant::now();
    for (body, status, code) in [
        (json!({"path": "/tmp/o"}), 400, "EINVAL"),
        (json!({"path": "/tmp/o", "uid": "nobody-here"}), 400, "EINVAL"),
        (json!({"path": "/tmp/o", "uid": -1}), 400, "EINVAL"),
        (json!({"path": "/tmp/none", "uid": 0}), 404, "ENOENT"),
    ] {
        let r = chown(body.clone()).await?;
        let got = r.status().as_u16();
        let v: Value = r.json().await?;
        ensure!(got == status && v["code"] == code, "{body}: {got} {v}");
    }
    ensure!(started.elapsed() < WAIT);
    s.stop().await;
    Ok(())
}

/// The reference's list form of a validation error,
/// `{"errors":["invalid wait_for_capacity parameter"]}`, next to den's
/// usual `error`/`message`.
pub async fn validation_errors_list_form() -> Result<()> {
    let s = TestServer::start().await?;
    let r = s
        .client()
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "wfc", "wait_for_capacity": "soon"}))
        .send()
        .await?;
    ensure!(r.status() == 400, "{}", r.status());
    let v: Value = r.json().await?;
    ensure!(
        v == json!({
            "error": "bad_request",
            "message": "invalid wait_for_capacity parameter",
            "errors": ["invalid wait_for_capacity parameter"],
        }),
        "{v}"
    );
    // A boolean is fine.
    let r = s
        .client()
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "wfc", "wait_for_capacity": true}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    s.stop().await;
    Ok(())
}

/// A `watchSprites` client that stops reading holds a few lines, not every
/// change: once it reads again it gets the current list (a resync) instead
/// of the changes it missed.
pub async fn watch_sprites_lagging_client_is_resynced() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("busy").await?;
    s.create("idle").await?;
    let st = s.running.as_ref().context("running")?.state.clone();
    let caller = Principal {
        token: TokenInfo {
            id: "t".into(),
            name: "t".into(),
            created_at: String::new(),
            org: den_sprite::DEFAULT_ORG.into(),
            role: Role::Viewer,
            sprites: None,
            expires_at: None,
            server_admin: false,
        },
        org: den_sprite::DEFAULT_ORG.into(),
    };
    let resp = den_server::api::sprite_watch::stream(st.clone(), caller, None);
    let mut body = resp.into_body().into_data_stream();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut read_line = async || next_line(&mut body, &mut buf, deadline).await;
    let first: Vec<Value> = vec![read_line().await?, read_line().await?];
    ensure!(
        first[0]["name"] == "busy" && first[1]["name"] == "idle",
        "{first:?}"
    );

    // Far more changes than the broadcast keeps, while nobody reads.
    let t0 = Instant::now();
    drop(st.mgr.wake("busy").await?);
    for _ in 0..600 {
        st.mgr.freeze("busy").await?;
        drop(st.mgr.wake("busy").await?);
    }
    println!("  1200 status changes in {:?}", t0.elapsed());
    let mut lines = 0;
    loop {
        let v = read_line().await?;
        lines += 1;
        if v["name"] == "idle" {
            break;
        }
    }
    // What waited for the client: the stream's small queue, then the list.
    ensure!(lines <= 40, "{lines} lines before the resync");
    // After the resync, changes flow again (not the missed backlog).
    st.mgr.freeze("busy").await?;
    loop {
        let v = read_line().await?;
        if v["name"] == "busy" && v["status"] == "warm" {
            break;
        }
        ensure!(v["name"] != "idle", "a second resync: {v}");
    }
    s.stop().await;
    Ok(())
}
