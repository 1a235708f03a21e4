//! Egress policy in the Sprites format (`POST /v1/sprites/{name}/policy/network`).
//!
//! ```json
//! {"rules":[{"domain":"github.com","action":"allow"},{"include":"defaults"},{"domain":"*","action":"deny"}]}
//! ```
//!
//! Validation is strict because the API answers `400 invalid policy config` for anything it
//! does not understand: unknown fields, a rule with both or neither of `domain`/`include`, an
//! unknown action, a malformed domain pattern.
//!
//! Matching: an exact host beats the longest matching `*.suffix`, which beats `*`.
//! `{"rules": []}` (or no policy at all) means unrestricted. When there is no `*` rule, the
//! fallback is *deny* if the policy allows anything explicitly (an allow-list) and *allow* if
//! it only denies (a deny-list): a policy that lists allowed hosts means "only these".
//! For the same pattern listed twice, an explicit rule beats one that came from
//! `{"include":"defaults"}`, and between explicit rules `deny` wins (fail closed).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Why a policy document was rejected. The API layer maps every variant to
/// `400 invalid policy config`; the message is for logs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid policy config: {0}")]
    Json(String),
    #[error("invalid policy config: rule {index}: {reason}")]
    Rule { index: usize, reason: String },
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One rule as it appears on the wire. Kept separate from the compiled form so the API can
/// echo the document back exactly (GET returns what was POSTed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
}

/// The policy document. `rules` is required (it may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    pub rules: Vec<Rule>,
}

impl NetworkPolicy {
    /// The unrestricted policy (`{"rules": []}`), which is also what "no policy" means.
    pub fn unrestricted() -> Self {
        NetworkPolicy { rules: Vec::new() }
    }

    /// Parse and validate a JSON document.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let p: NetworkPolicy = serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
        p.compile()?;
        Ok(p)
    }

    /// Validate and turn into the matcher the DNS forwarder and the firewall use.
    pub fn compile(&self) -> Result<CompiledPolicy, PolicyError> {
        CompiledPolicy::new(self)
    }
}

/// Built-in allow-list behind `{"include":"defaults"}`.
///
/// The hosted service ships a large list (AI APIs, forges, registries, clouds); this is a
/// representative subset of the same categories, not a copy of theirs.
pub const DEFAULT_ALLOWLIST: &[&str] = &[
    // AI APIs
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    // Forges
    "github.com",
    "*.github.com",
    "*.githubusercontent.com",
    "gitlab.com",
    "*.gitlab.com",
    "bitbucket.org",
    // Package registries and managers
    "crates.io",
    "*.crates.io",
    "static.rust-lang.org",
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "proxy.golang.org",
    "sum.golang.org",
    "rubygems.org",
    "repo.maven.apache.org",
    "deb.debian.org",
    "security.debian.org",
    "*.ubuntu.com",
    "dl-cdn.alpinelinux.org",
    "registry-1.docker.io",
    "auth.docker.io",
    "production.cloudflare.docker.com",
    "ghcr.io",
    // Clouds (object storage endpoints people fetch artefacts from)
    "*.amazonaws.com",
    "storage.googleapis.com",
    "*.blob.core.windows.net",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Defaults,
    Explicit,
}

/// A validated policy, ready to answer "may this sprite resolve NAME?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    exact: HashMap<String, (Action, Origin)>,
    /// Keyed by the suffix *without* the leading `*.`.
    suffix: HashMap<String, (Action, Origin)>,
    star: Option<Action>,
    fallback: Action,
    unrestricted: bool,
}

impl CompiledPolicy {
    fn new(p: &NetworkPolicy) -> Result<Self, PolicyError> {
        let mut c = CompiledPolicy {
            exact: HashMap::new(),
            suffix: HashMap::new(),
            star: None,
            fallback: Action::Allow,
            unrestricted: p.rules.is_empty(),
        };
        let mut any_allow = false;
        for (index, rule) in p.rules.iter().enumerate() {
            let err = |reason: &str| PolicyError::Rule {
                index,
                reason: reason.to_string(),
            };
            match (&rule.domain, &rule.include) {
                (Some(_), Some(_)) => return Err(err("has both `domain` and `include`")),
                (None, None) => return Err(err("needs `domain` or `include`")),
                (None, Some(inc)) => {
                    if inc != "defaults" {
                        return Err(err("`include` must be \"defaults\""));
                    }
                    let action = rule.action.unwrap_or(Action::Allow);
                    any_allow |= action == Action::Allow;
                    for d in DEFAULT_ALLOWLIST {
                        c.insert(d, action, Origin::Defaults);
                    }
                }
                (Some(domain), None) => {
                    let action = rule
                        .action
                        .ok_or_else(|| err("`domain` needs `action` \"allow\" or \"deny\""))?;
                    let pattern = normalize_pattern(domain).map_err(|r| err(&r))?;
                    any_allow |= action == Action::Allow;
                    c.insert(&pattern, action, Origin::Explicit);
                }
            }
        }
        if c.star.is_none() && any_allow {
            c.fallback = Action::Deny;
        }
        Ok(c)
    }

    fn insert(&mut self, pattern: &str, action: Action, origin: Origin) {
        if pattern == "*" {
            // `*` can only come from an explicit rule; deny wins on duplicates.
            self.star = Some(match self.star {
                Some(Action::Deny) => Action::Deny,
                _ => action,
            });
            return;
        }
        let (map, key) = match pattern.strip_prefix("*.") {
            Some(s) => (&mut self.suffix, s.to_string()),
            None => (&mut self.exact, pattern.to_string()),
        };
        let merged = match map.get(&key) {
            None => (action, origin),
            Some(&(old, Origin::Explicit)) if origin == Origin::Defaults => (old, Origin::Explicit),
            Some(&(_, Origin::Defaults)) if origin == Origin::Explicit => (action, origin),
            Some(&(old, o)) => (
                if old == Action::Deny || action == Action::Deny {
                    Action::Deny
                } else {
                    Action::Allow
                },
                o,
            ),
        };
        map.insert(key, merged);
    }

    /// `true` when every destination is allowed (no DNS filtering, no IP sets).
    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
            || (self.star == Some(Action::Allow)
                && self.exact.values().all(|(a, _)| *a == Action::Allow)
                && self.suffix.values().all(|(a, _)| *a == Action::Allow))
    }

    /// Decide for a queried name (case-insensitive, trailing dot ignored).
    pub fn decide(&self, name: &str) -> Action {
        if self.is_unrestricted() {
            return Action::Allow;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some((a, _)) = self.exact.get(&name) {
            return *a;
        }
        // Walk the suffixes from the longest (most specific) to the shortest; `*.x` matches
        // strict subdomains of x only, as in DNS wildcards.
        let mut rest = name.as_str();
        while let Some((_, tail)) = rest.split_once('.') {
            if let Some((a, _)) = self.suffix.get(tail) {
                return *a;
            }
            rest = tail;
        }
        self.star.unwrap_or(self.fallback)
    }
}

/// Lower-case, strip one trailing dot, and check the shape: `*`, `*.label.label…` or
/// `label.label…` with LDH(+underscore) labels of 1–63 bytes, 253 bytes in total.
fn normalize_pattern(raw: &str) -> Result<String, String> {
    let p = raw.trim().to_ascii_lowercase();
    let p = p.strip_suffix('.').unwrap_or(&p).to_string();
    if p == "*" {
        return Ok(p);
    }
    let body = p.strip_prefix("*.").unwrap_or(&p);
    if body.is_empty() || body.len() > 253 {
        return Err(format!("domain {raw:?} has a bad length"));
    }
    for label in body.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!("domain {raw:?} is not a valid host name or *.suffix"));
        }
    }
    if body.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("domain {raw:?} is an IP address; policies match names"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(j: &str) -> CompiledPolicy {
        NetworkPolicy::from_json(j).unwrap().compile().unwrap()
    }

    #[test]
    fn empty_is_unrestricted() {
        let p = pol(r#"{"rules":[]}"#);
        assert!(p.is_unrestricted());
        assert_eq!(p.decide("anything.example"), Action::Allow);
    }

    #[test]
    fn precedence_exact_suffix_star() {
        let p = pol(r#"{"rules":[
            {"domain":"*","action":"deny"},
            {"domain":"*.example.com","action":"allow"},
            {"domain":"bad.example.com","action":"deny"},
            {"domain":"*.deep.example.com","action":"deny"}]}"#);
        assert_eq!(p.decide("x.example.com"), Action::Allow);
        assert_eq!(p.decide("BAD.example.com."), Action::Deny);
        assert_eq!(p.decide("a.deep.example.com"), Action::Deny);
        assert_eq!(p.decide("example.com"), Action::Deny);
        assert_eq!(p.decide("other.org"), Action::Deny);
        assert!(!p.is_unrestricted());
    }

    #[test]
    fn allowlist_without_star_denies_rest() {
        let p = pol(r#"{"rules":[{"domain":"github.com","action":"allow"}]}"#);
        assert_eq!(p.decide("github.com"), Action::Allow);
        assert_eq!(p.decide("evil.com"), Action::Deny);
        let p = pol(r#"{"rules":[{"domain":"evil.com","action":"deny"}]}"#);
        assert_eq!(p.decide("github.com"), Action::Allow);
        assert_eq!(p.decide("evil.com"), Action::Deny);
    }

    #[test]
    fn defaults_and_explicit_override() {
        let p = pol(
            r#"{"rules":[{"include":"defaults"},{"domain":"github.com","action":"deny"},{"domain":"*","action":"deny"}]}"#,
        );
        assert_eq!(p.decide("pypi.org"), Action::Allow);
        assert_eq!(p.decide("api.github.com"), Action::Allow);
        assert_eq!(p.decide("github.com"), Action::Deny);
        assert_eq!(p.decide("example.org"), Action::Deny);
        let p = pol(r#"{"rules":[{"include":"defaults","action":"deny"}]}"#);
        assert_eq!(p.decide("pypi.org"), Action::Deny);
        assert_eq!(p.decide("example.org"), Action::Allow);
    }

    #[test]
    fn allow_star_is_unrestricted() {
        assert!(pol(r#"{"rules":[{"domain":"*","action":"allow"}]}"#).is_unrestricted());
    }

    #[test]
    fn strict_validation() {
        for bad in [
            r#"{}"#,
            r#"{"rules":[{}]}"#,
            r#"{"rules":[],"extra":1}"#,
            r#"{"rules":[{"domain":"a.com"}]}"#,
            r#"{"rules":[{"domain":"a.com","action":"maybe"}]}"#,
            r#"{"rules":[{"domain":"a.com","action":"allow","port":1}]}"#,
            r#"{"rules":[{"domain":"a.com","include":"defaults","action":"allow"}]}"#,
            r#"{"rules":[{"include":"others"}]}"#,
            r#"{"rules":[{"domain":"a.*.com","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"*a.com","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"a..com","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"-a.com","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"1.2.3.4","action":"allow"}]}"#,
            r#"{"rules":[{"domain":"a b.com","action":"allow"}]}"#,
            r#"{"rules":"x"}"#,
        ] {
            let e = NetworkPolicy::from_json(bad);
            assert!(e.is_err(), "accepted {bad}");
            assert!(e.unwrap_err().to_string().starts_with("invalid policy config"));
        }
    }

    #[test]
    fn roundtrip_echo() {
        let j = r#"{"rules":[{"domain":"github.com","action":"allow"},{"include":"defaults"},{"domain":"*","action":"deny"}]}"#;
        let p = NetworkPolicy::from_json(j).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), j);
    }
}
