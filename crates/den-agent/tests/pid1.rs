//! The agent as PID 1 of a fresh pid namespace: orphans get reaped and
//! SIGTERM shuts sessions down.
//!
//! The test binary re-executes itself under `unshare --pid --fork` and runs
//! only `pid1_agent_entry` there, which serves the agent until SIGTERM.

use std::time::{Duration, Instant};

use den_agent::client::{Client, ExecRequest, Output};

const SOCKET_ENV: &str = "DEN_AGENT_PID1_SOCKET";

/// Runs the agent when started by `reaps_orphans_as_pid1`; a no-op otherwise.
#[test]
fn pid1_agent_entry() {
    let Ok(socket) = std::env::var(SOCKET_ENV) else {
        return;
    };
    assert_eq!(std::process::id(), 1, "entry must run as PID 1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = den_agent::AgentConfig::new(socket);
    cfg.default_user = "0".into();
    cfg.default_cwd = "/".into();
    rt.block_on(den_agent::run(cfg)).unwrap();
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn run(client: &Client, script: &str) -> Output {
    let s = client.exec(sh(script)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), s.collect())
        .await
        .unwrap()
}

#[tokio::test]
async fn reaps_orphans_as_pid1() {
    if std::env::var(SOCKET_ENV).is_ok() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root for a pid namespace");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut child = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(std::env::current_exe().unwrap())
        .args(["pid1_agent_entry", "--exact", "--nocapture"])
        .env(SOCKET_ENV, &socket)
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        if let Ok(c) = den_agent::client::connect(&socket).await {
            break c;
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        assert!(child.try_wait().unwrap().is_none(), "agent exited early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Our parent is the agent, PID 1.
    assert_eq!(run(&client, "echo $PPID").await.stdout, b"1\n");

    // The subshell is orphaned as soon as sh exits and becomes a zombie of
    // PID 1 once it exits itself; only the reaper makes it disappear.
    let out = run(&client, "(sleep 0.2; exit 3) & echo $!").await;
    let orphan = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run(
            &client,
            &format!("cat /proc/{orphan}/stat 2>/dev/null || echo gone"),
        )
        .await;
        let text = String::from_utf8(out.stdout).unwrap();
        if text.trim() == "gone" {
            break;
        }
        assert!(Instant::now() < deadline, "orphan {orphan} not reaped: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM to the agent is forwarded to sessions before it exits.
    let mut long = client
        .exec(ExecRequest {
            tty: true,
            ..sh("echo up; sleep 30")
        })
        .await
        .unwrap();
    loop {
        match long.recv().await {
            Some(den_agent::client::Event::Stdout(b)) if String::from_utf8_lossy(&b).contains("up") => break,
            Some(_) => {}
            None => panic!("session ended early"),
        }
    }
    let _ = run(&client, "kill -TERM 1").await;
    let out = tokio::time::timeout(Duration::from_secs(20), long.collect())
        .await
        .unwrap();
    assert_eq!(out.exit.unwrap().exit_code, 143);

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agent did not exit after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}
