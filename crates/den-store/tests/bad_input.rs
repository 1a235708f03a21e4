//! Bad input is refused with the documented error, and refusing it changes
//! nothing: no volume, checkpoint or byte of data appears or disappears.

use std::io::ErrorKind;
use std::time::Duration;

use den_store::{CreateOptions, ObjectBackend, Store, StoreConfig, StoreError, Volume, VolumeSource};

const SIZE: u64 = 1 << 20;
const CS: u32 = 64 << 10;

struct Env {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    store: Store,
}

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::local(dir);
    c.objects = ObjectBackend::Memory;
    c.dirty_limit = 64 << 20;
    c.writeback_delay = Duration::from_millis(20);
    c
}

impl Env {
    /// A store with volume `a` (content "hello" at 1000, one checkpoint `v1`)
    /// and an empty volume `b`.
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(Store::open(config(dir.path()))).unwrap();
        let env = Env { _dir: dir, rt, store };
        for name in ["a", "b"] {
            env.ok(env.store.create_volume(name, sized(SIZE)));
        }
        let a = env.open("a");
        a.write_at(1000, b"hello").unwrap();
        let ck = a.checkpoint("first").unwrap();
        assert_eq!(ck.id, "v1");
        a.write_at(1000, b"HELLO").unwrap();
        env
    }

    fn ok<T>(&self, f: impl std::future::Future<Output = den_store::Result<T>>) -> T {
        self.rt.block_on(f).expect("store call failed")
    }

    fn err<T>(&self, f: impl std::future::Future<Output = den_store::Result<T>>) -> StoreError {
        match self.rt.block_on(f) {
            Ok(_) => panic!("store call should have failed"),
            Err(e) => e,
        }
    }

    fn open(&self, name: &str) -> Volume {
        self.ok(self.store.open_volume(name))
    }

    /// Everything a refused call must leave alone.
    fn snapshot(&self) -> String {
        let mut out = String::new();
        for v in self.ok(self.store.list_volumes()) {
            let cks: Vec<String> = self
                .ok(self.store.list_checkpoints(&v.name))
                .into_iter()
                .map(|c| c.id)
                .collect();
            out += &format!("{} {} {} {} {:?}\n", v.name, v.id, v.size, v.chunk_size, cks);
        }
        let s = self.ok(self.store.stats());
        out += &format!("{} {}\n", s.volumes, s.checkpoints);
        out
    }

    fn read(&self, name: &str, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.open(name).read_at(off, &mut b).unwrap();
        b
    }
}

fn sized(size: u64) -> CreateOptions {
    CreateOptions {
        size: Some(size),
        chunk_size: Some(CS),
        source: None,
    }
}

fn ck(volume: &str, checkpoint: &str) -> VolumeSource {
    VolumeSource::Checkpoint {
        volume: volume.into(),
        checkpoint: checkpoint.into(),
    }
}

#[track_caller]
fn assert_volume_not_found(e: StoreError, name: &str) {
    match e {
        StoreError::VolumeNotFound(n) => assert_eq!(n, name),
        e => panic!("expected VolumeNotFound({name}), got {e:?}"),
    }
}

#[track_caller]
fn assert_checkpoint_not_found(e: StoreError, vol: &str, id: &str) {
    match e {
        StoreError::CheckpointNotFound { volume, checkpoint } => {
            assert_eq!((volume.as_str(), checkpoint.as_str()), (vol, id));
        }
        e => panic!("expected CheckpointNotFound({vol}/{id}), got {e:?}"),
    }
}

#[track_caller]
fn assert_invalid(e: StoreError) {
    assert!(
        matches!(e, StoreError::InvalidArgument(_)),
        "expected InvalidArgument, got {e:?}"
    );
}

#[test]
fn unknown_volume_is_not_found_and_changes_nothing() {
    let env = Env::new();
    let s = &env.store;
    let before = env.snapshot();
    let n = "nope";
    assert_volume_not_found(env.err(s.open_volume(n)), n);
    assert_volume_not_found(env.err(s.volume(n)), n);
    assert_volume_not_found(env.err(s.volume_info(n)), n);
    assert_volume_not_found(env.err(s.checkpoint(n, "c")), n);
    assert_volume_not_found(env.err(s.list_checkpoints(n)), n);
    assert_volume_not_found(env.err(s.get_checkpoint(n, "v1")), n);
    assert_volume_not_found(env.err(s.delete_checkpoint(n, "v1")), n);
    assert_volume_not_found(env.err(s.restore(n, "v1")), n);
    assert_volume_not_found(env.err(s.delete_volume(n)), n);
    assert_volume_not_found(env.err(s.flush(n, |_| {})), n);
    assert_volume_not_found(env.err(s.wait_durable(n, "v1")), n);
    assert_volume_not_found(env.err(s.fork("new", VolumeSource::Volume(n.into()))), n);
    assert_volume_not_found(env.err(s.fork("new", ck(n, "v1"))), n);
    assert_eq!(env.snapshot(), before);
    assert_eq!(env.read("a", 1000, 5), b"HELLO");
}

#[test]
fn unknown_checkpoint_is_not_found_and_changes_nothing() {
    let env = Env::new();
    let s = &env.store;
    let before = env.snapshot();
    // "v01" and "v+1" would parse as sequence 1, but are not the id "v1".
    let bad = [
        "x",
        "v0",
        "v999",
        "",
        "v",
        "v-1",
        "V1",
        "1",
        "v1 ",
        " v1",
        "v01",
        "v+1",
        "v1x",
        "v99999999999999999999",
    ];
    for id in bad {
        assert_checkpoint_not_found(env.err(s.get_checkpoint("a", id)), "a", id);
        assert_checkpoint_not_found(env.err(s.delete_checkpoint("a", id)), "a", id);
        assert_checkpoint_not_found(env.err(s.restore("a", id)), "a", id);
        assert_checkpoint_not_found(env.err(s.wait_durable("a", id)), "a", id);
        assert_checkpoint_not_found(env.err(s.fork("new", ck("a", id))), "a", id);
    }
    // Checkpoint ids are per volume: b has no v1.
    assert_checkpoint_not_found(env.err(s.get_checkpoint("b", "v1")), "b", "v1");
    assert_checkpoint_not_found(env.err(s.restore("b", "v1")), "b", "v1");
    assert_checkpoint_not_found(env.err(s.fork("new", ck("b", "v1"))), "b", "v1");
    assert_eq!(env.snapshot(), before);
    assert_eq!(env.read("a", 1000, 5), b"HELLO");

    // A deleted checkpoint is gone for good, and its id is not reused.
    env.ok(s.delete_checkpoint("a", "v1"));
    assert_checkpoint_not_found(env.err(s.get_checkpoint("a", "v1")), "a", "v1");
    assert_checkpoint_not_found(env.err(s.delete_checkpoint("a", "v1")), "a", "v1");
    assert_eq!(env.ok(s.checkpoint("a", "next")).id, "v2");
}

#[test]
fn restore_or_delete_of_an_open_volume_is_busy() {
    let env = Env::new();
    let s = &env.store;
    let a = env.open("a");
    let before = env.snapshot();
    assert!(matches!(env.err(s.restore("a", "v1")), StoreError::VolumeBusy(n) if n == "a"));
    assert!(matches!(env.err(s.delete_volume("a")), StoreError::VolumeBusy(n) if n == "a"));
    // A clone is as good as the original handle.
    let a2 = a.clone();
    drop(a);
    assert!(matches!(env.err(s.restore("a", "v1")), StoreError::VolumeBusy(_)));
    assert_eq!(env.snapshot(), before);
    let mut b = [0u8; 5];
    a2.read_at(1000, &mut b).unwrap();
    assert_eq!(&b, b"HELLO");
    a2.write_at(2000, b"still writable").unwrap();
    drop(a2);
    // Once closed, both work.
    env.ok(s.restore("a", "v1"));
    assert_eq!(env.read("a", 1000, 5), b"hello");
    env.ok(s.delete_volume("a"));
    assert_volume_not_found(env.err(s.open_volume("a")), "a");
}

#[test]
fn bad_sizes_chunk_sizes_and_names_are_invalid() {
    let env = Env::new();
    let s = &env.store;
    let before = env.snapshot();
    for size in [
        0,
        1,
        4095,
        4097,
        SIZE + 512,
        u64::MAX,
        (-4096i64) as u64,
        (-1i64) as u64,
        1 << 51,
    ] {
        assert_invalid(env.err(s.create_volume("new", sized(size))));
    }
    for cs in [0u32, 1, 512, 2048, 4095, 3 * 4096, 128 << 20, u32::MAX, 1 << 31] {
        let o = CreateOptions {
            size: Some(SIZE),
            chunk_size: Some(cs),
            source: None,
        };
        assert_invalid(env.err(s.create_volume("new", o)));
    }
    let long = "x".repeat(64);
    for name in [
        "",
        "A",
        "-x",
        ".x",
        ".",
        "..",
        "a/b",
        "../a",
        "a b",
        "ä",
        "a\0",
        "a\n",
        long.as_str(),
    ] {
        assert_invalid(env.err(s.create_volume(name, sized(SIZE))));
        assert_invalid(env.err(s.fork(name, VolumeSource::Volume("a".into()))));
        assert_invalid(env.err(s.fork(name, ck("a", "v1"))));
    }
    // Forks keep their source's chunk size and never shrink it.
    let fork = |size: Option<u64>, chunk_size: Option<u32>| CreateOptions {
        size,
        chunk_size,
        source: Some(ck("a", "v1")),
    };
    assert_invalid(env.err(s.create_volume("new", fork(Some(SIZE / 2), None))));
    assert_invalid(env.err(s.create_volume("new", fork(None, Some(CS * 2)))));
    assert_invalid(env.err(s.create_volume("new", fork(Some(SIZE + 1), None))));
    assert_eq!(env.snapshot(), before);

    // The edges of the valid ranges are accepted.
    let max_name = "x".repeat(63);
    env.ok(s.create_volume(&max_name, sized(4096)));
    let o = CreateOptions {
        size: Some(8192),
        chunk_size: Some(4096),
        source: None,
    };
    env.ok(s.create_volume("small-chunks_1.x", o));
    env.ok(s.create_volume("bigger", fork(Some(SIZE * 2), Some(CS))));
    assert_eq!(env.read("bigger", 1000, 5), b"hello");

    // A dirty limit below the floor is refused at open.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.dirty_limit = 1 << 20;
    assert_invalid(env.rt.block_on(Store::open(c)).err().expect("open should fail"));
}

#[test]
fn out_of_range_io_is_invalid_input_and_writes_nothing() {
    let env = Env::new();
    let a = env.open("a");
    let mut buf = [0u8; 8];
    let cases: [(u64, usize); 5] = [
        (SIZE, 1),
        (SIZE - 1, 2),
        (SIZE + 4096, 8),
        (u64::MAX, 1),
        (u64::MAX - 2, 8),
    ];
    for (off, len) in cases {
        let e = a.read_at(off, &mut buf[..len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "read at {off}+{len}");
        let e = a.write_at(off, &[0xee; 8][..len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "write at {off}+{len}");
        let e = a.discard(off, len as u64).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "discard at {off}+{len}");
    }
    let e = a.discard(0, u64::MAX).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Empty I/O at the very end is in range.
    a.read_at(SIZE, &mut []).unwrap();
    a.write_at(SIZE, &[]).unwrap();
    // The refused partial write at the end left the last byte alone.
    let mut last = [0u8; 1];
    a.read_at(SIZE - 1, &mut last).unwrap();
    assert_eq!(last, [0]);
    assert_eq!(
        a.dirty_chunks(),
        1,
        "only the chunk written by the fixture is dirty"
    );
    let mut b = [0u8; 5];
    a.read_at(1000, &mut b).unwrap();
    assert_eq!(&b, b"HELLO");
}

#[test]
fn duplicate_names_exist_and_change_nothing() {
    let env = Env::new();
    let s = &env.store;
    let before = env.snapshot();
    let exists = |e: StoreError| assert!(matches!(e, StoreError::VolumeExists(ref n) if n == "b"), "{e:?}");
    exists(env.err(s.create_volume("b", sized(SIZE))));
    exists(env.err(s.fork("b", ck("a", "v1"))));
    exists(env.err(s.fork("b", VolumeSource::Volume("a".into()))));
    assert_eq!(env.snapshot(), before);
    // b kept its (empty) content; a kept its own.
    assert_eq!(env.read("b", 1000, 5), [0; 5]);
    assert_eq!(env.read("a", 1000, 5), b"HELLO");
    // Self-fork of a live volume under its own name is a duplicate too.
    let e = env.err(s.fork("a", VolumeSource::Volume("a".into())));
    assert!(matches!(e, StoreError::VolumeExists(_)), "{e:?}");
    // The name is free again once the volume is deleted.
    env.ok(s.delete_volume("b"));
    env.ok(s.create_volume("b", sized(SIZE)));
}
