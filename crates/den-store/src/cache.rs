//! The local cache directory: the only place volume data touches local disk.
//!
//! ```text
//! dirty/<volume>/<idx>   live chunk content newer than the metadata head map
//! pending/<id>           sealed, immutable chunks waiting for upload
//! clean/<xx>/<hash>      read cache of chunks that are safe in the object store
//! locks/<volume>.lock    flock held while a process has the volume open
//! tmp/                   staging for atomic renames
//! ```
//! Dirty and pending files are the write-back journal: after a crash they are
//! found again by scanning, so nothing the guest fsynced is lost. Only clean
//! files are ever evicted, which makes "never evict dirty data" structural.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::chunk::ChunkHash;
use crate::meta::PendingId;

pub struct Cache {
    root: PathBuf,
    clean_limit: u64,
    lru: Mutex<Lru>,
    tmp_counter: AtomicU64,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    bytes: u64,
    by_hash: HashMap<ChunkHash, (u64, u64)>,
    by_tick: BTreeMap<u64, ChunkHash>,
}

impl Lru {
    fn touch(&mut self, h: ChunkHash, size: u64) {
        self.tick += 1;
        let t = self.tick;
        if let Some((old_t, old_size)) = self.by_hash.insert(h, (t, size)) {
            self.by_tick.remove(&old_t);
            self.bytes -= old_size;
        }
        self.bytes += size;
        self.by_tick.insert(t, h);
    }

    fn pop_oldest(&mut self) -> Option<(ChunkHash, u64)> {
        let (_, h) = self.by_tick.pop_first()?;
        let (_, size) = self.by_hash.remove(&h)?;
        self.bytes -= size;
        Some((h, size))
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CacheStats {
    pub clean_bytes: u64,
    pub clean_chunks: u64,
    pub clean_limit: u64,
}

impl Cache {
    pub fn open(root: &Path, clean_limit: u64) -> io::Result<Self> {
        for d in ["dirty", "pending", "clean", "locks", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        // Every sprite's disk content lives here in the clear; only den (the
        // owner) ever reads it, never a sprite's container.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
        }
        // Leftovers of interrupted atomic writes carry no meaning, but only a
        // dead process leaves any: other live processes share this cache (a
        // `den volume …` command next to a mount daemon) and stage their
        // writes here right now.
        for e in fs::read_dir(root.join("tmp"))? {
            let e = e?;
            if !tmp_owner_alive(&e.file_name()) {
                let _ = fs::remove_file(e.path());
            }
        }
        let cache = Cache {
            root: root.to_path_buf(),
            clean_limit,
            lru: Mutex::new(Lru::default()),
            tmp_counter: AtomicU64::new(0),
        };
        cache.rebuild_lru()?;
        Ok(cache)
    }

    fn rebuild_lru(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for sub in fs::read_dir(self.root.join("clean"))? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(h) = name.to_str().and_then(|n| ChunkHash::from_hex(n).ok()) else {
                    let _ = fs::remove_file(f.path());
                    continue;
                };
                let md = f.metadata()?;
                found.push((md.modified().ok(), h, md.len()));
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut lru = self.lru.lock();
        for (_, h, size) in found {
            lru.touch(h, size);
        }
        drop(lru);
        self.evict();
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dirty_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("dirty").join(volume_id)
    }

    pub fn dirty_path(&self, volume_id: &str, idx: u64) -> PathBuf {
        self.dirty_dir(volume_id).join(idx.to_string())
    }

    pub fn pending_dir(&self) -> PathBuf {
        self.root.join("pending")
    }

    pub fn pending_path(&self, id: PendingId) -> PathBuf {
        self.pending_dir().join(format!("{id:016x}"))
    }

    pub fn lock_path(&self, volume_id: &str) -> PathBuf {
        self.root.join("locks").join(format!("{volume_id}.lock"))
    }

    pub fn clean_path(&self, h: &ChunkHash) -> PathBuf {
        let hex = h.to_hex();
        self.root.join("clean").join(&hex[..2]).join(hex)
    }

    pub fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{n}-{:x}", std::process::id(), rand::random::<u32>()))
    }

    /// Every pending file on disk (some may be orphans of a crash).
    pub fn list_pending_files(&self) -> io::Result<Vec<PendingId>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.pending_dir())? {
            let e = e?;
            match e
                .file_name()
                .to_str()
                .and_then(|n| i64::from_str_radix(n, 16).ok())
            {
                Some(id) => out.push(id),
                None => {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(out)
    }

    /// Open a clean chunk for reading and count it as used.
    pub fn open_clean(&self, h: &ChunkHash) -> Option<File> {
        let f = File::open(self.clean_path(h)).ok()?;
        let mut lru = self.lru.lock();
        if let Some(&(_, size)) = lru.by_hash.get(h) {
            lru.touch(*h, size);
        }
        Some(f)
    }

    /// Store a verified chunk in the read cache (atomically: a crash never
    /// leaves a half-written clean file under its hash name).
    pub fn insert_clean(&self, h: &ChunkHash, data: &[u8]) -> io::Result<()> {
        let dst = self.clean_path(h);
        if dst.exists() {
            return Ok(());
        }
        let tmp = self.tmp_path();
        {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
        }
        fs::create_dir_all(dst.parent().expect("clean path has a parent"))?;
        fs::rename(&tmp, &dst)?;
        self.lru.lock().touch(*h, data.len() as u64);
        self.evict();
        Ok(())
    }

    /// An uploaded pending chunk becomes a clean cache entry without copying.
    /// The pending file stays until [`Cache::remove_pending`], so readers that
    /// still resolve the chunk as pending keep finding it.
    pub fn link_pending_to_clean(&self, id: PendingId, h: &ChunkHash) -> io::Result<()> {
        let src = self.pending_path(id);
        let dst = self.clean_path(h);
        fs::create_dir_all(dst.parent().expect("clean path has a parent"))?;
        let size = fs::metadata(&src)?.len();
        match fs::hard_link(&src, &dst) {
            Ok(()) => self.lru.lock().touch(*h, size),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.evict();
        Ok(())
    }

    pub fn remove_pending(&self, id: PendingId) {
        let _ = fs::remove_file(self.pending_path(id));
    }

    pub fn remove_clean(&self, h: &ChunkHash) {
        let _ = fs::remove_file(self.clean_path(h));
        let mut lru = self.lru.lock();
        if let Some((t, size)) = lru.by_hash.remove(h) {
            lru.by_tick.remove(&t);
            lru.bytes -= size;
        }
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut lru = self.lru.lock();
                if lru.bytes <= self.clean_limit {
                    return;
                }
                lru.pop_oldest()
            };
            match victim {
                // Readers holding the file open keep their data: unlink is safe.
                Some((h, _)) => {
                    let _ = fs::remove_file(self.clean_path(&h));
                }
                None => return,
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let lru = self.lru.lock();
        CacheStats {
            clean_bytes: lru.bytes,
            clean_chunks: lru.by_hash.len() as u64,
            clean_limit: self.clean_limit,
        }
    }

    /// Evict least recently used entries until about `want` bytes are
    /// freed (or the cache is empty). Returns the bytes evicted.
    pub fn shrink(&self, want: u64) -> u64 {
        let mut freed = 0;
        while freed < want {
            let Some((h, size)) = self.lru.lock().pop_oldest() else {
                break;
            };
            let _ = fs::remove_file(self.clean_path(&h));
            freed += size;
        }
        freed
    }

    /// Drop the whole read cache (cold-read benchmarks and tests).
    pub fn clear_clean(&self) {
        loop {
            let v = self.lru.lock().pop_oldest();
            match v {
                Some((h, _)) => {
                    let _ = fs::remove_file(self.clean_path(&h));
                }
                None => return,
            }
        }
    }
}

/// Whether the process that named tmp file `name` (`<pid>-…`, see
/// [`Cache::tmp_path`]) is still running. A reused pid only keeps a leftover
/// a little longer.
fn tmp_owner_alive(name: &std::ffi::OsStr) -> bool {
    let Some(pid) = name
        .to_str()
        .and_then(|n| n.split('-').next())
        .and_then(|p| p.parse::<libc::pid_t>().ok())
        .filter(|p| *p > 0)
    else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// fsync a directory so a rename or link inside it survives power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
