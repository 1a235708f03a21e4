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

/// Run the in-sprite agent until SIGTERM; returns the process exit code.
pub fn run_agent(socket: PathBuf, default_user: Option<String>) -> i32 {
    // A current-thread runtime: PID 1 should be small, and the agent's own
    // reaper must be the only one waiting for children in this process.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: {e}");
            return 1;
        }
    };
    let mut cfg = den_agent::AgentConfig::new(socket);
    if let Some(u) = default_user {
        cfg.default_user = u;
    }
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
        Some(AGENT_SUBCOMMAND) => {
            let socket = args
                .iter()
                .position(|a| a == "--socket")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
                .unwrap_or_else(|| crate::AGENT_SOCKET.into());
            std::process::exit(run_agent(socket, None));
        }
        _ => {}
    }
}
