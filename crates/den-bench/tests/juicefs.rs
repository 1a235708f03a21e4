//! Tiny end-to-end run on JuiceFS next to native ext4.
//!
//! JuiceFS is a required baseline: when the binary is missing this test
//! fails (CI installs it), it never skips.

mod common;

use den_bench::{JuiceFs, NativeExt4, Report, Target, WorkloadConfig, WorkloadSet, find_juicefs};

#[test]
fn tiny_workloads_on_juicefs() {
    common::require_root();
    if let Err(e) = find_juicefs() {
        panic!("JuiceFS is required for the den-bench baseline test: {e:#}");
    }
    let work = tempfile::tempdir().unwrap();
    let native = NativeExt4::setup(work.path(), 256 << 20).expect("set up native ext4");
    let juice = JuiceFs::setup(work.path()).expect("set up juicefs");

    let set = WorkloadSet::new(WorkloadConfig::tiny()).unwrap();
    let results = set.run_targets(&[&native, &juice]);
    Box::new(juice).teardown().expect("tear down juicefs");
    Box::new(native).teardown().expect("tear down native ext4");
    let results = results.expect("run workloads");

    for r in &results {
        common::assert_positive(r);
    }
    let report = Report::new(results);
    common::assert_renders(
        &report,
        &[NativeExt4::NAME, JuiceFs::NAME],
        &["juicefs / native-ext4"],
    );

    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let work_path = work.path().canonicalize().unwrap();
    assert!(
        !mounts.contains(work_path.to_str().unwrap()),
        "mount left behind:\n{mounts}"
    );
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}
