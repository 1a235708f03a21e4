//! HTTPS on den's own port (`tls_cert`/`tls_key`): the official SDKs over
//! `https://` with a test CA, sprite URLs through a wildcard certificate,
//! a certificate reload on SIGHUP under live traffic, and the handshake
//! deadline. Every certificate is made here, by a test CA that exists only
//! for the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{TestServer, WAIT};

/// Sprite URLs are `https://<name>.den.test:<port>/`; the server
/// certificate covers them with `*.den.test`.
const DOMAIN: &str = "den.test";

/// A CA made for one test, and the files of the server certificate in use.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "den test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let ca = params.self_signed(&key)?;
        Ok(Pki {
            issuer: Issuer::new(params, key),
            ca_pem: ca.pem(),
            dir: tempfile::Builder::new().prefix("den-tls-test-").tempdir()?,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issue a server certificate for `localhost`, `127.0.0.1` and
    /// `*.den.test` with this serial, and put it (and its key) in place as
    /// `server.crt`/`server.key` by rename, as an operator's renewal would.
    /// The certificate's DER.
    fn issue(&self, serial: u64) -> Result<CertificateDer<'static>> {
        let mut params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            format!("*.{DOMAIN}"),
        ])?;
        params.serial_number = Some(serial.into());
        params
            .distinguished_name
            .push(DnType::CommonName, format!("den test server {serial}"));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        self.replace("server.crt", &cert.pem())?;
        self.replace("server.key", &key.serialize_pem())?;
        Ok(cert.der().clone())
    }

    fn replace(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.path(&format!("{name}.new"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.path(name))?;
        Ok(())
    }

    fn ca_file(&self) -> Result<PathBuf> {
        let p = self.path("ca.crt");
        std::fs::write(&p, &self.ca_pem)?;
        Ok(p)
    }

    /// A rustls client trusting only this CA (HTTP/1.1 only, as den speaks).
    fn client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A reqwest client trusting only this CA.
    fn reqwest(&self, token: Option<&str>) -> Result<reqwest::Client> {
        let mut h = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse()?);
        }
        Ok(reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(self.ca_pem.as_bytes())?])
            .default_headers(h)
            .timeout(WAIT)
            .build()?)
    }
}

async fn start_tls(pki: &Pki, tweak: impl FnOnce(&mut den_server::ServerConfig)) -> Result<TestServer> {
    let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
    TestServer::start_with(move |cfg| {
        cfg.tls_cert = Some(cert);
        cfg.tls_key = Some(key);
        cfg.url_domain = DOMAIN.into();
        tweak(cfg);
    })
    .await
}

/// A fresh TLS connection to the server, with `sni` as the server name.
async fn tls_connect(pki: &Pki, addr: SocketAddr, sni: &str) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_string())?;
    let tls = tokio::time::timeout(WAIT, TlsConnector::from(pki.client_config()?).connect(name, tcp))
        .await
        .context("TLS handshake timed out")??;
    Ok(tls)
}

/// The leaf certificate a new connection is served.
async fn served_cert(pki: &Pki, addr: SocketAddr) -> Result<CertificateDer<'static>> {
    let tls = tls_connect(pki, addr, "localhost").await?;
    let (_, conn) = tls.get_ref();
    ensure!(
        conn.alpn_protocol() == Some(b"http/1.1"),
        "ALPN: {:?}",
        conn.alpn_protocol()
    );
    let chain = conn.peer_certificates().context("no certificate")?;
    Ok(chain[0].clone().into_owned())
}

fn running(s: &TestServer) -> &den_server::Running {
    s.running.as_ref().expect("running")
}

/// (a) The official Python and JavaScript SDKs over `https://`, trusting
/// the test CA through the usual environment variables only.
pub async fn sdks_over_https() -> Result<()> {
    let pki = Pki::new()?;
    pki.issue(1)?;
    let s = start_tls(&pki, |_| {}).await?;
    ensure!(s.url.starts_with("https://"), "{}", s.url);
    let ca = pki.ca_file()?;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk");

    let mut py = Command::new(crate::sdk::python());
    py.args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(format!("{dir}/test_tls_py.py"))
        .env("SSL_CERT_FILE", &ca);
    crate::sdk::run_suite(&s, py, "pytest over https")?;

    let (node, sdk) = crate::sdk::node_and_sdk();
    let mut js = Command::new(node);
    // A failed test must not leave node waiting on open sockets.
    js.args([
        "--test",
        "--test-timeout=60000",
        "--test-force-exit",
        "--test-reporter=spec",
    ])
    .arg(format!("{dir}/test_tls_js.mjs"))
    .env("DEN_SPRITES_JS", sdk)
    .env("NODE_EXTRA_CA_CERTS", &ca);
    crate::sdk::run_suite(&s, js, "node --test over https")?;
    s.stop().await;
    Ok(())
}

/// (b) A sprite URL over HTTPS through the wildcard certificate: the
/// program in the sprite sees `X-Forwarded-Proto: https` (even when the
/// client claims otherwise), and the API shows the `https://` URL.
pub async fn sprite_url_over_https() -> Result<()> {
    let pki = Pki::new()?;
    pki.issue(1)?;
    let s = start_tls(&pki, |_| {}).await?;
    let port = s.cfg.listen.port();
    let c = pki.reqwest(Some(&s.token))?;
    let r = c
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "web"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {}", r.status());
    let v: Value = r.json().await?;
    let want = format!("https://web.{DOMAIN}:{port}/");
    ensure!(v["url"] == want.as_str(), "url {}, want {want}", v["url"]);
    crate::proxy::put_file(&s, "web", "/srv/www/cgi-bin/env", crate::proxy::ENV_CGI).await?;
    crate::proxy::serve(&s, "web", "busybox httpd -f -p 8080 -h /srv/www", 8080).await?;

    // The sprite host resolves to den's address; rustls checks the name
    // against `*.den.test`.
    let host = format!("web.{DOMAIN}");
    let c = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())?])
        .resolve(&host, s.cfg.listen)
        .timeout(WAIT)
        .build()?;
    let r = c
        .get(format!("{want}cgi-bin/env"))
        .bearer_auth(&s.token)
        .header("x-forwarded-proto", "http")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let env = r.text().await?;
    let var = |k: &str| crate::proxy::env_var(&env, k).map(str::to_string);
    ensure!(var("HTTP_X_FORWARDED_PROTO").as_deref() == Some("https"), "{env}");
    ensure!(var("HTTP_HOST") == Some(format!("{host}:{port}")), "{env}");
    ensure!(var("HTTP_AUTHORIZATION").is_none(), "token leaked: {env}");

    // An upgrade (WebSocket-style) through a sprite URL over TLS: bytes
    // flow both ways through den's TLS and the splice to the sprite.
    let r = pki
        .reqwest(Some(&s.token))?
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "up"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {}", r.status());
    crate::proxy::put_file(&s, "up", "/srv/upgrade.sh", crate::proxy::UPGRADE_ECHO).await?;
    crate::proxy::serve(&s, "up", "busybox nc -ll -p 8080 -e /srv/upgrade.sh", 8080).await?;
    let mut tls = tls_connect(&pki, s.cfg.listen, &format!("up.{DOMAIN}")).await?;
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: up.{DOMAIN}:{port}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\
         Authorization: Bearer {}\r\n\r\n",
        s.token
    );
    tls.write_all(req.as_bytes()).await?;
    let head = crate::proxy::read_head(&mut tls).await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    let data = crate::proxy::pattern(256 << 10);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut back = vec![0u8; data.len()];
    let (w, r) = tokio::join!(wr.write_all(&data), async {
        tokio::time::timeout(WAIT, rd.read_exact(&mut back)).await
    });
    w?;
    r??;
    ensure!(back == data, "256 KiB through the upgraded TLS connection differ");

    // A client that does not trust the CA gets no answer at all.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only(Vec::<reqwest::Certificate>::new())
        .resolve(&host, s.cfg.listen)
        .timeout(WAIT)
        .build()?;
    ensure!(
        untrusting.get(&want).send().await.is_err(),
        "a client without the CA must fail the handshake"
    );
    s.stop().await;
    Ok(())
}

/// One HTTP/1.1 connection kept open across the test.
struct Kept {
    sender: hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
}

impl Kept {
    async fn open(pki: &Pki, addr: SocketAddr) -> Result<Kept> {
        let tls = tls_connect(pki, addr, "localhost").await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Kept { sender })
    }

    async fn health(&mut self) -> Result<()> {
        let req = hyper::Request::get("/v1/health")
            .header("host", "localhost")
            .body(Empty::new())?;
        let r = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .context("kept-alive request timed out")??;
        ensure!(r.status() == 200, "{}", r.status());
        r.into_body().collect().await?;
        Ok(())
    }
}

type TlsWs = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

/// An exec WebSocket running `cat` over its own TLS connection; past its
/// `session_info` frame.
async fn exec_cat(pki: &Pki, s: &TestServer) -> Result<TlsWs> {
    let tls = tls_connect(pki, s.cfg.listen, "localhost").await?;
    let mut req = s
        .ws("/v1/sprites/ex/exec?cmd=cat&stdin=true")
        .into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", s.token).parse()?);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tls))
        .await
        .context("websocket handshake timed out")??;
    match next_frame(&mut ws).await? {
        Message::Text(t) if t.contains("session_info") => Ok(ws),
        other => bail!("first frame: {other:?}"),
    }
}

async fn next_frame(ws: &mut TlsWs) -> Result<Message> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .context("no frame in time")?
        {
            None => bail!("websocket ended"),
            Some(m) => match m? {
                Message::Ping(_) | Message::Pong(_) => {}
                m => return Ok(m),
            },
        }
    }
}

/// Send a line to `cat` and read it back from stdout.
async fn echo(ws: &mut TlsWs, line: &str) -> Result<()> {
    let mut frame = vec![0x00];
    frame.extend_from_slice(line.as_bytes());
    ws.send(Message::Binary(frame.into())).await?;
    let mut got = Vec::new();
    while got.len() < line.len() {
        match next_frame(ws).await? {
            Message::Binary(b) if b.first() == Some(&1) => got.extend_from_slice(&b[1..]),
            other => bail!("waiting for {line:?}: {other:?}"),
        }
    }
    ensure!(got == line.as_bytes(), "echo: {got:?}");
    Ok(())
}

/// `den_tls_reloads_total{result="…"}` as `/metrics` shows it.
async fn reloads(c: &reqwest::Client, s: &TestServer, result: &str) -> Result<u64> {
    let text = c.get(s.api("/metrics")).send().await?.text().await?;
    let key = format!("den_tls_reloads_total{{result=\"{result}\"}}");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map(|v| v.trim().parse().unwrap_or(0))
        .unwrap_or(0))
}

fn sighup() -> Result<()> {
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP)?;
    Ok(())
}

/// (c) SIGHUP swaps the certificate under live traffic: a loop of
/// requests on pooled connections, a kept-alive connection and an open
/// exec WebSocket all go on without a single failure, new connections get
/// the new certificate, and a reload with a broken key keeps the current
/// one.
pub async fn sighup_reload_under_traffic() -> Result<()> {
    let pki = Pki::new()?;
    let first = pki.issue(1)?;
    let s = start_tls(&pki, |_| {}).await?;
    let addr = s.cfg.listen;
    let c = pki.reqwest(Some(&s.token))?;
    let r = c
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": "ex"}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create: {}", r.status());
    ensure!(served_cert(&pki, addr).await? == first, "the first certificate");

    let mut kept = Kept::open(&pki, addr).await?;
    kept.health().await?;
    let mut ws = exec_cat(&pki, &s).await?;
    echo(&mut ws, "before\n").await?;

    // Requests on a pooled client until told to stop; bounded in count.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let looper = {
        let (c, url) = (c.clone(), s.api("/v1/sprites/ex"));
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                    }
                }
            }
            errors
        })
    };
    let wait_ok = |n: u64| {
        let ok = ok.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while ok.load(Ordering::Relaxed) < n {
                ensure!(Instant::now() < deadline, "the request loop stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_ok(20).await?;

    let second = pki.issue(2)?;
    sighup()?;
    let deadline = Instant::now() + WAIT;
    while served_cert(&pki, addr).await? != second {
        ensure!(
            Instant::now() < deadline,
            "new connections never got the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        running(&s).tls.as_ref().expect("tls").chain()[0] == second,
        "the server's view"
    );
    let seen = ok.load(Ordering::Relaxed);
    wait_ok(seen + 20).await?;
    kept.health().await?;
    echo(&mut ws, "after the reload\n").await?;

    // A broken key: the reload fails, is counted, and the second
    // certificate stays in service.
    let errors_before = reloads(&c, &s, "error").await?;
    pki.replace(
        "server.key",
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )?;
    sighup()?;
    let deadline = Instant::now() + WAIT;
    while reloads(&c, &s, "error").await? <= errors_before {
        ensure!(Instant::now() < deadline, "the failed reload was never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        served_cert(&pki, addr).await? == second,
        "a failed reload must keep the certificate in service"
    );
    let seen = ok.load(Ordering::Relaxed);
    wait_ok(seen + 20).await?;
    kept.health().await?;
    echo(&mut ws, "after the failed reload\n").await?;

    stop.store(true, Ordering::Relaxed);
    let errors = looper.await?;
    ensure!(
        failed.load(Ordering::Relaxed) == 0,
        "{} of {} requests failed: {:?}",
        errors.len(),
        ok.load(Ordering::Relaxed) + errors.len() as u64,
        &errors[..errors.len().min(3)]
    );
    println!(
        "{} requests during two reloads, none failed",
        ok.load(Ordering::Relaxed)
    );
    ws.send(Message::Binary(vec![0x04].into())).await?;
    s.stop().await;
    Ok(())
}

/// Whether the server closes `tcp` (EOF or reset) within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Result<bool> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, tcp.read(&mut buf)).await {
        Err(_) => Ok(false),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(true),
        Ok(Ok(n)) => bail!("the server sent {n} bytes to a client that said nothing"),
    }
}

/// (d) The handshake runs under the header-read deadline, in the
/// connection's task: sockets that send nothing hold their slots (the
/// per-address cap counts them) only until the deadline, and meanwhile do
/// not hold up anyone else's handshake.
pub async fn silent_tls_client_is_closed_by_the_deadline() -> Result<()> {
    let pki = Pki::new()?;
    pki.issue(1)?;
    let deadline = Duration::from_secs(2);
    let s = start_tls(&pki, |cfg| {
        cfg.connections.header_read_timeout = deadline;
        cfg.connections.max_connections_per_ip = 3;
    })
    .await?;
    let addr = s.cfg.listen;
    let t0 = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(addr).await?);
    }
    // Two silent sockets do not hold up a third client's handshake.
    let mut kept = Kept::open(&pki, addr).await?;
    kept.health().await?;
    ensure!(
        t0.elapsed() < deadline,
        "a handshake waited for silent clients: {:?}",
        t0.elapsed()
    );
    drop(kept);
    // Slots are given back when a connection closes, not at once: wait
    // until the third slot is free, then fill it with a silent socket.
    let mut third = None;
    let until = Instant::now() + WAIT;
    while third.is_none() {
        let mut tcp = TcpStream::connect(addr).await?;
        if !closed_within(&mut tcp, Duration::from_millis(200)).await? {
            third = Some(tcp);
        }
        ensure!(Instant::now() < until, "the third slot never came back");
    }
    silent.extend(third);
    // Over the per-address cap: closed at once, before any deadline.
    let mut over = TcpStream::connect(addr).await?;
    ensure!(
        closed_within(&mut over, deadline / 2).await?,
        "a connection over the cap stayed open"
    );
    // Every silent socket is closed by the deadline (with some slack).
    for tcp in &mut silent {
        ensure!(
            closed_within(tcp, deadline + WAIT).await?,
            "a client that sent nothing was never closed"
        );
    }
    ensure!(
        t0.elapsed() >= deadline,
        "closed before the deadline: {:?}",
        t0.elapsed()
    );
    // Their slots are free again.
    let mut kept = Kept::open(&pki, addr).await?;
    kept.health().await?;
    s.stop().await;
    Ok(())
}

/// A server whose key does not match its certificate does not start, and
/// says which files are wrong.
pub async fn mismatched_key_stops_the_start() -> Result<()> {
    let pki = Pki::new()?;
    pki.issue(1)?;
    let other = KeyPair::generate()?;
    pki.replace("server.key", &other.serialize_pem())?;
    let err = match start_tls(&pki, |_| {}).await {
        Ok(s) => {
            s.stop().await;
            bail!("started with a key of another certificate");
        }
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("does not belong to certificate") && err.contains(&path_str(&pki.path("server.key"))),
        "{err}"
    );
    Ok(())
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
