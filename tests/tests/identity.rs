//! Scenario 4 of issue 15 (trusted identity): a process answering on one node's exporter port
//! with another node's name must not get that other node alerted (and so remediated by the
//! healer). A real Prometheus runs the shipped `deploy/prometheus/scrape.yml` exporter job, its
//! Kubernetes pod discovery replaced by static targets carrying the `__meta_kubernetes_*` labels
//! that discovery would give the two exporter pods, and loads every `alerts/*.rules.yml`. Both
//! targets serve the real exporter's NVML output (`exporter/tests/golden/nvml_metrics.txt`: GPU 3
//! off the bus with XID 79) under a node name of their choosing.
//!
//! On the config before issue 15 (`honor_labels: true`, no node relabelling) the impostor's
//! series keep `node="victim-node-17"` and `GpuFellOffBus{node="victim-node-17"}` fires: this
//! test fails there (its first assertion).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ark_harness::{PromConfig, Prometheus, repo_root};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// The node the impostor names.
const VICTIM: &str = "victim-node-17";
/// The node the impostor's pod really runs on.
const IMPOSTOR_HOST: &str = "gpu-node-3";
/// A node whose exporter tells the truth.
const HONEST: &str = "gpu-node-5";

/// The real exporter's NVML exposition with every series under `node`.
fn exporter_output(node: &str) -> Result<String> {
    let golden = repo_root().join("exporter/tests/golden/nvml_metrics.txt");
    let text = std::fs::read_to_string(&golden).with_context(|| golden.display().to_string())?;
    ensure!(
        text.contains("node=\"golden\"") && text.contains("ark_collector_up{"),
        "{} no longer has node=\"golden\" series and ark_collector_up",
        golden.display()
    );
    Ok(text.replace("node=\"golden\"", &format!("node=\"{node}\"")))
}

/// Serves `body` on `/metrics` at a free loopback port.
async fn serve(body: String) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// The `ark-exporter` job of deploy/prometheus/scrape.yml with, in place of its Kubernetes pod
/// discovery, one static target per `(address, node the pod runs on)` carrying the meta labels
/// pod discovery gives an exporter pod. Its relabelling runs unchanged.
fn shipped_exporter_job(targets: &[(&str, &str)]) -> Result<Yaml> {
    let path = repo_root().join("deploy/prometheus/scrape.yml");
    let doc: Yaml = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    let mut job = doc["scrape_configs"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"] == "ark-exporter")
        .cloned()
        .context("scrape.yml has no ark-exporter job")?;
    let m = job.as_mapping_mut().context("a job is a mapping")?;
    ensure!(
        m.remove("kubernetes_sd_configs").is_some(),
        "the exporter job discovers pods"
    );
    // The global interval of the test Prometheus applies instead of 15 s.
    m.remove("scrape_interval");
    let statics = targets
        .iter()
        .map(|(addr, node)| {
            serde_yaml::from_str::<Yaml>(&format!(
                "{{targets: ['{addr}'], labels: {{\
                 __meta_kubernetes_pod_node_name: '{node}', \
                 __meta_kubernetes_pod_label_app_kubernetes_io_name: ark-exporter, \
                 __meta_kubernetes_pod_container_port_name: metrics}}}}"
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    m.insert("static_configs".into(), Yaml::Sequence(statics));
    Ok(job)
}

/// Firing alerts named `alertname`, as their label sets.
async fn firing(prom: &Prometheus, alertname: &str) -> Result<Vec<Json>> {
    Ok(prom
        .query(&format!(
            "ALERTS{{alertname=\"{alertname}\", alertstate=\"firing\"}}"
        ))
        .await?
        .into_iter()
        .map(|s| s["metric"].clone())
        .collect())
}

fn nodes(alerts: &[Json]) -> BTreeSet<String> {
    alerts
        .iter()
        .filter_map(|a| a["node"].as_str())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn an_impostor_target_cannot_get_another_node_alerted() -> Result<()> {
    if ark_harness::skip_without_services("an_impostor_target_cannot_get_another_node_alerted") {
        return Ok(());
    }
    let (impostor, impostor_task) = serve(exporter_output(VICTIM)?).await?;
    let (honest, honest_task) = serve(exporter_output(HONEST)?).await?;
    let rule_files: Vec<_> = std::fs::read_dir(repo_root().join("alerts"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    let prom = Prometheus::start(PromConfig {
        scrape_interval: Duration::from_millis(250),
        evaluation_interval: Duration::from_millis(250),
        jobs: vec![shipped_exporter_job(&[
            (&impostor, IMPOSTOR_HOST),
            (&honest, HONEST),
        ])?],
        rule_files,
        ..PromConfig::default()
    })
    .await?;

    // Wait for GpuFellOffBus from both targets and the identity alert (or a deadline: on a
    // config without the identity rule it never comes, and the assertions below say why).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (fell_off, mismatch) = loop {
        let fell_off = firing(&prom, "GpuFellOffBus").await?;
        let mismatch = firing(&prom, "ArkNodeIdentityMismatch").await?;
        if (nodes(&fell_off).len() >= 2 && !mismatch.is_empty()) || Instant::now() > deadline {
            break (fell_off, mismatch);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // 1. The victim is never the subject of anything: no alert, no series.
    let victim_alerts = prom.query(&format!("ALERTS{{node=\"{VICTIM}\"}}")).await?;
    let named: Vec<String> = victim_alerts
        .iter()
        .map(|a| {
            format!(
                "{}({})",
                a["metric"]["alertname"], a["metric"]["alertstate"]
            )
        })
        .collect();
    ensure!(
        victim_alerts.is_empty(),
        "a target on {IMPOSTOR_HOST} got {VICTIM} alerted: {named:?}"
    );
    let victim_series = prom.query(&format!("{{node=\"{VICTIM}\"}}")).await?;
    ensure!(
        victim_series.is_empty(),
        "series carry node={VICTIM}: {:?}",
        victim_series.first()
    );
    // 2. The GPU fault is alerted on the node each target really runs on.
    ensure!(
        nodes(&fell_off) == BTreeSet::from([IMPOSTOR_HOST.to_owned(), HONEST.to_owned()]),
        "GpuFellOffBus fired for {:?}, expected the targets' own nodes",
        nodes(&fell_off)
    );
    // 3. The claim is reported, for the impostor only, and not as a healer condition.
    ensure!(
        mismatch.len() == 1,
        "ArkNodeIdentityMismatch: expected one alert, got {mismatch:?}"
    );
    let m = &mismatch[0];
    ensure!(
        m["node"] == IMPOSTOR_HOST && m["exported_node"] == VICTIM,
        "ArkNodeIdentityMismatch labels: {m}"
    );
    ensure!(m.get("condition").is_none(), "reaches the healer: {m}");
    // The exporter's own name survives as exported_node on the honest target's series too.
    let honest_up = prom
        .query(&format!(
            "ark_collector_up{{node=\"{HONEST}\", exported_node=\"{HONEST}\"}}"
        ))
        .await?;
    ensure!(
        !honest_up.is_empty(),
        "the honest exporter's own node name is kept"
    );

    impostor_task.abort();
    honest_task.abort();
    Ok(())
}
