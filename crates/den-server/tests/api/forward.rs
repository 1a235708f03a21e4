//! Cluster forwarding between two real den servers in one process: A routes
//! sprites named `b-*` (and creates) to B, so everything a client does
//! through A is served by B; `x-*` sprites bounce (each node says the other
//! owns them), which must end in 503 `sprite_moved`, not a loop.
//!
//! The servers run in single-node mode; each gets a second listener that
//! serves the same state with a static test [`Router`], the way cluster
//! mode wires one in. Both nodes load the same token database (as cluster
//! nodes share one); a token minted through A after B loaded it is known
//! to A only, which shows B checks forwarded requests itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_agent::protocol::ExecRequest;
use den_cluster::PeerKey;
use den_server::forward::{Route, RouteError, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::{TestServer, WAIT};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Sprites whose names start with one of `remote` live on `peer`; creates
/// go there too when `creates_remote`.
struct StaticRouter {
    me: String,
    remote: Vec<&'static str>,
    /// Sprites with these prefixes alternate: on the peer, then here, …
    /// (ownership moving while a request is on its way).
    flip: Vec<&'static str>,
    flips: AtomicUsize,
    /// Sprites with these prefixes live on a node that is down.
    dead: Vec<&'static str>,
    creates_remote: bool,
    peer: (String, String),
    key: PeerKey,
}

/// The secret both test nodes share, as a cluster's nodes do.
fn cluster_key() -> PeerKey {
    PeerKey::from_secret(b"the forwarding tests' cluster secret")
}

#[async_trait::async_trait]
impl Router for StaticRouter {
    fn node_name(&self) -> &str {
        &self.me
    }
    fn peer_key(&self) -> &PeerKey {
        &self.key
    }
    async fn route_sprite(&self, name: &str) -> Result<Route, RouteError> {
        if self.dead.iter().any(|p| name.starts_with(p)) {
            return Ok(Route::Remote {
                node: "node-dead".into(),
                // Nothing listens on port 1: connections are refused at once.
                base_url: "http://127.0.0.1:1".into(),
            });
        }
        let flip = self.flip.iter().any(|p| name.starts_with(p));
        let remote = self.remote.iter().any(|p| name.starts_with(p));
        Ok(
            if remote || (flip && self.flips.fetch_add(1, Ordering::SeqCst).is_multiple_of(2)) {
                self.peer_route()
            } else {
                Route::Local
            },
        )
    }
    async fn route_create(&self, region: Option<&str>) -> Result<Route, RouteError> {
        if region == Some("nowhere") {
            return Err(RouteError::NoNodeInRegion(Some("nowhere".into())));
        }
        Ok(if self.creates_remote {
            self.peer_route()
        } else {
            Route::Local
        })
    }
}

impl StaticRouter {
    fn peer_route(&self) -> Route {
        Route::Remote {
            node: self.peer.0.clone(),
            base_url: self.peer.1.clone(),
        }
    }
}

/// Serve `s`'s state with `router` (and `tokens`, if given) on `listener`
/// until `s` stops.
fn serve_routed(
    s: &TestServer,
    listener: TcpListener,
    router: StaticRouter,
    tokens: Option<Arc<den_server::auth::TokenStore>>,
) {
    let mut state = s.running.as_ref().expect("running").state.clone();
    state.router = Some(Arc::new(router));
    if let Some(t) = tokens {
        state.tokens = t;
    }
    let stop = state.shutdown.clone();
    let app = den_server::server::app(state);
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
}

fn mgr(s: &TestServer) -> &den_sprite::SpriteManager {
    &s.running.as_ref().expect("running").state.mgr
}

/// Start a long-running command in the sprite and wait until `port`
/// accepts connections from the host.
async fn serve_in(s: &TestServer, name: &str, cmd: &str, port: u16) -> Result<()> {
    let act = mgr(s).wake(name).await?;
    act.agent()
        .exec(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            user: Some("root".into()),
            max_run_after_disconnect_ms: Some(0),
            ..Default::default()
        })
        .await?
        .detach();
    let addr: Ipv4Addr = act.addr();
    // Polls the condition (den_testkit::wait_until is for blocking code).
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(SocketAddr::from((addr, port))).await.is_err() {
        ensure!(Instant::now() < deadline, "nothing listens on {addr}:{port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn ws_connect(base: &str, path: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("{}{path}", base.replacen("http://", "ws://", 1)).into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("header"));
    }
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// The status and body of a refused WebSocket handshake.
async fn ws_refused(base: &str, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    match ws_connect(base, path, token).await {
        Err(tungstenite::Error::Http(r)) => Ok((
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).to_string(),
        )),
        Err(e) => bail!("{path}: {e}"),
        Ok(_) => bail!("{path}: upgraded"),
    }
}

async fn next(ws: &mut Ws) -> Result<Option<Message>> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no message in time")?
        {
            None => return Ok(None),
            Some(Err(e)) => bail!("websocket: {e}"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Ok(Some(m)),
        }
    }
}

/// stdout, exit code and close code of an exec WebSocket (non-tty).
async fn exec_ws(ws: &mut Ws) -> Result<(Vec<u8>, Option<u8>, Option<u16>)> {
    match next(ws).await? {
        Some(Message::Text(t)) if t.contains("session_info") => {}
        other => bail!("first frame is not session_info: {other:?}"),
    }
    let (mut out, mut exit) = (Vec::new(), None);
    while let Some(m) = next(ws).await? {
        match m {
            Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Message::Binary(b) if b.first() == Some(&3) => exit = b.get(1).copied(),
            Message::Close(f) => return Ok((out, exit, f.map(|f| u16::from(f.code)))),
            _ => {}
        }
    }
    Ok((out, exit, None))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn sh(script: &str) -> String {
    format!("cmd=sh&cmd=-c&cmd={}", enc(script))
}

fn blob(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Everything a client does through A reaches B's sprite.
pub async fn cluster_forwarding() -> Result<()> {
    let b = TestServer::start().await?;
    let a = TestServer::start().await?;
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    );
    let (ua, ub) = (
        format!("http://{}", la.local_addr()?),
        format!("http://{}", lb.local_addr()?),
    );
    // One token database for both, as cluster nodes share one; A loads its
    // own view of it, so a token minted through A is unknown to B.
    let shared = den_server::auth::TokenStore::open(&b.cfg.data_dir.join("tokens.db"))?;
    serve_routed(
        &a,
        la,
        StaticRouter {
            me: "node-a".into(),
            remote: vec!["b-", "x-"],
            flip: vec!["y-"],
            flips: AtomicUsize::new(0),
            dead: vec!["z-"],
            creates_remote: true,
            peer: ("node-b".into(), ub.clone()),
            key: cluster_key(),
        },
        Some(Arc::new(shared)),
    );
    serve_routed(
        &b,
        lb,
        StaticRouter {
            me: "node-b".into(),
            remote: vec!["x-", "y-"],
            flip: vec![],
            flips: AtomicUsize::new(0),
            dead: vec![],
            creates_remote: false,
            peer: ("node-a".into(), ua.clone()),
            key: cluster_key(),
        },
        None,
    );
    let token = b.token.clone();
    let c = b.client();
    let anon = b.anonymous();

    // Create through A lands on B.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "b-one", "labels": ["via-a"]}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {} {}", r.status(), r.text().await?);
    let v: Value = r.json().await?;
    ensure!(v["name"] == "b-one" && v["labels"] == json!(["via-a"]), "{v}");
    ensure!(mgr(&b).get("b-one").is_ok(), "b-one is not on B");
    ensure!(mgr(&a).get("b-one").is_err(), "b-one is on A");
    let list: Value = c.get(b.api("/v1/sprites")).send().await?.json().await?;
    ensure!(list["sprites"][0]["name"] == "b-one", "{list}");
    ensure!(mgr(&a).list().is_empty(), "A has sprites");
    // The body goes on re-encoded: its length is the new one.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .header("content-type", "application/json")
        .body("{ \"name\" :   \"b-spaced\" ,\n  \"labels\": [ ] }\n")
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    ensure!(mgr(&b).get("b-spaced").is_ok(), "b-spaced is not on B");
    // The router's errors: a region without nodes.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "b-two", "config": {"region": "nowhere"}}))
        .send()
        .await?;
    ensure!(r.status() == 503, "{}", r.status());
    ensure!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await?;
    ensure!(v["error"] == "region_unavailable", "{v}");
    // Bodies are checked before placement.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "b-bad", "labels": [""]}))
        .send()
        .await?;
    ensure!(r.status() == 400, "{}", r.status());

    // Plain HTTP: get, update, 404 for a sprite B does not have.
    let r = c.get(format!("{ua}/v1/sprites/b-one")).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.headers().get("sprite-version").is_some());
    ensure!(r.json::<Value>().await?["name"] == "b-one");
    let r = c.get(format!("{ua}/v1/sprites/b-nope")).send().await?;
    ensure!(r.status() == 404, "{}", r.status());
    ensure!(r.json::<Value>().await?["error"] == "not_found");

    // Exec over WebSocket: output, exit code, close 1000; twice to reuse
    // pooled peer connections.
    for i in 0..2 {
        let mut ws = ws_connect(
            &ua,
            &format!("/v1/sprites/b-one/exec?{}", sh(&format!("echo hi{i}; exit 3"))),
            Some(&token),
        )
        .await?;
        let (out, exit, close) = exec_ws(&mut ws).await?;
        ensure!(
            out == format!("hi{i}\n").as_bytes(),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        ensure!(exit == Some(3) && close == Some(1000), "{exit:?} {close:?}");
    }
    // stdin both ways through the splice: 1 MiB through `cat`.
    let ws = ws_connect(&ua, "/v1/sprites/b-one/exec?cmd=cat&stdin=true", Some(&token)).await?;
    let (mut sink, mut stream) = ws.split();
    let big = blob(1 << 20);
    let input = big.clone();
    let writer = tokio::spawn(async move {
        for chunk in input.chunks(60_000) {
            let mut frame = vec![0x00];
            frame.extend_from_slice(chunk);
            sink.send(Message::Binary(frame.into())).await?;
        }
        sink.send(Message::Binary(vec![0x04].into())).await?;
        anyhow::Ok(sink)
    });
    let (mut got, mut exit) = (Vec::new(), None);
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
        exit == Some(0) && got == big,
        "exit {exit:?}, {} bytes",
        got.len()
    );
    // Errors before the upgrade come back as HTTP statuses.
    let (code, body) = ws_refused(&ua, "/v1/sprites/b-nope/exec?cmd=true", Some(&token)).await?;
    ensure!(code == 404 && body.contains("not_found"), "{code} {body}");

    // HTTP exec: stdin from a streamed body, framed output.
    let r = c
        .post(format!(
            "{ua}/v1/sprites/b-one/exec?{}&stdin=true",
            sh("cat; exit 5")
        ))
        .body("abc")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let body = r.bytes().await?;
    ensure!(&body[..] == b"\x01abc\x03\x05", "{body:?}");

    // Responses stream: the first output arrives before the command ends.
    let mut r = c
        .post(format!(
            "{ua}/v1/sprites/b-one/exec?{}",
            sh("echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second")
        ))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let mut got = Vec::new();
    while !got.ends_with(b"first\n") {
        let chunk = tokio::time::timeout(WAIT, r.chunk())
            .await
            .context("no output in time")??
            .context("ended early")?;
        got.extend_from_slice(&chunk);
    }
    ensure!(&got[..] == b"\x01first\n", "{got:?}");
    let r2 = c
        .put(format!("{ua}/v1/sprites/b-one/fs/write?path=/tmp/go"))
        .body("")
        .send()
        .await?;
    ensure!(r2.status() == 200, "{}", r2.status());
    while let Some(chunk) = tokio::time::timeout(WAIT, r.chunk()).await?? {
        got.extend_from_slice(&chunk);
    }
    ensure!(&got[..] == b"\x01first\n\x01second\n\x03\x00", "{got:?}");

    // Checkpoint: the NDJSON stream arrives whole.
    let r = c
        .post(format!("{ua}/v1/sprites/b-one/checkpoint"))
        .json(&json!({"comment": "through a"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
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
    let r = c
        .get(format!("{ua}/v1/sprites/b-one/checkpoints/v1"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());

    // Files: a small write (replayable) and a large streamed one.
    for (path, data) in [
        ("/tmp/small", b"small file".to_vec()),
        ("/tmp/big", blob(3 << 20)),
    ] {
        let r = c
            .put(format!("{ua}/v1/sprites/b-one/fs/write?path={path}"))
            .body(data.clone())
            .send()
            .await?;
        ensure!(
            r.status() == 200,
            "write {path}: {} {}",
            r.status(),
            r.text().await?
        );
        let r = c
            .get(format!("{ua}/v1/sprites/b-one/fs/read?path={path}"))
            .send()
            .await?;
        ensure!(r.status() == 200, "read {path}: {}", r.status());
        ensure!(r.bytes().await?[..] == data[..], "{path} differs");
    }

    // Sprite URL traffic by Host, `sprite` auth: B checks the token.
    mgr(&b)
        .wake("b-one")
        .await?
        .agent()
        .exec(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "mkdir -p /srv/www && echo page on b > /srv/www/index.html".into(),
            ],
            user: Some("root".into()),
            ..Default::default()
        })
        .await?
        .collect()
        .await;
    serve_in(&b, "b-one", "busybox httpd -f -p 8080 -h /srv/www", 8080).await?;
    serve_in(&b, "b-one", "busybox nc -ll -p 7000 -e cat", 7000).await?;
    let host = format!("b-one.localhost:{}", la_port(&ua));
    let r = anon.get(format!("{ua}/")).header("host", &host).send().await?;
    ensure!(r.status() == 401, "{}", r.status());
    ensure!(r.json::<Value>().await? == json!({"error": "unauthorized"}));
    let r = c.get(format!("{ua}/")).header("host", &host).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "page on b\n");
    let r = c
        .put(format!("{ua}/v1/sprites/b-one"))
        .json(&json!({"url_settings": {"auth": "public"}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let r = anon.get(format!("{ua}/")).header("host", &host).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "page on b\n");

    // A sprite URL upgrade: 101 from the sprite's program, then raw bytes.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "b-up"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    let r = c
        .put(format!(
            "{ua}/v1/sprites/b-up/fs/write?path=/srv/upgrade.sh&mkdirParents=true&mode=0755"
        ))
        .body(UPGRADE_ECHO)
        .send()
        .await?;
    ensure!(r.status() == 200, "{} {}", r.status(), r.text().await?);
    serve_in(&b, "b-up", "busybox nc -ll -p 8080 -e /srv/upgrade.sh", 8080).await?;
    let mut tcp = TcpStream::connect(ua.trim_start_matches("http://")).await?;
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: b-up.localhost:{}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        la_port(&ua),
    );
    tcp.write_all(req.as_bytes()).await?;
    let head = read_head(&mut tcp).await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    let data = blob(1 << 20);
    let (mut rd, mut wr) = tcp.split();
    let mut back = vec![0u8; data.len()];
    let (w, r) = tokio::join!(wr.write_all(&data), async {
        tokio::time::timeout(WAIT, rd.read_exact(&mut back)).await
    });
    w?;
    r??;
    ensure!(back == data, "1 MiB through the forwarded upgrade differs");
    drop(tcp);

    // TCP proxy over WebSocket: init, connected, echo of a large payload.
    let mut ws = ws_connect(&ua, "/v1/sprites/b-one/proxy", Some(&token)).await?;
    ws.send(Message::Text(
        json!({"host": "localhost", "port": 7000}).to_string().into(),
    ))
    .await?;
    match next(&mut ws).await? {
        Some(Message::Text(t)) => {
            let v: Value = serde_json::from_str(t.as_str())?;
            ensure!(v["status"] == "connected", "{v}");
        }
        other => bail!("expected connected, got {other:?}"),
    }
    let data = blob(256 << 10);
    ws.send(Message::Binary(data.clone().into())).await?;
    let mut echoed = Vec::new();
    while echoed.len() < data.len() {
        match next(&mut ws).await? {
            Some(Message::Binary(b)) => echoed.extend_from_slice(&b),
            other => bail!("after {} bytes: {other:?}", echoed.len()),
        }
    }
    ensure!(echoed == data, "proxy echo differs");
    ws.close(None).await?;

    // Tokens: none at all is refused by A; one only A knows is refused by B.
    let r = anon.get(format!("{ua}/v1/sprites/b-one")).send().await?;
    ensure!(r.status() == 401, "{}", r.status());
    let r = c
        .post(format!("{ua}/v1/tokens"))
        .json(&json!({"name": "a-only"}))
        .send()
        .await?;
    ensure!(r.status() == 201 || r.status() == 200, "{}", r.status());
    let v: Value = r.json().await?;
    let a_only = v["token"].as_str().context("token")?.to_string();
    let r = anon
        .get(format!("{ua}/v1/sprites"))
        .bearer_auth(&a_only)
        .send()
        .await?;
    ensure!(r.status() == 200, "A accepts its token: {}", r.status());
    let r = anon
        .get(format!("{ua}/v1/sprites/b-one"))
        .bearer_auth(&a_only)
        .send()
        .await?;
    ensure!(r.status() == 401, "B refuses: {}", r.status());
    let (code, _) = ws_refused(&ua, "/v1/sprites/b-one/exec?cmd=true", Some(&a_only)).await?;
    ensure!(code == 401, "{code}");
    let (code, _) = ws_refused(&ua, "/v1/sprites/b-one/exec?cmd=true", None).await?;
    ensure!(code == 401, "{code}");

    // A bounce: each node says the other owns x-bounce. 503, no loop,
    // through either node, HTTP or upgrade.
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "x-bounce"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    for base in [&ua, &ub] {
        let t0 = Instant::now();
        let r = c.get(format!("{base}/v1/sprites/x-bounce")).send().await?;
        ensure!(r.status() == 503, "{}", r.status());
        ensure!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()) == Some("1"));
        let v: Value = r.json().await?;
        ensure!(v["error"] == "sprite_moved", "{v}");
        ensure!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let (code, body) = ws_refused(base, "/v1/sprites/x-bounce/exec?cmd=true", Some(&token)).await?;
        ensure!(code == 503 && body.contains("sprite_moved"), "{code} {body}");
    }
    let bhost = format!("x-bounce.localhost:{}", la_port(&ua));
    let r = c.get(format!("{ua}/")).header("host", &bhost).send().await?;
    ensure!(r.status() == 503, "{}", r.status());

    // Ownership moved to A while A forwarded to B: B answers sprite_moved,
    // A routes again and serves the request itself.
    a.create("y-flip").await?;
    let r = c.get(format!("{ua}/v1/sprites/y-flip")).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.json::<Value>().await?["name"] == "y-flip");
    let r = c
        .post(format!("{ua}/v1/sprites/y-flip/exec?cmd=echo&cmd=here"))
        .body("")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(&r.bytes().await?[..] == b"\x01here\n\x03\x00");

    // The owner is down: 503 with Retry-After, after routing once more.
    let t0 = Instant::now();
    let r = c.get(format!("{ua}/v1/sprites/z-gone")).send().await?;
    ensure!(r.status() == 503, "{}", r.status());
    ensure!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await?;
    ensure!(v["error"] == "node_unavailable", "{v}");
    let (code, _) = ws_refused(&ua, "/v1/sprites/z-gone/exec?cmd=true", Some(&token)).await?;
    ensure!(code == 503, "{code}");
    ensure!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // Forwarding cost on loopback: a round trip through A vs. straight to B.
    let rtt = |url: String| {
        let c = c.clone();
        async move {
            let mut best = Duration::MAX;
            for _ in 0..30 {
                let t0 = Instant::now();
                let r = c.get(&url).send().await?;
                ensure!(r.status() == 200, "{}", r.status());
                r.bytes().await?;
                best = best.min(t0.elapsed());
            }
            anyhow::Ok(best)
        }
    };
    let direct = rtt(format!("{ub}/v1/sprites/b-one")).await?;
    let through = rtt(format!("{ua}/v1/sprites/b-one")).await?;
    eprintln!("GET sprite: direct {direct:?}, forwarded {through:?}");
    // An exec stdin → stdout round trip on an open session (spliced bytes).
    let echo_rtt = |base: String| {
        let token = token.clone();
        async move {
            let mut ws = ws_connect(&base, "/v1/sprites/b-one/exec?cmd=cat&stdin=true", Some(&token)).await?;
            match next(&mut ws).await? {
                Some(Message::Text(t)) if t.contains("session_info") => {}
                other => bail!("first frame is not session_info: {other:?}"),
            }
            let mut best = Duration::MAX;
            for i in 0..30u8 {
                let t0 = Instant::now();
                ws.send(Message::Binary(vec![0x00, b'a' + i % 26].into())).await?;
                match next(&mut ws).await? {
                    Some(Message::Binary(b)) if b[..] == [0x01, b'a' + i % 26] => {}
                    other => bail!("echo {i}: {other:?}"),
                }
                best = best.min(t0.elapsed());
            }
            ws.send(Message::Binary(vec![0x04].into())).await?;
            anyhow::Ok(best)
        }
    };
    let direct = echo_rtt(ub.clone()).await?;
    let through = echo_rtt(ua.clone()).await?;
    let direct2 = echo_rtt(ub.clone()).await?;
    eprintln!("exec echo: direct {direct:?} / {direct2:?}, forwarded {through:?}");

    // A stops: a stream it forwards ends (B's command is still running).
    let mut r = c
        .post(format!(
            "{ua}/v1/sprites/b-one/exec?{}",
            sh("echo start; sleep 300")
        ))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let first = tokio::time::timeout(WAIT, r.chunk()).await??;
    ensure!(first.as_deref() == Some(&b"\x01start\n"[..]), "{first:?}");
    a.running.as_ref().expect("running").state.shutdown.cancel();
    let t0 = Instant::now();
    // The end: a clean one or a cut connection, with no more output.
    if let Ok(Some(c)) = tokio::time::timeout(WAIT, r.chunk())
        .await
        .context("stream still open")?
    {
        bail!("more output: {c:?}");
    }
    ensure!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    a.stop().await;
    b.stop().await;
    Ok(())
}

/// Answers any request with 101 and then echoes bytes.
const UPGRADE_ECHO: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line; do
  [ "$line" = "$cr" ] && break
  [ -z "$line" ] && break
done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n'
exec cat
"#;

/// Read an HTTP/1.1 response head from a raw stream.
async fn read_head(tcp: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut b)).await??;
        ensure!(n == 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    Ok(String::from_utf8(head)?)
}

fn la_port(base: &str) -> u16 {
    base.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// Answers one HTTP request with the request's head as its body.
const ECHO_HEAD: &str = r#"#!/bin/sh
cr=$(printf '\r')
head=""
while IFS= read -r line; do
  [ "$line" = "$cr" ] && break
  [ -z "$line" ] && break
  head="$head$line
"
done
printf 'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "${#head}" "$head"
"#;

/// The headers a sprite's program received, lowercased names.
fn head_lines(body: &str) -> Vec<(String, String)> {
    body.lines()
        .skip(1)
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// A request that only claims to come from a node (`x-den-forwarded-by`,
/// `x-den-client`, with no proof, a malformed one, one made with another
/// secret, one too old, or one made for another request) is served as a
/// plain client request: forwarded to the owner instead of answered with
/// `sprite_moved`, placed instead of created where it landed, and the
/// address that counts is the connection's. A genuine proof does what it
/// should, and the sprite's program sees no peer header and the client's
/// real address, once.
pub async fn forged_peer_claims_gain_nothing() -> Result<()> {
    let b = TestServer::start().await?;
    let a = TestServer::start().await?;
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
    );
    let (ua, ub) = (
        format!("http://{}", la.local_addr()?),
        format!("http://{}", lb.local_addr()?),
    );
    let shared = den_server::auth::TokenStore::open(&b.cfg.data_dir.join("tokens.db"))?;
    let router =
        |me: &str, remote: Vec<&'static str>, creates_remote: bool, peer: (&str, &str)| StaticRouter {
            me: me.into(),
            remote,
            flip: vec![],
            flips: AtomicUsize::new(0),
            dead: vec![],
            creates_remote,
            peer: (peer.0.into(), peer.1.into()),
            key: cluster_key(),
        };
    serve_routed(
        &a,
        la,
        router("node-a", vec!["b-"], true, ("node-b", &ub)),
        Some(Arc::new(shared)),
    );
    serve_routed(&b, lb, router("node-b", vec![], false, ("node-a", &ua)), None);
    // The client connects from 127.0.0.2, the nodes from 127.0.0.1, so the
    // address a sprite is told about says which one it came from.
    let client_ip: std::net::IpAddr = "127.0.0.2".parse()?;
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("authorization", format!("Bearer {}", b.token).parse()?);
    let c = reqwest::Client::builder()
        .default_headers(h)
        .local_address(client_ip)
        .timeout(WAIT)
        .build()?;

    let r = c
        .post(format!("{ua}/v1/sprites"))
        .json(&json!({"name": "b-one"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {} {}", r.status(), r.text().await?);
    ensure!(mgr(&b).get("b-one").is_ok(), "b-one is not on B");

    let path = "/v1/sprites/b-one";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let other = PeerKey::from_secret(b"a secret this cluster does not have");
    let forged: Vec<(&str, Option<String>)> = vec![
        ("no proof", None),
        ("malformed proof", Some("node-b:1:00".into())),
        ("another secret", Some(other.prove("node-b", "GET", path, None))),
        (
            "too old",
            Some(cluster_key().prove_at("node-b", now - 120_000, "GET", path, None)),
        ),
        (
            "made for another request",
            Some(cluster_key().prove("node-b", "GET", "/v1/sprites/b-two", None)),
        ),
        (
            "made for another client",
            Some(cluster_key().prove("node-b", "GET", path, Some("203.0.113.9:1".parse()?))),
        ),
    ];
    for (what, proof) in &forged {
        let mut req = c
            .get(format!("{ua}{path}"))
            .header("x-den-forwarded-by", "node-b");
        if let Some(p) = proof {
            req = req.header("x-den-peer", p);
        }
        let r = req.send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        ensure!(
            status == 200 && v["name"] == "b-one",
            "{what}: a claimed forward is answered {status} {v} instead of being forwarded"
        );
    }
    // The same request with a genuine proof is one a node forwarded: the
    // receiver does not own the sprite and must not forward it again.
    let r = c
        .get(format!("{ua}{path}"))
        .header("x-den-forwarded-by", "node-b")
        .header("x-den-peer", cluster_key().prove("node-b", "GET", path, None))
        .send()
        .await?;
    ensure!(r.status() == 503, "genuine proof: {}", r.status());
    ensure!(r.json::<Value>().await?["error"] == "sprite_moved");
    // A claim carries no token either.
    let r = reqwest::Client::new()
        .get(format!("{ub}{path}"))
        .header("x-den-forwarded-by", "node-a")
        .header("x-den-peer", "node-a:1:00")
        .send()
        .await?;
    ensure!(r.status() == 401, "no token, claimed forward: {}", r.status());

    // A create that claims to be forwarded is placed like any other
    // (before: created on the node it reached).
    let r = c
        .post(format!("{ua}/v1/sprites"))
        .header("x-den-forwarded-by", "node-b")
        .json(&json!({"name": "b-forged"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "{}", r.status());
    ensure!(mgr(&b).get("b-forged").is_ok(), "the forged create is not on B");
    ensure!(mgr(&a).get("b-forged").is_err(), "the forged create stayed on A");

    // Sprite URL traffic: the program sees the client's address once, and
    // no peer header, through A (forwarded) and straight at B; a claimed
    // client address counts nowhere.
    let r = c
        .put(format!(
            "{ua}/v1/sprites/b-one/fs/write?path=/srv/head.sh&mkdirParents=true&mode=0755"
        ))
        .body(ECHO_HEAD)
        .send()
        .await?;
    ensure!(r.status() == 200, "{} {}", r.status(), r.text().await?);
    serve_in(&b, "b-one", "busybox nc -ll -p 8080 -e /srv/head.sh", 8080).await?;
    for (base, claim) in [(&ua, false), (&ua, true), (&ub, false), (&ub, true)] {
        let mut req = c
            .get(format!("{base}/"))
            .header("host", format!("b-one.localhost:{}", la_port(base)));
        if claim {
            req = req
                .header("x-den-forwarded-by", "node-a")
                .header("x-den-client", "203.0.113.9:1")
                .header("x-den-peer", "node-a:1:00");
        }
        let r = req.send().await?;
        ensure!(r.status() == 200, "{base} claim={claim}: {}", r.status());
        let lines = head_lines(&r.text().await?);
        let xff: Vec<&str> = lines
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .map(|(_, v)| v.as_str())
            .collect();
        ensure!(
            xff == ["127.0.0.2"],
            "{base} claim={claim}: the sprite was told X-Forwarded-For {xff:?}"
        );
        let leaked: Vec<_> = lines.iter().filter(|(k, _)| k.starts_with("x-den-")).collect();
        ensure!(
            leaked.is_empty(),
            "{base} claim={claim}: peer headers reached the sprite: {leaked:?}"
        );
    }

    a.stop().await;
    b.stop().await;
    Ok(())
}
