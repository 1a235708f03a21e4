//! The HTTP plumbing: URL building, the bearer header, and turning answers
//! into [`Error`]s the same way for every endpoint.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Connecting to a local or LAN server takes milliseconds; a long wait
/// means nobody is there, and the user should hear so soon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `api_url` like `http://127.0.0.1:8080` (a trailing path is kept as a prefix).
    pub fn new(api_url: &str, token: Option<String>) -> Result<Client> {
        let bad = |reason: &str| Error::BadUrl {
            url: api_url.to_string(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(api_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("use http:// or https://"));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        // TCP_NODELAY: requests and stdin are small writes; Nagle's
        // algorithm would hold one behind an unacknowledged other.
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("den-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Http)?;
        Ok(Client { base, token, http })
    }

    /// The API URL as given (without the trailing slash added for joining).
    pub fn api_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Absolute URL of an API path such as `/v1/sprites`.
    pub fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| Error::BadUrl {
                url: path.to_string(),
                reason: e.to_string(),
            })
    }

    /// `ws://` / `wss://` form of an API path, for the WebSocket endpoints.
    pub fn ws_url(&self, path: &str) -> Result<Url> {
        let mut u = self.url(path)?;
        let scheme = if u.scheme() == "https" { "wss" } else { "ws" };
        // Both schemes are "special" in the URL standard, so the switch cannot fail.
        let _ = u.set_scheme(scheme);
        Ok(u)
    }

    /// A request with the bearer token; the escape hatch for endpoints
    /// this crate does not wrap yet.
    pub fn request(&self, method: Method, path: &str) -> Result<RequestBuilder> {
        self.request_url(method, self.url(path)?)
    }

    /// [`Client::request`] for a URL built by the caller (with a query, say).
    pub fn request_url(&self, method: Method, url: Url) -> Result<RequestBuilder> {
        let mut rb = self.http.request(method, url);
        if let Some(t) = &self.token {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| Error::BadUrl {
                url: self.api_url(),
                reason: "the token contains characters a header cannot carry".into(),
            })?;
            v.set_sensitive(true);
            rb = rb.header(AUTHORIZATION, v);
        }
        Ok(rb)
    }

    /// Send, and map transport failures and error statuses to [`Error`].
    /// `sprite` names the sprite the path is about, so its 404 says so.
    pub async fn send(&self, rb: RequestBuilder, sprite: Option<&str>) -> Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_from(resp, sprite).await)
    }

    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        sprite: Option<&str>,
    ) -> Result<T> {
        let resp = self.send(rb, sprite).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// A transport failure as this client's error (unreachable server, timeout, …).
    pub fn transport(&self, e: reqwest::Error) -> Error {
        if e.is_connect() || (e.is_timeout() && !e.is_body()) {
            Error::Unreachable {
                url: self.api_url(),
                source: e,
            }
        } else {
            Error::Http(e)
        }
    }
}

/// The API's error body is `{"error": code, "message": text}`; some
/// endpoints answer plain text, which then is the message.
async fn error_from(resp: Response, sprite: Option<&str>) -> Error {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    error_from_parts(status, &text, sprite)
}

/// [`error_from`] for an answer already read (a refused WebSocket upgrade).
pub(crate) fn error_from_parts(status: u16, text: &str, sprite: Option<&str>) -> Error {
    let (code, message) = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => (
            v.get("error").and_then(|c| c.as_str()).map(str::to_string),
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| text.trim().to_string()),
        ),
        Err(_) => (None, text.trim().to_string()),
    };
    match status {
        401 => Error::Unauthorized,
        // A 404 about the sprite itself, not about something inside it.
        404 if sprite.is_some() && message.starts_with("sprite not found") => {
            Error::SpriteNotFound(sprite.unwrap_or_default().to_string())
        }
        404 => Error::NotFound(if message.is_empty() {
            "not found".into()
        } else {
            message
        }),
        _ => Error::Api {
            status,
            code,
            message: if message.is_empty() {
                format!("HTTP {status}")
            } else {
                message
            },
        },
    }
}

/// One path segment, percent-encoded (names come from users).
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
