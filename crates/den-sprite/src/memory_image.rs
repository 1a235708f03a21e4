//! gVisor memory images kept in den's store, so they are as durable as the
//! disk and deduplicated and compressed like it.
//!
//! Each image is a volume of its own, written once: `mem-<sprite
//! volume>-<tag>`, the tag being the disk checkpoint it belongs to (`v3`) or
//! [`SLEEP_TAG`] for the image of a sprite that went cold with its
//! processes. Chunk 0 holds a manifest (the image's files and where they
//! start); every file starts on a chunk boundary, so memory that did not
//! change between two images lands in identical chunks, which the store
//! keeps once.

use std::io::{Read, Write};
use std::path::Path;

use den_store::{CreateOptions, Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SpriteError};

/// Tag of the image a sprite went cold with.
pub(crate) const SLEEP_TAG: &str = "sleep";

/// The volume holding `sprite_volume`'s image `tag`.
pub(crate) fn volume_name(sprite_volume: &str, tag: &str) -> String {
    format!("mem-{sprite_volume}-{tag}")
}

/// The sprite volume and the tag of image volume `name`, if it is one
/// (tags, checkpoint ids and [`SLEEP_TAG`], have no `-`).
pub(crate) fn owner_and_tag(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix("mem-")?.rsplit_once('-')
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: Vec<FileEntry>,
    /// The saved sprite's hostname: a fork of the image wakes with it in
    /// its kernel and must be renamed.
    #[serde(default)]
    hostname: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    offset: u64,
    len: u64,
}

/// Bytes copied per read or write.
const PIECE: usize = 1 << 20;

/// Store the files of `dir` (a runsc image) as the volume `name`; returns
/// the image's size in bytes. A volume of that name is replaced.
pub(crate) async fn save(store: &Store, name: &str, dir: &Path, hostname: &str) -> Result<u64> {
    let mut files = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| SpriteError::io(format!("reading {}", dir.display()), e))?;
    for e in rd {
        let e = e.map_err(|e| SpriteError::io(format!("reading {}", dir.display()), e))?;
        let md = e
            .metadata()
            .map_err(|e2| SpriteError::io(format!("stat {}", e.path().display()), e2))?;
        if md.is_file() {
            files.push((e.file_name().to_string_lossy().into_owned(), md.len()));
        }
    }
    files.sort();
    let chunk = u64::from(den_store::DEFAULT_CHUNK_SIZE);
    let mut offset = chunk;
    let mut manifest = Manifest {
        files: Vec::new(),
        hostname: hostname.to_string(),
    };
    for (name, len) in &files {
        manifest.files.push(FileEntry {
            name: name.clone(),
            offset,
            len: *len,
        });
        offset += len.div_ceil(chunk).max(1) * chunk;
    }
    let header = serde_json::to_vec(&manifest).map_err(|e| SpriteError::Catalog(e.to_string()))?;
    if header.len() as u64 > chunk {
        return Err(SpriteError::Invalid("memory image manifest too large".into()));
    }
    delete(store, name).await?;
    store
        .create_volume(
            name,
            CreateOptions {
                size: Some(offset),
                ..Default::default()
            },
        )
        .await?;
    let vol = store.open_volume(name).await?;
    let dir = dir.to_path_buf();
    let total = tokio::task::spawn_blocking(move || -> Result<u64> {
        let io = |what: String| move |e: std::io::Error| SpriteError::io(what, e);
        vol.write_at(0, &header)
            .map_err(io("writing the image manifest".into()))?;
        let mut buf = vec![0u8; PIECE];
        let mut total = 0;
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let mut file = std::fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
            let mut at = f.offset;
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(io(format!("reading {}", path.display())))?;
                if n == 0 {
                    break;
                }
                vol.write_at(at, &buf[..n])
                    .map_err(io("writing the image".into()))?;
                at += n as u64;
            }
            total += at - f.offset;
        }
        vol.fsync().map_err(io("syncing the image".into()))?;
        // Sealed into a checkpoint of its own: the store's metadata names
        // every chunk now (not at some later write-back), so the image is
        // counted, flushed and forked whole.
        vol.checkpoint("memory image")?;
        Ok(total)
    })
    .await
    .map_err(SpriteError::join)??;
    Ok(total)
}

/// Delete image `name` (gone already is fine). The node that holds the
/// sprite's disk may delete its images, whichever node wrote them.
pub(crate) async fn delete(store: &Store, name: &str) -> Result<()> {
    match store.take_over(name).await {
        Ok(()) | Err(StoreError::VolumeNotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(crate::manager::delete_volume_released(store, name).await?)
}

/// Write image `name` out as files into `dir` (created if missing);
/// returns the hostname the image was saved with.
pub(crate) async fn load(store: &Store, name: &str, dir: &Path) -> Result<String> {
    let vol = store.open_volume(name).await?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let io = |what: String| move |e: std::io::Error| SpriteError::io(what, e);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let manifest = read_manifest(&vol)?;
        let mut buf = vec![0u8; PIECE];
        for f in &manifest.files {
            // Names come from the image's own manifest: keep them in `dir`.
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(SpriteError::Catalog(format!(
                    "memory image file name {:?}",
                    f.name
                )));
            }
            let path = dir.join(&f.name);
            let mut out = std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
            let mut done = 0;
            while done < f.len {
                let n = (f.len - done).min(PIECE as u64) as usize;
                vol.read_at(f.offset + done, &mut buf[..n])
                    .map_err(io("reading the image".into()))?;
                out.write_all(&buf[..n])
                    .map_err(io(format!("writing {}", path.display())))?;
                done += n as u64;
            }
        }
        Ok(manifest.hostname)
    })
    .await
    .map_err(SpriteError::join)?
}

/// The bytes of image `name`'s files.
pub(crate) async fn logical_bytes(store: &Store, name: &str) -> Result<u64> {
    let vol = store.open_volume(name).await?;
    tokio::task::spawn_blocking(move || -> Result<u64> {
        Ok(read_manifest(&vol)?.files.iter().map(|f| f.len).sum())
    })
    .await
    .map_err(SpriteError::join)?
}

/// The manifest in chunk 0 (JSON, then zeros).
fn read_manifest(vol: &den_store::Volume) -> Result<Manifest> {
    let mut head = vec![0u8; den_store::DEFAULT_CHUNK_SIZE as usize];
    vol.read_at(0, &mut head)
        .map_err(|e| SpriteError::io("reading the image manifest", e))?;
    let end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    serde_json::from_slice(&head[..end])
        .map_err(|e| SpriteError::Catalog(format!("memory image manifest: {e}")))
}

/// The images of `sprite_volume`: each one's volume name and tag.
pub(crate) async fn images_of(store: &Store, sprite_volume: &str) -> Result<Vec<(String, String)>> {
    Ok(store
        .list_volumes()
        .await?
        .into_iter()
        .filter_map(|v| {
            let tag = match owner_and_tag(&v.name)? {
                (owner, tag) if owner == sprite_volume => tag.to_string(),
                _ => return None,
            };
            Some((v.name, tag))
        })
        .collect())
}

/// Does image `name` exist?
pub(crate) async fn exists(store: &Store, name: &str) -> Result<bool> {
    match store.volume(name).await {
        Ok(_) => Ok(true),
        Err(StoreError::VolumeNotFound(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
