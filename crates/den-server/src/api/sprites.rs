//! Sprites CRUD (§2.3) and fork (den extension).

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use den_runtime::{CpuLimit, Resources, Runtime};
use den_sprite::{CreateSprite, HostCapacity, SpriteStatus};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::{Principal, SpriteRef};
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::forward::Route;
use crate::sprite_json::{default_url_settings, sprite_json};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateSpriteRequest {
    pub name: Option<String>,
    pub url_settings: Option<Value>,
    pub labels: Option<Vec<String>>,
    pub config: Option<Value>,
    pub environment: Option<Map<String, Value>>,
    /// Accepted for compatibility; creation never waits for capacity.
    #[serde(default)]
    pub wait_for_capacity: Option<bool>,
    #[serde(default)]
    pub runtime: Option<String>,
}

fn check_url_settings(v: &Value) -> ApiResult<Value> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request("url_settings must be an object"))?;
    let mut out = default_url_settings();
    if let Some(auth) = obj.get("auth") {
        match auth.as_str() {
            Some("sprite") | Some("public") => out["auth"] = auth.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "url_settings.auth must be \"sprite\" or \"public\"",
                ));
            }
        }
    }
    if let Some(p) = obj.get("private_access") {
        out["private_access"] = p.clone();
    }
    Ok(out)
}

fn check_labels(labels: &[String]) -> ApiResult<()> {
    if labels.len() > 64 {
        return Err(ApiError::bad_request("at most 64 labels"));
    }
    for l in labels {
        if l.is_empty() || l.len() > 128 || l.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!("invalid label {l:?}")));
        }
    }
    Ok(())
}

/// `config.ram_mb` / `config.cpus` become the sprite's cgroup limits,
/// within what the host has (`host`).
fn resources_from(config: &Value, default: Resources, host: &HostCapacity) -> ApiResult<Resources> {
    let mut r = default;
    let num = |k: &str| -> ApiResult<Option<f64>> {
        match config.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| *x > 0.0)
                .map(Some)
                .ok_or_else(|| ApiError::bad_request(format!("config.{k} must be a positive number"))),
        }
    };
    if let Some(mb) = num("ram_mb")? {
        r.memory_bytes = Some(host.check_ram_mb(mb)?);
    }
    if let Some(cpus) = num("cpus")? {
        let cpus = host.check_cpus(cpus)?;
        r.cpu = CpuLimit {
            shares: Some(((1024.0 * cpus) as u64).clamp(2, 262_144)),
            quota_us: Some((100_000.0 * cpus) as i64),
            period_us: Some(100_000),
        };
    }
    Ok(r)
}

/// Create a sprite (cold). In a cluster, the router places it (by
/// `config.region`) and a create placed on another node is forwarded there.
#[utoipa::path(post, path = "/v1/sprites", request_body = CreateSpriteRequest,
    responses((status = 201, description = "The new sprite"), (status = 400), (status = 409)))]
pub async fn create(
    State(st): State<AppState>,
    caller: Principal,
    uri: Uri,
    headers: HeaderMap,
    JsonBody(raw): JsonBody<Value>,
) -> ApiResult<Response> {
    if raw
        .get("wait_for_capacity")
        .is_some_and(|w| !w.is_boolean() && !w.is_null())
    {
        // The reference's own example of the list form.
        return Err(ApiError::validation("invalid wait_for_capacity parameter"));
    }
    let req = CreateSpriteRequest::deserialize(&raw)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let name = req
        .name
        .ok_or_else(|| ApiError::bad_request("name is required"))?;
    let name = new_sprite_key(&st, &caller, &name)?;
    let router = st
        .router
        .clone()
        .filter(|_| !crate::forward::is_forwarded(&headers));
    let checked = match router {
        // Placed first, so the limits that count are the serving node's.
        Some(router) => {
            let checked = check_create(&st, req.url_settings, req.labels, req.config, req.environment)?;
            let region = checked.config.get("region").and_then(Value::as_str);
            match router.route_create(region).await {
                Ok(Route::Local) => {}
                Ok(Route::Remote { base_url, .. }) => {
                    let body = serde_json::to_vec(&raw)
                        .map_err(|e| ApiError::internal(format!("encoding the body: {e}")))?;
                    let fwd = crate::forward::create(&*router, region, &base_url, uri, headers, body.into());
                    if let Some(resp) = fwd.await {
                        return Ok(resp);
                    }
                }
                Err(e) => return Ok(e.into_response()),
            }
            checked
        }
        None => check_create(&st, req.url_settings, req.labels, req.config, req.environment)?,
    };
    let _creating = check_limits(&st, &caller.org).await?;
    let CheckedCreate {
        url_settings,
        labels,
        config,
        resources,
        environment,
        runtime,
    } = checked;
    let attrs = json!({
        "url_settings": url_settings,
        "labels": labels,
        "config": config,
        "environment": environment,
    });
    let info = st
        .mgr
        .create(
            &name,
            CreateSprite {
                attrs,
                resources: Some(resources),
                policy: None,
                runtime,
            },
        )
        .await?;
    st.quotas.forget_disk(&caller.org);
    Ok((StatusCode::CREATED, Json(sprite_json(&st.cfg, &info))).into_response())
}

/// The key of a sprite the caller wants to make under `name`: a valid name,
/// one its token may reach, whose URL label fits in a DNS label.
fn new_sprite_key(st: &AppState, caller: &Principal, name: &str) -> ApiResult<String> {
    den_sprite::validate_name(name)?;
    if !caller.reaches(name) {
        return Err(ApiError::forbidden(format!(
            "this token reaches only the sprites it lists, and {name:?} is not one of them"
        )));
    }
    let key = caller.key(name).expect("a valid name makes a key");
    if crate::config::url_label(&key).len() > 63 {
        return Err(ApiError::bad_request(format!(
            "sprite name {name:?} is too long for organisation {:?}: <name>-<org> must fit in 63 characters",
            caller.org
        )));
    }
    // `<name>-<org>` is another organisation's URL form: in the default
    // organisation, `web-acme` would be answered by acme's `web`.
    if let Some((_, suffix)) = name.rsplit_once('-')
        && caller.org == den_sprite::DEFAULT_ORG
        && st.tokens.org(suffix).is_some()
    {
        return Err(ApiError::conflict(format!(
            "sprite name {name:?} ends in -{suffix}, the URL form of organisation {suffix:?}'s sprites; choose another name"
        )));
    }
    Ok(key)
}

/// Whether `org` may have one more sprite: the server's `max_sprites` and
/// `create_rate`, then the organisation's own limits. While a sprite count
/// applies, the returned guard must be held until the new sprite exists.
async fn check_limits<'a>(st: &'a AppState, org: &str) -> ApiResult<Option<tokio::sync::MutexGuard<'a, ()>>> {
    use crate::limits::Limited;
    let limits = st.tokens.org(org).map(|o| o.limits).unwrap_or_default();
    let counted = st.cfg.max_sprites.is_some() || limits.max_sprites.is_some();
    let guard = match counted {
        true => Some(st.quotas.creating.lock().await),
        false => None,
    };
    let sprites = st.mgr.list();
    if let Some(limit) = st.cfg.max_sprites
        && sprites.len() >= limit
    {
        return Err(ApiError::limited(Limited::total(sprites.len(), limit)));
    }
    if let Some(limit) = limits.max_sprites {
        let count = sprites.iter().filter(|s| s.record.org() == org).count();
        if count >= limit {
            return Err(ApiError::limited(Limited::org_total(org, count, limit)));
        }
    }
    st.quotas.check_disk(&st.mgr, org, limits.max_disk_bytes).await?;
    st.quotas
        .admit_create(org, limits.create_rate.as_deref())
        .map_err(ApiError::limited)?;
    st.create_limiter.admit().map_err(ApiError::limited)?;
    Ok(guard)
}

/// A create request's settings, checked.
struct CheckedCreate {
    url_settings: Value,
    labels: Vec<String>,
    config: Value,
    resources: Resources,
    environment: Map<String, Value>,
    runtime: Option<Runtime>,
}

fn check_create(
    st: &AppState,
    url_settings: Option<Value>,
    labels: Option<Vec<String>>,
    config: Option<Value>,
    environment: Option<Map<String, Value>>,
) -> ApiResult<CheckedCreate> {
    let url_settings = match &url_settings {
        Some(v) => check_url_settings(v)?,
        None => default_url_settings(),
    };
    let labels = labels.unwrap_or_default();
    check_labels(&labels)?;
    let config = config.unwrap_or_else(|| json!({}));
    if !config.is_object() {
        return Err(ApiError::bad_request("config must be an object"));
    }
    let resources = resources_from(&config, st.mgr.config().resources, &st.mgr.config().host)?;
    // den extension: the isolation engine, the server's default if absent.
    let runtime = match config.get("runtime") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(|s| s.parse::<Runtime>().ok())
                .ok_or_else(|| ApiError::bad_request("config.runtime must be \"native\" or \"gvisor\""))?,
        ),
    };
    let environment = environment.unwrap_or_default();
    if let Some((k, _)) = environment.iter().find(|(_, v)| !v.is_string()) {
        return Err(ApiError::bad_request(format!("environment.{k} must be a string")));
    }
    Ok(CheckedCreate {
        url_settings,
        labels,
        config,
        resources,
        environment,
        runtime,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    pub prefix: Option<String>,
    pub max_results: Option<String>,
    pub continuation_token: Option<String>,
}

/// List sprites, by name, a page at a time. With `Accept:
/// application/x-ndjson`, a live stream of their states instead (see
/// [`crate::api::sprite_watch`]).
#[utoipa::path(get, path = "/v1/sprites", params(ListQuery), responses((status = 200),
    (status = 200, content_type = "application/x-ndjson",
        description = "With `Accept: application/x-ndjson`: a `sprite` line per sprite, then one per change, and `heartbeat` lines")))]
pub async fn list(
    State(st): State<AppState>,
    caller: Principal,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if crate::api::sprite_watch::wanted(&headers) {
        return Ok(crate::api::sprite_watch::stream(st, caller, q.prefix));
    }
    let max = match q.max_results.as_deref() {
        None | Some("") => 50,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| ApiError::bad_request("max_results must be a positive integer"))?
            .min(100),
    };
    if st.cluster.is_some() {
        // Other nodes create and delete sprites too.
        st.mgr.refresh_all().await?;
    }
    let mut all = st.mgr.list();
    all.retain(|s| caller.sees(&s.record.name));
    let placements = match &st.cluster {
        Some(c) => Some(crate::cluster_api::placements(c, &all).await?),
        None => None,
    };
    if let Some(p) = &placements {
        for s in &mut all {
            if let Some(status) = p.get(&s.record.name).and_then(|p| p.status) {
                s.status = status;
            }
        }
    }
    let (mut running, mut warm, mut cold) = (0, 0, 0);
    for s in &all {
        match s.status {
            SpriteStatus::Running => running += 1,
            SpriteStatus::Warm => warm += 1,
            SpriteStatus::Cold => cold += 1,
        }
    }
    let prefix = q.prefix.unwrap_or_default();
    let after = q.continuation_token.unwrap_or_default();
    let mut page: Vec<Value> = Vec::new();
    let mut has_more = false;
    let mut last = None;
    // Pages go by the names the caller knows, in their order.
    all.sort_by(|a, b| a.record.short_name().cmp(b.record.short_name()));
    for s in all
        .iter()
        .filter(|s| s.record.short_name().starts_with(&prefix) && s.record.short_name() > after.as_str())
    {
        if page.len() == max {
            has_more = true;
            break;
        }
        last = Some(s.record.short_name().to_string());
        let mut v = sprite_json(&st.cfg, s);
        if let Some(p) = placements.as_ref().and_then(|p| p.get(&s.record.name)) {
            p.apply(&mut v, st.cfg.durability_window);
        }
        page.push(v);
    }
    Ok(Json(json!({
        "sprites": page,
        "has_more": has_more,
        "next_continuation_token": if has_more { last } else { None },
        "running": running,
        "warm": warm,
        "cold": cold,
        "org": {
            "name": caller.org,
            "running": running,
            "warm": warm,
            "cold": cold,
            "running_limit": Value::Null,
            "warm_limit": Value::Null,
        },
    }))
    .into_response())
}

#[utoipa::path(get, path = "/v1/sprites/{name}", responses((status = 200), (status = 404)))]
pub async fn get(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let info = st.mgr.get(&name)?;
    let mut v = sprite_json(&st.cfg, &info);
    // In a cluster this runs on the sprite's owner (the request was routed here).
    if let Some(c) = &st.cluster {
        crate::cluster_api::local_placement(c, &info)
            .await
            .apply(&mut v, st.cfg.durability_window);
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UpdateSpriteRequest {
    pub url_settings: Option<Value>,
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub clear_labels: Option<bool>,
}

/// Partial update: url settings and labels.
#[utoipa::path(put, path = "/v1/sprites/{name}", request_body = UpdateSpriteRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn update(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(req): JsonBody<UpdateSpriteRequest>,
) -> ApiResult<Json<Value>> {
    let url = req.url_settings.as_ref().map(check_url_settings).transpose()?;
    if let Some(l) = &req.labels {
        check_labels(l)?;
    }
    let info = st
        .mgr
        .update_attrs(&name, |attrs| {
            if !attrs.is_object() {
                *attrs = json!({});
            }
            if let Some(u) = url {
                let merged = match attrs.get("url_settings") {
                    Some(Value::Object(old)) => {
                        let mut m = old.clone();
                        if let Value::Object(new) = u {
                            m.extend(new);
                        }
                        Value::Object(m)
                    }
                    _ => u,
                };
                attrs["url_settings"] = merged;
            }
            if req.clear_labels == Some(true) {
                attrs["labels"] = json!([]);
            }
            if let Some(l) = req.labels {
                attrs["labels"] = json!(l);
            }
        })
        .await?;
    Ok(Json(sprite_json(&st.cfg, &info)))
}

/// Destroy a sprite with its disk and checkpoints.
#[utoipa::path(delete, path = "/v1/sprites/{name}", responses((status = 204), (status = 404)))]
pub async fn delete(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<StatusCode> {
    st.mgr.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Accepted for compatibility: a sprite keeps the image it was created on.
#[utoipa::path(post, path = "/v1/sprites/{name}/upgrade", responses((status = 204), (status = 404)))]
pub async fn upgrade(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<StatusCode> {
    st.mgr.get(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// Name of the new sprite.
    pub name: String,
    /// Checkpoint of the source (`v3`); the live state when absent.
    pub checkpoint: Option<String>,
}

/// den extension: a new sprite from a checkpoint of this one, or from its
/// live state (frozen for the instant it takes).
#[utoipa::path(post, path = "/v1/sprites/{name}/fork", request_body = ForkRequest,
    responses((status = 201), (status = 400), (status = 404), (status = 409)))]
pub async fn fork(
    State(st): State<AppState>,
    caller: Principal,
    SpriteRef(name): SpriteRef,
    JsonBody(req): JsonBody<ForkRequest>,
) -> ApiResult<Response> {
    // The source answers first: a missing one is 404 whatever the new name.
    st.mgr.get(&name)?;
    let ck = req.checkpoint.as_deref().map(crate::api::checkpoint_id);
    let new_key = new_sprite_key(&st, &caller, &req.name)?;
    let _creating = check_limits(&st, &caller.org).await?;
    let info = st.mgr.fork(&name, &new_key, ck.as_deref(), None).await?;
    st.quotas.forget_disk(&caller.org);
    Ok((StatusCode::CREATED, Json(sprite_json(&st.cfg, &info))).into_response())
}
