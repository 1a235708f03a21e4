//! A tiny IPv4 prefix type (we need parse/contains/iterate, not a whole crate).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 network, e.g. `10.200.0.0/16`. The host bits are cleared on construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `None` if `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        let bits = u32::from(addr) & Self::mask_bits(prefix);
        Some(Ipv4Net {
            addr: bits.into(),
            prefix,
        })
    }

    fn mask_bits(prefix: u8) -> u32 {
        if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_bits(self.prefix) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_net(&self, other: &Ipv4Net) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    /// The `n`-th address of the network (0 = network address), if inside it.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size: u64 = 1u64 << (32 - self.prefix);
        if u64::from(n) >= size {
            return None;
        }
        Some((u32::from(self.addr) + n).into())
    }

    /// Number of addresses (including network and broadcast).
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{s}: {e}"))?;
        let prefix: u8 = p.parse().map_err(|e| format!("{s}: {e}"))?;
        Ipv4Net::new(addr, prefix).ok_or_else(|| format!("{s}: prefix > 32"))
    }
}

impl TryFrom<String> for Ipv4Net {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Ipv4Net> for String {
    fn from(n: Ipv4Net) -> String {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basics() {
        let n: Ipv4Net = "10.200.3.4/16".parse().unwrap();
        assert_eq!(n.to_string(), "10.200.0.0/16");
        assert!(n.contains("10.200.255.1".parse().unwrap()));
        assert!(!n.contains("10.201.0.1".parse().unwrap()));
        assert_eq!(n.nth(1), Some("10.200.0.1".parse().unwrap()));
        assert_eq!(n.nth(65536), None);
        assert!("1.2.3.4/33".parse::<Ipv4Net>().is_err());
        let lan: Ipv4Net = "192.168.1.0/24".parse().unwrap();
        assert!(lan.contains_net(&"192.168.1.5/32".parse().unwrap()));
        assert!(lan.contains_net(&lan));
        assert!(!lan.contains_net(&"192.168.0.0/16".parse().unwrap()));
    }
}
