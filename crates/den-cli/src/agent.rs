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
    match den_sprite::helper_cmd::run_agent(args.socket, Some(args.default_user)) {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}
