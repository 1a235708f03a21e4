//! Client errors in words that say what to do next.

use anyhow::anyhow;
use den_client::Error;

pub fn explain(e: Error) -> anyhow::Error {
    match e {
        Error::Unreachable { url, .. } | Error::WsUnreachable { url, .. } => {
            anyhow!("cannot reach den at {url} — is `den server` running?")
        }
        Error::Tls { url, reason } => anyhow!(
            "TLS with den at {url} failed: {reason} — if its certificate comes from a private CA, \
             pass --ca-cert FILE or set DEN_CA_CERT"
        ),
        Error::Unauthorized => anyhow!("the server rejected the token — run `den login`"),
        Error::SpriteNotFound(name) => anyhow!("sprite '{name}' not found — run `den ls`"),
        other => anyhow!(other),
    }
}

/// `.hint()?` turns a client error into one that tells the user what to do.
pub trait Hint<T> {
    fn hint(self) -> anyhow::Result<T>;
}

impl<T> Hint<T> for Result<T, Error> {
    fn hint(self) -> anyhow::Result<T> {
        self.map_err(explain)
    }
}
