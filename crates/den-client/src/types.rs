//! The API's JSON objects. Fields the CLI does not use are kept in `extra`,
//! so printing an object back (`--json`) loses nothing the server said.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sprite {
    pub name: String,
    #[serde(default)]
    pub id: String,
    /// `cold`, `warm` or `running`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub url_settings: UrlSettings,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_running_at: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UrlSettings {
    /// `sprite` (a token is needed) or `public`.
    #[serde(default)]
    pub auth: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One page of `GET /v1/sprites`.
#[derive(Debug, Clone, Deserialize)]
pub struct SpritePage {
    pub sprites: Vec<Sprite>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub next_continuation_token: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CreateSprite {
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// `config` of the Sprites API; den reads `config.runtime` (`native`
    /// or `gvisor`) from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    #[serde(default)]
    pub create_time: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub created_at: String,
    /// The organisation it acts in.
    #[serde(default)]
    pub org: String,
    /// `admin`, `member` or `viewer`.
    #[serde(default)]
    pub role: String,
    /// The only sprites it reaches, if restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sprites: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_admin: bool,
}

/// A freshly minted token; `token` is the secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewToken {
    #[serde(flatten)]
    pub info: Token,
    pub token: String,
}

/// What a new token may do; unset fields default to the minting token's own.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TokenRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sprites: Option<Vec<String>>,
    /// A duration such as `24h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
}

/// An organisation, with its sprites counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Org {
    pub slug: String,
    pub name: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub limits: serde_json::Value,
    #[serde(default)]
    pub sprites: u64,
    #[serde(default)]
    pub running: u64,
    #[serde(default)]
    pub warm: u64,
    #[serde(default)]
    pub cold: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct OrgList {
    pub orgs: Vec<Org>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TokenList {
    pub tokens: Vec<Token>,
}

/// One line of an NDJSON progress stream (checkpoint, restore, services, kill).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamMessage {
    /// `info`, `complete`, `error`, and others per endpoint.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl StreamMessage {
    /// The human text of the line, whichever field carries it.
    pub fn text(&self) -> &str {
        self.error
            .as_deref()
            .or(self.data.as_deref())
            .or(self.message.as_deref())
            .unwrap_or("")
    }

    pub fn is_error(&self) -> bool {
        self.kind == "error"
    }

    pub fn is_complete(&self) -> bool {
        self.kind == "complete"
    }
}

/// Egress policy: `{"rules": [...]}`; rules stay JSON so any rule the
/// server accepts round-trips.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkPolicy {
    pub rules: Vec<Value>,
}

impl NetworkPolicy {
    /// Make `domain` allowed or denied: drop the rules that name it, and
    /// put the new one first (exact names win over wildcards anyway).
    pub fn set_domain(&mut self, domain: &str, allow: bool) {
        self.rules
            .retain(|r| r.get("domain").and_then(Value::as_str) != Some(domain));
        let action = if allow { "allow" } else { "deny" };
        self.rules
            .insert(0, serde_json::json!({"domain": domain, "action": action}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_domain_replaces_the_rule_for_that_domain_only() {
        let mut p: NetworkPolicy = serde_json::from_str(
            r#"{"rules":[{"domain":"a.com","action":"deny"},{"include":"defaults"},{"domain":"*","action":"deny"}]}"#,
        )
        .unwrap();
        p.set_domain("a.com", true);
        p.set_domain("b.com", false);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"rules":[
                {"domain":"b.com","action":"deny"},
                {"domain":"a.com","action":"allow"},
                {"include":"defaults"},
                {"domain":"*","action":"deny"}]})
        );
    }

    #[test]
    fn sprite_keeps_unknown_fields() {
        let s: Sprite = serde_json::from_str(r#"{"name":"a","status":"cold","organization":"den"}"#).unwrap();
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["organization"], "den");
        assert_eq!(back["status"], "cold");
    }
}
