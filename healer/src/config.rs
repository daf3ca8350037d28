//! What the healer does: figment layers defaults → TOML file → `ARK_*` environment
//! (`ARK_BUDGET__MAX_UNSCHEDULABLE=3`; `__` separates nesting). How the process runs (listen
//! address, token file, kubeconfig) are CLI flags, not here.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// YAML overriding/extending the embedded condition catalog.
    pub catalog_file: Option<PathBuf>,
    /// Global dry-run: plan, record in the audit log, never mutate the cluster.
    pub dry_run: bool,
    /// Act on CanIgnore conditions (priority 100..999); off by default.
    pub act_on_can_ignore: bool,
    pub budget: Budget,
    /// After a ticket closes, no new remediation of that node for this long.
    pub cooldown_seconds: u64,
    pub repeat_offender: RepeatOffender,
    /// Namespace for Events about Nodes. `default` (the default) is the one where an Event may
    /// leave `involvedObject.namespace` empty, which is what `kubectl describe node` shows;
    /// another namespace works but its Events only show in `kubectl get events -n NS`.
    pub events_namespace: String,
    /// Namespace the remediation Jobs run in.
    pub jobs_namespace: String,
    /// Directory with `<template>.yaml` Job templates; unset = the templates embedded from
    /// `deploy/jobs/`.
    pub jobs_dir: Option<PathBuf>,
    /// JSON Lines audit log; unset = the audit records go to the process log.
    pub audit_log: Option<PathBuf>,
    /// Webhook payloads waiting to be processed; a full queue answers 503.
    pub queue_capacity: usize,
    /// Webhook payloads waiting to be processed, in bytes (the larger of the body and what its
    /// alerts take in memory, counted in KiB); over it the webhook answers 503, which
    /// Alertmanager retries.
    pub max_queue_bytes: usize,
    /// Upper bound of alerts kept in memory (firing + recently resolved).
    pub max_alerts: usize,
    /// Byte budget of the alerts kept in memory (their labels, annotations and fingerprint, clipped
    /// on receipt, plus a fixed overhead each). When full, resolved alerts are evicted, oldest
    /// first; a new alert that still does not fit is dropped
    /// (`ark_healer_alerts_dropped_total{reason="store_full"}`).
    pub max_alert_bytes: usize,
    /// A firing alert that Alertmanager has not re-sent for this long is forgotten: it re-sends
    /// every firing alert on `repeat_interval`, so keep this a few times larger than that
    /// (the shipped route uses 15m).
    pub alert_expiry_seconds: u64,
    /// How often open tickets are advanced without a new alert.
    pub reconcile_interval_seconds: u64,
    /// Nodes worked on concurrently.
    pub max_concurrent_nodes: usize,
    pub lease: Lease,
    pub kube: KubePolicy,
    pub alertmanager: AlertmanagerSource,
}

/// Alertmanager as the source of truth for "is it still firing?" (I4). With `url` set, before
/// the first disruptive step of a ticket the leader asks Alertmanager whether the alert is still
/// active (not silenced, not inhibited); a replica's memory alone never starts a disruption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertmanagerSource {
    /// E.g. `http://alertmanager.monitoring:9093`. Unset: no re-confirmation (the webhook's
    /// word is taken; a failover may then act on a replica's stale memory).
    pub url: Option<String>,
    pub timeout_seconds: u64,
}

impl Default for AlertmanagerSource {
    fn default() -> Self {
        AlertmanagerSource {
            url: None,
            timeout_seconds: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// At most this many unschedulable nodes (any cause, manual cordons included). 0 = no
    /// absolute limit.
    pub max_unschedulable: u32,
    /// At most this percentage of all nodes unschedulable, rounded down but never below one node.
    /// 0 = no percentage limit.
    pub max_unschedulable_percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepeatOffender {
    /// This many remediations of one node within the window → escalate, no more automatic action.
    pub max_remediations: u32,
    pub window_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lease {
    pub enabled: bool,
    pub name: String,
    pub namespace: String,
    pub duration_seconds: u64,
    /// No write (nor retry) is sent with less than this left on our lease (clock skew between
    /// replicas and the request in flight); must be below `duration_seconds`.
    pub margin_seconds: u64,
}

/// The healer's own Kubernetes retry policy (kube's default retry is off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubePolicy {
    pub request_timeout_seconds: u64,
    /// Attempts per request on 409/429/5xx/timeouts.
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Client-side bound on writes to the apiserver (Node patches, evictions, Job creates and
    /// deletes, Events; every retry counts), a token bucket; 0 = unpaced. The Lease's own
    /// renewals are never paced.
    pub max_writes_per_second: f64,
    /// Writes that may go at once before the rate applies.
    pub write_burst: u32,
    /// A pass refuses to act (no write) on a Node view older than this: the time since the
    /// watch last proved live (an event, a bookmark, a completed list, a watch the server
    /// answered). The watch is re-established every third of this, so a healthy quiet watch
    /// stays well below it.
    pub max_view_age_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            catalog_file: None,
            dry_run: false,
            act_on_can_ignore: false,
            budget: Budget::default(),
            cooldown_seconds: 3600,
            repeat_offender: RepeatOffender::default(),
            events_namespace: "default".into(),
            jobs_namespace: "ark-system".into(),
            jobs_dir: None,
            audit_log: None,
            queue_capacity: 1024,
            max_queue_bytes: 16 << 20,
            max_alerts: 200_000,
            max_alert_bytes: 64 << 20,
            alert_expiry_seconds: 7200,
            reconcile_interval_seconds: 5,
            max_concurrent_nodes: 16,
            lease: Lease::default(),
            kube: KubePolicy::default(),
            alertmanager: AlertmanagerSource::default(),
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_unschedulable: 10,
            max_unschedulable_percent: 10.0,
        }
    }
}

impl Default for RepeatOffender {
    fn default() -> Self {
        RepeatOffender {
            max_remediations: 3,
            window_seconds: 24 * 3600,
        }
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            enabled: true,
            name: "ark-healer".into(),
            namespace: "ark-system".into(),
            duration_seconds: 15,
            margin_seconds: 2,
        }
    }
}

impl Default for KubePolicy {
    fn default() -> Self {
        KubePolicy {
            request_timeout_seconds: 10,
            max_attempts: 5,
            backoff_initial_ms: 50,
            backoff_max_ms: 2000,
            max_writes_per_second: 50.0,
            write_burst: 50,
            max_view_age_seconds: 30,
        }
    }
}

impl Budget {
    /// How many nodes may be unschedulable at once in a cluster of `total` nodes.
    pub fn limit(&self, total: usize) -> usize {
        let mut limit = usize::MAX;
        if self.max_unschedulable > 0 {
            limit = limit.min(self.max_unschedulable as usize);
        }
        if self.max_unschedulable_percent > 0.0 {
            let pct = (total as f64 * self.max_unschedulable_percent / 100.0).floor() as usize;
            limit = limit.min(pct.max(1));
        }
        limit
    }
}

impl Config {
    /// Defaults, then `file` (TOML), then `ARK_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::Config {
                    message: format!("config file {} does not exist", f.display()),
                });
            }
            fig = fig.merge(Toml::file(f));
        }
        // `ARK_*` is shared with the exporter, the test harness (ARK_BIN_DIR, ...) and the
        // webhook token (a process secret, not configuration): only variables naming one of our
        // top-level keys are configuration; below that level unknown keys are still errors.
        let known: Vec<String> = match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        fig = fig.merge(
            Env::prefixed("ARK_")
                .filter(move |k| {
                    let top = k.as_str().split("__").next().unwrap_or("");
                    known.iter().any(|n| n.eq_ignore_ascii_case(top))
                })
                .split("__"),
        );
        let cfg: Config = fig.extract().map_err(|e| Error::Config {
            message: e.to_string(),
        })?;
        if cfg.queue_capacity == 0
            || cfg.max_queue_bytes == 0
            || cfg.max_alert_bytes == 0
            || cfg.alert_expiry_seconds == 0
            || cfg.max_concurrent_nodes == 0
            || cfg.kube.max_attempts == 0
            || cfg.kube.max_view_age_seconds < 3
        {
            return Err(Error::Config {
                message: "queue_capacity, max_queue_bytes, max_alert_bytes, alert_expiry_seconds, \
                          max_concurrent_nodes and kube.max_attempts must be > 0, \
                          kube.max_view_age_seconds >= 3"
                    .into(),
            });
        }
        if !(cfg.kube.max_writes_per_second >= 0.0 && cfg.kube.max_writes_per_second.is_finite()) {
            return Err(Error::Config {
                message: format!(
                    "kube.max_writes_per_second must be a finite number >= 0 (0 = unpaced), not {}",
                    cfg.kube.max_writes_per_second
                ),
            });
        }
        if cfg.lease.enabled && cfg.lease.margin_seconds >= cfg.lease.duration_seconds {
            return Err(Error::Config {
                message: format!(
                    "lease.margin_seconds ({}) must be below lease.duration_seconds ({})",
                    cfg.lease.margin_seconds, cfg.lease.duration_seconds
                ),
            });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_absolute_and_percent() {
        let b = Budget {
            max_unschedulable: 5,
            max_unschedulable_percent: 10.0,
        };
        assert_eq!(b.limit(1000), 5);
        assert_eq!(b.limit(30), 3);
        assert_eq!(b.limit(3), 1, "percent never rounds below one node");
        let abs_only = Budget {
            max_unschedulable: 2,
            max_unschedulable_percent: 0.0,
        };
        assert_eq!(abs_only.limit(1000), 2);
        let pct_only = Budget {
            max_unschedulable: 0,
            max_unschedulable_percent: 25.0,
        };
        assert_eq!(pct_only.limit(1000), 250);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own closure signature
    fn file_and_env_layers_and_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "healer.toml",
                "dry_run = true\ncooldown_seconds = 60\n[budget]\nmax_unschedulable = 4\n",
            )?;
            jail.set_env("ARK_BUDGET__MAX_UNSCHEDULABLE_PERCENT", "50");
            jail.set_env("ARK_HEALER_WEBHOOK_TOKEN", "secret");
            jail.set_env("ARK_BIN_DIR", "/elsewhere"); // someone else's ARK_* variable
            let c = Config::load(Some(Path::new("healer.toml"))).unwrap();
            assert!(c.dry_run);
            assert_eq!(c.cooldown_seconds, 60);
            assert_eq!(c.budget.max_unschedulable, 4);
            assert_eq!(c.budget.max_unschedulable_percent, 50.0);

            jail.create_file("bad.toml", "dry_rum = true\n")?;
            let e = Config::load(Some(Path::new("bad.toml"))).unwrap_err();
            assert!(e.to_string().contains("dry_rum"), "{e}");
            assert!(Config::load(Some(Path::new("missing.toml"))).is_err());
            jail.set_env("ARK_BUDGET__MAX_UNSCHEDULABEL", "3");
            let e = Config::load(None).unwrap_err();
            assert!(e.to_string().contains("max_unschedulabel"), "{e}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own closure signature
    fn alert_bounds_defaults_file_and_env() {
        figment::Jail::expect_with(|jail| {
            let d = Config::load(None).unwrap();
            assert_eq!(d.alert_expiry_seconds, 7200);
            assert_eq!(d.max_alert_bytes, 67_108_864);
            assert_eq!(d.max_queue_bytes, 16_777_216);

            jail.create_file(
                "healer.toml",
                "alert_expiry_seconds = 3600\nmax_alert_bytes = 1048576\nmax_queue_bytes = 65536\n",
            )?;
            let c = Config::load(Some(Path::new("healer.toml"))).unwrap();
            assert_eq!(c.alert_expiry_seconds, 3600);
            assert_eq!(c.max_alert_bytes, 1 << 20);
            assert_eq!(c.max_queue_bytes, 64 << 10);
            // The environment wins over the file.
            jail.set_env("ARK_MAX_ALERT_BYTES", "2097152");
            jail.set_env("ARK_ALERT_EXPIRY_SECONDS", "900");
            let c = Config::load(Some(Path::new("healer.toml"))).unwrap();
            assert_eq!(c.max_alert_bytes, 2 << 20);
            assert_eq!(c.alert_expiry_seconds, 900);
            assert_eq!(c.max_queue_bytes, 64 << 10);

            jail.set_env("ARK_MAX_QUEUE_BYTES", "0");
            let e = Config::load(None).unwrap_err();
            assert!(e.to_string().contains("max_queue_bytes"), "{e}");
            jail.set_env("ARK_MAX_QUEUE_BYTES", "lots");
            assert!(Config::load(None).is_err());
            jail.set_env("ARK_MAX_QUEUE_BYTES", "1024");
            jail.create_file("typo.toml", "alert_expiry_second = 60\n")?;
            let e = Config::load(Some(Path::new("typo.toml"))).unwrap_err();
            assert!(e.to_string().contains("alert_expiry_second"), "{e}");
            Ok(())
        });
    }
}
