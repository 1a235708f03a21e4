//! Cluster mode end to end: three `den server` nodes, each in its own network
//! namespace as a separate host, over one PostgreSQL and one SeaweedFS S3
//! started by the test. Clients are the `den` CLI from the root namespace.
//!
//! One test walks through the scenarios in order, since setting the cluster
//! up is the expensive part:
//! 1. create through node a (placed by region), exec through b; a request
//!    that only claims to be forwarded by a node is served as a client's,
//!    one with a proof made with the secret the nodes stored is a node's;
//! 2. checkpoint on a, `kill -9` a, exec through c claims the sprite with
//!    every synced byte, restoring the checkpoint on c is byte-identical;
//! 3. concurrent requests through all three nodes never run the sprite on
//!    two hosts (a counter under a lock inside the sprite loses nothing);
//! 4. PostgreSQL restarted: nodes recover by themselves; S3 down for 30 s:
//!    the sprite keeps running from cache and uploads catch up;
//! 5. drain a node: its sprites move and keep their data;
//! 6. the owner's cable is pulled: another node claims the sprite; when the
//!    old owner is back it finds the lease moved, stops its stale copy and
//!    forwards instead of serving it;
//! 7. a gVisor sprite on a drained node goes cold with its processes and
//!    wakes on another node with them running.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use den_cluster::PeerKey;
use den_testkit::SeaweedS3;
use den_testkit::cluster::{DenNode, Hosts, NodeOptions, http_with};
use den_testkit::postgres::TestPostgres;
use serde_json::{Value, json};

const DEN: &str = env!("CARGO_BIN_EXE_den");
const NAMES: [&str; 3] = ["a", "b", "c"];
const REGIONS: [&str; 3] = ["eu", "us", "us"];
/// How long a dead node keeps its sprites before others may claim them.
const NODE_TTL: &str = "3s";
/// Longest any polled condition may take.
const PATIENCE: Duration = Duration::from_secs(90);

/// Fields drop in order: the nodes before the servers and hosts they use.
struct Cluster {
    nodes: Vec<DenNode>,
    s3: SeaweedS3,
    pg: TestPostgres,
    _hosts: Hosts,
    token: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        den_testkit::require_root();
        let dir = tempfile::Builder::new()
            .prefix("den-cluster-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let hosts = Hosts::create(3).expect("hosts");
        let mut pg = TestPostgres::start().expect("postgres");
        pg.listen_on_all().expect("postgres on the bridge");
        let s3 = SeaweedS3::start_on(hosts.host_ip()).expect("seaweedfs");
        let db = pg.url_via(&hosts.host_ip().to_string());
        let store = format!(
            "s3://{}?endpoint={}&region={}",
            s3.bucket(),
            s3.endpoint(),
            s3.region()
        );
        let mut nodes = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let mut o = NodeOptions::new(DEN, dir.path().join(name));
            o.extra_args = [
                "--cluster-db",
                &db,
                "--object-store",
                &store,
                "--node-name",
                name,
                "--region",
                REGIONS[i],
                "--advertise-url",
                &format!("http://{}:{}", hosts.ip(i), o.port),
                "--durability-window",
                "1s",
                "--node-ttl",
                NODE_TTL,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            o.env = vec![
                ("AWS_ACCESS_KEY_ID".into(), s3.access_key().into()),
                ("AWS_SECRET_ACCESS_KEY".into(), s3.secret_key().into()),
            ];
            nodes.push(DenNode::start(&hosts, i, &o).unwrap_or_else(|e| panic!("node {name}: {e:#}")));
        }
        // One admin token for the whole cluster, minted by the first node.
        let token = nodes[0]
            .admin_token()
            .expect("the first node writes the admin token");
        Cluster {
            nodes,
            s3,
            pg,
            _hosts: hosts,
            token,
            _dir: dir,
        }
    }

    fn node(&self, name: &str) -> usize {
        NAMES.iter().position(|n| *n == name).expect("node name")
    }

    fn den(&self, via: &str, args: &[&str]) -> Output {
        let url = self.nodes[self.node(via)].url();
        Command::new(DEN)
            .args(args)
            .env("DEN_API_URL", url)
            .env("DEN_TOKEN", &self.token)
            .env("HOME", self._dir.path())
            .env_remove("DEN_CONFIG")
            .output()
            .expect("running den")
    }

    /// `den exec` through node `via`; stdout on success.
    fn exec(&self, via: &str, sprite: &str, script: &str) -> Result<String, String> {
        let out = self.den(via, &["exec", "-s", sprite, "--", "sh", "-c", script]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "exit {:?}: {}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn exec_ok(&self, via: &str, sprite: &str, script: &str) -> String {
        self.exec(via, sprite, script)
            .unwrap_or_else(|e| panic!("exec via {via}: {script}: {e}\n{}", self.logs()))
    }

    /// Exec until it succeeds (a node that just died is still named as the
    /// owner until its heartbeat is older than the TTL).
    fn exec_eventually(&self, via: &str, sprite: &str, script: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.exec(via, sprite, script) {
                Ok(out) => return out,
                Err(e) if Instant::now() > deadline => {
                    panic!("exec via {via} never succeeded: {e}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn api(&self, via: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut args = vec!["api", "-X", method, path];
        let b = body.map(|b| b.to_string());
        if let Some(b) = &b {
            args.extend(["-d", b.as_str()]);
        }
        let out = self.den(via, &args);
        assert!(
            out.status.success(),
            "den api {method} {path} via {via}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or(Value::String(text.into_owned()))
    }

    fn sprite(&self, via: &str, name: &str) -> Value {
        self.api(via, "GET", &format!("/v1/sprites/{name}"), None)
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- node {} log:\n{}", NAMES[i], n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait until the sprite's writes up to `since_ms` are in the object
    /// store (its owner reports a sync point taken after that moment).
    fn wait_durable(&self, via: &str, sprite: &str, since_ms: i64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.sprite(via, sprite);
            let d = &s["durability"];
            let at = d["durable_at_ms"].as_i64().unwrap_or(0);
            if d["fully_durable"] == json!(true) || at > since_ms {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never durable after {since_ms}: {s}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const WRITE: &str = "echo hello > /home/sprite/x && dd if=/dev/urandom of=/home/sprite/f bs=64k count=64 2>/dev/null && sync && sha256sum /home/sprite/f";
/// A counter under a lock (mkdir is atomic; busybox has no flock): two hosts
/// running the sprite from two copies of its disk would lose increments.
const COUNT: &str = "until mkdir /home/sprite/lock 2>/dev/null; do :; done; n=$(cat /home/sprite/n 2>/dev/null || echo 0); echo $((n+1)) > /home/sprite/n; rmdir /home/sprite/lock; echo $n";

#[test]
fn cluster_end_to_end() {
    let mut c = Cluster::start();

    // -- 1. placed by region through a; exec through b -----------------
    let s = c.api(
        "a",
        "POST",
        "/v1/sprites",
        Some(json!({"name": "s1", "config": {"region": "eu"}})),
    );
    assert_eq!(s["name"], "s1", "{s}");
    let seen = c.sprite("b", "s1");
    assert_eq!(
        (seen["node"].as_str(), seen["region"].as_str()),
        (Some("a"), Some("eu")),
        "{seen}"
    );
    let sum_f = c.exec_ok("a", "s1", WRITE);
    let out = c.exec_ok("b", "s1", "cat /home/sprite/x; sha256sum /home/sprite/f");
    assert_eq!(out, format!("hello\n{sum_f}"));
    // A region without nodes is refused; `us` goes to b or c.
    let out = c.den(
        "a",
        &[
            "api",
            "-X",
            "POST",
            "/v1/sprites",
            "-d",
            r#"{"name":"nowhere","config":{"region":"mars"}}"#,
        ],
    );
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("region"));
    let us = c.api(
        "a",
        "POST",
        "/v1/sprites",
        Some(json!({"name": "s2", "config": {"region": "us"}})),
    );
    let us_node = c.sprite("a", "s2")["node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(us_node == "b" || us_node == "c", "{us} placed on {us_node:?}");
    c.exec_ok("a", "s2", "echo two > /home/sprite/two");
    // `den ls` says where each sprite runs.
    let ls = c.den("c", &["ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.contains("a (eu)") && ls.contains(&format!("{us_node} (us)")),
        "{ls}"
    );

    // A claimed forward (no proof) to b, which does not own s1: forwarded
    // to a like any client request, not answered `sprite_moved`; a drain
    // of an unknown node is looked up, not answered `node_moved`.
    let b_url = c.nodes[c.node("b")].url();
    let claim = [("x-den-forwarded-by", "a")];
    let s1 = format!("{b_url}/v1/sprites/s1");
    let r = http_with(None, "GET", &s1, &claim, Some(&c.token), None).unwrap();
    assert_eq!(r.status, 200, "a claimed forward was not forwarded: {}", r.body);
    let drain = format!("{b_url}/v1/nodes/nope/drain");
    let r = http_with(None, "POST", &drain, &claim, Some(&c.token), None).unwrap();
    assert_eq!(r.status, 404, "a claimed forward of a drain: {}", r.body);
    assert!(
        c.nodes[c.node("b")].log_tail().contains("does not prove it"),
        "the refused claim is not logged:\n{}",
        c.logs()
    );
    // With the secret the first node stored, the same request is a node's:
    // never forwarded a second time.
    let hex =
        c.pg.psql("SELECT encode(secret, 'hex') FROM cluster_secret")
            .unwrap();
    let secret: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(secret.len(), 32, "{hex}");
    let proof = PeerKey::from_secret(&secret).prove("a", "GET", "/v1/sprites/s1", None);
    let proven = [("x-den-forwarded-by", "a"), ("x-den-peer", proof.as_str())];
    let r = http_with(None, "GET", &s1, &proven, Some(&c.token), None).unwrap();
    assert!(
        r.status == 503 && r.body.contains("sprite_moved"),
        "{} {}",
        r.status,
        r.body
    );

    // -- 2. checkpoint on a, kill -9 a, claim on c ----------------------
    let out = c.den("a", &["checkpoint", "create", "-s", "s1", "--comment", "before"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sum_g = c.exec_ok(
        "a",
        "s1",
        "dd if=/dev/urandom of=/home/sprite/g bs=64k count=16 2>/dev/null && sync && sha256sum /home/sprite/g",
    );
    let t = now_ms();
    c.wait_durable("a", "s1", t);
    let a = c.node("a");
    c.nodes[a].kill9().unwrap();
    let out = c.exec_eventually(
        "c",
        "s1",
        "cat /home/sprite/x; sha256sum /home/sprite/f /home/sprite/g",
    );
    assert_eq!(out, format!("hello\n{sum_f}{sum_g}"));
    assert_eq!(c.sprite("c", "s1")["node"], "c");
    let out = c.den("c", &["restore", "-s", "s1", "v1"]);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.exec_eventually(
        "c",
        "s1",
        "cat /home/sprite/x; sha256sum /home/sprite/f; ls /home/sprite/g 2>&1 || true",
    );
    assert!(out.starts_with(&format!("hello\n{sum_f}")), "{out}");
    assert!(
        out.contains("No such file"),
        "g came back after restoring v1: {out}"
    );

    // -- 3. concurrent requests through every node: one host only ------
    c.nodes[a].restart().unwrap();
    let per_node = 6;
    let results: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = NAMES
            .iter()
            .flat_map(|via| {
                let c = &c;
                (0..per_node).map(move |_| sc.spawn(move || c.exec_eventually(via, "s1", COUNT)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen: Vec<i64> = results.iter().map(|r| r.trim().parse().unwrap()).collect();
    seen.sort();
    let want: Vec<i64> = (0..(NAMES.len() * per_node) as i64).collect();
    assert_eq!(
        seen, want,
        "a counter under a lock lost or repeated increments: two hosts ran s1"
    );
    let nodes = c.api("b", "GET", "/v1/nodes", None);
    let running_on: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["alive"] == json!(true))
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(running_on.len(), 3, "{nodes}");

    // -- 4. PostgreSQL restart, S3 outage --------------------------------
    c.pg.restart().unwrap();
    for via in NAMES {
        assert_eq!(c.exec_eventually(via, "s1", "cat /home/sprite/x"), "hello\n");
    }
    c.s3.stop().unwrap();
    let outage = Instant::now();
    let mut writes = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        c.exec_ok("b", "s1", &format!("echo {writes} >> /home/sprite/during && dd if=/dev/urandom of=/home/sprite/d{writes} bs=64k count=4 2>/dev/null"));
        writes += 1;
    }
    let during = c.exec_ok("c", "s1", "wc -l < /home/sprite/during");
    assert_eq!(during.trim(), writes.to_string());
    c.s3.restart().unwrap();
    let t = now_ms();
    c.exec_ok("b", "s1", "sync");
    c.wait_durable("b", "s1", t);

    // -- 5. drain the owner ---------------------------------------------
    let owner = c.sprite("a", "s1")["node"].as_str().unwrap().to_string();
    let out = c.den("a", &["node", "drain", &owner]);
    assert!(
        out.status.success(),
        "drain: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.exec_eventually(&owner, "s1", "cat /home/sprite/x; wc -l < /home/sprite/during");
    assert_eq!(out, format!("hello\n{writes}\n"));
    let now_on = c.sprite("a", "s1")["node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !now_on.is_empty() && now_on != owner,
        "s1 still on the drained node {owner}"
    );
    let nodes = c.api("a", "GET", "/v1/nodes", None);
    let drained = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == owner.as_str())
        .unwrap()
        .clone();
    assert_eq!(drained["state"], "drained", "{nodes}");

    // -- 6. a partitioned owner is fenced and gives the sprite up ---------
    let x = now_on;
    let y = NAMES
        .iter()
        .find(|n| **n != x && **n != owner)
        .unwrap()
        .to_string();
    c.exec_ok(&x, "s1", "echo before > /home/sprite/p");
    c.wait_durable(&x, "s1", now_ms());
    let xi = c.node(&x);
    c._hosts.cut(xi).unwrap();
    // Through y: the owner is unreachable, then dead by the TTL; y claims.
    let out = c.exec_eventually(&y, "s1", "cat /home/sprite/p; echo after > /home/sprite/q; sync");
    assert_eq!(out, "before\n");
    assert_eq!(c.sprite(&y, "s1")["node"], y.as_str());
    c._hosts.heal(xi).unwrap();
    // Back in touch, x finds the lease moved and stops its stale copy …
    let deadline = Instant::now() + PATIENCE;
    while !c.nodes[xi]
        .log_tail()
        .contains("another node owns this sprite now")
    {
        assert!(
            Instant::now() < deadline,
            "x never dropped its stale copy:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // … and from then on forwards to y instead of serving what it had.
    let out = c.exec_eventually(&x, "s1", "cat /home/sprite/p /home/sprite/q");
    assert_eq!(out, "before\nafter\n");
    assert_eq!(c.sprite(&x, "s1")["node"], y.as_str());

    // -- 7. a gVisor sprite moves with its processes -----------------------
    // Drained, its node puts it to sleep cold, memory saved into the
    // object store; the node that takes it over restores the processes.
    c.api(
        &y,
        "POST",
        "/v1/sprites",
        Some(json!({"name": "g1", "config": {"runtime": "gvisor"}})),
    );
    let from = c.sprite(&y, "g1")["node"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(from == x || from == y, "g1 placed on {from:?}");
    c.exec_ok(
        &from,
        "g1",
        "(i=0; while :; do i=$((i+1)); echo $i > /home/sprite/count.new; mv /home/sprite/count.new /home/sprite/count; sleep 0.02; done) >/dev/null 2>&1 &
         while [ ! -s /home/sprite/count ]; do sleep 0.01; done",
    );
    let out = c.den(&from, &["node", "drain", &from]);
    assert!(
        out.status.success(),
        "drain: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let to = if from == x { y.clone() } else { x.clone() };
    let count = |via: &str| -> u64 {
        c.exec_eventually(via, "g1", "cat /home/sprite/count")
            .trim()
            .parse()
            .unwrap()
    };
    let first = count(&to);
    assert_eq!(c.sprite(&to, "g1")["node"], to.as_str());
    // A fresh boot would run no counter: it goes on from where it was.
    let deadline = Instant::now() + PATIENCE;
    while count(&to) <= first {
        assert!(
            Instant::now() < deadline,
            "g1's counter stays at {first} on {to}: its processes did not move\n{}",
            c.logs()
        );
    }

    for n in &mut c.nodes {
        n.stop().unwrap();
    }
}
