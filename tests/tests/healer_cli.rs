//! The ark-healer binary's CLI: `plan` (JSON shape of the issue, with and without a cluster),
//! `serve --dry-run` without any cluster (still serves and plans), `tickets` on the real apiserver.

mod healer_support;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use ark_harness::{KubeCluster, Service, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

fn storm_file(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let t0 = "2026-11-23T10:00:00Z";
    let body = payload(vec![
        alert("n1", "GpuFellOffBus", true, t0),
        alert("n1", "DiskIoSlow", true, t0),
        alert("n2", "GpuXidApplication", true, t0),
        alert("n2", "NotACondition", true, t0),
        alert("ghost", "GpuHung", true, t0),
        alert("cp", "GpuHung", true, t0),
    ]);
    let path = dir.join("alerts.json");
    std::fs::write(&path, serde_json::to_vec(&body)?)?;
    Ok(path)
}

fn plan(args: &[&str]) -> Result<(Value, String)> {
    let out = Command::new(ark_harness::bin_path("ark-healer"))
        .arg("plan")
        .args(args)
        .args(["--output", "json"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        serde_json::from_slice(&out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

#[test]
fn healer_plan_without_a_cluster_prints_the_documented_shape() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = storm_file(dir.path())?;
    let (plan, stderr) = plan(&["--alerts", file.to_str().context("path")?])?;
    assert!(stderr.contains("empty cluster view"), "{stderr}");
    let keys: Vec<_> = plan
        .as_object()
        .context("object")?
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["ignored", "nodes"]);
    let n1 = plan["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == "n1"))
        .context("n1 planned")?;
    assert_eq!(
        n1,
        &json!({
            "node": "n1", "condition": "GpuFellOffBus", "priority": 2, "sop": "reboot",
            "steps": ["Cordon", "Taint(ark.io/unhealthy:NoSchedule)", "Drain", "RunJob(reboot)",
                      "WaitCondition", "RunJob(healthcheck)", "Uncordon"],
            "blocked": null,
            "deferred": [{"condition": "DiskIoSlow", "priority": 30}],
        })
    );
    // Without a cluster, unknown nodes are planned (empty view), not ignored.
    assert!(
        plan["nodes"]
            .as_array()
            .context("nodes")?
            .iter()
            .any(|n| n["node"] == "ghost")
    );
    let ignored = plan["ignored"].as_array().context("ignored")?;
    assert!(
        ignored
            .iter()
            .any(|i| i["node"] == "n2" && i["condition"] == "GpuXidApplication")
    );
    assert!(
        ignored
            .iter()
            .any(|i| i["node"] == "n2" && i["condition"] == "NotACondition")
    );
    Ok(())
}

/// `plan --nodes`: "what would the healer do now?" against a `kubectl get nodes -o json`
/// snapshot, no cluster: the snapshot's cordons count against the budget, its control-plane
/// label and tickets are honoured, unknown nodes are ignored. Bad snapshots are clear errors.
#[test]
fn healer_plan_against_a_nodes_snapshot_needs_no_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = storm_file(dir.path())?;
    let ticket = "condition: GpuHung\nstatus: escalated\ncreatedAt: 2026-11-23T09:00:00Z\n";
    let nodes = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cp",
            "labels": {"node-role.kubernetes.io/control-plane": ""}}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "manual"},
            "spec": {"unschedulable": true}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "esc",
            "annotations": {"ark.io/ticket": ticket}}},
    ]});
    let snap = dir.path().join("nodes.json");
    std::fs::write(&snap, serde_json::to_vec(&nodes)?)?;
    let config = dir.path().join("healer.toml");
    std::fs::write(
        &config,
        "[budget]\nmax_unschedulable = 1\nmax_unschedulable_percent = 0\n",
    )?;
    let (plan, stderr) = plan(&[
        "--alerts",
        file.to_str().context("path")?,
        "--nodes",
        snap.to_str().context("path")?,
        "--config",
        config.to_str().context("path")?,
    ])?;
    assert!(!stderr.contains("empty cluster view"), "{stderr}");
    let by = |n: &str| {
        plan["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|x| x["node"] == n))
            .cloned()
    };
    let n1 = by("n1").context("n1 planned")?;
    let blocked = n1["blocked"].as_str().unwrap_or_default();
    assert!(blocked.contains("disruption budget: 1 of 5"), "{n1}");
    assert!(
        by("cp").context("cp")?["blocked"]
            .as_str()
            .unwrap_or_default()
            .contains("control-plane")
    );
    assert!(
        by("ghost").is_none(),
        "a node not in the snapshot is ignored"
    );
    assert!(
        plan["ignored"]
            .as_array()
            .context("ignored")?
            .iter()
            .any(|i| i["node"] == "ghost" && i["reason"] == "node not found in the cluster")
    );
    // Bad snapshots: a clear error, exit non-zero.
    for (bad, why) in [
        ("{not json", "not JSON"),
        ("{\"kind\": \"Pod\"}", "neither a List"),
        ("{\"items\": [{\"metadata\": {}}]}", "no metadata.name"),
    ] {
        std::fs::write(&snap, bad)?;
        let out = Command::new(ark_harness::bin_path("ark-healer"))
            .args(["plan", "--alerts", file.to_str().context("path")?])
            .args(["--nodes", snap.to_str().context("path")?])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{bad}: {err}");
    }
    let help = Command::new(ark_harness::bin_path("ark-healer"))
        .args(["plan", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--nodes") && help.contains("kubectl get nodes -o json"),
        "{help}"
    );
    Ok(())
}

#[tokio::test]
async fn healer_plan_and_tickets_against_the_real_cluster() -> Result<()> {
    if ark_harness::skip_without_services("healer_plan_and_tickets_against_the_real_cluster") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    kube.create_node("n1", &[]).await?;
    kube.create_node("n2", &[]).await?;
    kube.create_node("cp", &[("node-role.kubernetes.io/master", "")])
        .await?;
    let dir = tempfile::tempdir()?;
    let file = storm_file(dir.path())?;
    let kc = kube.kubeconfig("healer");
    let (plan, _) = plan(&[
        "--alerts",
        file.to_str().context("path")?,
        "--kubeconfig",
        kc.to_str().context("path")?,
    ])?;
    let ignored = plan["ignored"].as_array().context("ignored")?;
    assert!(
        ignored
            .iter()
            .any(|i| i["node"] == "ghost" && i["reason"] == "node not found in the cluster"),
        "{plan}"
    );
    let cp = plan["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["node"] == "cp"))
        .context("cp")?;
    assert!(
        cp["blocked"]
            .as_str()
            .is_some_and(|b| b.contains("control-plane")),
        "{cp}"
    );

    // `tickets` reads annotations written by someone (here: by hand, then broken by hand).
    let nodes: Api<Node> = Api::all(kube.client("admin").await?);
    let t = "condition: GpuHung\nstatus: resolving\ncreatedAt: 2026-11-23T10:00:00Z\nworkflows:\n  - {action: Cordon, status: Succeeded, at: 2026-11-23T10:00:01Z}\n";
    let ann = |v: &str| json!({"metadata": {"annotations": {"ark.io/ticket": v}}});
    nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&ann(t)))
        .await?;
    nodes
        .patch(
            "n2",
            &PatchParams::default(),
            &Patch::Merge(&ann("status: [oops")),
        )
        .await?;
    let out = Command::new(ark_harness::bin_path("ark-healer"))
        .args(["tickets", "--output", "json", "--kubeconfig"])
        .arg(&kc)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout)?;
    let rows = rows.as_array().context("array")?;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().any(|r| r["node"] == "n1"
            && r["status"] == "resolving"
            && r["condition"] == "GpuHung")
    );
    assert!(
        rows.iter()
            .any(|r| r["node"] == "n2" && r["error"].as_str().is_some_and(|e| e.contains("n2")))
    );
    Ok(())
}

#[tokio::test]
async fn healer_serve_dry_run_without_a_cluster_still_serves_and_plans() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN)?;
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("healer.toml");
    std::fs::write(
        &config,
        format!(
            "audit_log = \"{}\"\nreconcile_interval_seconds = 1\n",
            audit.display()
        ),
    )?;
    let port = ark_harness::free_port();
    let mut cmd = Command::new(ark_harness::bin_path("ark-healer"));
    cmd.args(["serve", "--dry-run", "--web.listen-address"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--webhook-token-file")
        .arg(&token)
        .arg("--config")
        .arg(&config)
        // No cluster anywhere: a kubeconfig that does not exist.
        .env("KUBECONFIG", dir.path().join("missing-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST");
    let service = Service::spawn("healer-dry", &mut cmd, &dir.path().join("healer.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/readyz");
    wait_for(
        "dry-run healer ready",
        Duration::from_secs(30),
        &[&service],
        || async {
            Ok(reqwest::get(&ready)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ()))
        },
    )
    .await?;
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/alerts"))
        .bearer_auth(TOKEN)
        .json(&payload(vec![alert(
            "n1",
            "GpuHung",
            true,
            "2026-11-23T10:00:00Z",
        )]))
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    let lines = wait_for(
        "dry-run plan in the audit log",
        Duration::from_secs(30),
        &[&service],
        || async {
            let text = std::fs::read_to_string(&audit).unwrap_or_default();
            Ok(text
                .contains("dry-run: would run gpu-reset")
                .then_some(text))
        },
    )
    .await?;
    let rec: Value = serde_json::from_str(lines.lines().next().context("line")?)?;
    assert_eq!(
        (rec["node"].as_str(), rec["dry_run"].as_bool()),
        (Some("n1"), Some(true))
    );
    let m = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        m.contains("ark_healer_actions_blocked_total{reason=\"dry_run\"} 1"),
        "{m}"
    );
    assert!(service.log_tail(50).contains("empty cluster view"));
    Ok(())
}
