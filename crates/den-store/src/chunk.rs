//! Chunk identity and the on-object encoding.
//!
//! A chunk is identified by the BLAKE3 hash of its *uncompressed* bytes, so the
//! same data always maps to the same object key no matter how it was
//! compressed. That makes uploads idempotent and lets overwrites in stores
//! without conditional PUT (Garage) be harmless.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<Self> {
        let v =
            hex::decode(s).map_err(|e| StoreError::InvalidArgument(format!("bad chunk hash {s}: {e}")))?;
        let arr: [u8; 32] = v
            .try_into()
            .map_err(|_| StoreError::InvalidArgument(format!("bad chunk hash length: {s}")))?;
        Ok(ChunkHash(arr))
    }

    pub fn from_slice(b: &[u8]) -> Result<Self> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| StoreError::Meta(format!("chunk hash of {} bytes in metadata", b.len())))?;
        Ok(ChunkHash(arr))
    }

    /// Object key, fanned out by the first byte so local directories and S3
    /// listing prefixes stay small.
    pub fn object_key(&self, prefix: &str) -> String {
        let h = self.to_hex();
        format!("{prefix}chunks/{}/{}", &h[..2], h)
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    #[default]
    Zstd,
    Lz4,
}

impl Compression {
    fn tag(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(StoreError::InvalidArgument(format!(
                "unknown compression {other:?} (expected none, zstd or lz4)"
            ))),
        }
    }
}

const MAGIC: &[u8; 4] = b"DEN1";
const HEADER: usize = 4 + 1 + 4;

/// Encode a chunk for the object store: magic, codec tag, raw length, payload.
/// Incompressible data is stored raw so reads of it cost no decompression.
pub fn encode(data: &[u8], compression: Compression) -> Vec<u8> {
    let payload = match compression {
        Compression::None => None,
        Compression::Zstd => zstd::bulk::compress(data, 1).ok(),
        Compression::Lz4 => Some(lz4_flex::block::compress(data)),
    };
    let (tag, payload): (u8, &[u8]) = match &payload {
        Some(p) if p.len() + HEADER < data.len() => (compression.tag(), p),
        _ => (Compression::None.tag(), data),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(tag);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decode an object and check that it really is the chunk `expected` names:
/// a bit flip or a truncated object must never be served as disk content.
pub fn decode(obj: &[u8], expected: &ChunkHash) -> Result<Vec<u8>> {
    let corrupt = |reason: &str| StoreError::CorruptChunk {
        hash: expected.to_hex(),
        reason: reason.to_string(),
    };
    if obj.len() < HEADER || &obj[..4] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let raw_len = u32::from_le_bytes(obj[5..9].try_into().expect("4 bytes")) as usize;
    let payload = &obj[HEADER..];
    let data = match obj[4] {
        0 => payload.to_vec(),
        1 => zstd::bulk::decompress(payload, raw_len).map_err(|e| corrupt(&format!("zstd: {e}")))?,
        2 => lz4_flex::block::decompress(payload, raw_len).map_err(|e| corrupt(&format!("lz4: {e}")))?,
        t => return Err(corrupt(&format!("unknown codec {t}"))),
    };
    if data.len() != raw_len {
        return Err(corrupt("length mismatch"));
    }
    if ChunkHash::of(&data) != *expected {
        return Err(corrupt("hash mismatch"));
    }
    Ok(data)
}

pub fn is_zero(data: &[u8]) -> bool {
    // Word-at-a-time compare: this runs on every sealed chunk.
    let mut words = data.chunks_exact(16);
    let all_words = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    all_words && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_codecs() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        let h = ChunkHash::of(&data);
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let enc = encode(&data, c);
            assert_eq!(decode(&enc, &h).unwrap(), data);
        }
    }

    #[test]
    fn corruption_is_detected() {
        let data = vec![42u8; 4096];
        let h = ChunkHash::of(&data);
        let mut enc = encode(&data, Compression::None);
        let last = enc.len() - 1;
        enc[last] ^= 1;
        assert!(matches!(decode(&enc, &h), Err(StoreError::CorruptChunk { .. })));
        assert!(decode(b"junk", &h).is_err());
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode(&data, Compression::Zstd);
        assert!(enc.len() <= data.len() + HEADER);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1000];
        v[999] = 1;
        assert!(!is_zero(&v));
    }
}
