//! What goes into an image, and the version hash derived from it.

use serde::Serialize;

/// Bump when the build procedure changes in a way the recipe text does not show.
pub(crate) const FORMAT: u32 = 1;

/// The sprite user.
pub(crate) const SPRITE_USER: &str = "sprite";
pub(crate) const SPRITE_UID: u32 = 1000;
pub(crate) const SPRITE_HOME: &str = "/home/sprite";

/// Packages of the default sprite image, on top of the `minbase` variant
/// (Essential + Priority: required, which brings dpkg, apt, passwd, login, mount).
pub(crate) const DEBIAN_PACKAGES: &[&str] = &[
    "apt",
    "bash",
    "ca-certificates",
    "coreutils",
    "curl",
    "debian-archive-keyring",
    "git",
    "gpgv",
    "iproute2",
    "iputils-ping",
    "less",
    "locales",
    "netbase",
    "openssh-client",
    "procps",
    "python3",
    "sudo",
    "tmux",
    "vim-tiny",
];

/// dpkg path filters (like Debian's "slim" images). They stay in the image as
/// `/etc/dpkg/dpkg.cfg.d/01den-slim`, so later `apt-get install`s inside a
/// sprite skip the same files. Saves ~45 MB (translations are the bulk).
pub(crate) const DPKG_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
];

const SLIM_CFG: &str = "/etc/dpkg/dpkg.cfg.d/01den-slim";

/// Build-only dpkg setting: no fsync per unpacked file (the build fsyncs the
/// whole filesystem once before publishing). Removed again by the last hook.
const UNSAFE_IO_CFG: &str = "/etc/dpkg/dpkg.cfg.d/00den-build-unsafe-io";

/// mmdebstrap `--extract-hook`s: run after the Essential packages were unpacked
/// (by mmdebstrap itself) and before dpkg installs them and everything else.
///
/// The path filters are written here as a dpkg config file rather than passed
/// as `--dpkgopt`: with `--dpkgopt` filters, mmdebstrap pipes every Essential
/// package through its Python `mmtarfilter` while unpacking, which took 45 of
/// the 110 s of a build here. This way dpkg applies them, and the final hook
/// removes what mmdebstrap's own unpacking left.
pub(crate) fn debian_extract_hooks(filters: &[String]) -> Vec<String> {
    let lines: String = filters.iter().map(|f| format!(" '{f}'")).collect();
    vec![format!(
        r#"mkdir -p "$1/etc/dpkg/dpkg.cfg.d" && echo force-unsafe-io > "$1{UNSAFE_IO_CFG}" && printf '%s\n'{lines} > "$1{SLIM_CFG}""#
    )]
}

pub(crate) const HOSTNAME: &str = "sprite\n";
pub(crate) const HOSTS: &str = "127.0.0.1\tlocalhost\n127.0.1.1\tsprite\n::1\tlocalhost ip6-localhost ip6-loopback\n\
ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n";
pub(crate) const RESOLV_CONF: &str = "# Placeholder: the sprite runtime replaces this file.\n";
pub(crate) const SUDOERS: &str = "sprite ALL=(ALL:ALL) NOPASSWD: ALL\n";

/// mmdebstrap `--customize-hook`s (run on the host, `$1` = the new root).
pub(crate) fn debian_customize_hooks() -> Vec<String> {
    let u = SPRITE_USER;
    let id = SPRITE_UID;
    let home = SPRITE_HOME;
    vec![
        // The sprite user: uid/gid 1000, bash, sudo group. Password "*": no
        // password login, but not "locked" (sshd would refuse keys for "!").
        format!(r#"chroot "$1" groupadd --gid {id} {u}"#),
        format!(
            r#"chroot "$1" useradd --uid {id} --gid {id} --groups sudo --create-home --home-dir {home} --shell /bin/bash --password '*' {u}"#
        ),
        format!(
            r#"printf '{}' > "$1/etc/sudoers.d/{u}" && chmod 0440 "$1/etc/sudoers.d/{u}" && chroot "$1" visudo --check --quiet"#,
            SUDOERS.replace('\n', "\\n")
        ),
        // C.UTF-8 (glibc's built-in one also ships in libc-bin; generating it
        // puts it into locale-archive too) and LANG for PAM sessions.
        r#"echo 'C.UTF-8 UTF-8' > "$1/etc/locale.gen" && chroot "$1" locale-gen && chroot "$1" update-locale LANG=C.UTF-8"#
            .to_string(),
        format!(
            r#"printf '{}' > "$1/etc/hostname" && printf '{}' > "$1/etc/hosts" && printf '{}' > "$1/etc/resolv.conf""#,
            HOSTNAME.replace('\n', "\\n"),
            HOSTS.replace('\n', "\\n").replace('\t', "\\t"),
            RESOLV_CONF.replace('\n', "\\n"),
        ),
    ]
}

/// The last customize hook, after the caller's own: drop build-only settings,
/// files the dpkg filters exclude that mmdebstrap's unpacking of the Essential
/// packages left behind, and leftovers (mmdebstrap's cleanup then removes apt
/// lists, the apt cache and logs).
pub(crate) fn debian_final_hooks() -> Vec<String> {
    vec![
        format!(r#"rm -f "$1{UNSAFE_IO_CFG}""#),
        r#"cd "$1/usr/share" && rm -rf man/* info/* groff/* lintian/* && if [ -d locale ]; then find locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +; fi && if [ -d doc ]; then find doc -mindepth 1 ! -type d ! -name copyright -delete && find doc -mindepth 1 -type d -empty -delete; fi"#.to_string(),
        r#"rm -rf "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old "$1"/var/cache/apt/*.bin "$1"/var/log/apt/*"#.to_string(),
    ]
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DebianRecipe {
    pub(crate) suite: String,
    pub(crate) variant: String,
    pub(crate) mirror: String,
    pub(crate) security_mirror: String,
    pub(crate) packages: Vec<String>,
    pub(crate) extract_hooks: Vec<String>,
    pub(crate) customize_hooks: Vec<String>,
    pub(crate) user_hooks: Vec<String>,
    pub(crate) final_hooks: Vec<String>,
}

impl DebianRecipe {
    pub(crate) fn sprite_default() -> Self {
        let filters: Vec<String> = DPKG_FILTERS.iter().map(|s| s.to_string()).collect();
        DebianRecipe {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            mirror: "http://deb.debian.org/debian".into(),
            security_mirror: "http://deb.debian.org/debian-security".into(),
            packages: DEBIAN_PACKAGES.iter().map(|s| s.to_string()).collect(),
            extract_hooks: debian_extract_hooks(&filters),
            customize_hooks: debian_customize_hooks(),
            user_hooks: Vec::new(),
            final_hooks: debian_final_hooks(),
        }
    }

    /// `deb` lines for /etc/apt/sources.list: the suite, its updates and security.
    pub(crate) fn sources(&self) -> Vec<String> {
        let s = &self.suite;
        vec![
            format!("deb {} {s} main", self.mirror),
            format!("deb {} {s}-updates main", self.mirror),
            format!("deb {} {s}-security main", self.security_mirror),
        ]
    }

    /// mmdebstrap's arguments, target directory excluded (it goes between the
    /// suite and the sources).
    pub(crate) fn mmdebstrap_args(&self, target: &std::path::Path) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--mode=root".into(),
            format!("--variant={}", self.variant).into(),
            "--format=directory".into(),
            "--verbose".into(),
        ];
        if !self.packages.is_empty() {
            a.push(format!("--include={}", self.packages.join(",")).into());
        }
        a.extend(
            self.extract_hooks
                .iter()
                .map(|h| format!("--extract-hook={h}").into()),
        );
        let hooks = self
            .customize_hooks
            .iter()
            .chain(&self.user_hooks)
            .chain(&self.final_hooks);
        a.extend(hooks.map(|h| format!("--customize-hook={h}").into()));
        a.push(self.suite.clone().into());
        a.push(target.as_os_str().to_owned());
        a.extend(self.sources().into_iter().map(Into::into));
        a
    }
}

/// A static file of the busybox image.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StaticFile {
    pub(crate) path: &'static str,
    pub(crate) content: &'static str,
    pub(crate) mode: u32,
}

pub(crate) const BUSYBOX_FILES: &[StaticFile] = &[
    StaticFile {
        path: "etc/passwd",
        content: "root:x:0:0:root:/root:/bin/sh\nsprite:x:1000:1000:sprite:/home/sprite:/bin/sh\n\
                  nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        mode: 0o644,
    },
    StaticFile {
        path: "etc/group",
        content: "root:x:0:\nsudo:x:27:sprite\nsprite:x:1000:\nnogroup:x:65534:\n",
        mode: 0o644,
    },
    StaticFile {
        path: "etc/hostname",
        content: HOSTNAME,
        mode: 0o644,
    },
    StaticFile {
        path: "etc/hosts",
        content: HOSTS,
        mode: 0o644,
    },
    StaticFile {
        path: "etc/resolv.conf",
        content: RESOLV_CONF,
        mode: 0o644,
    },
];

/// Directories of the busybox image: (path, mode, owner uid/gid).
pub(crate) const BUSYBOX_DIRS: &[(&str, u32, u32)] = &[
    ("bin", 0o755, 0),
    ("sbin", 0o755, 0),
    ("usr", 0o755, 0),
    ("usr/bin", 0o755, 0),
    ("usr/sbin", 0o755, 0),
    ("etc", 0o755, 0),
    ("dev", 0o755, 0),
    ("proc", 0o555, 0),
    ("sys", 0o555, 0),
    ("run", 0o755, 0),
    ("var", 0o755, 0),
    ("var/tmp", 0o1777, 0),
    ("tmp", 0o1777, 0),
    ("root", 0o700, 0),
    ("home", 0o755, 0),
    ("home/sprite", 0o755, SPRITE_UID),
];

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BusyboxRecipe {
    pub(crate) package: String,
    pub(crate) dirs: Vec<(String, u32, u32)>,
    pub(crate) files: Vec<StaticFile>,
    pub(crate) user_hooks: Vec<String>,
}

impl BusyboxRecipe {
    pub(crate) fn new() -> Self {
        BusyboxRecipe {
            package: "busybox-static".into(),
            dirs: BUSYBOX_DIRS
                .iter()
                .map(|&(p, m, o)| (p.to_string(), m, o))
                .collect(),
            files: BUSYBOX_FILES.to_vec(),
            user_hooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Recipe {
    Debian(DebianRecipe),
    Busybox(BusyboxRecipe),
}

impl Recipe {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Recipe::Debian(_) => "debian",
            Recipe::Busybox(_) => "busybox",
        }
    }

    /// The canonical text the version hashes (also stored in the manifest).
    pub(crate) fn canonical(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("recipe serializes");
        v["format"] = FORMAT.into();
        v
    }

    /// `<suite>-<12 hex digits>` or `busybox-<12 hex digits>`.
    pub(crate) fn version(&self) -> String {
        let text = serde_json::to_vec(&self.canonical()).expect("recipe serializes");
        let hash = blake3::hash(&text).to_hex();
        let prefix = match self {
            Recipe::Debian(d) => d.suite.as_str(),
            Recipe::Busybox(_) => "busybox",
        };
        format!("{prefix}-{}", &hash[..12])
    }

    pub(crate) fn user_hooks_mut(&mut self) -> &mut Vec<String> {
        match self {
            Recipe::Debian(d) => &mut d.user_hooks,
            Recipe::Busybox(b) => &mut b.user_hooks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_depends_on_recipe_only() {
        let a = Recipe::Debian(DebianRecipe::sprite_default());
        let b = Recipe::Debian(DebianRecipe::sprite_default());
        assert_eq!(a.version(), b.version());
        assert!(a.version().starts_with("bookworm-"));
        assert_eq!(a.version().len(), "bookworm-".len() + 12);
        let mut c = a.clone();
        c.user_hooks_mut().push("true".into());
        assert_ne!(a.version(), c.version());
        let bb = Recipe::Busybox(BusyboxRecipe::new());
        assert!(bb.version().starts_with("busybox-"));
    }

    #[test]
    fn mmdebstrap_command_line() {
        let d = DebianRecipe::sprite_default();
        let args: Vec<String> = d
            .mmdebstrap_args(std::path::Path::new("/x/rootfs"))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(args.contains(&"--variant=minbase".to_string()));
        assert!(args.iter().any(|a| a.starts_with("--include=apt,bash,")));
        let suite = args.iter().position(|a| a == "bookworm").unwrap();
        assert_eq!(args[suite + 1], "/x/rootfs");
        assert_eq!(args[suite + 2], "deb http://deb.debian.org/debian bookworm main");
        assert_eq!(
            args[suite + 4],
            "deb http://deb.debian.org/debian-security bookworm-security main"
        );
        let extract = args.iter().find(|a| a.starts_with("--extract-hook=")).unwrap();
        assert!(
            extract.contains(r#"printf '%s\n' 'path-exclude=/usr/share/man/*' "#),
            "{extract}"
        );
        assert!(
            !args.iter().any(|a| a.starts_with("--dpkgopt")),
            "--dpkgopt makes mmdebstrap slow"
        );
        let hooks: Vec<_> = args
            .iter()
            .filter(|a| a.starts_with("--customize-hook="))
            .collect();
        assert!(hooks[hooks.len() - 3].contains("00den-build-unsafe-io"));
    }
}
