//! `den-bench api`: the Sprites-compatible API of `den server`, measured
//! from its clients — a server started in this process (its own data dir,
//! run dir and sprite network), driven over HTTP and WebSocket on 127.0.0.1.
//!
//! 1. Exec round trip of `true` on a running sprite through the WebSocket
//!    exec protocol: from a Rust client (connect + upgrade, `session_info`,
//!    exit frame, close) and from the official Python SDK (`sprites-py`,
//!    `sprite.command("true").run()` timed in a Python loop).
//! 2. Load: concurrent exec streams whose output is checked line by line,
//!    with concurrent creates (create + first exec) at the same time.
//! 3. Sprite URL proxy: a large file and a tiny file served inside a
//!    sprite, fetched through the sprite URL and directly from the sprite's
//!    address.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use den_agent::client::ExecRequest;
use den_runtime::image::LogProgress;
use den_server::{Running, ServerConfig};
use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::cancel;
use crate::report::{Latency, TextTable, latency};
use crate::sprite_bench::{BenchImage, delete_all, fmt_ms};

/// How long one request or command may take before it counts as an error.
const WAIT: Duration = Duration::from_secs(60);

/// The hosted service's exec round trip (p50), measured elsewhere: a
/// reference, not measured by this bench.
pub const HOSTED_EXEC_P50_MS: f64 = 140.0;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone)]
pub struct ApiBenchOptions {
    /// Work dir: the server's data dir (store, catalog, tokens) is `<work>/data`.
    pub work: PathBuf,
    /// Mounts and sockets of running sprites: keep it short.
    pub run_dir: PathBuf,
    /// The `den` binary (runs as `runtime-shim` and `agent`).
    pub den_exe: PathBuf,
    pub image: BenchImage,
    /// Exec round trips from the Rust client.
    pub exec_samples: usize,
    /// Exec round trips from the Python SDK (0: skip).
    pub sdk_samples: usize,
    pub python: PathBuf,
    /// Concurrent exec streams in the load test.
    pub streams: usize,
    /// Execs per stream, one after another.
    pub stream_reps: usize,
    /// Lines each exec prints (checked).
    pub stream_lines: usize,
    /// Concurrent creates (create + first exec) during the load test.
    pub creates: usize,
    /// Size of the large file served by the sprite, in MiB (0: skip the proxy test).
    pub file_mib: u64,
    /// Downloads of the large file per path; the median is reported.
    pub file_reps: usize,
    /// Small GETs per path.
    pub small_samples: usize,
}

impl ApiBenchOptions {
    pub fn new(work: PathBuf, den_exe: PathBuf, quick: bool) -> Self {
        ApiBenchOptions {
            work,
            run_dir: PathBuf::from("/run/den-bench-api"),
            den_exe,
            image: BenchImage::Debian,
            exec_samples: if quick { 20 } else { 200 },
            sdk_samples: if quick { 10 } else { 100 },
            python: PathBuf::from("/opt/den-venv/bin/python"),
            streams: if quick { 10 } else { 50 },
            stream_reps: if quick { 2 } else { 10 },
            stream_lines: 50,
            creates: if quick { 3 } else { 10 },
            file_mib: if quick { 32 } else { 256 },
            file_reps: 3,
            small_samples: if quick { 20 } else { 200 },
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} image; server in this process on 127.0.0.1, clients on the same host",
            self.image.name()
        )
    }
}

#[derive(Debug, Default)]
pub struct SdkResult {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

#[derive(Debug, Default)]
pub struct ApiBenchResults {
    pub exec_rust: Vec<Duration>,
    pub exec_rust_errors: usize,
    /// HTTP exec of `true` on one kept-alive connection (as SDKs pool them)
    /// and on a fresh connection each: equal unless something on the wire
    /// (Nagle's algorithm meeting delayed ACKs) adds a fixed delay.
    pub exec_http_pooled: Vec<Duration>,
    pub exec_http_fresh: Vec<Duration>,
    pub exec_http_errors: usize,
    pub sdk: Option<SdkResult>,
    /// Why the SDK figure is missing, if it is.
    pub sdk_error: Option<String>,
    pub load_stream: Vec<Duration>,
    pub load_stream_errors: usize,
    /// The first stream error, for the notes.
    pub load_stream_first_error: Option<String>,
    pub load_create: Vec<Duration>,
    pub load_create_errors: usize,
    pub load_create_first_error: Option<String>,
    /// Wall time of the whole load phase.
    pub load_total: Duration,
    pub proxy_mbs: Vec<f64>,
    pub direct_mbs: Vec<f64>,
    /// CPU time of this whole process (client, and den for the proxied
    /// path) per GiB downloaded, in seconds: what the proxy costs whatever
    /// else the host is doing.
    pub proxy_cpu: Vec<f64>,
    pub direct_cpu: Vec<f64>,
    pub proxy_small: Vec<Duration>,
    pub direct_small: Vec<Duration>,
    pub proxy_errors: usize,
    pub direct_errors: usize,
}

/// A den server under test and a client for it (also used by
/// [`crate::cluster_bench`], one per node).
pub struct Api {
    /// `127.0.0.1:PORT`, or a cluster node's `IP:PORT`
    pub addr: SocketAddr,
    pub token: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn create(&self, name: &str) -> Result<()> {
        let r = self
            .http
            .post(self.url("/v1/sprites"))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await?;
        let status = r.status();
        if status != 201 {
            bail!("create {name}: {status} {}", r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    /// `POST /exec` of `true` through `client`, reading the whole stream.
    async fn exec_http(&self, client: &reqwest::Client, sprite: &str) -> Result<()> {
        let r = client
            .post(self.url(&format!("/v1/sprites/{sprite}/exec?cmd=true")))
            .bearer_auth(&self.token)
            .send()
            .await?;
        let status = r.status();
        let body = r.bytes().await?;
        if status != 200 || !body.ends_with(&[3, 0]) {
            bail!("HTTP exec: {status} {body:?}");
        }
        Ok(())
    }

    /// Open the exec WebSocket of `argv` on `sprite`.
    async fn exec_ws(&self, sprite: &str, argv: &[&str]) -> Result<Ws> {
        let query = argv
            .iter()
            .map(|a| format!("cmd={}", enc(a)))
            .collect::<Vec<_>>()
            .join("&");
        let mut req = format!("ws://{}/v1/sprites/{sprite}/exec?{query}", self.addr).into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .context("websocket handshake timed out")??;
        Ok(ws)
    }

    /// Run `argv` to completion over the WebSocket: `session_info` first,
    /// then output, the exit frame and the close. Returns stdout; fails
    /// unless the command exited 0 and the server closed with 1000.
    pub async fn exec(&self, sprite: &str, argv: &[&str]) -> Result<Vec<u8>> {
        let mut ws = self.exec_ws(sprite, argv).await?;
        let out = tokio::time::timeout(WAIT, drain(&mut ws))
            .await
            .context("the exec did not finish")??;
        Ok(out)
    }
}

/// Percent-encoding for a query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads one exec session to its close frame.
async fn drain(ws: &mut Ws) -> Result<Vec<u8>> {
    let info: Value = match ws.next().await.context("closed before session_info")?? {
        Message::Text(t) => serde_json::from_str(&t)?,
        other => bail!("first frame is not session_info: {other:?}"),
    };
    ensure!(info["type"] == "session_info", "first frame: {info}");
    let tty = info["tty"] == true;
    let mut stdout = Vec::new();
    let mut exit = None;
    while let Some(m) = ws.next().await {
        match m? {
            Message::Binary(b) if tty => stdout.extend_from_slice(&b),
            Message::Binary(b) => match b.first() {
                Some(1) => stdout.extend_from_slice(&b[1..]),
                Some(2) => {}
                Some(3) if b.len() == 2 => exit = Some(b[1]),
                _ => bail!("unexpected binary frame {b:?}"),
            },
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "exit" {
                    exit = Some(v["exit_code"].as_u64().context("exit_code")? as u8);
                }
            }
            Message::Close(f) => {
                let code = f.map(|f| u16::from(f.code));
                ensure!(code == Some(1000), "close code {code:?}");
                match exit {
                    Some(0) => return Ok(stdout),
                    Some(c) => bail!("exited {c}"),
                    None => bail!("closed without an exit frame"),
                }
            }
            _ => {}
        }
    }
    bail!("the connection ended without a close frame")
}

/// A sprite network that cannot collide with a den server, the tests or
/// `den-bench sprites`.
fn server_config(opts: &ApiBenchOptions) -> ServerConfig {
    let mut cfg = ServerConfig::new(opts.work.join("data"));
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.image = opts.image.name().into();
    cfg.run_dir = Some(opts.run_dir.clone());
    cfg.subnet = Some("10.202.0.0/16".into());
    cfg.net_table = Some("denbenchapi".into());
    cfg.net_ifprefix = Some("da".into());
    cfg.net_netns_prefix = Some("denbenchapi-".into());
    cfg.upstream_dns = den_sprite::host_upstream_dns();
    // The bench decides when sprites sleep: never.
    cfg.warm_after = Duration::from_secs(24 * 3600);
    cfg.cold_after = Duration::from_secs(48 * 3600);
    cfg.cold_after_keeping_memory = cfg.cold_after;
    cfg
}

/// Run the whole benchmark. The server is always stopped and the bench's
/// sprites deleted, also on errors and Ctrl-C.
pub async fn run(opts: &ApiBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<ApiBenchResults> {
    let cfg = server_config(opts);
    let images_dir = cfg.images_dir.clone();
    progress(&format!(
        "preparing the {} image (built once, then cached in {})",
        opts.image.name(),
        images_dir.display()
    ));
    let base = opts.image.base(&images_dir);
    let image = tokio::task::spawn_blocking(move || base.ensure(&LogProgress))
        .await?
        .context("building the base image")?;
    cancel::check()?;

    progress("starting den server in this process");
    let running = den_server::start(cfg.clone(), opts.den_exe.clone())
        .await
        .context("starting the server")?;
    delete_all(&running.state.mgr).await;
    let outcome = async {
        let token = std::fs::read_to_string(cfg.data_dir.join("admin-token"))
            .context("reading the admin token")?
            .trim()
            .to_string();
        let http = reqwest::Client::builder().timeout(WAIT).build()?;
        let api = Api {
            addr: running.addr,
            token,
            http,
        };
        let mut res = ApiBenchResults::default();
        measure(&api, &running, opts, &mut res, progress).await?;
        anyhow::Ok(res)
    }
    .await;
    progress("deleting the bench's sprites and stopping the server");
    delete_all(&running.state.mgr).await;
    running.stop().await;
    if let Err(e) = image.release_idmapped() {
        tracing::warn!(error = %e, "unmounting the idmapped image");
    }
    outcome
}

async fn measure(
    api: &Api,
    running: &Running,
    opts: &ApiBenchOptions,
    res: &mut ApiBenchResults,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    // The disk template is made on the first create of an image version.
    progress("warm-up: first create (makes the disk template once) and first exec");
    let main = "a-main";
    api.create(main).await?;
    api.exec(main, &["true"]).await?;
    for _ in 0..5 {
        api.exec(main, &["true"]).await?;
    }

    let m = opts.exec_samples.max(1);
    progress(&format!(
        "exec `true` round trip over the WebSocket (Rust client) ×{m}"
    ));
    for _ in 0..m {
        cancel::check()?;
        let t0 = Instant::now();
        match api.exec(main, &["true"]).await {
            Ok(_) => res.exec_rust.push(t0.elapsed()),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "exec true");
                res.exec_rust_errors += 1;
            }
        }
    }

    progress(&format!(
        "exec `true` over HTTP, kept-alive connection vs a fresh one each ×{m}"
    ));
    let pooled = reqwest::Client::builder().timeout(WAIT).build()?;
    let fresh = reqwest::Client::builder()
        .timeout(WAIT)
        .pool_max_idle_per_host(0)
        .build()?;
    api.exec_http(&pooled, main).await?;
    let mut errors = 0;
    for _ in 0..m {
        cancel::check()?;
        for (client, out) in [
            (&pooled, &mut res.exec_http_pooled),
            (&fresh, &mut res.exec_http_fresh),
        ] {
            let t0 = Instant::now();
            match api.exec_http(client, main).await {
                Ok(()) => out.push(t0.elapsed()),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "HTTP exec true");
                    errors += 1;
                }
            }
        }
    }
    res.exec_http_errors = errors;

    if opts.sdk_samples > 0 {
        progress(&format!(
            "exec `true` round trip from the Python SDK ×{}",
            opts.sdk_samples
        ));
        match sdk_exec(api, opts, main).await {
            Ok(r) => res.sdk = Some(r),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "Python SDK bench failed");
                res.sdk_error = Some(format!("{e:#}"));
            }
        }
        cancel::check()?;
    }

    progress(&format!(
        "load: {} exec streams ({} × {} lines each) + {} creates (create + first exec), concurrently",
        opts.streams, opts.stream_reps, opts.stream_lines, opts.creates
    ));
    load(api, opts, main, res).await;
    for i in 0..opts.creates {
        let name = format!("a-load{i}");
        if running.state.mgr.get(&name).is_ok() {
            running.state.mgr.delete(&name).await?;
        }
    }
    cancel::check()?;

    if opts.file_mib > 0 {
        proxy(api, running, opts, res, progress).await?;
    }
    Ok(())
}

/// The Python loop, run as a child process while this runtime serves the API.
const SDK_SCRIPT: &str = r#"
import json, os, sys, time
from sprites import SpritesClient
url, token, name, n = os.environ["BENCH_URL"], os.environ["BENCH_TOKEN"], os.environ["BENCH_SPRITE"], int(os.environ["BENCH_N"])
samples, errors = [], 0
with SpritesClient(token=token, base_url=url) as c:
    s = c.get_sprite(name)
    for _ in range(5):
        s.command("true").run()
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            s.command("true").run()
            samples.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:
            errors += 1
            print(f"error: {e!r}", file=sys.stderr)
samples.sort()
def rank(p):
    if not samples:
        return None
    r = max(1, min(len(samples), -(-len(samples) * p // 100)))
    return samples[int(r) - 1]
print(json.dumps({"n": len(samples), "p50_ms": rank(50), "p99_ms": rank(99), "errors": errors}))
"#;

async fn sdk_exec(api: &Api, opts: &ApiBenchOptions, sprite: &str) -> Result<SdkResult> {
    let out = tokio::time::timeout(
        WAIT * 5,
        tokio::process::Command::new(&opts.python)
            .arg("-c")
            .arg(SDK_SCRIPT)
            .env("BENCH_URL", format!("http://{}", api.addr))
            .env("BENCH_TOKEN", &api.token)
            .env("BENCH_SPRITE", sprite)
            .env("BENCH_N", opts.sdk_samples.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the Python loop did not finish")?
    .with_context(|| format!("running {}", opts.python.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "python exited {}: {}",
        out.status,
        stderr.trim()
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("python printed {line:?}"))?;
    Ok(SdkResult {
        n: v["n"].as_u64().context("n")? as usize,
        p50_ms: v["p50_ms"].as_f64().context("no successful sample")?,
        p99_ms: v["p99_ms"].as_f64().context("no successful sample")?,
        errors: v["errors"].as_u64().context("errors")? as usize,
    })
}

/// The expected output of the load test's command.
fn lines_script(n: usize) -> (String, Vec<u8>) {
    let script = format!("for i in $(seq {n}); do echo line $i; done");
    let expect = (1..=n).map(|i| format!("line {i}\n")).collect::<String>();
    (script, expect.into_bytes())
}

async fn load(api: &Api, opts: &ApiBenchOptions, main: &str, res: &mut ApiBenchResults) {
    let (script, expect) = lines_script(opts.stream_lines);
    let t0 = Instant::now();
    let streams = futures::future::join_all((0..opts.streams).map(|_| {
        let (script, expect) = (&script, &expect);
        async move {
            let mut lat = Vec::new();
            let mut errors = Vec::new();
            for _ in 0..opts.stream_reps {
                if cancel::is_interrupted() {
                    break;
                }
                let t = Instant::now();
                match api.exec(main, &["sh", "-c", script.as_str()]).await {
                    Ok(out) if out == *expect => lat.push(t.elapsed()),
                    Ok(out) => errors.push(format!(
                        "output mismatch: {} bytes, want {}",
                        out.len(),
                        expect.len()
                    )),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            (lat, errors)
        }
    }));
    let creates = futures::future::join_all((0..opts.creates).map(|i| async move {
        let name = format!("a-load{i}");
        let t = Instant::now();
        let r = async {
            api.create(&name).await?;
            api.exec(&name, &["true"]).await?;
            anyhow::Ok(())
        }
        .await;
        r.map(|()| t.elapsed()).map_err(|e| format!("{name}: {e:#}"))
    }));
    let (streams, creates) = tokio::join!(streams, creates);
    res.load_total = t0.elapsed();
    for (lat, errors) in streams {
        res.load_stream.extend(lat);
        res.load_stream_errors += errors.len();
        if res.load_stream_first_error.is_none() {
            res.load_stream_first_error = errors.into_iter().next();
        }
    }
    for c in creates {
        match c {
            Ok(d) => res.load_create.push(d),
            Err(e) => {
                res.load_create_errors += 1;
                res.load_create_first_error.get_or_insert(e);
            }
        }
    }
}

async fn wait_listening(addr: Ipv4Addr, port: u16) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        if TcpStream::connect(SocketAddr::from((addr, port))).await.is_ok() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "nothing listens on {addr}:{port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// User + system CPU time of this process so far (all its threads).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Download `url` to nowhere; returns the byte count.
async fn fetch(client: &reqwest::Client, url: &str, token: Option<&str>) -> Result<u64> {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let mut r = req.send().await?;
    ensure!(r.status() == 200, "GET {url}: {}", r.status());
    let mut n = 0u64;
    while let Some(chunk) = r.chunk().await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

async fn proxy(
    api: &Api,
    running: &Running,
    opts: &ApiBenchOptions,
    res: &mut ApiBenchResults,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let web = "a-web";
    let size = opts.file_mib << 20;
    progress(&format!(
        "proxy: writing a {} MiB file of /dev/urandom into {web}",
        opts.file_mib
    ));
    api.create(web).await?;
    let write = format!(
        "mkdir -p /home/sprite/www && cd /home/sprite/www && echo small > small \
         && dd if=/dev/urandom of=big bs=1M count={} 2>/dev/null && sync",
        opts.file_mib
    );
    api.exec(web, &["sh", "-c", write.as_str()])
        .await
        .context("writing the files")?;
    let server = match opts.image {
        // HTTP/1.1 with keep-alive, as real servers speak (http.server's
        // default is 1.0, a connection per request).
        BenchImage::Debian => {
            "exec python3 -c \"import functools, http.server as h; \
             h.SimpleHTTPRequestHandler.protocol_version = 'HTTP/1.1'; \
             h.ThreadingHTTPServer(('', 8080), functools.partial(h.SimpleHTTPRequestHandler, \
             directory='/home/sprite/www')).serve_forever()\""
        }
        BenchImage::Busybox => "exec busybox httpd -f -p 8080 -h /home/sprite/www",
    };
    let act = running.state.mgr.wake(web).await?;
    act.agent()
        .exec(ExecRequest {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("{server} </dev/null >/dev/null 2>&1"),
            ],
            max_run_after_disconnect_ms: Some(0),
            ..Default::default()
        })
        .await?
        .detach();
    let ip = act.addr();
    wait_listening(ip, 8080).await?;

    let port = running.addr.port();
    let host = format!("{web}.localhost");
    let via_proxy = reqwest::Client::builder()
        .timeout(WAIT * 5)
        .resolve(&host, running.addr)
        .build()?;
    let direct = reqwest::Client::builder().timeout(WAIT * 5).build()?;
    let proxy_base = format!("http://{host}:{port}");
    let direct_base = format!("http://{ip}:8080");
    let token = api.token.as_str();

    // Warm-up: the file into the page cache, connections set up.
    fetch(&direct, &format!("{direct_base}/big"), None).await?;
    let n = fetch(&via_proxy, &format!("{proxy_base}/big"), Some(token)).await?;
    ensure!(n == size, "the proxy returned {n} bytes, want {size}");

    progress(&format!(
        "proxy: {} MiB download ×{} via the sprite URL and direct, interleaved",
        opts.file_mib, opts.file_reps
    ));
    for _ in 0..opts.file_reps.max(1) {
        cancel::check()?;
        for (client, base, tok, out, cpu, errors) in [
            (
                &via_proxy,
                &proxy_base,
                Some(token),
                &mut res.proxy_mbs,
                &mut res.proxy_cpu,
                &mut res.proxy_errors,
            ),
            (
                &direct,
                &direct_base,
                None,
                &mut res.direct_mbs,
                &mut res.direct_cpu,
                &mut res.direct_errors,
            ),
        ] {
            let (t0, c0) = (Instant::now(), process_cpu());
            match fetch(client, &format!("{base}/big"), tok).await {
                Ok(n) if n == size => {
                    out.push(n as f64 / 1e6 / t0.elapsed().as_secs_f64());
                    cpu.push((process_cpu() - c0).as_secs_f64() / (n as f64 / f64::from(1u32 << 30)));
                }
                Ok(n) => {
                    tracing::warn!(bytes = n, "short download");
                    *errors += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "download");
                    *errors += 1;
                }
            }
        }
    }

    progress(&format!(
        "proxy: small GET ×{} via the sprite URL and direct, interleaved",
        opts.small_samples
    ));
    for _ in 0..opts.small_samples {
        cancel::check()?;
        for (client, base, tok, out, errors) in [
            (
                &via_proxy,
                &proxy_base,
                Some(token),
                &mut res.proxy_small,
                &mut res.proxy_errors,
            ),
            (
                &direct,
                &direct_base,
                None,
                &mut res.direct_small,
                &mut res.direct_errors,
            ),
        ] {
            let t0 = Instant::now();
            match fetch(client, &format!("{base}/small"), tok).await {
                Ok(6) => out.push(t0.elapsed()),
                Ok(_) | Err(_) => *errors += 1,
            }
        }
    }
    drop(act);
    Ok(())
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[(s.len() - 1) / 2])
}

fn lat_row(label: &str, samples: &[Duration], errors: usize, note: String) -> Vec<String> {
    let l: Option<Latency> = latency(samples);
    let cell = |f: fn(&Latency) -> Duration| l.as_ref().map_or("—".into(), |l| fmt_ms(f(l)));
    vec![
        label.into(),
        samples.len().to_string(),
        errors.to_string(),
        cell(|l| l.p50),
        cell(|l| l.p99),
        note,
    ]
}

fn ms_cell(ms: f64) -> String {
    fmt_ms(Duration::from_secs_f64(ms / 1e3))
}

/// Exec round trip: Rust client, Python SDK, the hosted reference.
pub fn exec_table(r: &ApiBenchResults) -> TextTable {
    let mut t = TextTable::new(
        &[
            "Exec `true` round trip",
            "n",
            "errors",
            "p50 ms",
            "p99 ms",
            "Note",
        ],
        1,
    );
    let vs_hosted = |p50_ms: f64| format!("{:.2}× the hosted p50", p50_ms / HOSTED_EXEC_P50_MS);
    let rust_note = latency(&r.exec_rust).map_or(String::new(), |l| vs_hosted(l.p50.as_secs_f64() * 1e3));
    t.push(lat_row(
        "Rust client (tokio-tungstenite): connect + upgrade → session_info → exit → close",
        &r.exec_rust,
        r.exec_rust_errors,
        rust_note,
    ));
    let fresh_p50 = latency(&r.exec_http_fresh).map(|l| l.p50);
    let pooled_note = match (latency(&r.exec_http_pooled).map(|l| l.p50), fresh_p50) {
        (Some(p), Some(f)) => format!(
            "{:+.1} ms vs a fresh connection (a fixed delay on the wire shows here)",
            (p.as_secs_f64() - f.as_secs_f64()) * 1e3
        ),
        _ => String::new(),
    };
    t.push(lat_row(
        "HTTP exec (POST /exec), one kept-alive connection, as SDKs pool them",
        &r.exec_http_pooled,
        r.exec_http_errors,
        pooled_note,
    ));
    t.push(lat_row(
        "HTTP exec (POST /exec), a fresh connection each",
        &r.exec_http_fresh,
        0,
        String::new(),
    ));
    match (&r.sdk, &r.sdk_error) {
        (Some(s), _) => t.push(vec![
            "Python SDK sprites-py: sprite.command(\"true\").run()".into(),
            s.n.to_string(),
            s.errors.to_string(),
            ms_cell(s.p50_ms),
            ms_cell(s.p99_ms),
            vs_hosted(s.p50_ms),
        ]),
        (None, e) => t.push(vec![
            "Python SDK sprites-py: sprite.command(\"true\").run()".into(),
            "0".into(),
            "—".into(),
            "—".into(),
            "—".into(),
            e.clone().unwrap_or_else(|| "skipped".into()),
        ]),
    }
    t.push(vec![
        "hosted Sprites service, per-call exec overhead (reference, not measured here)".into(),
        "".into(),
        "".into(),
        format!("≈ {HOSTED_EXEC_P50_MS:.0}"),
        "".into(),
        "p50 reported in sprites-py PR #26, over the internet".into(),
    ]);
    t
}

pub fn load_table(r: &ApiBenchResults, opts: &ApiBenchOptions) -> TextTable {
    let mut t = TextTable::new(&["Under load", "n", "errors", "p50 ms", "p99 ms", "Note"], 1);
    t.push(lat_row(
        &format!(
            "exec stream: sh -c 'for i in $(seq {}); do echo line $i; done', output checked",
            opts.stream_lines
        ),
        &r.load_stream,
        r.load_stream_errors,
        format!(
            "{} concurrent streams × {} execs{}",
            opts.streams,
            opts.stream_reps,
            r.load_stream_first_error
                .as_ref()
                .map_or(String::new(), |e| format!("; first error: {e}"))
        ),
    ));
    t.push(lat_row(
        "create + first exec (POST /v1/sprites, then exec true)",
        &r.load_create,
        r.load_create_errors,
        format!(
            "{} concurrent, during the streams{}",
            opts.creates,
            r.load_create_first_error
                .as_ref()
                .map_or(String::new(), |e| format!("; first error: {e}"))
        ),
    ));
    t.push(vec![
        "whole load phase (wall time)".into(),
        "".into(),
        "".into(),
        "".into(),
        "".into(),
        format!("{:.1} s", r.load_total.as_secs_f64()),
    ]);
    t
}

pub fn proxy_table(r: &ApiBenchResults, opts: &ApiBenchOptions) -> TextTable {
    let mut t = TextTable::new(
        &["Sprite URL proxy", "via sprite URL", "direct", "proxy / direct"],
        1,
    );
    let (p, d) = (median(&r.proxy_mbs), median(&r.direct_mbs));
    let mbs = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.0}"));
    let all = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
    t.push(vec![
        format!(
            "{} MiB download, MB/s (median of {})",
            opts.file_mib, opts.file_reps
        ),
        mbs(p),
        mbs(d),
        match (p, d) {
            (Some(p), Some(d)) if d > 0.0 => format!("{:.2}×", p / d),
            _ => "—".into(),
        },
    ]);
    t.push(vec![
        "  every download, MB/s".into(),
        all(&r.proxy_mbs),
        all(&r.direct_mbs),
        String::new(),
    ]);
    let (pc, dc) = (median(&r.proxy_cpu), median(&r.direct_cpu));
    let secs = |x: Option<f64>| x.map_or("—".into(), |x| format!("{x:.2}"));
    t.push(vec![
        "  CPU of this process (client + den) per GiB, s (median)".into(),
        secs(pc),
        secs(dc),
        match (pc, dc) {
            (Some(p), Some(d)) => format!("den: {:+.2} s/GiB", p - d),
            _ => "—".into(),
        },
    ]);
    let (lp, ld) = (latency(&r.proxy_small), latency(&r.direct_small));
    let cell = |l: Option<Latency>, f: fn(&Latency) -> Duration| l.map_or("—".into(), |l| fmt_ms(f(&l)));
    t.push(vec![
        format!("GET of a 6-byte file, p50 ms (n = {})", r.proxy_small.len()),
        cell(lp, |l| l.p50),
        cell(ld, |l| l.p50),
        match (lp, ld) {
            (Some(p), Some(d)) if !d.p50.is_zero() => {
                format!("{:.2}×", p.p50.as_secs_f64() / d.p50.as_secs_f64())
            }
            _ => "—".into(),
        },
    ]);
    t.push(vec![
        "GET of a 6-byte file, p99 ms".into(),
        cell(lp, |l| l.p99),
        cell(ld, |l| l.p99),
        String::new(),
    ]);
    t.push(vec![
        "errors".into(),
        r.proxy_errors.to_string(),
        r.direct_errors.to_string(),
        String::new(),
    ]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_script_expectation() {
        let (script, expect) = lines_script(3);
        assert_eq!(script, "for i in $(seq 3); do echo line $i; done");
        assert_eq!(expect, b"line 1\nline 2\nline 3\n");
    }

    #[test]
    fn query_encoding() {
        assert_eq!(enc("sh -c 'a$'"), "sh%20-c%20%27a%24%27");
    }

    #[test]
    fn median_of_three() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
