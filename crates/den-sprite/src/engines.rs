//! The isolation engines sprites run on: den's containers always, gVisor
//! when `runsc` is installed. Each sprite's record names its engine
//! ([`crate::SpriteRecord::runtime`]); everything above boot talks to the
//! sprite's agent, not to the engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use den_runtime::container::{ContainerBackend, ShimCommand};
use den_runtime::gvisor::GvisorBackend;
use den_runtime::{Backend, Runtime};

use crate::config::ManagerConfig;
use crate::error::{Result, SpriteError};

pub(crate) struct Engines {
    native: Arc<dyn Backend>,
    /// Why not, when gVisor can't run here.
    gvisor: std::result::Result<Arc<dyn Backend>, String>,
}

impl Engines {
    /// The engines of a manager, with their state below its run dir
    /// (`ctr/`, `gvisor/`). Fails if the default runtime can't run here.
    pub fn new(cfg: &ManagerConfig, shim: ShimCommand) -> Result<Engines> {
        let native: Arc<dyn Backend> =
            Arc::new(ContainerBackend::new(cfg.run_dir.join("ctr"), shim.clone())?);
        let gvisor = match find_program(&cfg.runsc) {
            Some(runsc) => Ok(
                Arc::new(GvisorBackend::new(cfg.run_dir.join("gvisor"), shim, runsc)?) as Arc<dyn Backend>,
            ),
            None => Err(format!(
                "runsc ({}) is not installed on this server (scripts/install-deps.sh runsc installs it)",
                cfg.runsc.display()
            )),
        };
        let engines = Engines { native, gvisor };
        engines.get(cfg.runtime)?;
        Ok(engines)
    }

    /// The engine of `runtime`, or why this server can't run it.
    pub fn get(&self, runtime: Runtime) -> Result<Arc<dyn Backend>> {
        match runtime {
            Runtime::Native => Ok(self.native.clone()),
            Runtime::Gvisor => self
                .gvisor
                .clone()
                .map_err(|why| SpriteError::Invalid(format!("the gvisor runtime is not available: {why}"))),
        }
    }

    /// Every engine that can run here, with the directory of its bundles
    /// (one per sprite it holds).
    pub fn available(&self, run_dir: &Path) -> Vec<(Arc<dyn Backend>, PathBuf)> {
        let mut v = vec![(self.native.clone(), run_dir.join("ctr/bundles"))];
        if let Ok(g) = &self.gvisor {
            v.push((g.clone(), run_dir.join("gvisor/bundles")));
        }
        v
    }
}

/// `program` itself if it names a path, else the first executable of that
/// name on `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| executable(p))
}
