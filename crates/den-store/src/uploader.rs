//! The background uploader: pending chunk → hash, compress, PUT, commit.
//!
//! An unreachable or failing object store never loses data: the pending file
//! stays in the cache and the upload is retried with capped exponential
//! backoff for as long as it takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream_shim::UnboundedReceiverStream;

use crate::chunk::{self, ChunkHash};
use crate::error::{Result, StoreError};
use crate::meta::{CommitOutcome, PendingId, UploadCommit, UploadDecision};
use crate::store::Shared;

/// Capped low on purpose: when the object store comes back, every waiting
/// upload should notice within this long, not after a long doubling.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Uploads that may wait for their metadata commit at once, per unit of
/// `upload_concurrency`. An upload waiting for the commit no longer holds
/// its reading/hashing/PUT slot, so the next ones run meanwhile and the
/// committer finds several finished uploads to commit together.
const COMMIT_BACKLOG: usize = 4;

/// What the uploader has committed since the store opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UploadStats {
    /// Pending chunks whose upload (or zero check) was committed.
    pub chunks_committed: u64,
    /// Metadata transactions those commits took (one per batch).
    pub commit_transactions: u64,
}

#[derive(Default)]
pub(crate) struct UploadCounters {
    chunks: AtomicU64,
    transactions: AtomicU64,
    /// Commit requests handed to the committer (tests wait on it).
    submitted: AtomicU64,
    /// Tests hold it (write) to stop the committer after it has told open
    /// volumes of a batch and before it removes the batch's pending files.
    #[cfg(test)]
    pub(crate) hold_removal: tokio::sync::RwLock<()>,
}

impl UploadCounters {
    pub(crate) fn snapshot(&self) -> UploadStats {
        UploadStats {
            chunks_committed: self.chunks.load(Ordering::Relaxed),
            commit_transactions: self.transactions.load(Ordering::Relaxed),
        }
    }
}

/// A finished upload waiting for its metadata commit.
struct CommitRequest {
    item: UploadCommit,
    /// `Err` carries the message of a failed batch transaction.
    done: oneshot::Sender<std::result::Result<CommitOutcome, String>>,
}

pub(crate) fn spawn(shared: Weak<Shared>, rx: mpsc::UnboundedReceiver<PendingId>) {
    let concurrency = shared
        .upgrade()
        .map(|s| s.cfg.upload_concurrency.max(1))
        .unwrap_or(1);
    let (commit_tx, commit_rx) = mpsc::unbounded_channel();
    tokio::spawn(committer(shared.clone(), commit_rx));
    let work = Arc::new(Semaphore::new(concurrency));
    tokio::spawn(async move {
        UnboundedReceiverStream::new(rx)
            .for_each_concurrent(concurrency * COMMIT_BACKLOG, |p| {
                let shared = shared.clone();
                let work = work.clone();
                let commit_tx = commit_tx.clone();
                async move { upload_one(&shared, p, &work, &commit_tx).await }
            })
            .await;
    });
}

/// Group commit: takes every finished upload queued while the previous
/// transaction ran and commits them in one transaction — one durable
/// (fsynced) metadata commit per batch instead of one per chunk. Nothing
/// waits on purpose: a lone upload commits at once, and batches grow
/// exactly when commits are the bottleneck.
async fn committer(shared: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<CommitRequest>) {
    while let Some(first) = rx.recv().await {
        let Some(s) = shared.upgrade() else { return };
        // Held from the commit until open volumes have been told (see
        // `Shared::commit_gate`). Taken before draining the queue, so
        // uploads finishing while a volume opens join this batch.
        let gate = s.commit_gate.read().await;
        let mut batch = vec![first];
        while let Ok(r) = rx.try_recv() {
            batch.push(r);
        }
        let items: Vec<UploadCommit> = batch.iter().map(|r| r.item).collect();
        let res = s.meta.commit_uploads(&items).await;
        s.upload_counters.transactions.fetch_add(1, Ordering::Relaxed);
        let outcomes = match res {
            Ok(o) if o.len() == items.len() => o,
            Ok(o) => {
                let msg = format!(
                    "batch commit answered {} outcomes for {} uploads",
                    o.len(),
                    items.len()
                );
                drop(gate);
                for r in batch {
                    let _ = r.done.send(Err(msg.clone()));
                }
                continue;
            }
            Err(e) => {
                let msg = e.to_string();
                drop(gate);
                for r in batch {
                    let _ = r.done.send(Err(msg.clone()));
                }
                continue;
            }
        };
        let done = outcomes
            .iter()
            .filter(|o| matches!(o, CommitOutcome::Committed { .. }))
            .count();
        s.upload_counters.chunks.fetch_add(done as u64, Ordering::Relaxed);
        let mut committed = Vec::with_capacity(done);
        for (it, out) in items.iter().zip(&outcomes) {
            if !matches!(out, CommitOutcome::Committed { .. }) {
                continue;
            }
            // In local-object mode the object file is already the local copy.
            if let Some(h) = &it.hash
                && !s.local_objects()
                && let Err(e) = s.cache.link_pending_to_clean(it.pending, h)
            {
                tracing::warn!(
                    "could not move pending chunk {:016x} into the read cache: {e}",
                    it.pending
                );
            }
            s.upload_committed(it.pending, it.hash);
            committed.push(it.pending);
        }
        drop(gate);
        #[cfg(test)]
        let _hold = s.upload_counters.hold_removal.read().await;
        // Only now that no open volume names them as pending can the files
        // go, and only once they are gone is the upload finished (see
        // `Shared::upload_finished`).
        for p in committed {
            s.cache.remove_pending(p);
            s.upload_finished(p);
        }
        for (r, out) in batch.into_iter().zip(outcomes) {
            let _ = r.done.send(Ok(out));
        }
    }
}

/// Retries until the upload lands or the store is dropped. The store is held
/// only during an attempt, not across the backoff: an upload that can never
/// succeed (store unreachable, credentials refused) must not keep a dropped
/// store — its metadata connection and its uploader — alive forever. The
/// pending file stays in the cache for the next open to pick up.
async fn upload_one(
    shared: &Weak<Shared>,
    p: PendingId,
    work: &Semaphore,
    commit_tx: &mpsc::UnboundedSender<CommitRequest>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        match try_upload(&s, p, work, commit_tx).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("upload of pending chunk {p:016x} failed, retrying in {delay:?}: {e}");
                drop(s);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Hand a finished upload to the committer and wait for its outcome.
async fn commit(
    counters: &UploadCounters,
    commit_tx: &mpsc::UnboundedSender<CommitRequest>,
    item: UploadCommit,
) -> Result<CommitOutcome> {
    let (done, rx) = oneshot::channel();
    counters.submitted.fetch_add(1, Ordering::Relaxed);
    commit_tx
        .send(CommitRequest { item, done })
        .map_err(|_| StoreError::Meta("the upload committer has stopped".into()))?;
    match rx.await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(msg)) => Err(StoreError::Meta(msg)),
        Err(_) => Err(StoreError::Meta("the upload committer has stopped".into())),
    }
}

async fn try_upload(
    s: &Arc<Shared>,
    p: PendingId,
    work: &Semaphore,
    commit_tx: &mpsc::UnboundedSender<CommitRequest>,
) -> Result<()> {
    let slot = work
        .acquire()
        .await
        .map_err(|_| StoreError::Meta("the uploader has stopped".into()))?;
    let path = s.cache.pending_path(p);
    let data = match tokio::fs::read(&path).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Another process sharing this cache uploaded it already.
            s.upload_abandoned(p);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    if !s.meta.pending_referenced(p).await? {
        // Its volume was deleted or restored before the upload: nothing needs it.
        let _ = tokio::fs::remove_file(&path).await;
        s.upload_abandoned(p);
        return Ok(());
    }
    let compression = s.cfg.compression;
    let (hash, zero, encoded) = tokio::task::spawn_blocking(move || {
        if chunk::is_zero(&data) {
            return (ChunkHash([0; 32]), true, Vec::new());
        }
        let h = ChunkHash::of(&data);
        (h, false, chunk::encode(&data, compression))
    })
    .await
    .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    if zero {
        drop(slot);
        let item = UploadCommit {
            pending: p,
            hash: None,
            stored_len: 0,
        };
        commit(&s.upload_counters, commit_tx, item).await?;
        return Ok(());
    }
    let stored_len = encoded.len() as u64;
    // Kept for the whole attempt (a cheap clone per PUT): when GC takes the
    // row between announce and commit, the object is PUT again from these
    // very bytes. Reading the pending file again instead could find it gone
    // or changed, and store something else under this hash.
    let body = bytes::Bytes::from(encoded);
    let mut slot = Some(slot);
    loop {
        if slot.is_none() {
            // A retry after a lost race with GC: PUT again in turn.
            slot = Some(
                work.acquire()
                    .await
                    .map_err(|_| StoreError::Meta("the uploader has stopped".into()))?,
            );
        }
        match s.meta.begin_upload(&hash).await? {
            UploadDecision::Busy => {
                // GC is deleting this very content; wait for it to finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            UploadDecision::MustUpload => {
                s.objects.put(&hash, body.clone()).await?;
            }
            UploadDecision::AlreadyPresent => {}
        }
        slot = None;
        let item = UploadCommit {
            pending: p,
            hash: Some(hash),
            stored_len,
        };
        match commit(&s.upload_counters, commit_tx, item).await? {
            CommitOutcome::Committed { .. } => return Ok(()),
            CommitOutcome::Retry => continue,
        }
    }
}

/// A tiny stream adapter so we don't pull in tokio-stream for one type.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    pub struct UnboundedReceiverStream<T>(mpsc::UnboundedReceiver<T>);

    impl<T> UnboundedReceiverStream<T> {
        pub fn new(rx: mpsc::UnboundedReceiver<T>) -> Self {
            Self(rx)
        }
    }

    impl<T> futures::Stream for UnboundedReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::Store;
    use crate::test_volume::{TestVolume, test_volume};

    /// Uploads that finish while a commit is in progress share the next
    /// transaction: here all of them wait behind a held commit gate, so the
    /// committer must take them in one. Committing one per chunk (the old
    /// behaviour) makes this 16 transactions.
    #[test]
    fn uploads_finishing_together_share_one_commit() {
        const N: u64 = 16;
        let content = |i: u64| vec![(i as u8).wrapping_mul(7).wrapping_add(1); CS as usize];
        let TestVolume {
            dir: _dir,
            rt,
            store,
            v,
        } = fixture(N, Some(4), content);
        // One chunk of zeros: its commit rides in the same batch.
        v.write_at(0, &vec![0u8; CS as usize]).unwrap();

        let gate = rt.block_on(store.shared.commit_gate.write());
        v.seal_all().unwrap();
        wait_submitted(&store, N);
        assert_eq!(
            store.upload_stats().commit_transactions,
            0,
            "the gate held every commit back"
        );
        drop(gate);
        rt.block_on(store.flush("v", |_| {})).unwrap();
        // The counters move right after the transaction, which flush may
        // have seen first.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.upload_stats().chunks_committed < N && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }

        let st = store.upload_stats();
        assert_eq!(st.chunks_committed, N);
        assert_eq!(
            st.commit_transactions, 1,
            "{N} uploads that finished together took {} transactions",
            st.commit_transactions
        );
        assert!(rt.block_on(store.meta().verify_refcounts()).unwrap().is_empty());
        let info = rt.block_on(store.volume_info("v")).unwrap();
        assert_eq!(info.pending_chunks, 0);
        assert_eq!(info.mapped_chunks, N - 1, "the zero chunk is unmapped");
        store.drop_read_cache();
        let mut got = vec![0u8; CS as usize];
        for i in 0..N {
            v.read_at(i * CS, &mut got).unwrap();
            let want = if i == 0 {
                vec![0u8; CS as usize]
            } else {
                content(i)
            };
            assert!(got == want, "chunk {i} reads back what was written");
        }
    }

    /// `local_only_bytes() == 0` must mean that uploads have nothing left
    /// to do locally: no pending file a reader could still be served from
    /// (a `CheckpointReader` loaded before the commit names chunks by
    /// pending id and reads their files while they exist), so that after
    /// it `drop_read_cache` really leaves no local copy. Here the committer
    /// is held after telling the volume of a whole batch and before it
    /// removes the batch's pending files: their bytes must still count.
    /// Releasing them first (the old order) reports 0 local-only bytes
    /// while all the files are still there.
    #[test]
    fn local_only_bytes_count_pending_files_until_they_are_gone() {
        const N: u64 = 8;
        let content = |i: u64| vec![(i as u8).wrapping_mul(13).wrapping_add(3); CS as usize];
        let TestVolume { dir, rt, store, v } = fixture(N, None, content);
        // All N uploads reach the committer behind the commit gate, so it
        // takes them as one batch and stops at the hold with all of them.
        let gate = rt.block_on(store.shared.commit_gate.write());
        let hold = rt.block_on(store.shared.upload_counters.hold_removal.write());
        v.seal_all().unwrap();
        wait_submitted(&store, N);
        drop(gate);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !v.inner.state.lock().pending_slots.is_empty() {
            assert!(Instant::now() < deadline, "the committer never told the volume");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            store.shared.cache.list_pending_files().unwrap().len() as u64,
            N,
            "the held committer removed no pending file"
        );
        assert_eq!(
            store.local_only_bytes(),
            N * CS,
            "pending files still on disk count as local-only"
        );

        drop(hold);
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.local_only_bytes() > 0 {
            assert!(Instant::now() < deadline, "uploads never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            store.shared.cache.list_pending_files().unwrap(),
            Vec::<crate::meta::PendingId>::new(),
            "no pending file is left once nothing is local-only"
        );
        store.drop_read_cache();
        let clean = walkdir(&dir.path().join("cache/clean"));
        assert!(
            clean.is_empty(),
            "read-cache files left after drop_read_cache: {clean:?}"
        );
        let mut got = vec![0u8; CS as usize];
        for i in 0..N {
            v.read_at(i * CS, &mut got).unwrap();
            assert!(got == content(i), "chunk {i} reads back what was written");
        }
    }

    /// Chunk size of the fixtures' volumes.
    const CS: u64 = 64 << 10;

    /// A store on an in-memory object backend that uploads nothing until
    /// told (no write-back delay to wait for), with volume `v` of `n` chunks
    /// holding `content(i)` in chunk `i`.
    fn fixture(n: u64, upload_concurrency: Option<usize>, content: impl Fn(u64) -> Vec<u8>) -> TestVolume {
        let f = test_volume(n, CS, 2, |cfg| {
            if let Some(c) = upload_concurrency {
                cfg.upload_concurrency = c;
            }
        });
        for i in 0..n {
            f.v.write_at(i * CS, &content(i)).unwrap();
        }
        f
    }

    /// Until `n` commit requests have reached the committer.
    fn wait_submitted(store: &Store, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while store
            .shared
            .upload_counters
            .submitted
            .load(std::sync::atomic::Ordering::Relaxed)
            < n
        {
            assert!(Instant::now() < deadline, "uploads never reached the committer");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn walkdir(p: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walkdir(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
