//! Process trees, read from `/proc`: what a timed-out command started.
//!
//! A command's descendants can leave its process group and session (`setsid`,
//! daemons), so signalling the group does not reach them; following parent
//! links does. Commands with a time limit are made child subreapers (see
//! `sys::configure_child`), so even a double-forked daemon stays under the
//! command while it runs instead of being reparented to PID 1.
//!
//! A pid is remembered together with its start time, so a pid reused by an
//! unrelated process after the original exited is never signalled.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One process: pid and start time (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Proc {
    pub pid: i32,
    start: u64,
}

/// `(ppid, start time)` from `/proc/<pid>/stat`; `None` for a process that is
/// gone or a zombie (nothing left to signal).
fn stat(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything; the fields follow the last ')'.
    let rest = s.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = f.next()?.parse().ok()?;
    // Field 22 overall; 3 (state) and 4 (ppid) were taken above.
    let start = f.nth(17)?.parse().ok()?;
    Some((ppid, start))
}

fn all() -> Vec<(Proc, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| stat(pid).map(|(ppid, start)| (Proc { pid, start }, ppid)))
        .collect()
}

/// The live processes among `roots` and all their descendants.
pub(crate) fn descendants(roots: &[i32]) -> Vec<Proc> {
    let procs = all();
    let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
    let mut by_pid = HashMap::new();
    for (p, ppid) in &procs {
        children.entry(*ppid).or_default().push(*p);
        by_pid.insert(p.pid, *p);
    }
    let mut out: Vec<Proc> = roots.iter().filter_map(|r| by_pid.get(r).copied()).collect();
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i].pid) {
            for p in c {
                if !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        i += 1;
    }
    out
}

/// Still the same process (not exited, pid not reused).
pub(crate) fn alive(p: &Proc) -> bool {
    stat(p.pid).is_some_and(|(_, start)| start == p.start)
}

pub(crate) fn signal(procs: &[Proc], sig: Signal) {
    for p in procs {
        if alive(p) {
            let _ = kill(Pid::from_raw(p.pid), sig);
        }
    }
}

/// SIGKILLs `procs` and everything below them. The tree is stopped first,
/// round by round until a scan finds nothing new, because a process forking
/// while its parent is being killed would otherwise escape to PID 1.
pub(crate) fn kill_all(procs: &[Proc]) {
    let mut seen: Vec<Proc> = procs.iter().copied().filter(alive).collect();
    for _ in 0..32 {
        signal(&seen, Signal::SIGSTOP);
        let roots: Vec<i32> = seen.iter().map(|p| p.pid).collect();
        let now = descendants(&roots);
        let before = seen.len();
        for p in now {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        if seen.len() == before {
            break;
        }
    }
    signal(&seen, Signal::SIGKILL);
}
