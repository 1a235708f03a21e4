//! `den cp`: files and directory trees between here and a sprite, through
//! the fs API (streamed both ways, never held in memory whole).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use den_client::reqwest::Body;
use den_client::{Client, FsListing};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Ctx;
use super::errors::Hint;

#[derive(Args, Debug)]
pub struct CpArgs {
    /// What to copy: a local path, or `:PATH` / `NAME:PATH` in a sprite.
    pub src: String,
    /// Where to: a local path, or `:PATH` / `NAME:PATH`. An existing directory receives SRC inside it.
    pub dest: String,
}

enum Loc {
    Local(PathBuf),
    Remote { sprite: String, path: String },
}

/// `NAME:path` or `:path` is in a sprite (the `-s`/`.den` one for `:path`);
/// anything with a `/` before the colon is a local path.
fn parse(ctx: &Ctx, s: &str) -> Result<Loc> {
    match s.split_once(':') {
        Some((pre, path)) if !pre.contains('/') => {
            let sprite = if pre.is_empty() {
                ctx.sprite(None)?
            } else {
                pre.to_string()
            };
            let path = if path.is_empty() { "." } else { path };
            Ok(Loc::Remote {
                sprite,
                path: path.to_string(),
            })
        }
        _ => Ok(Loc::Local(PathBuf::from(s))),
    }
}

const READ_CHUNK: usize = 256 * 1024;

fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

fn join_remote(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn base_name(p: &Path) -> Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name to copy it under", p.display()))
}

pub async fn cp(ctx: &Ctx, a: CpArgs) -> Result<()> {
    let src = parse(ctx, &a.src)?;
    let dest = parse(ctx, &a.dest)?;
    match (src, dest) {
        (Loc::Local(l), Loc::Remote { sprite, path }) => upload(&ctx.client()?, &l, &sprite, &path).await,
        (Loc::Remote { sprite, path }, Loc::Local(l)) => download(&ctx.client()?, &sprite, &path, &l).await,
        (Loc::Local(_), Loc::Local(_)) => {
            bail!(
                "neither side is in a sprite — write one as :PATH or NAME:PATH (like `den cp ./a web:/tmp/a`)"
            )
        }
        (Loc::Remote { .. }, Loc::Remote { .. }) => {
            bail!(
                "both sides are in sprites — copy one side through here, or use `den exec -- cp` inside one sprite"
            )
        }
    }
}

/// What a remote path is: `None` when it does not exist.
async fn remote_listing(c: &Client, sprite: &str, path: &str) -> Result<Option<FsListing>> {
    match c.fs_list(sprite, path, false).await {
        Ok(l) => Ok(Some(l)),
        Err(den_client::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(super::errors::explain(e)),
    }
}

async fn upload(c: &Client, local: &Path, sprite: &str, dest: &str) -> Result<()> {
    let meta = std::fs::metadata(local).with_context(|| format!("reading {}", local.display()))?;
    let existing = remote_listing(c, sprite, dest).await?;
    let dest_is_dir = existing.as_ref().is_some_and(|l| !l.is_file()) || dest.ends_with('/');
    let target = if dest_is_dir {
        join_remote(dest, &base_name(local)?)
    } else {
        dest.to_string()
    };
    // (relative local path, size, mode) of every file; directories for the empty ones.
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    if meta.is_dir() {
        walk(local, Path::new(""), &mut files, &mut dirs)?;
    } else {
        use std::os::unix::fs::PermissionsExt;
        files.push((PathBuf::new(), meta.len(), meta.permissions().mode()));
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    let pb = progress(total);
    if meta.is_dir() {
        c.fs_mkdir(sprite, &target).await.hint()?;
    }
    for d in &dirs {
        c.fs_mkdir(sprite, &join_remote(&target, &d.to_string_lossy()))
            .await
            .hint()?;
    }
    let n = files.len();
    for (rel, _, mode) in files {
        let (from, to) = if rel.as_os_str().is_empty() {
            (local.to_path_buf(), target.clone())
        } else {
            (local.join(&rel), join_remote(&target, &rel.to_string_lossy()))
        };
        pb.set_message(rel.display().to_string());
        let f = tokio::fs::File::open(&from)
            .await
            .with_context(|| format!("opening {}", from.display()))?;
        let pb2 = pb.clone();
        let stream = futures::stream::unfold(f, move |mut f| {
            let pb = pb2.clone();
            async move {
                let mut buf = vec![0u8; READ_CHUNK];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        pb.inc(n as u64);
                        Some((Ok::<_, std::io::Error>(buf), f))
                    }
                    Err(e) => Some((Err(e), f)),
                }
            }
        });
        c.fs_write(sprite, &to, Body::wrap_stream(stream), Some(mode))
            .await
            .hint()
            .with_context(|| format!("writing {sprite}:{to}"))?;
    }
    pb.finish_and_clear();
    println!("copied {n} file(s), {total} bytes, to {sprite}:{target}");
    Ok(())
}

type FileList = Vec<(PathBuf, u64, u32)>;

/// Files under `root/rel` (symlinks are skipped with a note), and the
/// directories that have nothing in them.
fn walk(root: &Path, rel: &Path, files: &mut FileList, dirs: &mut Vec<PathBuf>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(rel);
    let mut empty = true;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        empty = false;
        let r = rel.join(e.file_name());
        let m = e.metadata()?;
        if m.is_dir() {
            walk(root, &r, files, dirs)?;
        } else if m.is_file() {
            files.push((r, m.len(), m.permissions().mode()));
        } else {
            eprintln!("skipping {} (not a file or directory)", root.join(&r).display());
        }
    }
    if empty && !rel.as_os_str().is_empty() {
        dirs.push(rel.to_path_buf());
    }
    Ok(())
}

async fn download(c: &Client, sprite: &str, src: &str, local: &Path) -> Result<()> {
    let listing = remote_listing(c, sprite, src)
        .await?
        .with_context(|| format!("{sprite}:{src} does not exist"))?;
    let name = Path::new(listing.path.trim_end_matches('/'))
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    let target = if local.is_dir() {
        local.join(&name)
    } else {
        local.to_path_buf()
    };
    if listing.is_file() {
        let e = &listing.entries[0];
        let pb = progress(e.size);
        get_file(c, sprite, &e.path, &target, e.mode_bits(), &pb).await?;
        pb.finish_and_clear();
        println!("copied 1 file(s), {} bytes, to {}", e.size, target.display());
        return Ok(());
    }
    let all = c.fs_list(sprite, &listing.path, true).await.hint()?;
    let prefix = format!("{}/", listing.path.trim_end_matches('/'));
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let total: u64 = all.entries.iter().filter(|e| e.is_file()).map(|e| e.size).sum();
    let pb = progress(total);
    let mut n = 0;
    let mut entries = all.entries;
    // Parents before children.
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for e in &entries {
        let Some(rel) = e.path.strip_prefix(&prefix) else {
            continue;
        };
        if rel.is_empty() || rel.split('/').any(|p| p == ".." || p == ".") {
            continue;
        }
        let to = target.join(rel);
        if e.is_dir() {
            std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        } else if e.is_file() {
            pb.set_message(rel.to_string());
            get_file(c, sprite, &e.path, &to, e.mode_bits(), &pb).await?;
            n += 1;
        } else {
            pb.suspend(|| eprintln!("skipping {sprite}:{} ({})", e.path, e.kind));
        }
    }
    pb.finish_and_clear();
    println!("copied {n} file(s), {total} bytes, to {}", target.display());
    Ok(())
}

async fn get_file(
    c: &Client,
    sprite: &str,
    path: &str,
    to: &Path,
    mode: Option<u32>,
    pb: &ProgressBar,
) -> Result<()> {
    let resp = c.fs_read(sprite, path).await.hint()?;
    if let Some(p) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let mut f = tokio::fs::File::create(to)
        .await
        .with_context(|| format!("creating {}", to.display()))?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("reading {sprite}:{path}"))?;
        f.write_all(&chunk).await?;
        pb.inc(chunk.len() as u64);
    }
    f.flush().await?;
    if let Some(m) = mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(m))
            .with_context(|| format!("setting the mode of {}", to.display()))?;
    }
    Ok(())
}
