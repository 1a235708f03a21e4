//! Checkpoints (§2.5): NDJSON create and restore, list, get, delete.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use den_store::CheckpointRecord;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::checkpoint_id;
use crate::auth::SpriteRef;
use crate::error::ApiResult;
use crate::extract::JsonBody;
use crate::sprite_json::rfc3339_ms;
use crate::state::AppState;

/// A checkpoint as the API shows it; `memory` (den extension) says whether
/// it carries the sprite's running processes.
fn checkpoint_json(c: &CheckpointRecord, memory: bool) -> Value {
    json!({
        "id": c.id,
        "create_time": rfc3339_ms(c.created_at_ms),
        "comment": c.comment,
        "is_auto": false,
        "durable": c.durable,
        "memory": memory,
    })
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// One NDJSON line of a StreamMessage.
pub fn stream_line(kind: &str, key: &str, text: &str) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, key: text, "time": now()})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// An NDJSON response fed by `lines` as they come.
pub fn ndjson(lines: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures::StreamExt;
    let body = Body::from_stream(lines.map(Ok::<_, Infallible>));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    resp
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct CreateCheckpointRequest {
    pub comment: Option<String>,
    /// den extension: save the running processes too (gVisor sprites), so
    /// that a restore or a fork of the checkpoint brings them back.
    #[serde(default)]
    pub memory: bool,
}

/// Checkpoint the sprite's disk (NDJSON progress; `complete` names `vN`);
/// with `memory: true`, its memory and processes with it.
#[utoipa::path(post, path = "/v1/sprites/{name}/checkpoint", request_body = CreateCheckpointRequest,
    responses((status = 200, content_type = "application/x-ndjson"), (status = 404)))]
pub async fn create(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(req): JsonBody<CreateCheckpointRequest>,
) -> ApiResult<Response> {
    let info = st.mgr.get(&name)?;
    let comment = req.comment.unwrap_or_default();
    if comment.len() > 4096 {
        return Err(crate::error::ApiError::bad_request("comment too long"));
    }
    let memory = req.memory;
    if memory && info.record.runtime != den_runtime::Runtime::Gvisor {
        return Err(crate::error::ApiError::bad_request(format!(
            "memory checkpoints need a gvisor sprite; {} runs on {}",
            info.record.short_name(),
            info.record.runtime
        )));
    }
    let org = info.record.org().to_string();
    let limit = st.tokens.org(&org).and_then(|o| o.limits.max_disk_bytes);
    st.quotas.check_disk(&st.mgr, &org, limit).await?;
    let stream = async_stream(move |tx| async move {
        let _ = tx
            .send(stream_line("info", "data", "Creating checkpoint..."))
            .await;
        let t0 = std::time::Instant::now();
        let done = if memory {
            st.mgr.checkpoint_memory(&name, &comment).await
        } else {
            st.mgr.checkpoint(&name, &comment).await
        };
        st.quotas.forget_disk(&org);
        match done {
            Ok(ck) => {
                // "  ID: vN" exactly: some SDKs (Rust `sprites`) take the id
                // from this line rather than from `complete`.
                for info in [
                    format!("  ID: {}", ck.id),
                    format!("  Took: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3),
                ] {
                    let _ = tx.send(stream_line("info", "data", &info)).await;
                }
                let _ = tx
                    .send(stream_line(
                        "complete",
                        "data",
                        &format!("Checkpoint {} created", ck.id),
                    ))
                    .await;
            }
            Err(e) => {
                let _ = tx
                    .send(stream_line(
                        "error",
                        "error",
                        &format!("Checkpoint failed: {}", client_text(e)),
                    ))
                    .await;
            }
        }
    });
    Ok(ndjson(stream))
}

/// What a client reads of a failure inside a stream: the message its
/// status answer would carry (internal details go to the server log).
fn client_text(e: den_sprite::SpriteError) -> String {
    crate::error::one_clean_line(&crate::error::ApiError::from(e).message)
}

/// Run `f` feeding a channel, as a stream (keeps working if the client goes away).
pub fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Bytes> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

/// Checkpoints, newest first.
#[utoipa::path(get, path = "/v1/sprites/{name}/checkpoints", responses((status = 200), (status = 404)))]
pub async fn list(State(st): State<AppState>, SpriteRef(name): SpriteRef) -> ApiResult<Json<Value>> {
    let cks = st.mgr.list_checkpoints(&name).await?;
    let memory = st.mgr.memory_checkpoints(&name).await?;
    Ok(Json(Value::Array(
        cks.iter()
            .map(|c| checkpoint_json(c, memory.contains(&c.id)))
            .collect(),
    )))
}

#[utoipa::path(get, path = "/v1/sprites/{name}/checkpoints/{id}", responses((status = 200), (status = 404)))]
pub async fn get(
    State(st): State<AppState>,
    Path((_sprite, id)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<Json<Value>> {
    let ck = st.mgr.get_checkpoint(&name, &checkpoint_id(&id)).await?;
    let memory = st.mgr.memory_checkpoints(&name).await?.contains(&ck.id);
    Ok(Json(checkpoint_json(&ck, memory)))
}

/// 409 for the checkpoint the sprite was last restored to.
#[utoipa::path(delete, path = "/v1/sprites/{name}/checkpoints/{id}",
    responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete(
    State(st): State<AppState>,
    Path((_sprite, id)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<StatusCode> {
    st.mgr.delete_checkpoint(&name, &checkpoint_id(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rewind the sprite to a checkpoint (NDJSON; a failure is an `error` line).
#[utoipa::path(post, path = "/v1/sprites/{name}/checkpoints/{id}/restore",
    responses((status = 200, content_type = "application/x-ndjson"), (status = 404)))]
pub async fn restore(
    State(st): State<AppState>,
    Path((_sprite, id)): Path<(String, String)>,
    SpriteRef(name): SpriteRef,
) -> ApiResult<Response> {
    st.mgr.get(&name)?;
    let id = checkpoint_id(&id);
    let stream = async_stream(move |tx| async move {
        let _ = tx
            .send(stream_line(
                "info",
                "data",
                &format!("Restoring from checkpoint {id}..."),
            ))
            .await;
        match st.mgr.restore(&name, &id).await {
            Ok(ck) => {
                let _ = tx
                    .send(stream_line(
                        "complete",
                        "data",
                        &format!("Restore from {} complete", ck.id),
                    ))
                    .await;
            }
            Err(e) => {
                let _ = tx
                    .send(stream_line(
                        "error",
                        "error",
                        &format!("Failed to restore checkpoint: {}", client_text(e)),
                    ))
                    .await;
            }
        }
    });
    Ok(ndjson(stream))
}
