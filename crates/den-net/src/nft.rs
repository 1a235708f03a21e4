//! Rendering the `inet <table>` ruleset from the manager's state.
//!
//! Every structural change (sprite added/removed, policy changed) re-renders the rules and
//! applies them in one `nft -f` transaction: the sets and chains are declared (a no-op for
//! those that exist), the chains and the `sprites` and `blocked` sets flushed and filled
//! again, and the allow sets of sprites that are gone deleted. The kernel never sees a
//! half-built firewall, and a crash between two changes leaves either the old or the new
//! ruleset. The sets of learned addresses are *not* re-rendered: they keep their elements
//! (and timeouts) in the kernel, and only [`elements_script`] changes them, so the cost of
//! a re-render does not grow with what sprites have learned.
//!
//! Interfaces are matched by the per-manager prefix (`iifname "dn*"`), so the rules cover a
//! sprite interface from the moment it exists and nothing else on the host.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::learned::Changes;
use crate::{Ipv4Net, NetConfig};

/// What the renderer needs to know about one sprite.
pub(crate) struct SpriteRules {
    pub ifname: String,
    pub addr: Ipv4Addr,
    pub unrestricted: bool,
}

/// The chains of our table, each with its hook (base chains) or none.
const CHAINS: &[(&str, &str)] = &[
    ("input", "type filter hook input priority filter; policy accept;"),
    ("sprite_in", ""),
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
    ),
    ("sprite_out", ""),
    ("sprite_back", ""),
    ("refuse", ""),
    (
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
    ),
];

/// Name of the per-sprite set of allowed (DNS-learned) destinations.
pub(crate) fn allow_set(ifname: &str) -> String {
    format!("allow_{ifname}")
}

fn secs(d: Duration) -> u64 {
    // nft rejects a zero timeout; one second is the floor.
    d.as_secs().max(1)
}

/// Declaration of a sprite's allow set. The kernel bounds it too (twice the manager's cap,
/// which [`crate::learned`] enforces first).
fn allow_set_decl(set: &str, cap: usize) -> String {
    format!(
        "  set {set} {{\n    type ipv4_addr\n    flags timeout\n    size {}\n  }}\n",
        cap.saturating_mul(2).max(64)
    )
}

/// The script for the current `sprites`; `gone` are allow sets of sprites that no longer
/// exist, `host` the host's networks and addresses (blocked like `cfg.blocked`).
pub(crate) fn render(cfg: &NetConfig, sprites: &[SpriteRules], gone: &[String], host: &[Ipv4Net]) -> String {
    let t = &cfg.table;
    let p = &cfg.ifprefix;
    let gw = cfg.gateway();
    let mut s = String::new();

    // Declarations: creates what is missing, keeps what exists (with its elements).
    let _ = writeln!(s, "table inet {t} {{");
    let _ = writeln!(s, "  set sprites {{\n    type ifname . ipv4_addr\n  }}");
    let _ = writeln!(
        s,
        "  set blocked {{\n    type ipv4_addr\n    flags interval\n    auto-merge\n  }}"
    );
    // Each sprite's DNS queries are rate limited here, before they reach the forwarder's
    // socket (shared by all sprites), so a flood can't crowd out other sprites' queries.
    let _ = writeln!(
        s,
        "  set dns_rate {{\n    type ipv4_addr\n    size 65535\n    flags dynamic,timeout\n    timeout 1m\n  }}"
    );
    for sp in sprites {
        s.push_str(&allow_set_decl(&allow_set(&sp.ifname), cfg.max_learned));
    }
    for (name, hook) in CHAINS {
        let _ = writeln!(s, "  chain {name} {{ {hook} }}");
    }
    let _ = writeln!(s, "}}");
    for (name, _) in CHAINS {
        let _ = writeln!(s, "flush chain inet {t} {name}");
    }
    let _ = writeln!(s, "flush set inet {t} sprites\nflush set inet {t} blocked");
    for set in gone {
        // Declare first, so the delete is valid whether or not the set exists.
        let _ = write!(
            s,
            "table inet {t} {{\n{}}}\n",
            allow_set_decl(set, cfg.max_learned)
        );
        let _ = writeln!(s, "delete set inet {t} {set}");
    }

    // Anti-spoofing: a sprite may only send from the address we gave it, on its own veth.
    // Without this, the source address would not identify a sprite for the DNS forwarder.
    if !sprites.is_empty() {
        let elems: Vec<String> = sprites
            .iter()
            .map(|sp| format!("\"{}\" . {}", sp.ifname, sp.addr))
            .collect();
        let _ = writeln!(s, "add element inet {t} sprites {{ {} }}", elems.join(", "));
    }
    let mut blocked: Vec<String> = cfg.blocked.iter().map(|n| n.to_string()).collect();
    blocked.push(cfg.subnet.to_string());
    blocked.extend(host.iter().map(|n| n.to_string()));
    let _ = writeln!(s, "add element inet {t} blocked {{ {} }}", blocked.join(", "));

    let _ = writeln!(s, "table inet {t} {{");

    // Traffic to the host itself: only DNS (and ping) to the gateway address. Everything
    // else, including host services bound to 0.0.0.0 and the gateway, is refused.
    // The DNS rate limit comes before the conntrack shortcut: a flood from one socket is
    // "established".
    let _ = writeln!(
        s,
        "  chain input {{
    iifname \"{p}*\" jump sprite_in
  }}
  chain sprite_in {{
    meta nfproto != ipv4 drop
    iifname . ip saddr != @sprites counter drop
    ip daddr {gw} udp dport {port} update @dns_rate {{ ip saddr limit rate over {rate}/second burst {burst} packets }} counter drop
    ct state established,related accept
    ip daddr {gw} udp dport {port} accept
    ip daddr {gw} tcp dport {port} accept
    ip daddr {gw} icmp type echo-request accept
    jump refuse
  }}",
        port = cfg.dns_port,
        rate = cfg.dns_limits.rate,
        burst = cfg.dns_limits.burst,
    );

    let _ = writeln!(
        s,
        "  chain forward {{
    iifname \"{p}*\" jump sprite_out
    oifname \"{p}*\" jump sprite_back
  }}
  chain sprite_out {{
    meta nfproto != ipv4 drop
    iifname . ip saddr != @sprites counter drop
    oifname \"{p}*\" jump refuse
    ip daddr @blocked jump refuse"
    );
    for sp in sprites {
        if sp.unrestricted {
            let _ = writeln!(s, "    iifname \"{}\" accept", sp.ifname);
        } else {
            let _ = writeln!(
                s,
                "    iifname \"{}\" ip daddr @{} accept",
                sp.ifname,
                allow_set(&sp.ifname)
            );
        }
    }
    let _ = writeln!(s, "    jump refuse\n  }}");

    // Return traffic: only for connections the sprite opened, and for restricted sprites only
    // while the peer is still allowed, so a policy change cuts both directions at once.
    let _ = writeln!(
        s,
        "  chain sprite_back {{\n    ct state != {{ established, related }} drop"
    );
    for sp in sprites {
        if sp.unrestricted {
            let _ = writeln!(s, "    oifname \"{}\" accept", sp.ifname);
        } else {
            let _ = writeln!(
                s,
                "    oifname \"{}\" ip saddr @{} accept",
                sp.ifname,
                allow_set(&sp.ifname)
            );
        }
    }
    let _ = writeln!(s, "    drop\n  }}");

    // TCP gets a reset so clients fail fast (and an open connection dies on its next packet);
    // the rest gets an ICMP error.
    let _ = writeln!(
        s,
        "  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }}
  chain postrouting {{
    ip saddr {subnet} oifname != \"{p}*\" masquerade
  }}
}}",
        subnet = cfg.subnet
    );
    s
}

/// Apply `ch` to a sprite's allow set in one transaction. Elements are added first with a
/// short timeout so that the deletes cannot fail (on an element the kernel already expired,
/// or never got); the final add sets the new timeout (an `add` of an existing element would
/// keep the old one).
pub(crate) fn elements_script(table: &str, set: &str, ch: &Changes) -> String {
    let mut s = String::new();
    let mut seen = std::collections::HashSet::new();
    let all: Vec<String> = ch
        .remove
        .iter()
        .chain(ch.add.iter().map(|(ip, _)| ip))
        .filter(|ip| seen.insert(**ip))
        .map(|ip| ip.to_string())
        .collect();
    if all.is_empty() {
        return s;
    }
    let short: Vec<String> = all.iter().map(|ip| format!("{ip} timeout 1s")).collect();
    let _ = writeln!(s, "add element inet {table} {set} {{ {} }}", short.join(", "));
    let _ = writeln!(s, "delete element inet {table} {set} {{ {} }}", all.join(", "));
    if !ch.add.is_empty() {
        let long: Vec<String> = ch
            .add
            .iter()
            .map(|(ip, ttl)| format!("{ip} timeout {}s", secs(*ttl)))
            .collect();
        let _ = writeln!(s, "add element inet {table} {set} {{ {} }}", long.join(", "));
    }
    s
}
