//! `den`: the one binary. Subcommands are thin edges over the library crates.

mod agent;
mod client_cmd;
mod server;
mod store_args;
mod volume;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "den", version, about = "Self-hosted persistent Linux sandboxes", after_help = client_cmd::EXAMPLES)]
struct Cli {
    #[command(flatten)]
    global: client_cmd::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Sprites-compatible API server.
    Server(Box<server::ServerArgs>),
    /// Operate on den volumes: sparse chunked disks with instant checkpoint, restore and fork.
    #[command(subcommand)]
    Volume(Box<volume::VolumeCmd>),
    /// The in-sprite agent (PID 1 of every sprite). Started by den, not by hand.
    #[command(hide = true)]
    Agent(agent::AgentArgs),
    /// Creates one container and exits; run by den's container backend.
    #[command(hide = true)]
    RuntimeShim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    #[command(flatten)]
    Client(client_cmd::ClientCommand),
}

fn main() {
    // `/usr/bin/sudo` in a gVisor sprite: no CLI parsing, sudo's own flags.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .is_some_and(|a| a == den_sprite::helper_cmd::SUDO_SUBCOMMAND)
    {
        std::process::exit(den_agent::sudo::shim_main(&args[2..]));
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEN_LOG")
        .unwrap_or_else(|_| "warn,fuser=error,libcgroups=error".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Structured logs for collectors: one JSON object per line, with the
    // request span (id, method, path) on every event of a request.
    if std::env::var("DEN_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(*args),
        Command::Volume(cmd) => volume::run(*cmd),
        Command::Agent(args) => agent::run(args),
        Command::RuntimeShim { args } => std::process::exit(den_runtime::container::shim_main(&args)),
        Command::Client(cmd) => client_cmd::run(cmd, cli.global, Cli::command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Global client flags must not clash with any subcommand's own flags
    /// (clap checks the whole tree here, not only the commands a run touches).
    #[test]
    fn command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
