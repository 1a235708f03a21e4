//! User lookup from the sprite's own passwd/group files.
//!
//! We parse the files directly instead of using NSS (`getpwnam`) because the
//! agent must see the sprite's users, and NSS modules may not exist or behave
//! in the minimal sprite root.

use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    /// Supplementary groups, including the primary group.
    pub groups: Vec<u32>,
}

impl UserInfo {
    pub fn creds(&self) -> crate::sys::Creds {
        crate::sys::Creds {
            uid: Uid::from_raw(self.uid),
            gid: Gid::from_raw(self.gid),
            groups: self.groups.iter().map(|g| Gid::from_raw(*g)).collect(),
        }
    }
}

/// Resolves `user` (a name, or a numeric uid) against `passwd` and `group`.
pub fn lookup(user: &str, passwd: &Path, group: &Path) -> Result<UserInfo, Error> {
    let passwd_text = std::fs::read_to_string(passwd)
        .map_err(|e| Error::User(format!("reading {}: {e}", passwd.display())))?;
    let numeric = user.parse::<u32>().ok();
    let mut found = None;
    for line in passwd_text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            continue;
        }
        let Ok(uid) = f[2].parse::<u32>() else { continue };
        let Ok(gid) = f[3].parse::<u32>() else { continue };
        if f[0] == user || numeric == Some(uid) {
            found = Some(UserInfo {
                name: f[0].to_owned(),
                uid,
                gid,
                home: f[5].to_owned(),
                shell: f[6].to_owned(),
                groups: vec![gid],
            });
            break;
        }
    }
    let mut info = match (found, numeric) {
        (Some(i), _) => i,
        // A bare uid without a passwd entry is still usable, like `docker -u`.
        (None, Some(uid)) => UserInfo {
            name: uid.to_string(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
            groups: vec![uid],
        },
        (None, None) => return Err(Error::User(format!("unknown user {user:?}"))),
    };
    // A missing group file only loses supplementary groups.
    if let Ok(group_text) = std::fs::read_to_string(group) {
        for line in group_text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                continue;
            }
            let Ok(gid) = f[2].parse::<u32>() else { continue };
            if f[3].split(',').any(|m| m == info.name) && !info.groups.contains(&gid) {
                info.groups.push(gid);
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        let g = dir.path().join("group");
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\nsprite:x:1000:1000::/home/sprite:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            &g,
            "root:x:0:\nsprite:x:1000:\nsudo:x:27:sprite,other\ndocker:x:999:other\n",
        )
        .unwrap();
        let u = lookup("sprite", &p, &g).unwrap();
        assert_eq!((u.uid, u.gid, u.groups.clone()), (1000, 1000, vec![1000, 27]));
        assert_eq!(lookup("0", &p, &g).unwrap().name, "root");
        assert_eq!(lookup("4242", &p, &g).unwrap().uid, 4242);
        assert!(lookup("nosuch", &p, &g).is_err());
    }
}
