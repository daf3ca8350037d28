//! Metrics plumbing: one explicit [`Registry`] per process (never the global default) carrying
//! the `node` label on every series, plus a snapshot mechanism.
//!
//! Two ways to export:
//! - plain counters/gauges registered in the registry (self-metrics updated from any thread:
//!   [`DropCounters`], [`ProbeMetrics`], [`CollectorStatus`]);
//! - snapshots: a source (the pipeline, or a polling collector) builds whole metric families and
//!   calls [`Snapshots::publish`]; a scrape only clones and encodes the latest snapshots, so it
//!   never waits on hardware or on the pipeline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, GaugeVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

use crate::Result;

/// Latest published families per source.
#[derive(Debug, Default)]
pub struct Snapshots {
    inner: Mutex<BTreeMap<String, Arc<Vec<MetricFamily>>>>,
}

impl Snapshots {
    /// Replaces the families of `source` (atomically from the scraper's point of view).
    pub fn publish(&self, source: &str, families: Vec<MetricFamily>) {
        let families = Arc::new(families);
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source.to_owned(), families);
    }

    fn all(&self) -> Vec<Arc<Vec<MetricFamily>>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// Registry adapter: encodes whatever was last published.
struct SnapshotCollector(Arc<Snapshots>);

impl Collector for SnapshotCollector {
    fn desc(&self) -> Vec<&Desc> {
        // Families vary with the snapshots; the registry merges them by name at gather time.
        Vec::new()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0
            .all()
            .iter()
            .flat_map(|v| v.iter().cloned())
            .collect()
    }
}

/// `reason` values of `ark_events_dropped_total`, all exported from the start (as 0).
pub const DROP_REASONS: [&str; 10] = [
    "oversized_line",
    "invalid_utf8",
    "malformed_json",
    "missing_field",
    "unknown_event_type",
    "invalid_field",
    "timestamp_future",
    "timestamp_past",
    "queue_full",
    "pipeline_closed",
];

/// `ark_events_dropped_total{reason}`; cheap to clone, increments are atomic.
#[derive(Clone, Debug)]
pub struct DropCounters {
    by_reason: Arc<[IntCounter; DROP_REASONS.len()]>,
}

impl DropCounters {
    pub fn inc(&self, reason: &str) {
        if let Some(i) = DROP_REASONS.iter().position(|r| *r == reason) {
            self.by_reason[i].inc();
        }
    }
    pub fn get(&self, reason: &str) -> u64 {
        DROP_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.by_reason[i].get())
    }
}

/// Per-probe counters.
#[derive(Clone, Debug)]
pub struct ProbeMetrics {
    restarts: IntCounterVec,
    malformed: IntCounterVec,
}

impl ProbeMetrics {
    /// Handles for one probe (label = its name).
    pub fn for_probe(&self, probe: &str) -> (IntCounter, IntCounter) {
        (
            self.restarts.with_label_values(&[probe]),
            self.malformed.with_label_values(&[probe]),
        )
    }
}

/// `ark_collector_up` / `ark_collector_duration_seconds` for one collector.
#[derive(Clone, Debug)]
pub struct CollectorStatus {
    up: prometheus::Gauge,
    duration: prometheus::Gauge,
}

impl CollectorStatus {
    pub fn set_up(&self, up: bool) {
        self.up.set(if up { 1.0 } else { 0.0 });
    }
    pub fn set_duration(&self, seconds: f64) {
        self.duration.set(seconds);
    }
    pub fn is_up(&self) -> bool {
        self.up.get() > 0.0
    }
}

/// Everything metric-related a process needs.
#[derive(Clone)]
pub struct Telemetry {
    pub registry: Registry,
    pub snapshots: Arc<Snapshots>,
    pub dropped: DropCounters,
    pub probes: ProbeMetrics,
    collector_up: GaugeVec,
    collector_duration: GaugeVec,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// A registry whose every series carries `node="<node>"`.
    pub fn new(node: &str) -> Result<Self> {
        let registry = Registry::new_custom(
            None,
            Some(HashMap::from([("node".to_owned(), node.to_owned())])),
        )?;
        let snapshots = Arc::new(Snapshots::default());
        registry.register(Box::new(SnapshotCollector(snapshots.clone())))?;
        let dropped_vec = IntCounterVec::new(
            Opts::new(
                "ark_events_dropped_total",
                "Events dropped before reaching the graph, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(dropped_vec.clone()))?;
        let by_reason = DROP_REASONS.map(|r| dropped_vec.with_label_values(&[r]));
        let restarts = IntCounterVec::new(
            Opts::new(
                "ark_probe_restarts_total",
                "Times an external probe was restarted after it exited.",
            ),
            &["probe"],
        )?;
        let malformed = IntCounterVec::new(
            Opts::new(
                "ark_probe_malformed_lines_total",
                "Lines from an external probe that were not valid Ark events.",
            ),
            &["probe"],
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(malformed.clone()))?;
        let collector_up = GaugeVec::new(
            Opts::new(
                "ark_collector_up",
                "1 when the collector's last run succeeded.",
            ),
            &["collector"],
        )?;
        let collector_duration = GaugeVec::new(
            Opts::new(
                "ark_collector_duration_seconds",
                "Duration of the collector's last run (for event sources: of the last batch).",
            ),
            &["collector"],
        )?;
        registry.register(Box::new(collector_up.clone()))?;
        registry.register(Box::new(collector_duration.clone()))?;
        Ok(Telemetry {
            registry,
            snapshots,
            dropped: DropCounters {
                by_reason: Arc::new(by_reason),
            },
            probes: ProbeMetrics {
                restarts,
                malformed,
            },
            collector_up,
            collector_duration,
        })
    }

    /// Status handles for a collector (creates its series).
    pub fn collector(&self, name: &str) -> CollectorStatus {
        CollectorStatus {
            up: self.collector_up.with_label_values(&[name]),
            duration: self.collector_duration.with_label_values(&[name]),
        }
    }

    /// The text exposition of everything.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail on I/O; a family inconsistency would be a bug.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "Metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Builds one metric family from (labels, value) rows.
pub fn family<'a, I>(name: &str, help: &str, kind: MetricType, rows: I) -> MetricFamily
where
    I: IntoIterator<Item = (Vec<(&'a str, String)>, f64)>,
{
    let mut mf = MetricFamily::default();
    mf.set_name(name.to_owned());
    mf.set_help(help.to_owned());
    mf.set_field_type(kind);
    let metrics = rows
        .into_iter()
        .map(|(labels, value)| {
            let mut m = Metric::from_label(
                labels
                    .into_iter()
                    .map(|(k, v)| {
                        let mut lp = LabelPair::default();
                        lp.set_name(k.to_owned());
                        lp.set_value(v);
                        lp
                    })
                    .collect(),
            );
            match kind {
                MetricType::COUNTER => {
                    let mut c = Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                }
                _ => {
                    let mut g = Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
            }
            m
        })
        .collect();
    mf.set_metric(metrics);
    mf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_and_node_label_are_encoded() {
        let t = Telemetry::new("n1").unwrap();
        t.snapshots.publish(
            "x",
            vec![family(
                "ark_test_things",
                "Things.",
                MetricType::GAUGE,
                [(vec![("kind", "a".to_owned())], 2.0)],
            )],
        );
        t.dropped.inc("queue_full");
        t.dropped.inc("no-such-reason");
        let text = t.encode();
        assert!(
            text.contains("ark_test_things{kind=\"a\",node=\"n1\"} 2"),
            "{text}"
        );
        assert!(text.contains("ark_events_dropped_total{reason=\"queue_full\",node=\"n1\"} 1"));
        assert_eq!(t.dropped.get("queue_full"), 1);
        // Republishing replaces.
        t.snapshots.publish("x", Vec::new());
        assert!(!t.encode().contains("ark_test_things"));
    }
}
