//! Filesystem requests (Sprites §2.10).
//!
//! They run inside the sprite, so paths are naturally confined to its root;
//! the agent runs as root there, and files it creates for a caller are handed
//! to the default user unless `as_root` is asked for.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::protocol::{
    FRAME_STDIN, FRAME_STDIN_EOF, FRAME_STDOUT, Request, Response, encode_frame, read_frame,
};
use crate::server::write_response;
use crate::{AgentConfig, Error, session};

/// A failed filesystem request: the response code and a message that starts
/// with the errno name (`ENOENT: /x: No such file or directory`), so the API
/// can build errno-style bodies.
#[derive(Debug)]
pub(crate) struct FsError {
    code: &'static str,
    message: String,
}

impl FsError {
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        FsError {
            code: "bad_request",
            message: format!("EINVAL: {}", message.into()),
        }
    }

    pub(crate) fn io(path: &Path, e: io::Error) -> Self {
        let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
        use nix::errno::Errno::*;
        let code = match errno {
            Some(ENOENT) => "not_found",
            Some(EACCES | EPERM | EROFS) => "permission_denied",
            Some(EISDIR) => "is_directory",
            Some(ENOTDIR) => "not_directory",
            Some(EEXIST) => "exists",
            Some(EINVAL | ENOTEMPTY | EXDEV | ENAMETOOLONG | ELOOP) => "bad_request",
            _ => "io_error",
        };
        let name = match errno {
            Some(n) => format!("{n:?}"),
            None => "EIO".into(),
        };
        let text = match errno {
            Some(n) => n.desc().to_owned(),
            None => e.to_string(),
        };
        FsError {
            code,
            message: format!("{name}: {}: {text}", path.display()),
        }
    }

    pub(crate) fn errno(path: &Path, errno: nix::errno::Errno) -> Self {
        FsError::io(path, io::Error::from_raw_os_error(errno as i32))
    }

    pub(crate) fn response(&self) -> Response {
        Response::err(self.code, self.message.clone())
    }
}

type FsResult<T> = Result<T, FsError>;

/// Resolves `path` against `working_dir` (default `/`) and normalises it
/// lexically; `..` cannot leave the root anyway.
pub(crate) fn resolve(path: &str, working_dir: Option<&str>) -> FsResult<PathBuf> {
    if path.is_empty() {
        return Err(FsError::bad("empty path"));
    }
    let wd = working_dir.filter(|w| !w.is_empty()).unwrap_or("/");
    if path.contains('\0') || wd.contains('\0') {
        return Err(FsError::bad("NUL byte in path"));
    }
    let joined = Path::new("/").join(wd).join(path);
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

fn mode_string(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn file_type(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "symlink"
    } else if t.is_dir() {
        "directory"
    } else {
        "file"
    }
}

fn entry(path: &Path, meta: &std::fs::Metadata) -> Value {
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime().max(0) as u64);
    json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        "path": path.display().to_string(),
        "type": file_type(meta),
        "size": meta.len(),
        "mode": mode_string(meta.mode()),
        "modTime": humantime::format_rfc3339_seconds(mtime).to_string(),
        "isDir": meta.file_type().is_dir(),
    })
}

fn lstat(path: &Path) -> FsResult<std::fs::Metadata> {
    std::fs::symlink_metadata(path).map_err(|e| FsError::io(path, e))
}

/// Uid/gid new files are given: the default user's unless `as_root`.
fn owner(cfg: &AgentConfig, as_root: bool) -> Option<(u32, u32)> {
    if as_root || !nix::unistd::geteuid().is_root() {
        return None;
    }
    match session::resolve_user(cfg, None) {
        Ok(u) => Some((u.uid, u.gid)),
        Err(e) => {
            tracing::warn!(error = %e, "no default user to own new files");
            None
        }
    }
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> FsResult<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| FsError::io(path, e))?;
    }
    Ok(())
}

/// Depth-first walk below `dir` (not following symlinks); parents come
/// before their children.
/// `path` (not followed if a link), and with `recursive` everything below it.
fn path_and_below(path: &Path, recursive: bool) -> FsResult<Vec<(PathBuf, std::fs::Metadata)>> {
    let meta = lstat(path)?;
    let dir = meta.is_dir();
    let mut targets = vec![(path.to_owned(), meta)];
    if recursive && dir {
        walk(path, &mut targets)?;
    }
    Ok(targets)
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> FsResult<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| FsError::io(dir, e))?
        .map(|d| d.map(|d| d.path()).map_err(|e| FsError::io(dir, e)))
        .collect::<FsResult<_>>()?;
    names.sort();
    for p in names {
        let meta = lstat(&p)?;
        let is_dir = meta.file_type().is_dir();
        out.push((p.clone(), meta));
        if is_dir {
            walk(&p, out)?;
        }
    }
    Ok(())
}

fn list(path: &Path, recursive: bool) -> FsResult<Value> {
    // The top path follows symlinks (`ls /link` lists the target directory);
    // a dangling link is still listed as itself.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => lstat(path)?,
    };
    let mut entries = Vec::new();
    if meta.is_dir() {
        let mut found = Vec::new();
        if recursive {
            walk(path, &mut found)?;
        } else {
            let mut names: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| FsError::io(path, e))?
                .filter_map(|d| d.ok().map(|d| d.path()))
                .collect();
            names.sort();
            for p in names {
                // Entries can vanish between readdir and lstat.
                if let Ok(m) = std::fs::symlink_metadata(&p) {
                    found.push((p, m));
                }
            }
        }
        entries.extend(found.iter().map(|(p, m)| entry(p, m)));
    } else {
        entries.push(entry(path, &lstat(path)?));
    }
    Ok(json!({"path": path.display().to_string(), "count": entries.len(), "entries": entries}))
}

fn delete(path: &Path, recursive: bool) -> FsResult<Value> {
    if path == Path::new("/") {
        return Err(FsError::bad("refusing to delete /"));
    }
    let meta = lstat(path)?;
    let mut deleted = Vec::new();
    if meta.file_type().is_dir() {
        if recursive {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            // Children before parents.
            for (p, m) in found.iter().rev() {
                if m.file_type().is_dir() {
                    std::fs::remove_dir(p)
                } else {
                    std::fs::remove_file(p)
                }
                .map_err(|e| FsError::io(p, e))?;
                deleted.push(p.display().to_string());
            }
        }
        std::fs::remove_dir(path).map_err(|e| FsError::io(path, e))?;
    } else {
        std::fs::remove_file(path).map_err(|e| FsError::io(path, e))?;
    }
    deleted.push(path.display().to_string());
    Ok(json!({"deleted": deleted, "count": deleted.len()}))
}

fn rename(source: &Path, dest: &Path) -> FsResult<Value> {
    lstat(source)?;
    std::fs::rename(source, dest).map_err(|e| FsError::io(dest, e))?;
    Ok(json!({"source": source.display().to_string(), "dest": dest.display().to_string()}))
}

fn copy(source: &Path, dest: &Path, recursive: bool, owner: Option<(u32, u32)>) -> FsResult<Value> {
    let meta = lstat(source)?;
    let mut copied = Vec::new();
    let mut total = 0u64;
    let mut one = |s: &Path, d: &Path, m: &std::fs::Metadata| -> FsResult<()> {
        let t = m.file_type();
        if t.is_dir() {
            std::fs::create_dir(d).map_err(|e| FsError::io(d, e))?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(|e| FsError::io(d, e))?;
        } else if t.is_symlink() {
            let target = std::fs::read_link(s).map_err(|e| FsError::io(s, e))?;
            std::os::unix::fs::symlink(target, d).map_err(|e| FsError::io(d, e))?;
        } else {
            if std::fs::symlink_metadata(d).is_ok_and(|dm| dm.is_dir()) {
                return Err(FsError::errno(d, nix::errno::Errno::EISDIR));
            }
            // std::fs::copy also copies the permission bits.
            total += std::fs::copy(s, d).map_err(|e| FsError::io(d, e))?;
        }
        chown(d, owner)?;
        copied.push(json!({"source": s.display().to_string(), "dest": d.display().to_string()}));
        Ok(())
    };
    if meta.file_type().is_dir() {
        if !recursive {
            return Err(FsError::errno(source, nix::errno::Errno::EISDIR));
        }
        if dest.starts_with(source) {
            return Err(FsError::bad("cannot copy a directory into itself"));
        }
        let mut found = Vec::new();
        walk(source, &mut found)?;
        one(source, dest, &meta)?;
        for (p, m) in &found {
            let rel = p.strip_prefix(source).unwrap_or(p);
            one(p, &dest.join(rel), m)?;
        }
    } else {
        one(source, dest, &meta)?;
    }
    Ok(json!({"copied": copied, "count": copied.len(), "totalBytes": total}))
}

fn chmod(path: &Path, mode: u32, recursive: bool) -> FsResult<Value> {
    if mode > 0o7777 {
        return Err(FsError::bad(format!("mode {mode:o} out of range")));
    }
    let targets = path_and_below(path, recursive)?;
    let mut affected = Vec::new();
    for (p, m) in targets {
        // chmod follows symlinks and link modes mean nothing on Linux.
        if m.file_type().is_symlink() {
            continue;
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::io(&p, e))?;
        affected.push(json!({"path": p.display().to_string(), "mode": mode_string(mode)}));
    }
    Ok(json!({"affected": affected, "count": affected.len()}))
}

/// A uid from a number or a user name of the sprite's passwd file.
fn uid_of(cfg: &AgentConfig, user: &str) -> FsResult<u32> {
    if let Ok(n) = user.trim().parse::<u32>() {
        return Ok(n);
    }
    crate::user::lookup(user, &cfg.passwd_path, &cfg.group_path)
        .map(|u| u.uid)
        .map_err(|_| FsError::bad(format!("unknown user {user:?}")))
}

/// A gid from a number or a group name of the sprite's group file.
fn gid_of(cfg: &AgentConfig, group: &str) -> FsResult<u32> {
    if let Ok(n) = group.trim().parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(&cfg.group_path).unwrap_or_default();
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[0] == group)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| FsError::bad(format!("unknown group {group:?}")))
}

fn chown_tree(
    cfg: &AgentConfig,
    path: &Path,
    uid: Option<&str>,
    gid: Option<&str>,
    recursive: bool,
) -> FsResult<Value> {
    if uid.is_none() && gid.is_none() {
        return Err(FsError::bad("uid or gid is required"));
    }
    let uid = uid.map(|u| uid_of(cfg, u)).transpose()?;
    let gid = gid.map(|g| gid_of(cfg, g)).transpose()?;
    let targets = path_and_below(path, recursive)?;
    let mut affected = Vec::new();
    for (p, m) in targets {
        std::os::unix::fs::lchown(&p, uid, gid).map_err(|e| FsError::io(&p, e))?;
        affected.push(json!({
            "path": p.display().to_string(),
            "uid": uid.unwrap_or(m.uid()),
            "gid": gid.unwrap_or(m.gid()),
        }));
    }
    Ok(json!({"affected": affected, "count": affected.len()}))
}

/// Runs one of the single-answer requests (list, delete, rename, copy,
/// chmod, chown) on the blocking pool.
pub(crate) async fn run(cfg: AgentConfig, req: Request) -> Response {
    let result = tokio::task::spawn_blocking(move || -> FsResult<Value> {
        match req {
            Request::FsList {
                path,
                working_dir,
                recursive,
            } => list(&resolve(&path, working_dir.as_deref())?, recursive),
            Request::FsDelete {
                path,
                working_dir,
                recursive,
            } => delete(&resolve(&path, working_dir.as_deref())?, recursive),
            Request::FsRename {
                source,
                dest,
                working_dir,
            } => rename(
                &resolve(&source, working_dir.as_deref())?,
                &resolve(&dest, working_dir.as_deref())?,
            ),
            Request::FsCopy {
                source,
                dest,
                working_dir,
                recursive,
            } => copy(
                &resolve(&source, working_dir.as_deref())?,
                &resolve(&dest, working_dir.as_deref())?,
                recursive,
                owner(&cfg, false),
            ),
            Request::FsChmod {
                path,
                working_dir,
                mode,
                recursive,
            } => chmod(&resolve(&path, working_dir.as_deref())?, mode, recursive),
            Request::FsChown {
                path,
                working_dir,
                uid,
                gid,
                recursive,
            } => chown_tree(
                &cfg,
                &resolve(&path, working_dir.as_deref())?,
                uid.as_deref(),
                gid.as_deref(),
                recursive,
            ),
            other => Err(FsError::bad(format!("not a filesystem request: {other:?}"))),
        }
    })
    .await
    .unwrap_or_else(|e| Err(FsError::bad(format!("filesystem task failed: {e}"))));
    match result {
        Ok(v) => Response {
            fs: Some(v),
            ..Response::ok()
        },
        Err(e) => e.response(),
    }
}

/// `fs_read`: ok with `{"path","size","start","end"}`, stdout frames, EOF.
pub(crate) async fn serve_read(
    path: String,
    working_dir: Option<String>,
    start: Option<u64>,
    end: Option<u64>,
    mut wr: OwnedWriteHalf,
) -> Result<(), Error> {
    let opened = async {
        let path = resolve(&path, working_dir.as_deref())?;
        // Opening a FIFO would block until a writer appears.
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| FsError::io(&path, e))?;
        if !meta.is_file() && !meta.is_dir() {
            return Err(FsError::bad(format!("{}: not a regular file", path.display())));
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| FsError::io(&path, e))?;
        let meta = file.metadata().await.map_err(|e| FsError::io(&path, e))?;
        if meta.is_dir() {
            return Err(FsError::errno(&path, nix::errno::Errno::EISDIR));
        }
        let size = meta.len();
        // Files such as those in /proc report size 0 but have content: an
        // unbounded read of them goes to EOF.
        let to_eof = size == 0 && end.is_none();
        let start = start.unwrap_or(0).min(size);
        let end = end.unwrap_or(size).clamp(start, size);
        Ok((path, file, size, start, end, to_eof))
    }
    .await;
    let (path, mut file, size, start, end, to_eof) = match opened {
        Ok(v) => v,
        Err(e) => return write_response(&mut wr, &e.response()).await,
    };
    let info = json!({"path": path.display().to_string(), "size": size, "start": start, "end": end});
    write_response(
        &mut wr,
        &Response {
            fs: Some(info),
            ..Response::ok()
        },
    )
    .await?;
    file.seek(io::SeekFrom::Start(start)).await?;
    let mut left = if to_eof { u64::MAX } else { end - start };
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            // Shrunk while we read: the client sees fewer bytes than `end`.
            break;
        }
        wr.write_all(&encode_frame(FRAME_STDOUT, &buf[..n])).await?;
        left -= n as u64;
    }
    wr.write_all(&encode_frame(FRAME_STDIN_EOF, &[])).await?;
    let _ = wr.shutdown().await;
    Ok(())
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Removes the temp file unless disarmed, so no failure path leaves one.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Creates missing parents of `dir`, handing the new ones to `owner`.
fn mkdir_parents(dir: &Path, owner: Option<(u32, u32)>) -> FsResult<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while std::fs::symlink_metadata(cur).is_err() {
        missing.push(cur.to_owned());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
    for d in missing {
        chown(&d, owner)?;
    }
    Ok(())
}

#[derive(Debug)]
pub(crate) struct WriteParams {
    pub path: String,
    pub working_dir: Option<String>,
    pub mode: Option<u32>,
    pub mkdir_parents: bool,
    pub as_root: bool,
}

/// `fs_write`: ok, then stdin frames and an EOF frame from the client, then
/// a second line `{"ok":true,"fs":{"path","size","mode"}}` once renamed.
pub(crate) async fn serve_write(
    cfg: &AgentConfig,
    p: WriteParams,
    mut rd: BufReader<OwnedReadHalf>,
    mut wr: OwnedWriteHalf,
) -> Result<(), Error> {
    let prepared = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare_write(&cfg, &p))
            .await
            .unwrap_or_else(|e| Err(FsError::bad(format!("filesystem task failed: {e}"))))
    };
    let prep = match prepared {
        Ok(v) => v,
        Err(e) => return write_response(&mut wr, &e.response()).await,
    };
    let mut guard = TempGuard(Some(prep.tmp.clone()));
    write_response(&mut wr, &Response::ok()).await?;
    let mut file = tokio::fs::File::from_std(prep.file);
    let mut size = 0u64;
    loop {
        match read_frame(&mut rd).await? {
            Some((FRAME_STDIN, data)) => {
                if let Err(e) = file.write_all(&data).await {
                    return write_response(&mut wr, &FsError::io(&prep.target, e).response()).await;
                }
                size += data.len() as u64;
            }
            Some((FRAME_STDIN_EOF, _)) => break,
            Some(_) => {}
            // Hung up before EOF: the write is abandoned, the old file stays.
            None => return Ok(()),
        }
    }
    let finished = async {
        file.flush().await.map_err(|e| FsError::io(&prep.tmp, e))?;
        drop(file);
        let (tmp, target) = (prep.tmp.clone(), prep.target.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::rename(&tmp, &target).map_err(|e| FsError::io(&target, e))
        })
        .await
        .unwrap_or_else(|e| Err(FsError::bad(format!("filesystem task failed: {e}"))))
    }
    .await;
    let resp = match finished {
        Ok(()) => {
            guard.0 = None;
            Response {
                fs: Some(json!({
                    "path": prep.target.display().to_string(),
                    "size": size,
                    "mode": mode_string(prep.mode),
                })),
                ..Response::ok()
            }
        }
        Err(e) => e.response(),
    };
    write_response(&mut wr, &resp).await
}

struct PreparedWrite {
    target: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    mode: u32,
}

/// Checks the target and opens the temp file next to it (same filesystem, so
/// the final rename is atomic), with final mode and owner already applied.
fn prepare_write(cfg: &AgentConfig, p: &WriteParams) -> FsResult<PreparedWrite> {
    let target = resolve(&p.path, p.working_dir.as_deref())?;
    if target == Path::new("/") {
        return Err(FsError::errno(&target, nix::errno::Errno::EISDIR));
    }
    if let Some(m) = p.mode
        && m > 0o7777
    {
        return Err(FsError::bad(format!("mode {m:o} out of range")));
    }
    let owner = owner(cfg, p.as_root);
    let parent = target.parent().unwrap_or(Path::new("/"));
    if p.mkdir_parents {
        mkdir_parents(parent, owner)?;
    }
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(FsError::errno(&target, nix::errno::Errno::EISDIR));
    }
    let parent_meta = std::fs::metadata(parent).map_err(|e| FsError::io(parent, e))?;
    if !parent_meta.is_dir() {
        return Err(FsError::errno(parent, nix::errno::Errno::ENOTDIR));
    }
    let mode = p
        .mode
        .or(existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.den-tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| FsError::io(&tmp, e))?;
    let mut guard = TempGuard(Some(tmp.clone()));
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| FsError::io(&tmp, e))?;
    // Replacing a file keeps its owner; a new one goes to the default user.
    match &existing {
        Some(m) => chown(
            &tmp,
            Some((m.uid(), m.gid())).filter(|_| nix::unistd::geteuid().is_root()),
        )?,
        None => chown(&tmp, owner)?,
    }
    guard.0 = None;
    Ok(PreparedWrite {
        target,
        tmp,
        file,
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution() {
        let r = |p: &str, w: Option<&str>| resolve(p, w).map(|p| p.display().to_string()).ok();
        assert_eq!(r("a/b", None).as_deref(), Some("/a/b"));
        assert_eq!(
            r("a/../b", Some("/home/sprite")).as_deref(),
            Some("/home/sprite/b")
        );
        assert_eq!(r("/etc/x", Some("/home")).as_deref(), Some("/etc/x"));
        assert_eq!(r("../../..", Some("/a")).as_deref(), Some("/"));
        assert_eq!(r("x", Some("rel")).as_deref(), Some("/rel/x"));
        assert!(r("a\0b", None).is_none());
        assert!(r("", None).is_none());
    }

    #[test]
    fn errno_codes() {
        let e = FsError::errno(Path::new("/x"), nix::errno::Errno::ENOENT);
        assert_eq!(e.code, "not_found");
        assert_eq!(e.message, "ENOENT: /x: No such file or directory");
        assert_eq!(
            FsError::errno(Path::new("/x"), nix::errno::Errno::EACCES).code,
            "permission_denied"
        );
    }
}
