//! End-to-end tests of sprite networking, as root. Each test builds its own fake internet,
//! manager (own nft table, subnet, interface prefix) and sprites, and removes them on drop.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use den_net::{NetworkPolicy, netns};
use hickory_proto::op::ResponseCode;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return Ok(());
        }
    };
}

#[test]
fn restricted_policy_dns_learning_and_live_change() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let sp = w.sprite(
        "alpha",
        &policy(r#"{"rules":[{"domain":"allowed.test","action":"allow"},{"domain":"*","action":"deny"}]}"#),
    )?;

    // Allowed name resolves (through the forwarder, from the fake internet) and connects.
    let (code, ips) = lookup(&sp, "allowed.test")?;
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(ips, vec![w.inet.allowed_ip]);
    assert_eq!(w.mgr.learned("alpha"), vec![w.inet.allowed_ip]);
    let mut conn = connect_from(&sp.netns, SocketAddrV4::new(w.inet.allowed_ip, 80))?
        .expect("allowed destination connects");
    assert_eq!(greeting(&mut conn)?, format!("hello from {}", w.inet.allowed_ip));

    // The same over DNS-over-TCP.
    assert_eq!(
        lookup_tcp(&sp, "allowed.test")?,
        (ResponseCode::NoError, vec![w.inet.allowed_ip])
    );
    assert_eq!(lookup_tcp(&sp, "denied.test")?.0, ResponseCode::Refused);

    // Denied name: REFUSED, nothing learned.
    let (code, ips) = lookup(&sp, "denied.test")?;
    assert_eq!(code, ResponseCode::Refused);
    assert!(ips.is_empty());

    // Raw IP that no allowed lookup returned: blocked (TCP reset from the firewall).
    let r = connect_from(&sp.netns, SocketAddrV4::new(w.inet.denied_ip, 80))?;
    assert!(r.is_err(), "unlearned raw IP must be blocked");
    // DNS servers other than ours are unreachable too (raw IP, UDP).
    // The open connection still works before the change.
    conn.write_all(b"ping\n")?;
    let mut buf = [0u8; 16];
    let n = conn.read(&mut buf)?;
    assert_eq!(&buf[..n], b"ping\n");

    // Live policy change: deny the name we connected to.
    let t = Instant::now();
    w.mgr.set_policy(
        "alpha",
        &policy(r#"{"rules":[{"domain":"allowed.test","action":"deny"},{"domain":"*","action":"deny"}]}"#),
    )?;
    eprintln!("set_policy took {:?}", t.elapsed());
    assert!(w.mgr.learned("alpha").is_empty());

    // The open connection is killed: the next exchange fails (reset) or sees EOF, well
    // before the read timeout.
    let t = Instant::now();
    let killed = match conn.write_all(b"ping\n") {
        Err(_) => true,
        Ok(()) => match conn.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut,
        },
    };
    assert!(killed, "connection survived the policy change");
    assert!(t.elapsed() < IO_TIMEOUT);

    // And the name is now refused, new connections fail.
    assert_eq!(lookup(&sp, "allowed.test")?.0, ResponseCode::Refused);
    assert!(connect_from(&sp.netns, SocketAddrV4::new(w.inet.allowed_ip, 80))?.is_err());

    // Back to allowing it: lookup re-learns and connecting works again.
    w.mgr.set_policy(
        "alpha",
        &policy(r#"{"rules":[{"domain":"*.test","action":"allow"},{"domain":"*","action":"deny"}]}"#),
    )?;
    assert_eq!(lookup(&sp, "denied.test")?.0, ResponseCode::NoError);
    let mut c = connect_from(&sp.netns, SocketAddrV4::new(w.inet.denied_ip, 80))?.expect("re-allowed");
    assert!(greeting(&mut c)?.starts_with("hello"));
    Ok(())
}

#[test]
fn unrestricted_policy_allows_raw_ips() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let sp = w.sprite("open", &NetworkPolicy::unrestricted())?;
    // No lookup needed for an unrestricted sprite.
    let mut c = connect_from(&sp.netns, SocketAddrV4::new(w.inet.denied_ip, 80))?
        .expect("allow-all reaches any (non-blocked) address");
    assert!(greeting(&mut c)?.starts_with("hello"));
    let (code, ips) = lookup(&sp, "denied.test")?;
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(ips, vec![w.inet.denied_ip]);
    // Upstream NXDOMAIN is passed through.
    assert_eq!(lookup(&sp, "nope.test")?.0, ResponseCode::NXDomain);

    // Switching an unrestricted sprite to a deny-all policy cuts its open connections too.
    w.mgr
        .set_policy("open", &policy(r#"{"rules":[{"domain":"*","action":"deny"}]}"#))?;
    let mut buf = [0u8; 16];
    let killed = match c.write_all(b"x\n") {
        Err(_) => true,
        Ok(()) => matches!(c.read(&mut buf), Ok(0) | Err(_)),
    };
    assert!(killed);
    assert!(connect_from(&sp.netns, SocketAddrV4::new(w.inet.denied_ip, 80))?.is_err());
    Ok(())
}

#[test]
fn isolation_between_sprites_host_and_metadata() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let a = w.sprite("a", &NetworkPolicy::unrestricted())?;
    let b = w.sprite("b", &NetworkPolicy::unrestricted())?;
    assert_ne!(a.addr, b.addr);

    // A listener in sprite b: the host can reach it (so the path works) but sprite a can't.
    let lb = netns::run_in(&b.netns, || TcpListener::bind("0.0.0.0:8080"))??;
    let _sb = tcp_server_on(lb);
    let mut hc = std::net::TcpStream::connect_timeout(&SocketAddrV4::new(b.addr, 8080).into(), IO_TIMEOUT)?;
    assert!(greeting(&mut hc)?.starts_with("hello"));
    let r = connect_from(&a.netns, SocketAddrV4::new(b.addr, 8080))?;
    assert!(r.is_err(), "sprite → sprite must be blocked");

    // Host services: one on 127.0.0.1, one on all addresses (reachable via the gateway).
    let lo = TcpListener::bind("127.0.0.1:0")?;
    let lo_port = lo.local_addr()?.port();
    let _slo = tcp_server_on(lo);
    let any = TcpListener::bind("0.0.0.0:0")?;
    let any_port = any.local_addr()?.port();
    let _sany = tcp_server_on(any);
    // Sanity: they work from the host.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", lo_port))?;
    assert!(greeting(&mut c)?.starts_with("hello"));
    for (ip, port) in [
        (Ipv4Addr::LOCALHOST, lo_port),
        (a.gateway, lo_port),
        (a.gateway, any_port),
    ] {
        let r = connect_from(&a.netns, SocketAddrV4::new(ip, port))?;
        assert!(r.is_err(), "sprite → host {ip}:{port} must be blocked");
    }

    // Metadata address: refused by our firewall (a reset, not the trap's silent drop).
    let r = connect_from(&a.netns, SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80))?;
    let e = r.expect_err("metadata must be blocked");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

    // Spoofing: sprite a takes b's address and asks as b. The firewall drops the query (the
    // `sprites` set pairs each veth with its address); even if it didn't, the answer would
    // be routed to b, so a gets nothing within a bounded wait.
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &a.netns,
            "addr",
            "add",
            &format!("{}/32", b.addr),
            "dev",
            "eth0",
        ])
        .status()?;
    assert!(out.success());
    let r = lookup_from(&a, b.addr, "allowed.test", Duration::from_millis(1500));
    assert!(r.is_err(), "spoofed query answered: {r:?}");
    std::process::Command::new("ip")
        .args([
            "-n",
            &a.netns,
            "addr",
            "del",
            &format!("{}/32", b.addr),
            "dev",
            "eth0",
        ])
        .status()?;
    // …and it was the anti-spoofing rule that dropped it.
    let chain = std::process::Command::new("nft")
        .args(["list", "chain", "inet", &w.mgr.config().table, "sprite_in"])
        .output()?;
    let chain = String::from_utf8_lossy(&chain.stdout);
    let line = chain
        .lines()
        .find(|l| l.contains("@sprites"))
        .expect("spoof rule present");
    assert!(
        line.contains("counter packets ") && !line.contains("counter packets 0 "),
        "{line}"
    );

    // DNS on the gateway is the one host service a sprite may use; and it keeps working for
    // a after b (which also carried the gateway address) is gone.
    assert_eq!(lookup(&a, "allowed.test")?.0, ResponseCode::NoError);
    w.mgr.teardown_sprite("b")?;
    assert!(!b.netns_path.exists());
    assert_eq!(lookup(&a, "allowed.test")?.0, ResponseCode::NoError);
    Ok(())
}

#[test]
fn setup_is_idempotent_and_teardown_is_complete() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let t = Instant::now();
    let s1 = w.sprite("idem", &NetworkPolicy::unrestricted())?;
    let first = t.elapsed();
    let t = Instant::now();
    let s2 = w.mgr.setup_sprite("idem", None, &NetworkPolicy::unrestricted())?;
    let again = t.elapsed();
    eprintln!("setup: first {first:?}, repeated {again:?}");
    assert_eq!(s1, s2);

    // Persisted address: a second sprite asks for a specific one; a clash is refused.
    let want = w.mgr.config().subnet.nth(77).expect("in range");
    let s3 = w
        .mgr
        .setup_sprite("pinned", Some(want), &NetworkPolicy::unrestricted())?;
    w.sprites.push("pinned".into());
    assert_eq!(s3.addr, want);
    assert!(
        w.mgr
            .setup_sprite("clash", Some(want), &NetworkPolicy::unrestricted())
            .is_err()
    );

    // A crash leftover: the sprite's veth deleted behind our back; setup repairs it.
    std::process::Command::new("ip")
        .args(["link", "del", &s1.host_ifname])
        .status()?;
    let s4 = w
        .mgr
        .setup_sprite("idem", Some(s1.addr), &NetworkPolicy::unrestricted())?;
    assert_eq!(s4, s1);
    assert_eq!(lookup(&s4, "allowed.test")?.0, ResponseCode::NoError);

    // Teardown twice; everything is gone.
    w.mgr.teardown_sprite("idem")?;
    w.mgr.teardown_sprite("idem")?;
    assert!(!s1.netns_path.exists());
    let links = std::process::Command::new("ip").args(["-o", "link"]).output()?;
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&s1.host_ifname));

    // Leftovers of a sprite den no longer knows about are removed by name.
    let ghost_ns = w.mgr.netns_name("ghost");
    std::process::Command::new("ip")
        .args(["netns", "add", &ghost_ns])
        .status()?;
    let _g = NetnsGuard(ghost_ns.clone());
    let removed = w.mgr.cleanup_leftovers(&["pinned"])?;
    assert!(removed.contains(&ghost_ns), "{removed:?}");
    assert!(s3.netns_path.exists());

    // Time for a batch of setups (the number reported to the lead).
    let t = Instant::now();
    for i in 0..5 {
        let id = format!("bulk{i}");
        w.sprites.push(id.clone());
        w.mgr.setup_sprite(&id, None, &NetworkPolicy::unrestricted())?;
    }
    eprintln!("setup: {:?} per sprite (5 sprites)", t.elapsed() / 5);
    Ok(())
}
