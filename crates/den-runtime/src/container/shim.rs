//! The runtime shim: the helper process that runs libcontainer.
//!
//! libcontainer forks, uses `Rc` and changes process-wide state (mount
//! namespace, signal dispositions), so it must not run inside the threaded
//! tokio server. The `den` binary exposes [`shim_main`] as the hidden
//! subcommand `den runtime-shim …`; [`super::ContainerBackend`] spawns it for
//! every create and waits for it. The shim exits as soon as the sprite's PID 1
//! is set up and waiting for `start` (or, for `run`, started), so no shim
//! process stays around.
//!
//! `create <state-root> <id>` (and `run`, which also starts PID 1):
//! 1. reads `<state-root>/bundles/<id>/sprite.json` (the [`SpriteSpec`]),
//! 2. joins `netns_path` if given, unshares its mount namespace (private propagation) and mounts the
//!    overlay there, so the host's mount table never sees the sprite's rootfs
//!    and nothing leaks if den dies: the mount lives exactly as long as the
//!    sprite's own mount namespace, which is copied from this one,
//! 3. lets libcontainer create the container from `config.json` in the bundle
//!    (namespaces, id maps, rootfs setup, cgroups, seccomp),
//! 4. prints PID 1's host pid on stdout.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};

use super::{Layout, spec};
use crate::backend::{AGENT_LISTEN_FD, RuntimeError, SpriteSpec};

/// Entry point of `den runtime-shim ARGS…`. Returns the process exit code;
/// errors are printed to stderr, which the backend returns in
/// [`RuntimeError::Shim`].
pub fn shim_main(args: &[OsString]) -> i32 {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let res = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["create", root, id] => create(&Layout::new(Path::new(root)), id, false),
        ["run", root, id] => create(&Layout::new(Path::new(root)), id, true),
        // Returns only on failure: on success the process is runsc.
        [
            verb @ ("gvisor-create" | "gvisor-start" | "gvisor-restore"),
            root,
            id,
            runsc @ ..,
        ] if !runsc.is_empty() => Err(crate::gvisor::shim_exec(verb, Path::new(root), id, runsc)),
        _ => Err(RuntimeError::InvalidSpec(format!(
            "usage: runtime-shim create|run STATE_ROOT ID | gvisor-{{create,start,restore}} STATE_ROOT ID RUNSC ARGS… (got {args:?})"
        ))),
    };
    match res {
        Ok(pid) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{pid}");
            let _ = out.flush();
            0
        }
        Err(e) => {
            eprintln!("{}", error_chain(&e));
            1
        }
    }
}

/// `run`: create, then let PID 1 exec before exiting (what the caller's
/// `start` would do, without a second round trip through the state file).
fn create(layout: &Layout, id: &str, run: bool) -> Result<i32, RuntimeError> {
    let bundle = layout.bundle(id);
    let spec_path = bundle.join(super::SPRITE_JSON);
    let text =
        fs::read(&spec_path).map_err(|e| RuntimeError::io(format!("read {}", spec_path.display()), e))?;
    let sprite: SpriteSpec = serde_json::from_slice(&text)
        .map_err(|e| RuntimeError::InvalidSpec(format!("{}: {e}", spec_path.display())))?;
    // Before anything else opens a descriptor, so the listener can take its
    // fixed number; kept open until libcontainer has cloned PID 1.
    let listener = match &sprite.agent_listener {
        Some(p) => Some(bind_agent_listener(p)?),
        None => None,
    };

    if let Some(netns) = &sprite.netns_path {
        // Joined here, as host root, and inherited by the container (see spec.rs).
        let f = File::open(netns).map_err(|e| RuntimeError::io(format!("open {}", netns.display()), e))?;
        setns(&f, CloneFlags::CLONE_NEWNET)
            .map_err(|e| RuntimeError::io(format!("setns {}", netns.display()), e.into()))?;
    }
    private_mount_ns()?;

    if sprite.netns_path.is_some() {
        // See spec.rs: the sprite's /sys when it can't mount its own.
        let sys = bundle.join(super::SYSFS_DIR);
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
        mount(Some("sysfs"), &sys, Some("sysfs"), flags, None::<&str>)
            .map_err(|e| RuntimeError::io(format!("mount sysfs on {}", sys.display()), e.into()))?;
    }
    let merged = bundle.join(super::ROOTFS_DIR);
    prepare_upper(&sprite)?;
    mount_overlay(&sprite, &merged)?;
    stage_mounts(&sprite, &bundle.join(super::STAGE_DIR))?;

    let (stdin, console, stderr) = console_stdio(&sprite)?;

    let engine = |e: libcontainer::error::LibcontainerError| RuntimeError::Engine(error_chain(&e));
    let container = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(layout.engine_root())
        .map_err(engine)?
        // Descriptors 3.. up to this count survive into PID 1; every other
        // one is closed on exec.
        .with_preserved_fds(i32::from(listener.is_some()))
        .with_stdin(stdin)
        .with_stdout(console)
        .with_stderr(stderr)
        .as_init(&bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(engine)?;
    drop(listener);
    let mut container = container;
    if run {
        container.start().map_err(engine)?;
    }
    container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| RuntimeError::Engine("container has no pid after create".into()))
}

/// Binds the agent's listening socket at `path` (a host path, in a directory
/// only host root can write) and moves it to [`AGENT_LISTEN_FD`], inheritable,
/// for PID 1. Whatever was at that number is a descriptor the shim inherited
/// by accident; replacing it also keeps it out of the sprite.
fn bind_agent_listener(path: &Path) -> Result<OwnedFd, RuntimeError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RuntimeError::io(format!("remove {}", path.display()), e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| RuntimeError::io(format!("bind {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::io(format!("chmod {}", path.display()), e))?;
    move_to_fd(OwnedFd::from(listener), AGENT_LISTEN_FD)
        .map_err(|e| RuntimeError::io("moving the agent listener to its descriptor", e))
}

/// `dup2(fd, target)`: the copy at `target` is inheritable (dup2 never sets
/// close-on-exec), the original is closed.
fn move_to_fd(fd: OwnedFd, target: RawFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() == target {
        // Already there, but born close-on-exec.
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
        return Ok(fd);
    }
    // SAFETY: dup2 only manipulates the descriptor table; `fd` is open for
    // the call, and ownership of `target` is taken right below.
    let rc = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: dup2 succeeded, so `target` is an open descriptor that nothing
    // else in this process owns (any previous one was closed by dup2).
    Ok(unsafe { OwnedFd::from_raw_fd(target) })
}

/// Give the upper directory the owner and mode of the image's root directory
/// (as seen through the idmapped lower), unless it already has them.
/// overlayfs shows the upper root's attributes for `/`, so a root-owned upper
/// on the host would make `/` in the sprite owned by `nobody` and unwritable.
/// A mount namespace of our own in which nothing propagates back to the
/// host: the shim's overlay and bind mounts stay the sprite's.
pub(crate) fn private_mount_ns() -> Result<(), RuntimeError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| RuntimeError::io("unshare(CLONE_NEWNS)", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| RuntimeError::io("make / rprivate", e.into()))
}

/// PID 1's stdin (/dev/null), stdout and stderr (the sprite's console log,
/// appended to, or /dev/null without one).
pub(crate) fn console_stdio(sprite: &SpriteSpec) -> Result<(File, File, File), RuntimeError> {
    let console = match &sprite.console_log {
        Some(p) => OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(p)
            .map_err(|e| RuntimeError::io(format!("open console log {}", p.display()), e))?,
        None => OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| RuntimeError::io("open /dev/null", e))?,
    };
    let stdin = File::open("/dev/null").map_err(|e| RuntimeError::io("open /dev/null", e))?;
    let stderr = console
        .try_clone()
        .map_err(|e| RuntimeError::io("dup console", e))?;
    Ok((stdin, console, stderr))
}

pub(crate) fn prepare_upper(sprite: &SpriteSpec) -> Result<(), RuntimeError> {
    let lower = fs::metadata(&sprite.rootfs_lower)
        .map_err(|e| RuntimeError::io(format!("stat {}", sprite.rootfs_lower.display()), e))?;
    for dir in [&sprite.upper_dir, &sprite.work_dir] {
        let md = fs::metadata(dir).map_err(|e| RuntimeError::io(format!("stat {}", dir.display()), e))?;
        if md.uid() != lower.uid() || md.gid() != lower.gid() {
            std::os::unix::fs::chown(dir, Some(lower.uid()), Some(lower.gid()))
                .map_err(|e| RuntimeError::io(format!("chown {}", dir.display()), e))?;
        }
    }
    let mode = lower.permissions().mode() & 0o7777;
    let up = fs::metadata(&sprite.upper_dir).map_err(|e| RuntimeError::io("stat upper", e))?;
    if up.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(&sprite.upper_dir, fs::Permissions::from_mode(mode))
            .map_err(|e| RuntimeError::io("chmod upper", e))?;
    }
    Ok(())
}

/// Mount the overlay at `merged`, with `userxattr` so the upper layer's
/// metadata (opaque dirs) uses `user.overlay.*` xattrs: the same format an
/// overlay mounted by the sprite's user-namespace root would use, so the
/// upper stays portable between mounting styles and backends.
pub(crate) fn mount_overlay(sprite: &SpriteSpec, merged: &Path) -> Result<(), RuntimeError> {
    for p in [&sprite.rootfs_lower, &sprite.upper_dir, &sprite.work_dir] {
        if p.to_string_lossy().contains([',', ':']) {
            return Err(RuntimeError::InvalidSpec(format!(
                "overlay layer path {} contains ',' or ':'",
                p.display()
            )));
        }
    }
    // The layers are named by descriptor (the ',' and ':' check above
    // still guards the paths' other users): overlayfs shows its options in
    // the sprite's /proc/self/mountinfo verbatim, and host paths there would
    // tell the sprite where den keeps its data and its disk.
    let (lower, upper, work) = (
        open_dir(&sprite.rootfs_lower)?,
        open_dir(&sprite.upper_dir)?,
        open_dir(&sprite.work_dir)?,
    );
    let data = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        fd_path(&lower),
        fd_path(&upper),
        fd_path(&work)
    );
    mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| {
        RuntimeError::io(
            format!(
                "mount overlay (lower {}, upper {}, work {}) on {}",
                sprite.rootfs_lower.display(),
                sprite.upper_dir.display(),
                sprite.work_dir.display(),
                merged.display()
            ),
            e.into(),
        )
    })
}

/// Mount the read-only overlays the sprite's read-only bind mounts are bound
/// from, so its mountinfo names no host path (see [`spec::Staged`]).
fn stage_mounts(sprite: &SpriteSpec, stage: &Path) -> Result<(), RuntimeError> {
    let mut empty: Option<File> = None;
    for (i, m) in sprite.mounts.iter().enumerate() {
        let Some(s) = spec::staged(m, i, stage) else {
            continue;
        };
        let empty = match &empty {
            Some(f) => f,
            None => {
                // Its own (empty, read-only) tmpfs, not a directory: overlayfs
                // refuses layers nested in one another (ELOOP), and a source
                // directory could contain the state root.
                let dir = stage.join(spec::STAGE_EMPTY);
                fs::create_dir_all(&dir)
                    .map_err(|e| RuntimeError::io(format!("mkdir {}", dir.display()), e))?;
                let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
                mount(
                    Some("tmpfs"),
                    &dir,
                    Some("tmpfs"),
                    flags,
                    Some("size=4k,mode=0755"),
                )
                .map_err(|e| {
                    RuntimeError::io(format!("mount an empty tmpfs on {}", dir.display()), e.into())
                })?;
                empty.insert(open_dir(&dir)?)
            }
        };
        fs::create_dir_all(&s.at).map_err(|e| RuntimeError::io(format!("mkdir {}", s.at.display()), e))?;
        let lower = open_dir(&s.lower)?;
        let data = format!("lowerdir={}:{}", fd_path(&lower), fd_path(empty));
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(
            Some("overlay"),
            &s.at,
            Some("overlay"),
            flags,
            Some(data.as_str()),
        )
        .map_err(|e| {
            RuntimeError::io(
                format!(
                    "mount a read-only overlay of {} on {}",
                    s.lower.display(),
                    s.at.display()
                ),
                e.into(),
            )
        })?;
    }
    Ok(())
}

/// A directory opened only to be named by descriptor in mount options.
fn open_dir(p: &Path) -> Result<File, RuntimeError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(p)
        .map_err(|e| RuntimeError::io(format!("open {}", p.display()), e))
}

/// `/proc/self/fd/N`: the kernel resolves it at mount time, and mountinfo
/// shows it verbatim, not the host path behind it.
fn fd_path(f: &File) -> String {
    format!("/proc/self/fd/{}", f.as_raw_fd())
}

/// `e` and all its sources: libcontainer's top-level messages alone ("failed
/// to load seccomp context") hide the errno that explains them.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}
