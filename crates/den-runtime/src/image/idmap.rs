//! User-namespace id mappings and the helper that turns one into a namespace fd.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{ImageError, sys};

/// One line of `/proc/PID/uid_map`: ids `inside..inside+count` in the namespace
/// are ids `outside..outside+count` on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdRange {
    /// First id as seen inside the user namespace.
    pub inside: u32,
    /// First id on the host (in the parent namespace).
    pub outside: u32,
    /// Number of ids.
    pub count: u32,
}

impl IdRange {
    fn to_outside(self, id: u32) -> Option<u32> {
        let off = id.checked_sub(self.inside)?;
        (off < self.count).then(|| self.outside + off)
    }
}

/// The uid and gid mappings of a sprite's user namespace.
///
/// ```
/// # use den_runtime::image::IdMap;
/// let map = IdMap::root_at(100_000, 65_536); // container 0..65536 = host 100000..165536
/// assert_eq!(map.uid_to_host(0), Some(100_000));
/// assert_eq!(map.gid_to_host(1000), Some(101_000));
/// assert_eq!(map.uid_to_host(65_536), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdMap {
    /// Lines of `uid_map`.
    pub uids: Vec<IdRange>,
    /// Lines of `gid_map`.
    pub gids: Vec<IdRange>,
}

impl IdMap {
    /// Container ids `0..count` are host ids `host_base..host_base+count`, for
    /// both uids and gids. The usual sprite mapping is `root_at(100_000, 65_536)`.
    pub fn root_at(host_base: u32, count: u32) -> Self {
        let r = IdRange {
            inside: 0,
            outside: host_base,
            count,
        };
        IdMap {
            uids: vec![r],
            gids: vec![r],
        }
    }

    /// The mapping of the initial user namespace (every id maps to itself).
    pub fn identity() -> Self {
        let r = IdRange {
            inside: 0,
            outside: 0,
            count: u32::MAX,
        };
        IdMap {
            uids: vec![r],
            gids: vec![r],
        }
    }

    /// True if every id of the image maps to itself, so the image can be used
    /// as it is.
    pub fn is_identity(&self) -> bool {
        let ident = |rs: &[IdRange]| rs.iter().all(|r| r.inside == r.outside) && !rs.is_empty();
        ident(&self.uids) && ident(&self.gids)
    }

    /// Host uid of container uid `id`.
    pub fn uid_to_host(&self, id: u32) -> Option<u32> {
        self.uids.iter().find_map(|r| r.to_outside(id))
    }

    /// Host gid of container gid `id`.
    pub fn gid_to_host(&self, id: u32) -> Option<u32> {
        self.gids.iter().find_map(|r| r.to_outside(id))
    }

    /// Check what the kernel would check when the map is written: at most 340
    /// non-empty lines per map, no overflow, no overlapping ranges on either side.
    pub fn validate(&self) -> Result<(), ImageError> {
        for (kind, ranges) in [("uid", &self.uids), ("gid", &self.gids)] {
            let bad = |msg: String| Err(ImageError::InvalidIdMap(format!("{kind} map: {msg}")));
            if ranges.is_empty() || ranges.len() > 340 {
                return bad(format!("needs 1..=340 ranges, has {}", ranges.len()));
            }
            for (i, r) in ranges.iter().enumerate() {
                if r.count == 0 {
                    return bad(format!("range {i} is empty"));
                }
                if r.inside.checked_add(r.count - 1).is_none() || r.outside.checked_add(r.count - 1).is_none()
                {
                    return bad(format!("range {i} overflows 32 bits"));
                }
                for (j, o) in ranges.iter().enumerate().skip(i + 1) {
                    let overlap = |a: u32, b: u32| a < b + o.count && b < a + r.count;
                    if overlap(r.inside, o.inside) || overlap(r.outside, o.outside) {
                        return bad(format!("ranges {i} and {j} overlap"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The text to write to `/proc/PID/uid_map`.
    pub fn uid_map_text(&self) -> String {
        map_text(&self.uids)
    }

    /// The text to write to `/proc/PID/gid_map`.
    pub fn gid_map_text(&self) -> String {
        map_text(&self.gids)
    }

    /// A short name for the mapping that is safe in a file name, e.g.
    /// `0-100000-65536` (uids and gids alike) or `u0-100000-65536_g0-200000-65536`.
    pub fn tag(&self) -> String {
        let part = |rs: &[IdRange]| {
            rs.iter()
                .map(|r| format!("{}-{}-{}", r.inside, r.outside, r.count))
                .collect::<Vec<_>>()
                .join(".")
        };
        if self.uids == self.gids {
            part(&self.uids)
        } else {
            format!("u{}_g{}", part(&self.uids), part(&self.gids))
        }
    }
}

fn map_text(ranges: &[IdRange]) -> String {
    let mut s = String::new();
    for r in ranges {
        let _ = writeln!(s, "{} {} {}", r.inside, r.outside, r.count);
    }
    s
}

/// A user namespace with a given [`IdMap`], held by an open
/// `/proc/PID/ns/user` descriptor. No process lives in it: the namespace exists
/// only as long as this value (or a mount idmapped through it) does.
///
/// It is what `mount_setattr(MOUNT_ATTR_IDMAP)` needs, and a sprite runtime can
/// `setns(2)` into it too.
#[derive(Debug)]
pub struct UserNamespace {
    fd: OwnedFd,
}

impl UserNamespace {
    /// Create a user namespace with `map`. Needs `CAP_SETUID`/`CAP_SETGID`
    /// (root) to write arbitrary ranges. Costs a fork: about 1 ms.
    pub fn new(map: &IdMap) -> Result<Self, ImageError> {
        map.validate()?;
        let io_err = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| ImageError::io(what, e)
        };
        let nix_err = |what: &'static str| move |e: nix::Error| ImageError::io(what, io::Error::from(e));
        let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(nix_err("pipe"))?;
        let (go_r, go_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(nix_err("pipe"))?;
        let pid = sys::fork_userns_holder(sys::pair(&ready_r, &ready_w), sys::pair(&go_r, &go_w))
            .map_err(io_err("fork"))?;
        drop(ready_w);
        drop(go_r);
        let holder = Holder {
            pid: Pid::from_raw(pid),
            go: Some(go_w),
        };

        let mut code = [0u8; 4];
        fs::File::from(ready_r)
            .read_exact(&mut code)
            .map_err(io_err("user namespace helper"))?;
        let code = i32::from_ne_bytes(code);
        if code != 0 {
            return Err(ImageError::io(
                "unshare(CLONE_NEWUSER)",
                io::Error::from_raw_os_error(code),
            ));
        }
        let proc = format!("/proc/{pid}");
        // gid_map first or last does not matter for a privileged writer.
        fs::write(format!("{proc}/uid_map"), map.uid_map_text()).map_err(io_err("write uid_map"))?;
        fs::write(format!("{proc}/gid_map"), map.gid_map_text()).map_err(io_err("write gid_map"))?;
        let ns = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("{proc}/ns/user"))
            .map_err(io_err("open ns/user"))?;
        holder.release();
        Ok(UserNamespace { fd: ns.into() })
    }

    /// The namespace descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for UserNamespace {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The forked helper: let it go and reap it, killing it first if we bail out
/// before telling it to exit.
struct Holder {
    pid: Pid,
    go: Option<OwnedFd>,
}

impl Holder {
    fn release(mut self) {
        if let Some(go) = self.go.take() {
            let _ = fs::File::from(go).write_all(b"x");
        }
        let _ = waitpid(self.pid, None);
        std::mem::forget(self);
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_and_tag() {
        let m = IdMap::root_at(100_000, 65_536);
        m.validate().unwrap();
        assert_eq!(m.tag(), "0-100000-65536");
        assert_eq!(m.uid_map_text(), "0 100000 65536\n");
        assert!(!m.is_identity());
        assert!(IdMap::identity().is_identity());
        let bad = IdMap {
            uids: vec![
                IdRange {
                    inside: 0,
                    outside: 100,
                    count: 10,
                },
                IdRange {
                    inside: 5,
                    outside: 500,
                    count: 10,
                },
            ],
            gids: m.gids.clone(),
        };
        assert!(bad.validate().is_err());
        let overflow = IdMap::root_at(u32::MAX - 5, 10);
        assert!(overflow.validate().is_err());
        let split = IdMap {
            uids: m.uids.clone(),
            gids: vec![IdRange {
                inside: 0,
                outside: 7,
                count: 1,
            }],
        };
        assert_eq!(split.tag(), "u0-100000-65536_g0-7-1");
        assert_eq!(split.gid_to_host(0), Some(7));
        assert_eq!(split.gid_to_host(1), None);
    }
}
