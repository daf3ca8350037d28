//! One smoke test per real service. Each asserts something only the real server returns, so a
//! stub in its place fails: Prometheus' build info and a scraped value, Alertmanager's webhook
//! payload format v4, the apiserver's 422 for an invalid taint effect and RBAC's 403.

use std::time::Duration;

use anyhow::Result;
use ark_harness::{
    Alertmanager, AmConfig, KubeCluster, PromConfig, Prometheus, Target, WebhookSink,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// Serves a fixed `/metrics` for Prometheus to scrape.
async fn metrics_target(body: &'static str) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let app =
        axum::Router::new().route("/metrics", axum::routing::get(move || async move { body }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    Ok((
        port,
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
    ))
}

#[tokio::test]
async fn prometheus_scrapes_and_answers_a_query() -> Result<()> {
    if ark_harness::skip_without_services("prometheus_scrapes_and_answers_a_query") {
        return Ok(());
    }
    let (port, target) =
        metrics_target("# TYPE ark_smoke_value gauge\nark_smoke_value{node=\"n1\"} 42\n").await?;
    let prom = Prometheus::start(PromConfig {
        scrape_interval: Duration::from_millis(100),
        evaluation_interval: Duration::from_millis(100),
        targets: vec![Target::new("smoke", format!("127.0.0.1:{port}"))],
        ..PromConfig::default()
    })
    .await?;
    let info = prom.build_info().await?;
    assert!(
        info["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("2.")),
        "not a Prometheus 2.x build: {info}"
    );
    let result = ark_harness::wait_for(
        "ark_smoke_value in Prometheus",
        Duration::from_secs(20),
        &[&prom.service],
        || async {
            let r = prom.query("ark_smoke_value").await?;
            Ok((!r.is_empty()).then_some(r))
        },
    )
    .await?;
    assert_eq!(result[0]["metric"]["node"], "n1");
    assert_eq!(result[0]["value"][1], "42");
    assert_eq!(prom.query("up{job=\"smoke\"}").await?[0]["value"][1], "1");
    // A PromQL syntax error is rejected by the real engine.
    assert!(prom.query("sum(").await.is_err());
    target.abort();
    Ok(())
}

#[tokio::test]
async fn alertmanager_delivers_an_injected_alert_to_a_webhook() -> Result<()> {
    if ark_harness::skip_without_services("alertmanager_delivers_an_injected_alert_to_a_webhook") {
        return Ok(());
    }
    let sink = WebhookSink::start().await?;
    let am = Alertmanager::start(AmConfig {
        bearer_token: Some("s3cret".into()),
        group_interval: Duration::from_millis(100),
        ..AmConfig::webhook(sink.url())
    })
    .await?;
    // Prometheus with this Alertmanager configured: readiness includes its discovery.
    let prom = Prometheus::start(PromConfig {
        alertmanager: Some(am.addr()),
        ..PromConfig::default()
    })
    .await?;
    assert!(
        am.status().await?["versionInfo"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("0."))
    );
    am.post_alerts(&json!([{
        "labels": {"alertname": "GpuFellOffBus", "node": "n1", "condition": "GpuFellOffBus", "severity": "critical"},
        "annotations": {"summary": "smoke"}
    }]))
    .await?;
    let got = sink
        .wait_for(Duration::from_secs(20), |r| r.body["status"] == "firing")
        .await?;
    assert_eq!(
        got.body["version"], "4",
        "Alertmanager webhook payload format: {}",
        got.body
    );
    assert_eq!(got.body["groupLabels"]["node"], "n1");
    assert_eq!(
        got.body["alerts"][0]["labels"]["condition"],
        "GpuFellOffBus"
    );
    assert_eq!(got.body["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(got.authorization.as_deref(), Some("Bearer s3cret"));
    // Alertmanager validates alerts: one without labels is refused.
    assert!(am.post_alerts(&json!([{"labels": {}}])).await.is_err());
    drop(prom);
    Ok(())
}

#[tokio::test]
async fn kube_apiserver_creates_and_cordons_a_node() -> Result<()> {
    if ark_harness::skip_without_services("kube_apiserver_creates_and_cordons_a_node") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    kube.create_node("gpu-node-1", &[("ark.io/test", "smoke")])
        .await?;
    let nodes: Api<Node> = Api::all(kube.client("admin").await?);
    nodes
        .patch(
            "gpu-node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    let node = nodes.get("gpu-node-1").await?;
    assert_eq!(node.spec.and_then(|s| s.unschedulable), Some(true));
    assert!(node.metadata.resource_version.is_some());

    // Validation only a real apiserver does: an invalid taint effect is a 422.
    let bad = json!({"spec": {"taints": [{"key": "ark.io/unhealthy", "effect": "Sometimes"}]}});
    match nodes
        .patch("gpu-node-1", &PatchParams::default(), &Patch::Merge(bad))
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 422, "{e:?}"),
        other => panic!("expected 422 for an invalid taint effect, got {other:?}"),
    }

    // RBAC is on: an authenticated user without bindings is forbidden.
    let nobody: Api<Node> = Api::all(kube.client("nobody").await?);
    match nobody.list(&Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("expected 403 for an unbound user, got {other:?}"),
    }

    // kubectl from the same build talks to it too.
    let out = kube.kubectl(&[
        "get",
        "node",
        "gpu-node-1",
        "-o",
        "jsonpath={.spec.unschedulable}",
    ])?;
    assert_eq!(out, "true");
    Ok(())
}

#[tokio::test]
async fn controller_manager_runs_jobs_and_pdbs() -> Result<()> {
    if ark_harness::skip_without_services("controller_manager_runs_jobs_and_pdbs") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    kube.create_node("n1", &[]).await?;
    kube.create_pod("work", "p1", "n1", &[("app", "train")])
        .await?;
    kube.create_pod("work", "p2", "n1", &[("app", "train")])
        .await?;
    kube.set_pod_ready("work", "p1").await?;
    kube.create_pdb("work", "train", &[("app", "train")], 1)
        .await?;
    // The disruption controller fills in the PDB status; a stub would not.
    let pdb = ark_harness::wait_for(
        "PDB status observed",
        Duration::from_secs(30),
        &[&kube.controller_manager],
        || async {
            let out = kube.kubectl(&["get", "pdb", "-n", "work", "train", "-o", "json"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            Ok(v["status"]["observedGeneration"]
                .as_i64()
                .is_some_and(|g| g >= 1)
                .then_some(v))
        },
    )
    .await?;
    assert_eq!(pdb["status"]["expectedPods"], 2);
    assert_eq!(
        pdb["status"]["currentHealthy"], 1,
        "only the Ready pod is healthy: {pdb}"
    );
    assert_eq!(pdb["status"]["disruptionsAllowed"], 0);

    // The job controller creates pods for a Job and completes it when they succeed.
    kube.ensure_namespace("ark-system").await?;
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "smoke", "namespace": "ark-system"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "registry.invalid/ark/pause:1"}]}}}
    });
    let path = std::env::temp_dir().join(format!("ark-smoke-job-{}.json", std::process::id()));
    std::fs::write(&path, job.to_string())?;
    kube.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()])?;
    let _ = std::fs::remove_file(&path);
    assert_eq!(kube.finish_job_pods("ark-system", "smoke", true).await?, 1);
    ark_harness::wait_for(
        "Job succeeded",
        Duration::from_secs(30),
        &[&kube.controller_manager],
        || async {
            let out = kube.kubectl(&[
                "get",
                "job",
                "-n",
                "ark-system",
                "smoke",
                "-o",
                "jsonpath={.status.succeeded}",
            ])?;
            Ok((out == "1").then_some(()))
        },
    )
    .await?;
    Ok(())
}
