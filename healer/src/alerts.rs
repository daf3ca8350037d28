//! Alertmanager input: the webhook payload (format version 4) and the `/api/v2/alerts` dump the
//! `plan` CLI also accepts, normalised into [`Alert`]; and [`AlertStore`], the in-memory set of
//! open alerts, deduplicated by fingerprint and immune to out-of-order delivery.
//!
//! Pure: no I/O here.

use std::collections::{BTreeMap, HashMap};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `firing` or `resolved`, as Alertmanager writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// One alert of a webhook payload. Unknown fields are rejected: the payload format is versioned
/// and a field we do not know means we are not reading what we think we are.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookAlert {
    pub status: AlertStatus,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Timestamp,
    /// `0001-01-01T00:00:00Z` while firing.
    pub ends_at: Timestamp,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

/// Alertmanager webhook body, format version 4.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookPayload {
    pub version: String,
    #[serde(default)]
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    pub status: AlertStatus,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_annotations: BTreeMap<String, String>,
    #[serde(default, rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<WebhookAlert>,
}

/// One entry of Alertmanager's `GET /api/v2/alerts`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Alert {
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    starts_at: Timestamp,
    #[serde(default)]
    ends_at: Option<Timestamp>,
    #[serde(default)]
    fingerprint: String,
    #[serde(default)]
    status: Option<V2Status>,
}

#[derive(Debug, Clone, Deserialize)]
struct V2Status {
    state: String,
}

/// An alert as the healer uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub fingerprint: String,
    pub status: AlertStatus,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: Timestamp,
    pub ends_at: Option<Timestamp>,
}

impl Alert {
    pub fn node(&self) -> Option<&str> {
        self.labels
            .get("node")
            .map(String::as_str)
            .filter(|n| !n.is_empty())
    }

    pub fn condition(&self) -> Option<&str> {
        self.labels
            .get("condition")
            .map(String::as_str)
            .filter(|c| !c.is_empty())
    }

    /// Human-readable reason for a ticket: the `summary` annotation, else the labels that matter.
    pub fn reason(&self) -> String {
        if let Some(s) = self.annotations.get("summary") {
            return s.clone();
        }
        let mut parts = Vec::new();
        for k in ["xid", "gpu", "device"] {
            if let Some(v) = self.labels.get(k) {
                parts.push(format!("{k} {v}"));
            }
        }
        if parts.is_empty() {
            self.condition().unwrap_or("unknown").to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Alertmanager's "zero" time (`0001-01-01T00:00:00Z`) means "not ended".
fn non_zero(ts: Timestamp) -> Option<Timestamp> {
    if ts.as_second() <= -62_000_000_000 {
        None
    } else {
        Some(ts)
    }
}

/// A stable fingerprint for alerts that come without one (hand-written plan input).
fn fingerprint_of(labels: &BTreeMap<String, String>) -> String {
    // FNV-1a: stable across runs and platforms, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

impl From<WebhookAlert> for Alert {
    fn from(a: WebhookAlert) -> Self {
        let fingerprint = if a.fingerprint.is_empty() {
            fingerprint_of(&a.labels)
        } else {
            a.fingerprint
        };
        Alert {
            fingerprint,
            status: a.status,
            labels: a.labels,
            annotations: a.annotations,
            starts_at: a.starts_at,
            ends_at: non_zero(a.ends_at),
        }
    }
}

/// Parses and validates a webhook body. Strict: version must be "4" and every alert well-formed.
pub fn parse_webhook(body: &[u8]) -> Result<WebhookPayload> {
    let payload: WebhookPayload = serde_json::from_slice(body).map_err(|e| Error::Payload {
        message: e.to_string(),
    })?;
    if payload.version != "4" {
        return Err(Error::Payload {
            message: format!(
                "unsupported webhook version {:?}, expected \"4\"",
                payload.version
            ),
        });
    }
    Ok(payload)
}

/// Reads either a webhook payload (object) or an `/api/v2/alerts` dump (array) for `plan`.
pub fn parse_alert_file(body: &[u8]) -> Result<Vec<Alert>> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| Error::Payload {
        message: e.to_string(),
    })?;
    if value.is_array() {
        let dump: Vec<V2Alert> = serde_json::from_value(value).map_err(|e| Error::Payload {
            message: format!("not an /api/v2/alerts dump: {e}"),
        })?;
        Ok(dump
            .into_iter()
            .map(|a| {
                let ends_at = a.ends_at.and_then(non_zero);
                // v2 states are unprocessed/active/suppressed: all still open. An alert whose
                // endsAt has passed is resolved whatever the dump says.
                let resolved = a.status.as_ref().is_some_and(|s| s.state == "resolved")
                    || ends_at.is_some_and(|e| e <= Timestamp::now());
                let fingerprint = if a.fingerprint.is_empty() {
                    fingerprint_of(&a.labels)
                } else {
                    a.fingerprint
                };
                Alert {
                    fingerprint,
                    status: if resolved {
                        AlertStatus::Resolved
                    } else {
                        AlertStatus::Firing
                    },
                    labels: a.labels,
                    annotations: a.annotations,
                    starts_at: a.starts_at,
                    ends_at,
                }
            })
            .collect())
    } else {
        let body = serde_json::to_vec(&value).map_err(|e| Error::Payload {
            message: e.to_string(),
        })?;
        Ok(parse_webhook(&body)?
            .alerts
            .into_iter()
            .map(Alert::from)
            .collect())
    }
}

/// See [`AlertStore::condition_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionState {
    Firing,
    Resolved,
    Unknown,
}

/// What [`AlertStore::apply`] did with one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// New or changed state (a new firing occurrence, or a resolution).
    Changed,
    /// Same state as already known: a re-send or a duplicate.
    Duplicate,
    /// Older than what we know (out-of-order delivery): ignored.
    Stale,
}

/// Open alerts by fingerprint. Ordering rule, so that duplicated and out-of-order firing/resolved
/// pairs converge: a later `startsAt` is a new occurrence and wins; for the same `startsAt`,
/// `resolved` wins over `firing` (resolution is final for that occurrence).
#[derive(Debug, Default)]
pub struct AlertStore {
    alerts: HashMap<String, Alert>,
    /// When each entry was last changed here (not Alertmanager's times, which may be old).
    received: HashMap<String, Timestamp>,
    max_entries: usize,
}

impl AlertStore {
    pub fn new(max_entries: usize) -> Self {
        AlertStore {
            alerts: HashMap::new(),
            received: HashMap::new(),
            max_entries,
        }
    }

    pub fn apply(&mut self, alert: Alert) -> Applied {
        match self.alerts.get(&alert.fingerprint) {
            Some(known) => {
                if alert.starts_at < known.starts_at {
                    return Applied::Stale;
                }
                if alert.starts_at == known.starts_at {
                    match (known.status, alert.status) {
                        (AlertStatus::Resolved, AlertStatus::Firing) => return Applied::Stale,
                        (a, b) if a == b => return Applied::Duplicate,
                        _ => {}
                    }
                }
            }
            None => {
                if self.alerts.len() >= self.max_entries {
                    self.evict_resolved();
                    if self.alerts.len() >= self.max_entries {
                        return Applied::Stale;
                    }
                }
            }
        }
        self.received
            .insert(alert.fingerprint.clone(), Timestamp::now());
        self.alerts.insert(alert.fingerprint.clone(), alert);
        Applied::Changed
    }

    fn evict_resolved(&mut self) {
        self.alerts.retain(|_, a| a.status == AlertStatus::Firing);
        let alerts = &self.alerts;
        self.received.retain(|fp, _| alerts.contains_key(fp));
    }

    /// Forgets resolved alerts received before `before`; they only served to reject stale
    /// re-deliveries and to tell "resolved" from "never heard of".
    pub fn gc(&mut self, before: Timestamp) {
        let received = &self.received;
        self.alerts.retain(|fp, a| {
            a.status == AlertStatus::Firing || received.get(fp).is_none_or(|r| *r >= before)
        });
        let alerts = &self.alerts;
        self.received.retain(|fp, _| alerts.contains_key(fp));
    }

    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.alerts
            .values()
            .filter(|a| a.status == AlertStatus::Firing)
    }

    /// Is `condition` firing on `node`?
    pub fn is_firing(&self, node: &str, condition: &str) -> bool {
        self.firing()
            .any(|a| a.node() == Some(node) && a.condition() == Some(condition))
    }

    /// State of the alerts on `node` for which `is_condition` holds: any firing → Firing; else any
    /// resolved → Resolved; else Unknown (nothing heard, e.g. just after a restart).
    pub fn condition_state(
        &self,
        node: &str,
        is_condition: impl Fn(&Alert) -> bool,
    ) -> ConditionState {
        let mut state = ConditionState::Unknown;
        for a in self.alerts.values() {
            if a.node() == Some(node) && is_condition(a) {
                match a.status {
                    AlertStatus::Firing => return ConditionState::Firing,
                    AlertStatus::Resolved => state = ConditionState::Resolved,
                }
            }
        }
        state
    }

    pub fn len(&self) -> usize {
        self.alerts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }

    pub fn snapshot(&self) -> Vec<Alert> {
        self.alerts.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"{
      "version": "4", "groupKey": "{}:{node=\"n1\"}", "truncatedAlerts": 0, "status": "firing",
      "receiver": "ark-healer", "groupLabels": {"node": "n1"}, "commonLabels": {},
      "commonAnnotations": {}, "externalURL": "http://am:9093",
      "alerts": [{"status": "firing",
        "labels": {"alertname": "GpuFellOffBus", "node": "n1", "condition": "GpuFellOffBus", "severity": "critical", "xid": "79", "gpu": "3"},
        "annotations": {"summary": "XID 79 on gpu 3"},
        "startsAt": "2026-11-22T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prom/graph", "fingerprint": "abc123"}]
    }"#;

    #[test]
    fn parses_v4_payload_with_zero_ends_at() {
        let p = parse_webhook(SAMPLE.as_bytes()).unwrap();
        assert_eq!(p.alerts.len(), 1);
        let a = Alert::from(p.alerts[0].clone());
        assert_eq!(a.ends_at, None);
        assert_eq!(a.node(), Some("n1"));
        assert_eq!(a.condition(), Some("GpuFellOffBus"));
        assert_eq!(a.reason(), "XID 79 on gpu 3");
    }

    #[test]
    fn rejects_wrong_version_unknown_fields_and_truncated_json() {
        let wrong = SAMPLE.replace("\"version\": \"4\"", "\"version\": \"3\"");
        assert!(matches!(
            parse_webhook(wrong.as_bytes()),
            Err(Error::Payload { .. })
        ));
        let unknown = SAMPLE.replace("\"receiver\"", "\"surprise\": 1, \"receiver\"");
        assert!(parse_webhook(unknown.as_bytes()).is_err());
        let truncated = &SAMPLE.as_bytes()[..SAMPLE.len() / 2];
        assert!(parse_webhook(truncated).is_err());
        let bad_status = SAMPLE.replace(
            "\"status\": \"firing\",\n        \"labels\"",
            "\"status\": \"burning\", \"labels\"",
        );
        assert!(parse_webhook(bad_status.as_bytes()).is_err());
        let bad_time = SAMPLE.replace("2026-11-22T10:00:00Z", "yesterday");
        assert!(parse_webhook(bad_time.as_bytes()).is_err());
    }

    #[test]
    fn reads_v2_dump() {
        let dump = r#"[{"labels": {"node": "n2", "condition": "GpuHung"}, "annotations": {},
            "startsAt": "2026-11-22T10:00:00Z", "endsAt": "2099-11-22T10:05:00Z",
            "updatedAt": "2026-11-22T10:00:00Z", "fingerprint": "f1",
            "status": {"state": "active", "silencedBy": [], "inhibitedBy": []},
            "receivers": [{"name": "x"}], "generatorURL": ""}]"#;
        let alerts = parse_alert_file(dump.as_bytes()).unwrap();
        assert_eq!(alerts[0].status, AlertStatus::Firing);
        assert_eq!(alerts[0].node(), Some("n2"));
        let alerts = parse_alert_file(SAMPLE.as_bytes()).unwrap();
        assert_eq!(alerts[0].fingerprint, "abc123");
    }

    fn alert(fp: &str, status: AlertStatus, starts: &str) -> Alert {
        Alert {
            fingerprint: fp.into(),
            status,
            labels: [
                ("node".to_owned(), "n1".to_owned()),
                ("condition".to_owned(), "GpuHung".to_owned()),
            ]
            .into(),
            annotations: BTreeMap::new(),
            starts_at: starts.parse().unwrap(),
            ends_at: None,
        }
    }

    #[test]
    fn store_dedups_and_ignores_out_of_order() {
        let mut s = AlertStore::new(100);
        let t0 = "2026-11-22T10:00:00Z";
        assert_eq!(
            s.apply(alert("a", AlertStatus::Firing, t0)),
            Applied::Changed
        );
        assert_eq!(
            s.apply(alert("a", AlertStatus::Firing, t0)),
            Applied::Duplicate
        );
        assert!(s.is_firing("n1", "GpuHung"));
        assert_eq!(
            s.apply(alert("a", AlertStatus::Resolved, t0)),
            Applied::Changed
        );
        // The firing notification of the same occurrence arriving late must not reopen it.
        assert_eq!(s.apply(alert("a", AlertStatus::Firing, t0)), Applied::Stale);
        assert!(!s.is_firing("n1", "GpuHung"));
        // A new occurrence (later startsAt) reopens.
        let t1 = "2026-11-22T11:00:00Z";
        assert_eq!(
            s.apply(alert("a", AlertStatus::Firing, t1)),
            Applied::Changed
        );
        assert!(s.is_firing("n1", "GpuHung"));
        // A resolution of the old occurrence arriving late is stale.
        assert_eq!(
            s.apply(alert("a", AlertStatus::Resolved, t0)),
            Applied::Stale
        );
        assert!(s.is_firing("n1", "GpuHung"));
    }

    #[test]
    fn store_is_bounded() {
        let mut s = AlertStore::new(2);
        s.apply(alert("a", AlertStatus::Firing, "2026-11-22T10:00:00Z"));
        s.apply(alert("b", AlertStatus::Resolved, "2026-11-22T10:00:00Z"));
        assert_eq!(
            s.apply(alert("c", AlertStatus::Firing, "2026-11-22T10:00:00Z")),
            Applied::Changed
        );
        assert_eq!(
            s.apply(alert("d", AlertStatus::Firing, "2026-11-22T10:00:00Z")),
            Applied::Stale
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn gc_uses_receipt_time_not_alert_time() {
        let mut s = AlertStore::new(10);
        // Alertmanager times far in the past: still kept, we just received it.
        s.apply(alert("a", AlertStatus::Resolved, "2020-01-01T00:00:00Z"));
        s.gc(Timestamp::now() - jiff::SignedDuration::from_secs(3600));
        assert_eq!(s.len(), 1);
        s.gc(Timestamp::now() + jiff::SignedDuration::from_secs(1));
        assert_eq!(s.len(), 0);
    }
}
