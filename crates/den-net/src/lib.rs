//! Sprite networking: a network namespace per sprite, host-side nftables isolation and NAT,
//! and the DNS-based egress policy of the Sprites API (§2.7).
//!
//! # Topology
//!
//! There is no bridge. Each sprite gets a veth pair: the host end `<ifprefix><hash>` carries
//! the gateway address (`.1` of the subnet) as a /32 and a /32 route to the sprite; the sprite
//! end is `eth0` inside the netns `<netns_prefix><id>` with the sprite's /32 address, an
//! on-link route to the gateway and a default route via it. Routed /32 veths (instead of a
//! bridge) mean every packet between sprites, and from a sprite to the host, goes through the
//! host's IP stack and our `inet` hooks, with the per-sprite interface name visible — we do
//! not depend on `br_netfilter` (not available on this kernel) or on bridge port isolation.
//!
//! # Firewall
//!
//! One `inet <table>` (default `den`), owned by us, installed whole when the manager starts
//! and then changed one sprite at a time, each change one atomic transaction ([`nft`]): sprites
//! may reach the host only for DNS on the gateway; never each other, the blocked ranges
//! (link-local/metadata, loopback, private ranges by default), the networks attached to the
//! host's interfaces and the host's own addresses (unless the operator allows them, read at
//! every setup, teardown and policy change), or their own subnet; egress is masqueraded.
//! Forwarding is enabled per interface (our veths and the uplinks), not globally.
//!
//! # Egress policy
//!
//! A restricted sprite may only reach addresses that the [`dns::DnsForwarder`] learned from a
//! lookup of an allowed name; the addresses go into the sprite's nft set with a timeout from
//! the TTL. A sprite holds at most [`NetConfig::max_learned`] of them (the ones that expire
//! first are evicted), and learned addresses reach the kernel in batches, one nft
//! transaction for all that were learned while the previous one ran, outside the state
//! lock. A policy change deletes the addresses that are no longer allowed, and connections
//! to them are cut (the rules check the set on every packet in both directions, and
//! conntrack entries are deleted when the `conntrack` tool is installed).
//!
//! # Crash safety
//!
//! State is in memory; the caller persists each sprite's address and policy and calls
//! [`NetManager::setup_sprite`] again after a restart (it is idempotent and repairs).
//! [`NetManager::new`] replaces the table, and [`NetManager::cleanup_leftovers`] removes the
//! netns/veths of sprites that no longer exist, by name.

mod addr;
mod cmd;
pub mod dns;
mod learned;
mod libnft;
pub mod netns;
mod nft;
mod nftq;
pub mod policy;
mod rtnl;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use learned::{Changes, Learned};
use nftq::NftQueue;

pub use addr::Ipv4Net;
pub use policy::{Action, CompiledPolicy, NetworkPolicy, PolicyError};

/// Errors from network setup. Command failures carry the tool's stderr.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("failed to run {prog}: {source}")]
    Spawn {
        prog: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        cmd: String,
        stderr: String,
        /// The script fed on stdin, for debugging a rejected ruleset.
        stdin: Option<String>,
    },
    #[error("network namespace {name}: {reason}")]
    Netns { name: String, reason: String },
    /// A netlink request (what `ip` would have done) failed; `op` is the `ip` equivalent.
    #[error("netlink `{op}` failed: {source}")]
    Netlink {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sprite id {0:?}: use 1-63 characters of a-z, 0-9 and '-'")]
    BadId(String),
    #[error("address {addr} is not a usable sprite address in {subnet}")]
    BadAddress { addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("address {addr} already belongs to sprite {owner}")]
    AddressInUse { addr: Ipv4Addr, owner: String },
    #[error("no free sprite address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("interface name {ifname} of sprite {id} collides with sprite {other}")]
    IfnameCollision {
        id: String,
        other: String,
        ifname: String,
    },
    #[error("unknown sprite {0}")]
    UnknownSprite(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("bad network config: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Host-wide network settings. One [`NetManager`] per config; tests run several side by side
/// with distinct tables, subnets and prefixes.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Sprite addresses come from here; `.1` is the gateway (and DNS) address.
    pub subnet: Ipv4Net,
    /// Our nftables table (family `inet`).
    pub table: String,
    /// Prefix of host-side veth names (1-7 chars of a-z0-9); the rest is a hash of the id.
    pub ifprefix: String,
    /// Prefix of netns names under /run/netns.
    pub netns_prefix: String,
    /// Port the DNS forwarder listens on at the gateway address.
    pub dns_port: u16,
    /// Resolver the DNS forwarder asks for allowed names.
    pub upstream_dns: SocketAddr,
    /// Destinations no sprite may reach, whatever the policy (the subnet itself is added,
    /// and so are the host's networks: see `allowed_host_networks`).
    pub blocked: Vec<Ipv4Net>,
    /// The networks attached to the host's interfaces (its LAN, other bridges) and the
    /// host's own addresses are blocked for every sprite, read again at every sprite setup,
    /// teardown and policy change; except those inside one of these networks (e.g.
    /// `0.0.0.0/0` lets sprites reach every host network again).
    pub allowed_host_networks: Vec<Ipv4Net>,
    /// Interfaces that carry sprite egress (forwarding is enabled on them, for the return
    /// path). Empty: the interface of the default route.
    pub uplinks: Vec<String>,
    /// Learned addresses stay allowed at least this long, so a client that connects a little
    /// after its lookup (or a TTL of 0) still works.
    pub min_learned_ttl: Duration,
    /// And at most this long.
    pub max_learned_ttl: Duration,
    /// Learned (address, name) pairs one sprite may hold; beyond it, the ones that expire
    /// first are forgotten (and their addresses unreachable until looked up again).
    pub max_learned: usize,
    /// Bounds on the DNS forwarder's work per sprite and overall.
    pub dns_limits: DnsLimits,
}

/// Bounds on the DNS forwarder's work, so that one sprite flooding its resolver can neither
/// exhaust den's file handles nor delay other sprites' lookups: each sprite gets a query
/// rate, and a number of queries and DNS-over-TCP connections it may have open at once;
/// all sprites together share a fixed number of upstream sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsLimits {
    /// Queries per second one sprite may send; more are dropped (in nft for UDP, before
    /// they reach den's socket, and again in the forwarder for UDP and TCP).
    pub rate: u32,
    /// How many queries one sprite may send in a burst above `rate`.
    pub burst: u32,
    /// Queries of one sprite that may wait for the upstream at once; more get SERVFAIL at
    /// once.
    pub inflight_per_sprite: usize,
    /// The same for all sprites together.
    pub inflight_total: usize,
    /// DNS-over-TCP connections one sprite may keep open; more are closed on accept.
    pub tcp_per_sprite: usize,
    /// The same for all sprites together.
    pub tcp_total: usize,
    /// UDP sockets the forwarder asks the upstream from (answers are matched by query id
    /// and question, not by socket).
    pub upstream_sockets: usize,
}

impl Default for DnsLimits {
    /// Generous for a build resolving hundreds of hosts; a flood costs den at most
    /// `inflight_total` pending queries and `upstream_sockets` + `tcp_total` sockets.
    fn default() -> Self {
        DnsLimits {
            rate: 500,
            burst: 1000,
            inflight_per_sprite: 64,
            inflight_total: 1024,
            tcp_per_sprite: 8,
            tcp_total: 256,
            upstream_sockets: 8,
        }
    }
}

impl NetConfig {
    /// Production defaults: `10.200.0.0/16`, table `den`, `dn*` veths, `den-*` netns, DNS on
    /// port 53, private/special ranges blocked (the hosted service blocks private IPs too).
    pub fn new(upstream_dns: SocketAddr) -> Self {
        let nets = [
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
        ];
        NetConfig {
            subnet: "10.200.0.0/16".parse().expect("literal"),
            table: "den".into(),
            ifprefix: "dn".into(),
            netns_prefix: "den-".into(),
            dns_port: 53,
            upstream_dns,
            blocked: nets.iter().map(|n| n.parse().expect("literal")).collect(),
            allowed_host_networks: Vec::new(),
            uplinks: Vec::new(),
            min_learned_ttl: Duration::from_secs(60),
            max_learned_ttl: Duration::from_secs(3600),
            max_learned: 4096,
            dns_limits: DnsLimits::default(),
        }
    }

    /// The gateway (`.1`), which is also the sprites' DNS server.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1).expect("validated: subnet has room")
    }

    fn validate(&self) -> Result<(), NetError> {
        let bad = |m: &str| Err(NetError::Config(m.to_string()));
        if self.subnet.prefix() > 30 {
            return bad("subnet must be /30 or larger");
        }
        let simple = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !simple(&self.table, 32) {
            return bad("table must be 1-32 chars of a-z, 0-9, _");
        }
        if !simple(&self.ifprefix, 7) || self.ifprefix.contains('_') {
            return bad("ifprefix must be 1-7 chars of a-z, 0-9");
        }
        if self.netns_prefix.contains('/') || self.netns_prefix.len() > 64 {
            return bad("netns_prefix must not contain '/'");
        }
        if self.min_learned_ttl > self.max_learned_ttl {
            return bad("min_learned_ttl > max_learned_ttl");
        }
        if self.max_learned == 0 {
            return bad("max_learned must be positive");
        }
        let d = &self.dns_limits;
        if d.rate == 0
            || d.burst == 0
            || d.inflight_per_sprite == 0
            || d.inflight_total == 0
            || d.tcp_per_sprite == 0
            || d.tcp_total == 0
            || !(1..=64).contains(&d.upstream_sockets)
        {
            return bad("dns limits must be positive (and 1-64 upstream sockets)");
        }
        Ok(())
    }
}

/// What the runtime needs to start a sprite's container in its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpriteNet {
    pub id: String,
    /// Name for `ip netns exec` / [`netns::run_in`].
    pub netns: String,
    /// Bind mount to pass as the OCI network namespace path.
    pub netns_path: PathBuf,
    /// Host end of the veth.
    pub host_ifname: String,
    /// The sprite's address: persist it and pass it back on the next setup.
    pub addr: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// Put this in the sprite's /etc/resolv.conf (`nameserver <ip>`; the port is 53 in
    /// production).
    pub dns: SocketAddrV4,
}

/// The forwarder's verdict for one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DnsVerdict {
    /// Not from a known sprite address.
    Unknown,
    Deny,
    /// Allowed, and nothing to learn (unrestricted sprite).
    Allow,
    /// Allowed; the answers must be added to the sprite's set before replying.
    AllowAndLearn,
}

struct Sprite {
    ifname: String,
    addr: Ipv4Addr,
    policy: NetworkPolicy,
    compiled: CompiledPolicy,
    /// Destinations learned from allowed lookups. One address can serve many names; it
    /// stays allowed while any of them is allowed and unexpired.
    learned: Learned,
}

#[derive(Default)]
struct State {
    sprites: HashMap<String, Sprite>,
    /// Sprite id by address, for the DNS forwarder's per-query lookup.
    by_addr: HashMap<Ipv4Addr, String>,
}

impl State {
    fn insert(&mut self, id: &str, sp: Sprite) {
        self.by_addr.insert(sp.addr, id.to_string());
        self.sprites.insert(id.to_string(), sp);
    }

    fn remove(&mut self, id: &str) -> Option<Sprite> {
        let sp = self.sprites.remove(id)?;
        if self.by_addr.get(&sp.addr).is_some_and(|o| o == id) {
            self.by_addr.remove(&sp.addr);
        }
        Some(sp)
    }
}

/// What [`NetManager::learn`] asks of the DNS forwarder.
pub(crate) enum Learn {
    /// The name is not (or no longer) allowed: refuse the answer.
    Refused,
    /// Nothing for the firewall to do: send the answer.
    Done,
    /// Send the answer once the firewall has the addresses.
    Wait(tokio::sync::oneshot::Receiver<Result<(), NetError>>),
}

/// Owns the sprite networks of one host (one config). Cheap to share: wrap in `Arc`.
///
/// Locks: `state` is held only for in-memory work (never while a command runs), since
/// every DNS query takes it; firewall changes are queued in state order under it and
/// waited for after ([`nftq`]). `setup` serialises sprite setups and teardowns, whose
/// netlink requests run without `state`.
pub struct NetManager {
    cfg: NetConfig,
    state: Mutex<State>,
    setup: Mutex<()>,
    nft: NftQueue,
    conntrack: bool,
}

impl NetManager {
    /// Validate the config, install an empty ruleset (replacing whatever a previous run left)
    /// and enable forwarding on the uplinks.
    pub fn new(cfg: NetConfig) -> Result<Arc<Self>, NetError> {
        cfg.validate()?;
        let mut uplinks = cfg.uplinks.clone();
        if uplinks.is_empty() {
            let mut nl = host_rtnl()?;
            let oifs = nl.default_route_oifs().map_err(nl_err("ip route show default"))?;
            let links = nl.links().map_err(nl_err("ip link show"))?;
            uplinks.extend(
                links
                    .into_iter()
                    .filter(|(i, _)| oifs.contains(i))
                    .map(|(_, name)| name),
            );
        }
        for up in &uplinks {
            set_forwarding(up)?;
        }
        let conntrack = cmd::run("conntrack", &["--version"], None).is_ok();
        if !conntrack {
            tracing::warn!(
                "conntrack tool not installed: policy changes cut connections through the \
                 firewall only"
            );
        }
        let mgr = NetManager {
            cfg,
            state: Mutex::new(State::default()),
            setup: Mutex::new(()),
            nft: NftQueue::start()?,
            conntrack,
        };
        let host = mgr.host_blocked()?;
        let t = &mgr.cfg.table;
        // Create-then-delete makes the delete valid whether or not the table existed.
        let script = format!(
            "table inet {t} {{}}\ndelete table inet {t}\n{}",
            nft::table_script(&mgr.cfg, &host)
        );
        mgr.nft.submit(script).wait()?;
        Ok(Arc::new(mgr))
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough data (every mutation is a
        // single insert/remove), so recover instead of poisoning the whole host.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn setup_lock(&self) -> MutexGuard<'_, ()> {
        self.setup.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Name of the sprite's netns.
    pub fn netns_name(&self, id: &str) -> String {
        format!("{}{id}", self.cfg.netns_prefix)
    }

    /// Name of the host end of the sprite's veth (≤ 15 bytes, the kernel limit).
    pub fn host_ifname(&self, id: &str) -> String {
        format!("{}{:08x}", self.cfg.ifprefix, fnv1a32(id.as_bytes()))
    }

    /// Create (or repair) the sprite's netns, veth, addresses and routes, register it in the
    /// firewall with `policy`, and return what the runtime needs. `addr` is the address stored
    /// from an earlier setup; `None` allocates the lowest free one.
    pub fn setup_sprite(
        &self,
        id: &str,
        addr: Option<Ipv4Addr>,
        policy: &NetworkPolicy,
    ) -> Result<SpriteNet, NetError> {
        validate_id(id)?;
        let compiled = policy.compile()?;
        let ifname = self.host_ifname(id);
        let netns = self.netns_name(id);
        let gw = self.cfg.gateway();
        let _setup = self.setup_lock();
        let st = self.lock();

        for (other, sp) in &st.sprites {
            if other != id && sp.ifname == ifname {
                return Err(NetError::IfnameCollision {
                    id: id.into(),
                    other: other.clone(),
                    ifname,
                });
            }
        }
        let addr = match addr.or_else(|| st.sprites.get(id).map(|s| s.addr)) {
            Some(a) => {
                let size = self.cfg.subnet.size();
                let last = self.cfg.subnet.nth((size - 1) as u32);
                if !self.cfg.subnet.contains(a)
                    || a == self.cfg.subnet.network()
                    || a == gw
                    || Some(a) == last
                {
                    return Err(NetError::BadAddress {
                        addr: a,
                        subnet: self.cfg.subnet,
                    });
                }
                if let Some((owner, _)) = st.sprites.iter().find(|(o, s)| *o != id && s.addr == a) {
                    return Err(NetError::AddressInUse {
                        addr: a,
                        owner: owner.clone(),
                    });
                }
                a
            }
            None => self.allocate(&st)?,
        };
        // Other setups wait on `setup`, so the address stays ours while netlink runs; DNS
        // answers don't wait at all.
        drop(st);

        self.plumb(&netns, &ifname, addr)?;
        let host = self.host_blocked()?;

        let (pending, previous) = {
            let mut st = self.lock();
            let previous = st.remove(id);
            let learned = previous.as_ref().map(|s| s.learned.clone()).unwrap_or_default();
            let script = nft::sprite_script(
                &self.cfg,
                &nft::SpriteRules {
                    ifname: ifname.clone(),
                    addr,
                    unrestricted: compiled.is_unrestricted(),
                },
                previous.as_ref().map(|p| p.addr),
                &host,
            );
            st.insert(
                id,
                Sprite {
                    ifname: ifname.clone(),
                    addr,
                    policy: policy.clone(),
                    compiled,
                    learned,
                },
            );
            (self.nft.submit(script), previous)
        };
        if let Err(e) = pending.wait() {
            // The transaction applied nothing: the kernel still has the previous state.
            let mut st = self.lock();
            st.remove(id);
            if let Some(p) = previous {
                st.insert(id, p);
            }
            return Err(e);
        }
        Ok(SpriteNet {
            id: id.to_string(),
            netns_path: netns::netns_path(&netns),
            netns,
            host_ifname: ifname,
            addr,
            gateway: gw,
            dns: SocketAddrV4::new(gw, self.cfg.dns_port),
        })
    }

    fn allocate(&self, st: &State) -> Result<Ipv4Addr, NetError> {
        let used: std::collections::HashSet<Ipv4Addr> = st.sprites.values().map(|s| s.addr).collect();
        let size = self.cfg.subnet.size();
        // .0 is the network, .1 the gateway, the last one broadcast.
        (2..size.saturating_sub(1))
            .filter_map(|n| self.cfg.subnet.nth(n as u32))
            .find(|a| !used.contains(a))
            .ok_or(NetError::Exhausted(self.cfg.subnet))
    }

    /// The `ip` part of setup, spoken over netlink. Keeps a correctly configured veth (so a
    /// re-setup after a daemon restart does not break the sprite's connections) and
    /// rebuilds anything else.
    fn plumb(&self, netns: &str, ifname: &str, addr: Ipv4Addr) -> Result<(), NetError> {
        let gw = self.cfg.gateway();
        let mut ns = match netns::state(netns) {
            netns::NsState::Mounted => netns::rtnl_in(netns)?,
            netns::NsState::Missing => netns::add(netns)?,
            netns::NsState::Stale => {
                // A stale file from a crash between the file's creation and the bind mount.
                netns::del(netns)?;
                netns::add(netns)?
            }
        };
        let mut host = host_rtnl()?;
        let has = |nl: &mut rtnl::Rtnl, index: Option<u32>, want: Ipv4Addr| match index {
            Some(i) => nl
                .addrs(Some(i))
                .map(|a| a.iter().any(|a| a.addr == want && a.prefix == 32)),
            None => Ok(false),
        };
        let host_idx = host
            .link_index(ifname)
            .map_err(nl_err(format!("ip link show {ifname}")))?;
        let host_ok = has(&mut host, host_idx, gw).map_err(nl_err(format!("ip addr show {ifname}")))?;
        let eth0 = ns
            .link_index("eth0")
            .map_err(nl_err(format!("ip -n {netns} link show eth0")))?;
        let ns_ok = has(&mut ns, eth0, addr).map_err(nl_err(format!("ip -n {netns} addr show eth0")))?;
        let (host_idx, eth0) = match (host_idx, eth0) {
            (Some(h), Some(e)) if host_ok && ns_ok => (h, e),
            _ => {
                if let Some(i) = host_idx {
                    host.del_link(i)
                        .map_err(nl_err(format!("ip link del {ifname}")))?;
                }
                if let Some(i) = eth0 {
                    ns.del_link(i)
                        .map_err(nl_err(format!("ip -n {netns} link del eth0")))?;
                }
                let ns_file = std::fs::File::open(netns::netns_path(netns)).map_err(|e| NetError::Netns {
                    name: netns.to_string(),
                    reason: format!("open: {e}"),
                })?;
                use std::os::fd::AsFd;
                host.add_veth(ifname, "eth0", ns_file.as_fd())
                    .map_err(nl_err(format!(
                        "ip link add {ifname} type veth peer name eth0 netns {netns}"
                    )))?;
                let missing = || NetError::Netlink {
                    op: format!("ip link add {ifname} type veth peer name eth0 netns {netns}"),
                    source: std::io::Error::other("the new veth is not there"),
                };
                let h = host
                    .link_index(ifname)
                    .map_err(nl_err(format!("ip link show {ifname}")))?
                    .ok_or_else(missing)?;
                let e = ns
                    .link_index("eth0")
                    .map_err(nl_err(format!("ip -n {netns} link show eth0")))?
                    .ok_or_else(missing)?;
                host.add_addr(h, gw, 32)
                    .map_err(nl_err(format!("ip addr add {gw}/32 dev {ifname}")))?;
                (h, e)
            }
        };
        // Idempotent steps, run every time to repair partial state.
        set_forwarding(ifname)?;
        host.set_up(host_idx)
            .map_err(nl_err(format!("ip link set {ifname} up")))?;
        host.replace_route(addr, 32, host_idx, None, Some(gw))
            .map_err(nl_err(format!(
                "ip route replace {addr}/32 dev {ifname} src {gw}"
            )))?;
        let in_ns = |op: &str| nl_err(format!("ip -n {netns} {op}"));
        ns.set_up(netns::LOOPBACK_INDEX)
            .map_err(in_ns("link set lo up"))?;
        if !ns_ok {
            ns.add_addr(eth0, addr, 32)
                .map_err(in_ns(&format!("addr add {addr}/32 dev eth0")))?;
        }
        ns.set_up(eth0).map_err(in_ns("link set eth0 up"))?;
        ns.replace_route(gw, 32, eth0, None, None)
            .map_err(in_ns(&format!("route replace {gw} dev eth0 scope link")))?;
        ns.replace_route(Ipv4Addr::UNSPECIFIED, 0, eth0, Some(gw), None)
            .map_err(in_ns(&format!("route replace default via {gw} dev eth0")))?;
        Ok(())
    }

    /// Remove a sprite's network: firewall entries, veth and netns. Works from names alone,
    /// so it also cleans up after a crash; missing pieces are not an error.
    pub fn teardown_sprite(&self, id: &str) -> Result<(), NetError> {
        validate_id(id)?;
        let _setup = self.setup_lock();
        let host = self.host_blocked()?;
        let ifname = self.host_ifname(id);
        let (pending, removed) = {
            let mut st = self.lock();
            let removed = st.remove(id);
            let addr = removed.as_ref().map(|s| s.addr);
            let script = nft::remove_sprite_script(&self.cfg, &ifname, addr, &host);
            (self.nft.submit(script), removed)
        };
        if let Err(e) = pending.wait() {
            // Nothing was removed: keep the sprite, so a retry knows its address.
            if let Some(sp) = removed {
                self.lock().insert(id, sp);
            }
            return Err(e);
        }
        if let (Some(sp), true) = (&removed, self.conntrack) {
            kill_conntrack(&sp.addr.to_string(), None);
        }
        let mut host = host_rtnl()?;
        if let Some(i) = host
            .link_index(&ifname)
            .map_err(nl_err(format!("ip link show {ifname}")))?
        {
            host.del_link(i)
                .map_err(nl_err(format!("ip link del {ifname}")))?;
        }
        netns::del(&self.netns_name(id))
    }

    /// Delete netns and veths with our prefixes that don't belong to a sprite in `keep`
    /// (leftovers of sprites deleted while den was down). Returns the removed names.
    pub fn cleanup_leftovers(&self, keep: &[&str]) -> Result<Vec<String>, NetError> {
        let keep_ns: Vec<String> = keep.iter().map(|id| self.netns_name(id)).collect();
        let keep_if: Vec<String> = keep.iter().map(|id| self.host_ifname(id)).collect();
        let mut removed = Vec::new();
        // Veths first: a netns that goes away takes its veth with it, but later (the
        // kernel frees namespaces in the background), so the list would miss some.
        let mut host = host_rtnl()?;
        for (index, name) in host.links().map_err(nl_err("ip link show"))? {
            if self.is_our_veth(&name) && !keep_if.contains(&name) {
                host.del_link(index)
                    .map_err(nl_err(format!("ip link del {name}")))?;
                removed.push(name);
            }
        }
        if let Ok(rd) = std::fs::read_dir(netns::NETNS_DIR) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.cfg.netns_prefix) && !keep_ns.contains(&name) {
                    netns::del(&name)?;
                    removed.push(name);
                }
            }
        }
        Ok(removed)
    }

    /// Replace a sprite's egress policy live: recompute which learned destinations stay,
    /// swap the ruleset, then delete conntrack entries of the dropped destinations.
    pub fn set_policy(&self, id: &str, policy: &NetworkPolicy) -> Result<(), NetError> {
        let compiled = policy.compile()?;
        let host = self.host_blocked()?;
        let now = Instant::now();
        let (pending, old, addr, dropped, was_unrestricted) = {
            let mut st = self.lock();
            let sp = st
                .sprites
                .get_mut(id)
                .ok_or_else(|| NetError::UnknownSprite(id.into()))?;
            let old = (sp.policy.clone(), sp.compiled.clone(), sp.learned.clone());
            let was_unrestricted = sp.compiled.is_unrestricted();
            sp.policy = policy.clone();
            sp.compiled = compiled.clone();
            let mut dropped = sp.learned.prune(now);
            dropped.extend(
                sp.learned
                    .retain_names(|name| compiled.decide(name) == Action::Allow),
            );
            let (addr, set) = (sp.addr, nft::allow_set(&sp.ifname));
            let mut script = nft::sprite_script(
                &self.cfg,
                &nft::SpriteRules {
                    ifname: sp.ifname.clone(),
                    addr,
                    unrestricted: compiled.is_unrestricted(),
                },
                None,
                &host,
            );
            let ch = Changes {
                add: Vec::new(),
                remove: dropped.clone(),
            };
            script.push_str(&nft::elements_script(&self.cfg.table, &set, &ch));
            (self.nft.submit(script), old, addr, dropped, was_unrestricted)
        };
        if let Err(e) = pending.wait() {
            // The transaction applied nothing: the kernel still has the old policy.
            let mut st = self.lock();
            if let Some(sp) = st.sprites.get_mut(id) {
                (sp.policy, sp.compiled, sp.learned) = old;
            }
            return Err(e);
        }
        let now_restricted = !compiled.is_unrestricted();
        if self.conntrack {
            if was_unrestricted && now_restricted {
                // Anything may have been open; keep nothing that isn't learned and allowed.
                // Deleting all the sprite's entries is safe: allowed flows are re-admitted
                // mid-stream (nf_conntrack_tcp_loose) by the per-packet set check.
                kill_conntrack(&addr.to_string(), None);
            } else {
                for ip in dropped {
                    kill_conntrack(&addr.to_string(), Some(&ip.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The policy document last set for a sprite (what `GET …/policy/network` returns).
    pub fn policy(&self, id: &str) -> Option<NetworkPolicy> {
        self.lock().sprites.get(id).map(|s| s.policy.clone())
    }

    /// Addresses a sprite may currently reach because of allowed lookups (for debugging).
    pub fn learned(&self, id: &str) -> Vec<Ipv4Addr> {
        let st = self.lock();
        st.sprites
            .get(id)
            .map(|sp| sp.learned.ips(Instant::now()))
            .unwrap_or_default()
    }

    /// Delete our nft table (for tests and `den` uninstall). Sprite netns/veths are left to
    /// [`NetManager::teardown_sprite`] / [`NetManager::cleanup_leftovers`].
    pub fn remove_firewall(&self) -> Result<(), NetError> {
        let t = &self.cfg.table;
        // Queued under the state lock, like every change, so it is ordered after them.
        let pending = {
            let _st = self.lock();
            self.nft
                .submit(format!("table inet {t} {{}}\ndelete table inet {t}\n"))
        };
        pending.wait()
    }

    /// The host's networks and addresses that sprites must not reach (see
    /// [`NetConfig::allowed_host_networks`]). Read before taking the state lock: it asks
    /// the kernel.
    fn host_blocked(&self) -> Result<Vec<Ipv4Net>, NetError> {
        let mut nl = host_rtnl()?;
        let names: HashMap<u32, String> = nl.links().map_err(nl_err("ip link show"))?.into_iter().collect();
        let addrs = nl.addrs(None).map_err(nl_err("ip -4 addr show"))?;
        Ok(host_networks(
            addrs.iter().map(|a| {
                let name = names.get(&a.index).map(String::as_str).unwrap_or("");
                (name, a.addr, a.prefix)
            }),
            |name| self.is_our_veth(name),
            &self.cfg.allowed_host_networks,
        ))
    }

    /// Whether `name` is the host end of one of our sprites' veths (`<ifprefix><8 hex>`).
    fn is_our_veth(&self, name: &str) -> bool {
        let p = &self.cfg.ifprefix;
        name.len() == p.len() + 8
            && name.starts_with(p.as_str())
            && name[p.len()..].bytes().all(|b| b.is_ascii_hexdigit())
    }

    pub(crate) fn dns_verdict(&self, src: Ipv4Addr, name: &str) -> DnsVerdict {
        let st = self.lock();
        let Some(sp) = st.by_addr.get(&src).and_then(|id| st.sprites.get(id)) else {
            return DnsVerdict::Unknown;
        };
        if sp.compiled.is_unrestricted() {
            return DnsVerdict::Allow;
        }
        match sp.compiled.decide(name) {
            Action::Allow => DnsVerdict::AllowAndLearn,
            Action::Deny => DnsVerdict::Deny,
        }
    }

    /// Record the A answers of an allowed lookup. Re-checks the policy under the lock, so a
    /// policy change that raced with the lookup wins. Never waits: the firewall change is
    /// queued (batched with others) and the caller awaits it.
    pub(crate) fn learn(&self, src: Ipv4Addr, name: &str, answers: &[(Ipv4Addr, u32)]) -> Learn {
        let mut st = self.lock();
        let Some(sp) = st
            .by_addr
            .get(&src)
            .cloned()
            .and_then(|id| st.sprites.get_mut(&id))
        else {
            return Learn::Refused;
        };
        if sp.compiled.is_unrestricted() {
            return Learn::Done;
        }
        if sp.compiled.decide(name) != Action::Allow {
            return Learn::Refused;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let now = Instant::now();
        let mut ch = Changes::default();
        for (ip, ttl) in answers {
            let ttl = Duration::from_secs(u64::from(*ttl))
                .clamp(self.cfg.min_learned_ttl, self.cfg.max_learned_ttl);
            sp.learned.insert(*ip, &name, now + ttl, now, &mut ch);
        }
        sp.learned.enforce_cap(self.cfg.max_learned, now, &mut ch);
        if ch.is_empty() {
            return Learn::Done;
        }
        let script = nft::elements_script(&self.cfg.table, &nft::allow_set(&sp.ifname), &ch);
        Learn::Wait(self.nft.submit_async(script))
    }
}

/// From the host's IPv4 addresses (interface name, address, prefix length): every network
/// attached to an interface and every address of the host, except on interfaces `skip`
/// names and those inside an `allowed` network.
fn host_networks<'a>(
    addrs: impl IntoIterator<Item = (&'a str, Ipv4Addr, u8)>,
    skip: impl Fn(&str) -> bool,
    allowed: &[Ipv4Net],
) -> Vec<Ipv4Net> {
    let mut nets = Vec::new();
    for (_, local, prefixlen) in addrs.into_iter().filter(|(name, _, _)| !skip(name)) {
        // A /0 would block the whole internet: only an operator's `blocked` may do that.
        let net = (prefixlen > 0).then(|| Ipv4Net::new(local, prefixlen)).flatten();
        for n in net.into_iter().chain(Ipv4Net::new(local, 32)) {
            if !allowed.iter().any(|ok| ok.contains_net(&n)) && !nets.contains(&n) {
                nets.push(n);
            }
        }
    }
    nets
}

/// A route netlink socket in den's own network namespace.
fn host_rtnl() -> Result<rtnl::Rtnl, NetError> {
    rtnl::Rtnl::open().map_err(nl_err("open a netlink socket"))
}

/// Wrap a netlink error with the `ip` command it stands for.
fn nl_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let op = op.into();
    move |source| NetError::Netlink { op, source }
}

fn set_forwarding(ifname: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding");
    std::fs::write(&path, "1").map_err(|e| NetError::Io {
        context: format!("write {path}"),
        source: e,
    })
}

/// Best effort: `conntrack -D` exits non-zero when nothing matched.
fn kill_conntrack(src: &str, dst: Option<&str>) {
    let mut args = vec!["-D", "-s", src];
    if let Some(d) = dst {
        args.extend(["-d", d]);
    }
    match cmd::run("conntrack", &args, None) {
        Ok(_) => {}
        Err(NetError::Command { stderr, .. }) if stderr.contains("0 flow entries") => {}
        Err(e) => tracing::debug!(error = %e, "conntrack delete"),
    }
}

fn validate_id(id: &str) -> Result<(), NetError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NetError::BadId(id.to_string()))
    }
}

/// FNV-1a: stable across runs and versions (the name must be the same after a restart so
/// leftovers can be found by name).
fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        let cfg = NetConfig::new("127.0.0.1:53".parse().unwrap());
        cfg.validate().unwrap();
        let mgr = NetManager {
            cfg,
            state: Mutex::new(State::default()),
            setup: Mutex::new(()),
            nft: NftQueue::start().unwrap(),
            conntrack: false,
        };
        let n = mgr.host_ifname(&"x".repeat(63));
        assert!(n.len() <= 15, "{n}");
        assert_eq!(mgr.host_ifname("a"), mgr.host_ifname("a"));
        assert_ne!(mgr.host_ifname("a"), mgr.host_ifname("b"));
        assert!(validate_id("my-sprite-1").is_ok());
        assert!(validate_id("My_Sprite").is_err());
        assert!(validate_id("").is_err());
        assert!(validate_id("../x").is_err());
    }

    #[test]
    fn host_networks_skip_our_veths_and_allowed_ones() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addrs = [
            ("lo", ip("127.0.0.1"), 8),
            ("eth0", ip("192.168.1.5"), 24),
            ("dn0123abcd", ip("10.200.0.1"), 32),
            ("ti1", ip("10.99.3.1"), 24),
            ("wg0", ip("1.2.3.4"), 0),
        ];
        let allowed = ["10.99.3.0/24".parse().unwrap()];
        let nets = host_networks(addrs, |n| n.starts_with("dn"), &allowed);
        let want: Vec<Ipv4Net> = [
            "127.0.0.0/8",
            "127.0.0.1/32",
            "192.168.1.0/24",
            "192.168.1.5/32",
            "1.2.3.4/32",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        assert_eq!(nets, want);
    }

    #[test]
    fn scripts_touch_only_their_sprite_and_mention_everything() {
        let cfg = NetConfig::new("127.0.0.1:53".parse().unwrap());
        let host: [Ipv4Net; 1] = ["192.168.1.0/24".parse().unwrap()];
        let t = nft::table_script(&cfg, &host);
        assert_eq!(t, nft::table_script(&cfg, &host));
        assert!(t.contains("169.254.0.0/16") && t.contains("192.168.1.0/24"));
        assert!(t.contains("iifname vmap @out_to") && t.contains("oifname vmap @back_to"));
        assert!(t.contains("masquerade"));
        assert!(!t.contains("dn0"), "the table itself has no sprite in it");

        let restricted = nft::SpriteRules {
            ifname: "dn00000001".into(),
            addr: "10.200.0.2".parse().unwrap(),
            unrestricted: false,
        };
        let s = nft::sprite_script(&cfg, &restricted, Some("10.200.0.9".parse().unwrap()), &host);
        assert!(s.contains("add rule inet den out_dn00000001 ip daddr @allow_dn00000001 accept"));
        assert!(s.contains("add rule inet den back_dn00000001 ip saddr @allow_dn00000001 accept"));
        assert!(s.contains("out_to { \"dn00000001\" : jump out_dn00000001 }"));
        assert!(s.contains("delete element inet den sprites { \"dn00000001\" . 10.200.0.9 }"));
        assert!(s.ends_with("add element inet den blocked { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4, 10.200.0.0/16, 192.168.1.0/24 }\n"), "{s}");
        // A sprite's change never rewrites the shared chains nor its learned addresses.
        for shared in ["sprite_out", "sprite_back", "forward", "input"] {
            assert!(!s.contains(&format!("chain inet den {shared}")), "{s}");
        }
        assert!(!s.contains("flush set inet den allow_") && !s.contains("delete set"));
        let open = nft::SpriteRules {
            unrestricted: true,
            ..restricted
        };
        let s = nft::sprite_script(&cfg, &open, None, &host);
        assert!(s.contains("add rule inet den out_dn00000001 accept\n"), "{s}");
        assert!(!s.contains("delete element"), "{s}");

        let r = nft::remove_sprite_script(&cfg, "dn00000001", Some(open.addr), &host);
        assert!(r.contains("delete element inet den out_to { \"dn00000001\" }"));
        assert!(r.contains("delete chain inet den out_dn00000001"));
        assert!(r.contains("delete set inet den allow_dn00000001"));
        assert!(r.contains("delete element inet den sprites { \"dn00000001\" . 10.200.0.2 }"));
        // The map entry goes before the chain it jumps to.
        assert!(r.find("delete element inet den out_to") < r.find("delete chain inet den out_"));
        let ch = Changes {
            add: vec![("1.2.3.4".parse().unwrap(), Duration::from_secs(30))],
            remove: vec!["5.6.7.8".parse().unwrap()],
        };
        let e = nft::elements_script("den", "allow_dn00000001", &ch);
        assert!(
            e.contains("delete element inet den allow_dn00000001 { 5.6.7.8, 1.2.3.4 }"),
            "{e}"
        );
        assert!(
            e.ends_with("add element inet den allow_dn00000001 { 1.2.3.4 timeout 30s }\n"),
            "{e}"
        );
    }
}
