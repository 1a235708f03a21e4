//! Just enough of `/proc/self/mountinfo` to find and remove our own mounts.
//!
//! We never `stat` a mount point to learn about it: a FUSE mount whose daemon is
//! gone answers with `ENOTCONN`, and one whose daemon is stuck never answers.
//! The mount table is kernel memory and always answers.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent_id: u64,
    pub major: u32,
    pub minor: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undo the octal escaping the kernel applies to spaces, tabs, newlines and
/// backslashes in paths.
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |b: u8| u32::from(b - b'0');
            let v = digit(bytes[i + 1]) * 64 + digit(bytes[i + 2]) * 8 + digit(bytes[i + 3]);
            // The kernel only escapes single bytes, so this never truncates in practice.
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    OsString::from_vec(out)
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let _root = fields.next()?;
    let mount_point = PathBuf::from(unescape(fields.next()?));
    // Optional fields end with a lone "-".
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fstype = fields.next()?.to_string();
    let source = unescape(fields.next()?).to_string_lossy().into_owned();
    Some(MountEntry {
        id,
        parent_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        mount_point,
        fstype,
        source,
    })
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// All mounts of this mount namespace.
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// A copy of one of our mounts held by another mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignCopy {
    /// A process in that namespace.
    pub pid: i32,
    /// Where that process sees the mount.
    pub mount_point: PathBuf,
}

/// Copies of mounts of device `major:minor` in mount namespaces other than
/// this process's (one process per namespace; deepest mounts first).
///
/// A process that clones its mount namespace (`unshare -m`, a container
/// starting) gets a copy of every mount of the host, ours included; if its
/// copy is private, unmounting ours does not reach it, and it keeps the
/// filesystem (and so the loop device and the volume under it) busy for as
/// long as that process lives.
pub fn foreign_copies(major: u32, minor: u32) -> Vec<ForeignCopy> {
    use std::os::unix::fs::MetadataExt;
    let ns_of = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
    let Ok(ours) = ns_of("self") else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut seen = std::collections::HashSet::from([ours]);
    let mut out = Vec::new();
    for e in procs.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // A process gone meanwhile, or a kernel thread: nothing to see.
        let Ok(ns) = ns_of(&pid.to_string()) else { continue };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        let mut points: Vec<PathBuf> = parse(&text)
            .into_iter()
            .filter(|m| (m.major, m.minor) == (major, minor))
            .map(|m| m.mount_point)
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        out.extend(
            points
                .into_iter()
                .map(|mount_point| ForeignCopy { pid, mount_point }),
        );
    }
    out
}

/// Lazily detach, inside the other namespaces, every copy of a mount of
/// device `major:minor` that [`foreign_copies`] finds. Only ever meant for
/// a device that is ours alone (a loop device we bound, a FUSE connection
/// we serve): a copy of it elsewhere is an accident of namespace cloning,
/// never something its holder mounted. Files open through a copy keep
/// working (the detach is lazy). Returns how many copies were detached.
pub fn detach_foreign_copies(major: u32, minor: u32) -> usize {
    let mut n = 0;
    for c in foreign_copies(major, minor) {
        // nsenter: setns(CLONE_NEWNS) needs a single-threaded caller.
        let status = std::process::Command::new("nsenter")
            .arg(format!("--target={}", c.pid))
            .args(["--mount", "--", "umount", "-l"])
            .arg(&c.mount_point)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {
                tracing::warn!(
                    pid = c.pid,
                    mount = %c.mount_point.display(),
                    "detached a copy of our mount held by another mount namespace"
                );
                n += 1;
            }
            other => tracing::warn!(
                pid = c.pid,
                mount = %c.mount_point.display(),
                result = ?other,
                "could not detach a copy of our mount in another mount namespace"
            ),
        }
    }
    n
}

/// Mounts sitting directly on `dir`, bottom first. When several are stacked, each
/// one's parent is the one below it; ordering by that chain (instead of by id,
/// which the kernel recycles) gives the true stacking order.
pub fn stack_at(all: &[MountEntry], dir: &Path) -> Vec<MountEntry> {
    let at: Vec<&MountEntry> = all.iter().filter(|m| m.mount_point == dir).collect();
    let mut ordered: Vec<MountEntry> = Vec::with_capacity(at.len());
    // Bottom: the one whose parent is not itself mounted on `dir`.
    let mut current = at
        .iter()
        .find(|m| !at.iter().any(|o| o.id == m.parent_id))
        .copied();
    while let Some(m) = current {
        ordered.push(m.clone());
        current = at.iter().find(|o| o.parent_id == m.id).copied();
        if ordered.len() > at.len() {
            break; // Defensive: a cycle would be a kernel bug, not a reason to hang.
        }
    }
    // Anything the chain did not reach (should not happen) goes on top so it is
    // still considered.
    for m in at {
        if !ordered.iter().any(|o| o.id == m.id) {
            ordered.push(m.clone());
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
40 22 0:40 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:7 - fuse.den-block den-block rw,user_id=0,group_id=0
41 40 0:41 / /tmp/a\\040b rw,relatime - fuse.other other rw
39 1 7:3 / /mnt rw - ext4 /dev/loop3 rw
";

    #[test]
    fn parses_escapes_and_optional_fields() {
        let all = parse(SAMPLE);
        assert_eq!(all.len(), 4);
        assert_eq!(all[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(all[1].fstype, "fuse.den-block");
        assert_eq!(all[1].source, "den-block");
        assert_eq!((all[1].major, all[1].minor), (0, 40));
        assert_eq!(all[3].fstype, "ext4");
        assert_eq!(all[3].source, "/dev/loop3");
    }

    #[test]
    fn stack_order_follows_parents() {
        let mut all = parse(SAMPLE);
        all.swap(1, 2);
        let stack = stack_at(&all, Path::new("/tmp/a b"));
        let ids: Vec<u64> = stack.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![40, 41]);
    }
}
