//! The node registry. Liveness is judged by PostgreSQL's own clock
//! (`now() - heartbeat_at`), so nodes never compare clocks with each other.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Serialize;

use crate::ClusterConfig;
use crate::error::Result;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cluster_nodes (
    name          TEXT PRIMARY KEY,
    region        TEXT NOT NULL,
    url           TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'active',
    started_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    awake         BIGINT NOT NULL DEFAULT 0,
    sprites       BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cluster_sprites (
    sprite        TEXT PRIMARY KEY,
    node          TEXT NOT NULL,
    status        TEXT NOT NULL,
    durable_at_ms BIGINT,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new sprites.
    Active,
    /// Putting its sprites to sleep and releasing them.
    Draining,
    /// Owns nothing and takes nothing; can be retired.
    Drained,
    /// Shut down cleanly.
    Left,
}

impl NodeState {
    fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
            NodeState::Left => "left",
        }
    }

    fn parse(s: &str) -> NodeState {
        match s {
            "draining" => NodeState::Draining,
            "drained" => NodeState::Drained,
            "left" => NodeState::Left,
            _ => NodeState::Active,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub region: String,
    pub url: String,
    pub state: NodeState,
    /// Heartbeat younger than the TTL (and not `left`).
    pub alive: bool,
    pub heartbeat_age_ms: i64,
    pub awake: i64,
    pub sprites: i64,
}

pub(crate) async fn init_schema(db: &Pool) -> Result<()> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    // Several nodes may start at once; CREATE TABLE IF NOT EXISTS is not
    // safe against itself without a lock.
    tx.execute("SELECT pg_advisory_xact_lock(7300001)", &[]).await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn register(db: &Pool, cfg: &ClusterConfig) -> Result<()> {
    let c = db.get().await?;
    c.execute(
        "INSERT INTO cluster_nodes (name, region, url, state, started_at, heartbeat_at)
         VALUES ($1, $2, $3, 'active', now(), now())
         ON CONFLICT (name) DO UPDATE SET region = $2, url = $3, state = 'active',
             started_at = now(), heartbeat_at = now()",
        &[&cfg.node, &cfg.region, &cfg.advertise_url],
    )
    .await?;
    Ok(())
}

/// Renew this node's heartbeat and publish its load. A node marked `left`
/// or `drained` stays so.
pub(crate) async fn heartbeat(db: &Pool, node: &str, awake: i64, sprites: i64) -> Result<()> {
    let c = db.get().await?;
    c.execute(
        "UPDATE cluster_nodes SET heartbeat_at = now(), awake = $2, sprites = $3 WHERE name = $1",
        &[&node, &awake, &sprites],
    )
    .await?;
    Ok(())
}

pub(crate) async fn set_state(db: &Pool, node: &str, state: NodeState) -> Result<()> {
    let c = db.get().await?;
    c.execute(
        "UPDATE cluster_nodes SET state = $2 WHERE name = $1",
        &[&node, &state.as_str()],
    )
    .await?;
    Ok(())
}

fn ttl_secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

pub(crate) async fn list(db: &Pool, ttl: Duration) -> Result<Vec<NodeInfo>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT name, region, url, state,
                    (state <> 'left' AND heartbeat_at > now() - make_interval(secs => $1)) AS alive,
                    (EXTRACT(EPOCH FROM (now() - heartbeat_at)) * 1000)::BIGINT,
                    awake, sprites
             FROM cluster_nodes ORDER BY name",
            &[&ttl_secs(ttl)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| NodeInfo {
            name: r.get(0),
            region: r.get(1),
            url: r.get(2),
            state: NodeState::parse(r.get::<_, &str>(3)),
            alive: r.get(4),
            heartbeat_age_ms: r.get(5),
            awake: r.get(6),
            sprites: r.get(7),
        })
        .collect())
}

pub(crate) async fn get(db: &Pool, name: &str, ttl: Duration) -> Result<Option<NodeInfo>> {
    Ok(list(db, ttl).await?.into_iter().find(|n| n.name == name))
}

/// Publish the status of this node's sprites (for listings on other nodes).
pub(crate) async fn publish_sprites(
    db: &Pool,
    node: &str,
    rows: &[(String, String, Option<i64>)],
) -> Result<()> {
    let mut c = db.get().await?;
    let tx = c.transaction().await?;
    for (sprite, status, durable_at) in rows {
        tx.execute(
            "INSERT INTO cluster_sprites (sprite, node, status, durable_at_ms, updated_at)
             VALUES ($1, $2, $3, $4, now())
             ON CONFLICT (sprite) DO UPDATE SET node = $2, status = $3, durable_at_ms = $4, updated_at = now()",
            &[sprite, &node, status, durable_at],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Where each sprite last ran and what its owner said about it.
#[derive(Clone, Debug, Serialize)]
pub struct SpritePlacement {
    pub node: String,
    pub region: String,
    pub status: String,
    pub durable_at_ms: Option<i64>,
    pub node_alive: bool,
}

pub(crate) async fn placements(db: &Pool, ttl: Duration) -> Result<Vec<(String, SpritePlacement)>> {
    let c = db.get().await?;
    let rows = c
        .query(
            "SELECT s.sprite, s.node, COALESCE(n.region, ''), s.status, s.durable_at_ms,
                    COALESCE(n.state <> 'left' AND n.heartbeat_at > now() - make_interval(secs => $1), false)
             FROM cluster_sprites s LEFT JOIN cluster_nodes n ON n.name = s.node",
            &[&ttl_secs(ttl)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                SpritePlacement {
                    node: r.get(1),
                    region: r.get(2),
                    status: r.get(3),
                    durable_at_ms: r.get(4),
                    node_alive: r.get(5),
                },
            )
        })
        .collect())
}

pub(crate) async fn forget_sprite(db: &Pool, sprite: &str) -> Result<()> {
    let c = db.get().await?;
    c.execute("DELETE FROM cluster_sprites WHERE sprite = $1", &[&sprite])
        .await?;
    Ok(())
}
