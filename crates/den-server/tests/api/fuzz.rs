//! Malformed input at the API boundary: random and hostile paths, query
//! strings, headers and bodies at every endpoint. Nothing may answer 5xx,
//! and the server must keep serving.

use anyhow::{Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::TestServer;

/// Every route shape, with `{s}` for a sprite name and `{x}` for another id.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/sprites"),
    ("POST", "/v1/sprites"),
    ("GET", "/v1/sprites/{s}"),
    ("PUT", "/v1/sprites/{s}"),
    ("DELETE", "/v1/sprites/{s}"),
    ("POST", "/v1/sprites/{s}/upgrade"),
    ("POST", "/v1/sprites/{s}/fork"),
    ("POST", "/v1/sprites/{s}/checkpoint"),
    ("GET", "/v1/sprites/{s}/checkpoints"),
    ("GET", "/v1/sprites/{s}/checkpoints/{x}"),
    ("DELETE", "/v1/sprites/{s}/checkpoints/{x}"),
    ("POST", "/v1/sprites/{s}/checkpoints/{x}/restore"),
    ("GET", "/v1/sprites/{s}/policy/network"),
    ("POST", "/v1/sprites/{s}/policy/network"),
    ("GET", "/v1/sprites/{s}/exec"),
    ("POST", "/v1/sprites/{s}/exec"),
    ("POST", "/v1/sprites/{s}/exec/{x}/kill"),
    ("GET", "/v1/sprites/{s}/services"),
    ("GET", "/v1/sprites/{s}/services/{x}"),
    ("PUT", "/v1/sprites/{s}/services/{x}"),
    ("DELETE", "/v1/sprites/{s}/services/{x}"),
    ("POST", "/v1/sprites/{s}/services/{x}/start"),
    ("POST", "/v1/sprites/{s}/services/{x}/stop"),
    ("POST", "/v1/sprites/{s}/services/signal"),
    ("GET", "/v1/sprites/{s}/services/{x}/logs"),
    ("GET", "/v1/sprites/{s}/fs/read"),
    ("PUT", "/v1/sprites/{s}/fs/write"),
    ("GET", "/v1/sprites/{s}/fs/list"),
    ("DELETE", "/v1/sprites/{s}/fs/delete"),
    ("POST", "/v1/sprites/{s}/fs/rename"),
    ("POST", "/v1/sprites/{s}/fs/copy"),
    ("POST", "/v1/sprites/{s}/fs/chmod"),
    ("POST", "/v1/sprites/{s}/fs/chown"),
    ("GET", "/v1/sprites/{s}/fs/watch"),
    ("GET", "/v1/sprites/{s}/ports/watch"),
    ("GET", "/v1/sprites/{s}/check"),
    ("GET", "/v1/sprites/{s}/proxy"),
    ("GET", "/v1/tokens"),
    ("POST", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{x}"),
];

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn junk(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..max);
    (0..n).map(|_| rng.random()).collect()
}

fn name(rng: &mut StdRng) -> String {
    let fixed = [
        "fz",
        "fz",
        "fz",
        "nope",
        "",
        "..",
        "%2e%2e",
        "a%00b",
        "UPPER",
        "x y",
        "%ff%fe",
        "-lead",
        "trail-",
        "ünïcode",
        "a/b",
        "..%2F..%2Fetc",
    ];
    match rng.random_range(0..4) {
        0 => "z".repeat(rng.random_range(60..300)),
        _ => pick(rng, &fixed).to_string(),
    }
}

fn query(rng: &mut StdRng) -> String {
    let keys = [
        "cmd",
        "path",
        "tty",
        "stdin",
        "rows",
        "cols",
        "env",
        "dir",
        "id",
        "duration",
        "timeout",
        "signal",
        "lines",
        "prefix",
        "max_results",
        "continuation_token",
        "workingDir",
        "recursive",
        "mode",
        "start",
        "end",
        "mkdirParents",
        "host",
        "port",
        "max_run_after_disconnect",
    ];
    let vals = [
        "",
        "true",
        "false",
        "-1",
        "0",
        "99999999999999999999",
        "1e9",
        "abc",
        "%00",
        "..%2F..",
        "5s",
        "5.0s",
        "-5s",
        "1000h",
        "SIGKILL",
        "NOPE",
        "/etc/passwd",
        "../../",
        "0777",
        "%ZZ",
    ];
    (0..rng.random_range(0..5))
        .map(|_| format!("{}={}", pick(rng, &keys), pick(rng, &vals)))
        .collect::<Vec<_>>()
        .join("&")
}

fn body(rng: &mut StdRng) -> Vec<u8> {
    let docs: &[&str] = &[
        "",
        "{",
        "null",
        "[]",
        "\"str\"",
        "{\"name\": 5}",
        "{\"name\": \"fz2\", \"config\": {\"ram_mb\": -5}}",
        "{\"name\": \"fz3\", \"config\": {\"cpus\": 1e300}}",
        "{\"name\": \"fz4\", \"url_settings\": {\"auth\": 7}}",
        "{\"cmd\": \"\"}",
        "{\"cmd\": \"sh\", \"needs\": [\"missing\"]}",
        "{\"cmd\": \"sh\", \"http_port\": 70000}",
        "{\"rules\": [{\"domain\": null}]}",
        "{\"source\": \"\", \"dest\": \"\"}",
        "{\"path\": \"/\", \"mode\": \"99999\"}",
        "{\"name\": \"x\", \"signal\": \"SIGNOPE\"}",
        "{\"labels\": [\"\"]}",
        "{\"comment\": 12}",
    ];
    match rng.random_range(0..3) {
        0 => junk(rng, 4096),
        1 => {
            let depth = rng.random_range(1..2000);
            let mut v = "[".repeat(depth);
            v.push_str(&"]".repeat(depth));
            v.into_bytes()
        }
        _ => pick(rng, docs).as_bytes().to_vec(),
    }
}

pub async fn api_fuzz() -> Result<()> {
    let s = TestServer::start().await?;
    s.create("fz").await?;
    let c = s.client();
    let seed = std::env::var("DEN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let rounds: usize = std::env::var("DEN_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    println!("  fuzz seed {seed}, {rounds} requests (DEN_FUZZ_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut server_errors = Vec::new();
    for i in 0..rounds {
        let (method, route) = ROUTES[rng.random_range(0..ROUTES.len())];
        let path = route
            .replace("{s}", &name(&mut rng))
            .replace("{x}", &name(&mut rng));
        let q = query(&mut rng);
        let url = if q.is_empty() {
            s.api(&path)
        } else {
            s.api(&format!("{path}?{q}"))
        };
        let mut req = c.request(method.parse()?, &url).body(body(&mut rng));
        if rng.random_bool(0.3) {
            req = req.header(
                "content-type",
                pick(&mut rng, &["application/json", "text/plain", "x/y"]),
            );
        }
        if rng.random_bool(0.2) {
            req = req.header(
                "range",
                pick(&mut rng, &["bytes=5-1", "bytes=-", "bytes=0-99999999999", "junk"]),
            );
        }
        let resp = match req.send().await {
            Ok(r) => r,
            // Some hostile URLs are refused by the client library itself.
            Err(e) if e.is_builder() => continue,
            Err(e) => anyhow::bail!("request {i} {method} {url}: transport error {e}"),
        };
        if resp.status().is_server_error() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            server_errors.push(format!(
                "{method} {url} -> {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
    }
    ensure!(
        server_errors.is_empty(),
        "{} 5xx answers:\n{}",
        server_errors.len(),
        server_errors.join("\n")
    );
    // Still alive and correct (the fuzzer may legitimately have deleted "fz").
    ensure!(s.anonymous().get(s.api("/v1/health")).send().await?.status() == 200);
    s.create("fz-after").await?;
    let got: serde_json::Value = c.get(s.api("/v1/sprites/fz-after")).send().await?.json().await?;
    ensure!(got["name"] == "fz-after" && got["status"] == "cold", "{got}");
    s.stop().await;
    Ok(())
}
