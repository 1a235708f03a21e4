//! TCP over WebSocket (`/v1/sprites/{name}/proxy`), sprite URLs (Host
//! routing to the sprite's HTTP port).
//! Servers inside the sprites are busybox `nc`, `httpd` and CGI scripts.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use den_agent::protocol::{ExecRequest, ServiceDef};
use den_sprite::SpriteStatus;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::{TestServer, WAIT};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub(crate) fn mgr(s: &TestServer) -> &den_sprite::SpriteManager {
    &s.running.as_ref().expect("running").state.mgr
}

/// Run a shell script as root in the sprite to completion; its stdout.
pub(crate) async fn sh(s: &TestServer, name: &str, script: &str) -> Result<String> {
    let act = mgr(s).wake(name).await?;
    let out = act
        .agent()
        .exec(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            user: Some("root".into()),
            ..Default::default()
        })
        .await?
        .collect()
        .await;
    let code = out.exit.as_ref().map(|e| e.exit_code);
    ensure!(
        code == Some(0),
        "{script}: exit {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Start a long-running command in the sprite and wait until `port`
/// accepts connections from the host; the sprite's address.
pub(crate) async fn serve(s: &TestServer, name: &str, cmd: &str, port: u16) -> Result<Ipv4Addr> {
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
    let addr = act.addr();
    wait_listening(addr, port).await?;
    Ok(addr)
}

/// Run `busybox ARGS…` in `sprite` as service `name` and wait until it
/// listens on `port` (a service, not an exec session: only requests keep the
/// sprite awake).
pub(crate) async fn busybox_service(
    s: &TestServer,
    sprite: &str,
    name: &str,
    args: &[&str],
    port: u16,
) -> Result<()> {
    let svc = ServiceDef {
        name: name.into(),
        cmd: "busybox".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    drop(mgr(s).put_service(sprite, svc).await?);
    wait_listening(mgr(s).wake(sprite).await?.addr(), port).await
}

async fn wait_listening(addr: Ipv4Addr, port: u16) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if TcpStream::connect(SocketAddr::from((addr, port))).await.is_ok() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "nothing listens on {addr}:{port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ws_connect(s: &TestServer, path: &str, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = s.ws(path).into_client_request()?;
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().expect("header"));
    }
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// The HTTP status a refused WebSocket handshake got.
async fn ws_refused(s: &TestServer, path: &str, token: Option<&str>) -> Result<u16> {
    match ws_connect(s, path, token).await {
        Err(tungstenite::Error::Http(r)) => Ok(r.status().as_u16()),
        Err(e) => bail!("{path}: {e}"),
        Ok(_) => bail!("{path}: upgraded"),
    }
}

/// Next message that is not a ping/pong, within [`WAIT`].
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

/// The close frame's code and reason; fails on any data before it.
async fn expect_close(ws: &mut Ws) -> Result<(u16, String)> {
    match next(ws).await? {
        Some(Message::Close(Some(f))) => Ok((u16::from(f.code), f.reason.to_string())),
        other => bail!("expected a close frame, got {other:?}"),
    }
}

async fn connected(ws: &mut Ws) -> Result<Value> {
    match next(ws).await? {
        Some(Message::Text(t)) => Ok(serde_json::from_str(t.as_str())?),
        other => bail!("expected the connected reply, got {other:?}"),
    }
}

/// Send `data` and read the same number of bytes back.
async fn echo(ws: &mut Ws, data: &[u8]) -> Result<Vec<u8>> {
    ws.send(Message::Binary(data.to_vec().into())).await?;
    let mut got = Vec::new();
    while got.len() < data.len() {
        match next(ws).await? {
            Some(Message::Binary(b)) => got.extend_from_slice(&b),
            other => bail!("after {} bytes: {other:?}", got.len()),
        }
    }
    Ok(got)
}

pub(crate) fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

pub async fn tunnel(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    s.create("tun").await?;
    sh(
        &s,
        "tun",
        "printf '#!/bin/sh\\necho hi\\n' > /tmp/hi.sh && chmod +x /tmp/hi.sh",
    )
    .await?;
    let addr = serve(&s, "tun", "busybox nc -ll -p 7000 -e cat", 7000).await?;
    serve(&s, "tun", "busybox nc -ll -p 7001 -e /tmp/hi.sh", 7001).await?;
    let path = "/v1/sprites/tun/proxy";

    // Init frame, connected reply with the dialed address, echo both ways;
    // the large payload only gets back if both directions flow at once.
    let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
    ws.send(Message::Text(
        json!({"host": "localhost", "port": 7000}).to_string().into(),
    ))
    .await?;
    let hello = connected(&mut ws).await?;
    // Under gVisor the sprite's loopback is its sentry's network stack, not
    // the namespace's: den dials localhost at the sprite's address.
    let localhost = match runtime {
        den_runtime::Runtime::Native => "127.0.0.1".to_string(),
        den_runtime::Runtime::Gvisor => addr.to_string(),
    };
    ensure!(
        hello == json!({"status": "connected", "target": format!("{localhost}:7000")}),
        "{hello}"
    );
    ensure!(echo(&mut ws, b"hello\n").await? == b"hello\n");
    let big = pattern(3 << 20);
    ensure!(echo(&mut ws, &big).await? == big, "3 MiB echo differs");
    ws.close(None).await?;

    // Query form (no init frame), and every name of the sprite itself.
    for (q, host) in [
        ("?host=127.0.0.1&port=7000", None),
        ("?port=7000", None),
        ("", Some(String::new())),
        ("", Some("::1".to_string())),
        ("", Some("10.0.0.1".to_string())),
        ("", Some(addr.to_string())),
    ] {
        let mut ws = ws_connect(&s, &format!("{path}{q}"), Some(&s.token)).await?;
        if let Some(h) = &host {
            ws.send(Message::Text(json!({"host": h, "port": 7000}).to_string().into()))
                .await?;
        }
        ensure!(connected(&mut ws).await?["status"] == "connected", "{q} {host:?}");
        ensure!(echo(&mut ws, b"x").await? == b"x", "{q} {host:?}");
    }

    // The sprite's own names are dialed at its address.
    for h in [addr.to_string(), "10.0.0.1".into()] {
        let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
        ws.send(Message::Text(json!({"host": h, "port": 7000}).to_string().into()))
            .await?;
        let hello = connected(&mut ws).await?;
        ensure!(hello["target"] == format!("{addr}:7000"), "{h}: {hello}");
    }

    // A listener on the sprite's loopback only: reached as localhost
    // natively; out of reach under gVisor (docs/sprites.md, "What differs").
    put_file(&s, "tun", "/srv/lo/index.html", "loopback only\n").await?;
    sh(
        &s,
        "tun",
        "busybox httpd -f -p 127.0.0.1:7002 -h /srv/lo </dev/null >/dev/null 2>&1 & \
         i=0; until grep -q '0100007F:1B5A 00000000:0000 0A' /proc/net/tcp; do \
         i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done",
    )
    .await?;
    ensure!(
        TcpStream::connect((addr, 7002)).await.is_err(),
        "7002 answers on the sprite's address"
    );
    let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
    ws.send(Message::Text(
        json!({"host": "localhost", "port": 7002}).to_string().into(),
    ))
    .await?;
    if runtime == den_runtime::Runtime::Native {
        connected(&mut ws).await?;
        ws.send(Message::Binary(b"GET / HTTP/1.0\r\n\r\n".to_vec().into()))
            .await?;
        let mut page = Vec::new();
        while let Some(Message::Binary(b)) = next(&mut ws).await? {
            page.extend_from_slice(&b);
        }
        let page = String::from_utf8_lossy(&page);
        ensure!(page.ends_with("\r\n\r\nloopback only\n"), "{page}");
    } else {
        let end = next(&mut ws).await?;
        ensure!(
            matches!(&end, Some(Message::Close(Some(f)))
                if f.reason.contains(&format!("{addr}:7002")) && f.reason.contains("refused")),
            "a loopback-only listener under gVisor: {end:?}"
        );
    }

    // The upstream ends cleanly: its bytes, then a normal close.
    let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
    ws.send(Message::Text(json!({"port": 7001}).to_string().into()))
        .await?;
    connected(&mut ws).await?;
    let mut got = Vec::new();
    let close = loop {
        match next(&mut ws).await? {
            Some(Message::Binary(b)) => got.extend_from_slice(&b),
            Some(Message::Close(f)) => break f,
            other => bail!("{other:?}"),
        }
    };
    ensure!(got == b"hi\n", "{:?}", String::from_utf8_lossy(&got));
    ensure!(close.map(|f| u16::from(f.code)) == Some(1000));

    // Bad init frames: 1003 with the reference's reasons.
    for (msg, reason) in [
        (
            Message::Binary(b"{\"port\":7000}".to_vec().into()),
            "Expected JSON initialization message",
        ),
        (
            Message::Text("not json".into()),
            "Expected JSON initialization message",
        ),
        (Message::Text(r#"{"port":0}"#.into()), "Invalid port number"),
        (Message::Text(r#"{"port":70000}"#.into()), "Invalid port number"),
        (
            Message::Text(r#"{"host":"localhost"}"#.into()),
            "Invalid port number",
        ),
    ] {
        let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
        ws.send(msg.clone()).await?;
        let (code, why) = expect_close(&mut ws).await?;
        ensure!(code == 1003 && why == reason, "{msg:?}: {code} {why}");
    }
    // Nothing listening, or a host other than the sprite: 1011.
    let long_host = format!("{}.example", "x".repeat(200));
    for init in [
        json!({"port": 7999}),
        json!({"host": "192.0.2.1", "port": 80}),
        json!({"host": long_host, "port": 80}),
    ] {
        let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
        ws.send(Message::Text(init.to_string().into())).await?;
        let (code, why) = expect_close(&mut ws).await?;
        ensure!(
            code == 1011 && why.starts_with("Failed to connect to target: "),
            "{init}: {code} {why}"
        );
    }

    // Refused before the upgrade.
    ensure!(ws_refused(&s, "/v1/sprites/nope/proxy", Some(&s.token)).await? == 404);
    ensure!(ws_refused(&s, path, None).await? == 401);
    ensure!(ws_refused(&s, &format!("{path}?port=abc"), Some(&s.token)).await? == 400);
    let r = s.client().get(s.api(path)).send().await?;
    ensure!(r.status() == 400, "plain GET: {}", r.status());
    ensure!(r.json::<Value>().await?["error"] == "bad_request");

    // Server shutdown ends an open tunnel with 1001.
    let mut ws = ws_connect(&s, path, Some(&s.token)).await?;
    ws.send(Message::Text(json!({"port": 7000}).to_string().into()))
        .await?;
    connected(&mut ws).await?;
    s.running.as_ref().expect("running").state.shutdown.cancel();
    let (code, why) = expect_close(&mut ws).await?;
    ensure!(code == 1001 && why == "server shutting down", "{code} {why}");
    s.stop().await;
    Ok(())
}

/// A request to `http://<host>/<path>` sent to the server's own address.
pub(crate) fn url(s: &TestServer, path: &str) -> String {
    s.api(path)
}

pub(crate) fn host(s: &TestServer, name: &str) -> String {
    format!("{name}.localhost:{}", s.cfg.listen.port())
}

pub(crate) const ENV_CGI: &str = "#!/bin/sh\necho Content-Type: text/plain\necho\nenv\n";
/// Sends a line, then the next only once /tmp/go exists.
const STREAM_CGI: &str = "#!/bin/sh\necho Content-Type: text/plain\necho\necho first\n\
    while [ ! -e /tmp/go ]; do sleep 0.1; done\necho second\n";
const ECHO_CGI: &str = "#!/bin/sh\necho Content-Type: application/octet-stream\necho\nexec cat\n";
/// Answers any request with 101 and then echoes bytes.
pub(crate) const UPGRADE_ECHO: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line; do
  [ "$line" = "$cr" ] && break
  [ -z "$line" ] && break
done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n'
exec cat
"#;

/// Write `content` to `path` in the sprite (mode 0755).
pub(crate) async fn put_file(s: &TestServer, name: &str, path: &str, content: &str) -> Result<()> {
    let quoted = content.replace('\'', r"'\''");
    sh(
        s,
        name,
        &format!("mkdir -p \"$(dirname {path})\" && printf '%s' '{quoted}' > {path} && chmod 755 {path}"),
    )
    .await?;
    Ok(())
}

pub(crate) fn env_var<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

pub async fn urls() -> Result<()> {
    let s = TestServer::start().await?;
    let (c, anon) = (s.client(), s.anonymous());
    s.create("web").await?;
    put_file(&s, "web", "/srv/www/index.html", "page on 8080\n").await?;
    put_file(&s, "web", "/srv/www/cgi-bin/env", ENV_CGI).await?;
    put_file(&s, "web", "/srv/www/cgi-bin/echo", ECHO_CGI).await?;
    put_file(&s, "web", "/srv/www/cgi-bin/stream", STREAM_CGI).await?;
    serve(&s, "web", "busybox httpd -f -p 8080 -h /srv/www", 8080).await?;
    let web = host(&s, "web");

    // `sprite` auth (the default): the den token is required, and is not
    // passed on to the sprite.
    let r = anon.get(url(&s, "/")).header("host", &web).send().await?;
    ensure!(r.status() == 401, "{}", r.status());
    ensure!(
        r.json::<Value>().await? == json!({"error": "unauthorized"}),
        "the exact Sprites body"
    );
    let r = anon
        .get(url(&s, "/"))
        .header("host", &web)
        .header("authorization", "Bearer den_wrong")
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    let r = c.get(url(&s, "/")).header("host", &web).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "page on 8080\n");
    let r = c
        .get(url(&s, "/cgi-bin/env?a=1&b=two"))
        .header("host", &web)
        .header("x-custom", "kept")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let env = r.text().await?;
    ensure!(
        env_var(&env, "HTTP_AUTHORIZATION").is_none(),
        "token leaked: {env}"
    );
    ensure!(env_var(&env, "QUERY_STRING") == Some("a=1&b=two"), "{env}");
    ensure!(env_var(&env, "REQUEST_METHOD") == Some("GET"), "{env}");
    ensure!(env_var(&env, "HTTP_HOST") == Some(web.as_str()), "{env}");
    ensure!(env_var(&env, "HTTP_X_CUSTOM") == Some("kept"), "{env}");
    ensure!(
        env_var(&env, "HTTP_X_FORWARDED_FOR") == Some("127.0.0.1"),
        "{env}"
    );
    ensure!(
        env_var(&env, "HTTP_X_FORWARDED_HOST") == Some(web.as_str()),
        "{env}"
    );
    ensure!(env_var(&env, "HTTP_X_FORWARDED_PROTO") == Some("http"), "{env}");
    // The API itself is untouched by sprite hosts and vice versa.
    let r = c
        .get(url(&s, "/v1/sprites/web"))
        .header("host", &web)
        .send()
        .await?;
    ensure!(
        r.status() == 404,
        "the sprite's httpd has no such file: {}",
        r.status()
    );
    let r = c.get(url(&s, "/v1/sprites/web")).send().await?;
    ensure!(r.json::<Value>().await?["name"] == "web");

    // A POST body of a few MiB goes through and back intact.
    let body = pattern(5 << 20);
    let r = c
        .post(url(&s, "/cgi-bin/echo"))
        .header("host", &web)
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let back = r.bytes().await?;
    ensure!(
        back.len() == body.len() && back[..] == body[..],
        "echoed {} bytes",
        back.len()
    );

    // Responses stream: the first line arrives while the CGI still waits.
    let mut r = c
        .get(url(&s, "/cgi-bin/stream"))
        .header("host", &web)
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let first = tokio::time::timeout(WAIT, r.chunk()).await??;
    ensure!(first.as_deref() == Some(&b"first\n"[..]), "{first:?}");
    sh(&s, "web", "touch /tmp/go").await?;
    let mut rest = Vec::new();
    while let Some(b) = tokio::time::timeout(WAIT, r.chunk()).await?? {
        rest.extend_from_slice(&b);
    }
    ensure!(rest == b"second\n", "{:?}", String::from_utf8_lossy(&rest));

    // `public`: open to anyone; a den token sent anyway is still stripped.
    let r = c
        .put(s.api("/v1/sprites/web"))
        .json(&json!({"url_settings": {"auth": "public"}}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let r = anon.get(url(&s, "/")).header("host", &web).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "page on 8080\n");
    let env = c
        .get(url(&s, "/cgi-bin/env"))
        .header("host", &web)
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        env_var(&env, "HTTP_AUTHORIZATION").is_none(),
        "token leaked: {env}"
    );
    let env = anon
        .get(url(&s, "/cgi-bin/env"))
        .header("host", &web)
        .header("authorization", "Bearer app-own-token")
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        env_var(&env, "HTTP_AUTHORIZATION") == Some("Bearer app-own-token"),
        "the app's own credentials pass: {env}"
    );

    // A service with http_port takes the URL traffic from 8080.
    put_file(&s, "web", "/srv/www2/index.html", "page of the service\n").await?;
    mgr(&s)
        .put_service(
            "web",
            ServiceDef {
                name: "site".into(),
                cmd: "busybox".into(),
                args: ["httpd", "-f", "-p", "8081", "-h", "/srv/www2"]
                    .map(String::from)
                    .to_vec(),
                http_port: Some(8081),
                ..Default::default()
            },
        )
        .await?;
    wait_listening(mgr(&s).wake("web").await?.addr(), 8081).await?;
    let r = anon.get(url(&s, "/")).header("host", &web).send().await?;
    ensure!(r.text().await? == "page of the service\n");

    // Unknown sprites and silent ports. Without a token an unknown sprite
    // answers like a private one, so names can't be probed.
    let r = anon
        .get(url(&s, "/"))
        .header("host", host(&s, "nope"))
        .send()
        .await?;
    ensure!(r.status() == 401, "{}", r.status());
    ensure!(r.json::<Value>().await? == json!({"error": "unauthorized"}));
    let r = c
        .get(url(&s, "/"))
        .header("host", host(&s, "nope"))
        .send()
        .await?;
    ensure!(r.status() == 404, "{}", r.status());
    ensure!(r.json::<Value>().await?["error"] == "not_found");
    s.create("quiet").await?;
    drop(mgr(&s).wake("quiet").await?);
    let r = c
        .get(url(&s, "/"))
        .header("host", host(&s, "quiet"))
        .send()
        .await?;
    ensure!(r.status() == 502, "{}", r.status());
    let body: Value = r.json().await?;
    ensure!(
        body["error"] == "bad_gateway" && body["message"].as_str().unwrap_or("").contains("8080"),
        "{body}"
    );
    s.stop().await;
    Ok(())
}

/// Read an HTTP/1.1 response head from a raw stream.
pub(crate) async fn read_head(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut b)).await??;
        ensure!(n == 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    Ok(String::from_utf8(head)?)
}

/// `Upgrade` passes through: 101 from the sprite, then raw bytes both ways.
pub async fn url_upgrade() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("up").await?;
    put_file(&s, "up", "/srv/upgrade.sh", UPGRADE_ECHO).await?;
    serve(&s, "up", "busybox nc -ll -p 8080 -e /srv/upgrade.sh", 8080).await?;
    let mut tcp = TcpStream::connect(s.cfg.listen).await?;
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\
         Authorization: Bearer {}\r\n\r\n",
        host(&s, "up"),
        s.token
    );
    tcp.write_all(req.as_bytes()).await?;
    let head = read_head(&mut tcp).await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    ensure!(head.to_ascii_lowercase().contains("upgrade: echo"), "{head}");
    // Bulk both ways at once, more than every buffer on the way holds.
    let data = pattern(32 << 20);
    let (mut rd, mut wr) = tcp.split();
    let mut back = vec![0u8; data.len()];
    let (w, r) = tokio::join!(wr.write_all(&data), async {
        tokio::time::timeout(WAIT, rd.read_exact(&mut back)).await
    });
    w?;
    r??;
    ensure!(
        blake3::hash(&back) == blake3::hash(&data),
        "32 MiB through the upgraded connection differ"
    );
    // Two plain TCP sockets: spliced, not copied through den's buffers.
    let metrics = s.client().get(s.api("/metrics")).send().await?.text().await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("den_upgraded_connections_total{copy=\"splice\"}")),
        "no spliced upgrade in /metrics:\n{metrics}"
    );
    // Server shutdown ends the upgraded connection.
    s.running.as_ref().expect("running").state.shutdown.cancel();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .context("still open after shutdown")??;
    s.stop().await;
    Ok(())
}

/// A keep-alive HTTP/1.1 responder (one per connection, under `nc -ll -e`):
/// every answer names the connection it came over.
const KEEPALIVE: &str = r#"#!/bin/sh
cr=$(printf '\r')
id="conn $(cat /proc/sys/kernel/random/uuid)"
while IFS= read -r request; do
  while IFS= read -r line; do
    [ "$line" = "$cr" ] && break
    [ -z "$line" ] && break
  done
  printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %s\r\n\r\n%s' "${#id}" "$id"
done
"#;

/// Sprite URLs reuse upstream connections within one boot of the sprite,
/// and never carry one over to the next boot.
pub async fn url_reuses_upstream_connections() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("ka").await?;
    put_file(&s, "ka", "/srv/keepalive.sh", KEEPALIVE).await?;
    sh(&s, "ka", "chmod 755 /srv/keepalive.sh").await?;
    busybox_service(
        &s,
        "ka",
        "ka",
        &["nc", "-ll", "-p", "8080", "-e", "/srv/keepalive.sh"],
        8080,
    )
    .await?;
    let get = || async {
        let r = s
            .client()
            .get(url(&s, "/"))
            .header("host", host(&s, "ka"))
            .send()
            .await?;
        ensure!(r.status() == 200, "{}", r.status());
        anyhow::Ok(r.text().await?)
    };
    let first = get().await?;
    ensure!(first.starts_with("conn "), "{first:?}");
    for _ in 0..5 {
        ensure!(get().await? == first, "a new upstream connection per request");
    }
    // A cold sleep and a boot: a new network namespace, new connections.
    mgr(&s).sleep("ka", SpriteStatus::Cold).await?;
    let after = get().await?;
    ensure!(
        after.starts_with("conn ") && after != first,
        "{after:?} after a cold boot"
    );
    ensure!(get().await? == after);
    s.stop().await;
    Ok(())
}

/// A request to a cold sprite boots it and waits for its service to listen.
pub async fn url_wakes_cold() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("sleepy").await?;
    put_file(&s, "sleepy", "/srv/www/index.html", "awake\n").await?;
    mgr(&s)
        .put_service(
            "sleepy",
            ServiceDef {
                name: "site".into(),
                // Slow to start, like real apps: the request waits for it.
                cmd: "sh".into(),
                args: ["-c", "sleep 1; exec busybox httpd -f -p 8090 -h /srv/www"]
                    .map(String::from)
                    .to_vec(),
                http_port: Some(8090),
                ..Default::default()
            },
        )
        .await?;
    mgr(&s).sleep("sleepy", SpriteStatus::Cold).await?;
    ensure!(mgr(&s).get("sleepy")?.status == SpriteStatus::Cold);
    let r = s
        .client()
        .get(url(&s, "/"))
        .header("host", host(&s, "sleepy"))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(r.text().await? == "awake\n");
    ensure!(mgr(&s).get("sleepy")?.status == SpriteStatus::Running);
    s.stop().await;
    Ok(())
}

/// A CGI storing the request body as `/srv/www/big` and answering its size.
const UPLOAD_CGI: &str = "#!/bin/sh\ncat > /srv/www/big\necho Content-Type: text/plain\necho\n\
    wc -c < /srv/www/big\n";

/// POST `data` through the sprite URL `web` to [`UPLOAD_CGI`] at
/// `/cgi-bin/upload`; fails unless the sprite stored all of it.
async fn upload(s: &TestServer, web: &str, data: &[u8]) -> Result<()> {
    let r = s
        .client()
        .post(url(s, "/cgi-bin/upload"))
        .header("host", web)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await?;
    let status = r.status();
    let heads = format!("{:?}", r.headers());
    ensure!(status == 200, "{status}: {}", r.text().await?);
    let stored = r.text().await?;
    ensure!(
        stored.trim() == data.len().to_string(),
        "the sprite stored {stored:?} bytes ({heads})"
    );
    Ok(())
}

/// Bulk bodies both ways through a sprite URL arrive intact: a large upload
/// (written to a file by a CGI) and its download (a static file).
pub async fn url_bulk_upload_and_download_intact() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("bulk").await?;
    put_file(&s, "bulk", "/srv/www/cgi-bin/upload", UPLOAD_CGI).await?;
    serve(&s, "bulk", "busybox httpd -f -p 8080 -h /srv/www", 8080).await?;
    let web = host(&s, "bulk");
    let data = pattern(24 << 20);
    upload(&s, &web, &data).await?;
    let mut r = c.get(url(&s, "/big")).header("host", &web).send().await?;
    ensure!(r.status() == 200, "{}", r.status());
    let mut hasher = blake3::Hasher::new();
    let mut n = 0usize;
    while let Some(chunk) = tokio::time::timeout(WAIT, r.chunk()).await?? {
        n += chunk.len();
        hasher.update(&chunk);
    }
    ensure!(n == data.len(), "downloaded {n} bytes");
    ensure!(
        hasher.finalize() == blake3::hash(&data),
        "the download differs from the upload"
    );
    s.stop().await;
    Ok(())
}

/// One response read off a raw keep-alive connection.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Send `method path` to the sprite URL `web` on `conn` (kept alive) and
/// read the whole response: by `Content-Length`, chunked, or none (HEAD,
/// 204).
async fn ask(
    conn: &mut tokio::io::BufReader<TcpStream>,
    s: &TestServer,
    web: &str,
    method: &str,
    path: &str,
) -> Result<Answer> {
    use tokio::io::AsyncBufReadExt;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {web}\r\nAuthorization: Bearer {}\r\n\r\n",
        s.token
    );
    conn.get_mut().write_all(req.as_bytes()).await?;
    let head = read_head(conn).await?;
    let status: u16 = head.get(9..12).context("status line")?.parse()?;
    let mut a = Answer {
        status,
        head,
        body: Vec::new(),
    };
    if method == "HEAD" || status == 204 || status == 304 {
        return Ok(a);
    }
    if let Some(len) = a.header("content-length") {
        let mut body = vec![0u8; len.parse()?];
        tokio::time::timeout(WAIT, conn.read_exact(&mut body)).await??;
        a.body = body;
        return Ok(a);
    }
    ensure!(
        a.header("transfer-encoding") == Some("chunked"),
        "neither length nor chunked: {}",
        a.head
    );
    loop {
        let mut line = String::new();
        tokio::time::timeout(WAIT, conn.read_line(&mut line)).await??;
        let n = usize::from_str_radix(line.trim(), 16).with_context(|| format!("chunk size {line:?}"))?;
        let mut chunk = vec![0u8; n + 2];
        tokio::time::timeout(WAIT, conn.read_exact(&mut chunk)).await??;
        ensure!(chunk.ends_with(b"\r\n"), "chunk not terminated");
        if n == 0 {
            return Ok(a);
        }
        a.body.extend_from_slice(&chunk[..n]);
    }
}

/// `den_url_bodies_total{copy="splice"}` from /metrics.
async fn spliced_bodies(s: &TestServer) -> Result<u64> {
    let metrics = s.client().get(s.api("/metrics")).send().await?.text().await?;
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix("den_url_bodies_total{copy=\"splice\"} "))
        .map_or(Ok(0), |v| v.trim().parse::<f64>().map(|v| v as u64))?)
}

/// Answers 204 with no body.
const NO_CONTENT_CGI: &str = "#!/bin/sh\nprintf 'HTTP/1.1 204 No Content\\r\\n\\r\\n'\n";
/// A chunked answer: `hello world`.
const CHUNKED_CGI: &str = "#!/bin/sh\nprintf 'HTTP/1.1 200 OK\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n\
    6\\r\\nhello \\r\\n5\\r\\nworld\\r\\n0\\r\\n\\r\\n'\n";
/// 1 MiB of /srv/www/big with a `Content-Length`, the head first and the
/// body a moment later (in its own segments).
const SLOW_HEAD_CGI: &str = "#!/bin/sh\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 1048576\\r\\n\\r\\n'\n\
    sleep 0.3\nhead -c 1048576 /srv/www/big\n";
/// Says it sends 1 MiB, sends 100 KiB and ends.
const SHORT_CGI: &str = "#!/bin/sh\nprintf 'HTTP/1.1 200 OK\\r\\nContent-Length: 1048576\\r\\n\\r\\n'\n\
    head -c 102400 /srv/www/big\n";

/// Plain-HTTP bodies through a sprite URL, large ones spliced: 64 MiB up
/// and down byte-identical; one client connection kept alive across a big
/// body, a HEAD, a 204, a chunked answer, a body whose head came first and
/// a small one; a body the sprite cuts short ends the connection instead
/// of hanging; and a client that leaves mid-body lets the sprite go idle.
pub async fn url_plain_bodies_spliced() -> Result<()> {
    let s = TestServer::start_with(|c| c.warm_after = Duration::from_secs(2)).await?;
    s.create("bodies").await?;
    put_file(&s, "bodies", "/srv/www/cgi-bin/upload", UPLOAD_CGI).await?;
    put_file(&s, "bodies", "/srv/www/cgi-bin/none", NO_CONTENT_CGI).await?;
    put_file(&s, "bodies", "/srv/www/cgi-bin/chunked", CHUNKED_CGI).await?;
    put_file(&s, "bodies", "/srv/www/cgi-bin/slowhead", SLOW_HEAD_CGI).await?;
    put_file(&s, "bodies", "/srv/www/cgi-bin/short", SHORT_CGI).await?;
    put_file(&s, "bodies", "/srv/www/small", "small\n").await?;
    // A service, not an exec session: only requests keep the sprite awake.
    // It runs as the sprite's user, for whom the upload's directory is open.
    sh(&s, "bodies", "chmod 777 /srv/www").await?;
    busybox_service(
        &s,
        "bodies",
        "httpd",
        &["httpd", "-f", "-p", "8080", "-h", "/srv/www"],
        8080,
    )
    .await?;
    let web = host(&s, "bodies");

    // 64 MiB up (copied) ...
    let data = pattern(64 << 20);
    upload(&s, &web, &data).await?;

    // ... and down (spliced), then more on the same client connection.
    let before = spliced_bodies(&s).await?;
    let mut conn = tokio::io::BufReader::new(TcpStream::connect(s.cfg.listen).await?);
    let a = ask(&mut conn, &s, &web, "GET", "/big").await?;
    ensure!(a.status == 200, "{}", a.head);
    ensure!(
        a.header("content-length") == Some(&*data.len().to_string()),
        "{}",
        a.head
    );
    ensure!(a.body.len() == data.len(), "downloaded {} bytes", a.body.len());
    ensure!(
        blake3::hash(&a.body) == blake3::hash(&data),
        "the download differs"
    );
    let a = ask(&mut conn, &s, &web, "GET", "/small").await?;
    ensure!(a.status == 200 && a.body == b"small\n", "{} {:?}", a.head, a.body);
    let a = ask(&mut conn, &s, &web, "HEAD", "/big").await?;
    ensure!(a.status == 200, "{}", a.head);
    ensure!(
        a.header("content-length") == Some(&*data.len().to_string()),
        "{}",
        a.head
    );
    let a = ask(&mut conn, &s, &web, "GET", "/cgi-bin/none").await?;
    ensure!(a.status == 204, "{}", a.head);
    let a = ask(&mut conn, &s, &web, "GET", "/cgi-bin/chunked").await?;
    ensure!(
        a.status == 200 && a.body == b"hello world",
        "{} {:?}",
        a.head,
        a.body
    );
    let a = ask(&mut conn, &s, &web, "GET", "/cgi-bin/slowhead").await?;
    ensure!(a.status == 200, "{}", a.head);
    ensure!(a.body[..] == data[..1 << 20], "the slow-head body differs");
    let a = ask(&mut conn, &s, &web, "GET", "/big").await?;
    ensure!(
        blake3::hash(&a.body) == blake3::hash(&data),
        "the second download differs"
    );
    let a = ask(&mut conn, &s, &web, "GET", "/small").await?;
    ensure!(a.body == b"small\n", "{:?}", a.body);
    // Pipelined: both requests at once, the answers in order.
    let two = format!(
        "GET /cgi-bin/slowhead HTTP/1.1\r\nHost: {web}\r\nAuthorization: Bearer {t}\r\n\r\n\
         GET /big HTTP/1.1\r\nHost: {web}\r\nAuthorization: Bearer {t}\r\n\r\n",
        t = s.token
    );
    let mut piped = tokio::io::BufReader::new(TcpStream::connect(s.cfg.listen).await?);
    piped.get_mut().write_all(two.as_bytes()).await?;
    for want in [&data[..1 << 20], &data[..]] {
        let head = read_head(&mut piped).await?;
        ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = vec![0u8; want.len()];
        tokio::time::timeout(WAIT, piped.read_exact(&mut body)).await??;
        ensure!(
            blake3::hash(&body) == blake3::hash(want),
            "a pipelined body differs"
        );
    }
    drop(piped);
    let spliced = spliced_bodies(&s).await? - before;
    ensure!(
        spliced == 5,
        "{spliced} bodies spliced, want 5 (big thrice, slowhead twice)"
    );

    // A body cut short by the sprite: the client gets what there was, then
    // the connection closes (never a hang, never a next response in it).
    let req = format!(
        "GET /cgi-bin/short HTTP/1.1\r\nHost: {web}\r\nAuthorization: Bearer {}\r\n\r\n",
        s.token
    );
    let mut short = TcpStream::connect(s.cfg.listen).await?;
    short.write_all(req.as_bytes()).await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, short.read_to_end(&mut got))
        .await
        .context("a short body hangs the connection")??;
    let text = String::from_utf8_lossy(&got[..64.min(got.len())]).into_owned();
    ensure!(text.starts_with("HTTP/1.1 200"), "{text}");
    ensure!(got.len() < (1 << 20), "{} bytes for a body cut short", got.len());

    drop(conn);
    let deadline = Instant::now() + WAIT;
    while mgr(&s).get("bodies")?.status == SpriteStatus::Running {
        ensure!(
            Instant::now() < deadline,
            "the sprite stays awake after the bodies were served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A client leaving mid-body: the upstream connection and the sprite's
    // activity go with it, so the sprite can sleep.
    let req = format!(
        "GET /big HTTP/1.1\r\nHost: {web}\r\nAuthorization: Bearer {}\r\n\r\n",
        s.token
    );
    let mut leaver = TcpStream::connect(s.cfg.listen).await?;
    leaver.write_all(req.as_bytes()).await?;
    let mut some = vec![0u8; 1 << 20];
    tokio::time::timeout(WAIT, leaver.read_exact(&mut some)).await??;
    drop(leaver);
    let deadline = Instant::now() + WAIT;
    while mgr(&s).get("bodies")?.status == SpriteStatus::Running {
        ensure!(
            Instant::now() < deadline,
            "the sprite stays awake after the client left mid-body"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
    Ok(())
}
