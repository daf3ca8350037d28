//! The crate's error type.

use std::path::PathBuf;

/// Errors of the exporter library. `anyhow` is only used by the CLI layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules in {path}: {detail}")]
    Rules { path: PathBuf, detail: String },
    #[error("configuration: {detail}")]
    Config { detail: String },
    #[error("metrics registry")]
    Metrics {
        #[source]
        source: prometheus::Error,
    },
    #[error("starting probe {probe}")]
    Spawn {
        probe: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<prometheus::Error> for Error {
    fn from(source: prometheus::Error) -> Self {
        Error::Metrics { source }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
