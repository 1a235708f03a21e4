//! The part of the FUSE kernel ABI (`include/uapi/linux/fuse.h`) our
//! single-file filesystem speaks.
//!
//! Requests are parsed from the bytes the kernel wrote, with every length
//! checked: a short or malformed request is an error value, never a panic or
//! an out-of-bounds read. Replies are encoded field by field in native byte
//! order, the order the kernel uses.

/// The protocol major version we speak.
pub(crate) const KERNEL_VERSION: u32 = 7;
/// The minor version we answer with. Features the kernel and we both know
/// are negotiated through the INIT flags, not through this number.
pub(crate) const KERNEL_MINOR_VERSION: u32 = 40;

pub(crate) const ROOT_INO: u64 = 1;

pub(crate) mod opcode {
    pub(crate) const LOOKUP: u32 = 1;
    pub(crate) const FORGET: u32 = 2;
    pub(crate) const GETATTR: u32 = 3;
    pub(crate) const SETATTR: u32 = 4;
    pub(crate) const SYMLINK: u32 = 6;
    pub(crate) const MKNOD: u32 = 8;
    pub(crate) const MKDIR: u32 = 9;
    pub(crate) const UNLINK: u32 = 10;
    pub(crate) const RMDIR: u32 = 11;
    pub(crate) const RENAME: u32 = 12;
    pub(crate) const LINK: u32 = 13;
    pub(crate) const OPEN: u32 = 14;
    pub(crate) const READ: u32 = 15;
    pub(crate) const WRITE: u32 = 16;
    pub(crate) const STATFS: u32 = 17;
    pub(crate) const RELEASE: u32 = 18;
    pub(crate) const FSYNC: u32 = 20;
    pub(crate) const FLUSH: u32 = 25;
    pub(crate) const INIT: u32 = 26;
    pub(crate) const OPENDIR: u32 = 27;
    pub(crate) const READDIR: u32 = 28;
    pub(crate) const RELEASEDIR: u32 = 29;
    pub(crate) const FSYNCDIR: u32 = 30;
    pub(crate) const ACCESS: u32 = 34;
    pub(crate) const CREATE: u32 = 35;
    pub(crate) const INTERRUPT: u32 = 36;
    pub(crate) const DESTROY: u32 = 38;
    pub(crate) const BATCH_FORGET: u32 = 42;
    pub(crate) const FALLOCATE: u32 = 43;
    pub(crate) const RENAME2: u32 = 45;
}

/// INIT flags (low 32 bits; the high ones, in `flags2`, we never ask for).
pub(crate) mod init_flags {
    pub(crate) const ASYNC_READ: u32 = 1 << 0;
    pub(crate) const BIG_WRITES: u32 = 1 << 5;
    pub(crate) const ASYNC_DIO: u32 = 1 << 15;
    pub(crate) const MAX_PAGES: u32 = 1 << 22;
}

pub(crate) const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub(crate) const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

pub(crate) mod fattr {
    pub(crate) const MODE: u32 = 1 << 0;
    pub(crate) const UID: u32 = 1 << 1;
    pub(crate) const GID: u32 = 1 << 2;
    pub(crate) const SIZE: u32 = 1 << 3;
    pub(crate) const ATIME: u32 = 1 << 4;
    pub(crate) const MTIME: u32 = 1 << 5;
    pub(crate) const ATIME_NOW: u32 = 1 << 7;
    pub(crate) const MTIME_NOW: u32 = 1 << 8;
}

/// `struct fuse_in_header`.
pub(crate) const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
pub(crate) const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_write_in`, which precedes the data of a WRITE.
pub(crate) const WRITE_IN_LEN: usize = 40;

/// A request that does not have the shape its opcode promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Bounds-checked little cursor over request bytes.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.bytes(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Malformed> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, Malformed> {
        self.u64().map(|v| v as i64)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// A NUL-terminated name (LOOKUP), without its terminator.
    pub(crate) fn c_str(&mut self) -> Result<&'a [u8], Malformed> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(Malformed)?;
        let name = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(name)
    }
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InHeader {
    pub(crate) len: u32,
    pub(crate) opcode: u32,
    pub(crate) unique: u64,
    pub(crate) nodeid: u64,
}

impl InHeader {
    /// Parse the header and check that `len` matches what was read.
    pub(crate) fn parse(buf: &[u8]) -> Result<(InHeader, &[u8]), Malformed> {
        if buf.len() < IN_HEADER_LEN {
            return Err(Malformed);
        }
        let mut c = Cursor::new(buf);
        let len = c.u32()?;
        let opcode = c.u32()?;
        let unique = c.u64()?;
        let nodeid = c.u64()?;
        c.bytes(16)?; // uid, gid, pid, padding
        if len as usize != buf.len() {
            return Err(Malformed);
        }
        Ok((
            InHeader {
                len,
                opcode,
                unique,
                nodeid,
            },
            c.rest(),
        ))
    }
}

/// `struct fuse_init_in`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InitIn {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) max_readahead: u32,
    pub(crate) flags: u32,
}

impl InitIn {
    pub(crate) fn parse(arg: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor::new(arg);
        Ok(Self {
            major: c.u32()?,
            minor: c.u32()?,
            max_readahead: c.u32()?,
            flags: c.u32()?,
        })
    }
}

/// `struct fuse_init_out` (64 bytes, as of ABI 7.36).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InitOut {
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) max_readahead: u32,
    pub(crate) flags: u32,
    pub(crate) max_background: u16,
    pub(crate) congestion_threshold: u16,
    pub(crate) max_write: u32,
    pub(crate) time_gran: u32,
    pub(crate) max_pages: u16,
}

impl InitOut {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.major);
        put_u32(out, self.minor);
        put_u32(out, self.max_readahead);
        put_u32(out, self.flags);
        put_u16(out, self.max_background);
        put_u16(out, self.congestion_threshold);
        put_u32(out, self.max_write);
        put_u32(out, self.time_gran);
        put_u16(out, self.max_pages);
        put_u16(out, 0); // map_alignment
        put_u32(out, 0); // flags2
        put_u32(out, 0); // max_stack_depth
        out.extend_from_slice(&[0u8; 24]); // reserved
    }
}

/// `struct fuse_read_in` (also READDIR's argument).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadIn {
    pub(crate) offset: u64,
    pub(crate) size: u32,
}

impl ReadIn {
    pub(crate) fn parse(arg: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor::new(arg);
        let _fh = c.u64()?;
        let offset = c.u64()?;
        let size = c.u32()?;
        Ok(Self { offset, size })
    }
}

/// `struct fuse_write_in` and the data after it.
pub(crate) struct WriteIn<'a> {
    pub(crate) offset: u64,
    pub(crate) data: &'a [u8],
}

impl<'a> WriteIn<'a> {
    pub(crate) fn parse(arg: &'a [u8]) -> Result<Self, Malformed> {
        let mut c = Cursor::new(arg);
        let _fh = c.u64()?;
        let offset = c.u64()?;
        let size = c.u32()? as usize;
        c.bytes(WRITE_IN_LEN - 20)?; // write_flags, lock_owner, flags, padding
        let data = c.bytes(size)?;
        Ok(Self { offset, data })
    }
}

/// `struct fuse_open_in`: only the open flags matter to us.
pub(crate) fn parse_open_flags(arg: &[u8]) -> Result<u32, Malformed> {
    Cursor::new(arg).u32()
}

/// `struct fuse_fallocate_in`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FallocateIn {
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) mode: i32,
}

impl FallocateIn {
    pub(crate) fn parse(arg: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor::new(arg);
        let _fh = c.u64()?;
        Ok(Self {
            offset: c.u64()?,
            length: c.u64()?,
            mode: c.u32()? as i32,
        })
    }
}

/// `struct fuse_setattr_in`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SetattrIn {
    pub(crate) valid: u32,
    pub(crate) size: u64,
    pub(crate) atime: (i64, u32),
    pub(crate) mtime: (i64, u32),
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl SetattrIn {
    pub(crate) fn parse(arg: &[u8]) -> Result<Self, Malformed> {
        let mut c = Cursor::new(arg);
        let valid = c.u32()?;
        let _padding = c.u32()?;
        let _fh = c.u64()?;
        let size = c.u64()?;
        let _lock_owner = c.u64()?;
        let atime = c.i64()?;
        let mtime = c.i64()?;
        let _ctime = c.i64()?;
        let atimensec = c.u32()?;
        let mtimensec = c.u32()?;
        let _ctimensec = c.u32()?;
        let mode = c.u32()?;
        let _unused4 = c.u32()?;
        let uid = c.u32()?;
        let gid = c.u32()?;
        Ok(Self {
            valid,
            size,
            atime: (atime, atimensec),
            mtime: (mtime, mtimensec),
            mode,
            uid,
            gid,
        })
    }
}

/// `struct fuse_attr`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attr {
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) blocks: u64,
    pub(crate) atime: (i64, u32),
    pub(crate) mtime: (i64, u32),
    pub(crate) ctime: (i64, u32),
    /// File type bits and permissions, as in `st_mode`.
    pub(crate) mode: u32,
    pub(crate) nlink: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) blksize: u32,
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.ino);
        put_u64(out, self.size);
        put_u64(out, self.blocks);
        put_u64(out, self.atime.0 as u64);
        put_u64(out, self.mtime.0 as u64);
        put_u64(out, self.ctime.0 as u64);
        put_u32(out, self.atime.1);
        put_u32(out, self.mtime.1);
        put_u32(out, self.ctime.1);
        put_u32(out, self.mode);
        put_u32(out, self.nlink);
        put_u32(out, self.uid);
        put_u32(out, self.gid);
        put_u32(out, 0); // rdev
        put_u32(out, self.blksize);
        put_u32(out, 0); // flags
    }
}

fn split_ttl(ttl: std::time::Duration) -> (u64, u32) {
    (ttl.as_secs(), ttl.subsec_nanos())
}

/// `struct fuse_entry_out`.
pub(crate) fn encode_entry(out: &mut Vec<u8>, attr: &Attr, ttl: std::time::Duration) {
    let (secs, nanos) = split_ttl(ttl);
    put_u64(out, attr.ino); // nodeid
    put_u64(out, 0); // generation
    put_u64(out, secs); // entry_valid
    put_u64(out, secs); // attr_valid
    put_u32(out, nanos);
    put_u32(out, nanos);
    attr.encode(out);
}

/// `struct fuse_attr_out`.
pub(crate) fn encode_attr(out: &mut Vec<u8>, attr: &Attr, ttl: std::time::Duration) {
    let (secs, nanos) = split_ttl(ttl);
    put_u64(out, secs);
    put_u32(out, nanos);
    put_u32(out, 0); // dummy
    attr.encode(out);
}

/// `struct fuse_open_out`.
pub(crate) fn encode_open(out: &mut Vec<u8>, fh: u64, open_flags: u32) {
    put_u64(out, fh);
    put_u32(out, open_flags);
    put_u32(out, 0); // backing_id
}

/// `struct fuse_write_out`.
pub(crate) fn encode_written(out: &mut Vec<u8>, size: u32) {
    put_u32(out, size);
    put_u32(out, 0);
}

/// `struct fuse_statfs_out`.
pub(crate) fn encode_statfs(out: &mut Vec<u8>, blocks: u64, files: u64, bsize: u32, namelen: u32) {
    put_u64(out, blocks);
    put_u64(out, 0); // bfree
    put_u64(out, 0); // bavail
    put_u64(out, files);
    put_u64(out, 0); // ffree
    put_u32(out, bsize);
    put_u32(out, namelen);
    put_u32(out, bsize); // frsize
    put_u32(out, 0); // padding
    out.extend_from_slice(&[0u8; 24]); // spare
}

/// Append one `struct fuse_dirent` (padded to 8 bytes) if it fits in
/// `limit` bytes overall; false when it does not.
pub(crate) fn push_dirent(
    out: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    off: u64,
    typ: u32,
    name: &[u8],
) -> bool {
    let len = 24 + name.len();
    let padded = len.next_multiple_of(8);
    if out.len() + padded > limit {
        return false;
    }
    put_u64(out, ino);
    put_u64(out, off);
    put_u32(out, name.len() as u32);
    put_u32(out, typ);
    out.extend_from_slice(name);
    out.resize(out.len() + padded - len, 0);
    true
}

/// `struct fuse_out_header` for a reply of `payload_len` bytes; `error` is
/// 0 or a negative errno.
pub(crate) fn out_header(unique: u64, error: i32, payload_len: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&((OUT_HEADER_LEN + payload_len) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_ne_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_ne_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, opcode: u32) -> Vec<u8> {
        let mut b = Vec::new();
        put_u32(&mut b, len);
        put_u32(&mut b, opcode);
        put_u64(&mut b, 7);
        put_u64(&mut b, ROOT_INO);
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    #[test]
    fn short_or_inconsistent_requests_are_malformed_not_panics() {
        for n in 0..IN_HEADER_LEN {
            assert!(InHeader::parse(&vec![0u8; n]).is_err(), "{n} bytes");
        }
        // len says more than was read.
        assert!(InHeader::parse(&header(100, opcode::READ)).is_err());
        let mut ok = header(IN_HEADER_LEN as u32 + 3, opcode::LOOKUP);
        ok.extend_from_slice(b"ab\0");
        let (h, arg) = InHeader::parse(&ok).unwrap();
        assert_eq!((h.opcode, h.unique, arg.len()), (opcode::LOOKUP, 7, 3));
        assert!(Cursor::new(b"no terminator").c_str().is_err());
        for n in 0..64 {
            let arg = vec![0u8; n];
            let _ = ReadIn::parse(&arg);
            let _ = WriteIn::parse(&arg);
            let _ = SetattrIn::parse(&arg);
            let _ = FallocateIn::parse(&arg);
            let _ = InitIn::parse(&arg);
        }
        // A WRITE whose size field promises more data than follows.
        let mut w = vec![0u8; WRITE_IN_LEN];
        w[16..20].copy_from_slice(&10u32.to_ne_bytes());
        assert!(WriteIn::parse(&w).is_err());
        w.extend_from_slice(&[1u8; 10]);
        assert_eq!(WriteIn::parse(&w).unwrap().data, &[1u8; 10]);
    }

    #[test]
    fn reply_structs_have_kernel_sizes() {
        let mut b = Vec::new();
        encode_entry(&mut b, &Attr::default(), std::time::Duration::from_secs(1));
        assert_eq!(b.len(), 128, "fuse_entry_out");
        b.clear();
        encode_attr(&mut b, &Attr::default(), std::time::Duration::from_secs(1));
        assert_eq!(b.len(), 104, "fuse_attr_out");
        b.clear();
        InitOut::default().encode(&mut b);
        assert_eq!(b.len(), 64, "fuse_init_out");
        b.clear();
        encode_statfs(&mut b, 1, 2, 4096, 255);
        assert_eq!(b.len(), 80, "fuse_statfs_out");
        b.clear();
        encode_open(&mut b, 0, 0);
        assert_eq!(b.len(), 16, "fuse_open_out");
        b.clear();
        assert!(push_dirent(&mut b, 4096, 1, 1, 4, b"."));
        assert_eq!(b.len(), 32);
        assert!(!push_dirent(&mut b, 40, 2, 2, 8, b"disk"));
    }
}
