//! The tiny test image: Debian's `busybox-static` plus a few files.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;
use super::build::{Ctx, run_streaming};
use super::recipe::BusyboxRecipe;

/// Where the busybox binary came from.
pub(crate) struct BusyboxSource {
    pub(crate) binary: PathBuf,
    /// Debian package version, e.g. `1:1.35.0-4+deb12u1+b1`.
    pub(crate) version: String,
}

fn dpkg_installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status} ${Version}", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.strip_prefix("installed ")?;
    (out.status.success() && !version.is_empty()).then(|| version.to_string())
}

/// The `busybox-static` package: the installed one if there is one (no network
/// needed, which is the normal case on den hosts), otherwise downloaded with
/// `apt-get download` into `cache` and unpacked there.
fn locate(package: &str, cache: &Path, ctx: &Ctx<'_>) -> Result<BusyboxSource, ImageError> {
    if let Some(version) = dpkg_installed_version(package) {
        for p in ["/bin/busybox", "/usr/bin/busybox"] {
            if Path::new(p).is_file() {
                return Ok(BusyboxSource {
                    binary: p.into(),
                    version,
                });
            }
        }
    }
    fs::create_dir_all(cache).map_err(|e| ImageError::io(format!("mkdir {}", cache.display()), e))?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["download", package]).current_dir(cache);
    run_streaming(cmd, "apt-get download busybox-static", ctx)?;
    let deb = fs::read_dir(cache)
        .map_err(|e| ImageError::io("read busybox cache", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .max()
        .ok_or_else(|| ImageError::MissingTool {
            tool: package.to_string(),
            hint: "apt-get download found nothing: run apt-get update or apt-get install busybox-static",
        })?;
    let unpacked = cache.join("unpacked");
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(&deb).arg(&unpacked);
    run_streaming(cmd, "dpkg-deb -x busybox-static", ctx)?;
    let mut cmd = Command::new("dpkg-deb");
    let out = cmd
        .args(["-f"])
        .arg(&deb)
        .arg("Version")
        .output()
        .map_err(|e| ImageError::io("dpkg-deb -f", e))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for p in ["bin/busybox", "usr/bin/busybox"] {
        let b = unpacked.join(p);
        if b.is_file() {
            return Ok(BusyboxSource { binary: b, version });
        }
    }
    Err(ImageError::MissingTool {
        tool: package.to_string(),
        hint: "the downloaded busybox-static package has no bin/busybox",
    })
}

fn io_at(what: &str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let what = format!("{what} {}", path.display());
    move |e| ImageError::io(what, e)
}

/// Build the busybox rootfs into `rootfs` (which exists and is empty).
/// Returns the package list for the manifest.
pub(crate) fn build(
    recipe: &BusyboxRecipe,
    rootfs: &Path,
    cache: &Path,
    ctx: &Ctx<'_>,
) -> Result<Vec<String>, ImageError> {
    let src = locate(&recipe.package, cache, ctx)?;
    ctx.progress.event(&super::BuildEvent::Output {
        line: &format!(
            "using {} ({} {})",
            src.binary.display(),
            recipe.package,
            src.version
        ),
    });
    for (dir, mode, owner) in &recipe.dirs {
        let p = rootfs.join(dir);
        fs::create_dir_all(&p).map_err(io_at("mkdir", &p))?;
        std::os::unix::fs::lchown(&p, Some(*owner), Some(*owner)).map_err(io_at("chown", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).map_err(io_at("chmod", &p))?;
    }
    let bin = rootfs.join("bin/busybox");
    fs::copy(&src.binary, &bin).map_err(io_at("copy busybox to", &bin))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).map_err(io_at("chmod", &bin))?;

    // `busybox --list-full` prints every applet with its canonical location,
    // e.g. `bin/sh`, `usr/bin/awk`, `sbin/ip`.
    let out = Command::new(&src.binary)
        .arg("--list-full")
        .output()
        .map_err(io_at("run", &src.binary))?;
    if !out.status.success() {
        return Err(ImageError::BuildFailed {
            what: "busybox --list-full".into(),
            status: out.status.to_string(),
            tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut applets = 0;
    for rel in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(".."))
    {
        let link = rootfs.join(rel.trim_start_matches('/'));
        if link == bin {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_at("mkdir", parent))?;
        }
        match symlink("/bin/busybox", &link) {
            Ok(()) => applets += 1,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at("symlink", &link)(e)),
        }
    }
    for f in &recipe.files {
        let p = rootfs.join(f.path);
        fs::write(&p, f.content).map_err(io_at("write", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(f.mode)).map_err(io_at("chmod", &p))?;
    }
    ctx.progress.event(&super::BuildEvent::Output {
        line: &format!("linked {applets} applets"),
    });
    for hook in &recipe.user_hooks {
        run_hook(hook, rootfs, ctx)?;
    }
    Ok(vec![format!("{}={}", recipe.package, src.version)])
}

/// Run a customize hook like mmdebstrap does: `sh -c HOOK exec ROOTFS`, so the
/// hook sees the root directory as `$1`.
pub(crate) fn run_hook(hook: &str, rootfs: &Path, ctx: &Ctx<'_>) -> Result<(), ImageError> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(hook).arg("exec").arg(rootfs);
    run_streaming(cmd, &format!("customize hook `{hook}`"), ctx)
}
