use den_bench::{Report, TargetResult};

/// The benchmarks need root (loop devices, mount, drop_caches); say so
/// instead of failing somewhere deep in losetup.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "den-bench tests must run as root (loop devices, mount, drop_caches)"
    );
}

pub fn assert_positive(r: &TargetResult) {
    assert!(!r.reps.is_empty(), "{}: no repetitions", r.name);
    for rep in &r.reps {
        assert!(rep.seq_write.mb_per_s > 0.0, "{}: {:?}", r.name, rep.seq_write);
        assert!(rep.seq_read.mb_per_s > 0.0, "{}: {:?}", r.name, rep.seq_read);
        assert!(rep.rand_write.iops > 0.0, "{}: {:?}", r.name, rep.rand_write);
        assert!(rep.rand_write.writes > 0, "{}: {:?}", r.name, rep.rand_write);
        assert!(!rep.rand_write.p50.is_zero(), "{}: {:?}", r.name, rep.rand_write);
        assert!(
            rep.rand_write.p99 >= rep.rand_write.p50,
            "{}: {:?}",
            r.name,
            rep.rand_write
        );
        assert!(
            rep.small_files.files_per_s > 0.0,
            "{}: {:?}",
            r.name,
            rep.small_files
        );
    }
    let s = r.summary();
    for v in [
        s.seq_write_mb_s,
        s.seq_read_mb_s,
        s.rand_write_iops,
        s.small_files_per_s,
    ] {
        assert!(v.is_finite() && v > 0.0, "{}: {s:?}", r.name);
    }
}

/// Both renderings carry every target, the ratio columns and all six rows.
pub fn assert_renders(report: &Report, names: &[&str], ratio_headers: &[&str]) {
    let table = report.table().to_string();
    let md = report.markdown();
    println!("{table}\n\n{md}");
    for needle in names
        .iter()
        .chain(ratio_headers)
        .chain(&["Sequential write", "p99"])
    {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
        assert!(md.contains(needle), "markdown lacks {needle:?}:\n{md}");
    }
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 2 + 6, "header + separator + 6 rows:\n{md}");
    let cols = 2 + names.len() + ratio_headers.len();
    for line in &lines {
        assert_eq!(line.matches(" | ").count() + 1, cols, "bad row {line:?}");
    }
    assert!(
        lines[1].contains("---:"),
        "numbers should be right-aligned:\n{md}"
    );
}
