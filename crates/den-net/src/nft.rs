//! Rendering the whole `inet <table>` ruleset from the manager's state.
//!
//! Every structural change (sprite added/removed, policy changed) re-renders the table and
//! applies `table; delete table; table {…}` in one `nft -f` transaction, so the kernel never
//! sees a half-built firewall and a crash between two changes leaves either the old or the
//! new ruleset. Learned IPs are part of the state, so they survive a re-render (with their
//! remaining timeouts). Only DNS learning uses incremental `add element` updates.
//!
//! Interfaces are matched by the per-manager prefix (`iifname "dn*"`), so the rules cover a
//! sprite interface from the moment it exists and nothing else on the host.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::NetConfig;

/// What the renderer needs to know about one sprite.
pub(crate) struct SpriteRules {
    pub ifname: String,
    pub addr: Ipv4Addr,
    pub unrestricted: bool,
    /// Learned destinations and how long they stay allowed.
    pub learned: Vec<(Ipv4Addr, Duration)>,
}

/// Name of the per-sprite set of allowed (DNS-learned) destinations.
pub(crate) fn allow_set(ifname: &str) -> String {
    format!("allow_{ifname}")
}

fn secs(d: Duration) -> u64 {
    // nft rejects a zero timeout; one second is the floor.
    d.as_secs().max(1)
}

pub(crate) fn render(cfg: &NetConfig, sprites: &[SpriteRules]) -> String {
    let t = &cfg.table;
    let p = &cfg.ifprefix;
    let gw = cfg.gateway();
    let mut s = String::new();
    // Create-then-delete makes the delete valid whether or not the table existed.
    let _ = writeln!(s, "table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{");

    // Anti-spoofing: a sprite may only send from the address we gave it, on its own veth.
    // Without this, the source address would not identify a sprite for the DNS forwarder.
    let _ = writeln!(s, "  set sprites {{\n    type ifname . ipv4_addr");
    if !sprites.is_empty() {
        let elems: Vec<String> = sprites
            .iter()
            .map(|sp| format!("\"{}\" . {}", sp.ifname, sp.addr))
            .collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
    }
    let _ = writeln!(s, "  }}");

    let mut blocked: Vec<String> = cfg.blocked.iter().map(|n| n.to_string()).collect();
    blocked.push(cfg.subnet.to_string());
    let _ = writeln!(
        s,
        "  set blocked {{\n    type ipv4_addr\n    flags interval\n    auto-merge\n    elements = {{ {} }}\n  }}",
        blocked.join(", ")
    );

    for sp in sprites {
        let _ = writeln!(
            s,
            "  set {} {{\n    type ipv4_addr\n    flags timeout",
            allow_set(&sp.ifname)
        );
        if !sp.learned.is_empty() {
            let elems: Vec<String> = sp
                .learned
                .iter()
                .map(|(ip, ttl)| format!("{ip} timeout {}s", secs(*ttl)))
                .collect();
            let _ = writeln!(s, "    elements = {{ {} }}", elems.join(", "));
        }
        let _ = writeln!(s, "  }}");
    }

    // Traffic to the host itself: only DNS (and ping) to the gateway address. Everything
    // else, including host services bound to 0.0.0.0 and the gateway, is refused.
    // Each sprite's DNS queries are rate limited here, before they reach the forwarder's
    // socket (shared by all sprites), so a flood can't crowd out other sprites' queries. The
    // limit comes before the conntrack shortcut: a flood from one socket is "established".
    let _ = writeln!(
        s,
        "  set dns_rate {{\n    type ipv4_addr\n    size 65535\n    flags dynamic,timeout\n    timeout 1m\n  }}"
    );
    let _ = writeln!(
        s,
        "  chain input {{
    type filter hook input priority filter; policy accept;
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
    type filter hook forward priority filter; policy accept;
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
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != \"{p}*\" masquerade
  }}
}}",
        subnet = cfg.subnet
    );
    s
}

/// Add (or refresh the timeout of) learned addresses in one transaction. `add` makes sure the
/// element exists so the `delete` cannot fail; the final `add` sets the new timeout.
pub(crate) fn learn_script(table: &str, set: &str, ips: &[(Ipv4Addr, Duration)]) -> String {
    let mut s = String::new();
    for (ip, ttl) in ips {
        let _ = writeln!(s, "add element inet {table} {set} {{ {ip} timeout 1s }}");
        let _ = writeln!(s, "delete element inet {table} {set} {{ {ip} }}");
        let _ = writeln!(
            s,
            "add element inet {table} {set} {{ {ip} timeout {}s }}",
            secs(*ttl)
        );
    }
    s
}
