//! The shifted copy: the image with every owner moved into a sprite's host id
//! range, for hosts where idmapped mounts are not available.
//!
//! Order per inode matters: `chown` clears setuid/setgid bits and file
//! capabilities, so it is chown, then chmod, then xattrs, then timestamps.
//! File capabilities are rewritten as v3 (namespaced) with the mapped root id,
//! so the container's root honours them; POSIX ACL entries get their ids mapped.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::IdMap;
use super::sys::{lgetxattr, llistxattr, lsetxattr};

/// What a shift did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ShiftStats {
    pub(crate) entries: u64,
    pub(crate) bytes: u64,
}

#[derive(Debug)]
pub(crate) enum ShiftError {
    Io(PathBuf, io::Error),
    Unmapped {
        path: PathBuf,
        kind: &'static str,
        id: u32,
    },
}

impl std::fmt::Display for ShiftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShiftError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            ShiftError::Unmapped { path, kind, id } => {
                write!(f, "{}: {kind} {id} is not in the id map", path.display())
            }
        }
    }
}

struct Shifter<'a> {
    map: &'a IdMap,
    /// (dev, ino) of multiply linked files → first copy, to recreate hard links.
    links: HashMap<(u64, u64), PathBuf>,
    dev: u64,
    stats: ShiftStats,
}

/// Copy `src` to `dst` (which must not exist) with owners mapped through `map`.
pub(crate) fn shifted_copy(src: &Path, dst: &Path, map: &IdMap) -> Result<ShiftStats, ShiftError> {
    let meta = fs::symlink_metadata(src).map_err(|e| ShiftError::Io(src.into(), e))?;
    let mut s = Shifter {
        map,
        links: HashMap::new(),
        dev: meta.dev(),
        stats: ShiftStats::default(),
    };
    s.copy(src, dst, &meta)?;
    Ok(s.stats)
}

impl Shifter<'_> {
    fn uid(&self, path: &Path, id: u32) -> Result<u32, ShiftError> {
        self.map.uid_to_host(id).ok_or(ShiftError::Unmapped {
            path: path.into(),
            kind: "uid",
            id,
        })
    }

    fn gid(&self, path: &Path, id: u32) -> Result<u32, ShiftError> {
        self.map.gid_to_host(id).ok_or(ShiftError::Unmapped {
            path: path.into(),
            kind: "gid",
            id,
        })
    }

    fn copy(&mut self, src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<(), ShiftError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: io::Error| ShiftError::Io(p, e)
        };
        self.stats.entries += 1;
        let uid = self.uid(src, meta.uid())?;
        let gid = self.gid(src, meta.gid())?;
        let ft = meta.file_type();
        let perm = meta.mode() & 0o7777;

        if ft.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(dst).map_err(io(dst))?;
            if meta.dev() == self.dev {
                for entry in fs::read_dir(src).map_err(io(src))? {
                    let entry = entry.map_err(io(src))?;
                    let child = entry.path();
                    let m = fs::symlink_metadata(&child).map_err(io(&child))?;
                    self.copy(&child, &dst.join(entry.file_name()), &m)?;
                }
            }
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                    return fs::hard_link(first, dst).map_err(io(dst));
                }
                self.links.insert((meta.dev(), meta.ino()), dst.to_path_buf());
            }
            let mut from = fs::File::open(src).map_err(io(src))?;
            let mut to = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dst)
                .map_err(io(dst))?;
            // std uses copy_file_range(2) here: the data never enters user space.
            self.stats.bytes += io::copy(&mut from, &mut to).map_err(io(dst))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(src).map_err(io(src))?;
            std::os::unix::fs::symlink(&target, dst).map_err(io(dst))?;
            lchown(dst, Some(uid), Some(gid)).map_err(io(dst))?;
            set_times(dst, meta).map_err(io(dst))?;
            return Ok(());
        } else {
            let kind = if ft.is_char_device() {
                SFlag::S_IFCHR
            } else if ft.is_block_device() {
                SFlag::S_IFBLK
            } else if ft.is_fifo() {
                SFlag::S_IFIFO
            } else {
                SFlag::S_IFSOCK
            };
            mknod(dst, kind, Mode::from_bits_truncate(0o600), meta.rdev()).map_err(|e| io(dst)(e.into()))?;
        }
        lchown(dst, Some(uid), Some(gid)).map_err(io(dst))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(perm)).map_err(io(dst))?;
        self.copy_xattrs(src, dst)?;
        set_times(dst, meta).map_err(io(dst))?;
        Ok(())
    }

    fn copy_xattrs(&self, src: &Path, dst: &Path) -> Result<(), ShiftError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e: io::Error| ShiftError::Io(p, e)
        };
        for name in llistxattr(src).map_err(io(src))? {
            let value = lgetxattr(src, &name).map_err(io(src))?;
            let value = match name.to_str() {
                Some("security.capability") => {
                    shift_caps(&value, self.uid(src, 0)?, self.map).ok_or_else(|| {
                        ShiftError::Io(src.into(), io::Error::other("malformed security.capability"))
                    })?
                }
                Some("system.posix_acl_access" | "system.posix_acl_default") => shift_acl(&value, self.map)
                    .ok_or_else(|| {
                    ShiftError::Io(src.into(), io::Error::other("malformed or unmapped ACL"))
                })?,
                _ => value,
            };
            lsetxattr(dst, OsStr::new(&name), &value).map_err(io(dst))?;
        }
        Ok(())
    }
}

fn set_times(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let at = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mt = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(AT_FDCWD, path, &at, &mt, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_FLAGS_MASK: u32 = !VFS_CAP_REVISION_MASK;
const VFS_CAP_REVISION_1: u32 = 0x0100_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;

/// Rewrite a `security.capability` value as v3 whose root id is the host id of
/// the container's root (`root_host`), or of the old v3 root id mapped.
pub(crate) fn shift_caps(value: &[u8], root_host: u32, map: &IdMap) -> Option<Vec<u8>> {
    let word = |i: usize| {
        value
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let magic = word(0)?;
    let (data, rootid): (Vec<u32>, u32) = match magic & VFS_CAP_REVISION_MASK {
        VFS_CAP_REVISION_1 if value.len() == 12 => (vec![word(1)?, word(2)?, 0, 0], root_host),
        VFS_CAP_REVISION_2 if value.len() == 20 => ((1..5).map(word).collect::<Option<_>>()?, root_host),
        VFS_CAP_REVISION_3 if value.len() == 24 => (
            (1..5).map(word).collect::<Option<_>>()?,
            map.uid_to_host(word(5)?)?,
        ),
        _ => return None,
    };
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&(VFS_CAP_REVISION_3 | (magic & VFS_CAP_FLAGS_MASK)).to_le_bytes());
    for d in data {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&rootid.to_le_bytes());
    Some(out)
}

const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

/// Map the ids of named-user and named-group entries of a POSIX ACL xattr.
pub(crate) fn shift_acl(value: &[u8], map: &IdMap) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return None;
    }
    let mut out = value.to_vec();
    for e in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let new = match tag {
            ACL_USER => map.uid_to_host(id)?,
            ACL_GROUP => map.gid_to_host(id)?,
            _ => continue,
        };
        e[4..8].copy_from_slice(&new.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_become_v3_with_mapped_root() {
        let map = IdMap::root_at(100_000, 65_536);
        // cap_net_raw+ep as written by setcap on the host (v2).
        let v2 = hex("0100000200200000000000000000000000000000");
        let v3 = shift_caps(&v2, 100_000, &map).unwrap();
        assert_eq!(v3, hex("0100000300200000000000000000000000000000a0860100"));
        // An already namespaced cap (rootid 0 → 100000).
        let ns = hex("010000030020000000000000000000000000000000000000");
        assert_eq!(shift_caps(&ns, 100_000, &map).unwrap(), v3);
        assert!(shift_caps(&[1, 2, 3], 100_000, &map).is_none());
    }

    #[test]
    fn acl_ids_are_mapped() {
        let map = IdMap::root_at(100_000, 65_536);
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (ACL_USER, 4, 1000),
            (ACL_GROUP, 4, 27),
            (0x20, 5, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let out = shift_acl(&acl, &map).unwrap();
        let id = |i: usize| u32::from_le_bytes(out[4 + i * 8 + 4..4 + i * 8 + 8].try_into().unwrap());
        assert_eq!(
            (id(0), id(1), id(2), id(3)),
            (u32::MAX, 101_000, 100_027, u32::MAX)
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
