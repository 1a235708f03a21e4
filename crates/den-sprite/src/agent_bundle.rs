//! The den agent inside every sprite is the `den` binary itself. It is
//! bind-mounted read-only at `/.sprite/bin` together with the shared
//! libraries it links and the host's dynamic loader, and started through
//! that loader, so it runs whatever userland the image has (even none:
//! busybox test images have no libc).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, SpriteError};

/// Where the bundle appears inside the sprite.
pub const SPRITE_BIN: &str = "/.sprite/bin";
/// The directory of the agent's socket inside the sprite. On engines that
/// pass a listening descriptor (see `SpriteSpec::agent_listener`) the agent
/// binds nothing there; on gVisor it binds [`AGENT_SOCKET`], and the host
/// reaches it through a bind mount, following no symlink.
pub const AGENT_RUN_DIR: &str = "/.sprite/run";
/// The agent's socket path inside the sprite, for an agent started without
/// a listening descriptor.
pub const AGENT_SOCKET: &str = "/.sprite/run/agent.sock";
/// The agent's own log, inside the sprite (on its volume, in its accounting).
pub const AGENT_LOG: &str = "/.sprite/logs/agent.log";

#[derive(Debug, Clone)]
pub struct AgentBundle {
    /// Host directory to bind-mount at [`SPRITE_BIN`].
    pub dir: PathBuf,
    /// PID 1's argv, as paths inside the sprite.
    pub init: Vec<String>,
}

/// The `sudo` script in the bundle, mounted over the image's `/usr/bin/sudo`
/// on engines without setuid (see [`den_agent::sudo`]).
pub const SUDO_SCRIPT: &str = "sudo";

impl AgentBundle {
    /// Copy `exe` and its libraries into `<root>/<content hash>/` (once per
    /// binary version; later calls find it).
    pub fn prepare(root: &Path, exe: &Path) -> Result<AgentBundle> {
        let data =
            std::fs::read(exe).map_err(|e| SpriteError::io(format!("reading {}", exe.display()), e))?;
        let tag = blake3::hash(&data).to_hex()[..16].to_string();
        let dir = root.join(&tag);
        let libs = linked_libraries(exe)?;
        let loader = libs
            .iter()
            .find(|l| {
                l.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))
            })
            .and_then(|l| l.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        if !dir.join("den").exists() {
            let tmp = root.join(format!(".{tag}.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| SpriteError::io("creating the agent bundle", e))?;
            // A hard link costs nothing (the binary is large); a copy only
            // across filesystems. The link shares the binary's mode, which is
            // executable already, so only copies get theirs set.
            if std::fs::hard_link(exe, tmp.join("den")).is_err() {
                std::fs::write(tmp.join("den"), &data).map_err(|e| SpriteError::io("copying den", e))?;
                set_mode(&tmp.join("den"), 0o555)?;
            }
            for lib in &libs {
                let name = lib.file_name().expect("ldd paths have file names");
                std::fs::copy(lib, tmp.join(name))
                    .map_err(|e| SpriteError::io(format!("copying {}", lib.display()), e))?;
                set_mode(&tmp.join(name), 0o555)?;
            }
            set_mode(&tmp, 0o755)?;
            if let Err(e) = std::fs::rename(&tmp, &dir) {
                // Another process published the same version first.
                let _ = std::fs::remove_dir_all(&tmp);
                if !dir.join("den").exists() {
                    return Err(SpriteError::io("publishing the agent bundle", e));
                }
            }
        }
        remove_old_bundles(root, &tag);
        let den = format!("{SPRITE_BIN}/den");
        let mut init = match loader {
            Some(ld) => vec![
                format!("{SPRITE_BIN}/{ld}"),
                "--library-path".into(),
                SPRITE_BIN.into(),
                den,
            ],
            None => vec![den],
        };
        write_sudo_script(&dir, &init)?;
        init.extend([
            crate::helper_cmd::AGENT_SUBCOMMAND.into(),
            "--socket".into(),
            AGENT_SOCKET.into(),
            "--log-file".into(),
            AGENT_LOG.into(),
        ]);
        Ok(AgentBundle { dir, init })
    }
}

/// Bundles of earlier den builds: the manager prepares the bundle at start,
/// when every sprite is cold, so nothing runs from them any more.
fn remove_old_bundles(root: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy() != keep
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            tracing::warn!(path = %e.path().display(), error = %err, "removing an old agent bundle");
        }
    }
}

/// `sudo ARGS…` in the sprite runs `den sudo-shim ARGS…` the way PID 1 is
/// run (`den`: the start of PID 1's argv).
fn write_sudo_script(dir: &Path, den: &[String]) -> Result<()> {
    let path = dir.join(SUDO_SCRIPT);
    if path.exists() {
        return Ok(());
    }
    let script = format!(
        "#!/bin/sh\n# den: setuid can't work here; the agent brokers sudo.\nexec {} {} \"$@\"\n",
        den.join(" "),
        crate::helper_cmd::SUDO_SUBCOMMAND
    );
    let tmp = dir.join(format!(".{SUDO_SCRIPT}.{}", std::process::id()));
    std::fs::write(&tmp, script).map_err(|e| SpriteError::io("writing the sudo script", e))?;
    set_mode(&tmp, 0o555)?;
    std::fs::rename(&tmp, &path).map_err(|e| SpriteError::io("writing the sudo script", e))
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SpriteError::io(format!("chmod {}", p.display()), e))
}

/// The shared objects `exe` loads, including the dynamic loader; empty for
/// a static binary.
fn linked_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| SpriteError::io("running ldd", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
        {
            return Ok(Vec::new());
        }
        return Err(SpriteError::io(
            format!("ldd {}", exe.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}
