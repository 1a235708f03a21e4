//! The runc baseline: the same rootfs run by `runc` (no user namespace, no
//! overlay, no network set-up), timed the same way as a sprite.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A bundle directory for `runc` over a read-only `rootfs`.
pub struct RuncBundle {
    bundle: PathBuf,
    state: PathBuf,
    config: serde_json::Value,
    prefix: String,
}

/// Whether `runc` is installed.
pub fn available() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl RuncBundle {
    pub fn new(dir: &Path, rootfs: &Path) -> Result<Self> {
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(&bundle)?;
        let _ = std::fs::remove_file(bundle.join("config.json"));
        let st = Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle)
            .status()?;
        if !st.success() {
            bail!("runc spec failed: {st}");
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        config["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
        config["root"]["readonly"] = true.into();
        config["process"]["terminal"] = false.into();
        Ok(RuncBundle {
            bundle,
            state: dir.join("state"),
            config,
            prefix: format!("den-bench-{}", std::process::id()),
        })
    }

    fn set_args(&mut self, args: &[&str]) -> Result<()> {
        self.config["process"]["args"] = serde_json::json!(args);
        std::fs::write(self.bundle.join("config.json"), serde_json::to_vec(&self.config)?)?;
        Ok(())
    }

    fn runc(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("runc {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// `runc run -d`: the container inherits runc's stdio, so it must not get
    /// our pipes (reading them to EOF would wait for the container to exit).
    fn run_detached(&self, id: &str) -> Result<()> {
        let log = self.bundle.join("run-detached.err");
        let st = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["run", "-d", "--bundle"])
            .arg(&self.bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()?;
        if !st.success() {
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("runc run -d: {st}: {}", err.trim());
        }
        Ok(())
    }

    /// `runc run` of `echo hi`: spawn → first byte of output, `n` times.
    pub fn run_to_output(&mut self, n: usize) -> Result<Vec<Duration>> {
        self.set_args(&["/bin/echo", "hi"])?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{}-{i}", self.prefix);
            let t0 = Instant::now();
            let mut child = Command::new("runc")
                .arg("--root")
                .arg(&self.state)
                .args(["run", "--bundle"])
                .arg(&self.bundle)
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut b = [0u8; 1];
            child
                .stdout
                .take()
                .context("piped stdout")?
                .read_exact(&mut b)
                .context("runc run gave no output")?;
            out.push(t0.elapsed());
            child.wait()?;
        }
        Ok(out)
    }

    /// `runc exec … true` in a running container, and `pause`/`resume`.
    pub fn exec_pause_resume(&mut self, n: usize) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
        self.set_args(&["/bin/sleep", "1000000"])?;
        let id = format!("{}-long", self.prefix);
        self.run_detached(&id)?;
        let res = (|| {
            let (mut exec, mut pause, mut resume) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..n {
                let t0 = Instant::now();
                self.runc(&["exec", &id, "/bin/true"])?;
                exec.push(t0.elapsed());
                let t0 = Instant::now();
                self.runc(&["pause", &id])?;
                let t1 = Instant::now();
                self.runc(&["resume", &id])?;
                pause.push(t1 - t0);
                resume.push(t1.elapsed());
            }
            Ok((exec, pause, resume))
        })();
        let _ = self.runc(&["delete", "--force", &id]);
        res
    }
}
