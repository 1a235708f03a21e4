//! `den node`: the nodes of a cluster.

use anyhow::Result;
use clap::Subcommand;

use super::Ctx;
use super::errors::Hint;
use super::output::{print_json, print_table, table};

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List the cluster's nodes: region, state, liveness, load.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Put every sprite of NODE to sleep, flush it to the object store and release it, so the
    /// host can be retired; the next request for each sprite wakes it on another node.
    Drain {
        node: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn node(ctx: &Ctx, cmd: NodeCmd) -> Result<()> {
    let c = ctx.client()?;
    match cmd {
        NodeCmd::Ls { json } => {
            let nodes = c.list_nodes().await.hint()?;
            if json {
                return print_json(&nodes);
            }
            let mut t = table(&["name", "region", "state", "alive", "awake", "sprites", "url"]);
            for n in &nodes {
                t.add_row(vec![
                    n.name.clone(),
                    n.region.clone(),
                    n.state.clone(),
                    if n.alive {
                        "yes".into()
                    } else {
                        format!("no ({} s)", n.heartbeat_age_ms / 1000)
                    },
                    n.awake.to_string(),
                    n.sprites.to_string(),
                    n.url.clone(),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        NodeCmd::Drain { node, json } => {
            let r = c.drain_node(&node).await.hint()?;
            if json {
                return print_json(&r);
            }
            println!("{}: released {} sprite(s)", r.node, r.released.len());
            for (name, why) in &r.failed {
                eprintln!("  {name}: not released: {why}");
            }
            if !r.failed.is_empty() {
                anyhow::bail!("{} sprite(s) could not be released", r.failed.len());
            }
            Ok(())
        }
    }
}
