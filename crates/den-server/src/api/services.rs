//! Services (§2.6): the HTTP side. Handlers parse and render; the sprite
//! manager's services module acts (and `den_agent::service_def` holds the
//! rules a definition must meet, shared with the agent).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use den_agent::client::{ServiceEvent, ServiceState, ServiceStatus};
use den_agent::protocol::ServiceDef;
use den_sprite::ServiceWatch;
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

/// Every service with its state.
#[utoipa::path(get, path = "/v1/sprites/{name}/services", responses((status = 200), (status = 404)))]
pub async fn list(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let defs = st.mgr.services(&name)?;
    let states = st.mgr.service_states(&name).await?;
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
    let def = st.mgr.service(&name, &service)?;
    let states = st.mgr.service_states(&name).await?;
    Ok(Json(service_json(&def, states.get(&service))))
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

/// The request as a definition; the manager checks it against the rules
/// (and the rest of the sprite's services).
fn definition(service: &str, req: ServiceRequest) -> ApiResult<ServiceDef> {
    let http_port = match req.http_port {
        None => None,
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::bad_request("http_port must be 1-65535"))?,
        ),
    };
    Ok(ServiceDef {
        name: service.to_string(),
        cmd: req.cmd.unwrap_or_default(),
        args: req.args.unwrap_or_default(),
        env: parse_env(req.env)?,
        dir: req.dir.filter(|d| !d.is_empty()),
        needs: req.needs.unwrap_or_default(),
        http_port,
        stopped: false,
    })
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
    watch: ServiceWatch,
    service: String,
    monitor: Duration,
    until_stopped: bool,
) -> Response {
    let shutdown = st.shutdown.clone();
    let ServiceWatch { activity, mut events } = watch;
    let stream = async_stream(move |tx| async move {
        let _act = activity;
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
    let monitor = wait_param(q.duration.as_deref(), "duration", DEFAULT_MONITOR)?;
    let def = definition(&service, req)?;
    let watch = st.mgr.put_service(&name, def).await?;
    Ok(monitor_stream(&st, watch, service, monitor, false))
}

/// Remove a service (it is stopped; its logs stay).
#[utoipa::path(delete, path = "/v1/sprites/{name}/services/{service}",
    responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(
    State(st): State<AppState>,
    Path((_sprite, service)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<StatusCode> {
    st.mgr.delete_service(&name, &service).await?;
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
    let watch = st.mgr.start_service(&name, &service).await?;
    Ok(monitor_stream(&st, watch, service, monitor, false))
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
    let watch = st.mgr.stop_service(&name, &service).await?;
    Ok(monitor_stream(&st, watch, service, timeout, true))
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
    st.mgr.signal_service(&name, &service, &signal).await?;
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
    let lines = match q.lines.as_deref() {
        None | Some("") => 100,
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LOG_LINES).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("lines must be 1-{MAX_LOG_LINES}")))?,
    };
    let (act, mut tail) = st.mgr.service_logs(&name, &service, lines).await?;
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
}
