//! Who may do what. Every request to the API passes [`authorize`], the one
//! place that decides: it verifies the bearer token, finds the rule of the
//! matched route in [`rules`], and either refuses the request or hands the
//! handlers a [`Principal`] (and, on sprite routes, the [`SpriteRef`] of the
//! sprite in the token's organisation). A route without a rule is refused,
//! so a new route can't forget its decision.
//!
//! Refusals never tell one organisation about another: a sprite outside the
//! token's reach (another organisation, or not in its `sprites` list)
//! answers exactly what a sprite that does not exist answers.

pub mod rules;
mod tokens;

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

pub use rules::{Need, Rule};
pub use tokens::{Org, REFRESH_INTERVAL, TokenError, TokenInfo, TokenSpec, TokenStore, ensure_admin_token};

use crate::audit::AuditEntry;
use crate::error::ApiError;
use crate::state::AppState;

/// den extension: a server administrator picks the organisation it acts in.
pub const ORG_HEADER: HeaderName = HeaderName::from_static("den-org");

/// What a token may do in its organisation; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read only: list, get, logs, read files.
    Viewer,
    /// Create and use sprites: exec, files, services, checkpoints, proxy.
    Member,
    /// Everything in the organisation, tokens included.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?} must be admin, member or viewer")),
        }
    }
}

/// An organisation's quotas; `None` is no limit of its own (the server's
/// limits still hold).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrgLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sprites: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_awake: Option<usize>,
    /// `COUNT/DURATION`, e.g. `10/60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_rate: Option<String>,
    /// Total memory limit of the awake sprites, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Total CPUs of the awake sprites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<f64>,
    /// Total bytes the organisation's disks and checkpoints keep stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_disk_bytes: Option<u64>,
}

/// The caller of a request, as [`authorize`] established it.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token: TokenInfo,
    /// The organisation the request acts in: the token's, or for a server
    /// administrator the one named by [`ORG_HEADER`].
    pub org: String,
}

impl Principal {
    /// Whether the token's `sprites` list (if any) names this sprite.
    pub fn reaches(&self, name: &str) -> bool {
        self.token
            .sprites
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n == name))
    }

    /// The key of sprite `name` in the request's organisation; `None` for
    /// what is not a sprite name. Never build a key from an unchecked name:
    /// `web@acme` in the default organisation would be acme's `web`.
    pub fn key(&self, name: &str) -> Option<String> {
        den_sprite::validate_name(name).ok()?;
        Some(den_sprite::sprite_key(&self.org, name))
    }

    /// Whether the sprite with this key is within the token's reach.
    pub fn sees(&self, key: &str) -> bool {
        let (org, name) = den_sprite::key_parts(key);
        org == self.org && self.reaches(name)
    }

    /// What the token may do to a sprite (or sprites in general) in the
    /// request's organisation.
    pub fn check(&self, need: Need) -> Result<(), ApiError> {
        if self.token.role >= need.min_role() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "a {} token can't {}",
                self.token.role.as_str(),
                need.verb()
            )))
        }
    }

    pub fn is_server_admin(&self) -> bool {
        self.token.server_admin
    }
}

/// The key of the sprite a `/v1/sprites/{name}/…` request is about, in the
/// caller's organisation and within its reach.
#[derive(Debug, Clone)]
pub struct SpriteRef(pub String);

fn missing(what: &str) -> ApiError {
    ApiError::internal_logged(
        "authorization",
        &format!("{what} was not established for this route"),
    )
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| missing("the caller"))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SpriteRef {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<SpriteRef>()
            .cloned()
            .ok_or_else(|| missing("the sprite"))
    }
}

/// The secret from `Authorization: Bearer <t>`.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

/// The WebSocket subprotocol a browser offers next to its token (see
/// [`WS_TOKEN_PREFIX`]); the server selects this one, so the token is never
/// echoed back in the handshake.
pub const WS_PROTOCOL: &str = "den.v1";

/// A browser can't set `Authorization` on a WebSocket, only
/// `Sec-WebSocket-Protocol`: `den.bearer.<token>` there carries the same
/// bearer token (den tokens are `den_<hex>`, valid protocol names). It is
/// read only on upgrade requests, and fetch() can't set `Sec-` headers, so a
/// page can't replay it cross-site; with no cookies there is nothing for
/// another origin's page to ride on either.
pub const WS_TOKEN_PREFIX: &str = "den.bearer.";

/// The token of a WebSocket upgrade that carries it as a subprotocol.
pub fn ws_protocol_token(headers: &HeaderMap) -> Option<String> {
    let upgrade = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_TOKEN_PREFIX))
        .map(str::to_string)
}

/// What answers a sprite outside the caller's reach: the very answer of a
/// sprite that does not exist.
pub fn hidden_sprite(name: &str) -> ApiError {
    ApiError::from(den_sprite::SpriteError::NotFound(name.to_string()))
}

/// The caller of a request with these headers, if its token is valid (and,
/// for [`ORG_HEADER`], allowed to pick that organisation).
pub fn principal(st: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = bearer(headers)
        .or_else(|| ws_protocol_token(headers))
        .and_then(|t| st.tokens.verify(&t))
        .ok_or_else(ApiError::unauthorized)?;
    let org = match headers.get(ORG_HEADER).map(|v| v.to_str().unwrap_or("")) {
        None => token.org.clone(),
        Some(o) if o == token.org => token.org.clone(),
        // Whether the organisation exists is none of a tenant's business.
        Some(_) if !token.server_admin => return Err(ApiError::not_found("organisation not found")),
        Some(o) if st.tokens.org(o).is_some() => o.to_string(),
        Some(o) => return Err(ApiError::not_found(format!("organisation not found: {o}"))),
    };
    Ok(Principal { token, org })
}

/// Middleware on every API route but the health check: the one place that
/// authenticates and authorizes. It also writes the audit log: every request
/// that changes state (any method but GET and HEAD, and every exec), allowed
/// or refused, once its caller is known.
pub async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let template = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let params: Vec<(String, String)> = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(p) => p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        Err(_) => Vec::new(),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let method = parts.method.clone();
    // Set by the outer request-id layer; the response gets it on the way out.
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let rule = rules::rule(&method, &template);
    let caller = match principal(&st, &parts.headers) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = match decide(&caller, rule, param) {
        Ok(sprite) => {
            if let Some(s) = sprite {
                parts.extensions.insert(s);
            }
            parts.extensions.insert(caller.clone());
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => {
            if rule.is_none() {
                tracing::error!(%method, route = template, "route without an authorization rule; refused");
            }
            e.into_response()
        }
    };
    let audited = method != Method::GET && method != Method::HEAD
        || matches!(rule, Some(Rule::Sprite(n) | Rule::Sprites(n)) if n.audited());
    if audited {
        let sprite = matches!(rule, Some(Rule::Sprite(_))).then(|| param("name").to_string());
        st.audit.record(AuditEntry {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            org: caller.org,
            token_id: caller.token.id,
            token_name: caller.token.name,
            action: format!("{method} {template}"),
            sprite,
            status: resp.status().as_u16(),
            request_id,
        });
    }
    resp
}

/// The decision for one request: refused, or allowed (with the sprite it is
/// about, on sprite routes).
fn decide<'a>(
    p: &Principal,
    rule: Option<Rule>,
    param: impl Fn(&str) -> &'a str,
) -> Result<Option<SpriteRef>, ApiError> {
    let Some(rule) = rule else {
        return Err(ApiError::forbidden("this route has no authorization rule"));
    };
    match rule {
        Rule::Authenticated => {}
        Rule::Sprites(need) => p.check(need)?,
        Rule::Sprite(need) => {
            let name = param("name");
            let Some(key) = p.key(name).filter(|_| p.reaches(name)) else {
                return Err(hidden_sprite(name));
            };
            p.check(need)?;
            return Ok(Some(SpriteRef(key)));
        }
        Rule::OrgAdmin => {
            if p.token.role < Role::Admin {
                return Err(ApiError::forbidden(
                    "only an organisation's admin tokens manage its tokens",
                ));
            }
        }
        Rule::OrgAdminOf => {
            let org = param("org");
            if !p.is_server_admin() {
                if org != p.org {
                    return Err(ApiError::not_found(format!("organisation not found: {org}")));
                }
                if p.token.role < Role::Admin {
                    return Err(ApiError::forbidden(
                        "only an organisation's admin tokens read its audit log",
                    ));
                }
            }
        }
        Rule::ServerAdmin => {
            if !p.is_server_admin() {
                return Err(ApiError::forbidden("only the server's administrator may do this"));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod ws_token_tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_subprotocol_token_is_read_only_on_websocket_upgrades() {
        let proto = ("sec-websocket-protocol", "den.v1, den.bearer.den_abc");
        assert_eq!(
            ws_protocol_token(&headers(&[("upgrade", "websocket"), proto])).as_deref(),
            Some("den_abc")
        );
        assert_eq!(ws_protocol_token(&headers(&[proto])), None);
        assert_eq!(
            ws_protocol_token(&headers(&[
                ("upgrade", "websocket"),
                ("sec-websocket-protocol", "den.v1")
            ])),
            None
        );
    }
}
