//! Port watcher: polls `/proc/net/tcp{,6}` for LISTEN sockets and reports
//! appearances and disappearances to the owning session and to global
//! subscribers.
//!
//! Polling is what sprite-env does too; netlink sock_diag would avoid the
//! scan but not the inode → pid mapping, which needs `/proc/*/fd` anyway.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Weak;

use bytes::Bytes;

use crate::protocol::{Control, PortEvent, encode_control};
use crate::server::AgentInner;
use crate::session::offer;

const TCP_LISTEN: &str = "0A";

/// (address, port) per socket inode.
pub(crate) fn listening_sockets() -> HashMap<u64, (String, u16)> {
    let mut out = HashMap::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != TCP_LISTEN {
                continue;
            }
            let Some((addr_hex, port_hex)) = f[1].split_once(':') else {
                continue;
            };
            let (Ok(port), Ok(inode)) = (u16::from_str_radix(port_hex, 16), f[9].parse::<u64>()) else {
                continue;
            };
            let Some(addr) = parse_addr(addr_hex, v6) else {
                continue;
            };
            if inode != 0 {
                out.insert(inode, (addr, port));
            }
        }
    }
    out
}

/// The kernel prints each 32-bit word of the address in host byte order.
fn parse_addr(hex: &str, v6: bool) -> Option<String> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match (v6, bytes.len()) {
        (false, 4) => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        (true, 16) => {
            let arr: [u8; 16] = bytes.try_into().ok()?;
            let ip = Ipv6Addr::from(arr);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => ip.to_string(),
            })
        }
        _ => None,
    }
}

/// Maps the wanted socket inodes to the first pid holding each.
fn owners(wanted: &HashSet<u64>) -> HashMap<u64, i32> {
    let mut found = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        for target in socket_links(pid, &entry.path().join("fd")) {
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) {
                found.entry(inode).or_insert(pid);
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

/// Link targets of a process's open descriptors. Without CAP_SYS_PTRACE
/// (sprites drop it) root may not read another user's `/proc/<pid>/fd`, but
/// the owner may: the read is retried with this thread's filesystem ids
/// switched to the process's.
fn socket_links(pid: i32, fd_dir: &std::path::Path) -> Vec<PathBuf> {
    // Listing the directory may be allowed (DAC override) while each
    // readlink is refused by the ptrace check, so either counts as denied.
    let read = || -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for fd in std::fs::read_dir(fd_dir)?.flatten() {
            match std::fs::read_link(fd.path()) {
                Ok(t) => out.push(t),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(e),
                Err(_) => {}
            }
        }
        Ok(out)
    };
    match read() {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let Some((uid, gid)) = proc_ids(pid) else {
                return Vec::new();
            };
            // setfsuid/setfsgid are per thread and nothing awaits in between,
            // so no other task runs with these ids.
            // SAFETY: plain syscalls without memory arguments.
            let (old_gid, old_uid) = unsafe { (libc::setfsgid(gid), libc::setfsuid(uid)) };
            let v = read().unwrap_or_default();
            // SAFETY: as above; restores the previous ids.
            unsafe {
                libc::setfsuid(old_uid as libc::uid_t);
                libc::setfsgid(old_gid as libc::gid_t);
            }
            v
        }
        Err(_) => Vec::new(),
    }
}

/// Effective uid and gid from /proc/<pid>/status.
fn proc_ids(pid: i32) -> Option<(libc::uid_t, libc::gid_t)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(2)?.parse().ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// (ppid, sid) from /proc/<pid>/stat.
fn stat_ids(pid: i32) -> Option<(i32, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(1)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Finds the session a pid belongs to: sessions are session leaders, so the
/// kernel session id usually names it; a process that called setsid itself
/// is found by walking up the parent chain.
fn session_of(agent: &AgentInner, pid: i32) -> Option<String> {
    let sessions = agent.lock_sessions();
    let mut cur = pid;
    for _ in 0..64 {
        if sessions.contains_key(&cur.to_string()) {
            return Some(cur.to_string());
        }
        let (ppid, sid) = stat_ids(cur)?;
        if sessions.contains_key(&sid.to_string()) {
            return Some(sid.to_string());
        }
        if ppid <= 1 {
            return None;
        }
        cur = ppid;
    }
    None
}

/// Applies one change to the agent's list of listeners and tells the
/// owning session and the subscribers, under the subscribers' lock (see
/// [`AgentInner::port_subscribers`]).
fn emit(agent: &AgentInner, inode: u64, msg: Control) {
    let (ev, opened) = match &msg {
        Control::PortOpened(ev) => (ev, true),
        Control::PortClosed(ev) => (ev, false),
        _ => return,
    };
    if let Some(id) = ev.session.as_deref()
        && let Some(s) = agent.session(id)
    {
        s.broadcast_control(&msg);
    }
    let frame = Bytes::from(encode_control(&msg));
    let mut subs = agent.port_subscribers.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut known = agent.ports_known.lock().unwrap_or_else(|p| p.into_inner());
        if opened {
            known.insert(inode, ev.clone());
        } else {
            known.remove(&inode);
        }
    }
    subs.retain(|tx| offer(tx, &frame));
}

pub(crate) async fn watch(agent: Weak<AgentInner>) {
    // Listeners that predate the agent (or this poll loop) are a baseline,
    // not news.
    let mut known: HashMap<u64, PortEvent> = HashMap::new();
    let mut first = true;
    loop {
        let Some(a) = agent.upgrade() else { return };
        let interval = a.config.port_poll_interval;
        // Not while a memory snapshot is taken: a restore of this runsc has
        // crashed PID 1 with /proc/net/tcp's text on its stack when the save
        // caught the poll mid-read.
        let mut quiesced = a.quiesced_rx();
        if *quiesced.borrow() {
            drop(a);
            let _ = quiesced.wait_for(|q| !*q).await.map(drop);
            continue;
        }
        let current = listening_sockets();
        let new: HashSet<u64> = current
            .keys()
            .filter(|i| !known.contains_key(i))
            .copied()
            .collect();
        let pids = if new.is_empty() {
            HashMap::new()
        } else {
            owners(&new)
        };
        for inode in new {
            let (address, port) = current[&inode].clone();
            let pid = pids.get(&inode).copied().unwrap_or(0);
            let session = if pid > 0 { session_of(&a, pid) } else { None };
            let ev = PortEvent {
                port,
                address,
                pid,
                session,
            };
            if first {
                // Not news, but part of what `watch_ports` lists.
                a.ports_known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(inode, ev.clone());
            } else {
                emit(&a, inode, Control::PortOpened(ev.clone()));
            }
            known.insert(inode, ev);
        }
        let gone: Vec<u64> = known
            .keys()
            .filter(|i| !current.contains_key(i))
            .copied()
            .collect();
        for inode in gone {
            if let Some(ev) = known.remove(&inode) {
                emit(&a, inode, Control::PortClosed(ev));
            }
        }
        first = false;
        drop(a);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("0100007F", false).unwrap(), "127.0.0.1");
        assert_eq!(parse_addr("00000000", false).unwrap(), "0.0.0.0");
        assert_eq!(
            parse_addr("00000000000000000000000001000000", true).unwrap(),
            "::1"
        );
        assert_eq!(
            parse_addr("0000000000000000FFFF00000100007F", true).unwrap(),
            "127.0.0.1"
        );
    }
}
