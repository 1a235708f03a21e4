//! Client for den's Sprites-compatible API: the one library the `den` CLI
//! talks to the server through, so every command sees the same errors.
//!
//! [`Client`] holds the base URL and the bearer token. Resources live in
//! their own modules (sprites, checkpoints, policy, tokens); streaming
//! endpoints answer NDJSON, read line by line with [`NdjsonStream`].
//! WebSocket endpoints (exec, proxy) build on [`Client::ws_url`] and
//! [`Client::token`].

mod checkpoints;
mod client;
mod error;
mod exec;
mod fs;
mod ndjson;
mod nodes;
mod policy;
mod services;
mod sprites;
mod tokens;
pub mod types;

pub use client::Client;
pub use error::Error;
pub use exec::{ExecOptions, Session, SessionList, Ws};
pub use fs::{FS_HOME, FsEntry, FsListing};
pub use ndjson::NdjsonStream;
pub use nodes::{DrainReport, Node};
/// Re-exported so callers of [`Client::request`] use the same version.
pub use reqwest;
pub use services::{Service, ServiceSpec};
pub use tokio_tungstenite;
pub use types::*;

pub type Result<T, E = Error> = std::result::Result<T, E>;
