//! The DNS forwarder sprites use as their resolver (UDP and TCP on `gateway:dns_port`).
//!
//! One socket serves every sprite of a [`NetManager`]: the source address identifies the
//! sprite (the firewall drops spoofed sources), and each sprite's own policy decides. Denied
//! names get `REFUSED` (what the hosted service answers). Allowed names are forwarded to the
//! configured upstream; for restricted sprites the A answers are added to the sprite's nft
//! set *before* the answer is sent, so the client's connect right after the lookup passes.
//!
//! hickory-proto does the parsing; hickory-server's authority/catalog model doesn't fit a
//! filtering forwarder whose decision depends on who asks, so the loop is ours.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket, sockopt,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use crate::{DnsVerdict, NetError, NetManager};

/// How long we wait for the upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Large enough for EDNS answers over UDP.
const BUF: usize = 4096;

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
        let sock = std::net::UdpSocket::from(bind_freebind(local, SockType::Datagram)?);
        let sock = Arc::new(UdpSocket::from_std(sock).map_err(|e| io("register socket", e))?);
        let listener = bind_freebind(local, SockType::Stream)?;
        listen(&listener, Backlog::new(128).expect("valid backlog")).map_err(|e| io("listen", e.into()))?;
        let listener = TcpListener::from_std(std::net::TcpListener::from(listener))
            .map_err(|e| io("register socket", e))?;
        let udp = tokio::spawn(serve(mgr.clone(), sock));
        let tcp = tokio::spawn(serve_tcp(mgr, listener));
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

fn io(context: &str, source: std::io::Error) -> NetError {
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

async fn serve(mgr: Arc<NetManager>, sock: Arc<UdpSocket>) {
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
        let query = buf[..n].to_vec();
        let (mgr, sock) = (mgr.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&mgr, *src.ip(), &query).await {
                let _ = sock.send_to(&reply, src).await;
            }
        });
    }
}

/// DNS over TCP (RFC 7766 framing: a 2-byte length before each message). Clients fall back
/// to it when a UDP answer is truncated.
async fn serve_tcp(mgr: Arc<NetManager>, listener: TcpListener) {
    loop {
        let Ok((mut conn, src)) = listener.accept().await else {
            continue;
        };
        let SocketAddr::V4(src) = src else { continue };
        let mgr = mgr.clone();
        tokio::spawn(async move {
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
                let Some(reply) = answer(&mgr, *src.ip(), &query).await else {
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
        });
    }
}

/// Build the reply for one query, or `None` to stay silent (garbage, or not a query).
async fn answer(mgr: &Arc<NetManager>, src: Ipv4Addr, query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    if msg.metadata.message_type != MessageType::Query {
        return None;
    }
    let [q] = msg.queries.as_slice() else {
        return error_reply(&msg, ResponseCode::FormErr);
    };
    let name = q.name().to_ascii();
    let verdict = mgr.dns_verdict(src, &name);
    tracing::debug!(%src, %name, ?verdict, "dns query");
    match verdict {
        DnsVerdict::Unknown | DnsVerdict::Deny => error_reply(&msg, ResponseCode::Refused),
        DnsVerdict::Allow => match forward(mgr, query, msg.metadata.id).await {
            Some((raw, _)) => Some(raw),
            None => error_reply(&msg, ResponseCode::ServFail),
        },
        DnsVerdict::AllowAndLearn => {
            let Some((raw, resp)) = forward(mgr, query, msg.metadata.id).await else {
                return error_reply(&msg, ResponseCode::ServFail);
            };
            let answers: Vec<(Ipv4Addr, u32)> = resp
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some((a.0, r.ttl)),
                    _ => None,
                })
                .collect();
            let (m, n) = (mgr.clone(), name.clone());
            let learned = tokio::task::spawn_blocking(move || m.learn(src, &n, &answers)).await;
            match learned {
                Ok(Ok(true)) => Some(raw),
                // The policy changed while we were asking upstream.
                Ok(Ok(false)) => error_reply(&msg, ResponseCode::Refused),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, %name, "recording DNS answers in nft failed");
                    error_reply(&msg, ResponseCode::ServFail)
                }
                Err(_) => error_reply(&msg, ResponseCode::ServFail),
            }
        }
    }
}

fn error_reply(q: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::error_msg(q.metadata.id, q.metadata.op_code, code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.queries = q.queries.clone();
    r.to_vec().ok()
}

/// Ask the upstream resolver on a fresh connected socket (so only its answers are read).
async fn forward(mgr: &NetManager, query: &[u8], id: u16) -> Option<(Vec<u8>, Message)> {
    let upstream = mgr.config().upstream_dns;
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; BUF];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        let Ok(resp) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if resp.metadata.id == id && resp.metadata.message_type == MessageType::Response {
            if resp.metadata.truncation {
                // Don't hand the sprite a partial answer: ask again over TCP.
                return forward_tcp(upstream, query, id).await;
            }
            buf.truncate(n);
            return Some((buf, resp));
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> Option<(Vec<u8>, Message)> {
    let exchange = async {
        let mut c = TcpStream::connect(upstream).await.ok()?;
        let len = u16::try_from(query.len()).ok()?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        c.write_all(&framed).await.ok()?;
        let n = c.read_u16().await.ok()?;
        let mut buf = vec![0u8; usize::from(n)];
        c.read_exact(&mut buf).await.ok()?;
        let resp = Message::from_vec(&buf).ok()?;
        (resp.metadata.id == id).then_some((buf, resp))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}
