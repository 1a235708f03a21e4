//! The PostgreSQL catalog against a real PostgreSQL 15: the same contract as
//! the SQLite catalog, atomic inserts across nodes, and a database restart.

use std::sync::Arc;

use den_sprite::catalog::Catalog;
use den_sprite::catalog_pg::PgCatalog;
use den_sprite::{SpriteError, SpriteRecord};
use den_testkit::postgres::TestPostgres;

fn record(name: &str, id: &str) -> SpriteRecord {
    SpriteRecord {
        id: id.to_string(),
        name: name.to_string(),
        key: format!("k-{name}"),
        volume: format!("sprite-k-{name}"),
        image: "img-1".into(),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        last_running_at_ms: None,
        last_warming_at_ms: Some(1_700_000_000_123),
        last_started_at_ms: Some(1_700_000_000_100),
        last_active_at_ms: None,
        policy: None,
        services: Vec::new(),
        active_checkpoint: Some("v1".into()),
        resources: den_runtime::Resources::sprite_default(),
        runtime: den_runtime::Runtime::Gvisor,
        sleep_note: Some("its memory could not be saved".into()),
        attrs: serde_json::json!({"url": {"auth": "public"}, "labels": ["a", "b"], "n": 1.5}),
    }
}

fn json(rec: &SpriteRecord) -> serde_json::Value {
    serde_json::to_value(rec).unwrap()
}

#[tokio::test]
async fn crud_matches_the_sqlite_contract() -> anyhow::Result<()> {
    let pg = TestPostgres::start()?;
    let cat = PgCatalog::connect(&pg.url()).await?;
    // A second connect runs the schema creation again: it must be idempotent.
    let again = PgCatalog::connect(&pg.url()).await?;

    assert!(cat.get("alpha").await?.is_none());
    assert!(cat.list().await?.is_empty());

    let a = record("alpha", "id-a");
    cat.insert(&a).await?;
    cat.insert(&record("Zed", "id-z")).await?;
    cat.insert(&record("beta", "id-b")).await?;
    assert_eq!(json(&again.get("alpha").await?.expect("alpha")), json(&a));

    // Same name, or same id under another name: both are taken.
    assert!(
        matches!(cat.insert(&record("alpha", "id-other")).await, Err(SpriteError::Exists(n)) if n == "alpha")
    );
    assert!(matches!(
        cat.insert(&record("gamma", "id-a")).await,
        Err(SpriteError::Exists(_))
    ));

    // Byte order, as SQLite sorts: upper case first.
    let names: Vec<String> = again.list().await?.into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["Zed", "alpha", "beta"]);

    let mut a2 = a.clone();
    a2.active_checkpoint = Some("v7".into());
    a2.attrs = serde_json::json!({"changed": true});
    cat.update(&a2).await?;
    assert_eq!(json(&again.get("alpha").await?.expect("alpha")), json(&a2));
    assert!(
        matches!(cat.update(&record("nope", "id-n")).await, Err(SpriteError::NotFound(n)) if n == "nope")
    );

    cat.delete("alpha").await?;
    assert!(again.get("alpha").await?.is_none());
    // Deleting what is not there is not an error (as in SQLite).
    cat.delete("alpha").await?;
    // The name is free again, and so is the id.
    cat.insert(&a).await?;
    assert_eq!(cat.list().await?.len(), 3);

    let updated = pg.psql("SELECT count(*) FROM sprites WHERE updated_at IS NOT NULL")?;
    assert_eq!(updated.trim(), "3");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inserts_of_one_name_from_two_nodes_admit_exactly_one() -> anyhow::Result<()> {
    let pg = TestPostgres::start()?;
    // Two nodes starting together also race on schema creation.
    let url = pg.url();
    let (a, b) = tokio::join!(PgCatalog::connect(&url), PgCatalog::connect(&url));
    let (a, b) = (Arc::new(a?), Arc::new(b?));
    for round in 0..20 {
        let name = format!("race{round}");
        let (ra, rb) = (
            record(&name, &format!("a-{round}")),
            record(&name, &format!("b-{round}")),
        );
        let (ca, cb) = (a.clone(), b.clone());
        let ta = tokio::spawn(async move { ca.insert(&ra).await });
        let tb = tokio::spawn(async move { cb.insert(&rb).await });
        let (ra, rb) = (ta.await?, tb.await?);
        let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ra:?} / {rb:?}");
        for r in [ra, rb] {
            if let Err(e) = r {
                assert!(matches!(e, SpriteError::Exists(ref n) if *n == name), "{e}");
            }
        }
        // Both nodes see the single winner.
        let wa = a.get(&name).await?.expect("winner");
        let wb = b.get(&name).await?.expect("winner");
        assert_eq!(wa.id, wb.id);
    }
    assert_eq!(a.list().await?.len(), 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_database_restart() -> anyhow::Result<()> {
    let mut pg = TestPostgres::start()?;
    let cat = PgCatalog::connect(&pg.url()).await?;
    cat.insert(&record("before", "id-1")).await?;
    // Fill the pool with more than one idle connection, all of which the restart kills.
    let (x, y, z) = tokio::join!(cat.list(), cat.get("before"), cat.get("nope"));
    x?;
    y?;
    z?;

    tokio::task::block_in_place(|| pg.restart())?;

    // The very next call works: dead pooled connections are replaced, not returned.
    assert!(cat.get("before").await?.is_some());
    cat.insert(&record("after", "id-2")).await?;
    let names: Vec<String> = cat.list().await?.into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["after", "before"]);

    // While the database is down calls fail (no hang, no panic); they work again once it is back.
    tokio::task::block_in_place(|| pg.stop())?;
    assert!(matches!(cat.get("before").await, Err(SpriteError::Catalog(_))));
    tokio::task::block_in_place(|| pg.restart())?;
    assert!(cat.get("before").await?.is_some());
    Ok(())
}
