//! Filesystem (§2.10): binary round trip, ranges, list, write options,
//! delete/rename/copy/chmod, error bodies, and confinement to the sprite.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::common::TestServer;

/// Deterministic bytes covering every value (xorshift).
fn blob(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn fs(s: &TestServer, sprite: &str, op: &str, query: &str) -> String {
    s.api(&format!("/v1/sprites/{sprite}/fs/{op}?{query}"))
}

/// Checks the Sprites filesystem error body; returns it.
async fn fs_error(r: reqwest::Response, status: u16, code: &str) -> Result<Value> {
    let got = r.status();
    let body: Value = r.json().await?;
    ensure!(got == status, "expected {status} {code}, got {got}: {body}");
    ensure!(
        body["code"] == code && body["error"].is_string() && body["path"].is_string(),
        "expected {code}: {body}"
    );
    Ok(body)
}

async fn read(s: &TestServer, sprite: &str, path: &str) -> Result<reqwest::Response> {
    let q = format!("path={}", urlencode(path));
    Ok(s.client().get(fs(s, sprite, "read", &q)).send().await?)
}

fn urlencode(p: &str) -> String {
    p.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn operations() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("fsx").await?;

    // Binary round trip, relative to workingDir, with parents and a mode.
    let data = blob(3 << 20);
    let r = c
        .put(fs(
            &s,
            "fsx",
            "write",
            "path=data/blob.bin&workingDir=/home/sprite&mkdirParents=true&mode=0600",
        ))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await?;
    ensure!(r.status() == 200, "write: {} {}", r.status(), r.text().await?);
    let w: Value = r.json().await?;
    ensure!(
        w == json!({"path": "/home/sprite/data/blob.bin", "size": data.len(), "mode": "0600"}),
        "{w}"
    );
    let r = read(&s, "fsx", "/home/sprite/data/blob.bin").await?;
    ensure!(r.status() == 200);
    let got = r.bytes().await?;
    ensure!(
        got.len() == data.len() && got[..] == data[..],
        "round trip differs"
    );

    // Ranges: header (inclusive), suffix, start/end params, unsatisfiable.
    let url = fs(&s, "fsx", "read", "path=blob.bin&workingDir=/home/sprite/data");
    let r = c.get(&url).header("range", "bytes=100-199").send().await?;
    ensure!(r.status() == 206, "{}", r.status());
    ensure!(r.headers()["content-range"] == format!("bytes 100-199/{}", data.len()));
    ensure!(r.bytes().await?[..] == data[100..200]);
    let r = c.get(&url).header("range", "bytes=-10").send().await?;
    ensure!(r.status() == 206);
    ensure!(r.bytes().await?[..] == data[data.len() - 10..]);
    let r = c.get(&url).header("range", "bytes=3145000-").send().await?;
    ensure!(r.status() == 206);
    ensure!(r.bytes().await?[..] == data[3_145_000..]);
    let r = c.get(format!("{url}&start=5&end=9")).send().await?;
    ensure!(r.status() == 206);
    ensure!(r.bytes().await?[..] == data[5..9]);
    fs_error(c.get(format!("{url}&start=x")).send().await?, 400, "EINVAL").await?;
    let r = c.get(&url).header("range", "bytes=99999999-").send().await?;
    ensure!(r.status() == 416, "{}", r.status());

    // List and stat.
    let l: Value = c
        .get(fs(&s, "fsx", "list", "path=/home/sprite/data"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(l["path"] == "/home/sprite/data" && l["count"] == 1, "{l}");
    let e = &l["entries"][0];
    ensure!(
        e["name"] == "blob.bin"
            && e["path"] == "/home/sprite/data/blob.bin"
            && e["type"] == "file"
            && e["size"] == data.len()
            && e["mode"] == "0600"
            && e["isDir"] == false
            && e["modTime"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{e}"
    );
    let stat: Value = c
        .get(fs(
            &s,
            "fsx",
            "list",
            "path=data/blob.bin&workingDir=/home/sprite",
        ))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        stat["count"] == 1 && stat["entries"][0]["name"] == "blob.bin",
        "{stat}"
    );

    // `mkdir=true` (the docs' name) and a missing parent without it.
    let r = c
        .put(fs(&s, "fsx", "write", "path=/srv/a/b/c.txt&mkdir=true"))
        .body("hello")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let r = c
        .put(fs(&s, "fsx", "write", "path=/nodir/x.txt"))
        .body("x")
        .send()
        .await?;
    let body = fs_error(r, 404, "ENOENT").await?;
    ensure!(
        body["path"].as_str().unwrap_or("").starts_with("/nodir"),
        "{body}"
    );
    let rec: Value = c
        .get(fs(&s, "fsx", "list", "path=/srv&recursive=true"))
        .send()
        .await?
        .json()
        .await?;
    let paths: Vec<&str> = rec["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    ensure!(
        paths.contains(&"/srv/a/b/c.txt") && paths.contains(&"/srv/a/b"),
        "{rec}"
    );

    // Rename, copy (file and directory), chmod.
    let r = c
        .post(s.api("/v1/sprites/fsx/fs/rename"))
        .json(&json!({"source": "c.txt", "dest": "d.txt", "workingDir": "/srv/a/b"}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    ensure!(r.json::<Value>().await? == json!({"source": "/srv/a/b/c.txt", "dest": "/srv/a/b/d.txt"}));
    fs_error(read(&s, "fsx", "/srv/a/b/c.txt").await?, 404, "ENOENT").await?;
    ensure!(read(&s, "fsx", "/srv/a/b/d.txt").await?.text().await? == "hello");
    let r = c
        .post(s.api("/v1/sprites/fsx/fs/copy"))
        .json(&json!({"source": "/srv/a", "dest": "/srv/a2"}))
        .send()
        .await?;
    ensure!(
        r.status().is_client_error(),
        "dir copy without recursive: {}",
        r.status()
    );
    let r = c
        .post(s.api("/v1/sprites/fsx/fs/copy"))
        .json(&json!({"source": "/srv/a", "dest": "/srv/a2", "recursive": true}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let cp: Value = r.json().await?;
    ensure!(cp["totalBytes"] == 5 && cp["count"].as_u64() >= Some(3), "{cp}");
    ensure!(read(&s, "fsx", "/srv/a2/b/d.txt").await?.text().await? == "hello");
    let r = c
        .post(s.api("/v1/sprites/fsx/fs/chmod"))
        .json(&json!({"path": "/srv/a2/b/d.txt", "mode": "0755"}))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let ch: Value = r.json().await?;
    ensure!(ch["affected"][0]["mode"] == "0755" && ch["count"] == 1, "{ch}");
    let st: Value = c
        .get(fs(&s, "fsx", "list", "path=/srv/a2/b/d.txt"))
        .send()
        .await?
        .json()
        .await?;
    ensure!(st["entries"][0]["mode"] == "0755", "{st}");
    let r = c
        .post(s.api("/v1/sprites/fsx/fs/chmod"))
        .json(&json!({"path": "/srv/a2", "mode": "999"}))
        .send()
        .await?;
    fs_error(r, 400, "EINVAL").await?;

    // Delete: non-empty needs recursive; query and JSON body forms.
    let r = c.delete(fs(&s, "fsx", "delete", "path=/srv/a")).send().await?;
    ensure!(r.status().is_client_error(), "{}", r.status());
    let body: Value = r.json().await?;
    ensure!(body["code"] == "ENOTEMPTY", "{body}");
    let r = c
        .delete(fs(&s, "fsx", "delete", "path=/srv/a&recursive=true"))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let del: Value = r.json().await?;
    ensure!(
        del["count"] == 3
            && del["deleted"]
                .as_array()
                .is_some_and(|d| d.contains(&json!("/srv/a"))),
        "{del}"
    );
    let r = c
        .delete(s.api("/v1/sprites/fsx/fs/delete"))
        .json(&json!({"path": "a2", "workingDir": "/srv", "recursive": true}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    fs_error(read(&s, "fsx", "/srv/a2/b/d.txt").await?, 404, "ENOENT").await?;

    // Error bodies.
    fs_error(c.get(fs(&s, "fsx", "read", "")).send().await?, 400, "EINVAL").await?;
    fs_error(read(&s, "fsx", "/srv").await?, 400, "EISDIR").await?;
    let body = fs_error(
        c.get(fs(&s, "fsx", "list", "path=missing&workingDir=/srv"))
            .send()
            .await?,
        404,
        "ENOENT",
    )
    .await?;
    ensure!(body["path"] == "/srv/missing", "{body}");
    fs_error(
        c.put(fs(&s, "fsx", "write", "path=/srv&mode=0644"))
            .body("x")
            .send()
            .await?,
        400,
        "EISDIR",
    )
    .await?;
    fs_error(
        c.put(fs(&s, "fsx", "write", "path=/srv/f&mode=rw"))
            .body("x")
            .send()
            .await?,
        400,
        "EINVAL",
    )
    .await?;
    let r = c.get(fs(&s, "nosprite", "list", "path=/")).send().await?;
    ensure!(r.status() == 404);

    // Documented in the OpenAPI description, next to the services.
    let doc: Value = c.get(s.api("/v1/openapi.json")).send().await?.json().await?;
    for p in [
        "/v1/sprites/{name}/fs/read",
        "/v1/sprites/{name}/fs/chmod",
        "/v1/sprites/{name}/services/{service}",
        "/v1/sprites/{name}/services/signal",
    ] {
        ensure!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    s.stop().await;
    Ok(())
}

/// Nothing reaches the host: `..`, absolute host paths and symlinks to `/`
/// all resolve inside the sprite.
pub async fn confinement() -> Result<()> {
    let s = TestServer::start().await?;
    let c = s.client();
    s.create("jail").await?;
    let marker = s.dir.path().join("host-marker.txt");
    std::fs::write(&marker, "host secret")?;
    let host_path = marker.to_str().context("utf-8")?.to_string();

    fs_error(read(&s, "jail", &host_path).await?, 404, "ENOENT").await?;
    let r = c
        .get(fs(
            &s,
            "jail",
            "read",
            &format!(
                "path=../../../../../..{}&workingDir=/home/sprite",
                urlencode(&host_path)
            ),
        ))
        .send()
        .await?;
    fs_error(r, 404, "ENOENT").await?;

    // The sprite's own /etc/passwd, not the host's.
    let passwd = read(&s, "jail", "/etc/passwd").await?.text().await?;
    ensure!(passwd.contains("sprite:"), "{passwd}");
    ensure!(
        passwd != std::fs::read_to_string("/etc/passwd")?,
        "read the host's passwd"
    );

    // Symlinks made inside the sprite: to `/` and to the host directory.
    let mgr = s.running.as_ref().context("running")?.state.mgr.clone();
    let act = mgr.wake("jail").await?;
    let host_dir = s.dir.path().to_str().context("utf-8")?;
    let out = act
        .agent()
        .exec(den_agent::client::ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("ln -s / /home/sprite/root && ln -s {host_dir} /home/sprite/hostdir"),
            ],
            ..Default::default()
        })
        .await?
        .collect()
        .await;
    ensure!(out.exit.as_ref().map(|e| e.exit_code) == Some(0), "{out:?}");
    drop(act);
    for p in [
        format!("/home/sprite/root{host_path}"),
        "/home/sprite/hostdir/host-marker.txt".to_string(),
    ] {
        fs_error(read(&s, "jail", &p).await?, 404, "ENOENT").await?;
    }
    let l = c
        .get(fs(&s, "jail", "list", &format!("path={}", urlencode(host_dir))))
        .send()
        .await?;
    fs_error(l, 404, "ENOENT").await?;

    // Writing through the symlink to `/` lands in the sprite's /tmp.
    let name = format!("den-fs-jail-{}.txt", std::process::id());
    let r = c
        .put(fs(
            &s,
            "jail",
            "write",
            &format!("path=/home/sprite/root/tmp/{name}"),
        ))
        .body("inside")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(read(&s, "jail", &format!("/tmp/{name}")).await?.text().await? == "inside");
    ensure!(
        !std::path::Path::new("/tmp").join(&name).exists(),
        "wrote on the host"
    );
    // And a write to the host path creates a file in the sprite only.
    let r = c
        .put(fs(
            &s,
            "jail",
            "write",
            &format!("path={}&mkdirParents=true", urlencode(&host_path)),
        ))
        .body("overwritten")
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    ensure!(
        std::fs::read_to_string(&marker)? == "host secret",
        "host file changed"
    );
    s.stop().await;
    Ok(())
}
