//! Errors of the sprite manager. Variants map one to one onto API statuses
//! (not found → 404, exists → 409, invalid → 400, busy → 409, the rest 500).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SpriteError {
    #[error("sprite not found: {0}")]
    NotFound(String),
    #[error("a sprite named {0:?} already exists")]
    Exists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The request conflicts with the sprite's state (e.g. deleting the active checkpoint).
    #[error("{0}")]
    Conflict(String),
    #[error("checkpoint not found: {sprite}/{checkpoint}")]
    CheckpointNotFound { sprite: String, checkpoint: String },
    #[error("service {service:?} not found in sprite {sprite}")]
    ServiceNotFound { sprite: String, service: String },
    #[error("sprite {sprite} did not become ready within {after:?}: {detail}")]
    BootTimeout {
        sprite: String,
        after: Duration,
        detail: String,
    },
    #[error("sprite {sprite} failed to start: {detail}")]
    BootFailed { sprite: String, detail: String },
    /// Waking one more sprite would exceed the configured limit.
    #[error("{awake} sprites are awake, the limit is {limit}")]
    AwakeLimit { awake: usize, limit: usize },
    /// The admission hook refused a wake (a quota of the sprite's
    /// organisation); `limit` and `current` are in the quota's unit.
    #[error("{message}")]
    Quota {
        message: String,
        limit: u64,
        current: u64,
    },
    #[error("the sprite manager is shutting down")]
    ShuttingDown,
    /// Cluster mode: this node does not hold the sprite's lease (another
    /// node claimed it, or this node just gave it up).
    #[error("sprite {0} is owned by another node")]
    NotOwner(String),
    #[error("storage: {0}")]
    Store(#[from] den_store::StoreError),
    #[error("block device: {0}")]
    Block(#[from] den_block::BlockError),
    #[error("runtime: {0}")]
    Runtime(#[from] den_runtime::RuntimeError),
    #[error("image: {0}")]
    Image(#[from] den_runtime::image::ImageError),
    #[error("network: {0}")]
    Net(#[from] den_net::NetError),
    #[error("agent: {0}")]
    Agent(#[from] den_agent::Error),
    #[error("catalog: {0}")]
    Catalog(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SpriteError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SpriteError::Io {
            context: context.into(),
            source,
        }
    }

    /// A task running blocking work died (it panicked); never take the server down for it.
    pub(crate) fn join(e: tokio::task::JoinError) -> Self {
        SpriteError::io("background task", std::io::Error::other(e))
    }
}

impl From<rusqlite::Error> for SpriteError {
    fn from(e: rusqlite::Error) -> Self {
        SpriteError::Catalog(e.to_string())
    }
}

pub type Result<T, E = SpriteError> = std::result::Result<T, E>;
