//! The HTTP plumbing: URL building, the bearer header, and turning answers
//! into [`Error`]s the same way for every endpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, Url};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
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
    /// The rustls setup for `wss://` when a CA was added; `None`: the
    /// system's roots (tokio-tungstenite's own setup).
    ws_tls: Option<Arc<rustls::ClientConfig>>,
}

/// The system's trusted roots plus every certificate in `ca_file` (PEM),
/// for a den whose certificate comes from a private CA. One rustls setup
/// serves both HTTP and WebSockets, so both trust exactly the same.
fn tls_with_ca(ca_file: &Path) -> Result<rustls::ClientConfig> {
    let bad = |reason: String| Error::BadCaCert {
        path: ca_file.to_path_buf(),
        reason,
    };
    let extra = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| bad(e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if extra.is_empty() {
        return Err(bad("no CERTIFICATE block in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system roots are not fatal: the given CA may be all the
    // caller needs (a den on a private network).
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    for c in extra {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    // Named rather than the process default, so this config doesn't depend
    // on who installed what first.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Client {
    /// `api_url` like `http://127.0.0.1:8080` (a trailing path is kept as a prefix).
    pub fn new(api_url: &str, token: Option<String>) -> Result<Client> {
        Self::with_ca_cert(api_url, token, None)
    }

    /// [`Client::new`] that also trusts the CA certificates in `ca_file`
    /// (PEM) for an `https://` den, besides the system's roots.
    pub fn with_ca_cert(api_url: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<Client> {
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
        // reqwest is built without a crypto provider of its own (its default,
        // aws-lc-rs, is a large C build): without a CA file it takes the
        // process default, ring. An already installed default is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // TCP_NODELAY: requests and stdin are small writes; Nagle's
        // algorithm would hold one behind an unacknowledged other.
        let mut http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("den-cli/", env!("CARGO_PKG_VERSION")));
        let ws_tls = match ca_file {
            None => None,
            Some(f) => {
                let tls = tls_with_ca(f)?;
                http = http.tls_backend_preconfigured(tls.clone());
                Some(Arc::new(tls))
            }
        };
        let http = http.build().map_err(Error::Http)?;
        Ok(Client {
            base,
            token,
            http,
            ws_tls,
        })
    }

    /// The API URL as given (without the trailing slash added for joining).
    pub fn api_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The TLS setup for WebSockets (see the field).
    pub(crate) fn ws_connector(&self) -> Option<tokio_tungstenite::Connector> {
        self.ws_tls.clone().map(tokio_tungstenite::Connector::Rustls)
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
        if let Some(tls) = tls_failure(&e) {
            return Error::Tls {
                url: self.api_url(),
                reason: tls.to_string(),
            };
        }
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

/// The rustls error under a transport failure (an untrusted certificate,
/// a name mismatch), if that is what it was. `io::Error` hides its inner
/// error from `source()` (and hyper wraps one `io::Error` in another), so
/// those are opened by hand.
fn tls_failure<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        next = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner),
            None => err.source(),
        };
    }
    None
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
