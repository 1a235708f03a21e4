//! The cluster secret in a real PostgreSQL 15: nodes that start at once
//! each offer their own random bytes, and all of them end up with the one
//! that was stored first.

use den_cluster::PeerKey;
use den_cluster::peer::stored_secret;
use den_testkit::postgres::TestPostgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_share_one_stored_secret() -> anyhow::Result<()> {
    let pg = TestPostgres::start()?;
    let pools: Vec<_> = (0..4)
        .map(|i| den_store::pg::pool(&pg.url(), 2, &format!("secret-test-{i}")))
        .collect::<Result<_, _>>()?;
    let got = all_at_once(&pools).await?;
    assert_eq!(got[0].len(), 32, "32 random bytes");
    assert!(got.iter().all(|s| *s == got[0]), "every node got the same secret");
    assert_ne!(got[0], vec![0u8; 32]);
    // A node starting later, or again, reads the same one.
    let later = den_store::pg::pool(&pg.url(), 1, "secret-test-later")?;
    assert_eq!(stored_secret(&later).await?, got[0]);
    // What one node signs, another verifies.
    let (a, b) = (PeerKey::from_secret(&got[0]), PeerKey::from_secret(&got[3]));
    let proof = a.prove("node-a", "GET", "/v1/sprites/x", None);
    assert_eq!(
        b.verify(&proof, "GET", "/v1/sprites/x", None),
        Ok("node-a".into())
    );
    // Only the row's single id is allowed.
    let out = pg.psql("INSERT INTO cluster_secret (id, secret) VALUES (2, 'x')");
    assert!(out.is_err(), "a second secret row was accepted: {out:?}");
    Ok(())
}

async fn all_at_once(pools: &[deadpool_postgres::Pool]) -> anyhow::Result<Vec<Vec<u8>>> {
    let tasks: Vec<_> = pools
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { stored_secret(&p).await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}
