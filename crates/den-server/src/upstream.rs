//! Reaching a TCP port of a sprite from the host, shared by the WebSocket
//! proxy and sprite URLs.
//!
//! den dials `<sprite addr>:<port>` over the sprite's veth, so only
//! processes listening on `0.0.0.0` (or the sprite's address) are
//! reachable; a listener bound to `127.0.0.1` inside the sprite is not.
//! Sprites behaves the same: its in-VM server rewrites `localhost` to the
//! inner container's address (§2.11), outside the container's loopback.

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
    let deadline = Instant::now() + if just_booted { BOOT_GRACE } else { Duration::ZERO };
    loop {
        let err = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => e,
            Err(_) => return Err(std::io::Error::new(ErrorKind::TimedOut, "connect timed out")),
        };
        if err.kind() != ErrorKind::ConnectionRefused || Instant::now() >= deadline {
            return Err(err);
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}
