//! The Rust SDK (`sprites` 0.1.0 from crates.io) against a real den server,
//! with only the base URL changed.
//!
//! Left out on purpose, because that crate disagrees with the Sprites wire
//! reference rather than with den: it reads the exit frame (`0x03`) as a
//! decimal string where the reference (and the Go, JS and Python SDKs) send
//! and read one byte, so every exit status it reports is 0; and it lists
//! sessions at `GET …/sessions` instead of `GET …/exec`; and its filesystem
//! client speaks a REST shape of its own (`GET …/fs/<path>?list=true`,
//! `POST …/fs/<path>?mkdir=true`) instead of the reference's
//! `…/fs/read|write|list?path=`. den follows the reference.

use anyhow::{Context, Result, ensure};
use sprites::{NetworkPolicy, NetworkPolicyRule, PolicyAction, SpritesClient, UrlAuth, UrlSettings};

pub async fn rust_sdk(runtime: den_runtime::Runtime) -> Result<()> {
    let s = crate::sdk::start_on(runtime, |_| {}).await?;
    let client = SpritesClient::with_base_url(s.token.clone(), s.url.clone());

    // Sprites: create, get, list, delete.
    let sprite = client.create("rs-main").await?;
    let info = client.get("rs-main").await?;
    ensure!(info.name == "rs-main" && !info.id.is_empty(), "{info:?}");
    ensure!(
        info.url_settings.as_ref().map(|u| u.auth.clone()) == Some(UrlAuth::Sprite),
        "{info:?}"
    );
    client.create("rs-other").await?;
    let names: Vec<String> = client.list().await?.into_iter().map(|i| i.name).collect();
    ensure!(
        names.contains(&"rs-main".to_string()) && names.contains(&"rs-other".to_string()),
        "{names:?}"
    );
    client.delete("rs-other").await?;
    ensure!(matches!(
        client.get("rs-other").await,
        Err(sprites::Error::NotFound(_))
    ));

    // Exec: separate stdout and stderr, env and working directory.
    let out = sprite
        .command("sh")
        .arg("-c")
        .arg("echo \"$GREETING\" from $(pwd); echo oops >&2")
        .env("GREETING", "hello")
        .current_dir("/tmp")
        .output()
        .await?;
    ensure!(
        out.stdout_str() == "hello from /tmp\n" && out.stderr_str() == "oops\n",
        "stdout {:?} stderr {:?}",
        out.stdout_str(),
        out.stderr_str()
    );
    for i in 0..20 {
        let out = sprite.command("echo").arg(format!("n{i}")).output().await?;
        ensure!(
            out.stdout_str() == format!("n{i}\n"),
            "lost output: {:?}",
            out.stdout_str()
        );
    }

    // Checkpoint, change, restore.
    sprite
        .command("sh")
        .arg("-c")
        .arg("echo before > /home/sprite/state")
        .output()
        .await?;
    let ck = sprite.checkpoint("rust sdk").await?;
    ensure!(ck.id.starts_with('v'), "{ck:?}");
    let listed = sprite.list_checkpoints().await?;
    ensure!(listed.iter().any(|c| c.id == ck.id), "{listed:?}");
    ensure!(sprite.get_checkpoint(&ck.id).await?.id == ck.id);
    sprite
        .command("sh")
        .arg("-c")
        .arg("echo after > /home/sprite/state")
        .output()
        .await?;
    sprite.restore(&ck.id).await?;
    let out = sprite.command("cat").arg("/home/sprite/state").output().await?;
    ensure!(
        out.stdout_str() == "before\n",
        "after restore: {:?}",
        out.stdout_str()
    );

    // Network policy and URL settings.
    sprite
        .set_policy(NetworkPolicy {
            rules: vec![NetworkPolicyRule {
                domain: "example.com".into(),
                action: PolicyAction::Allow,
            }],
            include: vec![],
        })
        .await?;
    let pol = sprite.get_policy().await?;
    ensure!(
        pol.rules.len() == 1 && pol.rules[0].domain == "example.com",
        "{pol:?}"
    );
    sprite
        .update_url_settings(UrlSettings {
            auth: UrlAuth::Public,
        })
        .await?;
    let info = client.get("rs-main").await?;
    ensure!(
        info.url_settings.map(|u| u.auth) == Some(UrlAuth::Public),
        "url settings not applied"
    );

    // A wrong token is refused.
    let bad = SpritesClient::with_base_url("den_wrong", s.url.clone());
    match bad.list().await {
        Err(sprites::Error::Api { status: 401, .. }) => {}
        other => anyhow::bail!("a wrong token gave {other:?}"),
    }

    sprite.destroy().await.context("destroying the sprite")?;
    s.stop().await;
    Ok(())
}
