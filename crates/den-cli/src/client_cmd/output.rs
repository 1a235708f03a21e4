//! Shared output helpers: JSON for scripts, tables and spinners for people.

use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use comfy_table::{ContentArrangement, Table, presets};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub fn print_json(v: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A borderless table, like `kubectl get`.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| h.to_uppercase()));
    for c in t.column_iter_mut() {
        c.set_padding((0, 3));
    }
    t
}

/// Print without the padding comfy-table leaves at line ends (it trips
/// `diff` and copy-paste).
pub fn print_table(t: &Table) {
    for line in t.to_string().lines() {
        println!("{}", line.trim_end());
    }
}

/// A spinner on stderr; indicatif draws nothing when stderr is not a terminal,
/// so scripts see only the final lines.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

pub fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// `3m ago` from an RFC 3339 time; `-` when there is none.
pub fn ago(t: Option<&str>) -> String {
    let Some(t) = t else { return "-".into() };
    let Ok(then) = humantime::parse_rfc3339_weak(t) else {
        return t.to_string();
    };
    let s = SystemTime::now()
        .duration_since(then)
        .unwrap_or_default()
        .as_secs();
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_formats_coarse_units() {
        assert_eq!(ago(None), "-");
        let t = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(7200)).to_string();
        assert_eq!(ago(Some(&t)), "2h ago");
        assert_eq!(ago(Some("garbage")), "garbage");
    }
}
