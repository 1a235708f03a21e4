//! Organisations and scoped tokens: every route of the API (WebSocket routes
//! and sprite URLs included) against every kind of token, each expecting
//! exactly its 2xx, 403 or 404. The expectations are written here, apart
//! from the server's rule table, and the test refuses to run if the two
//! disagree on which routes exist, so a new route needs a decision in both.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::TestServer;
use crate::org_tokens::make_org;

/// The kinds of caller, all acting on organisation `acme` (whose sprite `web` is the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The server's administrator, choosing `acme` with `den-org`.
    ServerAdmin,
    Admin,
    Member,
    Viewer,
    /// A member token whose `sprites` list is `["web"]`.
    MemberOfWeb,
    /// An admin token whose `sprites` list is `["other"]`.
    AdminOfOther,
    /// An admin of another organisation.
    Stranger,
    Anonymous,
}
use Who::*;

const EVERYONE: [Who; 8] = [
    ServerAdmin,
    Admin,
    Member,
    Viewer,
    MemberOfWeb,
    AdminOfOther,
    Stranger,
    Anonymous,
];

/// What a route asks of its caller (the test's own spec, not the server's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Any valid token.
    AnyToken,
    /// List the organisation's sprites.
    List,
    /// Create a sprite named `fresh` (not in any token's list).
    Create,
    /// Look at sprite `web`.
    Read,
    /// Change, run code in or reach sprite `web`.
    Use,
    /// Make a sprite from `web`, named `fork1` (not in any token's list).
    Fork,
    /// The organisation's tokens.
    Tokens,
    /// The audit log of organisation `acme`.
    AuditOfAcme,
    /// Server administration.
    Server,
}

/// The answer a caller must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Through the decision: one of the row's success statuses.
    Allowed,
    Forbidden,
    /// The answer of a sprite (or organisation) that does not exist.
    Hidden,
    Unauthorized,
}

fn expect(who: Who, kind: Kind) -> Expect {
    use Expect::*;
    use Kind::*;
    if who == Anonymous {
        return Unauthorized;
    }
    match (kind, who) {
        (AnyToken | List, _) => Allowed,
        (Create, ServerAdmin | Admin | Member | Stranger) => Allowed,
        (Create, _) => Forbidden,
        (Read, AdminOfOther | Stranger) => Hidden,
        (Read, _) => Allowed,
        (Use, AdminOfOther | Stranger) => Hidden,
        (Use, Viewer) => Forbidden,
        (Use, _) => Allowed,
        (Fork, AdminOfOther | Stranger) => Hidden,
        (Fork, Viewer | MemberOfWeb) => Forbidden,
        (Fork, _) => Allowed,
        (Tokens, ServerAdmin | Admin | AdminOfOther | Stranger) => Allowed,
        (Tokens, _) => Forbidden,
        (AuditOfAcme, ServerAdmin | Admin | AdminOfOther) => Allowed,
        (AuditOfAcme, Stranger) => Hidden,
        (AuditOfAcme, _) => Forbidden,
        (Server, ServerAdmin) => Allowed,
        (Server, _) => Forbidden,
    }
}

/// One request per route: what to send, and what an allowed caller gets.
struct Row {
    method: &'static str,
    template: &'static str,
    kind: Kind,
    path: String,
    body: Option<Value>,
    raw: Option<&'static str>,
    websocket: bool,
    ok: &'static [u16],
    /// Allowed calls take the fixture apart; it is rebuilt after each.
    destructive: bool,
}

fn row(method: &'static str, template: &'static str, kind: Kind, ok: &'static [u16]) -> Row {
    Row {
        method,
        template,
        kind,
        path: template.to_string(),
        body: None,
        raw: None,
        websocket: false,
        ok,
        destructive: false,
    }
}

impl Row {
    fn path(mut self, p: impl Into<String>) -> Row {
        self.path = p.into();
        self
    }
    fn json(mut self, v: Value) -> Row {
        self.body = Some(v);
        self
    }
    fn raw(mut self, b: &'static str) -> Row {
        self.raw = Some(b);
        self
    }
    fn websocket(mut self) -> Row {
        self.websocket = true;
        self
    }
    fn destructive(mut self) -> Row {
        self.destructive = true;
        self
    }
}

fn rows(ck: &str) -> Vec<Row> {
    use Kind::*;
    let w = "/v1/sprites/web";
    vec![
        row("GET", "/v1/sprites", List, &[200]),
        row("POST", "/v1/sprites", Create, &[201, 409]).json(json!({"name": "fresh"})),
        row("GET", "/v1/sprites/{name}", Read, &[200]).path(w),
        row("PUT", "/v1/sprites/{name}", Use, &[200])
            .path(w)
            .json(json!({"labels": ["x"]})),
        row("POST", "/v1/sprites/{name}/upgrade", Use, &[204]).path(format!("{w}/upgrade")),
        row("POST", "/v1/sprites/{name}/fork", Fork, &[201, 409])
            .path(format!("{w}/fork"))
            .json(json!({"name": "fork1", "checkpoint": ck})),
        row("POST", "/v1/sprites/{name}/checkpoint", Use, &[200])
            .path(format!("{w}/checkpoint"))
            .json(json!({"comment": "matrix"})),
        row("GET", "/v1/sprites/{name}/checkpoints", Read, &[200]).path(format!("{w}/checkpoints")),
        row("GET", "/v1/sprites/{name}/checkpoints/{id}", Read, &[200]).path(format!("{w}/checkpoints/{ck}")),
        // An unknown checkpoint: the handler's 404, not the hidden sprite's.
        row("DELETE", "/v1/sprites/{name}/checkpoints/{id}", Use, &[404])
            .path(format!("{w}/checkpoints/v999")),
        row("GET", "/v1/sprites/{name}/policy/network", Read, &[200]).path(format!("{w}/policy/network")),
        row("POST", "/v1/sprites/{name}/policy/network", Use, &[200, 204])
            .path(format!("{w}/policy/network"))
            .json(json!({"rules": [{"domain": "*", "action": "allow"}]})),
        row("GET", "/v1/sprites/{name}/services", Read, &[200]).path(format!("{w}/services")),
        row("GET", "/v1/sprites/{name}/services/{service}", Read, &[200]).path(format!("{w}/services/svc")),
        row("PUT", "/v1/sprites/{name}/services/{service}", Use, &[200, 201])
            .path(format!("{w}/services/idle"))
            .json(json!({"cmd": "sleep", "args": ["1000"]})),
        row("DELETE", "/v1/sprites/{name}/services/{service}", Use, &[404])
            .path(format!("{w}/services/none")),
        // Only `/services/signal` answers POST; another name is the handler's 405.
        row("POST", "/v1/sprites/{name}/services/{service}", Use, &[405])
            .path(format!("{w}/services/svc"))
            .json(json!({})),
        row(
            "POST",
            "/v1/sprites/{name}/services/{service}/start",
            Use,
            &[200, 409],
        )
        .path(format!("{w}/services/svc/start")),
        row("POST", "/v1/sprites/{name}/services/{service}/stop", Use, &[404])
            .path(format!("{w}/services/none/stop")),
        row("GET", "/v1/sprites/{name}/services/{service}/logs", Read, &[200])
            .path(format!("{w}/services/svc/logs")),
        row("GET", "/v1/sprites/{name}/fs/read", Read, &[200])
            .path(format!("{w}/fs/read?path=/srv/www/index.html")),
        row("GET", "/v1/sprites/{name}/fs/list", Read, &[200]).path(format!("{w}/fs/list?path=/srv/www")),
        row("PUT", "/v1/sprites/{name}/fs/write", Use, &[200, 201, 204])
            .path(format!("{w}/fs/write?path=/tmp/m"))
            .raw("m"),
        row("DELETE", "/v1/sprites/{name}/fs/delete", Use, &[404])
            .path(format!("{w}/fs/delete"))
            .json(json!({"path": "/tmp/none"})),
        row("POST", "/v1/sprites/{name}/fs/rename", Use, &[404])
            .path(format!("{w}/fs/rename"))
            .json(json!({"source": "/tmp/none", "dest": "/tmp/none2"})),
        row("POST", "/v1/sprites/{name}/fs/copy", Use, &[404])
            .path(format!("{w}/fs/copy"))
            .json(json!({"source": "/tmp/none", "dest": "/tmp/none2"})),
        row("POST", "/v1/sprites/{name}/fs/chmod", Use, &[404])
            .path(format!("{w}/fs/chmod"))
            .json(json!({"path": "/tmp/none", "mode": "644"})),
        row("POST", "/v1/sprites/{name}/fs/chown", Use, &[404])
            .path(format!("{w}/fs/chown"))
            .json(json!({"path": "/tmp/none", "uid": 0})),
        row("GET", "/v1/sprites/{name}/fs/watch", Read, &[101])
            .path(format!("{w}/fs/watch"))
            .websocket(),
        row("GET", "/v1/sprites/{name}/ports/watch", Read, &[101])
            .path(format!("{w}/ports/watch"))
            .websocket(),
        row("GET", "/v1/sprites/{name}/check", Read, &[200]).path(format!("{w}/check")),
        row("POST", "/v1/sprites/{name}/restart", Use, &[200]).path(format!("{w}/restart")),
        row("GET", "/v1/sprites/{name}/proxy", Use, &[101])
            .path(format!("{w}/proxy"))
            .websocket(),
        row("*", "/v1/sprites/{name}/control", Use, &[101])
            .path(format!("{w}/control"))
            .websocket(),
        row("GET", "/v1/sprites/{name}/exec", Use, &[101])
            .path(format!("{w}/exec?cmd=true"))
            .websocket(),
        row("HEAD", "/v1/sprites/{name}/exec", Use, &[200, 204]).path(format!("{w}/exec")),
        row("POST", "/v1/sprites/{name}/exec", Use, &[200]).path(format!("{w}/exec?cmd=true")),
        row("GET", "/v1/sprites/{name}/exec/{session_id}", Use, &[404])
            .path(format!("{w}/exec/999999"))
            .websocket(),
        row("POST", "/v1/sprites/{name}/exec/{session_id}/kill", Use, &[410])
            .path(format!("{w}/exec/999999/kill")),
        row("GET", "/v1/organization", AnyToken, &[200]),
        row("GET", "/v1/openapi.json", AnyToken, &[200]),
        // A GET without a session or an SSE Accept: refused by MCP, after the decision.
        row("*", "/mcp", AnyToken, &[406]),
        row("GET", "/v1/tokens", Tokens, &[200]),
        row("POST", "/v1/tokens", Tokens, &[201]).json(json!({"name": "minted", "role": "viewer"})),
        row("DELETE", "/v1/tokens/{id}", Tokens, &[404]).path("/v1/tokens/nosuchtoken"),
        row("GET", "/v1/orgs", Server, &[200]),
        row("POST", "/v1/orgs", Server, &[201, 409]).json(json!({"slug": "made"})),
        row("GET", "/v1/orgs/{org}", Server, &[200]).path("/v1/orgs/acme"),
        row("PUT", "/v1/orgs/{org}", Server, &[200])
            .path("/v1/orgs/acme")
            .json(json!({"name": "Acme"})),
        row("DELETE", "/v1/orgs/{org}", Server, &[404]).path("/v1/orgs/nosuchorg"),
        row("GET", "/v1/orgs/{org}/audit", AuditOfAcme, &[200]).path("/v1/orgs/acme/audit"),
        // A single node is not a cluster: the handler says so.
        row("GET", "/v1/nodes", Server, &[404]),
        row("POST", "/v1/nodes/{node}/drain", Server, &[404]).path("/v1/nodes/n1/drain"),
        row("GET", "/metrics", Server, &[200]),
        // Late: a restore rolls the fixture back to its own checkpoint.
        row("POST", "/v1/sprites/{name}/checkpoints/{id}/restore", Use, &[200])
            .path(format!("{w}/checkpoints/{ck}/restore")),
        // Last: this takes the fixture apart; it is rebuilt after each allowed call.
        row("DELETE", "/v1/sprites/{name}", Use, &[204])
            .path(w)
            .destructive(),
    ]
}

struct World {
    s: TestServer,
    tokens: Vec<(Who, String)>,
    http: reqwest::Client,
}

impl World {
    fn token(&self, who: Who) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, t)| t.as_str())
    }

    fn request(&self, who: Who, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, self.s.api(path));
        if let Some(t) = self.token(who) {
            r = r.bearer_auth(t);
        }
        if who == ServerAdmin {
            r = r.header("den-org", "acme");
        }
        r
    }

    /// Status and body of one row's request.
    async fn call(&self, who: Who, row: &Row) -> Result<(u16, String)> {
        if row.websocket {
            return self.websocket(who, &row.path).await;
        }
        let method = match row.method {
            "*" => Method::GET,
            m => m.parse()?,
        };
        let mut r = self.request(who, method, &row.path);
        if let Some(b) = &row.body {
            r = r.json(b);
        }
        if let Some(b) = row.raw {
            r = r.body(b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    async fn websocket(&self, who: Who, path: &str) -> Result<(u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = self.s.ws(path).into_client_request()?;
        if let Some(t) = self.token(who) {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse()?);
        }
        if who == ServerAdmin {
            req.headers_mut().insert("den-org", "acme".parse()?);
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, resp)) => {
                let _ = ws.close(None).await;
                Ok((resp.status().as_u16(), String::new()))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Ok((resp.status().as_u16(), body))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn send_ok(&self, r: reqwest::RequestBuilder, what: &str) -> Result<String> {
        let r = r.send().await?;
        let st = r.status();
        let body = r.text().await.unwrap_or_default();
        ensure!(st.is_success(), "{what}: {st} {body}");
        Ok(body)
    }

    /// `web` in `acme` with a page, a web server as service `svc`, and a
    /// checkpoint, whose id it returns.
    async fn fixture(&self) -> Result<String> {
        let create = self
            .request(Admin, Method::POST, "/v1/sprites")
            .json(&json!({"name": "web"}));
        self.send_ok(create, "create web").await?;
        let page = self
            .request(
                Admin,
                Method::PUT,
                "/v1/sprites/web/fs/write?path=/srv/www/index.html&mkdirParents=true",
            )
            .body("hello from acme\n");
        self.send_ok(page, "write index.html").await?;
        let svc = self
            .request(Admin, Method::PUT, "/v1/sprites/web/services/svc")
            .json(&json!({"cmd": "busybox", "args": ["httpd", "-f", "-p", "8080", "-h", "/srv/www"], "http_port": 8080}));
        self.send_ok(svc, "service svc").await?;
        let ck = self
            .request(Admin, Method::POST, "/v1/sprites/web/checkpoint")
            .json(&json!({"comment": "fixture"}));
        self.send_ok(ck, "checkpoint").await?;
        let list = self.request(Admin, Method::GET, "/v1/sprites/web/checkpoints");
        let list: Value = serde_json::from_str(&self.send_ok(list, "list checkpoints").await?)?;
        let items = list
            .as_array()
            .or_else(|| list["checkpoints"].as_array())
            .context("checkpoint list")?;
        let ck = items
            .iter()
            .find(|c| c["comment"] == "fixture")
            .and_then(|c| c["id"].as_str())
            .with_context(|| format!("the fixture's checkpoint in {list}"))?;
        // The web server answers before the matrix goes on.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, _) = self.url(Admin, "web-acme").await?;
            if st == 200 {
                break;
            }
            ensure!(Instant::now() < deadline, "svc never answered on the URL: {st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(ck.to_string())
    }

    /// A sprite URL request with this caller's token.
    async fn url(&self, who: Who, label: &str) -> Result<(u16, String)> {
        let host = format!("{label}.localhost:{}", self.s.cfg.listen.port());
        let mut r = self.http.get(self.s.api("/")).header("host", host);
        if let Some(t) = self.token(who) {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await?;
        let st = resp.status().as_u16();
        Ok((st, resp.text().await.unwrap_or_default()))
    }
}

async fn mint(s: &TestServer, body: Value) -> Result<String> {
    let r = s.client().post(s.api("/v1/tokens")).json(&body).send().await?;
    ensure!(
        r.status() == 201,
        "mint {body}: {} {}",
        r.status(),
        r.text().await?
    );
    let v: Value = r.json().await?;
    Ok(v["token"].as_str().context("token secret")?.to_string())
}

/// The answer of a sprite that does not exist.
fn hidden_body(name: &str) -> Value {
    json!({"error": "not_found", "message": format!("sprite not found: {name}")})
}

pub async fn authorization_matrix() -> Result<()> {
    let s = TestServer::start().await?;
    make_org(&s, "acme").await?;
    make_org(&s, "beta").await?;
    let mut tokens = vec![(ServerAdmin, s.token.clone())];
    for (who, body) in [
        (Admin, json!({"org": "acme", "role": "admin"})),
        (Member, json!({"org": "acme", "role": "member"})),
        (Viewer, json!({"org": "acme", "role": "viewer"})),
        (
            MemberOfWeb,
            json!({"org": "acme", "role": "member", "sprites": ["web"]}),
        ),
        (
            AdminOfOther,
            json!({"org": "acme", "role": "admin", "sprites": ["other"]}),
        ),
        (Stranger, json!({"org": "beta", "role": "admin"})),
    ] {
        tokens.push((who, mint(&s, body).await?));
    }
    let w = World {
        s,
        tokens,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
    };
    let mut ck = w.fixture().await?;
    // What a sprite that does not exist answers, as the server says it.
    let r = w
        .request(Admin, Method::GET, "/v1/sprites/web-nosuch")
        .send()
        .await?;
    ensure!(r.status() == 404);
    ensure!(r.json::<Value>().await? == hidden_body("web-nosuch"));

    // The spec here and the server's table name the same routes.
    let table: Vec<(String, String)> = den_server::auth::rules::RULES
        .iter()
        .map(|(m, t, _)| (m.to_string(), t.to_string()))
        .collect();
    let mine: Vec<(String, String)> = rows(&ck)
        .iter()
        .map(|r| (r.method.to_string(), r.template.to_string()))
        .collect();
    for r in &table {
        ensure!(
            mine.contains(r),
            "route {r:?} has a rule but no row in the matrix"
        );
    }
    for r in &mine {
        ensure!(table.contains(r), "row {r:?} is not a route with a rule");
    }

    let mut failures = Vec::new();
    let mut calls = 0;
    for i in 0..rows(&ck).len() {
        for who in EVERYONE {
            // The checkpoint id changes when the fixture is rebuilt.
            let row = rows(&ck).swap_remove(i);
            let want = expect(who, row.kind);
            let (status, body) = w.call(who, &row).await?;
            calls += 1;
            let json_body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let good = match want {
                Expect::Allowed => row.ok.contains(&status) && json_body != hidden_body("web"),
                Expect::Forbidden => {
                    status == 403 && (row.method == "HEAD" || json_body["error"] == "forbidden")
                }
                Expect::Hidden if row.kind == Kind::AuditOfAcme => {
                    status == 404 && json_body["message"] == "organisation not found: acme"
                }
                // Exactly what the same request answers for a sprite that
                // does not exist (some handlers refuse a request before
                // they look the sprite up).
                Expect::Hidden => {
                    let ghost = Row {
                        path: row.path.replacen("/v1/sprites/web", "/v1/sprites/ghost", 1),
                        ..rows(&ck).swap_remove(i)
                    };
                    let (st, b) = w.call(Admin, &ghost).await?;
                    status == st && body == b.replace("ghost", "web")
                }
                Expect::Unauthorized => status == 401,
            };
            if !good {
                failures.push(format!(
                    "{} {} as {who:?}: want {want:?} {:?}, got {status} {body}",
                    row.method, row.path, row.ok
                ));
            }
            if row.destructive && want == Expect::Allowed && status < 300 {
                let r = w.request(Admin, Method::DELETE, "/v1/sprites/web").send().await?;
                ensure!(
                    [204, 404].contains(&r.status().as_u16()),
                    "cleanup: {}",
                    r.status()
                );
                ck = w.fixture().await?;
            }
        }
    }

    // Sprite URLs (`auth: sprite`): a token that can't reach the sprite sees none.
    for who in EVERYONE {
        let (status, body) = w.url(who, "web-acme").await?;
        calls += 1;
        let json_body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let good = match expect(who, Kind::Use) {
            Expect::Allowed => status == 200 && body == "hello from acme\n",
            Expect::Forbidden => status == 403,
            Expect::Hidden => status == 404 && json_body == hidden_body("web"),
            Expect::Unauthorized => status == 401 && json_body == json!({"error": "unauthorized"}),
        };
        if !good {
            failures.push(format!("URL web-acme as {who:?}: got {status} {body}"));
        }
    }
    // The same name in the other organisation's URL form reaches nothing.
    let (status, _) = w.url(Admin, "web-beta").await?;
    ensure!(status == 404, "web-beta: {status}");

    if !failures.is_empty() {
        bail!(
            "{} of {calls} calls were answered wrongly:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// What each token sees in lists: its organisation's sprites within its
/// reach, nothing else; names are unique per organisation.
pub async fn lists_keep_to_the_tokens_reach() -> Result<()> {
    let s = TestServer::start().await?;
    make_org(&s, "acme").await?;
    make_org(&s, "beta").await?;
    let acme = mint(&s, json!({"org": "acme", "role": "admin"})).await?;
    let beta = mint(&s, json!({"org": "beta", "role": "admin"})).await?;
    let only_a = mint(&s, json!({"org": "acme", "role": "viewer", "sprites": ["a"]})).await?;
    let http = reqwest::Client::new();
    for (tok, name) in [(&acme, "a"), (&acme, "b"), (&beta, "a"), (&s.token, "a")] {
        let r = http
            .post(s.api("/v1/sprites"))
            .bearer_auth(tok)
            .json(&json!({"name": name}))
            .send()
            .await?;
        ensure!(r.status() == StatusCode::CREATED, "create {name}: {}", r.status());
        let v: Value = r.json().await?;
        ensure!(v["name"] == name, "{v}");
    }
    let get = |tok: &str, path: &str| {
        let req = http.get(s.api(path)).bearer_auth(tok);
        async move { Ok::<Value, anyhow::Error>(req.send().await?.json().await?) }
    };
    let names = |v: &Value| -> Vec<(String, String)> {
        let mut n: Vec<_> = v["sprites"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["organization"].as_str().unwrap_or("").to_string(),
                            s["name"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    };
    let pair = |o: &str, n: &str| (o.to_string(), n.to_string());
    let v = get(&acme, "/v1/sprites").await?;
    ensure!(names(&v) == vec![pair("acme", "a"), pair("acme", "b")], "{v}");
    ensure!(v["org"]["name"] == "acme", "{v}");
    let v = get(&beta, "/v1/sprites").await?;
    ensure!(names(&v) == vec![pair("beta", "a")], "{v}");
    let v = get(&only_a, "/v1/sprites").await?;
    ensure!(names(&v) == vec![pair("acme", "a")], "{v}");
    let v = get(&s.token, "/v1/sprites").await?;
    ensure!(names(&v) == vec![pair("den", "a")], "{v}");
    // Each URL names its organisation; the default organisation keeps the bare name.
    let port = s.cfg.listen.port();
    let v = get(&beta, "/v1/sprites/a").await?;
    ensure!(v["url"] == format!("http://a-beta.localhost:{port}/"), "{v}");
    let v = get(&s.token, "/v1/sprites/a").await?;
    ensure!(v["url"] == format!("http://a.localhost:{port}/"), "{v}");
    // A sprite's internal key is no name: spelled in a path or a URL it
    // reaches nothing, from the default organisation either.
    for path in [
        "/v1/sprites/a@acme",
        "/v1/sprites/a%40acme",
        "/v1/sprites/b@acme/exec?cmd=true",
    ] {
        for tok in [&s.token, &beta] {
            let r = http.get(s.api(path)).bearer_auth(tok).send().await?;
            ensure!(r.status() == 404, "{path}: {}", r.status());
        }
    }
    let r = http
        .get(s.api("/"))
        .header("host", format!("a@acme.localhost:{port}"))
        .bearer_auth(&s.token)
        .send()
        .await?;
    ensure!(r.status() == 404, "a key as a URL label: {}", r.status());
    // URL labels never collide: a default-organisation name in another
    // organisation's URL form is refused, and so is an organisation whose
    // URL form a default-organisation sprite already has.
    let create = |name: &str| {
        http.post(s.api("/v1/sprites"))
            .bearer_auth(&s.token)
            .json(&json!({"name": name}))
            .send()
    };
    let r = create("a-acme").await?;
    ensure!(r.status() == 409, "a-acme in den: {}", r.status());
    let r = create("shop-gamma").await?;
    ensure!(r.status() == 201, "{}", r.status());
    let r = s
        .client()
        .post(s.api("/v1/orgs"))
        .json(&json!({"slug": "gamma"}))
        .send()
        .await?;
    ensure!(
        r.status() == 409,
        "org gamma over den's shop-gamma: {}",
        r.status()
    );
    // Without a token, a missing sprite's URL answers like a private one's.
    for label in ["a-acme", "nosuch-acme", "a"] {
        let r = http
            .get(s.api("/"))
            .header("host", format!("{label}.localhost:{port}"))
            .send()
            .await?;
        ensure!(r.status() == 401, "{label}: {}", r.status());
    }
    // `/v1/organization` is the token's own.
    let v = get(&acme, "/v1/organization").await?;
    ensure!(v["slug"] == "acme" && v["sprites"] == 2, "{v}");
    // An organisation with sprites can't be deleted; its tokens die with it.
    let r = s.client().delete(s.api("/v1/orgs/beta")).send().await?;
    ensure!(r.status() == 409, "{}", r.status());
    let r = http
        .delete(s.api("/v1/sprites/a"))
        .bearer_auth(&beta)
        .send()
        .await?;
    ensure!(r.status() == 204, "{}", r.status());
    let r = s.client().delete(s.api("/v1/orgs/beta")).send().await?;
    ensure!(r.status() == 204, "{}", r.status());
    let r = http.get(s.api("/v1/sprites")).bearer_auth(&beta).send().await?;
    ensure!(
        r.status() == 401,
        "a deleted organisation's token: {}",
        r.status()
    );
    // The audit log has the organisation's changes, with who made them.
    let v = get(&acme, "/v1/orgs/acme/audit").await?;
    let entries = v["entries"].as_array().context("entries")?;
    ensure!(
        entries
            .iter()
            .any(|e| e["action"] == "POST /v1/sprites" && e["status"] == 201 && e["token_id"].is_string()),
        "{v}"
    );
    ensure!(entries.iter().all(|e| e["org"] == "acme"), "{v}");
    Ok(())
}
