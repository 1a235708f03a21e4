//! `den server`: the Sprites-compatible HTTP and WebSocket API.
//!
//! A request goes: [`auth`] (bearer token, organisation, the route's rule;
//! the audit log) → [`api`] (one module per resource: sprites, exec,
//! checkpoints, services, policy, fs, proxy, tokens, orgs) → the sprite
//! manager (`den-sprite`), which wakes the sprite and hands out its agent.
//! Sprite URLs (`http://<name>-<org>.<domain>:<port>/`) are routed by
//! `Host` header before the API. [`server`] starts and stops it
//! all; [`config`] reads defaults, a TOML file and `DEN_*` variables.

pub mod api;
pub mod audit;
pub mod auth;
mod backends;
mod body_splice;
pub mod cluster_api;
pub mod config;
pub mod conn_socket;
pub mod console;
pub mod error;
mod extract;
pub mod forward;
pub mod limits;
pub mod listener;
pub mod mcp;
pub mod metrics;
pub mod server;
mod splice;
pub mod sprite_json;
pub mod state;
pub mod tls;
mod upstream;
mod upstream_pool;
pub mod url_proxy;

pub use config::ServerConfig;
pub use server::{Running, ServerError, start};
