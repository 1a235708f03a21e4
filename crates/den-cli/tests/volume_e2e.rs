//! End to end through the `den` binary: a volume served as FUSE file + loop
//! device with ext4 on it; checkpoint while mounted, restore, export + fsck,
//! fork, and the errors an operator gets for impossible requests.

mod common;

use std::path::{Path, PathBuf};

use common::{Den, ImageMount, Rng, Tree, assert_fsck_clean, assert_tree_eq, read_tree, seed_from_env};

const VOL: &str = "e2e";

/// Sizes around the interesting boundaries (empty, sub-block, block, chunk).
const SIZES: &[usize] = &[
    0,
    1,
    100,
    4095,
    4096,
    4097,
    65_536,
    200_000,
    (1 << 20) - 1,
    (1 << 20) + 3,
    2 << 20,
];

fn file_data(rng: &mut Rng, len: usize) -> Vec<u8> {
    match rng.range(0, 3) {
        // Random bytes (incompressible).
        0 | 1 => rng.bytes(len),
        // Compressible text-like content with a zero run in the middle.
        _ => {
            let mut v: Vec<u8> = (0..len).map(|i| b"den volume test "[i % 16]).collect();
            let (a, b) = (len / 3, len / 2);
            v[a..b].fill(0);
            v
        }
    }
}

/// The first tree: nested directories and files of many sizes (~5 MiB).
fn tree_v1(rng: &mut Rng) -> Tree {
    let mut t = Tree::new();
    for d in ["a", "a/b", "a/b/c", "empty-dir", "docs"] {
        t.insert(PathBuf::from(d), None);
    }
    for (i, &size) in SIZES.iter().enumerate() {
        let dir = ["a", "a/b", "a/b/c", "docs"][i % 4];
        t.insert(
            PathBuf::from(format!("{dir}/file-{i}-{size}")),
            Some(file_data(rng, size)),
        );
    }
    t.insert(PathBuf::from("top.txt"), Some(b"hello from v1\n".to_vec()));
    t
}

/// Change, delete and add files, and replace a directory.
fn tree_v2(rng: &mut Rng, v1: &Tree) -> Tree {
    let mut t = v1.clone();
    let files: Vec<PathBuf> = v1
        .iter()
        .filter(|(_, c)| c.as_ref().is_some_and(|d| d.len() > 4096))
        .map(|(p, _)| p.clone())
        .collect();
    // Overwrite the middle of some files in place.
    for p in files.iter().step_by(2) {
        let data = t.get_mut(p).unwrap().as_mut().unwrap();
        let at = data.len() / 2;
        let n = (data.len() - at).min(10_000);
        rng.fill(&mut data[at..at + n]);
    }
    // Delete some files and a whole directory.
    for p in files.iter().skip(1).step_by(3) {
        t.remove(p);
    }
    let gone: Vec<PathBuf> = t.keys().filter(|p| p.starts_with("a/b/c")).cloned().collect();
    for p in gone {
        t.remove(&p);
    }
    // Add new ones, one of them big.
    t.insert(PathBuf::from("new"), None);
    t.insert(PathBuf::from("new/big"), Some(rng.bytes(3 << 20)));
    t.insert(PathBuf::from("new/small"), Some(b"v2".to_vec()));
    t.insert(
        PathBuf::from("top.txt"),
        Some(b"hello from v2, longer than before\n".to_vec()),
    );
    t
}

/// Make the tree under `root` equal `want`, given that it currently is `have`.
fn apply(root: &Path, have: &Tree, want: &Tree) {
    // Removals, deepest paths first so directories are empty by then.
    for (p, c) in have.iter().rev() {
        if !want.contains_key(p) {
            let path = root.join(p);
            match c {
                None => std::fs::remove_dir(&path),
                Some(_) => std::fs::remove_file(&path),
            }
            .unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
        }
    }
    // Additions and changes, parents first.
    for (p, c) in want {
        if have.get(p) == Some(c) {
            continue;
        }
        let path = root.join(p);
        match (have.get(p), c) {
            (_, None) => std::fs::create_dir_all(&path).unwrap(),
            (Some(Some(old)), Some(data)) if old.len() == data.len() => {
                // Same length: rewrite in place, without truncating.
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(data, 0).unwrap();
                f.sync_all().unwrap();
            }
            (_, Some(data)) => common::write_synced(&path, data),
        }
    }
    common::syncfs(root);
}

#[test]
fn ext4_checkpoint_restore_export_fork() {
    let den = Den::new();
    let seed = seed_from_env();
    eprintln!("seed {seed} (replay with DEN_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mp = den.root().join("mnt");

    den.ok(&["create", VOL, "--size", "512M", "--chunk-size", "256K"]);
    let mp_s = mp.to_str().unwrap();
    let d = den.mount(VOL, &[mp_s, "--format"]);
    assert_eq!(d.ready.mountpoint.as_deref(), Some(mp.as_path()));
    let dev = d.ready.device.clone().expect("a loop device");
    assert!(dev.to_str().unwrap().starts_with("/dev/loop"), "{dev:?}");
    assert!(common::is_mount_point(&mp));

    // v1: a tree of files, checkpointed while mounted (the daemon freezes ext4).
    let v1 = tree_v1(&mut rng);
    common::write_tree(&mp, &v1);
    assert_tree_eq(&read_tree(&mp), &v1, "written v1 tree");
    let ck1 = den.checkpoint(VOL, "first");
    assert_eq!(ck1, "v1");

    // v2: change, delete, add; checkpoint again.
    let v2 = tree_v2(&mut rng, &v1);
    apply(&mp, &v1, &v2);
    assert_tree_eq(&read_tree(&mp), &v2, "written v2 tree");
    let ck2 = den.checkpoint(VOL, "second");
    assert_eq!(ck2, "v2");

    // Live changes after the last checkpoint, which a restore must discard.
    let mut live = v2.clone();
    live.insert(PathBuf::from("after-v2"), Some(rng.bytes(300_000)));
    apply(&mp, &v2, &live);

    // Restoring a mounted volume is refused, clearly, and changes nothing.
    let err = den.fails(&["restore", VOL, &ck1]);
    assert!(err.contains("mounted"), "restore of a mounted volume: {err}");
    assert_tree_eq(&read_tree(&mp), &live, "tree after the refused restore");
    assert_eq!(den.checkpoint_ids(VOL), vec![ck2.clone(), ck1.clone()]);
    // Exporting the live volume while mounted is refused too; a checkpoint is fine.
    let err = den.fails(&["export", VOL, den.root().join("x.img").to_str().unwrap()]);
    assert!(err.contains("mounted"), "export of a mounted volume: {err}");
    let img2 = den.root().join("v2.img");
    den.ok(&["export", &format!("{VOL}@{ck2}"), img2.to_str().unwrap()]);
    assert_fsck_clean(&img2, "checkpoint v2 exported while mounted");

    d.stop();

    // Restore v1 and look at it through a fresh mount.
    den.ok(&["restore", VOL, &ck1]);
    let d = den.mount(VOL, &[mp_s]);
    assert_tree_eq(&read_tree(&mp), &v1, "volume restored to v1");
    d.stop();

    // The exported checkpoint is a clean filesystem with the v1 content.
    let img1 = den.root().join("v1.img");
    den.ok(&["export", &format!("{VOL}@{ck1}"), img1.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&img1).unwrap().len(), 512 << 20);
    assert_fsck_clean(&img1, "checkpoint v1");
    {
        let m = ImageMount::new(&img1, &den.root().join("img1"));
        assert_tree_eq(&read_tree(&m.dir), &v1, "exported v1 image");
    }
    // The checkpoints survive a restore; v2 still holds v2.
    assert_eq!(den.checkpoint_ids(VOL), vec![ck2.clone(), ck1.clone()]);

    // Fork v2 into a new volume; mount both at once.
    den.ok(&["fork", &format!("{VOL}@{ck2}"), "e2e-fork"]);
    let mp2 = den.root().join("mnt2");
    let fork = den.mount("e2e-fork", &[mp2.to_str().unwrap()]);
    let orig = den.mount(VOL, &[mp_s]);
    assert_tree_eq(&read_tree(&mp2), &v2, "fork of v2");
    assert_tree_eq(&read_tree(&mp), &v1, "original after the fork");
    // Writes to the fork do not reach the original.
    common::write_synced(&mp2.join("fork-only"), b"fork");
    assert!(!mp.join("fork-only").exists());
    fork.stop();
    orig.stop();
    assert!(den.checkpoint_ids("e2e-fork").is_empty());

    // Both volumes export clean filesystems after the clean unmounts.
    for name in [VOL, "e2e-fork"] {
        let img = den.root().join(format!("{name}-live.img"));
        den.ok(&["export", name, img.to_str().unwrap()]);
        assert_fsck_clean(&img, name);
    }
}

#[test]
fn clear_errors_for_impossible_requests() {
    let den = Den::new();
    let img = den.root().join("out.img");
    let img_s = img.to_str().unwrap();

    // Unknown volume, for every command that names one.
    for args in [
        vec!["info", "nope"],
        vec!["checkpoint", "nope"],
        vec!["checkpoints", "nope"],
        vec!["restore", "nope", "v1"],
        vec!["fork", "nope", "other"],
        vec!["fork", "nope@v1", "other"],
        vec!["export", "nope", img_s],
        vec!["export", "nope@v1", img_s],
        vec!["rm", "nope"],
        vec!["flush", "nope"],
        vec!["mount", "nope", "--no-loop"],
    ] {
        let err = den.fails(&args);
        assert!(
            err.contains("volume not found: nope"),
            "den volume {args:?} should say the volume is unknown:\n{err}"
        );
    }
    assert!(
        !den.run(&["info", "other"]).status.success(),
        "a failed fork must not create its target"
    );
    assert!(
        !img.exists(),
        "a failed export must not leave an image file behind"
    );

    den.ok(&["create", "vol", "--size", "16M", "--chunk-size", "64K"]);
    den.checkpoint("vol", "only");
    // Unknown checkpoint of a known volume.
    for args in [
        vec!["restore", "vol", "v9"],
        vec!["fork", "vol@v9", "other"],
        vec!["export", "vol@v9", img_s],
        vec!["create", "other", "--from", "vol@v9"],
    ] {
        let err = den.fails(&args);
        assert!(!img.exists(), "den volume {args:?} left an image file behind");
        assert!(
            err.contains("checkpoint not found") && err.contains("v9"),
            "den volume {args:?} should say the checkpoint is unknown:\n{err}"
        );
    }
    // Nothing was created by the failed commands.
    let ls = den.ok(&["ls", "--json"]);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&ls)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["vol".to_string()]);

    // Restore while mounted (FUSE file only): refused, data untouched.
    let d = den.mount("vol", &["--no-loop"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.ready.file)
            .unwrap();
        f.write_all_at(b"after the checkpoint", 4096).unwrap();
        f.sync_all().unwrap();
        let err = den.fails(&["restore", "vol", "v1"]);
        assert!(err.contains("vol is mounted"), "{err}");
        let mut buf = [0u8; 20];
        f.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"after the checkpoint");
    }
    // A mounted volume cannot be mounted twice or removed.
    let err = den.fails(&[
        "mount",
        "vol",
        "--no-loop",
        "--fuse-dir",
        den.root().join("f2").to_str().unwrap(),
    ]);
    assert!(err.contains("in use"), "second mount: {err}");
    let err = den.fails(&["rm", "vol"]);
    assert!(err.contains("in use"), "rm of a mounted volume: {err}");
    d.stop();

    // After unmounting, the restore goes through and drops the later write.
    den.ok(&["restore", "vol", "v1"]);
    den.ok(&["export", "vol", img_s]);
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), 16 << 20);
    assert!(
        data.iter().all(|&b| b == 0),
        "restored volume should be all zeros"
    );
}

/// Any `den volume …` command opens the store and recovers pending chunks,
/// which means uploading chunks a running daemon sealed but has not uploaded
/// yet (it may be backing off after a failed PUT). The daemon must keep
/// serving those chunks after the other process uploaded them and removed
/// their pending files.
#[test]
fn another_process_uploading_a_mounted_volumes_chunk() {
    use std::os::unix::fs::FileExt;

    let den = Den::new();
    let seed = seed_from_env();
    eprintln!("seed {seed} (replay with DEN_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    den.ok(&["create", "vol", "--size", "16M", "--chunk-size", "64K"]);
    let d = den.mount("vol", &["--no-loop"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&d.ready.file)
        .unwrap();

    // Make the daemon's PUT of this chunk fail: a directory sits where the
    // object goes. The daemon keeps retrying with growing backoff.
    let data = rng.bytes(64 << 10);
    let hex = blake3::hash(&data).to_hex().to_string();
    let blocker = den.data_dir.join("objects/chunks").join(&hex[..2]).join(&hex);
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    den.checkpoint("vol", "sealed, not uploaded");
    // Wait until the daemon has just started a backoff of at least a second.
    den_testkit::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(5),
        || last_upload_backoff(&d.log_text()) >= 1.0,
    )
    .unwrap_or_else(|_| panic!("the daemon's upload did not back off; log:\n{}", d.log_text()));

    // Now another process uploads it (while the daemon waits).
    std::fs::remove_dir_all(&blocker).unwrap();
    den.ok(&["checkpoint", "vol", "--wait"]);
    let pending: Vec<_> = std::fs::read_dir(den.data_dir.join("cache/pending"))
        .unwrap()
        .collect();
    assert!(
        pending.is_empty(),
        "the chunk should have been uploaded: {pending:?}"
    );

    // The daemon still reads and writes that chunk.
    let mut buf = vec![0u8; 64 << 10];
    f.read_exact_at(&mut buf, 0).unwrap_or_else(|e| {
        panic!(
            "reading a chunk uploaded by another process: {e}; log:\n{}",
            d.log_text()
        )
    });
    assert!(buf == data, "chunk content changed");
    f.write_all_at(b"partial", 1000).unwrap_or_else(|e| {
        panic!(
            "writing a chunk uploaded by another process: {e}; log:\n{}",
            d.log_text()
        )
    });
    f.sync_all().unwrap();
    let mut want = data.clone();
    want[1000..1007].copy_from_slice(b"partial");
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == want, "chunk content after a partial write");
    drop(f);
    d.stop();

    let img = den.root().join("vol.img");
    den.ok(&["export", "vol", img.to_str().unwrap()]);
    let out = std::fs::read(&img).unwrap();
    assert!(out[..64 << 10] == want[..], "exported chunk 0");
    assert!(out[64 << 10..].iter().all(|&b| b == 0), "rest of the volume");
    // Both checkpoints hold the original chunk.
    for ck in ["v1", "v2"] {
        den.ok(&["export", &format!("vol@{ck}"), img.to_str().unwrap()]);
        let out = std::fs::read(&img).unwrap();
        assert!(out[..64 << 10] == data[..], "chunk 0 of {ck}");
    }
}

/// The backoff (seconds) announced by the daemon's last failed upload
/// ("upload of pending chunk … failed, retrying in 1.6s: …"), or 0.
fn last_upload_backoff(log: &str) -> f64 {
    let Some(line) = log.lines().rev().find(|l| l.contains("failed, retrying in ")) else {
        return 0.0;
    };
    let rest = line.split("failed, retrying in ").nth(1).unwrap_or("");
    let delay = rest.split(':').next().unwrap_or("");
    if let Some(ms) = delay.strip_suffix("ms") {
        ms.parse::<f64>().map_or(0.0, |v| v / 1e3)
    } else {
        delay
            .strip_suffix('s')
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Operator commands run while the daemon is busy writing must not disturb
/// it: each one opens the store (and its cache) next to the daemon's.
#[test]
fn commands_while_the_daemon_writes() {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const CHUNK: u64 = 64 << 10;
    const CHUNKS: u64 = 256;
    let den = Den::new();
    den.ok(&["create", "vol", "--size", "16M", "--chunk-size", "64K"]);
    let d = den.mount("vol", &["--no-loop"]);
    let f = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d.ready.file)
            .unwrap(),
    );
    // Map every chunk, and seal them, so each first write below copies a
    // sealed chunk into a new dirty one (through the cache's tmp dir).
    let mut model = vec![0u8; (CHUNK * CHUNKS) as usize];
    for (i, b) in model.iter_mut().enumerate() {
        *b = (i / 4096) as u8 | 1;
    }
    f.write_all_at(&model, 0).unwrap();
    f.sync_all().unwrap();
    den.checkpoint("vol", "base");

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || -> Result<Vec<(u64, u8)>, String> {
            let mut writes = Vec::new();
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                for c in 0..CHUNKS {
                    let off = c * CHUNK + 4096 * (u64::from(round) % 16);
                    f.write_all_at(&[round; 512], off)
                        .map_err(|e| format!("write at {off} in round {round}: {e}"))?;
                    writes.push((off, round));
                }
                f.sync_all().map_err(|e| format!("fsync: {e}"))?;
            }
            Ok(writes)
        })
    };
    // Checkpoints make the written chunks sealed again for the next round.
    for i in 0..12 {
        match i % 4 {
            0 => drop(den.checkpoint("vol", "busy")),
            1 => drop(den.ok(&["ls"])),
            2 => drop(den.ok(&["info", "vol"])),
            _ => drop(den.ok(&["checkpoints", "vol"])),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the daemon failed a write while commands ran: {e}; log:\n{}",
            d.log_text()
        )
    });
    for (off, v) in &writes {
        model[*off as usize..*off as usize + 512].fill(*v);
    }
    let mut got = vec![0u8; model.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == model, "volume content after concurrent commands");
    drop(f);
    d.stop();
}
