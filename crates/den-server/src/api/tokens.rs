//! Token management (den extension): `/v1/tokens`. A token mints tokens of
//! its own organisation only, never wider than itself: no higher role, no
//! sprite outside its own list, no later expiry.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Principal, Role, TokenInfo, TokenSpec};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::state::AppState;

/// Longest lifetime `expires_in` accepts: ten years.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(10 * 365 * 86_400);

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A label for the token (what it is for).
    pub name: Option<String>,
    /// Alias of `name` (the Sprites token API calls it so).
    pub description: Option<String>,
    /// Organisation; the caller's when absent. Only the server's
    /// administrator names another one.
    pub org: Option<String>,
    /// `admin`, `member` or `viewer`; the caller's own role when absent.
    pub role: Option<String>,
    /// Restrict the token to these sprites (names in its organisation).
    pub sprites: Option<Vec<String>>,
    /// Seconds (a number) or a duration (`"24h"`) until the token expires.
    #[schema(value_type = Option<String>)]
    pub expires_in: Option<Value>,
    /// Make another server administrator (server administrators only).
    pub server_admin: Option<bool>,
}

fn parse_expires_in(v: &Value) -> ApiResult<Duration> {
    let bad = || {
        ApiError::bad_request("expires_in must be a positive number of seconds or a duration like \"24h\"")
    };
    let d = match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|s| *s > 0.0 && s.is_finite())
            .map(Duration::from_secs_f64)
            .ok_or_else(bad)?,
        Value::String(s) => humantime::parse_duration(s).map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    if d.is_zero() || d > MAX_EXPIRES_IN {
        return Err(ApiError::bad_request(
            "expires_in must be between 1 second and 10 years",
        ));
    }
    Ok(d)
}

/// The token `caller` asks for, checked to be no wider than `caller`.
fn spec_of(st: &AppState, caller: &Principal, req: CreateTokenRequest) -> ApiResult<TokenSpec> {
    let name = req.name.or(req.description).unwrap_or_else(|| "token".into());
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must be 1-128 printable characters"));
    }
    let me = &caller.token;
    let org = match req.org {
        None => caller.org.clone(),
        Some(o) if o == caller.org => o,
        Some(o) if caller.is_server_admin() => {
            if st.tokens.org(&o).is_none() {
                return Err(ApiError::not_found(format!("organisation not found: {o}")));
            }
            o
        }
        Some(_) => {
            return Err(ApiError::forbidden(
                "a token mints tokens of its own organisation only",
            ));
        }
    };
    let role: Role = match req.role {
        None => me.role,
        Some(r) => r.parse().map_err(ApiError::bad_request)?,
    };
    if role > me.role {
        return Err(ApiError::forbidden(format!(
            "a {} token can't mint a {} token",
            me.role.as_str(),
            role.as_str()
        )));
    }
    let sprites = match (req.sprites, &me.sprites) {
        (Some(list), _) if list.len() > 1000 => {
            return Err(ApiError::bad_request("sprites lists at most 1000 names"));
        }
        (Some(list), mine) => {
            for n in &list {
                den_sprite::validate_name(n)?;
                if mine.as_ref().is_some_and(|m| !m.contains(n)) {
                    return Err(ApiError::forbidden(format!(
                        "this token does not reach sprite {n:?}, so it can't grant it"
                    )));
                }
            }
            Some(list)
        }
        // A restricted token's tokens are restricted the same way.
        (None, mine) => mine.clone(),
    };
    let expires_in = req.expires_in.as_ref().map(parse_expires_in).transpose()?;
    let mine = me
        .expires_at
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    let expires_at = match (expires_in.map(|d| SystemTime::now() + d), mine) {
        (Some(t), Some(m)) if t > m => {
            return Err(ApiError::forbidden(
                "a token can't outlive the token that mints it",
            ));
        }
        (Some(t), _) => Some(t),
        (None, m) => m,
    };
    let server_admin = req.server_admin.unwrap_or(false);
    if server_admin && !caller.is_server_admin() {
        return Err(ApiError::forbidden(
            "only a server administrator mints server administrators",
        ));
    }
    Ok(TokenSpec {
        name,
        org,
        role,
        sprites,
        expires_at,
        server_admin,
    })
}

/// Mint a token. Its secret is in this response only.
#[utoipa::path(post, path = "/v1/tokens", request_body = CreateTokenRequest,
    responses((status = 201), (status = 400), (status = 403)))]
pub async fn create(
    State(st): State<AppState>,
    caller: Principal,
    JsonBody(req): JsonBody<CreateTokenRequest>,
) -> ApiResult<Response> {
    let spec = spec_of(&st, &caller, req)?;
    let (info, secret) = st
        .tokens
        .create(&spec)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut v = serde_json::to_value(&info).map_err(|e| ApiError::internal(e.to_string()))?;
    v["token"] = secret.into();
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Whether `caller` may see and revoke token `t`: one of its organisation,
/// no wider than itself.
fn manages(caller: &Principal, t: &TokenInfo) -> bool {
    if caller.is_server_admin() {
        return true;
    }
    let me = &caller.token;
    let within = match (&t.sprites, &me.sprites) {
        (_, None) => true,
        (Some(theirs), Some(mine)) => theirs.iter().all(|n| mine.contains(n)),
        (None, Some(_)) => false,
    };
    t.org == me.org && !t.server_admin && t.role <= me.role && within
}

/// The organisation's tokens the caller manages (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", responses((status = 200)))]
pub async fn list(State(st): State<AppState>, caller: Principal) -> Json<Value> {
    let tokens: Vec<TokenInfo> = st
        .tokens
        .list()
        .into_iter()
        .filter(|t| t.org == caller.org && manages(&caller, t))
        .collect();
    Json(json!({"tokens": tokens, "count": tokens.len()}))
}

/// Revoke a token; requests with it fail from now on.
#[utoipa::path(delete, path = "/v1/tokens/{id}", responses((status = 204), (status = 404)))]
pub async fn revoke(
    State(st): State<AppState>,
    caller: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let not_found = || ApiError::not_found(format!("token not found: {id}"));
    // Tokens beyond the caller's reach are as absent as unknown ones.
    let t = st.tokens.get(&id).ok_or_else(not_found)?;
    if t.org != caller.org || !manages(&caller, &t) {
        return Err(not_found());
    }
    match st.tokens.revoke(&id).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(not_found()),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}
