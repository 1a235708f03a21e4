//! API tokens and organisations (den extensions: `/v1/tokens`, `/v1/orgs`,
//! `/v1/organization`).

use reqwest::Method;
use serde_json::Value;

use crate::client::seg;
use crate::types::{OrgList, TokenList};
use crate::{Client, NewToken, Org, Result, Token, TokenRequest};

impl Client {
    pub async fn create_token(&self, req: &TokenRequest) -> Result<NewToken> {
        let rb = self.request(Method::POST, "/v1/tokens")?.json(req);
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

    /// The token's own organisation.
    pub async fn organization(&self) -> Result<Org> {
        self.json(self.request(Method::GET, "/v1/organization")?, None)
            .await
    }

    /// `limits` is an object of the server's quota names (null: none).
    pub async fn create_org(&self, slug: &str, name: Option<&str>, limits: &Value) -> Result<Org> {
        let mut body = serde_json::json!({"slug": slug, "limits": limits});
        if let Some(n) = name {
            body["name"] = n.into();
        }
        let rb = self.request(Method::POST, "/v1/orgs")?.json(&body);
        self.json(rb, None).await
    }

    pub async fn list_orgs(&self) -> Result<Vec<Org>> {
        let list: OrgList = self.json(self.request(Method::GET, "/v1/orgs")?, None).await?;
        Ok(list.orgs)
    }

    pub async fn get_org(&self, slug: &str) -> Result<Org> {
        let rb = self.request(Method::GET, &format!("/v1/orgs/{}", seg(slug)))?;
        self.json(rb, None).await
    }

    /// Replace the name and/or every limit.
    pub async fn update_org(&self, slug: &str, name: Option<&str>, limits: Option<&Value>) -> Result<Org> {
        let mut body = serde_json::json!({});
        if let Some(n) = name {
            body["name"] = n.into();
        }
        if let Some(l) = limits {
            body["limits"] = l.clone();
        }
        let rb = self
            .request(Method::PUT, &format!("/v1/orgs/{}", seg(slug)))?
            .json(&body);
        self.json(rb, None).await
    }

    pub async fn delete_org(&self, slug: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, &format!("/v1/orgs/{}", seg(slug)))?;
        self.send(rb, None).await.map(drop)
    }

    /// The organisation's recent state-changing requests, newest first.
    pub async fn audit(&self, slug: &str, limit: usize) -> Result<Vec<Value>> {
        let rb = self.request(
            Method::GET,
            &format!("/v1/orgs/{}/audit?limit={limit}", seg(slug)),
        )?;
        let v: Value = self.json(rb, None).await?;
        Ok(v["entries"].as_array().cloned().unwrap_or_default())
    }
}
