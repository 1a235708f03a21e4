//! A small blocking rtnetlink client: the links, addresses and routes a sprite's network
//! needs, spoken in-process instead of spawning `ip` (each spawn cost a few milliseconds,
//! and a boot ran six of them).
//!
//! A socket acts in the network namespace it was created in, whichever thread uses it
//! later: [`Rtnl::open`] on the calling thread gives the caller's (den's) namespace, and
//! [`crate::netns`] opens one inside a sprite's namespace on a short-lived thread.
//!
//! Every request is acknowledged (or answered with an errno) before the next is sent, so
//! a failure names the step that failed, as `ip -batch` did.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_ROUTE;

/// Large enough for any one datagram of a dump (the kernel sizes them to the reader's
/// buffer, at most 32 KiB), so nothing is truncated.
const RECV_BUF: usize = 64 * 1024;

/// A dump the kernel flags as inconsistent (the table changed while it was read) is read
/// again, this many times at most.
const DUMP_TRIES: usize = 5;

/// An IPv4 address on an interface, as a dump reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IfAddr {
    pub index: u32,
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A route netlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        // Lets the kernel filter address dumps by interface instead of sending them all.
        sock.set_netlink_get_strict_chk(true)?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Send one request and collect the answers until its acknowledgement (or the end of
    /// a dump). An error answer becomes the errno it carries.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        for _ in 0..DUMP_TRIES {
            let (answers, interrupted) = self.exchange(msg.clone(), flags)?;
            if !(dump && interrupted) {
                return Ok(answers);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "netlink dump kept changing while read",
        ))
    }

    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<(Vec<RouteNetlinkMessage>, bool)> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.sock.send(&out, 0)?;

        let mut answers = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    // A late answer to an earlier request that failed half way.
                    continue;
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Done(_) => return Ok((answers, interrupted)),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((answers, interrupted)),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// The index of the link `name`, if it exists.
    pub(crate) fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_ACK) {
            Ok(answers) => Ok(answers.into_iter().find_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link: (index, name).
    pub(crate) fn links(&mut self) -> io::Result<Vec<(u32, String)>> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewLink(l) => {
                    let name = l.attributes.iter().find_map(|at| match at {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })?;
                    Some((l.header.index, name))
                }
                _ => None,
            })
            .collect())
    }

    /// The IPv4 addresses of link `index`, or of every link.
    pub(crate) fn addrs(&mut self, index: Option<u32>) -> io::Result<Vec<IfAddr>> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.index = index.unwrap_or(0);
        let answers = self.request(RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet => {
                    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer
                    // on point-to-point links); `ip` shows it as "local".
                    let local = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    });
                    let addr = local.or_else(|| {
                        a.attributes.iter().find_map(|at| match at {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    })?;
                    Some(IfAddr {
                        index: a.header.index,
                        addr,
                        prefix: a.header.prefix_len,
                    })
                }
                _ => None,
            })
            .filter(|a| index.is_none_or(|i| a.index == i))
            .collect())
    }

    /// The output interfaces of the IPv4 default routes in the main table.
    pub(crate) fn default_route_oifs(&mut self) -> io::Result<Vec<u32>> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let answers = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
        let mut oifs = Vec::new();
        for a in answers {
            let RouteNetlinkMessage::NewRoute(r) = a else {
                continue;
            };
            if r.header.destination_prefix_length != 0
                || r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.kind != RouteType::Unicast
            {
                continue;
            }
            for at in &r.attributes {
                if let RouteAttribute::Oif(i) = at
                    && !oifs.contains(i)
                {
                    oifs.push(*i);
                }
            }
        }
        Ok(oifs)
    }

    /// `ip link add <name> type veth peer name <peer> netns <peer_ns>`.
    pub(crate) fn add_veth(&mut self, name: &str, peer: &str, peer_ns: BorrowedFd<'_>) -> io::Result<()> {
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.to_string()));
        p.attributes.push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Delete link `index` (a veth takes its peer with it). A link already gone is fine.
    pub(crate) fn del_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(m), NLM_F_ACK) {
            Err(e) if !is_missing(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// `ip link set <index> up`.
    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_ACK).map(drop)
    }

    /// `ip addr add <addr>/<prefix> dev <index>`; an address already there is fine.
    pub(crate) fn add_addr(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.into()));
        m.attributes.push(AddressAttribute::Address(addr.into()));
        match self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
            _ => Ok(()),
        }
    }

    /// `ip route replace <dst>/<prefix> [via <gateway>] dev <oif> [src <src>]` in the main
    /// table. Like `ip`, a route without a gateway gets link scope.
    pub(crate) fn replace_route(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        oif: u32,
        gateway: Option<Ipv4Addr>,
        src: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if prefix > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        if let Some(gw) = gateway {
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
        }
        if let Some(src) = src {
            m.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::Inet(src)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        self.request(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }
}

/// Whether a netlink error means "no such link" (the kernel answers ENODEV for a name or
/// index it doesn't know).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENOENT))
}
