//! Tokens shared through a real PostgreSQL 15, as two cluster nodes see them:
//! two `TokenStore`s on one database stand for two nodes.

use std::time::Duration;

use den_server::auth::{TokenStore, ensure_admin_token};
use den_testkit::postgres::TestPostgres;
use den_testkit::wait_until;

/// Well above the one-second refresh, to absorb a loaded CI machine.
const PROPAGATION: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Poll a synchronous condition without blocking the refresh tasks' runtime.
fn eventually(what: &str, cond: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| wait_until(PROPAGATION, POLL, cond))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_on_one_node_works_on_another_and_revocation_spreads() -> anyhow::Result<()> {
    let pg = TestPostgres::start()?;
    let a = TokenStore::open_postgres(&pg.url()).await?;
    let b = TokenStore::open_postgres(&pg.url()).await?;

    let (info, secret) = a.create(&den_server::auth::TokenSpec::named("ci")).await?;
    // The minting node accepts it at once; it is not waiting for a refresh.
    assert_eq!(a.verify(&secret).map(|t| t.id), Some(info.id.clone()));
    eventually("token minted on A verifies on B", || {
        b.verify(&secret)
            .is_some_and(|t| t.id == info.id && t.name == "ci")
    });
    assert!(b.list().iter().any(|t| t.id == info.id));
    assert!(b.verify("den_not-a-token").is_none());

    // A token minted on B, revoked on A.
    let (info_b, secret_b) = b.create(&den_server::auth::TokenSpec::named("other")).await?;
    eventually("token minted on B verifies on A", || {
        a.verify(&secret_b).is_some()
    });
    assert!(a.revoke(&info_b.id).await?);
    assert!(
        a.verify(&secret_b).is_none(),
        "the revoking node refuses it at once"
    );
    eventually("token revoked on A stops verifying on B", || {
        b.verify(&secret_b).is_none()
    });
    assert!(!b.list().iter().any(|t| t.id == info_b.id));
    // Revoking it again, from either node: there is no such token any more.
    assert!(!b.revoke(&info_b.id).await?);

    // The first token was untouched throughout.
    assert!(a.verify(&secret).is_some() && b.verify(&secret).is_some());

    // A third node starting later loads everything at open.
    let c = TokenStore::open_postgres(&pg.url()).await?;
    assert!(c.verify(&secret).is_some());
    assert!(c.verify(&secret_b).is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_working_through_a_database_restart() -> anyhow::Result<()> {
    let mut pg = TestPostgres::start()?;
    let a = TokenStore::open_postgres(&pg.url()).await?;
    let b = TokenStore::open_postgres(&pg.url()).await?;
    let (_, secret) = a.create(&den_server::auth::TokenSpec::named("before")).await?;
    eventually("B sees the token", || b.verify(&secret).is_some());

    tokio::task::block_in_place(|| pg.stop())?;
    // The database is down: the last loaded tokens stay valid, creating fails cleanly.
    assert!(b.verify(&secret).is_some());
    assert!(
        a.create(&den_server::auth::TokenSpec::named("while-down"))
            .await
            .is_err()
    );
    tokio::task::block_in_place(|| pg.restart())?;

    let (info, fresh) = a.create(&den_server::auth::TokenSpec::named("after")).await?;
    eventually("B sees a token minted after the restart", || {
        b.verify(&fresh).is_some()
    });
    assert!(b.revoke(&info.id).await?);
    eventually("A sees the revocation after the restart", || {
        a.verify(&fresh).is_none()
    });
    assert!(a.verify(&secret).is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_starting_together_mint_one_admin_token() -> anyhow::Result<()> {
    let pg = TestPostgres::start()?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let url = pg.url();
    // Schema creation races too.
    let (a, b) = tokio::join!(TokenStore::open_postgres(&url), TokenStore::open_postgres(&url));
    let (a, b) = (a?, b?);

    let (ra, rb) = tokio::join!(
        ensure_admin_token(&a, dir_a.path()),
        ensure_admin_token(&b, dir_b.path())
    );
    let (ra, rb) = (ra?, rb?);
    let (winner, winner_dir, loser, loser_dir) = match (&ra, &rb) {
        (Some(_), None) => (&a, dir_a.path(), &b, dir_b.path()),
        (None, Some(_)) => (&b, dir_b.path(), &a, dir_a.path()),
        other => panic!("exactly one node must mint the admin token, got {other:?}"),
    };
    let file = winner_dir.join("admin-token");
    assert_eq!(ra.as_deref().or(rb.as_deref()), Some(file.as_path()));
    let mode = std::fs::metadata(&file)?.permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    // The loser writes nothing, not even a leftover temporary file.
    assert_eq!(std::fs::read_dir(loser_dir)?.count(), 0);
    assert_eq!(std::fs::read_dir(winner_dir)?.count(), 1);

    let secret = std::fs::read_to_string(&file)?.trim().to_string();
    assert_eq!(winner.verify(&secret).map(|t| t.name), Some("admin".into()));
    eventually("the admin token verifies on the other node", || {
        loser.verify(&secret).is_some()
    });
    assert_eq!(
        pg.psql("SELECT count(*) FROM tokens WHERE name = 'admin'")?
            .trim(),
        "1"
    );

    // Restarts of either node (a new store on the same database) mint nothing more.
    let again = TokenStore::open_postgres(&url).await?;
    assert_eq!(ensure_admin_token(&again, loser_dir).await?, None);
    assert_eq!(ensure_admin_token(&again, winner_dir).await?, None);
    assert_eq!(std::fs::read_dir(loser_dir)?.count(), 0);
    assert_eq!(std::fs::read_to_string(&file)?.trim(), secret);
    assert_eq!(pg.psql("SELECT count(*) FROM tokens")?.trim(), "1");
    Ok(())
}

/// Organisations live next to the tokens: made, changed and deleted on one
/// node, seen on the other within the refresh; a deleted organisation's
/// tokens die with it on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organisations_spread_between_nodes_and_take_their_tokens_along() -> anyhow::Result<()> {
    use den_server::auth::{Org, OrgLimits, Role, TokenSpec};
    let pg = TestPostgres::start()?;
    let a = TokenStore::open_postgres(&pg.url()).await?;
    let b = TokenStore::open_postgres(&pg.url()).await?;
    assert!(
        a.org(den_sprite::DEFAULT_ORG).is_some(),
        "the default organisation exists"
    );
    let mut org = Org {
        slug: "acme".into(),
        name: "Acme".into(),
        created_at: "2026-12-07T00:00:00Z".into(),
        limits: OrgLimits {
            max_sprites: Some(3),
            ..OrgLimits::default()
        },
    };
    assert!(a.create_org(&org).await?);
    assert!(
        !b.create_org(&org).await?,
        "the slug is taken, whichever node asks"
    );
    eventually("the organisation reaches B", || {
        b.org("acme") == Some(org.clone())
    });
    org.limits.max_awake = Some(1);
    org.name = "Acme Inc".into();
    assert!(b.update_org(&org).await?);
    eventually("the change reaches A", || a.org("acme") == Some(org.clone()));

    let spec = TokenSpec {
        org: "acme".into(),
        role: Role::Viewer,
        sprites: Some(vec!["web".into()]),
        ..TokenSpec::named("agent")
    };
    let (info, secret) = a.create(&spec).await?;
    eventually("the scoped token verifies on B", || {
        b.verify(&secret) == Some(info.clone())
    });
    assert!(b.delete_org("acme").await?);
    assert!(
        b.verify(&secret).is_none(),
        "the deleting node refuses it at once"
    );
    eventually("the token dies on A too", || {
        a.verify(&secret).is_none() && a.org("acme").is_none()
    });
    Ok(())
}
