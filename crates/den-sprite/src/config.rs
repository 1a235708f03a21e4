//! Manager settings.

use std::path::PathBuf;
use std::time::Duration;

use den_net::NetConfig;
use den_runtime::Resources;
use den_runtime::image::{BaseImage, IdMap};

/// Which base image sprites are created on.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// The Debian bookworm userland (the product).
    Debian,
    /// A busybox rootfs (tests that do not need Debian).
    Busybox,
    /// Any recipe (mirror overrides and the like).
    Custom(Box<BaseImage>),
}

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Holds `sprites.db`, `images/`, `agent/` and `run/`.
    pub data_dir: PathBuf,
    /// Mounts, sockets and engine state of running sprites. Unix socket paths
    /// below it must stay under 108 bytes, so keep it short.
    pub run_dir: PathBuf,
    pub image: ImageSource,
    /// Where base images are built and cached (default `<data_dir>/images`).
    pub images_dir: PathBuf,
    /// The `den` binary: runs as `den runtime-shim` (container set-up) and as
    /// `den agent` (PID 1 of every sprite).
    pub den_exe: PathBuf,
    /// Limits of a sprite that asks for none.
    pub resources: Resources,
    /// Idle time before a running sprite is frozen (warm).
    pub warm_after: Duration,
    /// Idle time before a sprite is stopped and its disk unmounted (cold).
    pub cold_after: Duration,
    /// Disk size of new sprites.
    pub disk_size: u64,
    /// SIGTERM → SIGKILL grace when a sprite goes cold.
    pub stop_grace: Duration,
    /// How long a wake may take before it fails.
    pub boot_timeout: Duration,
    pub net: NetConfig,
    /// uid/gid range of every sprite (root in the sprite = `host_base` on the host).
    pub idmap: IdMap,
    /// Most sprites awake (running or warm) at once; a wake beyond it is
    /// refused with [`crate::SpriteError::AwakeLimit`]. `None`: no limit.
    pub max_awake: Option<usize>,
    /// Cluster mode: a sprite going cold waits until all its data is in the
    /// object store, so its host may die afterwards without losing a byte.
    pub flush_on_cold: bool,
    /// Prepended to each sprite's key to name its container and cgroup, so
    /// several den processes on one machine (cluster nodes in tests) never
    /// touch each other's containers. Empty on a single host.
    pub container_prefix: String,
}

impl ManagerConfig {
    /// Production defaults under `data_dir`; the upstream resolver comes from
    /// the host's `/etc/resolv.conf`.
    pub fn new(data_dir: impl Into<PathBuf>, den_exe: impl Into<PathBuf>, net: NetConfig) -> Self {
        let data_dir = data_dir.into();
        ManagerConfig {
            run_dir: data_dir.join("run"),
            images_dir: data_dir.join("images"),
            data_dir,
            image: ImageSource::Debian,
            den_exe: den_exe.into(),
            resources: Resources::sprite_default(),
            warm_after: Duration::from_secs(30),
            cold_after: Duration::from_secs(600),
            disk_size: 100 << 30,
            stop_grace: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(30),
            net,
            idmap: IdMap::root_at(100_000, 65_536),
            max_awake: None,
            flush_on_cold: false,
            container_prefix: String::new(),
        }
    }

    /// This server's idmapped views of the base image (one per image
    /// version and id map), below its run directory: never in the shared
    /// images directory, where stopping one server would unmount them under
    /// every other server on the host.
    pub fn lowers_dir(&self) -> PathBuf {
        self.run_dir.join("lower")
    }

    pub(crate) fn base_image(&self) -> BaseImage {
        let dir = self.images_dir.clone();
        match &self.image {
            ImageSource::Debian => BaseImage::debian(dir),
            ImageSource::Busybox => BaseImage::busybox(dir),
            ImageSource::Custom(b) => (**b).clone(),
        }
    }
}

/// The first `nameserver` of the host's resolv.conf, for the DNS forwarder's upstream.
pub fn host_upstream_dns() -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next())
            .flatten()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}
