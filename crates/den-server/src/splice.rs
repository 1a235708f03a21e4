//! Bytes from one TCP socket to another without passing through den's
//! memory: splice(2) moves them from the socket into a pipe and from the
//! pipe into the other socket as page references, where a read and a write
//! would copy every byte twice. Upgraded sprite URL connections (WebSocket
//! and other protocols) between two plain TCP sockets go this way, and so
//! do large plain-HTTP response bodies ([`crate::body_splice`]).
//!
//! Each direction has its own pipe and ends like
//! `tokio::io::copy_bidirectional`: at its source's end of file the other
//! side's writing half is shut down, and the other direction goes on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// At most this much is moved by one splice call, and a pipe holds this
/// much: 16 pages (the default) make a syscall pair per 64 KiB.
pub(crate) const PIPE_SIZE: usize = 1 << 20;

/// Copy both ways between `a` and `b` until both directions ended; first
/// `a_early` to `b` and `b_early` to `a` (bytes already read from each
/// socket by hyper). The bytes moved a→b and b→a.
pub(crate) async fn bidirectional(
    a: &TcpStream,
    a_early: &[u8],
    b: &TcpStream,
    b_early: &[u8],
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, a_early, b), one_way(b, b_early, a))
}

/// `early`, then everything `from` sends, into `to`; then `to`'s writing half
/// is shut down.
async fn one_way(from: &TcpStream, early: &[u8], to: &TcpStream) -> io::Result<u64> {
    write_all(to, early).await?;
    let pipe = Pipe::new()?;
    let mut total = early.len() as u64;
    loop {
        let mut in_pipe = io_ready(from, Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
        })
        .await?;
        if in_pipe == 0 {
            shutdown_write(to)?;
            return Ok(total);
        }
        while in_pipe > 0 {
            let n = io_ready(to, Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)
            })
            .await?;
            in_pipe -= n;
            total += n as u64;
        }
    }
}

/// Run `op` on `sock` once it is ready for `interest`, again after each
/// `EAGAIN` (which clears the readiness tokio saw).
async fn io_ready(
    sock: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        sock.ready(interest).await?;
        match sock.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A pipe of [`PIPE_SIZE`] (or the system's default where that is refused).
pub(crate) struct Pipe {
    pub(crate) read: OwnedFd,
    pub(crate) write: OwnedFd,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which is two c_ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by no one else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves more per call; a smaller one still works.
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(Pipe { read, write })
    }
}

/// One splice(2) of up to `len` bytes, never blocking: `WouldBlock` when
/// the source has nothing or the destination takes nothing now.
pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors and null offsets (sockets and pipes have no
    // file position); the kernel touches no memory of ours.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn shutdown_write(sock: &TcpStream) -> io::Result<()> {
    // SAFETY: shutdown on an open socket touches no memory.
    if unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) } < 0 {
        let e = io::Error::last_os_error();
        // The peer is gone already: nothing left to tell it.
        if e.raw_os_error() != Some(libc::ENOTCONN) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    async fn send(mut w: tokio::net::tcp::WriteHalf<'_>, d: &[u8]) {
        w.write_all(d).await.unwrap();
        w.shutdown().await.unwrap();
    }

    async fn recv(mut r: tokio::net::tcp::ReadHalf<'_>) -> Vec<u8> {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    }

    /// Both directions at once, bigger than every buffer on the way, with
    /// early bytes first and half-closes passed on.
    #[tokio::test]
    async fn moves_both_ways_in_order_and_passes_half_closes_on() {
        let (mut left, a) = pair().await;
        let (b, mut right) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&a, b"early-a ", &b, b"early-b ").await });
        let data = |seed: u8| -> Vec<u8> {
            (0..(8usize << 20))
                .map(|i| (i * seed as usize + i / 251) as u8)
                .collect()
        };
        let (to_right, to_left) = (data(7), data(13));
        let (lr, lw) = left.split();
        let (rr, rw) = right.split();
        let (_, _, at_right, at_left) =
            tokio::join!(send(lw, &to_right), send(rw, &to_left), recv(rr), recv(lr));
        assert!(at_right.starts_with(b"early-a "));
        assert!(at_right[8..] == to_right[..], "left to right differs");
        assert!(at_left.starts_with(b"early-b "));
        assert!(at_left[8..] == to_left[..], "right to left differs");
        let (ab, ba) = proxy.await.unwrap().unwrap();
        assert_eq!((ab, ba), (8 + (8 << 20), 8 + (8 << 20)));
    }
}
