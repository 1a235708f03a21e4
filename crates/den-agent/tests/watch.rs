//! `watch_ports` and `fs_watch` against an in-process agent: what they
//! report, and their bounds.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;
use den_agent::Error;
use den_agent::client::JsonStream;
use serde_json::Value;

async fn recv(s: &mut JsonStream) -> Value {
    tokio::time::timeout(WAIT, s.recv())
        .await
        .expect("timed out waiting for a message")
        .expect("the agent ended the stream")
}

/// Messages until one satisfies `want`; returns it.
async fn until(s: &mut JsonStream, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let v = recv(s).await;
        if want(&v) {
            return v;
        }
        seen.push(v);
    }
    panic!("no {what} among {seen:?}");
}

fn is_event(v: &Value, event: &str, path: &str) -> bool {
    v["type"] == "event" && v["event"] == event && v["path"] == path
}

#[tokio::test]
async fn watch_ports_lists_open_listeners_then_reports_changes() {
    let a = agent().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Wait until the poller knows the listener, so it belongs in the list.
    let mut sub = a.client.subscribe_ports().await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, sub.recv()).await.unwrap() {
            Some(den_agent::client::Event::PortOpened(p)) if p.port == port => break,
            Some(_) => {}
            None => panic!("subscription ended"),
        }
    }
    let mut w = a.client.watch_ports().await.unwrap();
    let first = recv(&mut w).await;
    assert_eq!(first["type"], "port_list", "{first}");
    let mine = first["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("port {port} not listed: {first}"))
        .clone();
    assert_eq!(mine["address"], "127.0.0.1");
    assert_eq!(mine["pid"], std::process::id());

    drop(listener);
    let closed = until(&mut w, "port_closed", |v| {
        v["type"] == "port_closed" && v["port"] == port
    })
    .await;
    assert_eq!(closed["address"], "127.0.0.1");
    let again = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = again.local_addr().unwrap().port();
    let opened = until(&mut w, "port_opened", |v| {
        v["type"] == "port_opened" && v["port"] == port2
    })
    .await;
    assert_eq!(opened["pid"], std::process::id());
    a.shutdown().await;
}

#[tokio::test]
async fn fs_watch_reports_create_write_chmod_rename_remove_recursively() {
    let a = agent().await;
    let root = a.dir.path().join("w");
    std::fs::create_dir(&root).unwrap();
    let (watched, mut w) = a
        .client
        .fs_watch(&["w".to_string()], Some(a.dir.path().to_str().unwrap()), true)
        .await
        .unwrap();
    assert_eq!(watched, vec![root.display().to_string()]);

    let f = root.join("f.txt");
    let fp = f.display().to_string();
    std::fs::write(&f, b"hello").unwrap();
    let created = until(&mut w, "create", |v| is_event(v, "create", &fp)).await;
    assert_eq!(created["isDir"], false);
    assert!(created["timestamp"].as_str().unwrap().ends_with('Z'), "{created}");
    let written = until(&mut w, "write", |v| is_event(v, "write", &fp)).await;
    assert_eq!(written["size"], 5);
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    until(&mut w, "chmod", |v| is_event(v, "chmod", &fp)).await;

    // A directory made after the subscription is watched too.
    let sub = root.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let d = until(&mut w, "mkdir", |v| {
        is_event(v, "create", &sub.display().to_string())
    })
    .await;
    assert_eq!(d["isDir"], true);
    let g = sub.join("g");
    std::fs::write(&g, b"x").unwrap();
    until(&mut w, "create below", |v| {
        is_event(v, "create", &g.display().to_string())
    })
    .await;

    // A tree moved in whole: its contents were never under a watch.
    let outside = a.dir.path().join("outside/t");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("inner"), b"abc").unwrap();
    std::fs::rename(a.dir.path().join("outside"), root.join("tree")).unwrap();
    let inner = root.join("tree/t/inner").display().to_string();
    let got = until(&mut w, "the moved-in file", |v| is_event(v, "create", &inner)).await;
    assert_eq!(got["size"], 3);
    // And it is watched.
    std::fs::write(root.join("tree/t/later"), b"x").unwrap();
    let later = root.join("tree/t/later").display().to_string();
    until(&mut w, "a file in the moved-in tree", |v| {
        is_event(v, "create", &later)
    })
    .await;

    std::fs::rename(&f, root.join("moved")).unwrap();
    until(&mut w, "rename", |v| is_event(v, "rename", &fp)).await;
    let moved = root.join("moved").display().to_string();
    until(&mut w, "rename target", |v| is_event(v, "create", &moved)).await;
    std::fs::remove_file(root.join("moved")).unwrap();
    until(&mut w, "remove", |v| is_event(v, "remove", &moved)).await;
    a.shutdown().await;
}

fn assert_refused<T>(r: Result<T, Error>, errno: &str) {
    match r {
        Err(Error::Agent { message, .. }) => assert!(message.starts_with(&format!("{errno}: ")), "{message}"),
        Err(e) => panic!("expected {errno}, got {e}"),
        Ok(_) => panic!("expected {errno}, got a watch"),
    }
}

#[tokio::test]
async fn fs_watch_refuses_bad_paths_and_too_many_paths() {
    let a = agent().await;
    let dir = a.dir.path().display().to_string();
    assert_refused(a.client.fs_watch(&[], None, false).await, "EINVAL");
    let many = vec![dir.clone(); 65];
    assert_refused(a.client.fs_watch(&many, None, false).await, "EINVAL");
    assert_refused(
        a.client.fs_watch(&[format!("{dir}/missing")], None, false).await,
        "ENOENT",
    );
    assert_refused(a.client.fs_watch(&["a\0b".into()], None, false).await, "EINVAL");
    let ok = vec![dir; 64];
    assert!(a.client.fs_watch(&ok, None, false).await.is_ok());
    a.shutdown().await;
}

#[tokio::test]
async fn fs_watch_sees_only_what_the_default_user_may_read() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to switch filesystem ids");
        return;
    }
    let a = agent_with(|c| c.default_user = "65534".into()).await;
    let private = a.dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    // The agent itself (root) could watch it; the user may not.
    assert_refused(
        a.client
            .fs_watch(&[private.display().to_string()], None, false)
            .await,
        "EACCES",
    );
    a.shutdown().await;
}

#[tokio::test]
async fn fs_watch_subscriptions_are_limited() {
    let a = agent().await;
    let dir = vec![a.dir.path().display().to_string()];
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(a.client.fs_watch(&dir, None, false).await.unwrap());
    }
    assert_refused(a.client.fs_watch(&dir, None, false).await, "EINVAL");
    // A closed subscription gives its place back (once the agent saw it go).
    held.pop();
    let deadline = Instant::now() + WAIT;
    loop {
        match a.client.fs_watch(&dir, None, false).await {
            Ok(w) => {
                held.push(w);
                break;
            }
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("no place freed: {e}"),
        }
    }
    a.shutdown().await;
}

/// A client that does not read loses events beyond the agent's bounded
/// queue, and is told how many, instead of the agent buffering them.
#[tokio::test]
async fn fs_watch_slow_client_is_told_what_was_dropped() {
    let a = agent().await;
    let root = a.dir.path().join("busy");
    std::fs::create_dir(&root).unwrap();
    let (_, mut w) = a
        .client
        .fs_watch(&[root.display().to_string()], None, false)
        .await
        .unwrap();
    // Far more events than the agent's queue, the socket buffers and the
    // client's queue hold together, while nobody reads.
    for i in 0..6000 {
        std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
    }
    let mut events = 0usize;
    let notice = loop {
        let v = recv(&mut w).await;
        match v["type"].as_str() {
            Some("event") => events += 1,
            Some("error") => break v,
            _ => panic!("unexpected {v}"),
        }
    };
    let msg = notice["message"].as_str().unwrap();
    assert!(msg.contains("events were dropped"), "{msg}");
    let dropped: usize = msg.split_whitespace().next().unwrap().parse().unwrap();
    assert!(dropped > 0 && events < 12000, "{events} events, then {msg}");
    // The stream goes on after the notice.
    std::fs::write(root.join("after"), b"x").unwrap();
    let after = root.join("after").display().to_string();
    until(&mut w, "an event after the notice", |v| {
        is_event(v, "create", &after)
    })
    .await;
    a.shutdown().await;
}
