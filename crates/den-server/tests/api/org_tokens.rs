//! Organisations and scoped tokens over the API: a token never mints one
//! wider than itself, and a data dir written before organisations existed
//! opens with its sprites in the default organisation and its old tokens
//! still working. Also the helpers the SDK isolation test shares.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::{TestServer, WAIT};

/// A client that sends `token`.
pub fn client_for(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// Status and JSON body of a response (Null for an empty or non-JSON body).
pub async fn answer(r: reqwest::Response) -> Result<(u16, Value)> {
    let status = r.status().as_u16();
    let text = r.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Create organisation `slug` with the server administrator's token.
pub async fn make_org(s: &TestServer, slug: &str) -> Result<()> {
    let r = s
        .client()
        .post(s.api("/v1/orgs"))
        .json(&json!({"slug": slug}))
        .send()
        .await?;
    let (st, body) = answer(r).await?;
    ensure!(st == 201, "create org {slug}: {st} {body}");
    Ok(())
}

/// `POST /v1/tokens` with `by`'s token: the status and the body.
pub async fn mint(s: &TestServer, by: &str, body: Value) -> Result<(u16, Value)> {
    answer(
        client_for(by)
            .post(s.api("/v1/tokens"))
            .json(&body)
            .send()
            .await?,
    )
    .await
}

/// A token that must be minted: its listing (secret in `token`).
pub async fn mint_ok(s: &TestServer, by: &str, body: Value) -> Result<Value> {
    let (st, v) = mint(s, by, body.clone()).await?;
    ensure!(st == 201, "mint {body}: {st} {v}");
    ensure!(v["token"].is_string(), "{v}");
    Ok(v)
}

pub fn secret(t: &Value) -> String {
    t["token"]
        .as_str()
        .expect("a minted token has its secret")
        .to_string()
}

/// `GET path` with `token`: the status and the body.
pub async fn get(s: &TestServer, token: &str, path: &str) -> Result<(u16, Value)> {
    answer(client_for(token).get(s.api(path)).send().await?).await
}

/// Create sprite `name` with `token`.
pub async fn create_sprite(s: &TestServer, token: &str, name: &str) -> Result<Value> {
    let r = client_for(token)
        .post(s.api("/v1/sprites"))
        .json(&json!({"name": name}))
        .send()
        .await?;
    let (st, v) = answer(r).await?;
    ensure!(st == 201, "create {name}: {st} {v}");
    Ok(v)
}

/// Write `content` to `path` in sprite `name` through the fs API.
pub async fn write_file(s: &TestServer, token: &str, name: &str, path: &str, content: &str) -> Result<()> {
    let r = client_for(token)
        .put(s.api(&format!(
            "/v1/sprites/{name}/fs/write?path={path}&mkdirParents=true"
        )))
        .body(content.to_string())
        .send()
        .await?;
    let (st, v) = answer(r).await?;
    ensure!(st / 100 == 2, "write {path} in {name}: {st} {v}");
    Ok(())
}

/// The content of `path` in sprite `name`.
pub async fn read_file(s: &TestServer, token: &str, name: &str, path: &str) -> Result<String> {
    let r = client_for(token)
        .get(s.api(&format!("/v1/sprites/{name}/fs/read?path={path}")))
        .send()
        .await?;
    ensure!(r.status() == 200, "read {path} in {name}: {}", r.status());
    Ok(r.text().await?)
}

/// Run busybox httpd serving `dir` on 8080 as service `web`, the sprite's
/// URL port.
pub async fn serve_web(s: &TestServer, token: &str, name: &str, dir: &str) -> Result<()> {
    let r = client_for(token)
        .put(s.api(&format!("/v1/sprites/{name}/services/web?duration=0s")))
        .json(&json!({"cmd": "httpd", "args": ["-f", "-p", "8080", "-h", dir], "http_port": 8080}))
        .send()
        .await?;
    ensure!(r.status() == 200, "service web in {name}: {}", r.status());
    r.text().await?;
    Ok(())
}

/// `GET /` on the sprite URL whose first label is `label`, sent to the
/// server's own address (`*.localhost` does not resolve everywhere).
pub async fn url_get(s: &TestServer, token: Option<&str>, label: &str) -> Result<(u16, String)> {
    let c = match token {
        Some(t) => client_for(t),
        None => s.anonymous(),
    };
    let r = c
        .get(s.api("/"))
        .header("host", format!("{label}.localhost:{}", s.cfg.listen.port()))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.text().await?))
}

/// Poll the sprite URL until it answers 200; its body.
pub async fn url_serves(s: &TestServer, token: Option<&str>, label: &str) -> Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (st, body) = url_get(s, token, label).await?;
        if st == 200 {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("{label}: still {st} {body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The body of a refusal with the name replaced, to compare a refusal for
/// one name with the refusal for another.
fn without(body: &Value, name: &str) -> String {
    body.to_string().replace(name, "<NAME>")
}

async fn revoke(s: &TestServer, by: &str, id: &str) -> Result<(u16, Value)> {
    answer(
        client_for(by)
            .delete(s.api(&format!("/v1/tokens/{id}")))
            .send()
            .await?,
    )
    .await
}

pub async fn token_minting_escalation() -> Result<()> {
    let s = TestServer::start().await?;
    make_org(&s, "acme").await?;
    make_org(&s, "beta").await?;
    let acme = secret(
        &mint_ok(
            &s,
            &s.token,
            json!({"org": "acme", "role": "admin", "name": "acme-admin"}),
        )
        .await?,
    );
    let beta_tok = mint_ok(
        &s,
        &s.token,
        json!({"org": "beta", "role": "admin", "name": "beta-admin"}),
    )
    .await?;
    let beta = secret(&beta_tok);
    let forbidden = |what: &str, (st, v): (u16, Value)| -> Result<()> {
        ensure!(st == 403, "{what}: {st} {v}");
        ensure!(
            v["error"] == "forbidden" && v["message"].is_string(),
            "{what}: not the error shape: {v}"
        );
        Ok(())
    };

    // A member manages no tokens, so it mints neither an admin nor its equal.
    let member = secret(&mint_ok(&s, &acme, json!({"role": "member"})).await?);
    forbidden(
        "member mints admin",
        mint(&s, &member, json!({"role": "admin"})).await?,
    )?;
    forbidden(
        "member mints member",
        mint(&s, &member, json!({"role": "member"})).await?,
    )?;
    // A viewer can't mint at all.
    let viewer = secret(&mint_ok(&s, &acme, json!({"role": "viewer"})).await?);
    forbidden(
        "viewer mints viewer",
        mint(&s, &viewer, json!({"role": "viewer"})).await?,
    )?;
    forbidden("viewer mints", mint(&s, &viewer, json!({})).await?)?;

    // An organisation's admin mints for its own organisation only.
    forbidden(
        "acme admin mints for beta",
        mint(&s, &acme, json!({"org": "beta", "role": "viewer"})).await?,
    )?;
    forbidden(
        "acme admin mints for the default org",
        mint(&s, &acme, json!({"org": "den", "role": "viewer"})).await?,
    )?;
    let own = mint_ok(&s, &acme, json!({"org": "acme", "role": "member"})).await?;
    ensure!(own["org"] == "acme" && own["role"] == "member", "{own}");

    // Nobody but a server administrator mints one.
    forbidden(
        "org admin mints a server admin",
        mint(&s, &acme, json!({"server_admin": true})).await?,
    )?;
    let den_admin = secret(&mint_ok(&s, &s.token, json!({"org": "den", "role": "admin"})).await?);
    forbidden(
        "default org admin mints a server admin",
        mint(&s, &den_admin, json!({"server_admin": true})).await?,
    )?;
    let sa = mint_ok(
        &s,
        &s.token,
        json!({"server_admin": true, "name": "second-admin"}),
    )
    .await?;
    ensure!(sa["server_admin"] == true, "{sa}");

    // A scoped token grants no sprite beyond its list; without a list its
    // tokens inherit its own.
    let scoped = secret(&mint_ok(&s, &acme, json!({"role": "admin", "sprites": ["a1"]})).await?);
    forbidden(
        "scoped mints a wider list",
        mint(&s, &scoped, json!({"sprites": ["a1", "a2"]})).await?,
    )?;
    forbidden(
        "scoped mints another sprite",
        mint(&s, &scoped, json!({"sprites": ["a2"]})).await?,
    )?;
    let inherited = mint_ok(&s, &scoped, json!({"role": "member"})).await?;
    ensure!(
        inherited["sprites"] == json!(["a1"]),
        "unscoped request from a scoped token: {inherited}"
    );
    let same = mint_ok(&s, &scoped, json!({"sprites": ["a1"]})).await?;
    ensure!(same["sprites"] == json!(["a1"]), "{same}");
    // …and a scoped admin can't reach (revoke) an unscoped token of its org.
    let (st, v) = revoke(&s, &scoped, own["id"].as_str().unwrap()).await?;
    ensure!(st == 404, "scoped revokes an unscoped token: {st} {v}");

    // A token never outlives the token that mints it.
    let short = mint_ok(&s, &acme, json!({"role": "admin", "expires_in": 3600})).await?;
    let short_secret = secret(&short);
    forbidden(
        "outliving its minter",
        mint(&s, &short_secret, json!({"expires_in": 7200})).await?,
    )?;
    let child = mint_ok(&s, &short_secret, json!({})).await?;
    ensure!(
        child["expires_at"] == short["expires_at"],
        "a token minted without expires_in by an expiring token expires with it: {child} vs {short}"
    );
    mint_ok(&s, &short_secret, json!({"expires_in": 60})).await?;

    // An expired token is refused like an unknown one.
    let (_, unknown) = get(&s, "den_0000", "/v1/organization").await?;
    let brief = secret(&mint_ok(&s, &acme, json!({"role": "viewer", "expires_in": 3})).await?);
    let (st, v) = get(&s, &brief, "/v1/organization").await?;
    ensure!(st == 200 && v["slug"] == "acme", "fresh token: {st} {v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, v) = get(&s, &brief, "/v1/organization").await?;
        if st == 401 {
            ensure!(v == unknown, "expired: {v} vs unknown: {unknown}");
            break;
        }
        ensure!(st == 200, "{st} {v}");
        ensure!(
            Instant::now() < deadline,
            "the token still works after its expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another organisation's tokens are as absent as unknown ones.
    let beta_id = beta_tok["id"].as_str().unwrap();
    let (st, v) = revoke(&s, &acme, beta_id).await?;
    ensure!(st == 404, "revoke another org's token: {st} {v}");
    let (st2, v2) = revoke(&s, &acme, "0123456789abcdef").await?;
    ensure!(
        st2 == 404 && without(&v, beta_id) == without(&v2, "0123456789abcdef"),
        "another org's token: {v}; unknown: {v2}"
    );
    let (st, v) = get(&s, &acme, "/v1/tokens").await?;
    ensure!(st == 200, "{st} {v}");
    let listed: Vec<&str> = v["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(|t| t["org"].as_str())
        .collect();
    ensure!(
        listed.iter().all(|o| *o == "acme"),
        "acme lists other orgs' tokens: {v}"
    );
    let (st, v) = get(&s, &beta, "/v1/organization").await?;
    ensure!(
        st == 200 && v["slug"] == "beta",
        "beta's token after acme tried to revoke it: {st} {v}"
    );
    s.stop().await;
    Ok(())
}

pub async fn migration_from_pre_org_data_dir() -> Result<()> {
    let mut s = TestServer::start().await?;
    // The catalog's format did not change: a sprite of the default
    // organisation is what every sprite was before organisations.
    create_sprite(&s, &s.token, "old").await?;
    write_file(&s, &s.token, "old", "/srv/www/index.html", "old page\n").await?;
    serve_web(&s, &s.token, "old", "/srv/www").await?;
    url_serves(&s, Some(s.token.as_str()), "old").await?;
    if let Some(r) = s.running.take() {
        r.stop().await;
    }

    // The token database of the release before organisations: its schema,
    // an `admin` token (the one in admin-token) and one more.
    let data = s.cfg.data_dir.clone();
    let admin = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_string();
    for f in ["tokens.db", "tokens.db-wal", "tokens.db-shm"] {
        match std::fs::remove_file(data.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let ci = "den_0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld0";
    {
        let db = rusqlite::Connection::open(data.join("tokens.db"))?;
        // Verbatim from f3dfcef's crates/den-server/src/auth.rs.
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                hash TEXT NOT NULL UNIQUE,
                created_at TEXT NOT NULL
            )",
        )?;
        let h = |t: &str| hex::encode(blake3::hash(t.as_bytes()).as_bytes());
        db.execute(
            "INSERT INTO tokens (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params!["a1b2c3d4e5f60718", "admin", h(&admin), "2026-01-01T00:00:00Z"],
        )?;
        db.execute(
            "INSERT INTO tokens (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params!["c1c2c3c4c5c6c7c8", "ci", h(ci), "2026-01-02T00:00:00Z"],
        )?;
    }
    s.restart().await?;
    ensure!(s.token == admin, "the admin token was replaced");

    // The old admin token is the server's administrator, in the default org.
    let (st, v) = get(&s, &admin, "/v1/organization").await?;
    ensure!(st == 200 && v["slug"] == "den" && v["sprites"] == 1, "{st} {v}");
    let r = client_for(&admin)
        .post(s.api("/v1/orgs"))
        .json(&json!({"slug": "neworg"}))
        .send()
        .await?;
    let (st, v) = answer(r).await?;
    ensure!(st == 201, "the old admin token creates an org: {st} {v}");

    // The other old token administers the default organisation, no more.
    let (st, v) = get(&s, ci, "/v1/tokens").await?;
    ensure!(st == 200, "{st} {v}");
    let mine = v["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .find(|t| t["id"] == "c1c2c3c4c5c6c7c8")
        .cloned()
        .context("the old ci token is listed")?;
    ensure!(
        mine["org"] == "den" && mine["role"] == "admin" && mine.get("server_admin").is_none(),
        "{mine}"
    );
    let (st, v) = get(&s, ci, "/v1/orgs").await?;
    ensure!(st == 403, "a plain old token lists orgs: {st} {v}");
    let r = client_for(ci)
        .post(s.api("/v1/orgs"))
        .json(&json!({"slug": "ciorg"}))
        .send()
        .await?;
    let (st, v) = answer(r).await?;
    ensure!(st == 403, "a plain old token creates an org: {st} {v}");
    let (st, v) = mint(&s, ci, json!({"server_admin": true})).await?;
    ensure!(st == 403, "a plain old token mints a server admin: {st} {v}");
    mint_ok(&s, ci, json!({"role": "member"})).await?;

    // The old sprite is in the default organisation and keeps its URL.
    for tok in [admin.as_str(), ci] {
        let (st, v) = get(&s, tok, "/v1/sprites").await?;
        ensure!(st == 200, "{st} {v}");
        let sprites = v["sprites"].as_array().context("sprites")?;
        ensure!(sprites.len() == 1, "{v}");
        let old = &sprites[0];
        ensure!(old["name"] == "old" && old["organization"] == "den", "{old}");
        let port = s.cfg.listen.port();
        ensure!(
            old["url"] == format!("http://old.localhost:{port}/"),
            "the old sprite's URL changed: {old}"
        );
        for label in ["old", "old-den"] {
            let body = url_serves(&s, Some(tok), label).await?;
            ensure!(body == "old page\n", "{label}: {body}");
        }
    }
    s.stop().await;
    Ok(())
}
