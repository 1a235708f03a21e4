//! `den-bench sprites` in its quick mode, as CI runs it: every phase runs
//! end to end (pool hits, cold creates, wakes, restore, fork, workloads,
//! density) on
//! the busybox image, and the figures the report is built from are there.
//!
//! The test binary doubles as the `den` binary inside the sprites (runtime
//! shim and agent), as den-sprite's tests do.

use anyhow::{Result, ensure};
use den_bench::sprite_bench::{self, BenchImage, SpriteBenchOptions};

fn main() -> Result<()> {
    den_sprite::helper_cmd::dispatch();
    let net = den_testkit::net::TestNet::new()?;
    let dir = tempfile::Builder::new().prefix("den-bench-quick-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let mut opts = SpriteBenchOptions::new(dir.path().join("work"), std::env::current_exe()?, true);
    opts.run_dir = dir.path().join("run");
    opts.image = BenchImage::Busybox;
    opts.runc = false;
    opts.density = 5;
    opts.workloads = true;
    opts.net = net.config.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let r = rt.block_on(sprite_bench::run(&opts, &mut |p| println!("  {p}")))?;

    let n = opts.samples;
    ensure!(
        r.create_hit_to_output.len() == n && r.pool_hits == n as u64 && r.pool_misses == 0,
        "pool: {r:?}"
    );
    for (what, v) in [
        ("cold create", &r.create_to_output),
        ("warm wake", &r.warm_to_output),
        ("cold wake", &r.cold_to_output),
        ("restore", &r.restore_to_output),
        ("fork", &r.fork_to_output),
    ] {
        ensure!(v.len() == n, "{what}: {} samples of {n}", v.len());
    }
    ensure!(
        !r.boots.is_empty() && r.boots.iter().all(|(_, b)| !b.is_empty()),
        "boot phases: {:?}",
        r.boots
    );
    let d = r
        .density
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no density result"))?;
    ensure!(
        d.failure.is_none() && d.reached == 5 && d.warm_count == 5,
        "density: {d:?}"
    );
    // The breakdown measured the sprites: their cgroups hold memory and
    // each warm sprite keeps its FUSE connection. (den's own RSS is not
    // checked: it can shrink while they wake, as the allocator hands back
    // what earlier phases freed; one CI-like run saw -0.6 MB.)
    ensure!(
        d.cgroup_memory.is_some_and(|m| m > 0) && d.fuse_pool.connections >= 5,
        "density breakdown: {d:?}"
    );
    // Native only here: each workload ran on the one engine, and passed.
    ensure!(
        r.workloads.len() == sprite_bench::WORKLOADS.len()
            && r.workloads
                .iter()
                .all(|w| w.native.len() == n && w.other.is_empty()),
        "workloads: {:?}",
        r.workloads
    );
    println!("{}", sprite_bench::latency_table(&r).table());
    println!(
        "{}",
        sprite_bench::workload_table(&r, den_runtime::Runtime::Native).table()
    );
    println!("{}", sprite_bench::boot_phase_table(&r).table());
    println!("{}", sprite_bench::density_table(d).table());
    Ok(())
}
