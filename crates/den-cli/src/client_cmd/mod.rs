//! The client commands of `den`: everything that talks to a `den server`
//! through its public API (den_client), as the SDKs do.
//!
//! One module per area; each command gets a [`Ctx`] that knows the API URL,
//! the token (flag > env > file, see [`config`]) and the `-s` sprite.

mod api;
mod auth;
mod checkpoints;
mod config;
mod cp;
mod errors;
mod exec;
mod mcp;
mod names;
mod nodes;
mod orgs;
mod output;
mod policy;
mod prompt;
pub(crate) mod proxy;
mod services;
mod sprites;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use den_client::Client;

/// Flags every command accepts (before or after the subcommand).
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// URL of the den API [env: DEN_API_URL] [default: from `den login`, else http://127.0.0.1:8080].
    #[arg(long, global = true, value_name = "URL", help_heading = "Connection")]
    pub api_url: Option<String>,
    /// API token [env: DEN_TOKEN] [default: from `den login`].
    #[arg(long, global = true, value_name = "TOKEN", help_heading = "Connection")]
    pub token: Option<String>,
    /// The sprite to act on [default: the one `den use` chose for this directory].
    #[arg(
        short = 's',
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Connection"
    )]
    pub sprite: Option<String>,
    /// Also trust the CA certificates in FILE (PEM) for an https:// den, besides the
    /// system's roots.
    #[arg(
        long,
        global = true,
        env = "DEN_CA_CERT",
        value_name = "FILE",
        help_heading = "Connection"
    )]
    pub ca_cert: Option<std::path::PathBuf>,
}

pub const EXAMPLES: &str = "\
Examples:
  den login http://127.0.0.1:8080     save the server URL and a token
  den create web --skip-console       create a sprite
  den use web                         make `web` the default sprite here
  den ls                              list sprites
  den exec -- ls /                    run a command in it
  den console                         a shell in it
  den checkpoint create --comment ok  checkpoint the default sprite
  den restore v1                      roll it back
  den fork web@v1 web-test            a new sprite from a checkpoint";

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Save the API URL and a token in ~/.config/den/config.toml (mode 0600).
    #[command(
        after_help = "Examples:\n  den login                          prompts for the token\n  den login http://10.0.0.5:8080 --token den_…\n  echo \"$T\" | den login            reads the token from stdin"
    )]
    Login(auth::LoginArgs),
    /// Forget the saved token (the API URL stays).
    Logout,
    /// Create, list and revoke API tokens.
    #[command(
        subcommand,
        after_help = "Examples:\n  den token create ci          prints the secret once\n  den token ls --json\n  den token revoke 1f2e3d4c5b6a7980"
    )]
    Token(auth::TokenCmd),
    /// Organisations: create and manage them (server administrators), show yours, read the audit log.
    #[command(
        subcommand,
        visible_alias = "orgs",
        after_help = "Examples:\n  den org create acme --max-sprites 20 --max-awake 5\n  den token create agent --org acme --role member --sprites web --expires-in 24h\n  den org show                 the token's own organisation\n  den org audit acme"
    )]
    Org(orgs::OrgCmd),
    /// Create a sprite.
    #[command(
        after_help = "Examples:\n  den create                      a random name\n  den create web --label team=a --skip-console"
    )]
    Create(sprites::CreateArgs),
    /// List sprites: name, status, URL, last active.
    #[command(
        visible_alias = "list",
        after_help = "Examples:\n  den ls\n  den ls --prefix web --watch\n  den ls --json | jq -r '.[].name'"
    )]
    Ls(sprites::LsArgs),
    /// Show one sprite.
    #[command(
        after_help = "Examples:\n  den info web\n  den info --json        the sprite chosen by `den use`"
    )]
    Info(sprites::InfoArgs),
    /// Destroy a sprite with its files and checkpoints (asks first).
    #[command(
        after_help = "Examples:\n  den destroy web\n  den destroy web --force      no question (scripts)"
    )]
    Destroy(sprites::DestroyArgs),
    /// Run a command in a sprite: output, input and the exit code pass through.
    #[command(
        visible_alias = "x",
        after_help = "Examples:\n  den exec -- uname -a\n  echo hi | den exec -s web -- cat\n  den exec --env FOO=1 --dir /tmp -- sh -c 'echo $FOO; pwd'\n  den exec --timeout 30s -- make test\n  den exec -t -- top                 on a terminal (Ctrl+\\ detaches)"
    )]
    Exec(exec::ExecArgs),
    /// An interactive login shell in the sprite (Ctrl+\ detaches; `exit` ends it).
    #[command(
        visible_alias = "c",
        after_help = "The shell is bash if the image has /bin/bash, else sh, as a login shell.\n\nExamples:\n  den console -s web\n  den sessions attach 1234     back into a detached console"
    )]
    Console(exec::ConsoleArgs),
    /// Copy files and directory trees between here and a sprite.
    #[command(
        after_help = "A path in a sprite is NAME:PATH, or :PATH for the -s / `den use` sprite; relative\nsprite paths start at /home/sprite. An existing directory receives SRC inside it.\n\nExamples:\n  den cp ./site web:/srv/site      upload a tree\n  den cp :/var/log/app.log .        download a file\n  den cp web:project ./project-copy"
    )]
    Cp(cp::CpArgs),
    /// The sprite's services: processes it starts at boot and restarts on crash.
    #[command(
        subcommand,
        visible_alias = "svc",
        after_help = "Examples:\n  den services create web --cmd python3 --arg -m --arg http.server --arg 8000 --http-port 8000\n  den services ls\n  den services logs web -f\n  den services stop web\n  den services rm web"
    )]
    Services(services::ServicesCmd),
    /// Forward local TCP ports to ports in the sprite (until Ctrl+C).
    #[command(
        after_help = "Examples:\n  den proxy 8080                 localhost:8080 here reaches 8080 in the sprite\n  den proxy 5433:5432 3000 -s db"
    )]
    Proxy(proxy::ProxyArgs),
    /// List, attach to and kill a sprite's exec sessions.
    #[command(
        subcommand,
        after_help = "Examples:\n  den sessions ls\n  den sessions attach 1234\n  den sessions kill 1234 --signal KILL"
    )]
    Sessions(exec::SessionsCmd),
    /// Make NAME the default sprite in this directory (writes .den).
    #[command(after_help = "Examples:\n  den use web\n  den use --unset")]
    Use(sprites::UseArgs),
    /// Checkpoints of a sprite's disk.
    #[command(
        subcommand,
        after_help = "Examples:\n  den checkpoint create -c 'before upgrade' -s web\n  den checkpoint ls\n  den checkpoint info v2\n  den checkpoint rm v1"
    )]
    Checkpoint(checkpoints::CheckpointCmd),
    /// Roll a sprite back to a checkpoint and wait until it answers again.
    #[command(after_help = "Examples:\n  den restore v3 -s web")]
    Restore(checkpoints::RestoreArgs),
    /// A new sprite from another's live state or checkpoint.
    #[command(
        after_help = "Examples:\n  den fork web web-copy         from the live state\n  den fork web@v2 web-v2        from checkpoint v2"
    )]
    Fork(checkpoints::ForkArgs),
    /// Show the sprite's URL, or set who may open it.
    #[command(after_help = "Examples:\n  den url -s web\n  den url --auth public -s web")]
    Url(sprites::UrlArgs),
    /// The sprite's egress network policy.
    #[command(
        subcommand,
        after_help = "Examples:\n  den policy get -s web\n  den policy allow github.com\n  den policy deny '*'\n  den policy set policy.json"
    )]
    Policy(policy::PolicyCmd),
    /// Cluster nodes: list them, drain one before retiring its host.
    #[command(subcommand, after_help = "Examples:\n  den node ls\n  den node drain node-b")]
    Node(nodes::NodeCmd),
    /// Send an authenticated request to any API path and print the answer.
    #[command(
        after_help = "Examples:\n  den api /v1/sprites\n  den api -X POST /v1/sprites/web/checkpoint -d '{\"comment\":\"x\"}'\n  den api -X PUT /v1/sprites/web -d @update.json"
    )]
    Api(api::ApiArgs),
    /// Print the configuration that points an agent's MCP client (Claude Code, Claude Desktop, Cursor, VS Code) at this server.
    #[command(
        after_help = "Examples:\n  den mcp                           every client's snippet\n  den mcp --client claude-code\n  den mcp --client cursor --show-token   with the saved token inline (a secret)"
    )]
    Mcp(mcp::McpArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  den completions bash > /etc/bash_completion.d/den\n  den completions zsh > \"${fpath[1]}/_den\"\n  den completions fish > ~/.config/fish/completions/den.fish"
    )]
    Completions { shell: clap_complete::Shell },
}

/// What a command needs to talk to the server.
pub struct Ctx {
    pub global: GlobalArgs,
}

impl Ctx {
    pub fn settings(&self) -> Result<config::Settings> {
        config::resolve(
            self.global.api_url.as_deref(),
            self.global.token.as_deref(),
            self.global.ca_cert.as_deref(),
        )
    }

    /// A client with a token; without one, say how to get one.
    pub fn client(&self) -> Result<Client> {
        let s = self.settings()?;
        if s.token.is_none() {
            bail!("no token — run `den login` (or pass --token, or set DEN_TOKEN)");
        }
        Client::with_ca_cert(&s.api_url, s.token, s.ca_cert.as_deref()).map_err(errors::explain)
    }

    /// The sprite a command is about: `arg`, else `-s`, else `.den`.
    pub fn sprite(&self, arg: Option<&str>) -> Result<String> {
        config::pick_sprite(arg, self.global.sprite.as_deref())
    }
}

/// Run a client command. `cli` builds the whole command tree (for completions).
pub fn run(cmd: ClientCommand, global: GlobalArgs, cli: fn() -> clap::Command) -> Result<()> {
    if let ClientCommand::Completions { shell } = cmd {
        clap_complete::generate(shell, &mut cli(), "den", &mut std::io::stdout());
        return Ok(());
    }
    let ctx = Ctx { global };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(async move {
        match cmd {
            ClientCommand::Login(a) => auth::login(&ctx, a).await,
            ClientCommand::Logout => auth::logout(),
            ClientCommand::Token(c) => auth::token(&ctx, c).await,
            ClientCommand::Org(c) => orgs::org(&ctx, c).await,
            ClientCommand::Create(a) => sprites::create(&ctx, a).await,
            ClientCommand::Ls(a) => sprites::ls(&ctx, a).await,
            ClientCommand::Info(a) => sprites::info(&ctx, a).await,
            ClientCommand::Destroy(a) => sprites::destroy(&ctx, a).await,
            ClientCommand::Exec(a) => exec::exec(&ctx, a).await,
            ClientCommand::Console(a) => exec::console(&ctx, a).await,
            ClientCommand::Services(c) => services::services(&ctx, c).await,
            ClientCommand::Proxy(a) => proxy::proxy(&ctx, a).await,
            ClientCommand::Cp(a) => cp::cp(&ctx, a).await,
            ClientCommand::Sessions(c) => exec::sessions(&ctx, c).await,
            ClientCommand::Use(a) => sprites::use_sprite(&ctx, a).await,
            ClientCommand::Url(a) => sprites::url(&ctx, a).await,
            ClientCommand::Checkpoint(c) => checkpoints::checkpoint(&ctx, c).await,
            ClientCommand::Restore(a) => checkpoints::restore(&ctx, a).await,
            ClientCommand::Fork(a) => checkpoints::fork(&ctx, a).await,
            ClientCommand::Policy(c) => policy::policy(&ctx, c).await,
            ClientCommand::Node(c) => nodes::node(&ctx, c).await,
            ClientCommand::Api(a) => api::api(&ctx, a).await,
            ClientCommand::Mcp(a) => mcp::mcp(&ctx, a).await,
            ClientCommand::Completions { .. } => Ok(()),
        }
    });
    // Do not wait for a read of stdin that is still blocked in the pool.
    rt.shutdown_background();
    res
}
