//! Thin safe wrappers around the few raw syscalls the agent needs.
//!
//! Every `unsafe` block of the crate lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::unistd::{Gid, Uid};

/// Sets a tty's window size; the kernel then sends SIGWINCH to the tty's
/// foreground process group, which is exactly what a resize should do.
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a valid open descriptor for the borrow's lifetime and
    // TIOCSWINSZ only reads the `winsize` we pass by pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Credentials applied in the child between fork and exec.
#[derive(Debug, Clone)]
pub struct Creds {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
}

/// Makes the child a session leader (so its PID is also its process group,
/// which signals and kills target), optionally acquires `stdin` as its
/// controlling terminal, and switches credentials.
///
/// Credentials are switched here rather than with `CommandExt::uid`, because
/// std's stable API cannot set supplementary groups and would run the
/// `pre_exec` hook after `setuid`, when `setgroups` is no longer permitted.
///
/// With `subreaper`, the child (and the program it execs: the attribute
/// survives `execve`) adopts its orphaned descendants, so they stay in its
/// process tree while it runs.
pub fn configure_child(cmd: &mut Command, controlling_tty: bool, creds: Option<Creds>, subreaper: bool) {
    let raw_groups: Vec<libc::gid_t> = creds
        .as_ref()
        .map(|c| c.groups.iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe syscalls below: we are in a forked child of a
        // multithreaded process, so no allocation and no locks.
        nix::unistd::setsid()?;
        if subreaper {
            // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no pointers.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Ignored signals survive exec: a command must not inherit an
        // ignored SIGINT or SIGTERM from whatever started the agent (a
        // shell's background job, nohup), or `signal`/`kill` can't stop it.
        for sig in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGPIPE,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ] {
            // SAFETY: setting a default disposition is async-signal-safe
            // and touches no memory of ours.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        if controlling_tty {
            // SAFETY: fd 0 is the pty slave installed by std's stdio setup;
            // TIOCSCTTY takes an integer argument and touches no memory.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(c) = &creds {
            // SAFETY: pointer and length describe the live `raw_groups` vector.
            if unsafe { libc::setgroups(raw_groups.len(), raw_groups.as_ptr()) } < 0 {
                return Err(io::Error::last_os_error());
            }
            nix::unistd::setgid(c.gid)?;
            nix::unistd::setuid(c.uid)?;
        }
        Ok(())
    };
    // SAFETY: the hook only performs async-signal-safe syscalls and reads
    // memory captured before the fork.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Adopts orphaned descendants when we are not PID 1 (tests, or an agent
/// started under another init), so the reaper sees them.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: std::os::fd::OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps returning the same descriptor
    // until it is dropped, which only happens together with the AsyncFd.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// Takes over the listening socket the runtime passed at descriptor `fd`:
/// checks it is a socket, and makes it close-on-exec so no command the agent
/// runs inherits it (it could otherwise accept the host's connections).
pub fn adopt_listener(fd: std::os::fd::RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor was handed to this process at exec for the agent
    // alone; nothing else in the process owns or closes it.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(&owned)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    let listener = std::os::unix::net::UnixListener::from(owned);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Makes this process non-dumpable. For ptrace access checks (attach, and
/// `pidfd_getfd`, `/proc/<pid>/fd`, `process_vm_readv`, which use them) a
/// non-dumpable process needs CAP_SYS_PTRACE in the user namespace its memory
/// was created in: the sprite's, whose root does not have that capability.
/// Without this, the sprite's root (same uid) could stop PID 1 or copy its
/// descriptors. `execve` resets the flag, so commands the agent runs are not
/// affected.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes an integer flag; no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Points stdout and stderr at `file` (stdin at /dev/null): whatever the
/// runtime gave PID 1 (a host log file) is then no longer held by it.
pub fn redirect_stdio(file: &std::fs::File) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    for (src, target) in [
        (null.as_raw_fd(), 0),
        (file.as_raw_fd(), 1),
        (file.as_raw_fd(), 2),
    ] {
        // SAFETY: dup2 only changes the descriptor table; both descriptors
        // are open for the duration of the call, and the standard streams
        // stay owned by the process as before.
        if unsafe { libc::dup2(src, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
