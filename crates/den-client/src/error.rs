//! What can go wrong talking to den, sorted so a caller can say what to do.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing answered at the API URL (refused, unresolvable, timed out connecting).
    #[error("cannot reach den at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// 401: the token is missing, wrong or revoked.
    #[error("the server rejected the token")]
    Unauthorized,
    /// 404 for a sprite.
    #[error("sprite '{0}' not found")]
    SpriteNotFound(String),
    /// 404 for anything else (a checkpoint, a token, an endpoint).
    #[error("{0}")]
    NotFound(String),
    /// Any other non-success answer, with the server's message.
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// A stream reported failure (an `error` line of NDJSON).
    #[error("{0}")]
    Stream(String),
    #[error("invalid API URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The TLS handshake with den failed: most often a certificate from a
    /// CA this client does not trust.
    #[error("TLS with den at {url} failed: {reason}")]
    Tls { url: String, reason: String },
    /// The CA certificate file (`--ca-cert`, `DEN_CA_CERT`) is unusable.
    #[error("CA certificate {path}: {reason}")]
    BadCaCert {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    #[error("talking to the server: {0}")]
    Http(#[source] reqwest::Error),
    /// Nothing answered when opening a WebSocket.
    #[error("cannot reach den at {url}: {source}")]
    WsUnreachable {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// A WebSocket failed after it was open (or its handshake went wrong).
    #[error("websocket: {0}")]
    Ws(String),
}

impl Error {
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Unauthorized => Some(401),
            Error::SpriteNotFound(_) | Error::NotFound(_) => Some(404),
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
