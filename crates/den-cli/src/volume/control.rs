//! The control socket of a mounted volume.
//!
//! A mounted volume is held exclusively by its daemon, so operations that
//! need the live state (checkpoint, flush, fork of the live volume) are sent
//! to the daemon as one JSON line per request over a unix socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Checkpoint { comment: String },
    Flush,
    Fork { name: String },
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub result: serde_json::Value,
}

pub fn socket_path(data_dir: &Path, volume: &str) -> PathBuf {
    data_dir.join("run").join(format!("{volume}.sock"))
}

pub async fn call(path: &Path, req: &Request) -> Result<serde_json::Value> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "volume is in use, and its daemon socket {} does not answer",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut resp = String::new();
    BufReader::new(r).read_line(&mut resp).await?;
    let resp: Response = serde_json::from_str(&resp).context("bad reply from the volume daemon")?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_else(|| "volume daemon failed".into()));
    }
    Ok(resp.result)
}

/// Serve requests until the listener is dropped. Each connection is served
/// on its own task; `handle` must be cheap to clone.
pub async fn serve<F, Fut>(listener: UnixListener, handle: F)
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<serde_json::Value>> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match handle(req).await {
                        Ok(result) => Response {
                            ok: true,
                            error: None,
                            result,
                        },
                        Err(e) => Response {
                            ok: false,
                            error: Some(format!("{e:#}")),
                            result: serde_json::Value::Null,
                        },
                    },
                    Err(e) => Response {
                        ok: false,
                        error: Some(format!("bad request: {e}")),
                        result: serde_json::Value::Null,
                    },
                };
                let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
