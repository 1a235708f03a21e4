//! The FUSE disk file on its own (no loop device).

mod common;

use std::fs::OpenOptions;
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{is_mount_point, pattern};
use den_block::mem::MemDevice;
use den_block::{BlockDevice, BlockError, FUSE_FSTYPE, FuseExport, FuseLoopFrontend, FuseOptions};

const MIB: u64 = 1024 * 1024;

fn serve(size: u64, dir: &Path, opts: &FuseOptions) -> (Arc<MemDevice>, FuseExport) {
    common::init_logging();
    let dev = Arc::new(MemDevice::new(size));
    let export = FuseLoopFrontend::export_file(dev.clone(), dir, opts).expect("export FUSE file");
    (dev, export)
}

fn open_rw(path: &Path) -> std::fs::File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

#[test]
fn round_trips_at_odd_offsets_and_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    // Deliberately not a multiple of anything.
    let size = 9 * MIB + 12_345;
    let (dev, export) = serve(size, &dir, &FuseOptions::default());
    let file = open_rw(export.file_path());
    assert_eq!(file.metadata().unwrap().len(), size);

    let cases: &[(u64, usize)] = &[
        (0, 1),
        (1, 3),
        (4095, 2),
        (4097, 4097),
        (65_535, 65_537),
        (3 * MIB - 7, 200_003),
        (5 * MIB + 1, (MIB + 3) as usize), // larger than max_write: split by the kernel
        (size - 10, 10),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(len, i as u64 + 1);
        file.write_all_at(&data, off).unwrap();
        let mut back = vec![0; len];
        file.read_exact_at(&mut back, off).unwrap();
        assert_eq!(back, data, "read back through FUSE at {off}+{len}");
        let mut direct = vec![0; len];
        dev.read_at(off, &mut direct).unwrap();
        assert_eq!(direct, data, "device content at {off}+{len}");
    }
    // Earlier writes survive later ones that do not overlap them.
    let mut first = [0u8; 1];
    file.read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first[0], pattern(1, 1)[0]);

    drop(file);
    export.shutdown().unwrap();
    assert!(!is_mount_point(&dir));
}

#[test]
fn eof_behaves_like_a_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB + 100;
    let (_dev, export) = serve(size, &tmp.path().join("mnt"), &FuseOptions::default());
    let file = open_rw(export.file_path());
    file.write_all_at(&pattern(100, 9), size - 100).unwrap();

    let mut buf = vec![0u8; 4096];
    assert_eq!(file.read_at(&mut buf, size - 5).unwrap(), 5, "short read at EOF");
    assert_eq!(&buf[..5], &pattern(100, 9)[95..]);
    assert_eq!(file.read_at(&mut buf, size).unwrap(), 0, "read at EOF");
    assert_eq!(file.read_at(&mut buf, size + 12_345).unwrap(), 0, "read past EOF");

    // A write straddling the end is cut short; one at the end has no room.
    assert_eq!(file.write_at(&[7u8; 10], size - 3).unwrap(), 3);
    let err = file.write_at(&[7u8; 10], size).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(file.metadata().unwrap().len(), size, "size never changes");

    // Resizing is refused; "resizing" to the current size is harmless.
    let err = file.set_len(size / 2).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    file.set_len(size).unwrap();
    let err = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(export.file_path())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "O_TRUNC: {err}");
    assert_eq!(file.metadata().unwrap().len(), size);

    drop(file);
    export.shutdown().unwrap();
}

#[test]
fn fsync_reaches_device_flush_and_close_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (dev, export) = serve(8 * MIB, &tmp.path().join("mnt"), &FuseOptions::default());
    let file = open_rw(export.file_path());
    file.write_all_at(&pattern(8192, 3), 4096).unwrap();

    let before = dev.flush_count();
    file.sync_all().unwrap();
    assert_eq!(dev.flush_count(), before + 1, "fsync -> flush");
    file.sync_data().unwrap();
    assert_eq!(dev.flush_count(), before + 2, "fdatasync -> flush");

    drop(file); // FUSE FLUSH on close is not a durability point
    let f2 = open_rw(export.file_path());
    drop(f2);
    assert_eq!(dev.flush_count(), before + 2);
    assert_eq!(export.stats().fsyncs, 2);
    export.shutdown().unwrap();
}

#[test]
fn punch_hole_discards() {
    let tmp = tempfile::tempdir().unwrap();
    let (dev, export) = serve(8 * MIB, &tmp.path().join("mnt"), &FuseOptions::default());
    let file = open_rw(export.file_path());
    let data = pattern(MIB as usize, 5);
    file.write_all_at(&data, MIB).unwrap();

    let punch = |off: u64, len: u64, mode: nix::fcntl::FallocateFlags| {
        nix::fcntl::fallocate(&file, mode, off as i64, len as i64)
    };
    use nix::fcntl::FallocateFlags as F;
    punch(MIB + 4096, 8192, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(dev.discard_count(), 1);
    let mut back = vec![0u8; MIB as usize];
    file.read_exact_at(&mut back, MIB).unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..4096 + 8192].iter().all(|&b| b == 0));
    assert_eq!(&back[4096 + 8192..], &data[4096 + 8192..]);

    // ZERO_RANGE (the loop driver's WRITE_ZEROES) also zeroes.
    punch(MIB, 100, F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE).unwrap();
    file.read_exact_at(&mut back[..100], MIB).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0));
    assert_eq!(dev.discard_count(), 2);

    // Growing the file through fallocate is refused like truncate.
    let err = punch(8 * MIB - 10, 100, F::empty()).unwrap_err();
    assert_eq!(err, nix::errno::Errno::EPERM);
    drop(file);
    export.shutdown().unwrap();
}

#[test]
fn namespace_is_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FuseOptions {
        file_name: "vol0.img".into(),
        ..FuseOptions::default()
    };
    let (_dev, export) = serve(MIB, &tmp.path().join("mnt"), &opts);
    let dir = export.mount_dir().to_path_buf();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["vol0.img".to_string()]);
    assert!(export.file_path().ends_with("vol0.img"));
    let meta = std::fs::metadata(export.file_path()).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), MIB);
    assert_eq!(
        std::fs::metadata(dir.join("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(std::fs::File::create(dir.join("new")).is_err());
    let st = nix::sys::statfs::statfs(&dir).unwrap();
    assert_eq!(st.block_size(), 4096);
    // chmod is accepted and remembered.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(export.file_path(), std::fs::Permissions::from_mode(0o640)).unwrap();
    let mode = std::fs::metadata(export.file_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    export.shutdown().unwrap();
}

#[test]
fn parallel_writers_on_many_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FuseOptions {
        threads: 4,
        ..FuseOptions::default()
    };
    let (dev, export) = serve(64 * MIB, &tmp.path().join("mnt"), &opts);
    let path = export.file_path().to_path_buf();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let path = &path;
            s.spawn(move || {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .unwrap();
                for round in 0..8u64 {
                    let off = (t * 8 + round) * MIB;
                    let data = pattern(MIB as usize, off);
                    file.write_all_at(&data, off).unwrap();
                    let mut back = vec![0; data.len()];
                    file.read_exact_at(&mut back, off).unwrap();
                    assert_eq!(back, data);
                }
            });
        }
    });
    for i in 0..64u64 {
        let mut buf = vec![0; MIB as usize];
        dev.read_at(i * MIB, &mut buf).unwrap();
        assert_eq!(buf, pattern(MIB as usize, i * MIB), "MiB {i}");
    }
    let stats = export.stats();
    assert!(stats.worker_threads >= 1);
    // PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE, which some sandboxes drop
    // even for root; without it the server must still work.
    let expected = if has_cap_sys_resource() {
        stats.worker_threads
    } else {
        0
    };
    assert_eq!(
        stats.io_flusher_threads, expected,
        "workers running with PR_SET_IO_FLUSHER"
    );
    let negotiated = export.negotiated().expect("negotiated");
    assert!(stats.largest_write <= negotiated.effective_max_write());
    eprintln!("negotiated: {negotiated:?}, stats: {stats:?}");
    export.shutdown().unwrap();
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << CAP_SYS_RESOURCE) != 0
}

#[test]
fn device_errors_become_errnos() {
    struct Failing;
    impl BlockDevice for Failing {
        fn size(&self) -> u64 {
            MIB
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::Error::other("media error"))
        }
        fn write_at(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&self) -> io::Result<()> {
            panic!("flush exploded")
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let export = FuseLoopFrontend::export_file(
        Arc::new(Failing),
        &tmp.path().join("mnt"),
        &FuseOptions::default(),
    )
    .unwrap();
    let file = open_rw(export.file_path());
    let mut buf = [0u8; 512];
    assert_eq!(
        file.read_at(&mut buf, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(
        file.write_at(&buf, 0).unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    // A panicking device must not take the server down with it.
    assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(file.metadata().unwrap().len(), MIB);
    assert!(export.stats().errors >= 3);
    drop(file);
    export.shutdown().unwrap();
}

#[test]
fn shutdown_with_open_file_is_deferred_not_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    let opts = FuseOptions {
        shutdown_timeout: Duration::from_millis(400),
        ..FuseOptions::default()
    };
    let (dev, export) = serve(MIB, &dir, &opts);
    let file = open_rw(export.file_path());
    match export.shutdown() {
        Err(BlockError::Busy { .. }) => {}
        other => panic!("expected Busy, got {other:?}"),
    }
    // The mount is gone from the namespace but the open file still works.
    assert!(!is_mount_point(&dir));
    file.write_all_at(b"still served", 10).unwrap();
    let mut back = [0u8; 12];
    dev.read_at(10, &mut back).unwrap();
    assert_eq!(&back, b"still served");
    drop(file);
}

/// A previous process died and left its (now dead) FUSE mount behind, and
/// another dead one got stacked on our live mount. Export and shutdown cope.
#[test]
fn stale_mounts_are_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();

    mount_dead_fuse(&dir);
    assert!(is_mount_point(&dir));
    assert!(
        std::fs::metadata(&dir).is_err(),
        "dead FUSE mount answers ENOTCONN"
    );

    let (_dev, export) = serve(MIB, &dir, &FuseOptions::default());
    std::fs::metadata(export.file_path()).unwrap();

    mount_dead_fuse(&dir);
    export.shutdown().unwrap();
    assert!(!is_mount_point(&dir), "no mount left on {}", dir.display());
}

/// Mount a FUSE filesystem of our type and close its device descriptor
/// without ever serving it: exactly what a crashed daemon leaves behind.
fn mount_dead_fuse(dir: &Path) {
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let data = format!("fd={},rootmode=40755,user_id=0,group_id=0", fuse.as_raw_fd());
    nix::mount::mount(
        Some("den-block"),
        dir,
        Some(FUSE_FSTYPE),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap();
    drop(fuse);
}

#[test]
fn foreign_mount_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let dev = Arc::new(MemDevice::new(MIB));
    let err = FuseLoopFrontend::export_file(dev, &dir, &FuseOptions::default()).unwrap_err();
    nix::mount::umount(&dir).unwrap();
    assert!(matches!(err, BlockError::MountDirInUse { .. }), "{err:?}");
}

#[test]
fn abort_fails_io_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnt");
    let (_dev, export) = serve(MIB, &dir, &FuseOptions::default());
    let file = open_rw(export.file_path());
    file.write_all_at(b"x", 0).unwrap();
    let path = export.file_path().to_path_buf();
    let result = export.abort();
    let err = file.write_at(b"y", 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    drop(file);
    // With the file still open the unmount was lazy; either way nothing is
    // left in the namespace.
    assert!(
        matches!(result, Ok(()) | Err(BlockError::Busy { .. })),
        "{result:?}"
    );
    assert!(!is_mount_point(&dir));
    assert!(std::fs::metadata(path).is_err());
}

#[test]
fn read_only_export_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = FuseOptions {
        read_only: true,
        ..FuseOptions::default()
    };
    let dev = Arc::new(MemDevice::new(MIB));
    dev.write_at(0, b"sealed").unwrap();
    let export = FuseLoopFrontend::export_file(dev.clone(), &tmp.path().join("mnt"), &opts).unwrap();
    let err = OpenOptions::new()
        .write(true)
        .open(export.file_path())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let mut buf = [0u8; 6];
    std::fs::File::open(export.file_path())
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"sealed");
    export.shutdown().unwrap();
}
