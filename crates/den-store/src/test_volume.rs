//! Unit-test fixture: a store on an in-memory object backend that seals and
//! uploads nothing on its own (no write-back timer), with one volume `v`.

use std::time::Duration;

use crate::{CreateOptions, ObjectBackend, Store, StoreConfig, Volume};

pub(crate) struct TestVolume {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub store: Store,
    pub v: Volume,
}

/// Volume `v` of `chunks` chunks of `chunk_size` bytes; `tweak` may change
/// the store's configuration before it opens.
pub(crate) fn test_volume(
    chunks: u64,
    chunk_size: u64,
    worker_threads: usize,
    tweak: impl FnOnce(&mut StoreConfig),
) -> TestVolume {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = StoreConfig::local(dir.path());
    cfg.objects = ObjectBackend::Memory;
    cfg.dirty_limit = 64 << 20;
    // Nothing is sealed behind the test's back.
    cfg.writeback_delay = Duration::from_secs(3600);
    tweak(&mut cfg);
    let store = rt.block_on(Store::open(cfg)).unwrap();
    let opts = CreateOptions {
        size: Some(chunks * chunk_size),
        chunk_size: Some(chunk_size as u32),
        source: None,
    };
    rt.block_on(store.create_volume("v", opts)).unwrap();
    let v = rt.block_on(store.open_volume("v")).unwrap();
    TestVolume { dir, rt, store, v }
}
