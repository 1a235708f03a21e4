//! Checkpoints, restore and fork.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use den_client::{Client, StreamMessage};

use super::Ctx;
use super::errors::Hint;
use super::output::{ago, print_json, print_table, secs, spinner, table};

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// Checkpoint the sprite's disk; prints the id and how long it took.
    #[command(
        after_help = "Examples:\n  den checkpoint create --comment 'deps installed'\n  den checkpoint create --json -s web"
    )]
    Create {
        #[arg(long, short = 'c')]
        comment: Option<String>,
        /// Save the running processes too (gVisor sprites): a restore or a
        /// fork of this checkpoint brings them back.
        #[arg(long)]
        memory: bool,
        /// Print {"id", "elapsed_ms"}.
        #[arg(long)]
        json: bool,
    },
    /// List checkpoints, newest first.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one checkpoint.
    Info {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint (not the one the sprite was last restored to).
    #[command(visible_alias = "delete")]
    Rm { id: String },
    /// Same as `den restore ID`.
    Restore(RestoreArgs),
}

pub async fn checkpoint(ctx: &Ctx, cmd: CheckpointCmd) -> Result<()> {
    if let CheckpointCmd::Restore(a) = cmd {
        return restore(ctx, a).await;
    }
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    match cmd {
        CheckpointCmd::Create {
            comment,
            memory,
            json,
        } => {
            let t0 = Instant::now();
            let pb = spinner(format!("checkpointing {name}"));
            let stream = c
                .create_checkpoint(&name, comment.as_deref(), memory)
                .await
                .hint()?;
            let done = stream.finish(|m| pb.set_message(m.text().to_string())).await;
            pb.finish_and_clear();
            let done = done.hint()?;
            let elapsed = t0.elapsed();
            let id = checkpoint_id(&done)?;
            if json {
                return print_json(&serde_json::json!({"id": id, "elapsed_ms": elapsed.as_millis() as u64}));
            }
            println!("checkpoint {id} of {name} created in {}", secs(elapsed));
        }
        CheckpointCmd::Ls { json } => {
            let cks = c.list_checkpoints(&name).await.hint()?;
            if json {
                return print_json(&cks);
            }
            if cks.is_empty() {
                println!("no checkpoints of {name} — create one with `den checkpoint create`");
                return Ok(());
            }
            let mut t = table(&["id", "created", "memory", "comment"]);
            for ck in cks {
                let memory = ck.extra.get("memory").and_then(|m| m.as_bool()) == Some(true);
                t.add_row(vec![
                    ck.id,
                    ago(ck.create_time.as_deref()),
                    if memory { "yes" } else { "-" }.to_string(),
                    ck.comment.unwrap_or_default(),
                ]);
            }
            print_table(&t);
        }
        CheckpointCmd::Info { id, json } => {
            let ck = c.get_checkpoint(&name, &id).await.hint()?;
            if json {
                return print_json(&ck);
            }
            println!("id:       {}", ck.id);
            println!("sprite:   {name}");
            println!("created:  {}", ck.create_time.as_deref().unwrap_or("-"));
            println!("comment:  {}", ck.comment.as_deref().unwrap_or(""));
        }
        CheckpointCmd::Rm { id } => {
            c.delete_checkpoint(&name, &id).await.hint()?;
            println!("deleted checkpoint {id} of {name}");
        }
        CheckpointCmd::Restore(_) => {}
    }
    Ok(())
}

/// The id from `Checkpoint v3 created` (the server's `complete` line).
fn checkpoint_id(m: &StreamMessage) -> Result<String> {
    match m
        .text()
        .split_whitespace()
        .find(|w| w.len() > 1 && w.starts_with('v') && w[1..].bytes().all(|b| b.is_ascii_digit()))
    {
        Some(id) => Ok(id.to_string()),
        None => bail!("the server said {:?} but named no checkpoint id", m.text()),
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Checkpoint id (v3, or 3).
    pub id: String,
}

/// How long a restored sprite may take to answer again.
const RESTORE_WAIT: Duration = Duration::from_secs(120);

pub async fn restore(ctx: &Ctx, a: RestoreArgs) -> Result<()> {
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    let t0 = Instant::now();
    let stream = c.restore_checkpoint(&name, &a.id).await.hint()?;
    stream.finish(|m| eprintln!("{}", m.text())).await.hint()?;
    wait_answering(&c, &name).await?;
    println!("restored {name} to {} in {}", a.id, secs(t0.elapsed()));
    Ok(())
}

/// Restore restarts the sprite; wait until it runs a command again (`true`
/// over HTTP exec: the answer is complete once the exit frame arrived).
async fn wait_answering(c: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + RESTORE_WAIT;
    let ping = || async {
        let rb = c.request(
            den_client::reqwest::Method::POST,
            &format!("/v1/sprites/{name}/exec?cmd=true"),
        )?;
        let body = c
            .send(rb, Some(name))
            .await?
            .bytes()
            .await
            .map_err(|e| c.transport(e))?;
        Ok::<_, den_client::Error>(body.ends_with(&[3, 0]))
    };
    loop {
        match ping().await {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() >= deadline => {
                anyhow::bail!(
                    "{name} did not run a command within {}s of the restore",
                    RESTORE_WAIT.as_secs()
                )
            }
            Ok(false) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) if Instant::now() >= deadline => {
                return Err(super::errors::explain(e).context(format!(
                    "{name} did not answer within {}s of the restore",
                    RESTORE_WAIT.as_secs()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// SOURCE or SOURCE@CHECKPOINT (live state when no checkpoint).
    pub source: String,
    /// Name of the new sprite.
    pub new: String,
    #[arg(long)]
    pub json: bool,
}

pub async fn fork(ctx: &Ctx, a: ForkArgs) -> Result<()> {
    let (source, ck) = match a.source.split_once('@') {
        Some((s, c)) if !s.is_empty() && !c.is_empty() => (s, Some(c)),
        Some(_) => bail!("use SOURCE or SOURCE@CHECKPOINT, like web@v2"),
        None => (a.source.as_str(), None),
    };
    let c = ctx.client()?;
    let t0 = Instant::now();
    let pb = spinner(format!("forking {} into {}", a.source, a.new));
    let res = c.fork_sprite(source, &a.new, ck).await;
    pb.finish_and_clear();
    let s = res.hint()?;
    if a.json {
        return print_json(&s);
    }
    println!("forked {} into {} in {}", a.source, s.name, secs(t0.elapsed()));
    println!("url: {}", s.url);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_id_comes_from_the_complete_line() {
        let m: StreamMessage =
            serde_json::from_str(r#"{"type":"complete","data":"Checkpoint v12 created"}"#).unwrap();
        assert_eq!(checkpoint_id(&m).unwrap(), "v12");
        let m: StreamMessage = serde_json::from_str(r#"{"type":"complete","data":"done"}"#).unwrap();
        assert!(checkpoint_id(&m).is_err());
    }
}
