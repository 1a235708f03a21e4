//! `sudo` where setuid can't work: under gVisor every process runs with
//! no_new_privs, so the image's setuid `sudo` refuses to run. There den
//! mounts a small script over `/usr/bin/sudo` that runs `den sudo-shim`
//! ([`shim_main`]); the shim hands its arguments, environment, working
//! directory and standard descriptors to the agent's broker ([`Broker`]),
//! which already runs as root, over an abstract unix socket inside the
//! sprite. The broker checks who is asking from the socket's peer
//! credentials (which the caller can't forge) against the sprite's own
//! sudoers files, runs the command with the descriptors it was handed, and
//! answers its exit status. The shim forwards the signals it gets (a
//! terminal's ^C) to the command.
//!
//! Only `NOPASSWD: ALL` rules grant anything (the broker can't ask for a
//! password): a user or `%group` named by such a line in `/etc/sudoers` or
//! `/etc/sudoers.d/*`, and root. Everyone else is refused, as sudo would.
//! The command gets no controlling terminal (it is in a session of its own,
//! not the caller's): `sudo -i` shells work but have no job control.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::reaper::{ChildExit, Reaper};

/// The broker's abstract socket name, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "den-sudo";
/// The variable that names another socket to the shim (tests, where
/// several brokers share a network namespace).
pub const SOCKET_ENV: &str = "DEN_SUDO_SOCKET";
/// `PATH` for the command unless the environment is kept (Debian's
/// `secure_path`).
const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The caller's variables that survive the environment reset.
const KEPT_VARS: &[&str] = &["TERM", "COLORTERM", "DISPLAY", "LANG", "LANGUAGE", "TZ"];

/// What the shim asks for; sent with its stdin, stdout and stderr.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    /// The command; empty for a plain `-i` or `-s` shell.
    argv: Vec<String>,
    user: String,
    login: bool,
    shell: bool,
    preserve_env: bool,
    env: Vec<(String, String)>,
    cwd: String,
}

/// The broker's last word.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    #[serde(skip_serializing_if = "Option::is_none")]
    exit: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signal: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The longest request line.
const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// How many sudo commands may run (or be asked for) at once.
const MAX_REQUESTS: usize = 64;

/// The broker's first byte: send the request now.
const READY: u8 = 1;

/// A signal the shim received, for the command.
#[derive(Debug, Serialize, Deserialize)]
struct Forward {
    signal: i32,
}

// ------------------------------------------------------------------ broker

/// The agent's side: serves sudo requests on an abstract socket, each on a
/// thread of its own.
pub struct Broker {
    /// Where the sprite's `passwd`, `group` and sudoers files are (`/`).
    pub root: PathBuf,
}

impl Broker {
    /// Binds abstract socket `name` and serves on a background thread.
    pub fn start(self, name: &str) -> std::io::Result<()> {
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        let broker = std::sync::Arc::new(self);
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("den-sudo-broker".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    // A thread per request, boundedly: connections held open
                    // by the sprite's programs must not pile up threads in
                    // its PID 1.
                    use std::sync::atomic::Ordering::SeqCst;
                    if busy.fetch_add(1, SeqCst) >= MAX_REQUESTS {
                        busy.fetch_sub(1, SeqCst);
                        let refusal = Reply {
                            error: Some(format!("{MAX_REQUESTS} sudo commands run already; try again")),
                            ..Reply::default()
                        };
                        let _ = (&conn).write_all(&reply_line(&refusal));
                        continue;
                    }
                    let (broker, busy) = (broker.clone(), busy.clone());
                    let spawned = std::thread::Builder::new().name("den-sudo".into()).spawn({
                        let busy = busy.clone();
                        move || {
                            broker.serve(conn);
                            busy.fetch_sub(1, SeqCst);
                        }
                    });
                    if spawned.is_err() {
                        busy.fetch_sub(1, SeqCst);
                    }
                }
            })?;
        Ok(())
    }

    fn serve(&self, conn: UnixStream) {
        let reply = match self.run(&conn) {
            Ok(exit) => exit,
            Err(e) => Reply {
                error: Some(e),
                ..Reply::default()
            },
        };
        let _ = (&conn).write_all(&reply_line(&reply));
        // Ends the signal reader too, whether or not the caller hangs up.
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }

    fn run(&self, conn: &UnixStream) -> Result<Reply, String> {
        // Who asks is what the kernel attaches to the request
        // (SCM_CREDENTIALS: a sender can't claim another uid). Asked for
        // before the shim may send: only then is it attached. (gVisor's
        // SO_PEERCRED said uid 0 for every caller.)
        nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(|e| format!("SO_PASSCRED: {e}"))?;
        (&*conn)
            .write_all(&[READY])
            .map_err(|e| format!("answering the shim: {e}"))?;
        let (fds, peer_uid, head) = receive(conn).map_err(|e| format!("reading the request: {e}"))?;
        let [stdin, stdout, stderr]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|_| "the request carries no standard descriptors".to_string())?;
        let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
        let mut line = head;
        match line.iter().position(|&b| b == b'\n') {
            // Whatever came with it is a signal sent before the command
            // ran: too early to matter.
            Some(end) => line.truncate(end),
            None => {
                // Bounded: a request is argv and environment, not a stream.
                std::io::Read::take(&mut reader, MAX_REQUEST_BYTES)
                    .read_until(b'\n', &mut line)
                    .map_err(|e| format!("reading the request: {e}"))?;
            }
        }
        let req: Request = serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))?;
        let peer_uid = peer_uid.ok_or("the request carries no credentials")?;
        let passwd = self.root.join("etc/passwd");
        let group = self.root.join("etc/group");
        let caller =
            crate::user::lookup(&peer_uid.to_string(), &passwd, &group).map_err(|e| e.to_string())?;
        if peer_uid != 0 && !self.may_sudo(&caller, &group) {
            return Err(format!(
                "{} is not allowed to run sudo here (only NOPASSWD: ALL sudoers rules apply)",
                caller.name
            ));
        }
        let target = crate::user::lookup(&req.user, &passwd, &group).map_err(|e| e.to_string())?;
        let mut cmd = command(&req, &target, &caller);
        cmd.stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        crate::sys::configure_child(&mut cmd, false, Some(target.creds()), false);
        let (_, pid, exited) = Reaper::global()
            .spawn(|| {
                let child = cmd.spawn()?;
                let pid = child.id() as i32;
                Ok((child, pid))
            })
            .map_err(|e| format!("{}: {e}", req.argv.first().map_or("shell", String::as_str)))?;
        // Signals the shim forwards go to the command's process group (it
        // leads a session of its own); the reader ends with the connection.
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Ok(f) = serde_json::from_str::<Forward>(&line)
                    && let Ok(sig) = nix::sys::signal::Signal::try_from(f.signal)
                {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
                }
            }
        });
        Ok(match exited.blocking_recv() {
            Ok(ChildExit::Code(c)) => Reply {
                exit: Some(c),
                ..Reply::default()
            },
            Ok(ChildExit::Signal(s)) => Reply {
                signal: Some(s as i32),
                ..Reply::default()
            },
            Err(_) => return Err("the command's exit was lost".into()),
        })
    }

    /// Whether `user` has a `NOPASSWD: ALL` rule, as themselves or through
    /// a `%group`, in the sprite's sudoers files.
    fn may_sudo(&self, user: &crate::user::UserInfo, group_file: &Path) -> bool {
        let groups = group_names(group_file, &user.groups);
        let mut files = vec![self.root.join("etc/sudoers")];
        if let Ok(dir) = std::fs::read_dir(self.root.join("etc/sudoers.d")) {
            // sudo skips names with a `.` or ending in `~`.
            files.extend(dir.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.contains('.') && !n.ends_with('~'))
            }));
        }
        files.iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|text| {
                text.lines().any(|l| {
                    let Some(who) = nopasswd_all(l) else {
                        return false;
                    };
                    match who.strip_prefix('%') {
                        Some(g) => groups.iter().any(|n| n == g),
                        None => who == user.name,
                    }
                })
            })
        })
    }
}

fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_default();
    line.push(b'\n');
    line
}

/// `WHO HOSTS=(RUNAS) NOPASSWD: ALL`: the principal, if the line grants
/// everything without a password.
fn nopasswd_all(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (who, rule) = line.split_once(char::is_whitespace)?;
    let rule = rule.trim();
    let (_, tail) = rule.split_once("NOPASSWD:")?;
    (tail.trim() == "ALL" && rule.starts_with("ALL")).then_some(who)
}

/// The names of the groups `gids` in `group_file`.
fn group_names(group_file: &Path, gids: &[u32]) -> Vec<String> {
    let text = std::fs::read_to_string(group_file).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let gid: u32 = f.get(2)?.parse().ok()?;
            gids.contains(&gid).then(|| f[0].to_string())
        })
        .collect()
}

/// The command as sudo would run it for `req`, as `target`.
fn command(req: &Request, target: &crate::user::UserInfo, caller: &crate::user::UserInfo) -> Command {
    let shell = if target.shell.is_empty() {
        "/bin/sh".to_string()
    } else {
        target.shell.clone()
    };
    let mut cmd = if req.login || req.shell {
        let mut c = Command::new(&shell);
        if req.login {
            // A login shell: its argv[0] starts with `-`.
            let base = Path::new(&shell)
                .file_name()
                .map_or("sh".into(), |n| n.to_string_lossy().into_owned());
            c.arg0(format!("-{base}"));
        }
        if !req.argv.is_empty() {
            c.arg("-c").arg(shell_words(&req.argv));
        }
        c
    } else {
        let mut c = Command::new(&req.argv[0]);
        c.args(&req.argv[1..]);
        c
    };
    cmd.env_clear();
    cmd.envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let command_line = if req.argv.is_empty() {
        shell.clone()
    } else {
        req.argv.join(" ")
    };
    if !req.preserve_env || req.login {
        cmd.env("HOME", &target.home);
    }
    cmd.env("USER", &target.name)
        .env("LOGNAME", &target.name)
        .env("SHELL", &shell)
        .env("SUDO_USER", &caller.name)
        .env("SUDO_UID", caller.uid.to_string())
        .env("SUDO_GID", caller.gid.to_string())
        .env("SUDO_COMMAND", command_line);
    let cwd = if req.login { &target.home } else { &req.cwd };
    cmd.current_dir(if Path::new(cwd).is_dir() {
        cwd.as_str()
    } else {
        "/"
    });
    cmd
}

/// `argv` as one `sh -c` string, each character outside a safe set
/// backslash-escaped (what sudo does for `-i` and `-s`).
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            a.chars()
                .flat_map(|c| {
                    let safe = c.is_ascii_alphanumeric() || "_-/.=:,+@%".contains(c);
                    (!safe).then_some('\\').into_iter().chain([c])
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first read of a request: the descriptors sent with it, the sender's
/// uid as the kernel gives it, and its bytes.
fn receive(conn: &UnixStream) -> std::io::Result<(Vec<OwnedFd>, Option<u32>, Vec<u8>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 3], nix::sys::socket::UnixCredentials);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = nix::sys::socket::recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    let mut uid = None;
    for c in msg.cmsgs()? {
        match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(raw) => {
                // SAFETY: SCM_RIGHTS installed these descriptors in this
                // process just now; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            nix::sys::socket::ControlMessageOwned::ScmCredentials(c) => uid = Some(c.uid()),
            _ => {}
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((fds, uid, buf))
}

// -------------------------------------------------------------------- shim

/// `den sudo-shim ARGS…`, run as `sudo ARGS…`; returns the exit code.
pub fn shim_main(args: &[OsString]) -> i32 {
    match shim(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sudo: {e}");
            1
        }
    }
}

/// What the command line asks for, or `Done` for the options that only
/// answer (`-v`, `-k`, `-l`, `-V`, `-h`).
#[derive(Debug, PartialEq)]
enum Parsed {
    Run(Invocation),
    Done(String),
}

#[derive(Debug, PartialEq, Default)]
struct Invocation {
    user: Option<String>,
    login: bool,
    shell: bool,
    preserve_env: bool,
    /// `--preserve-env=LIST`: these variables are kept.
    keep: Vec<String>,
    assignments: Vec<(String, String)>,
    argv: Vec<String>,
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut inv = Invocation::default();
    let mut i = 0;
    let mut only_answer: Option<String> = None;
    while i < args.len() {
        let a = args[i].as_str();
        i += 1;
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let value = match (name, value) {
                ("user", None) => Some(take(args, &mut i, "--user")?),
                (_, v) => v,
            };
            apply(&mut inv, &mut only_answer, name, value)?;
            continue;
        }
        if let Some(flags) = a.strip_prefix('-').filter(|f| !f.is_empty()) {
            for (at, c) in flags.char_indices() {
                if c == 'u' {
                    // `-uUSER` or `-u USER`: the rest of the word is its value.
                    let rest = &flags[at + 1..];
                    let user = if rest.is_empty() {
                        take(args, &mut i, "-u")?
                    } else {
                        rest.to_string()
                    };
                    apply(&mut inv, &mut only_answer, "user", Some(user))?;
                    break;
                }
                let name = SHORT
                    .iter()
                    .find(|(short, _)| *short == c)
                    .map(|(_, long)| *long)
                    .ok_or_else(|| format!("unsupported option -{c}\n{}", usage()))?;
                apply(&mut inv, &mut only_answer, name, None)?;
            }
            continue;
        }
        i -= 1;
        break;
    }
    // `VAR=value` before the command sets it for the command.
    while let Some((k, v)) = args.get(i).and_then(|a| a.split_once('=')) {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            break;
        }
        inv.assignments.push((k.to_string(), v.to_string()));
        i += 1;
    }
    inv.argv = args[i..].to_vec();
    if inv.argv.is_empty() && !inv.login && !inv.shell {
        return match only_answer {
            Some(a) => Ok(Parsed::Done(a)),
            None => Err(usage()),
        };
    }
    Ok(Parsed::Run(inv))
}

/// The short options, by their long names.
const SHORT: &[(char, &str)] = &[
    ('i', "login"),
    ('s', "shell"),
    ('E', "preserve-env"),
    ('H', "set-home"),
    ('n', "non-interactive"),
    ('k', "reset-timestamp"),
    ('K', "remove-timestamp"),
    ('S', "stdin"),
    ('v', "validate"),
    ('l', "list"),
    ('V', "version"),
    ('h', "help"),
];

/// Option `name` (long form) with its `value`.
fn apply(
    inv: &mut Invocation,
    only_answer: &mut Option<String>,
    name: &str,
    value: Option<String>,
) -> Result<(), String> {
    match name {
        "user" => inv.user = value,
        "login" => inv.login = true,
        "shell" => inv.shell = true,
        "preserve-env" => match value {
            None => inv.preserve_env = true,
            Some(list) => inv.keep.extend(list.split(',').map(str::to_string)),
        },
        // Nothing to do where no password is ever asked.
        "set-home" | "non-interactive" | "reset-timestamp" | "remove-timestamp" | "stdin" => {}
        "validate" => *only_answer = Some(String::new()),
        "list" => *only_answer = Some(list_answer()),
        "version" => *only_answer = Some("sudo (den sudo broker)\n".into()),
        "help" => *only_answer = Some(usage()),
        _ => return Err(format!("unsupported option --{name}\n{}", usage())),
    }
    Ok(())
}

fn take(args: &[String], i: &mut usize, flag: &str) -> Result<String, String> {
    let v = args
        .get(*i)
        .cloned()
        .ok_or_else(|| format!("option {flag} requires an argument"))?;
    *i += 1;
    Ok(v)
}

fn usage() -> String {
    "usage: sudo [-EHiknsv] [-u user] [VAR=value] [command [arg ...]]".into()
}

fn list_answer() -> String {
    "User may run the following commands on this sprite:\n    (ALL : ALL) NOPASSWD: ALL\n".into()
}

fn shim(args: &[OsString]) -> Result<i32, String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let inv = match parse(&args)? {
        Parsed::Done(text) => {
            print!("{text}");
            return Ok(0);
        }
        Parsed::Run(inv) => inv,
    };
    let mut env: Vec<(String, String)> = if inv.preserve_env {
        std::env::vars().collect()
    } else {
        let mut kept: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| KEPT_VARS.contains(&k.as_str()) || k.starts_with("LC_") || inv.keep.contains(k))
            .collect();
        kept.push(("PATH".into(), SECURE_PATH.into()));
        kept
    };
    env.extend(inv.assignments.iter().cloned());
    let req = Request {
        argv: inv.argv,
        user: inv.user.unwrap_or_else(|| "root".into()),
        login: inv.login,
        shell: inv.shell,
        preserve_env: inv.preserve_env,
        env,
        cwd: std::env::current_dir()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/".into()),
    };
    let name = std::env::var(SOCKET_ENV).unwrap_or_else(|_| DEFAULT_SOCKET.into());
    let (conn, first) = connect_to_agent(&name)?;
    let mut answers = BufReader::new(&conn);
    let ready = [first];
    if ready[0] != READY {
        // Refused before the request: the byte starts its reply.
        let mut rest = String::new();
        let _ = answers.read_line(&mut rest);
        let text = format!("{}{rest}", ready[0] as char);
        return Err(serde_json::from_str::<Reply>(text.trim_end())
            .ok()
            .and_then(|r| r.error)
            .unwrap_or_else(|| "the sudo broker refused".into()));
    }
    let mut line = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let fds = [0, 1, 2];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(&line)];
    let sent = nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("asking the sudo broker: {e}"))?;
    if sent < line.len() {
        (&conn)
            .write_all(&line[sent..])
            .map_err(|e| format!("asking the sudo broker: {e}"))?;
    }
    forward_signals(&conn)?;
    let mut reply = String::new();
    answers
        .read_line(&mut reply)
        .map_err(|e| format!("the sudo broker: {e}"))?;
    let reply: Reply =
        serde_json::from_str(reply.trim_end()).map_err(|_| "the sudo broker went away".to_string())?;
    match reply {
        Reply { error: Some(e), .. } => Err(e),
        Reply { exit: Some(c), .. } => Ok(c),
        Reply { signal: Some(s), .. } => Ok(128 + s),
        _ => Err("the sudo broker gave no answer".into()),
    }
}

/// Connects to the broker at abstract socket `name` and reads its first
/// byte, refusing anyone but den's agent: PID 1, as root, as the kernel
/// says of that byte's sender (SCM_CREDENTIALS). An abstract name can be
/// bound by any process of the sprite where the agent did not (an agent
/// older than the broker, restored from memory); it must not get the
/// caller's terminal.
fn connect_to_agent(name: &str) -> Result<(UnixStream, u8), String> {
    use nix::sys::socket::{
        AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, connect, recvmsg,
        setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    // Before the connect: the broker sends its first byte at once, and
    // credentials are attached only if the receiver asked already.
    setsockopt(&fd, sockopt::PassCred, &true).map_err(|e| format!("SO_PASSCRED: {e}"))?;
    let addr = UnixAddr::new_abstract(name.as_bytes()).map_err(|e| e.to_string())?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| format!("the sudo broker is not running: {e}"))?;
    let conn = UnixStream::from(fd);
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(|e| format!("the sudo broker: {e}"))?;
    if msg.bytes != 1 {
        return Err("the sudo broker closed the connection".into());
    }
    let sender = msg
        .cmsgs()
        .map_err(|e| format!("the sudo broker: {e}"))?
        .find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(c) => Some((c.pid(), c.uid())),
            _ => None,
        });
    match sender {
        // gVisor names the sending thread, Linux its process.
        Some((pid, 0)) if pid == 1 || process_of(pid) == Some(1) => Ok((conn, byte[0])),
        Some((pid, uid)) => Err(format!(
            "@{name} is held by process {pid} (uid {uid}), not by den's agent: not sending it anything"
        )),
        None => Err(format!("@{name} did not say who it is: not sending it anything")),
    }
}

/// The process thread `tid` belongs to (`Tgid` in its status), while the
/// thread lives (the broker's is busy with this very connection).
fn process_of(tid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The signals a terminal or `kill` sends to sudo go on to the command.
fn forward_signals(conn: &UnixStream) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let signals = [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    let mut set = SigSet::empty();
    for s in signals {
        set.add(s);
    }
    // Blocked here, before the thread starts, so every thread inherits the
    // mask and only the waiter's sigwait takes them.
    set.thread_block().map_err(|e| e.to_string())?;
    let mut out = conn.try_clone().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            let mut line = serde_json::to_vec(&Forward { signal: sig as i32 }).unwrap_or_default();
            line.push(b'\n');
            if out.write_all(&line).is_err() {
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_what_people_type() {
        let Parsed::Run(inv) = p(&["-u", "nobody", "-E", "FOO=1", "id", "-un"]).unwrap() else {
            panic!()
        };
        assert_eq!(inv.user.as_deref(), Some("nobody"));
        assert!(inv.preserve_env);
        assert_eq!(inv.assignments, vec![("FOO".to_string(), "1".to_string())]);
        assert_eq!(inv.argv, vec!["id", "-un"]);
        let Parsed::Run(inv) = p(&["-nuwww-data", "--", "ls", "-l"]).unwrap() else {
            panic!()
        };
        assert_eq!(inv.user.as_deref(), Some("www-data"));
        assert_eq!(inv.argv, vec!["ls", "-l"]);
        let Parsed::Run(inv) = p(&["-i"]).unwrap() else {
            panic!()
        };
        assert!(inv.login && inv.argv.is_empty());
        let Parsed::Run(inv) = p(&["--user=root", "sh", "-c", "a=b"]).unwrap() else {
            panic!()
        };
        assert_eq!(inv.argv, vec!["sh", "-c", "a=b"]);
        let Parsed::Run(inv) = p(&["--preserve-env=A,B", "env"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (inv.keep, inv.preserve_env),
            (vec!["A".to_string(), "B".to_string()], false)
        );
        assert_eq!(p(&["-v"]).unwrap(), Parsed::Done(String::new()));
        assert!(p(&[]).is_err());
        assert!(
            p(&["-g", "wheel", "id"])
                .unwrap_err()
                .contains("unsupported option -g")
        );
    }

    #[test]
    fn only_nopasswd_all_rules_grant() {
        assert_eq!(nopasswd_all("sprite ALL=(ALL:ALL) NOPASSWD: ALL"), Some("sprite"));
        assert_eq!(nopasswd_all("%sudo\tALL=(ALL) NOPASSWD:ALL"), Some("%sudo"));
        assert_eq!(nopasswd_all("%sudo ALL=(ALL:ALL) ALL"), None);
        assert_eq!(nopasswd_all("bob ALL=(ALL) NOPASSWD: /usr/bin/apt"), None);
        assert_eq!(nopasswd_all("# sprite ALL=(ALL) NOPASSWD: ALL"), None);
    }

    #[test]
    fn shell_words_escape_like_sudo() {
        assert_eq!(shell_words(&["echo".into(), "a b;c".into()]), "echo a\\ b\\;c");
    }
}
