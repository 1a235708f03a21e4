//! A sparse in-memory [`BlockDevice`], for tests and harnesses.
//!
//! It is deliberately simple (one lock around a map) but honest about the
//! contract: bounds are checked, discarded ranges read back as zeros, and every
//! call is counted so tests can prove that a kernel operation (fsync, fstrim)
//! really reached the device.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::BlockDevice;

/// Granularity of the sparse map. 64 KiB keeps the map small for a 1 GiB disk
/// while a 4 KiB ext4 block write only touches one allocation.
pub const MEM_BLOCK_SIZE: usize = 64 * 1024;

const BLOCK: u64 = MEM_BLOCK_SIZE as u64;

/// Compared against with `==` so the check is a `memcmp`, which stays fast even
/// in unoptimised test builds.
static ZEROS: [u8; MEM_BLOCK_SIZE] = [0; MEM_BLOCK_SIZE];

/// Call counters of a [`MemDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// `read_at` calls.
    pub reads: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// `discard` calls.
    pub discards: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes discarded.
    pub bytes_discarded: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_discarded: AtomicU64,
}

/// Sparse RAM disk. Unwritten (and discarded) space costs no memory and reads
/// as zeros; writing zeros into unallocated space does not allocate either,
/// so `mkfs` on a large device stays cheap.
pub struct MemDevice {
    size: u64,
    blocks: RwLock<BTreeMap<u64, Box<[u8]>>>,
    counters: Counters,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDevice")
            .field("size", &self.size)
            .field("allocated_bytes", &self.allocated_bytes())
            .field("stats", &self.stats())
            .finish()
    }
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            blocks: RwLock::new(BTreeMap::new()),
            counters: Counters::default(),
        }
    }

    /// Snapshot of the call counters.
    pub fn stats(&self) -> MemStats {
        let c = &self.counters;
        MemStats {
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            discards: c.discards.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            bytes_discarded: c.bytes_discarded.load(Ordering::Relaxed),
        }
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.counters.flushes.load(Ordering::Relaxed)
    }

    /// Number of `discard` calls so far.
    pub fn discard_count(&self) -> u64 {
        self.counters.discards.load(Ordering::Relaxed)
    }

    /// Memory currently holding data, in bytes.
    pub fn allocated_bytes(&self) -> u64 {
        self.blocks.read().len() as u64 * BLOCK
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is outside the {} byte device", self.size),
            )),
        }
    }
}

/// Splits `[offset, offset+len)` into per-block pieces:
/// (block index, offset inside the block, offset inside the caller's buffer, length).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let idx = pos / BLOCK;
        let within = (pos % BLOCK) as usize;
        let n = (MEM_BLOCK_SIZE - within).min(len - done);
        let piece = (idx, within, done, n);
        done += n;
        Some(piece)
    })
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let blocks = self.blocks.read();
        for (idx, within, at, n) in pieces(offset, buf.len()) {
            let dst = &mut buf[at..at + n];
            match blocks.get(&idx) {
                Some(block) => dst.copy_from_slice(&block[within..within + n]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut blocks = self.blocks.write();
        for (idx, within, at, n) in pieces(offset, data.len()) {
            let src = &data[at..at + n];
            let zero = src == &ZEROS[..n];
            if zero && n == MEM_BLOCK_SIZE {
                blocks.remove(&idx);
                continue;
            }
            match blocks.get_mut(&idx) {
                Some(block) => block[within..within + n].copy_from_slice(src),
                None if zero => {}
                None => {
                    let mut block = vec![0u8; MEM_BLOCK_SIZE].into_boxed_slice();
                    block[within..within + n].copy_from_slice(src);
                    blocks.insert(idx, block);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_discarded.fetch_add(len, Ordering::Relaxed);
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let mut blocks = self.blocks.write();
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let touched: Vec<u64> = blocks.range(first..=last).map(|(k, _)| *k).collect();
        for idx in touched {
            let start = (idx * BLOCK).max(offset);
            let stop = ((idx + 1) * BLOCK).min(end);
            if stop - start == BLOCK {
                blocks.remove(&idx);
            } else if let Some(block) = blocks.get_mut(&idx) {
                let a = (start - idx * BLOCK) as usize;
                let b = (stop - idx * BLOCK) as usize;
                block[a..b].fill(0);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    #[test]
    fn round_trip_across_block_boundaries() {
        let dev = MemDevice::new(10 * BLOCK + 123);
        let data = pattern(3 * MEM_BLOCK_SIZE + 17, 7);
        let off = BLOCK - 5;
        dev.write_at(off, &data).unwrap();
        let mut back = vec![0; data.len()];
        dev.read_at(off, &mut back).unwrap();
        assert_eq!(back, data);
        let mut before = vec![1; 5];
        dev.read_at(off - 5, &mut before).unwrap();
        assert_eq!(before, vec![0; 5]);
        assert_eq!(dev.allocated_bytes(), 5 * BLOCK);
    }

    #[test]
    fn zero_writes_do_not_allocate() {
        let dev = MemDevice::new(4 * BLOCK);
        dev.write_at(100, &vec![0; 2 * MEM_BLOCK_SIZE]).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
        dev.write_at(0, &pattern(BLOCK as usize, 1)).unwrap();
        dev.write_at(0, &vec![0; MEM_BLOCK_SIZE]).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
    }

    #[test]
    fn discard_zeroes_partial_and_frees_whole_blocks() {
        let dev = MemDevice::new(4 * BLOCK);
        let data = pattern(4 * MEM_BLOCK_SIZE, 3);
        dev.write_at(0, &data).unwrap();
        dev.discard(10, 2 * BLOCK).unwrap();
        let mut back = vec![0; data.len()];
        dev.read_at(0, &mut back).unwrap();
        assert_eq!(&back[..10], &data[..10]);
        assert!(back[10..10 + 2 * MEM_BLOCK_SIZE].iter().all(|&b| b == 0));
        assert_eq!(&back[10 + 2 * MEM_BLOCK_SIZE..], &data[10 + 2 * MEM_BLOCK_SIZE..]);
        assert_eq!(dev.allocated_bytes(), 3 * BLOCK);
        assert_eq!(dev.discard_count(), 1);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let dev = MemDevice::new(1000);
        let mut buf = [0u8; 10];
        assert!(dev.read_at(995, &mut buf).is_err());
        assert!(dev.write_at(991, &buf).is_err());
        assert!(dev.discard(u64::MAX, 2).is_err());
        assert!(dev.read_at(990, &mut buf).is_ok());
    }
}
