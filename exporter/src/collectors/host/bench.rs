//! Every host collector polled in-line ([`HostSet`], built from [`super::source`] in
//! [`CollectorKind::ALL`] order): what the golden test and `ark-exporter bench host` use (the
//! service runs each on its own loop instead).

use std::path::PathBuf;
use std::time::Instant;

use super::{HostConfig, HostSource, PollError, PollOutput, wall_ms};
use crate::collectors::CollectorKind;
use crate::event::Event;
use crate::pods::PodResolver;

/// Every host collector over one `[host]` configuration, polled in-line.
pub struct HostSet {
    sources: Vec<(CollectorKind, Box<dyn HostSource>)>,
}

impl HostSet {
    /// The procfs/sysfs collectors, in [`CollectorKind::ALL`] order.
    pub fn new(cfg: &HostConfig, pods: &PodResolver) -> Self {
        HostSet {
            sources: CollectorKind::ALL
                .iter()
                .filter_map(|&k| Some((k, super::source(k, cfg, pods)?)))
                .collect(),
        }
    }

    /// The collectors in the set, in order.
    pub fn kinds(&self) -> Vec<CollectorKind> {
        self.sources.iter().map(|(k, _)| *k).collect()
    }

    /// Polls every source once.
    pub fn poll(&mut self, now_ms: i64) -> Vec<(CollectorKind, Result<PollOutput, PollError>)> {
        self.sources
            .iter_mut()
            .map(|(k, s)| (*k, s.poll(now_ms)))
            .collect()
    }

    /// Polls every source once and publishes like the service does (families, `up`); returns
    /// the events.
    pub fn poll_into(&mut self, now_ms: i64, telemetry: &crate::metrics::Telemetry) -> Vec<Event> {
        let mut events = Vec::new();
        for (kind, res) in self.poll(now_ms) {
            let status = telemetry.collector(kind.name());
            match res {
                Ok(out) => {
                    status.set_up(true);
                    telemetry.snapshots.publish(kind.name(), out.families);
                    events.extend(out.events);
                }
                Err(_) => {
                    status.set_up(false);
                    telemetry.snapshots.publish(kind.name(), Vec::new());
                }
            }
        }
        events
    }
}

/// `ark-exporter bench host`: a full collection of every host collector, timed.
#[derive(Debug, clap::Args)]
pub struct HostBenchArgs {
    /// Timed collections.
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Untimed collections first (the process collector classifies new processes in batches).
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    #[arg(long = "path.procfs", default_value = "/proc")]
    pub procfs: PathBuf,
    #[arg(long = "path.sysfs", default_value = "/sys")]
    pub sysfs: PathBuf,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the host benchmark and returns its JSON report. Simulated time advances by the poll
/// interval per collection, so re-classification happens at its real rate.
pub fn bench(a: &HostBenchArgs) -> serde_json::Value {
    let cfg = HostConfig {
        procfs: a.procfs.clone(),
        sysfs: a.sysfs.clone(),
        ..HostConfig::default()
    };
    let pods = PodResolver::new(&cfg.sysfs);
    let mut set = HostSet::new(&cfg, &pods);
    let step = cfg.interval.0.max(1);
    let mut now = wall_ms();
    let t0 = Instant::now();
    let first = set.poll(now);
    let cold_ms = t0.elapsed().as_secs_f64() * 1e3;
    let up: serde_json::Map<String, serde_json::Value> = first
        .iter()
        .map(|(k, r)| (k.name().to_owned(), serde_json::Value::Bool(r.is_ok())))
        .collect();
    for _ in 0..a.warmup {
        now += step;
        set.poll(now);
    }
    let n = set.sources.len();
    let mut total = Vec::with_capacity(a.runs);
    let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(a.runs); n];
    let mut series = 0usize;
    let mut events = 0usize;
    for _ in 0..a.runs.max(1) {
        now += step;
        let t = Instant::now();
        series = 0;
        for (i, (_, s)) in set.sources.iter_mut().enumerate() {
            let ti = Instant::now();
            let r = s.poll(now);
            per[i].push(ti.elapsed().as_secs_f64() * 1e3);
            if let Ok(out) = r {
                series += out
                    .families
                    .iter()
                    .map(|f| f.get_metric().len())
                    .sum::<usize>();
                events += out.events.len();
            }
        }
        total.push(t.elapsed().as_secs_f64() * 1e3);
    }
    total.sort_by(f64::total_cmp);
    let mut per_json = serde_json::Map::new();
    for (i, (k, _)) in set.sources.iter().enumerate() {
        per[i].sort_by(f64::total_cmp);
        per_json.insert(
            k.name().to_owned(),
            serde_json::json!({
                "median_ms": percentile(&per[i], 0.5),
                "p90_ms": percentile(&per[i], 0.9),
            }),
        );
    }
    serde_json::json!({
        "runs": total.len(),
        "median_ms": percentile(&total, 0.5),
        "p90_ms": percentile(&total, 0.9),
        "max_ms": total.last().copied().unwrap_or(0.0),
        "cold_first_collection_ms": cold_ms,
        "collectors_up": up,
        "per_collector": per_json,
        "series_per_collection": series,
        "events_per_collection": events as f64 / total.len().max(1) as f64,
        "procfs": cfg.procfs,
        "sysfs": cfg.sysfs,
    })
}
