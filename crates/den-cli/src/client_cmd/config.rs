//! Where the CLI's settings come from: flags beat `DEN_API_URL`/`DEN_TOKEN`,
//! which beat `~/.config/den/config.toml` (written by `den login`). A `.den`
//! file in the working directory or a parent names the default sprite.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";
/// Name of the per-directory file written by `den use`.
pub const LOCAL_FILE: &str = ".den";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A private CA for an https:// den, saved by `den login --ca-cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/den/config.toml`, else `~/.config/den/config.toml`.
pub fn config_path() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("HOME is not set, so there is no place for den's config file")?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(base.join("den").join("config.toml"))
}

pub fn load() -> Result<FileConfig> {
    let path = config_path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Write the file 0600 (it holds a token), replacing it atomically so a
/// crash never leaves half a config behind.
pub fn save(cfg: &FileConfig) -> Result<PathBuf> {
    let path = config_path()?;
    let dir = path.parent().context("config path has no parent")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(".config.toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(toml::to_string(cfg)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The API URL and token in force: flag, else environment, else file.
#[derive(Debug, Clone)]
pub struct Settings {
    pub api_url: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// `flag_ca` is `--ca-cert` or `DEN_CA_CERT` (clap reads the variable).
pub fn resolve(flag_url: Option<&str>, flag_token: Option<&str>, flag_ca: Option<&Path>) -> Result<Settings> {
    let file = load()?;
    let api_url = flag_url
        .map(str::to_string)
        .or_else(|| env("DEN_API_URL"))
        .or(file.api_url)
        .unwrap_or_else(|| DEFAULT_API_URL.to_string());
    let token = flag_token
        .map(str::to_string)
        .or_else(|| env("DEN_TOKEN"))
        .or(file.token);
    let ca_cert = flag_ca.map(Path::to_path_buf).or(file.ca_cert);
    Ok(Settings {
        api_url,
        token,
        ca_cert,
    })
}

#[derive(Debug, Serialize, Deserialize)]
struct LocalFile {
    sprite: String,
}

/// The sprite named by the nearest `.den` in `dir` or its parents.
pub fn local_sprite(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    for d in dir.ancestors() {
        let p = d.join(LOCAL_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let f: LocalFile = toml::from_str(&text)
                    .with_context(|| format!("{} is not a den sprite file", p.display()))?;
                return Ok(Some((f.sprite, p)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // A directory named .den, or one we may not read: not ours, keep looking.
            Err(_) if p.is_dir() => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    Ok(None)
}

pub fn write_local(dir: &Path, sprite: &str) -> Result<PathBuf> {
    let p = dir.join(LOCAL_FILE);
    let text = toml::to_string(&LocalFile {
        sprite: sprite.to_string(),
    })?;
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

/// Pick the sprite a command is about: its argument, else `-s`, else `.den`.
pub fn pick_sprite(arg: Option<&str>, flag: Option<&str>) -> Result<String> {
    if let Some(n) = arg.or(flag) {
        return Ok(n.to_string());
    }
    let cwd = std::env::current_dir().context("finding the working directory")?;
    match local_sprite(&cwd)? {
        Some((name, _)) => Ok(name),
        None => bail!("which sprite? — pass -s NAME, or run `den use NAME` in this directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_file_is_found_from_a_subdirectory() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        assert!(local_sprite(&sub).unwrap().is_none());
        write_local(d.path(), "web").unwrap();
        let (name, path) = local_sprite(&sub).unwrap().unwrap();
        assert_eq!(name, "web");
        assert_eq!(path, d.path().join(LOCAL_FILE));
    }
}
