//! Filesystem benchmarks for `den-bench storage`.
//!
//! The workloads ([`workloads`]) run against any mounted directory; the
//! baselines ([`baselines`]) provide comparison targets that live on the same
//! disk as the den volume under test, so every number in one report comes
//! from the same run on the same hardware. [`report`] turns medians into a
//! terminal table and a Markdown table for `docs/benchmarks.md`.
//! [`den_target`] is the den volume itself as a target (FUSE + loop + ext4),
//! [`latency_bench`] times checkpoint, fork, restore, write-back and cold
//! reads on a raw volume, and [`suite`] runs it all for `den-bench storage`
//! and `den-bench chunk-size`, stopping cleanly on Ctrl-C ([`cancel`]).
//! [`sprite_bench`] is `den-bench sprites`: the sprite runtime (create, exec,
//! wakes, checkpoint, restore, fork, density) against `runc` ([`runc`]);
//! [`api_bench`] is `den-bench api`: exec, load and the sprite URL proxy
//! through a `den server` started in-process; [`cluster_bench`] is `den
//! bench cluster`: create throughput, cold wake across nodes and request
//! forwarding on PostgreSQL + S3 + `den server` nodes in network namespaces.
//!
//! Everything here needs root: dropping the page cache, `losetup`, `mount`.

pub mod api_bench;
pub mod baselines;
pub mod cancel;
pub mod cluster_bench;
pub mod den_target;
mod guards;
pub mod latency_bench;
pub mod report;
pub mod runc;
pub mod sprite_bench;
pub mod suite;
pub mod workloads;

pub use baselines::{JuiceFs, NativeExt4, PlainDir, Target, find_juicefs};
pub use den_target::{DenStore, DenVolume, DenVolumeOptions};
pub use latency_bench::{LatencyConfig, LatencyResults};
pub use report::{Latency, Report, latency};
pub use workloads::{
    RandWriteResult, RepResult, SeqReadResult, SeqWriteResult, SmallFilesResult, Summary, TargetResult,
    WorkloadConfig, WorkloadSet,
};
