//! A fake internet for sprite networking tests, and a unique, trapped [`NetConfig`] per test.
//!
//! # Why
//!
//! Egress tests need "the internet": a DNS server that answers names, and hosts to connect
//! to. A test must never send traffic to a real address, though — not to the machine's
//! network, not to a cloud metadata service, not to the actual internet — whatever bug the
//! code under test has. So tests only ever talk to loopback or to namespaces they create
//! themselves, and this module provides both halves of that guarantee:
//!
//! * [`FakeInternet`]: a network namespace standing in for the internet, reached through a
//!   veth from the host, with a DNS server (`allowed.test`, `denied.test`) and TCP greeters.
//! * [`TestNet`]: a fake internet plus a [`NetConfig`] that points the sprites' uplink and
//!   upstream DNS at it, with its own subnet, nft table, interface and netns prefixes (so
//!   tests run side by side, in one process or several), and a *trap*: an nft table that
//!   drops anything forwarded from the test's sprite interfaces to any interface but the
//!   fake internet's. Even if den's own firewall let something through, it goes nowhere.
//!
//! Everything is removed on drop (guards), also when a test fails or panics.
//!
//! den-net's integration tests build their `NetManager` on a [`TestNet`]; den-sprite's
//! tests hand [`TestNet::config`] to the sprite manager, which creates the `NetManager`.
//!
//! Needs root (netns, veths, nftables) and the `ip` and `nft` tools.

use std::hash::{BuildHasher, RandomState};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use den_net::{Ipv4Net, NetConfig, netns};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The response code the lookup helpers return (so users need no hickory-proto dependency).
pub use hickory_proto::op::ResponseCode;

/// Connect, read and write timeout of the client helpers here.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A random-enough number for unique names (not cryptographic).
pub fn rand_u32() -> u32 {
    RandomState::new().hash_one((std::process::id(), Instant::now())) as u32
}

fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `nft -f -` with `script` on stdin.
pub fn nft_stdin(script: &str) -> Result<()> {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = c.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Deletes a netns on drop.
pub struct NetnsGuard(pub String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.0]);
    }
}

/// Deletes a link on drop (a veth takes its peer with it).
pub struct LinkGuard(pub String);
impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.0]);
    }
}

/// Deletes an nft table (family `inet`) on drop.
pub struct TableGuard(pub String);
impl Drop for TableGuard {
    fn drop(&mut self) {
        let _ = sh("nft", &["delete", "table", "inet", &self.0]);
    }
}

/// A server thread, stopped on drop: set the flag, then poke the blocking call awake.
pub struct Server {
    stop: Arc<AtomicBool>,
    wake: Box<dyn Fn() + Send>,
    thread: Option<JoinHandle<()>>,
}
impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        (self.wake)();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A netns standing in for the internet: `10.99.N.2` runs DNS on :53 and a TCP greeter on
/// :80; `10.99.N.3` runs a TCP greeter on :80. The host reaches it via `10.99.N.1` on
/// [`host_if`](Self::host_if). The DNS server answers `allowed.test` with
/// [`allowed_ip`](Self::allowed_ip), `denied.test` with [`denied_ip`](Self::denied_ip)
/// (A, TTL 300) and NXDOMAIN for anything else, with two families of names for abuse tests:
/// `<label>.silent.test` is never answered (an upstream that drops queries), and
/// `<label>.many.test` gets an address of its own ([`many_test_ip`]). Greeters say
/// `hello from <ip>\n`, then echo.
pub struct FakeInternet {
    _servers: Vec<Server>,
    /// The netns name.
    pub ns: String,
    /// Host end of the veth into the netns.
    pub host_if: String,
    pub dns: SocketAddr,
    pub allowed_ip: Ipv4Addr,
    pub denied_ip: Ipv4Addr,
    // Dropped last: the link, then the netns.
    _link: LinkGuard,
    _ns: NetnsGuard,
}

impl FakeInternet {
    /// Creates netns `inet-<tag>` and host interface `ti<tag>` (so `tag` is at most 13
    /// bytes), on `10.99.n.0/24`. Both must be unique among concurrently running tests.
    pub fn new(n: u8, tag: &str) -> Result<Self> {
        let ns = format!("inet-{tag}");
        let host_if = format!("ti{tag}");
        sh("ip", &["netns", "add", &ns])?;
        let ns_guard = NetnsGuard(ns.clone());
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        let link_guard = LinkGuard(host_if.clone());
        let host_ip = format!("10.99.{n}.1/24");
        sh("ip", &["addr", "add", &host_ip, "dev", &host_if])?;
        sh("ip", &["link", "set", &host_if, "up"])?;
        for a in [format!("10.99.{n}.2/24"), format!("10.99.{n}.3/24")] {
            sh("ip", &["-n", &ns, "addr", "add", &a, "dev", "eth0"])?;
        }
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;

        let allowed_ip = Ipv4Addr::new(10, 99, n, 2);
        let denied_ip = Ipv4Addr::new(10, 99, n, 3);
        let dns = SocketAddr::from((allowed_ip, 53));
        let mut servers = Vec::new();
        servers.push(dns_server(&ns, dns, allowed_ip, denied_ip)?);
        for ip in [allowed_ip, denied_ip] {
            servers.push(greeter(&ns, SocketAddr::from((ip, 80)))?);
        }
        Ok(FakeInternet {
            _servers: servers,
            ns,
            host_if,
            dns,
            allowed_ip,
            denied_ip,
            _link: link_guard,
            _ns: ns_guard,
        })
    }
}

/// The address the fake internet's DNS server gives `n<k>.many.test` (`198.18.0.0` + k, in
/// the benchmarking range, which nothing answers); other labels get a hashed one there.
pub fn many_test_ip(label: &str) -> Ipv4Addr {
    let k = label
        .strip_prefix('n')
        .and_then(|d| d.parse::<u32>().ok())
        .unwrap_or_else(|| {
            // FNV-1a: the same label always gets the same address.
            label.bytes().fold(0x811c_9dc5_u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            })
        });
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (k % (1 << 17)))
}

/// Answers `allowed.test` and `denied.test` (A, TTL 300), never answers `*.silent.test`,
/// answers `n<k>.many.test` with [`many_test_ip`], and NXDOMAIN for the rest.
fn dns_server(ns: &str, addr: SocketAddr, allowed: Ipv4Addr, denied: Ipv4Addr) -> Result<Server> {
    let sock = netns::run_in(ns, move || UdpSocket::bind(addr))??;
    let waker: OwnedFd = sock.try_clone()?.into();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !s2.load(Ordering::SeqCst) {
            let Ok((n, src)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if n == 0 {
                // Shut down (or an empty datagram): re-check the stop flag.
                continue;
            }
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.queries = q.queries.clone();
            if let Some(query) = q.queries.first() {
                let name = query.name().to_ascii().to_ascii_lowercase();
                let name = name.trim_end_matches('.');
                if name.ends_with(".silent.test") {
                    continue;
                }
                let ip = match name {
                    "allowed.test" => Some(allowed),
                    "denied.test" => Some(denied),
                    _ => name.strip_suffix(".many.test").map(many_test_ip),
                };
                match (ip, query.query_type()) {
                    (Some(ip), RecordType::A) => {
                        r.answers
                            .push(Record::from_rdata(query.name().clone(), 300, RData::A(A(ip))));
                    }
                    (Some(_), _) => {}
                    (None, _) => r.metadata.response_code = ResponseCode::NXDomain,
                }
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = sock.send_to(&bytes, src);
            }
        }
    });
    Ok(Server {
        stop,
        wake: shutdown_waker(waker),
        thread: Some(thread),
    })
}

/// `shutdown(2)` on a listening or UDP socket wakes a thread blocked in accept/recv on it,
/// whatever netns it lives in (a wake-up connection can't reach a torn-down netns).
fn shutdown_waker(fd: OwnedFd) -> Box<dyn Fn() + Send> {
    Box::new(move || {
        let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    })
}

/// A TCP greeter on `addr` inside netns `ns`: says `hello from <ip>\n`, then echoes lines
/// back.
pub fn greeter(ns: &str, addr: SocketAddr) -> Result<Server> {
    let l = netns::run_in(ns, move || TcpListener::bind(addr))??;
    Ok(tcp_server(l, addr))
}

/// Serve a greeter on an already bound listener (created in whatever netns).
pub fn tcp_server_on(l: TcpListener) -> Server {
    let addr = l.local_addr().expect("bound");
    tcp_server(l, addr)
}

fn tcp_server(l: TcpListener, addr: SocketAddr) -> Server {
    let waker: OwnedFd = l.try_clone().expect("dup listener").into();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        for conn in l.incoming() {
            if s2.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut c) = conn else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                // One write, so the client reads the whole line at once.
                let _ = c.write_all(format!("hello from {}\n", addr.ip()).as_bytes());
                let mut buf = [0u8; 256];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Server {
        stop,
        wake: shutdown_waker(waker),
        thread: Some(thread),
    }
}

/// A unique network sandbox for one test: fake internet + a NetConfig (own subnet, table,
/// prefixes, uplink = the fake internet, blocked = only 169.254/16 and 127/8 and the host's
/// networks but the fake internet's) + the trap
/// table. Dropping it removes the fake internet and the trap (the NetManager's own table is
/// removed by whoever owns the NetManager).
///
/// The trap is a table `trap<tag>` with a forward-hook chain that drops anything coming in
/// on an interface named `<config.ifprefix>*` (the sprites' host-side veths) and going out
/// of any interface but the fake internet's, so a firewall bug can never leak test traffic
/// to a real address.
pub struct TestNet {
    pub inet: FakeInternet,
    /// Upstream DNS = the fake internet's; `ifprefix`, `table`, `netns_prefix` and `subnet`
    /// unique to this `TestNet`.
    pub config: NetConfig,
    /// Unique per test and run; part of every name created here.
    pub tag: String,
    _trap: TableGuard,
    /// This test's claim on its address slot, held until it is dropped.
    _slot: SlotClaim,
}

static NEXT: AtomicU8 = AtomicU8::new(0);

/// Address slots: slot `k` is the fake internet `10.99.k.0/24` and den's
/// subnet `10.(100 + k % 100).(16 * (k / 100)).0/20`, distinct for every k.
const SLOTS: u32 = 250;
/// Where concurrently running tests (of every process, every checkout)
/// claim their slots.
const SLOT_DIR: &str = "/run/den-testkit";

/// An exclusive `flock` on a slot's file: two tests running at once, in any
/// process, never share addresses (random picks did, now and then: "bind
/// DNS forwarder …: Address already in use"). The kernel drops the lock when
/// the holder exits, however it exits.
struct SlotClaim {
    slot: u8,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl SlotClaim {
    fn take(start: u32) -> Result<SlotClaim> {
        std::fs::create_dir_all(SLOT_DIR)?;
        for k in (0..SLOTS).map(|j| (start + j) % SLOTS) {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(format!("{SLOT_DIR}/slot-{k}.lock"))?;
            if let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                return Ok(SlotClaim {
                    slot: k as u8,
                    _lock: lock,
                });
            }
        }
        anyhow::bail!("all {SLOTS} test network slots are taken by running tests")
    }
}

impl TestNet {
    pub fn new() -> Result<TestNet> {
        let i = NEXT.fetch_add(1, Ordering::SeqCst);
        let r = rand_u32();
        // Unique per test (i) and per run (r), within the 15-byte interface name limit.
        let tag = format!("{:04x}{i}", r & 0xffff);
        let slot = SlotClaim::take(r)?;
        let n = slot.slot;
        let inet = FakeInternet::new(n, &tag)?;

        let prefix = format!("t{:03x}{i}", (r >> 16) & 0xfff);
        let mut cfg = NetConfig::new(inet.dns);
        cfg.subnet = Ipv4Net::new(Ipv4Addr::new(10, 100 + n % 100, 16 * (n / 100), 0), 20).expect("valid");
        cfg.table = format!("dent{tag}");
        cfg.ifprefix = prefix.clone();
        cfg.netns_prefix = format!("dent{tag}-");
        cfg.uplinks = vec![inet.host_if.clone()];
        // The fake internet lives in 10/8, which production blocks as private.
        cfg.blocked = vec![
            "169.254.0.0/16".parse().expect("literal"),
            "127.0.0.0/8".parse().expect("literal"),
        ];
        // The fake internet is a network attached to the host, which den blocks by default.
        cfg.allowed_host_networks = vec![Ipv4Net::new(Ipv4Addr::new(10, 99, n, 0), 24).expect("valid")];

        let trap = format!("trap{tag}");
        let trap_guard = TableGuard(trap.clone());
        let script = format!(
            "table inet {trap} {{\n chain safety {{ type filter hook forward priority 100; policy accept;\n  iifname \"{prefix}*\" oifname != \"{}\" counter drop\n }}\n}}\n",
            inet.host_if
        );
        nft_stdin(&script)?;

        Ok(TestNet {
            inet,
            config: cfg,
            tag,
            _trap: trap_guard,
            _slot: slot,
        })
    }
}

/// Open a TCP connection from inside netns `ns` (connect, read and write bounded by
/// [`IO_TIMEOUT`]). The outer error is entering the netns, the inner one the connection.
pub fn connect_from(ns: &str, addr: SocketAddrV4) -> Result<std::io::Result<TcpStream>> {
    Ok(netns::run_in(ns, move || {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    })?)
}

/// Read the greeting line of a greeter connection (without the newline).
pub fn greeting(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Resolve `name` (A) over UDP from inside netns `ns`, asking `server`, waiting
/// [`IO_TIMEOUT`]. Returns the response code and the A records.
pub fn lookup_in(ns: &str, server: SocketAddrV4, name: &str) -> Result<(ResponseCode, Vec<Ipv4Addr>)> {
    lookup_in_from(ns, server, Ipv4Addr::UNSPECIFIED, name, IO_TIMEOUT)
}

/// [`lookup_in`] with the source address and the wait chosen by the caller.
pub fn lookup_in_from(
    ns: &str,
    server: SocketAddrV4,
    src: Ipv4Addr,
    name: &str,
    wait: Duration,
) -> Result<(ResponseCode, Vec<Ipv4Addr>)> {
    let name = name.to_string();
    netns::run_in(ns, move || -> Result<_> {
        let s = UdpSocket::bind((src, 0))?;
        s.set_read_timeout(Some(wait))?;
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(&name)?, RecordType::A));
        s.send_to(&q.to_vec()?, server)?;
        let mut buf = [0u8; 1500];
        let (n, _) = s.recv_from(&mut buf)?;
        let r = Message::from_vec(&buf[..n])?;
        anyhow::ensure!(r.metadata.message_type == MessageType::Response);
        anyhow::ensure!(r.metadata.id == q.metadata.id);
        Ok((r.metadata.response_code, a_records(&r)))
    })?
}

/// Resolve `name` (A) over DNS-over-TCP from inside netns `ns`, asking `server`.
pub fn lookup_tcp_in(ns: &str, server: SocketAddrV4, name: &str) -> Result<(ResponseCode, Vec<Ipv4Addr>)> {
    let server = SocketAddr::V4(server);
    let name = name.to_string();
    netns::run_in(ns, move || -> Result<_> {
        let mut c = TcpStream::connect_timeout(&server, IO_TIMEOUT)?;
        c.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(&name)?, RecordType::A));
        let bytes = q.to_vec()?;
        let mut framed = u16::try_from(bytes.len())?.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        c.write_all(&framed)?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        c.read_exact(&mut buf)?;
        let r = Message::from_vec(&buf)?;
        anyhow::ensure!(r.metadata.id == q.metadata.id);
        Ok((r.metadata.response_code, a_records(&r)))
    })?
}

fn a_records(r: &Message) -> Vec<Ipv4Addr> {
    r.answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
