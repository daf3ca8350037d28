//! Alert storm on the real apiserver: 10,000 alerts over 1,000 Node objects in one burst. The
//! healer must act on exactly the disruption budget's worth of nodes (never more, watched
//! throughout), once each (no duplicate step, no second Job), and record why the rest wait.

mod healer_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use ark_harness::{KubeCluster, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

const NODES: usize = 1000;
const BUDGET: usize = 20;
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

#[tokio::test]
async fn healer_storm_of_10k_alerts_over_1000_nodes_keeps_the_budget() -> Result<()> {
    if ark_harness::skip_without_services(
        "healer_storm_of_10k_alerts_over_1000_nodes_keeps_the_budget",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_nodes((0..NODES).map(|i| format!("n{i:04}")))
        .await?;

    let dir = tempfile::tempdir()?;
    let cfg = format!(
        "max_concurrent_nodes = 32\n[budget]\nmax_unschedulable = {BUDGET}\nmax_unschedulable_percent = 0.0\n[lease]\nnamespace = \"ark-system\"\n"
    );
    let healer = Healer::start(&kube, dir.path(), "healer-storm", &cfg)?;
    healer.ready().await?;

    // Watch the number of unschedulable nodes for the whole run.
    let max_seen = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let nodes = nodes.clone();
        let max_seen = max_seen.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(list) = nodes.list(&ListParams::default()).await {
                    let out = list.items.iter().filter(|n| unschedulable(n)).count();
                    max_seen.fetch_max(out, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let start = Instant::now();
    for batch in 0..10 {
        let alerts = (0..NODES)
            .map(|i| {
                let idx = batch * NODES + i;
                alert(
                    &format!("n{i:04}"),
                    CONDITIONS[(idx / 7) % CONDITIONS.len()],
                    true,
                    "2026-11-23T10:00:00Z",
                )
            })
            .collect();
        let (code, body) = healer.post(&payload(alerts)).await?;
        assert_eq!((code, body["accepted"].as_u64()), (202, Some(NODES as u64)));
    }
    let acked = start.elapsed();

    // Settled: BUDGET nodes reached their Job, every other node's ticket says it waits for budget.
    let settled = wait_for(
        "storm settled",
        Duration::from_secs(300),
        &[&healer.service],
        || async {
            let list = nodes.list(&ListParams::default()).await?.items;
            let waiting = list
                .iter()
                .filter(|n| {
                    ticket(n).is_some_and(|t| {
                        t["blocked"]
                            .as_str()
                            .is_some_and(|b| b.contains("disruption budget"))
                    })
                })
                .count();
            let jobs =
                count_jobs(&admin, "reboot").await? + count_jobs(&admin, "gpu-reset").await?;
            Ok((waiting == NODES - BUDGET && jobs == BUDGET).then_some(list))
        },
    )
    .await?;
    let took = start.elapsed();
    watcher.abort();

    let out: Vec<&Node> = settled.iter().filter(|n| unschedulable(n)).collect();
    assert_eq!(out.len(), BUDGET);
    assert!(
        max_seen.load(Ordering::SeqCst) <= BUDGET,
        "budget exceeded: {max_seen:?}"
    );
    for n in &settled {
        let Some(t) = ticket(n) else {
            panic!("node {:?} has no ticket", n.metadata.name);
        };
        let steps: Vec<u64> = t["workflows"]
            .as_sequence()
            .map(|ws| ws.iter().filter_map(|w| w["step"].as_u64()).collect())
            .unwrap_or_default();
        let mut dedup = steps.clone();
        dedup.dedup();
        assert_eq!(steps, dedup, "duplicate step on {:?}", n.metadata.name);
        // Every node's most urgent condition among the ones it got.
        assert!(t["condition"].as_str().is_some());
    }
    for n in &out {
        let t = ticket(n).expect("ticket");
        assert_eq!(workflow_status(&t, "Cordon"), vec!["Succeeded"]);
    }
    let m = healer.metrics().await?;
    let blocked: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("ark_healer_actions_blocked_total{reason=\"disruption_budget\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // Counted once per node and reason (a node that waits for budget is one blocked action).
    assert!(
        blocked >= (NODES - BUDGET) as f64 && blocked <= NODES as f64,
        "{blocked}"
    );
    eprintln!(
        "storm: {} alerts over {NODES} nodes acknowledged in {acked:?}; settled ({BUDGET} acting, {} waiting for budget) after {took:?}",
        10 * NODES,
        NODES - BUDGET
    );
    Ok(())
}
