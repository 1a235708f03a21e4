//! The Sprite object of the API (§2.2 of the reference), built from a
//! manager record. API-only attributes live in the record's `attrs`.

use den_sprite::SpriteInfo;
use serde_json::{Value, json};

use crate::config::ServerConfig;

pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Default `url_settings`.
pub fn default_url_settings() -> Value {
    json!({"auth": "sprite"})
}

pub fn sprite_json(cfg: &ServerConfig, info: &SpriteInfo) -> Value {
    let r = &info.record;
    let attrs = &r.attrs;
    let get = |k: &str, default: Value| attrs.get(k).cloned().unwrap_or(default);
    // The engine the sprite runs on is part of its config (den extension),
    // also when the server's default chose it.
    let mut config = get("config", json!({}));
    if let Some(c) = config.as_object_mut() {
        c.insert("runtime".into(), r.runtime.as_str().into());
    }
    let mut v = json!({
        "id": r.id,
        "name": r.short_name(),
        "organization": r.org(),
        "status": info.status.as_str(),
        "url": cfg.sprite_url(&r.name),
        "url_settings": get("url_settings", default_url_settings()),
        "labels": get("labels", json!([])),
        "config": config,
        "environment": get("environment", json!({})),
        "created_at": rfc3339_ms(r.created_at_ms),
        "updated_at": rfc3339_ms(r.updated_at_ms),
        "version": env!("CARGO_PKG_VERSION"),
        "environment_version": r.image,
        "storage_status": info.storage.as_str(),
    });
    if let Some(ms) = r.last_running_at_ms {
        v["last_running_at"] = rfc3339_ms(ms).into();
    }
    if let Some(ms) = r.last_warming_at_ms {
        v["last_warming_at"] = rfc3339_ms(ms).into();
    }
    // The reference: ISO 8601, null when not tracked.
    v["last_started_at"] = r.last_started_at_ms.map(rfc3339_ms).into();
    // den extension: a gVisor sprite that went cold without its processes.
    if let Some(note) = &r.sleep_note {
        v["sleep_note"] = note.clone().into();
    }
    v["last_active_at"] = r.last_active_at_ms.map(rfc3339_ms).into();
    if let Some(region) = attrs.get("config").and_then(|c| c.get("region")) {
        v["primary_region"] = region.clone();
    }
    v
}

/// `config.region` of a sprite, if it asked for one.
pub fn primary_region(info: &SpriteInfo) -> Option<String> {
    info.record
        .attrs
        .get("config")
        .and_then(|c| c.get("region"))
        .and_then(|r| r.as_str())
        .map(str::to_string)
}

/// The sprite's URL auth mode: `sprite` (token required) or `public`.
pub fn url_auth(info: &SpriteInfo) -> &str {
    info.record
        .attrs
        .get("url_settings")
        .and_then(|u| u.get("auth"))
        .and_then(|a| a.as_str())
        .unwrap_or("sprite")
}
