//! `den volume mount`: serve a volume as a block device (FUSE file + loop),
//! optionally with ext4 on it, until SIGINT/SIGTERM.

use std::path::PathBuf;
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
use super::device::VolumeDevice;
use super::freeze;
use crate::store_args::StoreArgs;

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
    std::fs::create_dir_all(&fuse_dir)?;
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
    super::flush_with_progress(&store, &m.name).await
}

fn teardown(mounted: Option<&PathBuf>, served: Served) {
    if let Some(mp) = mounted
        && let Err(e) = run_cmd(Command::new("umount").arg(mp))
    {
        eprintln!("warning: {e:#}");
    }
    let res = match served {
        Served::Loop(e) => e.shutdown(),
        Served::File(f) => f.shutdown(),
    };
    if let Err(e) = res {
        eprintln!("warning: stopping the block export: {e}");
    }
}
