//! Append-only JSON Lines audit log: one line per action, decision and block. Written to the
//! configured file, else to the process log (target `audit`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use jiff::Timestamp;
use serde::Serialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    pub ts: Timestamp,
    pub node: &'a str,
    pub condition: &'a str,
    pub sop: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    pub action: &'a str,
    pub status: &'a str,
    pub message: &'a str,
    pub dry_run: bool,
}

pub struct Audit {
    file: Option<Mutex<File>>,
}

impl Audit {
    pub fn open(path: Option<&Path>) -> Result<Self> {
        let file = match path {
            None => None,
            Some(p) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| Error::Io {
                        path: p.to_owned(),
                        source,
                    })?,
            )),
        };
        Ok(Audit { file })
    }

    pub fn record(&self, rec: &AuditRecord<'_>) {
        let mut line = serde_json::to_string(rec).unwrap_or_default();
        match &self.file {
            Some(f) => {
                line.push('\n');
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f.write_all(line.as_bytes()) {
                    tracing::error!(error = %e, "Audit log write failed");
                }
            }
            None => tracing::info!(target: "audit", record = %line, "Audit"),
        }
    }
}
