//! The watch-fed Node view on the real apiserver (issue 19): a pass refuses to act on a view
//! older than `[kube] max_view_age_seconds`, even while writes would go through, and acts as soon
//! as the watch proves live again.
//!
//! A proxy in front of the apiserver holds only the Node list/watch requests
//! (`GET /api/v1/nodes?…`); single-node GETs and PATCHes pass. So the healer could cordon — what
//! stops it is the rule, and `ark_healer_passes_refused_total{reason="stale_view"}` says so.
//! The proxy buffers whole responses; with a 3 s bound the healer's watch times out every
//! second, so each watch arrives as one buffered answer and the view stays live through it.

mod healer_support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ark_harness::{DelayProxy, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn healer_view_a_stale_node_view_is_never_acted_on_and_a_live_one_is() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("healer_view_a_stale_node_view_is_never_acted_on_and_a_live_one_is").await?
    else {
        return Ok(());
    };
    kube.create_nodes(["v1".to_owned(), "v2".to_owned()])
        .await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let dir = tempfile::tempdir()?;
    let proxy = DelayProxy::start(&kube.url(), Some(&kube.ca_path())).await?;
    let kc = proxy.kubeconfig(dir.path(), "healer", kube.token("healer"))?;
    // View bound 3 s (the watch is re-established every second); the Lease (15 s) outlives it.
    let cfg = "[kube]\nmax_view_age_seconds = 3\n[lease]\nnamespace = \"ark-system\"\n";
    let healer = Healer::start_with_kubeconfig(&dir.path().join("h"), "healer-view", cfg, &kc)?;
    healer.wait_leader().await?;
    wait_for(
        "view synced with both nodes",
        WAIT,
        &[&healer.service],
        || async {
            let m = healer.metrics().await?;
            Ok((metric(&m, "ark_healer_view_nodes") == 2.0).then_some(()))
        },
    )
    .await?;

    // The watch stops proving live: list and watch requests for Nodes are held.
    proxy.hold(Some("GET"), "/api/v1/nodes?");
    let refused = wait_for(
        "a pass refused on a stale view",
        WAIT,
        &[&healer.service],
        || async {
            let m = healer.metrics().await?;
            let age = metric(&m, "ark_healer_view_age_seconds");
            let n = metric(&m, "ark_healer_passes_refused_total{reason=\"stale_view\"}");
            Ok((age > 3.0 && n > 0.0).then_some(n))
        },
    )
    .await?;
    let (code, _) = healer
        .post(&payload(vec![alert(
            "v1",
            "GpuNvlinkDown",
            true,
            "2026-12-04T01:00:00Z",
        )]))
        .await?;
    ensure!(code == 202, "webhook answered {code}");
    // Several passes (1 s reconcile) on the stale view: every one refused, nothing written.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let m = healer.metrics().await?;
    let more = metric(&m, "ark_healer_passes_refused_total{reason=\"stale_view\"}");
    ensure!(more > refused, "no further refusals ({refused} → {more})");
    let n = nodes.get("v1").await?;
    ensure!(
        !unschedulable(&n) && ticket(&n).is_none(),
        "acted on a stale view: {:?}",
        n.metadata.annotations
    );
    let writes = proxy
        .log()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.starts_with("/api/v1/nodes"))
        .count();
    ensure!(writes == 0, "{writes} node patches sent on a stale view");

    // Live again: the held watch goes through, the view proves live, the pass acts.
    proxy.release();
    let t = wait_node(
        &nodes,
        "v1",
        "v1 cordoned once the view is live",
        &healer,
        |n| ticket(n).filter(|t| workflow_status(t, "Cordon") == ["Succeeded"]),
    )
    .await?;
    ensure!(t["condition"].as_str() == Some("GpuNvlinkDown"), "{t:?}");
    let m = healer.metrics().await.context("metrics")?;
    ensure!(
        metric(&m, "ark_healer_view_age_seconds") <= 3.0,
        "view age after release: {}",
        metric(&m, "ark_healer_view_age_seconds")
    );
    Ok(())
}
