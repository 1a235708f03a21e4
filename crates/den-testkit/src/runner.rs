//! The runner of den's `harness = false` test binaries: binaries that must
//! also act as `den` (shim, agent) can't use libtest, which would take those
//! subcommands for test filters.
//!
//! Arguments that don't start with `-` are filters: a test runs if its name
//! contains one of them. Output looks like libtest's.

use std::time::Instant;

/// Run the selected tests in order with `run`; returns whether all passed
/// (the caller cleans up, then exits with 1 if not).
pub fn run_named<T>(tests: &[(&str, T)], mut run: impl FnMut(&T) -> anyhow::Result<()>) -> bool {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let t0 = Instant::now();
        println!("test {name} ...");
        match run(test) {
            Ok(()) => println!("test {name} ... ok ({:.2} s)", t0.elapsed().as_secs_f64()),
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.2} s): {e:#}",
                    t0.elapsed().as_secs_f64()
                );
                failed.push(*name);
            }
        }
    }
    if failed.is_empty() {
        println!("all {ran} selected tests passed");
        true
    } else {
        eprintln!("failed: {failed:?}");
        false
    }
}
