//! Abuse tests of sprite networking, as root: a sprite attacks what den shares between
//! sprites (the DNS forwarder, the firewall), and the test measures what *another* sprite
//! sees. Traffic only goes to namespaces the test creates (and to den's own forwarder on the
//! sprites' gateway); every loop is bounded in time and count.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
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
