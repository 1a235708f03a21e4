//! Sprites CRUD, listing and fork.

use reqwest::Method;
use serde_json::json;

use crate::client::seg;
use crate::{Client, CreateSprite, Result, Sprite, SpritePage};

impl Client {
    pub async fn create_sprite(&self, req: &CreateSprite) -> Result<Sprite> {
        let rb = self.request(Method::POST, "/v1/sprites")?.json(req);
        self.json(rb, None).await
    }

    pub async fn get_sprite(&self, name: &str) -> Result<Sprite> {
        let rb = self.request(Method::GET, &format!("/v1/sprites/{}", seg(name)))?;
        self.json(rb, Some(name)).await
    }

    /// One page, starting after `after` (a continuation token).
    pub async fn list_sprites_page(&self, prefix: Option<&str>, after: Option<&str>) -> Result<SpritePage> {
        let mut url = self.url("/v1/sprites")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("max_results", "100");
            if let Some(p) = prefix {
                q.append_pair("prefix", p);
            }
            if let Some(a) = after {
                q.append_pair("continuation_token", a);
            }
        }
        self.json(self.request_url(Method::GET, url)?, None).await
    }

    /// Every sprite (all pages), by name.
    pub async fn list_sprites(&self, prefix: Option<&str>) -> Result<Vec<Sprite>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.list_sprites_page(prefix, after.as_deref()).await?;
            all.extend(page.sprites);
            match page.next_continuation_token {
                Some(t) if page.has_more => after = Some(t),
                _ => return Ok(all),
            }
        }
    }

    pub async fn delete_sprite(&self, name: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, &format!("/v1/sprites/{}", seg(name)))?;
        self.send(rb, Some(name)).await.map(drop)
    }

    /// Set the sprite URL's auth mode: `sprite` or `public`.
    pub async fn set_url_auth(&self, name: &str, auth: &str) -> Result<Sprite> {
        let rb = self
            .request(Method::PUT, &format!("/v1/sprites/{}", seg(name)))?
            .json(&json!({"url_settings": {"auth": auth}}));
        self.json(rb, Some(name)).await
    }

    /// A new sprite `new` from `source`'s checkpoint, or its live state.
    pub async fn fork_sprite(&self, source: &str, new: &str, checkpoint: Option<&str>) -> Result<Sprite> {
        let rb = self
            .request(Method::POST, &format!("/v1/sprites/{}/fork", seg(source)))?
            .json(&json!({"name": new, "checkpoint": checkpoint}));
        self.json(rb, Some(source)).await
    }
}
