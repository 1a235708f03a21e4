//! The seccomp profile: Docker's default policy expressed as a deny list.
//!
//! Docker's default profile is an allow list of ~370 syscalls; everything it
//! leaves out (for a container without `CAP_SYS_ADMIN` and friends) is
//! listed here and answered with `EPERM`, and everything else is allowed.
//! The effect for a sprite is the same as Docker's defaults, with two
//! deliberate differences: syscalls newer than the profile are allowed rather
//! than refused (the deny list is about known-dangerous interfaces), and
//! `ptrace` is allowed (kernel ≥ 4.8, as in Docker; debuggers are a normal
//! thing to run on a sprite).
//!
//! Namespace creation is refused like Docker does: `unshare`/`setns` outright,
//! `clone` when a `CLONE_NEW*` flag is set, and `clone3` with `ENOSYS` (its
//! flags live in memory where BPF can't see them; libc then falls back to
//! `clone`).

use serde_json::{Value, json};

/// Syscalls refused with EPERM (Docker default profile: not allowed without
/// extra capabilities, plus the new mount API, which is `mount` by another name).
pub const DENIED: &[&str] = &[
    // Kernel modules, kexec, reboot, swap, accounting.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    // Clock.
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    // Mounts and namespaces (Docker: CAP_SYS_ADMIN only).
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    // Kernel keyring (not namespaced).
    "add_key",
    "request_key",
    "keyctl",
    // Raw hardware and memory-policy access.
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    "mbind",
    "set_mempolicy",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
    // Information leaks and cross-process memory access.
    "kcmp",
    "lookup_dcookie",
    "perf_event_open",
    "process_vm_readv",
    "process_vm_writev",
    "name_to_handle_at",
    "open_by_handle_at",
    "bpf",
    "userfaultfd",
    "fanotify_init",
    // io_uring bypasses seccomp for the operations it performs (Docker ≥ 25).
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Obsolete.
    "nfsservctl",
    "quotactl",
    "quotactl_fd",
    "sysfs",
    "_sysctl",
    "uselib",
    "ustat",
    "syslog",
];

/// `CLONE_NEW*` flags refused in `clone` (each needs its own rule: BPF rules
/// for one syscall are OR-ed, the conditions within a rule AND-ed).
const CLONE_NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME
];

/// The OCI `linux.seccomp` object.
pub fn profile() -> Value {
    build(&[], true)
}

/// The profile for gVisor's sentry, which enforces it itself: `syslog`
/// comes off the deny list (the kernel log there is the sentry's own), and
/// `clone3` is left alone. This runsc (0.0~20240729) answers every errno
/// rule with EPERM, whatever its `errnoRet`, so glibc would take the
/// refused `clone3` as fatal instead of falling back to `clone`, and no
/// program could start a thread. Namespaces a sprite makes under gVisor
/// are the sentry's, not the host's.
pub(crate) fn gvisor_profile() -> Value {
    build(&["syslog"], false)
}

fn build(allowed: &[&str], refuse_clone3: bool) -> Value {
    let denied: Vec<&str> = DENIED.iter().copied().filter(|n| !allowed.contains(n)).collect();
    let mut rules = vec![json!({ "names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM })];
    if refuse_clone3 {
        rules.push(json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }));
    }
    for &flag in CLONE_NS_FLAGS {
        // (arg0 & flag) == flag, in OCI's encoding (value = datum, valueTwo = mask
        // as libcontainer reads it; identical here, so either reading works).
        rules.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
            "args": [{ "index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ" }],
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        // 32-bit x86 and x32 entry points get the same rules; other
        // architectures are killed (libseccomp's bad-arch action).
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": rules,
    })
}
