//! The tool table: each tool's name, description and input schema, and what
//! it does, which is always one or two calls of the REST API ([`Api`]).
//!
//! Errors: a call the API refuses (a missing sprite, a viewer token, a bad
//! path) or arguments that don't fit the schema come back as a tool result
//! with `isError: true` and the API's message, so the agent can correct
//! itself; only an unknown tool name is a JSON-RPC error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use base64::Engine;
use http_body_util::BodyExt;
use rmcp::ErrorData;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool, ToolAnnotations};
use serde_json::{Map, Value, json};

use super::rest::{Api, Failure, Outcome};

pub const INSTRUCTIONS: &str = "den runs sprites: persistent Linux computers (Debian, user `sprite`, passwordless sudo,
home /home/sprite) that sleep when idle and wake on the next call. Create one with create_sprite, run commands with \
exec, move files with fs_read/fs_write/fs_list, save and roll back the whole disk with checkpoint_create/\
checkpoint_restore, branch it with fork_sprite, keep servers running with service_create, and share one over HTTP \
with get_url. Every tool takes the sprite's name as `sprite`.";

/// Default and largest run time of one `exec`, seconds.
pub const EXEC_DEFAULT_TIMEOUT: u64 = 60;
pub const EXEC_MAX_TIMEOUT: u64 = 600;
/// Output kept per stream of one `exec`; the rest is counted, not kept.
pub const EXEC_OUTPUT_CAP: usize = 256 << 10;
/// Largest file `fs_read` returns (a longer one is cut, and says so).
pub const READ_CAP: u64 = 1 << 20;
/// Most characters of a `service_logs` answer.
const MAX_LOG_LINES: u64 = 1000;

/// `exec`'s `command` runs in bash, or in sh on an image without bash.
const SHELL: &str = "/bin/sh";
const BASH_OR_SH: &str =
    r#"if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; else exec sh -c "$1"; fi"#;

const SPRITE: &str = "Name of the sprite (as listed by list_sprites).";

fn sprite_prop() -> Value {
    json!({"type": "string", "description": SPRITE, "minLength": 1, "maxLength": 63})
}

fn schema(props: Value, required: &[&str]) -> Arc<JsonObject> {
    let Value::Object(obj) = json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    }) else {
        unreachable!("a JSON object literal")
    };
    Arc::new(obj)
}

fn tool(name: &'static str, description: &'static str, input: Arc<JsonObject>, ann: ToolAnnotations) -> Tool {
    let mut t = Tool::new(name, description, input);
    t.annotations = Some(ann);
    t
}

fn read_only() -> ToolAnnotations {
    ToolAnnotations::new()
        .read_only(true)
        .destructive(false)
        .idempotent(true)
        .open_world(false)
}

fn changes(destructive: bool, idempotent: bool) -> ToolAnnotations {
    ToolAnnotations::new()
        .read_only(false)
        .destructive(destructive)
        .idempotent(idempotent)
        .open_world(false)
}

/// Every tool, in the order `tools/list` gives them.
pub fn all() -> Vec<Tool> {
    vec![
        tool(
            "list_sprites",
            "List the sprites this token can see, with each one's status (running, warm = paused, cold = stopped; \
             any of them wakes on use), URL and last activity. Returns {sprites: [...], has_more}.",
            schema(
                json!({"prefix": {"type": "string", "description": "Only sprites whose name starts with this."}}),
                &[],
            ),
            read_only(),
        ),
        tool(
            "create_sprite",
            "Create a new sprite: a persistent Linux computer (Debian, user `sprite` with passwordless sudo,
             home /home/sprite, network access per its policy). It is ready for exec when this returns. \
             Returns the sprite object (name, status, url).",
            schema(
                json!({
                    "name": {"type": "string", "description": "New sprite's name: lowercase letters, digits and \
                        '-', starting with a letter, at most 63 characters.", "pattern": "^[a-z][a-z0-9-]*$",
                        "minLength": 1, "maxLength": 63},
                    "url_auth": {"type": "string", "enum": ["sprite", "public"], "description": "Who may open the \
                        sprite's URL: 'sprite' (default) needs a token, 'public' is anyone."}
                }),
                &["name"],
            ),
            changes(false, false),
        ),
        tool(
            "delete_sprite",
            "Delete a sprite with its disk, checkpoints and services. This cannot be undone.",
            schema(json!({"sprite": sprite_prop()}), &["sprite"]),
            changes(true, true),
        ),
        tool(
            "exec",
            "Run a command in a sprite and wait for it to finish. Give either `command` (a bash command line:
             pipes, &&, redirections and globs work) or `argv` (a program and its arguments, no shell). Runs as \
             user `sprite` in /home/sprite unless `cwd` says otherwise; use sudo for root. Returns {exit_code,
             stdout, stderr, timed_out, stdout_truncated, stderr_truncated}: a non-zero exit_code is a normal \
             result, not a tool error. The command is killed after `timeout_seconds`. Each stream keeps its first \
             256 KiB. Nothing is interactive: give input with `stdin`.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "command": {"type": "string", "description": "Command line run with `bash -c` (`sh -c` \
                        on an image without bash). Exactly one of command and argv.", "minLength": 1},
                    "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "Program \
                        and arguments, run without a shell. Exactly one of command and argv."},
                    "stdin": {"type": "string", "description": "Text given to the command's standard input \
                        (closed after it). Without it stdin is empty."},
                    "cwd": {"type": "string", "description": "Working directory (absolute path). Default \
                        /home/sprite."},
                    "env": {"type": "object", "additionalProperties": {"type": "string"}, "description":
                        "Environment variables added to the sprite's usual environment, e.g. {\"DEBUG\": \"1\"}."},
                    "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": EXEC_MAX_TIMEOUT, "default":
                        EXEC_DEFAULT_TIMEOUT, "description": "Kill the command after this many seconds (default \
                        60, at most 600). For longer jobs start a service instead."}
                }),
                &["sprite"],
            ),
            ToolAnnotations::new().read_only(false).destructive(true).idempotent(false).open_world(true),
        ),
        tool(
            "fs_read",
            "Read a file of a sprite. Returns {path, content, encoding, size, truncated}: `content` is the text \
             (encoding 'text'), or base64 (encoding 'base64') when the file is not UTF-8 or encoding 'base64' \
             was asked. At most 1 MiB from `offset` is returned; `truncated` says there is more.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "path": {"type": "string", "description": "Absolute path, or relative to /home/sprite.",
                        "minLength": 1},
                    "offset": {"type": "integer", "minimum": 0, "default": 0, "description": "First byte to \
                        read."},
                    "encoding": {"type": "string", "enum": ["text", "base64"], "default": "text",
                        "description": "'base64' for binary files."}
                }),
                &["sprite", "path"],
            ),
            read_only(),
        ),
        tool(
            "fs_write",
            "Write a whole file in a sprite, replacing it atomically (missing parent directories are created). \
             New files belong to user `sprite`. Returns {path, size}.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "path": {"type": "string", "description": "Absolute path, or relative to /home/sprite.",
                        "minLength": 1},
                    "content": {"type": "string", "description": "The file's new content (at most about 3 MiB)."},
                    "encoding": {"type": "string", "enum": ["text", "base64"], "default": "text",
                        "description": "How `content` is given: 'text' (UTF-8) or 'base64' for binary data."},
                    "mode": {"type": "string", "pattern": "^[0-7]{3,4}$", "description": "Octal permissions,
                        e.g. '755' for a script. Default: the replaced file's, else 644."}
                }),
                &["sprite", "path", "content"],
            ),
            changes(true, true),
        ),
        tool(
            "fs_list",
            "List a directory of a sprite: each entry's name, path, type (file, dir, symlink), size, mode and \
             modification time.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "path": {"type": "string", "description": "Directory: absolute, or relative to \
                        /home/sprite. Default /home/sprite."},
                    "recursive": {"type": "boolean", "default": false, "description": "Include everything \
                        below, not only the directory's own entries."}
                }),
                &["sprite"],
            ),
            read_only(),
        ),
        tool(
            "checkpoint_create",
            "Save the sprite's whole disk as a new checkpoint (instant; running processes keep running). \
             Returns {id} like 'v3', to give to checkpoint_restore or fork_sprite.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "comment": {"type": "string", "maxLength": 4096, "description": "What this checkpoint is \
                        (shown by checkpoint_list)."}
                }),
                &["sprite"],
            ),
            changes(false, false),
        ),
        tool(
            "checkpoint_list",
            "List a sprite's checkpoints, newest first: id, creation time and comment.",
            schema(json!({"sprite": sprite_prop()}), &["sprite"]),
            read_only(),
        ),
        tool(
            "checkpoint_restore",
            "Roll the sprite's whole disk back to a checkpoint. Processes are restarted and every change since \
             is lost (checkpoint first to keep it). Returns when the sprite runs again.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "checkpoint": {"type": "string", "description": "Checkpoint id from checkpoint_list or \
                        checkpoint_create, e.g. 'v3'.", "minLength": 1}
                }),
                &["sprite", "checkpoint"],
            ),
            changes(true, true),
        ),
        tool(
            "fork_sprite",
            "Create a new sprite as a copy of this one: of a checkpoint, or of its current disk. Instant; the \
             two then change independently. Returns the new sprite object.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "name": {"type": "string", "description": "The new sprite's name (same rules as \
                        create_sprite).", "pattern": "^[a-z][a-z0-9-]*$", "minLength": 1, "maxLength": 63},
                    "checkpoint": {"type": "string", "description": "Checkpoint id to copy, e.g. 'v2'. Default:
                        the current disk."}
                }),
                &["sprite", "name"],
            ),
            changes(false, false),
        ),
        tool(
            "service_create",
            "Create or replace a service: a long-running process the sprite keeps running (restarted when it \
             exits, started again when the sprite wakes), e.g. a web server. `cmd` is a program run without a \
             shell (use cmd 'bash' with args ['-c', '...'] for a command line). Returns the service's first \
             events (started, exit, ...) from its first seconds.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "name": {"type": "string", "description": "Service name: letters, digits, '-' and '_'.",
                        "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*$", "minLength": 1, "maxLength": 63},
                    "cmd": {"type": "string", "description": "Program to run, e.g. 'python3' or \
                        '/usr/bin/node'.", "minLength": 1},
                    "args": {"type": "array", "items": {"type": "string"}, "description": "Its arguments."},
                    "needs": {"type": "array", "items": {"type": "string"}, "description": "Services that must \
                        be running before this one starts."},
                    "http_port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "Port the \
                        service serves HTTP on: the sprite's URL (get_url) goes to it. One service per sprite."}
                }),
                &["sprite", "name", "cmd"],
            ),
            changes(true, true),
        ),
        tool(
            "service_logs",
            "The last lines of a service's combined stdout and stderr (kept after the service stops).",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "name": {"type": "string", "description": "Service name.", "minLength": 1},
                    "lines": {"type": "integer", "minimum": 1, "maximum": MAX_LOG_LINES, "default": 100,
                        "description": "How many trailing lines."}
                }),
                &["sprite", "name"],
            ),
            read_only(),
        ),
        tool(
            "get_url",
            "The sprite's HTTP URL, which reaches the service that has an http_port. With `auth`, first sets \
             who may open it: 'public' (anyone) or 'sprite' (only requests with a token). Returns {url, auth}.",
            schema(
                json!({
                    "sprite": sprite_prop(),
                    "auth": {"type": "string", "enum": ["sprite", "public"], "description": "Change who may open \
                        the URL. Omit to leave it as it is."}
                }),
                &["sprite"],
            ),
            changes(false, true),
        ),
    ]
}

/// Run tool `name`. `Err` only for a tool that does not exist.
pub async fn call(api: &Api, name: &str, args: JsonObject) -> Result<CallToolResult, ErrorData> {
    let a = Args(&args);
    let outcome = match name {
        "list_sprites" => list_sprites(api, a).await,
        "create_sprite" => create_sprite(api, a).await,
        "delete_sprite" => delete_sprite(api, a).await,
        "exec" => exec(api, a).await,
        "fs_read" => fs_read(api, a).await,
        "fs_write" => fs_write(api, a).await,
        "fs_list" => fs_list(api, a).await,
        "checkpoint_create" => checkpoint_create(api, a).await,
        "checkpoint_list" => checkpoint_list(api, a).await,
        "checkpoint_restore" => checkpoint_restore(api, a).await,
        "fork_sprite" => fork_sprite(api, a).await,
        "service_create" => service_create(api, a).await,
        "service_logs" => service_logs(api, a).await,
        "get_url" => get_url(api, a).await,
        other => {
            return Err(ErrorData::invalid_params(
                format!("no tool named {other:?}; tools/list names them"),
                None,
            ));
        }
    };
    Ok(match outcome {
        Ok(v) => CallToolResult::structured(v),
        Err(f) => {
            let mut r = CallToolResult::error(vec![ContentBlock::text(f.message.clone())]);
            r.structured_content = Some(json!({
                "error": f.code,
                "message": f.message,
                "status": f.status.as_u16(),
            }));
            r
        }
    })
}

/// A tool's arguments, with errors that name the argument.
#[derive(Clone, Copy)]
struct Args<'a>(&'a JsonObject);

impl Args<'_> {
    fn str(&self, key: &str) -> Outcome<Option<&str>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Failure::invalid(format!("`{key}` must be a string"))),
        }
    }

    fn need(&self, key: &str) -> Outcome<&str> {
        self.str(key)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Failure::invalid(format!("`{key}` is required")))
    }

    fn int(&self, key: &str, min: u64, max: u64) -> Outcome<Option<u64>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .filter(|n| (min..=max).contains(n))
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("`{key}` must be an integer from {min} to {max}"))),
        }
    }

    fn bool(&self, key: &str) -> Outcome<bool> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(Failure::invalid(format!("`{key}` must be true or false"))),
        }
    }

    fn strings(&self, key: &str) -> Outcome<Option<Vec<String>>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("`{key}` must be an array of strings"))),
            Some(_) => Err(Failure::invalid(format!("`{key}` must be an array of strings"))),
        }
    }

    fn one_of<'v>(&self, key: &str, allowed: &[&'v str]) -> Outcome<Option<&'v str>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => allowed
                .iter()
                .find(|a| **a == s)
                .copied()
                .map(Some)
                .ok_or_else(|| Failure::invalid(format!("`{key}` must be one of {allowed:?}"))),
        }
    }
}

fn sprite_url(name: &str, rest: &[&str], query: &[(&str, &str)]) -> String {
    let mut segs = vec!["v1", "sprites", name];
    segs.extend_from_slice(rest);
    Api::url(&segs, query)
}

async fn list_sprites(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let prefix = a.str("prefix")?.unwrap_or_default();
    let page = api
        .json(
            Method::GET,
            &Api::url(&["v1", "sprites"], &[("prefix", prefix), ("max_results", "100")]),
            None,
        )
        .await?;
    let sprites: Vec<Value> = page["sprites"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|s| {
                    let mut out = Map::new();
                    for k in ["name", "status", "url", "last_running_at", "created_at"] {
                        if let Some(v) = s.get(k) {
                            out.insert(k.into(), v.clone());
                        }
                    }
                    Value::Object(out)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({"sprites": sprites, "has_more": page["has_more"].as_bool().unwrap_or(false)}))
}

async fn create_sprite(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let name = a.need("name")?;
    let mut body = json!({"name": name});
    if let Some(auth) = a.one_of("url_auth", &["sprite", "public"])? {
        body["url_settings"] = json!({"auth": auth});
    }
    api.json(Method::POST, &Api::url(&["v1", "sprites"], &[]), Some(body))
        .await
}

async fn delete_sprite(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let name = a.need("sprite")?;
    api.json(Method::DELETE, &sprite_url(name, &[], &[]), None)
        .await?;
    Ok(json!({"deleted": name}))
}

/// What one exec keeps of a stream: its first bytes, and how many it had.
#[derive(Default)]
struct Capped {
    kept: Vec<u8>,
    total: usize,
}

impl Capped {
    fn push(&mut self, data: &[u8]) {
        self.total += data.len();
        let room = EXEC_OUTPUT_CAP.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

async fn exec(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let argv = match (a.str("command")?, a.strings("argv")?) {
        (Some(cmd), None) if !cmd.trim().is_empty() => {
            [SHELL, "-c", BASH_OR_SH, "sh", cmd].map(str::to_string).to_vec()
        }
        (None, Some(argv)) if argv.first().is_some_and(|p| !p.is_empty()) => argv,
        (Some(_), Some(_)) => return Err(Failure::invalid("give either `command` or `argv`, not both")),
        _ => {
            return Err(Failure::invalid(
                "`command` (a shell command line) or `argv` is required",
            ));
        }
    };
    let timeout = a
        .int("timeout_seconds", 1, EXEC_MAX_TIMEOUT)?
        .unwrap_or(EXEC_DEFAULT_TIMEOUT);
    let stdin = a.str("stdin")?;
    let timeout_arg = format!("{timeout}s");
    // The API's `env` replaces the whole environment (PATH, HOME…); an
    // agent means to add to it, which `env NAME=value… argv` does.
    let mut assignments = Vec::new();
    match a.0.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(env)) => {
            for (k, v) in env {
                let v = v
                    .as_str()
                    .ok_or_else(|| Failure::invalid(format!("`env.{k}` must be a string")))?;
                let mut chars = k.chars();
                let name_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !name_ok {
                    return Err(Failure::invalid(format!(
                        "{k:?} is not an environment variable name (letters, digits and _)"
                    )));
                }
                assignments.push(format!("{k}={v}"));
            }
        }
        Some(_) => return Err(Failure::invalid("`env` must be an object of strings")),
    }
    let argv = if assignments.is_empty() {
        argv
    } else {
        std::iter::once("env".to_string())
            .chain(assignments)
            .chain(argv)
            .collect()
    };
    let mut query: Vec<(&str, String)> = argv.iter().map(|c| ("cmd", c.clone())).collect();
    query.push(("timeout", timeout_arg));
    if let Some(cwd) = a.str("cwd")? {
        query.push(("dir", cwd.to_string()));
    }
    if stdin.is_some() {
        query.push(("stdin", "true".into()));
    }
    let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let uri = sprite_url(sprite, &["exec"], &pairs);
    let body = stdin.map_or_else(Body::empty, |s| Body::from(s.to_string()));
    let started = Instant::now();
    let resp = api.send(Method::POST, &uri, body, false).await?;
    // Frames of §3.2: 0x01 stdout, 0x02 stderr, then 0x03 + exit code. In
    // process each body frame is one of them, as the handler sent it.
    let (mut out, mut err) = (Capped::default(), Capped::default());
    let mut exit: Option<u8> = None;
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::new(StatusCode::BAD_GATEWAY, "internal", e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        match data.first() {
            Some(0x01) => out.push(&data[1..]),
            Some(0x02) => err.push(&data[1..]),
            Some(0x03) => exit = data.get(1).copied(),
            _ => {}
        }
    }
    let Some(code) = exit else {
        return Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the command's session ended without an exit status (the sprite stopped or the server is shutting down)",
        ));
    };
    // The HTTP exec has no timeout frame: the limit ends the command with
    // SIGTERM (143), then SIGKILL (137), and only once it has passed.
    let timed_out = matches!(code, 137 | 143) && started.elapsed() >= Duration::from_secs(timeout);
    Ok(json!({
        "exit_code": code,
        "stdout": out.text(),
        "stderr": err.text(),
        "timed_out": timed_out,
        "stdout_truncated": out.total > out.kept.len(),
        "stderr_truncated": err.total > err.kept.len(),
    }))
}

async fn fs_read(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let path = a.need("path")?;
    let offset = a.int("offset", 0, u64::MAX / 2)?.unwrap_or(0);
    let base64 = a.one_of("encoding", &["text", "base64"])? == Some("base64");
    // One byte past the cap tells whether there is more.
    let (start, end) = (offset.to_string(), (offset + READ_CAP + 1).to_string());
    let uri = sprite_url(
        sprite,
        &["fs", "read"],
        &[
            ("path", path),
            ("workingDir", "/home/sprite"),
            ("start", &start),
            ("end", &end),
        ],
    );
    let resp = api.send(Method::GET, &uri, Body::empty(), false).await?;
    let mut bytes = super::rest::read_all(resp.into_body(), READ_CAP as usize + 1)
        .await?
        .to_vec();
    let truncated = bytes.len() as u64 > READ_CAP;
    bytes.truncate(READ_CAP as usize);
    let size = bytes.len();
    let (content, encoding) = match (base64, String::from_utf8(bytes)) {
        (false, Ok(text)) => (text, "text"),
        (_, Ok(text)) => (base64::engine::general_purpose::STANDARD.encode(text), "base64"),
        (_, Err(e)) => (
            base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            "base64",
        ),
    };
    Ok(json!({
        "path": path,
        "content": content,
        "encoding": encoding,
        "size": size,
        "offset": offset,
        "truncated": truncated,
    }))
}

async fn fs_write(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let path = a.need("path")?;
    let content = a
        .str("content")?
        .ok_or_else(|| Failure::invalid("`content` is required"))?;
    let data = match a.one_of("encoding", &["text", "base64"])? {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(content.trim())
            .map_err(|e| Failure::invalid(format!("`content` is not valid base64: {e}")))?,
        _ => content.as_bytes().to_vec(),
    };
    let size = data.len();
    let mut query = vec![("path", path), ("workingDir", "/home/sprite"), ("mkdir", "true")];
    if let Some(mode) = a.str("mode")? {
        query.push(("mode", mode));
    }
    let uri = sprite_url(sprite, &["fs", "write"], &query);
    let resp = api.send(Method::PUT, &uri, Body::from(data), false).await?;
    let answer = super::rest::read_all(resp.into_body(), 1 << 16).await?;
    let written: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    Ok(json!({
        "path": written.get("path").cloned().unwrap_or_else(|| path.into()),
        "size": size,
    }))
}

async fn fs_list(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let path = a.str("path")?.filter(|p| !p.is_empty()).unwrap_or("/home/sprite");
    let recursive = if a.bool("recursive")? { "true" } else { "false" };
    let uri = sprite_url(
        sprite,
        &["fs", "list"],
        &[
            ("path", path),
            ("workingDir", "/home/sprite"),
            ("recursive", recursive),
        ],
    );
    api.json(Method::GET, &uri, None).await
}

/// The first `vN` in progress lines like `  ID: v3` or `Checkpoint v3 created`.
fn checkpoint_id_in(lines: &[Value]) -> Option<String> {
    lines.iter().find_map(|l| {
        let text = l["data"].as_str()?;
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .find(|w| w.len() > 1 && w.starts_with('v') && w[1..].bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
    })
}

async fn checkpoint_create(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let comment = a.str("comment")?.unwrap_or_default();
    let lines = api
        .ndjson(
            Method::POST,
            &sprite_url(sprite, &["checkpoint"], &[]),
            Some(json!({"comment": comment})),
        )
        .await?;
    let id = checkpoint_id_in(&lines).ok_or_else(|| {
        Failure::new(
            StatusCode::BAD_GATEWAY,
            "internal",
            "the checkpoint's id is missing",
        )
    })?;
    Ok(json!({"id": id, "comment": comment}))
}

async fn checkpoint_list(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let list = api
        .json(Method::GET, &sprite_url(sprite, &["checkpoints"], &[]), None)
        .await?;
    Ok(json!({"checkpoints": list}))
}

async fn checkpoint_restore(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let id = crate::api::checkpoint_id(a.need("checkpoint")?);
    api.ndjson(
        Method::POST,
        &sprite_url(sprite, &["checkpoints", &id, "restore"], &[]),
        None,
    )
    .await?;
    Ok(json!({"restored": id, "sprite": sprite}))
}

async fn fork_sprite(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let mut body = json!({"name": a.need("name")?});
    if let Some(ck) = a.str("checkpoint")?.filter(|c| !c.is_empty()) {
        body["checkpoint"] = crate::api::checkpoint_id(ck).into();
    }
    api.json(Method::POST, &sprite_url(sprite, &["fork"], &[]), Some(body))
        .await
}

async fn service_create(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let name = a.need("name")?;
    let mut body = json!({"cmd": a.need("cmd")?});
    if let Some(args) = a.strings("args")? {
        body["args"] = json!(args);
    }
    if let Some(needs) = a.strings("needs")? {
        body["needs"] = json!(needs);
    }
    if let Some(port) = a.int("http_port", 1, 65535)? {
        body["http_port"] = json!(port);
    }
    let events = api
        .ndjson(
            Method::PUT,
            &sprite_url(sprite, &["services", name], &[("duration", "2s")]),
            Some(body),
        )
        .await?;
    Ok(json!({"service": name, "events": events}))
}

async fn service_logs(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let name = a.need("name")?;
    let lines = a.int("lines", 1, MAX_LOG_LINES)?.unwrap_or(100).to_string();
    let uri = sprite_url(sprite, &["services", name, "logs"], &[("lines", &lines)]);
    let resp = api.send(Method::GET, &uri, Body::empty(), false).await?;
    let bytes = super::rest::read_all(resp.into_body(), super::rest::RESPONSE_CAP).await?;
    Ok(json!({"service": name, "logs": String::from_utf8_lossy(&bytes)}))
}

async fn get_url(api: &Api, a: Args<'_>) -> Outcome<Value> {
    let sprite = a.need("sprite")?;
    let uri = sprite_url(sprite, &[], &[]);
    let info = match a.one_of("auth", &["sprite", "public"])? {
        Some(auth) => {
            api.json(Method::PUT, &uri, Some(json!({"url_settings": {"auth": auth}})))
                .await?
        }
        None => api.json(Method::GET, &uri, None).await?,
    };
    Ok(json!({"url": info["url"], "auth": info["url_settings"]["auth"]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_a_description_and_an_object_schema() {
        let tools = all();
        assert_eq!(tools.len(), 14);
        for t in &tools {
            assert!(
                t.description.as_deref().is_some_and(|d| d.len() > 40),
                "{}",
                t.name
            );
            assert_eq!(t.input_schema["type"], "object", "{}", t.name);
            let props = t.input_schema["properties"].as_object().unwrap();
            for r in t.input_schema["required"].as_array().unwrap() {
                assert!(props.contains_key(r.as_str().unwrap()), "{}: {r}", t.name);
            }
            for (k, p) in props {
                assert!(p["description"].is_string(), "{}.{k} has no description", t.name);
            }
        }
    }

    #[test]
    fn checkpoint_ids_are_read_from_progress_lines() {
        let lines = vec![
            json!({"type": "info", "data": "Creating checkpoint..."}),
            json!({"type": "info", "data": "  ID: v12"}),
        ];
        assert_eq!(checkpoint_id_in(&lines).as_deref(), Some("v12"));
        assert_eq!(checkpoint_id_in(&lines[..1]), None);
    }
}
