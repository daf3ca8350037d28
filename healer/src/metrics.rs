//! The healer's metrics, in an explicit registry (never the global default).

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{Error, Result};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub sop_total: IntCounterVec,
    pub selfheal_duration: Histogram,
    pub tickets_open: IntGauge,
    pub condition_nodes: IntGaugeVec,
    pub alerts_received: IntCounterVec,
    /// Alerts not stored, by reason (`store_full`: the byte or count budget of the alert store).
    pub alerts_dropped: IntCounterVec,
    /// Labels, annotations, keys, values and fingerprints clipped on receipt.
    pub alert_fields_clipped: IntCounter,
    pub actions_blocked: IntCounterVec,
    pub webhook_requests: IntCounterVec,
    pub queue_depth: IntGauge,
    pub is_leader: IntGauge,
    /// Nodes whose remediation the budget, cooldown or repeat-offender rule holds back now
    /// (`node`, `reason`): one series per such node, so an alert can say which and for how long.
    pub node_blocked: IntGaugeVec,
    /// When the running step of each open ticket began (`node`, `action`).
    pub ticket_step_started: prometheus::GaugeVec,
    /// Nodes whose ticket escalated to humans and is still there (`node`, `condition`).
    pub tickets_escalated: IntGaugeVec,
    /// 1 while `ark-healer pause` holds (as this replica last read it; also 1 when unreadable).
    pub paused: IntGauge,
    pub kube_retries: IntCounterVec,
    pub steps_total: IntCounterVec,
    /// Requests sent to the apiserver by operation (every attempt; watch starts and list pages
    /// of the Node cache included).
    pub kube_requests: IntCounterVec,
    /// Writes that waited for the write pacer, and for how long in all.
    pub kube_writes_paced: IntCounter,
    pub kube_write_wait_seconds: Counter,
    /// Seconds since the Node watch last proved live (set every second and at every pass).
    pub view_age: Gauge,
    /// Nodes in the watch-fed view.
    pub view_nodes: IntGauge,
    /// Full Node lists of the cache, by reason (`initial`, `expired`: the watch's resourceVersion
    /// was too old, `error`: the watch kept failing).
    pub view_relists: IntCounterVec,
    /// Reconcile passes that did not act, by reason (`not_synced`, `stale_view`,
    /// `own_writes_unseen`).
    pub passes_refused: IntCounterVec,
    /// `plan()` alone, and a whole pass (view, plan, confirmations, execution).
    pub plan_duration: Histogram,
    pub pass_duration: Histogram,
}

impl Metrics {
    /// Forgets the per-node gauges only the leader keeps (a replica that stops leading must not
    /// keep reporting the cluster as it last saw it).
    pub fn clear_leader_gauges(&self) {
        self.node_blocked.reset();
        self.ticket_step_started.reset();
        self.tickets_escalated.reset();
        self.condition_nodes.reset();
        self.paused.set(0);
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> Result<T> {
    r.register(Box::new(c.clone()))
        .map_err(|source| Error::Metrics { source })?;
    Ok(c)
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self> {
        let m = |e| Error::Metrics { source: e };
        Ok(Metrics {
            registry: registry.clone(),
            sop_total: reg(
                registry,
                IntCounterVec::new(
                    Opts::new("ark_healer_sop_total", "SOP runs by final status."),
                    &["sop", "status"],
                )
                .map_err(m)?,
            )?,
            selfheal_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ark_healer_selfheal_duration_seconds",
                        "Ticket creation to resolution.",
                    )
                    .buckets(vec![
                        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                    ]),
                )
                .map_err(m)?,
            )?,
            tickets_open: reg(
                registry,
                IntGauge::new(
                    "ark_healer_tickets_open",
                    "Open tickets (created or resolving).",
                )
                .map_err(m)?,
            )?,
            condition_nodes: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ark_healer_condition_nodes",
                        "Nodes whose chosen (most urgent) condition is this one.",
                    ),
                    &["condition"],
                )
                .map_err(m)?,
            )?,
            alerts_received: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_alerts_received_total",
                        "Alerts received by status.",
                    ),
                    &["status"],
                )
                .map_err(m)?,
            )?,
            alerts_dropped: {
                let c = reg(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "ark_healer_alerts_dropped_total",
                            "Alerts received but not stored, by reason.",
                        ),
                        &["reason"],
                    )
                    .map_err(m)?,
                )?;
                // Exported at 0 from the start, so that rate() and alerts see the first drop.
                c.with_label_values(&["store_full"]);
                c
            },
            alert_fields_clipped: reg(
                registry,
                IntCounter::new(
                    "ark_healer_alert_fields_clipped_total",
                    "Alert labels, annotations, keys, values and fingerprints clipped to their \
                     size limits on receipt.",
                )
                .map_err(m)?,
            )?,
            actions_blocked: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_actions_blocked_total",
                        "Actions not taken, by guardrail.",
                    ),
                    &["reason"],
                )
                .map_err(m)?,
            )?,
            webhook_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_webhook_requests_total",
                        "Webhook requests by HTTP code.",
                    ),
                    &["code"],
                )
                .map_err(m)?,
            )?,
            queue_depth: reg(
                registry,
                IntGauge::new("ark_healer_queue_depth", "Webhook payloads waiting.").map_err(m)?,
            )?,
            is_leader: reg(
                registry,
                IntGauge::new(
                    "ark_healer_is_leader",
                    "1 while this replica holds the Lease.",
                )
                .map_err(m)?,
            )?,
            node_blocked: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ark_healer_node_blocked",
                        "1 for each node whose remediation is held back now by the disruption \
                         budget, cooldown or repeat-offender rule (leader only).",
                    ),
                    &["node", "reason"],
                )
                .map_err(m)?,
            )?,
            ticket_step_started: reg(
                registry,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "ark_healer_ticket_step_started_timestamp_seconds",
                        "Start of the running step of each open ticket (leader only).",
                    ),
                    &["node", "action"],
                )
                .map_err(m)?,
            )?,
            tickets_escalated: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "ark_healer_ticket_escalated",
                        "1 for each node whose ticket escalated to humans and was not cleared \
                         (leader only).",
                    ),
                    &["node", "condition"],
                )
                .map_err(m)?,
            )?,
            paused: reg(
                registry,
                IntGauge::new(
                    "ark_healer_paused",
                    "1 while remediation is paused (ark-healer pause), as the leader last read it.",
                )
                .map_err(m)?,
            )?,
            kube_retries: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_kube_retries_total",
                        "Kubernetes requests retried, by cause.",
                    ),
                    &["cause"],
                )
                .map_err(m)?,
            )?,
            steps_total: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_steps_total",
                        "SOP steps executed, by action and status.",
                    ),
                    &["action", "status"],
                )
                .map_err(m)?,
            )?,
            kube_requests: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ark_healer_kube_requests_total",
                        "Requests sent to the Kubernetes API, by operation (every attempt).",
                    ),
                    &["op"],
                )
                .map_err(m)?,
            )?,
            kube_writes_paced: reg(
                registry,
                IntCounter::new(
                    "ark_healer_kube_writes_paced_total",
                    "Writes that waited for the client-side write pacer (kube.max_writes_per_second).",
                )
                .map_err(m)?,
            )?,
            kube_write_wait_seconds: reg(
                registry,
                Counter::new(
                    "ark_healer_kube_write_wait_seconds_total",
                    "Time writes spent waiting for the write pacer.",
                )
                .map_err(m)?,
            )?,
            view_age: reg(
                registry,
                Gauge::new(
                    "ark_healer_view_age_seconds",
                    "Seconds since the Node watch last proved live (event, bookmark, list, or a \
                     watch the server answered); +Inf before the first list.",
                )
                .map_err(m)?,
            )?,
            view_nodes: reg(
                registry,
                IntGauge::new("ark_healer_view_nodes", "Nodes in the watch-fed view.")
                    .map_err(m)?,
            )?,
            view_relists: {
                let c = reg(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "ark_healer_view_relists_total",
                            "Full Node lists of the watch cache, by reason.",
                        ),
                        &["reason"],
                    )
                    .map_err(m)?,
                )?;
                for r in ["initial", "expired", "error"] {
                    c.with_label_values(&[r]);
                }
                c
            },
            passes_refused: {
                let c = reg(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "ark_healer_passes_refused_total",
                            "Reconcile passes that did not act because the Node view was not \
                             synced, too old, or had not yet seen this replica's own writes.",
                        ),
                        &["reason"],
                    )
                    .map_err(m)?,
                )?;
                for r in ["not_synced", "stale_view", "own_writes_unseen"] {
                    c.with_label_values(&[r]);
                }
                c
            },
            plan_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ark_healer_plan_duration_seconds",
                        "Time of plan() (pure planning over all alerts and nodes) per pass.",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .map_err(m)?,
            )?,
            pass_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ark_healer_pass_duration_seconds",
                        "Time of a whole reconcile pass (view, plan, confirmations, execution).",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                )
                .map_err(m)?,
            )?,
        })
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding our own registry into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `ark_healer_*` name the alerts and dashboards may use (alerts/metric-names.txt) is
    /// one this registry exports: a renamed metric cannot silently blind an alert.
    #[test]
    fn metric_names_of_the_contract_are_registered() {
        let m = Metrics::register(&Registry::new()).unwrap();
        // Vec families appear once a label set exists.
        m.node_blocked.with_label_values(&["n", "cooldown"]).set(1);
        m.ticket_step_started
            .with_label_values(&["n", "Drain"])
            .set(1.0);
        m.tickets_escalated
            .with_label_values(&["n", "GpuHung"])
            .set(1);
        m.sop_total.with_label_values(&["s", "resolved"]).inc();
        m.condition_nodes.with_label_values(&["GpuHung"]).set(1);
        m.alerts_received.with_label_values(&["firing"]).inc();
        m.actions_blocked.with_label_values(&["cooldown"]).inc();
        m.webhook_requests.with_label_values(&["202"]).inc();
        let have: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        let contract = include_str!("../../alerts/metric-names.txt");
        let missing: Vec<&str> = contract
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ark_healer_"))
            .filter(|n| !have.iter().any(|h| h == n))
            .collect();
        assert!(
            missing.is_empty(),
            "not exported: {missing:?} (have {have:?})"
        );
    }
}
