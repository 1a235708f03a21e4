//! `den policy`: the sprite's egress network policy.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use den_client::NetworkPolicy;

use super::Ctx;
use super::errors::Hint;
use super::output::print_json;

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Print the policy (JSON; `{"rules": []}` means unrestricted).
    Get {
        /// Accepted for symmetry with other read commands: the output is JSON anyway.
        #[arg(long)]
        json: bool,
    },
    /// Replace the policy with the JSON document in FILE (- for stdin).
    #[command(
        after_help = "Example:\n  echo '{\"rules\":[{\"domain\":\"github.com\",\"action\":\"allow\"},{\"domain\":\"*\",\"action\":\"deny\"}]}' | den policy set -"
    )]
    Set { file: PathBuf },
    /// Allow DOMAIN (exact, or *.suffix), keeping the other rules.
    Allow { domain: String },
    /// Deny DOMAIN (exact, or *.suffix), keeping the other rules.
    Deny { domain: String },
}

pub async fn policy(ctx: &Ctx, cmd: PolicyCmd) -> Result<()> {
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    match cmd {
        PolicyCmd::Get { .. } => print_json(&c.get_policy(&name).await.hint()?),
        PolicyCmd::Set { file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let p: NetworkPolicy = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a policy ({{\"rules\": [...]}})", file.display()))?;
            c.set_policy(&name, &p).await.hint()?;
            println!("policy of {name} replaced ({} rules)", p.rules.len());
            Ok(())
        }
        PolicyCmd::Allow { domain } => edit(&c, &name, &domain, true).await,
        PolicyCmd::Deny { domain } => edit(&c, &name, &domain, false).await,
    }
}

/// Read, change one domain's rule, write back. Two concurrent edits can
/// lose one: the API has no compare-and-set for policies.
async fn edit(c: &den_client::Client, name: &str, domain: &str, allow: bool) -> Result<()> {
    let mut p = c.get_policy(name).await.hint()?;
    p.set_domain(domain, allow);
    c.set_policy(name, &p).await.hint()?;
    let verb = if allow { "allowed" } else { "denied" };
    println!("{domain} {verb} for {name}");
    Ok(())
}
