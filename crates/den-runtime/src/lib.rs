//! den's sprite runtime.
//!
//! * [`image`] builds and caches the Debian userland every sprite starts from
//!   and makes it usable as the shared, read-only lower layer of an overlayfs
//!   inside a sprite's user namespace.
//! * [`backend`] is the interface the sprite manager drives (create, start,
//!   freeze/thaw, stop, delete), so engines can be swapped.
//! * [`container`] is the native Linux container backend (youki's
//!   `libcontainer`, run from a helper process).
//! * [`gvisor`] is the gVisor backend (`runsc`, systrap platform): the same
//!   sprites, with a user-space kernel between them and the host.
//! * [`cgroup`] detects the cgroup layout (v1, hybrid, v2) and does den's own
//!   cgroup work: the freezer for warm sleep and killing a sprite's tasks.
//! * [`exit_watch`] tells, exactly and cheaply, whether a sprite's PID 1 exited.

pub mod backend;
pub mod cgroup;
pub mod container;
pub mod exit_watch;
pub mod gvisor;
pub mod image;

pub use backend::{
    AGENT_LISTEN_FD, Backend, BindMount, CpuLimit, Handle, MemorySnapshots, Resources, Runtime, RuntimeError,
    SpriteSpec, SpriteState,
};
pub use exit_watch::ExitWatch;
