#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster database: {0}")]
    Db(String),
    #[error(transparent)]
    Store(#[from] den_store::StoreError),
    #[error(transparent)]
    Sprite(#[from] den_sprite::SpriteError),
    #[error("no live node in region {0:?} accepts sprites")]
    NoNodeInRegion(String),
    #[error("no live node accepts sprites")]
    NoNode,
    #[error("this node lost contact with the cluster database and serves no sprites until it is back")]
    Fenced,
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("invalid cluster setting: {0}")]
    Config(String),
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for ClusterError {
    fn from(e: tokio_postgres::Error) -> Self {
        ClusterError::Db(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for ClusterError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ClusterError::Db(e.to_string())
    }
}
