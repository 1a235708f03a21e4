//! Exec (§2.4, §3): opening the exec WebSocket for a new command or an
//! existing session, listing sessions and killing them. The frame protocol
//! itself is the caller's (the CLI drives the terminal).

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};

use crate::client::{error_from_parts, seg};
use crate::{Client, Error, NdjsonStream, Result};

/// An open exec WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How to start a command (the exec query parameters).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// argv; `argv[0]` is looked up in the sprite's PATH.
    pub cmd: Vec<String>,
    pub tty: bool,
    /// Whether the client will send stdin (non-TTY; a TTY always reads it).
    pub stdin: bool,
    /// `K=V` pairs; when any are given they replace the default environment.
    pub env: Vec<String>,
    pub dir: Option<String>,
    /// den extension: a Go duration (`30s`) after which the command is killed.
    pub timeout: Option<String>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
}

/// One row of `GET /exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// A PID, as a string or a number depending on the server.
    pub id: Value,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub is_active: bool,
    #[serde(default)]
    pub last_activity: Option<String>,
    #[serde(default)]
    pub tty: bool,
}

impl Session {
    pub fn id_string(&self) -> String {
        match &self.id {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<Session>,
}

impl Client {
    /// Start `opts.cmd` in sprite `name` over a WebSocket.
    pub async fn exec_ws(&self, name: &str, opts: &ExecOptions) -> Result<Ws> {
        if opts.cmd.is_empty() {
            return Err(Error::BadUrl {
                url: "exec".into(),
                reason: "no command given".into(),
            });
        }
        let mut url = self.ws_url(&format!("/v1/sprites/{}/exec", seg(name)))?;
        {
            let mut q = url.query_pairs_mut();
            for a in &opts.cmd {
                q.append_pair("cmd", a);
            }
            q.append_pair("path", &opts.cmd[0]);
            q.append_pair("tty", if opts.tty { "true" } else { "false" });
            q.append_pair("stdin", if opts.stdin || opts.tty { "true" } else { "false" });
            for e in &opts.env {
                q.append_pair("env", e);
            }
            if let Some(d) = &opts.dir {
                q.append_pair("dir", d);
            }
            if let Some(t) = &opts.timeout {
                q.append_pair("timeout", t);
            }
            if let Some(c) = opts.cols {
                q.append_pair("cols", &c.to_string());
            }
            if let Some(r) = opts.rows {
                q.append_pair("rows", &r.to_string());
            }
        }
        self.connect_ws(url, name).await
    }

    /// Attach to a running session (the server replays recent output first).
    pub async fn attach_ws(&self, name: &str, id: &str) -> Result<Ws> {
        let url = self.ws_url(&format!("/v1/sprites/{}/exec/{}", seg(name), seg(id)))?;
        self.connect_ws(url, name).await
    }

    /// The TCP tunnel WebSocket (§2.11); the caller sends the `{"host","port"}` frame.
    pub async fn proxy_ws(&self, name: &str) -> Result<Ws> {
        let url = self.ws_url(&format!("/v1/sprites/{}/proxy", seg(name)))?;
        self.connect_ws(url, name).await
    }

    async fn connect_ws(&self, url: reqwest::Url, sprite: &str) -> Result<Ws> {
        let shown = url.as_str().split('?').next().unwrap_or_default().to_string();
        let mut req = url.as_str().into_client_request().map_err(|e| Error::BadUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        if let Some(t) = self.token() {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| Error::BadUrl {
                url: self.api_url(),
                reason: "the token contains characters a header cannot carry".into(),
            })?;
            v.set_sensitive(true);
            req.headers_mut().insert("authorization", v);
        }
        // disable_nagle: stdin and resize frames are small writes.
        match tokio_tungstenite::connect_async_tls_with_config(req, None, true, self.ws_connector()).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                Err(error_from_parts(resp.status().as_u16(), &body, Some(sprite)))
            }
            Err(tungstenite::Error::Io(e)) => Err(Error::WsUnreachable {
                url: self.api_url(),
                source: e,
            }),
            Err(e) => Err(Error::Ws(e.to_string())),
        }
    }

    pub async fn list_sessions(&self, name: &str) -> Result<Vec<Session>> {
        let rb = self.request(Method::GET, &format!("/v1/sprites/{}/exec", seg(name)))?;
        let l: SessionList = self.json(rb, Some(name)).await?;
        Ok(l.sessions)
    }

    /// Signal a session's process group; NDJSON progress until it exits.
    pub async fn kill_session(&self, name: &str, id: &str, signal: &str) -> Result<NdjsonStream> {
        let mut url = self.url(&format!("/v1/sprites/{}/exec/{}/kill", seg(name), seg(id)))?;
        url.query_pairs_mut().append_pair("signal", signal);
        let resp = self
            .send(self.request_url(Method::POST, url)?, Some(name))
            .await?;
        Ok(NdjsonStream::new(resp))
    }
}
