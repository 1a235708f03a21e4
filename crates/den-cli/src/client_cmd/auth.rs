//! `den login` and `den token`.

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use den_client::{Client, TokenRequest};

use super::errors::Hint;
use super::output::{print_json, print_table, table};
use super::{Ctx, config, prompt};

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// API URL [default: --api-url, DEN_API_URL, the saved one, else http://127.0.0.1:8080].
    pub url: Option<String>,
}

/// Check the token against the server before saving it, so a typo shows now
/// and not at the next command.
pub async fn login(ctx: &Ctx, a: LoginArgs) -> Result<()> {
    let saved = config::load()?;
    let url = a
        .url
        .or_else(|| ctx.global.api_url.clone())
        .or_else(|| std::env::var("DEN_API_URL").ok().filter(|v| !v.is_empty()))
        .or_else(|| saved.api_url.clone())
        .unwrap_or_else(|| config::DEFAULT_API_URL.to_string());
    let token = match &ctx.global.token {
        Some(t) => t.clone(),
        None => prompt::secret(&format!(
            "Token for {url} (the admin token is in DATA_DIR/admin-token): "
        ))?,
    };
    if token.is_empty() {
        bail!("no token given — pass --token, or type it at the prompt");
    }
    // Saved as an absolute path: later commands run in other directories.
    // A new login to the same server keeps the CA saved for it.
    let ca_cert = match &ctx.global.ca_cert {
        Some(p) => Some(std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?),
        None if saved.api_url.as_deref() == Some(url.trim_end_matches('/')) => saved.ca_cert.clone(),
        None => None,
    };
    let client = Client::with_ca_cert(&url, Some(token.clone()), ca_cert.as_deref()).hint()?;
    client.list_sprites_page(None, None).await.hint()?;
    let path = config::save(&config::FileConfig {
        api_url: Some(client.api_url()),
        token: Some(token),
        ca_cert,
    })?;
    println!("logged in to {} (saved in {})", client.api_url(), path.display());
    Ok(())
}

/// Only the local copy goes: the token stays valid on the server until
/// `den token revoke`.
pub fn logout() -> Result<()> {
    let mut cfg = config::load()?;
    if cfg.token.take().is_none() {
        println!("not logged in");
        return Ok(());
    }
    let path = config::save(&cfg)?;
    println!("removed the token from {}", path.display());
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Mint a token; its secret is printed once, on stdout. It is never wider
    /// than the token that mints it.
    Create {
        /// What the token is for.
        name: Option<String>,
        /// Organisation [default: the minting token's; others: server administrators only].
        #[arg(long)]
        org: Option<String>,
        /// admin (everything in the org), member (create and use sprites) or viewer (read only)
        /// [default: the minting token's role].
        #[arg(long, value_parser = ["admin", "member", "viewer"])]
        role: Option<String>,
        /// Restrict the token to these sprites (comma-separated names).
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        sprites: Option<Vec<String>>,
        /// Expire after this long, e.g. 1h, 30d.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id; requests with it fail from now on.
    Revoke { id: String },
}

pub async fn token(ctx: &Ctx, cmd: TokenCmd) -> Result<()> {
    let c = ctx.client()?;
    match cmd {
        TokenCmd::Create {
            name,
            org,
            role,
            sprites,
            expires_in,
            json,
        } => {
            let req = TokenRequest {
                name,
                org,
                role,
                sprites,
                expires_in,
            };
            let t = c.create_token(&req).await.hint()?;
            if json {
                return print_json(&t);
            }
            let i = &t.info;
            eprintln!(
                "created {} token '{}' (id {}) in organisation {}; it is shown only now:",
                i.role, i.name, i.id, i.org
            );
            println!("{}", t.token);
        }
        TokenCmd::Ls { json } => {
            let ts = c.list_tokens().await.hint()?;
            if json {
                return print_json(&ts);
            }
            let mut t = table(&["id", "name", "org", "role", "sprites", "expires", "created"]);
            for tok in ts {
                let role = if tok.server_admin {
                    format!("{} (server admin)", tok.role)
                } else {
                    tok.role
                };
                t.add_row(vec![
                    tok.id,
                    tok.name,
                    tok.org,
                    role,
                    tok.sprites.map(|s| s.join(",")).unwrap_or_else(|| "all".into()),
                    tok.expires_at.unwrap_or_else(|| "never".into()),
                    tok.created_at,
                ]);
            }
            print_table(&t);
        }
        TokenCmd::Revoke { id } => {
            c.revoke_token(&id).await.hint()?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}
