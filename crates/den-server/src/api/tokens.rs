//! Token management (den extension): `/v1/tokens`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A label for the token (what it is for).
    pub name: Option<String>,
    /// Alias of `name` (the Sprites token API calls it so).
    pub description: Option<String>,
}

/// Mint a token. Its secret is in this response only.
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateTokenRequest, responses((status = 201)))]
pub async fn create(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreateTokenRequest>,
) -> ApiResult<Response> {
    let name = req.name.or(req.description).unwrap_or_else(|| "token".into());
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must be 1-128 printable characters"));
    }
    let (info, secret) = st
        .tokens
        .create(&name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": info.id, "name": info.name, "created_at": info.created_at, "token": secret})),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200)))]
pub async fn list(State(st): State<AppState>) -> Json<Value> {
    let tokens = st.tokens.list();
    Json(json!({"tokens": tokens, "count": tokens.len()}))
}

/// Revoke a token; requests with it fail from now on.
#[utoipa::path(delete, path = "/v1/tokens/{id}", responses((status = 204), (status = 404)))]
pub async fn revoke(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    match st.tokens.revoke(&id).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::not_found(format!("token not found: {id}"))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}
