//! An open volume: the read/write data path and sealing.
//!
//! The data path is synchronous (it is called from FUSE worker threads) and
//! never touches the metadata database. Metadata changes happen only when
//! dirty chunks are *sealed* — by write-back, checkpoint, fork or flush — and
//! when the uploader swaps a pending chunk for its content hash.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use parking_lot::{Mutex, RwLock};

use crate::budget::VolKey;
use crate::cache::sync_dir;
use crate::error::{Result, StoreError};
use crate::meta::{CheckpointRecord, Entry, PendingId, VolumeRecord};
use crate::store::Shared;

const STRIPES: usize = 256;
/// `dirty/<volume>/<idx>.unmapped`: slot `idx` was discarded while mapped.
pub(crate) const UNMAP_SUFFIX: &str = ".unmapped";

pub(crate) struct DirtyChunk {
    file: Arc<File>,
    last_write: Instant,
    unsynced: bool,
}

impl DirtyChunk {
    /// A chunk file just made or adopted: written now, not yet fsynced.
    fn new(file: File) -> DirtyChunk {
        DirtyChunk {
            file: Arc::new(file),
            last_write: Instant::now(),
            unsynced: true,
        }
    }
}

#[derive(Default)]
pub(crate) struct VolState {
    pub(crate) head: HashMap<u64, Entry>,
    /// Which head slots point at each pending chunk, so an upload commit can
    /// swap them without scanning the map.
    pub(crate) pending_slots: HashMap<PendingId, HashSet<u64>>,
    dirty: HashMap<u64, DirtyChunk>,
    /// Slots discarded in memory but not yet cleared in the metadata head.
    unmapped: HashSet<u64>,
    dir_unsynced: bool,
    /// Files sealed after an fsync that failed had taken their unsynced
    /// flag: the next fsync must sync them too, wherever they now live.
    sealed_unsynced: Vec<Arc<File>>,
}

impl VolState {
    fn set_head(&mut self, idx: u64, e: Option<Entry>) {
        let old = match e {
            Some(e) => self.head.insert(idx, e),
            None => self.head.remove(&idx),
        };
        if let Some(Entry::Pending(p)) = old
            && let Some(s) = self.pending_slots.get_mut(&p)
        {
            s.remove(&idx);
            if s.is_empty() {
                self.pending_slots.remove(&p);
            }
        }
        if let Some(Entry::Pending(p)) = e {
            self.pending_slots.entry(p).or_default().insert(idx);
        }
    }
}

/// A handle to an open volume. Cloning is cheap; the volume stays open (and
/// locked against other processes) until the last handle is dropped.
#[derive(Clone)]
pub struct Volume {
    pub(crate) inner: Arc<VolumeInner>,
    /// Held by handles from `Store::open_volume` and their clones, so a volume
    /// that only the store's background tasks hold for a moment (write-back,
    /// upload commits) does not count as open to restore and delete.
    pub(crate) _user: Option<Arc<()>>,
}

pub(crate) struct VolumeInner {
    pub(crate) shared: Arc<Shared>,
    /// This volume in the dirty budget.
    pub(crate) key: VolKey,
    pub(crate) rec: VolumeRecord,
    pub(crate) state: Mutex<VolState>,
    stripes: Vec<RwLock<()>>,
    /// Serialises whole-volume seals (checkpoint vs write-back).
    seal_lock: Mutex<()>,
    /// Counts user handles (see `Volume::_user`).
    users: Mutex<std::sync::Weak<()>>,
    /// Taken (released) first thing in `drop`, before the store forgets the
    /// volume, so a registered entry always covers the time the lock is held.
    lock: Option<Flock<File>>,
}

impl VolumeInner {
    /// A handle that counts as the volume being open.
    pub(crate) fn user_handle(self: &Arc<Self>) -> Volume {
        let mut w = self.users.lock();
        let token = w.upgrade().unwrap_or_else(|| {
            let t = Arc::new(());
            *w = Arc::downgrade(&t);
            t
        });
        Volume {
            inner: self.clone(),
            _user: Some(token),
        }
    }

    /// A handle for the store's own background work.
    pub(crate) fn internal_handle(self: &Arc<Self>) -> Volume {
        Volume {
            inner: self.clone(),
            _user: None,
        }
    }

    /// Whether any handle from `Store::open_volume` is still alive.
    pub(crate) fn has_users(&self) -> bool {
        self.users.lock().strong_count() > 0
    }
}

enum Source {
    Dirty(Arc<File>),
    Pending(PendingId),
    Chunk(crate::chunk::ChunkHash),
    Zero,
}

impl Volume {
    /// Open `rec` exclusively: take the cross-process lock, load the head map
    /// and adopt dirty chunks left by a crashed process.
    pub(crate) fn open(shared: Arc<Shared>, rec: VolumeRecord) -> Result<Volume> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(shared.cache.lock_path(&rec.id))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::VolumeBusy(rec.name.clone()))?;
        let entries = shared.block_on(shared.meta.load_map(rec.head_map))??;
        let mut st = VolState::default();
        for (idx, e) in entries {
            st.set_head(idx, Some(e));
        }
        let dir = shared.cache.dirty_dir(&rec.id);
        fs::create_dir_all(&dir)?;
        let cs = rec.chunk_size as u64;
        let key: VolKey = rec.id.as_str().into();
        shared.budget.open(&key);
        // Until `VolumeInner` exists (whose drop closes it), an early return
        // must give the reserve and the dirty bytes found so far back.
        let mut adopted = 0u64;
        let scan = (|| -> Result<()> {
            for ent in fs::read_dir(&dir)? {
                let ent = ent?;
                let name = ent.file_name();
                let name = name.to_str().unwrap_or("");
                if let Some(idx) = name
                    .strip_suffix(UNMAP_SUFFIX)
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    // A discard not yet sealed into the metadata head.
                    st.set_head(idx, None);
                    st.unmapped.insert(idx);
                    continue;
                }
                let Ok(idx) = name.parse::<u64>() else {
                    let _ = fs::remove_file(ent.path());
                    continue;
                };
                // A crash between a seal's metadata commit and the removal of the
                // sealed dirty files leaves dirty files that are hard links of
                // sealed chunks (pending files, or by now read-cache files of
                // uploaded ones). Writing into one would change that sealed
                // content in place: give it an inode of its own first.
                if std::os::unix::fs::MetadataExt::nlink(&ent.metadata()?) > 1 {
                    let tmp = shared.cache.tmp_path();
                    fs::copy(ent.path(), &tmp)
                        .and_then(|_| File::open(&tmp)?.sync_all())
                        .and_then(|_| fs::rename(&tmp, ent.path()))
                        .inspect_err(|_| {
                            let _ = fs::remove_file(&tmp);
                        })?;
                }
                let file = OpenOptions::new().read(true).write(true).open(ent.path())?;
                // A whole-chunk write cut short by a crash leaves a short or
                // holey file (see `create_whole`): give it its blocks now, so
                // later writes into it never need space. Best effort: on a
                // full disk the volume still opens, as it did before.
                if let Err(e) = preallocate(&file, cs) {
                    tracing::warn!(
                        "could not preallocate adopted chunk {}: {e}",
                        ent.path().display()
                    );
                }
                shared.budget.force(&key, cs);
                adopted += 1;
                st.dirty.insert(idx, DirtyChunk::new(file));
            }
            Ok(())
        })();
        if let Err(e) = scan {
            // No `VolumeInner` (whose drop would do it) owns these yet.
            shared.budget.release(&key, adopted * cs);
            shared.budget.close(&key);
            return Err(e);
        }
        st.dir_unsynced = true;
        Ok(Volume {
            inner: Arc::new(VolumeInner {
                shared,
                key,
                rec,
                state: Mutex::new(st),
                stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
                seal_lock: Mutex::new(()),
                users: Mutex::new(std::sync::Weak::new()),
                lock: Some(lock),
            }),
            _user: None,
        })
    }

    pub fn record(&self) -> &VolumeRecord {
        &self.inner.rec
    }

    pub fn name(&self) -> &str {
        &self.inner.rec.name
    }

    pub fn size(&self) -> u64 {
        self.inner.rec.size
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.rec.chunk_size as u64
    }

    /// Chunk indexes that hold data (sealed or dirty), ascending; the rest reads as zeros.
    pub fn mapped_chunks(&self) -> Vec<u64> {
        let st = self.inner.state.lock();
        let mut v: Vec<u64> = st.head.keys().chain(st.dirty.keys()).copied().collect();
        drop(st);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Marks slot `idx` as discarded but not yet sealed (see [`Volume::discard`]).
    fn unmap_marker(&self, idx: u64) -> std::path::PathBuf {
        let dir = self.inner.shared.cache.dirty_dir(&self.inner.rec.id);
        dir.join(format!("{idx}{UNMAP_SUFFIX}"))
    }

    /// Bytes of this volume that exist only locally (dirty chunks and
    /// sealed ones not yet uploaded), counted against its budget share.
    pub fn local_only_bytes(&self) -> u64 {
        self.inner.shared.budget.held_by(&self.inner.key)
    }

    /// Bytes held only locally by this volume (dirty chunks).
    pub fn dirty_chunks(&self) -> usize {
        self.inner.state.lock().dirty.len()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside volume {} of {} bytes",
                    self.name(),
                    self.size()
                ),
            )),
        }
    }

    fn stripe(&self, idx: u64) -> &RwLock<()> {
        &self.inner.stripes[(idx as usize) % STRIPES]
    }

    /// Split `[offset, offset+len)` into (chunk index, offset in chunk, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + use<> {
        let cs = self.chunk_size();
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = pos / cs;
            let coff = pos % cs;
            let n = (cs - coff).min(end - pos);
            pos += n;
            Some((idx, coff, n))
        })
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        for (idx, coff, n) in self.pieces(offset, buf.len() as u64) {
            let out = &mut buf[done..done + n as usize];
            self.read_piece(idx, coff, out)?;
            done += n as usize;
        }
        Ok(())
    }

    fn resolve(&self, idx: u64) -> Source {
        let st = self.inner.state.lock();
        if let Some(d) = st.dirty.get(&idx) {
            return Source::Dirty(d.file.clone());
        }
        match st.head.get(&idx) {
            Some(Entry::Pending(p)) => Source::Pending(*p),
            Some(Entry::Chunk(h)) => Source::Chunk(*h),
            None => Source::Zero,
        }
    }

    fn read_piece(&self, idx: u64, coff: u64, out: &mut [u8]) -> io::Result<()> {
        let _g = self.stripe(idx).read();
        // A pending chunk can be uploaded and moved to the clean cache between
        // resolving and opening it; resolving again then finds its hash.
        for _ in 0..8 {
            match self.resolve(idx) {
                Source::Dirty(f) => return read_exact_at(&f, out, coff),
                Source::Zero => {
                    out.fill(0);
                    return Ok(());
                }
                Source::Pending(p) => match File::open(self.inner.shared.cache.pending_path(p)) {
                    Ok(f) => return read_exact_at(&f, out, coff),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.pending_vanished(p)?;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Source::Chunk(h) => {
                    if let Some(f) = self.inner.shared.cache.open_clean(&h) {
                        return read_exact_at(&f, out, coff);
                    }
                    let data = self.inner.shared.fetch_chunk(&h)?;
                    let s = coff as usize;
                    out.copy_from_slice(&data[s..s + out.len()]);
                    return Ok(());
                }
            }
        }
        Err(io::Error::other(format!(
            "chunk {idx} of {} kept moving while being read",
            self.name()
        )))
    }

    /// The file of pending chunk `p` is gone. Usually this process's
    /// uploader removed it after pointing the head at the uploaded hash, and
    /// resolving again finds that. But every process sharing the cache can
    /// upload and remove it (each `den volume …` command recovers pending
    /// chunks when it opens the store), and then only the metadata knows the
    /// hash: take the metadata head's entry for every slot still pending here.
    /// Head entries in memory are never newer than the metadata's (seals
    /// commit first), so this only ever moves them forward.
    fn pending_vanished(&self, p: PendingId) -> io::Result<()> {
        if !self.inner.state.lock().pending_slots.contains_key(&p) {
            return Ok(());
        }
        let shared = &self.inner.shared;
        let entries: HashMap<u64, Entry> = shared
            .block_on(shared.meta.load_map(self.inner.rec.head_map))??
            .into_iter()
            .collect();
        let mut st = self.inner.state.lock();
        let stale: Vec<u64> = st
            .head
            .iter()
            .filter(|(idx, e)| matches!(e, Entry::Pending(_)) && entries.get(idx) != Some(e))
            .map(|(idx, _)| *idx)
            .collect();
        for idx in stale {
            // Absent from the metadata head: committed as a zero chunk.
            st.set_head(idx, entries.get(&idx).copied());
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0usize;
        for (idx, coff, n) in self.pieces(offset, data.len() as u64) {
            self.write_piece(idx, coff, &data[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    fn write_piece(&self, idx: u64, coff: u64, data: &[u8]) -> io::Result<()> {
        let inner = &self.inner;
        let cs = self.chunk_size();
        // Reserve budget before taking the stripe lock, so a writer waiting for
        // uploads never blocks the write-back that would free them.
        let mut reserved = false;
        loop {
            {
                let _g = self.stripe(idx).write();
                let existing = inner.state.lock().dirty.get(&idx).map(|d| d.file.clone());
                if let Some(f) = existing {
                    f.write_all_at(data, coff)?;
                    self.mark_written(idx);
                    if reserved {
                        inner.shared.budget.release(&inner.key, cs);
                    }
                    return Ok(());
                }
                if reserved {
                    self.create_dirty(idx, coff, data)?;
                    return Ok(());
                }
            }
            let shared = inner.shared.clone();
            // A new dirty chunk takes `cs` bytes of local disk: never from
            // the reserve (a full disk would fail the guest's write).
            inner.shared.space.wait_for_room(
                &inner.rec.name,
                cs,
                |n| shared.cache.shrink(n),
                || shared.nudge_writeback(),
            );
            inner
                .shared
                .budget
                .acquire(&inner.key, cs, move || shared.nudge_writeback());
            reserved = true;
        }
    }

    fn mark_written(&self, idx: u64) {
        if let Some(d) = self.inner.state.lock().dirty.get_mut(&idx) {
            d.last_write = Instant::now();
            d.unsynced = true;
        }
    }

    /// First write to a chunk since it was last sealed: build its dirty file
    /// from the current content (copy-on-write), then apply the write.
    fn create_dirty(&self, idx: u64, coff: u64, data: &[u8]) -> io::Result<()> {
        let inner = &self.inner;
        let cache = &inner.shared.cache;
        let cs = self.chunk_size();
        let whole = coff == 0 && data.len() as u64 == cs;
        if whole {
            match self.create_whole(idx, data) {
                Ok(Some(file)) => {
                    let mut st = inner.state.lock();
                    st.dir_unsynced = true;
                    st.dirty.insert(idx, DirtyChunk::new(file));
                    return Ok(());
                }
                // No O_TMPFILE here, or a stray file holds the name: the
                // staged copy below handles both.
                Ok(None) => {}
                Err(e) => {
                    inner.shared.budget.release(&inner.key, cs);
                    return Err(e);
                }
            }
        }
        let tmp = cache.tmp_path();
        let result = (|| -> io::Result<File> {
            // A pending base can be uploaded and moved while we copy it; the
            // head then names its hash, so resolve again.
            for _ in 0..8 {
                let base = if whole { Source::Zero } else { self.resolve(idx) };
                let copied = match base {
                    Source::Zero | Source::Dirty(_) => {
                        let f = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create_new(true)
                            .open(&tmp)?;
                        preallocate(&f, cs)?;
                        return Ok(f);
                    }
                    Source::Pending(p) => match fs::copy(cache.pending_path(p), &tmp) {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            self.pending_vanished(p)?;
                            Err(e)
                        }
                        r => r.map(|_| ()),
                    },
                    Source::Chunk(h) => match cache.open_clean(&h) {
                        Some(_) => fs::copy(cache.clean_path(&h), &tmp).map(|_| ()),
                        None => {
                            let bytes = inner.shared.fetch_chunk(&h)?;
                            fs::write(&tmp, &bytes[..])
                        }
                    },
                };
                match copied {
                    Ok(()) => {
                        let f = OpenOptions::new().read(true).write(true).open(&tmp)?;
                        preallocate(&f, cs)?;
                        return Ok(f);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::other(format!(
                "chunk {idx} kept moving while being copied"
            )))
        })();
        let file = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                inner.shared.budget.release(&inner.key, cs);
                return Err(e);
            }
        };
        if let Err(e) = file
            .write_all_at(data, coff)
            .and_then(|_| fs::rename(&tmp, cache.dirty_path(&inner.rec.id, idx)))
        {
            let _ = fs::remove_file(&tmp);
            inner.shared.budget.release(&inner.key, cs);
            return Err(e);
        }
        let mut st = inner.state.lock();
        // A pending unmap of `idx` stays: the metadata head still names the
        // discarded content, and if this dirty chunk is discarded in turn,
        // only the unmap clears that slot at the next seal.
        st.dir_unsynced = true;
        st.dirty.insert(idx, DirtyChunk::new(file));
        Ok(())
    }

    /// A write covering all of chunk `idx`, which has no dirty file: write
    /// the new file directly instead of staging it in `tmp/` and renaming.
    /// `Ok(None)`: this fast path does not apply, use the staged copy.
    ///
    /// Why a crash (kill -9 mid-write, or power loss before the guest's
    /// fsync) can never show a torn chunk the guest could not have seen
    /// from a real disk:
    /// * slot unmapped (reads as zeros): the file is created under its final
    ///   name and written in place. A torn file holds the new bytes up to
    ///   some point and zeros (a hole or short file) after it, i.e. every
    ///   page is either the old content (zeros) or the new one — what a disk
    ///   may hold after a crash during an unacknowledged write. Once the
    ///   guest's fsync has returned, the file is whole and synced.
    /// * slot mapped (the old content matters): the file is made nameless
    ///   (`O_TMPFILE` in the dirty directory), written whole, and only then
    ///   linked under its final name, so the name never points at a partial
    ///   chunk; a crash before the link leaves the old content in charge and
    ///   no file at all (the kernel frees a nameless inode).
    ///
    /// Both preallocate before writing, as the staged copy does: block
    /// allocation stays in the write, not in the guest's fsync, and later
    /// writes into the file never need space.
    fn create_whole(&self, idx: u64, data: &[u8]) -> io::Result<Option<File>> {
        let inner = &self.inner;
        let dst = inner.shared.cache.dirty_path(&inner.rec.id, idx);
        // Stable while we hold the stripe's write lock: only seals and
        // discards (which take it too) move a slot away from or to zeros.
        if matches!(self.resolve(idx), Source::Zero) {
            let f = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&dst)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Err(e) = preallocate(&f, data.len() as u64).and_then(|()| f.write_all_at(data, 0)) {
                drop(f);
                let _ = fs::remove_file(&dst);
                return Err(e);
            }
            return Ok(Some(f));
        }
        let dir = inner.shared.cache.dirty_dir(&inner.rec.id);
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(&dir)
        {
            Ok(f) => f,
            // Filesystems without O_TMPFILE answer EOPNOTSUPP (or EISDIR on
            // kernels that predate it).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        preallocate(&f, data.len() as u64)?;
        f.write_all_at(data, 0)?;
        // linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the /proc link
        // with AT_SYMLINK_FOLLOW does the same for anyone.
        let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
        match nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            proc.as_str(),
            nix::fcntl::AT_FDCWD,
            &dst,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        ) {
            Ok(()) => Ok(Some(f)),
            Err(nix::errno::Errno::EEXIST) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Make every completed write durable in the local cache.
    ///
    /// The flags are cleared before syncing, so a write racing the sync marks
    /// its chunk again; if the sync fails, every flag taken is put back, so
    /// the guest's retried fsync syncs the same files again instead of
    /// reporting success for data that never reached the disk.
    pub fn fsync(&self) -> io::Result<()> {
        let (files, dir) = {
            let mut st = self.inner.state.lock();
            let mut files: Vec<Arc<File>> = st
                .dirty
                .values_mut()
                .filter(|d| d.unsynced)
                .map(|d| {
                    d.unsynced = false;
                    d.file.clone()
                })
                .collect();
            files.append(&mut st.sealed_unsynced);
            let dir = std::mem::take(&mut st.dir_unsynced);
            (files, dir)
        };
        let result = sync_all_data(&files).and_then(|()| {
            if dir {
                sync_dir(&self.inner.shared.cache.dirty_dir(&self.inner.rec.id))
            } else {
                Ok(())
            }
        });
        if result.is_err() {
            let mut st = self.inner.state.lock();
            st.dir_unsynced |= dir;
            for f in files {
                // Still dirty: flag it where it is. Sealed (or discarded)
                // meanwhile: the next fsync syncs it from the sealed list.
                match st.dirty.values_mut().find(|d| Arc::ptr_eq(&d.file, &f)) {
                    Some(d) => d.unsynced = true,
                    None => st.sealed_unsynced.push(f),
                }
            }
        }
        result
    }

    /// The range reads back as zeros. Whole chunks are unmapped (their space
    /// is freed); partial edges are zero-filled.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let cs = self.chunk_size();
        for (idx, coff, n) in self.pieces(offset, len) {
            if coff == 0 && n == cs {
                let _g = self.stripe(idx).write();
                let mut st = self.inner.state.lock();
                if st.head.contains_key(&idx) {
                    // Journal the unmap next to the dirty chunks, so it
                    // survives closing the volume (and, after fsync, a crash)
                    // until a seal moves it into the metadata head.
                    File::create(self.unmap_marker(idx))?;
                }
                if let Some(d) = st.dirty.remove(&idx) {
                    drop(d);
                    let _ = fs::remove_file(self.inner.shared.cache.dirty_path(&self.inner.rec.id, idx));
                    self.inner.shared.budget.release(&self.inner.key, cs);
                }
                if st.head.contains_key(&idx) {
                    st.set_head(idx, None);
                    st.unmapped.insert(idx);
                }
                st.dir_unsynced = true;
            } else if !matches!(self.resolve(idx), Source::Zero) {
                let zeros = vec![0u8; n as usize];
                self.write_piece(idx, coff, &zeros)?;
            }
        }
        Ok(())
    }

    /// Seal dirty chunks into pending ones. `pick` chooses which dirty chunks
    /// (all of them for checkpoints). `commit` persists the seal list to
    /// metadata; it runs while the sealed chunks are still write-locked, so no
    /// write can slip into a file after it became immutable.
    pub(crate) fn seal<T>(
        &self,
        pick: impl FnOnce(&HashMap<u64, DirtyChunk>) -> Vec<u64>,
        all_unmapped: bool,
        commit: impl FnOnce(&[(u64, Option<PendingId>)]) -> Result<T>,
    ) -> Result<T> {
        let inner = &self.inner;
        let cache = &inner.shared.cache;
        let _seal = inner.seal_lock.lock();
        let mut chosen = pick(&inner.state.lock().dirty);
        chosen.sort_unstable();
        let mut stripe_ids: Vec<usize> = chosen.iter().map(|i| (*i as usize) % STRIPES).collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        // Ascending stripe order: writers only ever hold one stripe, so this
        // cannot deadlock.
        let _guards: Vec<_> = stripe_ids.iter().map(|&s| inner.stripes[s].write()).collect();

        let mut seals: Vec<(u64, Option<PendingId>)> = Vec::with_capacity(chosen.len());
        let mut linked: Vec<(u64, PendingId)> = Vec::new();
        let unmapped: Vec<u64> = {
            let st = inner.state.lock();
            if all_unmapped || !chosen.is_empty() {
                st.unmapped.iter().copied().collect()
            } else {
                Vec::new()
            }
        };
        let undo = |linked: &[(u64, PendingId)]| {
            for (_, p) in linked {
                let _ = fs::remove_file(cache.pending_path(*p));
            }
        };
        for &idx in &chosen {
            if !inner.state.lock().dirty.contains_key(&idx) {
                continue;
            }
            let p: PendingId = (rand::random::<u64>() >> 1) as i64;
            if let Err(e) = fs::hard_link(cache.dirty_path(&inner.rec.id, idx), cache.pending_path(p)) {
                undo(&linked);
                return Err(e.into());
            }
            linked.push((idx, p));
            seals.push((idx, Some(p)));
        }
        for idx in &unmapped {
            if !linked.iter().any(|(i, _)| i == idx) {
                seals.push((*idx, None));
            }
        }
        // Writes the guest has not fsynced yet are made durable now, while
        // the chunks are write-locked. Keeping their files open for the
        // guest's next fsync instead would pin every sealed chunk's disk
        // space (even after upload removed it) for as long as that fsync
        // does not come, as when a full disk holds the guest's writeback.
        let unsynced: Vec<Arc<File>> = {
            let st = inner.state.lock();
            linked
                .iter()
                .filter_map(|(idx, _)| st.dirty.get(idx).filter(|d| d.unsynced).map(|d| d.file.clone()))
                .collect()
        };
        if let Err(e) = sync_all_data(&unsynced) {
            undo(&linked);
            return Err(e.into());
        }
        if !linked.is_empty()
            && let Err(e) = sync_dir(&cache.pending_dir())
        {
            undo(&linked);
            return Err(e.into());
        }
        let out = match commit(&seals) {
            Ok(out) => out,
            Err(e) => {
                undo(&linked);
                return Err(e);
            }
        };
        let cs = self.chunk_size();
        let mut st = inner.state.lock();
        for idx in &unmapped {
            st.unmapped.remove(idx);
            let _ = fs::remove_file(self.unmap_marker(*idx));
        }
        for &(idx, p) in &linked {
            st.dirty.remove(&idx);
            let _ = fs::remove_file(cache.dirty_path(&inner.rec.id, idx));
            st.set_head(idx, Some(Entry::Pending(p)));
            inner.shared.budget.track_pending(&inner.key, p, cs);
        }
        drop(st);
        for &(_, p) in &linked {
            inner.shared.enqueue_upload(p);
        }
        Ok(out)
    }

    /// Seal everything so the metadata head equals what the guest sees.
    pub(crate) fn seal_all(&self) -> Result<()> {
        let head = self.inner.rec.head_map;
        let shared = self.inner.shared.clone();
        self.seal(
            |d| d.keys().copied().collect(),
            true,
            |seals| shared.block_on(shared.meta.apply_seal(head, seals))?,
        )
    }

    /// Seal chunks idle for `older_than`, or the oldest ones when the dirty
    /// budget is under pressure. Returns how many were sealed.
    pub(crate) fn writeback(&self, older_than: Duration, pressure: bool) -> Result<usize> {
        let head = self.inner.rec.head_map;
        let shared = self.inner.shared.clone();
        let now = Instant::now();
        let mut count = 0;
        self.seal(
            |d| {
                let mut v: Vec<(Instant, u64)> = d
                    .iter()
                    .filter(|(_, c)| pressure || now.duration_since(c.last_write) >= older_than)
                    .map(|(i, c)| (c.last_write, *i))
                    .collect();
                v.sort_unstable();
                v.truncate(1024);
                count = v.len();
                v.into_iter().map(|(_, i)| i).collect()
            },
            // Discards go to metadata on the next tick too, so the chunks they
            // freed become collectable without waiting for a checkpoint.
            true,
            |seals| shared.block_on(shared.meta.apply_seal(head, seals))?,
        )?;
        Ok(count)
    }

    /// Checkpoint: seal every dirty chunk into the head and snapshot the head
    /// map in one metadata transaction. Never copies chunk data.
    pub fn checkpoint(&self, comment: &str) -> Result<CheckpointRecord> {
        let shared = self.inner.shared.clone();
        let vid = self.inner.rec.id.clone();
        self.seal(
            |d| d.keys().copied().collect(),
            true,
            |seals| shared.block_on(shared.meta.checkpoint(&vid, comment, seals))?,
        )
    }

    /// Sync point: like [`Volume::checkpoint`], but the snapshot is the
    /// volume's hidden recovery point (see `ClusterMeta::sync_point`).
    pub fn sync_point(&self) -> Result<crate::meta::MapId> {
        let shared = self.inner.shared.clone();
        let vid = self.inner.rec.id.clone();
        self.seal(
            |d| d.keys().copied().collect(),
            true,
            |seals| shared.block_on(shared.meta.sync_point(&vid, seals))?,
        )
    }

    /// The uploader committed `pending` as `hash` (or as zeros).
    pub(crate) fn pending_committed(&self, pending: PendingId, hash: Option<crate::chunk::ChunkHash>) {
        let mut st = self.inner.state.lock();
        if let Some(slots) = st.pending_slots.remove(&pending) {
            for idx in slots {
                match hash {
                    Some(h) => {
                        st.head.insert(idx, Entry::Chunk(h));
                    }
                    None => {
                        st.head.remove(&idx);
                    }
                }
            }
        }
    }

    /// Forget dirty state before the volume's metadata is replaced (restore,
    /// delete). Only called with the volume exclusively held.
    pub(crate) fn drop_local_state(&self) -> io::Result<()> {
        let mut st = self.inner.state.lock();
        let n = st.dirty.len() as u64;
        st.dirty.clear();
        st.unmapped.clear();
        drop(st);
        self.inner
            .shared
            .budget
            .release(&self.inner.key, n * self.chunk_size());
        let dir = self.inner.shared.cache.dirty_dir(&self.inner.rec.id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for VolumeInner {
    fn drop(&mut self) {
        let cs = self.rec.chunk_size as u64;
        let n = self.state.lock().dirty.len() as u64;
        // Dirty chunks stay on disk for the next open; they are no longer this
        // process's to account for.
        self.shared.budget.release(&self.key, n * cs);
        self.shared.budget.close(&self.key);
        drop(self.lock.take());
        self.shared.forget_volume(&self.rec.id);
    }
}

/// fdatasync many files. One after another, each pays a full device cache
/// flush (measured ~2.5 ms here, so a 1 GiB sequential write spent ~2.6 s in
/// fsync); issued concurrently, the kernel merges the flushes.
fn sync_all_data(files: &[Arc<File>]) -> io::Result<()> {
    const THREADS: usize = 8;
    #[cfg(test)]
    if let Some(r) = tests::sync_fault(files.len()) {
        return r;
    }
    // A guest fsync after a small write touches a handful of chunks; spawning
    // threads for those costs more than it saves.
    if files.len() < THREADS {
        return files.iter().try_for_each(|f| f.sync_data());
    }
    let per = files.len().div_ceil(THREADS);
    std::thread::scope(|scope| {
        let workers: Vec<_> = files
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().try_for_each(|f| f.sync_data())))
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(io::Error::other("fdatasync worker panicked")))
        })
    })
}

/// Give a new dirty chunk file all its blocks now, so the guest's later
/// writes into it never need disk space (and never meet ENOSPC): the space
/// check happens once, when the chunk is created.
fn preallocate(f: &File, len: u64) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    match fallocate(f, FallocateFlags::empty(), 0, len as i64) {
        Ok(()) => Ok(()),
        // A filesystem without fallocate: a sparse file, as before.
        Err(nix::errno::Errno::EOPNOTSUPP) => f.set_len(len),
        Err(e) => Err(e.into()),
    }
}

fn read_exact_at(f: &File, out: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let n = f.read_at(&mut out[done..], off + done as u64)?;
        if n == 0 {
            // Chunk files are chunk-sized; a short file reads as zeros past
            // its end (e.g. the tail chunk of an odd-sized image).
            out[done..].fill(0);
            return Ok(());
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        /// Fail the next `sync_all_data` on this thread (an EIO from the disk).
        static FAIL_NEXT: Cell<bool> = const { Cell::new(false) };
        /// Files `sync_all_data` was asked to sync on this thread.
        static SYNCED: Cell<usize> = const { Cell::new(0) };
    }

    /// The fault hook: fsync calls `sync_all_data` on its own thread.
    pub(super) fn sync_fault(files: usize) -> Option<io::Result<()>> {
        if FAIL_NEXT.with(|f| f.replace(false)) {
            return Some(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        SYNCED.with(|n| n.set(n.get() + files));
        None
    }

    /// A failed fsync leaves its chunks marked unsynced: the guest's retry
    /// syncs them, instead of reporting success for data that was never
    /// made durable.
    #[test]
    fn fsync_retried_after_failure_syncs_the_same_chunks() {
        let cs = 64 << 10;
        let fixture = crate::test_volume::test_volume(4, cs, 1, |_| {});
        let v = &fixture.v;
        v.write_at(0, &[1u8; 4096]).unwrap();
        v.write_at(cs, &[2u8; 4096]).unwrap();

        FAIL_NEXT.with(|f| f.set(true));
        assert!(v.fsync().is_err(), "the injected fault reaches the caller");
        SYNCED.with(|n| n.set(0));
        v.fsync().unwrap();
        assert_eq!(
            SYNCED.with(Cell::get),
            2,
            "the retried fsync synced both written chunks"
        );
        assert!(v.inner.state.lock().dirty.values().all(|d| !d.unsynced));
        assert!(!v.inner.state.lock().dir_unsynced);

        // A chunk sealed between the failed fsync and its retry is synced
        // too (by the seal or the retry), from wherever it now lives.
        v.write_at(2 * cs, &[3u8; 4096]).unwrap();
        FAIL_NEXT.with(|f| f.set(true));
        assert!(v.fsync().is_err());
        SYNCED.with(|n| n.set(0));
        v.seal_all().unwrap();
        v.fsync().unwrap();
        assert_eq!(
            SYNCED.with(Cell::get),
            1,
            "the sealed chunk's file was synced once"
        );
    }
}
