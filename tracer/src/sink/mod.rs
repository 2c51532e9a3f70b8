//! Sinks: where tracked transitions end up (printers now; histograms, leak reports and the
//! metrics exporter read from the same tracker).

pub mod watch;

/// Output format shared by the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Columns for people.
    Text,
    /// One JSON object per line, for jq and log shippers.
    Json,
}
