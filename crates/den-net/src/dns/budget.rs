//! Per-sprite budgets of the DNS forwarder: a query rate (token bucket) and counts of
//! queries waiting for the upstream and of open DNS-over-TCP connections, per sprite and
//! overall.
//!
//! Every piece of work the forwarder does for a query beyond parsing it and answering from
//! the policy is taken from here first, and what it holds (a pending upstream query, a TCP
//! connection) is given back by dropping its [`Permit`]. A sprite over its budget is told
//! no at once (SERVFAIL, a closed connection) or, over its rate, not answered at all, so the
//! cost of a flood to den is bounded by the limits, not by the flood.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::DnsLimits;

/// Rate buckets of this many sources are kept; beyond it, idle ones are forgotten.
const MAX_BUCKETS: usize = 4096;
/// A bucket untouched this long is full again, so it can be forgotten.
const BUCKET_IDLE: Duration = Duration::from_secs(10);

pub(crate) struct Budget {
    limits: DnsLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    buckets: HashMap<Ipv4Addr, Bucket>,
    queries: Counts,
    tcp: Counts,
}

#[derive(Default)]
struct Counts {
    per_src: HashMap<Ipv4Addr, usize>,
    total: usize,
}

impl Counts {
    fn take(&mut self, src: Ipv4Addr, per_src: usize, total: usize) -> bool {
        let mine = self.per_src.get(&src).copied().unwrap_or(0);
        if mine >= per_src || self.total >= total {
            return false;
        }
        self.per_src.insert(src, mine + 1);
        self.total += 1;
        true
    }

    fn give(&mut self, src: Ipv4Addr) {
        if let Some(n) = self.per_src.get_mut(&src) {
            *n -= 1;
            if *n == 0 {
                self.per_src.remove(&src);
            }
            self.total -= 1;
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Clone, Copy)]
enum Kind {
    Query,
    Tcp,
}

/// One unit of a sprite's budget, given back on drop.
pub(crate) struct Permit {
    budget: Arc<Budget>,
    src: Ipv4Addr,
    kind: Kind,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.budget.lock();
        match self.kind {
            Kind::Query => st.queries.give(self.src),
            Kind::Tcp => st.tcp.give(self.src),
        }
    }
}

impl Budget {
    pub(crate) fn new(limits: DnsLimits) -> Arc<Self> {
        Arc::new(Budget {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation is a single counter or map update: the data stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take one query from `src`'s rate; `false` means drop the query unanswered.
    pub(crate) fn take_token(&self, src: Ipv4Addr) -> bool {
        let now = Instant::now();
        let (rate, burst) = (f64::from(self.limits.rate), f64::from(self.limits.burst));
        let mut st = self.lock();
        if st.buckets.len() >= MAX_BUCKETS && !st.buckets.contains_key(&src) {
            st.buckets
                .retain(|_, b| now.saturating_duration_since(b.at) < BUCKET_IDLE);
            if st.buckets.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = st.buckets.entry(src).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate;
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    /// A slot for one query waiting on the upstream, or `None` when `src` (or everyone)
    /// already has as many as allowed.
    pub(crate) fn start_query(self: &Arc<Self>, src: Ipv4Addr) -> Option<Permit> {
        let ok = self
            .lock()
            .queries
            .take(src, self.limits.inflight_per_sprite, self.limits.inflight_total);
        ok.then(|| Permit {
            budget: self.clone(),
            src,
            kind: Kind::Query,
        })
    }

    /// A slot for one DNS-over-TCP connection.
    pub(crate) fn open_tcp(self: &Arc<Self>, src: Ipv4Addr) -> Option<Permit> {
        let ok = self
            .lock()
            .tcp
            .take(src, self.limits.tcp_per_sprite, self.limits.tcp_total);
        ok.then(|| Permit {
            budget: self.clone(),
            src,
            kind: Kind::Tcp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DnsLimits {
        DnsLimits {
            rate: 10,
            burst: 5,
            inflight_per_sprite: 2,
            inflight_total: 3,
            tcp_per_sprite: 1,
            tcp_total: 2,
            upstream_sockets: 1,
        }
    }

    #[test]
    fn rate_allows_the_burst_then_refuses() {
        let b = Budget::new(limits());
        let a = Ipv4Addr::new(10, 0, 0, 2);
        let granted = (0..50).filter(|_| b.take_token(a)).count();
        // The burst, plus whatever refilled while the loop ran (well under a token).
        assert!((5..=6).contains(&granted), "{granted}");
        // Another source has its own bucket.
        assert!(b.take_token(Ipv4Addr::new(10, 0, 0, 3)));
    }

    #[test]
    fn inflight_caps_per_source_and_total_and_are_given_back() {
        let b = Budget::new(limits());
        let (a, c) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
        let p1 = b.start_query(a).expect("first");
        let _p2 = b.start_query(a).expect("second");
        assert!(b.start_query(a).is_none(), "per-sprite cap");
        let _p3 = b.start_query(c).expect("other sprite");
        assert!(b.start_query(Ipv4Addr::new(10, 0, 0, 4)).is_none(), "total cap");
        drop(p1);
        assert!(b.start_query(a).is_some());
        let t = b.open_tcp(a).expect("tcp");
        assert!(b.open_tcp(a).is_none());
        drop(t);
        assert!(b.open_tcp(a).is_some());
    }
}
