//! The OCI runtime spec (`config.json`) of a sprite container.
//!
//! Written as JSON and then parsed into `oci_spec::runtime::Spec`, so every
//! field is checked against the spec's types before libcontainer sees it, and
//! the document reads like the `config.json` it becomes.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::{Value, json};

use super::seccomp;
use crate::backend::{BindMount, Resources, RuntimeError, SpriteSpec};
use crate::cgroup;

/// Docker's default capability set: enough for a root shell, `apt`, `sudo`,
/// `ping` and `chown`, nothing that reaches the kernel's global state
/// (no SYS_ADMIN, SYS_MODULE, SYS_TIME, SYS_PTRACE, NET_ADMIN, SYS_RAWIO…).
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Hidden from the sprite (bind-mounted over with /dev/null or an empty
/// read-only tmpfs): kernel memory, keys, timers, firmware tables, and the
/// block devices: every loop device's `loop/backing_file` names a host path
/// (other sprites' and other servers' disks included).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/block",
    "/sys/devices/virtual/block",
];

/// Remounted read-only: host sysctls and kernel interfaces.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The empty tmpfs under the staging directory: the second layer of every
/// staging overlay (overlayfs wants two lower layers when it has no upper
/// one).
/// The OCI `linux.resources` limits (cpu, memory, pids) of `r`, into
/// `resources`: one mapping for a new container and for a live update.
pub(crate) fn merge_limits(resources: &mut Value, r: &Resources) {
    let mut cpu = serde_json::Map::new();
    if let Some(s) = r.cpu.shares {
        cpu.insert("shares".into(), json!(s));
    }
    if let Some(q) = r.cpu.quota_us {
        cpu.insert("quota".into(), json!(q));
        cpu.insert("period".into(), json!(r.cpu.period_us.unwrap_or(100_000)));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(m) = r.memory_bytes {
        resources["memory"] = json!({"limit": m});
    }
    if let Some(p) = r.pids {
        resources["pids"] = json!({"limit": p});
    }
}

pub(crate) const STAGE_EMPTY: &str = "empty";

/// Where a read-only bind mount is bound from.
///
/// A bind mount's root field in `/proc/self/mountinfo` is the source's path
/// inside its filesystem, so binding `<run>/s/<key>/etc/resolv.conf` or the
/// agent bundle would show the sprite where den keeps its run dir, its data
/// and its binaries. Instead the shim mounts a read-only overlay of the
/// source's directory, its layers named by descriptor, at `at`, and the
/// sprite's bind comes from `source` inside it: mountinfo shows `/` or
/// `/<file name>` of an `overlay` named `/proc/self/fd/N`. The lower layer
/// is the host's directory itself, so files den rewrites in place (the
/// policy file) still change in the sprite. The staging mounts exist only
/// in the sprite's mount namespace and go with the old root at pivot_root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Staged {
    /// The host directory: the overlay's lower layer.
    pub lower: PathBuf,
    /// The overlay's mount point, `<stage>/<index>`.
    pub at: PathBuf,
    /// What the sprite's bind mount is bound from.
    pub source: PathBuf,
}

/// The staging of mount number `i` under `stage`, or `None` for a bind
/// from the host path itself: writable mounts (an overlay without an upper
/// layer is read-only) and sources that cannot be examined (the bind then
/// fails with the host's error).
pub(crate) fn staged(m: &BindMount, i: usize, stage: &Path) -> Option<Staged> {
    if !m.readonly {
        return None;
    }
    let md = std::fs::metadata(&m.source).ok()?;
    let at = stage.join(i.to_string());
    if md.is_dir() {
        return Some(Staged {
            lower: m.source.clone(),
            source: at.clone(),
            at,
        });
    }
    let (parent, name) = (m.source.parent()?, m.source.file_name()?);
    Some(Staged {
        lower: parent.to_path_buf(),
        source: at.join(name),
        at,
    })
}

/// Build the spec for `sprite`, with `rootfs` (the merged overlay) as root.
/// `sysfs_dir` is where the shim mounts a sysfs for sprites that join a
/// netns, `stage_dir` where it stages the read-only bind mounts ([`Staged`]).
pub fn build(
    sprite: &SpriteSpec,
    rootfs: &Path,
    sysfs_dir: &Path,
    stage_dir: &Path,
) -> Result<Spec, RuntimeError> {
    parse(build_json(
        sprite,
        rootfs,
        Engine::Native { sysfs_dir, stage_dir },
    ))
}

/// The spec of `sprite` for gVisor's `runsc` (see [`crate::gvisor`]): the
/// same process, namespaces, limits and security profile as a native
/// container, with the differences gVisor needs: the prepared netns is named
/// in the spec (the sandbox starts in it and builds its own network stack
/// from its interfaces), `/sys` is the sentry's own sysfs, and bind mounts come
/// straight from their host paths (the sentry synthesises its mountinfo, so
/// host paths never show and nothing needs staging).
pub(crate) fn build_gvisor(sprite: &SpriteSpec, rootfs: &Path) -> Result<Spec, RuntimeError> {
    parse(build_json(sprite, rootfs, Engine::Gvisor))
}

fn parse(value: Value) -> Result<Spec, RuntimeError> {
    serde_json::from_value(value).map_err(|e| RuntimeError::InvalidSpec(format!("OCI spec: {e}")))
}

/// Which engine the spec is for.
#[derive(Clone, Copy)]
enum Engine<'a> {
    /// libcontainer through den's shim, which mounts a sysfs at `sysfs_dir`
    /// and stages read-only bind mounts under `stage_dir`.
    Native {
        sysfs_dir: &'a Path,
        stage_dir: &'a Path,
    },
    Gvisor,
}

fn build_json(sprite: &SpriteSpec, rootfs: &Path, engine: Engine<'_>) -> Value {
    let uid = sprite.idmap.uids[0];
    let gid = sprite.idmap.gids[0];

    let mut namespaces = vec![
        json!({"type": "user"}),
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    // A prepared netns is joined by the shim before libcontainer runs, and the
    // container inherits it (no "network" entry). libcontainer would setns()
    // after entering the new user namespace, which has no CAP_SYS_ADMIN over
    // a netns owned by the host's user namespace: EPERM.
    match (engine, &sprite.netns_path) {
        (_, None) => namespaces.push(json!({"type": "network"})),
        // runsc starts the sandbox in it itself, from the host side before
        // the user namespace, so the EPERM above does not arise. (Without a
        // path it would start the sandbox in a new netns, not its own.)
        (Engine::Gvisor, Some(path)) => namespaces.push(json!({"type": "network", "path": path})),
        (Engine::Native { .. }, Some(_)) => {}
    }

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=755", "size=65536k"]}),
    ];
    // A fresh sysfs needs a network namespace owned by the sprite's user
    // namespace. When joining a prepared netns (owned by the host), the kernel
    // refuses, so the shim mounts a sysfs (as host root, after joining the
    // netns, so /sys/class/net shows the sprite's interfaces) at
    // `sysfs_dir` and it is bind-mounted read-only from there.
    // gVisor's sysfs is the sentry's own, so it never needs the host's.
    mounts.push(match (engine, &sprite.netns_path) {
        (Engine::Native { sysfs_dir, .. }, Some(_)) => {
            json!({"destination": "/sys", "type": "bind", "source": sysfs_dir,
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
        }
        _ => json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                    "options": ["nosuid", "noexec", "nodev", "ro"]}),
    });
    for (i, m) in sprite.mounts.iter().enumerate() {
        let mut options = vec!["rbind", "nosuid", "nodev"];
        if m.readonly {
            options.push("ro");
        }
        let source = match engine {
            Engine::Native { stage_dir, .. } => {
                staged(m, i, stage_dir).map_or_else(|| m.source.clone(), |s| s.source)
            }
            Engine::Gvisor => m.source.clone(),
        };
        mounts.push(
            json!({"destination": m.destination, "type": "bind", "source": source, "options": options}),
        );
    }

    let mut caps = CAPABILITIES.to_vec();
    let mut seccomp = seccomp::profile();
    if matches!(engine, Engine::Gvisor) {
        // The kernel log a sprite reads under gVisor is the sentry's own
        // (its boot messages), so `dmesg` may work there as on a VM; on the
        // host kernel it would reveal the host's log (and kernel addresses).
        caps.push("CAP_SYSLOG");
        seccomp = seccomp::gvisor_profile();
    }

    let mut resources = json!({
        // No host devices: deny all; libcgroups adds the standard allow list
        // (null, zero, full, random, urandom, tty, ptmx, pts), the same set
        // libcontainer bind-mounts into /dev.
        "devices": [{"allow": false, "access": "rwm"}],
    });
    merge_limits(&mut resources, &sprite.resources);

    json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": false},
        "hostname": sprite.hostname,
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": sprite.init,
            "env": sprite.env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            // noNewPrivileges stays unset (= false, as in Docker): `sudo`
            // (setuid) must work for the sprite user. It must be *absent*,
            // not `false`: libcontainer 0.7 installs seccomp before dropping
            // capabilities only when the field is `None`; with `Some(false)`
            // it tries after the drop and the load fails with EACCES.
        },
        "mounts": mounts,
        "linux": {
            "uidMappings": [{"containerID": uid.inside, "hostID": uid.outside, "size": uid.count}],
            "gidMappings": [{"containerID": gid.inside, "hostID": gid.outside, "size": gid.count}],
            "namespaces": namespaces,
            "cgroupsPath": cgroup::sprite_cgroup_path(&sprite.id),
            "resources": resources,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::backend::{BindMount, Resources};
    use crate::image::IdMap;

    fn sprite() -> SpriteSpec {
        SpriteSpec {
            id: "s1".into(),
            rootfs_lower: "/l".into(),
            upper_dir: "/u".into(),
            work_dir: "/w".into(),
            hostname: "s1".into(),
            idmap: IdMap::root_at(100_000, 65_536),
            netns_path: None,
            init: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            mounts: vec![BindMount {
                source: "/run/den/s1".into(),
                destination: "/.sprite/run".into(),
                readonly: false,
            }],
            resources: Resources::sprite_default(),
            console_log: None,
            agent_listener: None,
        }
    }

    #[test]
    fn spec_parses_and_has_the_profile() {
        let spec = build(
            &sprite(),
            &PathBuf::from("/r"),
            &PathBuf::from("/s"),
            &PathBuf::from("/m"),
        )
        .unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.uid_mappings().as_ref().unwrap()[0].host_id(), 100_000);
        assert_eq!(linux.namespaces().as_ref().unwrap().len(), 7);
        let mut joined = sprite();
        joined.netns_path = Some("/run/netns/x".into());
        let spec = build(
            &joined,
            &PathBuf::from("/r"),
            &PathBuf::from("/s"),
            &PathBuf::from("/m"),
        )
        .unwrap();
        assert_eq!(
            spec.linux()
                .as_ref()
                .unwrap()
                .namespaces()
                .as_ref()
                .unwrap()
                .len(),
            6
        );
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert!(seccomp.syscalls().as_ref().unwrap().len() > 2);
        let caps = spec.process().as_ref().unwrap().capabilities().as_ref().unwrap();
        assert_eq!(caps.bounding().as_ref().unwrap().len(), CAPABILITIES.len());
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(res.pids().as_ref().unwrap().limit(), 4096);
        assert_eq!(res.memory().as_ref().unwrap().limit(), Some(2 << 30));
    }

    #[test]
    fn gvisor_spec_differs_where_gvisor_needs() {
        let mut joined = sprite();
        joined.netns_path = Some("/run/netns/x".into());
        joined.mounts.push(BindMount {
            source: "/opt/den/agent".into(),
            destination: "/.sprite/bin/den".into(),
            readonly: true,
        });
        let v = serde_json::to_value(build_gvisor(&joined, &PathBuf::from("/r")).unwrap()).unwrap();
        // The netns is named (runsc starts the sandbox in it).
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "network", "path": "/run/netns/x"})));
        assert_eq!(ns.len(), 7);
        let mounts = v["mounts"].as_array().unwrap();
        let sys = mounts.iter().find(|m| m["destination"] == "/sys").unwrap();
        assert_eq!(sys["type"], "sysfs", "the sentry's own sysfs, never the host's");
        // Read-only binds come straight from the host path (no staging).
        let agent = mounts
            .iter()
            .find(|m| m["destination"] == "/.sprite/bin/den")
            .unwrap();
        assert_eq!(agent["source"], "/opt/den/agent");
        // CAP_SYSLOG and syslog(2) for the sentry's kernel log; native has neither.
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&json!("CAP_SYSLOG")));
        let denied = &v["linux"]["seccomp"]["syscalls"][0]["names"];
        assert!(!denied.as_array().unwrap().contains(&json!("syslog")));
        let native = serde_json::to_value(
            build(
                &joined,
                &PathBuf::from("/r"),
                &PathBuf::from("/s"),
                &PathBuf::from("/m"),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(
            !native["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .contains(&json!("CAP_SYSLOG"))
        );
        assert!(
            native["linux"]["seccomp"]["syscalls"][0]["names"]
                .as_array()
                .unwrap()
                .contains(&json!("syslog"))
        );
    }
}
