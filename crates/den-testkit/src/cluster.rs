//! Several "hosts" on one machine, and `den server` nodes running on them, for cluster tests.
//!
//! * [`Hosts`]: `n` network namespaces (the hosts), each with a veth into one bridge in the
//!   root namespace, on a private `10.250.X.0/24`: the root namespace is `.1`
//!   ([`Hosts::host_ip`]), host `i` is `.10+i` ([`Hosts::ip`]). Services the test runs in the
//!   root namespace (PostgreSQL via [`TestPostgres::listen_on_all`], S3 via
//!   [`SeaweedS3::start_on`]`(hosts.host_ip())`) are reached at `.1`; hosts reach each other
//!   directly over the bridge.
//! * [`DenNode`]: a `den server` child process inside one host's namespace, with its own data
//!   dir, run dir, nft table, subnet and interface/netns prefixes (netns names, mounts and
//!   cgroups are machine-wide, so nodes must not share them).
//! * [`http`]: a tiny HTTP client that runs in the root namespace or inside a host's.
//!
//! Traffic never leaves the machine: the hosts' default route points at the root namespace,
//! which does no NAT, gets no route added, and has a trap (an nft table) that drops anything
//! it would forward from the bridge to another interface or the other way round.
//!
//! Needs root and the `ip` and `nft` tools.
//!
//! [`TestPostgres::listen_on_all`]: crate::postgres::TestPostgres::listen_on_all
//! [`SeaweedS3::start_on`]: crate::SeaweedS3::start_on

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::net::{nft_stdin, rand_u32};
use crate::{spawn_from_spawner_thread, tail, wait_until};

/// Hosts per [`Hosts`]; node prefixes use one base-36 digit for the index.
pub const MAX_HOSTS: usize = 36;
const SUBNET_ATTEMPTS: usize = 50;
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The nft table (inside a host) of [`Hosts::block`].
const BLOCK_TABLE: &str = "dhblock";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command that must succeed; returns stdout.
fn sh(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {prog}"))?;
    ensure!(
        out.status.success(),
        "{prog} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `n` network namespaces on a bridge in the root namespace; see the module docs.
///
/// Drop kills every process left in the namespaces, then removes the namespaces, veths,
/// bridge and trap table (also when the test panicked).
#[derive(Debug)]
pub struct Hosts {
    tag: String,
    bridge: String,
    table: String,
    /// X of `10.250.X.0/24`.
    octet: u8,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

impl Hosts {
    /// Creates the bridge, the trap and `n` (1 to [`MAX_HOSTS`]) host namespaces.
    pub fn create(n: usize) -> Result<Hosts> {
        crate::require_root();
        ensure!(
            (1..=MAX_HOSTS).contains(&n),
            "Hosts::create({n}): 1 to {MAX_HOSTS} hosts"
        );
        // Unique per process (random) and per Hosts in the process (counter); 5 hex digits
        // keep every derived interface name within 15 bytes.
        let c = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:05x}", (rand_u32() << 4 | (c & 0xf)) & 0xf_ffff);
        let mut hosts = Hosts {
            bridge: format!("dh{tag}br"),
            table: format!("dh{tag}"),
            tag,
            octet: 0,
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        hosts.create_bridge()?;
        hosts.create_trap()?;
        for i in 0..n {
            hosts.add_host(i)?;
        }
        Ok(hosts)
    }

    fn create_bridge(&mut self) -> Result<()> {
        let br = self.bridge.clone();
        sh("ip", &["link", "add", &br, "type", "bridge"])?;
        // From here on Drop removes the bridge.
        self.octet = 0;
        for _ in 0..SUBNET_ATTEMPTS {
            let x = (rand_u32() % 254) as u8 + 1;
            let prefix = format!("10.250.{x}.");
            if subnet_users(&prefix)? > 0 {
                continue;
            }
            let cidr = format!("10.250.{x}.1/24");
            sh("ip", &["addr", "add", &cidr, "dev", &br])?;
            // Another test may have picked the same /24 at the same moment: whoever sees
            // a second user backs off and picks again.
            if subnet_users(&prefix)? == 1 {
                self.octet = x;
                break;
            }
            sh("ip", &["addr", "del", &cidr, "dev", &br])?;
        }
        ensure!(
            self.octet != 0,
            "no free 10.250.X.0/24 after {SUBNET_ATTEMPTS} tries"
        );
        sh("ip", &["link", "set", &br, "up"])?;
        Ok(())
    }

    /// Drops anything the root namespace would route between the bridge and another
    /// interface, whatever the machine's ip_forward setting: hosts talk to the root
    /// namespace and to each other (bridged, not routed), never further.
    fn create_trap(&self) -> Result<()> {
        let (t, br) = (&self.table, &self.bridge);
        nft_stdin(&format!(
            "table inet {t} {{\n chain trap {{ type filter hook forward priority -10; policy accept;\n  \
             iifname \"{br}\" oifname != \"{br}\" counter drop\n  \
             oifname \"{br}\" iifname != \"{br}\" counter drop\n }}\n}}\n"
        ))
        .context("create the trap table")
    }

    fn add_host(&mut self, i: usize) -> Result<()> {
        let ns = format!("dh{}-{i}", self.tag);
        let veth = format!("dh{}v{i}", self.tag);
        sh("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        sh(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        self.veths.push(veth.clone());
        sh("ip", &["link", "set", &veth, "master", &self.bridge])?;
        sh("ip", &["link", "set", &veth, "up"])?;
        let addr = format!("{}/24", self.ip(i));
        sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        let gw = self.host_ip().to_string();
        sh("ip", &["-n", &ns, "route", "add", "default", "via", &gw])?;
        Ok(())
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }

    /// The root namespace's address on the bridge, `10.250.X.1`: where services run by the
    /// test are reached from the hosts.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet, 1)
    }

    /// Host `i`'s address, `10.250.X.(10+i)`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.octet, 10 + i as u8)
    }

    /// Host `i`'s network namespace name (under /run/netns).
    pub fn netns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// `http://IP:PORT` of a node on host `i` listening on `port` (e.g. for
    /// `--advertise-url` before the node starts; [`DenNode::url`] says the same).
    pub fn node_url(&self, i: usize, port: u16) -> String {
        format!("http://{}:{port}", self.ip(i))
    }

    /// Pulls host `i`'s cable: its veth goes down, so nothing reaches it or leaves it
    /// (packets vanish; connections time out) until [`heal`](Self::heal).
    pub fn cut(&self, i: usize) -> Result<()> {
        sh("ip", &["link", "set", &self.veths[i], "down"]).map(drop)
    }

    /// Plugs host `i` back in after [`cut`](Self::cut).
    pub fn heal(&self, i: usize) -> Result<()> {
        sh("ip", &["link", "set", &self.veths[i], "up"]).map(drop)
    }

    /// A one-way-looking, silent partition between host `i` and `peer` (another host's
    /// address, or [`host_ip`](Self::host_ip) for the test's services): host `i` drops
    /// every packet from `peer`. Connections either way time out (no resets, no errors
    /// on send), like a network fault. Undo with [`unblock`](Self::unblock).
    ///
    /// The test itself talks from `host_ip` too: blocking it also cuts the test's requests
    /// from the root namespace (and [`DenNode`]'s readiness check); use [`http`] from
    /// another host's namespace to reach host `i` meanwhile.
    pub fn block(&self, i: usize, peer: Ipv4Addr) -> Result<()> {
        self.nft_in(
            i,
            &format!(
                "add table inet {BLOCK_TABLE}
                 add chain inet {BLOCK_TABLE} input {{ type filter hook input priority -10; policy accept; }}
                 add rule inet {BLOCK_TABLE} input ip saddr {peer} drop
"
            ),
        )
    }

    /// Removes every [`block`](Self::block) of host `i`.
    pub fn unblock(&self, i: usize) -> Result<()> {
        self.nft_in(
            i,
            &format!(
                "add table inet {BLOCK_TABLE}
delete table inet {BLOCK_TABLE}
"
            ),
        )
    }

    fn nft_in(&self, i: usize, script: &str) -> Result<()> {
        let script = script.to_string();
        // A child process inherits the namespace of the thread that forks it.
        den_net::netns::run_in(self.netns(i), move || nft_stdin(&script))
            .with_context(|| format!("enter netns {}", self.netns(i)))?
    }

    /// All host namespace names.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The bridge in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The nft table (family inet) of the trap in the root namespace.
    pub fn trap_table(&self) -> &str {
        &self.table
    }

    /// Unique per `Hosts`; part of every name created here and by [`DenNode`].
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `program` to be run inside host `i` (`ip netns exec NS program`; note that this gives
    /// the program a fresh /sys without cgroups, fine for clients such as psql or curl).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(i)])
            .arg(program)
            .stdin(Stdio::null());
        c
    }

    /// Whether anything of this `Hosts` still exists (namespaces, bridge, veths, trap).
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.namespaces, &self.bridge, &self.veths, &self.table)
    }

    /// The names [`leftovers_after_drop`] needs to check that a dropped `Hosts` is gone.
    pub fn names(&self) -> HostsNames {
        HostsNames {
            namespaces: self.namespaces.clone(),
            bridge: self.bridge.clone(),
            veths: self.veths.clone(),
            table: self.table.clone(),
        }
    }
}

/// The names of what a [`Hosts`] created.
#[derive(Debug, Clone)]
pub struct HostsNames {
    pub namespaces: Vec<String>,
    pub bridge: String,
    pub veths: Vec<String>,
    pub table: String,
}

/// What of a (dropped) [`Hosts`] still exists; empty when everything is gone.
pub fn leftovers_after_drop(n: &HostsNames) -> Vec<String> {
    leftovers(&n.namespaces, &n.bridge, &n.veths, &n.table)
}

fn leftovers(namespaces: &[String], bridge: &str, veths: &[String], table: &str) -> Vec<String> {
    let mut left = Vec::new();
    for ns in namespaces {
        if den_net::netns::netns_path(ns).exists() {
            left.push(format!("netns {ns}"));
        }
    }
    for link in veths.iter().map(String::as_str).chain([bridge]) {
        if Path::new("/sys/class/net").join(link).exists() {
            left.push(format!("link {link}"));
        }
    }
    if Command::new("nft")
        .args(["list", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        left.push(format!("nft table inet {table}"));
    }
    left
}

/// How many interfaces in the root namespace have an address starting with `prefix`.
fn subnet_users(prefix: &str) -> Result<usize> {
    let out = sh("ip", &["-4", "-o", "addr", "show"])?;
    let addrs = out
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w.starts_with(prefix)))
        .count();
    let routes = sh("ip", &["-4", "route", "show", "table", "all"])?;
    let routed = routes
        .lines()
        .filter(|l| l.split_whitespace().next().is_some_and(|d| d.starts_with(prefix)))
        .count();
    Ok(addrs.max(routed))
}

/// SIGKILLs every process in netns `ns` until none is left (they may fork meanwhile).
fn kill_netns_pids(ns: &str) {
    let _ = wait_until(KILL_TIMEOUT, POLL, || {
        let left = netns_pids(ns);
        for &p in &left {
            // SAFETY: plain syscall; the pid was in a namespace the test created.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        left.is_empty()
    });
}

fn netns_pids(ns: &str) -> Vec<i32> {
    sh("ip", &["netns", "pids", ns])
        .map(|o| o.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// den's sprite cgroups (`/den/KEY`, relative to a hierarchy) that process `pid` is in.
fn den_cgroups_of(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .filter(|p| p.starts_with("/den/"))
        .map(str::to_string)
        .collect()
}

/// Thaws cgroup `rel` (v1 freezer and v2), so that its tasks can be killed.
fn thaw_cgroup(rel: &str) {
    let rel = rel.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let _ = fs::write(root.join("freezer").join(rel).join("freezer.state"), "THAWED");
    let _ = fs::write(root.join(rel).join("cgroup.freeze"), "0");
    let _ = fs::write(root.join("unified").join(rel).join("cgroup.freeze"), "0");
}

/// Removes the (emptied) cgroup `rel` from every hierarchy that has it (v1 controllers or
/// the v2 root). rmdir only ever removes an empty cgroup; killed tasks leave it once reaped.
fn remove_cgroup(rel: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_path_buf()];
    if let Ok(entries) = fs::read_dir(root) {
        hierarchies.extend(entries.flatten().map(|e| e.path()));
    }
    for h in hierarchies {
        let dir = h.join(rel.trim_start_matches('/'));
        if dir.is_dir() {
            let _ = wait_until(KILL_TIMEOUT, POLL, || {
                fs::remove_dir(&dir).is_ok() || !dir.exists()
            });
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            kill_netns_pids(ns);
            let _ = sh("ip", &["netns", "del", ns]);
        }
        // Deleting a namespace takes its veth end and so the pair; these are for hosts
        // whose namespace step failed half-way.
        for v in &self.veths {
            if Path::new("/sys/class/net").join(v).exists() {
                let _ = sh("ip", &["link", "del", v]);
            }
        }
        let _ = sh("ip", &["link", "del", &self.bridge]);
        let _ = sh("nft", &["delete", "table", "inet", &self.table]);
    }
}

/// How a [`DenNode`] runs `den server`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `den` binary (`env!("CARGO_BIN_EXE_den")` in the den package's tests).
    pub den_bin: PathBuf,
    /// Created if missing. Its parents must be searchable by other users (0711), since
    /// sprite processes run as other users. The node's log (`den-node.log`) and config
    /// file (`den-node.toml`) go here too.
    pub data_dir: PathBuf,
    /// The node listens on `HOST_IP:port` inside its host's namespace (each host has its
    /// own ports, so every node may use the same one).
    pub port: u16,
    /// `busybox` (fast) or `debian`.
    pub image: String,
    /// Appended to the `den server` command line (e.g. the cluster flags).
    pub extra_args: Vec<String>,
    /// Set in the node's environment; every other `DEN_*` variable of the test is removed.
    pub env: Vec<(String, String)>,
    /// Extra lines for the node's TOML config file; must not repeat the keys the node
    /// sets (run_dir, subnet, net_table, net_ifprefix, net_netns_prefix, upstream_dns).
    pub config_toml: String,
    /// How long [`DenNode::start`] / [`DenNode::restart`] wait for the health route (the
    /// first start of a data dir builds the base image).
    pub ready_timeout: Duration,
}

impl NodeOptions {
    /// Port 8080, the busybox image, no extra args, env or config, 180 s to get ready.
    pub fn new(den_bin: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        NodeOptions {
            den_bin: den_bin.into(),
            data_dir: data_dir.into(),
            port: 8080,
            image: "busybox".into(),
            extra_args: Vec::new(),
            env: Vec::new(),
            config_toml: String::new(),
            ready_timeout: Duration::from_secs(180),
        }
    }
}

/// A `den server` process inside one host's network namespace.
///
/// The process joins the host's network namespace only (setns before exec, so
/// [`pid`](Self::pid) is den's own); it shares the machine's mount namespace, /sys and
/// cgroups, as den on a real host has the host's. Not `ip netns exec`: that gives den a
/// private mount namespace (its FUSE/loop mounts and sprite netns bind mounts invisible to
/// the test and lost to a restarted node) and a fresh /sys without the cgroup
/// hierarchies. Its stdout and stderr go to `DATA_DIR/den-node.log` (appended across
/// restarts).
///
/// Drop SIGKILLs the node's process group and waits, then removes what a killed den leaves
/// behind: processes in its sprites' namespaces, those namespaces, mounts and loop devices
/// under its data and run dirs, and the run dir.
#[derive(Debug)]
pub struct DenNode {
    index: usize,
    netns: String,
    ip: Ipv4Addr,
    opts: NodeOptions,
    run_dir: PathBuf,
    netns_prefix: String,
    /// The config file's keys the node sets itself.
    node_config: String,
    child: Option<Child>,
}

impl DenNode {
    /// Starts `den server` in host `i` of `hosts` and waits until `GET /v1/health`
    /// answers 200 (from the root namespace, over the bridge).
    pub fn start(hosts: &Hosts, i: usize, opts: &NodeOptions) -> Result<DenNode> {
        ensure!(i < hosts.len(), "host {i} of {}", hosts.len());
        let tag = hosts.tag();
        let digit = std::char::from_digit(i as u32, 36).expect("i < MAX_HOSTS");
        let run_dir = PathBuf::from(format!("/run/dh{tag}n{digit}"));
        let netns_prefix = format!("dh{tag}n{digit}-");
        // Sprites of different nodes live in different host namespaces, so the subnet only
        // has to stay clear of the bridge's 10.250/16; names and paths are machine-wide.
        let node_config = format!(
            "run_dir = {:?}\nsubnet = \"10.251.0.0/20\"\nnet_table = \"dh{tag}n{digit}\"\n\
             net_ifprefix = \"d{tag}{digit}\"\nnet_netns_prefix = {:?}\n\
             # Nothing listens there: sprites' DNS goes nowhere outside the test.\n\
             upstream_dns = \"{}:53\"\n",
            run_dir.display().to_string(),
            netns_prefix,
            hosts.host_ip(),
        );
        let mut node = DenNode {
            index: i,
            netns: hosts.netns(i).to_string(),
            ip: hosts.ip(i),
            opts: opts.clone(),
            run_dir,
            netns_prefix,
            node_config,
            child: None,
        };
        node.spawn_and_wait()?;
        Ok(node)
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let started = Instant::now();
        self.spawn()?;
        if let Err(e) = self.wait_ready() {
            self.kill_group();
            bail!(
                "den node {} ({}) not ready after {:.1?}: {e:#}; log {} ends with:\n{}",
                self.index,
                self.url(),
                started.elapsed(),
                self.log_path().display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Writes the config file and returns the command line for the current options.
    fn prepare(&self) -> Result<Vec<OsString>> {
        let o = &self.opts;
        fs::create_dir_all(&o.data_dir).with_context(|| format!("create {}", o.data_dir.display()))?;
        let config_path = o.data_dir.join("den-node.toml");
        fs::write(&config_path, format!("{}{}\n", self.node_config, o.config_toml))
            .with_context(|| format!("write {}", config_path.display()))?;
        let mut argv: Vec<OsString> = vec![
            "server".into(),
            "--data-dir".into(),
            o.data_dir.clone().into(),
            "--listen".into(),
            format!("{}:{}", self.ip, o.port).into(),
            "--image".into(),
            o.image.clone().into(),
            "--config".into(),
            config_path.into(),
        ];
        argv.extend(o.extra_args.iter().map(OsString::from));
        Ok(argv)
    }

    fn spawn(&mut self) -> Result<()> {
        let argv = self.prepare()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open the node log")?;
        let log2 = log.try_clone()?;
        let ns_path = den_net::netns::netns_path(&self.netns);
        let ns_file = File::open(&ns_path).with_context(|| format!("open {}", ns_path.display()))?;
        let ns_fd = ns_file.as_raw_fd();
        let mut cmd = Command::new(&self.opts.den_bin);
        cmd.args(&argv);
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("DEN_")) {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe syscalls; `ns_fd` stays open
        // (ns_file lives) until the spawn has returned, and is close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // A test process that dies without dropping the node takes it along.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = spawn_from_spawner_thread(cmd)
            .with_context(|| format!("spawn {} {argv:?}", self.opts.den_bin.display()))?;
        drop(ns_file);
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/v1/health", self.url());
        let start = Instant::now();
        loop {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("den server exited with {status} before becoming ready");
            }
            let last = match http(None, "GET", &url, None, None) {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {}: {}", r.status, r.body),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() >= self.opts.ready_timeout {
                bail!(
                    "timed out after {:?}; last check: {last}",
                    self.opts.ready_timeout
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `http://IP:PORT` (reachable from the root namespace and from every host).
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.opts.port)
    }

    /// The node's address (its host's).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its host's namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Which host it runs on.
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn data_dir(&self) -> &Path {
        &self.opts.data_dir
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The admin token from `DATA_DIR/admin-token`, if the node wrote one.
    pub fn admin_token(&self) -> Option<String> {
        fs::read_to_string(self.opts.data_dir.join("admin-token"))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// The den process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `DATA_DIR/den-node.log`: stdout and stderr of every run.
    pub fn log_path(&self) -> PathBuf {
        self.opts.data_dir.join("den-node.log")
    }

    /// The last 16 KiB of the log.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 16 * 1024)
    }

    /// SIGKILLs the den process (a crash: its sprites and helpers are left as they are)
    /// and reaps it. A no-op when not running.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
            c.wait().context("wait for den")?;
        }
        Ok(())
    }

    /// SIGTERM (den stops its sprites and flushes) and waits up to 60 s; see
    /// [`stop_within`](Self::stop_within).
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        self.stop_within(STOP_TIMEOUT)
    }

    /// SIGTERM (den stops its sprites and flushes) and waits up to `timeout`; then
    /// SIGKILLs and fails. Returns the exit status (`None` when it was not running).
    pub fn stop_within(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let mut status = None;
        let waited = wait_until(timeout, POLL, || {
            status = c.try_wait().ok().flatten();
            status.is_some()
        });
        if waited.is_err() {
            // SAFETY: as above.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = c.wait();
            bail!(
                "den node {} did not exit within {timeout:?} of SIGTERM; killed. Log ends with:\n{}",
                self.index,
                self.log_tail()
            );
        }
        Ok(status)
    }

    /// Starts the node again with the same options (changed ones, if the test changed them
    /// through [`options_mut`](Self::options_mut)) and waits until it is ready; stops it
    /// first (SIGTERM, 60 s) if it runs.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_and_wait()
    }

    /// The options of the next [`restart`](Self::restart) (e.g. other extra args or env).
    pub fn options_mut(&mut self) -> &mut NodeOptions {
        &mut self.opts
    }

    fn kill_group(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on the process group we created (process_group(0));
            // it exists until we reap its leader below.
            unsafe {
                libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// Removes what a killed den leaves behind (best effort).
    fn clean_leftovers(&self) {
        let mut cgroups = std::collections::BTreeSet::new();
        if let Ok(entries) = fs::read_dir(den_net::netns::NETNS_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.netns_prefix) {
                    let found: Vec<String> = netns_pids(&name).into_iter().flat_map(den_cgroups_of).collect();
                    // A warm sprite is frozen, and frozen tasks (cgroup v1) do not die.
                    found.iter().for_each(|cg| thaw_cgroup(cg));
                    cgroups.extend(found);
                    kill_netns_pids(&name);
                    let _ = sh("ip", &["netns", "del", &name]);
                }
            }
        }
        for cg in &cgroups {
            remove_cgroup(cg);
        }
        let roots = [self.run_dir.clone(), self.opts.data_dir.clone()];
        let under = |p: &Path| roots.iter().any(|r| p.starts_with(r));
        // Loop devices first: once their FUSE mounts are detached the kernel
        // names the backing file `/disk` and they could not be found again.
        // (A device whose ext4 is still mounted detaches when that goes.)
        for dev in den_block::loopdev::devices_backed(under) {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .stderr(Stdio::null())
                .status();
        }
        for mp in mount_points().into_iter().rev().filter(|m| under(m)) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mp)
                .stderr(Stdio::null())
                .status();
        }
        // Never recurse into a mount that is still there.
        if !mount_points().iter().any(|m| m.starts_with(&self.run_dir)) {
            let _ = fs::remove_dir_all(&self.run_dir);
        }
    }
}

impl Drop for DenNode {
    fn drop(&mut self) {
        self.kill_group();
        self.clean_leftovers();
    }
}

/// Mount points, in mount order (den_block parses mountinfo, escapes and all).
fn mount_points() -> Vec<PathBuf> {
    den_block::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// An HTTP response: status and body (as text).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Connect, read and write timeout of [`http`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A one-shot HTTP/1.0 request to `url` (`http://IP:PORT/PATH`), made from inside network
/// namespace `netns` (or the caller's, `None`), with `Authorization: Bearer TOKEN` if given
/// and a JSON `body` if given.
pub fn http(
    netns: Option<&str>,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<HttpResponse> {
    http_with(netns, method, url, &[], token, body)
}

/// [`http`] with extra request `headers`.
pub fn http_with(
    netns: Option<&str>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    token: Option<&str>,
    body: Option<&str>,
) -> Result<HttpResponse> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("{url}: the host must be IP:PORT"))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let exchange = move || -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.set_write_timeout(Some(HTTP_TIMEOUT))?;
        s.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    };
    let raw = match netns {
        None => exchange(),
        Some(ns) => den_net::netns::run_in(ns, exchange).with_context(|| format!("enter netns {ns}"))?,
    }
    .with_context(|| format!("{method} {url}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {url}: no complete response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{method} {url}: bad status line in {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_string(),
    })
}
