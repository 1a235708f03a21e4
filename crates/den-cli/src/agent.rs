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
    /// Serve on this inherited listening socket (made by den) instead of
    /// binding `--socket`.
    #[arg(long)]
    pub listen_fd: Option<i32>,
    /// Where the agent's own output goes once it serves (inside the sprite).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Fence: stop the sprite when den's heartbeat has been missing this long.
    #[arg(long)]
    pub fence_ttl_ms: Option<u64>,
    /// Serve `sudo` on this abstract socket (engines without setuid).
    #[arg(long)]
    pub sudo_broker: Option<String>,
}

pub fn run(args: AgentArgs) -> Result<()> {
    let opts = den_sprite::helper_cmd::AgentOptions {
        socket: args.socket,
        default_user: Some(args.default_user),
        listen_fd: args.listen_fd,
        log_file: args.log_file,
        fence_ttl: args.fence_ttl_ms.map(std::time::Duration::from_millis),
        sudo_broker: args.sudo_broker,
    };
    match den_sprite::helper_cmd::run_agent(opts) {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}
