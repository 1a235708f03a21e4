//! den's volume store: sparse, chunked virtual disks whose chunks live in
//! object storage (content-addressed, compressed, deduplicated), whose chunk
//! maps live in a metadata database, and whose local disk is only a cache.
//!
//! Checkpoint, restore and fork copy chunk maps, never chunk data.

mod budget;
pub mod cache;
pub mod chunk;
pub mod error;
pub mod meta;
pub mod objects;
pub mod pg;
pub mod snapshot;
pub mod space;
mod store;
#[cfg(test)]
mod test_volume;
mod units;
mod uploader;
mod volume;

pub use chunk::{ChunkHash, Compression};
pub use error::{Result, StoreError};
pub use meta::{
    CheckpointRecord, ClusterMeta, MapId, MetaStore, Metadata, StoreStats, SyncState, VolumeOwner,
    VolumeRecord,
};
pub use objects::ObjectBackend;
pub use snapshot::CheckpointReader;
pub use space::SpaceStats;
pub use store::{
    AdoptReport, CreateOptions, DEFAULT_CHUNK_SIZE, DEFAULT_GC_INTERVAL, DEFAULT_VOLUME_SIZE, Durability,
    GcReport, GcStats, Store, StoreConfig, VolumeInfo, VolumeSource,
};
pub use units::parse_size;
pub use uploader::UploadStats;
pub use volume::Volume;
