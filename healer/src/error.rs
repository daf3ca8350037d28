//! The crate's one error type. `anyhow` stays in `main` and the CLI glue.

use std::path::PathBuf;

/// Every failure the healer's library can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid alert payload: {message}")]
    Payload { message: String },

    #[error("invalid condition catalog {origin}: {message}")]
    Catalog { origin: String, message: String },

    #[error("ticket annotation on node {node} is not valid: {message}")]
    Ticket { node: String, message: String },

    #[error("ticket for node {node} is {size} bytes, over the {limit}-byte annotation limit")]
    TicketTooLarge {
        node: String,
        size: usize,
        limit: usize,
    },

    #[error("configuration: {message}")]
    Config { message: String },

    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Kubernetes {op} failed: {source}")]
    Kube {
        op: String,
        #[source]
        source: Box<kube::Error>,
    },

    #[error("Kubernetes {op} gave up after {attempts} attempts: {last}")]
    KubeRetriesExhausted {
        op: String,
        attempts: u32,
        last: String,
    },

    #[error("Kubernetes {op} not sent: this replica does not hold the Lease with margin")]
    NotLeader { op: String },

    #[error("not acting this pass: {message}")]
    ViewRefused {
        reason: &'static str,
        message: String,
    },

    #[error("Alertmanager: {message}")]
    Alertmanager { message: String },

    /// `ark-healer why`: Prometheus could not be asked, or its answer could not be used.
    #[error("Prometheus at {url}: {message}")]
    Prometheus { url: String, message: String },

    /// `ark-healer why`: no series of Prometheus names this training job.
    #[error("job {job_id:?} is unknown to Prometheus at {url}: {message}")]
    UnknownJob {
        job_id: String,
        url: String,
        message: String,
    },

    #[error("job template {template}: {message}")]
    JobTemplate { template: String, message: String },

    #[error("metrics registry")]
    Metrics {
        #[source]
        source: prometheus::Error,
    },
}

impl Error {
    pub fn kube(op: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            op: op.into(),
            source: Box::new(source),
        }
    }

    /// HTTP status of an API error returned by the server, if that is what this is.
    pub fn api_status(&self) -> Option<u16> {
        match self {
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
