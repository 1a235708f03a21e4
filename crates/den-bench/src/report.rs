//! Rendering results: a terminal table and the same table as Markdown.

use std::fmt;
use std::time::Duration;

use comfy_table::{Cell, CellAlignment, Table, presets};
use serde::Serialize;

use crate::baselines::NativeExt4;
use crate::workloads::{RepResult, Summary, TargetResult};

/// Percentiles of a set of latency samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// p50/p99/max of `samples` by the nearest-rank method (every reported value
/// is one that was actually observed). `None` for no samples.
pub fn latency(samples: &[Duration]) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = |p: f64| {
        let r = (p / 100.0 * sorted.len() as f64).ceil() as usize;
        sorted[r.clamp(1, sorted.len()) - 1]
    };
    Some(Latency {
        count: sorted.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// One row of the report.
struct Metric {
    label: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    decimals: usize,
    summary: fn(&Summary) -> f64,
    rep: fn(&RepResult) -> f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

const METRICS: &[Metric] = &[
    Metric {
        label: "Sequential write, 1 MiB blocks + fsync",
        unit: "MB/s",
        higher_is_better: true,
        decimals: 1,
        summary: |s| s.seq_write_mb_s,
        rep: |r| r.seq_write.mb_per_s,
    },
    Metric {
        label: "Sequential read, cold cache",
        unit: "MB/s",
        higher_is_better: true,
        decimals: 1,
        summary: |s| s.seq_read_mb_s,
        rep: |r| r.seq_read.mb_per_s,
    },
    Metric {
        label: "Random 4 KiB write + fdatasync",
        unit: "IOPS",
        higher_is_better: true,
        decimals: 0,
        summary: |s| s.rand_write_iops,
        rep: |r| r.rand_write.iops,
    },
    Metric {
        label: "Random 4 KiB write + fdatasync, p50",
        unit: "ms",
        higher_is_better: false,
        decimals: 2,
        summary: |s| ms(s.rand_write_p50),
        rep: |r| ms(r.rand_write.p50),
    },
    Metric {
        label: "Random 4 KiB write + fdatasync, p99",
        unit: "ms",
        higher_is_better: false,
        decimals: 2,
        summary: |s| ms(s.rand_write_p99),
        rep: |r| ms(r.rand_write.p99),
    },
    Metric {
        label: "Small-file create, 4 KiB each + syncfs",
        unit: "files/s",
        higher_is_better: true,
        decimals: 0,
        summary: |s| s.small_files_per_s,
        rep: |r| r.small_files.files_per_s,
    },
];

/// Results for several targets, rendered with one row per workload, one
/// column per target, and a `target / baseline` ratio column for each
/// non-baseline target.
pub struct Report {
    results: Vec<TargetResult>,
    summaries: Vec<Summary>,
    baseline: String,
    show_range: bool,
}

impl Report {
    /// A report whose ratio columns compare against [`NativeExt4::NAME`].
    pub fn new(results: Vec<TargetResult>) -> Self {
        let summaries = results.iter().map(TargetResult::summary).collect();
        Self {
            results,
            summaries,
            baseline: NativeExt4::NAME.to_owned(),
            show_range: false,
        }
    }

    /// Compare against the target with this name instead. If no target has
    /// it, the report has no ratio columns.
    pub fn with_baseline(mut self, name: impl Into<String>) -> Self {
        self.baseline = name.into();
        self
    }

    /// Show `median (min–max)` over repetitions in each cell, so readers can
    /// see how noisy a figure was.
    pub fn with_range(mut self, on: bool) -> Self {
        self.show_range = on;
        self
    }

    pub fn results(&self) -> &[TargetResult] {
        &self.results
    }

    pub fn summaries(&self) -> impl Iterator<Item = (&str, &Summary)> {
        self.results.iter().map(|r| r.name.as_str()).zip(&self.summaries)
    }

    fn baseline_index(&self) -> Option<usize> {
        self.results.iter().position(|r| r.name == self.baseline)
    }

    /// Header row and body rows as plain strings; both renderers use this so
    /// the terminal and Markdown tables cannot drift apart.
    fn grid(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let base = self.baseline_index();
        let others: Vec<usize> = (0..self.results.len()).filter(|&i| Some(i) != base).collect();

        let mut header = vec!["Workload".to_owned(), "Unit".to_owned()];
        header.extend(self.results.iter().map(|r| r.name.clone()));
        if let Some(b) = base {
            header.extend(
                others
                    .iter()
                    .map(|&i| format!("{} / {}", self.results[i].name, self.results[b].name)),
            );
        }

        let rows = METRICS
            .iter()
            .map(|m| {
                let arrow = if m.higher_is_better { "↑" } else { "↓" };
                let mut row = vec![m.label.to_owned(), format!("{} {arrow}", m.unit)];
                for (r, s) in self.results.iter().zip(&self.summaries) {
                    row.push(self.cell(m, r, s));
                }
                if let Some(b) = base {
                    let bv = (m.summary)(&self.summaries[b]);
                    for &i in &others {
                        row.push(ratio((m.summary)(&self.summaries[i]), bv));
                    }
                }
                row
            })
            .collect();
        (header, rows)
    }

    fn cell(&self, m: &Metric, r: &TargetResult, s: &Summary) -> String {
        let v = num((m.summary)(s), m.decimals);
        if !self.show_range || r.reps.len() < 2 {
            return v;
        }
        let per_rep: Vec<f64> = r.reps.iter().map(m.rep).collect();
        let lo = per_rep.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_rep.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{v} ({}–{})", num(lo, m.decimals), num(hi, m.decimals))
    }

    fn text_table(&self) -> TextTable {
        let (header, rows) = self.grid();
        // Workload and unit columns are labels.
        TextTable {
            header,
            rows,
            left: 2,
        }
    }

    /// The report as a terminal table.
    pub fn table(&self) -> Table {
        self.text_table().table()
    }

    /// The report as a GitHub-flavoured Markdown table, numbers
    /// right-aligned, ending in a newline.
    pub fn markdown(&self) -> String {
        self.text_table().markdown()
    }
}

/// A table with a header row; the first `left` columns are left-aligned
/// labels, the rest right-aligned numbers.
#[derive(Debug, Clone, Serialize)]
pub struct TextTable {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub left: usize,
}

impl TextTable {
    pub fn new(header: &[&str], left: usize) -> Self {
        Self {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
            left,
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn table(&self) -> Table {
        let mut table = Table::new();
        table.load_style(presets::UTF8_FULL_CONDENSED);
        table.set_header(self.header.clone());
        for row in &self.rows {
            table.add_row(row.iter().enumerate().map(|(i, text)| {
                let align = if i < self.left {
                    CellAlignment::Left
                } else {
                    CellAlignment::Right
                };
                Cell::new(text).set_alignment(align)
            }));
        }
        table
    }

    pub fn markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| esc(c)).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut out = line(&self.header);
        let seps: Vec<String> = (0..self.header.len())
            .map(|i| if i < self.left { ":---" } else { "---:" }.to_owned())
            .collect();
        out.push_str(&line(&seps));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.table())
    }
}

fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_owned()
    }
}

fn ratio(v: f64, base: f64) -> String {
    let r = v / base;
    if r.is_finite() {
        format!("{r:.2}×")
    } else {
        "n/a".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn latency_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(d).collect();
        let l = latency(&samples).unwrap();
        assert_eq!((l.p50, l.p99, l.max, l.count), (d(50), d(99), d(100), 100));

        let l = latency(&[d(7)]).unwrap();
        assert_eq!((l.p50, l.p99), (d(7), d(7)));

        // Unsorted input, small count: p99 of 3 samples is the largest.
        let l = latency(&[d(3), d(1), d(2)]).unwrap();
        assert_eq!((l.p50, l.p99), (d(2), d(3)));

        assert!(latency(&[]).is_none());
    }

    #[test]
    fn ratio_formatting() {
        assert_eq!(ratio(50.0, 100.0), "0.50×");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        assert_eq!(num(f64::NAN, 1), "n/a");
    }
}
