//! `den volume …`: operator commands for the volume store.

mod control;
mod mount;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use den_store::{CreateOptions, Store, StoreError, VolumeSource};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use den_store::parse_size;

use crate::store_args::StoreArgs;

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume: empty, or sharing the chunks of a checkpoint (`--from VOL@vN`) or live volume.
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        /// VOL@vN (a checkpoint) or VOL (the live volume).
        #[arg(long)]
        from: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create a volume from a raw disk image (zero blocks cost nothing).
    Import {
        name: String,
        image: PathBuf,
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write a volume's or checkpoint's content (NAME or NAME@vN) to a sparse raw image.
    Export {
        source: String,
        image: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List volumes.
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show one volume.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a volume and its checkpoints.
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Checkpoint a volume (mounted or not). Prints the id at once.
    Checkpoint {
        name: String,
        #[arg(short, long, default_value = "")]
        comment: String,
        /// Wait until the checkpoint is durable in the object store.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List a volume's checkpoints, newest first.
    Checkpoints {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete a checkpoint.
    RmCheckpoint {
        name: String,
        checkpoint: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Make a checkpoint the volume's content (the volume must not be mounted).
    Restore {
        name: String,
        checkpoint: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Fork SOURCE (VOL@vN or a live VOL) into a new volume.
    Fork {
        source: String,
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Upload everything the volume holds only locally, with progress.
    Flush {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete chunks nothing references.
    Gc {
        /// Also list the object store and delete objects metadata doesn't know.
        #[arg(long)]
        sweep: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Serve a volume as a block device until interrupted; optionally format and mount it.
    Mount {
        #[command(flatten)]
        mount: mount::MountArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub fn run(cmd: VolumeCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_async(cmd))
}

fn split_source(s: &str) -> (String, Option<String>) {
    match s.split_once('@') {
        Some((v, c)) => (v.to_string(), Some(c.to_string())),
        None => (s.to_string(), None),
    }
}

fn chunk_size_arg(cs: Option<u64>) -> Result<Option<u32>> {
    cs.map(|c| u32::try_from(c).context("chunk size too large"))
        .transpose()
}

fn fmt_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fmt_bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    t
}

async fn open(store: &StoreArgs) -> Result<Store> {
    Store::open(store.config()?)
        .await
        .with_context(|| format!("opening the store in {}", store.data_dir.display()))
}

/// Checkpoint locally, or through the daemon when the volume is mounted.
async fn checkpoint(args: &StoreArgs, store: &Store, name: &str, comment: &str) -> Result<serde_json::Value> {
    let started = Instant::now();
    match store.checkpoint(name, comment).await {
        Ok(ck) => Ok(json!({"checkpoint": ck, "elapsed_ms": started.elapsed().as_secs_f64() * 1e3})),
        Err(StoreError::VolumeBusy(_)) => {
            control::call(
                &control::socket_path(&args.data_dir, name),
                &control::Request::Checkpoint {
                    comment: comment.to_string(),
                },
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn flush_with_progress(store: &Store, name: &str) -> Result<()> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} flushing {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let b = bar.clone();
    let n = name.to_string();
    store
        .flush(name, move |left| {
            b.set_message(format!("{n}: {left} chunks left to upload"))
        })
        .await?;
    bar.finish_with_message(format!("{name}: everything is in the object store"));
    Ok(())
}

async fn run_async(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            chunk_size,
            from,
            store: args,
        } => {
            let store = open(&args).await?;
            let source = from.map(|f| match split_source(&f) {
                (v, Some(c)) => VolumeSource::Checkpoint {
                    volume: v,
                    checkpoint: c,
                },
                (v, None) => VolumeSource::Volume(v),
            });
            let rec = store
                .create_volume(
                    &name,
                    CreateOptions {
                        size,
                        chunk_size: chunk_size_arg(chunk_size)?,
                        source,
                    },
                )
                .await?;
            println!(
                "created {} ({}, {} chunks)",
                rec.name,
                fmt_bytes(rec.size),
                fmt_bytes(rec.chunk_size as u64)
            );
        }
        VolumeCmd::Import {
            name,
            image,
            chunk_size,
            store: args,
        } => {
            let store = open(&args).await?;
            import(&store, &name, &image, chunk_size_arg(chunk_size)?).await?;
        }
        VolumeCmd::Export {
            source,
            image,
            store: args,
        } => {
            let store = open(&args).await?;
            export(&store, &source, &image).await?;
        }
        VolumeCmd::Ls { json, store: args } => {
            let store = open(&args).await?;
            let vols = store.list_volumes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vols)?);
            } else {
                let mut t = table(&["NAME", "SIZE", "CHUNK", "CREATED"]);
                for v in vols {
                    t.add_row(vec![
                        v.name.clone(),
                        fmt_bytes(v.size),
                        fmt_bytes(v.chunk_size as u64),
                        fmt_time(v.created_at_ms),
                    ]);
                }
                println!("{t}");
            }
        }
        VolumeCmd::Info {
            name,
            json,
            store: args,
        } => {
            let store = open(&args).await?;
            let info = store.volume_info(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let r = &info.record;
                println!("name:          {}", r.name);
                println!("id:            {}", r.id);
                println!("size:          {}", fmt_bytes(r.size));
                println!("chunk size:    {}", fmt_bytes(r.chunk_size as u64));
                println!(
                    "mapped chunks: {} (~{} written)",
                    info.mapped_chunks,
                    fmt_bytes(info.mapped_chunks * r.chunk_size as u64)
                );
                println!("not uploaded:  {} chunks", info.pending_chunks);
                println!("checkpoints:   {}", info.checkpoints);
                println!("created:       {}", fmt_time(r.created_at_ms));
            }
        }
        VolumeCmd::Rm { name, store: args } => {
            let store = open(&args).await?;
            store.delete_volume(&name).await?;
            println!("deleted {name}");
        }
        VolumeCmd::Checkpoint {
            name,
            comment,
            wait,
            json,
            store: args,
        } => {
            let store = open(&args).await?;
            let out = checkpoint(&args, &store, &name, &comment).await?;
            let id = out["checkpoint"]["id"].as_str().unwrap_or_default().to_string();
            if json {
                println!("{out}");
            } else {
                println!("{id} ({:.1} ms)", out["elapsed_ms"].as_f64().unwrap_or_default());
            }
            if wait {
                let bar = ProgressBar::new_spinner();
                bar.set_message(format!("waiting for {name}@{id} to be durable"));
                bar.enable_steady_tick(Duration::from_millis(120));
                store.wait_durable(&name, &id).await?;
                bar.finish_with_message(format!("{name}@{id} is durable"));
            }
        }
        VolumeCmd::Checkpoints {
            name,
            json,
            store: args,
        } => {
            let store = open(&args).await?;
            let cks = store.list_checkpoints(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cks)?);
            } else {
                let mut t = table(&["ID", "CREATED", "DURABLE", "COMMENT"]);
                for c in cks {
                    t.add_row(vec![
                        c.id.clone(),
                        fmt_time(c.created_at_ms),
                        c.durable.to_string(),
                        c.comment.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        VolumeCmd::RmCheckpoint {
            name,
            checkpoint,
            store: args,
        } => {
            let store = open(&args).await?;
            store.delete_checkpoint(&name, &checkpoint).await?;
            println!("deleted {name}@{checkpoint}");
        }
        VolumeCmd::Restore {
            name,
            checkpoint,
            store: args,
        } => {
            let store = open(&args).await?;
            let started = Instant::now();
            store.restore(&name, &checkpoint).await.map_err(|e| match e {
                StoreError::VolumeBusy(_) => {
                    anyhow::anyhow!("{name} is mounted; unmount it before restoring")
                }
                e => e.into(),
            })?;
            println!(
                "restored {name} to {checkpoint} ({:.1} ms)",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        VolumeCmd::Fork {
            source,
            name,
            store: args,
        } => {
            let store = open(&args).await?;
            let started = Instant::now();
            let (vol, ck) = split_source(&source);
            let rec = match ck {
                Some(ck) => {
                    store
                        .fork(
                            &name,
                            VolumeSource::Checkpoint {
                                volume: vol,
                                checkpoint: ck,
                            },
                        )
                        .await?
                }
                None => match store.fork(&name, VolumeSource::Volume(vol.clone())).await {
                    Err(StoreError::VolumeBusy(_)) => {
                        let out = control::call(
                            &control::socket_path(&args.data_dir, &vol),
                            &control::Request::Fork { name: name.clone() },
                        )
                        .await?;
                        serde_json::from_value(out["volume"].clone()).context("bad fork reply")?
                    }
                    r => r?,
                },
            };
            println!(
                "forked {source} into {} ({:.1} ms)",
                rec.name,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        VolumeCmd::Flush { name, store: args } => {
            let store = open(&args).await?;
            match store.volume_info(&name).await {
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            match flush_with_progress(&store, &name).await {
                Err(e) if matches!(e.downcast_ref::<StoreError>(), Some(StoreError::VolumeBusy(_))) => {
                    control::call(
                        &control::socket_path(&args.data_dir, &name),
                        &control::Request::Flush,
                    )
                    .await?;
                    println!("{name}: everything is in the object store");
                }
                r => r?,
            }
        }
        VolumeCmd::Gc { sweep, store: args } => {
            let store = open(&args).await?;
            let r = store.gc(sweep).await?;
            println!(
                "deleted {} unreferenced chunks, {} orphan objects",
                r.chunks_deleted, r.orphan_objects_deleted
            );
        }
        VolumeCmd::Mount {
            mount: m,
            store: args,
        } => mount::mount(&args, m).await?,
    }
    Ok(())
}

async fn import(store: &Store, name: &str, image: &std::path::Path, chunk_size: Option<u32>) -> Result<()> {
    let len = std::fs::metadata(image)
        .with_context(|| format!("reading {}", image.display()))?
        .len();
    if len == 0 {
        bail!("{} is empty", image.display());
    }
    let size = len.div_ceil(4096) * 4096;
    store
        .create_volume(
            name,
            CreateOptions {
                size: Some(size),
                chunk_size,
                source: None,
            },
        )
        .await?;
    let vol = store.open_volume(name).await?;
    let image = image.to_path_buf();
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("importing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("template"),
    );
    let b = bar.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let f = File::open(&image)?;
        let cs = vol.chunk_size() as usize;
        let mut buf = vec![0u8; cs];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(cs as u64) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            if !den_store::chunk::is_zero(&buf[..n]) {
                vol.write_at(off, &buf[..n])?;
            }
            off += n as u64;
            b.set_position(off);
        }
        Ok(())
    })
    .await??;
    bar.finish();
    flush_with_progress(store, name).await
}

async fn export(store: &Store, source: &str, image: &std::path::Path) -> Result<()> {
    let (vol, ck) = split_source(source);
    enum Reader {
        Ck(den_store::CheckpointReader),
        Vol(den_store::Volume),
    }
    let reader = match ck {
        Some(ck) => Reader::Ck(store.read_checkpoint(&vol, &ck).await?),
        None => Reader::Vol(store.open_volume(&vol).await.map_err(|e| match e {
            StoreError::VolumeBusy(_) => {
                anyhow::anyhow!("{vol} is mounted; export a checkpoint of it instead (NAME@vN)")
            }
            e => e.into(),
        })?),
    };
    // Only once the source is known to exist: a failed export leaves no file.
    let out = File::create(image).with_context(|| format!("creating {}", image.display()))?;
    let (size, cs, chunks) = match &reader {
        Reader::Ck(r) => (r.size(), r.chunk_size(), r.mapped_chunks()),
        Reader::Vol(v) => (v.size(), v.chunk_size(), v.mapped_chunks()),
    };
    let bar = ProgressBar::new(chunks.len() as u64);
    bar.set_style(ProgressStyle::with_template("exporting [{bar:40}] {pos}/{len} chunks").expect("template"));
    let b = bar.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        out.set_len(size)?;
        let mut buf = vec![0u8; cs as usize];
        for idx in chunks {
            let off = idx * cs;
            let n = (size - off).min(cs) as usize;
            match &reader {
                Reader::Ck(r) => {
                    let data = r.read_chunk(idx)?;
                    buf[..n].copy_from_slice(&data[..n]);
                }
                Reader::Vol(v) => v.read_at(off, &mut buf[..n])?,
            }
            out.write_all_at(&buf[..n], off)?;
            b.inc(1);
        }
        (&out).flush()?;
        Ok(())
    })
    .await??;
    bar.finish();
    Ok(())
}
