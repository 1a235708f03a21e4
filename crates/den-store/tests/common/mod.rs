//! Helpers shared by the S3 and fault-injection suites: store configs on a
//! SeaweedFS server, deterministic test data, a byte-for-byte model of a
//! volume, bounded waits and object listings.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use den_store::objects::Objects;
use den_store::{ChunkHash, CreateOptions, ObjectBackend, Store, StoreConfig, Volume};
use den_testkit::SeaweedS3;
use tokio::runtime::Runtime;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// Chunk size used by every test volume.
pub const CS: u64 = 64 * KIB;
/// Generous bound for anything that waits on uploads to a local SeaweedFS.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(180);

/// A multi-thread runtime standing in for one store process.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

pub fn s3_backend(s3: &SeaweedS3, prefix: &str) -> ObjectBackend {
    ObjectBackend::S3 {
        endpoint: s3.endpoint(),
        bucket: s3.bucket().to_string(),
        access_key: s3.access_key().to_string(),
        secret_key: s3.secret_key().to_string(),
        region: s3.region().to_string(),
        prefix: prefix.to_string(),
    }
}

/// Store config with SQLite + cache under `data_dir` and chunks in `objects`.
pub fn config(data_dir: &Path, objects: ObjectBackend) -> StoreConfig {
    let mut c = StoreConfig::local(data_dir);
    c.objects = objects;
    c.cache_limit = 1 << 30;
    c.dirty_limit = 64 * MIB;
    c.writeback_delay = Duration::from_millis(100);
    c.fetch_timeout = Duration::from_secs(30);
    c
}

/// Runs an async store call on `rt`, failing the test if it takes longer than `limit`.
pub fn within<F: Future>(rt: &Runtime, limit: Duration, what: &str, f: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(limit, f).await })
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Whether `f` is still unfinished after `limit` (it is then dropped).
pub fn still_running_after<F: Future>(rt: &Runtime, limit: Duration, f: F) -> bool {
    rt.block_on(async { tokio::time::timeout(limit, f).await })
        .is_err()
}

/// Waits until the uploader has finished its bookkeeping for every upload
/// (`flush`/`wait_durable` return once metadata names no pending chunk, a
/// moment before the uploader moves the chunks to the read cache and removes
/// their pending files). `local_only_bytes()` reaches 0 only after both, so
/// after this `drop_read_cache` really makes reads cold.
pub fn settle(store: &Store) {
    den_testkit::wait_until(Duration::from_secs(30), Duration::from_millis(5), || {
        store.local_only_bytes() == 0
    })
    .unwrap_or_else(|_| {
        panic!(
            "{} local-only bytes remain after uploads",
            store.local_only_bytes()
        )
    });
}

pub fn create(rt: &Runtime, store: &Store, name: &str, size: u64) {
    rt.block_on(store.create_volume(
        name,
        CreateOptions {
            size: Some(size),
            chunk_size: Some(CS as u32),
            source: None,
        },
    ))
    .unwrap_or_else(|e| panic!("create volume {name}: {e}"));
}

pub fn open(rt: &Runtime, store: &Store, name: &str) -> Volume {
    rt.block_on(store.open_volume(name))
        .unwrap_or_else(|e| panic!("open volume {name}: {e}"))
}

/// xorshift64*: deterministic pseudo-random bytes without a seedable-RNG dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Incompressible: stored raw.
    Random,
    /// Repetitive text-like bytes: compresses well.
    Compressible,
    /// All zeros: never uploaded, the slot is unmapped.
    Zero,
}

/// `len` bytes of `kind` content; different seeds give different content
/// (except for zeros).
pub fn content(kind: Kind, seed: u64, len: usize) -> Vec<u8> {
    match kind {
        Kind::Random => {
            let mut v = vec![0u8; len];
            Rng::new(seed).fill(&mut v);
            v
        }
        Kind::Compressible => {
            let line = format!("den chunk seed {seed:016x} lorem ipsum dolor sit amet\n");
            line.bytes().cycle().take(len).collect()
        }
        Kind::Zero => vec![0u8; len],
    }
}

/// What a volume should contain, mirrored write by write.
#[derive(Clone)]
pub struct Model {
    pub data: Vec<u8>,
}

impl Model {
    pub fn new(size: u64) -> Self {
        Model {
            data: vec![0u8; size as usize],
        }
    }

    pub fn write(&mut self, v: &Volume, off: u64, buf: &[u8]) {
        v.write_at(off, buf)
            .unwrap_or_else(|e| panic!("write {}+{} to {}: {e}", off, buf.len(), v.name()));
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }

    pub fn discard(&mut self, v: &Volume, off: u64, len: u64) {
        v.discard(off, len)
            .unwrap_or_else(|e| panic!("discard {off}+{len} of {}: {e}", v.name()));
        self.data[off as usize..(off + len) as usize].fill(0);
    }

    /// A mixed workload over the whole volume: whole chunks of random,
    /// compressible and zero data, unaligned writes across chunk
    /// boundaries, small writes and discards.
    pub fn scribble(&mut self, v: &Volume, rng: &mut Rng, ops: usize) {
        let size = self.data.len() as u64;
        let chunks = size / CS;
        for i in 0..ops {
            let seed = rng.next_u64();
            match rng.below(10) {
                0..=3 => {
                    let idx = rng.below(chunks);
                    let kind = [Kind::Random, Kind::Compressible, Kind::Zero][i % 3];
                    let run = 1 + rng.below(4).min(chunks - idx - 1);
                    let buf = content(kind, seed, (run * CS) as usize);
                    self.write(v, idx * CS, &buf);
                }
                4..=6 => {
                    let len = 1 + rng.below(3 * CS);
                    let off = rng.below(size - len);
                    let kind = if seed.is_multiple_of(2) {
                        Kind::Random
                    } else {
                        Kind::Compressible
                    };
                    let buf = content(kind, seed, len as usize);
                    self.write(v, off, &buf);
                }
                7 | 8 => {
                    let len = 1 + rng.below(512);
                    let off = rng.below(size - len);
                    let buf = content(Kind::Random, seed, len as usize);
                    self.write(v, off, &buf);
                }
                _ => {
                    let len = 1 + rng.below(2 * CS);
                    let off = rng.below(size - len);
                    self.discard(v, off, len);
                }
            }
        }
    }
}

/// Reads the whole volume and compares it with `expected`, naming the first
/// differing byte.
pub fn assert_volume_eq(v: &Volume, expected: &[u8], what: &str) {
    assert_eq!(v.size(), expected.len() as u64, "{what}: volume size");
    let step = MIB as usize;
    let mut buf = vec![0u8; step];
    for (n, want) in expected.chunks(step).enumerate() {
        let off = (n * step) as u64;
        let got = &mut buf[..want.len()];
        v.read_at(off, got)
            .unwrap_or_else(|e| panic!("{what}: read {}+{} of {}: {e}", off, want.len(), v.name()));
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            let at = off + i as u64;
            panic!(
                "{what}: {} differs at byte {at} (chunk {}): got {:#04x}, want {:#04x}",
                v.name(),
                at / CS,
                got[i],
                want[i]
            );
        }
    }
}

/// The chunk objects in the object store, by the store's own listing.
pub fn list_objects(rt: &Runtime, backend: &ObjectBackend) -> BTreeSet<ChunkHash> {
    let objects = Objects::open(backend).expect("open object store");
    rt.block_on(objects.list_chunks())
        .expect("list chunk objects")
        .into_iter()
        .collect()
}

/// Every object key in the bucket under `prefix`, listed by SeaweedFS itself
/// over signed S3 ListObjectsV2 (independent of the store's code).
pub fn bucket_keys(s3: &SeaweedS3, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut start_after = String::new();
    loop {
        let mut url = format!(
            "{}/{}/?list-type=2&max-keys=1000&prefix={}",
            s3.endpoint(),
            s3.bucket(),
            urlencode(prefix)
        );
        if !start_after.is_empty() {
            url.push_str(&format!("&start-after={}", urlencode(&start_after)));
        }
        let out = s3
            .signed_curl()
            .args(["--fail", "--max-time", "30"])
            .arg(&url)
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "listing {url}: curl {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let page: Vec<String> = body
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect();
        let truncated = body.contains("<IsTruncated>true</IsTruncated>");
        match page.last() {
            Some(last) if truncated => start_after = last.clone(),
            _ => {
                keys.extend(page);
                return keys;
            }
        }
        keys.extend(page);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every chunk hash referenced by a head or checkpoint map in the metadata.
pub fn referenced_hashes(rt: &Runtime, store: &Store) -> BTreeSet<ChunkHash> {
    rt.block_on(async {
        let mut out = BTreeSet::new();
        let meta = store.meta();
        for v in store.list_volumes().await.unwrap() {
            let mut maps = vec![v.head_map];
            for ck in store.list_checkpoints(&v.name).await.unwrap() {
                maps.push(ck.map_id);
            }
            for m in maps {
                for (_, e) in meta.load_map(m).await.unwrap() {
                    match e {
                        den_store::meta::Entry::Chunk(h) => {
                            out.insert(h);
                        }
                        den_store::meta::Entry::Pending(p) => {
                            panic!("map {m} still has pending chunk {p:016x}")
                        }
                    }
                }
            }
        }
        out
    })
}

/// `got == want` for chunk sets, reporting only sizes and a few differences.
pub fn assert_same_chunks(got: &BTreeSet<ChunkHash>, want: &BTreeSet<ChunkHash>, what: &str) {
    if got != want {
        let extra: Vec<_> = got.difference(want).take(5).collect();
        let missing: Vec<_> = want.difference(got).take(5).collect();
        panic!(
            "{what}: {} chunks, expected {}; unexpected (first 5): {extra:?}; missing (first 5): {missing:?}",
            got.len(),
            want.len()
        );
    }
}

pub fn assert_refcounts_ok(rt: &Runtime, store: &Store) {
    let bad = rt.block_on(store.meta().verify_refcounts()).unwrap();
    assert!(bad.is_empty(), "reference counts disagree with the maps: {bad:?}");
}

/// `MetaStore::commit_uploads` on any backend: one batch with two uploads
/// of the same content, a zero chunk and an upload whose chunk row GC took
/// must give each item the outcome its own `commit_upload`/`commit_zero`
/// would have, in order, and leave reference counts exact.
pub async fn check_batched_upload_commit(m: &dyn den_store::MetaStore) {
    use den_store::meta::{CommitOutcome, Entry, UploadCommit};
    let v = m.create_volume("batch", 8 * CS, CS as u32, None).await.unwrap();
    m.apply_seal(
        v.head_map,
        &[(0, Some(101)), (1, Some(102)), (2, Some(103)), (3, Some(104))],
    )
    .await
    .unwrap();
    // A checkpoint references every pending chunk a second time.
    m.checkpoint(&v.id, "", &[]).await.unwrap();
    let (same, gone) = (ChunkHash::of(b"same"), ChunkHash::of(b"gone"));
    m.begin_upload(&same).await.unwrap();
    let item = |pending, hash, stored_len| UploadCommit {
        pending,
        hash,
        stored_len,
    };
    let out = m
        .commit_uploads(&[
            item(101, Some(same), 4),
            item(102, None, 0),
            // No `begin_upload` for it: its row is gone, as after GC.
            item(103, Some(gone), 4),
            item(104, Some(same), 4),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            CommitOutcome::Committed { entries_updated: 2 },
            CommitOutcome::Committed { entries_updated: 2 },
            CommitOutcome::Retry,
            CommitOutcome::Committed { entries_updated: 2 },
        ]
    );
    let head: std::collections::HashMap<u64, Entry> =
        m.load_map(v.head_map).await.unwrap().into_iter().collect();
    assert_eq!(head.get(&0), Some(&Entry::Chunk(same)));
    assert_eq!(head.get(&1), None, "the zero chunk's slot is cleared");
    assert_eq!(head.get(&2), Some(&Entry::Pending(103)), "the retried one waits");
    assert_eq!(head.get(&3), Some(&Entry::Chunk(same)));
    assert!(m.verify_refcounts().await.unwrap().is_empty());
    // The retry after announcing commits like any other.
    m.begin_upload(&gone).await.unwrap();
    let out = m.commit_uploads(&[item(103, Some(gone), 4)]).await.unwrap();
    assert_eq!(out, vec![CommitOutcome::Committed { entries_updated: 2 }]);
    assert_eq!(m.pending_count(v.head_map).await.unwrap(), 0);
    assert!(m.verify_refcounts().await.unwrap().is_empty());
}
