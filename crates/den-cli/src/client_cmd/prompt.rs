//! Questions on the terminal: yes/no confirmation and secret entry.

use std::io::{BufRead, Write};

use anyhow::{Context, Result};
use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};

pub fn confirm(question: &str) -> Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Read a line without echo when stdin is a terminal (a token should not
/// end up in scrollback); a plain line otherwise, so `echo $T | den login` works.
pub fn secret(prompt: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    if !super::output::stdin_is_tty() {
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the token from stdin")?;
        return Ok(line.trim().to_string());
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let saved = tcgetattr(&stdin).context("reading terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet).context("turning echo off")?;
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("reading the token")?;
    Ok(line.trim().to_string())
}
