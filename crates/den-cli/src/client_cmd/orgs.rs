//! `den org`: organisations (server administrators), and the token's own.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{Map, Value};

use super::Ctx;
use super::errors::Hint;
use super::output::{print_json, print_table, table};

/// An organisation's quotas; unset is no limit of its own.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Most sprites it may have.
    #[arg(long, value_name = "N")]
    max_sprites: Option<u64>,
    /// Most sprites awake at once.
    #[arg(long, value_name = "N")]
    max_awake: Option<u64>,
    /// Most creations per window, e.g. 10/60s.
    #[arg(long, value_name = "COUNT/DURATION")]
    create_rate: Option<String>,
    /// Total memory of its awake sprites, MiB.
    #[arg(long, value_name = "MIB")]
    max_memory_mb: Option<u64>,
    /// Total CPUs of its awake sprites.
    #[arg(long, value_name = "CPUS")]
    max_cpus: Option<f64>,
    /// Total bytes its disks and checkpoints may keep stored.
    #[arg(long, value_name = "BYTES")]
    max_disk_bytes: Option<u64>,
}

impl LimitArgs {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("max_sprites", self.max_sprites.map(Into::into));
        put("max_awake", self.max_awake.map(Into::into));
        put("create_rate", self.create_rate.clone().map(Into::into));
        put("max_memory_mb", self.max_memory_mb.map(Into::into));
        put("max_cpus", self.max_cpus.map(Into::into));
        put("max_disk_bytes", self.max_disk_bytes.map(Into::into));
        Value::Object(m)
    }

    fn any(&self) -> bool {
        self.to_json().as_object().is_some_and(|m| !m.is_empty())
    }
}

#[derive(Subcommand, Debug)]
pub enum OrgCmd {
    /// Create an organisation (server administrators).
    Create {
        /// 1-32 characters of a-z and 0-9; sprite URLs end in -SLUG.
        slug: String,
        /// Display name [default: the slug].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// List organisations (server administrators).
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an organisation: its sprites and limits [default: the token's own].
    Show {
        slug: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Rename an organisation or replace its limits (server administrators).
    Set {
        slug: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Remove every limit.
        #[arg(long, conflicts_with_all = ["max_sprites", "max_awake", "create_rate", "max_memory_mb", "max_cpus", "max_disk_bytes"])]
        no_limits: bool,
    },
    /// Delete an organisation without sprites, and its tokens (server administrators).
    Rm { slug: String },
    /// The organisation's recent changes: who did what to which sprite.
    Audit {
        /// [default: the token's own organisation]
        slug: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

fn show(o: &den_client::Org, json: bool) -> Result<()> {
    if json {
        return print_json(o);
    }
    println!("{} ({})", o.slug, o.name);
    println!(
        "  sprites: {} ({} running, {} warm, {} cold)",
        o.sprites, o.running, o.warm, o.cold
    );
    match o.limits.as_object().filter(|m| !m.is_empty()) {
        Some(m) => {
            for (k, v) in m {
                println!("  {k}: {v}");
            }
        }
        None => println!("  limits: none of its own"),
    }
    Ok(())
}

pub async fn org(ctx: &Ctx, cmd: OrgCmd) -> Result<()> {
    let c = ctx.client()?;
    match cmd {
        OrgCmd::Create {
            slug,
            name,
            limits,
            json,
        } => {
            let o = c
                .create_org(&slug, name.as_deref(), &limits.to_json())
                .await
                .hint()?;
            show(&o, json)?;
        }
        OrgCmd::Ls { json } => {
            let orgs = c.list_orgs().await.hint()?;
            if json {
                return print_json(&orgs);
            }
            let mut t = table(&["slug", "name", "sprites", "running", "created"]);
            for o in orgs {
                t.add_row(vec![
                    o.slug,
                    o.name,
                    o.sprites.to_string(),
                    o.running.to_string(),
                    o.created_at,
                ]);
            }
            print_table(&t);
        }
        OrgCmd::Show { slug, json } => {
            let o = match slug {
                Some(s) => c.get_org(&s).await.hint()?,
                None => c.organization().await.hint()?,
            };
            show(&o, json)?;
        }
        OrgCmd::Set {
            slug,
            name,
            limits,
            no_limits,
        } => {
            let l = if no_limits {
                Some(Value::Object(Map::new()))
            } else {
                limits.any().then(|| limits.to_json())
            };
            let o = c.update_org(&slug, name.as_deref(), l.as_ref()).await.hint()?;
            show(&o, false)?;
        }
        OrgCmd::Rm { slug } => {
            c.delete_org(&slug).await.hint()?;
            println!("deleted organisation {slug} and its tokens");
        }
        OrgCmd::Audit { slug, limit, json } => {
            let slug = match slug {
                Some(s) => s,
                None => c.organization().await.hint()?.slug,
            };
            let entries = c.audit(&slug, limit).await.hint()?;
            if json {
                return print_json(&entries);
            }
            let mut t = table(&["time", "token", "action", "sprite", "status"]);
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            for e in &entries {
                t.add_row(vec![
                    s(&e["time"]),
                    format!("{} ({})", s(&e["token_name"]), s(&e["token_id"])),
                    s(&e["action"]),
                    s(&e["sprite"]),
                    e["status"].to_string(),
                ]);
            }
            print_table(&t);
        }
    }
    Ok(())
}
