//! Exercises SeaweedS3 against the real server: signed PUT/GET round trip,
//! ranged GET, credentials enforced, stop (connection refused) and restart
//! (data kept), and two servers in parallel.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use den_testkit::{SeaweedS3, free_port, free_ports, wait_until};

fn check(out: Output, what: &str) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{what}: curl failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Deterministic, non-repeating-ish content.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn put(s3: &SeaweedS3, key: &str, data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    fs::write(&file, data).unwrap();
    let out = s3
        .signed_curl()
        .args(["--fail", "--upload-file"])
        .arg(&file)
        .arg(s3.object_url(key))
        .output()
        .unwrap();
    check(out, "PUT");
}

fn get(s3: &SeaweedS3, key: &str, range: Option<&str>) -> Vec<u8> {
    let mut cmd = s3.signed_curl();
    cmd.arg("--fail");
    if let Some(r) = range {
        cmd.args(["-H", &format!("Range: bytes={r}")]);
    }
    let out = cmd.arg(s3.object_url(key)).output().unwrap();
    check(out, "GET")
}

fn http_code(mut cmd: std::process::Command) -> String {
    let out = cmd
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn refuses_connections(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

#[test]
fn put_get_range_stop_restart() {
    let t = Instant::now();
    let mut s3 = SeaweedS3::start().expect("start SeaweedFS");
    eprintln!("SeaweedS3::start took {:?}", t.elapsed());

    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(s3.bucket(), "den-test");
    assert_eq!(s3.region(), "us-east-1");
    assert!(!s3.access_key().is_empty() && !s3.secret_key().is_empty());

    let data = payload(1 << 20, 1);
    put(&s3, "dir/obj", &data);
    assert!(get(&s3, "dir/obj", None) == data, "GET returned other bytes");
    let ranged = get(&s3, "dir/obj", Some("1000-4999"));
    assert_eq!(ranged.len(), 4000);
    assert!(ranged == data[1000..5000], "ranged GET returned other bytes");
    let last = get(&s3, "dir/obj", Some("-10"));
    assert!(last == data[data.len() - 10..]);

    // Credentials are enforced.
    let mut anon = std::process::Command::new("curl");
    anon.args(["-sS", "--noproxy", "*"]).arg(s3.object_url("dir/obj"));
    assert_eq!(http_code(anon), "403", "anonymous GET must be refused");
    let mut wrong = std::process::Command::new("curl");
    wrong
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
        ])
        .arg(format!("{}:wrong-secret", s3.access_key()))
        .arg(s3.object_url("dir/obj"));
    assert_eq!(http_code(wrong), "403", "wrong secret must be refused");

    // Every port is on loopback only: nothing listens on the wildcard address.
    let ss = std::process::Command::new("ss")
        .args(["-Hltn"])
        .output()
        .expect("run ss");
    let ss = String::from_utf8_lossy(&ss.stdout);
    for port in [
        s3.ports().s3,
        s3.ports().master,
        s3.ports().volume,
        s3.ports().filer,
        s3.ports().admin,
        s3.ports().admin_grpc,
    ] {
        for line in ss.lines().filter(|l| l.contains(&format!(":{port} "))) {
            assert!(
                line.contains("127.0.0.1:"),
                "port {port} not loopback-only: {line}"
            );
        }
    }

    // Stop: unreachable, data kept.
    let t = Instant::now();
    s3.stop().unwrap();
    eprintln!("stop took {:?}", t.elapsed());
    assert!(!s3.is_running());
    assert!(
        refuses_connections(s3.ports().s3),
        "S3 port still open after stop"
    );
    let out = s3
        .signed_curl()
        .args(["--max-time", "5"])
        .arg(s3.object_url("dir/obj"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl to a stopped server should fail to connect (exit 7): {out:?}"
    );
    s3.stop().unwrap(); // idempotent

    let endpoint = s3.endpoint();
    let t = Instant::now();
    s3.restart().unwrap();
    eprintln!("restart took {:?}", t.elapsed());
    assert!(s3.is_running());
    assert_eq!(s3.endpoint(), endpoint, "restart must keep the ports");
    assert!(get(&s3, "dir/obj", None) == data, "object lost across restart");
    put(&s3, "after-restart", b"hello");
    assert_eq!(get(&s3, "after-restart", None), b"hello");

    // restart while running works too.
    s3.restart().unwrap();
    assert_eq!(get(&s3, "after-restart", None), b"hello");

    let dir = s3.data_dir();
    let ports = s3.ports();
    assert!(dir.exists());
    drop(s3);
    assert!(!dir.exists(), "drop must remove the temp dir");
    for port in ports.all() {
        for name in ["master", "volume", "filer", "s3", "admin"] {
            let sock = format!("/tmp/seaweedfs-{name}-grpc-{port}.sock");
            assert!(!std::path::Path::new(&sock).exists(), "{sock} left behind");
        }
    }
    assert!(refuses_connections(endpoint_port(&endpoint)));
}

fn endpoint_port(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn two_servers_in_parallel() {
    let a = std::thread::spawn(SeaweedS3::start);
    let b = std::thread::spawn(SeaweedS3::start);
    let a = a.join().unwrap().expect("start a");
    let b = b.join().unwrap().expect("start b");

    let pa = a.ports().all();
    let pb = b.ports().all();
    assert!(
        pa.iter().all(|p| !pb.contains(p)),
        "servers share ports: {pa:?} {pb:?}"
    );
    assert_ne!(a.access_key(), b.access_key());

    put(&a, "k", b"from a");
    put(&b, "k", b"from b");
    assert_eq!(get(&a, "k", None), b"from a");
    assert_eq!(get(&b, "k", None), b"from b");

    // a's credentials do not work on b.
    let mut cross = std::process::Command::new("curl");
    cross
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
        ])
        .arg(format!("{}:{}", a.access_key(), a.secret_key()))
        .arg(b.object_url("k"));
    assert_eq!(http_code(cross), "403");
}

#[test]
fn helpers() {
    let p = free_port().unwrap();
    assert_ne!(p, 0);
    let ps = free_ports(20).unwrap();
    let mut sorted = ps.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 20);

    let mut n = 0;
    wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
        n += 1;
        n == 3
    })
    .unwrap();
    assert_eq!(n, 3);

    let t = Instant::now();
    let err = wait_until(Duration::from_millis(100), Duration::from_millis(10), || false);
    assert!(err.is_err());
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert!(t.elapsed() < Duration::from_secs(2));
}
