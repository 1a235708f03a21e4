//! The filesystem endpoints (§2.10): list, read (streamed), write (streamed).
//! Relative paths resolve against `/home/sprite`, where exec starts too.

use reqwest::{Method, Response, Url};
use serde::{Deserialize, Serialize};

use crate::client::seg;
use crate::{Client, Result};

/// Relative paths are taken from here.
pub const FS_HOME: &str = "/home/sprite";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsEntry {
    #[serde(default)]
    pub name: String,
    pub path: String,
    /// `file`, `directory` or `symlink`.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    /// Octal, like `0644`.
    #[serde(default)]
    pub mode: Option<String>,
}

impl FsEntry {
    pub fn is_dir(&self) -> bool {
        self.kind == "directory"
    }

    pub fn is_file(&self) -> bool {
        self.kind == "file"
    }

    /// The permission bits, if the server gave them.
    pub fn mode_bits(&self) -> Option<u32> {
        u32::from_str_radix(self.mode.as_deref()?.trim_start_matches("0o"), 8)
            .ok()
            .map(|m| m & 0o7777)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsListing {
    /// The listed path, resolved.
    pub path: String,
    pub entries: Vec<FsEntry>,
}

impl FsListing {
    /// A file lists as one entry for itself.
    pub fn is_file(&self) -> bool {
        matches!(self.entries.as_slice(), [e] if e.path == self.path && !e.is_dir())
    }
}

impl Client {
    fn fs_url(&self, name: &str, op: &str, path: &str) -> Result<Url> {
        let mut url = self.url(&format!("/v1/sprites/{}/fs/{op}", seg(name)))?;
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("workingDir", FS_HOME);
        Ok(url)
    }

    pub async fn fs_list(&self, name: &str, path: &str, recursive: bool) -> Result<FsListing> {
        let mut url = self.fs_url(name, "list", path)?;
        if recursive {
            url.query_pairs_mut().append_pair("recursive", "true");
        }
        self.json(self.request_url(Method::GET, url)?, Some(name)).await
    }

    /// A file's content as a response to stream (`bytes_stream`, `chunk`).
    pub async fn fs_read(&self, name: &str, path: &str) -> Result<Response> {
        let url = self.fs_url(name, "read", path)?;
        self.send(self.request_url(Method::GET, url)?, Some(name)).await
    }

    /// Replace a file with `body` (missing parent directories are created).
    pub async fn fs_write(
        &self,
        name: &str,
        path: &str,
        body: impl Into<reqwest::Body>,
        mode: Option<u32>,
    ) -> Result<()> {
        let mut url = self.fs_url(name, "write", path)?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("mkdirParents", "true");
            if let Some(m) = mode {
                q.append_pair("mode", &format!("{:04o}", m & 0o7777));
            }
        }
        let rb = self
            .request_url(Method::PUT, url)?
            .header("content-type", "application/octet-stream")
            .body(body);
        self.send(rb, Some(name)).await.map(drop)
    }

    pub async fn fs_delete(&self, name: &str, path: &str, recursive: bool) -> Result<()> {
        let mut url = self.fs_url(name, "delete", path)?;
        if recursive {
            url.query_pairs_mut().append_pair("recursive", "true");
        }
        self.send(self.request_url(Method::DELETE, url)?, Some(name))
            .await
            .map(drop)
    }

    /// Create a directory (and its parents), the way the SDKs do: write
    /// `DIR/.keep`, then delete it.
    pub async fn fs_mkdir(&self, name: &str, dir: &str) -> Result<()> {
        let keep = format!("{}/.keep", dir.trim_end_matches('/'));
        self.fs_write(name, &keep, Vec::<u8>::new(), None).await?;
        self.fs_delete(name, &keep, false).await
    }
}
