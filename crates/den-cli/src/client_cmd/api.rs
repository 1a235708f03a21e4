//! `den api`: an authenticated request to any API path, for endpoints the
//! CLI has no command for yet (and for scripts that want the raw answer).

use std::io::{Read, Write};

use anyhow::{Context, Result};
use clap::Args;
use den_client::reqwest::Method;
use den_client::reqwest::header::CONTENT_TYPE;

use super::Ctx;
use super::errors::Hint;

#[derive(Args, Debug)]
pub struct ApiArgs {
    /// API path with an optional query, like /v1/sprites?prefix=web.
    pub path: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    pub method: String,
    /// JSON request body; @FILE reads it from a file, @- from stdin.
    #[arg(short, long)]
    pub data: Option<String>,
}

pub async fn api(ctx: &Ctx, a: ApiArgs) -> Result<()> {
    let c = ctx.client()?;
    let method = Method::from_bytes(a.method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("{:?} is not an HTTP method", a.method))?;
    let mut rb = c.request(method, &a.path).hint()?;
    if let Some(d) = a.data {
        let body = match d.strip_prefix('@') {
            Some("-") => {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b)?;
                b
            }
            Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
            None => d.into_bytes(),
        };
        rb = rb.header(CONTENT_TYPE, "application/json").body(body);
    }
    let mut resp = c.send(rb, None).await.hint()?;
    // Stream it: NDJSON endpoints print each line as it comes.
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = resp.chunk().await.context("reading the answer")? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}
