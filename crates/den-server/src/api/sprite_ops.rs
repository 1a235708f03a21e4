//! Restart and health check of one sprite (`client.restartSprite()`,
//! `client.checkSprite()` of the JS SDK).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use den_sprite::SpriteStatus;
use serde_json::{Value, json};

use crate::auth::SpriteRef;
use crate::error::ApiResult;
use crate::state::AppState;

/// How long the agent of a running sprite gets to answer a check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Stop the sprite's container and start it again: every process restarts
/// (services too), the disk is kept. A cold sprite is started. Answers once
/// the sprite runs again.
#[utoipa::path(post, path = "/v1/sprites/{name}/restart",
    responses((status = 200, description = "`{\"sprite_name\",\"machine_id\",\"message\"}`"),
        (status = 404), (status = 429), (status = 503)))]
pub async fn restart(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let info = st.mgr.restart(&name).await?;
    Ok(Json(json!({
        "sprite_name": info.record.short_name(),
        // den's name for the sprite's container, cgroup and volume.
        "machine_id": info.record.key,
        "message": "sprite restarted",
    })))
}

/// The sprite's health from a real probe of its agent. A cold or warm
/// sprite is not woken to be checked (that would defeat sleeping): its
/// status says so, with a reason.
#[utoipa::path(get, path = "/v1/sprites/{name}/check",
    responses((status = 200, description = "`{\"sprite_name\",\"sprite_id\",\"status\":\"healthy\"|\"unhealthy\"|\"warm\"|\"cold\"|\"running\",\"reason\"?,\"checked_at\",\"elapsed\"?}` (elapsed in ms)"),
        (status = 404)))]
pub async fn check(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let info = st.mgr.get(&name)?;
    let mut out = json!({
        "sprite_name": info.record.short_name(),
        "sprite_id": info.record.id,
    });
    let started = Instant::now();
    match st.mgr.running_agent(&name).await? {
        Some(agent) => {
            let probe = tokio::time::timeout(CHECK_TIMEOUT, agent.ping()).await;
            out["elapsed"] = json!(started.elapsed().as_secs_f64() * 1e3);
            match probe {
                Ok(Ok(())) => out["status"] = "healthy".into(),
                failed => {
                    // A sprite that went to sleep meanwhile is not unhealthy.
                    let now = st.mgr.get(&name)?.status;
                    if now != SpriteStatus::Running {
                        out["status"] = now.as_str().into();
                        out["reason"] = format!("the sprite went {} during the check", now.as_str()).into();
                    } else {
                        out["status"] = "unhealthy".into();
                        out["reason"] = match failed {
                            Err(_) => format!("the agent did not answer within {CHECK_TIMEOUT:?}"),
                            Ok(Err(e)) => format!("the agent did not answer: {e}"),
                            Ok(Ok(())) => unreachable!("handled above"),
                        }
                        .into();
                    }
                }
            }
        }
        None => {
            let status = st.mgr.get(&name)?.status;
            out["status"] = status.as_str().into();
            out["reason"] = match status {
                SpriteStatus::Cold => "the sprite is cold (stopped); it is not woken to be checked",
                SpriteStatus::Warm => "the sprite is warm (frozen); it is not woken to be checked",
                SpriteStatus::Running => "the sprite is busy (starting, stopping or taking a checkpoint)",
            }
            .into();
        }
    }
    out["checked_at"] = humantime::format_rfc3339_millis(std::time::SystemTime::now())
        .to_string()
        .into();
    Ok(Json(out))
}
