//! Building, caching and publishing images: locks, temp dirs, atomic rename.
//!
//! Layout of `images_dir`:
//!
//! ```text
//! .<version>.lock              flock(2) lock file, never deleted
//! .tmp-<version>-<pid>-<n>/    a build in progress (or the leftovers of a killed one)
//! <version>/manifest.json      written last, inside the temp dir
//! <version>/rootfs/            the image
//! <version>/idmapped/<tag>/    idmapped read-only views of rootfs (mount points)
//! <version>/rootfs-shifted-<tag>/  shifted copies (fallback for hosts without idmapped mounts)
//! ```
//!
//! A build happens under the version's lock, in a temp dir next to the final
//! one, and is published with one `rename(2)`, after a `syncfs(2)`. So a
//! `<version>/` directory is always complete, and a crash leaves only a
//! `.tmp-*` directory, which the next builder of that version removes (under
//! the lock, so it can't be someone's live build).
//!
//! The lock file's descriptor is also the build commands' stdin. A descriptor
//! shares the flock of the open file it came from, so if den dies mid-build,
//! the lock stays held until the orphaned mmdebstrap and its children are gone
//! too, and nobody deletes a temp dir that is still being written.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use super::recipe::{Recipe, SPRITE_HOME, SPRITE_UID, SPRITE_USER};
use super::{BuildEvent, BuildProgress, Image, ImageError, MANIFEST, Manifest, ROOTFS, UserInfo};
use super::{busybox, fsutil, sys};

/// Lines of output kept for the error message of a failed command.
const TAIL_LINES: usize = 40;

/// Per-build context passed to the steps.
pub(crate) struct Ctx<'a> {
    pub(crate) progress: &'a dyn BuildProgress,
    /// The locked lock file; cloned into each child's stdin.
    pub(crate) lock: &'a fs::File,
}

/// Run `cmd` with stdout and stderr streamed line by line into the progress
/// sink. Fails with the last lines of output if it exits unsuccessfully.
pub(crate) fn run_streaming(mut cmd: Command, what: &str, ctx: &Ctx<'_>) -> Result<(), ImageError> {
    let (reader, writer) = io::pipe().map_err(|e| ImageError::io("pipe", e))?;
    let stdin = ctx
        .lock
        .try_clone()
        .map_err(|e| ImageError::io("dup lock fd", e))?;
    cmd.stdin(Stdio::from(stdin))
        .stdout(writer.try_clone().map_err(|e| ImageError::io("dup pipe", e))?)
        .stderr(writer);
    let mut child = cmd.spawn().map_err(|e| {
        let program = cmd.get_program().to_string_lossy().into_owned();
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::MissingTool {
                tool: program,
                hint: "install it (see scripts/install-deps.sh)",
            }
        } else {
            ImageError::io(format!("spawn {program}"), e)
        }
    })?;
    // The Command holds the parent's copies of the pipe's write end; without
    // dropping it the read below would never see EOF.
    drop(cmd);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| ImageError::io("read output", e))?;
        if n == 0 {
            break;
        }
        // apt and dpkg redraw progress with '\r'; each redraw is a line for us.
        for part in buf.split(|&b| b == b'\n' || b == b'\r') {
            let line = String::from_utf8_lossy(part);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            ctx.progress.event(&BuildEvent::Output { line });
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.to_string());
        }
    }
    let status = child
        .wait()
        .map_err(|e| ImageError::io(format!("wait for {what}"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::BuildFailed {
            what: what.to_string(),
            status: status.to_string(),
            tail: Vec::from(tail).join("\n"),
        })
    }
}

/// An exclusive `flock` on `<images_dir>/.<version>.lock`.
pub(crate) struct VersionLock {
    lock: Flock<fs::File>,
}

impl VersionLock {
    /// Take the lock, blocking (after a `WaitingForLock` event) while another
    /// thread or process holds it.
    pub(crate) fn acquire(
        images_dir: &Path,
        version: &str,
        progress: &dyn BuildProgress,
    ) -> Result<Self, ImageError> {
        let path = images_dir.join(format!(".{version}.lock"));
        let open = || {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| ImageError::io(format!("open {}", path.display()), e))
        };
        let lock = match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, nix::Error::EWOULDBLOCK)) => {
                progress.event(&BuildEvent::WaitingForLock { version });
                Flock::lock(file, FlockArg::LockExclusive)
                    .map_err(|(_, e)| ImageError::io(format!("flock {}", path.display()), e.into()))?
            }
            Err((_, e)) => return Err(ImageError::io(format!("flock {}", path.display()), e.into())),
        };
        Ok(VersionLock { lock })
    }

    pub(crate) fn file(&self) -> &fs::File {
        &self.lock
    }
}

/// A directory that is removed on drop unless [`TempDir::keep`] was called.
pub(crate) struct TempDir {
    path: Option<PathBuf>,
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    /// `<parent>/.tmp-<stem>-<pid>-<n>`, mode 0755 (the image must be
    /// traversable by sprites' unprivileged root after the rename).
    pub(crate) fn create(parent: &Path, stem: &str) -> Result<Self, ImageError> {
        let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{}{}-{n}", tmp_prefix(stem), std::process::id()));
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .map_err(|e| ImageError::io(format!("mkdir {}", path.display()), e))?;
        // The umask may have narrowed the mode.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(|e| ImageError::io(format!("chmod {}", path.display()), e))?;
        Ok(TempDir { path: Some(path) })
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("temp dir present until kept")
    }

    /// Publish: rename to `dst` (atomically replacing nothing) and stop
    /// removing it on drop.
    pub(crate) fn rename_to(mut self, dst: &Path) -> Result<(), ImageError> {
        let src = self.path.take().expect("temp dir present");
        if let Err(e) = fs::rename(&src, dst) {
            self.path = Some(src);
            return Err(ImageError::io(format!("rename to {}", dst.display()), e));
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take()
            && let Err(e) = fsutil::remove_tree(&p)
        {
            tracing::warn!(path = %p.display(), error = %e, "could not remove temp dir");
        }
    }
}

pub(crate) fn tmp_prefix(stem: &str) -> String {
    format!(".tmp-{stem}-")
}

/// Remove leftovers of killed builds of `stem` in `parent`. Call only with the
/// lock that guards `stem` held.
pub(crate) fn remove_stale_temps(parent: &Path, stem: &str, progress: &dyn BuildProgress) {
    let prefix = tmp_prefix(stem);
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            let p = e.path();
            progress.event(&BuildEvent::Output {
                line: &format!("removing leftovers of a killed build: {}", p.display()),
            });
            if let Err(err) = fsutil::remove_tree(&p) {
                tracing::warn!(path = %p.display(), error = %err, "could not remove stale build dir");
            }
        }
    }
}

/// The published image, if it is there.
pub(crate) fn open_published(dir: &Path) -> Result<Option<Image>, ImageError> {
    let manifest_path = dir.join(MANIFEST);
    let text = match fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io(format!("read {}", manifest_path.display()), e)),
    };
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| ImageError::Manifest {
        path: manifest_path.clone(),
        msg: e.to_string(),
    })?;
    Ok(Some(Image {
        dir: dir.to_path_buf(),
        manifest,
    }))
}

/// Installed packages from a dpkg status file, as `name=version`, sorted.
fn dpkg_packages(status_file: &Path) -> Result<Vec<String>, ImageError> {
    let text = fs::read_to_string(status_file)
        .map_err(|e| ImageError::io(format!("read {}", status_file.display()), e))?;
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim().ends_with(" installed");
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.push(format!("{n}={v}"));
        }
    }
    out.sort();
    Ok(out)
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `BaseImage::ensure`.
pub(crate) fn ensure(
    images_dir: &Path,
    recipe: &Recipe,
    progress: &dyn BuildProgress,
) -> Result<Image, ImageError> {
    let version = recipe.version();
    let final_dir = images_dir.join(&version);
    if let Some(img) = open_published(&final_dir)? {
        progress.event(&BuildEvent::Cached { version: &version });
        return Ok(img);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(images_dir)
        .map_err(|e| ImageError::io(format!("mkdir {}", images_dir.display()), e))?;
    let lock = VersionLock::acquire(images_dir, &version, progress)?;
    if let Some(img) = open_published(&final_dir)? {
        progress.event(&BuildEvent::Cached { version: &version });
        return Ok(img);
    }
    match build_locked(images_dir, recipe, &version, &lock, progress) {
        Ok(img) => Ok(img),
        Err(e) => {
            progress.event(&BuildEvent::Failed {
                version: &version,
                error: &e.to_string(),
            });
            Err(e)
        }
    }
}

fn build_locked(
    images_dir: &Path,
    recipe: &Recipe,
    version: &str,
    lock: &VersionLock,
    progress: &dyn BuildProgress,
) -> Result<Image, ImageError> {
    let final_dir = images_dir.join(version);
    if final_dir.exists() {
        // Only possible if someone tampered with the directory: a published
        // image always has its manifest. Keep it out of the way, don't delete.
        let aside = images_dir.join(format!(".broken-{version}-{}", std::process::id()));
        tracing::warn!(dir = %final_dir.display(), "image dir without manifest; moving it aside");
        fs::rename(&final_dir, &aside).map_err(|e| ImageError::io("move broken image aside", e))?;
    }
    remove_stale_temps(images_dir, version, progress);

    let start = Instant::now();
    progress.event(&BuildEvent::Started {
        version,
        kind: recipe.kind(),
    });
    let tmp = TempDir::create(images_dir, version)?;
    let rootfs = tmp.path().join(ROOTFS);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&rootfs)
        .map_err(|e| ImageError::io(format!("mkdir {}", rootfs.display()), e))?;
    fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io("chmod rootfs", e))?;
    let ctx = Ctx {
        progress,
        lock: lock.file(),
    };

    let (packages, requested, suite, env) = match recipe {
        Recipe::Debian(d) => {
            // mmdebstrap mounts /proc, /sys and device nodes into the chroot
            // while it works. In a private mount namespace those mounts die with
            // it, even when it is killed, instead of lingering in ours.
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "--", "mmdebstrap"])
                .args(d.mmdebstrap_args(&rootfs))
                .env("LC_ALL", "C.UTF-8");
            run_streaming(cmd, "mmdebstrap", &ctx)?;
            let pkgs = dpkg_packages(&rootfs.join("var/lib/dpkg/status"))?;
            let env = vec![
                ("LANG".to_string(), "C.UTF-8".to_string()),
                (
                    "PATH".to_string(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                ),
            ];
            (pkgs, d.packages.clone(), Some(d.suite.clone()), env)
        }
        Recipe::Busybox(b) => {
            // Only used when busybox-static is not installed on the host.
            let download = tmp.path().join("busybox-download");
            let pkgs = busybox::build(b, &rootfs, &download, &ctx)?;
            fsutil::remove_tree(&download).map_err(|e| ImageError::io("remove busybox download", e))?;
            let env = vec![("PATH".to_string(), "/usr/sbin:/usr/bin:/sbin:/bin".to_string())];
            (pkgs, vec![b.package.clone()], None, env)
        }
    };

    let stats = fsutil::scan(&rootfs).map_err(|e| ImageError::io("scan rootfs", e))?;
    let elapsed = start.elapsed();
    let manifest = Manifest {
        format: super::recipe::FORMAT,
        version: version.to_string(),
        kind: recipe.kind().to_string(),
        suite,
        created: rfc3339_now(),
        build_seconds: round_ms(elapsed),
        size_bytes: stats.disk_bytes,
        entries: stats.entries,
        requested_packages: requested,
        packages,
        uids: stats.uids.into_iter().collect(),
        gids: stats.gids.into_iter().collect(),
        env: env.into_iter().collect(),
        user: UserInfo {
            name: SPRITE_USER.into(),
            uid: SPRITE_UID,
            gid: SPRITE_UID,
            home: SPRITE_HOME.into(),
        },
        recipe: recipe.canonical(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    fsutil::write_synced(&tmp.path().join(MANIFEST), &json)
        .map_err(|e| ImageError::io("write manifest", e))?;
    // One syncfs instead of dpkg's per-file fsyncs: everything must be on disk
    // before the rename makes it visible under the version name.
    let dirf = fs::File::open(tmp.path()).map_err(|e| ImageError::io("open temp dir", e))?;
    sys::syncfs(dirf.as_fd()).map_err(|e| ImageError::io("syncfs", e))?;
    tmp.rename_to(&final_dir)?;
    fsutil::fsync_dir(images_dir).map_err(|e| ImageError::io("fsync images dir", e))?;

    progress.event(&BuildEvent::Finished {
        version,
        elapsed,
        size_bytes: manifest.size_bytes,
    });
    Ok(Image {
        dir: final_dir,
        manifest,
    })
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dpkg_status() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        fs::write(
            &p,
            "Package: a\nStatus: install ok installed\nVersion: 1.0\n\n\
             Package: b\nStatus: deinstall ok config-files\nVersion: 2\n\n\
             Package: c\nVersion: 3:4-5\nStatus: install ok installed\nDescription: x\n y\n",
        )
        .unwrap();
        assert_eq!(dpkg_packages(&p).unwrap(), vec!["a=1.0", "c=3:4-5"]);
    }
}
