//! The runtime shim: the helper process that runs libcontainer.
//!
//! libcontainer forks, uses `Rc` and changes process-wide state (mount
//! namespace, signal dispositions), so it must not run inside the threaded
//! tokio server. The `den` binary exposes [`shim_main`] as the hidden
//! subcommand `den runtime-shim …`; [`super::ContainerBackend`] spawns it for
//! every create and waits for it. The shim exits as soon as the sprite's PID 1
//! is set up and waiting for `start`, so no shim process stays around.
//!
//! `create <state-root> <id>`:
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
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};

use super::Layout;
use crate::backend::{RuntimeError, SpriteSpec};

/// Entry point of `den runtime-shim ARGS…`. Returns the process exit code;
/// errors are printed to stderr, which the backend returns in
/// [`RuntimeError::Shim`].
pub fn shim_main(args: &[OsString]) -> i32 {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let res = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["create", root, id] => create(&Layout::new(Path::new(root)), id),
        _ => Err(RuntimeError::InvalidSpec(format!(
            "usage: runtime-shim create STATE_ROOT ID (got {args:?})"
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

fn create(layout: &Layout, id: &str) -> Result<i32, RuntimeError> {
    let bundle = layout.bundle(id);
    let spec_path = bundle.join(super::SPRITE_JSON);
    let text =
        fs::read(&spec_path).map_err(|e| RuntimeError::io(format!("read {}", spec_path.display()), e))?;
    let sprite: SpriteSpec = serde_json::from_slice(&text)
        .map_err(|e| RuntimeError::InvalidSpec(format!("{}: {e}", spec_path.display())))?;

    if let Some(netns) = &sprite.netns_path {
        // Joined here, as host root, and inherited by the container (see spec.rs).
        let f = File::open(netns).map_err(|e| RuntimeError::io(format!("open {}", netns.display()), e))?;
        setns(&f, CloneFlags::CLONE_NEWNET)
            .map_err(|e| RuntimeError::io(format!("setns {}", netns.display()), e.into()))?;
    }
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| RuntimeError::io("unshare(CLONE_NEWNS)", e.into()))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| RuntimeError::io("make / rprivate", e.into()))?;

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

    let engine = |e: libcontainer::error::LibcontainerError| RuntimeError::Engine(error_chain(&e));
    let container = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(layout.engine_root())
        .map_err(engine)?
        .with_stdin(stdin)
        .with_stdout(console)
        .with_stderr(stderr)
        .as_init(&bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(engine)?;
    container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| RuntimeError::Engine("container has no pid after create".into()))
}

/// Give the upper directory the owner and mode of the image's root directory
/// (as seen through the idmapped lower), unless it already has them.
/// overlayfs shows the upper root's attributes for `/`, so a root-owned upper
/// on the host would make `/` in the sprite owned by `nobody` and unwritable.
fn prepare_upper(sprite: &SpriteSpec) -> Result<(), RuntimeError> {
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
fn mount_overlay(sprite: &SpriteSpec, merged: &Path) -> Result<(), RuntimeError> {
    for p in [&sprite.rootfs_lower, &sprite.upper_dir, &sprite.work_dir] {
        if p.to_string_lossy().contains([',', ':']) {
            return Err(RuntimeError::InvalidSpec(format!(
                "overlay layer path {} contains ',' or ':'",
                p.display()
            )));
        }
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        sprite.rootfs_lower.display(),
        sprite.upper_dir.display(),
        sprite.work_dir.display()
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
            format!("mount overlay ({data}) on {}", merged.display()),
            e.into(),
        )
    })
}

/// `e` and all its sources: libcontainer's top-level messages alone ("failed
/// to load seccomp context") hide the errno that explains them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}
