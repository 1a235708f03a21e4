//! Where a boot's time goes, phase by phase: for `/metrics`, for the
//! benchmark's breakdown, and for whoever makes boots faster next.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;

/// One boot (cold → running), in the order the phases run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootPhases {
    /// Open the volume, serve it over FUSE, attach the loop device, mount ext4.
    pub disk: Duration,
    /// Network namespace, veth, firewall entry, `/etc` files.
    pub network: Duration,
    /// Create and start the container (PID 1 = the agent).
    pub container: Duration,
    /// Until the agent answers on its socket.
    pub agent: Duration,
    /// Handing the service definitions to the agent (zero without services).
    pub services: Duration,
}

impl BootPhases {
    pub const NAMES: [&'static str; 5] = ["disk", "network", "container", "agent", "services"];

    pub fn total(&self) -> Duration {
        self.disk + self.network + self.container + self.agent + self.services
    }

    /// The phases in [`Self::NAMES`] order.
    pub fn each(&self) -> [Duration; 5] {
        [self.disk, self.network, self.container, self.agent, self.services]
    }
}

/// How many recent boots are kept for [`BootStats::recent`].
const RECENT: usize = 4096;

/// Boots of one manager: running totals (monotonic, for counters) and the
/// most recent ones (for percentiles).
#[derive(Debug, Default)]
pub(crate) struct BootStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    count: u64,
    sum: [Duration; 5],
    recent: VecDeque<BootPhases>,
    /// Boots ever recorded, so callers can ask for "those since".
    seq: u64,
}

/// Totals since the manager started.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTotals {
    pub count: u64,
    /// Per phase, in [`BootPhases::NAMES`] order.
    pub sum: [Duration; 5],
}

impl BootStats {
    pub(crate) fn record(&self, p: BootPhases) {
        let mut s = self.inner.lock();
        s.count += 1;
        s.seq += 1;
        for (acc, d) in s.sum.iter_mut().zip(p.each()) {
            *acc += d;
        }
        if s.recent.len() == RECENT {
            s.recent.pop_front();
        }
        s.recent.push_back(p);
    }

    pub(crate) fn totals(&self) -> BootTotals {
        let s = self.inner.lock();
        BootTotals {
            count: s.count,
            sum: s.sum,
        }
    }

    /// A cursor for [`Self::since`].
    pub(crate) fn cursor(&self) -> u64 {
        self.inner.lock().seq
    }

    /// Boots recorded after `cursor` (as many as are still kept).
    pub(crate) fn since(&self, cursor: u64) -> Vec<BootPhases> {
        let s = self.inner.lock();
        let n = (s.seq.saturating_sub(cursor) as usize).min(s.recent.len());
        s.recent.iter().skip(s.recent.len() - n).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_cursors() {
        let st = BootStats::default();
        let ms = Duration::from_millis;
        let p = |d| BootPhases {
            disk: ms(d),
            agent: ms(1),
            ..Default::default()
        };
        st.record(p(5));
        let c = st.cursor();
        st.record(p(7));
        st.record(p(9));
        assert_eq!(st.since(c), vec![p(7), p(9)]);
        assert_eq!(st.since(st.cursor()), vec![]);
        let t = st.totals();
        assert_eq!(t.count, 3);
        assert_eq!(t.sum[0], ms(21));
        assert_eq!(t.sum[3], ms(3));
        assert_eq!(p(7).total(), ms(8));
        // Only the most recent are kept; totals keep counting.
        for _ in 0..RECENT + 10 {
            st.record(p(1));
        }
        assert_eq!(st.since(0).len(), RECENT);
        assert_eq!(st.totals().count, RECENT as u64 + 13);
    }
}
