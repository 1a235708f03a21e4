//! Prometheus metrics at `GET /metrics` (token required, like every route
//! but the health check): HTTP requests by route and status, exec streams,
//! sprites by state, storage bytes and upload lag.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use den_sprite::SpriteStatus;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

/// The process-wide recorder (the `metrics` facade has one global recorder;
/// several servers in one test process share it).
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    tracing::warn!("another metrics recorder is installed; /metrics shows gauges only");
                }
                handle
            })
            .clone();
        Metrics { handle }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts one live exec stream while it exists.
pub struct ExecStreamGauge;

impl ExecStreamGauge {
    pub fn start() -> Self {
        metrics::gauge!("den_exec_streams").increment(1.0);
        metrics::counter!("den_exec_streams_total").increment(1);
        ExecStreamGauge
    }
}

impl Drop for ExecStreamGauge {
    fn drop(&mut self) {
        metrics::gauge!("den_exec_streams").decrement(1.0);
    }
}

/// Middleware: request count and latency by route template (not the raw
/// path, which would make one series per sprite).
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("den_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("den_http_request_duration_seconds", "method" => method, "route" => route)
        .record(t0.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`: the Prometheus text format. Point-in-time values are
/// sampled here rather than tracked on every change.
pub async fn render(State(st): State<AppState>) -> Response {
    let sprites = st.mgr.list();
    for status in [SpriteStatus::Running, SpriteStatus::Warm, SpriteStatus::Cold] {
        let n = sprites.iter().filter(|s| s.status == status).count();
        metrics::gauge!("den_sprites", "status" => status.as_str()).set(n as f64);
    }
    let store = st.mgr.store();
    metrics::gauge!("den_storage_local_only_bytes").set(store.local_only_bytes() as f64);
    let cache = store.cache_stats();
    metrics::gauge!("den_storage_cache_bytes").set(cache.clean_bytes as f64);
    metrics::gauge!("den_storage_cache_limit_bytes").set(cache.clean_limit as f64);
    // The data disk's reserve: writers block (never fail) while it is short.
    let space = store.space_stats();
    metrics::gauge!("den_storage_disk_free_bytes").set(space.free_bytes as f64);
    metrics::gauge!("den_storage_disk_min_free_bytes").set(space.min_free_bytes as f64);
    metrics::gauge!("den_storage_writers_blocked_on_disk").set(if space.writers_blocked { 1.0 } else { 0.0 });
    metrics::counter!("den_storage_disk_full_waits_total").absolute(space.blocked_waits);
    metrics::counter!("den_storage_disk_evicted_bytes_total").absolute(space.evicted_bytes);
    // Totals kept by the store, exported as counters' current values.
    let gc = store.gc_stats();
    metrics::counter!("den_storage_gc_runs_total").absolute(gc.runs);
    metrics::counter!("den_storage_gc_failed_runs_total").absolute(gc.failed_runs);
    metrics::counter!("den_storage_gc_chunks_freed_total").absolute(gc.chunks_freed);
    metrics::counter!("den_storage_gc_bytes_freed_total").absolute(gc.bytes_freed);
    metrics::gauge!("den_tokens").set(st.tokens.list().len() as f64);
    // Where boot time goes: a phase's total over the boot count is its mean.
    let boots = st.mgr.boot_totals();
    metrics::counter!("den_sprite_boots_total").absolute(boots.count);
    for (phase, sum) in den_sprite::BootPhases::NAMES.iter().zip(boots.sum) {
        metrics::counter!("den_sprite_boot_phase_microseconds_total", "phase" => *phase)
            .absolute(sum.as_micros() as u64);
    }
    // The pre-booted pool: a miss is a create that booted cold.
    let pool = st.mgr.pool_stats();
    metrics::counter!("den_sprite_pool_hits_total").absolute(pool.hits);
    metrics::counter!("den_sprite_pool_misses_total").absolute(pool.misses);
    metrics::gauge!("den_sprite_pool_ready").set(pool.ready as f64);
    let mut resp = st.metrics.handle.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
