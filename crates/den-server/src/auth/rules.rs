//! The authorization rule of every API route, in one table. [`super::authorize`]
//! refuses a route that is not here, and the tests walk every route of the
//! OpenAPI document through it, so a route can't be added without a decision.

use axum::http::Method;

use super::Role;

/// What a sprite route does to its sprite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Look: get, list, logs, read files, checkpoints.
    Read,
    /// Change: settings, files, services, checkpoints, restore, delete.
    Write,
    /// Run code in it or reach its ports: exec, attach, proxy, URLs.
    Exec,
    /// Make sprites: create, fork.
    Create,
}

impl Need {
    pub fn min_role(self) -> Role {
        match self {
            Need::Read => Role::Viewer,
            Need::Write | Need::Exec | Need::Create => Role::Member,
        }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Need::Read => "read sprites",
            Need::Write => "change sprites",
            Need::Exec => "run commands in sprites or reach their ports",
            Need::Create => "create sprites",
        }
    }

    /// Whether the audit log records it whatever the method.
    pub fn audited(self) -> bool {
        !matches!(self, Need::Read)
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Any valid token.
    Authenticated,
    /// Sprites of the organisation in general (list, create): the role must
    /// allow `Need`; the handler keeps to the token's `sprites` list.
    Sprites(Need),
    /// The sprite in the `{name}` segment: within the token's reach
    /// (else 404), and the role must allow `Need` (else 403).
    Sprite(Need),
    /// The organisation's admins: its tokens.
    OrgAdmin,
    /// The admins of the organisation in the `{org}` segment (another
    /// organisation is 404), or the server's administrator.
    OrgAdminOf,
    /// The server's administrator only: organisations, nodes, metrics.
    ServerAdmin,
}

use Need::*;
use Rule::*;

/// `(method, route template, rule)`; method `*` is any method.
pub const RULES: &[(&str, &str, Rule)] = &[
    ("GET", "/v1/sprites", Sprites(Read)),
    ("POST", "/v1/sprites", Sprites(Create)),
    ("GET", "/v1/sprites/{name}", Sprite(Read)),
    ("PUT", "/v1/sprites/{name}", Sprite(Write)),
    ("DELETE", "/v1/sprites/{name}", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/upgrade", Sprite(Write)),
    // The new sprite's name is checked against the token's list by the handler.
    ("POST", "/v1/sprites/{name}/fork", Sprite(Create)),
    ("POST", "/v1/sprites/{name}/restart", Sprite(Write)),
    ("GET", "/v1/sprites/{name}/check", Sprite(Read)),
    ("POST", "/v1/sprites/{name}/checkpoint", Sprite(Write)),
    ("GET", "/v1/sprites/{name}/checkpoints", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/checkpoints/{id}", Sprite(Read)),
    ("DELETE", "/v1/sprites/{name}/checkpoints/{id}", Sprite(Write)),
    (
        "POST",
        "/v1/sprites/{name}/checkpoints/{id}/restore",
        Sprite(Write),
    ),
    ("GET", "/v1/sprites/{name}/policy/network", Sprite(Read)),
    ("POST", "/v1/sprites/{name}/policy/network", Sprite(Write)),
    ("GET", "/v1/sprites/{name}/services", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/services/{service}", Sprite(Read)),
    ("PUT", "/v1/sprites/{name}/services/{service}", Sprite(Write)),
    ("DELETE", "/v1/sprites/{name}/services/{service}", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/services/{service}", Sprite(Write)),
    (
        "POST",
        "/v1/sprites/{name}/services/{service}/start",
        Sprite(Write),
    ),
    (
        "POST",
        "/v1/sprites/{name}/services/{service}/stop",
        Sprite(Write),
    ),
    ("GET", "/v1/sprites/{name}/services/{service}/logs", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/fs/read", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/fs/list", Sprite(Read)),
    ("PUT", "/v1/sprites/{name}/fs/write", Sprite(Write)),
    ("DELETE", "/v1/sprites/{name}/fs/delete", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/fs/rename", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/fs/copy", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/fs/chmod", Sprite(Write)),
    ("POST", "/v1/sprites/{name}/fs/chown", Sprite(Write)),
    ("GET", "/v1/sprites/{name}/fs/watch", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/ports/watch", Sprite(Read)),
    ("GET", "/v1/sprites/{name}/proxy", Sprite(Exec)),
    ("*", "/v1/sprites/{name}/control", Sprite(Exec)),
    // Without an upgrade, GET lists the exec sessions: still the exec surface.
    ("GET", "/v1/sprites/{name}/exec", Sprite(Exec)),
    ("HEAD", "/v1/sprites/{name}/exec", Sprite(Exec)),
    ("POST", "/v1/sprites/{name}/exec", Sprite(Exec)),
    ("GET", "/v1/sprites/{name}/exec/{session_id}", Sprite(Exec)),
    ("POST", "/v1/sprites/{name}/exec/{session_id}/kill", Sprite(Exec)),
    ("GET", "/v1/organization", Authenticated),
    ("GET", "/v1/openapi.json", Authenticated),
    ("GET", "/v1/tokens", OrgAdmin),
    ("POST", "/v1/tokens", OrgAdmin),
    ("DELETE", "/v1/tokens/{id}", OrgAdmin),
    ("GET", "/v1/orgs", ServerAdmin),
    ("POST", "/v1/orgs", ServerAdmin),
    ("GET", "/v1/orgs/{org}", ServerAdmin),
    ("PUT", "/v1/orgs/{org}", ServerAdmin),
    ("DELETE", "/v1/orgs/{org}", ServerAdmin),
    ("GET", "/v1/orgs/{org}/audit", OrgAdminOf),
    ("GET", "/v1/nodes", ServerAdmin),
    ("POST", "/v1/nodes/{node}/drain", ServerAdmin),
    ("GET", "/metrics", ServerAdmin),
    // Each tool is a request to one of the routes above, with the caller's token.
    ("*", "/mcp", Authenticated),
];

/// `(method, route template)` of the routes served without a token, outside
/// [`super::authorize`]: the health check and the web console's static
/// assets. None of them carries data; everything the console shows comes
/// from the routes above, with the user's token.
pub const PUBLIC: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/healthz"),
    ("GET", crate::console::INDEX_ROUTE),
    ("GET", crate::console::ASSET_ROUTE),
];

/// The rule of a route; HEAD falls back to GET's, as the router does.
pub fn rule(method: &Method, template: &str) -> Option<Rule> {
    let find = |m: &str| {
        RULES
            .iter()
            .find(|(rm, t, _)| *t == template && (*rm == m || *rm == "*"))
            .map(|(_, _, r)| *r)
    };
    find(method.as_str()).or_else(|| (*method == Method::HEAD).then(|| find("GET")).flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_has_a_rule() {
        let doc = <crate::api::ApiDoc as utoipa::OpenApi>::openapi();
        let mut missing = Vec::new();
        for (path, item) in doc.paths.paths.iter() {
            for (method, op) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("DELETE", &item.delete),
                ("HEAD", &item.head),
                ("PATCH", &item.patch),
            ] {
                // A documented concrete path (`/services/signal`) is routed by
                // the template it matches (`/services/{service}`).
                let routed = RULES
                    .iter()
                    .map(|(_, t, _)| *t)
                    .find(|t| *t == path.as_str() || matches_template(t, path))
                    .unwrap_or(path);
                if op.is_some() && rule(&method.parse().unwrap(), routed).is_none() {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "routes without an authorization rule: {missing:?}"
        );
    }

    fn matches_template(template: &str, path: &str) -> bool {
        let (t, p): (Vec<_>, Vec<_>) = (template.split('/').collect(), path.split('/').collect());
        t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a == b || a.starts_with('{'))
    }

    #[test]
    fn rules_are_unique() {
        for (i, (m, t, _)) in RULES.iter().enumerate() {
            assert!(
                !RULES[i + 1..].iter().any(|(m2, t2, _)| m2 == m && t2 == t),
                "{m} {t} has two rules"
            );
        }
    }
}
