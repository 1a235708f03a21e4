//! Tiny end-to-end run on native ext4 (loop-mounted image) and a plain dir.

mod common;

use den_bench::{NativeExt4, PlainDir, Report, Target, WorkloadConfig, WorkloadSet};

#[test]
fn tiny_workloads_on_native_ext4_and_plain_dir() {
    common::require_root();
    let work = tempfile::tempdir().unwrap();
    let native = NativeExt4::setup(work.path(), 256 << 20).expect("set up native ext4");
    let plain = PlainDir::setup(work.path()).expect("set up plain dir");

    let set = WorkloadSet::new(WorkloadConfig::tiny()).unwrap();
    let results = set.run_targets(&[&native, &plain]);
    // Tear down before asserting so a failed assertion cannot leak mounts
    // (the guards would also do it on unwind, but this reports errors).
    Box::new(native).teardown().expect("tear down native ext4");
    Box::new(plain).teardown().expect("tear down plain dir");
    let results = results.expect("run workloads");

    assert_eq!(results.len(), 2);
    assert_eq!(results[0].name, NativeExt4::NAME);
    for r in &results {
        common::assert_positive(r);
        let rep = &r.reps[0];
        assert_eq!(rep.seq_write.bytes, 8 << 20);
        assert_eq!(rep.seq_read.bytes, 8 << 20);
        assert_eq!(rep.small_files.files, 200);
        assert!(rep.rand_write.writes <= 200);
    }

    let report = Report::new(results).with_range(true);
    common::assert_renders(
        &report,
        &[NativeExt4::NAME, PlainDir::NAME],
        &["plain-dir / native-ext4"],
    );

    // Nothing of ours is left mounted or on disk.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let work_path = work.path().canonicalize().unwrap();
    assert!(
        !mounts.contains(work_path.to_str().unwrap()),
        "mount left behind:\n{mounts}"
    );
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn teardown_on_drop_releases_loop_device() {
    common::require_root();
    let work = tempfile::tempdir().unwrap();
    let native = NativeExt4::setup(work.path(), 64 << 20).expect("set up native ext4");
    let dev = native.device().to_owned();
    let dir = native.dir().to_owned();
    drop(native);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(dir.to_str().unwrap()), "still mounted");
    let backing = dev
        .file_name()
        .map(|n| format!("/sys/block/{}/loop/backing_file", n.to_string_lossy()))
        .unwrap();
    // The device number may be reused by someone else at once, so check
    // that it no longer points at our image rather than that it is free.
    let work_path = work.path().canonicalize().unwrap();
    let still_ours = std::fs::read_to_string(&backing).is_ok_and(|b| b.contains(work_path.to_str().unwrap()));
    assert!(!still_ours, "{} still attached to our image", dev.display());
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn failed_setup_leaves_nothing_behind() {
    common::require_root();
    let work = tempfile::tempdir().unwrap();
    // Far too small for an ext4 filesystem, so mkfs fails after the work dir
    // and image already exist.
    let err = NativeExt4::setup(work.path(), 4096)
        .err()
        .expect("mkfs on a 4 KiB image should fail");
    assert!(format!("{err:#}").contains("mkfs.ext4"), "{err:#}");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}
