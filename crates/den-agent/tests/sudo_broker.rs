//! The sudo broker's protocol from outside: a request with its standard
//! descriptors runs as the target user and answers the exit status, and
//! requests held open can't pile up threads without bound.
//!
//! Its own binary: the broker spawns through the agent's process-wide
//! reaper, which reaps every child of the process.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};

use den_agent::sudo::Broker;

/// Set for the child `a_broker_that_is_not_pid_1_gets_nothing` starts.
const SHIM_ENV: &str = "DEN_SUDO_BROKER_TEST_SHIM";

/// `sudo true` through the real shim, when started by that test.
#[test]
fn shim_entry() {
    if std::env::var_os(SHIM_ENV).is_none() {
        return;
    }
    std::process::exit(den_agent::sudo::shim_main(&["true".into()]));
}

/// Any process of a sprite can bind an abstract name the agent does not
/// hold. The shim checks who answers (PID 1 as root, as the kernel says),
/// and hands such a stranger nothing: not the request, not the caller's
/// descriptors. This test's broker is an ordinary process, so it is one.
#[test]
fn a_broker_that_is_not_pid_1_gets_nothing() {
    if std::env::var_os(SHIM_ENV).is_some() {
        return;
    }
    let name = format!("den-sudo-stranger-{}", std::process::id());
    let listener = std::os::unix::net::UnixListener::bind_addr(
        &SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["shim_entry", "--exact", "--nocapture"])
        .env(SHIM_ENV, "1")
        .env(den_agent::sudo::SOCKET_ENV, &name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The stranger says hello as a broker would, then listens.
    let (conn, _) = listener.accept().unwrap();
    use std::io::Write;
    (&conn).write_all(&[1]).unwrap();
    // It gets nothing, not a byte, not a descriptor: the shim hangs up.
    // (Bounded, so a shim that did send would fail this test, not hang it.)
    conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = (&conn).read_to_end(&mut rest);
    drop(conn);
    let out = out.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not by den's agent"), "{stderr}");
    assert!(rest.is_empty(), "the stranger got {rest:?}");
}

fn connect(name: &str) -> UnixStream {
    UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap()
}

#[test]
fn broker_runs_commands_and_bounds_its_threads() {
    if !nix::unistd::geteuid().is_root() {
        panic!("the sudo broker test switches users: run it as root");
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.path().join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    let name = format!("den-sudo-test-{}", std::process::id());
    Broker {
        root: root.path().to_path_buf(),
    }
    .start(&name)
    .unwrap();

    // As root (this test), for nobody: the command gets our pipe as stdout.
    let conn = connect(&name);
    let mut ready = [0u8; 1];
    (&conn).read_exact(&mut ready).unwrap();
    assert_eq!(ready, [1]);
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let req = serde_json::json!({
        "argv": ["/bin/sh", "-c", "echo $USER $(id -u) $SUDO_USER; exit 7"],
        "user": "nobody", "login": false, "shell": false, "preserve_env": false,
        "env": [["PATH", "/usr/bin:/bin"]], "cwd": "/",
    });
    let mut line = serde_json::to_vec(&req).unwrap();
    line.push(b'\n');
    let fds = [null.as_raw_fd(), out_w.as_raw_fd(), out_w.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(&line)],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(out_w);
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).unwrap();
    assert_eq!(reply.trim_end(), r#"{"exit":7}"#);
    let mut out = String::new();
    std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
    assert_eq!(out, "nobody 65534 root\n");

    // 64 requests held open (each got its go-ahead): the next is refused
    // with a reason, not left hanging.
    let held: Vec<UnixStream> = (0..64)
        .map(|_| {
            let c = connect(&name);
            (&c).read_exact(&mut ready).unwrap();
            c
        })
        .collect();
    let refused = connect(&name);
    // Without the bound it would get its go-ahead and wait for a request.
    refused
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&refused).read_line(&mut answer).unwrap();
    assert!(answer.contains("sudo commands run already"), "{answer:?}");
    // Once they go, requests are served again.
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let c = connect(&name);
        let mut first = [0u8; 1];
        (&c).read_exact(&mut first).unwrap();
        if first == [1] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the broker never recovered");
    }
}
