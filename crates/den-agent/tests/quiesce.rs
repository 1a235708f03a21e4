//! Quiesce before a memory snapshot: when the agent answers, it holds no
//! socket a snapshot could trip on, and the resume signal has it serve again.
//!
//! Its own binary: the resume signal goes to the whole test process.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_closes_everything_before_answering() {
    let a = agent().await;
    let socket = a.handle.as_ref().unwrap().socket().to_path_buf();
    // Connections being served when the quiesce comes: idle ones (no
    // request yet) and an exec stream.
    let mut idle: Vec<_> = (0..32).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    let mut session = a.client.exec(sh("echo up; exec sleep 600")).await.unwrap();
    read_until(&mut session, "up").await;

    a.client.quiesce().await.unwrap();
    // Already closed when the answer came: read without waiting.
    for c in &mut idle {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        match c.read(&mut buf) {
            Ok(0) => {}
            other => panic!("a connection outlived the quiesce: {other:?}"),
        }
    }
    assert!(!socket.exists(), "the listening socket outlived the quiesce");
    assert!(a.client.ping().await.is_err(), "a quiesced agent answered");

    // The resume signal: it serves again, on a new socket.
    nix::sys::signal::raise(nix::sys::signal::Signal::try_from(den_agent::RESUME_SIGNAL).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while a.client.ping().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer after the resume signal"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // And quiesces again.
    a.client.quiesce().await.unwrap();
    assert!(!socket.exists());
    a.shutdown().await;
}
