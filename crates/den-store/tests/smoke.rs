use den_store::{CreateOptions, ObjectBackend, Store, StoreConfig, VolumeSource};

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::local(dir);
    c.objects = ObjectBackend::Memory;
    c.writeback_delay = std::time::Duration::from_millis(50);
    c
}

#[test]
fn write_checkpoint_restore_fork() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(Store::open(cfg(dir.path()))).unwrap();
    rt.block_on(store.create_volume(
        "a",
        CreateOptions {
            size: Some(64 << 20),
            chunk_size: Some(1 << 16),
            source: None,
        },
    ))
    .unwrap();
    let v = rt.block_on(store.open_volume("a")).unwrap();
    v.write_at(1000, b"hello").unwrap();
    let mut b = [0u8; 5];
    v.read_at(1000, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    let ck = v.checkpoint("c1").unwrap();
    v.write_at(1000, b"world").unwrap();
    rt.block_on(store.flush("a", |_| {})).unwrap();
    rt.block_on(store.wait_durable("a", &ck.id)).unwrap();
    drop(v);
    rt.block_on(store.fork(
        "b",
        VolumeSource::Checkpoint {
            volume: "a".into(),
            checkpoint: ck.id.clone(),
        },
    ))
    .unwrap();
    rt.block_on(store.restore("a", &ck.id)).unwrap();
    let v = rt.block_on(store.open_volume("a")).unwrap();
    v.read_at(1000, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    let w = rt.block_on(store.open_volume("b")).unwrap();
    w.read_at(1000, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert!(rt.block_on(store.meta().verify_refcounts()).unwrap().is_empty());
}
