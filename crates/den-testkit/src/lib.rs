//! Test support for den's integration tests.
//!
//! * [`SeaweedS3`]: a real SeaweedFS S3 server on 127.0.0.1 (or another local
//!   address, [`SeaweedS3::start_on`]), one per test, in its own temp dir, on
//!   free ports, with SigV4 credentials enforced and a bucket created before
//!   [`SeaweedS3::start`] returns.
//! * [`require_root`], [`free_port`], [`free_ports`], [`wait_until`]: small
//!   helpers.
//! * [`net`]: a fake internet in its own network namespace and a unique,
//!   trapped `den_net::NetConfig` per test, for sprite networking tests that
//!   must never send traffic anywhere but to namespaces they created.
//! * [`cluster`]: several "hosts" (network namespaces on a bridge) and
//!   `den server` nodes running in them, for cluster tests.
//!
//! The external tools (`weed`, `curl`) are installed by
//! `scripts/install-deps.sh`.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod cluster;
pub mod net;
pub mod postgres;
pub mod runner;

/// Panics with a clear message unless the process runs as root (effective uid
/// 0). den's tests need root (mounts, loop devices, namespaces); they must fail
/// loudly rather than skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "this test must run as root (effective uid is {euid}); \
             den's tests need root and are never skipped: run them with sudo or as root"
        );
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for
/// a bind to port 0). Another process may take it before you bind it.
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago. All `n`
/// listeners are held at once while choosing, so the ports differ from each
/// other.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Polls `cond` every `poll_interval` until it returns true (`Ok`) or
/// `timeout` has passed since the call (`Err`). `cond` is always called at
/// least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, poll_interval: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("condition not met within {timeout:?}");
        }
        thread::sleep(poll_interval.min(timeout - elapsed));
    }
}

/// How long [`SeaweedS3::start`] / [`SeaweedS3::restart`] wait for the server
/// to serve the bucket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(50);
/// How many times `start` picks fresh ports when the server could not bind.
const START_ATTEMPTS: usize = 3;
const BUCKET: &str = "den-test";
const REGION: &str = "us-east-1";

/// The ports one SeaweedFS instance listens on, all on its one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeaweedPorts {
    pub s3: u16,
    pub s3_grpc: u16,
    pub master: u16,
    pub master_grpc: u16,
    pub volume: u16,
    pub volume_grpc: u16,
    pub filer: u16,
    pub filer_grpc: u16,
    pub admin: u16,
    pub admin_grpc: u16,
}

impl SeaweedPorts {
    fn pick(ip: Ipv4Addr) -> Result<Self> {
        // weed's maintenance worker dials the admin server at admin port +
        // 10000 whatever -admin.port.grpc says, so keep that relation. All
        // listeners are held until every port is chosen, so none repeats.
        let mut held = Vec::new();
        let mut admin = None;
        for _ in 0..100 {
            let l = TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0"))?;
            let port = l.local_addr()?.port();
            held.push(l);
            if port <= u16::MAX - 10_000
                && let Ok(g) = TcpListener::bind((ip, port + 10_000))
            {
                held.push(g);
                admin = Some(port);
                break;
            }
        }
        let admin = admin.context("no free port pair (p, p+10000) for the SeaweedFS admin")?;
        let mut others = Vec::new();
        while others.len() < 8 {
            let l = TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0"))?;
            others.push(l.local_addr()?.port());
            held.push(l);
        }
        let p = others;
        Ok(Self {
            s3: p[0],
            s3_grpc: p[1],
            master: p[2],
            master_grpc: p[3],
            volume: p[4],
            volume_grpc: p[5],
            filer: p[6],
            filer_grpc: p[7],
            admin,
            admin_grpc: admin + 10_000,
        })
    }

    /// All ten ports.
    pub fn all(&self) -> [u16; 10] {
        [
            self.s3,
            self.s3_grpc,
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.admin,
            self.admin_grpc,
        ]
    }
}

/// A SeaweedFS S3 server (`weed mini`) for one test.
///
/// * Listens on 127.0.0.1 only (or only on the address given to
///   [`start_on`](Self::start_on)); every port (S3, master, volume, filer,
///   admin and their gRPC ports) is chosen free at start.
/// * SigV4 is enforced with a random access key / secret per instance;
///   anonymous requests get 403.
/// * Bucket [`bucket()`](Self::bucket) exists when `start` returns.
/// * Telemetry, admin UI, WebDAV, Iceberg and Lance are off.
/// * Everything lives in a fresh temp dir: data in `data/`, the server's
///   log (stdout+stderr, appended across restarts) in `weed.log`.
/// * [`stop`](Self::stop) kills the server (like a crash) but keeps the data;
///   [`restart`](Self::restart) starts it again on the same ports with the
///   same data. Drop kills the server's whole process group and removes the
///   temp dir.
/// * If the test process dies without dropping it, the kernel kills the
///   server too (parent-death signal).
#[derive(Debug)]
pub struct SeaweedS3 {
    weed: PathBuf,
    ip: Ipv4Addr,
    ports: SeaweedPorts,
    access_key: String,
    secret_key: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SeaweedS3 {
    /// Starts a fresh server on 127.0.0.1 and waits (at most 30 s) until the
    /// bucket is served with the instance's credentials.
    pub fn start() -> Result<Self> {
        Self::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Like [`start`](Self::start), but every SeaweedFS component listens on
    /// `ip` (a local address, e.g. the bridge address of
    /// [`cluster::Hosts`], so that other network
    /// namespaces reach it) instead of 127.0.0.1. [`endpoint`](Self::endpoint)
    /// then names `ip`.
    pub fn start_on(ip: Ipv4Addr) -> Result<Self> {
        let weed = weed_bin()?;
        which("curl").context(
            "curl not found on PATH (SeaweedS3 uses it for its readiness check); \
             run scripts/install-deps.sh",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("den-seaweed-")
            .tempdir()
            .context("create temp dir for SeaweedFS")?;
        fs::create_dir(dir.path().join("data")).context("create SeaweedFS data dir")?;
        let mut s3 = SeaweedS3 {
            weed,
            ip,
            ports: SeaweedPorts::pick(ip)?,
            access_key: format!("DEN{}", random_hex(8)?.to_uppercase()),
            secret_key: random_hex(20)?,
            dir,
            child: None,
        };
        let mut attempt = 1;
        loop {
            match s3.spawn_and_wait() {
                Ok(()) => return Ok(s3),
                // Another process took one of the chosen ports between our
                // probe and the server's bind: choose again.
                Err(e) if attempt < START_ATTEMPTS && s3.log_mentions_port_in_use() => {
                    s3.kill();
                    s3.remove_grpc_sockets();
                    let old = s3.ports;
                    s3.ports = SeaweedPorts::pick(ip)?;
                    eprintln!(
                        "den-testkit: SeaweedFS could not bind its ports {old:?} \
                         (attempt {attempt}), retrying with {:?}: {e:#}",
                        s3.ports
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://IP:PORT`, the S3 endpoint (path-style addressing); IP is
    /// 127.0.0.1 unless started with [`start_on`](Self::start_on).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, self.ports.s3)
    }

    /// The address every component listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The bucket created at start, `den-test`.
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// `us-east-1`; SeaweedFS accepts signatures for any region, but use this.
    pub fn region(&self) -> &str {
        REGION
    }

    /// All ports of this instance.
    pub fn ports(&self) -> SeaweedPorts {
        self.ports
    }

    /// The server's data dir (kept across stop/restart).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file (stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The last `max_bytes` of the server's log.
    pub fn log_tail(&self, max_bytes: u64) -> String {
        tail(&self.log_path(), max_bytes)
    }

    /// `http://IP:PORT/den-test/KEY`.
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{}/{}", self.endpoint(), BUCKET, key.trim_start_matches('/'))
    }

    /// A `curl` command that signs its request with this instance's
    /// credentials (`-sS --noproxy '*' --aws-sigv4 aws:amz:us-east-1:s3 --user
    /// KEY:SECRET`);
    /// append further arguments and a URL such as [`object_url`](Self::object_url).
    pub fn signed_curl(&self) -> Command {
        let mut cmd = Command::new("curl");
        cmd.arg("-sS")
            .args(["--noproxy", "*"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.access_key, self.secret_key))
            .stdin(Stdio::null());
        cmd
    }

    /// Whether the server process is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server's process group (SIGKILL, like a crash) and waits
    /// until the S3 port refuses connections. The data dir is kept. A no-op
    /// when already stopped.
    pub fn stop(&mut self) -> Result<()> {
        self.kill();
        let addr = SocketAddr::from((self.ip, self.ports.s3));
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
        })
        .with_context(|| format!("S3 port {} still accepts connections after stop", self.ports.s3))
    }

    /// Starts the server again on the same ports with the same data (and
    /// credentials) and waits until the bucket is served. Stops it first if
    /// it is running.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_and_wait()
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let started = Instant::now();
        self.spawn()?;
        self.wait_ready()
            .with_context(|| {
                format!(
                    "SeaweedFS S3 on {} not ready after {:.1?}; log {} ends with:\n{}",
                    self.endpoint(),
                    started.elapsed(),
                    self.log_path().display(),
                    self.log_tail(4096)
                )
            })
            .inspect_err(|_| self.kill())
    }

    fn spawn(&mut self) -> Result<()> {
        let dir = self.dir.path();
        let data = self.data_dir();
        let p = &self.ports;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open SeaweedFS log")?;
        let log2 = log.try_clone()?;

        let mut args: Vec<OsString> = vec!["-logtostderr".into(), "mini".into()];
        let mut flag = |name: &str, value: &dyn std::fmt::Display| {
            args.push(format!("-{name}={value}").into());
        };
        flag("dir", &data.display());
        flag("ip", &self.ip);
        flag("ip.bind", &self.ip);
        flag("bucket", &BUCKET);
        flag("master.telemetry", &false);
        flag("admin.ui", &false);
        flag("webdav", &false);
        flag("s3.port.iceberg", &0);
        flag("s3.port.lance", &0);
        flag("s3.port", &p.s3);
        flag("s3.port.grpc", &p.s3_grpc);
        flag("master.port", &p.master);
        flag("master.port.grpc", &p.master_grpc);
        flag("volume.port", &p.volume);
        flag("volume.port.grpc", &p.volume_grpc);
        flag("filer.port", &p.filer);
        flag("filer.port.grpc", &p.filer_grpc);
        flag("admin.port", &p.admin);
        flag("admin.port.grpc", &p.admin_grpc);
        flag("filer.localSocket", &dir.join("filer.sock").display());
        flag("s3.localSocket", &dir.join("s3.sock").display());

        let mut cmd = Command::new(&self.weed);
        cmd.args(&args)
            .current_dir(dir)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("S3_BUCKET")
            .env_remove("S3_TABLE_BUCKET")
            .env_remove("S3_EXTERNAL_URL")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(|| {
                // Kill the server when the spawning thread (the long-lived
                // spawner thread, so in effect the test process) dies.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    // The parent already died before prctl.
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = spawn_from_spawner_thread(cmd)
            .with_context(|| format!("spawn {} {:?}", self.weed.display(), args))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls a signed `GET /den-test/?max-keys=1` until it answers 200.
    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/{}/?max-keys=1", self.endpoint(), BUCKET);
        let mut created = false;
        let start = Instant::now();
        loop {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!("weed exited with {status} before becoming ready");
            }
            let out = self
                .signed_curl()
                .args(["-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2"])
                .arg(&url)
                .output()
                .context("run curl")?;
            let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let last = match code.as_str() {
                "200" => match self.volumes_registered() {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                // The server is up but `-bucket` has not created the bucket
                // (yet): create it ourselves, once.
                "404" if !created && start.elapsed() > Duration::from_secs(5) => {
                    let out = self
                        .signed_curl()
                        .args(["-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
                        .arg(format!("{}/{}", self.endpoint(), BUCKET))
                        .output()
                        .context("run curl")?;
                    created = true;
                    format!(
                        "bucket missing; PUT bucket answered {}",
                        String::from_utf8_lossy(&out.stdout).trim()
                    )
                }
                _ => format!(
                    "HTTP {code}, curl exit {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            };
            if start.elapsed() >= READY_TIMEOUT {
                bail!("timed out after {READY_TIMEOUT:?}; last check: {last}");
            }
            thread::sleep(READY_POLL);
        }
    }

    /// After a restart the S3 gateway answers before the volume server has
    /// re-registered its volumes with the master; reads then fail with 500
    /// ("volume id N not found"). Ready means: the master can locate every
    /// volume found in the data dir.
    fn volumes_registered(&self) -> std::result::Result<(), String> {
        let entries = fs::read_dir(self.data_dir()).map_err(|e| format!("read data dir: {e}"))?;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".dat")) else {
                continue;
            };
            // `<collection>_<id>.dat` or `<id>.dat`
            let Ok(id) = stem.rsplit('_').next().unwrap_or(stem).parse::<u32>() else {
                continue;
            };
            let body = http_get(self.ip, self.ports.master, &format!("/dir/lookup?volumeId={id}"))
                .map_err(|e| format!("master lookup of volume {id}: {e}"))?;
            if !body.contains("\"locations\"") {
                return Err(format!("master does not know volume {id} yet: {}", body.trim()));
            }
        }
        Ok(())
    }

    fn log_mentions_port_in_use(&self) -> bool {
        let log = self.log_tail(64 * 1024);
        // weed checks its ports before binding ("Port allocation failed: port
        // N for Filer ... is not available"); a later bind can still lose.
        log.contains("Port allocation failed") || log.contains("address already in use")
    }

    /// SIGKILLs the process group and reaps the leader.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: plain syscall; the group is ours (process_group(0)) and
            // still exists until we reap its leader below.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// weed creates `/tmp/seaweedfs-<component>-grpc-<port>.sock` (a fixed
    /// path, not under $TMPDIR) and leaves it behind when killed. Remove ours,
    /// unless something listens on it again (another instance that got the
    /// port after ours stopped).
    fn remove_grpc_sockets(&self) {
        let p = &self.ports;
        for (name, port) in [
            ("master", p.master_grpc),
            ("volume", p.volume_grpc),
            ("filer", p.filer_grpc),
            ("s3", p.s3_grpc),
            ("admin", p.admin_grpc),
        ] {
            let path = PathBuf::from(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock"));
            if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

impl Drop for SeaweedS3 {
    fn drop(&mut self) {
        self.kill();
        self.remove_grpc_sockets();
        // The TempDir field then removes the directory.
    }
}

/// Locates `weed`: `$DEN_WEED_BIN`, else `weed` on PATH, else
/// `/opt/den-venv/bin/weed`.
pub fn weed_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("DEN_WEED_BIN") {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        bail!("DEN_WEED_BIN={} is not an executable file", p.display());
    }
    if let Some(p) = which("weed") {
        return Ok(p);
    }
    let venv = PathBuf::from("/opt/den-venv/bin/weed");
    if is_executable(&venv) {
        return Ok(venv);
    }
    Err(anyhow!(
        "SeaweedFS `weed` not found (tried $DEN_WEED_BIN, PATH, {}); run scripts/install-deps.sh",
        venv.display()
    ))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A plain HTTP/1.0 GET to `ip`:`port`; returns the whole response.
fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> io::Result<String> {
    use std::io::Write;
    let addr = SocketAddr::from((ip, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from one long-lived thread, so that PR_SET_PDEATHSIG (which
/// fires when the *thread* that forked the child exits) fires only when the
/// whole test process dies, not when the test's own thread ends while the
/// server is still shared with other threads.
fn spawn_from_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let tx = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            thread::Builder::new()
                .name("den-testkit-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .expect("spawn den-testkit spawner thread");
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.send((cmd, reply_tx))
        .map_err(|_| io::Error::other("den-testkit spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("den-testkit spawner thread is gone"))?
}
