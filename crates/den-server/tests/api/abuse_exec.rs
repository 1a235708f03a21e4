//! Abuse of the exec WebSocket by clients that never read.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{TestServer, WAIT};

/// This process's resident memory (the server runs in it).
pub(crate) fn rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Runs `sh -c script` over an exec WebSocket and reads it to the end.
async fn exec_output(s: &TestServer, sprite: &str, script: &str) -> Result<Vec<u8>> {
    let (mut ws, _) = connect(
        s,
        &format!("/v1/sprites/{sprite}/exec?cmd=sh&cmd=-c&cmd={script}"),
    )
    .await?;
    let mut out = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, ws.next()).await? {
        match m? {
            Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(out)
}

async fn connect(
    s: &TestServer,
    path: &str,
) -> Result<(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)> {
    let mut req = s.ws(path).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.token).parse()?);
    Ok(tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await??)
}

const STREAMS: usize = 30;
/// Per unread stream, on den's side (the server runs in this process).
const PER_STREAM_BOUND: u64 = 1 << 20;

/// 30 exec WebSockets run `yes` and never read. den's memory grows by less
/// than 1 MiB per stream (backpressure reaches the command in the sprite),
/// and another exec on the same sprite still answers quickly.
pub async fn abuse_unread_exec_streams_stay_bounded(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    s.create("flood").await?;
    ensure!(exec_output(&s, "flood", "echo%20warm").await? == b"warm\n");
    let base = rss_bytes()?;

    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (ws, _) = connect(&s, "/v1/sprites/flood/exec?cmd=yes").await?;
        // Never polled again: nothing is read after the handshake.
        streams.push(ws);
    }
    // Measure over a window long enough for unbounded buffering to show
    // (before backpressure, each stream reached ~7 MB within a second or two).
    let t0 = Instant::now();
    let mut peak = base;
    while t0.elapsed() < Duration::from_secs(6) {
        peak = peak.max(rss_bytes()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(base);
    let t1 = Instant::now();
    let out = exec_output(&s, "flood", "echo%20bystander").await?;
    let bystander = t1.elapsed();
    println!(
        "  {STREAMS} unread `yes` streams: den grew {:.1} MiB ({:.0} KiB per stream); bystander exec {bystander:?}",
        grown as f64 / (1 << 20) as f64,
        grown as f64 / 1024.0 / STREAMS as f64
    );
    ensure!(
        out == b"bystander\n",
        "bystander got {:?}",
        String::from_utf8_lossy(&out)
    );
    ensure!(
        grown < PER_STREAM_BOUND * STREAMS as u64,
        "den grew {grown} bytes for {STREAMS} unread streams"
    );
    ensure!(
        bystander < Duration::from_secs(5),
        "bystander exec took {bystander:?}"
    );

    // Shutdown with the streams still unread: den lets go of them (their
    // sockets) instead of waiting for ever on clients that never read.
    let open = open_fds()?;
    let t2 = Instant::now();
    s.stop().await;
    let stop = t2.elapsed();
    let released = open.saturating_sub(open_fds()?);
    println!("  shutdown with {STREAMS} unread streams: {stop:?}, {released} descriptors released");
    ensure!(stop < Duration::from_secs(30), "shutdown took {stop:?}");
    // Each unread stream held a WebSocket and an agent connection.
    ensure!(
        released >= 2 * STREAMS,
        "den kept the sockets of unread streams after shutdown (released {released})"
    );
    drop(streams);
    Ok(())
}

fn open_fds() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}
