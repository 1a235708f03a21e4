//! A sprite's learned destinations: the addresses a lookup of an allowed name returned, for
//! which names, until when, and until when the kernel set holds each one.
//!
//! Bounded: at most `cap` (address, name) pairs per sprite. A sprite resolving ever new
//! allowed names (`*.example.com` with 68,000 unique names) evicts its own oldest entries
//! instead of growing den's memory and nft set without end. The kernel set gets each
//! address with a timeout a little past its longest expiry ([`REFRESH_SLACK`]), so looking
//! up the same name again costs an nft update at most once per slack period instead of at
//! every lookup.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How much longer than its DNS expiry an address stays in the kernel set, so repeated
/// lookups within this time need no nft update.
pub(crate) const REFRESH_SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub(crate) struct Learned {
    ips: HashMap<Ipv4Addr, Entry>,
    /// Number of (address, name) pairs, the unit of the cap.
    pairs: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    names: HashMap<String, Instant>,
    /// When the kernel's element for this address expires.
    kernel_exp: Instant,
}

/// What the kernel set must be told after a change.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Elements to add or whose timeout to extend.
    pub add: Vec<(Ipv4Addr, Duration)>,
    /// Elements to delete (evicted, or no longer allowed).
    pub remove: Vec<Ipv4Addr>,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

impl Learned {
    /// Record that `name` resolved to `ip`, valid until `exp`.
    pub(crate) fn insert(&mut self, ip: Ipv4Addr, name: &str, exp: Instant, now: Instant, ch: &mut Changes) {
        let e = self.ips.entry(ip).or_insert_with(|| Entry {
            names: HashMap::new(),
            kernel_exp: now,
        });
        match e.names.get_mut(name) {
            Some(old) => *old = (*old).max(exp),
            None => {
                e.names.insert(name.to_string(), exp);
                self.pairs += 1;
            }
        }
        let longest = e.names.values().max().copied().unwrap_or(exp);
        if longest > e.kernel_exp {
            e.kernel_exp = longest + REFRESH_SLACK;
            let left = e.kernel_exp.saturating_duration_since(now);
            match ch.add.iter_mut().find(|(a, _)| *a == ip) {
                Some(entry) => entry.1 = left,
                None => ch.add.push((ip, left)),
            }
        }
    }

    /// Forget expired entries; returns the addresses left with no name (still in the kernel
    /// set for at most [`REFRESH_SLACK`]).
    pub(crate) fn prune(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        let mut pairs = 0;
        let mut gone = Vec::new();
        self.ips.retain(|ip, e| {
            e.names.retain(|_, exp| *exp > now);
            pairs += e.names.len();
            if e.names.is_empty() {
                gone.push(*ip);
            }
            !e.names.is_empty()
        });
        self.pairs = pairs;
        gone
    }

    /// Keep at most `cap` pairs: drop expired ones, then the ones that expire first (an
    /// eighth of `cap` more than needed, so the sort is paid once per `cap / 8` inserts).
    pub(crate) fn enforce_cap(&mut self, cap: usize, now: Instant, ch: &mut Changes) {
        if self.pairs <= cap {
            return;
        }
        // Expired addresses leave the kernel set now too, so it stays within its size even
        // for a sprite that learns more than the cap within their slack.
        for ip in self.prune(now) {
            ch.add.retain(|(a, _)| *a != ip);
            ch.remove.push(ip);
        }
        if self.pairs <= cap {
            return;
        }
        let mut all: Vec<(Instant, Ipv4Addr, String)> = self
            .ips
            .iter()
            .flat_map(|(ip, e)| e.names.iter().map(|(n, exp)| (*exp, *ip, n.clone())))
            .collect();
        all.sort();
        let evict = (self.pairs - cap + cap / 8).min(all.len());
        for (_, ip, name) in all.into_iter().take(evict) {
            let Some(e) = self.ips.get_mut(&ip) else {
                continue;
            };
            e.names.remove(&name);
            self.pairs -= 1;
            if e.names.is_empty() {
                self.ips.remove(&ip);
                ch.add.retain(|(a, _)| *a != ip);
                ch.remove.push(ip);
            }
        }
    }

    /// Keep only the names `keep` accepts; returns the addresses left with no name.
    pub(crate) fn retain_names(&mut self, mut keep: impl FnMut(&str) -> bool) -> Vec<Ipv4Addr> {
        let mut dropped = Vec::new();
        let mut pairs = 0;
        self.ips.retain(|ip, e| {
            e.names.retain(|n, _| keep(n));
            pairs += e.names.len();
            if e.names.is_empty() {
                dropped.push(*ip);
            }
            !e.names.is_empty()
        });
        self.pairs = pairs;
        dropped
    }

    /// Addresses with an unexpired name, sorted.
    pub(crate) fn ips(&self, now: Instant) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> = self
            .ips
            .iter()
            .filter(|(_, e)| e.names.values().any(|exp| *exp > now))
            .map(|(ip, _)| *ip)
            .collect();
        v.sort();
        v
    }

    #[cfg(test)]
    fn pairs(&self) -> usize {
        self.pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + n)
    }

    #[test]
    fn repeated_lookups_touch_the_kernel_once_per_slack() {
        let mut l = Learned::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut ch = Changes::default();
        l.insert(ip(1), "a.test", now + ttl, now, &mut ch);
        assert_eq!(ch.add, vec![(ip(1), ttl + REFRESH_SLACK)]);
        let mut ch = Changes::default();
        let later = now + Duration::from_secs(10);
        l.insert(ip(1), "a.test", later + ttl, later, &mut ch);
        assert!(ch.is_empty(), "{ch:?}");
        let much_later = now + REFRESH_SLACK + Duration::from_secs(1);
        l.insert(ip(1), "a.test", much_later + ttl, much_later, &mut ch);
        assert_eq!(ch.add.len(), 1);
        assert_eq!(l.pairs(), 1);
    }

    #[test]
    fn cap_evicts_the_oldest_and_reports_removed_addresses() {
        let mut l = Learned::default();
        let now = Instant::now();
        let mut ch = Changes::default();
        for n in 0..100u32 {
            let exp = now + Duration::from_secs(60 + u64::from(n));
            l.insert(ip(n), &format!("n{n}.test"), exp, now, &mut ch);
            l.enforce_cap(64, now, &mut ch);
            assert!(l.pairs() <= 64);
        }
        let kept = l.ips(now);
        assert!(kept.contains(&ip(99)) && !kept.contains(&ip(0)), "{kept:?}");
        assert!(ch.remove.contains(&ip(0)));
        assert!(ch.remove.iter().all(|r| !kept.contains(r)));
        assert!(ch.add.iter().all(|(a, _)| !ch.remove.contains(a)));
        // One address for many names counts every name.
        let mut l = Learned::default();
        for n in 0..100u32 {
            l.insert(
                ip(1),
                &format!("n{n}.test"),
                now + Duration::from_secs(60),
                now,
                &mut ch,
            );
            l.enforce_cap(64, now, &mut ch);
        }
        assert!(l.pairs() <= 64);
        assert_eq!(l.ips(now), vec![ip(1)]);
    }
}
