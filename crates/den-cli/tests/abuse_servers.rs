//! Two real `den server` processes on one host (each in its own network
//! namespace, sharing the machine's mounts and the base image cache, as test
//! suites and benchmarks run them): one stopping with SIGTERM, or killed with
//! -9 and restarted, must never break the other. The measure is what the
//! other server's clients see: its sprites still boot and answer.
//!
//! Needs root.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use den_testkit::cluster::{DenNode, Hosts, NodeOptions};

const DEN: &str = env!("CARGO_BIN_EXE_den");

struct Pair {
    nodes: Vec<DenNode>,
    tokens: Vec<String>,
    _hosts: Hosts,
    dir: tempfile::TempDir,
}

impl Pair {
    fn start() -> Pair {
        den_testkit::require_root();
        let dir = tempfile::Builder::new()
            .prefix("den-abuse-servers-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let images = dir.path().join("images");
        let hosts = Hosts::create(2).expect("hosts");
        let mut nodes = Vec::new();
        let mut tokens = Vec::new();
        for (i, name) in ["a", "b"].iter().enumerate() {
            let mut o = NodeOptions::new(DEN, dir.path().join(name));
            // The host-wide image cache, shared like /var/cache/den/images.
            o.config_toml = format!("images_dir = {:?}\n", images.display().to_string());
            let node = DenNode::start(&hosts, i, &o).unwrap_or_else(|e| panic!("node {name}: {e:#}"));
            tokens.push(node.admin_token().expect("admin token"));
            nodes.push(node);
        }
        Pair {
            nodes,
            tokens,
            _hosts: hosts,
            dir,
        }
    }

    fn den(&self, i: usize, args: &[&str]) -> Output {
        Command::new(DEN)
            .args(args)
            .env("DEN_API_URL", self.nodes[i].url())
            .env("DEN_TOKEN", &self.tokens[i])
            .env("HOME", self.dir.path())
            .env_remove("DEN_CONFIG")
            .output()
            .expect("running den")
    }

    fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.den(i, args);
        assert!(
            out.status.success(),
            "den {args:?} via node {i}: {}{}\n--- node log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.nodes[i].log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn create(&self, i: usize, name: &str) {
        let body = format!("{{\"name\":\"{name}\"}}");
        self.ok(i, &["api", "-X", "POST", "/v1/sprites", "-d", &body]);
    }

    /// A new sprite on node `i` boots and answers; returns create → output.
    fn boots(&self, i: usize, name: &str) -> Duration {
        let t0 = Instant::now();
        self.create(i, name);
        let out = self.ok(i, &["exec", "-s", name, "--", "echo", "up"]);
        assert_eq!(out, "up\n");
        t0.elapsed()
    }
}

/// The issue's own reproduction: SIGTERM one server; the other used to fail
/// every boot with 500 "failed to prepare rootfs" (its idmapped image view,
/// in the shared cache, had been unmounted by the stopping server).
#[test]
fn abuse_stopping_or_killing_one_den_server_leaves_the_other_booting() {
    let mut p = Pair::start();
    p.boots(0, "a1");
    p.boots(1, "b1");

    let exit = p.nodes[0].stop_within(Duration::from_secs(60)).expect("stop a");
    assert!(
        exit.is_some_and(|s| s.success()),
        "a did not stop cleanly: {exit:?}"
    );
    let took = p.boots(1, "b2");
    println!("bystander: create → output after the other server's SIGTERM: {took:?}");

    // kill -9, restart (crash recovery), stop again.
    p.nodes[0].restart().expect("restart a");
    p.boots(0, "a2");
    p.nodes[0].kill9().expect("kill a");
    p.nodes[0].restart().expect("restart a after kill -9");
    p.ok(0, &["exec", "-s", "a2", "--", "true"]);
    p.nodes[0].stop_within(Duration::from_secs(60)).expect("stop a");
    let took = p.boots(1, "b3");
    println!("bystander: create → output after the other server's kill -9, recovery and stop: {took:?}");
    p.ok(1, &["exec", "-s", "b1", "--", "true"]);
}
