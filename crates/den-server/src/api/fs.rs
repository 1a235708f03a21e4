//! Filesystem (§2.10). Every operation runs inside the sprite through its
//! agent, so paths (`..`, absolute ones, symlinks to `/`) resolve in the
//! sprite's own mount namespace and can never reach the host.
//!
//! Errors use the Sprites filesystem shape
//! `{"error":"…","code":"ENOENT|…","path":"…"}`; a missing sprite is the
//! usual API error.

use std::path::{Component, PathBuf};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use den_agent::client::FsWriteOptions;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::checkpoints::async_stream;
use crate::auth::SpriteRef;
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Upload chunks are gathered up to this size per agent frame.
const WRITE_CHUNK: usize = 256 * 1024;

/// A failed filesystem request.
pub enum FsFail {
    /// Not about a path (unknown sprite, sprite can't wake).
    Api(ApiError),
    Errno {
        status: StatusCode,
        code: &'static str,
        message: String,
        path: String,
    },
}

type FsResult<T> = Result<T, FsFail>;

impl From<ApiError> for FsFail {
    fn from(e: ApiError) -> Self {
        FsFail::Api(e)
    }
}

impl From<den_sprite::SpriteError> for FsFail {
    fn from(e: den_sprite::SpriteError) -> Self {
        FsFail::Api(e.into())
    }
}

impl IntoResponse for FsFail {
    fn into_response(self) -> Response {
        match self {
            FsFail::Api(e) => e.into_response(),
            FsFail::Errno {
                status,
                code,
                message,
                path,
            } => {
                if status.is_server_error() {
                    tracing::warn!(%status, code, %message, "filesystem request failed");
                }
                (
                    status,
                    Json(json!({"error": message, "code": code, "path": path})),
                )
                    .into_response()
            }
        }
    }
}

impl FsFail {
    /// The error as a JSON body, for transports without an HTTP status
    /// (the control channel): `{"error","code","path"}`.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            FsFail::Api(e) => json!({"error": e.message, "code": e.code}),
            FsFail::Errno {
                code, message, path, ..
            } => json!({"error": message, "code": code, "path": path}),
        }
    }
}

pub(crate) fn invalid(message: impl Into<String>, path: &str) -> FsFail {
    FsFail::Errno {
        status: StatusCode::BAD_REQUEST,
        code: "EINVAL",
        message: message.into(),
        path: path.to_string(),
    }
}

/// The errno names the SDKs know, and the status each one gets.
fn classify(errno: &str) -> (&'static str, StatusCode) {
    match errno {
        "ENOENT" => ("ENOENT", StatusCode::NOT_FOUND),
        "EEXIST" => ("EEXIST", StatusCode::CONFLICT),
        "ENOTEMPTY" => ("ENOTEMPTY", StatusCode::CONFLICT),
        "ENOTDIR" => ("ENOTDIR", StatusCode::BAD_REQUEST),
        "EISDIR" => ("EISDIR", StatusCode::BAD_REQUEST),
        "EACCES" | "EPERM" | "EROFS" => ("EACCES", StatusCode::FORBIDDEN),
        "EINVAL" | "EXDEV" | "ENAMETOOLONG" | "ELOOP" => ("EINVAL", StatusCode::BAD_REQUEST),
        _ => ("EIO", StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// Agent errors read `ENOENT: /x/y: No such file or directory`: the errno
/// name picks the code, the middle part is the path that failed.
fn agent_fail(e: den_agent::Error, path: &str) -> FsFail {
    let den_agent::Error::Agent { message, .. } = &e else {
        return FsFail::Errno {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "EIO",
            message: e.to_string(),
            path: path.to_string(),
        };
    };
    let (errno, rest) = message.split_once(": ").unwrap_or(("EIO", message));
    let (code, status) = classify(errno);
    let failed = rest
        .rsplit_once(": ")
        .map(|(p, _)| p)
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    FsFail::Errno {
        status,
        code,
        message: message.clone(),
        path: failed.to_string(),
    }
}

/// `path` against `workingDir` (default `/`), normalised like the agent does;
/// used to check input and to name the path in errors.
fn resolve(path: Option<&str>, working_dir: Option<&str>) -> FsResult<String> {
    let path = path.unwrap_or_default();
    if path.is_empty() {
        return Err(invalid("path is required", path));
    }
    let wd = working_dir.filter(|w| !w.is_empty()).unwrap_or("/");
    if path.contains('\0') || wd.contains('\0') {
        return Err(invalid("NUL byte in path", ""));
    }
    let mut out = PathBuf::from("/");
    for c in std::path::Path::new("/").join(wd).join(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out.display().to_string())
}

/// The two paths of a rename or copy, each resolved like `resolve` does.
fn source_and_dest(
    source: &Option<String>,
    dest: &Option<String>,
    working_dir: &Option<String>,
) -> FsResult<(String, String)> {
    let wd = working_dir.as_deref();
    let source = resolve(source.as_deref(), wd).map_err(|_| invalid("source is required", ""))?;
    let dest = resolve(dest.as_deref(), wd).map_err(|_| invalid("dest is required", ""))?;
    Ok((source, dest))
}

/// Query booleans as SDKs send them (`true`, `1`; absent or empty is false).
fn flag(v: Option<&str>, name: &str) -> FsResult<bool> {
    match v.map(str::trim) {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(invalid(
            format!("{name} must be true or false, not {other:?}"),
            "",
        )),
    }
}

/// Octal mode strings (`"0755"`, `"644"`); a JSON number is the mode value.
fn parse_mode(v: &Value, path: &str) -> FsResult<u32> {
    let mode = match v {
        Value::String(s) => u32::from_str_radix(s.trim().trim_start_matches("0o"), 8).ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    mode.filter(|m| *m <= 0o7777).ok_or_else(|| {
        invalid(
            format!("invalid mode {v}: expected an octal string like \"0644\""),
            path,
        )
    })
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct PathQuery {
    pub path: Option<String>,
    /// Base of relative paths; default `/`.
    pub working_dir: Option<String>,
    pub recursive: Option<String>,
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct ReadQuery {
    pub path: Option<String>,
    pub working_dir: Option<String>,
    /// First byte offset (inclusive).
    pub start: Option<String>,
    /// End byte offset (exclusive).
    pub end: Option<String>,
}

fn offset(v: Option<&str>, path: &str) -> FsResult<Option<u64>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| invalid(format!("invalid byte offset {s:?}"), path)),
    }
}

/// A `Range: bytes=…` header: `(start, end exclusive)`, or a suffix length.
/// Anything else (several ranges, garbage) is ignored, as RFC 9110 allows.
enum ByteRange {
    From(u64, Option<u64>),
    Suffix(u64),
}

fn parse_range(headers: &HeaderMap) -> Option<ByteRange> {
    let spec = headers.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = spec.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().filter(|n| *n > 0).map(ByteRange::Suffix);
    }
    let start: u64 = a.parse().ok()?;
    if b.is_empty() {
        return Some(ByteRange::From(start, None));
    }
    let last: u64 = b.parse().ok()?;
    (last >= start).then(|| ByteRange::From(start, last.checked_add(1)))
}

/// Raw file content; `Range` (or `start`/`end`) gives a 206 partial answer.
#[utoipa::path(get, path = "/v1/sprites/{name}/fs/read", params(ReadQuery),
    responses((status = 200, content_type = "application/octet-stream"), (status = 206), (status = 404), (status = 416)))]
pub async fn read(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> FsResult<Response> {
    let path = resolve(q.path.as_deref(), q.working_dir.as_deref())?;
    let act = st.mgr.wake(&name).await?;
    let agent = act.agent();
    let range = match parse_range(&headers) {
        Some(ByteRange::From(s, e)) => Some((s, e)),
        Some(ByteRange::Suffix(n)) => {
            let stat = agent
                .fs_list(&path, None, false)
                .await
                .map_err(|e| agent_fail(e, &path))?;
            let size = stat["entries"][0]["size"].as_u64().unwrap_or(0);
            Some((size.saturating_sub(n), None))
        }
        None if q.start.is_some() || q.end.is_some() => Some((
            offset(q.start.as_deref(), &path)?.unwrap_or(0),
            offset(q.end.as_deref(), &path)?,
        )),
        None => None,
    };
    let (start, end) = range.unzip();
    let (info, mut content) = agent
        .fs_read(&path, None, start, end.flatten())
        .await
        .map_err(|e| agent_fail(e, &path))?;
    let size = info["size"].as_u64().unwrap_or(0);
    let (got_start, got_end) = (
        info["start"].as_u64().unwrap_or(0),
        info["end"].as_u64().unwrap_or(0),
    );
    let mut status = StatusCode::OK;
    let mut resp_headers = HeaderMap::new();
    if let Some((want_start, _)) = range {
        if want_start >= size && size > 0 || want_start > size {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
        if size > 0 {
            status = StatusCode::PARTIAL_CONTENT;
            let cr = format!("bytes {got_start}-{}/{size}", got_end.saturating_sub(1));
            if let Ok(v) = HeaderValue::from_str(&cr) {
                resp_headers.insert(header::CONTENT_RANGE, v);
            }
        }
    }
    // Files that report size 0 (/proc) are streamed to EOF: length unknown.
    if size > 0 {
        resp_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(got_end - got_start));
    }
    resp_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let stream = async_stream(move |tx| async move {
        let _act = act;
        while let Some(chunk) = content.recv().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    use futures::StreamExt;
    let mut resp = Response::new(Body::from_stream(stream.map(Ok::<_, std::convert::Infallible>)));
    *resp.status_mut() = status;
    resp.headers_mut().extend(resp_headers);
    Ok(resp)
}

/// A read by `start`/`end` offsets, as the control channel's `fs.read` does
/// it: the agent's `{"path","size","start","end"}` (`size` is the whole
/// file's), and the bytes. The [`den_sprite::Activity`] keeps the sprite
/// awake while they are read.
pub(crate) async fn read_in(
    st: &AppState,
    name: &str,
    q: &ReadQuery,
) -> FsResult<(Value, den_agent::client::ByteStream, den_sprite::Activity)> {
    let path = resolve(q.path.as_deref(), q.working_dir.as_deref())?;
    let start = offset(q.start.as_deref(), &path)?;
    let end = offset(q.end.as_deref(), &path)?;
    let act = st.mgr.wake(name).await?;
    let (info, content) = act
        .agent()
        .fs_read(&path, None, start, end)
        .await
        .map_err(|e| agent_fail(e, &path))?;
    Ok((info, content, act))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct WriteQuery {
    pub path: Option<String>,
    pub working_dir: Option<String>,
    /// Octal permission bits (default: the replaced file's, else 0644).
    pub mode: Option<String>,
    /// Create missing parent directories (the SDKs' name).
    pub mkdir_parents: Option<String>,
    /// Same as `mkdirParents` (the docs' name).
    pub mkdir: Option<String>,
    /// Leave new files owned by root.
    pub as_root: Option<String>,
}

/// Replace a file atomically with the request body (streamed, not buffered).
#[utoipa::path(put, path = "/v1/sprites/{name}/fs/write", params(WriteQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn write(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<WriteQuery>,
    body: Body,
) -> FsResult<Json<Value>> {
    let mut w = open_write(&st, &name, &q).await?;
    use futures::StreamExt;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        // A client gone mid-upload: dropping the writer abandons the write.
        let chunk: Bytes = chunk.map_err(|e| invalid(format!("reading the body: {e}"), &w.path))?;
        w.write(&chunk).await?;
    }
    w.finish().await.map(Json)
}

/// An upload in progress: data is gathered into agent frames of up to
/// [`WRITE_CHUNK`]; dropping it abandons the write (the file is replaced
/// atomically, so nothing changes).
pub(crate) struct Upload {
    path: String,
    writer: den_agent::client::FsWriter,
    buf: Vec<u8>,
    _act: den_sprite::Activity,
}

impl Upload {
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> FsResult<()> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= WRITE_CHUNK {
            let path = &self.path;
            self.writer
                .write(&self.buf)
                .await
                .map_err(|e| agent_fail(e, path))?;
            self.buf.clear();
        }
        Ok(())
    }

    pub(crate) async fn finish(mut self) -> FsResult<Value> {
        let path = self.path;
        self.writer
            .write(&self.buf)
            .await
            .map_err(|e| agent_fail(e, &path))?;
        self.writer.finish().await.map_err(|e| agent_fail(e, &path))
    }
}

/// Checks a write's parameters, wakes the sprite and opens the file.
pub(crate) async fn open_write(st: &AppState, name: &str, q: &WriteQuery) -> FsResult<Upload> {
    let path = resolve(q.path.as_deref(), q.working_dir.as_deref())?;
    let mode = match q.mode.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(m) => Some(parse_mode(&json!(m), &path)?),
    };
    let opts = FsWriteOptions {
        mode,
        mkdir_parents: flag(q.mkdir_parents.as_deref(), "mkdirParents")?
            || flag(q.mkdir.as_deref(), "mkdir")?,
        as_root: flag(q.as_root.as_deref(), "asRoot")?,
    };
    let act = st.mgr.wake(name).await?;
    let writer = act
        .agent()
        .fs_write_stream(&path, None, &opts)
        .await
        .map_err(|e| agent_fail(e, &path))?;
    Ok(Upload {
        path,
        writer,
        buf: Vec::with_capacity(WRITE_CHUNK),
        _act: act,
    })
}

/// A directory's entries (recursively with `recursive=true`); a file lists
/// as one entry for itself.
#[utoipa::path(get, path = "/v1/sprites/{name}/fs/list", params(PathQuery),
    responses((status = 200), (status = 404)))]
pub async fn list(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<PathQuery>,
) -> FsResult<Json<Value>> {
    list_in(&st, &name, q).await.map(Json)
}

pub(crate) async fn list_in(st: &AppState, name: &str, q: PathQuery) -> FsResult<Value> {
    let path = resolve(q.path.as_deref(), q.working_dir.as_deref())?;
    let recursive = flag(q.recursive.as_deref(), "recursive")?;
    let act = st.mgr.wake(name).await?;
    act.agent()
        .fs_list(&path, None, recursive)
        .await
        .map_err(|e| agent_fail(e, &path))
}

/// The JSON body form of delete (the docs'); the SDKs use the query.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRequest {
    pub path: Option<String>,
    pub working_dir: Option<String>,
    pub recursive: Option<bool>,
    /// Accepted; the agent deletes as root anyway.
    pub as_root: Option<bool>,
}

/// Delete a file, or a directory (non-empty ones need `recursive`).
#[utoipa::path(delete, path = "/v1/sprites/{name}/fs/delete", params(PathQuery), request_body = DeleteRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn delete(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    Query(q): Query<PathQuery>,
    JsonBody(b): JsonBody<DeleteRequest>,
) -> FsResult<Json<Value>> {
    delete_in(&st, &name, q, b).await.map(Json)
}

pub(crate) async fn delete_in(st: &AppState, name: &str, q: PathQuery, b: DeleteRequest) -> FsResult<Value> {
    let (path, wd) = match q.path {
        Some(p) => (Some(p), q.working_dir),
        None => (b.path, b.working_dir.or(q.working_dir)),
    };
    let path = resolve(path.as_deref(), wd.as_deref())?;
    let recursive = flag(q.recursive.as_deref(), "recursive")? || b.recursive.unwrap_or(false);
    let act = st.mgr.wake(name).await?;
    act.agent()
        .fs_delete(&path, None, recursive)
        .await
        .map_err(|e| agent_fail(e, &path))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenameRequest {
    pub source: Option<String>,
    pub dest: Option<String>,
    pub working_dir: Option<String>,
    pub as_root: Option<bool>,
}

/// Rename (move) within the sprite.
#[utoipa::path(post, path = "/v1/sprites/{name}/fs/rename", request_body = RenameRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn rename(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(b): JsonBody<RenameRequest>,
) -> FsResult<Json<Value>> {
    rename_in(&st, &name, b).await.map(Json)
}

pub(crate) async fn rename_in(st: &AppState, name: &str, b: RenameRequest) -> FsResult<Value> {
    let (source, dest) = source_and_dest(&b.source, &b.dest, &b.working_dir)?;
    let act = st.mgr.wake(name).await?;
    act.agent()
        .fs_rename(&source, &dest, None)
        .await
        .map_err(|e| agent_fail(e, &source))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyRequest {
    pub source: Option<String>,
    pub dest: Option<String>,
    pub working_dir: Option<String>,
    /// Needed to copy a directory.
    pub recursive: Option<bool>,
    /// Accepted; copies keep modes, and belong to the default user.
    pub preserve_attrs: Option<bool>,
    pub as_root: Option<bool>,
}

/// Copy a file or (with `recursive`) a directory to a new path.
#[utoipa::path(post, path = "/v1/sprites/{name}/fs/copy", request_body = CopyRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn copy(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(b): JsonBody<CopyRequest>,
) -> FsResult<Json<Value>> {
    copy_in(&st, &name, b).await.map(Json)
}

pub(crate) async fn copy_in(st: &AppState, name: &str, b: CopyRequest) -> FsResult<Value> {
    let (source, dest) = source_and_dest(&b.source, &b.dest, &b.working_dir)?;
    let act = st.mgr.wake(name).await?;
    act.agent()
        .fs_copy(&source, &dest, None, b.recursive.unwrap_or(false))
        .await
        .map_err(|e| agent_fail(e, &source))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChmodRequest {
    pub path: Option<String>,
    pub working_dir: Option<String>,
    /// Octal string, e.g. `"0755"`.
    #[schema(value_type = String)]
    pub mode: Option<Value>,
    pub recursive: Option<bool>,
}

/// Change permission bits.
#[utoipa::path(post, path = "/v1/sprites/{name}/fs/chmod", request_body = ChmodRequest,
    responses((status = 200), (status = 400), (status = 404)))]
pub async fn chmod(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(b): JsonBody<ChmodRequest>,
) -> FsResult<Json<Value>> {
    chmod_in(&st, &name, b).await.map(Json)
}

pub(crate) async fn chmod_in(st: &AppState, name: &str, b: ChmodRequest) -> FsResult<Value> {
    let path = resolve(b.path.as_deref(), b.working_dir.as_deref())?;
    let mode = parse_mode(
        b.mode
            .as_ref()
            .ok_or_else(|| invalid("mode is required", &path))?,
        &path,
    )?;
    let act = st.mgr.wake(name).await?;
    act.agent()
        .fs_chmod(&path, None, mode, b.recursive.unwrap_or(false))
        .await
        .map_err(|e| agent_fail(e, &path))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChownRequest {
    pub path: Option<String>,
    pub working_dir: Option<String>,
    /// User id or user name of the sprite.
    #[schema(value_type = Option<String>)]
    pub uid: Option<Value>,
    /// Group id or group name of the sprite.
    #[schema(value_type = Option<String>)]
    pub gid: Option<Value>,
    pub recursive: Option<bool>,
    /// Accepted; the agent changes owners as root anyway.
    pub as_root: Option<bool>,
}

/// A uid/gid as the SDKs send it: a non-negative number or a name.
fn owner_id(v: Option<&Value>, what: &str, path: &str) -> FsResult<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|n| *n <= u32::MAX as u64)
            .map(|n| Some(n.to_string()))
            .ok_or_else(|| invalid(format!("invalid {what} {n}"), path)),
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) =>
        {
            Ok(Some(s.clone()))
        }
        Some(other) => Err(invalid(
            format!("invalid {what} {other}: expected a number or a name"),
            path,
        )),
    }
}

/// Change the owner and/or group (numbers or the sprite's user and group
/// names); symlinks are changed themselves, never followed.
#[utoipa::path(post, path = "/v1/sprites/{name}/fs/chown", request_body = ChownRequest,
    responses((status = 200, description = "`{\"affected\":[{\"path\",\"uid\",\"gid\"}],\"count\"}`"),
        (status = 400), (status = 404)))]
pub async fn chown(
    State(st): State<AppState>,
    SpriteRef(name): SpriteRef,
    JsonBody(b): JsonBody<ChownRequest>,
) -> FsResult<Json<Value>> {
    let path = resolve(b.path.as_deref(), b.working_dir.as_deref())?;
    let uid = owner_id(b.uid.as_ref(), "uid", &path)?;
    let gid = owner_id(b.gid.as_ref(), "gid", &path)?;
    if uid.is_none() && gid.is_none() {
        return Err(invalid("uid or gid is required", &path));
    }
    let act = st.mgr.wake(&name).await?;
    let out = act
        .agent()
        .fs_chown(
            &path,
            None,
            uid.as_deref(),
            gid.as_deref(),
            b.recursive.unwrap_or(false),
        )
        .await
        .map_err(|e| agent_fail(e, &path))?;
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution() {
        let r = |p: &str, wd: Option<&str>| resolve(Some(p), wd).ok();
        assert_eq!(
            r("a/b", Some("/home/sprite")).as_deref(),
            Some("/home/sprite/a/b")
        );
        assert_eq!(r("../../../etc", Some("/x")).as_deref(), Some("/etc"));
        assert_eq!(r("/abs", Some("/x")).as_deref(), Some("/abs"));
        assert_eq!(r("f", None).as_deref(), Some("/f"));
        assert!(resolve(Some(""), None).is_err());
        assert!(resolve(None, None).is_err());
    }

    #[test]
    fn owner_ids() {
        let ok = |v: Value| owner_id(Some(&v), "uid", "").ok().flatten();
        assert_eq!(ok(json!(1000)).as_deref(), Some("1000"));
        assert_eq!(ok(json!("sprite")).as_deref(), Some("sprite"));
        assert_eq!(owner_id(None, "uid", "").ok(), Some(None));
        for bad in [
            json!(-1),
            json!(1.5),
            json!("a b"),
            json!("../x"),
            json!(""),
            json!([1]),
        ] {
            assert!(owner_id(Some(&bad), "uid", "").is_err(), "{bad}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(&json!("0755"), "").ok(), Some(0o755));
        assert_eq!(parse_mode(&json!("644"), "").ok(), Some(0o644));
        assert_eq!(parse_mode(&json!(493), "").ok(), Some(0o755));
        for bad in [json!("0999"), json!("rwx"), json!("77777"), json!(null)] {
            assert!(parse_mode(&bad, "").is_err(), "{bad}");
        }
    }

    #[test]
    fn agent_errors() {
        let e = den_agent::Error::Agent {
            code: "not_found".into(),
            message: "ENOENT: /x/y: No such file or directory".into(),
        };
        let FsFail::Errno {
            status, code, path, ..
        } = agent_fail(e, "/req")
        else {
            panic!()
        };
        assert_eq!(
            (status, code, path.as_str()),
            (StatusCode::NOT_FOUND, "ENOENT", "/x/y")
        );
        let e = den_agent::Error::Agent {
            code: "bad_request".into(),
            message: "EINVAL: empty path".into(),
        };
        let FsFail::Errno { code, path, .. } = agent_fail(e, "/req") else {
            panic!()
        };
        assert_eq!((code, path.as_str()), ("EINVAL", "/req"));
    }
}
