//! What a request handler may learn about the socket its client is
//! connected by: [`ConnSocket`], a request extension that
//! [`crate::listener`] adds to every request.
//!
//! For where the bytes on the wire matter, not only their order: HTTP
//! exec's exit frame must reach the client in a read of its own, so it
//! waits until what went before it has left hyper's buffer
//! ([`ConnSocket::flushes`]) and the kernel's send queue
//! ([`ConnSocket::unsent`]).
//!
//! The socket is asked by its descriptor number, under a lock that the
//! connection takes to mark itself closed before its socket closes: a
//! handler that outlives its connection gets `None`, never the answer of
//! another socket that took over the number.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

/// `SIOCOUTQNSD` (linux/sockios.h): bytes in a TCP socket's send queue not
/// yet sent. Not in the `libc` crate.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// The client connection's socket, as seen from a request (cheap to clone).
#[derive(Clone)]
pub struct ConnSocket(Arc<Shared>);

struct Shared {
    /// `None` once the connection closed.
    fd: Mutex<Option<RawFd>>,
    /// Times hyper flushed: wrote out everything it held, then flushed the IO.
    flushes: AtomicU64,
    flushed: AtomicWaker,
}

impl std::fmt::Debug for ConnSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSocket")
            .field("fd", &*self.0.fd.lock())
            .field("flushes", &self.flushes())
            .finish()
    }
}

impl ConnSocket {
    /// For the connection on `fd`, which calls [`Self::note_flush`] and,
    /// before closing `fd`, [`Self::close`].
    pub(crate) fn new(fd: RawFd) -> Self {
        ConnSocket(Arc::new(Shared {
            fd: Mutex::new(Some(fd)),
            flushes: AtomicU64::new(0),
            flushed: AtomicWaker::new(),
        }))
    }

    /// How many times the connection's writer flushed so far. Bytes handed
    /// to hyper are in the socket once this has grown past its value at
    /// that moment: hyper flushes the IO only with its own buffer empty.
    pub fn flushes(&self) -> u64 {
        self.0.flushes.load(Ordering::Acquire)
    }

    /// Ready once [`Self::flushes`] is past `seen` (or the connection closed).
    pub fn poll_flushed_since(&self, seen: u64, cx: &mut Context<'_>) -> Poll<()> {
        self.0.flushed.register(cx.waker());
        if self.flushes() > seen || self.0.fd.lock().is_none() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Bytes in the kernel's send queue not yet sent; `None` once the
    /// connection closed, or if the kernel can't tell.
    pub fn unsent(&self) -> Option<usize> {
        let fd = self.0.fd.lock();
        queued(*fd.as_ref()?).ok()
    }

    pub(crate) fn note_flush(&self) {
        self.0.flushes.fetch_add(1, Ordering::AcqRel);
        self.0.flushed.wake();
    }

    /// The connection is closing its socket: forget the number.
    pub(crate) fn close(&self) {
        *self.0.fd.lock() = None;
        self.0.flushed.wake();
    }
}

/// `SIOCOUTQNSD` of `fd`.
fn queued(fd: RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: the caller holds the connection's lock, so `fd` is its open
    // socket; the kernel writes one c_int into `n`, which lives across the call.
    let r = unsafe { libc::ioctl(fd, SIOCOUTQNSD as _, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn unsent_counts_what_the_peers_window_holds_back() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window, so that most of what is written stays unsent.
        sock.set_recv_buffer_size(4096).unwrap();
        let _peer = sock.connect(l.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let conn = ConnSocket::new(tcp.as_raw_fd());
        assert_eq!(conn.unsent(), Some(0));
        // Fill the send buffer; the peer never reads.
        let data = vec![7u8; 1 << 16];
        loop {
            match tcp.try_write(&data) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(conn.unsent().is_some_and(|n| n > 0), "{:?}", conn.unsent());
        conn.close();
        assert_eq!(conn.unsent(), None, "a closed connection is not asked");
    }
}
