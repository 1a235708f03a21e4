//! Test world: a NetManager with its own table/subnet/prefixes and its DNS forwarder, on top
//! of a [`TestNet`] (fake "internet" netns with a DNS server and TCP servers, and the trap
//! table), with Drop guards that remove everything even when a test fails. Traffic only ever
//! goes to loopback or to namespaces created here.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use den_net::dns::DnsForwarder;
use den_net::{NetManager, NetworkPolicy, SpriteNet};
use hickory_proto::op::ResponseCode;

// What the test files use (not every file uses all); the rest of den_testkit::net is there
// for new tests.
#[allow(unused_imports)]
pub use den_testkit::net::{IO_TIMEOUT, NetnsGuard, TestNet, connect_from, greeting, tcp_server_on};

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A NetManager built from a [`TestNet`]'s config, its DNS forwarder, and the sprites set up
/// through [`World::sprite`] (torn down on drop, with the manager's table). Derefs to the
/// `TestNet` (`w.inet`, `w.tag`, `w.config`).
pub struct World {
    pub mgr: Arc<NetManager>,
    pub net: TestNet,
    pub sprites: Vec<String>,
    _forwarder: DnsForwarder,
    _rt: tokio::runtime::Runtime,
}

impl World {
    pub fn new() -> anyhow::Result<Self> {
        Self::with_config(|_| {})
    }

    /// A world whose manager's config is the TestNet's, changed by `f`.
    pub fn with_config(f: impl FnOnce(&mut den_net::NetConfig)) -> anyhow::Result<Self> {
        let mut net = TestNet::new()?;
        f(&mut net.config);
        let rt = tokio::runtime::Runtime::new()?;
        let mgr = NetManager::new(net.config.clone())?;
        let forwarder = {
            let _g = rt.enter();
            DnsForwarder::start(mgr.clone())?
        };
        Ok(World {
            mgr,
            net,
            sprites: Vec::new(),
            _forwarder: forwarder,
            _rt: rt,
        })
    }

    pub fn sprite(&mut self, id: &str, policy: &NetworkPolicy) -> anyhow::Result<SpriteNet> {
        self.sprites.push(id.to_string());
        Ok(self.mgr.setup_sprite(id, None, policy)?)
    }
}

impl Deref for World {
    type Target = TestNet;
    fn deref(&self) -> &TestNet {
        &self.net
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for id in &self.sprites {
            let _ = self.mgr.teardown_sprite(id);
        }
        let _ = self.mgr.remove_firewall();
    }
}

pub fn policy(json: &str) -> NetworkPolicy {
    NetworkPolicy::from_json(json).expect("valid test policy")
}

/// Resolve `name` (A) from inside a sprite's netns via its DNS server.
pub fn lookup(sp: &SpriteNet, name: &str) -> anyhow::Result<(ResponseCode, Vec<Ipv4Addr>)> {
    den_testkit::net::lookup_in(&sp.netns, sp.dns, name)
}

/// [`lookup`] with the source address and the wait chosen by the caller.
pub fn lookup_from(
    sp: &SpriteNet,
    src: Ipv4Addr,
    name: &str,
    wait: Duration,
) -> anyhow::Result<(ResponseCode, Vec<Ipv4Addr>)> {
    den_testkit::net::lookup_in_from(&sp.netns, sp.dns, src, name, wait)
}

/// Resolve `name` (A) over DNS-over-TCP from inside a sprite's netns.
pub fn lookup_tcp(sp: &SpriteNet, name: &str) -> anyhow::Result<(ResponseCode, Vec<Ipv4Addr>)> {
    den_testkit::net::lookup_tcp_in(&sp.netns, sp.dns, name)
}
