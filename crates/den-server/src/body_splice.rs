//! Plain-HTTP response bodies of sprite URLs spliced from the sprite's
//! socket into the client's, never passing through den's memory.
//!
//! hyper keeps all of HTTP/1: it writes the response head (with the
//! sprite's `Content-Length`), keeps the connection alive or closes it, and
//! times it out. Only the body bytes take another way. The response's body
//! is [`SplicedBody`]: frames of *placeholder* bytes, slices of one
//! read-only mapping of zero pages ([`placeholder`]) that nothing ever
//! reads. The client connection's writer ([`crate::listener`]) recognises
//! a placeholder slice by its address, and instead of writing it moves as
//! many bytes from the sprite's socket into the client's with splice(2)
//! ([`Job::poll_out`]). So hyper counts exactly the bytes that went out,
//! and `Content-Length`, keep-alive and pipelining stay hyper's business.
//!
//! On the sprite's side, hyper's client must not read the body first. For
//! a request that may be spliced the upstream connection's reader
//! ([`UpstreamIo`]) hands hyper the response head and nothing after it
//! ([`Gate::expect_head`]); then the proxy either opens the gate (hyper
//! reads the body as usual: small, chunked or bodiless responses) or takes
//! the socket for a [`Job`]. A taken connection is never pooled: when the
//! job ends, hyper's side of it reads end of file and closes.
//!
//! Only where both ends are plain TCP: a TLS client connection gets no
//! [`Handoff`] (its writer sees ciphertext, never placeholders).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::splice::{PIPE_SIZE, Pipe, splice};

/// Size of the placeholder mapping: the most one body frame stands for.
/// Virtual address space only; its pages are never touched.
const PLACEHOLDER_LEN: usize = 64 << 20;

/// Responses shorter than this are copied as before: a pipe, a second
/// descriptor and its registration cost more than copying a few pages.
pub const MIN_SPLICED_BODY: u64 = 256 << 10;

/// The placeholder bytes, or `None` where the mapping was refused (then
/// nothing is spliced).
pub fn placeholder() -> Option<&'static [u8]> {
    static MAP: OnceLock<Option<usize>> = OnceLock::new();
    let addr = (*MAP.get_or_init(|| {
        // SAFETY: a new private anonymous mapping; it aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PLACEHOLDER_LEN,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p as usize)
    }))?;
    // SAFETY: the mapping is readable, PLACEHOLDER_LEN long, and never
    // unmapped (it lives as long as the process).
    Some(unsafe { std::slice::from_raw_parts(addr as *const u8, PLACEHOLDER_LEN) })
}

/// Whether `buf` lies in the placeholder mapping.
pub fn is_placeholder(buf: &[u8]) -> bool {
    let Some(p) = placeholder() else {
        return false;
    };
    let (start, end) = (p.as_ptr() as usize, p.as_ptr() as usize + p.len());
    let at = buf.as_ptr() as usize;
    !buf.is_empty() && at >= start && at < end
}

/// A client connection's queue of bodies to splice into it; shared by its
/// writer and its requests (a request extension). Usually one job at most;
/// with pipelined requests the next response's body can be queued while
/// the end of the previous one still waits in hyper's write buffer, and the
/// writer meets their placeholders in the same order.
#[derive(Clone, Default)]
pub struct Handoff(Arc<Mutex<VecDeque<Job>>>);

impl Handoff {
    fn put(&self, job: Job) {
        self.0.lock().push_back(job);
    }

    /// The writer's side: splice up to `max` body bytes into `to` (the
    /// client socket), standing for as many placeholder bytes.
    pub(crate) fn poll_out(
        &self,
        cx: &mut Context<'_>,
        to: &TcpStream,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let mut jobs = self.0.lock();
        let Some(job) = jobs.front_mut() else {
            return Poll::Ready(Err(io::Error::other("placeholder bytes with no body to splice")));
        };
        let r = job.poll_out(cx, to, max);
        match &r {
            // Ends the upstream connection and lets the sprite sleep.
            Poll::Ready(Ok(_)) if job.done() => drop(jobs.pop_front()),
            Poll::Ready(Ok(_)) | Poll::Pending => {}
            // The connection is over (hyper closes it on a write error).
            Poll::Ready(Err(_)) => jobs.clear(),
        }
        r
    }
}

/// One body on its way from the sprite's socket into the client's.
pub struct Job {
    upstream: TcpStream,
    pipe: Pipe,
    /// Bytes still to take from the upstream socket.
    left: u64,
    /// Bytes taken and not yet given to the client.
    in_pipe: usize,
    gate: Arc<Gate>,
    _hold: Box<dyn Send + Sync>,
}

impl Job {
    /// The body of `len` bytes still unread in `upstream`'s socket (whose
    /// gate has been taken); `hold` lives as long as the job.
    pub fn new(gate: Arc<Gate>, len: u64, hold: impl Send + Sync + 'static) -> io::Result<Job> {
        let fd = gate.dup.try_clone()?;
        let upstream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        Ok(Job {
            upstream,
            pipe: Pipe::new()?,
            left: len,
            in_pipe: 0,
            gate,
            _hold: Box::new(hold),
        })
    }

    fn done(&self) -> bool {
        self.left == 0 && self.in_pipe == 0
    }

    fn poll_out(&mut self, cx: &mut Context<'_>, to: &TcpStream, max: usize) -> Poll<io::Result<usize>> {
        loop {
            if self.in_pipe > 0 {
                let want = self.in_pipe.min(max);
                ready!(to.poll_write_ready(cx))?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(self.pipe.read.as_raw_fd(), to.as_raw_fd(), want)
                }) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.left == 0 {
                return Poll::Ready(Err(io::Error::other("more placeholder bytes than body")));
            }
            let want = self.left.min(PIPE_SIZE as u64) as usize;
            ready!(self.upstream.poll_read_ready(cx))?;
            match self.upstream.try_io(Interest::READABLE, || {
                splice(self.upstream.as_raw_fd(), self.pipe.write.as_raw_fd(), want)
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the sprite closed the connection before the end of the body",
                    )));
                }
                Ok(n) => {
                    self.left -= n as u64;
                    self.in_pipe += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.gate.close();
    }
}

/// A response body of `len` placeholder bytes whose real bytes a [`Job`]
/// splices; the job goes to the connection's [`Handoff`] before the first
/// frame, i.e. before the writer can meet a placeholder.
pub struct SplicedBody {
    left: u64,
    job: Option<Job>,
    handoff: Handoff,
    zeros: &'static [u8],
}

impl SplicedBody {
    pub fn new(job: Job, len: u64, handoff: Handoff, zeros: &'static [u8]) -> Self {
        SplicedBody {
            left: len,
            job: Some(job),
            handoff,
            zeros,
        }
    }
}

impl hyper::body::Body for SplicedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(job) = self.job.take() {
            self.handoff.put(job);
        }
        let n = self.left.min(self.zeros.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&self.zeros[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

// ---------------------------------------------------------------------------
// The upstream side
// ---------------------------------------------------------------------------

/// What the upstream connection's reader lets hyper read.
enum Phase {
    /// Everything (a connection not in a splicing exchange).
    Open,
    /// The response head and no byte after it.
    Head(HeadScan),
    /// Nothing: the head was read; the proxy decides what happens to the body.
    Held,
    /// Nothing: a [`Job`] owns the body.
    Taken,
    /// End of file: the job ended, hyper's side closes.
    Closed,
}

/// Where a response head ends, across reads.
#[derive(Default, Clone, Copy)]
struct HeadScan {
    /// Bytes of the current head seen so far.
    at: usize,
    /// How much of `\r\n\r\n` the last bytes matched.
    matched: usize,
    /// The first digit of the status code (byte 9 of `HTTP/1.1 200`).
    class: u8,
}

impl HeadScan {
    /// How many of `bytes` belong to the head (all of them while it
    /// continues), and whether it ended there; a 1xx head is followed by
    /// another one, so the scan restarts after it.
    fn feed(&mut self, bytes: &[u8]) -> (usize, bool) {
        for (i, &b) in bytes.iter().enumerate() {
            if self.at == 9 {
                self.class = b;
            }
            self.at += 1;
            self.matched = match (self.matched, b) {
                (0 | 2, b'\r') => self.matched + 1,
                (1 | 3, b'\n') => self.matched + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            if self.matched == 4 {
                if self.class == b'1' {
                    *self = HeadScan::default();
                    continue;
                }
                return (i + 1, true);
            }
        }
        (bytes.len(), false)
    }
}

/// Whether a complete response head may come with a body worth splicing:
/// a `Content-Length` of at least [`MIN_SPLICED_BODY`] and no
/// `Transfer-Encoding`. The proxy decides for good ([`Gate::take`]); this
/// only lets small answers through without waiting for it.
fn worth_holding(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return true;
    };
    let mut len = None;
    for line in text.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return false;
        }
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse::<u64>().ok();
        }
    }
    len.is_some_and(|n| n >= MIN_SPLICED_BODY)
}

/// Shared between an upstream connection's reader and the proxy.
pub struct Gate {
    phase: Mutex<(Phase, Option<Waker>)>,
    /// The connection's socket, for a [`Job`] (a second descriptor, so the
    /// job's registration with the runtime is its own).
    dup: OwnedFd,
}

impl Gate {
    /// The next response's body stays in the socket until [`Self::open`]
    /// or [`Self::take`].
    pub fn expect_head(&self) {
        self.phase.lock().0 = Phase::Head(HeadScan::default());
    }

    /// hyper reads on as usual (no-op unless holding a head's body back).
    pub fn open(&self) {
        let mut p = self.phase.lock();
        if matches!(p.0, Phase::Head(_) | Phase::Held) {
            p.0 = Phase::Open;
            if let Some(w) = p.1.take() {
                w.wake();
            }
        }
    }

    /// The body is the proxy's, if hyper has read the head and nothing
    /// after it.
    pub fn take(&self) -> bool {
        let mut p = self.phase.lock();
        if matches!(p.0, Phase::Held) {
            p.0 = Phase::Taken;
            true
        } else {
            false
        }
    }

    fn close(&self) {
        let mut p = self.phase.lock();
        p.0 = Phase::Closed;
        if let Some(w) = p.1.take() {
            w.wake();
        }
    }
}

/// An upstream connection's socket as hyper's client sees it: reads pass
/// through its [`Gate`].
pub struct UpstreamIo {
    tcp: TcpStream,
    gate: Arc<Gate>,
}

impl UpstreamIo {
    pub fn new(tcp: TcpStream) -> io::Result<(UpstreamIo, Arc<Gate>)> {
        let dup = tcp.as_fd().try_clone_to_owned()?;
        let gate = Arc::new(Gate {
            phase: Mutex::new((Phase::Open, None)),
            dup,
        });
        Ok((
            UpstreamIo {
                tcp,
                gate: gate.clone(),
            },
            gate,
        ))
    }

    /// The socket, for an upgraded connection (its gate is open).
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut p = this.gate.phase.lock();
        match &mut p.0 {
            Phase::Open => {
                drop(p);
                Pin::new(&mut this.tcp).poll_read(cx, buf)
            }
            Phase::Held | Phase::Taken => {
                p.1 = Some(cx.waker().clone());
                Poll::Pending
            }
            Phase::Closed => Poll::Ready(Ok(())),
            Phase::Head(_) => {
                drop(p);
                // Look first, then take exactly the head's bytes: what
                // follows it must stay in the socket.
                let before = buf.filled().len();
                let peeked = ready!(this.tcp.poll_peek(cx, buf))?;
                let mut p = this.gate.phase.lock();
                let Phase::Head(scan) = &mut p.0 else {
                    // Opened meanwhile: the peeked bytes are read below.
                    drop(p);
                    buf.set_filled(before);
                    return Pin::new(&mut this.tcp).poll_read(cx, buf);
                };
                let mut probe = *scan;
                let (head, ended) = probe.feed(&buf.filled()[before..]);
                // A whole head in view that promises no body worth splicing
                // (small, chunked, none): hyper reads on at once, without
                // the proxy's decision in between.
                let small = ended
                    && probe.at <= head
                    && !worth_holding(&buf.filled()[before + head - probe.at..before + head]);
                buf.set_filled(before);
                if peeked == 0 {
                    return Poll::Ready(Ok(()));
                }
                if small {
                    p.0 = Phase::Open;
                    drop(p);
                    return Pin::new(&mut this.tcp).poll_read(cx, buf);
                }
                // The peeked bytes are in the socket: this read takes them
                // at once.
                let mut part = buf.take(head);
                ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut part))?;
                let got = part.filled().len();
                // SAFETY: the read initialised these bytes of `buf`'s unfilled part.
                unsafe { buf.assume_init(got) };
                buf.advance(got);
                if scan.feed(&buf.filled()[before..]).1 {
                    p.0 = Phase::Held;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_scan_finds_the_end_across_reads_and_skips_1xx() {
        let mut s = HeadScan::default();
        assert_eq!(s.feed(b"HTTP/1.1 200 OK\r\nA: b\r"), (22, false));
        assert_eq!(s.feed(b"\n\r\nbody"), (3, true));
        let mut s = HeadScan::default();
        let r = b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 204 No\r\n\r\nrest";
        let (n, end) = s.feed(r);
        assert!(end);
        assert_eq!(&r[n..], b"rest");
    }

    #[test]
    fn only_long_bodies_are_held() {
        assert!(worth_holding(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n"
        ));
        assert!(!worth_holding(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"));
        assert!(!worth_holding(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!worth_holding(
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
        ));
    }

    #[test]
    fn placeholders_are_recognised_by_address() {
        let p = placeholder().expect("mapping");
        assert!(is_placeholder(&p[5..9]));
        assert!(!is_placeholder(b"data"));
        assert!(!is_placeholder(&p[..0]));
    }
}
