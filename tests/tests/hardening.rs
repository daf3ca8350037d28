//! Hardening (issue 10) on the REAL kube-apiserver v1.20 + controller-manager, driving the real
//! ark-healer binary with the `healer` token bound to exactly `deploy/healer/rbac.yaml`:
//! - a ticket annotation a human broke: reported, the node left alone until it is fixed;
//! - Alertmanager re-sending after a healer outage: no duplicate action;
//! - a flapping alert: no cordon/uncordon storm;
//! - two replicas, the leader SIGKILLed mid-SOP at each step boundary (after Cordon, during
//!   Drain, after the reboot Job was created): the other finishes it, no step repeated, one
//!   reboot Job;
//! - the apiserver stopped for 12 s (etcd kept) under webhook load and started again: the healer
//!   keeps acknowledging, retries within its bounds, stops leading when its Lease lapses, and
//!   resumes every SOP where its ticket says;
//! - a flood of 100,000 alerts: bounded memory, deduplicated, budget kept.
//!
//! Times and counts are measured and printed (on stderr), not asserted: the machines are
//! shared and slow. Assertions are on what the apiserver holds.

mod healer_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ark_harness::{CordonWatch, KubeCluster, wait_for};
use healer_support::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

const T0: &str = "2026-11-22T10:00:00Z";

/// Events the healer recorded about `node` (reason, message), oldest first.
async fn node_events(admin: &kube::Client, node: &str) -> Result<Vec<(String, String)>> {
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let mut out: Vec<_> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(node))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    out.sort();
    Ok(out)
}

/// Audit records of `node` with `action` (and `status` when given).
fn audit_count(records: &[Value], node: &str, action: &str, status: Option<&str>) -> usize {
    records
        .iter()
        .filter(|r| r["node"] == node && r["action"] == action)
        .filter(|r| status.is_none_or(|s| r["status"] == s))
        .count()
}

/// Value of one exact series (`name{labels}`) in a Prometheus text exposition; 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Sum of every series whose line starts with `prefix` in a Prometheus text exposition.
fn sum_metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The first Job made from `template`, if any.
async fn job_named(admin: &kube::Client, template: &str) -> Result<Option<String>> {
    let jobs: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
    let lp = ListParams::default().labels(&format!("ark.io/template={template}"));
    Ok(jobs
        .list(&lp)
        .await?
        .items
        .into_iter()
        .find_map(|j| j.metadata.name))
}

/// Every Job ever seen in `ark-system`, by UID (the healer deletes finished Jobs, so a count at
/// the end would miss them, and a Job deleted and made again under the same name is a second
/// Job); polled every 100 ms until dropped.
struct JobsSeen {
    uids: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl JobsSeen {
    fn start(admin: &kube::Client) -> Self {
        let jobs: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
        let uids: Arc<std::sync::Mutex<BTreeMap<String, String>>> = Arc::default();
        let task = {
            let uids = uids.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(list) = jobs.list(&ListParams::default()).await {
                        let mut u = uids.lock().unwrap_or_else(|p| p.into_inner());
                        u.extend(
                            list.items
                                .into_iter()
                                .filter_map(|j| Some((j.metadata.uid?, j.metadata.name?))),
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        JobsSeen { uids, task }
    }

    /// Names of the distinct Jobs (one entry per UID) whose name starts with `prefix`, sorted.
    fn with_prefix(&self, prefix: &str) -> Vec<String> {
        let u = self.uids.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = u
            .values()
            .filter(|j| j.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        names
    }
}

impl Drop for JobsSeen {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn annotation(n: &Node, key: &str) -> Option<String> {
    n.metadata.annotations.as_ref()?.get(key).cloned()
}

/// `(action, status, at)` of every workflow entry of a ticket.
fn workflows(t: &serde_yaml::Value) -> Vec<(String, String, String)> {
    t["workflows"]
        .as_sequence()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
                    (s("action"), s("status"), s("at"))
                })
                .collect()
        })
        .unwrap_or_default()
}

const NO_BUDGET_LIMIT: &str = "[budget]\nmax_unschedulable = 0\nmax_unschedulable_percent = 0.0\n";

#[tokio::test]
async fn hardening_a_garbage_ticket_is_reported_and_the_node_left_alone_until_fixed() -> Result<()>
{
    if ark_harness::skip_without_services(
        "hardening_a_garbage_ticket_is_reported_and_the_node_left_alone_until_fixed",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("broken", &[]).await?;
    kube.create_node("healthy", &[]).await?;
    // A human "fixed" the ticket by hand: not YAML any more, and an unknown status.
    let garbage = "condition: GpuHung\nstatus: [exploded\ncreatedAt: yesterday\n";
    nodes
        .patch(
            "broken",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"ark.io/ticket": garbage}}})),
        )
        .await?;

    let dir = tempfile::tempdir()?;
    let cfg = format!("{NO_BUDGET_LIMIT}[lease]\nnamespace = \"ark-system\"\n");
    let healer = Healer::start(&kube, dir.path(), "healer-a", &cfg)?;
    healer.ready().await?;
    let t = Instant::now();
    let (code, _) = healer
        .post(&payload(vec![
            alert("broken", "GpuHung", true, T0),
            alert("healthy", "GpuHung", true, T0),
        ]))
        .await?;
    assert_eq!(code, 202);

    // The healthy node is acted on (so the healer is working), the broken one is reported.
    wait_node(&nodes, "healthy", "healthy node cordoned", &healer, |n| {
        unschedulable(n).then_some(())
    })
    .await?;
    let m = wait_for(
        "invalid_ticket counted",
        WAIT,
        &[&healer.service],
        || async {
            let m = healer.metrics().await?;
            Ok((metric(
                &m,
                "ark_healer_actions_blocked_total{reason=\"invalid_ticket\"}",
            ) >= 1.0)
                .then_some(m))
        },
    )
    .await?;
    let reported = t.elapsed();
    // Several more reconcile passes (1 s each) must not touch it either, nor count it again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = nodes.get("broken").await?;
    assert!(!unschedulable(&n), "the broken-ticket node was cordoned");
    assert!(
        !taint_keys(&n).contains(&"ark.io/unhealthy".to_owned()),
        "the broken-ticket node was tainted: {:?}",
        taint_keys(&n)
    );
    assert_eq!(
        annotation(&n, "ark.io/ticket").as_deref(),
        Some(garbage),
        "the healer overwrote a ticket it could not read"
    );
    let m2 = healer.metrics().await?;
    assert_eq!(
        metric(
            &m2,
            "ark_healer_actions_blocked_total{reason=\"invalid_ticket\"}"
        ),
        1.0,
        "a block is counted once per node, not per pass:\n{m}"
    );
    let audit = healer.audit();
    let blocked: Vec<&Value> = audit
        .iter()
        .filter(|r| r["node"] == "broken" && r["status"] == "Blocked")
        .collect();
    assert_eq!(blocked.len(), 1, "{audit:?}");
    let why = blocked[0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains("invalid ticket"), "{why}");
    assert!(why.contains("broken"), "the message names the node: {why}");
    assert_eq!(audit_count(&audit, "broken", "Cordon", None), 0);
    // The Event is posted in the background: give it a moment, then it must be there, once.
    let mut events = Vec::new();
    for _ in 0..50 {
        events = node_events(&admin, "broken").await?;
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let invalid: Vec<_> = events
        .iter()
        .filter(|(r, _)| r == "InvalidTicket")
        .collect();
    assert_eq!(
        invalid.len(),
        1,
        "one Warning Event about the broken ticket: {events:?}"
    );
    assert!(invalid[0].1.contains("ark.io/ticket"), "{invalid:?}");
    eprintln!(
        "garbage ticket: reported after {reported:?} (metric ark_healer_actions_blocked_total{{reason=\"invalid_ticket\"}} 1, audit: {why:?}); \
         Kubernetes Events about the node: {} {events:?}",
        events.len()
    );

    // Fixed by the human (annotation removed): the healer now acts on the node.
    let t = Instant::now();
    nodes
        .patch(
            "broken",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"ark.io/ticket": null}}})),
        )
        .await?;
    let tk = wait_node(&nodes, "broken", "fixed node cordoned", &healer, |n| {
        unschedulable(n).then(|| ticket(n)).flatten()
    })
    .await?;
    assert_eq!(tk["condition"].as_str(), Some("GpuHung"));
    eprintln!(
        "garbage ticket: after the fix the node was cordoned in {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn hardening_alertmanager_resends_after_a_healer_outage_cause_no_duplicate_action()
-> Result<()> {
    if ark_harness::skip_without_services(
        "hardening_alertmanager_resends_after_a_healer_outage_cause_no_duplicate_action",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("n1", &[]).await?;
    let dir = tempfile::tempdir()?;
    // No leader election: the restarted process acts at once (the Lease case is the failover
    // test below).
    let cfg = "[lease]\nenabled = false\n";
    let body = payload(vec![alert("n1", "GpuFellOffBus", true, T0)]);
    let healer = Healer::start(&kube, dir.path(), "healer-a", cfg)?;
    healer.ready().await?;
    healer.post(&body).await?;
    let job = wait_job(&admin, "reboot", &healer).await?;
    let before = ticket(&nodes.get("n1").await?).context("ticket")?;

    // Outage: the healer is down; Alertmanager's notifications fail (and it retries).
    let port = healer.port;
    healer.service.stop();
    let refused = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/alerts"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await;
    assert!(refused.is_err(), "the stopped healer still answered");
    drop(healer);

    // Back up (same audit log): Alertmanager re-sends the same group several times (retries,
    // then repeat_interval).
    let healer = Healer::start(&kube, dir.path(), "healer-b", cfg)?;
    healer.ready().await?;
    let t = Instant::now();
    for _ in 0..5 {
        let (code, _) = healer.post(&body).await?;
        assert_eq!(code, 202);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The new process has looked at the Job it did not create.
    wait_node(
        &nodes,
        "n1",
        "restarted healer sees the Job",
        &healer,
        |n| {
            let t = ticket(n)?;
            t["workflows"]
                .as_sequence()?
                .iter()
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
    // A few more passes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = ticket(&nodes.get("n1").await?).context("ticket")?;
    assert_eq!(after["createdAt"], before["createdAt"], "a second ticket");
    assert_eq!(workflow_status(&after, "Cordon"), vec!["Succeeded"]);
    assert_eq!(workflow_status(&after, "Taint"), vec!["Succeeded"]);
    assert_eq!(workflow_status(&after, "Drain"), vec!["Succeeded"]);
    let (wb, wa) = (workflows(&before), workflows(&after));
    for i in 0..3 {
        assert_eq!(wa[i], wb[i], "step {i} was redone after the restart");
    }
    assert_eq!(
        count_jobs(&admin, "reboot").await?,
        1,
        "a second reboot Job"
    );
    let audit = healer.audit();
    let cordons = audit_count(&audit, "n1", "Cordon", Some("Succeeded"));
    let jobs_created = audit
        .iter()
        .filter(|r| r["node"] == "n1" && r["action"] == "RunJob")
        .filter(|r| r["message"].as_str().is_some_and(|m| m.contains("created")))
        .count();
    assert_eq!(cordons, 1, "{audit:#?}");
    let events = node_events(&admin, "n1").await?;
    let cordon_events = events.iter().filter(|(r, _)| r == "Cordon").count();
    assert_eq!(cordon_events, 1, "{events:?}");
    eprintln!(
        "outage + 5 re-sends: 1 ticket, Cordon audited {cordons}x, Cordon Events {cordon_events}, \
         reboot Jobs 1 ({job}), RunJob 'created' audit records {jobs_created}; resumed in {:?}",
        t.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn hardening_a_flapping_alert_causes_no_cordon_storm() -> Result<()> {
    if ark_harness::skip_without_services("hardening_a_flapping_alert_causes_no_cordon_storm") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("flappy", &[]).await?;
    let dir = tempfile::tempdir()?;
    // A short SOP so the flapping crosses a whole remediation: cordon, wait for the alert to
    // resolve, healthcheck, uncordon (only while resolved). The default cooldown (1 h) must then
    // hold the node.
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(
        &catalog,
        "conditions:\n  GpuHung: {priority: 3, sop: flap}\nsops:\n  flap:\n    steps:\n      - {action: Cordon}\n      - {action: WaitCondition, timeoutSeconds: 600}\n      - {action: RunJob, template: healthcheck, timeoutSeconds: 600}\n      - {action: Uncordon}\n",
    )?;
    let cfg = format!(
        "catalog_file = \"{}\"\n[lease]\nenabled = false\n",
        catalog.display()
    );
    let healer = Healer::start(&kube, &dir.path().join("h"), "healer-a", &cfg)?;
    healer.ready().await?;
    let watch = CordonWatch::start(nodes.clone()).await?;

    // 12 cycles: firing for 1 s, resolved for 1 s (each a new startsAt, as Prometheus makes a
    // new alert instance after a resolve).
    let t = Instant::now();
    let cycles = 12;
    let mut healthchecked = false;
    for i in 0..cycles {
        let starts = format!("2026-11-22T10:{:02}:00Z", i);
        let mut resolved = alert("flappy", "GpuHung", false, &starts);
        resolved["endsAt"] = json!(format!("2026-11-22T10:{:02}:30Z", i));
        healer
            .post(&payload(vec![alert("flappy", "GpuHung", true, &starts)]))
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        healer.post(&payload(vec![resolved])).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The healthcheck Job's pod "runs" and succeeds, as a kubelet would make it.
        if !healthchecked && let Some(job) = job_named(&admin, "healthcheck").await? {
            kube.finish_job_pods("ark-system", &job, true).await?;
            healthchecked = true;
        }
    }
    // Let the last resolve be processed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cordons, uncordons, _) = watch.finish().await;
    let n = nodes.get("flappy").await?;
    let tk = ticket(&n).context("ticket")?;
    let audit = healer.audit();
    let m = healer.metrics().await?;
    let cooldown_blocks = metric(&m, "ark_healer_actions_blocked_total{reason=\"cooldown\"}");
    eprintln!(
        "flapping {cycles} cycles over {:?}: cordons {cordons}, uncordons {uncordons}, ticket status {:?}, \
         Cordon audited {}x, Uncordon audited {}x, cooldown blocks {cooldown_blocks}",
        t.elapsed(),
        tk["status"].as_str(),
        audit_count(&audit, "flappy", "Cordon", Some("Succeeded")),
        audit_count(&audit, "flappy", "Uncordon", Some("Succeeded")),
    );
    assert_eq!(cordons, 1, "cordoned {cordons} times");
    assert_eq!(uncordons, 1, "uncordoned {uncordons} times");
    assert_eq!(
        audit_count(&audit, "flappy", "Cordon", Some("Succeeded")),
        1
    );
    assert!(audit_count(&audit, "flappy", "Uncordon", Some("Succeeded")) <= 1);
    // One remediation, and the node ends schedulable (the SOP finished) with the cooldown
    // holding off the next ones.
    assert_eq!(tk["status"].as_str(), Some("resolved"), "{tk:?}");
    assert!(!unschedulable(&n));
    assert!(cooldown_blocks >= 1.0, "{m}");
    Ok(())
}

/// Where in the SOP the leader is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Boundary {
    /// The ticket shows Cordon Succeeded.
    AfterCordon,
    /// The ticket shows Drain Running and the pod is evicted but not gone (no kubelet yet).
    DuringDrain,
    /// The reboot Job exists in the apiserver.
    AfterRunJobCreated,
}

#[tokio::test]
async fn hardening_leader_sigkilled_after_cordon_the_other_replica_finishes_the_sop_once()
-> Result<()> {
    leader_sigkilled_at(Boundary::AfterCordon).await
}

#[tokio::test]
async fn hardening_leader_sigkilled_during_drain_the_other_replica_finishes_the_sop_once()
-> Result<()> {
    leader_sigkilled_at(Boundary::DuringDrain).await
}

#[tokio::test]
async fn hardening_leader_sigkilled_after_runjob_created_no_second_reboot_job() -> Result<()> {
    leader_sigkilled_at(Boundary::AfterRunJobCreated).await
}

/// Two replicas; the leader is SIGKILLed at `at`; the other must take over within the lease
/// and finish the SOP with no step redone and exactly one reboot Job.
async fn leader_sigkilled_at(at: Boundary) -> Result<()> {
    if ark_harness::skip_without_services(&format!("hardening_leader_sigkilled {at:?}")) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "work");
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ark-system");
    kube.create_node("n1", &[]).await?;
    // A pod to drain. Until the kubelet runs the evicted pod lingers, so the drain is still in
    // progress when the leader dies at Cordon or Drain; to reach RunJob it must run from the start.
    kube.create_pod("work", "p1", "n1", &[("app", "train")])
        .await?;
    let mut kubelet = None;
    if at == Boundary::AfterRunJobCreated {
        kubelet = Some(kube.start_fake_kubelet().await?);
    }
    let dir = tempfile::tempdir()?;
    let lease_s = 4;
    let cfg = format!("[lease]\nnamespace = \"ark-system\"\nduration_seconds = {lease_s}\n");
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", &cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", &cfg)?;
    let hz = b.url("/healthz");
    wait_for("replica-b up", WAIT, &[&b.service], || async {
        Ok(reqwest::get(&hz)
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ()))
    })
    .await?;
    assert!(!b.is_leader().await, "two leaders");

    let jobs_seen = JobsSeen::start(&admin);
    let body = payload(vec![alert("n1", "GpuFellOffBus", true, T0)]);
    a.post(&body).await?;
    // SIGKILL the leader the moment the apiserver shows the boundary.
    let at_kill = wait_for(&format!("{at:?}"), WAIT, &[&a.service], || async {
        let n = nodes.get("n1").await?;
        let Some(t) = ticket(&n) else { return Ok(None) };
        let reached = match at {
            Boundary::AfterCordon => workflow_status(&t, "Cordon") == ["Succeeded"],
            Boundary::DuringDrain => {
                let evicted = pods
                    .get_opt("p1")
                    .await?
                    .is_some_and(|p| p.metadata.deletion_timestamp.is_some());
                workflow_status(&t, "Drain") == ["Running"] && evicted
            }
            Boundary::AfterRunJobCreated => job_named(&admin, "reboot").await?.is_some(),
        };
        Ok(reached.then_some(t))
    })
    .await?;
    a.service.signal(libc::SIGKILL);
    let killed = Instant::now();
    a.service.wait_exit(Duration::from_secs(10))?;
    let snapshot = ticket(&nodes.get("n1").await?).context("ticket")?;
    let job_at_kill = job_named(&admin, "reboot").await?;
    eprintln!(
        "{at:?}: killed replica-a with the ticket at (polled): {:?}; a moment later: {:?}; reboot Job: {job_at_kill:?}",
        workflows(&at_kill),
        workflows(&snapshot)
    );

    b.wait_leader().await?;
    let takeover = killed.elapsed();
    let l = leases.get("ark-healer").await?;
    let spec = l.spec.context("lease spec")?;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    // Alertmanager re-sends the group to the new leader (the Service now points at it).
    b.post(&body).await?;
    if kubelet.is_none() {
        kubelet = Some(kube.start_fake_kubelet().await?);
    }

    let job = wait_job(&admin, "reboot", &b).await?;
    if let Some(j) = &job_at_kill {
        assert_eq!(&job, j, "replica-b uses the Job replica-a created");
    }
    kube.finish_job_pods("ark-system", &job, true).await?;
    wait_node(&nodes, "n1", "WaitCondition after the reboot", &b, |n| {
        ticket(n)
            .filter(|t| workflow_status(t, "WaitCondition") == ["Running"])
            .map(|_| ())
    })
    .await?;
    let mut resolved = alert("n1", "GpuFellOffBus", false, T0);
    resolved["endsAt"] = json!("2026-11-22T10:30:00Z");
    b.post(&payload(vec![resolved])).await?;
    let hc = wait_job(&admin, "healthcheck", &b).await?;
    kube.finish_job_pods("ark-system", &hc, true).await?;
    let done = wait_node(&nodes, "n1", "SOP finished", &b, |n| {
        ticket(n).filter(|t| t["status"].as_str() == Some("resolved"))
    })
    .await?;
    let total = killed.elapsed();
    drop(kubelet);

    // Steps recorded before the kill were not redone; every step ran once.
    let (before, after) = (workflows(&snapshot), workflows(&done));
    for (i, w) in before.iter().enumerate() {
        if w.1 == "Succeeded" {
            assert_eq!(&after[i], w, "step {i} ({}) was redone by replica-b", w.0);
        }
    }
    let actions: Vec<&str> = after.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(
        actions,
        [
            "Cordon",
            "Taint",
            "Drain",
            "RunJob",
            "WaitCondition",
            "RunJob",
            "Uncordon"
        ],
        "{after:?}"
    );
    assert!(after.iter().all(|w| w.1 == "Succeeded"), "{after:?}");
    // One reboot Job and one health check Job ever existed (by UID: a Job deleted and created
    // again under the same name would be a second reboot).
    let reboots = jobs_seen.with_prefix("ark-reboot-");
    assert_eq!(
        reboots,
        std::slice::from_ref(&job),
        "reboot Jobs seen: {reboots:?}"
    );
    let checks = jobs_seen.with_prefix("ark-healthcheck-");
    assert_eq!(
        checks,
        std::slice::from_ref(&hc),
        "healthcheck Jobs seen: {checks:?}"
    );
    // No step succeeded twice in the two audit logs together (a replica killed between the
    // ticket patch and its audit line may leave one out, never add one).
    let audits = [a.audit(), b.audit()].concat();
    for (i, (action, ..)) in after.iter().enumerate() {
        let n = audits
            .iter()
            .filter(|r| r["node"] == "n1" && r["step"] == i && r["status"] == "Succeeded")
            .count();
        assert!(n <= 1, "step {i} ({action}) succeeded {n} times");
    }
    let n = nodes.get("n1").await?;
    assert!(!unschedulable(&n));
    assert!(!taint_keys(&n).contains(&"ark.io/unhealthy".to_owned()));
    let cordons_a = audit_count(&a.audit(), "n1", "Cordon", Some("Succeeded"));
    let cordons_b = audit_count(&b.audit(), "n1", "Cordon", Some("Succeeded"));
    let spec = leases.get("ark-healer").await?.spec.context("lease")?;
    eprintln!(
        "failover at {at:?}: replica-b ready {takeover:?} after the SIGKILL (lease {lease_s} s), transitions {:?}; \
         SOP finished {total:?} after the kill; Cordon by a {cordons_a} / b {cordons_b}; Jobs created {reboots:?} {checks:?}",
        spec.lease_transitions
    );
    Ok(())
}

#[tokio::test]
async fn hardening_apiserver_restarted_under_load_the_healer_retries_and_resumes() -> Result<()> {
    if ark_harness::skip_without_services(
        "hardening_apiserver_restarted_under_load_the_healer_retries_and_resumes",
    ) {
        return Ok(());
    }
    const NODES: usize = 8;
    // Longer than the lease and than one request's retry budget (5 attempts, ~4 s of backoff).
    const OUTAGE: Duration = Duration::from_secs(12);
    let mut kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let names: Vec<String> = (0..NODES).map(|i| format!("r{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        kube.create_node(n, &[]).await?;
        kube.create_pod("work", &format!("p{i}"), n, &[("app", "train")])
            .await?;
    }
    let kubelet = kube.start_fake_kubelet().await?;
    let dir = tempfile::tempdir()?;
    let lease_s = 6;
    let cfg = format!(
        "{NO_BUDGET_LIMIT}[lease]\nnamespace = \"ark-system\"\nduration_seconds = {lease_s}\n"
    );
    let healer = Healer::start(&kube, dir.path(), "healer-restart", &cfg)?;
    healer.ready().await?;
    let jobs_seen = JobsSeen::start(&admin);
    let body = payload(
        names
            .iter()
            .map(|n| alert(n, "GpuFellOffBus", true, T0))
            .collect(),
    );

    // Load: Alertmanager re-sends the group every 200 ms for the whole test; every post must be
    // answered (the webhook does not depend on the apiserver).
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, body, stop) = (
            healer.url("/api/v1/alerts"),
            body.to_string(),
            stop_load.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?;
            let (mut ok, mut other, mut slowest) = (0usize, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                slowest = slowest.max(t.elapsed());
                match r {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => other.push(r.status().to_string()),
                    Err(e) => other.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok((ok, other, slowest))
        })
    };

    // Stop the apiserver mid-SOP: the moment the first node is cordoned.
    wait_for("first Cordon", WAIT, &[&healer.service], || async {
        let list = nodes.list(&ListParams::default()).await?;
        Ok(list.items.iter().any(unschedulable).then_some(()))
    })
    .await?;
    // Each node's steps just before the apiserver goes away: none of those may be redone.
    let mut before = BTreeMap::new();
    for n in &names {
        let t = ticket(&nodes.get(n).await?);
        before.insert(n.clone(), t.as_ref().map(workflows).unwrap_or_default());
    }
    kube.apiserver_stop();
    let down = Instant::now();
    tokio::time::sleep(OUTAGE / 2).await;
    let retries_during = sum_metric(&healer.metrics().await?, "ark_healer_kube_retries_total{");
    // The Lease (6 s) lapsed during the outage: the healer must have stopped leading.
    tokio::time::sleep(OUTAGE / 2).await;
    let leader_during = metric(&healer.metrics().await?, "ark_healer_is_leader");
    let ready_during = healer.is_ready().await;
    healer.service.ensure_running()?;
    kube.apiserver_start().await?;
    let up = Instant::now();
    eprintln!(
        "apiserver down {:?}: healer retried {retries_during} requests in the first half, \
         is_leader {leader_during} and ready {ready_during} at the end",
        down.elapsed()
    );
    healer.wait_leader().await?;
    let leader_again = up.elapsed();

    // Resumes: every node reaches its reboot Job, made once.
    let job_api: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
    let lp = ListParams::default().labels("ark.io/template=reboot");
    let jobs = wait_for(
        "a reboot Job per node",
        WAIT,
        &[&healer.service],
        || async {
            let names: Vec<String> = job_api
                .list(&lp)
                .await?
                .items
                .into_iter()
                .filter_map(|j| j.metadata.name)
                .collect();
            Ok((names.len() == NODES).then_some(names))
        },
    )
    .await
    .with_context(|| format!("healer log:\n{}", healer.service.log_tail(40)))?;
    let resumed = up.elapsed();
    for j in &jobs {
        kube.finish_job_pods("ark-system", j, true).await?;
    }
    for n in &names {
        wait_node(
            &nodes,
            n,
            "WaitCondition after the reboot",
            &healer,
            |node| {
                ticket(node)
                    .filter(|t| workflow_status(t, "WaitCondition") == ["Running"])
                    .map(|_| ())
            },
        )
        .await?;
    }
    let all_rebooted = up.elapsed();
    stop_load.store(true, Ordering::SeqCst);
    let (acked, failed_posts, slowest_post) = load.await??;
    drop(kubelet);

    assert!(
        failed_posts.is_empty(),
        "webhook posts not acknowledged: {failed_posts:?}"
    );
    assert!(
        retries_during > 0.0,
        "the healer retried against the dead apiserver"
    );
    assert_eq!(leader_during, 0.0, "still leading with a lapsed Lease");
    // /readyz says "serves", not "leads" (issue 14): only the leader metric must drop.
    let reboots = jobs_seen.with_prefix("ark-reboot-");
    assert_eq!(reboots.len(), NODES, "one reboot Job per node: {reboots:?}");
    for n in &names {
        let t = ticket(&nodes.get(n).await?).context("ticket")?;
        let w = workflows(&t);
        let actions: Vec<&str> = w.iter().map(|w| w.0.as_str()).collect();
        assert_eq!(
            actions,
            ["Cordon", "Taint", "Drain", "RunJob", "WaitCondition"],
            "{n}: {w:?}"
        );
        assert!(
            w.iter().all(|s| s.1 != "Failed"),
            "{n}: a step failed because the apiserver was away: {w:?}"
        );
        for (i, s) in before[n].iter().enumerate() {
            if s.1 == "Succeeded" {
                assert_eq!(&w[i], s, "{n}: step {i} redone after the restart");
            }
        }
    }
    let text = healer.metrics().await?;
    let retries = sum_metric(&text, "ark_healer_kube_retries_total{");
    let retry_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ark_healer_kube_retries_total{"))
        .collect();
    let progress: Vec<usize> = before
        .values()
        .map(|w| w.iter().filter(|s| s.1 == "Succeeded").count())
        .collect();
    eprintln!(
        "apiserver restart under load: {NODES} nodes, steps done per node at the stop {progress:?}; \
         outage {OUTAGE:?}; healer leader again {leader_again:?} after the apiserver was ready, \
         every reboot Job created {resumed:?} after, every node past its reboot {all_rebooted:?} after; \
         {acked} webhook posts acknowledged (slowest {slowest_post:?}), 0 failed; \
         {retries} Kubernetes retries in all: {retry_lines:?}"
    );
    Ok(())
}

#[tokio::test]
async fn hardening_flood_of_100k_alerts_bounded_memory_dedup_and_budget() -> Result<()> {
    if ark_harness::skip_without_services(
        "hardening_flood_of_100k_alerts_bounded_memory_dedup_and_budget",
    ) {
        return Ok(());
    }
    const NODES: usize = 200;
    const BUDGET: usize = 5;
    const TOTAL: usize = 100_000;
    const BURST: usize = 1_000; // alerts per webhook payload (~350 KiB, under the 1 MiB limit)
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_nodes((0..NODES).map(|i| format!("f{i:03}")))
        .await?;
    let dir = tempfile::tempdir()?;
    // Notify-only SOP: no Jobs to finish; the budget is what is under test.
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(
        &catalog,
        "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: Notify}\n      - {action: Escalate}\n",
    )?;
    let cfg = format!(
        "catalog_file = \"{}\"\n[budget]\nmax_unschedulable = {BUDGET}\nmax_unschedulable_percent = 0.0\n[lease]\nenabled = false\n",
        catalog.display()
    );
    let healer = Healer::start(&kube, dir.path(), "healer-flood", &cfg)?;
    healer.ready().await?;
    let pid = healer.service.pid();
    let rss_start = vm_rss_kib(pid).unwrap_or(0);
    let watch = CordonWatch::start(nodes.clone()).await?;

    // 100,000 alerts: 2,000 distinct (200 nodes × 10 start times of GpuHung), each sent 50
    // times, in bursts of 1,000 per payload, 10 payloads at a time.
    let distinct: Vec<Value> = (0..NODES)
        .flat_map(|n| {
            (0..10).map(move |k| {
                let node = format!("f{n:03}");
                let mut a = alert(&node, "GpuHung", true, &format!("2026-11-22T10:{k:02}:00Z"));
                a["fingerprint"] = json!(format!("{node}-{k}"));
                a["labels"]["instance"] = json!(format!("i{k}"));
                a
            })
        })
        .collect();
    let client = reqwest::Client::new();
    let url = healer.url("/api/v1/alerts");
    let t = Instant::now();
    let (mut accepted, mut rejected_503, mut peak_rss) = (0usize, 0usize, rss_start);
    let payloads: Vec<Value> = (0..TOTAL / BURST)
        .map(|p| {
            let alerts: Vec<Value> = (0..BURST)
                .map(|i| distinct[(p * BURST + i) % distinct.len()].clone())
                .collect();
            payload(alerts)
        })
        .collect();
    for wave in payloads.chunks(10) {
        let mut set = tokio::task::JoinSet::new();
        for body in wave {
            let (client, url, body) = (client.clone(), url.clone(), body.to_string());
            set.spawn(async move {
                let mut retries = 0usize;
                loop {
                    let r = client
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    match r.status().as_u16() {
                        202 => return anyhow::Ok(retries),
                        // Queue full: Alertmanager would retry; so do we.
                        503 => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        c => anyhow::bail!("webhook answered {c}"),
                    }
                }
            });
        }
        while let Some(r) = set.join_next().await {
            rejected_503 += r??;
            accepted += BURST;
        }
        peak_rss = peak_rss.max(vm_rss_kib(pid).unwrap_or(0));
    }
    let sent_in = t.elapsed();
    // Let the healer work through it.
    let out = wait_for("budget filled", WAIT, &[&healer.service], || async {
        let list = nodes.list(&ListParams::default()).await?;
        let out = list.items.iter().filter(|n| unschedulable(n)).count();
        Ok((out >= BUDGET).then_some(out))
    })
    .await?;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_rss = peak_rss.max(vm_rss_kib(pid).unwrap_or(0));
    }
    let (cordons, uncordons, max_out) = watch.finish().await;
    let m = healer.metrics().await?;
    let received = metric(&m, "ark_healer_alerts_received_total{status=\"firing\"}");
    let rss_end = vm_rss_kib(pid).unwrap_or(0);
    let tickets = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| ticket(n).is_some())
        .count();
    eprintln!(
        "flood: {accepted} alerts accepted in {sent_in:?} ({:.0} alerts/s), {rejected_503} payloads answered 503; \
         received metric {received}; VmRSS start {rss_start} KiB, peak {peak_rss} KiB, end {rss_end} KiB; \
         unschedulable now {out}, max seen {max_out} (budget {BUDGET}); cordons {cordons}, uncordons {uncordons}; \
         nodes with a ticket {tickets}",
        accepted as f64 / sent_in.as_secs_f64()
    );
    assert!(max_out <= BUDGET, "budget exceeded: {max_out} > {BUDGET}");
    assert_eq!(cordons, BUDGET, "each acted node cordoned once");
    assert_eq!(uncordons, 0);
    assert!(received >= accepted as f64);
    // Dedup: one Cordon per acted node in the audit log, never more.
    let audit = healer.audit();
    let cordon_records = audit
        .iter()
        .filter(|r| r["action"] == "Cordon" && r["status"] == "Succeeded")
        .count();
    assert_eq!(cordon_records, BUDGET, "duplicate Cordon records");
    // Bounded memory: the whole flood (≈ 35 MB of JSON) must not be retained.
    assert!(
        peak_rss < 512 * 1024,
        "healer RSS {peak_rss} KiB during the flood"
    );
    Ok(())
}
