//! Metadata: volumes, chunk maps, checkpoints, chunk reference counts.
//!
//! Every method is one transaction, so a `kill -9` at any moment leaves the
//! metadata either before or after an operation, never in between. SQLite
//! serves a single host; the schema keeps to what PostgreSQL also speaks so a
//! cluster backend can implement the same trait.

pub mod postgres;
mod schema;
pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

use crate::chunk::ChunkHash;
use crate::error::Result;

pub type MapId = i64;
/// A sealed chunk that lives only in the local cache until it is uploaded.
/// Chosen by the writer (random) so the file can be linked before the
/// metadata transaction that names it commits.
pub type PendingId = i64;

/// What a chunk slot of a map holds. An absent slot reads as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Chunk(ChunkHash),
    Pending(PendingId),
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub head_map: MapId,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    pub volume_id: String,
    /// `v1`, `v2`, … per volume, like the Sprites API.
    pub id: String,
    pub seq: i64,
    pub map_id: MapId,
    pub created_at_ms: i64,
    pub comment: String,
    /// All chunks of the checkpoint are in the object store.
    pub durable: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MapStats {
    pub entries: u64,
    pub pending: u64,
    pub distinct_chunks: u64,
}

/// Outcome of announcing an upload: the store either already holds the
/// chunk, or the caller must PUT it. `Busy` means GC is deleting that very
/// chunk right now; retry after GC finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadDecision {
    AlreadyPresent,
    MustUpload,
    Busy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed {
        entries_updated: u64,
    },
    /// The chunk row vanished (GC) between announce and commit; upload again.
    Retry,
}

/// One finished upload for [`MetaStore::commit_uploads`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadCommit {
    pub pending: PendingId,
    /// `None`: the chunk was all zeros (see [`MetaStore::commit_zero`]).
    pub hash: Option<ChunkHash>,
    pub stored_len: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub volumes: u64,
    pub checkpoints: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub pending: u64,
}

/// The cluster lease on a volume: which node may change it. `epoch` grows by
/// one with every successful claim and is the fencing token: a metadata
/// backend that fences (PostgreSQL) refuses every change to the volume from a
/// node whose held epoch is not the current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeOwner {
    /// `None` when released (or never claimed).
    pub node: Option<String>,
    pub epoch: i64,
}

/// A volume's recovery point for when its owner dies: a hidden snapshot of
/// the head (not a checkpoint; it has no `vN` id and is not listed), taken at
/// a consistent moment and promoted once all its chunks are in the object
/// store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncState {
    /// The newest promoted (durable) sync point, if any.
    pub durable_map: Option<MapId>,
    /// When that sync point was taken (ms since the epoch).
    pub durable_at_ms: Option<i64>,
    /// A newer sync point still waiting for uploads.
    pub pending_map: Option<MapId>,
    pub pending_at_ms: Option<i64>,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Create a volume whose head map is empty or a copy of `source`.
    async fn create_volume(
        &self,
        name: &str,
        size: u64,
        chunk_size: u32,
        source: Option<MapId>,
    ) -> Result<VolumeRecord>;
    async fn get_volume(&self, name: &str) -> Result<VolumeRecord>;
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>>;
    /// Delete a volume with its head map and all its checkpoints.
    async fn delete_volume(&self, volume_id: &str) -> Result<()>;
    async fn resize_volume(&self, volume_id: &str, size: u64) -> Result<()>;

    async fn load_map(&self, map: MapId) -> Result<Vec<(u64, Entry)>>;
    async fn map_stats(&self, map: MapId) -> Result<MapStats>;
    /// Slots of `map` still waiting for upload; cheap (uses the pending index),
    /// because flush polls it after every upload.
    async fn pending_count(&self, map: MapId) -> Result<u64>;

    /// Point head slots at freshly sealed pending chunks; `None` clears a slot.
    async fn apply_seal(&self, head: MapId, seals: &[(u64, Option<PendingId>)]) -> Result<()>;

    /// Apply `seals` to the head map, then snapshot it as a new checkpoint.
    async fn checkpoint(
        &self,
        volume_id: &str,
        comment: &str,
        seals: &[(u64, Option<PendingId>)],
    ) -> Result<CheckpointRecord>;
    async fn list_checkpoints(&self, volume_id: &str) -> Result<Vec<CheckpointRecord>>;
    async fn get_checkpoint(&self, volume_id: &str, id: &str) -> Result<CheckpointRecord>;
    async fn delete_checkpoint(&self, volume_id: &str, id: &str) -> Result<()>;
    /// The head map becomes a copy of the checkpoint's map.
    async fn restore(&self, volume_id: &str, checkpoint_id: &str) -> Result<()>;

    /// Pending chunks still referenced by some map, oldest first.
    async fn list_pending(&self) -> Result<Vec<PendingId>>;
    async fn pending_referenced(&self, pending: PendingId) -> Result<bool>;
    /// Announce an upload (writes the `uploading` row before the PUT).
    /// Need not be durable on its own: losing it to a power cut only leaves
    /// an object without a row (found by `gc --sweep`), and every later
    /// durable commit makes it durable too (both backends' logs are
    /// sequential), so backends commit it without waiting for the disk.
    async fn begin_upload(&self, hash: &ChunkHash) -> Result<UploadDecision>;
    /// Mark the chunk present and replace every reference to `pending` with it.
    async fn commit_upload(
        &self,
        pending: PendingId,
        hash: &ChunkHash,
        stored_len: u64,
    ) -> Result<CommitOutcome>;
    /// The pending chunk was all zeros: drop every reference to it.
    async fn commit_zero(&self, pending: PendingId) -> Result<u64>;
    /// [`MetaStore::commit_upload`] (or [`MetaStore::commit_zero`] for a
    /// `None` hash) for each item, in one transaction: one durable commit
    /// for a whole batch of uploads instead of one per chunk. Outcomes are
    /// in the order of `items`; a zero item is always `Committed`.
    ///
    /// The default runs one transaction per item (correct, just slower).
    async fn commit_uploads(&self, items: &[UploadCommit]) -> Result<Vec<CommitOutcome>> {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            out.push(match it.hash {
                Some(h) => self.commit_upload(it.pending, &h, it.stored_len).await?,
                None => CommitOutcome::Committed {
                    entries_updated: self.commit_zero(it.pending).await?,
                },
            });
        }
        Ok(out)
    }

    /// Chunks nobody references any more move to `deleting`; returns them.
    async fn gc_begin(&self, limit: usize) -> Result<Vec<ChunkHash>>;
    /// Their objects are gone: forget the rows.
    async fn gc_finish(&self, hashes: &[ChunkHash]) -> Result<()>;
    /// Chunks stuck in `deleting` from an interrupted GC.
    async fn gc_interrupted(&self) -> Result<Vec<ChunkHash>>;
    async fn is_known_chunk(&self, hash: &ChunkHash) -> Result<bool>;
    /// Total stored (compressed) size of these chunks, for GC's report.
    async fn stored_len_of(&self, hashes: &[ChunkHash]) -> Result<u64>;

    async fn stats(&self) -> Result<StoreStats>;
    /// Recount references from the maps and compare with the stored counts.
    /// Returns the chunks whose count is wrong (empty means consistent).
    async fn verify_refcounts(&self) -> Result<Vec<(ChunkHash, i64, i64)>>;
}

/// What a cluster of nodes needs on top of [`MetaStore`]: which node owns
/// a volume (the lease and its fencing epoch), and the volume's sync points.
///
/// Kept apart from [`MetaStore`] because it is a different contract: the
/// data methods are the same on every backend, while these only mean
/// something where several nodes share the metadata. Both backends implement
/// it (SQLite trivially: one host never fences), so a [`Store`] always has
/// both; see [`Metadata`].
///
/// [`Store`]: crate::Store
#[async_trait]
pub trait ClusterMeta: Send + Sync + 'static {
    // ---- cluster: ownership and fencing ---------------------------------
    //
    // A volume created by a fencing backend is owned by the creating node at
    // epoch 1, and that node holds the epoch. Every change to a volume
    // (apply_seal on its head, checkpoint, delete_checkpoint, restore,
    // resize, delete, sync points) checks inside its transaction that the
    // volume's owner is this node and its epoch is the one this node holds;
    // otherwise it fails with `StoreError::Fenced` and changes nothing.
    // Backends for a single host (SQLite) do not fence: every method below
    // still works, and the checks always pass.

    async fn volume_owner(&self, volume_id: &str) -> Result<VolumeOwner>;
    /// Compare-and-swap: if the volume's epoch is still `seen_epoch`, make
    /// `node` the owner with epoch `seen_epoch + 1`, remember it as held by
    /// this process, and return the new epoch. `None` if someone else moved
    /// the epoch first.
    async fn claim_volume(&self, volume_id: &str, node: &str, seen_epoch: i64) -> Result<Option<i64>>;
    /// Clear the owner if `node` still holds `epoch` (the epoch stays, so a
    /// later claim moves it on). False if the lease had moved on.
    async fn release_volume(&self, volume_id: &str, node: &str, epoch: i64) -> Result<bool>;

    // ---- cluster: sync points (the durability window) --------------------

    /// Apply `seals` to the head, then snapshot the head as the volume's
    /// pending sync point (dropping an older pending one). Returns its map.
    async fn sync_point(&self, volume_id: &str, seals: &[(u64, Option<PendingId>)]) -> Result<MapId>;
    /// The pending sync point `map` has no pending slots left: it becomes
    /// the durable one (the older durable one is dropped). No-op if `map` is
    /// no longer the volume's pending sync point.
    async fn promote_sync_point(&self, volume_id: &str, map: MapId) -> Result<()>;
    /// The head becomes a copy of the durable sync point (for a new owner
    /// whose predecessor died with writes that never left its disk).
    /// Returns the sync point's time, or `None` (head unchanged) if there is
    /// no durable sync point.
    async fn rollback_to_sync_point(&self, volume_id: &str) -> Result<Option<i64>>;
    async fn sync_state(&self, volume_id: &str) -> Result<SyncState>;
}

/// A complete metadata backend, as a [`Store`](crate::Store) holds it.
pub trait Metadata: MetaStore + ClusterMeta {}

impl<T: MetaStore + ClusterMeta + ?Sized> Metadata for T {}
