//! What the catalog keeps per sprite, and what callers see.

use den_net::NetworkPolicy;
use den_runtime::Resources;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SpriteError};

/// The durable record of one sprite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpriteRecord {
    /// Stable public id (UUID).
    pub id: String,
    /// The sprite's key in the manager and the catalog: its name, qualified
    /// by its organisation unless that is the default one (see [`sprite_key`]).
    pub name: String,
    /// Short host-side key: names the volume, cgroup, netns and run directory, so a
    /// sprite recreated under an old name never meets the old one's leftovers.
    pub key: String,
    /// The den volume holding the sprite's writable layer (ext4).
    pub volume: String,
    /// Base image version the sprite was created on; it keeps it for life, because
    /// its upper layer only makes sense on top of that lower layer.
    pub image: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default)]
    pub last_running_at_ms: Option<i64>,
    #[serde(default)]
    pub last_warming_at_ms: Option<i64>,
    /// When the sprite's container last booted (wake from cold, restore,
    /// restart).
    #[serde(default)]
    pub last_started_at_ms: Option<i64>,
    /// When the sprite was last in use (a request, stream or session), as
    /// of its last sleep; [`crate::SpriteManager`] reports a live value for
    /// an awake sprite.
    #[serde(default)]
    pub last_active_at_ms: Option<i64>,
    /// Egress policy; `None` means unrestricted.
    #[serde(default)]
    pub policy: Option<NetworkPolicy>,
    /// Service definitions (desired state, including sticky stops).
    #[serde(default)]
    pub services: Vec<den_agent::protocol::ServiceDef>,
    /// The checkpoint the sprite was last restored to or last took: it can't be deleted.
    #[serde(default)]
    pub active_checkpoint: Option<String>,
    pub resources: Resources,
    /// The engine the sprite runs on; records from before runtimes existed
    /// ran natively.
    #[serde(default)]
    pub runtime: den_runtime::Runtime,
    /// Why the sprite's last cold sleep could not keep its processes, on an
    /// engine that normally does (gVisor); cleared by one that did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_note: Option<String>,
    /// Attributes owned by the API layer (url settings, labels, config, environment).
    #[serde(default)]
    pub attrs: serde_json::Value,
}

/// Lifecycle status, as the Sprites API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpriteStatus {
    /// Processes stopped, volume unmounted; wakes on demand.
    Cold,
    /// Frozen by the cgroup freezer, memory kept; wakes in milliseconds.
    Warm,
    Running,
}

impl SpriteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SpriteStatus::Cold => "cold",
            SpriteStatus::Warm => "warm",
            SpriteStatus::Running => "running",
        }
    }
}

/// A record plus its live status.
#[derive(Debug, Clone, Serialize)]
pub struct SpriteInfo {
    #[serde(flatten)]
    pub record: SpriteRecord,
    pub status: SpriteStatus,
    /// Whether the sprite's writes are waiting for space on the host's data
    /// disk (a den extension: otherwise the user only sees a hang).
    pub storage: StorageStatus,
}

/// The state of a sprite's storage on this host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageStatus {
    #[default]
    Ok,
    /// The data disk is down to its free-space reserve and this sprite's
    /// writes block until space comes back (nothing fails, nothing is lost).
    DiskFull,
}

impl StorageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageStatus::Ok => "ok",
            StorageStatus::DiskFull => "disk_full",
        }
    }
}

/// The organisation every sprite of a data dir written before organisations
/// belongs to; its sprites keep their unqualified keys, so nothing migrates.
pub const DEFAULT_ORG: &str = "den";

/// Separates a sprite's name from its organisation in a key: a character
/// neither may contain, and one that needs no escaping in a URL path.
const ORG_SEPARATOR: char = '@';

/// A sprite's key (the manager's and the catalog's identity) from its
/// organisation and its name: `name` in the default organisation,
/// `name@org` elsewhere. Names are unique within an organisation only.
pub fn sprite_key(org: &str, name: &str) -> String {
    if org == DEFAULT_ORG {
        name.to_string()
    } else {
        format!("{name}{ORG_SEPARATOR}{org}")
    }
}

/// The organisation and the name of a key made by [`sprite_key`].
pub fn key_parts(key: &str) -> (&str, &str) {
    match key.split_once(ORG_SEPARATOR) {
        Some((name, org)) => (org, name),
        None => (DEFAULT_ORG, key),
    }
}

impl SpriteRecord {
    /// The organisation the sprite belongs to.
    pub fn org(&self) -> &str {
        key_parts(&self.name).0
    }

    /// The name its users gave it (unique within its organisation).
    pub fn short_name(&self) -> &str {
        key_parts(&self.name).1
    }
}

/// Organisation slugs are short DNS-label fragments without hyphens, so that
/// `<name>-<org>`, the first label of a sprite's URL, splits one way only.
pub fn validate_org(org: &str) -> Result<()> {
    let ok = !org.is_empty()
        && org.len() <= 32
        && org.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(SpriteError::Invalid(format!(
            "organisation {org:?} must be 1-32 characters of a-z and 0-9"
        )))
    }
}

/// A key is a valid name, in a valid organisation.
pub fn validate_key(key: &str) -> Result<()> {
    let (org, name) = key_parts(key);
    validate_name(name)?;
    validate_org(org)?;
    if key.contains(ORG_SEPARATOR) && org == DEFAULT_ORG {
        // One spelling per sprite: the default organisation's keys are bare.
        return Err(SpriteError::Invalid(format!(
            "sprite key {key:?} is not canonical"
        )));
    }
    Ok(())
}

/// Sprite names are DNS labels: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpriteError::Invalid(format!(
            "sprite name {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "my-sprite", "x1", &"a".repeat(63)] {
            validate_name(good).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "../x", &"a".repeat(64), "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_qualify_names_outside_the_default_org() {
        assert_eq!(sprite_key(DEFAULT_ORG, "web"), "web");
        assert_eq!(sprite_key("acme", "web"), "web@acme");
        assert_eq!(key_parts("web@acme"), ("acme", "web"));
        assert_eq!(key_parts("web"), (DEFAULT_ORG, "web"));
        for good in ["web", "web@acme", "a-b@x1"] {
            validate_key(good).unwrap();
        }
        for bad in ["web@den", "web@", "@acme", "web@ac-me", "web@acme@x", "Web@acme"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "a-b", "A", &"a".repeat(33)] {
            assert!(validate_org(bad).is_err(), "{bad:?} accepted");
        }
    }
}
