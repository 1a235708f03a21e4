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

/// `prog args…` on the host; its stdout, or an error with its stderr.
fn run(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(prog).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sprite's network works end to end: the addresses are where they belong and a lookup
/// through the gateway is answered.
fn assert_plumbed(sp: &den_net::SpriteNet) -> anyhow::Result<()> {
    let host = run("ip", &["-o", "-4", "addr", "show", "dev", &sp.host_ifname])?;
    assert!(host.contains(&format!("inet {}/32", sp.gateway)), "{host}");
    let inside = run(
        "ip",
        &["-n", &sp.netns, "-o", "-4", "addr", "show", "dev", "eth0"],
    )?;
    assert!(inside.contains(&format!("inet {}/32", sp.addr)), "{inside}");
    let lo = run("ip", &["-n", &sp.netns, "-o", "link", "show", "lo"])?;
    assert!(lo.contains("UP"), "{lo}");
    let routes = run("ip", &["-n", &sp.netns, "-4", "route", "show"])?;
    assert!(
        routes.contains(&format!("default via {} dev eth0", sp.gateway)),
        "{routes}"
    );
    assert_eq!(lookup(sp, "allowed.test")?.0, ResponseCode::NoError);
    Ok(())
}

#[test]
fn setup_repairs_stale_netns_file_netns_without_veth_and_veth_without_address() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let open = NetworkPolicy::unrestricted();

    // A crash between creating /run/netns/<name> and bind-mounting the namespace onto it
    // leaves a plain file (`ip link add … netns <file>` then fails with "Invalid argument").
    let stale = w.mgr.netns_name("stale");
    std::fs::create_dir_all(netns::NETNS_DIR)?;
    std::fs::File::create(netns::netns_path(&stale))?;
    let _g1 = NetnsGuard(stale.clone());
    let sp = w.sprite("stale", &open)?;
    assert_plumbed(&sp)?;

    // A netns made, then a crash before its veth.
    let bare = w.mgr.netns_name("bare");
    run("ip", &["netns", "add", &bare])?;
    let _g2 = NetnsGuard(bare.clone());
    let sp = w.sprite("bare", &open)?;
    assert_plumbed(&sp)?;

    // The veth made, then a crash before its addresses and routes.
    let half = w.mgr.netns_name("half");
    let ifname = w.mgr.host_ifname("half");
    run("ip", &["netns", "add", &half])?;
    let _g3 = NetnsGuard(half.clone());
    run(
        "ip",
        &[
            "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &half,
        ],
    )?;
    let sp = w.sprite("half", &open)?;
    assert_plumbed(&sp)?;

    // And a sprite whose addresses are right keeps its veth (and so its connections).
    let index = |name: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"));
    let before = index(&ifname)?;
    let again = w.mgr.setup_sprite("half", Some(sp.addr), &open)?;
    assert_eq!(again, sp);
    assert_eq!(index(&ifname)?, before, "a healthy veth was rebuilt");
    Ok(())
}

#[test]
fn netns_made_in_process_is_an_ip_netns_and_teardown_unmounts_it() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let sp = w.sprite("seen", &NetworkPolicy::unrestricted())?;
    assert!(run("ip", &["netns", "list"])?.contains(&sp.netns));
    // `ip netns exec` joins it, and sees the sprite's end of the veth.
    let inside = run(
        "ip",
        &["netns", "exec", &sp.netns, "ip", "-o", "link", "show", "eth0"],
    )?;
    assert!(inside.contains("eth0"), "{inside}");

    w.mgr.teardown_sprite("seen")?;
    assert!(!sp.netns_path.exists());
    assert!(!run("ip", &["netns", "list"])?.contains(&sp.netns));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(&sp.netns_path.display().to_string()),
        "the netns is still mounted"
    );
    assert!(!run("ip", &["-o", "link"])?.contains(&sp.host_ifname));
    Ok(())
}

#[test]
fn teardown_of_a_sprite_that_never_existed_is_ok() -> anyhow::Result<()> {
    require_root!();
    let w = World::new()?;
    w.mgr.teardown_sprite("never-made")?;
    w.mgr.teardown_sprite("never-made")?;
    assert!(w.mgr.teardown_sprite("Not/Valid").is_err());
    Ok(())
}

#[test]
fn managers_with_different_prefixes_leave_each_other_alone() -> anyhow::Result<()> {
    require_root!();
    let mut w1 = World::new()?;
    let mut w2 = World::new()?;
    let open = NetworkPolicy::unrestricted();
    let a = w1.sprite("same", &open)?;
    let b = w2.sprite("same", &open)?;
    assert_ne!(a.netns, b.netns);
    assert_ne!(a.host_ifname, b.host_ifname);

    // Cleaning up everything of one manager removes its sprite only.
    let removed = w1.mgr.cleanup_leftovers(&[])?;
    assert!(
        removed.contains(&a.netns) && removed.contains(&a.host_ifname),
        "{removed:?}"
    );
    assert!(
        !removed.contains(&b.netns) && !removed.contains(&b.host_ifname),
        "{removed:?}"
    );
    assert!(!a.netns_path.exists());
    assert_plumbed(&b)?;

    // Tearing down a sprite of the same id in one manager leaves the other's.
    w1.mgr.setup_sprite("same", None, &open)?;
    w1.mgr.teardown_sprite("same")?;
    assert_plumbed(&b)?;
    Ok(())
}

/// Every boot and stop used to spawn `ip` six times (milliseconds each); now den-net speaks
/// netlink. The test runs itself again in a child whose PATH starts with an `ip` that logs
/// its calls (the test world still builds its fake internet with `ip`), and checks that
/// setting up, repairing, tearing down and cleaning up sprites adds nothing to the log.
#[test]
fn sprite_network_setup_and_teardown_spawn_no_ip() -> anyhow::Result<()> {
    require_root!();
    const LOG: &str = "DEN_NET_TEST_IP_LOG";
    if let Some(log) = std::env::var_os(LOG) {
        let mut w = World::new()?;
        let before = std::fs::read_to_string(&log).unwrap_or_default();
        let open = NetworkPolicy::unrestricted();
        let sp = w.sprite("noip", &open)?;
        w.mgr.setup_sprite("noip", Some(sp.addr), &open)?;
        w.mgr.teardown_sprite("noip")?;
        w.sprite("noip2", &open)?;
        w.mgr.cleanup_leftovers(&[])?;
        let after = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(after, before, "den-net ran `ip`");
        return Ok(());
    }
    let path = std::env::var("PATH")?;
    let real = std::env::split_paths(&path)
        .map(|d| d.join("ip"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("no ip in PATH"))?;
    let dir = tempfile::tempdir()?;
    let wrapper = dir.path().join("ip");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> \"${LOG}\"\nexec {} \"$@\"\n",
            real.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "sprite_network_setup_and_teardown_spawn_no_ip",
            "--nocapture",
        ])
        .env("PATH", format!("{}:{path}", dir.path().display()))
        .env(LOG, dir.path().join("log"))
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    // The wrapper did run (for the fake internet), so a call from den-net would have shown.
    assert!(std::fs::read_to_string(dir.path().join("log"))?.contains("netns add"));
    Ok(())
}

/// The rules (with their kernel handles) that mention `ifname`, from `nft -a`.
fn rules_of(w: &World, ifname: &str) -> anyhow::Result<Vec<String>> {
    let table = run("nft", &["-a", "list", "table", "inet", &w.mgr.config().table])?;
    Ok(table
        .lines()
        .filter(|l| l.contains(ifname) && l.contains("# handle"))
        .map(|l| l.trim().to_string())
        .collect())
}

/// A boot used to re-render every sprite's rules (a whole-table transaction whose cost grew
/// with the number of sprites: 28 ms with one, 308 ms with a thousand). Now setup, policy
/// change and teardown of one sprite leave the other sprites' rules as they are, down to
/// their kernel handles.
#[test]
fn one_sprites_changes_leave_other_sprites_rules_untouched() -> anyhow::Result<()> {
    require_root!();
    let mut w = World::new()?;
    let restricted =
        policy(r#"{"rules":[{"domain":"allowed.test","action":"allow"},{"domain":"*","action":"deny"}]}"#);
    let a = w.sprite("keep", &restricted)?;
    let before = rules_of(&w, &a.host_ifname)?;
    assert!(!before.is_empty());

    let t = Instant::now();
    let b = w.sprite("other", &NetworkPolicy::unrestricted())?;
    let setup = t.elapsed();
    w.mgr.set_policy("other", &restricted)?;
    let t = Instant::now();
    w.mgr.teardown_sprite("other")?;
    let teardown = t.elapsed();
    eprintln!("setup {setup:?}, teardown {teardown:?} (with another sprite up)");
    assert_eq!(rules_of(&w, &a.host_ifname)?, before);
    assert!(
        rules_of(&w, &b.host_ifname)?.is_empty(),
        "the torn down sprite's rules stay"
    );

    // And the untouched sprite still works, policy included.
    assert_plumbed(&a)?;
    assert!(connect_from(&a.netns, SocketAddrV4::new(w.inet.allowed_ip, 80))?.is_ok());
    assert!(connect_from(&a.netns, SocketAddrV4::new(w.inet.denied_ip, 80))?.is_err());
    Ok(())
}
