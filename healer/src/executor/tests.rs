//! The executor against the in-memory cluster: SOPs end to end, the failure paths (I5), the
//! fence (I2), and a property test over random interleavings of alerts, passes, Job results,
//! leadership changes, manual cordons and API failures that checks I1, I2, I5 and "no step
//! twice". The same behaviours are tested on the real apiserver in `tests/tests/`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::alerts::{AlertStatus, AlertStore, StoreLimits};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::k8s::fake::FakeCluster;
use crate::k8s::{Cluster, Fence, view_of};
use crate::planner::{PlanInput, plan};
use crate::testkit::alert_with as alert;
use crate::ticket::{TICKET_MAX_BYTES, TicketStatus};

struct World {
    catalog: Catalog,
    config: Config,
    store: AlertStore,
    exec: Executor<FakeCluster>,
    fence: Fence,
}

fn world(catalog: Catalog, budget: u32) -> World {
    let fence = Fence::new(Duration::from_millis(100));
    fence.hold_until(Some(Instant::now() + Duration::from_secs(3600)));
    let mut config = Config::default();
    config.budget.max_unschedulable = budget;
    config.budget.max_unschedulable_percent = 0.0;
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let exec = Executor::new(
        Some(FakeCluster::new(fence.clone())),
        Settings {
            jobs_namespace: "ark-system".into(),
            max_concurrent_nodes: 4,
        },
        JobTemplates::embedded(),
        Audit::open(None).unwrap(),
        metrics,
        fence.clone(),
    );
    World {
        catalog,
        config,
        store: AlertStore::new(StoreLimits::from(&Config::default())),
        exec,
        fence,
    }
}

impl World {
    fn cluster(&self) -> &FakeCluster {
        self.exec.cluster().unwrap()
    }

    async fn pass(&self) -> Plan {
        let nodes = Cluster::list_nodes(self.cluster()).await.unwrap();
        let view = view_of(&nodes);
        let listed: HashMap<String, Node> = nodes
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let alerts = self.store.snapshot();
        let p = plan(&PlanInput {
            alerts: &alerts,
            catalog: &self.catalog,
            config: &self.config,
            view: &view,
            now: Timestamp::now(),
            silence_means_resolved: true,
        });
        self.exec.execute(&p, &view, &listed, None).await;
        p
    }

    fn ticket(&self, node: &str) -> Option<Ticket> {
        let s = self.cluster().lock();
        node_ticket(s.nodes.get(node)?).map(|t| t.unwrap())
    }

    fn jobs(&self) -> Vec<String> {
        self.cluster().lock().jobs.keys().cloned().collect()
    }
}

#[tokio::test]
async fn a_gpu_reset_runs_end_to_end_once() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.cluster()
        .lock()
        .pods
        .insert("n1".into(), vec![("default".into(), "train-0".into())]);
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await; // Cordon, Taint, Drain (evicts the pod, waits for it to go)
    assert_eq!(w.cluster().unschedulable(), 1);
    assert!(w.jobs().is_empty());
    w.pass().await; // Drain done, RunJob(gpu-reset) created
    let jobs = w.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].starts_with("ark-gpu-reset-n1-"));
    w.pass().await; // still running: nothing new
    assert_eq!(w.cluster().lock().jobs_created.len(), 1);
    w.cluster().finish_job(&jobs[0], true);
    w.pass().await; // RunJob done, WaitCondition waits (still firing)
    assert!(
        w.jobs().is_empty(),
        "a finished Job is deleted once recorded"
    );
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Resolved),
        Timestamp::now(),
    );
    w.pass().await; // WaitCondition done, RunJob(healthcheck) created
    let hc = w.jobs();
    assert!(hc[0].starts_with("ark-healthcheck-n1-"), "{hc:?}");
    w.cluster().finish_job(&hc[0], true);
    w.pass().await; // healthcheck done, Uncordon, resolved
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.status, TicketStatus::Resolved, "{t:?}");
    assert!(t.disrupted && t.cordoned_by_healer);
    assert_eq!(t.remediations.len(), 1);
    assert_eq!(w.cluster().unschedulable(), 0);
    let created = w.cluster().lock().jobs_created.clone();
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(w.cluster().lock().writes.iter().all(|(_, _, held)| *held));
}

#[tokio::test]
async fn a_drain_whose_evictions_error_escalates_at_its_deadline_with_the_reason() {
    // Issue 14 scenario 4: a pod under two PDBs (eviction answers 500) kept the Drain Running
    // for as long as it was watched, with nothing in the ticket.
    let over = "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: Drain, timeoutSeconds: 0}\n      - {action: RunJob, template: gpu-reset}\n";
    let mut w = world(Catalog::embedded_with(over, "test").unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.cluster()
        .lock()
        .pods
        .insert("n1".into(), vec![("default".into(), "two-pdbs".into())]);
    w.cluster().lock().failing.insert("evict".into());
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await;
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.status, TicketStatus::Escalated, "{t:?}");
    let drain = t.workflow(1).unwrap();
    assert_eq!(drain.status, StepStatus::Failed);
    let msg = drain.message.as_deref().unwrap();
    assert!(msg.contains("500") && msg.contains("two-pdbs"), "{msg}");
    assert!(w.jobs().is_empty(), "no reset after a failed drain");
}

#[tokio::test]
async fn an_api_error_past_the_deadline_escalates_whatever_the_step() {
    let over = "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: RunJob, template: gpu-reset, timeoutSeconds: 0}\n";
    let mut w = world(Catalog::embedded_with(over, "test").unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.cluster().lock().failing.insert("get_job".into());
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await;
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.status, TicketStatus::Escalated, "{t:?}");
    let msg = t.workflow(1).unwrap().message.clone().unwrap();
    assert!(
        msg.contains("gave up after 0 s") && msg.contains("500"),
        "{msg}"
    );
}

#[tokio::test]
async fn without_the_lease_nothing_is_written() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.fence.revoke();
    w.pass().await;
    assert!(w.cluster().lock().writes.is_empty());
    assert!(w.ticket("n1").is_none());
}

#[tokio::test]
async fn a_resumed_ticket_under_a_changed_sop_is_replanned_not_remapped() {
    // Issue 14 scenario 7: records were matched to different steps by index.
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await;
    let before = w.ticket("n1").unwrap();
    assert_eq!(before.workflows.len(), 4, "{before:?}"); // Cordon Taint Drain RunJob(running)
    // The catalog changes: a diagnose Job is inserted before the reset.
    let over = "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: Taint}\n      - {action: Drain}\n      - {action: RunJob, template: diagnose}\n      - {action: RunJob, template: gpu-reset}\n";
    w.catalog = Catalog::embedded_with(over, "test").unwrap();
    w.pass().await;
    let after = w.ticket("n1").unwrap();
    assert_ne!(after.created_at, before.created_at, "a new ticket");
    assert_eq!(
        after.sop_digest.as_deref(),
        Some(w.catalog.sop("gpu-reset").unwrap().digest().as_str())
    );
    assert!(after.cordoned_by_healer && after.disrupted, "{after:?}");
    let running: Vec<_> = after
        .workflows
        .iter()
        .filter(|w| w.status == StepStatus::Running)
        .map(|w| (w.step, w.job.clone().unwrap_or_default()))
        .collect();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].0, Some(3));
    assert!(running[0].1.starts_with("ark-diagnose-"), "{running:?}");
}

#[tokio::test]
async fn a_taint_noexecute_reboot_sop_is_refused_so_it_cannot_take_100_nodes() {
    // Issue 14 scenario 5: [Taint NoExecute, RunJob reboot] on 100 nodes with budget 2 admitted
    // all 100. Such a catalog no longer loads; with a Cordon first, the budget holds.
    let bad = "sops:\n  gpu-reset: {steps: [{action: Taint, effect: NoExecute}, {action: RunJob, template: reboot}]}\n";
    assert!(Catalog::embedded_with(bad, "test").is_err());
    let good = "sops:\n  gpu-reset: {steps: [{action: Cordon}, {action: Taint, effect: NoExecute}, {action: RunJob, template: reboot}]}\n";
    let mut w = world(Catalog::embedded_with(good, "test").unwrap(), 2);
    for i in 0..100 {
        let n = format!("n{i:03}");
        w.cluster().add_node(&n, false);
        w.store
            .apply(alert(&n, "GpuHung", AlertStatus::Firing), Timestamp::now());
    }
    w.pass().await;
    w.pass().await;
    assert_eq!(w.cluster().unschedulable(), 2);
    assert_eq!(w.cluster().lock().jobs_created.len(), 2);
}

// ---- property test over random interleavings ----

#[derive(Debug, Clone)]
enum Op {
    Alert(usize, usize, bool),
    Pass,
    FinishJob(usize, bool),
    Leader(bool),
    HumanCordon(usize, bool),
    Fail(usize, bool),
}

const NODES: usize = 5;
const CONDITIONS: &[&str] = &[
    "GpuHung",
    "GpuFellOffBus",
    "WorkloadStalled",
    "NodeNotReady",
    "IbLinkFlapping",
    "JobBlockedByNode",
];
const FAILABLE: &[&str] = &["patch", "evict", "get_job", "create_job", "get_node"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..NODES, 0..CONDITIONS.len(), any::<bool>()).prop_map(|(n, c, f)| Op::Alert(n, c, f)),
        6 => Just(Op::Pass),
        3 => (0..8usize, any::<bool>()).prop_map(|(j, ok)| Op::FinishJob(j, ok)),
        1 => any::<bool>().prop_map(Op::Leader),
        1 => (0..NODES, any::<bool>()).prop_map(|(n, c)| Op::HumanCordon(n, c)),
        1 => (0..FAILABLE.len(), any::<bool>()).prop_map(|(o, f)| Op::Fail(o, f)),
    ]
}

fn disrupted(c: &FakeCluster) -> usize {
    let nodes: Vec<Node> = c.lock().nodes.values().cloned().collect();
    view_of(&nodes).disrupted()
}

async fn run_ops(ops: Vec<Op>) -> std::result::Result<(), TestCaseError> {
    const BUDGET: usize = 2;
    let mut w = world(Catalog::embedded().unwrap(), BUDGET as u32);
    for i in 0..NODES {
        w.cluster().add_node(&format!("n{i}"), false);
        w.cluster()
            .lock()
            .pods
            .insert(format!("n{i}"), vec![("default".into(), format!("p{i}"))]);
    }
    let mut starts: u64 = 0;
    for op in ops {
        match op {
            Op::Alert(n, c, firing) => {
                let mut a = alert(
                    &format!("n{n}"),
                    CONDITIONS[c],
                    if firing {
                        AlertStatus::Firing
                    } else {
                        AlertStatus::Resolved
                    },
                );
                if CONDITIONS[c].starts_with("Job") {
                    // Two jobs, so relations come and go on every node.
                    let job = format!("train-{}", starts % 2);
                    a.fingerprint = format!("{}/{job}", a.fingerprint);
                    a.labels.insert("job_id".into(), job);
                }
                // A new occurrence after a resolution starts later.
                starts += 1;
                if firing {
                    a.starts_at = Timestamp::from_second(1_700_000_000 + starts as i64).unwrap();
                } else if let Some(known) = w
                    .store
                    .snapshot()
                    .into_iter()
                    .find(|k| k.fingerprint == a.fingerprint)
                {
                    a.starts_at = known.starts_at;
                }
                w.store.apply(a, Timestamp::now());
            }
            Op::Pass => {
                let before = disrupted(w.cluster());
                let writes_before = w.cluster().lock().writes.len();
                w.pass().await;
                let after = disrupted(w.cluster());
                // I1: the healer never takes the cluster past its budget (humans may).
                prop_assert!(
                    after <= before || after <= BUDGET,
                    "budget: {before} -> {after} disrupted"
                );
                let s = w.cluster().lock();
                // I2: no write was sent without the Lease.
                prop_assert!(
                    s.writes[writes_before..].iter().all(|(_, _, held)| *held),
                    "write without the lease: {:?}",
                    &s.writes[writes_before..]
                );
                // I5: every ticket fits.
                for n in s.nodes.values() {
                    if let Some(text) = n
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(TICKET_ANNOTATION))
                    {
                        prop_assert!(text.len() <= TICKET_MAX_BYTES);
                        let t = Ticket::from_annotation("n", text).unwrap();
                        prop_assert!(t.jobs.len() <= 2, "{:?}", t.jobs);
                    }
                }
                // No Job (no reboot, no reset) is ever created twice.
                let unique: HashSet<_> = s.jobs_created.iter().collect();
                prop_assert_eq!(unique.len(), s.jobs_created.len(), "{:?}", s.jobs_created);
            }
            Op::FinishJob(j, ok) => {
                let jobs = w.jobs();
                if !jobs.is_empty() {
                    w.cluster().finish_job(&jobs[j % jobs.len()], ok);
                }
            }
            Op::Leader(lead) => w
                .fence
                .hold_until(lead.then(|| Instant::now() + Duration::from_secs(3600))),
            Op::HumanCordon(n, cordon) => w.cluster().edit_node(&format!("n{n}"), |node| {
                node.spec.get_or_insert_with(Default::default).unschedulable = Some(cordon);
            }),
            Op::Fail(o, fail) => {
                let mut s = w.cluster().lock();
                if fail {
                    s.failing.insert(FAILABLE[o].into());
                } else {
                    s.failing.remove(FAILABLE[o]);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    // `PROPTEST_CASES=10000 cargo test -p ark-healer --lib executor::tests` for the long run.
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_interleavings_keep_budget_fence_size_and_no_step_twice(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_ops(ops))?;
    }
}

/// The per-node gauges the self-monitoring alerts read (alerts/ark.rules.yml): which node the
/// budget holds back, and which step a ticket has been in since when.
#[tokio::test]
async fn per_node_gauges_name_the_blocked_node_and_the_running_step() {
    let mut w = world(Catalog::embedded().unwrap(), 1);
    w.cluster().add_node("n1", false);
    w.cluster().add_node("n2", false);
    w.cluster()
        .lock()
        .pods
        .insert("n1".into(), vec![("default".into(), "train-0".into())]);
    for n in ["n1", "n2"] {
        w.store
            .apply(alert(n, "GpuHung", AlertStatus::Firing), Timestamp::now());
    }
    w.pass().await; // n1 admitted (cordon, taint, drain waits), n2 over the budget of 1
    w.pass().await; // n1: drain done, the gpu-reset Job runs
    w.pass().await; // the gauges read the view this pass starts from
    let m = &w.exec.metrics;
    assert_eq!(
        m.node_blocked
            .with_label_values(&["n2", "disruption_budget"])
            .get(),
        1
    );
    let started = m
        .ticket_step_started
        .with_label_values(&["n1", "RunJob"])
        .get();
    let t = w.ticket("n1").unwrap();
    let running = t.workflows.last().unwrap();
    assert_eq!(running.action, "RunJob", "{t:?}");
    assert_eq!(started, running.at.as_millisecond() as f64 / 1000.0);
    // Only the leader reports them.
    m.clear_leader_gauges();
    let text = m.encode();
    assert!(!text.contains("ark_healer_node_blocked{"), "{text}");
    assert!(!text.contains("ark_healer_ticket_step_started_timestamp_seconds{"));
}

#[tokio::test]
async fn an_escalated_ticket_is_reported_until_it_is_cleared() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.store.apply(
        alert("n1", "GpuNvlinkDown", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await; // Cordon, Taint, RunJob(diagnose) created
    let jobs = w.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    w.cluster().finish_job(&jobs[0], true);
    w.pass().await; // diagnose done, Escalate
    assert_eq!(w.ticket("n1").unwrap().status, TicketStatus::Escalated);
    w.pass().await;
    let m = &w.exec.metrics;
    assert_eq!(
        m.tickets_escalated
            .with_label_values(&["n1", "GpuNvlinkDown"])
            .get(),
        1
    );
}

// ---- issue 18: job relations on the node's one ticket ----

/// A firing job alert (`JobBlockedByNode`, `JobStragglerNode`) for `job` on `node`.
fn job_alert(node: &str, condition: &str, job: &str, victims: &str) -> crate::alerts::Alert {
    let mut a = alert(node, condition, AlertStatus::Firing);
    a.fingerprint = format!("{node}/{condition}/{job}");
    a.labels.insert("job_id".into(), job.into());
    a.labels.insert("severity".into(), "critical".into());
    a.labels.insert("resource".into(), "gpu-3".into());
    a.labels.insert("cause".into(), "error.hw".into());
    a.annotations
        .insert("victim_nodes".into(), victims.to_owned());
    a
}

impl World {
    fn patches(&self, node: &str) -> usize {
        self.cluster()
            .lock()
            .writes
            .iter()
            .filter(|(op, n, _)| op == "patch" && n == node)
            .count()
    }

    fn ticket_text(&self, node: &str) -> String {
        let s = self.cluster().lock();
        s.nodes[node].metadata.annotations.as_ref().unwrap()[TICKET_ANNOTATION].clone()
    }

    /// The healer restarted: a new executor (no memory) over the same cluster and alerts.
    fn restarted(&self) -> World {
        let w = world(self.catalog.clone(), self.config.budget.max_unschedulable);
        {
            let old = self.cluster().lock();
            let mut new = w.cluster().lock();
            new.nodes = old.nodes.clone();
            new.jobs = old.jobs.clone();
            new.jobs_created = old.jobs_created.clone();
        }
        let mut w = w;
        for a in self.store.snapshot() {
            w.store.apply(a, Timestamp::now());
        }
        w
    }
}

/// A node in the middle of a GPU reset: GpuHung's SOP has cordoned, tainted, drained it and its
/// gpu-reset Job runs. Quiet passes write nothing (the baseline the tests below count against).
async fn gpu_reset_running() -> World {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.cluster().add_node("n2", false);
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.workflows.len(), 4, "{t:?}"); // Cordon Taint Drain RunJob(running)
    assert_eq!(w.cluster().lock().jobs_created.len(), 1);
    w.pass().await; // the Job's first status is recorded ("running")
    let before = w.patches("n1");
    w.pass().await;
    w.pass().await;
    assert_eq!(w.patches("n1"), before, "a quiet pass writes nothing");
    w
}

/// (a) Per-node single ticket: the culprit's gpu-reset runs; JobBlockedByNode for the same node
/// is recorded in that ticket — no second SOP, no second Job, no extra cordon — in one write.
#[tokio::test]
async fn a_job_alert_on_a_node_under_repair_is_recorded_in_its_ticket_not_a_second_sop() {
    let mut w = gpu_reset_running().await;
    let before = w.ticket("n1").unwrap();
    let patches = w.patches("n1");
    let writes = w.cluster().lock().writes.len();
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-42", "7"),
        Timestamp::now(),
    );
    let p = w.pass().await;
    let np = p.nodes.iter().find(|p| p.node == "n1").unwrap();
    assert_eq!(np.condition, "GpuHung");
    assert!(
        np.deferred
            .iter()
            .any(|d| d.condition == "JobBlockedByNode")
    );
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.condition, "GpuHung");
    assert_eq!(
        t.created_at, before.created_at,
        "the same ticket, not a new one"
    );
    assert_eq!(
        t.workflows, before.workflows,
        "no step ran, none was recorded"
    );
    assert_eq!(t.jobs.len(), 1, "{t:?}");
    assert_eq!(t.jobs[0].job_id, "train-42");
    assert_eq!(t.jobs[0].condition, "JobBlockedByNode");
    assert_eq!(t.jobs[0].victim_nodes, Some(7));
    assert!(w.ticket_text("n1").contains("train-42"));
    assert_eq!(w.patches("n1"), patches + 1, "one write: the relation");
    let s = w.cluster().lock();
    assert_eq!(
        s.jobs_created.len(),
        1,
        "no second Job: {:?}",
        s.jobs_created
    );
    // The only write of that pass is the ticket patch (no cordon, taint, eviction or Job).
    let new: Vec<_> = s.writes[writes..].iter().collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0].0, "patch");
    let n1 = &s.nodes["n1"];
    let taints = n1
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert_eq!(taints.len(), 1, "{taints:?}");
    assert!(s.nodes.get("n2").unwrap().metadata.annotations.is_none());
}

/// (b) JobBlockedByNode alone (an error no hardware alert covers): cordon-diagnose runs for it
/// and its ticket records the job.
#[tokio::test]
async fn a_job_alert_alone_runs_cordon_diagnose_and_records_the_job() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-42", "3"),
        Timestamp::now(),
    );
    w.pass().await; // Cordon, Taint, RunJob(diagnose) created
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.condition, "JobBlockedByNode");
    assert_eq!(t.sop.as_deref(), Some("cordon-diagnose"));
    assert_eq!(t.jobs.len(), 1, "{t:?}");
    assert_eq!(
        (t.jobs[0].job_id.as_str(), t.jobs[0].victim_nodes),
        ("train-42", Some(3))
    );
    assert_eq!(w.cluster().unschedulable(), 1);
    let jobs = w.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].starts_with("ark-diagnose-n1-"), "{jobs:?}");
    w.cluster().finish_job(&jobs[0], true);
    w.pass().await; // diagnose done, Escalate
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.status, TicketStatus::Escalated);
    assert_eq!(t.jobs.len(), 1);
    // Escalated: held for people; the same alert again writes nothing, and neither does a new
    // job relation (docs/healer.md "Jobs on tickets": a node under such a block is not written).
    let patches = w.patches("n1");
    w.pass().await;
    assert_eq!(w.patches("n1"), patches);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-43", "1"),
        Timestamp::now(),
    );
    w.pass().await;
    assert_eq!(w.patches("n1"), patches, "a new job on an escalated node");
    assert_eq!(w.ticket("n1").unwrap().jobs.len(), 1);
}

/// Dry-run writes nothing, job relations included.
#[tokio::test]
async fn a_dry_run_records_no_job_relation() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.config.dry_run = true;
    w.cluster().add_node("n1", false);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-42", "3"),
        Timestamp::now(),
    );
    w.pass().await;
    w.pass().await;
    assert_eq!(w.patches("n1"), 0);
    assert!(w.ticket("n1").is_none());
}

/// (c) The same alert again and again (Alertmanager re-sends, every pass) is one write.
#[tokio::test]
async fn the_same_job_alert_repeated_is_written_once() {
    let mut w = gpu_reset_running().await;
    let patches = w.patches("n1");
    for _ in 0..20 {
        w.store.apply(
            job_alert("n1", "JobBlockedByNode", "train-42", "7"),
            Timestamp::now(),
        );
        w.pass().await;
    }
    assert_eq!(w.patches("n1"), patches + 1);
    let since = w.ticket("n1").unwrap().jobs[0].since;
    // A new occurrence with another victim count is a change: one more write, then quiet again.
    // (The store keeps an occurrence as first received: a re-send of the same occurrence with
    // other annotations is a duplicate.)
    for _ in 0..5 {
        let mut a = job_alert("n1", "JobBlockedByNode", "train-42", "9");
        a.starts_at = "2026-11-22T11:30:00Z".parse().unwrap();
        w.store.apply(a, Timestamp::now());
        w.pass().await;
    }
    assert_eq!(w.patches("n1"), patches + 2);
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.jobs.len(), 1);
    assert_eq!(t.jobs[0].victim_nodes, Some(9));
    assert_eq!(t.jobs[0].since, since, "since: the first occurrence");
    // Resolved: the record stays (the ticket is the incident's record), nothing is written.
    let mut resolved = job_alert("n1", "JobBlockedByNode", "train-42", "9");
    resolved.starts_at = "2026-11-22T11:30:00Z".parse().unwrap();
    resolved.status = AlertStatus::Resolved;
    w.store.apply(resolved, Timestamp::now());
    w.pass().await;
    assert_eq!(w.patches("n1"), patches + 2);
    assert_eq!(w.ticket("n1").unwrap().jobs.len(), 1);
}

/// (d) 100 distinct jobs: at most 16 recorded (the newest), the ticket fits, and once they are
/// recorded nothing more is written.
#[tokio::test]
async fn a_hundred_jobs_are_bounded_to_the_newest_sixteen() {
    let mut w = gpu_reset_running().await;
    let patches = w.patches("n1");
    let t0 = Timestamp::now();
    for i in 0..100 {
        let mut a = job_alert("n1", "JobStragglerNode", &format!("train-{i:03}"), "1");
        a.starts_at = Timestamp::from_second(t0.as_second() - 1000 + i).unwrap();
        w.store.apply(a, Timestamp::now());
    }
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.jobs.len(), crate::ticket::JOBS_MAX, "{:?}", t.jobs);
    assert_eq!(t.jobs[0].job_id, "train-084");
    assert_eq!(t.jobs[15].job_id, "train-099");
    assert!(w.ticket_text("n1").len() <= TICKET_MAX_BYTES);
    assert_eq!(w.patches("n1"), patches + 1);
    for _ in 0..5 {
        w.pass().await;
    }
    assert_eq!(w.patches("n1"), patches + 1, "no write per pass");
    // One at a time, each new job is one write, and the list never grows past the bound.
    for i in 100..140 {
        let mut a = job_alert("n1", "JobStragglerNode", &format!("train-{i:03}"), "1");
        a.starts_at = Timestamp::from_second(t0.as_second() - 1000 + i).unwrap();
        w.store.apply(a, Timestamp::now());
        w.pass().await;
        w.pass().await;
        assert_eq!(w.ticket("n1").unwrap().jobs.len(), crate::ticket::JOBS_MAX);
    }
    assert_eq!(w.patches("n1"), patches + 1 + 40);
}

/// (e) Hostile label values: a huge job id full of control characters is clipped before it
/// reaches the ticket, and distinct huge ids stay distinct.
#[tokio::test]
async fn hostile_job_ids_are_clipped() {
    let mut w = gpu_reset_running().await;
    let evil = format!("train\n\u{1b}[31m\0{}", "x".repeat(100_000));
    let (a, _) = crate::alerts::Alert::from_webhook(crate::alerts::WebhookAlert {
        status: AlertStatus::Firing,
        labels: job_alert("n1", "JobBlockedByNode", &evil, "")
            .labels
            .into_iter()
            .collect(),
        annotations: [("victim_nodes".to_owned(), "lots; rm -rf /".to_owned())].into(),
        starts_at: Timestamp::now(),
        ends_at: Timestamp::from_second(-62_135_596_800).unwrap(),
        generator_url: String::new(),
        fingerprint: "evil-1".into(),
    });
    w.store.apply(a, Timestamp::now());
    let mut other = job_alert("n1", "JobBlockedByNode", &format!("{evil}y"), "2");
    other.fingerprint = "evil-2".into();
    other
        .labels
        .insert("job_id".into(), format!("{}y", "z".repeat(2000)));
    w.store.apply(other, Timestamp::now());
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.jobs.len(), 2, "{:?}", t.jobs);
    for j in &t.jobs {
        assert!(
            j.job_id.len() <= crate::ticket::JOB_ID_MAX,
            "{}",
            j.job_id.len()
        );
        assert!(!j.job_id.chars().any(char::is_control), "{:?}", j.job_id);
    }
    assert_ne!(t.jobs[0].job_id, t.jobs[1].job_id);
    let evil_rec = t
        .jobs
        .iter()
        .find(|j| j.job_id.starts_with("train?"))
        .unwrap();
    assert_eq!(evil_rec.victim_nodes, None, "not a number: left out");
    let text = w.ticket_text("n1");
    assert!(text.len() <= TICKET_MAX_BYTES);
    assert!(!text.contains('\u{1b}') && !text.contains('\0'));
}

/// (f) The relation is in the ticket, so it survives a restart: the new healer reads it and,
/// the same alert still firing, writes nothing; its gpu-reset Job is not created again.
#[tokio::test]
async fn the_job_relation_survives_a_restart_without_a_write() {
    let mut w = gpu_reset_running().await;
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-42", "7"),
        Timestamp::now(),
    );
    w.pass().await;
    let before = w.ticket("n1").unwrap();
    assert_eq!(before.jobs.len(), 1);
    let w2 = w.restarted();
    drop(w);
    let patches = w2.patches("n1");
    w2.pass().await;
    w2.pass().await;
    assert_eq!(w2.patches("n1"), patches, "nothing new to write");
    let after = w2.ticket("n1").unwrap();
    assert_eq!(after.jobs, before.jobs);
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(w2.cluster().lock().jobs_created.len(), 1);
}

/// The relation is kept when the ticket's condition changes: JobBlockedByNode's cordon-diagnose
/// is superseded by the culprit's GpuFellOffBus; the reboot ticket keeps the job.
#[tokio::test]
async fn the_job_relation_is_kept_when_a_more_urgent_condition_supersedes() {
    let mut w = world(Catalog::embedded().unwrap(), 2);
    w.cluster().add_node("n1", false);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-42", "3"),
        Timestamp::now(),
    );
    w.pass().await;
    assert_eq!(w.ticket("n1").unwrap().condition, "JobBlockedByNode");
    // The job alert resolves (say the job was restarted elsewhere), then the hardware alert.
    let mut resolved = job_alert("n1", "JobBlockedByNode", "train-42", "3");
    resolved.status = AlertStatus::Resolved;
    w.store.apply(resolved, Timestamp::now());
    w.store.apply(
        alert("n1", "GpuFellOffBus", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.pass().await;
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.condition, "GpuFellOffBus");
    assert_eq!(t.jobs.len(), 1, "{t:?}");
    assert_eq!(t.jobs[0].job_id, "train-42");
    assert!(w.ticket_text("n1").contains("train-42"));
}

/// A node the budget holds back: its (blocked) ticket records the job, once; a new job is one
/// more write, the same ones again none.
#[tokio::test]
async fn a_blocked_node_records_its_jobs_once() {
    let mut w = world(Catalog::embedded().unwrap(), 1);
    w.cluster().add_node("n0", true); // a manual cordon takes the whole budget
    w.cluster().add_node("n1", false);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-1", "2"),
        Timestamp::now(),
    );
    let p = w.pass().await;
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::DisruptionBudget));
    let t = w.ticket("n1").unwrap();
    assert!(t.blocked.is_some() && t.workflows.is_empty(), "{t:?}");
    assert_eq!(t.jobs.len(), 1);
    let patches = w.patches("n1");
    w.pass().await;
    assert_eq!(w.patches("n1"), patches);
    w.store.apply(
        job_alert("n1", "JobBlockedByNode", "train-2", "2"),
        Timestamp::now(),
    );
    w.pass().await;
    w.pass().await;
    assert_eq!(w.patches("n1"), patches + 1);
    let t = w.ticket("n1").unwrap();
    assert_eq!(t.jobs.len(), 2);
    assert_eq!(w.cluster().unschedulable(), 1, "the budget held");
}

/// A block record whose ticket write fails (an API error; the same path as the fence lapsing or
/// three conflicts) is written by a later pass, not forgotten until the block message changes;
/// the block is still counted once.
#[tokio::test]
async fn a_failed_block_record_is_written_by_the_next_pass() {
    let mut w = world(Catalog::embedded().unwrap(), 1);
    w.cluster().add_node("n0", true); // a manual cordon takes the whole budget
    w.cluster().add_node("n1", false);
    w.store.apply(
        alert("n1", "GpuHung", AlertStatus::Firing),
        Timestamp::now(),
    );
    w.cluster().lock().failing.insert("patch".into());
    let p = w.pass().await;
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::DisruptionBudget));
    assert!(w.ticket("n1").is_none(), "the write failed");
    w.cluster().lock().failing.remove("patch");
    w.pass().await;
    let t = w.ticket("n1").expect("recorded by the next pass");
    assert!(t.blocked.is_some(), "{t:?}");
    let patches = w.patches("n1");
    w.pass().await;
    assert_eq!(w.patches("n1"), patches, "then never rewritten");
    let blocked = w
        .exec
        .metrics()
        .actions_blocked
        .with_label_values(&["disruption_budget"])
        .get();
    assert_eq!(blocked, 1, "counted once");
    assert_eq!(w.cluster().unschedulable(), 1, "the budget held");
}
