//! den_testkit::cluster::Hosts without den: hosts reach the root namespace's services
//! (PostgreSQL, SeaweedFS S3 on the bridge address) and each other, nothing else is routed,
//! and Drop removes everything, also the processes left in the namespaces. Run as root.

use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use den_testkit::SeaweedS3;
use den_testkit::cluster::{Hosts, http, leftovers_after_drop};
use den_testkit::net::{connect_from, greeter, greeting};
use den_testkit::postgres::TestPostgres;

fn ok(mut c: Command) -> String {
    let dbg = format!("{c:?}");
    let o = c.output().unwrap_or_else(|e| panic!("spawn {dbg}: {e}"));
    assert!(
        o.status.success(),
        "{dbg} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn hosts_reach_services_and_each_other_and_vanish_on_drop() {
    den_testkit::require_root();
    let hosts = Hosts::create(3).unwrap();
    let names = hosts.names();
    assert_eq!(hosts.len(), 3);
    assert!(
        hosts.leftovers().len() >= 5,
        "everything exists: {:?}",
        hosts.leftovers()
    );
    let two = Hosts::create(1).unwrap();
    assert_ne!(two.host_ip(), hosts.host_ip(), "each Hosts has its own /24");
    assert_ne!(two.bridge(), hosts.bridge());
    drop(two);

    // Host to host, over the bridge.
    let _g = greeter(hosts.netns(0), SocketAddr::from((hosts.ip(0), 7000))).unwrap();
    let mut s = connect_from(hosts.netns(2), SocketAddrV4::new(hosts.ip(0), 7000))
        .unwrap()
        .unwrap();
    assert_eq!(greeting(&mut s).unwrap(), format!("hello from {}", hosts.ip(0)));

    // Host to a listener of the test in the root namespace, on the bridge address.
    let l = TcpListener::bind((hosts.host_ip(), 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let _root = den_testkit::net::tcp_server_on(l);
    let mut s = connect_from(hosts.netns(1), SocketAddrV4::new(hosts.host_ip(), port))
        .unwrap()
        .unwrap();
    assert_eq!(
        greeting(&mut s).unwrap(),
        format!("hello from {}", hosts.host_ip())
    );

    // Partitions: a silent block between two hosts, a pulled cable; both heal.
    let reaches = |from: usize, to: SocketAddr| -> bool {
        den_net::netns::run_in(hosts.netns(from), move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()
        })
        .unwrap()
    };
    let g0 = SocketAddr::from((hosts.ip(0), 7000));
    let root = SocketAddr::from((hosts.host_ip(), port));
    hosts.block(2, hosts.ip(0)).unwrap();
    assert!(!reaches(2, g0), "blocked");
    assert!(reaches(1, g0), "only host 2 is blocked");
    assert!(reaches(2, root), "only from host 0");
    hosts.unblock(2).unwrap();
    assert!(reaches(2, g0), "unblocked");
    hosts.cut(1).unwrap();
    assert!(!reaches(1, root), "cut");
    assert!(reaches(0, root));
    hosts.heal(1).unwrap();
    den_testkit::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        reaches(1, root)
    })
    .expect("host 1 reaches the root namespace again after heal");

    // PostgreSQL listening on all addresses, asked from host 2.
    let mut pg = TestPostgres::start().unwrap();
    pg.listen_on_all().unwrap();
    let out = ok({
        let mut c = hosts.command(2, "/usr/lib/postgresql/15/bin/psql");
        c.args(["-h", &hosts.host_ip().to_string(), "-p", &pg.port().to_string()])
            .args(["-U", "den", "-d", "den", "-A", "-t", "-c", "SELECT 40 + 2"]);
        c
    });
    assert_eq!(out.trim(), "42");
    assert_eq!(pg.psql("SELECT 1").unwrap(), "1", "loopback still works");

    // S3 on the bridge address: signed PUT from host 1, GET from host 0 and the root.
    let s3 = SeaweedS3::start_on(hosts.host_ip()).unwrap();
    assert_eq!(s3.ip(), hosts.host_ip());
    let url = s3.object_url("k");
    let signed = s3.signed_curl();
    let tmp = tempfile::tempdir().unwrap();
    let body = tmp.path().join("body");
    std::fs::write(&body, "v1").unwrap();
    let mut put = hosts.command(1, signed.get_program());
    put.args(signed.get_args())
        .args(["-o", "/dev/null", "-w", "%{http_code}", "--upload-file"])
        .arg(&body)
        .arg(&url);
    assert_eq!(ok(put), "200");
    let mut get = hosts.command(0, signed.get_program());
    get.args(signed.get_args()).args(["-f", &url]);
    assert_eq!(ok(get), "v1");
    let mut get = s3.signed_curl();
    get.args(["-f", &url]);
    assert_eq!(ok(get), "v1");
    // Unsigned requests are refused (status only, through the http helper from host 2).
    let r = http(Some(hosts.netns(2)), "GET", &url, None, None).unwrap();
    assert_eq!(r.status, 403, "{}", r.body);

    // A process left running in a host namespace is killed by Drop.
    let mut sleeper = hosts
        .command(1, "sleep")
        .arg("1000")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    drop(s3);
    drop(hosts);
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the sleeper was killed: {status}");
    let left = leftovers_after_drop(&names);
    assert!(left.is_empty(), "left behind: {left:?}");
}
