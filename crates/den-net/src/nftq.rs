//! The one thread that talks to nft.
//!
//! Every change to the firewall (a sprite added, changed or removed, learned addresses added
//! or evicted) is an nft script handed to [`NftQueue::submit`] while the manager's state
//! lock is held, so the kernel sees the changes in the order the state made them; the caller
//! then waits for its result *without* the lock. The thread applies whatever queued up
//! meanwhile as one nft transaction (group commit, in process through libnftables: [`crate::libnft`]): a thousand DNS answers learned while one transaction
//! ran cost one more transaction, not a thousand, and no DNS answer or sprite boot waits on
//! the state lock while nft runs. A batch that fails is retried job by job, so one bad
//! script only fails its own caller.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::NetError;
use crate::libnft::Nft;

/// Scripts of at most about this many bytes go into one transaction (more wait for the
/// next), so a transaction, and the wait of whoever queued behind it, stays short.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Learning jobs queued beyond this many are refused at once (the DNS answer gets SERVFAIL):
/// the queue must not grow without end while nft is slow.
const MAX_QUEUED_ASYNC: usize = 4096;

/// How the caller of [`NftQueue::submit`] learns the result.
enum Done {
    /// A thread that blocks until the result (sprite setup, policy changes).
    Sync(mpsc::SyncSender<Result<(), NetError>>),
    /// A task (the DNS forwarder).
    Async(tokio::sync::oneshot::Sender<Result<(), NetError>>),
}

impl Done {
    fn send(self, r: Result<(), NetError>) {
        match self {
            Done::Sync(tx) => {
                let _ = tx.send(r);
            }
            Done::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

struct Job {
    script: String,
    done: Done,
}

pub(crate) struct NftQueue {
    tx: mpsc::Sender<Job>,
    /// Jobs submitted and not yet applied.
    queued: Arc<AtomicUsize>,
}

/// The result of a job submitted by a thread.
pub(crate) struct Pending(mpsc::Receiver<Result<(), NetError>>);

impl Pending {
    pub(crate) fn wait(self) -> Result<(), NetError> {
        self.0.recv().unwrap_or_else(|_| Err(gone()))
    }
}

fn gone() -> NetError {
    NetError::Io {
        context: "applying nft changes".into(),
        source: std::io::Error::other("the nft thread is gone"),
    }
}

impl NftQueue {
    /// Start the thread; it ends when the queue is dropped.
    pub(crate) fn start() -> Result<Self, NetError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        std::thread::Builder::new()
            .name("den-nft".into())
            .spawn(move || run(rx, &q))
            .map_err(|e| NetError::Spawn {
                prog: "nft thread".into(),
                source: e,
            })?;
        Ok(NftQueue { tx, queued })
    }

    fn push(&self, mut script: String, done: Done) {
        // Scripts are concatenated into one transaction.
        if !script.ends_with('\n') {
            script.push('\n');
        }
        if matches!(done, Done::Async(_)) && self.queued.load(Ordering::Relaxed) >= MAX_QUEUED_ASYNC {
            done.send(Err(NetError::Io {
                context: "applying nft changes".into(),
                source: std::io::Error::other("too many changes queued"),
            }));
            return;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(job)) = self.tx.send(Job { script, done }) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            job.done.send(Err(gone()));
        }
    }

    /// Queue `script` for a thread that will wait for it.
    pub(crate) fn submit(&self, script: String) -> Pending {
        let (tx, rx) = mpsc::sync_channel(1);
        self.push(script, Done::Sync(tx));
        Pending(rx)
    }

    /// Queue `script` for a task that will await it.
    pub(crate) fn submit_async(
        &self,
        script: String,
    ) -> tokio::sync::oneshot::Receiver<Result<(), NetError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.push(script, Done::Async(tx));
        rx
    }
}

fn run(rx: mpsc::Receiver<Job>, queued: &AtomicUsize) {
    // Made on this thread and never leaves it (a libnftables context is not thread-safe).
    let mut nft = Nft::open();
    while let Ok(first) = rx.recv() {
        let mut bytes = first.script.len();
        let mut batch = vec![first];
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(job) => {
                    bytes += job.script.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        queued.fetch_sub(batch.len(), Ordering::Relaxed);
        if batch.len() > 1 {
            let script: String = batch.iter().map(|j| j.script.as_str()).collect();
            if nft.apply(&script).is_ok() {
                for job in batch {
                    job.done.send(Ok(()));
                }
                continue;
            }
            // The transaction applied nothing: find the culprit by applying each alone.
        }
        for job in batch {
            let r = nft.apply(&job.script);
            job.done.send(r);
        }
    }
}
