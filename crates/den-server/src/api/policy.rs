//! Network policy (§2.7): GET, and POST answering 204, with strict validation.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use den_net::NetworkPolicy;
use serde_json::{Value, json};

use crate::auth::SpriteRef;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

#[utoipa::path(get, path = "/v1/sprites/{name}/policy/network", responses((status = 200), (status = 404)))]
pub async fn get(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    Ok(Json(match st.mgr.policy(&name)? {
        Some(p) => serde_json::to_value(p).unwrap_or_else(|_| json!({"rules": []})),
        None => json!({"rules": []}),
    }))
}

/// Replace the egress policy; applied live to a running sprite.
#[utoipa::path(post, path = "/v1/sprites/{name}/policy/network",
    request_body(content = String, content_type = "application/json", description = "{\"rules\": [...]}"),
    responses((status = 204), (status = 400, description = "invalid policy config"), (status = 404)))]
pub async fn set(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    body: Bytes,
) -> ApiResult<StatusCode> {
    st.mgr.get(&name)?;
    let text = std::str::from_utf8(&body).map_err(|_| invalid())?;
    let policy = NetworkPolicy::from_json(text).map_err(|_| invalid())?;
    st.mgr.set_policy(&name, policy).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn invalid() -> ApiError {
    ApiError::bad_request("invalid policy config").plain()
}
