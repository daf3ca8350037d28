//! Issue 18 on the REAL kube-apiserver v1.20, with the real binary and `deploy/healer/rbac.yaml`:
//! a `JobBlockedByNode` for a node whose own hardware alert is already being remediated starts no
//! second SOP; the job is recorded on the node's one ticket, once (docs/healer.md, "Jobs on
//! tickets"). The unit tests of the same rule (with the in-memory cluster) are in
//! `healer/src/executor/tests.rs`.

mod healer_support;

use std::time::Duration;

use anyhow::{Context, Result};
use ark_harness::KubeCluster;
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::json;

#[tokio::test]
async fn healer_records_a_blocked_job_on_the_culprits_reboot_ticket_without_a_second_sop()
-> Result<()> {
    if ark_harness::skip_without_services(
        "healer_records_a_blocked_job_on_the_culprits_reboot_ticket_without_a_second_sop",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("n1", &[]).await?;
    let dir = tempfile::tempdir()?;
    let cfg = "reconcile_interval_seconds = 1\n[lease]\nnamespace = \"ark-system\"\n";
    let healer = Healer::start(&kube, dir.path(), "healer", cfg)?;
    healer.ready().await?;
    let hw = alert("n1", "GpuFellOffBus", true, "2026-11-22T10:00:00Z");
    healer.post(&payload(vec![hw.clone()])).await?;
    wait_job(&admin, "reboot", &healer).await?;
    let before = ticket(&nodes.get("n1").await?).context("ticket")?;

    let mut job = alert("n1", "JobBlockedByNode", true, "2026-11-22T10:01:00Z");
    job["labels"]["job_id"] = json!("train-42");
    job["labels"]["resource"] = json!("gpu-0");
    job["labels"]["cause"] = json!("error.hw");
    job["annotations"]["victim_nodes"] = json!("3");
    job["fingerprint"] = json!("n1-JobBlockedByNode-train-42");
    for _ in 0..3 {
        healer.post(&payload(vec![hw.clone(), job.clone()])).await?;
    }
    // Recorded, and the reboot Job's status looked at (its record says "running"): from here on
    // nothing changes on the node.
    let t = wait_node(
        &nodes,
        "n1",
        "the job recorded on the reboot ticket",
        &healer,
        |n| {
            let t = ticket(n)?;
            let recorded = t["jobs"]
                .as_sequence()?
                .iter()
                .any(|j| j["jobId"] == "train-42");
            let running = t["workflows"].as_sequence()?.iter().any(|w| {
                w["action"] == "RunJob"
                    && w["message"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("running"))
            });
            (recorded && running).then_some(t)
        },
    )
    .await?;
    assert_eq!(t["condition"], "GpuFellOffBus", "{t:?}");
    assert_eq!(
        t["createdAt"], before["createdAt"],
        "a second ticket: {t:?}"
    );
    let jobs = t["jobs"].as_sequence().context("jobs")?;
    assert_eq!(jobs.len(), 1, "{t:?}");
    assert_eq!(jobs[0]["condition"], "JobBlockedByNode");
    assert_eq!(jobs[0]["victimNodes"].as_u64(), Some(3));
    let text = nodes
        .get("n1")
        .await?
        .metadata
        .annotations
        .unwrap_or_default()["ark.io/ticket"]
        .clone();
    assert!(text.contains("train-42"), "{text}");
    assert_eq!(count_jobs(&admin, "reboot").await?, 1, "one reboot Job");
    assert_eq!(count_jobs(&admin, "diagnose").await?, 0, "no second SOP");

    // The same alerts again, over several passes: the ticket is not rewritten. (Its text, not the
    // node's resourceVersion: the node lifecycle controller taints a node without a kubelet.)
    for _ in 0..3 {
        healer.post(&payload(vec![hw.clone(), job.clone()])).await?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let again = nodes
        .get("n1")
        .await?
        .metadata
        .annotations
        .unwrap_or_default()["ark.io/ticket"]
        .clone();
    assert_eq!(again, text, "the ticket was rewritten");
    Ok(())
}
