//! File-tree helpers: mount table look-ups, a removal that never walks into a
//! mount, disk-usage and owner scans, and fsync of directories.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

/// One line of `/proc/self/mountinfo`, the fields we use.
#[derive(Debug, Clone)]
pub(crate) struct MountEntry {
    pub(crate) mount_point: PathBuf,
    pub(crate) options: String,
}

impl MountEntry {
    pub(crate) fn is_idmapped(&self) -> bool {
        self.options.split(',').any(|o| o == "idmapped")
    }
}

fn unescape(field: &str) -> OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let d = |c: u8| u32::from(c - b'0');
            out.push((d(b[i + 1]) * 64 + d(b[i + 2]) * 8 + d(b[i + 3])) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut f = line.split(' ');
    let _id = f.next()?;
    let _parent = f.next()?;
    let _dev = f.next()?;
    let _root = f.next()?;
    let mount_point = PathBuf::from(unescape(f.next()?));
    let options = f.next()?.to_string();
    Some(MountEntry { mount_point, options })
}

/// The mounts of this process's mount namespace, in mount order.
pub(crate) fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(parse_line)
        .collect())
}

/// Mounts at or below `dir` (which must be canonical), deepest/newest first.
pub(crate) fn mounts_under(dir: &Path) -> io::Result<Vec<MountEntry>> {
    let mut v: Vec<_> = mounts()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect();
    v.reverse();
    Ok(v)
}

/// Lazily unmount everything mounted at or below `dir`.
pub(crate) fn detach_mounts_under(dir: &Path) -> io::Result<usize> {
    let Ok(dir) = dir.canonicalize() else { return Ok(0) };
    let mut n = 0;
    // Repeat: a detach can uncover a mount that was stacked underneath.
    for _ in 0..64 {
        let under = mounts_under(&dir)?;
        if under.is_empty() {
            return Ok(n);
        }
        for m in under {
            match umount2(&m.mount_point, MntFlags::MNT_DETACH) {
                Ok(()) => n += 1,
                Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "umount {}: {e}",
                        m.mount_point.display()
                    )));
                }
            }
        }
    }
    Err(io::Error::other(format!(
        "mounts under {} keep coming back",
        dir.display()
    )))
}

/// `rm -rf` for a tree we created, but safer: first detach any mount inside it,
/// then never descend into another filesystem (a leftover bind mount of `/dev`
/// or an idmapped view of an image must not be emptied through it).
pub(crate) fn remove_tree(dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(dir);
    }
    detach_mounts_under(dir)?;
    remove_dir_same_dev(dir, meta.dev())
}

fn remove_dir_same_dev(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            if meta.dev() != dev {
                return Err(io::Error::other(format!(
                    "refusing to remove {}: another filesystem",
                    path.display()
                )));
            }
            remove_dir_same_dev(&path, dev)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::remove_dir(dir)
}

/// What [`scan`] learned about a tree.
#[derive(Debug, Default, Clone)]
pub(crate) struct TreeStats {
    /// Disk usage in bytes (allocated blocks, hard links counted once).
    pub(crate) disk_bytes: u64,
    /// Number of directory entries (files, dirs, links, ...), including the root.
    pub(crate) entries: u64,
    pub(crate) uids: BTreeSet<u32>,
    pub(crate) gids: BTreeSet<u32>,
}

/// Walk `root` (not crossing filesystems) and add up sizes and owners.
pub(crate) fn scan(root: &Path) -> io::Result<TreeStats> {
    let mut st = TreeStats::default();
    let mut seen = HashSet::new();
    let meta = fs::symlink_metadata(root)?;
    scan_inner(root, &meta, meta.dev(), &mut st, &mut seen)?;
    Ok(st)
}

fn scan_inner(
    path: &Path,
    meta: &fs::Metadata,
    dev: u64,
    st: &mut TreeStats,
    seen: &mut HashSet<(u64, u64)>,
) -> io::Result<()> {
    st.entries += 1;
    st.uids.insert(meta.uid());
    st.gids.insert(meta.gid());
    if meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino())) {
        st.disk_bytes += meta.blocks() * 512;
    }
    if meta.is_dir() && meta.dev() == dev {
        for entry in fs::read_dir(path)? {
            let p = entry?.path();
            let m = fs::symlink_metadata(&p)?;
            scan_inner(&p, &m, dev, st, seen)?;
        }
    }
    Ok(())
}

/// fsync a directory (after creating or renaming entries in it).
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Write `data` to `path` and fsync it.
pub(crate) fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let l = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime,idmapped master:1 - ext3 /dev/root rw,errors=continue";
        let m = parse_line(l).unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt/with space"));
        assert!(m.is_idmapped());
        assert!(mounts().unwrap().iter().any(|m| m.mount_point == Path::new("/")));
    }
}
