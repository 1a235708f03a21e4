//! Filesystem benchmarks for `den bench storage`.
//!
//! The workloads ([`workloads`]) run against any mounted directory; the
//! baselines ([`baselines`]) provide comparison targets that live on the same
//! disk as the den volume under test, so every number in one report comes
//! from the same run on the same hardware. [`report`] turns medians into a
//! terminal table and a Markdown table for `docs/benchmarks.md`.
//!
//! Everything here needs root: dropping the page cache, `losetup`, `mount`.

pub mod baselines;
pub mod report;
pub mod workloads;

pub use baselines::{JuiceFs, NativeExt4, PlainDir, Target, find_juicefs};
pub use report::{Latency, Report, latency};
pub use workloads::{
    RandWriteResult, RepResult, SeqReadResult, SeqWriteResult, SmallFilesResult, Summary, TargetResult,
    WorkloadConfig, WorkloadSet,
};
