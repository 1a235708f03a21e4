//! `den agent`: the den binary doubles as PID 1 inside every sprite.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Unix socket the host talks to.
    #[arg(long, default_value = "/.sprite/run/agent.sock")]
    pub socket: PathBuf,
    /// User for commands that name none.
    #[arg(long, default_value = "sprite")]
    pub default_user: String,
}

pub fn run(args: AgentArgs) -> Result<()> {
    // A current-thread runtime: PID 1 should be small, and the agent's own
    // reaper must be the only one waiting for children in this process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut cfg = den_agent::AgentConfig::new(args.socket);
    cfg.default_user = args.default_user;
    rt.block_on(den_agent::run(cfg))?;
    Ok(())
}
