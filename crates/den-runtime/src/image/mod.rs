//! The sprite base image: a Debian userland built once per host, versioned,
//! cached, and shared read-only by every sprite as its overlayfs lower layer.
//!
//! ```no_run
//! use den_runtime::image::{BaseImage, IdMap, SpinnerProgress};
//!
//! let image = BaseImage::debian("/var/lib/den/images").ensure(&SpinnerProgress::new())?;
//! println!("{} ({} MB)", image.version(), image.manifest().size_bytes / 1_000_000);
//! // The lower layer for a sprite whose root is host uid 100000:
//! let lower = image.lower_dir_for(&IdMap::root_at(100_000, 65_536))?;
//! // mount -t overlay -o userxattr,lowerdir={lower},upperdir=…,workdir=… inside the sprite's userns
//! # Ok::<(), den_runtime::image::ImageError>(())
//! ```
//!
//! # Building
//!
//! [`BaseImage::debian`] runs `mmdebstrap --mode=root --variant=minbase` for
//! bookworm (+ bookworm-updates + bookworm-security, which also become the
//! image's `sources.list`) with the sprite's packages, and customize hooks that
//! add the `sprite` user (uid/gid 1000, `sudo` group, passwordless sudo via
//! `/etc/sudoers.d/sprite` 0440), generate `C.UTF-8` and set `LANG`, and write
//! hostname, hosts and a `resolv.conf` placeholder. apt lists and caches are
//! removed; docs, man pages and translations are excluded through dpkg path
//! filters that stay in the image. dpkg runs with `force-unsafe-io` during the
//! build only, and one `syncfs` replaces its per-file fsyncs.
//!
//! The version is `<suite>-<12 hex digits of the BLAKE3 of the recipe>`; the
//! recipe is everything on mmdebstrap's command line plus a format number.
//! See `build.rs` for how builds are locked and published atomically.
//!
//! [`BaseImage::busybox`] builds a tiny rootfs from Debian's `busybox-static`
//! (the host's installed copy, or `apt-get download`) in about 0.15 s, for
//! runtime tests that do not need Debian.
//!
//! # The lower layer in a user namespace
//!
//! Sprites run in a user namespace whose root is an unprivileged host uid
//! (e.g. host 100000..165536 = container 0..65536). An overlay mounted there
//! over the root-owned image fails copy-up with `EOVERFLOW`: the owner of the
//! lower file has no id in the namespace. [`Image::lower_dir_for`] returns a
//! lower directory whose owners are mapped:
//!
//! * **Idmapped mount (used here).** `open_tree(OPEN_TREE_CLONE)` of the
//!   rootfs, `mount_setattr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY)` with a user
//!   namespace carrying the sprite's mapping (made by a forked helper that
//!   unshares a userns, gets its `uid_map`/`gid_map` written, and exits; its
//!   `/proc/PID/ns/user` fd is what the mount keeps), then `move_mount` to
//!   `<version>/idmapped/<map tag>`, or with [`Image::lower_dir_in`] to
//!   `<mounts dir>/<version>/<map tag>` in a directory of the caller's. One
//!   mount per distinct mapping, shared by all sprites with that mapping, made
//!   once and found again through `/proc/self/mountinfo`. It lives in the
//!   caller's mount namespace: create it before creating a sprite's mount
//!   namespace. A den server keeps its own under its run directory: the images
//!   directory is shared by every server on the host, so a mount there would be
//!   unmounted under the others when any one of them stops.
//! * **Shifted copy (fallback).** A copy at `<version>/rootfs-shifted-<map tag>`
//!   with every uid/gid mapped, setuid/setgid bits kept, file capabilities
//!   rewritten as v3 with the mapped root id, ACL ids mapped, hard links kept.
//!   Used automatically when the kernel is older than 5.19 (idmapped mounts
//!   came in 5.12, overlayfs accepts idmapped layers since 5.19) or
//!   `mount_setattr` refuses the idmap (a filesystem without idmap support);
//!   costs a full copy of the image per mapping.
//!
//! Measured on the dev machine (kernel 6.18, ext4 on virtio, 2 vCPUs; other
//! builds were running, so times are noisy):
//!
//! | | result |
//! |---|---|
//! | overlayfs in a userns (mounted by the userns root) over the **idmapped** lower | works: root-owned image files are 0 inside; copy-up, writes, whiteouts, and setuid `sudo` from `sprite` all work; upper files land as host 100000 |
//! | same over the plain rootfs | mount succeeds, copy-up fails with `EOVERFLOW` |
//! | file capabilities through the idmapped lower | a v2 `cap_net_raw` reads as v3 rootid 100000 in the host view and as v2 inside; copy-up keeps it |
//! | idmapped mount (userns helper fork + open_tree + mount_setattr + move_mount) | 0.7 ms (Debian image), up to ~12 ms under load |
//! | shifted copy of the Debian image (259 MB, 9.6k entries; data via `copy_file_range`) | 1.0–3.0 s, plus 259 MB of disk per mapping |
//! | shifted copy of the busybox image | < 0.1 s |
//! | full Debian build (mmdebstrap, mirror deb.debian.org) | 35 s quiet, 62–65 s under load (110–120 s when the dpkg filters were `--dpkgopt`s); 259 MB, 158 packages |
//! | busybox build | ~0.15 s |
//!
//! Mount the overlay with `userxattr` in a user namespace: without it the
//! kernel can't set `trusted.*` xattrs on the upper layer and turns off
//! `redirect_dir` and `index` (dmesg "overlayfs: failed to set xattr on upper").

mod build;
mod busybox;
mod fsutil;
mod idmap;
mod progress;
mod recipe;
mod shift;
mod sys;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use idmap::{IdMap, IdRange, UserNamespace};
pub use progress::{BuildEvent, BuildProgress, LogProgress, NoProgress, SpinnerProgress};

use recipe::{BusyboxRecipe, DebianRecipe, Recipe};

/// File name of the manifest inside a version directory.
pub const MANIFEST: &str = "manifest.json";
/// Directory name of the root filesystem inside a version directory.
pub const ROOTFS: &str = "rootfs";

/// Errors of the image module.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}); last output:\n{tail}")]
    BuildFailed {
        what: String,
        status: String,
        tail: String,
    },
    #[error("{tool} is missing: {hint}")]
    MissingTool { tool: String, hint: &'static str },
    #[error("no image {version} in {dir}")]
    NotFound { dir: PathBuf, version: String },
    #[error("bad manifest {path}: {msg}")]
    Manifest { path: PathBuf, msg: String },
    #[error("invalid id map: {0}")]
    InvalidIdMap(String),
    #[error("the id map does not map {kind} {id}, which owns files in the image")]
    UnmappedId { kind: &'static str, id: u32 },
    #[error("idmapped mounts are not available here: {0}")]
    IdmapUnsupported(#[source] io::Error),
    #[error("shifting the image failed: {0}")]
    Shift(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The sprite user as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// `<version>/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    /// `debian` or `busybox`.
    pub kind: String,
    pub suite: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    pub build_seconds: f64,
    /// Disk usage of `rootfs` (allocated blocks, hard links once).
    pub size_bytes: u64,
    /// Number of files, directories, links etc. in `rootfs`.
    pub entries: u64,
    /// The packages the recipe asked for.
    pub requested_packages: Vec<String>,
    /// Every installed package as `name=version`.
    pub packages: Vec<String>,
    /// Every uid/gid that owns something in the image (an id map must cover them).
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// Environment a sprite's processes should start with (`LANG`, `PATH`).
    pub env: BTreeMap<String, String>,
    pub user: UserInfo,
    /// The recipe the version was hashed from.
    pub recipe: serde_json::Value,
}

/// A recipe for a base image and the directory it is cached in.
#[derive(Debug, Clone)]
pub struct BaseImage {
    images_dir: PathBuf,
    recipe: Recipe,
}

impl BaseImage {
    /// The sprite image: Debian bookworm `minbase` plus bash, coreutils, sudo,
    /// ca-certificates, curl, git, python3, procps, iproute2, iputils-ping,
    /// less, vim-tiny, tmux, openssh-client, locales, apt, gpgv,
    /// debian-archive-keyring and netbase, from deb.debian.org.
    pub fn debian(images_dir: impl Into<PathBuf>) -> Self {
        BaseImage {
            images_dir: images_dir.into(),
            recipe: Recipe::Debian(DebianRecipe::sprite_default()),
        }
    }

    /// The tiny test image: `/bin/busybox` from Debian's `busybox-static` with
    /// a symlink per applet, `/etc/passwd` with root and sprite (1000), and the
    /// usual empty directories. Builds in milliseconds.
    pub fn busybox(images_dir: impl Into<PathBuf>) -> Self {
        BaseImage {
            images_dir: images_dir.into(),
            recipe: Recipe::Busybox(BusyboxRecipe::new()),
        }
    }

    fn debian_mut(&mut self) -> Option<&mut DebianRecipe> {
        match &mut self.recipe {
            Recipe::Debian(d) => Some(d),
            Recipe::Busybox(_) => None,
        }
    }

    /// Debian suite (default `bookworm`). Ignored for the busybox image.
    pub fn suite(mut self, suite: &str) -> Self {
        if let Some(d) = self.debian_mut() {
            d.suite = suite.to_string();
        }
        self
    }

    /// Debian mirror (default `http://deb.debian.org/debian`), e.g. a local
    /// apt cache. It ends up in the image's `sources.list` too. Ignored for busybox.
    pub fn mirror(mut self, url: &str) -> Self {
        if let Some(d) = self.debian_mut() {
            d.mirror = url.trim_end_matches('/').to_string();
        }
        self
    }

    /// Security mirror (default `http://deb.debian.org/debian-security`).
    /// Ignored for busybox.
    pub fn security_mirror(mut self, url: &str) -> Self {
        if let Some(d) = self.debian_mut() {
            d.security_mirror = url.trim_end_matches('/').to_string();
        }
        self
    }

    /// Install one more package. Ignored for busybox.
    pub fn package(mut self, name: &str) -> Self {
        if let Some(d) = self.debian_mut()
            && !d.packages.iter().any(|p| p == name)
        {
            d.packages.push(name.to_string());
        }
        self
    }

    /// Run a shell command after den's own customizations, with the new root
    /// directory as `$1` (like mmdebstrap's `--customize-hook`; for Debian it
    /// *is* one, so `chroot "$1" apt-get install …` works there).
    pub fn customize_hook(mut self, command: &str) -> Self {
        self.recipe.user_hooks_mut().push(command.to_string());
        self
    }

    /// Where versions are cached.
    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// The version this recipe builds, e.g. `bookworm-1a2b3c4d5e6f`.
    pub fn version(&self) -> String {
        self.recipe.version()
    }

    /// The built image, if this version is cached.
    pub fn cached(&self) -> Result<Option<Image>, ImageError> {
        build::open_published(&self.images_dir.join(self.version()))
    }

    /// The cached image, or build it now. Safe to call from several threads and
    /// processes at once: one builds, the others wait and then use its result.
    /// Blocks for the whole build (35–65 s for Debian); call it from a
    /// blocking thread in async code.
    pub fn ensure(&self, progress: &dyn BuildProgress) -> Result<Image, ImageError> {
        build::ensure(&self.images_dir, &self.recipe, progress)
    }
}

/// How a [`Lower`] directory makes the image's owners fit the id map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowerKind {
    /// The rootfs itself (the id map is the identity).
    Plain,
    /// An idmapped, read-only mount of the rootfs.
    Idmapped,
    /// A copy of the rootfs with shifted owners.
    Shifted,
}

/// A directory to use as an overlay's `lowerdir` for a given id map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lower {
    pub path: PathBuf,
    pub kind: LowerKind,
}

impl AsRef<Path> for Lower {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// A built image: `<images_dir>/<version>/`.
#[derive(Debug, Clone)]
pub struct Image {
    dir: PathBuf,
    manifest: Manifest,
}

impl Image {
    /// Open an already built version.
    pub fn open(images_dir: &Path, version: &str) -> Result<Image, ImageError> {
        build::open_published(&images_dir.join(version))?.ok_or_else(|| ImageError::NotFound {
            dir: images_dir.into(),
            version: version.into(),
        })
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// `<images_dir>/<version>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root filesystem, owned by host root. Treat it as read-only.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn images_dir(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("/"))
    }

    /// Fail unless `map` gives every owner in the image an id.
    pub fn check_mapped(&self, map: &IdMap) -> Result<(), ImageError> {
        map.validate()?;
        if let Some(&id) = self.manifest.uids.iter().find(|&&u| map.uid_to_host(u).is_none()) {
            return Err(ImageError::UnmappedId { kind: "uid", id });
        }
        if let Some(&id) = self.manifest.gids.iter().find(|&&g| map.gid_to_host(g).is_none()) {
            return Err(ImageError::UnmappedId { kind: "gid", id });
        }
        Ok(())
    }

    /// The lower directory for sprites with id map `map`: the rootfs itself for
    /// the identity map, otherwise an idmapped mount, or (where the kernel or
    /// filesystem refuses idmapped mounts) a shifted copy. Idempotent and cheap
    /// after the first call for a map.
    pub fn lower_dir_for(&self, map: &IdMap) -> Result<Lower, ImageError> {
        self.lower_at(map, &self.idmapped_path(map))
    }

    /// [`Image::lower_dir_for`], with the idmapped mount (if one is needed)
    /// at `<mounts_dir>/<version>/<map tag>` instead of in the images
    /// directory. Each den server passes a directory of its own: the images
    /// directory is shared by every server on the host, and a mount there
    /// would be torn down under the others when one of them stops or
    /// restarts. Release them with [`release_idmapped_in`].
    pub fn lower_dir_in(&self, map: &IdMap, mounts_dir: &Path) -> Result<Lower, ImageError> {
        self.lower_at(map, &mounts_dir.join(self.version()).join(map.tag()))
    }

    fn lower_at(&self, map: &IdMap, idmapped_at: &Path) -> Result<Lower, ImageError> {
        self.check_mapped(map)?;
        if map.is_identity() {
            return Ok(Lower {
                path: self.rootfs(),
                kind: LowerKind::Plain,
            });
        }
        if !kernel_at_least(5, 19) {
            tracing::warn!(
                "kernel older than 5.19: overlayfs can't use idmapped layers; using a shifted copy"
            );
            return self.shifted_lower(map);
        }
        match self.idmapped_lower_at(map, idmapped_at) {
            Err(ImageError::IdmapUnsupported(e)) => {
                tracing::warn!(error = %e, "idmapped mounts unavailable; using a shifted copy of the image");
                self.shifted_lower(map)
            }
            other => other,
        }
    }

    fn idmapped_path(&self, map: &IdMap) -> PathBuf {
        self.dir.join("idmapped").join(map.tag())
    }

    fn find_idmapped(path: &Path) -> Result<bool, ImageError> {
        let mounts = fsutil::mounts().map_err(|e| ImageError::io("read mountinfo", e))?;
        Ok(mounts.iter().any(|m| m.mount_point == path && m.is_idmapped()))
    }

    /// A read-only idmapped mount of the rootfs at
    /// `<version>/idmapped/<map tag>` (made once per mapping, in the caller's
    /// mount namespace).
    pub fn idmapped_lower(&self, map: &IdMap) -> Result<Lower, ImageError> {
        self.idmapped_lower_at(map, &self.idmapped_path(map))
    }

    /// A read-only idmapped mount of the rootfs at `path` (made once; found
    /// again through mountinfo).
    fn idmapped_lower_at(&self, map: &IdMap, path: &Path) -> Result<Lower, ImageError> {
        self.check_mapped(map)?;
        let path = path.to_path_buf();
        let done = |path: PathBuf| {
            Ok(Lower {
                path,
                kind: LowerKind::Idmapped,
            })
        };
        if let Ok(canon) = path.canonicalize()
            && Self::find_idmapped(&canon)?
        {
            return done(canon);
        }
        let _lock = build::VersionLock::acquire(self.images_dir(), self.version(), &NoProgress)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)
            .map_err(|e| ImageError::io(format!("mkdir {}", path.display()), e))?;
        let canon = path
            .canonicalize()
            .map_err(|e| ImageError::io("canonicalize", e))?;
        if Self::find_idmapped(&canon)? {
            return done(canon);
        }
        let t0 = Instant::now();
        let userns = UserNamespace::new(map)?;
        let tree = sys::open_tree_clone(&self.rootfs()).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS) => ImageError::IdmapUnsupported(e),
            _ => ImageError::io("open_tree", e),
        })?;
        sys::mount_setattr_idmap(tree.as_fd(), userns.fd(), true).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::EOPNOTSUPP) => {
                ImageError::IdmapUnsupported(e)
            }
            _ => ImageError::io("mount_setattr(MOUNT_ATTR_IDMAP)", e),
        })?;
        sys::move_mount_to(tree.as_fd(), &canon).map_err(|e| ImageError::io("move_mount", e))?;
        tracing::info!(
            version = self.version(),
            map = %map.tag(),
            ms = t0.elapsed().as_secs_f64() * 1000.0,
            "idmapped lower mounted"
        );
        done(canon)
    }

    /// A copy of the rootfs with owners mapped through `map`, at
    /// `<version>/rootfs-shifted-<map tag>` (made once per mapping; built in a
    /// temp dir and renamed, like the image).
    pub fn shifted_lower(&self, map: &IdMap) -> Result<Lower, ImageError> {
        self.check_mapped(map)?;
        let name = format!("rootfs-shifted-{}", map.tag());
        let path = self.dir.join(&name);
        let done = |path: PathBuf| {
            Ok(Lower {
                path,
                kind: LowerKind::Shifted,
            })
        };
        if path.is_dir() {
            return done(path);
        }
        let _lock = build::VersionLock::acquire(self.images_dir(), self.version(), &NoProgress)?;
        if path.is_dir() {
            return done(path);
        }
        build::remove_stale_temps(&self.dir, &name, &NoProgress);
        let t0 = Instant::now();
        let tmp = build::TempDir::create(&self.dir, &name)?;
        let inner = tmp.path().join(ROOTFS);
        let stats =
            shift::shifted_copy(&self.rootfs(), &inner, map).map_err(|e| ImageError::Shift(e.to_string()))?;
        let dirf = fs::File::open(tmp.path()).map_err(|e| ImageError::io("open temp dir", e))?;
        sys::syncfs(dirf.as_fd()).map_err(|e| ImageError::io("syncfs", e))?;
        fs::rename(&inner, &path).map_err(|e| ImageError::io(format!("rename to {}", path.display()), e))?;
        fsutil::fsync_dir(&self.dir).map_err(|e| ImageError::io("fsync image dir", e))?;
        drop(tmp);
        tracing::info!(
            version = self.version(),
            map = %map.tag(),
            entries = stats.entries,
            mb = stats.bytes / 1_000_000,
            seconds = t0.elapsed().as_secs_f64(),
            "shifted copy of the image made"
        );
        done(path)
    }

    /// Unmount this image's idmapped lowers in the caller's mount namespace
    /// (overlays already mounted on them keep working: overlayfs holds its own
    /// reference to its layers). Returns how many were unmounted.
    pub fn release_idmapped(&self) -> Result<usize, ImageError> {
        fsutil::detach_mounts_under(&self.dir.join("idmapped")).map_err(|e| ImageError::io("unmount", e))
    }
}

/// Unmount every idmapped lower that [`Image::lower_dir_in`] made under
/// `mounts_dir` (in the caller's mount namespace; overlays already mounted
/// on them keep working). Returns how many were unmounted.
pub fn release_idmapped_in(mounts_dir: &Path) -> Result<usize, ImageError> {
    fsutil::detach_mounts_under(mounts_dir).map_err(|e| ImageError::io("unmount", e))
}

/// Whether the running kernel is at least `major.minor` (true if unknown).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    parse_release(&release).is_none_or(|v| v >= (major, minor))
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_release_parsing() {
        assert_eq!(super::parse_release("6.18.44-fc-v857\n"), Some((6, 18)));
        assert_eq!(super::parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(super::parse_release("garbage"), None);
    }
}
