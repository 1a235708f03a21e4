use thiserror::Error;

/// Everything the store can refuse or fail at. Variants are meant to be shown
/// to an operator or mapped to an API status, so each says what went wrong and
/// with which name.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("volume not found: {0}")]
    VolumeNotFound(String),
    #[error("volume already exists: {0}")]
    VolumeExists(String),
    #[error("checkpoint not found: {volume}/{checkpoint}")]
    CheckpointNotFound { volume: String, checkpoint: String },
    #[error("volume {0} is in use (mounted or open by another process)")]
    VolumeBusy(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("metadata error: {0}")]
    Meta(String),
    #[error("object store error: {0}")]
    ObjectStore(String),
    #[error("chunk {hash} is corrupt: {reason}")]
    CorruptChunk { hash: String, reason: String },
    /// Another node claimed the volume (or this node never held it): this
    /// process must not change it any more.
    #[error("volume {0} is owned by another node (fenced)")]
    Fenced(String),
    /// Cluster mode: part of the checkpoint exists only on the node that took
    /// it, which has not uploaded it (yet, or ever if that node is gone).
    #[error(
        "checkpoint {volume}/{checkpoint} is not durable: {chunks} of its chunks exist only on the node \
         that took it; retry once it reports durable (if that node is gone, they are lost)"
    )]
    NotDurable {
        volume: String,
        checkpoint: String,
        chunks: u64,
    },
    #[error("store is shutting down")]
    ShuttingDown,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Meta(e.to_string())
    }
}

impl From<object_store::Error> for StoreError {
    fn from(e: object_store::Error) -> Self {
        StoreError::ObjectStore(e.to_string())
    }
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io(io) => io,
            StoreError::InvalidArgument(_) => std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            other => std::io::Error::other(other),
        }
    }
}
