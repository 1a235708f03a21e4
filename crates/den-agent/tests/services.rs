//! Services supervision against an in-process agent on a temp socket.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use den_agent::Error;
use den_agent::client::{
    Client, ServiceDef, ServiceEvent, ServiceEventStream, ServiceEventType, ServiceState, ServiceStatus,
};

/// An agent whose service logs go to `<tempdir>/logs`, with a restart
/// backoff of `backoff` and a 500 ms stop grace.
async fn svc_agent(backoff: Duration) -> TestAgent {
    agent_with(|c| {
        c.services_log_dir = log_dir_for(&c.socket);
        c.service_backoff_base = backoff;
        c.service_stop_grace = Duration::from_millis(500);
    })
    .await
}

fn log_dir_for(socket: &Path) -> PathBuf {
    socket.parent().unwrap().parent().unwrap().join("logs")
}

fn logs(a: &TestAgent) -> PathBuf {
    a.dir.path().join("logs")
}

/// `/bin/sh -c script` running in the test's temp dir.
fn svc(a: &TestAgent, name: &str, script: &str) -> ServiceDef {
    ServiceDef {
        name: name.into(),
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        dir: Some(a.dir.path().display().to_string()),
        ..Default::default()
    }
}

fn needs(mut d: ServiceDef, n: &[&str]) -> ServiceDef {
    d.needs = n.iter().map(|s| s.to_string()).collect();
    d
}

fn stopped(mut d: ServiceDef) -> ServiceDef {
    d.stopped = true;
    d
}

async fn status_of(c: &Client, name: &str) -> Option<ServiceStatus> {
    c.services_status()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
}

/// Polls the status until `pred` holds, failing after [`WAIT`].
async fn wait_status(c: &Client, name: &str, pred: impl Fn(&ServiceStatus) -> bool) -> ServiceStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status_of(c, name).await;
        if let Some(s) = &s
            && pred(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting on {name}; last status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Skips events until one matches, failing after [`WAIT`].
async fn event_where(es: &mut ServiceEventStream, pred: impl Fn(&ServiceEvent) -> bool) -> ServiceEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = es.recv().await.expect("event stream ended");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("timed out waiting for a service event")
}

async fn event_of(es: &mut ServiceEventStream, name: &str, kind: ServiceEventType) -> ServiceEvent {
    event_where(es, |e| e.name == name && e.kind == kind).await
}

async fn wait_gone(pid: i32) {
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn assert_bad_request(r: Result<(), Error>) {
    match r {
        Err(Error::Agent { code, .. }) => assert_eq!(code, "bad_request"),
        other => panic!("expected bad_request, got {other:?}"),
    }
}

fn running(s: &ServiceStatus) -> bool {
    s.status == ServiceState::Running
}

#[tokio::test]
async fn needs_decide_start_order() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut es = a.client.service_events(None).await.unwrap();
    // Listed dependents first, so declaration order cannot be what orders them.
    let defs = vec![
        needs(svc(&a, "c", "exec sleep 1000"), &["b", "a"]),
        needs(svc(&a, "b", "exec sleep 1000"), &["a"]),
        svc(&a, "a", "exec sleep 1000"),
    ];
    a.client.services_set(&defs).await.unwrap();
    let mut order = Vec::new();
    while order.len() < 3 {
        order.push(
            event_where(&mut es, |e| e.kind == ServiceEventType::Started)
                .await
                .name,
        );
    }
    assert_eq!(order, ["a", "b", "c"]);
    let st = a.client.services_status().await.unwrap();
    assert_eq!(
        st.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(st.iter().all(running), "{st:?}");
    let at = |n: usize| st[n].started_at.unwrap();
    assert!(at(0) <= at(1) && at(1) <= at(2), "{st:?}");

    // A dependent of a stopped service waits, without a process, and starts
    // right after its need does.
    let defs = vec![
        needs(svc(&a, "y", "exec sleep 1000"), &["x"]),
        stopped(svc(&a, "x", "exec sleep 1000")),
    ];
    a.client.services_set(&defs).await.unwrap();
    let y = status_of(&a.client, "y").await.unwrap();
    assert_eq!((y.status, y.pid), (ServiceState::Starting, None));
    assert_eq!(
        status_of(&a.client, "x").await.unwrap().status,
        ServiceState::Stopped
    );
    assert!(status_of(&a.client, "a").await.is_none(), "a was removed");
    let defs = vec![
        needs(svc(&a, "y", "exec sleep 1000"), &["x"]),
        svc(&a, "x", "exec sleep 1000"),
    ];
    a.client.services_set(&defs).await.unwrap();
    // The answer waits for the unchanged dependent too, now that its need runs.
    let st = a.client.services_status().await.unwrap();
    assert!(st.iter().all(running), "{st:?}");
    let first = event_where(&mut es, |e| e.kind == ServiceEventType::Started).await;
    let second = event_where(&mut es, |e| e.kind == ServiceEventType::Started).await;
    assert_eq!((first.name.as_str(), second.name.as_str()), ("x", "y"));
    a.shutdown().await;
}

#[tokio::test]
async fn crash_restarts_with_exponential_backoff() {
    // The production default base of 1 s, so the delays are the real ones.
    let a = svc_agent(Duration::from_secs(1)).await;
    let mut es = a.client.service_events(Some("crashy")).await.unwrap();
    a.client
        .services_set(&[svc(&a, "crashy", "echo run >> runs; exit 3")])
        .await
        .unwrap();
    let mut last_exit: Option<u64> = None;
    for (n, delay) in [(1u32, 1000u64), (2, 2000)] {
        let started = event_of(&mut es, "crashy", ServiceEventType::Started).await;
        if let Some(t) = last_exit {
            assert!(
                started.timestamp >= t + 990,
                "restarted {}ms after the exit",
                started.timestamp - t
            );
        }
        let exit = event_of(&mut es, "crashy", ServiceEventType::Exit).await;
        assert_eq!(exit.exit_code, Some(3));
        // The status is updated before the exit event goes out.
        let st = status_of(&a.client, "crashy").await.unwrap();
        assert_eq!(st.restart_count, n);
        assert_eq!(st.status, ServiceState::Starting);
        assert_eq!(st.pid, None);
        assert_eq!(st.error.as_deref(), Some("exited with code 3"));
        let next = st.next_restart_at.expect("next_restart_at while backing off");
        assert!(
            next <= exit.timestamp + delay && next + 250 >= exit.timestamp + delay,
            "restart {n}: next_restart_at {next} vs exit at {} + {delay}",
            exit.timestamp
        );
        last_exit = Some(exit.timestamp);
    }
    let restarted = event_of(&mut es, "crashy", ServiceEventType::Started).await;
    assert!(restarted.timestamp >= last_exit.unwrap() + 1990);
    a.shutdown().await;
}

#[tokio::test]
async fn kill_9_is_a_crash() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut es = a.client.service_events(Some("k")).await.unwrap();
    a.client
        .services_set(&[svc(&a, "k", "exec sleep 1000")])
        .await
        .unwrap();
    let first = wait_status(&a.client, "k", running).await;
    let pid = first.pid.unwrap();
    assert_eq!(first.restart_count, 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let exit = event_of(&mut es, "k", ServiceEventType::Exit).await;
    assert_eq!(exit.exit_code, Some(137));
    event_of(&mut es, "k", ServiceEventType::Started).await;
    let again = wait_status(&a.client, "k", running).await;
    assert_eq!(again.restart_count, 1);
    assert_ne!(again.pid, Some(pid));
    assert_eq!(again.next_restart_at, None);
    assert_eq!(again.error, None);

    // A signal through the agent that ends the process is a crash too.
    let pid = again.pid.unwrap();
    a.client.service_signal("k", "TERM").await.unwrap();
    assert_eq!(
        event_of(&mut es, "k", ServiceEventType::Exit).await.exit_code,
        Some(143)
    );
    let third = wait_status(&a.client, "k", |s| running(s) && s.pid != Some(pid)).await;
    assert_eq!(third.restart_count, 2);
    a.shutdown().await;
}

#[tokio::test]
async fn signal_reaches_the_service() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut es = a.client.service_events(Some("h")).await.unwrap();
    let script = "trap 'echo got-hup' HUP; echo ready; while :; do sleep 0.05; done";
    a.client.services_set(&[svc(&a, "h", script)]).await.unwrap();
    event_where(&mut es, |e| e.data.as_deref() == Some("ready")).await;
    a.client.service_signal("h", "HUP").await.unwrap();
    let ev = event_where(&mut es, |e| e.data.as_deref() == Some("got-hup")).await;
    assert_eq!(ev.kind, ServiceEventType::Stdout);
    assert_eq!(status_of(&a.client, "h").await.unwrap().restart_count, 0);

    let err = a.client.service_signal("nosuch", "HUP").await.unwrap_err();
    assert!(
        matches!(err, Error::Agent { ref code, .. } if code == "not_found"),
        "{err:?}"
    );
    assert_bad_request(a.client.service_signal("h", "BOGUS").await);
    a.client
        .services_set(&[stopped(svc(&a, "h", script))])
        .await
        .unwrap();
    let err = a.client.service_signal("h", "HUP").await.unwrap_err();
    assert!(
        matches!(err, Error::Agent { ref code, .. } if code == "not_running"),
        "{err:?}"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn sticky_stop() {
    let backoff = Duration::from_millis(200);
    let a = svc_agent(backoff).await;
    let mut es = a.client.service_events(Some("s")).await.unwrap();
    let def = svc(&a, "s", "exec sleep 1000");
    a.client.services_set(std::slice::from_ref(&def)).await.unwrap();
    let pid = wait_status(&a.client, "s", running).await.pid.unwrap();

    a.client.services_set(&[stopped(def.clone())]).await.unwrap();
    let st = status_of(&a.client, "s").await.unwrap();
    assert_eq!((st.status, st.pid), (ServiceState::Stopped, None));
    wait_gone(pid).await;
    event_of(&mut es, "s", ServiceEventType::Stopping).await;
    assert_eq!(
        event_of(&mut es, "s", ServiceEventType::Exit).await.exit_code,
        Some(143)
    );
    event_of(&mut es, "s", ServiceEventType::Stopped).await;

    // The same stopped definition in a later set, next to a new service,
    // leaves it stopped.
    let other = svc(&a, "other", "exec sleep 1000");
    a.client
        .services_set(&[stopped(def.clone()), other.clone()])
        .await
        .unwrap();
    wait_status(&a.client, "other", running).await;
    // Several backoff periods pass without a restart.
    let quiet = tokio::time::timeout(backoff * 5, es.recv()).await;
    assert!(quiet.is_err(), "stopped service produced {quiet:?}");
    assert_eq!(
        status_of(&a.client, "s").await.unwrap().status,
        ServiceState::Stopped
    );

    // Unsetting the flag starts it again.
    a.client
        .services_set(&[def.clone(), other.clone()])
        .await
        .unwrap();
    let st = wait_status(&a.client, "s", running).await;
    assert_ne!(st.pid, Some(pid));

    // A stop during the crash backoff cancels the pending restart.
    let crashy = svc(&a, "s", "exit 1");
    a.client
        .services_set(&[crashy.clone(), other.clone()])
        .await
        .unwrap();
    event_of(&mut es, "s", ServiceEventType::Exit).await;
    let mut es = a.client.service_events(Some("s")).await.unwrap();
    a.client.services_set(&[stopped(crashy), other]).await.unwrap();
    assert_eq!(
        status_of(&a.client, "s").await.unwrap().status,
        ServiceState::Stopped
    );
    let quiet = tokio::time::timeout(backoff * 10, event_of(&mut es, "s", ServiceEventType::Started)).await;
    assert!(quiet.is_err(), "restarted after a sticky stop: {quiet:?}");
    a.shutdown().await;
}

#[tokio::test]
async fn removal_stops_the_group_and_keeps_logs() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut es = a.client.service_events(Some("r")).await.unwrap();
    let script = "sleep 1000 & echo $! > bg; echo up; exec sleep 1000";
    a.client.services_set(&[svc(&a, "r", script)]).await.unwrap();
    event_where(&mut es, |e| e.data.as_deref() == Some("up")).await;
    let pid = status_of(&a.client, "r").await.unwrap().pid.unwrap();
    let bg: i32 = std::fs::read_to_string(a.dir.path().join("bg"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(bg));

    a.client.services_set(&[]).await.unwrap();
    assert!(a.client.services_status().await.unwrap().is_empty());
    wait_gone(pid).await;
    wait_gone(bg).await;
    event_of(&mut es, "r", ServiceEventType::Stopped).await;
    let log = std::fs::read_to_string(logs(&a).join("r.log")).unwrap();
    assert!(log.contains("[stdout] up"), "{log}");
    // Logs stay readable through the agent after removal.
    let tail = a
        .client
        .service_logs("r", None, false)
        .await
        .unwrap()
        .read_to_end()
        .await;
    assert_eq!(String::from_utf8(tail).unwrap(), log);

    // A service ignoring SIGTERM is killed after the grace.
    let stubborn = "trap '' TERM; echo up; while :; do sleep 0.05; done";
    a.client.services_set(&[svc(&a, "r", stubborn)]).await.unwrap();
    event_where(&mut es, |e| e.data.as_deref() == Some("up")).await;
    let pid = status_of(&a.client, "r").await.unwrap().pid.unwrap();
    let t = Instant::now();
    a.client.services_set(&[]).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(500), "{:?}", t.elapsed());
    assert_eq!(
        event_of(&mut es, "r", ServiceEventType::Exit).await.exit_code,
        Some(137)
    );
    wait_gone(pid).await;
    a.shutdown().await;
}

#[tokio::test]
async fn changed_definition_restarts_unchanged_keeps_running() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut def = svc(&a, "c", "echo \"x=$X\"; exec sleep 1000");
    def.env.insert("X".into(), "1".into());
    a.client.services_set(std::slice::from_ref(&def)).await.unwrap();
    let first = wait_status(&a.client, "c", running).await;
    a.client.services_set(std::slice::from_ref(&def)).await.unwrap();
    assert_eq!(status_of(&a.client, "c").await.unwrap().pid, first.pid);

    let mut es = a.client.service_events(Some("c")).await.unwrap();
    def.env.insert("X".into(), "2".into());
    a.client.services_set(std::slice::from_ref(&def)).await.unwrap();
    // Answered once the new process was spawned.
    let now = status_of(&a.client, "c").await.unwrap();
    assert!(running(&now) && now.pid != first.pid, "{now:?}");
    event_of(&mut es, "c", ServiceEventType::Stopped).await;
    event_of(&mut es, "c", ServiceEventType::Started).await;
    event_where(&mut es, |e| e.data.as_deref() == Some("x=2")).await;
    let second = wait_status(&a.client, "c", running).await;
    assert_ne!(second.pid, first.pid);
    assert_eq!(second.restart_count, 0);
    wait_gone(first.pid.unwrap()).await;
    a.shutdown().await;
}

#[tokio::test]
async fn environment_and_working_directory() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut es = a.client.service_events(None).await.unwrap();
    let mut d = svc(
        &a,
        "env",
        "echo \"cwd=$(pwd) foo=$FOO home=$HOME\"; exec sleep 1000",
    );
    d.env.insert("FOO".into(), "bar".into());
    let mut home = svc(&a, "home", "echo \"cwd=$(pwd) home=$HOME\"; exec sleep 1000");
    home.dir = None;
    // stdin is /dev/null: cat ends at once.
    let stdin = svc(&a, "stdin", "cat; echo cat-done; exec sleep 1000");
    a.client.services_set(&[d, home, stdin]).await.unwrap();
    // The three services' lines interleave in any order.
    let mut lines = std::collections::BTreeMap::new();
    while lines.len() < 3 {
        let ev = event_where(&mut es, |e| e.kind == ServiceEventType::Stdout).await;
        lines.insert(ev.name, ev.data.unwrap());
    }
    let user = den_agent::user::lookup("0", Path::new("/etc/passwd"), Path::new("/etc/group")).unwrap();
    let want = format!("cwd={} foo=bar home={}", a.dir.path().display(), user.home);
    assert_eq!(lines["env"], want);
    assert_eq!(lines["home"], format!("cwd={0} home={0}", user.home));
    assert_eq!(lines["stdin"], "cat-done");
    a.shutdown().await;
}

#[tokio::test]
async fn logs_format_tail_and_follow() {
    let a = svc_agent(Duration::from_millis(100)).await;
    nix::unistd::mkfifo(
        &a.dir.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let mut es = a.client.service_events(Some("l")).await.unwrap();
    let script = "echo one; echo two >&2; echo three; printf partial; exec cat fifo";
    a.client.services_set(&[svc(&a, "l", script)]).await.unwrap();
    // Three full lines; the unterminated one is only logged at EOF.
    for _ in 0..3 {
        event_where(&mut es, |e| {
            matches!(e.kind, ServiceEventType::Stdout | ServiceEventType::Stderr)
        })
        .await;
    }
    let dir = logs(&a);
    let full = std::fs::read_to_string(dir.join("l.log")).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines.len(), 3, "{full}");
    let mut out = Vec::new();
    let mut err = Vec::new();
    for l in &lines {
        let (ts, rest) = l.split_once(' ').unwrap();
        humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("{ts}: {e}"));
        assert!(ts.ends_with('Z'), "{ts}");
        match rest.split_once(' ').unwrap() {
            ("[stdout]", text) => out.push(text),
            ("[stderr]", text) => err.push(text),
            other => panic!("bad line {other:?}"),
        }
    }
    assert_eq!((out, err), (vec!["one", "three"], vec!["two"]));
    // "partial" may come in a later read than the lines before it.
    let deadline = Instant::now() + WAIT;
    loop {
        let raw = std::fs::read_to_string(dir.join("l.stdout.log")).unwrap();
        if raw == "one\nthree\npartial" {
            break;
        }
        assert!(Instant::now() < deadline, "raw stdout log is {raw:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("l.stderr.log")).unwrap(),
        "two\n"
    );

    // Tails.
    let read = |n: Option<usize>| {
        let c = a.client.clone();
        async move { String::from_utf8(c.service_logs("l", n, false).await.unwrap().read_to_end().await).unwrap() }
    };
    assert_eq!(read(None).await, full);
    assert_eq!(read(Some(2)).await, format!("{}\n{}\n", lines[1], lines[2]));
    assert_eq!(read(Some(0)).await, "");

    // Follow: the last line, then what is appended.
    let mut f = a.client.service_logs("l", Some(1), true).await.unwrap();
    let mut got = String::new();
    while !got.ends_with(&format!("{}\n", lines[2])) {
        let chunk = tokio::time::timeout(WAIT, f.recv()).await.unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(got, format!("{}\n", lines[2]));
    let fifo = a.dir.path().join("fifo");
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
        w.write_all(b"four\n").unwrap();
        w
    })
    .await
    .unwrap();
    while !got.contains("[stdout] partialfour\n") {
        let chunk = tokio::time::timeout(WAIT, f.recv()).await.unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(writer);
    drop(f);

    let err = a.client.service_logs("nosuch", None, false).await.err().unwrap();
    assert!(
        matches!(err, Error::Agent { ref code, .. } if code == "not_found"),
        "{err:?}"
    );
    a.shutdown().await;
}

#[tokio::test]
async fn events_stream_lifecycle_and_filter() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let mut mine = a.client.service_events(Some("e")).await.unwrap();
    let mut all = a.client.service_events(None).await.unwrap();
    let e = svc(&a, "e", "echo hello; exec sleep 1000");
    let f = svc(&a, "f", "echo from-f; exec sleep 1000");
    a.client.services_set(&[e.clone(), f.clone()]).await.unwrap();
    // Both have printed (in either order) before e is stopped.
    let mut printed = std::collections::BTreeSet::new();
    while printed.len() < 2 {
        printed.insert(
            event_where(&mut all, |ev| ev.kind == ServiceEventType::Stdout)
                .await
                .name,
        );
    }
    a.client.services_set(&[stopped(e), f]).await.unwrap();

    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, mine.recv()).await.unwrap().unwrap();
        assert_eq!(ev.name, "e", "filtered stream got {ev:?}");
        assert!(ev.timestamp > 0);
        let done = ev.kind == ServiceEventType::Stopped;
        seen.push((ev.kind, ev.data, ev.exit_code));
        if done {
            break;
        }
    }
    use ServiceEventType::*;
    assert_eq!(
        seen,
        vec![
            (Started, None, None),
            (Stdout, Some("hello".into()), None),
            (Stopping, None, None),
            (Exit, None, Some(143)),
            (Stopped, None, None),
        ]
    );
    a.shutdown().await;
}

#[tokio::test]
async fn bad_sets_change_nothing() {
    let a = svc_agent(Duration::from_millis(100)).await;
    let good = svc(&a, "good", "exec sleep 1000");
    a.client.services_set(std::slice::from_ref(&good)).await.unwrap();
    let before = wait_status(&a.client, "good", running).await;

    let cycle = vec![
        needs(svc(&a, "p", "true"), &["q"]),
        needs(svc(&a, "q", "true"), &["p"]),
        good.clone(),
    ];
    assert_bad_request(a.client.services_set(&cycle).await);
    assert_bad_request(
        a.client
            .services_set(&[needs(svc(&a, "p", "true"), &["p"])])
            .await,
    );
    assert_bad_request(
        a.client
            .services_set(&[needs(svc(&a, "p", "true"), &["missing"])])
            .await,
    );
    assert_bad_request(a.client.services_set(&[svc(&a, "bad/name", "true")]).await);
    assert_bad_request(a.client.services_set(&[svc(&a, "", "true")]).await);
    assert_bad_request(a.client.services_set(&[svc(&a, &"n".repeat(65), "true")]).await);
    let mut empty = svc(&a, "p", "");
    empty.cmd.clear();
    assert_bad_request(a.client.services_set(&[empty]).await);
    assert_bad_request(a.client.services_set(&[good.clone(), good.clone()]).await);

    assert_eq!(a.client.services_status().await.unwrap(), vec![before]);
    a.shutdown().await;
}

#[tokio::test]
async fn spawn_failure_is_failed_and_retried() {
    let a = svc_agent(Duration::from_millis(50)).await;
    let mut es = a.client.service_events(Some("nf")).await.unwrap();
    let def = ServiceDef {
        name: "nf".into(),
        cmd: "/nonexistent/command".into(),
        ..Default::default()
    };
    a.client.services_set(&[def]).await.unwrap();
    let ev = event_of(&mut es, "nf", ServiceEventType::Error).await;
    assert!(ev.data.unwrap().contains("/nonexistent/command"));
    let st = wait_status(&a.client, "nf", |s| s.restart_count >= 2).await;
    assert_eq!(st.status, ServiceState::Failed);
    assert!(st.error.unwrap().contains("No such file"));
    assert_eq!(st.pid, None);

    // A dependent of a failing service waits instead of starting.
    let a2 = ServiceDef {
        name: "dep".into(),
        cmd: "/bin/true".into(),
        needs: vec!["nf".into()],
        ..Default::default()
    };
    let nf = ServiceDef {
        name: "nf".into(),
        cmd: "/nonexistent/command".into(),
        ..Default::default()
    };
    a.client.services_set(&[a2, nf]).await.unwrap();
    assert_eq!(
        status_of(&a.client, "dep").await.unwrap().status,
        ServiceState::Starting
    );
    a.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_services() {
    let a = svc_agent(Duration::from_millis(100)).await;
    a.client
        .services_set(&[svc(&a, "down", "exec sleep 1000")])
        .await
        .unwrap();
    let pid = wait_status(&a.client, "down", running).await.pid.unwrap();
    a.shutdown().await;
    wait_gone(pid).await;
}
