//! `den services`: the sprite's supervised processes.

use anyhow::{Result, bail};
use clap::Subcommand;
use den_client::{NdjsonStream, ServiceSpec, StreamMessage};

use super::Ctx;
use super::errors::Hint;
use super::output::{print_json, print_table, table};

/// Where the sprite keeps service logs (the server's log_files).
const LOG_DIR: &str = "/.sprite/logs/services";

#[derive(Subcommand, Debug)]
pub enum ServicesCmd {
    /// List services with their state.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Create (or replace) a service and start it.
    Create {
        name: String,
        /// The program to run.
        #[arg(long)]
        cmd: String,
        /// An argument (repeatable, in order).
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// The port the sprite URL sends HTTP traffic to (one service per sprite).
        #[arg(long)]
        http_port: Option<u16>,
        /// A service that must start first (repeatable).
        #[arg(long = "needs", value_name = "SERVICE")]
        needs: Vec<String>,
        /// Working directory.
        #[arg(long)]
        dir: Option<String>,
    },
    /// Start a stopped service.
    Start { name: String },
    /// Stop a service (it stays stopped until started).
    Stop { name: String },
    /// Delete a service (its logs stay).
    Rm { name: String },
    /// Print the tail of a service's log; -f keeps following it.
    Logs {
        name: String,
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        #[arg(short, long)]
        follow: bool,
    },
}

/// Print a service event stream as it comes; fail on an `error` line.
async fn events(s: NdjsonStream) -> Result<StreamMessage> {
    s.finish(|m| {
        let t = m.text();
        match (m.kind.as_str(), t.is_empty()) {
            ("complete", _) => {}
            (k, true) => match m.extra.get("exit_code") {
                Some(c) => eprintln!("{k} (exit code {c})"),
                None => eprintln!("{k}"),
            },
            (k, false) => eprintln!("{k}: {}", t.trim_end()),
        }
    })
    .await
    .hint()
}

pub async fn services(ctx: &Ctx, cmd: ServicesCmd) -> Result<()> {
    let sprite = ctx.sprite(None)?;
    let c = ctx.client()?;
    match cmd {
        ServicesCmd::Ls { json } => {
            let list = c.list_services(&sprite).await.hint()?;
            if json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no services — create one with `den services create NAME --cmd PROGRAM`");
                return Ok(());
            }
            let mut t = table(&["name", "status", "pid", "http port", "command"]);
            for s in &list {
                let mut cmdline = s.cmd.clone();
                for a in &s.args {
                    cmdline.push(' ');
                    cmdline.push_str(a);
                }
                t.add_row(vec![
                    s.name.clone(),
                    s.status().to_string(),
                    s.state["pid"]
                        .as_u64()
                        .map(|p| p.to_string())
                        .unwrap_or("-".into()),
                    s.http_port.map(|p| p.to_string()).unwrap_or("-".into()),
                    cmdline,
                ]);
            }
            print_table(&t);
            Ok(())
        }
        ServicesCmd::Create {
            name,
            cmd,
            args,
            http_port,
            needs,
            dir,
        } => {
            let spec = ServiceSpec {
                cmd,
                args,
                needs,
                http_port,
                dir,
            };
            events(c.put_service(&sprite, &name, &spec).await.hint()?).await?;
            println!("service {name} created on {sprite}");
            Ok(())
        }
        ServicesCmd::Start { name } => {
            events(c.start_service(&sprite, &name).await.hint()?).await?;
            println!("service {name} started");
            Ok(())
        }
        ServicesCmd::Stop { name } => {
            events(c.stop_service(&sprite, &name).await.hint()?).await?;
            println!("service {name} stopped");
            Ok(())
        }
        ServicesCmd::Rm { name } => {
            c.delete_service(&sprite, &name).await.hint()?;
            println!("service {name} deleted (its logs stay in {LOG_DIR})");
            Ok(())
        }
        ServicesCmd::Logs { name, lines, follow } => {
            if lines == 0 {
                bail!("--lines must be at least 1");
            }
            if !follow {
                print!("{}", c.service_logs(&sprite, &name, lines).await.hint()?);
                return Ok(());
            }
            // The API has no follow mode: tail the log file inside the sprite (Ctrl+C ends it).
            c.list_services(&sprite).await.hint()?;
            let path = format!("{LOG_DIR}/{name}.log");
            super::exec::run_plain(
                &c,
                &sprite,
                vec!["tail".into(), "-n".into(), lines.to_string(), "-F".into(), path],
            )
            .await
        }
    }
}
