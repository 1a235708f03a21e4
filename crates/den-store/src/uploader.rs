//! The background uploader: pending chunk → hash, compress, PUT, commit.
//!
//! An unreachable or failing object store never loses data: the pending file
//! stays in the cache and the upload is retried with capped exponential
//! backoff for as long as it takes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream_shim::UnboundedReceiverStream;

use crate::chunk::{self, ChunkHash};
use crate::error::{Result, StoreError};
use crate::meta::{CommitOutcome, PendingId, UploadDecision};
use crate::store::Shared;

/// Capped low on purpose: when the object store comes back, every waiting
/// upload should notice within this long, not after a long doubling.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) fn spawn(shared: Weak<Shared>, rx: mpsc::UnboundedReceiver<PendingId>) {
    let concurrency = shared
        .upgrade()
        .map(|s| s.cfg.upload_concurrency.max(1))
        .unwrap_or(1);
    tokio::spawn(async move {
        UnboundedReceiverStream::new(rx)
            .for_each_concurrent(concurrency, |p| {
                let shared = shared.clone();
                async move { upload_one(&shared, p).await }
            })
            .await;
    });
}

/// Retries until the upload lands or the store is dropped. The store is held
/// only during an attempt, not across the backoff: an upload that can never
/// succeed (store unreachable, credentials refused) must not keep a dropped
/// store — its metadata connection and its uploader — alive forever. The
/// pending file stays in the cache for the next open to pick up.
async fn upload_one(shared: &Weak<Shared>, p: PendingId) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        match try_upload(&s, p).await {
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

async fn try_upload(s: &Arc<Shared>, p: PendingId) -> Result<()> {
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
        // See `Shared::commit_gate`: open volumes must hear of every commit.
        let gate = s.commit_gate.read().await;
        s.meta.commit_zero(p).await?;
        s.upload_finished(p, None);
        drop(gate);
        s.cache.remove_pending(p);
        return Ok(());
    }
    let stored_len = encoded.len() as u64;
    // Kept for the whole attempt (a cheap clone per PUT): when GC takes the
    // row between announce and commit, the object is PUT again from these
    // very bytes. Reading the pending file again instead could find it gone
    // or changed, and store something else under this hash.
    let body = bytes::Bytes::from(encoded);
    let gate = loop {
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
        // Held until open volumes have swapped the pending entry for the hash.
        let gate = s.commit_gate.read().await;
        match s.meta.commit_upload(p, &hash, stored_len).await? {
            CommitOutcome::Committed { .. } => break gate,
            CommitOutcome::Retry => continue,
        }
    };
    // In local-object mode the object file is already the local copy.
    if !s.local_objects()
        && let Err(e) = s.cache.link_pending_to_clean(p, &hash)
    {
        tracing::warn!("could not move pending chunk {p:016x} into the read cache: {e}");
    }
    s.upload_finished(p, Some(hash));
    drop(gate);
    // Only now that no open volume names it as pending can the file go.
    s.cache.remove_pending(p);
    Ok(())
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
