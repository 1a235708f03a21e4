//! The multi-host harness of den_testkit::cluster end to end: three hosts (network
//! namespaces on a bridge) reach one PostgreSQL and one SeaweedFS S3 run by the test in the
//! root namespace, run one `den server` each (single-node, no cluster flags), and reach each
//! other; a sprite runs inside a node's host; a node survives kill -9 and a restart; and
//! dropping everything leaves nothing behind. Run as root.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use den_testkit::SeaweedS3;
use den_testkit::cluster::{DenNode, Hosts, NodeOptions, http, leftovers_after_drop};
use den_testkit::postgres::TestPostgres;
use serde_json::Value;

const DEN: &str = env!("CARGO_BIN_EXE_den");
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

fn ok(mut c: Command) -> String {
    let dbg = format!("{c:?}");
    let o: Output = c.output().unwrap_or_else(|e| panic!("spawn {dbg}: {e}"));
    assert!(
        o.status.success(),
        "{dbg} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `signed` (a curl command from SeaweedS3::signed_curl) run inside host `i`.
fn curl_in(hosts: &Hosts, i: usize, signed: &Command) -> Command {
    let mut c = hosts.command(i, signed.get_program());
    c.args(signed.get_args());
    c
}

fn default_routes() -> String {
    ok({
        let mut c = Command::new("ip");
        c.args(["-4", "route", "show", "default"]);
        c
    })
}

/// Health (no token) and the sprite list (admin token) of `node`, asked from `netns`.
fn check_node_answers(node: &DenNode, netns: Option<&str>) {
    let token = node
        .admin_token()
        .expect("a single-node den writes an admin token");
    let r = http(netns, "GET", &format!("{}/v1/health", node.url()), None, None)
        .unwrap_or_else(|e| panic!("health of node {} from {netns:?}: {e:#}", node.index()));
    assert_eq!(r.status, 200, "health of node {}: {}", node.index(), r.body);
    let r = http(
        netns,
        "GET",
        &format!("{}/v1/sprites", node.url()),
        Some(&token),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "sprites of node {}: {}", node.index(), r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body));
    assert!(v["sprites"].is_array(), "{v}");
    let r = http(netns, "GET", &format!("{}/v1/sprites", node.url()), None, None).unwrap();
    assert_eq!(r.status, 401, "sprites without a token: {}", r.body);
}

#[test]
fn three_hosts_reach_postgres_s3_and_each_other_and_run_den() {
    den_testkit::require_root();
    let routes_before = default_routes();
    let hosts = Hosts::create(3).unwrap();
    let names = hosts.names();
    assert_eq!(
        default_routes(),
        routes_before,
        "the root namespace gets no default route"
    );
    let tag = hosts.tag().to_string();

    let dir = tempfile::Builder::new().prefix("den-cluster-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();

    // PostgreSQL in the root namespace, reached from host 2 over the bridge.
    let mut pg = TestPostgres::start().unwrap();
    pg.listen_on_all().unwrap();
    let out = ok({
        let mut c = hosts.command(2, PSQL);
        c.args(["-h", &hosts.host_ip().to_string(), "-p", &pg.port().to_string()])
            .args(["-U", "den", "-d", "den", "-A", "-t", "-c", "SELECT 40 + 2"]);
        c
    });
    assert_eq!(out.trim(), "42");

    // S3 on the bridge address: a signed PUT from host 1, GETs from host 2 and the root.
    let s3 = SeaweedS3::start_on(hosts.host_ip()).unwrap();
    assert!(
        s3.endpoint().starts_with(&format!("http://{}:", hosts.host_ip())),
        "{}",
        s3.endpoint()
    );
    let url = s3.object_url("from-host-1");
    let body = dir.path().join("body");
    std::fs::write(&body, "written in host 1").unwrap();
    let mut put = s3.signed_curl();
    put.args(["-o", "/dev/null", "-w", "%{http_code}", "--upload-file"])
        .arg(&body)
        .arg(&url);
    assert_eq!(ok(curl_in(&hosts, 1, &put)), "200");
    let mut get = s3.signed_curl();
    get.args(["-f", &url]);
    assert_eq!(ok(curl_in(&hosts, 2, &get)), "written in host 1");
    assert_eq!(ok(get), "written in host 1");
    // Unsigned: refused, so the namespace really talks to the enforcing server.
    let anon = ok({
        let mut c = hosts.command(0, "curl");
        c.args([
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        c
    });
    assert_eq!(anon, "403");

    // One single-node den per host (below); sprites run as other users, who must reach
    // the dirs.
    let opts: Vec<NodeOptions> = (0..3)
        .map(|i| NodeOptions::new(DEN, dir.path().join(format!("node{i}"))))
        .collect();
    let mut nodes: Vec<DenNode> = std::thread::scope(|s| {
        let started: Vec<_> = opts
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let hosts = &hosts;
                s.spawn(move || DenNode::start(hosts, i, o))
            })
            .collect();
        started
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("start thread")
                    .unwrap_or_else(|e| panic!("{e:#}"))
            })
            .collect()
    });
    for node in &nodes {
        assert!(node.pid().is_some());
        assert_eq!(node.url(), hosts.node_url(node.index(), 8080));
        check_node_answers(node, None);
        check_node_answers(node, Some(hosts.netns(0)));
    }
    // The node's process really lives in its host's namespace.
    let ns_pids = ok({
        let mut c = Command::new("ip");
        c.args(["netns", "pids", hosts.netns(1)]);
        c
    });
    let pid1 = nodes[1].pid().unwrap().to_string();
    assert!(ns_pids.split_whitespace().any(|p| p == pid1), "{ns_pids}");

    // A sprite on node 1, through node 1's URL, with the den CLI as the client.
    let home = tempfile::tempdir().unwrap();
    let (url1, token1) = (nodes[1].url(), nodes[1].admin_token().unwrap());
    let den = |args: &[&str]| {
        let mut c = Command::new(DEN);
        c.args(args)
            .current_dir(home.path())
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DEN_LOG")
            .env("DEN_API_URL", &url1)
            .env("DEN_TOKEN", &token1)
            .stdin(Stdio::null());
        c
    };
    let out = ok(den(&["create", "hello", "--skip-console"]));
    assert!(out.starts_with("created sprite hello"), "{out}");
    assert_eq!(ok(den(&["-s", "hello", "exec", "--", "echo", "hi"])), "hi\n");
    // Its network namespace carries node 1's prefix (so nodes never collide).
    let netns_list = ok({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    let node1_prefix = format!("dh{tag}n1-");
    assert!(
        netns_list.lines().any(|l| l.starts_with(&node1_prefix)),
        "no sprite netns named {node1_prefix}*: {netns_list}"
    );
    // The other nodes do not know it.
    let r = http(
        None,
        "GET",
        &format!("{}/v1/sprites/hello", nodes[0].url()),
        nodes[0].admin_token().as_deref(),
        None,
    )
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);

    // kill -9 node 2: it stops answering; a restart brings it back with its data.
    let token2 = nodes[2].admin_token().unwrap();
    nodes[2].kill9().unwrap();
    assert!(nodes[2].pid().is_none());
    assert!(http(None, "GET", &format!("{}/v1/health", nodes[2].url()), None, None).is_err());
    nodes[2].restart().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(nodes[2].admin_token().unwrap(), token2);
    check_node_answers(&nodes[2], Some(hosts.netns(1)));
    assert!(
        nodes[2].log_tail().contains("den server listening"),
        "{}",
        nodes[2].log_tail()
    );

    // A graceful stop and restart of node 1 keeps its sprite.
    let status = nodes[1].stop().unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    nodes[1].restart().unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        ok(den(&["-s", "hello", "exec", "--", "echo", "again"])),
        "again\n"
    );

    // kill -9 of node 1 while its sprite runs (den's crash, the sprite left as it was):
    // the restarted node serves the sprite again.
    nodes[1].kill9().unwrap();
    nodes[1].restart().unwrap_or_else(|e| panic!("{e:#}"));
    let out = ok(den(&["-s", "hello", "exec", "--", "echo", "after the crash"]));
    assert_eq!(out, "after the crash\n", "log:\n{}", nodes[1].log_tail());

    drop(nodes);
    let netns_list = ok({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    let ours = format!("dh{tag}");
    drop(hosts);
    let left = leftovers_after_drop(&names);
    assert!(left.is_empty(), "left behind: {left:?}");
    let after = ok({
        let mut c = Command::new("ip");
        c.args(["netns", "list"]);
        c
    });
    assert!(
        !after.lines().any(|l| l.starts_with(&ours)),
        "namespaces left: {after}\n(before the hosts went: {netns_list})"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    assert!(
        !mounts.lines().any(|l| l.contains(&d) || l.contains(&ours)),
        "mounts left behind"
    );
}
