//! `den mcp`: how to point an agent's MCP client at this server's `/mcp`.
//! It prints configuration only (it calls no server), and leaves the token
//! out unless `--show-token` asks for it.

use anyhow::Result;
use clap::{Args, ValueEnum};

use super::Ctx;

#[derive(Args, Debug)]
pub struct McpArgs {
    /// Which client's configuration to print.
    #[arg(long, value_enum, default_value_t = McpClient::All)]
    pub client: McpClient,
    /// The name the agent knows the server by.
    #[arg(long, default_value = "den")]
    pub name: String,
    /// Put the saved token itself in the snippets instead of a reference to
    /// $DEN_TOKEN (the output is then a secret).
    #[arg(long)]
    pub show_token: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum McpClient {
    All,
    ClaudeCode,
    ClaudeDesktop,
    Cursor,
    Vscode,
    Generic,
}

pub async fn mcp(ctx: &Ctx, a: McpArgs) -> Result<()> {
    let s = ctx.settings()?;
    let token = if a.show_token {
        match s.token.as_deref() {
            Some(t) => Some(t.to_string()),
            None => anyhow::bail!("no token saved — run `den login`, or pass --token"),
        }
    } else {
        None
    };
    print!("{}", snippets(&s.api_url, &a.name, a.client, token.as_deref()));
    Ok(())
}

/// The endpoint of a server whose API is at `api_url`.
pub fn endpoint(api_url: &str) -> String {
    format!("{}/mcp", api_url.trim_end_matches('/'))
}

/// The configuration text. `token` is the secret to inline; without it the
/// snippets read `DEN_TOKEN` from the environment, each in its client's way.
pub fn snippets(api_url: &str, name: &str, client: McpClient, token: Option<&str>) -> String {
    let url = endpoint(api_url);
    let json = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default();
    let (shell_token, cursor_token, desktop_env) = match token {
        Some(t) => (t.to_string(), t.to_string(), t.to_string()),
        None => (
            "$DEN_TOKEN".to_string(),
            "${env:DEN_TOKEN}".to_string(),
            "<your den token>".to_string(),
        ),
    };
    let mut out = String::new();
    let mut section = |which: McpClient, title: &str, body: String| {
        if client == McpClient::All || client == which {
            out.push_str(&format!("# {title}\n{body}\n\n"));
        }
    };
    section(
        McpClient::ClaudeCode,
        "Claude Code",
        format!(
            "claude mcp add --transport http {name} {url} --header \"Authorization: Bearer {shell_token}\""
        ),
    );
    section(
        McpClient::ClaudeDesktop,
        "Claude Desktop (claude_desktop_config.json; bridged with mcp-remote, which needs Node.js)",
        json(serde_json::json!({"mcpServers": {name: {
            "command": "npx",
            // mcp-remote's own form: no space in the argument, the value in env.
            "args": ["-y", "mcp-remote", url, "--header", "Authorization:${AUTH_HEADER}"],
            "env": {"AUTH_HEADER": format!("Bearer {desktop_env}")},
        }}})),
    );
    section(
        McpClient::Cursor,
        "Cursor (~/.cursor/mcp.json or .cursor/mcp.json)",
        json(serde_json::json!({"mcpServers": {name: {
            "url": url,
            "headers": {"Authorization": format!("Bearer {cursor_token}")},
        }}})),
    );
    let vscode = match token {
        Some(t) => serde_json::json!({"servers": {name: {
            "type": "http", "url": url, "headers": {"Authorization": format!("Bearer {t}")},
        }}}),
        None => serde_json::json!({
            "inputs": [{"type": "promptString", "id": "den-token", "description": "den API token", "password": true}],
            "servers": {name: {
                "type": "http", "url": url, "headers": {"Authorization": "Bearer ${input:den-token}"},
            }},
        }),
    };
    section(McpClient::Vscode, "VS Code (.vscode/mcp.json)", json(vscode));
    section(
        McpClient::Generic,
        "Any MCP client",
        format!(
            "transport: Streamable HTTP (protocol 2026-07-28, or 2024-11-05 to 2025-11-25 with sessions)\n\
             url:       {url}\n\
             header:    Authorization: Bearer {shell_token}"
        ),
    );
    if token.is_none() {
        out.push_str(
            "The token goes in the Authorization header. Export it as DEN_TOKEN (Claude Desktop: put it in \
             \"env\" in place of <your den token>),\nideally one made for the agent: den token create agent --role member --sprites web \
             --expires-in 24h\n(`den mcp --show-token` prints the saved token inline instead.)\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_name_the_endpoint_and_hide_the_token_unless_asked() {
        let text = snippets("http://127.0.0.1:8080/", "den", McpClient::All, None);
        assert!(text.contains(
            "claude mcp add --transport http den http://127.0.0.1:8080/mcp --header \"Authorization: Bearer $DEN_TOKEN\""
        ));
        for title in ["Claude Desktop", "Cursor", "VS Code", "Any MCP client"] {
            assert!(text.contains(title), "{title} missing");
        }
        assert!(text.contains("${env:DEN_TOKEN}") && text.contains("${input:den-token}"));
        let shown = snippets(
            "https://den.example.com",
            "sandbox",
            McpClient::Cursor,
            Some("den_s3cret"),
        );
        assert!(shown.contains("\"Bearer den_s3cret\"") && shown.contains("https://den.example.com/mcp"));
        assert!(!shown.contains("Claude Code") && !shown.contains("DEN_TOKEN"));
    }

    #[test]
    fn json_snippets_are_valid_json() {
        for client in [McpClient::ClaudeDesktop, McpClient::Cursor, McpClient::Vscode] {
            for token in [None, Some("den_x")] {
                let text = snippets("http://h:1", "den", client, token);
                let body: String = text
                    .lines()
                    .skip(1)
                    .take_while(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n");
                serde_json::from_str::<serde_json::Value>(&body)
                    .unwrap_or_else(|e| panic!("{client:?}: {e}: {body}"));
            }
        }
    }
}
