//! Running `ip`, `nft` and `conntrack`.
//!
//! We shell out instead of speaking netlink directly: `ip`/`nft` are required on every host
//! anyway (iproute2/nftables packages), `nft -f -` gives us an atomic whole-table replace for
//! free, and the error text they print is what an operator would see when debugging by hand.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::NetError;

/// Run `prog args…`, feeding `stdin` if given; error with stderr on a non-zero exit.
pub(crate) fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|e| NetError::Spawn {
        prog: prog.to_string(),
        source: e,
    })?;
    if let Some(input) = stdin {
        // Take the pipe so it is closed (EOF) when this block ends.
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes()).map_err(|e| NetError::Spawn {
            prog: prog.to_string(),
            source: e,
        })?;
    }
    let out = child.wait_with_output().map_err(|e| NetError::Spawn {
        prog: prog.to_string(),
        source: e,
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            cmd: format!("{prog} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            stdin: stdin.map(|s| s.to_string()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip args…`.
pub(crate) fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args, None)
}

/// `ip -batch -` (one process for many changes; stops at the first failing line).
pub(crate) fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), NetError> {
    match netns {
        Some(ns) => run("ip", &["-n", ns, "-batch", "-"], Some(script)),
        None => run("ip", &["-batch", "-"], Some(script)),
    }
    .map(|_| ())
}

/// Apply an nft script in one transaction (all or nothing).
pub(crate) fn nft(script: &str) -> Result<(), NetError> {
    run("nft", &["-f", "-"], Some(script)).map(|_| ())
}

/// Treat "does not exist" answers as success: teardown must be idempotent.
pub(crate) fn ignore_missing(r: Result<String, NetError>) -> Result<(), NetError> {
    match r {
        Ok(_) => Ok(()),
        Err(NetError::Command { ref stderr, .. })
            if stderr.contains("Cannot find device")
                || stderr.contains("No such file")
                || stderr.contains("does not exist")
                || stderr.contains("No such process") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
