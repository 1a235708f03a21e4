//! Detaching copies of our mounts held by other mount namespaces
//! (`den_block::mountinfo::detach_foreign_copies`). Needs root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// The holder of a copy may control every file in its namespace (a sprite's
/// root does). den, as host root, must never execute a binary resolved in
/// there: an earlier version ran `nsenter --target PID --mount umount -l`,
/// which execs the namespace's own `umount`. Here the holder bind-mounts a
/// fake `umount` that leaves a mark; the copy must be detached and the mark
/// never made.
#[test]
fn detaching_a_foreign_copy_never_runs_the_holders_binaries() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("ours");
    std::fs::create_dir(&mnt).unwrap();
    let mark = tmp.path().join("pwned");
    let fake = tmp.path().join("fake-umount");
    std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", mark.display())).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _ours = Unmount(mnt.clone());

    let script = format!(
        "for u in /usr/bin/umount /bin/umount; do [ -e $u ] && mount --bind {fake} $u; done; \
         echo ready; exec sleep 1000",
        fake = fake.display()
    );
    let mut holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let holder = Kill(holder);
    let pid = holder.0.id();
    let holds = || {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .contains(mnt.to_str().unwrap())
    };
    assert!(holds(), "the holder has no copy of our mount");

    let ours = den_block::mountinfo::read()
        .unwrap()
        .into_iter()
        .find(|m| m.mount_point == mnt)
        .expect("our tmpfs");
    let n = den_block::mountinfo::detach_foreign_copies(ours.major, ours.minor);
    assert!(n >= 1, "nothing detached");
    assert!(!holds(), "the holder still has its copy");
    assert!(
        !mark.exists(),
        "den ran the holder's own `umount` binary as host root"
    );
}
