//! Starting and stopping the server.

use std::sync::Arc;
use std::time::Duration;

use den_net::{Ipv4Net, NetConfig};
use den_sprite::{ImageSource, ManagerConfig};
use den_store::Store;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::auth::ensure_admin_token;
use crate::config::ServerConfig;
use crate::state::AppState;
use crate::tls::Tls;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(#[from] crate::error::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] den_store::StoreError),
    #[error("sprites: {0}")]
    Sprite(#[from] den_sprite::SpriteError),
    #[error("tokens: {0}")]
    Tokens(#[from] crate::auth::TokenError),
    #[error("cluster: {0}")]
    Cluster(#[from] den_cluster::ClusterError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How long shutdown waits for uploads of local-only data (the data is safe
/// in the local cache either way; the next start uploads the rest).
const FLUSH_AT_SHUTDOWN: Duration = Duration::from_secs(30);

/// A started server: its address, admin token file, and a handle to stop it.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub admin_token_file: Option<std::path::PathBuf>,
    pub state: AppState,
    /// The certificate in service, when den serves HTTPS.
    pub tls: Option<Tls>,
    task: tokio::task::JoinHandle<()>,
    store: Store,
}

fn net_config(cfg: &ServerConfig) -> Result<NetConfig, ServerError> {
    let upstream = cfg
        .upstream_dns
        .or_else(den_sprite::host_upstream_dns)
        .unwrap_or_else(|| "127.0.0.1:53".parse().expect("literal"));
    let mut net = NetConfig::new(upstream);
    let bad = |what: &str, v: &str| crate::error::ConfigError(format!("{what} = {v:?} is invalid"));
    if let Some(s) = &cfg.subnet {
        net.subnet = s.parse::<Ipv4Net>().map_err(|_| bad("subnet", s))?;
    }
    if let Some(t) = &cfg.net_table {
        net.table = t.clone();
    }
    if let Some(p) = &cfg.net_ifprefix {
        net.ifprefix = p.clone();
    }
    if let Some(p) = &cfg.net_netns_prefix {
        net.netns_prefix = p.clone();
    }
    if !cfg.uplinks.is_empty() {
        net.uplinks = cfg.uplinks.clone();
    }
    net.allowed_host_networks = cfg
        .allowed_host_networks
        .iter()
        .map(|s| s.parse::<Ipv4Net>().map_err(|_| bad("allowed_host_networks", s)))
        .collect::<Result<_, _>>()?;
    if let Some(b) = &cfg.blocked {
        net.blocked = b
            .iter()
            .map(|s| s.parse::<Ipv4Net>().map_err(|_| bad("blocked", s)))
            .collect::<Result<_, _>>()?;
    }
    Ok(net)
}

/// Raise this process's soft limit on open files to the hard limit, and
/// return the new soft limit. Every API connection, sprite and chunk file
/// takes a handle; the usual soft default of 1,024 runs out under a few
/// thousand idle connections (`accept`: Too many open files).
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// The whole app over `state`: the API and sprite URLs, behind the check
/// that strips peer-only headers a peer did not prove
/// ([`crate::forward::authenticate_peer`]); outermost, so no route sees
/// an unproven claim.
pub fn app(state: AppState) -> axum::Router {
    crate::api::router(state.clone()).layer(axum::middleware::from_fn_with_state(
        state,
        crate::forward::authenticate_peer,
    ))
}

/// Open everything under `cfg.data_dir`, bind, and serve in the background.
pub async fn start(cfg: ServerConfig, den_exe: std::path::PathBuf) -> Result<Running, ServerError> {
    // First: SIGHUP's default action ends the process, and preparing (the
    // first image build) takes a while.
    let hangup = signal(SignalKind::hangup()).map_err(|e| ServerError::Io {
        context: "watching SIGHUP".into(),
        source: e,
    })?;
    // Before anything slow: a certificate that cannot serve stops the start.
    let tls = match crate::tls::files(cfg.tls_cert.as_deref(), cfg.tls_key.as_deref())? {
        None => None,
        Some(_) if cfg.cluster_db.is_some() => {
            return Err(crate::error::ConfigError(
                "TLS in cluster mode is not supported yet: nodes call each other over plain HTTP \
                 on the same port; terminate TLS in a reverse proxy in front of the nodes"
                    .into(),
            )
            .into());
        }
        Some(files) => Some(Tls::new(files)?),
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| ServerError::Io {
        context: format!("creating {}", cfg.data_dir.display()),
        source: e,
    })?;
    match raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let mut mcfg = ManagerConfig::new(&cfg.data_dir, den_exe, net_config(&cfg)?);
    if let Some(r) = &cfg.run_dir {
        mcfg.run_dir = r.clone();
    }
    mcfg.images_dir = cfg.images_dir.clone();
    mcfg.image = match cfg.image.as_str() {
        "busybox" => ImageSource::Busybox,
        _ => ImageSource::Debian,
    };
    mcfg.warm_after = cfg.warm_after;
    mcfg.cold_after = cfg.cold_after;
    mcfg.cold_after_keeping_memory = cfg.cold_after_keeping_memory;
    mcfg.max_awake = cfg.max_awake;
    mcfg.pool_size = cfg.pool_size;
    mcfg.runtime = cfg.runtime;
    let crate::backends::Backends {
        store,
        mgr,
        tokens,
        cluster,
    } = crate::backends::open(&cfg, mcfg).await?;
    let admin_token_file = ensure_admin_token(&tokens, &cfg.data_dir).await?;
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| ServerError::Io {
        context: format!("binding {}", cfg.listen),
        source: e,
    })?;
    let addr = listener.local_addr().map_err(|e| ServerError::Io {
        context: "local address".into(),
        source: e,
    })?;
    let mut cfg = cfg;
    if cfg.listen.port() == 0 {
        cfg.listen = addr;
    }
    let shutdown = CancellationToken::new();
    let create_limiter = Arc::new(crate::limits::CreateLimiter::new(cfg.create_rate));
    mgr.set_admission(Arc::new(crate::limits::OrgAdmission {
        tokens: tokens.clone(),
        host: mgr.config().host,
    }));
    let state = AppState {
        mgr,
        tokens,
        audit: Arc::new(crate::audit::AuditLog::default()),
        cfg: Arc::new(cfg),
        shutdown: shutdown.clone(),
        create_limiter,
        quotas: Arc::default(),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        router: cluster
            .clone()
            .map(|c| Arc::new(crate::cluster_api::ClusterRouter(c)) as Arc<dyn crate::forward::Router>),
        cluster,
        upstreams: Arc::default(),
    };
    tokio::spawn(state.upstreams.clone().run_sweeper(shutdown.clone()));
    let app = app(state.clone());
    let counter = crate::listener::ConnCounter::new(state.cfg.connections);
    let task = tokio::spawn(crate::listener::serve(
        listener,
        app,
        counter,
        tls.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(reload_on_hangup(hangup, tls.clone(), shutdown.clone()));
    Ok(Running {
        addr,
        admin_token_file,
        state,
        tls,
        task,
        store,
    })
}

/// SIGHUP reloads the certificate (see [`crate::tls`]); without TLS it is
/// logged and otherwise ignored, never fatal.
async fn reload_on_hangup(mut hangup: Signal, tls: Option<Tls>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            s = hangup.recv() => if s.is_none() { return },
        }
        match &tls {
            None => tracing::info!("SIGHUP: no TLS certificate to reload; ignored"),
            Some(t) => match t.reload() {
                Ok(()) => {
                    metrics::counter!("den_tls_reloads_total", "result" => "ok").increment(1);
                    tracing::info!(cert = %t.files().cert.display(), "SIGHUP: TLS certificate reloaded");
                }
                Err(e) => {
                    metrics::counter!("den_tls_reloads_total", "result" => "error").increment(1);
                    tracing::error!(error = %e, "SIGHUP: TLS reload failed; the previous certificate stays in service");
                }
            },
        }
    }
}

impl Running {
    /// Graceful stop: streams are told (their tasks watch the shutdown
    /// token), the listener closes, every sprite goes cold, and local-only
    /// data gets a bounded chance to reach the object store.
    pub async fn stop(self) {
        self.state.shutdown.cancel();
        // In-flight streams end on their own; don't wait for slow clients forever.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        self.state.mgr.shutdown().await;
        self.state.mgr.remove_firewall();
        match tokio::time::timeout(FLUSH_AT_SHUTDOWN, self.store.flush_all()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing volumes at shutdown"),
            Err(_) => tracing::warn!(
                bytes = self.store.local_only_bytes(),
                "data still only in the local cache at shutdown; it uploads on the next start"
            ),
        }
        if let Some(c) = &self.state.cluster {
            c.leave().await;
        }
    }
}
