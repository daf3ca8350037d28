//! Alertmanager input: the webhook payload (format version 4) and the `/api/v2/alerts` dump the
//! `plan` CLI also accepts, normalised into [`Alert`] and clipped to fixed sizes ([`clip`]); and
//! [`AlertStore`], the in-memory set of open alerts, deduplicated by fingerprint, immune to
//! out-of-order delivery and bounded in bytes ([`store`]).
//!
//! Tolerant reader: Alertmanager evolves on its own, so fields we do not know are ignored; the
//! ones we use (`version`, `status`, `labels`, `startsAt`, `endsAt`, `alerts`) are required and
//! checked. Rejecting an unknown field would answer 400, which Alertmanager never retries: one
//! Alertmanager upgrade would silently stop all remediation.
//!
//! Pure: no I/O here.

pub mod clip;
pub mod store;

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use clip::Clipped;
pub use store::{AlertStore, Applied, ConditionState, Expired, StoreLimits};

/// `firing` or `resolved`, as Alertmanager writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// One alert of a webhook payload. Unknown fields are ignored (tolerant reader, see the module
/// docs); `status`, `labels`, `startsAt` and `endsAt` are required.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
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

/// Alertmanager webhook body, format version 4. Unknown fields are ignored; `version` (checked by
/// [`parse_webhook`]), `status` and `alerts` are required.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
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

/// Bytes one label or annotation costs beyond its key and value: two `String` headers and a share
/// of its `BTreeMap` node.
pub const ENTRY_OVERHEAD: usize = 64;

/// Bytes one alert costs in the [`AlertStore`] beyond its strings: the `Alert` itself, the store's
/// entry (receipt time, sizes), its hash-table slot and its age-index node.
/// `overheads_cover_the_structures` checks it against the real sizes.
pub const ALERT_OVERHEAD: usize = 320;

/// An alert as the healer uses it. Built from Alertmanager's input it is clipped ([`clip`]).
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

    /// What keeping this alert costs the [`AlertStore`], approximately: every string's length plus
    /// fixed overheads ([`ENTRY_OVERHEAD`] per label and annotation, [`ALERT_OVERHEAD`] per
    /// alert). The fingerprint counts three times: the alert, the store's map key and its age
    /// index each hold a copy.
    pub fn bytes(&self) -> usize {
        let map = |m: &BTreeMap<String, String>| -> usize {
            m.iter()
                .map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD)
                .sum()
        };
        ALERT_OVERHEAD + 3 * self.fingerprint.len() + map(&self.labels) + map(&self.annotations)
    }

    /// The healer's alert for a webhook alert, clipped to the limits of [`clip`], and what was
    /// clipped (the webhook counts it).
    pub fn from_webhook(a: WebhookAlert) -> (Alert, Clipped) {
        clipped(
            a.fingerprint,
            a.status,
            a.labels,
            a.annotations,
            a.starts_at,
            non_zero(a.ends_at),
        )
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

/// Clips what Alertmanager sent into an [`Alert`]. The fingerprint is derived from the labels as
/// sent (before clipping) when there is none, so that distinct alerts keep distinct fingerprints.
fn clipped(
    fingerprint: String,
    status: AlertStatus,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_at: Timestamp,
    ends_at: Option<Timestamp>,
) -> (Alert, Clipped) {
    let mut c = Clipped::default();
    let fingerprint = if fingerprint.is_empty() {
        clip::fingerprint_of(&labels)
    } else {
        clip::fingerprint(fingerprint, &mut c)
    };
    let alert = Alert {
        fingerprint,
        status,
        labels: clip::entries(labels, &mut c),
        annotations: clip::entries(annotations, &mut c),
        starts_at,
        ends_at,
    };
    (alert, c)
}

impl From<WebhookAlert> for Alert {
    /// [`Alert::from_webhook`], forgetting what was clipped.
    fn from(a: WebhookAlert) -> Self {
        Alert::from_webhook(a).0
    }
}

/// Parses and validates a webhook body: version must be "4" and every alert must have the fields
/// we use, well-formed; unknown fields are ignored.
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
        let now = Timestamp::now();
        Ok(dump
            .into_iter()
            .map(|a| {
                let ends_at = a.ends_at.and_then(non_zero);
                // v2 states are unprocessed/active/suppressed: all still open. An alert whose
                // endsAt has passed is resolved whatever the dump says.
                let resolved = a.status.as_ref().is_some_and(|s| s.state == "resolved")
                    || ends_at.is_some_and(|e| e <= now);
                let status = if resolved {
                    AlertStatus::Resolved
                } else {
                    AlertStatus::Firing
                };
                clipped(
                    a.fingerprint,
                    status,
                    a.labels,
                    a.annotations,
                    a.starts_at,
                    ends_at,
                )
                .0
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
    fn accepts_unknown_fields_top_level_and_per_alert() {
        // What an Alertmanager upgrade may add: new top-level and per-alert fields, of any type.
        let unknown = SAMPLE
            .replace("\"receiver\"", "\"surprise\": 1, \"nested\": {\"a\": [1, null]}, \"receiver\"")
            .replace(
                "\"fingerprint\": \"abc123\"",
                "\"fingerprint\": \"abc123\", \"silencedBy\": [], \"updatedAt\": \"2026-11-22T10:00:01Z\"",
            );
        assert_ne!(unknown, SAMPLE);
        let p = parse_webhook(unknown.as_bytes()).unwrap();
        assert_eq!(p.alerts.len(), 1);
        assert_eq!(Alert::from(p.alerts[0].clone()).fingerprint, "abc123");
        assert_eq!(parse_alert_file(unknown.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn rejects_wrong_version_missing_required_fields_and_truncated_json() {
        let err = |body: &str| match parse_webhook(body.as_bytes()) {
            Err(Error::Payload { message }) => message,
            other => panic!("accepted {body}: {other:?}"),
        };
        let wrong = SAMPLE.replace("\"version\": \"4\"", "\"version\": \"3\"");
        assert!(err(&wrong).contains("version"));
        // Every field we use is required, and the error names it.
        for (field, without) in [
            ("version", SAMPLE.replace("\"version\": \"4\",", "")),
            ("alerts", SAMPLE.replace("\"alerts\": [", "\"alertz\": [")),
            ("labels", SAMPLE.replacen("\"labels\"", "\"labelz\"", 1)),
            ("startsAt", SAMPLE.replace("\"startsAt\"", "\"startedAt\"")),
            ("endsAt", SAMPLE.replace("\"endsAt\"", "\"endedAt\"")),
            (
                "status",
                SAMPLE.replace("\"status\": \"firing\",\n        \"labels\"", "\"labels\""),
            ),
        ] {
            assert_ne!(without, SAMPLE, "{field}");
            let message = err(&without);
            assert!(
                message.contains(&format!("missing field `{field}`")),
                "{message}"
            );
        }
        let truncated = &SAMPLE.as_bytes()[..SAMPLE.len() / 2];
        assert!(parse_webhook(truncated).is_err());
        let bad_status = SAMPLE.replace(
            "\"status\": \"firing\",\n        \"labels\"",
            "\"status\": \"burning\", \"labels\"",
        );
        assert!(err(&bad_status).contains("burning"));
        let bad_time = SAMPLE.replace("2026-11-22T10:00:00Z", "yesterday");
        assert!(parse_webhook(bad_time.as_bytes()).is_err());
        let bad_label = SAMPLE.replace("\"xid\": \"79\"", "\"xid\": 79");
        assert!(parse_webhook(bad_label.as_bytes()).is_err());
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

    #[test]
    fn v2_dump_is_clipped_too() {
        let big = "x".repeat(5000);
        let dump = format!(
            r#"[{{"labels": {{"node": "n2", "condition": "GpuHung", "big": "{big}"}},
                "startsAt": "2026-11-22T10:00:00Z", "fingerprint": "{big}"}}]"#
        );
        let a = &parse_alert_file(dump.as_bytes()).unwrap()[0];
        assert_eq!(a.labels["big"].len(), clip::MAX_VALUE_BYTES);
        assert_eq!(a.fingerprint.len(), 16);
        assert_eq!(a.node(), Some("n2"));
    }

    #[test]
    fn webhook_alert_is_clipped_and_what_was_clipped_is_said() {
        let mut w = parse_webhook(SAMPLE.as_bytes()).unwrap().alerts.remove(0);
        let (a, c) = Alert::from_webhook(w.clone());
        assert_eq!(c, Clipped::default());
        assert_eq!(a.fingerprint, "abc123");
        w.fingerprint = "f".repeat(5000);
        w.annotations.insert("description".into(), "d".repeat(5000));
        for i in 0..100 {
            w.labels.insert(format!("extra{i:03}"), "v".into());
        }
        let (a, c) = Alert::from_webhook(w);
        assert_eq!(a.labels.len(), clip::MAX_ENTRIES);
        assert_eq!(a.node(), Some("n1"));
        assert_eq!(a.annotations["description"].len(), clip::MAX_VALUE_BYTES);
        assert_eq!(a.fingerprint.len(), 16);
        assert!(c.fingerprint);
        assert_eq!(c.dropped, 106 - clip::MAX_ENTRIES);
        assert_eq!(c.cut, 1);
        assert_eq!(c.fields(), 106 - clip::MAX_ENTRIES + 2);
    }

    #[test]
    fn alert_bytes_counts_strings_and_overheads() {
        let a = Alert::from(parse_webhook(SAMPLE.as_bytes()).unwrap().alerts.remove(0));
        let strings: usize = a
            .labels
            .iter()
            .chain(&a.annotations)
            .map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD)
            .sum();
        assert_eq!(a.bytes(), ALERT_OVERHEAD + 3 * "abc123".len() + strings);
        let mut bigger = a.clone();
        bigger.labels.insert("k".into(), "v".repeat(100));
        assert_eq!(bigger.bytes(), a.bytes() + 1 + 100 + ENTRY_OVERHEAD);
    }

    #[test]
    fn overheads_cover_the_structures() {
        use std::mem::size_of;
        // A String header per key and value; a BTreeMap node holds up to 11 entries plus its own
        // header, so a share of it is well under the remaining 16 bytes per entry.
        assert!(2 * size_of::<String>() + 16 <= ENTRY_OVERHEAD);
        // The alert, the store's map key and index entry (a String header each, the string
        // itself is counted by `bytes`), its receipt time and sizes, and hash/tree slots.
        let entry = size_of::<Alert>() + 2 * size_of::<String>() + 3 * size_of::<Timestamp>();
        assert!(entry + 64 <= ALERT_OVERHEAD, "{entry}");
    }
}
