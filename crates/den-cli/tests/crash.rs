//! `kill -9` crash consistency of `den volume mount`.
//!
//! * [`kill9_fuse_file`]: random writes, punched holes, fsyncs and
//!   checkpoints straight on the FUSE disk file, the daemon SIGKILLed at a
//!   random point (idle, with unsynced writes, with a checkpoint or writes in
//!   flight), restarted, and checked: completed checkpoints export
//!   byte-identical, fsynced data reads back, metadata refcounts agree.
//! * [`kill9_ext4`]: the same with ext4 on the loop device: checkpoints taken
//!   while mounted (the daemon freezes the filesystem) must export as clean
//!   filesystems with the right files, and fsynced files survive the crash.
//!
//! Every run prints its seed; `DEN_TEST_SEED=N` replays it.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::{Den, ImageMount, Ready, Rng, Tree, assert_fsck_clean, assert_tree_eq, read_tree};
use den_store::MetaStore;
use den_testkit::wait_until;

const VOL: &str = "crash";
const SIZE: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;
const BLOCK: u64 = 4096;

type Digest = [u8; 32];

/// Per-chunk digests of a whole volume image.
fn digests(data: &[u8]) -> Vec<Digest> {
    data.chunks(CHUNK as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

/// What the volume must contain.
struct Model {
    /// Content after every completed write.
    current: Vec<u8>,
    /// Content as of the last fsync.
    synced: Vec<u8>,
    /// Blocks written since the last fsync, with every value they were given
    /// (after a crash each such block holds its synced value or one of these).
    unsynced: BTreeMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    fn new() -> Model {
        Model {
            current: vec![0; SIZE as usize],
            synced: vec![0; SIZE as usize],
            unsynced: BTreeMap::new(),
        }
    }

    /// Record that `data` may have been written at `off`.
    fn note_write(&mut self, off: u64, data: &[u8]) {
        for (i, blk) in data.chunks(BLOCK as usize).enumerate() {
            self.unsynced
                .entry(off / BLOCK + i as u64)
                .or_default()
                .push(blk.to_vec());
        }
    }

    fn apply(&mut self, off: u64, data: &[u8]) {
        self.note_write(off, data);
        self.current[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    fn fsynced(&mut self) {
        for &b in self.unsynced.keys() {
            let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            self.synced[r.clone()].copy_from_slice(&self.current[r]);
        }
        self.unsynced.clear();
    }

    /// Check what survived a crash; afterwards the model is what was read.
    fn check_after_crash(&mut self, actual: Vec<u8>, ctx: &str) {
        assert_eq!(actual.len(), SIZE as usize);
        let mut bad = Vec::new();
        // Blocks whose completed but unsynced writes are gone (allowed, but
        // with direct I/O to the daemon a kill -9 should not lose any), and
        // blocks that took a value from a write still in flight.
        let (mut lost_unsynced, mut landed_in_flight) = (0usize, 0usize);
        for b in 0..SIZE / BLOCK {
            let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            let got = &actual[r.clone()];
            let current = &self.current[r.clone()];
            if got == &self.synced[r.clone()] {
                lost_unsynced += usize::from(got != current);
                continue;
            }
            match self.unsynced.get(&b) {
                Some(vals) if vals.iter().any(|v| v.as_slice() == got) => {
                    landed_in_flight += usize::from(got != current);
                }
                alts => bad.push(format!(
                    "block {b} (byte {}, chunk {}): got {}, fsynced value is {}{}",
                    b * BLOCK,
                    b * BLOCK / CHUNK,
                    describe(got),
                    describe(&self.synced[r]),
                    match alts {
                        Some(v) => format!(", {} unsynced values were written since", v.len()),
                        None => ", not written since the last fsync".to_string(),
                    }
                )),
            }
        }
        assert!(
            bad.is_empty(),
            "{ctx}: {} blocks lost fsynced data:\n  {}",
            bad.len(),
            bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ")
        );
        eprintln!(
            "{ctx}: after the crash {lost_unsynced} blocks lost unsynced writes (allowed), \
             {landed_in_flight} blocks hold data of writes in flight at the kill"
        );
        self.synced.copy_from_slice(&actual);
        self.current = actual;
        self.unsynced.clear();
    }
}

fn describe(b: &[u8]) -> String {
    if b.iter().all(|&x| x == 0) {
        "zeros".to_string()
    } else {
        format!("{:02x?}…", &b[..8])
    }
}

fn read_all(f: &File) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    for (i, c) in buf.chunks_mut(1 << 20).enumerate() {
        f.read_exact_at(c, (i as u64) << 20)
            .unwrap_or_else(|e| panic!("reading the disk file at {}: {e}", (i as u64) << 20));
    }
    buf
}

fn open_disk(r: &Ready) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&r.file)
        .unwrap_or_else(|e| panic!("open {}: {e}", r.file.display()))
}

fn punch(f: &File, off: u64, len: u64) {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(r, 0, "punch {off}+{len}: {}", std::io::Error::last_os_error());
}

/// A random block-aligned write: mostly random bytes, sometimes zeros,
/// sometimes exactly one chunk, often straddling chunk boundaries.
fn random_write(rng: &mut Rng) -> (u64, Vec<u8>) {
    let blocks = SIZE / BLOCK;
    let (off, len) = if rng.chance(15) {
        (rng.range(0, SIZE / CHUNK) * CHUNK, CHUNK)
    } else {
        let n = rng.range(1, 49);
        let start = rng.range(0, blocks - n);
        (start * BLOCK, n * BLOCK)
    };
    let data = if rng.chance(10) {
        vec![0u8; len as usize]
    } else {
        rng.bytes(len as usize)
    };
    (off, data)
}

/// Spawn `den volume checkpoint VOL --json` without waiting for it.
fn spawn_checkpoint(den: &Den) -> Child {
    den.command()
        .args(["volume", "checkpoint", VOL, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn den volume checkpoint")
}

/// Wait (bounded) for a spawned checkpoint; its id if it reported success.
fn finish_checkpoint(mut child: Child) -> Result<String, String> {
    let mut done = None;
    wait_until(Duration::from_secs(60), Duration::from_millis(10), || {
        done = child.try_wait().expect("try_wait");
        done.is_some()
    })
    .unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("den volume checkpoint hangs");
    });
    let out = child.wait_with_output().expect("checkpoint output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        Ok(common::checkpoint_id(&stdout).unwrap_or_else(|| panic!("no id in {stdout:?}")))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `meta.verify_refcounts()` on the store's metadata, read in-process (no
/// `Store::open`, which would start uploading the daemon's pending chunks).
fn assert_refcounts(den: &Den, ctx: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bad = rt.block_on(async {
        let meta =
            den_store::meta::sqlite::SqliteMeta::open(&den.data_dir.join("meta.db")).expect("open meta.db");
        meta.verify_refcounts().await.expect("verify_refcounts")
    });
    assert!(
        bad.is_empty(),
        "{ctx}: chunk refcounts disagree with the maps: {bad:?}"
    );
}

/// Export `VOL@id` and compare it with the expected per-chunk digests.
fn assert_checkpoint(den: &Den, id: &str, want: &[Digest], ctx: &str) {
    let img = den.root().join(format!("export-{id}.img"));
    den.ok(&["export", &format!("{VOL}@{id}"), img.to_str().unwrap()]);
    let data = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    assert_eq!(data.len() as u64, SIZE, "{ctx}: size of exported {id}");
    let got = digests(&data);
    let bad: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
    assert!(
        bad.is_empty(),
        "{ctx}: checkpoint {id} differs from what was written in {} chunks, first {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

struct Checkpoints {
    /// Reported complete: id → content digests.
    done: Vec<(String, Vec<Digest>)>,
    /// Content at a checkpoint whose command failed because the daemon was
    /// killed under it; if it committed after all, it must hold this.
    unacknowledged: Option<Vec<Digest>>,
    verified: usize,
}

impl Checkpoints {
    /// (a) + (c): every completed checkpoint is listed and exports identical.
    fn verify(&mut self, den: &Den, all: bool, ctx: &str) {
        let listed = den.checkpoint_ids(VOL);
        for (id, _) in &self.done {
            assert!(
                listed.contains(id),
                "{ctx}: completed checkpoint {id} is not listed: {listed:?}"
            );
        }
        for id in &listed {
            if self.done.iter().any(|(d, _)| d == id) {
                continue;
            }
            let want = self.unacknowledged.take().unwrap_or_else(|| {
                panic!("{ctx}: checkpoint {id} is listed but was never taken (listed {listed:?})")
            });
            eprintln!("{ctx}: checkpoint {id} committed although its command failed; checking it");
            self.done.push((id.clone(), want));
        }
        self.unacknowledged = None;
        let from = if all { 0 } else { self.verified };
        for (id, want) in &self.done[from..] {
            assert_checkpoint(den, id, want, ctx);
        }
        self.verified = self.done.len();
    }
}

/// How the daemon dies.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Right after an fsync, nothing in flight.
    Idle,
    /// After writes that were not fsynced.
    Unsynced,
    /// Right after spawning `den volume checkpoint`.
    DuringCheckpoint,
    /// While another thread keeps writing.
    DuringWrites,
}

#[test]
fn kill9_fuse_file() {
    let den = Den::new();
    let seed = common::seed_from_env();
    eprintln!("kill9_fuse_file: seed {seed} (replay with DEN_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    den.ok(&["create", VOL, "--size", "64M", "--chunk-size", "64K"]);

    let mut model = Model::new();
    let mut cks = Checkpoints {
        done: Vec::new(),
        unacknowledged: None,
        verified: 0,
    };
    // Every way of dying once, in a seed-dependent order.
    let mut kills = [
        Kill::Idle,
        Kill::Unsynced,
        Kill::DuringCheckpoint,
        Kill::DuringWrites,
    ];
    for i in (1..kills.len()).rev() {
        kills.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    let started = Instant::now();
    let mut total_iters = 0;
    for (cycle, how) in kills.into_iter().enumerate() {
        let ctx = format!("seed {seed}, cycle {cycle}");
        let d = den.mount(VOL, &["--no-loop"]);
        // The previous daemon's dead FUSE mount is gone (removed by the test
        // or by the daemon itself on start).
        assert_eq!(
            common::mount_count(d.ready.fuse_dir()),
            1,
            "{ctx}: mounts stacked on {}",
            d.ready.fuse_dir().display()
        );
        let f = Arc::new(open_disk(&d.ready));
        if cycle > 0 {
            model.check_after_crash(read_all(&f), &ctx);
            cks.verify(&den, false, &ctx);
            assert_refcounts(&den, &ctx);
        }

        let iters = rng.range(8, 12);
        for it in 0..iters {
            total_iters += 1;
            for _ in 0..rng.range(1, 6) {
                if rng.chance(12) {
                    // Punch a hole: whole chunks (unmapped) or a block range (zero-filled).
                    let (off, len) = if rng.chance(60) {
                        let n = rng.range(1, 4);
                        (rng.range(0, SIZE / CHUNK - n) * CHUNK, n * CHUNK)
                    } else {
                        let n = rng.range(1, 20);
                        (rng.range(0, SIZE / BLOCK - n) * BLOCK, n * BLOCK)
                    };
                    punch(&f, off, len);
                    model.apply(off, &vec![0; len as usize]);
                } else {
                    let (off, data) = random_write(&mut rng);
                    f.write_all_at(&data, off)
                        .unwrap_or_else(|e| panic!("{ctx}: pwrite {off}+{}: {e}", data.len()));
                    model.apply(off, &data);
                }
            }
            f.sync_all().unwrap_or_else(|e| panic!("{ctx}: fsync: {e}"));
            model.fsynced();
            if it % 3 == 2 || rng.chance(15) {
                let id = den.checkpoint(VOL, &format!("cycle {cycle} iteration {it}"));
                cks.done.push((id, digests(&model.current)));
            }
        }

        eprintln!("{ctx}: {iters} iterations, then kill -9 {how:?}");
        let ready = match how {
            Kill::Idle => d.kill9(),
            Kill::Unsynced => {
                for _ in 0..rng.range(1, 8) {
                    let (off, data) = random_write(&mut rng);
                    f.write_all_at(&data, off).unwrap();
                    model.apply(off, &data);
                }
                d.kill9()
            }
            Kill::DuringCheckpoint => {
                let child = spawn_checkpoint(&den);
                let ready = d.kill9();
                match finish_checkpoint(child) {
                    Ok(id) => {
                        eprintln!("{ctx}: checkpoint {id} completed although the daemon was killed");
                        cks.done.push((id, digests(&model.current)));
                    }
                    Err(e) => {
                        eprintln!("{ctx}: checkpoint killed with the daemon: {}", e.trim());
                        cks.unacknowledged = Some(digests(&model.current));
                    }
                }
                ready
            }
            Kill::DuringWrites => {
                let plan: Vec<(u64, Vec<u8>)> = (0..40).map(|_| random_write(&mut rng)).collect();
                for (off, data) in &plan {
                    model.note_write(*off, data);
                }
                let wait_for = rng.range(0, 10) as usize;
                let (tx, rx) = mpsc::channel();
                let wf = f.clone();
                let writer = thread::spawn(move || {
                    for (i, (off, data)) in plan.iter().enumerate() {
                        if wf.write_all_at(data, *off).is_err() {
                            break;
                        }
                        let _ = tx.send(i);
                    }
                });
                for _ in 0..wait_for {
                    rx.recv_timeout(Duration::from_secs(30))
                        .expect("writer makes progress");
                }
                let ready = d.kill9();
                // Once the daemon is gone every request fails, so the writer ends.
                wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
                    writer.is_finished()
                })
                .expect("writer thread ends after the kill");
                writer.join().unwrap();
                ready
            }
        };
        drop(f);
        // Half of the time clean up like an operator would; otherwise the
        // next daemon must remove the dead FUSE mount itself.
        if cycle % 2 == 0 {
            common::cleanup_crash(&ready);
        } else {
            assert!(
                common::is_mount_point(ready.fuse_dir()),
                "dead FUSE mount expected"
            );
        }
    }

    // Final restart: check, then a clean stop (which flushes everything).
    let ctx = format!("seed {seed}, final");
    let d = den.mount(VOL, &["--no-loop"]);
    assert_eq!(
        common::mount_count(d.ready.fuse_dir()),
        1,
        "{ctx}: stacked mounts"
    );
    let f = open_disk(&d.ready);
    model.check_after_crash(read_all(&f), &ctx);
    drop(f);
    d.stop();
    cks.verify(&den, true, &ctx);
    assert!(
        cks.done.len() >= 4,
        "{ctx}: only {} checkpoints taken",
        cks.done.len()
    );
    assert_refcounts(&den, &ctx);

    // The unmounted volume exports exactly the model, and nothing is left
    // only locally after the clean stop.
    let img = den.root().join("live.img");
    den.ok(&["export", VOL, img.to_str().unwrap()]);
    let live = std::fs::read(&img).unwrap();
    assert!(
        live == model.current,
        "{ctx}: exported volume differs from the model"
    );
    let info: serde_json::Value = serde_json::from_str(&den.ok(&["info", VOL, "--json"])).unwrap();
    assert_eq!(
        info["pending_chunks"], 0,
        "{ctx}: chunks left unuploaded after a clean stop: {info}"
    );

    // GC after all those crashes must not take anything still referenced.
    den.ok(&["gc", "--sweep"]);
    assert_refcounts(&den, &format!("{ctx}, after gc"));
    cks.verify(&den, true, &format!("{ctx}, after gc"));
    eprintln!(
        "kill9_fuse_file: {total_iters} iterations, {} checkpoints, {:.1?}",
        cks.done.len(),
        started.elapsed()
    );
}

/// One round of file changes: add, rewrite and delete files, fsynced.
fn change_files(rng: &mut Rng, root: &Path, tree: &mut Tree, round: usize) {
    let dir = PathBuf::from(format!("round-{round}"));
    std::fs::create_dir_all(root.join(&dir)).unwrap();
    tree.insert(dir.clone(), None);
    for i in 0..rng.range(3, 8) {
        let len = match rng.range(0, 4) {
            0 => rng.range(0, 5000),
            1 => rng.range(4096, 300_000),
            _ => rng.range(300_000, 1_500_000),
        } as usize;
        let p = dir.join(format!("f{i}"));
        let data = rng.bytes(len);
        common::write_synced(&root.join(&p), &data);
        tree.insert(p, Some(data));
    }
    let files: Vec<PathBuf> = tree
        .iter()
        .filter(|(p, c)| c.is_some() && !p.starts_with(&dir))
        .map(|(p, _)| p.clone())
        .collect();
    if !files.is_empty() {
        // Rewrite one file in place and delete another.
        let p = &files[rng.range(0, files.len() as u64) as usize];
        let data = tree.get_mut(p).unwrap().as_mut().unwrap();
        if !data.is_empty() {
            let at = rng.range(0, data.len() as u64) as usize;
            let n = (data.len() - at).min(8192);
            rng.fill(&mut data[at..at + n]);
            let f = OpenOptions::new().write(true).open(root.join(p)).unwrap();
            f.write_all_at(&data[at..at + n], at as u64).unwrap();
            f.sync_all().unwrap();
        }
        let q = files[rng.range(0, files.len() as u64) as usize].clone();
        std::fs::remove_file(root.join(&q)).unwrap();
        common::sync_dir(root.join(&q).parent().unwrap());
        tree.remove(&q);
    }
    common::syncfs(root);
}

/// Check an exported checkpoint image: a clean ext4 holding `want`. With
/// `replay`, the image may be a crash image of a live filesystem (a
/// checkpoint that raced with the kill), whose journal is replayed first.
fn check_ext4_image(img: &Path, mnt: &Path, want: &Tree, replay: bool, ctx: &str) {
    if replay {
        let out = Command::new("e2fsck")
            .args(["-E", "journal_only", "-y"])
            .arg(img)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{ctx}: journal replay of {} failed: {}{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_fsck_clean(img, ctx);
    let m = ImageMount::new(img, mnt);
    assert_tree_eq(&read_tree(&m.dir), want, ctx);
}

#[test]
fn kill9_ext4() {
    let den = Den::new();
    let seed = common::seed_from_env();
    eprintln!("kill9_ext4: seed {seed} (replay with DEN_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    let mp = den.root().join("mnt");
    let mp_s = mp.to_str().unwrap().to_string();
    den.ok(&["create", VOL, "--size", "256M", "--chunk-size", "128K"]);

    let mut tree = Tree::new();
    let mut done: Vec<(String, Tree)> = Vec::new();
    let mut race: Option<Tree> = None;
    let mut round = 0;
    for cycle in 0..2 {
        let ctx = format!("seed {seed}, cycle {cycle}");
        let args: Vec<&str> = if cycle == 0 {
            vec![&mp_s, "--format"]
        } else {
            vec![&mp_s]
        };
        let d = den.mount(VOL, &args);
        assert_single_mounts(&d.ready, &ctx);
        // Everything fsynced before the crash is there (after journal replay).
        assert_tree_eq(
            &read_tree(&mp),
            &tree,
            &format!("{ctx}: live filesystem after restart"),
        );

        for _ in 0..3 {
            change_files(&mut rng, &mp, &mut tree, round);
            round += 1;
            let id = den.checkpoint(VOL, &format!("round {round}"));
            done.push((id, tree.clone()));
        }
        // Changes after the last checkpoint, fsynced: they must survive too.
        change_files(&mut rng, &mp, &mut tree, round);
        round += 1;

        let ready: Ready = if rng.chance(50) {
            eprintln!("{ctx}: kill -9 with a checkpoint in flight");
            let child = spawn_checkpoint(&den);
            let ready = d.kill9();
            match finish_checkpoint(child) {
                // It may have been taken by the daemon (frozen, clean) or, if
                // the daemon was already gone, by the command itself from the
                // crash image; replay the journal before checking it.
                Ok(id) => {
                    race = None;
                    done.push((format!("race:{id}"), tree.clone()));
                }
                Err(e) => {
                    eprintln!("{ctx}: checkpoint failed with the daemon: {}", e.trim());
                    race = Some(tree.clone());
                }
            }
            ready
        } else {
            eprintln!("{ctx}: kill -9 idle");
            d.kill9()
        };
        if cycle == 0 {
            kill_leftovers(&ready, &mp);
        } else {
            // Leave the dead filesystem, loop device and FUSE mount (perhaps
            // frozen) to the next daemon.
            assert!(common::is_mount_point(&mp));
        }
    }

    // Restart once more: the live filesystem has every fsynced file.
    let d = den.mount(VOL, &[&mp_s]);
    assert_single_mounts(&d.ready, &format!("seed {seed}, final"));
    assert_tree_eq(
        &read_tree(&mp),
        &tree,
        &format!("seed {seed}, final: live filesystem"),
    );
    d.stop();
    let img = den.root().join("live.img");
    den.ok(&["export", VOL, img.to_str().unwrap()]);
    assert_fsck_clean(&img, "the live volume after a clean stop");

    // Every completed checkpoint is a clean filesystem with its files.
    let listed = den.checkpoint_ids(VOL);
    let mnt = den.root().join("img");
    for (id, want) in &done {
        let (id, replay) = match id.strip_prefix("race:") {
            Some(id) => (id, true),
            None => (id.as_str(), false),
        };
        assert!(
            listed.iter().any(|l| l == id),
            "checkpoint {id} not listed: {listed:?}"
        );
        den.ok(&["export", &format!("{VOL}@{id}"), img.to_str().unwrap()]);
        check_ext4_image(&img, &mnt, want, replay, &format!("seed {seed}: checkpoint {id}"));
    }
    for id in &listed {
        let known = done
            .iter()
            .any(|(d, _)| d == id || d.strip_prefix("race:") == Some(id));
        if !known {
            let want = race
                .take()
                .unwrap_or_else(|| panic!("checkpoint {id} listed but never taken: {listed:?}"));
            den.ok(&["export", &format!("{VOL}@{id}"), img.to_str().unwrap()]);
            check_ext4_image(
                &img,
                &mnt,
                &want,
                true,
                &format!("seed {seed}: raced checkpoint {id}"),
            );
        }
    }
    assert_refcounts(&den, &format!("seed {seed}"));
}

/// A restarted daemon serves the only mounts on its FUSE dir and mountpoint:
/// nothing stale of a crashed one is left underneath.
fn assert_single_mounts(r: &Ready, ctx: &str) {
    let mp = r.mountpoint.as_ref().expect("mountpoint");
    assert_eq!(
        common::mount_count(mp),
        1,
        "{ctx}: mounts stacked on {}",
        mp.display()
    );
    assert_eq!(
        common::mount_count(r.fuse_dir()),
        1,
        "{ctx}: mounts stacked on {}",
        r.fuse_dir().display()
    );
}

/// After a kill: what a dead daemon with ext4 mounted leaves behind must go
/// before the volume can be served again.
fn kill_leftovers(ready: &Ready, mp: &Path) {
    assert!(
        common::is_mount_point(mp),
        "ext4 should still be mounted after the kill"
    );
    let dev = ready.device.as_ref().expect("loop device");
    assert_eq!(
        common::loop_backing_file(dev).as_deref(),
        Some(ready.file.as_path())
    );
    common::cleanup_crash(ready);
    let gone = || {
        !common::is_mount_point(mp)
            && !common::is_mount_point(ready.fuse_dir())
            && common::loop_backing_file(dev).as_deref() != Some(ready.file.as_path())
    };
    wait_until(Duration::from_secs(30), Duration::from_millis(20), gone)
        .unwrap_or_else(|_| panic!("crash leftovers of {ready:?} did not go away"));
}

/// A punched hole (the loop driver's DISCARD / WRITE_ZEROES) that was
/// fsynced must still read as zeros after a crash, also where it unmapped
/// whole chunks that were already sealed into the volume's map.
#[test]
fn kill9_after_fsynced_punch_hole() {
    let den = Den::new();
    let seed = common::seed_from_env();
    eprintln!("seed {seed} (replay with DEN_TEST_SEED={seed})");
    let mut rng = Rng::new(seed);
    den.ok(&["create", VOL, "--size", "64M", "--chunk-size", "64K"]);
    let d = den.mount(VOL, &["--no-loop"]);
    let f = open_disk(&d.ready);
    let mut model = Model::new();
    let data = rng.bytes(8 * CHUNK as usize);
    f.write_all_at(&data, 0).unwrap();
    model.apply(0, &data);
    f.sync_all().unwrap();
    model.fsynced();
    // Seal the chunks into the map.
    den.checkpoint(VOL, "before the holes");
    // Whole chunks 1-2, then a block range inside chunk 5.
    punch(&f, CHUNK, 2 * CHUNK);
    model.apply(CHUNK, &vec![0; 2 * CHUNK as usize]);
    punch(&f, 5 * CHUNK + BLOCK, 3 * BLOCK);
    model.apply(5 * CHUNK + BLOCK, &vec![0; 3 * BLOCK as usize]);
    f.sync_all().unwrap();
    model.fsynced();
    drop(f);
    let ready = d.kill9();
    common::cleanup_crash(&ready);

    let d = den.mount(VOL, &["--no-loop"]);
    let f = open_disk(&d.ready);
    model.check_after_crash(read_all(&f), &format!("seed {seed}"));
    drop(f);
    d.stop();
}

/// A crash between a seal's metadata commit and the removal of the sealed
/// dirty files leaves a dirty file that is a hard link of the sealed (and
/// maybe already uploaded and read-cached) chunk. Adopting it on the next
/// open must not let new writes change the sealed chunk in place.
#[test]
fn adopted_dirty_chunk_does_not_alias_sealed_chunk() {
    use den_store::{CreateOptions, Store, StoreConfig};

    den_testkit::require_root();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = StoreConfig::local(dir.path());
    let old = vec![0xAAu8; CHUNK as usize];
    let saved = dir.path().join("saved-dirty");
    let dirty = rt.block_on(async {
        let store = Store::open(cfg.clone()).await.unwrap();
        store
            .create_volume(
                "v",
                CreateOptions {
                    size: Some(1 << 20),
                    chunk_size: Some(CHUNK as u32),
                    source: None,
                },
            )
            .await
            .unwrap();
        let vol = store.open_volume("v").await.unwrap();
        let dirty = dir.path().join("cache/dirty").join(&vol.record().id).join("0");
        let (v, d, o, s) = (vol.clone(), dirty.clone(), old.clone(), saved.clone());
        tokio::task::spawn_blocking(move || {
            v.write_at(0, &o).unwrap();
            // What the crash would leave: a second name for the dirty file.
            std::fs::hard_link(&d, &s).unwrap();
        })
        .await
        .unwrap();
        let ck = store.checkpoint("v", "sealed").await.unwrap();
        // Uploaded, and linked into the read cache.
        store.wait_durable("v", &ck.id).await.unwrap();
        drop(vol);
        dirty
    });
    drop(rt);
    // The crash state: the dirty file is back, same inode as the sealed chunk.
    std::fs::rename(&saved, &dirty).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(cfg).await.unwrap();
        let vol = store.open_volume("v").await.unwrap();
        let v = vol.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK as usize];
            v.read_at(0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0xAA), "adopted dirty chunk content");
            v.write_at(0, &[0x55u8; 4096]).unwrap();
            v.fsync().unwrap();
        })
        .await
        .unwrap();
        let r = store.read_checkpoint("v", "v1").await.unwrap();
        let chunk = tokio::task::spawn_blocking(move || r.read_chunk(0))
            .await
            .unwrap()
            .unwrap();
        assert!(
            chunk.iter().all(|&b| b == 0xAA),
            "checkpoint v1 changed by a write to the live volume (first bytes {:02x?})",
            &chunk[..8]
        );
        // A fork of v1 reads the same (it comes from the read cache too).
        store
            .fork(
                "f",
                den_store::VolumeSource::Checkpoint {
                    volume: "v".into(),
                    checkpoint: "v1".into(),
                },
            )
            .await
            .unwrap();
        let fv = store.open_volume("f").await.unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK as usize];
            fv.read_at(0, &mut buf).unwrap();
            buf
        })
        .await
        .unwrap();
        assert!(
            got.iter().all(|&b| b == 0xAA),
            "fork of v1 changed by a write to v"
        );
    });
}
