//! Organisations (den extension): `/v1/orgs` for the server's
//! administrator, `GET /v1/organization` for any token (its own), and the
//! audit log of an organisation.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use den_sprite::SpriteStatus;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Org, OrgLimits, Principal};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    /// 1-32 characters of a-z and 0-9: in sprite URLs (`<name>-<slug>`).
    pub slug: String,
    /// Display name; the slug when absent.
    pub name: Option<String>,
    #[serde(default)]
    pub limits: OrgLimits,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrgRequest {
    pub name: Option<String>,
    /// Replaces every limit.
    pub limits: Option<OrgLimits>,
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must be 1-128 printable characters"));
    }
    Ok(())
}

fn check_limits(l: &OrgLimits) -> ApiResult<()> {
    if let Some(rate) = &l.create_rate {
        rate.parse::<crate::config::RateLimit>()
            .map_err(|e| ApiError::bad_request(format!("limits.create_rate: {e}")))?;
    }
    if l.max_cpus.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return Err(ApiError::bad_request("limits.max_cpus must be a positive number"));
    }
    Ok(())
}

/// An organisation as the API shows it: with its sprites counted, and its
/// usage of the quotas next to its limits (`usage`; `disk_bytes` is at most
/// [`crate::limits::DISK_USAGE_TTL`] old, `null` if it can't be counted).
pub async fn org_json(st: &AppState, org: &Org) -> Value {
    let (mut running, mut warm, mut cold) = (0, 0, 0);
    let (mut memory, mut cpus) = (0u64, 0f64);
    let host = st.mgr.config().host;
    for s in st.mgr.list().iter().filter(|s| s.record.org() == org.slug) {
        match s.status {
            SpriteStatus::Running => running += 1,
            SpriteStatus::Warm => warm += 1,
            SpriteStatus::Cold => cold += 1,
        }
        if s.status != SpriteStatus::Cold {
            let (m, c) = crate::limits::footprint(&s.record.resources, &host);
            memory = memory.saturating_add(m);
            cpus += c;
        }
    }
    let disk_bytes = st.quotas.disk_bytes(&st.mgr, &org.slug).await.ok();
    json!({
        "id": org.slug,
        "slug": org.slug,
        "name": org.name,
        "created_at": org.created_at,
        "limits": org.limits,
        "sprites": running + warm + cold,
        "running": running,
        "warm": warm,
        "cold": cold,
        "usage": {
            "sprites": running + warm + cold,
            "awake": running + warm,
            "memory_mb": memory >> 20,
            "cpus": cpus,
            "disk_bytes": disk_bytes,
        },
    })
}

fn org_of(st: &AppState, slug: &str) -> ApiResult<Org> {
    st.tokens
        .org(slug)
        .ok_or_else(|| ApiError::not_found(format!("organisation not found: {slug}")))
}

fn internal(e: crate::auth::TokenError) -> ApiError {
    ApiError::internal_logged("the organisation database", &e)
}

/// The caller's organisation: counts and limits.
#[utoipa::path(get, path = "/v1/organization", responses((status = 200)))]
pub async fn current(State(st): State<AppState>, caller: Principal) -> ApiResult<Json<Value>> {
    Ok(Json(org_json(&st, &org_of(&st, &caller.org)?).await))
}

#[utoipa::path(post, path = "/v1/orgs", request_body = CreateOrgRequest,
    responses((status = 201), (status = 400), (status = 409)))]
pub async fn create(
    State(st): State<AppState>,
    JsonBody(req): JsonBody<CreateOrgRequest>,
) -> ApiResult<Response> {
    den_sprite::validate_org(&req.slug)?;
    // A default-organisation sprite named `<x>-<slug>` owns the URL label the
    // new organisation's sprite `<x>` would get.
    if st.cluster.is_some() {
        st.mgr.refresh_all().await?;
    }
    let suffix = format!("-{}", req.slug);
    if let Some(s) = st
        .mgr
        .list()
        .iter()
        .find(|s| s.record.org() == den_sprite::DEFAULT_ORG && s.record.short_name().ends_with(&suffix))
    {
        return Err(ApiError::conflict(format!(
            "sprite {:?} of the default organisation ends in {suffix}, the URL form of the new organisation's sprites; choose another slug",
            s.record.short_name()
        )));
    }
    let name = req.name.unwrap_or_else(|| req.slug.clone());
    check_name(&name)?;
    check_limits(&req.limits)?;
    let org = Org {
        slug: req.slug,
        name,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        limits: req.limits,
    };
    if !st.tokens.create_org(&org).await.map_err(internal)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("organisation {:?} already exists", org.slug),
        ));
    }
    Ok((StatusCode::CREATED, Json(org_json(&st, &org).await)).into_response())
}

#[utoipa::path(get, path = "/v1/orgs", responses((status = 200)))]
pub async fn list(State(st): State<AppState>) -> Json<Value> {
    let mut orgs: Vec<Value> = Vec::new();
    for o in st.tokens.orgs() {
        orgs.push(org_json(&st, &o).await);
    }
    Json(json!({"orgs": orgs, "count": orgs.len()}))
}

#[utoipa::path(get, path = "/v1/orgs/{org}", responses((status = 200), (status = 404)))]
pub async fn get(State(st): State<AppState>, Path(slug): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(org_json(&st, &org_of(&st, &slug)?).await))
}

#[utoipa::path(put, path = "/v1/orgs/{org}", request_body = UpdateOrgRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn update(
    State(st): State<AppState>,
    Path(slug): Path<String>,
    JsonBody(req): JsonBody<UpdateOrgRequest>,
) -> ApiResult<Json<Value>> {
    let mut org = org_of(&st, &slug)?;
    if let Some(name) = req.name {
        check_name(&name)?;
        org.name = name;
    }
    if let Some(limits) = req.limits {
        check_limits(&limits)?;
        org.limits = limits;
    }
    if !st.tokens.update_org(&org).await.map_err(internal)? {
        return Err(ApiError::not_found(format!("organisation not found: {slug}")));
    }
    Ok(Json(org_json(&st, &org).await))
}

/// Delete an organisation that has no sprites left, with all its tokens.
#[utoipa::path(delete, path = "/v1/orgs/{org}", responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(State(st): State<AppState>, Path(slug): Path<String>) -> ApiResult<StatusCode> {
    org_of(&st, &slug)?;
    if slug == den_sprite::DEFAULT_ORG {
        return Err(ApiError::conflict("the default organisation can't be deleted"));
    }
    if st.cluster.is_some() {
        st.mgr.refresh_all().await?;
    }
    let left = st.mgr.list().iter().filter(|s| s.record.org() == slug).count();
    if left > 0 {
        return Err(ApiError::conflict(format!(
            "organisation {slug:?} still has {left} sprites; delete them first"
        )));
    }
    if !st.tokens.delete_org(&slug).await.map_err(internal)? {
        return Err(ApiError::not_found(format!("organisation not found: {slug}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// At most this many entries, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// The organisation's recent state-changing requests, newest first.
#[utoipa::path(get, path = "/v1/orgs/{org}/audit", params(AuditQuery), responses((status = 200), (status = 404)))]
pub async fn audit(
    State(st): State<AppState>,
    Path(slug): Path<String>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    org_of(&st, &slug)?;
    let entries = st.audit.recent(&slug, q.limit.unwrap_or(100).min(1000));
    Ok(Json(json!({"entries": entries, "count": entries.len()})))
}
