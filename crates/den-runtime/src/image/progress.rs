//! Where build progress goes: a terminal spinner, the log, or a callback.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Something that happened while [`ensure`](super::BaseImage::ensure) ran.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum BuildEvent<'a> {
    /// The image was already built; nothing else will follow.
    Cached { version: &'a str },
    /// Another thread or process is building this version; waiting for its lock.
    WaitingForLock { version: &'a str },
    /// Building starts (after the lock was taken and the cache checked again).
    Started { version: &'a str, kind: &'a str },
    /// One line of builder output (mmdebstrap, apt, dpkg, hooks), without the newline.
    Output { line: &'a str },
    /// The image was built and published under its version.
    Finished {
        version: &'a str,
        elapsed: Duration,
        size_bytes: u64,
    },
    /// Building failed; nothing was published.
    Failed { version: &'a str, error: &'a str },
}

/// A sink for [`BuildEvent`]s. Any `Fn(&BuildEvent)` is one, so a server can
/// pass a closure that logs; [`SpinnerProgress`] draws a terminal spinner.
pub trait BuildProgress {
    /// Called for every event, on the thread that called `ensure`.
    fn event(&self, event: &BuildEvent<'_>);
}

impl<F: Fn(&BuildEvent<'_>)> BuildProgress for F {
    fn event(&self, event: &BuildEvent<'_>) {
        self(event)
    }
}

/// Discards every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl BuildProgress for NoProgress {
    fn event(&self, _: &BuildEvent<'_>) {}
}

/// Logs events with `tracing`: output lines at `debug`, the rest at `info`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogProgress;

impl BuildProgress for LogProgress {
    fn event(&self, event: &BuildEvent<'_>) {
        match *event {
            BuildEvent::Output { line } => tracing::debug!(target: "den::image", "{line}"),
            BuildEvent::Cached { version } => tracing::info!(version, "base image cached"),
            BuildEvent::WaitingForLock { version } => {
                tracing::info!(version, "waiting for another builder of this image")
            }
            BuildEvent::Started { version, kind } => tracing::info!(version, kind, "building base image"),
            BuildEvent::Finished {
                version,
                elapsed,
                size_bytes,
            } => tracing::info!(
                version,
                seconds = elapsed.as_secs_f64(),
                size_mb = size_bytes / 1_000_000,
                "base image built"
            ),
            BuildEvent::Failed { version, error } => {
                tracing::warn!(version, error, "base image build failed")
            }
        }
    }
}

/// An `indicatif` spinner with the elapsed time and the latest output line.
/// Draws nothing when stderr is not a terminal.
#[derive(Debug, Clone)]
pub struct SpinnerProgress {
    bar: ProgressBar,
}

impl Default for SpinnerProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl SpinnerProgress {
    /// A spinner on stderr, ticking every 120 ms.
    pub fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner:.green} [{elapsed_precise}] {prefix:.bold} {wide_msg}")
                .expect("static template is valid"),
        );
        bar.set_prefix("base image");
        bar.enable_steady_tick(Duration::from_millis(120));
        SpinnerProgress { bar }
    }

    /// The underlying bar, e.g. to add it to a `MultiProgress`.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}

impl BuildProgress for SpinnerProgress {
    fn event(&self, event: &BuildEvent<'_>) {
        match *event {
            BuildEvent::Output { line } => self.bar.set_message(line.to_string()),
            BuildEvent::Cached { version } => self.bar.finish_with_message(format!("{version} (cached)")),
            BuildEvent::WaitingForLock { version } => self
                .bar
                .set_message(format!("{version}: waiting for another builder")),
            BuildEvent::Started { version, kind } => {
                self.bar.set_prefix(format!("building {kind} image {version}"))
            }
            BuildEvent::Finished {
                version,
                elapsed,
                size_bytes,
            } => self.bar.finish_with_message(format!(
                "{version} built in {:.1} s, {} MB",
                elapsed.as_secs_f64(),
                size_bytes / 1_000_000
            )),
            BuildEvent::Failed { version, error } => self
                .bar
                .abandon_with_message(format!("{version} failed: {error}")),
        }
    }
}
