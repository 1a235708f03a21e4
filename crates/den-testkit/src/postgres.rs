//! A real PostgreSQL 15 server for a test: its own `initdb` cluster in a temp
//! dir, on a free port of 127.0.0.1, run as the `postgres` system user (the
//! server refuses root), stopped and deleted on drop.
//!
//! Debian's `postgresql-15` package (installed by `scripts/install-deps.sh`)
//! provides the binaries under `/usr/lib/postgresql/15/bin`.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_port, wait_until};

const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
const USER: &str = "postgres";

pub struct TestPostgres {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
    /// Set by `listen_on_all`: the command line's `listen_addresses` would
    /// otherwise override the config file's.
    listen_all: bool,
}

impl TestPostgres {
    /// initdb + start + `CREATE DATABASE den`. Takes about a second.
    pub fn start() -> Result<Self> {
        crate::require_root();
        let bin = Path::new(BIN_DIR);
        if !bin.join("initdb").exists() {
            bail!("{BIN_DIR}/initdb not found: install postgresql-15 (scripts/install-deps.sh)");
        }
        let dir = tempfile::Builder::new().prefix("den-pg-").tempdir_in("/tmp")?;
        // The server runs as `postgres`, which must be able to reach and own its files.
        fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        fs::create_dir_all(&data)?;
        fs::create_dir_all(&sock)?;
        chown_postgres(dir.path())?;
        let out = as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "den",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = TestPostgres {
            dir,
            port: free_port()?,
            running: false,
            listen_all: false,
        };
        pg.start_server()?;
        let out = Command::new(bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "den",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", "CREATE DATABASE den"])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://den@127.0.0.1:PORT/den` (trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://den@127.0.0.1:{}/den", self.port)
    }

    /// The same server as seen from another network namespace through `host`.
    pub fn url_via(&self, host: &str) -> String {
        format!("postgres://den@{host}:{}/den", self.port)
    }

    /// Listen on all addresses (for nodes in other network namespaces that
    /// reach the host through a bridge). Call before the nodes connect;
    /// restarts the server.
    pub fn listen_on_all(&mut self) -> Result<()> {
        let conf = self.data_dir().join("postgresql.auto.conf");
        let mut s = fs::read_to_string(&conf).unwrap_or_default();
        s.push_str("listen_addresses = '*'\n");
        fs::write(&conf, s)?;
        let hba = self.data_dir().join("pg_hba.conf");
        let mut s = fs::read_to_string(&hba)?;
        s.push_str("host all all 0.0.0.0/0 trust\n");
        fs::write(&hba, s)?;
        self.listen_all = true;
        self.restart()
    }

    fn start_server(&mut self) -> Result<()> {
        let out = as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses={} -c fsync=off -c max_connections=300",
                self.port,
                self.dir.path().join("sock").display(),
                // pg_ctl runs postgres through a shell: no `*` here.
                if self.listen_all { "0.0.0.0" } else { "127.0.0.1" },
            ))
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\nlog: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        self.running = true;
        let port = self.port;
        wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .context("postgres did not accept connections")?;
        Ok(())
    }

    /// Stop the server (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl stop")?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.running = false;
        Ok(())
    }

    /// Stop and start again on the same port and data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_server()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Run SQL through psql and return its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(Path::new(BIN_DIR).join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "den",
                "-d",
                "den",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A fresh, empty database on this server (for tests that need several).
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = Command::new(Path::new(BIN_DIR).join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "den",
                "-d",
                "postgres",
            ])
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                &format!("CREATE DATABASE \"{name}\""),
            ])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(format!("postgres://den@127.0.0.1:{}/{name}", self.port))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--"]).arg(program);
    c
}

fn chown_postgres(dir: &Path) -> Result<()> {
    let st = Command::new("chown")
        .args(["-R", &format!("{USER}:{USER}")])
        .arg(dir)
        .status()
        .context("running chown")?;
    if !st.success() {
        bail!("chown {USER} {} failed", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_restarts_and_answers() {
        let mut pg = TestPostgres::start().unwrap();
        assert_eq!(pg.psql("SELECT 1 + 1").unwrap(), "2");
        pg.psql("CREATE TABLE t (x INT); INSERT INTO t VALUES (7)")
            .unwrap();
        pg.restart().unwrap();
        assert_eq!(pg.psql("SELECT x FROM t").unwrap(), "7");
        pg.stop().unwrap();
        assert!(pg.psql("SELECT 1").is_err());
    }
}
