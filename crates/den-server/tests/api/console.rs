//! The web console: the token a browser sends as a WebSocket subprotocol
//! (it can't set `Authorization` there) opens exactly what the same token
//! opens as a header, and the whole console flow in a real headless
//! Chromium driven by Selenium (tests/console/console_flow.py).

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::common::{TestServer, WAIT};
use crate::org_tokens::{client_for, make_org, mint_ok, secret};
use crate::sdk::{python, run_suite};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Dial an exec WebSocket offering `protocols` and no `Authorization`.
async fn dial(
    s: &TestServer,
    path: &str,
    protocols: &str,
) -> Result<(Ws, tungstenite::handshake::client::Response)> {
    let mut req = s.ws(path).into_client_request()?;
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse()?);
    let r = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .context("websocket handshake timed out")?;
    Ok(r?)
}

/// The status of an upgrade the server refused.
async fn refused(s: &TestServer, path: &str, protocols: &str) -> Result<u16> {
    match dial(s, path, protocols).await {
        Ok(_) => bail!("{path} with {protocols:?}: upgrade unexpectedly accepted"),
        Err(e) => match e.downcast::<tungstenite::Error>() {
            Ok(tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
            Ok(e) => bail!("{path}: {e}"),
            Err(e) => Err(e),
        },
    }
}

/// Stdout of a non-TTY exec until the socket closes.
async fn stdout(ws: &mut Ws) -> Result<String> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no frame in time")?
        {
            None | Some(Ok(Message::Close(_))) => break,
            Some(Ok(Message::Binary(b))) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("exec socket: {e}"),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub async fn ws_token_subprotocol() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("web").await?;
    make_org(&s, "other").await?;
    let other = secret(&mint_ok(&s, &s.token, json!({"org": "other", "role": "admin"})).await?);
    let viewer = secret(&mint_ok(&s, &s.token, json!({"role": "viewer"})).await?);
    let path = "/v1/sprites/web/exec?cmd=echo&cmd=hi";

    // The token as a subprotocol works, and the server selects `den.v1`: the
    // token is never echoed back.
    let (mut ws, resp) = dial(&s, path, &format!("den.v1, den.bearer.{}", s.token)).await?;
    ensure!(
        resp.headers().get("sec-websocket-protocol").map(|v| v.as_bytes()) == Some(b"den.v1"),
        "selected protocol: {:?}",
        resp.headers().get("sec-websocket-protocol")
    );
    let out = stdout(&mut ws).await?;
    ensure!(out == "hi\n", "stdout {out:?}");

    // It widens nothing: a wrong or absent token is refused, another
    // organisation's token does not see the sprite, a viewer can't exec.
    let wrong = refused(
        &s,
        path,
        "den.v1, den.bearer.den_00000000000000000000000000000000",
    )
    .await?;
    ensure!(wrong == 401, "wrong token: {wrong}");
    let absent = refused(&s, path, "den.v1").await?;
    ensure!(absent == 401, "no token: {absent}");
    let foreign = refused(&s, path, &format!("den.v1, den.bearer.{other}")).await?;
    ensure!(foreign == 404, "another organisation's token: {foreign}");
    let read_only = refused(&s, path, &format!("den.v1, den.bearer.{viewer}")).await?;
    ensure!(read_only == 403, "viewer token: {read_only}");

    // Only on a WebSocket upgrade: a plain request carrying the header is
    // not authenticated by it.
    let r = s
        .anonymous()
        .get(s.api("/v1/sprites"))
        .header("sec-websocket-protocol", format!("den.bearer.{}", s.token))
        .send()
        .await?;
    ensure!(
        r.status() == 401,
        "plain GET with the subprotocol header: {}",
        r.status()
    );
    s.stop().await;
    Ok(())
}

/// Run one part of tests/console/console_flow.py in headless Chromium
/// against a fresh server, with an organisation `other` (its admin token
/// and sprite `theirs`) and a viewer token of the default organisation.
/// Screenshots go to `DEN_CONSOLE_SCREENSHOTS` when set.
async fn browser(part: &str) -> Result<()> {
    let s = TestServer::start().await?;
    make_org(&s, "other").await?;
    let other = secret(&mint_ok(&s, &s.token, json!({"org": "other", "role": "admin"})).await?);
    let viewer = secret(&mint_ok(&s, &s.token, json!({"role": "viewer"})).await?);
    // A sprite of the other organisation, which only its token shows.
    let r = client_for(&other)
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "theirs"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create in other: {}", r.status());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console/console_flow.py");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .env("DEN_CONSOLE_PART", part)
        .env("DEN_OTHER_TOKEN", &other)
        .env("DEN_VIEWER_TOKEN", &viewer)
        // Selenium Manager must never go online: the system driver is used.
        .env("SE_OFFLINE", "true");
    run_suite(&s, cmd, &format!("console browser test ({part})"))?;
    s.stop().await;
    Ok(())
}

/// The flow: a wrong token's message, login, create a sprite, `echo
/// hi` in the terminal, resize (seen by `stty size` in the sprite), reattach
/// with scrollback, paste and copy, checkpoint, break a file, restore, the
/// file back, a service's live logs.
pub async fn browser_flow() -> Result<()> {
    browser("flow").await
}

/// Upload, network policy, URL setting, fork and delete, dark theme and
/// phone width, another organisation's token, a token revoked mid-session,
/// a viewer's terminal.
pub async fn browser_settings_and_access() -> Result<()> {
    browser("more").await
}
