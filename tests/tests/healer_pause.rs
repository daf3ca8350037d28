//! The brake (`ark-healer pause | resume | status`) on the REAL kube-apiserver with two healer
//! replicas: paused, alerts keep arriving and plans are audited, but nothing is written to the
//! Node — not by the leader, and not by the standby after a failover; resumed, the next pass
//! acts.

mod healer_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ark_harness::{KubeCluster, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

const T0: &str = "2026-11-22T10:00:00Z";

/// `ark-healer <args> --kubeconfig <admin> --config <config>`: its stdout, or the failure.
fn cli(kube: &KubeCluster, config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(ark_harness::bin_path("ark-healer"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kube.kubeconfig("admin"))
        .arg("--config")
        .arg(config)
        .output()
        .context("running ark-healer")?;
    ensure!(
        out.status.success(),
        "ark-healer {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Waits until `h`'s audit log holds a blocked plan for `node` that names the pause.
async fn wait_paused_plan(h: &Healer, node: &str) -> Result<()> {
    wait_for(
        "a paused plan in the audit log",
        Duration::from_secs(30),
        &[&h.service],
        || async {
            Ok(h.audit()
                .iter()
                .any(|r| {
                    r["node"] == node
                        && r["status"] == "Blocked"
                        && r["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("paused by tester") && m.contains("drill"))
                })
                .then_some(()))
        },
    )
    .await
}

/// Ark's own taints (the controller-manager adds `node.kubernetes.io/not-ready` here: no kubelet).
fn ark_taints(n: &Node) -> Vec<String> {
    taint_keys(n)
        .into_iter()
        .filter(|k| k.starts_with("ark.io/"))
        .collect()
}

fn untouched(n: &Node) -> bool {
    !unschedulable(n) && ticket(n).is_none() && ark_taints(n).is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_across_a_failover_and_resume_acts() -> Result<()> {
    let Some((kube, admin)) = cluster_for("pause_holds_across_a_failover_and_resume_acts").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("p", &[]).await?;
    kube.create_node("spare", &[]).await?;
    let dir = tempfile::tempdir()?;
    let cfg = "[budget]\nmax_unschedulable = 0\nmax_unschedulable_percent = 0.0\n\
               [lease]\nnamespace = \"ark-system\"\nduration_seconds = 4\n";
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", cfg)?;
    b.ready().await?;
    let config = a.dir.join("healer.toml");

    let said = cli(
        &kube,
        &config,
        &["pause", "--reason", "drill", "--by", "tester"],
    )?;
    ensure!(said.contains("paused"), "pause said {said:?}");
    let status = cli(&kube, &config, &["status"])?;
    ensure!(
        status.contains("PAUSED by tester") && status.contains("drill"),
        "status said {status:?}"
    );
    ensure!(
        status.contains("leader: replica-a"),
        "status said {status:?}"
    );

    // Alerts keep arriving on both replicas; the leader plans and audits, writes nothing.
    let body = payload(vec![alert("p", "GpuHung", true, T0)]);
    for h in [&a, &b] {
        let (code, resp) = h.post(&body).await?;
        ensure!(code == 202, "webhook answered {code}: {resp}");
    }
    wait_paused_plan(&a, "p").await?;
    ensure!(
        a.metrics().await?.contains("ark_healer_paused 1"),
        "replica-a does not report the pause"
    );
    ensure!(
        a.is_leader().await,
        "the pause annotation cost replica-a its leadership"
    );

    // Failover: the standby reads the same switch.
    tokio::task::block_in_place(|| a.service.stop());
    b.wait_leader().await?;
    wait_paused_plan(&b, "p").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = nodes.get("p").await?;
    ensure!(
        untouched(&n),
        "p was written while paused: unschedulable {}, taints {:?}, ticket {:?}",
        unschedulable(&n),
        ark_taints(&n),
        ticket(&n)
    );
    let steps: Vec<_> = b
        .audit()
        .into_iter()
        .filter(|r| r["node"] == "p" && r["action"] != "Plan")
        .collect();
    ensure!(steps.is_empty(), "steps ran while paused: {steps:?}");

    // Resumed: the next pass acts.
    let said = cli(&kube, &config, &["resume"])?;
    ensure!(said.contains("resumed"), "resume said {said:?}");
    let status = cli(&kube, &config, &["status", "--output", "json"])?;
    let st: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(st["paused"].is_null(), "status after resume: {st}");
    ensure!(st["leader"] == "replica-b", "status after resume: {st}");
    wait_node(&nodes, "p", "p cordoned after resume", &b, |n| {
        unschedulable(n).then_some(())
    })
    .await?;
    ensure!(
        b.metrics().await?.contains("ark_healer_paused 0"),
        "replica-b still reports the pause"
    );
    Ok(())
}
