//! Filesystem watches (`fs_watch`): inotify on paths of the sprite, turned
//! into the Sprites `fs/watch` messages
//! `{"type":"event","path","event":"create"|"write"|"remove"|"rename"|"chmod",
//! "timestamp","size","isDir"}` and `{"type":"error","message"}`.
//!
//! Bounds, so a watcher costs the agent a fixed amount whatever happens in
//! the sprite: at most [`MAX_SUBSCRIPTIONS`] subscriptions at once,
//! [`MAX_PATHS`] paths and [`MAX_WATCHES`] inotify watches (one per
//! directory of a recursive watch) each, and [`QUEUE`] messages waiting for
//! a slow client; what does not fit is dropped, counted, and reported in one
//! `error` message once there is room again.
//!
//! Paths resolve inside the sprite (the agent runs in its mount namespace)
//! and are looked up with the default user's filesystem ids, so a watch
//! reaches what the user `sprite` may read and nothing more.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use serde_json::{Value, json};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::Error;
use crate::fs::FsError;
use crate::protocol::{FRAME_CONTROL, Response, encode_frame};
use crate::server::{AgentInner, write_response};

/// Subscriptions served at once by one agent.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 32;
/// Paths of one subscription.
pub(crate) const MAX_PATHS: usize = 64;
/// inotify watches of one subscription (a recursive watch has one per
/// directory).
pub(crate) const MAX_WATCHES: usize = 4096;
/// Messages waiting for the client.
pub(crate) const QUEUE: usize = 1024;
/// Entries of a directory that appears in a recursive watch reported as
/// created (they may predate its watch, or it was moved in whole).
pub(crate) const MAX_BACKFILL: usize = 1024;
/// How soon a pending "events were dropped" notice is retried when no new
/// event comes to carry it.
const NOTICE_RETRY: Duration = Duration::from_millis(100);

/// One subscription's place among [`MAX_SUBSCRIPTIONS`].
struct Slot(Arc<AgentInner>);

impl Slot {
    fn take(inner: &Arc<AgentInner>) -> Option<Slot> {
        let prev = inner.fs_watches.fetch_add(1, Ordering::AcqRel);
        if prev >= MAX_SUBSCRIPTIONS {
            inner.fs_watches.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(inner.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fs_watches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// tokio's `AsyncFd` wants `AsRawFd`, which nix's `Inotify` lacks.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ATTRIB
}

/// Runs `f` with this thread's filesystem uid/gid switched to `ids`.
fn as_user<T>(ids: Option<(u32, u32)>, f: impl FnOnce() -> T) -> T {
    let Some((uid, gid)) = ids else { return f() };
    // SAFETY: plain syscalls without memory arguments. The ids are per
    // thread and `f` does not await, so no other task runs with them.
    let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
    let out = f();
    // SAFETY: as above; restores the previous ids.
    unsafe {
        libc::setfsuid(old_uid as libc::uid_t);
        libc::setfsgid(old_gid as libc::gid_t);
    }
    out
}

struct Watches {
    inotify: AsyncFd<Fd>,
    paths: HashMap<WatchDescriptor, PathBuf>,
    /// The subscribed paths: only their own deletion or move is reported
    /// from their own watch (a subdirectory's is reported by its parent).
    roots: HashSet<PathBuf>,
    recursive: bool,
    ids: Option<(u32, u32)>,
    /// The watch limit was reached (reported once).
    full: bool,
}

impl Watches {
    fn start(
        paths: &[PathBuf],
        recursive: bool,
        ids: Option<(u32, u32)>,
    ) -> Result<(Watches, Vec<Value>), FsError> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| FsError::errno(Path::new("/"), e))?;
        // SAFETY: `Fd` owns the descriptor, which stays open and the same
        // until it is dropped, together with the AsyncFd.
        let inotify = unsafe { AsyncFd::register(Fd(inotify)) }
            .map_err(|e| FsError::io(Path::new("/"), io::Error::from(e)))?;
        let mut w = Watches {
            inotify,
            paths: HashMap::new(),
            roots: paths.iter().cloned().collect(),
            recursive,
            ids,
            full: false,
        };
        let mut notes = Vec::new();
        for p in paths {
            let wd = as_user(ids, || w.inotify.get_ref().0.add_watch(p.as_path(), mask()))
                .map_err(|e| FsError::errno(p, e))?;
            w.paths.insert(wd, p.clone());
            if recursive {
                w.add_below(p, &mut notes);
            }
        }
        Ok((w, notes))
    }

    /// Watches every directory below `dir` (not following symlinks), up to
    /// the limit; directories the user may not read are left out.
    fn add_below(&mut self, dir: &Path, notes: &mut Vec<Value>) {
        let ids = self.ids;
        let mut stack = vec![dir.to_path_buf()];
        as_user(ids, || {
            while let Some(d) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in entries.flatten() {
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    if self.paths.len() >= MAX_WATCHES {
                        if !self.full {
                            self.full = true;
                            notes.push(error(format!(
                                "watch limit of {MAX_WATCHES} directories reached: changes deeper in {} are not reported",
                                dir.display()
                            )));
                        }
                        return;
                    }
                    let path = e.path();
                    if let Ok(wd) = self.inotify.get_ref().0.add_watch(path.as_path(), mask()) {
                        self.paths.insert(wd, path.clone());
                        stack.push(path);
                    }
                }
            }
        });
    }

    /// Sprites messages for a batch of inotify events.
    fn translate(&mut self, events: Vec<InotifyEvent>) -> Vec<Value> {
        let mut out = Vec::new();
        let mut last_write: Option<PathBuf> = None;
        for ev in events {
            let m = ev.mask;
            if m.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                out.push(error(
                    "the kernel's event queue overflowed: some changes were not reported",
                ));
                continue;
            }
            if m.contains(AddWatchFlags::IN_IGNORED) {
                self.paths.remove(&ev.wd);
                continue;
            }
            let Some(base) = self.paths.get(&ev.wd) else {
                continue;
            };
            let own = ev.name.is_none();
            if own && !self.roots.contains(base) {
                continue;
            }
            let path = match &ev.name {
                Some(n) => base.join(n),
                None => base.clone(),
            };
            let kind = if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                "create"
            } else if m.contains(AddWatchFlags::IN_MODIFY) {
                // A write(2) per event: one message per burst on a path.
                if last_write.as_ref() == Some(&path) {
                    continue;
                }
                last_write = Some(path.clone());
                "write"
            } else if m.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
                "remove"
            } else if m.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
                "rename"
            } else if m.contains(AddWatchFlags::IN_ATTRIB) {
                "chmod"
            } else {
                continue;
            };
            if kind != "write" {
                last_write = None;
            }
            let meta = std::fs::symlink_metadata(&path).ok();
            let is_dir = m.contains(AddWatchFlags::IN_ISDIR) || meta.as_ref().is_some_and(|m| m.is_dir());
            out.push(event(&path, kind, meta.as_ref(), is_dir));
            if self.recursive && is_dir && kind == "create" {
                let mut notes = Vec::new();
                if self.paths.len() < MAX_WATCHES
                    && let Ok(wd) = as_user(self.ids, || {
                        self.inotify.get_ref().0.add_watch(path.as_path(), mask())
                    })
                {
                    self.paths.insert(wd, path.clone());
                }
                self.add_below(&path, &mut notes);
                out.extend(notes);
                out.extend(self.backfill(&path));
            }
        }
        out
    }

    /// What is already inside a directory that just appeared, as `create`
    /// events: files made in it before its watch was added, or a whole tree
    /// moved in, would otherwise never be reported. May repeat an event
    /// inotify reports too.
    fn backfill(&self, dir: &Path) -> Vec<Value> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        as_user(self.ids, || {
            while let Some(d) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&d) else {
                    continue;
                };
                for e in entries.flatten() {
                    if out.len() >= MAX_BACKFILL {
                        return;
                    }
                    let path = e.path();
                    let meta = std::fs::symlink_metadata(&path).ok();
                    let is_dir = meta.as_ref().is_some_and(|m| m.is_dir());
                    out.push(event(&path, "create", meta.as_ref(), is_dir));
                    if is_dir {
                        stack.push(path);
                    }
                }
            }
        });
        out
    }
}

fn event(path: &Path, kind: &str, meta: Option<&std::fs::Metadata>, is_dir: bool) -> Value {
    json!({
        "type": "event",
        "path": path.display().to_string(),
        "event": kind,
        "timestamp": humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        "size": meta.map(|m| m.len()).unwrap_or(0),
        "isDir": is_dir,
    })
}

fn error(message: impl Into<String>) -> Value {
    json!({"type": "error", "message": message.into()})
}

/// Queues `msg` for the client, or counts it as dropped; a pending count
/// goes first, as one `error` message.
fn push(tx: &mpsc::Sender<Value>, msg: Value, dropped: &mut u64) {
    if !flush_notice(tx, dropped) || tx.try_send(msg).is_err() {
        *dropped += 1;
    }
}

/// Sends the pending "dropped" notice; false if there is still no room.
fn flush_notice(tx: &mpsc::Sender<Value>, dropped: &mut u64) -> bool {
    if *dropped == 0 {
        return true;
    }
    let note = error(format!(
        "{dropped} events were dropped: the client did not keep up (at most {QUEUE} wait)"
    ));
    match tx.try_send(note) {
        Ok(()) => {
            *dropped = 0;
            true
        }
        Err(_) => false,
    }
}

async fn read_loop(mut w: Watches, tx: mpsc::Sender<Value>, notes: Vec<Value>) {
    let mut dropped = 0u64;
    for n in notes {
        push(&tx, n, &mut dropped);
    }
    loop {
        let events = tokio::select! {
            ready = w.inotify.readable() => {
                let Ok(mut guard) = ready else { return };
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(events)) => events,
                    Ok(Err(e)) => {
                        push(&tx, error(format!("reading inotify events: {e}")), &mut dropped);
                        return;
                    }
                    Err(_would_block) => continue,
                }
            }
            _ = tokio::time::sleep(NOTICE_RETRY), if dropped > 0 => {
                flush_notice(&tx, &mut dropped);
                continue;
            }
            _ = tx.closed() => return,
        };
        for msg in w.translate(events) {
            push(&tx, msg, &mut dropped);
        }
    }
}

/// Serves one `fs_watch` request: validates and watches the paths, answers
/// `{"ok":true,"fs":{"paths":[…]}}` (absolute paths), then streams control
/// frames until the client closes.
pub(crate) async fn serve(
    inner: Arc<AgentInner>,
    paths: Vec<String>,
    working_dir: Option<String>,
    recursive: bool,
    mut rd: BufReader<OwnedReadHalf>,
    mut wr: OwnedWriteHalf,
) -> Result<(), Error> {
    let Some(_slot) = Slot::take(&inner) else {
        let e = FsError::bad(format!(
            "too many filesystem watches at once (at most {MAX_SUBSCRIPTIONS})"
        ));
        return write_response(&mut wr, &e.response()).await;
    };
    if paths.is_empty() || paths.len() > MAX_PATHS {
        let e = FsError::bad(format!("watch 1 to {MAX_PATHS} paths, not {}", paths.len()));
        return write_response(&mut wr, &e.response()).await;
    }
    let resolved = match paths
        .iter()
        .map(|p| crate::fs::resolve(p, working_dir.as_deref()))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => return write_response(&mut wr, &e.response()).await,
    };
    let ids = if nix::unistd::geteuid().is_root() {
        crate::session::resolve_user(&inner.config, None)
            .ok()
            .map(|u| (u.uid, u.gid))
    } else {
        None
    };
    let (watches, notes) = match Watches::start(&resolved, recursive, ids) {
        Ok(w) => w,
        Err(e) => return write_response(&mut wr, &e.response()).await,
    };
    let shown: Vec<String> = resolved.iter().map(|p| p.display().to_string()).collect();
    let resp = Response {
        fs: Some(json!({ "paths": shown })),
        ..Response::ok()
    };
    write_response(&mut wr, &resp).await?;
    drop(inner);
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let reader = tokio::spawn(read_loop(watches, tx, notes));
    let _stop = AbortOnDrop(reader);
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(v) => {
                    let payload = serde_json::to_vec(&v)?;
                    wr.write_all(&encode_frame(FRAME_CONTROL, &payload)).await?;
                }
                None => return Ok(()),
            },
            // The client closing ends the subscription.
            r = rd.read(&mut probe) => if matches!(r, Ok(0) | Err(_)) { return Ok(()) },
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
