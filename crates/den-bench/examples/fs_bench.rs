//! Run the full workload set on native ext4 and JuiceFS (optionally also a
//! plain host directory) in one work dir and print the comparison.
//!
//! ```text
//! cargo run --release -p den-bench --example fs_bench -- /var/tmp/den-bench \
//!     [--quick] [--reps N] [--seq-mib N] [--plain]
//! ```
//!
//! Needs root. Progress goes to stderr (`RUST_LOG=den_bench=debug` for more).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use den_bench::{JuiceFs, NativeExt4, PlainDir, Report, Target, WorkloadConfig, WorkloadSet};

struct Args {
    work: PathBuf,
    config: WorkloadConfig,
    plain: bool,
}

fn parse_args() -> Result<Args> {
    let mut work = None;
    let mut config = WorkloadConfig::default();
    let mut plain = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--quick" => {
                config = WorkloadConfig {
                    reps: config.reps,
                    ..WorkloadConfig::tiny()
                }
            }
            "--reps" => config.reps = u32::try_from(value("--reps")?)?,
            "--seq-mib" => config.seq_bytes = value("--seq-mib")? << 20,
            "--plain" => plain = true,
            "-h" | "--help" => {
                println!("usage: fs_bench <work-dir> [--quick] [--reps N] [--seq-mib N] [--plain]");
                std::process::exit(0);
            }
            s if s.starts_with('-') => bail!("unknown option {s}"),
            s if work.is_none() => work = Some(PathBuf::from(s)),
            s => bail!("unexpected argument {s}"),
        }
    }
    Ok(Args {
        work: work.context("usage: fs_bench <work-dir> [options]")?,
        config,
        plain,
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "den_bench=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let started = Instant::now();

    // Generate the random pool before mounting anything, so a config error
    // costs nothing.
    let set = WorkloadSet::new(args.config)?;
    let mut targets: Vec<Box<dyn Target>> = vec![Box::new(NativeExt4::setup(
        &args.work,
        NativeExt4::DEFAULT_IMAGE_BYTES,
    )?)];
    targets.push(Box::new(JuiceFs::setup(&args.work)?));
    if args.plain {
        targets.push(Box::new(PlainDir::setup(&args.work)?));
    }

    let refs: Vec<&dyn Target> = targets.iter().map(|t| t.as_ref()).collect();
    let results = set.run_targets(&refs);
    let mut teardown_err = None;
    for t in targets {
        if let Err(e) = t.teardown() {
            eprintln!("teardown failed: {e:#}");
            teardown_err.get_or_insert(e);
        }
    }
    let report = Report::new(results?).with_range(true);

    println!("{}\n", set.config().describe());
    println!("{report}\n");
    println!("{}", report.markdown());
    println!("total wall time: {:.1?}", started.elapsed());
    match teardown_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
