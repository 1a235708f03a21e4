//! Commands over the exec WebSocket (§3): `exec`, `console`, `sessions`.
//!
//! Non-TTY frames carry a stream byte (0x00 stdin, 0x01 stdout, 0x02 stderr,
//! 0x03 exit+code, 0x04 stdin EOF); TTY frames are raw terminal bytes with
//! the exit as a text `{"type":"exit"}`. One loop ([`drive`]) speaks both:
//! attach learns the mode from `session_info`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use den_client::tokio_tungstenite::tungstenite::Message;
use den_client::{ExecOptions, Ws};
use futures::{SinkExt, StreamExt};
use nix::sys::termios::{self, SetArg, Termios};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::Ctx;
use super::errors::Hint;
use super::output::{ago, print_json, print_table, table};

/// Ctrl+\ in a raw terminal: detach from the session, leave it running.
const DETACH_BYTE: u8 = 0x1c;
/// Stdin is sent in chunks of this size; a few chunks in flight at most, so
/// a huge input streams instead of being buffered whole.
const STDIN_CHUNK: usize = 64 * 1024;
const IN_FLIGHT: usize = 8;
/// A PATH for `--env` runs: the API replaces the whole default environment
/// when any `env` is given, and a command without PATH finds nothing.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The console's shell: bash when the image has it, else sh, both as login shells.
const CONSOLE_SCRIPT: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l";

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Run on a pseudo-terminal (raw mode; for interactive programs). Ctrl+\ detaches.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set a variable (repeatable). As in the Sprites API, any --env replaces the
    /// default environment; den adds a standard PATH unless you set one.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the sprite [default: /home/sprite].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<String>,
    /// Kill the command after this long (like 30s, 5m, 1h).
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<String>,
    /// Forward ports the command starts listening on to the same ports on 127.0.0.1 here.
    #[arg(long)]
    pub forward: bool,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub cmd: Vec<String>,
}

pub async fn exec(ctx: &Ctx, a: ExecArgs) -> Result<()> {
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    let mut env = Vec::new();
    for e in &a.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => env.push(e.clone()),
            _ => bail!("--env {e:?} must look like KEY=VALUE"),
        }
    }
    if !env.is_empty() && !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let timeout = match &a.timeout {
        Some(t) => {
            let d = humantime::parse_duration(t)
                .with_context(|| format!("--timeout {t:?} is not a duration (like 30s, 5m, 1h)"))?;
            if d.is_zero() {
                bail!("--timeout must be more than 0");
            }
            Some(format!("{}ms", d.as_millis()))
        }
        None => None,
    };
    let stdin_tty = std::io::stdin().is_terminal();
    let (cols, rows) = if a.tty { term_size().unzip() } else { (None, None) };
    let opts = ExecOptions {
        cmd: a.cmd,
        tty: a.tty,
        stdin: !stdin_tty || a.tty,
        env,
        dir: a.dir,
        timeout,
        cols,
        rows,
    };
    let ws = c.exec_ws(&name, &opts).await.hint()?;
    let input = match (a.tty, stdin_tty) {
        (true, true) => Input::Raw,
        (_, false) => Input::Pipe,
        (false, true) => Input::None,
    };
    let fwd = a.forward.then(|| (c.clone(), name.clone()));
    let out = drive_fwd(ws, a.tty, input, fwd).await?;
    finish(out, &name)
}

/// Run `cmd` without input (output passes through); exits with its code.
pub async fn run_plain(c: &den_client::Client, name: &str, cmd: Vec<String>) -> Result<()> {
    let opts = ExecOptions {
        cmd,
        ..Default::default()
    };
    let ws = c.exec_ws(name, &opts).await.hint()?;
    let out = drive(ws, false, Input::None).await?;
    finish(out, name)
}

#[derive(Args, Debug)]
pub struct ConsoleArgs {}

/// An interactive login shell in the sprite.
pub async fn console(ctx: &Ctx, _a: ConsoleArgs) -> Result<()> {
    let name = ctx.sprite(None)?;
    open_console(ctx, &name).await
}

pub async fn open_console(ctx: &Ctx, name: &str) -> Result<()> {
    let c = ctx.client()?;
    let (cols, rows) = term_size().unzip();
    let opts = ExecOptions {
        cmd: vec!["sh".into(), "-c".into(), CONSOLE_SCRIPT.into()],
        tty: true,
        stdin: true,
        cols,
        rows,
        ..Default::default()
    };
    let ws = c.exec_ws(name, &opts).await.hint()?;
    let input = if std::io::stdin().is_terminal() {
        Input::Raw
    } else {
        Input::Pipe
    };
    let out = drive(ws, true, input).await?;
    finish(out, name)
}

#[derive(Subcommand, Debug)]
pub enum SessionsCmd {
    /// List the sprite's exec sessions.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Attach to a session: its recent output is replayed, then it is live. Ctrl+\ detaches.
    Attach { id: String },
    /// Signal a session's processes and wait until they exit.
    Kill {
        id: String,
        /// The signal: TERM, INT, KILL, HUP, … (with or without SIG).
        #[arg(long, default_value = "TERM")]
        signal: String,
    },
}

pub async fn sessions(ctx: &Ctx, cmd: SessionsCmd) -> Result<()> {
    let name = ctx.sprite(None)?;
    let c = ctx.client()?;
    match cmd {
        SessionsCmd::Ls { json } => {
            let list = c.list_sessions(&name).await.hint()?;
            if json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no sessions — start one with `den console` or `den exec`");
                return Ok(());
            }
            let mut t = table(&["id", "command", "tty", "attached", "created", "last activity"]);
            for s in &list {
                t.add_row(vec![
                    s.id_string(),
                    s.command.clone(),
                    if s.tty { "yes" } else { "no" }.to_string(),
                    if s.is_active { "yes" } else { "no" }.to_string(),
                    ago(s.created.as_deref()),
                    ago(s.last_activity.as_deref()),
                ]);
            }
            print_table(&t);
            Ok(())
        }
        SessionsCmd::Attach { id } => {
            let ws = c.attach_ws(&name, &id).await.hint()?;
            let input = if std::io::stdin().is_terminal() {
                Input::Raw
            } else {
                Input::Pipe
            };
            // The mode comes from session_info; assume a terminal until then.
            let out = drive(ws, true, input).await?;
            finish(out, &name)
        }
        SessionsCmd::Kill { id, signal } => {
            let sig = if signal.to_ascii_uppercase().starts_with("SIG") {
                signal.to_ascii_uppercase()
            } else {
                format!("SIG{}", signal.to_ascii_uppercase())
            };
            let stream = c.kill_session(&name, &id, &sig).await.hint()?;
            let done = stream
                .finish(|m| {
                    if !m.is_complete() && !m.text().is_empty() {
                        eprintln!("{}", m.text());
                    }
                })
                .await
                .hint()?;
            match done.extra.get("exit_code") {
                Some(code) => println!("session {id} ended (exit code {code})"),
                None => println!("session {id} ended"),
            }
            Ok(())
        }
    }
}

/// Where the command's input comes from.
#[derive(Clone, Copy, PartialEq)]
enum Input {
    /// Nothing: non-TTY with stdin on a terminal (send EOF at once).
    None,
    /// Our stdin as a byte stream (a pipe or file; EOF is passed on).
    Pipe,
    /// Our terminal in raw mode; Ctrl+\ detaches.
    Raw,
}

struct Outcome {
    code: Option<i32>,
    session: Option<String>,
    detached: bool,
}

/// Restores the terminal's settings on drop, whichever way the session ends.
struct RawMode(Termios);

impl RawMode {
    fn enable() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let orig = termios::tcgetattr(&stdin).context("reading the terminal settings")?;
        let mut raw = orig.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("switching the terminal to raw mode")?;
        Ok(RawMode(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}

/// The terminal's size (cols, rows), from stdout or stdin.
fn term_size() -> Option<(u16, u16)> {
    for fd in [1, 0, 2] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

/// Pump stdin into the socket until EOF (or, raw, until Ctrl+\).
async fn pump_stdin(mode: Input, tx: mpsc::Sender<Message>, detach: mpsc::Sender<()>) {
    if mode == Input::None {
        let _ = tx.send(Message::Binary(vec![0x04].into())).await;
        return;
    }
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; STDIN_CHUNK];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if mode == Input::Raw {
            if let Some(i) = data.iter().position(|b| *b == DETACH_BYTE) {
                if i > 0 {
                    let _ = tx.send(Message::Binary(data[..i].to_vec().into())).await;
                }
                let _ = detach.send(()).await;
                return;
            }
            if tx.send(Message::Binary(data.to_vec().into())).await.is_err() {
                return;
            }
        } else {
            let mut frame = Vec::with_capacity(n + 1);
            frame.push(0x00);
            frame.extend_from_slice(data);
            if tx.send(Message::Binary(frame.into())).await.is_err() {
                return;
            }
        }
    }
    if mode == Input::Pipe {
        let _ = tx.send(Message::Binary(vec![0x04].into())).await;
    }
}

/// Print a note on stderr; in raw mode lines need a carriage return.
fn note(raw: bool, msg: &str) {
    let mut e = std::io::stderr().lock();
    if raw {
        let _ = write!(e, "\r\n{msg}\r\n");
    } else {
        let _ = writeln!(e, "{msg}");
    }
    let _ = e.flush();
}

/// Run one session to its end: output to stdout/stderr, stdin, signals and
/// window sizes to the sprite.
async fn drive(ws: Ws, tty_hint: bool, input: Input) -> Result<Outcome> {
    drive_fwd(ws, tty_hint, input, None).await
}

/// [`drive`], forwarding opened ports when `fwd` names the client and sprite.
async fn drive_fwd(
    ws: Ws,
    tty_hint: bool,
    input: Input,
    fwd: Option<(den_client::Client, String)>,
) -> Result<Outcome> {
    let mut tty = tty_hint;
    let raw_guard = if input == Input::Raw {
        Some(RawMode::enable()?)
    } else {
        None
    };
    let raw = raw_guard.is_some();
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
    });
    let (detach_tx, mut detach_rx) = mpsc::channel::<()>(1);
    // Stdin starts after session_info, once the mode is known (attach).
    let mut stdin_started = false;
    let start_stdin = |tty: bool| {
        // A non-TTY session never gets raw bytes: frame them.
        let mode = match input {
            Input::Raw if !tty => Input::Pipe,
            m => m,
        };
        tokio::spawn(pump_stdin(mode, tx.clone(), detach_tx.clone()))
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut winch = signal(SignalKind::window_change()).context("installing the SIGWINCH handler")?;
    let mut out = Outcome {
        code: None,
        session: None,
        detached: false,
    };
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut stdin_task = None;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Err(e)) => {
                        drop(raw_guard);
                        bail!("the connection to the sprite broke: {e}");
                    }
                    Some(Ok(m)) => m,
                };
                match msg {
                    Message::Binary(b) if tty => {
                        stdout.write_all(&b)?;
                        stdout.flush()?;
                    }
                    Message::Binary(b) => match b.first() {
                        Some(0x01) => {
                            stdout.write_all(&b[1..])?;
                            stdout.flush()?;
                        }
                        Some(0x02) => {
                            stderr.write_all(&b[1..])?;
                            stderr.flush()?;
                        }
                        Some(0x03) => {
                            out.code = Some(b.get(1).copied().map(i32::from).unwrap_or(255));
                            break;
                        }
                        _ => {}
                    },
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        match v["type"].as_str() {
                            Some("session_info") => {
                                out.session = match &v["session_id"] {
                                    Value::String(s) => Some(s.clone()),
                                    Value::Null => None,
                                    other => Some(other.to_string()),
                                };
                                tty = v["tty"].as_bool().unwrap_or(tty);
                                // An attach from another terminal: the session takes its size.
                                if tty && raw && let Some((cols, rows)) = term_size() {
                                    let _ = tx.send(Message::Text(json!({"type": "resize", "cols": cols, "rows": rows}).to_string().into())).await;
                                }
                                if !stdin_started {
                                    stdin_started = true;
                                    stdin_task = Some(start_stdin(tty));
                                }
                            }
                            Some("exit") => {
                                out.code = Some(v["exit_code"].as_i64().unwrap_or(255) as i32);
                                break;
                            }
                            Some("timeout") => {
                                let m = v["message"].as_str().unwrap_or("the command ran out of time");
                                note(raw, &format!("den: {m}"));
                            }
                            Some("port_opened") => {
                                note(raw, &format!(
                                    "den: port {} opened in the sprite (on {})",
                                    v["port"], v["address"].as_str().unwrap_or("?")
                                ));
                                let port = v["port"].as_u64().and_then(|p| u16::try_from(p).ok());
                                if let (Some((c, sprite)), Some(p)) = (&fwd, port) {
                                    match super::proxy::forward(c.clone(), sprite.clone(), p, p).await {
                                        Ok(l) => note(raw, &format!("den: forwarding 127.0.0.1:{l} -> {sprite}:{p}")),
                                        Err(e) => note(raw, &format!("den: not forwarding port {p}: {e:#}")),
                                    }
                                }
                            }
                            Some("port_closed") => note(raw, &format!("den: port {} closed in the sprite", v["port"])),
                            _ => {}
                        }
                    }
                    _ => {}
                }
                if !stdin_started {
                    // An older server without session_info: start anyway.
                    stdin_started = true;
                    stdin_task = Some(start_stdin(tty));
                }
            }
            _ = sigint.recv() => {
                let _ = tx.send(Message::Text(json!({"type": "signal", "signal": "INT"}).to_string().into())).await;
            }
            _ = winch.recv(), if tty => {
                if let Some((cols, rows)) = term_size() {
                    let _ = tx.send(Message::Text(json!({"type": "resize", "cols": cols, "rows": rows}).to_string().into())).await;
                }
            }
            _ = detach_rx.recv() => {
                out.detached = true;
                let _ = tx.send(Message::Close(None)).await;
                break;
            }
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    drop(tx);
    // Let a close frame go out, without hanging on a dead peer.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    drop(raw_guard);
    Ok(out)
}

/// Report how the session ended and exit with the command's code.
fn finish(out: Outcome, sprite: &str) -> Result<()> {
    let _ = std::io::stdout().flush();
    if out.detached {
        let id = out.session.unwrap_or_else(|| "?".into());
        eprintln!("detached from session {id}; it keeps running");
        eprintln!("reattach with: den sessions attach {id} -s {sprite}");
        std::process::exit(0);
    }
    match out.code {
        Some(code) => std::process::exit(code),
        None => bail!("the connection closed before the command exited"),
    }
}
