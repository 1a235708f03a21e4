//! Abuse tests of sprite networking, as root: a sprite attacks what den shares between
//! sprites (the DNS forwarder, the firewall), and the test measures what *another* sprite
//! sees. Traffic only goes to namespaces the test creates (and to den's own forwarder on the
//! sprites' gateway); every loop is bounded in time and count.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use den_net::{NetworkPolicy, SpriteNet, netns};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return Ok(());
        }
    };
}

/// The tests here measure latency under an attack that loads the CPU: one at a time, so
/// that one test's attack is not another's noise.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// File handles open in this process, which runs den's forwarder.
fn open_fds() -> anyhow::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

fn query_bytes(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    Ok(q.to_vec()?)
}

/// Lookups of `name` from inside `sp`'s netns, one every `every` until `stop`: each one's
/// latency (a lost one counts as `wait`), response code and A records.
type Sample = (Duration, Option<(ResponseCode, Vec<Ipv4Addr>)>);

fn sample_lookups(
    sp: &SpriteNet,
    name: &str,
    every: Duration,
    wait: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<Vec<Sample>>> {
    let (ns, dns, name) = (sp.netns.clone(), sp.dns, name.to_string());
    std::thread::spawn(move || {
        netns::run_in(&ns, move || -> anyhow::Result<Vec<Sample>> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(dns)?;
            let mut out = Vec::new();
            let mut buf = [0u8; 1500];
            // Bounded: the caller stops us; 10,000 samples is far more than it waits for.
            for id in 0..10_000u16 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                s.send(&query_bytes(id, &name)?)?;
                let deadline = t + wait;
                let mut got = None;
                while got.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s.set_read_timeout(Some(left))?;
                    let Ok(n) = s.recv(&mut buf) else { break };
                    let Ok(r) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    if r.metadata.id == id {
                        let ips = r
                            .answers
                            .iter()
                            .filter_map(|rec| match &rec.data {
                                RData::A(a) => Some(a.0),
                                _ => None,
                            })
                            .collect();
                        got = Some((r.metadata.response_code, ips));
                    }
                }
                out.push((t.elapsed().min(wait), got));
                // The bystander's own request rate (a busy but ordinary client), not a wait
                // for anything.
                std::thread::sleep(every);
            }
            Ok(out)
        })?
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One sprite floods its resolver, as fast as one thread can send, with queries for names
/// the upstream never answers (each would wait the full upstream timeout). Another sprite's
/// lookups must stay fast and correct, and den's open file count must not move: the
/// forwarder bounds each sprite's rate and pending queries and shares a few upstream
/// sockets, instead of a task and a socket per datagram.
#[test]
fn abuse_dns_flood_does_not_slow_other_sprites() -> anyhow::Result<()> {
    require_root!();
    let _serial = one_at_a_time();
    const FLOOD_FOR: Duration = Duration::from_secs(3);
    const MAX_FLOOD: u64 = 3_000_000;

    let mut w = World::new()?;
    let flooder = w.sprite("flood", &NetworkPolicy::unrestricted())?;
    let calm = w.sprite("calm", &NetworkPolicy::unrestricted())?;
    assert_eq!(
        lookup(&calm, "allowed.test")?,
        (ResponseCode::NoError, vec![w.inet.allowed_ip])
    );
    let fds_before = open_fds()?;

    let stop = Arc::new(AtomicBool::new(false));
    let samples = sample_lookups(
        &calm,
        "allowed.test",
        Duration::from_millis(10),
        Duration::from_secs(1),
        stop.clone(),
    );
    let (ns, dns) = (flooder.netns.clone(), flooder.dns);
    let flood = std::thread::spawn(move || {
        netns::run_in(&ns, move || -> anyhow::Result<u64> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::V4(dns))?;
            s.set_nonblocking(true)?;
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < MAX_FLOOD && (!sent.is_multiple_of(256) || start.elapsed() < FLOOD_FOR) {
                let q = query_bytes(sent as u16, &format!("f{sent}.silent.test"))?;
                // A full socket buffer (EAGAIN) counts too: the flood is as fast as the
                // kernel takes it.
                let _ = s.send(&q);
                sent += 1;
            }
            Ok(sent)
        })?
    });

    // Watch den's file handles while the flood lasts.
    let mut max_fds = fds_before;
    while !flood.is_finished() {
        max_fds = max_fds.max(open_fds()?);
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = flood.join().expect("flood thread")?;
    // The flood's queries wait for the upstream timeout: watch a little longer.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        max_fds = max_fds.max(open_fds()?);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let samples = samples.join().expect("sampler thread")?;

    let mut lat: Vec<Duration> = samples.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let failed = samples
        .iter()
        .filter(|(_, r)| r.as_ref() != Some(&(ResponseCode::NoError, vec![w.inet.allowed_ip])))
        .count();
    eprintln!(
        "flood: {sent} queries in {FLOOD_FOR:?}; bystander: {} lookups, {failed} failed, p50 {p50:?}, \
         p99 {p99:?}, max {:?}; den fds {fds_before} -> max {max_fds}",
        samples.len(),
        lat.last().expect("samples")
    );
    assert!(sent > 20_000, "the flood was too weak to test anything: {sent}");
    assert!(
        samples.len() >= 50,
        "too few bystander lookups: {}",
        samples.len()
    );
    assert_eq!(failed, 0, "bystander lookups failed under the flood");
    assert!(p50 < Duration::from_millis(10), "bystander p50 {p50:?}");
    assert!(p99 < Duration::from_millis(50), "bystander p99 {p99:?}");
    assert!(
        max_fds < fds_before + 100,
        "den's open files went from {fds_before} to {max_fds}"
    );

    // The flooder itself resolves again once its flood is over: its rate refills at once,
    // its pending slots when the last flood queries time out upstream.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = lookup(&flooder, "allowed.test")?;
        if r == (ResponseCode::NoError, vec![w.inet.allowed_ip]) {
            break;
        }
        assert_eq!(r.0, ResponseCode::ServFail, "{r:?}");
        assert!(Instant::now() < deadline, "the flooder never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Elements in a sprite's set of learned addresses, as the kernel has them.
fn kernel_learned(w: &World, sp: &SpriteNet) -> anyhow::Result<usize> {
    let out = std::process::Command::new("nft")
        .args([
            "list",
            "set",
            "inet",
            &w.mgr.config().table,
            &format!("allow_{}", sp.host_ifname),
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).matches(" expires ").count())
}

/// A sprite allowed `*.many.test` resolves thousands of unique names, each answered with an
/// address of its own. Its learned addresses stay within the cap (in den and in the
/// kernel), another sprite's lookups (which learn too) stay fast, and so does a new
/// sprite's network setup: learning is batched into few nft transactions that run outside
/// the state lock, and a re-render no longer rewrites every learned address.
#[test]
fn abuse_learned_address_flood_is_capped_and_does_not_slow_others() -> anyhow::Result<()> {
    require_root!();
    let _serial = one_at_a_time();
    const NAMES: u32 = 3000;
    const WINDOW: u32 = 64;
    const CAP: usize = 500;

    let mut w = World::with_config(|c| {
        c.max_learned = CAP;
        // The attack here is learning, not the query rate: let every query through.
        c.dns_limits.rate = 1_000_000;
        c.dns_limits.burst = 1_000_000;
    })?;
    let many =
        policy(r#"{"rules":[{"domain":"*.many.test","action":"allow"},{"domain":"*","action":"deny"}]}"#);
    let greedy = w.sprite("greedy", &many)?;
    let calm = w.sprite("calm", &many)?;

    // The bystander resolves new names too, so each of its lookups has to reach nft.
    let stop = Arc::new(AtomicBool::new(false));
    let (ns, dns, stop2) = (calm.netns.clone(), calm.dns, stop.clone());
    let bystander = std::thread::spawn(move || {
        netns::run_in(&ns, move || -> anyhow::Result<Vec<Sample>> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(dns)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 1500];
            for id in 0..2_000u16 {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                s.send(&query_bytes(id, &format!("calm{id}.many.test"))?)?;
                let got = loop {
                    let Ok(n) = s.recv(&mut buf) else { break None };
                    let r = Message::from_vec(&buf[..n])?;
                    if r.metadata.id == id {
                        let ips = r
                            .answers
                            .iter()
                            .filter_map(|rec| match &rec.data {
                                RData::A(a) => Some(a.0),
                                _ => None,
                            })
                            .collect();
                        break Some((r.metadata.response_code, ips));
                    }
                };
                out.push((t.elapsed(), got));
                // The bystander's own request rate, not a wait for anything. Fast
                // enough for 20+ samples while the flood lasts: with nft applied in
                // process, 3,000 answers take a few hundred milliseconds.
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(out)
        })?
    });

    let (ns, dns) = (greedy.netns.clone(), greedy.dns);
    let flood = std::thread::spawn(move || {
        netns::run_in(&ns, move || -> anyhow::Result<u32> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(SocketAddr::V4(dns))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 1500];
            let mut answered = 0;
            // Windows of queries in flight, each window's answers read before the next.
            for start in (0..NAMES).step_by(WINDOW as usize) {
                let end = (start + WINDOW).min(NAMES);
                for k in start..end {
                    s.send(&query_bytes(k as u16, &format!("n{k}.many.test"))?)?;
                }
                for _ in start..end {
                    let Ok(n) = s.recv(&mut buf) else { break };
                    let r = Message::from_vec(&buf[..n])?;
                    if r.metadata.response_code == ResponseCode::NoError && !r.answers.is_empty() {
                        answered += 1;
                    }
                }
            }
            Ok(answered)
        })?
    });

    // A new sprite's network setup while the flood is under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.mgr.learned("greedy").len() < CAP / 2 {
        anyhow::ensure!(Instant::now() < deadline, "the flood learned nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let late = w.sprite("late", &many)?;
    let setup = t.elapsed();
    let late_lookup = lookup(&late, "late.many.test")?;

    let answered = flood.join().expect("flood thread")?;
    stop.store(true, Ordering::SeqCst);
    let samples = bystander.join().expect("bystander thread")?;

    let mut lat: Vec<Duration> = samples.iter().map(|(d, _)| *d).collect();
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let failed = samples
        .iter()
        .filter(|(_, r)| !matches!(r, Some((ResponseCode::NoError, ips)) if ips.len() == 1))
        .count();
    let (learned, in_kernel) = (w.mgr.learned("greedy").len(), kernel_learned(&w, &greedy)?);
    eprintln!(
        "learned flood: {answered}/{NAMES} answered; greedy learned {learned} (kernel {in_kernel}), cap \
         {CAP}; bystander: {} lookups, {failed} failed, p50 {p50:?}, p99 {p99:?}; new sprite setup \
         {setup:?}",
        samples.len()
    );
    assert!(
        answered >= NAMES * 9 / 10,
        "the flood was not answered: {answered}"
    );
    assert!(learned <= CAP, "greedy learned {learned} addresses, cap {CAP}");
    assert!(
        in_kernel <= CAP,
        "greedy's kernel set has {in_kernel} addresses, cap {CAP}"
    );
    assert!(
        samples.len() >= 20,
        "too few bystander lookups: {}",
        samples.len()
    );
    assert_eq!(failed, 0, "bystander lookups failed under the flood");
    assert!(p50 < Duration::from_millis(100), "bystander p50 {p50:?}");
    assert!(p99 < Duration::from_millis(500), "bystander p99 {p99:?}");
    assert!(setup < Duration::from_secs(1), "new sprite setup took {setup:?}");
    assert_eq!(late_lookup.0, ResponseCode::NoError);
    // The newest learned address works: the sprite can still reach what it just resolved.
    let last = den_testkit::net::many_test_ip(&format!("n{}", NAMES - 1));
    assert!(w.mgr.learned("greedy").contains(&last));
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The host's LAN, as a test builds it: a veth from the host (`10.97.n.1/24`) into a netns
/// of the test's (`10.97.n.2`, with a greeter on :80). Removed on drop.
struct Lan {
    _server: den_testkit::net::Server,
    host_ip: Ipv4Addr,
    peer: Ipv4Addr,
    _link: den_testkit::net::LinkGuard,
    _ns: den_testkit::net::NetnsGuard,
}

fn lan(tag: &str) -> anyhow::Result<Lan> {
    let n = (den_testkit::net::rand_u32() % 250) as u8 + 1;
    let (ns, ifname) = (format!("lan-{tag}"), format!("tl{tag}"));
    ip(&["netns", "add", &ns])?;
    let ns_guard = den_testkit::net::NetnsGuard(ns.clone());
    ip(&[
        "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    let link_guard = den_testkit::net::LinkGuard(ifname.clone());
    let (host_ip, peer) = (Ipv4Addr::new(10, 97, n, 1), Ipv4Addr::new(10, 97, n, 2));
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &ifname])?;
    ip(&["link", "set", &ifname, "up"])?;
    ip(&["-n", &ns, "addr", "add", &format!("{peer}/24"), "dev", "eth0"])?;
    ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    let server = den_testkit::net::greeter(&ns, SocketAddr::from((peer, 80)))?;
    Ok(Lan {
        _server: server,
        host_ip,
        peer,
        _link: link_guard,
        _ns: ns_guard,
    })
}

/// The host's own networks (its LAN) and addresses are not in the configured blocked list
/// (the test's list is only 169.254/16 and 127/8), yet an unrestricted sprite can reach
/// neither: den blocks every network attached to a host interface, and the host's
/// addresses, except those the operator allowed (here the fake internet, which the sprite
/// still reaches). The refusal must come from den's firewall (a reset); the test's trap
/// table would only drop the packets silently.
#[test]
fn abuse_sprite_cannot_reach_host_networks() -> anyhow::Result<()> {
    require_root!();
    let _serial = one_at_a_time();
    let mut w = World::new()?;
    let lan = lan(&w.tag)?;
    let sp = w.sprite("probe", &NetworkPolicy::unrestricted())?;

    // A host service on every address (the LAN address included).
    let any = TcpListener::bind("0.0.0.0:0")?;
    let port = any.local_addr()?.port();
    let _host_service = den_testkit::net::tcp_server_on(any);
    let o = w.inet.allowed_ip.octets();
    let uplink_host = Ipv4Addr::new(o[0], o[1], o[2], 1);

    for (what, dst) in [
        ("a machine on the host's LAN", SocketAddrV4::new(lan.peer, 80)),
        ("the host's LAN address", SocketAddrV4::new(lan.host_ip, port)),
        (
            "the host's address on the (allowed) uplink",
            SocketAddrV4::new(uplink_host, port),
        ),
    ] {
        let t = Instant::now();
        let r = connect_from(&sp.netns, dst)?;
        let e = r.err().unwrap_or_else(|| panic!("sprite reached {what} ({dst})"));
        assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "{what} ({dst}): {e} after {:?}",
            t.elapsed()
        );
    }

    // What is allowed still works: the (fake) internet, and DNS on the gateway.
    let mut c = connect_from(&sp.netns, SocketAddrV4::new(w.inet.allowed_ip, 80))?
        .expect("the internet stays reachable");
    assert!(greeting(&mut c)?.starts_with("hello"));
    assert_eq!(lookup(&sp, "allowed.test")?.0, ResponseCode::NoError);
    Ok(())
}

/// A sprite opens hundreds of DNS-over-TCP connections to its resolver and keeps them
/// open. den keeps at most its per-sprite share of them (the rest are closed on accept), so
/// its file handles stay bounded, and another sprite's TCP lookups still work.
#[test]
fn abuse_dns_tcp_connection_flood_is_capped() -> anyhow::Result<()> {
    require_root!();
    let _serial = one_at_a_time();
    const CONNS: usize = 200;
    let mut w = World::new()?;
    let per_sprite = w.mgr.config().dns_limits.tcp_per_sprite;
    let flooder = w.sprite("tcpflood", &NetworkPolicy::unrestricted())?;
    let calm = w.sprite("calm", &NetworkPolicy::unrestricted())?;
    assert_eq!(lookup_tcp(&calm, "allowed.test")?.0, ResponseCode::NoError);
    let fds_before = open_fds()?;

    let dns = SocketAddr::V4(flooder.dns);
    let conns = netns::run_in(
        &flooder.netns,
        move || -> anyhow::Result<Vec<std::net::TcpStream>> {
            (0..CONNS)
                .map(|_| {
                    Ok(std::net::TcpStream::connect_timeout(
                        &dns,
                        Duration::from_secs(5),
                    )?)
                })
                .collect()
        },
    )??;
    // den accepts in the background: watch its file handles for a while.
    let mut max_fds = fds_before;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        max_fds = max_fds.max(open_fds()?);
        std::thread::sleep(Duration::from_millis(20));
    }
    let tcp = lookup_tcp(&calm, "allowed.test")?;
    // The test holds the client ends itself; what den holds is the rest.
    let dens = max_fds.saturating_sub(fds_before + conns.len());
    eprintln!(
        "tcp flood: {} connections held by the sprite; den's share of fds: {dens}",
        conns.len()
    );
    assert!(
        dens <= per_sprite + 10,
        "den holds {dens} fds for {CONNS} connections"
    );
    assert_eq!(tcp, (ResponseCode::NoError, vec![w.inet.allowed_ip]));
    Ok(())
}
