//! `den proxy`: local TCP ports forwarded to ports in a sprite, one
//! `/proxy` WebSocket per connection (§2.11).

use anyhow::{Context, Result, bail};
use clap::Args;
use den_client::Client;
use den_client::tokio_tungstenite::tungstenite::Message;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Ctx;
use super::errors::Hint;

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// PORT (the same number here and in the sprite) or LOCAL:REMOTE.
    #[arg(required = true, value_name = "PORT|LOCAL:REMOTE")]
    pub ports: Vec<String>,
}

fn parse_port(s: &str) -> Result<u16> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("{s:?} is not a port (1-65535)"))
}

pub async fn proxy(ctx: &Ctx, a: ProxyArgs) -> Result<()> {
    let sprite = ctx.sprite(None)?;
    let c = ctx.client()?;
    // Fail now on a wrong name, not at the first connection.
    c.get_sprite(&sprite).await.hint()?;
    let mut tasks = Vec::new();
    for p in &a.ports {
        let (local, remote) = match p.split_once(':') {
            Some((l, r)) => (parse_port(l)?, parse_port(r)?),
            None => (parse_port(p)?, parse_port(p)?),
        };
        let l = TcpListener::bind(("127.0.0.1", local))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
        let bound = l.local_addr()?.port();
        println!("forwarding 127.0.0.1:{bound} -> {sprite}:{remote}");
        let (c, sprite) = (c.clone(), sprite.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else { continue };
                let (c, sprite) = (c.clone(), sprite.clone());
                tokio::spawn(async move {
                    if let Err(e) = tunnel(&c, &sprite, remote, sock).await {
                        eprintln!("den proxy: {sprite}:{remote}: {e:#}");
                    }
                });
            }
        }));
    }
    if tasks.is_empty() {
        bail!("no ports given");
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Listen on 127.0.0.1:`local` and tunnel each connection to `remote` in the
/// sprite, in the background (for `den exec --forward`).
pub async fn forward(c: Client, sprite: String, local: u16, remote: u16) -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", local))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
    let bound = l.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { continue };
            let (c, sprite) = (c.clone(), sprite.clone());
            tokio::spawn(async move {
                if let Err(e) = tunnel(&c, &sprite, remote, sock).await {
                    eprintln!("den: forwarding {sprite}:{remote}: {e:#}");
                }
            });
        }
    });
    Ok(bound)
}

async fn tunnel(c: &Client, sprite: &str, port: u16, sock: TcpStream) -> Result<()> {
    let mut ws = c.proxy_ws(sprite).await.hint()?;
    ws.send(Message::Text(
        json!({"host": "localhost", "port": port}).to_string().into(),
    ))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if v["status"] == "connected" {
                    break;
                }
            }
            Some(Ok(Message::Close(f))) => {
                bail!(
                    "{}",
                    f.map(|f| f.reason.to_string()).unwrap_or_else(|| "closed".into())
                )
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the server closed the tunnel"),
        }
    }
    let (mut rd, mut wr) = sock.into_split();
    let (mut sink, mut stream) = ws.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                let _ = sink.send(Message::Close(None)).await;
                return anyhow::Ok(());
            }
            sink.send(Message::Binary(buf[..n].to_vec().into())).await?;
        }
    };
    let down = async {
        while let Some(m) = stream.next().await {
            match m? {
                Message::Binary(b) => wr.write_all(&b).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = up => r?,
        r = down => r?,
    }
    Ok(())
}
