//! Alertmanager as the source of truth for "is this alert still active?" (I4): the leader asks
//! `GET /api/v2/alerts` before the first disruptive step of a ticket, so a replica's stale memory
//! (a firing alert whose resolution went to the other replica) never starts a disruption.
//! The answer is read as a tolerant reader, bounded in bytes and time.

use std::time::Duration;

use crate::alerts::{AlertStatus, parse_alert_file};
use crate::catalog::Catalog;
use crate::{Error, Result};

/// Largest `/api/v2/alerts` answer read for one node (a node has a handful of alerts).
const MAX_ANSWER_BYTES: usize = 4 << 20;

#[derive(Clone)]
pub struct Alertmanager {
    base: String,
    http: reqwest::Client,
}

impl Alertmanager {
    pub fn new(url: &str, timeout: Duration) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Config {
                message: format!("alertmanager.url {url:?} must start with http:// or https://"),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::Config {
                message: format!("alertmanager client: {e}"),
            })?;
        Ok(Alertmanager { base, http })
    }

    /// Is an alert for `condition` on `node` active in Alertmanager now (not silenced, not
    /// inhibited)? An error means "cannot confirm": the caller must not act.
    pub async fn confirms(&self, catalog: &Catalog, node: &str, condition: &str) -> Result<bool> {
        let err = |message: String| Error::Alertmanager { message };
        let filter = format!(
            "node=\"{}\"",
            node.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let url = format!("{}/api/v2/alerts", self.base);
        let mut resp = self
            .http
            .get(&url)
            .query(&[
                ("active", "true"),
                ("silenced", "false"),
                ("inhibited", "false"),
                ("unprocessed", "true"),
                ("filter", filter.as_str()),
            ])
            .send()
            .await
            .map_err(|e| err(format!("GET {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(err(format!("GET {url}: HTTP {}", resp.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| err(format!("GET {url}: {e}")))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(err(format!(
                    "GET {url}: answer over {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let alerts = parse_alert_file(&body).map_err(|e| err(format!("GET {url}: {e}")))?;
        Ok(alerts.iter().any(|a| {
            a.status == AlertStatus::Firing
                && a.node() == Some(node)
                && catalog.resolve(a.condition(), a.labels.get("xid").map(String::as_str))
                    == Some(condition)
        }))
    }
}
