//! Running `nft` and `conntrack`.
//!
//! Links, addresses and routes are set over netlink ([`crate::rtnl`]); the firewall goes
//! through nft scripts, which give us an atomic whole-table replace for free, and the error
//! text is what an operator would see when debugging by hand. They are applied in process by
//! libnftables ([`crate::libnft`]); [`nft`] is the fallback where the library won't load.

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

/// Apply an nft script in one transaction (all or nothing).
pub(crate) fn nft(script: &str) -> Result<(), NetError> {
    run("nft", &["-f", "-"], Some(script)).map(|_| ())
}
