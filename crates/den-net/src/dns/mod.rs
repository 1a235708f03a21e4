//! The DNS forwarder sprites use as their resolver (UDP and TCP on `gateway:dns_port`).
//!
//! One socket serves every sprite of a [`NetManager`]: the source address identifies the
//! sprite (the firewall drops spoofed sources), and each sprite's own policy decides. Denied
//! names get `REFUSED` (what the hosted service answers). Allowed names are forwarded to the
//! configured upstream; for restricted sprites the A answers are added to the sprite's nft
//! set *before* the answer is sent, so the client's connect right after the lookup passes.
//!
//! # Bounded work
//!
//! A sprite is hostile as far as its resolver is concerned: it may send 100,000 queries a
//! second for names that never answer. What a query may cost den is therefore bounded per
//! sprite and overall ([`crate::DnsLimits`], [`budget`]): a query rate (also enforced in nft,
//! so a flood is dropped before it fills den's socket and delays other sprites' queries), a
//! number of queries waiting for the upstream and of TCP connections; everything over it is
//! dropped or answered SERVFAIL at once, without a task or a socket. All queries share a
//! fixed pool of upstream sockets ([`upstream`]). Answering from the policy (REFUSED) costs
//! no more than parsing.
//!
//! hickory-proto does the parsing; hickory-server's authority/catalog model doesn't fit a
//! filtering forwarder whose decision depends on who asks, so the loop is ours.

mod budget;
mod upstream;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket, sockopt,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use self::budget::Budget;
use self::upstream::Upstream;
use crate::{DnsVerdict, Learn, NetError, NetManager};

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Large enough for EDNS answers over UDP.
const BUF: usize = 4096;
/// Receive buffer of the sprites' socket: absorbs bursts of every sprite's rate at once.
const RCVBUF: usize = 4 << 20;
/// How long an answer waits for its addresses to reach the firewall before it fails.
const LEARN_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed accept (out of file handles), wait this long instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the serving tasks share.
struct Ctx {
    mgr: Arc<NetManager>,
    budget: Arc<Budget>,
    upstream: Upstream,
}

/// A running forwarder (UDP and TCP); stops when dropped.
pub struct DnsForwarder {
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
    local: SocketAddrV4,
}

impl DnsForwarder {
    /// Bind `gateway:dns_port` and serve in the background on the current tokio runtime.
    ///
    /// The socket is bound with `IP_FREEBIND` because the gateway address only exists while
    /// at least one sprite veth is up, and the forwarder must not depend on that order.
    pub fn start(mgr: Arc<NetManager>) -> Result<Self, NetError> {
        let local = SocketAddrV4::new(mgr.config().gateway(), mgr.config().dns_port);
        let sock = bind_freebind(local, SockType::Datagram)?;
        // Best effort: the kernel caps it at net.core.rmem_max; the nft rate limit is what
        // keeps one sprite from filling it.
        let _ = setsockopt(&sock, sockopt::RcvBuf, &RCVBUF);
        let sock = std::net::UdpSocket::from(sock);
        let sock = Arc::new(UdpSocket::from_std(sock).map_err(|e| io("register socket", e))?);
        let listener = bind_freebind(local, SockType::Stream)?;
        listen(&listener, Backlog::new(128).expect("valid backlog")).map_err(|e| io("listen", e.into()))?;
        let listener = TcpListener::from_std(std::net::TcpListener::from(listener))
            .map_err(|e| io("register socket", e))?;
        let limits = mgr.config().dns_limits.clone();
        let ctx = Arc::new(Ctx {
            upstream: Upstream::start(mgr.config().upstream_dns, limits.upstream_sockets)?,
            budget: Budget::new(limits),
            mgr,
        });
        let udp = tokio::spawn(serve(ctx.clone(), sock));
        let tcp = tokio::spawn(serve_tcp(ctx, listener));
        Ok(DnsForwarder { udp, tcp, local })
    }

    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }
}

impl DnsForwarder {
    /// Stop serving and wait until the sockets are closed, so the address can
    /// be bound again at once (dropping only requests the stop).
    pub async fn stop(mut self) {
        self.udp.abort();
        self.tcp.abort();
        let _ = (&mut self.udp).await;
        let _ = (&mut self.tcp).await;
    }
}

impl Drop for DnsForwarder {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

pub(crate) fn io(context: &str, source: std::io::Error) -> NetError {
    NetError::Io {
        context: context.to_string(),
        source,
    }
}

fn bind_freebind(addr: SocketAddrV4, ty: SockType) -> Result<OwnedFd, NetError> {
    let ctx = format!("bind DNS forwarder on {addr}");
    let fd = socket(
        AddressFamily::Inet,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io(&ctx, e.into()))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| io(&ctx, e.into()))?;
    // A restarted den must be able to rebind while old TCP connections linger.
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| io(&ctx, e.into()))?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(addr)).map_err(|e| io(&ctx, e.into()))?;
    Ok(fd)
}

async fn serve(ctx: Arc<Ctx>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (n, src) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here (ECONNREFUSED); keep serving.
                tracing::debug!(error = %e, "dns recv");
                continue;
            }
        };
        let SocketAddr::V4(src) = src else { continue };
        let ip = *src.ip();
        // Over its rate, a sprite gets no answer at all (as from the nft limit): answering
        // would cost as much as the query did.
        if !ctx.budget.take_token(ip) {
            continue;
        }
        let reply = match decide(&ctx, ip, &buf[..n]) {
            Decision::Ignore => continue,
            Decision::Reply(r) => r,
            Decision::Forward(msg, verdict) => match ctx.budget.start_query(ip) {
                Some(permit) => {
                    let (ctx, sock, query) = (ctx.clone(), sock.clone(), buf[..n].to_vec());
                    tokio::spawn(async move {
                        let reply = resolve(&ctx, ip, &query, &msg, verdict).await;
                        drop(permit);
                        if let Some(reply) = reply {
                            let _ = sock.send_to(&reply, src).await;
                        }
                    });
                    continue;
                }
                None => error_reply(&msg, ResponseCode::ServFail),
            },
        };
        if let Some(reply) = reply {
            // Never wait on a full send buffer here: every sprite's queries come through
            // this loop. A dropped answer is retried by the client.
            let _ = sock.try_send_to(&reply, SocketAddr::V4(src));
        }
    }
}

/// DNS over TCP (RFC 7766 framing: a 2-byte length before each message). Clients fall back
/// to it when a UDP answer is truncated.
async fn serve_tcp(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let (conn, src) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "dns accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let SocketAddr::V4(src) = src else { continue };
        let ip = *src.ip();
        let Some(permit) = ctx.budget.open_tcp(ip) else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp_conn(&ctx, ip, conn).await;
        });
    }
}

async fn serve_tcp_conn(ctx: &Arc<Ctx>, ip: Ipv4Addr, mut conn: tokio::net::TcpStream) {
    loop {
        let read = async {
            let len = conn.read_u16().await?;
            let mut q = vec![0u8; usize::from(len)];
            conn.read_exact(&mut q).await?;
            Ok::<_, std::io::Error>(q)
        };
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read).await else {
            return;
        };
        if !ctx.budget.take_token(ip) {
            return;
        }
        let reply = match decide(ctx, ip, &query) {
            Decision::Ignore => return,
            Decision::Reply(r) => r,
            Decision::Forward(msg, verdict) => match ctx.budget.start_query(ip) {
                Some(_permit) => resolve(ctx, ip, &query, &msg, verdict).await,
                None => error_reply(&msg, ResponseCode::ServFail),
            },
        };
        let Some(reply) = reply else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// What to do with a query, decided without waiting on anything.
enum Decision {
    /// Garbage, or not a query: stay silent.
    Ignore,
    /// Answer this at once (`None`: the reply could not be encoded).
    Reply(Option<Vec<u8>>),
    /// Ask the upstream.
    Forward(Message, DnsVerdict),
}

fn decide(ctx: &Ctx, src: Ipv4Addr, query: &[u8]) -> Decision {
    let Ok(msg) = Message::from_vec(query) else {
        return Decision::Ignore;
    };
    if msg.metadata.message_type != MessageType::Query {
        return Decision::Ignore;
    }
    let [q] = msg.queries.as_slice() else {
        return Decision::Reply(error_reply(&msg, ResponseCode::FormErr));
    };
    let name = q.name().to_ascii();
    let verdict = ctx.mgr.dns_verdict(src, &name);
    tracing::trace!(%src, %name, ?verdict, "dns query");
    match verdict {
        DnsVerdict::Unknown | DnsVerdict::Deny => Decision::Reply(error_reply(&msg, ResponseCode::Refused)),
        DnsVerdict::Allow | DnsVerdict::AllowAndLearn => Decision::Forward(msg, verdict),
    }
}

/// Ask the upstream for an allowed query and build the reply (learning the answers first
/// for a restricted sprite).
async fn resolve(
    ctx: &Ctx,
    src: Ipv4Addr,
    query: &[u8],
    msg: &Message,
    verdict: DnsVerdict,
) -> Option<Vec<u8>> {
    let Some((raw, resp)) = ctx.upstream.ask(query, msg).await else {
        return error_reply(msg, ResponseCode::ServFail);
    };
    if verdict != DnsVerdict::AllowAndLearn {
        return Some(raw);
    }
    let name = msg.queries.first()?.name().to_ascii();
    let answers: Vec<(Ipv4Addr, u32)> = resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((a.0, r.ttl)),
            _ => None,
        })
        .collect();
    match ctx.mgr.learn(src, &name, &answers) {
        Learn::Done => Some(raw),
        // The policy changed while we were asking upstream.
        Learn::Refused => error_reply(msg, ResponseCode::Refused),
        Learn::Wait(done) => match tokio::time::timeout(LEARN_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => Some(raw),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, %name, "recording DNS answers in nft failed");
                error_reply(msg, ResponseCode::ServFail)
            }
            _ => {
                tracing::warn!(%name, "recording DNS answers in nft timed out");
                error_reply(msg, ResponseCode::ServFail)
            }
        },
    }
}

fn error_reply(q: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::error_msg(q.metadata.id, q.metadata.op_code, code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.queries = q.queries.clone();
    r.to_vec().ok()
}
