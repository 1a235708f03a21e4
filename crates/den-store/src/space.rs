//! The free-space reserve on the data disk.
//!
//! A full data disk must never reach a guest as a write error: ext4 answers
//! a failed write by aborting its journal, and on a shared disk that is every
//! awake sprite at once. So before a write takes new local space (a new dirty
//! chunk), the store checks that the disk keeps `min_free` bytes free. If not,
//! it first evicts the read cache (never needed for correctness); if that is
//! not enough, the writer waits, as it does at the dirty limit, until space
//! comes back (uploads in local mode turn an uncompressed pending chunk into
//! a compressed object, GC frees deleted data, the operator frees the disk).
//! Writes into existing dirty chunks need no new space: dirty files are
//! preallocated when created.
//!
//! The reserve also leaves room for what must not block: metadata commits,
//! uploads (which free space in local mode) and the guests' own journals.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

/// The default reserve: 1 GiB or 5 % of the disk, whichever is larger, but
/// never more than a quarter of the disk (small disks must stay usable).
pub fn default_min_free(disk_bytes: u64) -> u64 {
    (1u64 << 30).max(disk_bytes / 20).min(disk_bytes / 4)
}

/// The data disk's state, for metrics and status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SpaceStats {
    /// Free bytes on the data disk (available to den).
    pub free_bytes: u64,
    /// The reserve writers never take.
    pub min_free_bytes: u64,
    /// Writers are waiting for space right now.
    pub writers_blocked: bool,
    /// How many times a writer had to wait for space.
    pub blocked_waits: u64,
    /// Read-cache bytes evicted to keep the reserve.
    pub evicted_bytes: u64,
}

pub(crate) struct Space {
    dir: PathBuf,
    min_free: u64,
    /// Writers waiting for space right now, by volume name: a sprite's
    /// status says whether *its* writes hang on the disk.
    waiting: Mutex<HashMap<String, usize>>,
    waits: AtomicU64,
    evicted: AtomicU64,
}

/// Bytes of `dir`'s filesystem available to this process, and its size.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frsize = st.fragment_size() as u64;
    // f_bavail, not f_bfree: f_bfree also counts blocks ext4 keeps back
    // even from root (its reserved clusters), which a write cannot get.
    Ok((st.blocks_available() as u64 * frsize, st.blocks() as u64 * frsize))
}

impl Space {
    pub(crate) fn new(dir: &Path, min_free: Option<u64>) -> std::io::Result<Space> {
        let min_free = match min_free {
            Some(n) => n,
            None => default_min_free(statvfs(dir)?.1),
        };
        Ok(Space {
            dir: dir.to_path_buf(),
            min_free,
            waiting: Mutex::new(HashMap::new()),
            waits: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    /// Whether `need` more bytes fit above the reserve right now.
    pub(crate) fn has_room(&self, need: u64) -> bool {
        // A failing statvfs must not stop writes: the disk itself will say.
        statvfs(&self.dir).map_or(true, |(free, _)| free >= self.min_free + need)
    }

    /// Wait until `need` bytes can be written above the reserve, for a
    /// writer of `volume`. `evict` frees up to the given number of
    /// read-cache bytes and returns how many it freed; `nudge` wakes
    /// write-back and uploads, which free space too.
    pub(crate) fn wait_for_room(
        &self,
        volume: &str,
        need: u64,
        evict: impl Fn(u64) -> u64,
        nudge: impl Fn(),
    ) {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let free = match statvfs(&self.dir) {
                Ok((free, _)) => free,
                Err(_) => return,
            };
            let want = self.min_free + need;
            if free >= want {
                if let Some(w) = waiting.take()
                    && w.leave()
                {
                    tracing::warn!(
                        "data disk {}: {free} bytes free again, above the {} byte reserve: writers continue",
                        self.dir.display(),
                        self.min_free
                    );
                }
                return;
            }
            let freed = evict(want - free);
            if freed > 0 {
                self.evicted.fetch_add(freed, Ordering::Relaxed);
                continue;
            }
            if waiting.is_none() {
                self.waits.fetch_add(1, Ordering::Relaxed);
                let (w, first) = Waiting::enter(self, volume);
                waiting = Some(w);
                if first {
                    tracing::error!(
                        "data disk {} is full: {free} bytes free, below the {} byte reserve; \
                         writes block until space is freed (the read cache is already empty)",
                        self.dir.display(),
                        self.min_free
                    );
                }
            }
            nudge();
            // Space comes back from outside (uploads, GC, the operator):
            // there is nothing to wait on but the disk itself.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a writer of `volume` is waiting for space right now.
    pub(crate) fn volume_blocked(&self, volume: &str) -> bool {
        self.waiting.lock().contains_key(volume)
    }

    pub(crate) fn stats(&self) -> SpaceStats {
        SpaceStats {
            free_bytes: statvfs(&self.dir).map_or(0, |(free, _)| free),
            min_free_bytes: self.min_free,
            writers_blocked: !self.waiting.lock().is_empty(),
            blocked_waits: self.waits.load(Ordering::Relaxed),
            evicted_bytes: self.evicted.load(Ordering::Relaxed),
        }
    }
}

/// One writer counted in [`Space::waiting`] while it waits; uncounted when
/// dropped, so a writer that leaves the wait by any path never stays listed.
struct Waiting<'a> {
    space: &'a Space,
    volume: String,
}

impl<'a> Waiting<'a> {
    /// Count a writer of `volume`; also says whether it is the first writer
    /// waiting at all (the disk just became full).
    fn enter(space: &'a Space, volume: &str) -> (Waiting<'a>, bool) {
        let mut w = space.waiting.lock();
        let first = w.is_empty();
        *w.entry(volume.to_string()).or_default() += 1;
        let volume = volume.to_string();
        (Waiting { space, volume }, first)
    }

    /// Stop waiting; says whether no writer waits any more.
    fn leave(self) -> bool {
        let space = self.space;
        drop(self);
        space.waiting.lock().is_empty()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut w = self.space.waiting.lock();
        if let Some(n) = w.get_mut(&self.volume) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.volume);
            }
        }
    }
}
