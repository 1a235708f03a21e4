//! Server settings: built-in defaults, then a TOML file, then `DEN_*`
//! environment variables, then command-line flags (the CLI applies those).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// Where base images are cached unless configured otherwise: a host-wide
/// cache, so a second data dir does not build the image again.
pub const DEFAULT_IMAGES_DIR: &str = "/var/cache/den/images";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// SQLite metadata, chunk store, sprite records, tokens.
    pub data_dir: PathBuf,
    /// Base images, built once per host and shared by every data dir
    /// (versioned by recipe, built under a lock, so sharing is safe).
    pub images_dir: PathBuf,
    pub listen: SocketAddr,
    /// Sprite URLs are `http://<name>.<url_domain>:<port>/`.
    pub url_domain: String,
    /// Port in sprite URLs (default: the listen port).
    pub url_port: Option<u16>,
    /// Idle time before a running sprite is frozen.
    pub warm_after: Duration,
    /// Idle time before a sprite is stopped.
    pub cold_after: Duration,
    /// The same for gVisor sprites, which keep their processes through a
    /// cold sleep (the shorter of the two applies).
    pub cold_after_keeping_memory: Duration,
    /// `debian` (default) or `busybox` (tests).
    pub image: String,
    /// Run directory (mounts, sockets); short paths keep unix sockets valid.
    pub run_dir: Option<PathBuf>,
    /// Sprite subnet, nft table and prefixes; the defaults suit one server per host.
    pub subnet: Option<String>,
    pub net_table: Option<String>,
    pub net_ifprefix: Option<String>,
    pub net_netns_prefix: Option<String>,
    /// Upstream resolver of the sprites' DNS forwarder (default: the host's).
    pub upstream_dns: Option<SocketAddr>,
    /// Extra interfaces that carry sprite egress (default: the default route's).
    pub uplinks: Vec<String>,
    /// Destinations blocked for every sprite, replacing den's default list.
    pub blocked: Option<Vec<String>>,
    /// Networks attached to the host (its LAN) and the host's own addresses are blocked for
    /// sprites, except those inside these networks (e.g. `["0.0.0.0/0"]` for all).
    pub allowed_host_networks: Vec<String>,
    /// Hard cap on any command's run time (den extension), applied when a
    /// request gives none.
    pub default_exec_timeout: Option<Duration>,
    /// Quota: most sprites awake (running or warm) at once.
    pub max_awake: Option<usize>,
    /// Blank sprites kept booted, so that a create is served at once
    /// (0: none). Never counted by quotas, never listed.
    pub pool_size: usize,
    /// The engine of sprites created without `config.runtime`: `native`
    /// (den's containers) or `gvisor` (runsc).
    pub runtime: den_runtime::Runtime,
    /// Quota: most sprites in total.
    pub max_sprites: Option<usize>,
    /// Rate limit on creates: at most `count` per `window`.
    pub create_rate: Option<RateLimit>,
    /// Chunks in S3 (`s3://bucket[/prefix]?endpoint=URL&region=R`) instead
    /// of `DATA_DIR/objects`. Credentials come from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, never from the URL (it is logged).
    pub object_store: Option<String>,
    /// Cluster mode: PostgreSQL for all metadata (`postgres://…`).
    pub cluster_db: Option<String>,
    pub node_name: Option<String>,
    pub region: String,
    /// How other nodes reach this one (`http://host:port`); defaults to the
    /// listen address.
    pub advertise_url: Option<String>,
    /// Cluster durability window: how much a running sprite's host may lose
    /// if it dies (time between sync points).
    pub durability_window: Duration,
    /// A node silent for this long is dead and its sprites may move.
    pub node_ttl: Duration,
    /// The cluster secret(s) nodes prove their requests to each other with,
    /// one per line, the first signing; without it the first node makes
    /// one and stores it in the cluster database.
    pub cluster_secret_file: Option<PathBuf>,
    /// API connections: caps in total and per client address, and the
    /// deadline for a request head (also the keep-alive idle timeout); see
    /// [`crate::listener`]. Behind a reverse proxy every client shares the
    /// proxy's address: raise `max_connections_per_ip` there.
    pub connections: crate::listener::ConnLimits,
    /// HTTPS on the listen port: the certificate chain and key (PEM), both
    /// or neither; see [`crate::tls`]. Reloaded on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// `count` events per `window` (TOML/env form `"10/60s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub window: Duration,
}

impl std::str::FromStr for RateLimit {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError(format!("rate {s:?}: use COUNT/DURATION, e.g. 10/60s"));
        let (n, w) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let window = humantime::parse_duration(w.trim()).map_err(|_| bad())?;
        if count == 0 || window.is_zero() {
            return Err(bad());
        }
        Ok(RateLimit { count, window })
    }
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            images_dir: DEFAULT_IMAGES_DIR.into(),
            listen: "127.0.0.1:8080".parse().expect("literal"),
            url_domain: "localhost".into(),
            url_port: None,
            warm_after: Duration::from_secs(30),
            cold_after: Duration::from_secs(600),
            cold_after_keeping_memory: Duration::from_secs(120),
            image: "debian".into(),
            run_dir: None,
            subnet: None,
            net_table: None,
            net_ifprefix: None,
            net_netns_prefix: None,
            upstream_dns: None,
            uplinks: Vec::new(),
            blocked: None,
            allowed_host_networks: Vec::new(),
            default_exec_timeout: None,
            max_awake: None,
            pool_size: 2,
            runtime: den_runtime::Runtime::Native,
            max_sprites: None,
            create_rate: None,
            object_store: None,
            cluster_db: None,
            node_name: None,
            region: "default".into(),
            advertise_url: None,
            durability_window: Duration::from_secs(30),
            node_ttl: Duration::from_secs(10),
            cluster_secret_file: None,
            connections: crate::listener::ConnLimits::default(),
            tls_cert: None,
            tls_key: None,
        }
    }

    /// The chunk store: local under the data dir, or S3 from `object_store`.
    pub fn object_backend(&self) -> Result<den_store::ObjectBackend, ConfigError> {
        match &self.object_store {
            None => Ok(den_store::ObjectBackend::Local {
                dir: self.data_dir.join("objects"),
            }),
            Some(u) => parse_object_store(u),
        }
    }

    /// Apply a TOML file (every key optional, names as the fields).
    pub fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let f: FileConfig =
            toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        f.apply(self)
    }

    /// Apply `DEN_LISTEN`, `DEN_URL_DOMAIN`, `DEN_WARM_AFTER`, … (same names as the file keys).
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let mut f = FileConfig::default();
        let var = |k: &str| std::env::var(format!("DEN_{}", k.to_uppercase())).ok();
        f.listen = var("listen");
        f.url_domain = var("url_domain");
        f.url_port = var("url_port")
            .map(|v| {
                v.parse()
                    .map_err(|_| ConfigError(format!("DEN_URL_PORT={v}: not a port")))
            })
            .transpose()?;
        f.warm_after = var("warm_after");
        f.cold_after = var("cold_after");
        f.cold_after_keeping_memory = var("cold_after_keeping_memory");
        f.image = var("image");
        f.run_dir = var("run_dir").map(PathBuf::from);
        f.images_dir = var("images_dir").map(PathBuf::from);
        f.upstream_dns = var("upstream_dns");
        f.default_exec_timeout = var("default_exec_timeout");
        let num = |k: &str| -> Result<Option<usize>, ConfigError> {
            var(k)
                .map(|v| {
                    v.parse()
                        .map_err(|_| ConfigError(format!("DEN_{}={v}: not a number", k.to_uppercase())))
                })
                .transpose()
        };
        f.max_awake = num("max_awake")?;
        f.pool_size = num("pool_size")?;
        f.runtime = var("runtime");
        f.max_sprites = num("max_sprites")?;
        f.max_connections = num("max_connections")?;
        f.max_connections_per_ip = num("max_connections_per_ip")?;
        f.header_read_timeout = var("header_read_timeout");
        f.create_rate = var("create_rate");
        f.subnet = var("subnet");
        f.net_table = var("net_table");
        f.net_ifprefix = var("net_ifprefix");
        f.net_netns_prefix = var("net_netns_prefix");
        f.object_store = var("object_store");
        f.cluster_db = var("cluster_db");
        f.node_name = var("node_name");
        f.region = var("region");
        f.advertise_url = var("advertise_url");
        f.durability_window = var("durability_window");
        f.node_ttl = var("node_ttl");
        f.tls_cert = var("tls_cert").map(PathBuf::from);
        f.tls_key = var("tls_key").map(PathBuf::from);
        f.cluster_secret_file = var("cluster_secret_file").map(PathBuf::from);
        f.apply(self)
    }

    /// Port that appears in sprite URLs.
    pub fn public_port(&self) -> u16 {
        self.url_port.unwrap_or(self.listen.port())
    }

    /// Whether den serves HTTPS itself.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The URL of the sprite with this key: its first DNS label is
    /// [`url_label`]; `http://`, or `https://` with TLS, and the scheme's
    /// default port left out.
    pub fn sprite_url(&self, key: &str) -> String {
        let label = url_label(key);
        let port = self.public_port();
        let (scheme, default_port) = if self.tls() { ("https", 443) } else { ("http", 80) };
        if port == default_port {
            format!("{scheme}://{label}.{}/", self.url_domain)
        } else {
            format!("{scheme}://{label}.{}:{port}/", self.url_domain)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    url_domain: Option<String>,
    url_port: Option<u16>,
    warm_after: Option<String>,
    cold_after: Option<String>,
    cold_after_keeping_memory: Option<String>,
    image: Option<String>,
    run_dir: Option<PathBuf>,
    images_dir: Option<PathBuf>,
    subnet: Option<String>,
    net_table: Option<String>,
    net_ifprefix: Option<String>,
    net_netns_prefix: Option<String>,
    upstream_dns: Option<String>,
    uplinks: Option<Vec<String>>,
    blocked: Option<Vec<String>>,
    allowed_host_networks: Option<Vec<String>>,
    default_exec_timeout: Option<String>,
    max_awake: Option<usize>,
    pool_size: Option<usize>,
    runtime: Option<String>,
    max_sprites: Option<usize>,
    create_rate: Option<String>,
    object_store: Option<String>,
    cluster_db: Option<String>,
    node_name: Option<String>,
    region: Option<String>,
    advertise_url: Option<String>,
    durability_window: Option<String>,
    node_ttl: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    header_read_timeout: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

/// `s3://bucket[/prefix]?endpoint=URL&region=R`.
pub fn parse_object_store(u: &str) -> Result<den_store::ObjectBackend, ConfigError> {
    let bad = |why: &str| ConfigError(format!("object store {u:?}: {why}"));
    let parsed = url::Url::parse(u).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "s3" {
        return Err(bad("use s3://bucket?endpoint=URL&region=REGION"));
    }
    let bucket = parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket"))?;
    let mut endpoint = None;
    let mut region = "us-east-1".to_string();
    for (k, v) in parsed.query_pairs() {
        match &*k {
            "endpoint" => endpoint = Some(v.into_owned()),
            "region" => region = v.into_owned(),
            other => return Err(bad(&format!("unknown parameter {other:?} (endpoint, region)"))),
        }
    }
    let endpoint = endpoint.ok_or_else(|| bad("endpoint=URL is required"))?;
    let key = |k: &str| std::env::var(k).map_err(|_| bad(&format!("set {k} in the environment")));
    Ok(den_store::ObjectBackend::S3 {
        endpoint,
        bucket: bucket.to_string(),
        access_key: key("AWS_ACCESS_KEY_ID")?,
        secret_key: key("AWS_SECRET_ACCESS_KEY")?,
        region,
        prefix: parsed.path().trim_matches('/').to_string(),
    })
}

fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v).map_err(|e| ConfigError(format!("{key} = {v:?}: {e}")))
}

impl FileConfig {
    fn apply(self, c: &mut ServerConfig) -> Result<(), ConfigError> {
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.listen {
            c.listen = v
                .parse()
                .map_err(|e| ConfigError(format!("listen = {v:?}: {e}")))?;
        }
        if let Some(v) = self.url_domain {
            c.url_domain = v;
        }
        if self.url_port.is_some() {
            c.url_port = self.url_port;
        }
        if let Some(v) = self.warm_after {
            c.warm_after = duration("warm_after", &v)?;
        }
        if let Some(v) = self.cold_after_keeping_memory {
            c.cold_after_keeping_memory = duration("cold_after_keeping_memory", &v)?;
        }
        if let Some(v) = self.cold_after {
            c.cold_after = duration("cold_after", &v)?;
        }
        if let Some(v) = self.image {
            if v != "debian" && v != "busybox" {
                return Err(ConfigError(format!("image = {v:?}: use debian or busybox")));
            }
            c.image = v;
        }
        if self.run_dir.is_some() {
            c.run_dir = self.run_dir;
        }
        if let Some(v) = self.images_dir {
            c.images_dir = v;
        }
        c.subnet = self.subnet.or(c.subnet.take());
        c.net_table = self.net_table.or(c.net_table.take());
        c.net_ifprefix = self.net_ifprefix.or(c.net_ifprefix.take());
        c.net_netns_prefix = self.net_netns_prefix.or(c.net_netns_prefix.take());
        if let Some(v) = self.upstream_dns {
            c.upstream_dns = Some(
                v.parse()
                    .map_err(|e| ConfigError(format!("upstream_dns = {v:?}: {e}")))?,
            );
        }
        if let Some(v) = self.uplinks {
            c.uplinks = v;
        }
        if let Some(v) = self.allowed_host_networks {
            c.allowed_host_networks = v;
        }
        if self.blocked.is_some() {
            c.blocked = self.blocked;
        }
        if let Some(v) = self.default_exec_timeout {
            c.default_exec_timeout = Some(duration("default_exec_timeout", &v)?);
        }
        if self.max_awake.is_some() {
            c.max_awake = self.max_awake;
        }
        if let Some(n) = self.pool_size {
            c.pool_size = n;
        }
        if let Some(v) = self.runtime {
            c.runtime = v.parse().map_err(|e| ConfigError(format!("runtime: {e}")))?;
        }
        if self.max_sprites.is_some() {
            c.max_sprites = self.max_sprites;
        }
        if let Some(v) = self.create_rate {
            c.create_rate = Some(v.parse()?);
        }
        if self.object_store.is_some() {
            c.object_store = self.object_store;
        }
        if self.cluster_db.is_some() {
            c.cluster_db = self.cluster_db;
        }
        if self.node_name.is_some() {
            c.node_name = self.node_name;
        }
        if let Some(v) = self.region {
            c.region = v;
        }
        if self.advertise_url.is_some() {
            c.advertise_url = self.advertise_url;
        }
        if let Some(v) = self.durability_window {
            c.durability_window = duration("durability_window", &v)?;
        }
        if let Some(v) = self.node_ttl {
            c.node_ttl = duration("node_ttl", &v)?;
        }
        if self.cluster_secret_file.is_some() {
            c.cluster_secret_file = self.cluster_secret_file;
        }
        if let Some(v) = self.max_connections {
            c.connections.max_connections = v;
        }
        if let Some(v) = self.max_connections_per_ip {
            c.connections.max_connections_per_ip = v;
        }
        if let Some(v) = self.header_read_timeout {
            c.connections.header_read_timeout = duration("header_read_timeout", &v)?;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls_key = self.tls_key;
        }
        let conns = &c.connections;
        if conns.max_connections == 0
            || conns.max_connections_per_ip == 0
            || conns.header_read_timeout.is_zero()
        {
            return Err(ConfigError(
                "max_connections, max_connections_per_ip and header_read_timeout must be above zero".into(),
            ));
        }
        if c.cold_after < c.warm_after {
            return Err(ConfigError(format!(
                "cold_after ({:?}) must not be shorter than warm_after ({:?})",
                c.cold_after, c.warm_after
            )));
        }
        Ok(())
    }
}

/// The first DNS label of a sprite's URL, in Sprites' form `<name>-<org>`.
/// Sprites of the default organisation keep the `<name>` they had before
/// organisations existed (and answer to `<name>-<org>` too).
pub fn url_label(key: &str) -> String {
    let (org, name) = den_sprite::key_parts(key);
    if org == den_sprite::DEFAULT_ORG {
        name.to_string()
    } else {
        format!("{name}-{org}")
    }
}

/// The key of the sprite a URL label names, given the organisations that
/// exist: `<name>-<org>` when `<org>` is one (org slugs have no hyphen, so
/// the split is at the last one), else `<name>` in the default organisation.
/// `None` when the label names no sprite at all.
pub fn key_of_url_label(label: &str, org_exists: impl Fn(&str) -> bool) -> Option<String> {
    den_sprite::validate_name(label).ok()?;
    if let Some((name, org)) = label.rsplit_once('-')
        && den_sprite::validate_name(name).is_ok()
        && org_exists(org)
    {
        return Some(den_sprite::sprite_key(org, name));
    }
    Some(label.to_string())
}

#[cfg(test)]
mod url_label_tests {
    use super::*;

    #[test]
    fn labels_name_sprites_in_their_organisation() {
        let orgs = |o: &str| ["acme", "den"].contains(&o);
        assert_eq!(key_of_url_label("web-acme", orgs).as_deref(), Some("web@acme"));
        assert_eq!(
            key_of_url_label("my-web-acme", orgs).as_deref(),
            Some("my-web@acme")
        );
        assert_eq!(key_of_url_label("web-den", orgs).as_deref(), Some("web"));
        // No such organisation: a default-organisation name with a hyphen.
        assert_eq!(key_of_url_label("web-beta", orgs).as_deref(), Some("web-beta"));
        assert_eq!(key_of_url_label("web", orgs).as_deref(), Some("web"));
        // A key spelled in a label reaches nothing.
        for bad in ["web@acme", "web.x", "", "-acme", "Web"] {
            assert_eq!(key_of_url_label(bad, orgs), None, "{bad:?}");
        }
        for key in ["web@acme", "my-web@acme", "web"] {
            assert_eq!(key_of_url_label(&url_label(key), orgs).as_deref(), Some(key));
        }
    }
}
