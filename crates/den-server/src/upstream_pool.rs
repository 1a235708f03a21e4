//! Idle HTTP/1.1 connections to sprites' URL ports, kept for the next
//! request instead of a TCP handshake and a new connection task each time.
//!
//! A connection belongs to one boot of one sprite ([`PoolKey::boot`]): a
//! sprite that slept cold or was restored has a new network namespace, and
//! a connection into the old one would hang rather than fail. Within a boot
//! a connection is reused only while
//! - it is younger than the idle limit, which stays under the shortest
//!   keep-alive timeouts of common servers (Node's 5 s), so den rarely
//!   writes into a connection the program is closing; and
//! - hyper reports it open and ready.
//!
//! If a request still meets a connection that closed meanwhile, hyper hands
//! the unsent request back and it goes out on a new connection; a request
//! that was sent is never repeated (it may not be idempotent).
//!
//! An idle connection holds no [`den_sprite::Activity`], so it never keeps
//! its sprite awake.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;

use crate::body_splice::Gate;

/// Past this, an idle connection is dropped rather than reused.
pub const IDLE_LIMIT: Duration = Duration::from_secs(4);
/// Idle connections kept per sprite port; more are closed when returned.
const MAX_IDLE_PER_KEY: usize = 16;

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub sprite: String,
    pub boot: u64,
    pub port: u16,
}

/// A connection to a sprite: hyper's handle, and the gate its reads pass
/// through when den made it ([`crate::body_splice::UpstreamIo`]).
pub struct Upstream {
    pub sender: SendRequest<Body>,
    pub gate: Option<Arc<Gate>>,
}

struct Idle {
    up: Upstream,
    since: Instant,
}

impl Idle {
    /// Young enough and not closed: worth keeping.
    fn fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < IDLE_LIMIT && !self.up.sender.is_closed()
    }
}

#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
}

/// What [`UpstreamPool::stats`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub keys: usize,
    pub idle: usize,
}

impl UpstreamPool {
    /// An open, ready connection for `key`, if one is idle (most recently
    /// used first: it is the likeliest to still be open).
    pub fn checkout(&self, key: &PoolKey) -> Option<Upstream> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let mut found = None;
        while let Some(c) = list.pop() {
            if c.fresh(now) && c.up.sender.is_ready() {
                found = Some(c.up);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Keep `sender` for `key` once its exchange is over: after the response
    /// body was read to the end. A connection the exchange left unusable
    /// (body dropped half way, `Connection: close`, an error) is dropped,
    /// which ends its connection task.
    pub fn give_back(self: &std::sync::Arc<Self>, key: PoolKey, mut up: Upstream) {
        let pool = self.clone();
        tokio::spawn(async move {
            if up.sender.ready().await.is_err() {
                return;
            }
            let mut idle = pool.idle.lock();
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_KEY {
                list.push(Idle {
                    up,
                    since: Instant::now(),
                });
            }
        });
    }

    /// Drop every connection idle since before `now - IDLE_LIMIT`, or closed.
    pub fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|c| c.fresh(now));
            !list.is_empty()
        });
    }

    pub fn stats(&self) -> PoolStats {
        let idle = self.idle.lock();
        PoolStats {
            keys: idle.len(),
            idle: idle.values().map(Vec::len).sum(),
        }
    }

    /// Sweep every second until `stop`, then let every idle connection go.
    pub async fn run_sweeper(self: std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep(Instant::now()),
                _ = stop.cancelled() => break,
            }
        }
        self.idle.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::Response;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A loopback HTTP/1.1 server counting the connections it accepted;
    /// with `close`, it ends each connection after one response.
    async fn server(close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| async move {
                        let mut r =
                            Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"hello")));
                        if close {
                            r.headers_mut().insert("connection", "close".parse().unwrap());
                        }
                        Ok::<_, Infallible>(r)
                    });
                    let _ = http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    async fn dial(addr: SocketAddr) -> Upstream {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Upstream { sender, gate: None }
    }

    /// One exchange the way the URL proxy does it: a pooled connection if
    /// there is one, else a new one; the body read to the end; the
    /// connection given back.
    async fn get(pool: &Arc<UpstreamPool>, key: &PoolKey, addr: SocketAddr) -> String {
        let mut up = match pool.checkout(key) {
            Some(s) => s,
            None => dial(addr).await,
        };
        let req = hyper::Request::builder()
            .uri("/")
            .header("host", "x")
            .body(Body::empty())
            .unwrap();
        let resp = up.sender.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        pool.give_back(key.clone(), up);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits (bounded) until the given-back connection is idle in the pool.
    async fn settled(pool: &UpstreamPool, idle: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.stats().idle != idle {
            assert!(
                Instant::now() < deadline,
                "pool never reached {idle} idle: {:?}",
                pool.stats()
            );
            tokio::task::yield_now().await;
        }
    }

    fn key(boot: u64) -> PoolKey {
        PoolKey {
            sprite: "web".into(),
            boot,
            port: 8080,
        }
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = server(false).await;
        let pool = Arc::new(UpstreamPool::default());
        for _ in 0..5 {
            assert_eq!(get(&pool, &key(1), addr).await, "hello");
            settled(&pool, 1).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        let (addr, accepted) = server(true).await;
        let pool = Arc::new(UpstreamPool::default());
        for i in 1..=3 {
            assert_eq!(get(&pool, &key(1), addr).await, "hello");
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
        // None of them was kept.
        settled(&pool, 0).await;
    }

    #[tokio::test]
    async fn another_boot_never_gets_an_old_connection() {
        let (addr, accepted) = server(false).await;
        let pool = Arc::new(UpstreamPool::default());
        get(&pool, &key(1), addr).await;
        settled(&pool, 1).await;
        assert!(pool.checkout(&key(2)).is_none());
        get(&pool, &key(2), addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, _) = server(false).await;
        let pool = Arc::new(UpstreamPool::default());
        get(&pool, &key(1), addr).await;
        settled(&pool, 1).await;
        pool.sweep(Instant::now());
        assert_eq!(pool.stats().idle, 1, "still young");
        pool.sweep(Instant::now() + IDLE_LIMIT);
        assert_eq!(pool.stats(), PoolStats::default());
        assert!(pool.checkout(&key(1)).is_none());
    }
}
