//! Benchmark (prints numbers, asserts nothing): an alert storm of 10,000 alerts over 1,000 nodes
//! through the alert store (dedup) and `plan()`, against a live-looking view of 1,000 nodes.
//!
//! `cargo run --release -p ark-healer --example bench_plan`; the fleet size of issue 19:
//! `ARK_BENCH_NODES=10000 ARK_BENCH_ALERTS=100000 cargo run --release -p ark-healer --example bench_plan`

use std::collections::BTreeMap;
use std::time::Instant;

use ark_healer::alerts::{Alert, AlertStatus, AlertStore, StoreLimits};
use ark_healer::catalog::Catalog;
use ark_healer::config::Config;
use ark_healer::planner::{ClusterView, NodeView, PlanInput, plan};

const CONDITIONS: [&str; 10] = [
    "GpuHung",
    "GpuXidFatal",
    "DiskIoSlow",
    "IbPortDown",
    "GpuFellOffBus",
    "PcieLinkDegraded",
    "WorkloadStalled",
    "GpuNvlinkDown",
    "NetworkRetransmitStorm",
    "GpuEccDoubleBit",
];

fn main() -> anyhow::Result<()> {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let nodes = env("ARK_BENCH_NODES", 1_000);
    let n_alerts = env("ARK_BENCH_ALERTS", 10_000);
    let catalog = Catalog::embedded()?;
    let mut config = Config::default();
    config.budget.max_unschedulable = 20;
    let view = ClusterView {
        nodes: (0..nodes)
            .map(|i| {
                let name = format!("n{i:04}");
                (
                    name.clone(),
                    NodeView {
                        name,
                        unschedulable: i % 100 == 0,
                        control_plane: false,
                        disabled: false,
                        ticket: None,
                    },
                )
            })
            .collect(),
        live: true,
    };
    let starts = "2026-11-23T10:00:00Z".parse()?;
    let alerts: Vec<Alert> = (0..n_alerts)
        .map(|i| {
            let node = format!("n{:04}", i % nodes);
            let condition = CONDITIONS[(i / 7) % CONDITIONS.len()];
            let labels: BTreeMap<String, String> = [
                ("node".to_owned(), node.clone()),
                ("condition".to_owned(), condition.to_owned()),
                ("gpu".to_owned(), (i % 8).to_string()),
            ]
            .into();
            Alert {
                fingerprint: format!("{node}/{condition}/{}", i % 8),
                status: AlertStatus::Firing,
                labels,
                annotations: BTreeMap::new(),
                starts_at: starts,
                ends_at: None,
            }
        })
        .collect();

    let mut times = Vec::new();
    let mut plan_only = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let mut store = AlertStore::new(StoreLimits::from(&config));
        let now = jiff::Timestamp::now();
        for a in alerts.iter().cloned() {
            store.apply(a, now);
        }
        // What a pass plans over (serve.rs): the store's alerts shared, not copied.
        let snapshot = store.shared();
        let tp = Instant::now();
        let p = plan(&PlanInput {
            alerts: &snapshot,
            catalog: &catalog,
            config: &config,
            view: &view,
            now: jiff::Timestamp::now(),
            silence_means_resolved: true,
        });
        std::hint::black_box(&p);
        plan_only.push(tp.elapsed().as_secs_f64() * 1000.0);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    plan_only.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    writeln!(
        out,
        "plan: {n_alerts} alerts over {nodes} nodes (store + plan), 21 runs: median {median:.1} ms, min {:.1} ms, max {max:.1} ms => {:.0} alerts/s",
        times[0],
        n_alerts as f64 / (median / 1000.0)
    )?;
    writeln!(
        out,
        "plan() alone: median {:.1} ms, min {:.1} ms, max {:.1} ms",
        plan_only[plan_only.len() / 2],
        plan_only[0],
        plan_only[plan_only.len() - 1]
    )?;
    Ok(())
}
