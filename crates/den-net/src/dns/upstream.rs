//! The forwarder's way to the upstream resolver: a fixed pool of UDP sockets shared by all
//! sprites, with answers matched to their questions by query id (rewritten to one of ours,
//! unique per socket) and question.
//!
//! A socket per query would cost den one file handle per pending query: a sprite sending
//! 100,000 queries a second for names that never answer would hold 300,000 of them for the
//! timeout. Here the cost of a query is an entry in a map, bounded by the forwarder's
//! budget ([`super::budget`]); the sockets are opened once. Truncated answers are asked
//! again over TCP, at most [`MAX_TCP`] at a time.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

use super::io;
use crate::NetError;

/// How long we wait for the upstream resolver.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connections to the upstream (for truncated answers) open at once.
const MAX_TCP: usize = 32;
/// The largest DNS message (answers are read whole, or not at all).
const MAX_MESSAGE: usize = 65_535;

/// An answer: the raw message (with the asker's id) and its parsed form.
pub(crate) type Answer = (Vec<u8>, Message);

type Key = (usize, u16);

struct Waiter {
    /// Tells this query from a later one that got the same id after this one's answer came.
    seq: u64,
    queries: Vec<Query>,
    tx: oneshot::Sender<Answer>,
}

type Pending = Arc<Mutex<HashMap<Key, Waiter>>>;

fn lock(p: &Pending) -> MutexGuard<'_, HashMap<Key, Waiter>> {
    // Single inserts and removes: consistent even after a panic elsewhere.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Upstream {
    addr: SocketAddr,
    socks: Vec<Arc<UdpSocket>>,
    pending: Pending,
    readers: Vec<JoinHandle<()>>,
    next: AtomicUsize,
    /// Query ids come from a keyed hash of a counter: unpredictable from outside (the key is
    /// random per process), so an off-path sender can't guess them.
    ids: RandomState,
    counter: AtomicU64,
    tcp: Semaphore,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// Removes a query's entry when its asker stops waiting (answered, timed out, or
/// cancelled).
struct Registration<'a> {
    pending: &'a Pending,
    key: Key,
    seq: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut p = lock(self.pending);
        if p.get(&self.key).is_some_and(|w| w.seq == self.seq) {
            p.remove(&self.key);
        }
    }
}

impl Upstream {
    /// Open `sockets` UDP sockets towards `addr` and start their readers on the current
    /// tokio runtime.
    pub(crate) fn start(addr: SocketAddr, sockets: usize) -> Result<Self, NetError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let pending: Pending = Arc::default();
        let mut socks = Vec::new();
        let mut readers = Vec::new();
        for i in 0..sockets {
            let s = std::net::UdpSocket::bind(bind).map_err(|e| io("bind upstream DNS socket", e))?;
            s.connect(addr)
                .map_err(|e| io(&format!("connect to upstream DNS {addr}"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| io("bind upstream DNS socket", e))?;
            let s = Arc::new(UdpSocket::from_std(s).map_err(|e| io("register socket", e))?);
            readers.push(tokio::spawn(read_answers(i, s.clone(), pending.clone())));
            socks.push(s);
        }
        Ok(Upstream {
            addr,
            socks,
            pending,
            readers,
            next: AtomicUsize::new(0),
            ids: RandomState::new(),
            counter: AtomicU64::new(0),
            tcp: Semaphore::new(MAX_TCP),
        })
    }

    /// Ask `query` (the asker's raw message, `msg` parsed) and return the answer with the
    /// asker's id, or `None` when the upstream did not answer in time.
    pub(crate) async fn ask(&self, query: &[u8], msg: &Message) -> Option<Answer> {
        let id = msg.metadata.id;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.socks.len();
        let (tx, rx) = oneshot::channel();
        let (key, seq) = {
            let mut p = lock(&self.pending);
            // Ids in use on this socket are at most the forwarder's in-flight budget, far
            // fewer than 65,536: a free one turns up within a few tries.
            let (ours, seq) = (0..64).find_map(|_| {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let cand = self.ids.hash_one(n) as u16;
                matches!(p.entry((i, cand)), Entry::Vacant(_)).then_some((cand, n))
            })?;
            p.insert(
                (i, ours),
                Waiter {
                    seq,
                    queries: msg.queries.clone(),
                    tx,
                },
            );
            ((i, ours), seq)
        };
        let _reg = Registration {
            pending: &self.pending,
            key,
            seq,
        };
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&key.1.to_be_bytes());
        self.socks[i].send(&out).await.ok()?;
        let (mut raw, mut resp) = tokio::time::timeout(UPSTREAM_TIMEOUT, rx).await.ok()?.ok()?;
        if resp.metadata.truncation {
            // Don't hand the sprite a partial answer: ask again over TCP.
            let _slot = tokio::time::timeout(UPSTREAM_TIMEOUT, self.tcp.acquire())
                .await
                .ok()?
                .ok()?;
            return ask_tcp(self.addr, query, id).await;
        }
        raw[..2].copy_from_slice(&id.to_be_bytes());
        resp.metadata.id = id;
        Some((raw, resp))
    }
}

/// Hand each answer arriving on socket `i` to the query waiting for it. Answers nobody waits
/// for (late, or spoofed with a wrong id or question) are dropped.
async fn read_answers(i: usize, sock: Arc<UdpSocket>, pending: Pending) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // ICMP errors of earlier sends (ECONNREFUSED) surface here; keep reading.
                tracing::debug!(error = %e, "upstream dns recv");
                continue;
            }
        };
        let Ok(resp) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if resp.metadata.message_type != MessageType::Response {
            continue;
        }
        let key = (i, resp.metadata.id);
        let waiter = {
            let mut p = lock(&pending);
            match p.get(&key) {
                // Some servers leave the question out of error answers.
                Some(w) if w.queries == resp.queries || resp.queries.is_empty() => p.remove(&key),
                _ => None,
            }
        };
        if let Some(w) = waiter {
            let _ = w.tx.send((buf[..n].to_vec(), resp));
        }
    }
}

async fn ask_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> Option<Answer> {
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
