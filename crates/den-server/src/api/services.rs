//! Services (§2.6): definitions persisted by the manager, run by the agent.
//!
//! Definitions live in the sprite record, so a cold sprite's services are
//! listed without waking it (all `stopped`). Create, start and stop wake the
//! sprite for the duration of the request only: services don't keep it awake.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use den_agent::client::{ServiceEvent, ServiceEventStream, ServiceState, ServiceStatus};
use den_agent::protocol::ServiceDef;
use den_sprite::{Activity, SpriteError, SpriteStatus};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::checkpoints::{async_stream, ndjson};
use crate::auth::SpriteRef;
use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::sprite_json::rfc3339_ms;
use crate::state::AppState;

/// Where the agent writes service logs (its `services_log_dir` default).
const LOG_DIR: &str = "/.sprite/logs/services";
const DEFAULT_MONITOR: Duration = Duration::from_secs(5);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest accepted `duration`/`timeout`: a monitor stream is not a log follow.
const MAX_WAIT: Duration = Duration::from_secs(3600);
const MAX_LOG_LINES: usize = 100_000;

/// Go `time.Duration` syntax (`5s`, `1m30s`, `1.5h`, `300ms`); the Python SDK
/// sends `5.0s`. A bare `0` is zero, as in Go.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * secs;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn wait_param(raw: Option<&str>, what: &str, default: Duration) -> ApiResult<Duration> {
    let Some(raw) = raw else { return Ok(default) };
    let d = parse_go_duration(raw)
        .ok_or_else(|| ApiError::bad_request(format!("invalid {what} {raw:?} (e.g. 5s, 1m30s)")))?;
    if d > MAX_WAIT {
        return Err(ApiError::bad_request(format!("{what} must be at most 1h")));
    }
    Ok(d)
}

/// The agent's service name rule: it doubles as a log file name.
fn check_service_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid service name {name:?}: 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'"
        )))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn state_json(name: &str, st: Option<&ServiceStatus>) -> Value {
    let time = |ms: Option<u64>| ms.map(|ms| rfc3339_ms(ms as i64));
    let status = st.map(|s| s.status).unwrap_or(ServiceState::Stopped);
    json!({
        "name": name,
        "status": status,
        "pid": st.and_then(|s| s.pid),
        "started_at": time(st.and_then(|s| s.started_at)),
        "error": st.and_then(|s| s.error.clone()),
        "restart_count": st.map(|s| s.restart_count).unwrap_or(0),
        "next_restart_at": time(st.and_then(|s| s.next_restart_at)),
    })
}

/// ServiceWithState. `env` and `dir` are not in the documented example but
/// the Python SDK reads them.
fn service_json(def: &ServiceDef, st: Option<&ServiceStatus>) -> Value {
    json!({
        "name": def.name,
        "cmd": def.cmd,
        "args": def.args,
        "needs": def.needs,
        "http_port": def.http_port,
        "env": def.env,
        "dir": def.dir,
        "state": state_json(&def.name, st),
    })
}

fn find<'a>(defs: &'a [ServiceDef], sprite: &str, service: &str) -> ApiResult<&'a ServiceDef> {
    defs.iter()
        .find(|d| d.name == service)
        .ok_or_else(|| ApiError::not_found(format!("service {service:?} not found in sprite {sprite}")))
}

/// Runtime states, if the sprite is up. A cold sprite is not woken: all its
/// services are stopped.
async fn statuses(st: &AppState, name: &str) -> ApiResult<HashMap<String, ServiceStatus>> {
    if st.mgr.get(name)?.status == SpriteStatus::Cold {
        return Ok(HashMap::new());
    }
    let act = st.mgr.wake(name).await?;
    let list = act.agent().services_status().await?;
    Ok(list.into_iter().map(|s| (s.name.clone(), s)).collect())
}

/// Every service with its state.
#[utoipa::path(get, path = "/v1/sprites/{name}/services", responses((status = 200), (status = 404)))]
pub async fn list(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let defs = st.mgr.services(&name)?;
    let states = statuses(&st, &name).await?;
    Ok(Json(Value::Array(
        defs.iter()
            .map(|d| service_json(d, states.get(&d.name)))
            .collect(),
    )))
}

#[utoipa::path(get, path = "/v1/sprites/{name}/services/{service}", responses((status = 200), (status = 404)))]
pub async fn get(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<Json<Value>> {
    let defs = st.mgr.services(&name)?;
    let def = find(&defs, &name, &service)?;
    let states = statuses(&st, &name).await?;
    Ok(Json(service_json(def, states.get(&service))))
}

/// Body of `PUT /services/{service}`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ServiceRequest {
    /// The binary to run (no shell).
    pub cmd: Option<String>,
    pub args: Option<Vec<String>>,
    /// Services that must run before this one starts.
    pub needs: Option<Vec<String>>,
    /// At most one service of a sprite may have one. `httpPort` is what the
    /// JS SDK's type calls it.
    #[serde(alias = "httpPort")]
    pub http_port: Option<i64>,
    /// Extra environment: an object, or the CLI's `K=v,K2=v2` string.
    #[schema(value_type = Object)]
    pub env: Option<Value>,
    pub dir: Option<String>,
}

fn parse_env(v: Option<Value>) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: String| -> ApiResult<()> {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ApiError::bad_request(format!("invalid env variable {k:?}")));
        }
        out.insert(k.to_string(), v);
        Ok(())
    };
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let v = match v {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(ApiError::bad_request(format!("env {k:?} must be a string"))),
                };
                put(&k, v)?;
            }
        }
        Some(Value::String(s)) => {
            for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| ApiError::bad_request(format!("env entry {pair:?} is not K=v")))?;
                put(k.trim(), v.to_string())?;
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request("env must be an object or a K=v,… string"));
        }
    }
    Ok(out)
}

fn definition(service: &str, req: ServiceRequest) -> ApiResult<ServiceDef> {
    let cmd = req.cmd.unwrap_or_default();
    if cmd.trim().is_empty() {
        return Err(ApiError::bad_request("cmd field is required"));
    }
    let args = req.args.unwrap_or_default();
    if cmd.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad_request("NUL byte in cmd or args"));
    }
    let http_port = match req.http_port {
        None => None,
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::bad_request("http_port must be 1-65535"))?,
        ),
    };
    let dir = req.dir.filter(|d| !d.is_empty());
    if dir.as_deref().is_some_and(|d| d.contains('\0')) {
        return Err(ApiError::bad_request("NUL byte in dir"));
    }
    let needs = req.needs.unwrap_or_default();
    if needs.iter().any(|n| n == service) {
        return Err(ApiError::bad_request(format!(
            "service {service:?} cannot need itself"
        )));
    }
    Ok(ServiceDef {
        name: service.to_string(),
        cmd,
        args,
        env: parse_env(req.env)?,
        dir,
        needs,
        http_port,
        stopped: false,
    })
}

/// Checks a whole desired set: `needs` name defined services without a
/// cycle (400), and at most one service has an `http_port` (409).
fn check_set(defs: &[ServiceDef]) -> Result<(), SpriteError> {
    let names: HashSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    for d in defs {
        if let Some(n) = d.needs.iter().find(|n| !names.contains(n.as_str())) {
            return Err(SpriteError::Invalid(format!(
                "service {:?} needs unknown service {n:?}",
                d.name
            )));
        }
    }
    let with_port: Vec<&str> = defs
        .iter()
        .filter(|d| d.http_port.is_some())
        .map(|d| d.name.as_str())
        .collect();
    if with_port.len() > 1 {
        return Err(SpriteError::Conflict(format!(
            "another service already has an HTTP port configured ({})",
            with_port.join(", ")
        )));
    }
    // Kahn's algorithm: whatever can't be ordered sits on a cycle.
    let mut pending: Vec<&ServiceDef> = defs.iter().collect();
    let mut done: HashSet<&str> = HashSet::new();
    loop {
        let before = pending.len();
        pending.retain(|d| {
            if d.needs.iter().all(|n| done.contains(n.as_str())) {
                done.insert(&d.name);
                false
            } else {
                true
            }
        });
        if pending.is_empty() {
            return Ok(());
        }
        if pending.len() == before {
            return Err(SpriteError::Invalid(format!(
                "service needs form a cycle through {:?}",
                pending[0].name
            )));
        }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct MonitorQuery {
    /// How long to stream the service's events (Go duration, default 5s).
    pub duration: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct StopQuery {
    /// How long to wait for the service to stop (Go duration, default 10s).
    pub timeout: Option<String>,
}

/// One NDJSON ServiceLogEvent line.
fn event_line(ev: &ServiceEvent) -> Bytes {
    let mut m = Map::new();
    m.insert("type".into(), json!(ev.kind));
    if let Some(d) = &ev.data {
        m.insert("data".into(), json!(d));
    }
    if let Some(c) = ev.exit_code {
        m.insert("exit_code".into(), json!(c));
    }
    m.insert("timestamp".into(), json!(ev.timestamp));
    line(Value::Object(m))
}

fn line(v: Value) -> Bytes {
    let mut b = serde_json::to_vec(&v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn complete_line(service: &str) -> Bytes {
    line(json!({
        "type": "complete",
        "log_files": {
            "combined": format!("{LOG_DIR}/{service}.log"),
            "stdout": format!("{LOG_DIR}/{service}.stdout.log"),
            "stderr": format!("{LOG_DIR}/{service}.stderr.log"),
        },
        "timestamp": now_ms(),
    }))
}

fn error_line(message: &str) -> Bytes {
    line(json!({"type": "error", "data": message, "timestamp": now_ms()}))
}

/// Streams `events` for `monitor` (or, with `until_stopped`, until the
/// service reports `stopped`), then `complete`. `act` keeps the sprite awake
/// while the stream runs and goes with it.
fn monitor_stream(
    st: &AppState,
    act: Activity,
    mut events: ServiceEventStream,
    service: String,
    monitor: Duration,
    until_stopped: bool,
) -> Response {
    let shutdown = st.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        let _act = act;
        let deadline = tokio::time::Instant::now() + monitor;
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    let stopped = ev.kind == den_agent::client::ServiceEventType::Stopped;
                    if tx.send(event_line(&ev)).await.is_err() {
                        return;
                    }
                    if until_stopped && stopped {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if until_stopped {
                        let _ = tx.send(error_line(&format!(
                            "service {service:?} did not report stopping within {monitor:?}"
                        ))).await;
                    }
                    break;
                }
                _ = shutdown.cancelled() => break,
            }
        }
        let _ = tx.send(complete_line(&service)).await;
    });
    ndjson(stream)
}

/// Create or replace a service and start it; streams its events for `duration`.
#[utoipa::path(put, path = "/v1/sprites/{name}/services/{service}", request_body = ServiceRequest,
    params(MonitorQuery),
    responses((status = 200, content_type = "application/x-ndjson"), (status = 400), (status = 404), (status = 409)))]
pub async fn put(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<MonitorQuery>,
    JsonBody(req): JsonBody<ServiceRequest>,
) -> ApiResult<Response> {
    check_service_name(&service)?;
    let monitor = wait_param(q.duration.as_deref(), "duration", DEFAULT_MONITOR)?;
    let def = definition(&service, req)?;
    let replace = |defs: &mut Vec<ServiceDef>| -> Result<(), SpriteError> {
        let mut next = defs.clone();
        match next.iter_mut().find(|d| d.name == def.name) {
            Some(d) => *d = def.clone(),
            None => next.push(def.clone()),
        }
        check_set(&next)?;
        *defs = next;
        Ok(())
    };
    // Refuse a bad definition before waking anything; the update re-checks
    // under the sprite's lock.
    replace(&mut st.mgr.services(&name)?)?;
    let act = st.mgr.wake(&name).await?;
    let events = act.agent().service_events(Some(&service)).await?;
    st.mgr.update_services(&name, replace).await?;
    Ok(monitor_stream(&st, act, events, service, monitor, false))
}

/// Remove a service (it is stopped; its logs stay).
#[utoipa::path(delete, path = "/v1/sprites/{name}/services/{service}",
    responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<StatusCode> {
    find(&st.mgr.services(&name)?, &name, &service)?;
    st.mgr
        .update_services(&name, |defs| {
            if let Some(d) = defs.iter().find(|d| d.needs.contains(&service)) {
                return Err(SpriteError::Conflict(format!(
                    "service {:?} needs {service:?}",
                    d.name
                )));
            }
            // Gone already if a concurrent delete won: same outcome.
            defs.retain(|d| d.name != service);
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a service (clearing a sticky stop); streams its events for `duration`.
#[utoipa::path(post, path = "/v1/sprites/{name}/services/{service}/start", params(MonitorQuery),
    responses((status = 200, content_type = "application/x-ndjson"), (status = 404)))]
pub async fn start(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<MonitorQuery>,
) -> ApiResult<Response> {
    let monitor = wait_param(q.duration.as_deref(), "duration", DEFAULT_MONITOR)?;
    find(&st.mgr.services(&name)?, &name, &service)?;
    let act = st.mgr.wake(&name).await?;
    let events = act.agent().service_events(Some(&service)).await?;
    st.mgr
        .update_services(&name, |defs| {
            match defs.iter_mut().find(|d| d.name == service) {
                Some(d) => d.stopped = false,
                None => {
                    return Err(SpriteError::Conflict(format!(
                        "service {service:?} was deleted meanwhile"
                    )));
                }
            }
            Ok(())
        })
        .await?;
    Ok(monitor_stream(&st, act, events, service, monitor, false))
}

/// Stop a service and keep it stopped (across wakes) until started again.
#[utoipa::path(post, path = "/v1/sprites/{name}/services/{service}/stop", params(StopQuery),
    responses((status = 200, content_type = "application/x-ndjson"), (status = 404), (status = 409)))]
pub async fn stop(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<StopQuery>,
) -> ApiResult<Response> {
    let timeout = wait_param(q.timeout.as_deref(), "timeout", DEFAULT_STOP_TIMEOUT)?;
    let def = find(&st.mgr.services(&name)?, &name, &service)?.clone();
    let not_running = || ApiError::conflict(format!("service {service:?} is not running"));
    if def.stopped || st.mgr.get(&name)?.status == SpriteStatus::Cold {
        return Err(not_running());
    }
    let act = st.mgr.wake(&name).await?;
    let running = act
        .agent()
        .services_status()
        .await?
        .into_iter()
        .any(|s| s.name == service && s.status != ServiceState::Stopped);
    if !running {
        return Err(not_running());
    }
    let events = act.agent().service_events(Some(&service)).await?;
    // The agent answers the update once the process is gone, so run it next
    // to the stream: the client sees `stopping` right away.
    let (mgr, sprite, svc) = (st.mgr.clone(), name.clone(), service.clone());
    tokio::spawn(async move {
        let res = mgr
            .update_services(&sprite, |defs| {
                if let Some(d) = defs.iter_mut().find(|d| d.name == svc) {
                    d.stopped = true;
                }
                Ok(())
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(sprite = %sprite, service = %svc, error = %e, "stopping a service");
        }
    });
    Ok(monitor_stream(&st, act, events, service, timeout, true))
}

/// Body of `POST /services/signal`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct SignalRequest {
    pub name: Option<String>,
    /// `TERM`, `SIGHUP`, `9`, …
    pub signal: Option<String>,
}

/// Signal a running service's process group. Routed as `POST
/// /services/{service}` so that a service named `signal` can still be read,
/// replaced and deleted.
#[utoipa::path(post, path = "/v1/sprites/{name}/services/signal", request_body = SignalRequest,
    responses((status = 204), (status = 400), (status = 404), (status = 409)))]
pub async fn signal(
    State(st): State<AppState>,
    Path((_sprite, endpoint)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    JsonBody(req): JsonBody<SignalRequest>,
) -> ApiResult<StatusCode> {
    // A missing sprite answers first, as on every sprite route.
    st.mgr.get(&name)?;
    if endpoint != "signal" {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST is only defined for /services/signal",
        ));
    }
    let service = req
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name field is required"))?;
    let signal = req.signal.unwrap_or_default();
    if den_agent::protocol::parse_signal(&signal).is_none() {
        return Err(ApiError::bad_request(format!("invalid signal {signal:?}")));
    }
    let def = find(&st.mgr.services(&name)?, &name, &service)?.clone();
    if def.stopped || st.mgr.get(&name)?.status == SpriteStatus::Cold {
        return Err(ApiError::conflict(format!("service {service:?} is not running")));
    }
    let act = st.mgr.wake(&name).await?;
    act.agent().service_signal(&service, &signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct LogsQuery {
    /// How many trailing lines (default 100).
    pub lines: Option<String>,
}

/// The tail of the service's combined log (kept after the service is deleted).
#[utoipa::path(get, path = "/v1/sprites/{name}/services/{service}/logs", params(LogsQuery),
    responses((status = 200, content_type = "text/plain"), (status = 404)))]
pub async fn logs(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<LogsQuery>,
) -> ApiResult<Response> {
    check_service_name(&service)?;
    let lines = match q.lines.as_deref() {
        None | Some("") => 100,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LOG_LINES).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("lines must be 1-{MAX_LOG_LINES}")))?,
    };
    let act = st.mgr.wake(&name).await?;
    let mut tail = act.agent().service_logs(&service, Some(lines), false).await?;
    let stream = async_stream(move |tx| async move {
        let _act = act;
        while let Some(chunk) = tail.recv().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    use futures::StreamExt;
    let mut resp = Response::new(Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = |s: &str| parse_go_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("5s"), Some(5000));
        assert_eq!(ms("5.0s"), Some(5000));
        assert_eq!(ms("1m30s"), Some(90_000));
        assert_eq!(ms("300ms"), Some(300));
        assert_eq!(ms("1.5h"), Some(5_400_000));
        assert_eq!(ms("0"), Some(0));
        for bad in ["", "5", "s", "-1s", "5x", "1..2s", "abc"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn env_forms() {
        let m = parse_env(Some(json!("A=1, B=x=y"))).unwrap();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x=y");
        let m = parse_env(Some(json!({"A": "1", "N": 2}))).unwrap();
        assert_eq!(m["N"], "2");
        assert!(parse_env(Some(json!("novalue"))).is_err());
        assert!(parse_env(Some(json!([1]))).is_err());
    }

    #[test]
    fn set_checks() {
        let d = |n: &str, needs: &[&str], port: Option<u16>| ServiceDef {
            name: n.into(),
            cmd: "x".into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            http_port: port,
            ..Default::default()
        };
        check_set(&[d("a", &[], Some(80)), d("b", &["a"], None)]).unwrap();
        assert!(matches!(
            check_set(&[d("a", &["zz"], None)]),
            Err(SpriteError::Invalid(_))
        ));
        assert!(matches!(
            check_set(&[d("a", &[], Some(1)), d("b", &[], Some(2))]),
            Err(SpriteError::Conflict(_))
        ));
        assert!(matches!(
            check_set(&[d("a", &["b"], None), d("b", &["a"], None)]),
            Err(SpriteError::Invalid(_))
        ));
    }
}
