//! The bound on bytes that exist only locally (dirty + pending chunks).
//!
//! Writers that would create a new dirty chunk wait here while the bound is
//! reached; uploads give bytes back. When the object store is down, writes
//! continue into the cache until the bound and then block, instead of
//! filling the local disk.
//!
//! The bound is shared fairly: every open volume has a guaranteed reserve
//! (see [`DirtyBudget::reserve`]) that no other volume may take, and only the
//! rest is a pool for whoever writes most. So during an object-store outage
//! one volume's flood fills the pool and blocks, while another volume's
//! small write + fsync still finds room at once in its own reserve. The
//! reserves together are at most half the limit, and a volume writing
//! within its reserve is let through even when the pool is full, so the
//! total can pass the limit by at most that half.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::meta::PendingId;

/// Volumes are named by their id.
pub type VolKey = Arc<str>;

pub struct DirtyBudget {
    limit: u64,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    bytes: u64,
    /// Pending chunks counted here, with the volume that sealed them (none
    /// for those found at start-up); released when uploaded or found gone.
    pending: HashMap<PendingId, (Option<VolKey>, u64)>,
    vols: HashMap<VolKey, VolUse>,
}

#[derive(Default)]
struct VolUse {
    /// Dirty + pending bytes of this volume.
    held: u64,
    /// Open handles in this process; only open volumes have a reserve.
    open: u32,
}

impl BudgetState {
    fn open_vols(&self) -> u64 {
        self.vols.values().filter(|u| u.open > 0).count() as u64
    }

    fn sub_vol(&mut self, vol: &VolKey, n: u64) {
        if let Some(u) = self.vols.get_mut(vol) {
            u.held = u.held.saturating_sub(n);
            if u.held == 0 && u.open == 0 {
                self.vols.remove(vol);
            }
        }
    }
}

impl DirtyBudget {
    pub fn new(limit: u64) -> Self {
        DirtyBudget {
            limit,
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        }
    }

    pub fn used(&self) -> u64 {
        self.state.lock().bytes
    }

    /// Local-only bytes of one volume (dirty + pending sealed by it).
    pub fn held_by(&self, vol: &str) -> u64 {
        self.state.lock().vols.get(vol).map_or(0, |u| u.held)
    }

    pub fn over_high_water(&self) -> bool {
        self.used() > self.limit / 2
    }

    /// Each open volume's guaranteed share: a sixteenth of the limit (16 to
    /// 256 MiB), less when so many volumes are open that the reserves would
    /// pass half the limit.
    fn reserve(&self, open_vols: u64) -> u64 {
        let base = (self.limit / 16).clamp(16 << 20, 256 << 20);
        base.min(self.limit / 2 / open_vols.max(1))
    }

    /// A volume is open in this process: it gets a reserve.
    pub fn open(&self, vol: &VolKey) {
        self.state.lock().vols.entry(vol.clone()).or_default().open += 1;
        // Others' pool just shrank; nobody needs waking.
    }

    /// Its handle is gone: its reserve goes back to the pool.
    pub fn close(&self, vol: &VolKey) {
        let mut st = self.state.lock();
        if let Some(u) = st.vols.get_mut(vol) {
            u.open = u.open.saturating_sub(1);
            if u.held == 0 && u.open == 0 {
                st.vols.remove(vol);
            }
        }
        self.freed.notify_all();
    }

    /// Take `n` bytes for `vol`, waiting while neither its reserve nor the
    /// shared pool has room. `nudge` is called while waiting so write-back
    /// gets a chance to start uploads. A single request larger than the
    /// whole limit is let through alone, or it would never make progress.
    pub fn acquire(&self, vol: &VolKey, n: u64, nudge: impl Fn()) {
        let mut st = self.state.lock();
        loop {
            let reserve = self.reserve(st.open_vols());
            let held = st.vols.get(vol).map_or(0, |u| u.held);
            if held + n <= reserve {
                break;
            }
            // What the other open volumes have not used of their reserves
            // is theirs: the pool is what is left of the limit after it.
            let set_aside: u64 = st
                .vols
                .iter()
                .filter(|(k, u)| u.open > 0 && *k != vol)
                .map(|(_, u)| reserve.saturating_sub(u.held))
                .sum();
            if st.bytes == 0 || st.bytes + n + set_aside <= self.limit {
                break;
            }
            nudge();
            self.freed.wait_for(&mut st, Duration::from_millis(100));
        }
        st.bytes += n;
        st.vols.entry(vol.clone()).or_default().held += n;
    }

    /// Count bytes that are already on disk (found at recovery) without waiting.
    pub fn force(&self, vol: &VolKey, n: u64) {
        let mut st = self.state.lock();
        st.bytes += n;
        st.vols.entry(vol.clone()).or_default().held += n;
    }

    pub fn release(&self, vol: &VolKey, n: u64) {
        let mut st = self.state.lock();
        st.bytes = st.bytes.saturating_sub(n);
        st.sub_vol(vol, n);
        self.freed.notify_all();
    }

    /// A dirty chunk of `vol` became pending: the bytes stay counted, now
    /// under its id.
    pub fn track_pending(&self, vol: &VolKey, id: PendingId, n: u64) {
        self.state.lock().pending.insert(id, (Some(vol.clone()), n));
    }

    /// A pending chunk found on disk at start-up.
    pub fn adopt_pending(&self, id: PendingId, n: u64) {
        let mut st = self.state.lock();
        if let std::collections::hash_map::Entry::Vacant(e) = st.pending.entry(id) {
            e.insert((None, n));
            st.bytes += n;
        }
    }

    pub fn release_pending(&self, id: PendingId) {
        let mut st = self.state.lock();
        if let Some((vol, n)) = st.pending.remove(&id) {
            st.bytes = st.bytes.saturating_sub(n);
            if let Some(vol) = vol {
                st.sub_vol(&vol, n);
            }
            self.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// One volume filling the pool never takes another open volume's reserve.
    #[test]
    fn a_flooding_volume_leaves_the_others_reserve_alone() {
        let b = DirtyBudget::new(64 * MIB);
        let (a, c): (VolKey, VolKey) = ("a".into(), "c".into());
        b.open(&a);
        b.open(&c);
        let reserve = b.reserve(2);
        assert_eq!(reserve, 16 * MIB);
        // `a` takes everything but `c`'s reserve without waiting...
        for _ in 0..(64 - 16) {
            b.acquire(&a, MIB, || {});
        }
        assert_eq!(b.held_by("a"), 48 * MIB);
        // ...and `c` still gets room at once.
        b.acquire(&c, MIB, || panic!("c had to wait for a's flood"));
        assert_eq!(b.held_by("c"), MIB);
    }
}
