//! Filesystem requests against an in-process agent, inside a temp dir.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use den_agent::Error;
use den_agent::client::FsWriteOptions;
use serde_json::Value;

fn p(a: &TestAgent, rel: &str) -> String {
    a.dir.path().join(rel).display().to_string()
}

/// Asserts an agent error with `code` whose message names `errno`.
fn assert_err<T: std::fmt::Debug>(r: Result<T, Error>, code: &str, errno: &str) {
    match r {
        Err(Error::Agent { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.starts_with(&format!("{errno}: ")), "{message}");
        }
        other => panic!("expected {code}/{errno}, got {other:?}"),
    }
}

fn mode_of(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn no_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".den-tmp."))
}

#[tokio::test]
async fn write_then_read_with_ranges() {
    let a = agent().await;
    let c = &a.client;
    let opts = FsWriteOptions {
        mkdir_parents: true,
        ..Default::default()
    };
    let file = p(&a, "x/y/hello.txt");
    let v = c.fs_write(&file, None, &opts, b"hello world").await.unwrap();
    assert_eq!(v, serde_json::json!({"path": file, "size": 11, "mode": "0644"}));
    assert_eq!(mode_of(&file), 0o644);

    let (info, data) = c.fs_read_all(&file, None, None, None).await.unwrap();
    assert_eq!(data, b"hello world");
    assert_eq!(info["size"], 11);
    assert_eq!(
        (info["start"].as_u64(), info["end"].as_u64()),
        (Some(0), Some(11))
    );
    let read = |start, end| c.fs_read_all(&file, None, start, end);
    assert_eq!(read(Some(6), None).await.unwrap().1, b"world");
    assert_eq!(read(Some(0), Some(5)).await.unwrap().1, b"hello");
    assert_eq!(read(Some(4), Some(7)).await.unwrap().1, b"o w");
    let (info, data) = read(Some(6), Some(100)).await.unwrap();
    assert_eq!((data.as_slice(), info["end"].as_u64()), (&b"world"[..], Some(11)));
    assert!(read(Some(50), None).await.unwrap().1.is_empty());
    assert!(read(Some(5), Some(2)).await.unwrap().1.is_empty());

    // Relative to working_dir.
    let wd = a.dir.path().display().to_string();
    let (info, data) = c
        .fs_read_all("x/./y/../y/hello.txt", Some(&wd), None, None)
        .await
        .unwrap();
    assert_eq!(
        (data.as_slice(), info["path"].as_str()),
        (&b"hello world"[..], Some(file.as_str()))
    );

    // Replacing keeps the mode unless one is given.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let v = c
        .fs_write("x/y/hello.txt", Some(&wd), &opts, b"bye")
        .await
        .unwrap();
    assert_eq!((v["size"].as_u64(), v["mode"].as_str()), (Some(3), Some("0600")));
    assert_eq!(std::fs::read(&file).unwrap(), b"bye");
    let exe = FsWriteOptions {
        mode: Some(0o755),
        ..Default::default()
    };
    assert_eq!(
        c.fs_write(&file, None, &exe, b"#!/bin/sh\n").await.unwrap()["mode"],
        "0755"
    );
    assert_eq!(mode_of(&file), 0o755);

    // Large content spans many frames; the empty file is fine too.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let bigf = p(&a, "big.bin");
    let mut w = c.fs_write_stream(&bigf, None, &Default::default()).await.unwrap();
    for part in big.chunks(700_000) {
        w.write(part).await.unwrap();
    }
    assert_eq!(w.finish().await.unwrap()["size"], 3_000_000);
    let (_, back) = c.fs_read_all(&bigf, None, None, None).await.unwrap();
    assert!(back == big);
    let (_, mid) = c
        .fs_read_all(&bigf, None, Some(1_000_000), Some(2_500_000))
        .await
        .unwrap();
    assert!(mid == big[1_000_000..2_500_000]);
    let empty = p(&a, "empty");
    assert_eq!(
        c.fs_write(&empty, None, &Default::default(), b"").await.unwrap()["size"],
        0
    );
    assert!(
        c.fs_read_all(&empty, None, None, None)
            .await
            .unwrap()
            .1
            .is_empty()
    );
    assert!(no_temp_files(a.dir.path()) && no_temp_files(&a.dir.path().join("x/y")));
    a.shutdown().await;
}

#[tokio::test]
async fn write_and_read_errors() {
    let a = agent().await;
    let c = &a.client;
    let none = FsWriteOptions::default();
    assert_err(
        c.fs_write(&p(&a, "nodir/f"), None, &none, b"x").await,
        "not_found",
        "ENOENT",
    );
    std::fs::create_dir(a.dir.path().join("d")).unwrap();
    assert_err(
        c.fs_write(&p(&a, "d"), None, &none, b"x").await,
        "is_directory",
        "EISDIR",
    );
    std::fs::write(a.dir.path().join("plain"), b"x").unwrap();
    assert_err(
        c.fs_write(&p(&a, "plain/f"), None, &none, b"x").await,
        "not_directory",
        "ENOTDIR",
    );
    assert_err(
        c.fs_write("a\0b", None, &none, b"x").await,
        "bad_request",
        "EINVAL",
    );
    let bad_mode = FsWriteOptions {
        mode: Some(0o17777),
        ..Default::default()
    };
    assert_err(
        c.fs_write(&p(&a, "m"), None, &bad_mode, b"x").await,
        "bad_request",
        "EINVAL",
    );

    assert_err(
        c.fs_read_all(&p(&a, "missing"), None, None, None).await,
        "not_found",
        "ENOENT",
    );
    assert_err(
        c.fs_read_all(&p(&a, "d"), None, None, None).await,
        "is_directory",
        "EISDIR",
    );
    assert_err(c.fs_read_all("", None, None, None).await, "bad_request", "EINVAL");
    nix::unistd::mkfifo(
        &a.dir.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert_err(
        c.fs_read_all(&p(&a, "fifo"), None, None, None).await,
        "bad_request",
        "EINVAL",
    );
    // Size-0 pseudo files are read to EOF.
    let (_, status) = c
        .fs_read_all("/proc/self/status", None, None, None)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&status).contains("Pid:"));

    // An abandoned write leaves the old content and no temp file behind.
    let mut w = c.fs_write_stream(&p(&a, "plain"), None, &none).await.unwrap();
    w.write(b"never committed").await.unwrap();
    drop(w);
    let deadline = Instant::now() + WAIT;
    while !no_temp_files(a.dir.path()) {
        assert!(Instant::now() < deadline, "temp file left behind");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::read(a.dir.path().join("plain")).unwrap(), b"x");
    a.shutdown().await;
}

#[tokio::test]
async fn list_files_dirs_and_symlinks() {
    let a = agent().await;
    let c = &a.client;
    let root = a.dir.path().join("t");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("file.txt"), b"12345").unwrap();
    std::fs::write(root.join("sub/deeper/n"), b"").unwrap();
    std::os::unix::fs::symlink("file.txt", root.join("link")).unwrap();
    std::fs::set_permissions(root.join("file.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let rootp = root.display().to_string();

    let v = c.fs_list(&rootp, None, false).await.unwrap();
    assert_eq!(
        (v["path"].as_str(), v["count"].as_u64()),
        (Some(rootp.as_str()), Some(3))
    );
    let entries = v["entries"].as_array().unwrap();
    let names: Vec<_> = entries.iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["file.txt", "link", "sub"]);
    let f = &entries[0];
    assert_eq!(f["path"], format!("{rootp}/file.txt"));
    assert_eq!((f["type"].as_str(), f["size"].as_u64()), (Some("file"), Some(5)));
    assert_eq!(
        (f["mode"].as_str(), f["isDir"].as_bool()),
        (Some("0640"), Some(false))
    );
    let mtime = humantime::parse_rfc3339(f["modTime"].as_str().unwrap()).unwrap();
    let age = std::time::SystemTime::now().duration_since(mtime).unwrap();
    assert!(age < Duration::from_secs(600), "{age:?}");
    assert_eq!(entries[1]["type"], "symlink");
    assert_eq!(
        (entries[2]["type"].as_str(), entries[2]["isDir"].as_bool()),
        (Some("directory"), Some(true))
    );

    // A file lists as itself.
    let v = c
        .fs_list("t/file.txt", Some(&a.dir.path().display().to_string()), false)
        .await
        .unwrap();
    assert_eq!(v["count"], 1);
    assert_eq!(v["entries"][0]["name"], "file.txt");

    let v = c.fs_list(&rootp, None, true).await.unwrap();
    let paths: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["path"]
                .as_str()
                .unwrap()
                .strip_prefix(&rootp)
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        paths,
        ["/file.txt", "/link", "/sub", "/sub/deeper", "/sub/deeper/n"]
    );
    assert_eq!(v["count"], 5);

    assert_err(
        c.fs_list(&p(&a, "nope"), None, false).await,
        "not_found",
        "ENOENT",
    );
    a.shutdown().await;
}

#[tokio::test]
async fn delete_rename_copy_chmod() {
    let a = agent().await;
    let c = &a.client;
    let d = a.dir.path();
    std::fs::create_dir_all(d.join("tree/sub")).unwrap();
    std::fs::write(d.join("tree/a"), b"aaa").unwrap();
    std::fs::write(d.join("tree/sub/b"), b"bbbbb").unwrap();
    std::os::unix::fs::symlink("a", d.join("tree/ln")).unwrap();
    std::fs::set_permissions(d.join("tree/a"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // copy
    let v = c
        .fs_copy(&p(&a, "tree/a"), &p(&a, "a-copy"), None, false)
        .await
        .unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["totalBytes"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(
        v["copied"][0],
        serde_json::json!({"source": p(&a, "tree/a"), "dest": p(&a, "a-copy")})
    );
    assert_eq!(std::fs::read(d.join("a-copy")).unwrap(), b"aaa");
    assert_eq!(mode_of(&p(&a, "a-copy")), 0o600);
    assert_err(
        c.fs_copy(&p(&a, "tree"), &p(&a, "t2"), None, false).await,
        "is_directory",
        "EISDIR",
    );
    let v = c.fs_copy(&p(&a, "tree"), &p(&a, "t2"), None, true).await.unwrap();
    assert_eq!(
        (v["count"].as_u64(), v["totalBytes"].as_u64()),
        (Some(5), Some(8))
    );
    assert_eq!(std::fs::read(d.join("t2/sub/b")).unwrap(), b"bbbbb");
    assert_eq!(std::fs::read_link(d.join("t2/ln")).unwrap(), Path::new("a"));
    assert_err(
        c.fs_copy(&p(&a, "tree"), &p(&a, "t2"), None, true).await,
        "exists",
        "EEXIST",
    );
    assert_err(
        c.fs_copy(&p(&a, "nope"), &p(&a, "x"), None, false).await,
        "not_found",
        "ENOENT",
    );
    assert_err(
        c.fs_copy(&p(&a, "tree"), &p(&a, "tree/in"), None, true).await,
        "bad_request",
        "EINVAL",
    );

    // rename
    let v = c
        .fs_rename("a-copy", "a-moved", Some(&d.display().to_string()))
        .await
        .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"source": p(&a, "a-copy"), "dest": p(&a, "a-moved")})
    );
    assert!(!d.join("a-copy").exists() && d.join("a-moved").exists());
    assert_err(
        c.fs_rename(&p(&a, "a-copy"), &p(&a, "z"), None).await,
        "not_found",
        "ENOENT",
    );
    assert_err(
        c.fs_rename(&p(&a, "a-moved"), &p(&a, "no/z"), None).await,
        "not_found",
        "ENOENT",
    );

    // chmod
    let v = c.fs_chmod(&p(&a, "a-moved"), None, 0o751, false).await.unwrap();
    assert_eq!(
        v,
        serde_json::json!({"affected": [{"path": p(&a, "a-moved"), "mode": "0751"}], "count": 1})
    );
    assert_eq!(mode_of(&p(&a, "a-moved")), 0o751);
    let v = c.fs_chmod(&p(&a, "t2"), None, 0o700, true).await.unwrap();
    // The symlink is skipped: chmod would follow it.
    assert_eq!(v["count"], 4);
    assert_eq!(mode_of(&p(&a, "t2/sub/b")), 0o700);
    assert_err(
        c.fs_chmod(&p(&a, "nope"), None, 0o700, false).await,
        "not_found",
        "ENOENT",
    );
    assert_err(
        c.fs_chmod(&p(&a, "t2"), None, 0o20000, false).await,
        "bad_request",
        "EINVAL",
    );

    // delete
    let v = c.fs_delete(&p(&a, "a-moved"), None, false).await.unwrap();
    assert_eq!(v, serde_json::json!({"deleted": [p(&a, "a-moved")], "count": 1}));
    assert_err(
        c.fs_delete(&p(&a, "t2"), None, false).await,
        "bad_request",
        "ENOTEMPTY",
    );
    let v = c.fs_delete(&p(&a, "t2"), None, true).await.unwrap();
    assert_eq!(v["count"], 5);
    assert_eq!(
        v["deleted"].as_array().unwrap().last().unwrap(),
        &Value::from(p(&a, "t2"))
    );
    assert!(!d.join("t2").exists());
    std::fs::create_dir(d.join("empty")).unwrap();
    assert_eq!(
        c.fs_delete(&p(&a, "empty"), None, false).await.unwrap()["count"],
        1
    );
    assert_err(
        c.fs_delete(&p(&a, "nope"), None, true).await,
        "not_found",
        "ENOENT",
    );
    assert_err(c.fs_delete("/", None, true).await, "bad_request", "EINVAL");
    a.shutdown().await;
}

#[tokio::test]
async fn new_files_belong_to_the_default_user() {
    let Ok(nobody) = den_agent::user::lookup("nobody", Path::new("/etc/passwd"), Path::new("/etc/group"))
    else {
        eprintln!("no nobody user; skipping");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root; skipping");
        return;
    }
    let a = agent_with(|c| c.default_user = "nobody".into()).await;
    let c = &a.client;
    let opts = FsWriteOptions {
        mkdir_parents: true,
        ..Default::default()
    };
    let f = p(&a, "new/dir/f");
    c.fs_write(&f, None, &opts, b"x").await.unwrap();
    let uid = |path: &str| std::fs::symlink_metadata(path).unwrap().uid();
    assert_eq!(uid(&f), nobody.uid);
    assert_eq!(uid(&p(&a, "new/dir")), nobody.uid);
    assert_eq!(uid(&p(&a, "new")), nobody.uid);
    // The temp dir itself existed and keeps its owner.
    assert_eq!(uid(&a.dir.path().display().to_string()), 0);

    let root_opts = FsWriteOptions {
        as_root: true,
        ..Default::default()
    };
    let r = p(&a, "rootfile");
    c.fs_write(&r, None, &root_opts, b"x").await.unwrap();
    assert_eq!(uid(&r), 0);
    // Replacing a file keeps its owner.
    c.fs_write(&r, None, &FsWriteOptions::default(), b"y")
        .await
        .unwrap();
    assert_eq!(uid(&r), 0);

    c.fs_copy(&r, &p(&a, "copied"), None, false).await.unwrap();
    assert_eq!(uid(&p(&a, "copied")), nobody.uid);
    a.shutdown().await;
}

#[tokio::test]
async fn chown_by_number_and_name_recursively_without_following_links() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let a = agent().await;
    let c = &a.client;
    let dir = p(&a, "own");
    std::fs::create_dir_all(format!("{dir}/sub")).unwrap();
    std::fs::write(format!("{dir}/sub/f"), b"x").unwrap();
    let outside = p(&a, "outside");
    std::fs::write(&outside, b"y").unwrap();
    std::os::unix::fs::symlink(&outside, format!("{dir}/link")).unwrap();

    let v = c.fs_chown(&dir, None, Some("65534"), None, true).await.unwrap();
    assert_eq!(v["count"], 4, "{v}");
    for f in ["", "/sub", "/sub/f", "/link"] {
        let m = std::fs::symlink_metadata(format!("{dir}{f}")).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 0), "{f}");
    }
    // The link was changed itself; its target was not.
    assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);

    // Names come from the sprite's passwd and group files.
    let v = c
        .fs_chown(
            &format!("{dir}/sub/f"),
            None,
            Some("root"),
            Some("nogroup"),
            false,
        )
        .await
        .unwrap();
    assert_eq!(v["affected"][0]["uid"], 0, "{v}");
    let m = std::fs::metadata(format!("{dir}/sub/f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 65534));

    assert_err(
        c.fs_chown(&dir, None, Some("no-such-user"), None, false).await,
        "bad_request",
        "EINVAL",
    );
    assert_err(
        c.fs_chown(&dir, None, None, None, false).await,
        "bad_request",
        "EINVAL",
    );
    assert_err(
        c.fs_chown(&p(&a, "missing"), None, Some("0"), None, false).await,
        "not_found",
        "ENOENT",
    );
    a.shutdown().await;
}
