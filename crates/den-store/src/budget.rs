//! The bound on bytes that exist only locally (dirty + pending chunks).
//!
//! Writers that would create a new dirty chunk wait here while the bound is
//! reached; uploads give bytes back. When the object store is down, writes
//! continue into the cache until the bound and then block, instead of
//! filling the local disk.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::meta::PendingId;

pub struct DirtyBudget {
    limit: u64,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    bytes: u64,
    /// Pending chunks counted here; released when uploaded or found gone.
    pending: HashMap<PendingId, u64>,
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

    pub fn over_high_water(&self) -> bool {
        self.used() > self.limit / 2
    }

    /// Take `n` bytes, waiting while the budget is exhausted. `nudge` is called
    /// while waiting so write-back gets a chance to start uploads. A single
    /// request larger than the whole limit is let through alone, or it would
    /// never make progress.
    pub fn acquire(&self, n: u64, nudge: impl Fn()) {
        let mut st = self.state.lock();
        while st.bytes > 0 && st.bytes + n > self.limit {
            nudge();
            self.freed.wait_for(&mut st, Duration::from_millis(100));
        }
        st.bytes += n;
    }

    /// Count bytes that are already on disk (found at recovery) without waiting.
    pub fn force(&self, n: u64) {
        self.state.lock().bytes += n;
    }

    pub fn release(&self, n: u64) {
        let mut st = self.state.lock();
        st.bytes = st.bytes.saturating_sub(n);
        self.freed.notify_all();
    }

    /// A dirty chunk became pending: the bytes stay counted, now under its id.
    pub fn track_pending(&self, id: PendingId, n: u64) {
        self.state.lock().pending.insert(id, n);
    }

    /// A pending chunk found on disk at start-up.
    pub fn adopt_pending(&self, id: PendingId, n: u64) {
        let mut st = self.state.lock();
        if st.pending.insert(id, n).is_none() {
            st.bytes += n;
        }
    }

    pub fn release_pending(&self, id: PendingId) {
        let mut st = self.state.lock();
        if let Some(n) = st.pending.remove(&id) {
            st.bytes = st.bytes.saturating_sub(n);
            self.freed.notify_all();
        }
    }
}
