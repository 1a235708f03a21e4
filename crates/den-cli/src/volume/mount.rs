//! `den volume mount`: serve a volume as a block device (FUSE file + loop),
//! optionally with ext4 on it, until SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use den_block::{ExportOptions, FuseLoopFrontend, FuseOptions};
use den_store::{Store, VolumeSource};
use serde_json::json;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};

use super::control::{self, Request};
use crate::store_args::StoreArgs;
use den_block::VolumeDevice;
use den_block::freeze;

#[derive(Args, Debug)]
pub struct MountArgs {
    pub name: String,
    /// Mount the filesystem on the volume here (needs a filesystem, see --format).
    pub mountpoint: Option<PathBuf>,
    /// Make an ext4 filesystem on the volume first (destroys its content).
    #[arg(long)]
    pub format: bool,
    /// Serve only the FUSE disk file, without a loop device.
    #[arg(long)]
    pub no_loop: bool,
    /// Directory for the FUSE mount (default: DATA_DIR/run/NAME.fuse).
    #[arg(long)]
    pub fuse_dir: Option<PathBuf>,
    /// How long to wait at shutdown for local-only data to reach the object store.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub flush_timeout: std::time::Duration,
    /// Mount options for the filesystem.
    #[arg(long, default_value = "")]
    pub options: String,
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

enum Served {
    Loop(den_block::Export),
    File(den_block::FuseExport),
}

pub async fn mount(args: &StoreArgs, m: MountArgs) -> Result<()> {
    if m.mountpoint.is_some() && m.no_loop {
        bail!("a mountpoint needs the loop device; drop --no-loop");
    }
    let store = Store::open(args.config()?).await?;
    let vol = store.open_volume(&m.name).await?;
    let run_dir = args.data_dir.join("run");
    std::fs::create_dir_all(&run_dir)?;
    let fuse_dir = m
        .fuse_dir
        .clone()
        .unwrap_or_else(|| run_dir.join(format!("{}.fuse", m.name)));
    // No create_dir_all(fuse_dir) here: after a crash it is a dead FUSE mount
    // (stat fails with ENOTCONN, mkdir with EEXIST). The export removes such
    // leftovers of ours and creates the directory itself.
    if let Some(mp) = &m.mountpoint {
        // Before the export: it removes the stale loop device, after which
        // the stale filesystem can no longer be recognised as ours.
        let file = FuseOptions::default().file_name;
        remove_stale_mounts(mp, &fuse_dir.join(file))?;
    }
    let device: Arc<dyn den_block::BlockDevice> = Arc::new(VolumeDevice(vol.clone()));

    let no_loop = m.no_loop;
    let fd = fuse_dir.clone();
    let served = tokio::task::spawn_blocking(move || -> Result<Served> {
        let opts = ExportOptions::default();
        Ok(if no_loop {
            Served::File(FuseLoopFrontend::export_file(
                device,
                &fd,
                &FuseOptions::default(),
            )?)
        } else {
            Served::Loop(FuseLoopFrontend::export(device, &fd, &opts)?)
        })
    })
    .await??;
    let (dev_path, file_path) = match &served {
        Served::Loop(e) => (Some(e.device_path().to_path_buf()), e.file_path().to_path_buf()),
        Served::File(f) => (None, f.file_path().to_path_buf()),
    };

    let mut mounted: Option<PathBuf> = None;
    let setup = async {
        if let Some(dev) = &dev_path {
            if m.format {
                run_cmd(
                    Command::new("mkfs.ext4")
                        .args([
                            "-q",
                            "-F",
                            "-E",
                            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                        ])
                        .arg(dev),
                )?;
            }
            if let Some(mp) = &m.mountpoint {
                std::fs::create_dir_all(mp)?;
                let mut cmd = Command::new("mount");
                cmd.arg(dev).arg(mp);
                if !m.options.is_empty() {
                    cmd.args(["-o", &m.options]);
                }
                run_cmd(&mut cmd)?;
                mounted = Some(mp.clone());
            }
        }
        anyhow::Ok(())
    }
    .await;

    let sock = control::socket_path(&args.data_dir, &m.name);
    let listener = match setup.and_then(|_| {
        let _ = std::fs::remove_file(&sock);
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))
    }) {
        Ok(l) => l,
        Err(e) => {
            teardown(mounted.as_ref(), served);
            return Err(e);
        }
    };

    let ctl_store = store.clone();
    let ctl_vol = vol.clone();
    let ctl_mp = mounted.clone();
    let name = m.name.clone();
    let server = tokio::spawn(control::serve(listener, move |req: Request| {
        let (store, vol, mp, name) = (ctl_store.clone(), ctl_vol.clone(), ctl_mp.clone(), name.clone());
        async move {
            match req {
                Request::Checkpoint { comment } => {
                    let started = std::time::Instant::now();
                    let ck = tokio::task::spawn_blocking(move || -> Result<_> {
                        let _frozen = match &mp {
                            Some(mp) => Some(freeze::freeze(mp).context("freezing the filesystem")?),
                            None => None,
                        };
                        Ok(vol.checkpoint(&comment)?)
                    })
                    .await??;
                    Ok(json!({"checkpoint": ck, "elapsed_ms": started.elapsed().as_secs_f64() * 1e3}))
                }
                Request::Flush => {
                    store.flush(&name, |_| {}).await?;
                    Ok(json!({}))
                }
                Request::Fork { name: new } => {
                    let rec = store.fork(&new, VolumeSource::Volume(name.clone())).await?;
                    Ok(json!({"volume": rec}))
                }
                Request::Status => Ok(json!({
                    "volume": vol.record(),
                    "dirty_chunks": vol.dirty_chunks(),
                    "local_only_bytes": store.local_only_bytes(),
                })),
            }
        }
    }));

    println!(
        "{}",
        json!({
            "ready": true,
            "volume": m.name,
            "device": dev_path,
            "file": file_path,
            "mountpoint": mounted,
            "socket": sock,
        })
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    eprintln!("stopping: unmounting and flushing {}", m.name);
    server.abort();
    let _ = std::fs::remove_file(&sock);
    let mp = mounted.clone();
    tokio::task::spawn_blocking(move || teardown(mp.as_ref(), served)).await?;
    drop(vol);
    // Everything is already safe in the local cache; uploading is a courtesy
    // that must not hold a shutdown hostage to a dead object store. A second
    // signal, or the timeout, stops waiting; the next start uploads the rest.
    tokio::select! {
        r = tokio::time::timeout(m.flush_timeout, super::flush_with_progress(&store, &m.name)) => match r {
            Ok(r) => r,
            Err(_) => {
                eprintln!(
                    "warning: {} still has {} bytes only in the local cache after {:?}; they upload on the next start",
                    m.name,
                    store.local_only_bytes(),
                    m.flush_timeout
                );
                Ok(())
            }
        },
        _ = term.recv() => { eprintln!("stopped without waiting for uploads"); Ok(()) },
        _ = int.recv() => { eprintln!("stopped without waiting for uploads"); Ok(()) },
    }
}

/// Absolute path without touching `p` itself, which may be a dead FUSE mount
/// (`stat` fails with ENOTCONN): only its parent is canonicalised.
fn absolute(p: &Path) -> Option<PathBuf> {
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some(parent.canonicalize().ok()?.join(p.file_name()?))
}

/// A daemon killed while serving a filesystem leaves it mounted on the
/// mountpoint, on a loop device bound to the dead FUSE file, and frozen if it
/// died during a checkpoint. A new mount would stack on top of it and the
/// stale one would reappear after the next unmount. We hold the volume's
/// lock, so no live daemon serves `file`: thaw and detach every filesystem on
/// `mountpoint` whose loop device is bound to it.
fn remove_stale_mounts(mountpoint: &Path, file: &Path) -> Result<()> {
    let (Some(mp), Some(file)) = (absolute(mountpoint), absolute(file)) else {
        return Ok(());
    };
    let mounts = den_block::mountinfo::read().context("reading mountinfo")?;
    // The mounts stacked on the mountpoint, oldest first, and whether each
    // is a stale one of ours.
    let stack: Vec<bool> = mounts
        .iter()
        .filter(|m| m.mount_point == mp)
        .map(|m| den_block::loopdev::backing_file(Path::new(&m.source)).is_some_and(|b| b == file))
        .collect();
    // Only from the top down: never pull a stale mount from under a live one.
    for _ in stack.iter().rev().take_while(|stale| **stale) {
        eprintln!(
            "warning: removing a stale filesystem on {} left by a daemon that died",
            mp.display()
        );
        freeze::thaw(&mp);
        run_cmd(Command::new("umount").arg("-l").arg(&mp))?;
    }
    Ok(())
}

fn teardown(mounted: Option<&PathBuf>, served: Served) {
    let unmounted = match mounted.map(|mp| run_cmd(Command::new("umount").arg(mp))) {
        Some(Ok(_)) => true,
        Some(Err(e)) => {
            eprintln!("warning: {e:#}");
            false
        }
        None => false,
    };
    let res = match served {
        Served::Loop(e) => {
            if unmounted {
                den_block::loopdev::wait_unclaimed(e.device_path(), std::time::Duration::from_secs(10));
            }
            e.shutdown()
        }
        Served::File(f) => f.shutdown(),
    };
    if let Err(e) = res {
        eprintln!("warning: stopping the block export: {e}");
    }
}
