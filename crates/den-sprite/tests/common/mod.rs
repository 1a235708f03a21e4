//! What the sprite test binaries (`sprites`, `abuse_agent`, `abuse_host`)
//! share: a manager configuration for tests, running commands in a sprite,
//! handing a test network to a child process, and the runner's `main`.
//! Each binary uses part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use den_agent::client::ExecRequest;
use den_runtime::{Resources, Runtime};
use den_sprite::{ImageSource, ManagerConfig, SpriteManager};
use den_store::{Store, StoreConfig};

pub const WAIT: Duration = Duration::from_secs(30);

pub type TestFn = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;

/// A temporary directory that sprites (an unprivileged host uid) can
/// traverse to their bind-mount sources.
pub fn traversable_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    Ok(dir)
}

/// A manager below `dir` (data, run) with the busybox image cached in
/// `images`, small limits, and idle timings long enough that tests which
/// want sleep set them themselves. Sprites run natively unless the test
/// sets [`ManagerConfig::runtime`].
pub fn test_config(dir: &Path, images: &Path, net: den_net::NetConfig) -> ManagerConfig {
    let mut cfg = ManagerConfig::new(
        dir.join("data"),
        std::env::current_exe().expect("test binary path"),
        net,
    );
    cfg.run_dir = dir.join("run");
    cfg.images_dir = images.to_path_buf();
    cfg.image = ImageSource::Busybox;
    cfg.resources = Resources {
        memory_bytes: Some(256 << 20),
        pids: Some(512),
        ..Resources::default()
    };
    cfg.warm_after = Duration::from_secs(3600);
    cfg.cold_after = Duration::from_secs(7200);
    cfg.cold_after_keeping_memory = Duration::from_secs(7200);
    cfg.stop_grace = Duration::from_secs(2);
    // Tests of the pool turn it on; the others pin the cold-create path.
    cfg.pool_size = 0;
    cfg
}

/// Start a manager on the local store below `dir`.
pub async fn start_at(cfg: ManagerConfig, dir: &Path) -> Result<SpriteManager> {
    let store = Store::open(StoreConfig::local(dir.join("data/store"))).await?;
    Ok(SpriteManager::start(cfg, store).await?)
}

/// Runs this binary inside the sprite (through the bundled loader, as the
/// agent itself is started): `den <args>`.
pub fn in_sprite_den(args: &str) -> String {
    format!(
        "LD=; for l in /.sprite/bin/ld-linux*; do [ -e \"$l\" ] && LD=$l; done; \
         $LD ${{LD:+--library-path /.sprite/bin}} /.sprite/bin/den {args}"
    )
}

pub async fn close(mgr: SpriteManager) {
    mgr.shutdown().await;
    mgr.remove_firewall();
}

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn sh_req(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

pub async fn exec(mgr: &SpriteManager, name: &str, req: ExecRequest) -> Result<Out> {
    let act = mgr.wake(name).await?;
    let session = act.agent().exec(req).await?;
    let out = tokio::time::timeout(WAIT, session.collect())
        .await
        .context("command did not finish")?;
    let exit = out.exit.context("no exit status")?;
    Ok(Out {
        code: exit.exit_code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run a shell script in the sprite as `sprite`; fail unless it exits 0.
pub async fn sh(mgr: &SpriteManager, name: &str, script: &str) -> Result<String> {
    let o = exec(mgr, name, sh_req(script)).await?;
    ensure!(
        o.code == 0,
        "{script:?} exited {}: {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    Ok(o.stdout)
}

/// Run as root in the sprite.
pub async fn root_sh(mgr: &SpriteManager, name: &str, script: &str) -> Result<Out> {
    let mut req = sh_req(script);
    req.user = Some("root".into());
    exec(mgr, name, req).await
}

/// A test network's settings as arguments for a child process of this
/// binary (one that runs a manager and gets killed); [`net_from_args`]
/// reads them back.
pub fn net_args(n: &den_net::NetConfig) -> [String; 6] {
    [
        n.subnet.to_string(),
        n.table.clone(),
        n.ifprefix.clone(),
        n.netns_prefix.clone(),
        n.uplinks.join(","),
        n.upstream_dns.to_string(),
    ]
}

pub fn net_from_args(a: &[String]) -> den_net::NetConfig {
    let mut net = den_net::NetConfig::new(a[5].parse().expect("dns"));
    net.subnet = a[0].parse().expect("subnet");
    net.table = a[1].clone();
    net.ifprefix = a[2].clone();
    net.netns_prefix = a[3].clone();
    net.uplinks = a[4]
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    net.blocked = vec![
        "169.254.0.0/16".parse().expect("net"),
        "127.0.0.0/8".parse().expect("net"),
    ];
    net
}

pub fn strings(args: &[OsString]) -> Vec<String> {
    args.iter().map(|s| s.to_string_lossy().into_owned()).collect()
}

/// A child process of a crash test: a manager below the directory in
/// `args` (then the network's [`net_args`]), configured by `tweak` and
/// brought to the state to crash in by `setup`, which prints what the
/// parent waits for. Then it waits to be killed.
pub fn crash_child_main<F>(args: &[OsString], tweak: impl FnOnce(&mut ManagerConfig), setup: F) -> !
where
    F: AsyncFnOnce(SpriteManager),
{
    let a = strings(args);
    let dir = std::path::PathBuf::from(&a[0]);
    let net = net_from_args(&a[1..]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let mut cfg = test_config(&dir, &dir.join("images"), net);
        tweak(&mut cfg);
        let mgr = start_at(cfg, &dir).await.expect("manager");
        setup(mgr).await;
        std::future::pending::<()>().await;
    });
    unreachable!()
}

/// A test that runs once per runtime.
pub type RuntimeTestFn = fn(Runtime) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;

/// The runtimes every [`RuntimeTestFn`] runs on, with the prefix of its name.
pub const RUNTIMES: [(&str, Runtime); 2] = [("native", Runtime::Native), ("gvisor", Runtime::Gvisor)];

/// [`run_tests`] for tests that run on each runtime (`native::NAME`,
/// `gvisor::NAME`), then the `single` ones.
pub fn run_runtime_tests(each: &[(&str, RuntimeTestFn)], single: &[(&str, TestFn)]) {
    type Boxed = Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>>;
    let mut named: Vec<(String, Boxed)> = Vec::new();
    for (prefix, rt) in RUNTIMES {
        for (name, f) in each {
            let f = *f;
            named.push((format!("{prefix}::{name}"), Box::new(move || f(rt))));
        }
    }
    for (name, f) in single {
        let f = *f;
        named.push((name.to_string(), Box::new(f)));
    }
    let tests: Vec<(&str, &Boxed)> = named.iter().map(|(n, f)| (n.as_str(), f)).collect();
    run_with(&tests);
}

/// The rest of every binary's `main`, after its own subcommands: run the
/// tests named on the command line (all by default), exit 1 on a failure.
pub fn run_tests(tests: &[(&str, TestFn)]) {
    run_with(tests);
}

fn run_with<F: Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>>(
    tests: &[(&str, F)],
) {
    assert!(nix::unistd::geteuid().is_root(), "the sprite tests need root");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,libcgroups=error,fuser=error".into()),
        )
        .with_test_writer()
        .try_init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ok = den_testkit::runner::run_named(tests, |t| rt.block_on(t()));
    drop(rt);
    if !ok {
        std::process::exit(1);
    }
}

/// Every manager a test started, shut down when this is dropped (also when
/// the test fails half-way). Declare it before the directories it runs in,
/// so no sprite outlives its test's files.
#[derive(Default)]
pub struct Managers(std::sync::Mutex<Vec<SpriteManager>>);

impl Managers {
    pub fn add(&self, mgr: &SpriteManager) {
        self.0.lock().unwrap().push(mgr.clone());
    }

    pub fn close_all(&self) {
        let managers: Vec<SpriteManager> = self.0.lock().unwrap().drain(..).collect();
        if managers.is_empty() {
            return;
        }
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                for mgr in managers {
                    close(mgr).await;
                }
            })
        });
    }
}

impl Drop for Managers {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Reads `session`'s output until it says `needle` (a program in the
/// sprite announcing it is ready), within [`WAIT`]; fails if it exits or
/// ends first. `what` names it in the errors.
pub async fn until_said(session: &mut den_agent::client::Session, needle: &str, what: &str) -> Result<()> {
    use den_agent::client::Event;
    let t0 = std::time::Instant::now();
    let mut said = Vec::new();
    while !String::from_utf8_lossy(&said).contains(needle) {
        ensure!(
            t0.elapsed() < WAIT,
            "{what} never said {needle:?}: {:?}",
            String::from_utf8_lossy(&said)
        );
        match tokio::time::timeout(WAIT, session.recv()).await? {
            Some(Event::Stdout(b) | Event::Stderr(b)) => said.extend_from_slice(&b),
            Some(Event::Exit(e)) => bail!("{what} exited: {e:?}: {}", String::from_utf8_lossy(&said)),
            Some(_) => {}
            None => bail!("{what}'s session ended"),
        }
    }
    Ok(())
}
