//! Read-only access to a checkpoint without restoring or forking it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;
use crate::meta::{CheckpointRecord, Entry, MapId};
use crate::store::Shared;

/// A checkpoint's content, readable while the volume itself keeps running.
pub struct CheckpointReader {
    shared: Arc<Shared>,
    map_id: MapId,
    size: u64,
    chunk_size: u64,
    record: CheckpointRecord,
    map: Mutex<HashMap<u64, Entry>>,
}

impl CheckpointReader {
    pub(crate) fn new(
        shared: Arc<Shared>,
        record: CheckpointRecord,
        size: u64,
        chunk_size: u64,
        entries: Vec<(u64, Entry)>,
    ) -> Self {
        CheckpointReader {
            shared,
            map_id: record.map_id,
            size,
            chunk_size,
            record,
            map: Mutex::new(entries.into_iter().collect()),
        }
    }

    pub fn record(&self) -> &CheckpointRecord {
        &self.record
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Chunk indexes that hold data, ascending; everything else reads as zeros.
    pub fn mapped_chunks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.lock().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Read one whole chunk (zeros if unmapped). Call from a non-async thread.
    pub fn read_chunk(&self, idx: u64) -> io::Result<Vec<u8>> {
        for _ in 0..8 {
            let e = self.map.lock().get(&idx).copied();
            match e {
                None => return Ok(vec![0; self.chunk_size as usize]),
                Some(Entry::Chunk(h)) => {
                    if let Some(f) = self.shared.cache.open_clean(&h) {
                        return read_file(&f, self.chunk_size);
                    }
                    return Ok(self.shared.fetch_chunk(&h)?.to_vec());
                }
                Some(Entry::Pending(p)) => match File::open(self.shared.cache.pending_path(p)) {
                    Ok(f) => return read_file(&f, self.chunk_size),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => self.reload()?,
                    Err(e) => return Err(e),
                },
            }
        }
        Err(io::Error::other(format!(
            "chunk {idx} of the checkpoint kept moving"
        )))
    }

    fn reload(&self) -> Result<()> {
        let entries = self.shared.block_on(self.shared.meta.load_map(self.map_id))??;
        *self.map.lock() = entries.into_iter().collect();
        Ok(())
    }
}

fn read_file(f: &File, len: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(buf)
}
