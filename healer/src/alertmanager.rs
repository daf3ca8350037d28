//! Alertmanager as the source of truth for "is this alert still active?" (I4): the leader asks
//! `GET /api/v2/alerts` before the first disruptive step of a ticket, so a replica's stale memory
//! (a firing alert whose resolution went to the other replica) never starts a disruption.
//! The answer is read as a tolerant reader, bounded in bytes and time.

use std::time::Duration;

use crate::alerts::{Alert, AlertStatus, parse_alert_file};
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
        let filter = format!(
            "node=\"{}\"",
            node.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let alerts = self.active(Some(&filter), MAX_ANSWER_BYTES).await?;
        Ok(alerts.iter().any(|a| {
            a.status == AlertStatus::Firing
                && a.node() == Some(node)
                && catalog.resolve(a.condition(), a.labels.get("xid").map(String::as_str))
                    == Some(condition)
        }))
    }

    /// Every active alert (not silenced, not inhibited), at most `max_bytes` of answer: the
    /// leader's periodic sync, for the alerts the Service delivered to the other replica.
    pub async fn active(&self, filter: Option<&str>, max_bytes: usize) -> Result<Vec<Alert>> {
        let err = |message: String| Error::Alertmanager { message };
        let url = format!("{}/api/v2/alerts", self.base);
        let mut query = vec![
            ("active", "true"),
            ("silenced", "false"),
            ("inhibited", "false"),
            ("unprocessed", "true"),
        ];
        if let Some(f) = filter {
            query.push(("filter", f));
        }
        let mut resp = self
            .http
            .get(&url)
            .query(&query)
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
            if body.len() + chunk.len() > max_bytes {
                return Err(err(format!("GET {url}: answer over {max_bytes} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        parse_alert_file(&body).map_err(|e| err(format!("GET {url}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::extract::RawQuery;
    use axum::routing::get;

    /// A stand-in Alertmanager answering `body` (and recording the query) on a free port.
    async fn serve(body: &'static str) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s = seen.clone();
        let app = Router::new().route(
            "/api/v2/alerts",
            get(move |RawQuery(q): RawQuery| {
                *s.lock().unwrap() = q.unwrap_or_default();
                async move { ([("content-type", "application/json")], body) }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        (url, seen)
    }

    const ACTIVE: &str = r#"[{"labels": {"node": "n1", "condition": "GpuHung"}, "annotations": {},
        "startsAt": "2026-11-22T10:00:00Z", "endsAt": "2099-01-01T00:00:00Z", "fingerprint": "f",
        "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}, "receivers": [], "updatedAt": "2026-11-22T10:00:00Z", "generatorURL": "", "new": 1}]"#;

    #[tokio::test]
    async fn confirms_only_an_active_alert_of_that_condition_on_that_node() {
        let cat = Catalog::embedded().unwrap();
        let (url, seen) = serve(ACTIVE).await;
        let am = Alertmanager::new(&url, Duration::from_secs(2)).unwrap();
        assert!(am.confirms(&cat, "n1", "GpuHung").await.unwrap());
        let q = seen.lock().unwrap().clone();
        assert!(
            q.contains("silenced=false") && q.contains("inhibited=false"),
            "{q}"
        );
        assert!(q.contains("filter=node%3D%22n1%22"), "{q}");
        assert!(!am.confirms(&cat, "n1", "GpuFellOffBus").await.unwrap());
        assert!(!am.confirms(&cat, "n2", "GpuHung").await.unwrap());
        let (url, _) = serve("[]").await;
        let am = Alertmanager::new(&url, Duration::from_secs(2)).unwrap();
        assert!(!am.confirms(&cat, "n1", "GpuHung").await.unwrap());
    }

    #[tokio::test]
    async fn garbage_oversized_or_unreachable_is_an_error_never_a_yes() {
        let cat = Catalog::embedded().unwrap();
        let (url, _) = serve("{not json").await;
        let am = Alertmanager::new(&url, Duration::from_secs(2)).unwrap();
        assert!(am.confirms(&cat, "n1", "GpuHung").await.is_err());
        let (url, _) = serve(ACTIVE).await;
        let am = Alertmanager::new(&url, Duration::from_secs(2)).unwrap();
        let e = am.active(None, 16).await.unwrap_err().to_string();
        assert!(e.contains("over 16 bytes"), "{e}");
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let am = Alertmanager::new(&dead, Duration::from_secs(1)).unwrap();
        assert!(am.confirms(&cat, "n1", "GpuHung").await.is_err());
        assert!(Alertmanager::new("ftp://x", Duration::from_secs(1)).is_err());
    }
}
