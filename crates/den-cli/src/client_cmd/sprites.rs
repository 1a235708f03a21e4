//! Sprite lifecycle: create, ls, info, destroy, use, url.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use den_client::{CreateSprite, Sprite};

use super::errors::Hint;
use super::output::{ago, print_json, print_table, secs, spinner, stdin_is_tty, table};
use super::{Ctx, config, names, prompt};

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Name (a DNS label: a-z, 0-9, -) [default: a random one like brave-otter-4821].
    pub name: Option<String>,
    /// A label to attach (repeatable).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// Isolation engine: native (den's containers) or gvisor (a user-space
    /// kernel) [default: the server's].
    #[arg(long, value_parser = ["native", "gvisor"])]
    pub runtime: Option<String>,
    /// Do not open a console after creating (none opens when stdin is not a terminal).
    #[arg(long)]
    pub skip_console: bool,
    /// Print the new sprite as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn create(ctx: &Ctx, a: CreateArgs) -> Result<()> {
    let c = ctx.client()?;
    let name = a
        .name
        .or_else(|| ctx.global.sprite.clone())
        .unwrap_or_else(names::random_name);
    let t0 = Instant::now();
    let pb = spinner(format!("creating sprite {name}"));
    let res = c
        .create_sprite(&CreateSprite {
            name: name.clone(),
            labels: a.labels,
            config: a.runtime.map(|r| serde_json::json!({ "runtime": r })),
        })
        .await;
    pb.finish_and_clear();
    let s = res.hint()?;
    if a.json {
        return print_json(&s);
    }
    println!("created sprite {} in {}", s.name, secs(t0.elapsed()));
    println!("url: {}", s.url);
    if !a.skip_console {
        if stdin_is_tty() && std::io::stdout().is_terminal() {
            return super::exec::open_console(ctx, &s.name).await;
        }
        eprintln!("open a shell in it with: den console -s {}", s.name);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only sprites whose name starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Redraw every 2 seconds until Ctrl+C.
    #[arg(short, long)]
    pub watch: bool,
    #[arg(long)]
    pub json: bool,
}

const WATCH_EVERY: Duration = Duration::from_secs(2);

pub async fn ls(ctx: &Ctx, a: LsArgs) -> Result<()> {
    let c = ctx.client()?;
    loop {
        let sprites = c.list_sprites(a.prefix.as_deref()).await.hint()?;
        if a.json && a.watch {
            // One array per line: a stream a script can read.
            println!("{}", serde_json::to_string(&sprites)?);
        } else if a.json {
            print_json(&sprites)?;
        } else {
            // Redraw in place on a terminal; a log or pipe gets one table after another.
            if a.watch && std::io::stdout().is_terminal() {
                print!("\x1b[2J\x1b[H");
            }
            print_sprites(&sprites);
        }
        if !a.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_sprites(sprites: &[Sprite]) {
    if sprites.is_empty() {
        println!("no sprites — create one with `den create`");
        return;
    }
    // In a cluster, show where each sprite runs.
    let clustered = sprites.iter().any(|s| s.extra.contains_key("node"));
    let mut header = vec!["name", "status", "url", "last active"];
    if clustered {
        header.push("node (region)");
    }
    let mut t = table(&header);
    for s in sprites {
        let mut row = vec![
            s.name.clone(),
            s.status.clone(),
            s.url.clone(),
            ago(s.last_running_at.as_deref()),
        ];
        if clustered {
            row.push(placement(s));
        }
        t.add_row(row);
    }
    print_table(&t);
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// [default: -s, or the sprite `den use` chose]
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn info(ctx: &Ctx, a: InfoArgs) -> Result<()> {
    let name = ctx.sprite(a.name.as_deref())?;
    let s = ctx.client()?.get_sprite(&name).await.hint()?;
    if a.json {
        return print_json(&s);
    }
    let labels = if s.labels.is_empty() {
        "-".to_string()
    } else {
        s.labels.join(", ")
    };
    let rows = [
        ("name", s.name.clone()),
        ("id", s.id.clone()),
        ("status", s.status.clone()),
        ("url", s.url.clone()),
        ("url auth", s.url_settings.auth.clone()),
        ("labels", labels),
        ("created", s.created_at.clone().unwrap_or_else(|| "-".into())),
        ("last active", ago(s.last_running_at.as_deref())),
    ];
    for (k, v) in rows {
        println!("{:<12} {v}", format!("{k}:"));
    }
    if s.extra.contains_key("node") {
        println!("{:<12} {}", "node:", placement(&s));
    }
    if let Some(d) = s.extra.get("durability") {
        println!("{:<12} {}", "durable:", durability(d));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    /// [default: -s, or the sprite `den use` chose]
    pub name: Option<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub force: bool,
}

pub async fn destroy(ctx: &Ctx, a: DestroyArgs) -> Result<()> {
    let name = ctx.sprite(a.name.as_deref())?;
    let c = ctx.client()?;
    if !a.force {
        if !stdin_is_tty() {
            bail!(
                "refusing to destroy '{name}' without confirmation (stdin is not a terminal) — pass --force"
            );
        }
        // Ask only about a sprite that exists, so a typo fails before the question.
        c.get_sprite(&name).await.hint()?;
        if !prompt::confirm(&format!(
            "Destroy sprite '{name}' with all its files and checkpoints? This cannot be undone."
        ))? {
            bail!("not destroyed");
        }
    }
    c.delete_sprite(&name).await.hint()?;
    println!("destroyed sprite {name}");
    Ok(())
}

#[derive(Args, Debug)]
pub struct UseArgs {
    /// The sprite commands in this directory (and below) should act on.
    #[arg(required_unless_present = "unset")]
    pub name: Option<String>,
    /// Remove this directory's .den instead.
    #[arg(long, conflicts_with = "name")]
    pub unset: bool,
}

pub async fn use_sprite(ctx: &Ctx, a: UseArgs) -> Result<()> {
    let cwd = std::env::current_dir().context("finding the working directory")?;
    if a.unset {
        let p = cwd.join(config::LOCAL_FILE);
        match std::fs::remove_file(&p) {
            Ok(()) => println!("removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("no {} here", config::LOCAL_FILE),
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
        return Ok(());
    }
    let name = a.name.context("which sprite? — `den use NAME`")?;
    // Catch a typo now rather than at every later command.
    ctx.client()?.get_sprite(&name).await.hint()?;
    let p = config::write_local(&cwd, &name)?;
    println!("using sprite {name} here (wrote {})", p.display());
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum UrlAuth {
    /// Anyone can open the URL.
    Public,
    /// Requests need a den token.
    Sprite,
}

#[derive(Args, Debug)]
pub struct UrlArgs {
    /// Change who may open the URL.
    #[arg(long, value_enum)]
    pub auth: Option<UrlAuth>,
    #[arg(long)]
    pub json: bool,
}

pub async fn url(ctx: &Ctx, a: UrlArgs) -> Result<()> {
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    let s = match a.auth {
        Some(UrlAuth::Public) => c.set_url_auth(&name, "public").await,
        Some(UrlAuth::Sprite) => c.set_url_auth(&name, "sprite").await,
        None => c.get_sprite(&name).await,
    }
    .hint()?;
    if a.json {
        return print_json(&serde_json::json!({"name": s.name, "url": s.url, "auth": s.url_settings.auth}));
    }
    println!("{}", s.url);
    println!("auth: {}", s.url_settings.auth);
    Ok(())
}

/// `node (region)` of a sprite in a cluster; `-` when no node holds it.
fn placement(s: &Sprite) -> String {
    let text = |k: &str| s.extra.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    let (node, region) = (text("node"), text("region"));
    match (node.is_empty(), region.is_empty()) {
        (true, true) => "-".into(),
        (true, false) => format!("- ({region})"),
        (false, true) => node,
        (false, false) => format!("{node} ({region})"),
    }
}

/// The cluster durability window: what a dead host would cost this sprite.
fn durability(d: &serde_json::Value) -> String {
    let window = d.get("window_seconds").and_then(|v| v.as_u64()).unwrap_or(0);
    if d.get("fully_durable").and_then(|v| v.as_bool()) == Some(true) {
        return format!("everything (in the object store); window {window}s while running");
    }
    match d.get("durable_at").and_then(|v| v.as_str()) {
        Some(t) => format!("up to {} ({t}); window {window}s", ago(Some(t))),
        None => format!("not yet synced; window {window}s"),
    }
}
