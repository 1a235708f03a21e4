//! The `den` binary is also what the manager runs as the container shim
//! (`den runtime-shim …`) and as PID 1 of every sprite (`den agent --socket
//! …`). Test binaries that stand in for `den` use [`dispatch`] so they
//! behave the same way.

use std::ffi::OsString;
use std::path::PathBuf;

/// Argument the manager gives the shim.
pub const SHIM_SUBCOMMAND: &str = "runtime-shim";
/// Argument the manager gives PID 1.
pub const AGENT_SUBCOMMAND: &str = "agent";
/// What `/usr/bin/sudo` runs in a sprite whose engine allows no setuid
/// (see [`den_agent::sudo`]).
pub const SUDO_SUBCOMMAND: &str = "sudo-shim";

/// How PID 1 was started: `den agent --socket P [--listen-fd N]
/// [--log-file P] [--fence-ttl-ms N] [--default-user U] [--sudo-broker NAME]`.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    pub socket: PathBuf,
    pub default_user: Option<String>,
    pub listen_fd: Option<i32>,
    pub log_file: Option<PathBuf>,
    pub fence_ttl: Option<std::time::Duration>,
    pub sudo_broker: Option<String>,
}

impl AgentOptions {
    /// Parses the agent's arguments (after the subcommand); unknown ones are ignored.
    pub fn parse(args: &[OsString]) -> AgentOptions {
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.to_string_lossy().into_owned())
        };
        AgentOptions {
            socket: value("--socket")
                .map(PathBuf::from)
                .unwrap_or_else(|| crate::AGENT_SOCKET.into()),
            default_user: value("--default-user"),
            listen_fd: value("--listen-fd").and_then(|v| v.parse().ok()),
            log_file: value("--log-file").map(PathBuf::from),
            fence_ttl: value("--fence-ttl-ms")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_millis),
            sudo_broker: value("--sudo-broker"),
        }
    }
}

/// Run the in-sprite agent until SIGTERM; returns the process exit code.
pub fn run_agent(opts: AgentOptions) -> i32 {
    // A current-thread runtime: PID 1 should be small, and the agent's own
    // reaper must be the only one waiting for children in this process.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: {e}");
            return 1;
        }
    };
    let mut cfg = den_agent::AgentConfig::new(opts.socket);
    if let Some(u) = opts.default_user {
        cfg.default_user = u;
    }
    cfg.listen_fd = opts.listen_fd;
    cfg.log_file = opts.log_file;
    cfg.fence_ttl = opts.fence_ttl;
    cfg.sudo_broker = opts.sudo_broker;
    match rt.block_on(den_agent::run(cfg)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agent: {e}");
            1
        }
    }
}

/// If this process was started as the shim or the agent, be that and exit.
pub fn dispatch() {
    let args: Vec<OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some(SHIM_SUBCOMMAND) => std::process::exit(den_runtime::container::shim_main(&args[2..])),
        Some(AGENT_SUBCOMMAND) => std::process::exit(run_agent(AgentOptions::parse(&args[2..]))),
        Some(SUDO_SUBCOMMAND) => std::process::exit(den_agent::sudo::shim_main(&args[2..])),
        _ => {}
    }
}
