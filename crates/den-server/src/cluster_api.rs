//! Cluster mode in the API: the router that sends each sprite's requests to
//! its owner node, and the node endpoints (den extension):
//!
//! * `GET /v1/nodes` — every node with region, state, liveness and load.
//! * `POST /v1/nodes/{name}/drain` — that node puts its sprites to sleep,
//!   flushes and releases them (sent on to the node if it is another one).

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use den_cluster::{Cluster, ClusterError, Location};
use serde_json::json;

use crate::error::ApiError;
use crate::forward::{Route, RouteError, Router, is_forwarded};
use crate::state::AppState;

/// [`Router`] over the cluster's ownership leases.
pub struct ClusterRouter(pub Cluster);

fn route(l: Location) -> Route {
    match l {
        Location::Local => Route::Local,
        Location::Remote { node, url } => Route::Remote { node, base_url: url },
    }
}

fn route_error(e: ClusterError) -> RouteError {
    match e {
        ClusterError::NoNodeInRegion(r) => RouteError::NoNodeInRegion(Some(r)),
        ClusterError::NoNode => RouteError::NoNodeInRegion(None),
        other => RouteError::Internal(other.to_string()),
    }
}

#[async_trait::async_trait]
impl Router for ClusterRouter {
    fn node_name(&self) -> &str {
        self.0.node()
    }

    fn peer_key(&self) -> &den_cluster::PeerKey {
        self.0.peer_key()
    }

    async fn route_sprite(&self, name: &str) -> Result<Route, RouteError> {
        self.0.locate(name).await.map(route).map_err(route_error)
    }

    async fn route_create(&self, region: Option<&str>) -> Result<Route, RouteError> {
        self.0.place(region).await.map(route).map_err(route_error)
    }

    fn invalidate(&self, name: &str) {
        self.0.forget_route(name);
    }
}

fn cluster(state: &AppState) -> Result<&Cluster, ApiError> {
    state.cluster.as_ref().ok_or_else(|| {
        ApiError::not_found("this den server is not part of a cluster (start it with --cluster-db)")
    })
}

fn cluster_error(e: ClusterError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "cluster_unavailable",
        e.to_string(),
    )
}

pub async fn list_nodes(State(state): State<AppState>) -> Result<Response, ApiError> {
    let nodes = cluster(&state)?.nodes().await.map_err(cluster_error)?;
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

pub async fn drain_node(
    State(state): State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let c = cluster(&state)?;
    if name == c.node() {
        let report = c.drain().await.map_err(cluster_error)?;
        return Ok(Json(report).into_response());
    }
    if is_forwarded(req.headers()) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node_moved",
            format!("node {name} is not this node"),
        ));
    }
    let nodes = c.nodes().await.map_err(cluster_error)?;
    let Some(node) = nodes.into_iter().find(|n| n.name == name) else {
        return Err(ApiError::not_found(format!("no node named {name}")));
    };
    if !node.alive {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "node_down",
            format!("node {name} is not alive; its sprites move on their next request"),
        ));
    }
    let Some(router) = state.router.as_deref() else {
        return Err(ApiError::internal("cluster mode without a router"));
    };
    // Sent on like any other forwarded request (same token).
    Ok(crate::forward::to_node(router, state.shutdown.clone(), &node.url, req).await)
}

/// Where a sprite runs and how much of it is durable (den extension fields
/// `node`, `region`, `durability` of the sprite object, in cluster mode).
pub struct Placement {
    pub node: Option<String>,
    pub region: Option<String>,
    pub status: Option<den_sprite::SpriteStatus>,
    pub fully_durable: bool,
    pub durable_at_ms: Option<i64>,
}

impl Placement {
    pub fn apply(&self, v: &mut serde_json::Value, window: std::time::Duration) {
        v["node"] = self.node.clone().into();
        v["region"] = self.region.clone().into();
        if let Some(s) = self.status {
            v["status"] = s.as_str().into();
        }
        v["durability"] = json!({
            "window_seconds": window.as_secs(),
            "fully_durable": self.fully_durable,
            "durable_at_ms": self.durable_at_ms,
            "durable_at": self.durable_at_ms.map(crate::sprite_json::rfc3339_ms),
        });
    }
}

fn parse_status(s: &str) -> Option<den_sprite::SpriteStatus> {
    use den_sprite::SpriteStatus::*;
    match s {
        "running" => Some(Running),
        "warm" => Some(Warm),
        "cold" => Some(Cold),
        _ => None,
    }
}

/// The placement of a sprite served by this node (its owner).
pub async fn local_placement(c: &Cluster, info: &den_sprite::SpriteInfo) -> Placement {
    let (fully_durable, durable_at_ms) = c.durability(info).await;
    Placement {
        node: Some(c.node().to_string()),
        region: Some(c.region().to_string()),
        status: None,
        fully_durable,
        durable_at_ms,
    }
}

/// Placements of every sprite for a listing: this node's own awake sprites
/// from memory, the others as their owners last published them.
pub async fn placements(
    c: &Cluster,
    infos: &[den_sprite::SpriteInfo],
) -> Result<std::collections::HashMap<String, Placement>, ApiError> {
    let published = c.placements().await.map_err(cluster_error)?;
    let nodes = c.nodes().await.map_err(cluster_error)?;
    let mut out = std::collections::HashMap::new();
    for info in infos {
        let name = &info.record.name;
        let p = if info.status != den_sprite::SpriteStatus::Cold {
            local_placement(c, info).await
        } else if let Some(p) = published.get(name).filter(|p| p.node_alive) {
            Placement {
                node: Some(p.node.clone()),
                region: Some(p.region.clone()),
                status: parse_status(&p.status),
                fully_durable: p.status == "cold",
                durable_at_ms: p.durable_at_ms,
            }
        } else if let Some(n) = lease_holder(c, &nodes, &info.record.volume).await {
            // Owned but not published yet (the owner publishes with its
            // next heartbeat): the lease is the truth.
            Placement {
                node: Some(n.name.clone()),
                region: Some(n.region.clone()),
                status: None,
                fully_durable: false,
                durable_at_ms: None,
            }
        } else {
            Placement {
                node: None,
                region: crate::sprite_json::primary_region(info),
                status: None,
                fully_durable: true,
                durable_at_ms: None,
            }
        };
        out.insert(name.clone(), p);
    }
    Ok(out)
}

/// The live node holding the lease on `volume`, if any.
async fn lease_holder<'a>(
    c: &Cluster,
    nodes: &'a [den_cluster::NodeInfo],
    volume: &str,
) -> Option<&'a den_cluster::NodeInfo> {
    let owner = c.store().owner(volume).await.ok()?.node?;
    nodes.iter().find(|n| n.name == owner && n.alive)
}
