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
        match detach_in_namespace_of(c.pid, &c.mount_point) {
            Ok(()) => {
                tracing::warn!(
                    pid = c.pid,
                    mount = %c.mount_point.display(),
                    "detached a copy of our mount held by another mount namespace"
                );
                n += 1;
            }
            Err(e) => tracing::warn!(
                pid = c.pid,
                mount = %c.mount_point.display(),
                error = %e,
                "could not detach a copy of our mount in another mount namespace"
            ),
        }
    }
    n
}

/// `umount2(mount_point, MNT_DETACH | UMOUNT_NOFOLLOW)` inside the mount
/// namespace of `pid`, from a forked child of this process.
///
/// Why not `nsenter … umount`: nsenter enters the namespace and then execs
/// `umount` as resolved *in that namespace*, so a namespace whose files a
/// sprite controls would have den run the sprite's binary as host root.
/// Here nothing is executed: the child only calls setns and umount2, and
/// UMOUNT_NOFOLLOW keeps a symlink planted at the mount point from
/// redirecting the unmount.
fn detach_in_namespace_of(pid: i32, mount_point: &std::path::Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    let path = std::ffi::CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let ns_fd = ns.as_raw_fd();
    // SAFETY: fork in a multi-threaded process is sound as long as the child
    // only calls async-signal-safe functions until it exits. The child only
    // calls setns, umount2 and _exit on an fd and a C string made before the
    // fork; it allocates nothing, takes no locks and never returns into Rust.
    // setns(CLONE_NEWNS) needs a single-threaded caller, which the child is.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above; this block never returns.
        unsafe {
            let code = if libc::setns(ns_fd, libc::CLONE_NEWNS) != 0 {
                1
            } else if libc::umount2(path.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) != 0 {
                2
            } else {
                0
            };
            libc::_exit(code);
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None).map_err(io::Error::from)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, 1) => {
            Err(io::Error::other("setns into its mount namespace failed"))
        }
        nix::sys::wait::WaitStatus::Exited(_, _) => Err(io::Error::other("umount2 failed")),
        other => Err(io::Error::other(format!("detach child ended with {other:?}"))),
    }
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
