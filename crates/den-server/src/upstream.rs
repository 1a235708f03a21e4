//! Reaching a TCP port of a sprite from the host, shared by the WebSocket
//! proxy and sprite URLs.
//!
//! [`dial`] goes to `<sprite addr>:<port>` over the sprite's veth, which
//! reaches listeners on `0.0.0.0` or the sprite's address, like Sprites'
//! in-VM server dialing the inner container's address (§2.11).
//! [`dial_loopback`] connects from inside the sprite's network namespace to
//! `127.0.0.1`, so listeners bound to the sprite's loopback answer too.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use den_sprite::{SpriteManager, SpriteStatus};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A sprite that was cold when a request woke it has just booted: its
/// programs (services) may not be listening yet, so refused connections
/// are retried this long before the caller reports them.
const BOOT_GRACE: Duration = Duration::from_secs(10);
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// A SYN to a live sprite is answered at once; this only bounds oddities.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the sprite is cold, i.e. the coming wake boots it (taken before
/// waking it).
pub fn is_cold(mgr: &SpriteManager, name: &str) -> bool {
    mgr.get(name)
        .map(|i| i.status == SpriteStatus::Cold)
        .unwrap_or(false)
}

/// Connect to `addr:port`; when `just_booted`, refused connections are
/// retried for [`BOOT_GRACE`].
pub async fn dial(addr: Ipv4Addr, port: u16, just_booted: bool) -> std::io::Result<TcpStream> {
    if addr.is_unspecified() {
        return Err(std::io::Error::new(
            ErrorKind::NotConnected,
            "the sprite has no network address",
        ));
    }
    let target = SocketAddr::from((addr, port));
    with_boot_grace(just_booted, || async move {
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(ErrorKind::TimedOut, "connect timed out")))
    })
    .await
}

/// Connect to `127.0.0.1:port` inside the network namespace `netns`.
pub async fn dial_loopback(netns: &str, port: u16, just_booted: bool) -> std::io::Result<TcpStream> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    with_boot_grace(just_booted, || {
        let ns = netns.to_string();
        async move {
            // setns is per thread: run_in uses a short-lived thread of its own.
            let made = tokio::task::spawn_blocking(move || {
                den_net::netns::run_in(&ns, move || {
                    std::net::TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                })
            })
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            made.set_nonblocking(true)?;
            TcpStream::from_std(made)
        }
    })
    .await
}

/// Run `connect` until it succeeds, fails other than by refusal, or the
/// grace (if any) is over.
async fn with_boot_grace<F, Fut>(just_booted: bool, mut connect: F) -> std::io::Result<TcpStream>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    let deadline = Instant::now() + if just_booted { BOOT_GRACE } else { Duration::ZERO };
    loop {
        let err = match connect().await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => e,
        };
        if err.kind() != ErrorKind::ConnectionRefused || Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
