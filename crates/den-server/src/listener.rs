//! The API's accept loop: what every TCP connection to den is allowed.
//!
//! - `TCP_NODELAY` on every accepted socket. den streams small frames
//!   (exec output, NDJSON progress); with Nagle's algorithm a frame written
//!   behind unacknowledged data waits for the client's delayed ACK, which
//!   added a fixed ~40 ms to every streamed response on a kept-alive
//!   connection, and glued the HTTP exec exit frame to the output before it.
//! - A deadline for each request head ([`ConnLimits::header_read_timeout`]).
//!   hyper starts that clock whenever the connection waits for a request:
//!   on a fresh connection, and again between keep-alive requests. So it
//!   bounds slowloris clients, connections that never send a byte, and
//!   idle keep-alive connections alike. A request being served, a streamed
//!   response and an upgraded connection (WebSocket, tunnel) have no such
//!   clock: a long stream is never cut.
//! - Caps on open connections, in total and per client address. A connection
//!   over a cap gets a 503 (when the socket takes it at once) and is closed;
//!   its slot is held for the connection's whole life, upgrades included.
//! - Accept errors back off instead of spinning: with no file handles left
//!   (`EMFILE`), `accept` fails at once until one is freed.
//! - With TLS ([`crate::tls`]) the handshake runs in the connection's own
//!   task, never in the accept loop (a slow handshake must not delay the
//!   next accept), under the same deadline as a request head: a client that
//!   opens a socket and sends nothing is closed after
//!   [`ConnLimits::header_read_timeout`]. The handshake holds the
//!   connection's slot, so the caps count TLS connections from their first
//!   byte. A connection over a cap is closed without the 503 (a TLS client
//!   could not read it).
//! - On plain TCP, the writer splices large sprite URL response bodies
//!   straight from the sprite's socket where hyper's buffer holds
//!   placeholder bytes for them ([`crate::body_splice`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::body_splice::{self, Handoff};
use crate::conn_socket::ConnSocket;
use crate::tls::{Tls, ViaTls};

/// How long accepting pauses after an error such as `EMFILE`: long enough
/// not to spin on a condition that only a closing connection clears.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this interval about refused connections or
/// accept errors: an attack must not also flood the log.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// What a connection over a cap reads before it is closed.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\n\
content-type: application/json\r\ncontent-length: 70\r\n\r\n\
{\"error\":\"too_many_connections\",\"message\":\"too many open connections\"}";

/// Connection limits of the API listener (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// Longest wait for a complete request head, idle keep-alive included.
    pub header_read_timeout: Duration,
}

impl Default for ConnLimits {
    /// 10,000 connections fit well within the file-handle limit that
    /// start-up raises (den also needs handles for sprites and chunks); 1,000
    /// per address leaves room for a busy client pool or a NAT while one
    /// address can take at most a tenth. 30 s is as long as a slow network
    /// needs to send a request head, and longer than the common clients keep
    /// an idle pooled connection (Node.js 4 s, Python httpx 5 s).
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections, in total and by client address.
#[derive(Debug)]
pub struct ConnCounter {
    limits: ConnLimits,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place under the caps, given back on drop.
#[derive(Debug)]
pub struct Slot {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(ConnCounter {
            limits,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or `None` when a cap is reached.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut by_ip = self.by_ip.lock();
        let n = by_ip.get(&ip).copied().unwrap_or(0);
        if n >= self.limits.max_connections_per_ip
            || self.total.load(Ordering::Relaxed) >= self.limits.max_connections
        {
            return None;
        }
        by_ip.insert(ip, n + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            counter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_ip = self.counter.by_ip.lock();
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.counter.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection with its slot: the slot goes when the socket does, also
/// after an upgrade hands the socket on to a WebSocket. `socket` is what
/// the connection's requests learn about it ([`ConnSocket`]).
struct Counted {
    tcp: TcpStream,
    socket: ConnSocket,
    /// Where a spliced response body waits for the writer (plain TCP only).
    handoff: Option<Handoff>,
    _slot: Slot,
}

impl Counted {
    /// Write `bufs` up to the first placeholder slice; at a placeholder,
    /// splice the body it stands for instead ([`crate::body_splice`]).
    fn poll_write_bufs(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(h) = &self.handoff {
            match bufs.iter().position(|b| !b.is_empty()) {
                Some(i) if body_splice::is_placeholder(&bufs[i]) => {
                    return h.poll_out(cx, &self.tcp, bufs[i].len());
                }
                Some(i) => {
                    let end = bufs[i..]
                        .iter()
                        .position(|b| body_splice::is_placeholder(b))
                        .map_or(bufs.len(), |n| i + n);
                    return Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..end]);
                }
                None => {}
            }
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // Before `tcp` closes the descriptor (fields drop after this).
        self.socket.close();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.handoff.is_some() && body_splice::is_placeholder(buf) {
            return this.poll_write_bufs(cx, &[std::io::IoSlice::new(buf)]);
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_write_bufs(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.socket.note_flush();
        }
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A plain TCP client connection handed over by an upgrade, with its slot
/// (kept for as long as the connection is).
pub(crate) struct UpgradedTcp(Counted);

impl UpgradedTcp {
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.0.tcp
    }
}

/// The client socket of an upgraded connection that came over plain TCP,
/// and the bytes hyper read from it beyond the request; `Err` gives a TLS
/// (or any other) connection back.
pub(crate) fn upgraded_tcp(
    up: hyper::upgrade::Upgraded,
) -> Result<(UpgradedTcp, bytes::Bytes), hyper::upgrade::Upgraded> {
    let parts = up.downcast::<TokioIo<Counted>>()?;
    Ok((UpgradedTcp(parts.io.into_inner()), parts.read_buf))
}

/// Rate-limits one kind of warning.
struct Throttled(Option<Instant>);

impl Throttled {
    fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

/// Serve `app` on `listener` (over TLS when `tls` is given) until `stop`,
/// then let open connections finish their current exchange and return once
/// all have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    counter: Arc<ConnCounter>,
    tls: Option<Tls>,
    stop: CancellationToken,
) {
    let limits = counter.limits;
    // Every connection task holds a receiver; `closed()` tells when the last went.
    let (open_tx, open_rx) = watch::channel(());
    let mut refused_log = Throttled(None);
    let mut error_log = Throttled(None);
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                metrics::counter!("den_accept_errors_total").increment(1);
                if error_log.due() {
                    tracing::warn!(error = %e, open = counter.open(), "accept error; backing off");
                }
                // Also transient errors (ECONNABORTED) pause: a pause costs a
                // client 100 ms, a spin costs the whole server.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let Some(slot) = counter.try_admit(peer.ip()) else {
            refused += 1;
            metrics::counter!("den_connections_refused_total").increment(1);
            if refused_log.due() {
                tracing::warn!(
                    peer = %peer.ip(), open = counter.open(), refused,
                    max = limits.max_connections, max_per_ip = limits.max_connections_per_ip,
                    "connection cap reached; refusing connections"
                );
            }
            if tls.is_none() {
                // Best effort, never waits: the socket's empty send buffer takes it.
                let _ = tcp.try_write(OVER_CAP);
            }
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let socket = ConnSocket::new(tcp.as_raw_fd());
        let via_tls = tls.is_some();
        // Under TLS the writer sees ciphertext: nothing to splice.
        let handoff = (!via_tls).then(Handoff::default);
        let io = Counted {
            tcp,
            socket: socket.clone(),
            handoff: handoff.clone(),
            _slot: slot,
        };
        let svc = app.clone().map_request(move |req: Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(socket.clone());
            if via_tls {
                req.extensions_mut().insert(ViaTls);
            }
            if let Some(h) = &handoff {
                req.extensions_mut().insert(h.clone());
            }
            req
        });
        let svc = TowerToHyperService::new(svc);
        let stop = stop.clone();
        let open = open_rx.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor().clone());
        tokio::spawn(async move {
            let _open = open;
            let Some(acceptor) = acceptor else {
                return serve_conn(io, svc, limits, peer, stop).await;
            };
            let handshake = tokio::select! {
                r = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)) => r,
                _ = stop.cancelled() => return,
            };
            match handshake {
                Ok(Ok(io)) => serve_conn(io, svc, limits, peer, stop).await,
                Ok(Err(e)) => {
                    metrics::counter!("den_tls_handshake_failures_total").increment(1);
                    tracing::debug!(error = %e, %peer, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("den_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
    drop(open_rx);
    open_tx.closed().await;
}

/// One connection's HTTP/1.1 exchanges (upgrades included) on `io`, until
/// it closes, or `stop` lets the current exchange finish.
async fn serve_conn<I, S>(io: I, svc: S, limits: ConnLimits, peer: SocketAddr, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, %peer, "connection ended");
            }
            return;
        }
        _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_connections_per_ip: per_ip,
            ..ConnLimits::default()
        }
    }

    #[test]
    fn per_address_cap_leaves_room_for_other_addresses() {
        let c = ConnCounter::new(limits(10, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.try_admit(a).unwrap();
        let _a2 = c.try_admit(a).unwrap();
        assert!(c.try_admit(a).is_none(), "a third connection from one address");
        assert!(c.try_admit(b).is_some(), "another address is not affected");
        drop(a1);
        assert!(
            c.try_admit(a).is_some(),
            "a closed connection gives its slot back"
        );
    }

    #[test]
    fn global_cap_counts_every_address_and_gives_slots_back() {
        let c = ConnCounter::new(limits(3, 10));
        let slots: Vec<_> = (1..=3u8)
            .map(|i| c.try_admit(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert!(c.try_admit("10.0.0.9".parse().unwrap()).is_none());
        assert_eq!(c.open(), 3);
        drop(slots);
        assert_eq!(c.open(), 0);
        assert!(c.by_ip.lock().is_empty(), "no entries left for closed addresses");
    }
}
