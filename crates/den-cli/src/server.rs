//! `den server`: run the API server with embedded defaults (SQLite and local
//! chunk storage under the data dir).
//!
//! Settings come from built-in defaults, then `--config FILE` (TOML), then
//! `DEN_*` environment variables, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use den_server::ServerConfig;
use tokio::signal::unix::{SignalKind, signal};

/// Default of the longest a graceful stop may take: sprites going cold (their grace and
/// unmount) plus the bounded flush to the object store.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Everything den keeps: metadata, chunks, sprites, tokens.
    #[arg(long, env = "DEN_DATA_DIR", default_value = "/var/lib/den")]
    pub data_dir: PathBuf,
    /// Base image cache, shared by every data dir on this host
    /// [default: /var/cache/den/images].
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// TOML file with any of: listen, url_domain, url_port, warm_after, cold_after, image,
    /// images_dir, run_dir, subnet, net_table, upstream_dns, uplinks, blocked, default_exec_timeout,
    /// max_awake, max_sprites, pool_size, runtime, create_rate ("10/60s"), max_connections, max_connections_per_ip,
    /// header_read_timeout, tls_cert, tls_key. Logs: DEN_LOG (filter), DEN_LOG_FORMAT=json.
    #[arg(long, env = "DEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Sprite URLs are http://NAME.DOMAIN:PORT/ [default: localhost].
    #[arg(long)]
    pub url_domain: Option<String>,
    /// Port shown in sprite URLs [default: the listen port].
    #[arg(long)]
    pub url_port: Option<u16>,
    /// Idle time before a running sprite is frozen (warm) [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warm_after: Option<Duration>,
    /// Idle time before a sprite is stopped (cold) [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cold_after: Option<Duration>,
    /// Base image: debian (default) or busybox.
    #[arg(long)]
    pub image: Option<String>,
    /// Engine of sprites created without `config.runtime`: native (default,
    /// den's containers) or gvisor (runsc's user-space kernel).
    #[arg(long)]
    pub runtime: Option<den_runtime::Runtime>,
    /// Keep chunks in S3: s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION. Credentials from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    pub object_store: Option<String>,
    /// Cluster mode: all metadata in this PostgreSQL database (postgres://…). Needs
    /// --object-store and --node-name.
    #[arg(long)]
    pub cluster_db: Option<String>,
    /// This node's unique name in the cluster.
    #[arg(long)]
    pub node_name: Option<String>,
    /// This node's region [default: default].
    #[arg(long)]
    pub region: Option<String>,
    /// How other nodes reach this node's API [default: http://LISTEN].
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Cluster: the most a running sprite loses if its host dies [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub durability_window: Option<Duration>,
    /// Cluster: a node silent this long is dead and its sprites move [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub node_ttl: Option<Duration>,
    /// Serve HTTPS: certificate chain (PEM, leaf first). A wildcard certificate for
    /// *.URL_DOMAIN also covers sprite URLs. Reloaded on SIGHUP. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Longest a graceful stop (SIGTERM) may take before den exits anyway
    /// with status 1; the next start recovers what is left [default: 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shutdown_limit: Option<Duration>,
    /// Cluster: the secret nodes authenticate each other with, one per line (the first
    /// signs, all verify) [default: made by the first node, kept in the cluster database].
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
}

pub fn run(args: ServerArgs) -> Result<()> {
    let shutdown_limit = args.shutdown_limit.unwrap_or(SHUTDOWN_LIMIT);
    let mut cfg = ServerConfig::new(&args.data_dir);
    if let Some(f) = &args.config {
        cfg.apply_file(f)?;
    }
    cfg.apply_env()?;
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.images_dir {
        cfg.images_dir = v;
    }
    if let Some(v) = args.url_domain {
        cfg.url_domain = v;
    }
    if args.url_port.is_some() {
        cfg.url_port = args.url_port;
    }
    if let Some(v) = args.warm_after {
        cfg.warm_after = v;
    }
    if let Some(v) = args.cold_after {
        cfg.cold_after = v;
    }
    if let Some(v) = args.image {
        anyhow::ensure!(
            v == "debian" || v == "busybox",
            "--image must be debian or busybox"
        );
        cfg.image = v;
    }
    if let Some(v) = args.runtime {
        cfg.runtime = v;
    }
    if args.object_store.is_some() {
        cfg.object_store = args.object_store;
    }
    if args.cluster_db.is_some() {
        cfg.cluster_db = args.cluster_db;
    }
    if args.node_name.is_some() {
        cfg.node_name = args.node_name;
    }
    if let Some(v) = args.region {
        cfg.region = v;
    }
    if args.advertise_url.is_some() {
        cfg.advertise_url = args.advertise_url;
    }
    if let Some(v) = args.durability_window {
        cfg.durability_window = v;
    }
    if let Some(v) = args.node_ttl {
        cfg.node_ttl = v;
    }
    if args.tls_cert.is_some() {
        cfg.tls_cert = args.tls_cert;
        cfg.tls_key = args.tls_key;
    }
    if args.cluster_secret_file.is_some() {
        cfg.cluster_secret_file = args.cluster_secret_file;
    }
    anyhow::ensure!(
        cfg.cold_after >= cfg.warm_after,
        "--cold-after must not be shorter than --warm-after"
    );
    let exe = std::env::current_exe().context("finding the den binary")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        eprintln!("den server: preparing (the first start builds the base image, about a minute)…");
        let running = den_server::start(cfg, exe).await?;
        if let Some(f) = &running.admin_token_file {
            eprintln!("admin token written to {} (mode 0600)", f.display());
        }
        let scheme = if running.tls.is_some() { "https" } else { "http" };
        eprintln!("den server listening on {scheme}://{}", running.addr);
        println!(
            "{}",
            serde_json::json!({"ready": true, "listen": running.addr.to_string()})
        );
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("den server: shutting down (sprites go cold, data is flushed)…");
        // Bounded: a disk that never lets go or an object store that never
        // comes back must not keep a stopping server (and its port) forever.
        // Whatever is left, the next start recovers; a second signal ends
        // the wait at once.
        tokio::select! {
            _ = running.stop() => {}
            _ = tokio::time::sleep(shutdown_limit) => {
                eprintln!("den server: shutdown did not finish within {shutdown_limit:?}; exiting (the next start cleans up)");
                std::process::exit(1);
            }
            _ = term.recv() => {
                eprintln!("den server: second signal; exiting now (the next start cleans up)");
                std::process::exit(1);
            }
            _ = int.recv() => {
                eprintln!("den server: second signal; exiting now (the next start cleans up)");
                std::process::exit(1);
            }
        }
        anyhow::Ok(())
    })
}
