//! Manager settings.

use std::path::PathBuf;
use std::time::Duration;

use den_net::NetConfig;
use den_runtime::image::{BaseImage, IdMap};
use den_runtime::{Resources, Runtime};

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
    /// The same for sprites whose engine keeps their processes through a
    /// cold sleep (gVisor): they lose nothing by going cold early and give
    /// the host their memory back (the shorter of the two applies).
    pub cold_after_keeping_memory: Duration,
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
    /// What this host can give one sprite; larger limits are refused.
    pub host: HostCapacity,
    /// Self-fencing: a sprite's agent stops every process of the sprite (and
    /// PID 1 exits) when den's heartbeat has been missing this long, so a
    /// killed den (or one whose node lost its cluster lease) leaves nothing
    /// running. Use the cluster's node TTL or less; den beats every quarter.
    pub fence_ttl: Duration,
    /// Blank sprites kept booted so a create is only a rename (see the
    /// manager's `pool` module). 0 turns the pool off.
    pub pool_size: usize,
    /// The engine of sprites created without one: den's containers, or
    /// gVisor sandboxes.
    pub runtime: Runtime,
    /// The `runsc` binary for gVisor sprites (found on `PATH` if relative).
    /// Without it, only native sprites can run.
    pub runsc: PathBuf,
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
            cold_after_keeping_memory: Duration::from_secs(120),
            disk_size: 100 << 30,
            stop_grace: Duration::from_secs(5),
            boot_timeout: Duration::from_secs(30),
            net,
            idmap: IdMap::root_at(100_000, 65_536),
            max_awake: None,
            flush_on_cold: false,
            container_prefix: String::new(),
            host: HostCapacity::detect(),
            fence_ttl: Duration::from_secs(10),
            pool_size: 2,
            runtime: Runtime::Native,
            runsc: PathBuf::from("runsc"),
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

/// The most memory and CPU one sprite may be given: the host's own. A limit
/// above it is not a limit (a 1 TiB sprite on a 24 GiB host can take all of
/// it), and a CPU quota over the host's CPUs lets one sprite's hog starve
/// its neighbours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCapacity {
    pub memory_bytes: u64,
    pub cpus: f64,
}

/// Below this a sprite cannot run its agent and a shell.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
/// 5 % of a CPU (5 ms per 100 ms period); the kernel takes quotas from 1 ms.
pub const MIN_CPUS: f64 = 0.05;

impl HostCapacity {
    /// This host: `MemTotal` of /proc/meminfo and the CPUs this process may
    /// run on. Unknown values (no /proc) leave that limit unchecked.
    pub fn detect() -> Self {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib << 10)
            })
            .unwrap_or(u64::MAX);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(f64::INFINITY);
        HostCapacity { memory_bytes, cpus }
    }

    /// Check a sprite's requested memory (MiB, as `config.ram_mb`).
    pub fn check_ram_mb(&self, mb: f64) -> Result<u64, crate::SpriteError> {
        let host_mb = self.memory_bytes >> 20;
        let bytes = mb * (1u64 << 20) as f64;
        if !mb.is_finite() || bytes < MIN_MEMORY_BYTES as f64 {
            return Err(crate::SpriteError::Invalid(format!(
                "config.ram_mb = {mb}: at least {} MiB",
                MIN_MEMORY_BYTES >> 20
            )));
        }
        if bytes > self.memory_bytes as f64 {
            return Err(crate::SpriteError::Invalid(format!(
                "config.ram_mb = {mb}: more than this host's memory ({host_mb} MiB)"
            )));
        }
        Ok(bytes as u64)
    }

    /// Check a sprite's requested CPUs (as `config.cpus`).
    pub fn check_cpus(&self, cpus: f64) -> Result<f64, crate::SpriteError> {
        if !cpus.is_finite() || cpus < MIN_CPUS {
            return Err(crate::SpriteError::Invalid(format!(
                "config.cpus = {cpus}: at least {MIN_CPUS}"
            )));
        }
        if cpus > self.cpus {
            return Err(crate::SpriteError::Invalid(format!(
                "config.cpus = {cpus}: more than this host's {} CPUs",
                self.cpus
            )));
        }
        Ok(cpus)
    }
}

/// Decides whether one more sprite may wake, beyond the manager's own
/// `max_awake` (den-server: the organisations' quotas). Called with the
/// manager's admission lock held, so the sprites it is shown (awake or
/// already admitted and booting) are exactly the ones that count: two
/// racing wakes can't both take the last place.
pub trait Admission: Send + Sync {
    /// `key` wants to wake with `resources`; `awake` holds every other
    /// sprite awake or booting, with its resources. A refusal is returned
    /// to the waker as is (e.g. [`crate::SpriteError::Quota`]).
    fn admit(
        &self,
        key: &str,
        resources: &Resources,
        awake: &[(String, Resources)],
    ) -> Result<(), crate::SpriteError>;
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

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostCapacity = HostCapacity {
        memory_bytes: 24 << 30,
        cpus: 2.0,
    };

    #[test]
    fn limits_beyond_the_host_are_refused() {
        assert!(HOST.check_ram_mb(1_048_576.0).is_err(), "1 TiB on a 24 GiB host");
        assert!(HOST.check_cpus(1024.0).is_err(), "1024 CPUs on a 2-CPU host");
        assert!(HOST.check_cpus(2.5).is_err());
        assert!(HOST.check_ram_mb(1.0).is_err(), "below the minimum");
        assert!(HOST.check_cpus(0.001).is_err(), "below the minimum");
        assert!(HOST.check_ram_mb(f64::NAN).is_err());
        assert_eq!(HOST.check_ram_mb(512.0).unwrap(), 512 << 20);
        assert_eq!(HOST.check_ram_mb((24 << 10) as f64).unwrap(), 24 << 30);
        assert_eq!(HOST.check_cpus(2.0).unwrap(), 2.0);
        assert_eq!(HOST.check_cpus(0.5).unwrap(), 0.5);
    }

    #[test]
    fn refusals_name_the_field_and_the_host_figure() {
        let e = HOST.check_ram_mb(1_048_576.0).unwrap_err().to_string();
        assert!(e.contains("config.ram_mb") && e.contains("24576 MiB"), "{e}");
        let e = HOST.check_cpus(1024.0).unwrap_err().to_string();
        assert!(e.contains("config.cpus") && e.contains("2 CPUs"), "{e}");
    }
}
