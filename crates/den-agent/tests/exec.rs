//! End-to-end tests against an in-process agent on a temp socket.

mod common;

use std::time::{Duration, Instant};

use common::*;
use den_agent::client::{Event, ExecRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_command_output_never_lost() {
    let a = agent().await;
    // 20 rounds of 10 concurrent execs: concurrency makes races likelier.
    for _ in 0..20 {
        let mut runs = Vec::new();
        for _ in 0..10 {
            let c = a.client.clone();
            runs.push(tokio::spawn(async move {
                collect(c.exec(req(&["echo", "hi"])).await.unwrap()).await
            }));
        }
        for r in runs {
            let out = r.await.unwrap();
            assert_eq!(out.stdout, b"hi\n");
            assert_eq!(out.exit.unwrap().exit_code, 0);
        }
    }
    a.shutdown().await;
}

#[tokio::test]
async fn stdout_and_stderr_are_separate() {
    let a = agent().await;
    let out = collect(
        a.client
            .exec(sh("echo out; echo err >&2; echo out2"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit.unwrap().exit_code, 0);
    a.shutdown().await;
}

#[tokio::test]
async fn stdin_pipe_and_eof() {
    let a = agent().await;
    let s = a
        .client
        .exec(ExecRequest {
            stdin: true,
            ..req(&["cat"])
        })
        .await
        .unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.send_stdin(b"hello\n").await.unwrap();
    s.send_stdin(&big).await.unwrap();
    s.close_stdin().await.unwrap();
    let out = collect(s).await;
    let mut want = b"hello\n".to_vec();
    want.extend_from_slice(&big);
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want);
    assert_eq!(out.exit.unwrap().exit_code, 0);
    a.shutdown().await;
}

#[tokio::test]
async fn exit_codes_and_signals() {
    // Whoever starts the agent may ignore signals (a script's `cmd &`,
    // nohup, some CI runners); ignored dispositions survive exec, so the
    // agent must reset them for its commands or TERM/INT can't stop them.
    // SAFETY: SIG_IGN for two signals; this test process never relies on them.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let a = agent().await;
    let out = collect(a.client.exec(sh("exit 7")).await.unwrap()).await;
    assert_eq!(out.exit.unwrap().exit_code, 7);
    let out = collect(a.client.exec(sh("kill -9 $$")).await.unwrap()).await;
    let exit = out.exit.unwrap();
    assert_eq!(
        (exit.exit_code, exit.signal.as_deref(), exit.timed_out),
        (137, Some("SIGKILL"), false)
    );

    // Signal via the session connection.
    let mut s = a.client.exec(sh("echo ready; exec sleep 30")).await.unwrap();
    read_until(&mut s, "ready").await;
    s.signal("TERM").await.unwrap();
    let exit = collect(s).await.exit.unwrap();
    assert_eq!((exit.exit_code, exit.signal.as_deref()), (143, Some("SIGTERM")));

    // Signal via the kill request, reaching the whole process group: the
    // background sleep must die too.
    let mut s = a.client.exec(sh("sleep 30 & echo bg $!; wait")).await.unwrap();
    let line = read_until(&mut s, "\n").await;
    let bg: i32 = line.trim().strip_prefix("bg ").unwrap().parse().unwrap();
    a.client.kill(s.id(), "SIGTERM").await.unwrap();
    let out = collect(s).await;
    assert_eq!(out.exit.unwrap().exit_code, 143);
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new(&format!("/proc/{bg}")).exists() {
        assert!(
            Instant::now() < deadline,
            "background process {bg} survived the group signal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // INT by name through the session connection. Signal only once the
    // shell has become `sleep`: a shell that gets SIGINT just before its
    // `exec` may swallow it, and `sleep` would then run its full 30 s.
    let mut s = a.client.exec(sh("echo pid $$; exec sleep 30")).await.unwrap();
    let line = read_until(&mut s, "\n").await;
    let pid: i32 = line.trim().strip_prefix("pid ").unwrap().parse().unwrap();
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        != "sleep"
    {
        assert!(Instant::now() < deadline, "the shell never became sleep");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.signal("INT").await.unwrap();
    let exit = collect(s).await.exit.unwrap();
    assert_eq!((exit.exit_code, exit.signal.as_deref()), (130, Some("SIGINT")));

    // kill_and_wait escalates to SIGKILL for a command ignoring SIGTERM.
    let mut s = a
        .client
        .exec(sh("trap '' TERM; echo ready; while :; do sleep 1; done"))
        .await
        .unwrap();
    read_until(&mut s, "ready").await;
    let exit = a
        .client
        .kill_and_wait(s.id(), "TERM", Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.exit_code, 137);
    assert_eq!(collect(s).await.exit.unwrap().exit_code, 137);

    let err = a.client.kill("999999999", "TERM").await.unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");
    a.shutdown().await;
}

#[tokio::test]
async fn spawn_failure_is_reported() {
    let a = agent().await;
    let err = a.client.exec(req(&["/nonexistent/binary"])).await.err().unwrap();
    assert!(err.to_string().contains("spawn_failed"), "{err}");
    a.shutdown().await;
}

#[tokio::test]
async fn tty_mode_and_resize() {
    let a = agent().await;
    let mut s = a
        .client
        .exec(ExecRequest {
            tty: true,
            cols: Some(91),
            rows: Some(33),
            ..sh("stty size; tty >/dev/null && echo is-a-tty; read x; stty size")
        })
        .await
        .unwrap();
    assert!(s.info.tty && s.info.is_owner);
    assert_eq!((s.info.cols, s.info.rows), (91, 33));
    let head = read_until(&mut s, "is-a-tty").await;
    assert!(head.contains("33 91"), "{head:?}");
    s.resize(120, 40).await.unwrap();
    s.send_stdin(b"go\n").await.unwrap();
    let out = collect(s).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("40 120"),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.exit.unwrap().exit_code, 0);
    a.shutdown().await;
}

#[tokio::test]
async fn tty_fast_output_not_lost() {
    let a = agent().await;
    for _ in 0..50 {
        let out = collect(
            a.client
                .exec(ExecRequest {
                    tty: true,
                    ..req(&["echo", "hi"])
                })
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(out.stdout, b"hi\r\n");
        assert_eq!(out.exit.unwrap().exit_code, 0);
    }
    a.shutdown().await;
}

#[tokio::test]
async fn max_run_time_times_out() {
    let a = agent().await;
    let started = Instant::now();
    let s = a
        .client
        .exec(ExecRequest {
            timeout_ms: Some(300),
            ..req(&["sleep", "30"])
        })
        .await
        .unwrap();
    let exit = collect(s).await.exit.unwrap();
    assert_eq!((exit.exit_code, exit.timed_out), (143, true));
    assert!(started.elapsed() < Duration::from_secs(10));

    // A command ignoring SIGTERM gets SIGKILL after the grace period.
    let s = a
        .client
        .exec(ExecRequest {
            timeout_ms: Some(200),
            kill_grace_ms: Some(300),
            ..sh("trap '' TERM; sleep 30")
        })
        .await
        .unwrap();
    let exit = collect(s).await.exit.unwrap();
    assert_eq!((exit.exit_code, exit.timed_out), (137, true));

    let out = collect(
        a.client
            .exec(ExecRequest {
                timeout_ms: Some(10_000),
                ..req(&["true"])
            })
            .await
            .unwrap(),
    )
    .await;
    assert!(!out.exit.unwrap().timed_out);
    a.shutdown().await;
}

/// Processes whose argv is exactly `sleep <arg>`.
fn sleeps_with(arg: &str) -> Vec<i32> {
    let want = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes())
                && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
                })
        })
        .collect()
}

/// A timed-out command's whole tree dies, also what left its session and
/// process group (setsid), was double-forked away, or ignores SIGTERM.
#[tokio::test]
async fn timeout_kills_the_whole_tree_including_setsid_children() {
    let a = agent().await;
    // A sleep length no other test uses marks this test's processes.
    let mark = (900_000 + std::process::id() % 99_999).to_string();
    let script = format!(
        "setsid sleep {mark} & setsid sh -c 'sleep {mark}' & (setsid sleep {mark} &); \
         setsid sh -c \"trap '' TERM; sleep {mark}\" & sleep {mark}"
    );
    let s = a
        .client
        .exec(ExecRequest {
            timeout_ms: Some(1000),
            kill_grace_ms: Some(300),
            ..sh(&script)
        })
        .await
        .unwrap();
    let exit = collect(s).await.exit.unwrap();
    assert!(exit.timed_out, "{exit:?}");
    let t0 = Instant::now();
    loop {
        let left = sleeps_with(&mark);
        if left.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            for pid in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            panic!("sleeps of the timed-out command survived: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
}

#[tokio::test]
async fn detach_and_reattach_replays_scrollback() {
    let a = agent().await;
    let mut s = a
        .client
        .exec(ExecRequest {
            stdin: true,
            max_run_after_disconnect_ms: Some(0),
            ..sh("echo first; read x; echo second $x")
        })
        .await
        .unwrap();
    let id = s.id().to_owned();
    read_until(&mut s, "first").await;
    s.detach();

    let listed = a.client.list_sessions().await.unwrap();
    assert!(listed.iter().any(|l| l.id == id && !l.tty), "{listed:?}");

    let mut s = a.client.attach(&id).await.unwrap();
    assert_eq!(s.info.session_id, id);
    assert!(!s.info.is_owner);
    read_until(&mut s, "first").await;
    s.send_stdin(b"again\n").await.unwrap();
    let out = collect(s).await;
    assert_eq!(out.stdout, b"second again\n");
    assert_eq!(out.exit.unwrap().exit_code, 0);

    let err = a.client.attach(&id).await.err().unwrap();
    assert!(err.to_string().contains("not_found"));
    a.shutdown().await;
}

#[tokio::test]
async fn two_attachers_both_see_output() {
    let a = agent().await;
    let mut owner = a
        .client
        .exec(ExecRequest {
            stdin: true,
            ..sh("echo start; read x; echo got $x")
        })
        .await
        .unwrap();
    read_until(&mut owner, "start").await;
    let mut second = a.client.attach(owner.id()).await.unwrap();
    read_until(&mut second, "start").await;
    owner.send_stdin(b"y\n").await.unwrap();
    let (o1, o2) = tokio::join!(collect(owner), collect(second));
    assert_eq!(o1.stdout, b"got y\n");
    assert_eq!(o2.stdout, b"got y\n");
    assert_eq!(o1.exit, o2.exit);
    a.shutdown().await;
}

#[tokio::test]
async fn non_tty_killed_after_disconnect_timeout() {
    let a = agent().await;
    let s = a
        .client
        .exec(ExecRequest {
            max_run_after_disconnect_ms: Some(300),
            ..req(&["sleep", "30"])
        })
        .await
        .unwrap();
    let id = s.id().to_owned();
    s.detach();
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = a.client.list_sessions().await.unwrap();
        if !listed.iter().any(|l| l.id == id) {
            break;
        }
        assert!(Instant::now() < deadline, "session {id} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.shutdown().await;
}

#[tokio::test]
async fn default_env_and_cwd() {
    let a = agent().await;
    let out = collect(
        a.client
            .exec(sh("pwd; echo $LANG; echo ${TERM:-none}"))
            .await
            .unwrap(),
    )
    .await;
    let text = String::from_utf8(out.stdout).unwrap();
    let cwd = a.dir.path().canonicalize().unwrap();
    assert_eq!(text, format!("{}\nC.UTF-8\nnone\n", cwd.display()));

    let env = [("FOO".to_string(), "bar".to_string())].into_iter().collect();
    let out = collect(
        a.client
            .exec(ExecRequest {
                env: Some(env),
                cwd: Some("/tmp".into()),
                ..req(&["/usr/bin/env"])
            })
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(out.stdout, b"FOO=bar\n");

    let err = a
        .client
        .exec(ExecRequest {
            cwd: Some("/does/not/exist".into()),
            ..req(&["true"])
        })
        .await
        .err();
    assert!(err.unwrap().to_string().contains("bad_request"));
    a.shutdown().await;

    if nix::unistd::geteuid().is_root() {
        // An image without the default user still runs commands, as root.
        let a = agent_with(|c| c.default_user = "no-such-sprite-user".into()).await;
        let out = collect(a.client.exec(sh("id -u; echo $HOME")).await.unwrap()).await;
        assert_eq!(out.stdout, b"0\n/root\n");
        a.shutdown().await;
    }
}

#[tokio::test]
async fn runs_as_other_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    let group = files.path().join("group");
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(&group, "root:x:0:\nnogroup:x:65534:\nextra:x:4242:nobody\n").unwrap();
    let a = agent_with(|c| {
        c.passwd_path = passwd.clone();
        c.group_path = group.clone();
    })
    .await;
    let out = collect(
        a.client
            .exec(ExecRequest {
                user: Some("nobody".into()),
                ..sh("id -u; id -g; id -G; echo $HOME $USER")
            })
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "65534\n65534\n65534 4242\n/nonexistent nobody\n"
    );
    let err = a
        .client
        .exec(ExecRequest {
            user: Some("ghost".into()),
            ..req(&["true"])
        })
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("bad_request"), "{err}");
    a.shutdown().await;
}

#[tokio::test]
async fn port_opened_and_closed() {
    if !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("skipping: /usr/bin/python3 missing");
        return;
    }
    let a = agent().await;
    let mut subscription = a.client.subscribe_ports().await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let mut s = a
        .client
        .exec(req(&[
            "/usr/bin/python3",
            "-m",
            "http.server",
            &port_s,
            "--bind",
            "127.0.0.1",
        ]))
        .await
        .unwrap();
    let pid: i32 = s.id().parse().unwrap();
    let opened = loop {
        match next(&mut s).await {
            Some(Event::PortOpened(p)) if p.port == port => break p,
            Some(Event::Stdout(_) | Event::Stderr(_) | Event::PortOpened(_) | Event::PortClosed(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(
        (opened.address.as_str(), opened.pid, opened.session.as_deref()),
        ("127.0.0.1", pid, Some(s.id()))
    );
    s.signal("KILL").await.unwrap();
    let out = collect(s).await;
    assert_eq!(out.exit.unwrap().exit_code, 137);
    let mut saw_open = false;
    loop {
        match tokio::time::timeout(WAIT, subscription.recv())
            .await
            .expect("no port_closed")
        {
            Some(Event::PortOpened(p)) if p.port == port => saw_open = true,
            Some(Event::PortClosed(p)) if p.port == port => {
                assert_eq!(p.pid, pid);
                break;
            }
            Some(_) => {}
            None => panic!("subscription ended"),
        }
    }
    assert!(saw_open);
    a.shutdown().await;
}

#[tokio::test]
async fn shutdown_terminates_sessions() {
    let a = agent().await;
    let mut s = a
        .client
        .exec(ExecRequest {
            tty: true,
            ..sh("echo up; sleep 30")
        })
        .await
        .unwrap();
    read_until(&mut s, "up").await;
    let started = Instant::now();
    let shut = tokio::spawn(a.shutdown());
    let out = collect(s).await;
    assert_eq!(out.exit.unwrap().exit_code, 143);
    shut.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_latency_true() {
    let a = agent().await;
    let mut samples = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let out = collect(a.client.exec(req(&["true"])).await.unwrap()).await;
        assert_eq!(out.exit.unwrap().exit_code, 0);
        samples.push(t.elapsed());
    }
    samples.sort();
    eprintln!(
        "exec round trip for `true`: median {:?}, p90 {:?}, max {:?}",
        samples[50], samples[90], samples[99]
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_attacher_does_not_block_others() {
    let a = agent().await;
    let mut owner = a
        .client
        .exec(ExecRequest {
            stdin: true,
            ..sh("read x; head -c 150000000 /dev/zero; echo done >&2")
        })
        .await
        .unwrap();
    // Attached but never read from: the agent must drop it, not buffer
    // everything for it or stall the command.
    let stalled = a.client.attach(owner.id()).await.unwrap();
    owner.send_stdin(b"go\n").await.unwrap();
    let mut total = 0usize;
    let mut stderr = Vec::new();
    let exit = loop {
        match next(&mut owner).await {
            Some(Event::Stdout(b)) => total += b.len(),
            Some(Event::Stderr(b)) => stderr.extend_from_slice(&b),
            Some(Event::Exit(e)) => break e,
            Some(_) => {}
            None => panic!("connection closed before exit"),
        }
    };
    assert_eq!(
        (total, stderr.as_slice(), exit.exit_code),
        (150_000_000, &b"done\n"[..], 0)
    );
    // It was disconnected mid-stream, so it never sees the exit.
    let late = collect(stalled).await;
    assert!(late.exit.is_none());
    assert!(late.stdout.len() < 150_000_000);
    a.shutdown().await;
}
