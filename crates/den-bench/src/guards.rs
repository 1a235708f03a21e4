//! Guards shared by the benchmark targets: work directories that refuse to
//! delete through live mounts, ext4 mounts that unmount on drop, and the
//! mount-table and command helpers they need.

use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cancel::{self, EmergencyToken};

/// A uniquely named directory under the caller's work dir, holding all of a
/// target's files. Deleted on drop unless something is still mounted in it.
pub(crate) struct WorkRoot {
    path: Option<PathBuf>,
}

impl WorkRoot {
    pub(crate) fn create(work: &Path, prefix: &str) -> Result<Self> {
        fs::create_dir_all(work).with_context(|| format!("mkdir {}", work.display()))?;
        // Mount points are matched against /proc/self/mounts, which holds
        // canonical paths.
        let work = fs::canonicalize(work)?;
        for n in 0..1000u32 {
            let path = work.join(format!("{prefix}.{}.{n}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path: Some(path) }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", path.display())),
            }
        }
        bail!("no free {prefix}.* directory name in {}", work.display())
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("work root already removed")
    }

    /// Leave the directory for inspection (a teardown step failed).
    pub(crate) fn keep(&mut self) {
        if let Some(p) = self.path.take() {
            eprintln!("leaving {} behind", p.display());
        }
    }

    /// Delete the directory now, reporting errors; drop becomes a no-op.
    pub(crate) fn remove(&mut self) -> Result<()> {
        match self.path.take() {
            Some(path) => remove_unless_mounted(&path),
            None => Ok(()),
        }
    }
}

impl Drop for WorkRoot {
    fn drop(&mut self) {
        if let Some(path) = self.path.take()
            && let Err(e) = remove_unless_mounted(&path)
        {
            tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "leaving work dir behind");
        }
    }
}

fn remove_unless_mounted(path: &Path) -> Result<()> {
    let busy: Vec<PathBuf> = mount_table()?
        .into_iter()
        .map(|m| m.point)
        .filter(|p| p.starts_with(path))
        .collect();
    if !busy.is_empty() {
        bail!(
            "not deleting {}: still mounted beneath it: {busy:?}",
            path.display()
        );
    }
    fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
}

/// A kernel mount; unmounted on drop (lazily, if a normal unmount fails).
pub(crate) struct MountGuard {
    point: PathBuf,
    mounted: bool,
    /// Lets a second Ctrl-C unmount it even if this guard never drops.
    token: Option<EmergencyToken>,
}

impl MountGuard {
    /// Nothing mounted yet.
    pub(crate) fn none() -> Self {
        Self {
            point: PathBuf::new(),
            mounted: false,
            token: None,
        }
    }

    pub(crate) fn mount_ext4(dev: &Path, point: &Path) -> Result<Self> {
        run(Command::new("mount").args(["-t", "ext4"]).arg(dev).arg(point))
            .with_context(|| format!("mount {} on {}", dev.display(), point.display()))?;
        Ok(Self {
            point: point.to_owned(),
            mounted: true,
            token: None,
        })
    }

    /// Register the mount for the emergency unmount on a second Ctrl-C.
    pub(crate) fn with_emergency_unmount(mut self) -> Self {
        self.token = Some(cancel::register_unmount(&self.point));
        self
    }

    pub(crate) fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        // EBUSY right after the last file closes is usually transient
        // (a writeback or a just-exited process); retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match run(Command::new("umount").arg(&self.point)) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline && is_mounted(&self.point)? => {
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) if !is_mounted(&self.point)? => {
                    tracing::debug!(error = %format!("{e:#}"), "umount failed but mount is gone");
                    break;
                }
                Err(e) => return Err(e).context(format!("umount {}", self.point.display())),
            }
        }
        self.mounted = false;
        self.token = None;
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(mnt = %self.point.display(), error = %format!("{e:#}"), "unmount failed; lazy unmounting");
            let _ = run(Command::new("umount").arg("-l").arg(&self.point));
            self.mounted = false;
        }
    }
}

struct MountEntry {
    point: PathBuf,
    fstype: String,
}

fn mount_table() -> Result<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _source = fields.next()?;
            let point = unescape_mount_field(fields.next()?);
            let fstype = fields.next()?.to_owned();
            Some(MountEntry {
                point: PathBuf::from(point),
                fstype,
            })
        })
        .collect())
}

/// The kernel escapes space, tab, newline and backslash in mount paths as
/// three-digit octal (`\040`).
fn unescape_mount_field(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

pub(crate) fn is_mounted(point: &Path) -> Result<bool> {
    Ok(mount_table()?.iter().any(|m| m.point == point))
}

pub(crate) fn is_fuse_mounted(point: &Path) -> Result<bool> {
    Ok(mount_table()?
        .iter()
        .any(|m| m.point == point && m.fstype.starts_with("fuse")))
}

/// Run a short command to completion, returning stdout; on failure the error
/// carries the command line, exit status and stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal_mount_paths() {
        assert_eq!(unescape_mount_field(r"/a\040b"), OsString::from("/a b"));
        assert_eq!(unescape_mount_field(r"/a\134"), OsString::from(r"/a\"));
        assert_eq!(unescape_mount_field(r"/plain"), OsString::from("/plain"));
        assert_eq!(unescape_mount_field(r"/x\04"), OsString::from(r"/x\04"));
    }
}
