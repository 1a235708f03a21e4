//! API tokens (den extension: `/v1/tokens`).

use reqwest::Method;
use serde_json::json;

use crate::client::seg;
use crate::types::TokenList;
use crate::{Client, NewToken, Result, Token};

impl Client {
    pub async fn create_token(&self, name: Option<&str>) -> Result<NewToken> {
        let body = match name {
            Some(n) => json!({"name": n}),
            None => json!({}),
        };
        let rb = self.request(Method::POST, "/v1/tokens")?.json(&body);
        self.json(rb, None).await
    }

    pub async fn list_tokens(&self) -> Result<Vec<Token>> {
        let list: TokenList = self.json(self.request(Method::GET, "/v1/tokens")?, None).await?;
        Ok(list.tokens)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, &format!("/v1/tokens/{}", seg(id)))?;
        self.send(rb, None).await.map(drop)
    }
}
