//! The sprite manager: where den's pieces become a persistent Linux computer.
//!
//! A sprite is a den volume (its durable disk, ext4) served as a block
//! device, an overlayfs of the shared base image under that ext4, a network
//! namespace with an egress policy, and a container whose PID 1 is the den
//! agent. [`SpriteManager`] creates them, wakes them on demand, puts them to
//! sleep when idle (warm: frozen; cold: stopped and unmounted), and
//! checkpoints, restores and forks them as metadata operations on the volume.
//!
//! Modules, in the order a boot uses them: [`config`], [`catalog`] (durable
//! records), `disk` (volume → FUSE + loop → ext4), `agent_bundle` (the agent
//! binary inside the sprite), `live` (boot and teardown), [`manager`]
//! (lifecycle, checkpoints, forks, policy, services) and `idle` (the sleep
//! monitor).

mod agent_bundle;
mod boot_stats;
pub mod catalog;
pub mod catalog_pg;
pub mod config;
mod disk;
mod engines;
mod error;
pub mod helper_cmd;
mod idle;
mod live;
pub mod manager;
mod memory_image;
mod record;

pub use agent_bundle::{AGENT_SOCKET, SPRITE_BIN};
pub use boot_stats::{BootPhases, BootTotals};
pub use config::{Admission, HostCapacity, ImageSource, ManagerConfig, host_upstream_dns};
pub use error::{Result, SpriteError};
pub use manager::{Activity, CreateSprite, ServiceWatch, SpriteEvent, SpriteManager};
pub use record::{
    DEFAULT_ORG, SpriteInfo, SpriteRecord, SpriteStatus, StorageStatus, key_parts, sprite_key, validate_key,
    validate_name, validate_org,
};
