//! The audit log: every state-changing request, as one structured log line
//! (target `den::audit`) and in a bounded in-memory ring per organisation
//! that `GET /v1/orgs/{org}/audit` reads. The log line is the durable
//! record; the ring holds the recent entries this node served.

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;
use serde::Serialize;

/// Entries kept per organisation.
const PER_ORG: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// RFC 3339 with milliseconds.
    pub time: String,
    pub org: String,
    pub token_id: String,
    pub token_name: String,
    /// `METHOD /route/{template}`.
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sprite: Option<String>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

#[derive(Default)]
pub struct AuditLog {
    recent: Mutex<HashMap<String, VecDeque<AuditEntry>>>,
}

impl AuditLog {
    pub fn record(&self, e: AuditEntry) {
        tracing::info!(
            target: "den::audit",
            org = %e.org,
            token_id = %e.token_id,
            token_name = %e.token_name,
            action = %e.action,
            sprite = e.sprite.as_deref().unwrap_or("-"),
            status = e.status,
            request_id = e.request_id.as_deref().unwrap_or("-"),
            "audit"
        );
        let mut recent = self.recent.lock();
        let ring = recent.entry(e.org.clone()).or_default();
        if ring.len() == PER_ORG {
            ring.pop_front();
        }
        ring.push_back(e);
    }

    /// Up to `limit` entries of `org`, newest first.
    pub fn recent(&self, org: &str, limit: usize) -> Vec<AuditEntry> {
        self.recent
            .lock()
            .get(org)
            .map(|r| r.iter().rev().take(limit).cloned().collect())
            .unwrap_or_default()
    }
}
