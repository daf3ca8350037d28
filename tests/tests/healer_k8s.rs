//! ark-healer against the REAL kube-apiserver v1.20 (+ controller-manager for PDBs and Jobs),
//! driving the real binary with the `healer` token bound to exactly `deploy/healer/rbac.yaml`.

mod healer_support;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ark_harness::{KubeCluster, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

#[tokio::test]
async fn healer_rbac_is_minimal_and_the_gpu_reset_sop_runs_end_to_end() -> Result<()> {
    if ark_harness::skip_without_services(
        "healer_rbac_is_minimal_and_the_gpu_reset_sop_runs_end_to_end",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let healer_client = kube.client("healer").await?;

    // What the role must not do: delete nodes, read secrets (403 from the real RBAC).
    kube.create_node("victim", &[]).await?;
    let hn: Api<Node> = Api::all(healer_client.clone());
    match hn.delete("victim", &DeleteParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => bail!("healer role deleted a node: {other:?}"),
    }
    let secrets: Api<Secret> = Api::namespaced(healer_client.clone(), "kube-system");
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => bail!("healer role listed secrets: {other:?}"),
    }
    match secrets.get("anything").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => bail!("healer role read a secret: {other:?}"),
    }
    // The Deployment and its namespace-scoped objects are valid for the real server.
    let dep = ark_harness::repo_root().join("deploy/healer/deployment.yaml");
    let out = kube.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        dep.to_str().context("path")?,
    ])?;
    assert!(out.contains("deployment.apps/ark-healer"), "{out}");

    // Cluster: n1 (with a foreign taint the healer must keep), n2, a control-plane node and an
    // opted-out node.
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("n1", &[]).await?;
    let taint = json!({"spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}});
    nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&taint))
        .await?;
    kube.create_node("n2", &[]).await?;
    kube.create_node("cp", &[("node-role.kubernetes.io/master", "")])
        .await?;
    kube.create_node("off", &[("ark.io/disable", "true")])
        .await?;
    kube.create_pod("work", "p1", "n1", &[("app", "train")])
        .await?;
    kube.create_pod("work", "p2", "n1", &[("app", "train")])
        .await?;
    kube.create_pod("work", "other", "n2", &[("app", "train")])
        .await?;
    let _kubelet = kube.start_fake_kubelet().await?;

    let dir = tempfile::tempdir()?;
    let healer = Healer::start(
        &kube,
        dir.path(),
        "healer-a",
        "[lease]\nnamespace = \"ark-system\"\nduration_seconds = 6\n",
    )?;
    healer.ready().await?;

    // Bad input on the real binary: nothing happens.
    let r = reqwest::Client::new()
        .post(healer.url("/api/v1/alerts"))
        .bearer_auth("wrong")
        .json(&payload(vec![alert(
            "n2",
            "GpuHung",
            true,
            "2026-11-22T10:00:00Z",
        )]))
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    let r = reqwest::Client::new()
        .post(healer.url("/api/v1/alerts"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"version\": \"4\", \"alerts\": [")
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await?["error"].is_string());

    let t0 = "2026-11-22T10:00:00Z";
    let (code, body) = healer
        .post(&payload(vec![
            alert("n1", "GpuXidFatal", true, t0),
            alert("cp", "GpuXidFatal", true, t0),
            alert("off", "GpuXidFatal", true, t0),
            alert("ghost", "GpuHung", true, t0),
            alert("n2", "NoSuchCondition", true, t0),
        ]))
        .await?;
    assert_eq!((code, body["accepted"].as_u64()), (202, Some(5)));

    // Cordon + taint (foreign taint kept: read-modify-write), drain (pods evicted), then the
    // gpu-reset Job.
    let job = wait_job(&admin, "gpu-reset", &healer).await?;
    let n1 = nodes.get("n1").await?;
    assert!(unschedulable(&n1));
    let keys = taint_keys(&n1);
    assert!(
        keys.contains(&"nvidia.com/gpu".to_owned())
            && keys.contains(&"ark.io/unhealthy".to_owned()),
        "{keys:?}"
    );
    let t = ticket(&n1).context("ticket on n1")?;
    assert_eq!(t["condition"].as_str(), Some("GpuXidFatal"));
    assert_eq!(workflow_status(&t, "Cordon"), vec!["Succeeded"]);
    assert_eq!(workflow_status(&t, "Drain"), vec!["Succeeded"]);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "work");
    assert!(pods.get_opt("p1").await?.is_none() && pods.get_opt("p2").await?.is_none());
    assert!(
        pods.get_opt("other").await?.is_some(),
        "only pods of the node are evicted"
    );
    assert!(job.starts_with("ark-gpu-reset-n1-"), "{job}");

    kube.finish_job_pods("ark-system", &job, true).await?;
    wait_node(&nodes, "n1", "WaitCondition running", &healer, |n| {
        ticket(n)
            .filter(|t| workflow_status(t, "WaitCondition") == ["Running"])
            .map(|_| ())
    })
    .await?;
    // Not resolved yet: never uncordoned while the condition fires.
    assert!(unschedulable(&nodes.get("n1").await?));

    healer
        .post(&payload(vec![alert("n1", "GpuXidFatal", false, t0)]))
        .await?;
    let hc = wait_job(&admin, "healthcheck", &healer).await?;
    kube.finish_job_pods("ark-system", &hc, true).await?;
    let n1 = wait_node(
        &nodes,
        "n1",
        "n1 uncordoned and ticket resolved",
        &healer,
        |n| {
            let t = ticket(n)?;
            (t["status"].as_str() == Some("resolved")).then(|| n.clone())
        },
    )
    .await?;
    assert!(!unschedulable(&n1));
    assert_eq!(taint_keys(&n1), vec!["nvidia.com/gpu".to_owned()]);
    let t = ticket(&n1).context("ticket")?;
    for action in ["Cordon", "Taint", "Drain", "WaitCondition", "Uncordon"] {
        assert_eq!(workflow_status(&t, action), vec!["Succeeded"], "{action}");
    }
    assert_eq!(
        workflow_status(&t, "RunJob"),
        vec!["Succeeded", "Succeeded"]
    );
    // Finished Jobs are deleted (Background propagation: no orphaned pods).
    wait_for("jobs deleted", WAIT, &[], || async {
        Ok(
            (count_jobs(&admin, "gpu-reset").await? + count_jobs(&admin, "healthcheck").await?
                == 0)
                .then_some(()),
        )
    })
    .await?;

    // Untouched: control-plane, opted-out, unknown condition; the unknown node is not invented.
    for name in ["cp", "off", "n2"] {
        let n = nodes.get(name).await?;
        assert!(
            !unschedulable(&n) && ticket(&n).is_none(),
            "{name} was touched"
        );
    }
    assert!(nodes.get_opt("ghost").await?.is_none());

    // Every step is an Event (in `default`, where `kubectl describe node` finds it) and an audit line.
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let wanted = [
        "RemediationStarted",
        "Cordon",
        "Taint",
        "DrainStarted",
        "Uncordon",
        "RemediationResolved",
    ];
    // Events are posted in the background: wait for them.
    wait_for("Events about n1", WAIT, &[&healer.service], || async {
        let evs = events.list(&ListParams::default()).await?.items;
        let reasons: Vec<String> = evs
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some("n1"))
            .filter_map(|e| e.reason.clone())
            .collect();
        Ok(wanted
            .iter()
            .all(|w| reasons.iter().any(|r| r == w))
            .then_some(()))
    })
    .await?;
    let audit = healer.audit();
    let n1_steps: Vec<_> = audit
        .iter()
        .filter(|a| a["node"] == "n1" && a["status"] == "Succeeded")
        .map(|a| a["action"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        n1_steps,
        [
            "Cordon",
            "Taint",
            "Drain",
            "RunJob",
            "WaitCondition",
            "RunJob",
            "Uncordon"
        ]
    );
    assert!(
        audit
            .iter()
            .any(|a| a["node"] == "cp" && a["status"] == "Blocked")
    );

    let m = healer.metrics().await?;
    assert!(
        m.contains("ark_healer_sop_total{sop=\"gpu-reset\",status=\"resolved\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ark_healer_actions_blocked_total{reason=\"control_plane\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ark_healer_actions_blocked_total{reason=\"disabled\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ark_healer_selfheal_duration_seconds_count 1"),
        "{m}"
    );
    assert!(m.contains("ark_healer_is_leader 1"), "{m}");
    Ok(())
}

#[tokio::test]
async fn healer_resumes_after_a_restart_without_a_second_reboot() -> Result<()> {
    if ark_harness::skip_without_services("healer_resumes_after_a_restart_without_a_second_reboot")
    {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("n1", &[]).await?;
    let dir = tempfile::tempdir()?;
    let cfg = "[lease]\nnamespace = \"ark-system\"\nduration_seconds = 3\n";
    let healer = Healer::start(&kube, dir.path(), "healer-a", cfg)?;
    healer.ready().await?;
    let t0 = "2026-11-22T10:00:00Z";
    healer
        .post(&payload(vec![alert("n1", "GpuFellOffBus", true, t0)]))
        .await?;
    let job = wait_job(&admin, "reboot", &healer).await?;
    let before = ticket(&nodes.get("n1").await?).context("ticket")?;

    // Kill it between two steps (the reboot Job runs) and start a new one.
    drop(healer);
    let healer = Healer::start(&kube, dir.path(), "healer-b", cfg)?;
    healer.ready().await?;
    // Alertmanager re-sends on repeat_interval; the new process learns the alert again.
    healer
        .post(&payload(vec![alert("n1", "GpuFellOffBus", true, t0)]))
        .await?;
    // The new process has looked at the Job it did not create (its message changes to "running").
    wait_node(
        &nodes,
        "n1",
        "restarted healer sees the reboot Job",
        &healer,
        |n| {
            let t = ticket(n)?;
            let ws = t["workflows"].as_sequence()?;
            ws.iter()
                .any(|w| {
                    w["action"] == "RunJob"
                        && w["message"]
                            .as_str()
                            .is_some_and(|m| m.ends_with("running"))
                })
                .then_some(())
        },
    )
    .await?;
    assert_eq!(
        count_jobs(&admin, "reboot").await?,
        1,
        "a second reboot Job was created"
    );
    let after = ticket(&nodes.get("n1").await?).context("ticket")?;
    assert_eq!(
        after["createdAt"], before["createdAt"],
        "a new ticket was started"
    );
    for (i, action) in ["Cordon", "Taint", "Drain"].iter().enumerate() {
        assert_eq!(
            after["workflows"][i]["at"], before["workflows"][i]["at"],
            "{action} was repeated"
        );
    }
    kube.finish_job_pods("ark-system", &job, true).await?;
    wait_node(&nodes, "n1", "WaitCondition after reboot", &healer, |n| {
        ticket(n)
            .filter(|t| workflow_status(t, "WaitCondition") == ["Running"])
            .map(|_| ())
    })
    .await?;
    assert_eq!(
        workflow_status(&ticket(&nodes.get("n1").await?).context("t")?, "RunJob"),
        vec!["Succeeded"]
    );
    Ok(())
}

#[tokio::test]
async fn healer_budget_counts_manual_cordons_and_a_pdb_blocked_drain_escalates() -> Result<()> {
    if ark_harness::skip_without_services(
        "healer_budget_counts_manual_cordons_and_a_pdb_blocked_drain_escalates",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["n1", "n2", "n3", "n4"] {
        kube.create_node(n, &[]).await?;
    }
    // A human cordoned n4: it counts against the budget of 2.
    nodes
        .patch(
            "n4",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    // n1 runs a pod protected by a PDB that allows no disruption.
    kube.create_pod("work", "guarded", "n1", &[("app", "db")])
        .await?;
    kube.set_pod_ready("work", "guarded").await?;
    kube.create_pdb("work", "db", &[("app", "db")], 1).await?;
    let _kubelet = kube.start_fake_kubelet().await?;

    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(
        &catalog,
        "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: Drain, timeoutSeconds: 3}\n      - {action: RunJob, template: gpu-reset}\n",
    )?;
    let cfg = format!(
        "catalog_file = \"{}\"\n[budget]\nmax_unschedulable = 2\nmax_unschedulable_percent = 0.0\n[lease]\nnamespace = \"ark-system\"\n",
        catalog.display()
    );
    let healer = Healer::start(&kube, &dir.path().join("h"), "healer-a", &cfg)?;
    healer.ready().await?;
    let t0 = "2026-11-22T10:00:00Z";
    healer
        .post(&payload(vec![
            alert("n1", "GpuHung", true, t0),
            alert("n2", "GpuHung", true, t0),
            alert("n3", "GpuHung", true, t0),
        ]))
        .await?;

    // n1 gets the only free slot; its drain is refused by the PDB (429) until the bound, then
    // the ticket escalates and the pod is still there.
    let t = wait_node(&nodes, "n1", "n1 escalated", &healer, |n| {
        ticket(n).filter(|t| t["status"].as_str() == Some("escalated"))
    })
    .await?;
    assert_eq!(workflow_status(&t, "Drain"), vec!["Failed"]);
    let msg = t["workflows"][1]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(msg.contains("PodDisruptionBudget"), "{msg}");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "work");
    assert!(pods.get_opt("guarded").await?.is_some());
    assert_eq!(
        count_jobs(&admin, "gpu-reset").await?,
        0,
        "no Job after a failed drain"
    );

    // n2 and n3 stay schedulable; their tickets say why.
    for name in ["n2", "n3"] {
        let t = wait_node(&nodes, name, "budget block recorded", &healer, |n| {
            ticket(n).and_then(|t| t["blocked"].as_str().map(str::to_owned))
        })
        .await?;
        assert!(t.contains("disruption budget"), "{t}");
        assert!(!unschedulable(&nodes.get(name).await?));
    }
    let total_out = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| unschedulable(n))
        .count();
    assert_eq!(total_out, 2);
    let m = healer.metrics().await?;
    assert!(
        m.contains("ark_healer_actions_blocked_total{reason=\"disruption_budget\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("ark_healer_sop_total{sop=\"gpu-reset\",status=\"escalated\"} 1"),
        "{m}"
    );

    // Escalated: no further automatic action even when the alert re-fires.
    healer
        .post(&payload(vec![alert(
            "n1",
            "GpuHung",
            true,
            "2026-11-22T12:00:00Z",
        )]))
        .await?;
    wait_for(
        "escalation block counted",
        WAIT,
        &[&healer.service],
        || async {
            Ok(healer
                .metrics()
                .await?
                .contains("reason=\"escalated\"")
                .then_some(()))
        },
    )
    .await?;
    assert_eq!(
        ticket(&nodes.get("n1").await?).context("t")?["status"].as_str(),
        Some("escalated")
    );
    Ok(())
}

#[tokio::test]
async fn healer_leader_election_fails_over_to_the_second_replica() -> Result<()> {
    if ark_harness::skip_without_services("healer_leader_election_fails_over_to_the_second_replica")
    {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let dir = tempfile::tempdir()?;
    let cfg = "[lease]\nnamespace = \"ark-system\"\nduration_seconds = 3\n";
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", cfg)?;
    // b is up (healthz) but not leading: only one replica acts.
    let hz = b.url("/healthz");
    wait_for("replica-b healthz", WAIT, &[&b.service], || async {
        Ok(reqwest::get(&hz)
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ()))
    })
    .await?;
    // Give b several renew periods to (wrongly) take the lease, then check: never two leaders.
    for _ in 0..5 {
        assert!(
            a.is_leader().await && !b.is_leader().await,
            "two leaders or none"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(kube.client("admin").await?, "ark-system");
    let l = leases.get("ark-healer").await?;
    assert_eq!(
        l.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-a")
    );
    drop(a);
    b.wait_leader().await?;
    let l = leases.get("ark-healer").await?;
    let spec = l.spec.context("lease spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    Ok(())
}

#[tokio::test]
async fn healer_bad_input_causes_no_action() -> Result<()> {
    if ark_harness::skip_without_services("healer_bad_input_causes_no_action") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["ooo", "dup", "unknown", "control"] {
        kube.create_node(n, &[]).await?;
    }
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(
        &kube,
        dir.path(),
        "healer-a",
        "[budget]\nmax_unschedulable = 10\nmax_unschedulable_percent = 0.0\n[lease]\nnamespace = \"ark-system\"\n",
    )?;
    healer.ready().await?;
    let t0 = "2026-11-23T10:00:00Z";
    let client = reqwest::Client::new();
    let url = healer.url("/api/v1/alerts");

    // Rejected before parsing: no token, wrong content type, over 1 MiB (100,000 alerts).
    let r = client.post(&url).json(&payload(vec![])).send().await?;
    assert_eq!(r.status(), 401);
    let r = client
        .post(&url)
        .bearer_auth(TOKEN)
        .body("x")
        .header("content-type", "text/plain")
        .send()
        .await?;
    assert_eq!(r.status(), 415);
    let many: Vec<Value> = (0..100_000)
        .map(|i| alert(&format!("x{i}"), "GpuHung", true, t0))
        .collect();
    // The healer answers 413 from the headers and closes without reading the 15 MB body; the
    // client may see that answer or, still writing, a reset. Either way it was refused unread.
    match healer.post(&payload(many)).await {
        Ok((code, body)) => assert_eq!(code, 413, "{body}"),
        Err(e) => {
            let text = reqwest::get(healer.url("/metrics")).await?.text().await?;
            assert!(
                text.contains("ark_healer_webhook_requests_total{code=\"413\"} 1"),
                "{e:#}: {text}"
            );
        }
    }

    // Out of order: the resolution of an occurrence arrives before its firing.
    healer
        .post(&payload(vec![alert("ooo", "GpuHung", false, t0)]))
        .await?;
    healer
        .post(&payload(vec![alert("ooo", "GpuHung", true, t0)]))
        .await?;
    // Duplicates: the same firing alert three times, in one payload and in two more.
    let dup = alert("dup", "GpuNvlinkDown", true, t0);
    healer
        .post(&payload(vec![dup.clone(), dup.clone()]))
        .await?;
    healer.post(&payload(vec![dup.clone()])).await?;
    // Unknown condition and a node that does not exist.
    healer
        .post(&payload(vec![
            alert("unknown", "GpuOnFire", true, t0),
            alert("nowhere", "GpuHung", true, t0),
        ]))
        .await?;
    // Control: queued after all of the above, so once it is cordoned they were processed.
    healer
        .post(&payload(vec![alert("control", "GpuNvlinkDown", true, t0)]))
        .await?;
    wait_node(&nodes, "control", "control node cordoned", &healer, |n| {
        unschedulable(n).then_some(())
    })
    .await?;
    wait_node(&nodes, "dup", "dup node cordoned", &healer, |n| {
        unschedulable(n).then_some(())
    })
    .await?;

    for name in ["ooo", "unknown"] {
        let n = nodes.get(name).await?;
        assert!(
            !unschedulable(&n) && ticket(&n).is_none(),
            "{name} was touched"
        );
    }
    assert!(nodes.get_opt("nowhere").await?.is_none());
    let t = ticket(&nodes.get("dup").await?).context("ticket")?;
    assert_eq!(
        workflow_status(&t, "Cordon"),
        vec!["Succeeded"],
        "one Cordon for three copies"
    );
    let m = healer.metrics().await?;
    assert!(
        m.contains("ark_healer_webhook_requests_total{code=\"413\"} 1"),
        "{m}"
    );
    assert!(healer.service.ensure_running().is_ok());
    Ok(())
}
