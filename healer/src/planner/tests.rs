//! Unit tests of the planner, case by case; the invariants are property-tested in
//! `lifecycle/tests.rs`.

use super::*;
use crate::ticket::Remediation;

/// The planner with everything but the inputs the old tests vary held fixed.
fn plan(
    alerts: &[Alert],
    catalog: &Catalog,
    config: &Config,
    view: &ClusterView,
    now: Timestamp,
) -> Plan {
    super::plan(&PlanInput {
        alerts,
        catalog,
        config,
        view,
        now,
        silence_means_resolved: true,
    })
}
use crate::testkit::{alert, node, now};
use crate::ticket::{StepStatus, Workflow};

fn view(nodes: Vec<NodeView>) -> ClusterView {
    ClusterView {
        nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
        live: true,
    }
}

fn cfg(max: u32) -> Config {
    let mut c = Config::default();
    c.budget.max_unschedulable = max;
    c.budget.max_unschedulable_percent = 0.0;
    c
}

#[test]
fn most_urgent_condition_per_node_with_deferred() {
    let cat = Catalog::embedded().unwrap();
    let alerts = vec![
        alert("n1", "DiskIoSlow"),
        alert("n1", "GpuFellOffBus"),
        alert("n1", "NodeNotReady"),
        alert("n1", "GpuXidApplication"),
        alert("n1", "GpuThermalThrottle"),
        alert("n1", "NodeNotReady"),
    ];
    let p = plan(&alerts, &cat, &cfg(5), &view(vec![node("n1")]), now());
    assert_eq!(p.nodes.len(), 1);
    let n = &p.nodes[0];
    assert_eq!((n.condition.as_str(), n.priority), ("NodeNotReady", 0));
    assert_eq!(n.sop, "node-not-ready");
    assert_eq!(
        n.deferred,
        vec![
            Deferred {
                condition: "GpuFellOffBus".into(),
                priority: 2
            },
            Deferred {
                condition: "DiskIoSlow".into(),
                priority: 30
            },
        ]
    );
    assert!(n.blocked.is_none());
    let reasons: Vec<_> = p.ignored.iter().map(|i| i.condition.as_str()).collect();
    assert_eq!(reasons, vec!["GpuThermalThrottle", "GpuXidApplication"]);
}

#[test]
fn can_ignore_acted_on_only_when_configured() {
    let cat = Catalog::embedded().unwrap();
    let alerts = vec![alert("n1", "GpuHighTemperature")];
    let mut c = cfg(5);
    let p = plan(&alerts, &cat, &c, &view(vec![node("n1")]), now());
    assert!(p.nodes.is_empty());
    assert!(p.ignored[0].reason.contains("CanIgnore"));
    c.act_on_can_ignore = true;
    let p = plan(&alerts, &cat, &c, &view(vec![node("n1")]), now());
    assert_eq!(p.nodes[0].condition, "GpuHighTemperature");
}

#[test]
fn bad_alerts_are_ignored_with_a_reason() {
    let cat = Catalog::embedded().unwrap();
    let mut no_node = alert("", "GpuHung");
    no_node.labels.remove("node");
    let alerts = vec![alert("n1", "Bogus"), alert("ghost", "GpuHung"), no_node];
    let p = plan(&alerts, &cat, &cfg(5), &view(vec![node("n1")]), now());
    assert!(p.nodes.is_empty());
    let reasons: Vec<_> = p
        .ignored
        .iter()
        .map(|i| (i.node.as_str(), i.reason.as_str()))
        .collect();
    assert!(reasons.contains(&("", "alert has no node label")));
    assert!(reasons.contains(&("ghost", "node not found in the cluster")));
    assert!(reasons.contains(&("n1", "unknown condition (not in the catalog)")));
    // Without a cluster, unknown nodes are planned (empty view).
    let p = plan(
        &[alert("ghost", "GpuHung")],
        &cat,
        &cfg(5),
        &ClusterView::default(),
        now(),
    );
    assert_eq!(p.nodes[0].node, "ghost");
}

#[test]
fn budget_counts_manual_cordons_and_prefers_urgent() {
    let cat = Catalog::embedded().unwrap();
    let mut manual = node("m1");
    manual.unschedulable = true;
    let v = view(vec![node("a"), node("b"), node("c"), manual]);
    let alerts = vec![
        alert("c", "NodeNotReady"),
        alert("a", "DiskIoSlow"), // does not disrupt: no budget needed
        alert("b", "GpuHung"),
        alert("a", "IbLinkFlapping"),
    ];
    let p = plan(&alerts, &cat, &cfg(2), &v, now());
    let by: BTreeMap<_, _> = p.nodes.iter().map(|n| (n.node.as_str(), n)).collect();
    assert!(by["c"].blocked.is_none(), "NotReady gets the budget first");
    assert_eq!(by["b"].block_reason, Some(BlockReason::DisruptionBudget));
    assert_eq!(by["a"].block_reason, Some(BlockReason::DisruptionBudget));
    assert!(by["b"].blocked.as_ref().unwrap().contains("2 of 4"));
    assert_eq!(p.nodes[0].node, "c");
}

#[test]
fn percent_budget() {
    let cat = Catalog::embedded().unwrap();
    let nodes: Vec<_> = (0..100).map(|i| node(&format!("n{i:03}"))).collect();
    let alerts: Vec<_> = (0..100)
        .map(|i| alert(&format!("n{i:03}"), "GpuHung"))
        .collect();
    let mut c = cfg(0);
    c.budget.max_unschedulable_percent = 5.0;
    let p = plan(&alerts, &cat, &c, &view(nodes), now());
    assert_eq!(p.nodes.iter().filter(|n| n.blocked.is_none()).count(), 5);
}

#[test]
fn control_plane_disabled_escalated_and_invalid_tickets_block() {
    let cat = Catalog::embedded().unwrap();
    let mut cp = node("cp");
    cp.control_plane = true;
    let mut off = node("off");
    off.disabled = true;
    let mut esc = node("esc");
    let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, now(), None);
    t.status = TicketStatus::Escalated;
    esc.ticket = Some(Ok(t));
    let mut bad = node("bad");
    bad.ticket = Some(Err("line 2: unknown status".into()));
    let alerts: Vec<_> = ["cp", "off", "esc", "bad"]
        .iter()
        .map(|n| alert(n, "GpuHung"))
        .collect();
    let p = plan(
        &alerts,
        &cat,
        &cfg(10),
        &view(vec![cp, off, esc, bad]),
        now(),
    );
    let by: BTreeMap<_, _> = p
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), n.block_reason))
        .collect();
    assert_eq!(by["cp"], Some(BlockReason::ControlPlane));
    assert_eq!(by["off"], Some(BlockReason::Disabled));
    assert_eq!(by["esc"], Some(BlockReason::Escalated));
    assert_eq!(by["bad"], Some(BlockReason::InvalidTicket));
}

#[test]
fn cooldown_and_repeat_offender() {
    let cat = Catalog::embedded().unwrap();
    let mut closed = Ticket::new(
        "GpuHung",
        "",
        "gpu-reset",
        None,
        "2026-11-22T11:30:00Z".parse().unwrap(),
        None,
    );
    closed.status = TicketStatus::Closed;
    closed.record(
        0,
        Workflow {
            action: "Cordon".into(),
            status: StepStatus::Succeeded,
            at: now(),
            step: None,
            job: None,
            message: None,
            retries: None,
        },
    );
    closed.closed_at = Some("2026-11-22T11:50:00Z".parse().unwrap());
    closed.priority = Some(3);
    closed.disrupted = true;
    let mut n = node("n1");
    n.ticket = Some(Ok(closed.clone()));
    let p = plan(
        &[alert("n1", "GpuHung")],
        &cat,
        &cfg(5),
        &view(vec![n.clone()]),
        now(),
    );
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::Cooldown));
    let mut c = cfg(5);
    c.cooldown_seconds = 60;
    let p = plan(
        &[alert("n1", "GpuHung")],
        &cat,
        &c,
        &view(vec![n.clone()]),
        now(),
    );
    assert_eq!(p.nodes[0].block_reason, None);
    closed.remediations = vec![
        Remediation {
            at: now(),
            priority: 3
        };
        3
    ];
    n.ticket = Some(Ok(closed));
    let p = plan(&[alert("n1", "GpuHung")], &cat, &c, &view(vec![n]), now());
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::RepeatOffender));
}

/// Issue 14 scenario 2: a closed ticket of `condition` on `n1`, `disrupted` or not, with
/// `remediations` disruptive remediations of priority `priority` in its history.
fn closed_ticket(condition: &str, priority: u32, disrupted: bool, remediations: usize) -> NodeView {
    let mut t = Ticket::new(
        condition,
        "",
        "x",
        None,
        "2026-11-22T11:30:00Z".parse().unwrap(),
        None,
    );
    t.status = TicketStatus::Resolved;
    t.priority = Some(priority);
    t.disrupted = disrupted;
    t.closed_at = Some("2026-11-22T11:59:00Z".parse().unwrap());
    t.remediations = vec![
        Remediation {
            at: now(),
            priority
        };
        remediations
    ];
    let mut n = node("n1");
    n.ticket = Some(Ok(t));
    n
}

#[test]
fn a_harmless_diagnosis_never_delays_an_urgent_remediation() {
    // Issue 14 scenario 2: WorkloadStalled -> diagnose Job -> resolved; then GpuFellOffBus on the
    // same node was blocked for an hour ("cooldown"), NodeNotReady too.
    let cat = Catalog::embedded().unwrap();
    let v = view(vec![closed_ticket("WorkloadStalled", 40, false, 0)]);
    for urgent in ["GpuFellOffBus", "NodeNotReady", "WorkloadStalled"] {
        let p = plan(&[alert("n1", urgent)], &cat, &cfg(5), &v, now());
        assert_eq!(p.nodes[0].block_reason, None, "{urgent}");
    }
    // After three DiskIoSlow diagnoses (not disruptive: none recorded), not a repeat offender.
    let v = view(vec![closed_ticket("DiskIoSlow", 30, false, 0)]);
    let p = plan(&[alert("n1", "GpuFellOffBus")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, None);
}

#[test]
fn cooldown_and_repeat_offender_never_block_a_more_urgent_condition() {
    let cat = Catalog::embedded().unwrap();
    // A GPU reset (priority 3) just finished: the same class waits, a more urgent one acts.
    let v = view(vec![closed_ticket("GpuHung", 3, true, 1)]);
    let p = plan(&[alert("n1", "GpuXidFatal")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::Cooldown));
    let p = plan(&[alert("n1", "GpuFellOffBus")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, None);
    // Three GPU resets: a repeat offender for GPU resets and less urgent, not for a reboot.
    let v = view(vec![closed_ticket("GpuHung", 3, true, 3)]);
    let p = plan(&[alert("n1", "GpuHung")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::RepeatOffender));
    let p = plan(&[alert("n1", "IbPortDown")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, Some(BlockReason::RepeatOffender));
    let p = plan(&[alert("n1", "NodeNotReady")], &cat, &cfg(5), &v, now());
    assert_eq!(p.nodes[0].block_reason, None);
}

#[test]
fn budget_counts_every_disrupted_node_not_only_cordons() {
    // A node a human uncordoned while its reboot ticket is open still counts (I1).
    let cat = Catalog::embedded().unwrap();
    let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, now(), None);
    t.status = TicketStatus::Resolving;
    t.disrupted = true;
    let mut busy = node("busy");
    busy.ticket = Some(Ok(t));
    let v = view(vec![busy, node("a"), node("b")]);
    let p = plan(
        &[alert("a", "GpuHung"), alert("b", "GpuHung")],
        &cat,
        &cfg(2),
        &v,
        now(),
    );
    let admitted: Vec<_> = p
        .nodes
        .iter()
        .filter(|n| n.block_reason.is_none() && n.disruptive)
        .map(|n| n.node.as_str())
        .collect();
    assert_eq!(admitted, vec!["a"], "{p:?}");
}

#[test]
fn the_plan_carries_what_the_executor_needs() {
    let cat = Catalog::embedded().unwrap();
    let mut a = alert("n1", "GpuHung");
    a.labels.insert("gpu".into(), "5".into());
    let p = plan(&[a.clone()], &cat, &cfg(5), &view(vec![node("n1")]), now());
    let n = &p.nodes[0];
    assert!(n.condition_firing && n.disruptive && n.needs_confirmation && !n.dry_run);
    assert_eq!(n.gpu, "5");
    assert_eq!(n.fingerprints, vec![a.fingerprint.clone()]);
    assert_eq!(n.sop_digest, cat.sop("gpu-reset").unwrap().digest());
    // No cluster: dry-run, nothing to confirm.
    let p = plan(&[a], &cat, &cfg(5), &ClusterView::default(), now());
    assert!(p.dry_run && p.nodes[0].dry_run && !p.nodes[0].needs_confirmation);
}

#[test]
fn open_ticket_is_continued_after_the_alert_resolved() {
    let cat = Catalog::embedded().unwrap();
    let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, now(), None);
    t.status = TicketStatus::Resolving;
    t.record(
        0,
        Workflow {
            action: "Cordon".into(),
            status: StepStatus::Succeeded,
            at: now(),
            step: None,
            job: None,
            message: None,
            retries: None,
        },
    );
    let mut n = node("n1");
    n.unschedulable = true;
    n.ticket = Some(Ok(t));
    let p = plan(&[], &cat, &cfg(1), &view(vec![n]), now());
    assert_eq!(p.nodes.len(), 1);
    assert!(p.nodes[0].continues_ticket);
    assert!(
        p.nodes[0].blocked.is_none(),
        "already cordoned: no new budget needed"
    );
}

#[test]
fn a_ticket_that_never_acted_closes_when_its_alert_resolves() {
    let cat = Catalog::embedded().unwrap();
    let mut waiting = node("w");
    waiting.ticket = Some(Ok(Ticket::new(
        "GpuHung",
        "",
        "gpu-reset",
        None,
        now(),
        None,
    )));
    let v = view(vec![waiting]);
    let p = plan(&[], &cat, &cfg(1), &v, now());
    assert!(
        p.nodes.is_empty(),
        "a resolved, never-started ticket must not start now"
    );
    assert_eq!(stale_tickets(&p, &v).len(), 1);
    let p = plan(&[alert("w", "GpuHung")], &cat, &cfg(1), &v, now());
    assert!(p.nodes[0].continues_ticket);
    assert!(stale_tickets(&p, &v).is_empty());
}

#[test]
fn storm_of_10k_alerts_plans_deterministically() {
    let cat = Catalog::embedded().unwrap();
    let conds = [
        "GpuHung",
        "GpuFellOffBus",
        "DiskIoSlow",
        "IbPortDown",
        "Bogus",
        "GpuXidApplication",
        "NodeNotReady",
        "GpuNvlinkDown",
        "WorkloadStalled",
        "PcieLinkDegraded",
    ];
    let nodes: Vec<_> = (0..1000).map(|i| node(&format!("n{i:04}"))).collect();
    let alerts: Vec<_> = (0..10_000)
        .map(|i| {
            alert(
                &format!("n{:04}", i % 1000),
                conds[(i / 1000) % conds.len()],
            )
        })
        .collect();
    let c = cfg(20);
    let v = view(nodes);
    let p1 = plan(&alerts, &cat, &c, &v, now());
    let mut rev = alerts.clone();
    rev.reverse();
    let p2 = plan(&rev, &cat, &c, &v, now());
    assert_eq!(p1, p2);
    assert_eq!(p1.nodes.len(), 1000);
    let admitted = p1
        .nodes
        .iter()
        .filter(|n| n.blocked.is_none() && n.step_list.iter().any(Step::disrupts))
        .count();
    assert_eq!(admitted, 20);
    assert!(p1.nodes.iter().all(|n| n.condition == "NodeNotReady"));
}

/// Issue 18: on a node with a more urgent hardware condition the job alerts are only deferred,
/// and the plan carries the node's job relations (firing job conditions with a `job_id`),
/// whatever condition it chose; alone, JobBlockedByNode is the node's condition.
#[test]
fn the_plan_carries_the_nodes_job_relations_whatever_it_chose() {
    let cat = Catalog::embedded().unwrap();
    let job = |node: &str, condition: &str, id: &str, fp: &str| {
        let mut a = alert(node, condition);
        a.fingerprint = format!("{node}/{condition}/{id}/{fp}");
        a.labels.insert("job_id".into(), id.into());
        a.annotations.insert("victim_nodes".into(), "4".into());
        a
    };
    let mut resolved = job("n1", "JobStragglerNode", "done", "");
    resolved.status = AlertStatus::Resolved;
    let alerts = vec![
        alert("n1", "GpuFellOffBus"),
        job("n1", "JobBlockedByNode", "train-1", "gpu-3"),
        // The same job blocked by a second GPU of the node: one relation.
        job("n1", "JobBlockedByNode", "train-1", "gpu-4"),
        job("n1", "JobStragglerNode", "train-2", ""),
        resolved,
        job("n1", "JobBlockedByNode", "", "no-id"),
        // Not a job condition: its job_id is not a relation.
        job("n1", "WorkloadStalled", "train-9", ""),
        job("n2", "JobBlockedByNode", "train-3", ""),
    ];
    let p = plan(
        &alerts,
        &cat,
        &cfg(5),
        &view(vec![node("n1"), node("n2")]),
        now(),
    );
    let n1 = p.nodes.iter().find(|n| n.node == "n1").unwrap();
    assert_eq!(
        (n1.condition.as_str(), n1.sop.as_str()),
        ("GpuFellOffBus", "reboot")
    );
    let deferred: Vec<_> = n1.deferred.iter().map(|d| d.condition.as_str()).collect();
    assert_eq!(
        deferred,
        vec!["JobBlockedByNode", "WorkloadStalled", "JobStragglerNode"]
    );
    let jobs: Vec<_> = n1
        .jobs
        .iter()
        .map(|j| (j.job_id.as_str(), j.condition.as_str(), j.victim_nodes))
        .collect();
    assert_eq!(
        jobs,
        vec![
            ("train-1", "JobBlockedByNode", Some(4)),
            ("train-2", "JobStragglerNode", Some(4))
        ]
    );
    let n2 = p.nodes.iter().find(|n| n.node == "n2").unwrap();
    assert_eq!(
        (n2.condition.as_str(), n2.sop.as_str()),
        ("JobBlockedByNode", "cordon-diagnose")
    );
    assert!(n2.disruptive && n2.needs_confirmation);
    assert_eq!(n2.jobs.len(), 1);
    assert_eq!(n2.jobs[0].job_id, "train-3");
}

/// `plan --output json` shows a node's job relations only when it has any: the shape of a node
/// without job alerts is unchanged.
#[test]
fn plan_json_shows_jobs_only_when_there_are_any() {
    let cat = Catalog::embedded().unwrap();
    let mut job = alert("n2", "JobBlockedByNode");
    job.labels.insert("job_id".into(), "train-7".into());
    let alerts = vec![alert("n1", "GpuHung"), job];
    let p = plan(
        &alerts,
        &cat,
        &cfg(5),
        &view(vec![node("n1"), node("n2")]),
        now(),
    );
    let v = serde_json::to_value(&p).unwrap();
    let by = |n: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == n)
            .unwrap()
            .clone()
    };
    assert!(by("n1").get("jobs").is_none(), "{v}");
    assert_eq!(by("n2")["jobs"][0]["jobId"], "train-7", "{v}");
    assert_eq!(by("n2")["jobs"][0]["condition"], "JobBlockedByNode");
}
