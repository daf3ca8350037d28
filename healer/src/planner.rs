//! `plan()`: pure and deterministic. From the open alerts, the catalog, the safety configuration
//! and one consistent view of the cluster, decide per node which condition is worked on, with
//! which SOP, and what (if anything) blocks it. The dry-run CLI prints exactly this; the executor
//! acts only on it.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use serde::Serialize;

use crate::alerts::Alert;
use crate::catalog::{Catalog, PriorityClass, Step};
use crate::config::Config;
use crate::ticket::{Ticket, TicketStatus};

/// What the planner needs to know about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub unschedulable: bool,
    pub control_plane: bool,
    /// Label `ark.io/disable=true`.
    pub disabled: bool,
    /// The parsed ticket annotation, or why it could not be parsed.
    pub ticket: Option<Result<Ticket, String>>,
}

/// All nodes, as read at one moment. `live = false`: no cluster was reachable (empty view).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub nodes: BTreeMap<String, NodeView>,
    pub live: bool,
}

impl ClusterView {
    pub fn unschedulable(&self) -> usize {
        self.nodes.values().filter(|n| n.unschedulable).count()
    }
}

/// Why a node's SOP does not run now. The label value of `ark_healer_actions_blocked_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockReason {
    DisruptionBudget,
    Cooldown,
    RepeatOffender,
    ControlPlane,
    Disabled,
    InvalidTicket,
    Escalated,
    DryRun,
}

impl BlockReason {
    pub fn label(self) -> &'static str {
        match self {
            BlockReason::DisruptionBudget => "disruption_budget",
            BlockReason::Cooldown => "cooldown",
            BlockReason::RepeatOffender => "repeat_offender",
            BlockReason::ControlPlane => "control_plane",
            BlockReason::Disabled => "disabled",
            BlockReason::InvalidTicket => "invalid_ticket",
            BlockReason::Escalated => "escalated",
            BlockReason::DryRun => "dry_run",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deferred {
    pub condition: String,
    pub priority: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub node: String,
    pub condition: String,
    pub reason: String,
}

/// The plan for one node. Serialized in the `plan --output json` shape; the rest is for the
/// executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    pub node: String,
    pub condition: String,
    pub priority: u32,
    pub sop: String,
    pub steps: Vec<String>,
    pub blocked: Option<String>,
    pub deferred: Vec<Deferred>,
    #[serde(skip)]
    pub step_list: Vec<Step>,
    #[serde(skip)]
    pub block_reason: Option<BlockReason>,
    #[serde(skip)]
    pub reason: String,
    #[serde(skip)]
    pub fingerprint: Option<String>,
    /// An open ticket for this condition exists: continue it rather than start a new one.
    #[serde(skip)]
    pub continues_ticket: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub nodes: Vec<NodePlan>,
    pub ignored: Vec<Ignored>,
}

struct Candidate {
    condition: String,
    priority: u32,
    reason: String,
    fingerprint: Option<String>,
}

/// Plans every node. Deterministic: the same inputs give the same plan (nodes sorted by
/// priority then name; ignored sorted).
pub fn plan(
    alerts: &[Alert],
    catalog: &Catalog,
    config: &Config,
    view: &ClusterView,
    now: Timestamp,
) -> Plan {
    let mut out = Plan::default();
    let mut per_node: BTreeMap<&str, BTreeMap<String, Candidate>> = BTreeMap::new();
    let mut ignored: BTreeSet<(String, String, String)> = BTreeSet::new();

    let mut firing: Vec<&Alert> = alerts
        .iter()
        .filter(|a| a.status == crate::alerts::AlertStatus::Firing)
        .collect();
    // Earliest occurrence first, so the ticket reason names the first alert (deterministic).
    firing.sort_by(|a, b| (a.starts_at, &a.fingerprint).cmp(&(b.starts_at, &b.fingerprint)));

    for a in firing {
        let label = a.condition().unwrap_or("").to_owned();
        let Some(node) = a.node() else {
            ignored.insert((String::new(), label, "alert has no node label".into()));
            continue;
        };
        let Some(condition) =
            catalog.resolve(a.condition(), a.labels.get("xid").map(String::as_str))
        else {
            let why = if label.is_empty() {
                "alert has no condition label and no known xid".to_owned()
            } else {
                "unknown condition (not in the catalog)".to_owned()
            };
            ignored.insert((node.to_owned(), label, why));
            continue;
        };
        if view.live && !view.nodes.contains_key(node) {
            ignored.insert((
                node.to_owned(),
                condition.to_owned(),
                "node not found in the cluster".into(),
            ));
            continue;
        }
        let spec = catalog
            .condition(condition)
            .expect("resolved conditions exist");
        match PriorityClass::of(spec.priority) {
            PriorityClass::MustIgnore => {
                ignored.insert((
                    node.to_owned(),
                    condition.to_owned(),
                    format!(
                        "MustIgnore (priority {}): recorded, never acted on",
                        spec.priority
                    ),
                ));
                continue;
            }
            PriorityClass::CanIgnore if !config.act_on_can_ignore => {
                ignored.insert((
                    node.to_owned(),
                    condition.to_owned(),
                    format!(
                        "CanIgnore (priority {}): act_on_can_ignore is off",
                        spec.priority
                    ),
                ));
                continue;
            }
            _ => {}
        }
        per_node
            .entry(node)
            .or_default()
            .entry(condition.to_owned())
            .or_insert_with(|| Candidate {
                condition: condition.to_owned(),
                priority: spec.priority,
                reason: a.reason(),
                fingerprint: Some(a.fingerprint.clone()),
            });
    }

    // An open ticket keeps its condition a candidate until its SOP finishes, even once the alert
    // resolved (the remaining steps — healthcheck, uncordon — still have to run). A ticket that
    // never got to act (it waited for budget) does not: a resolution closes it instead
    // (see [`stale_tickets`]).
    for (name, n) in &view.nodes {
        if let Some(Ok(t)) = &n.ticket
            && t.status.is_open()
            && !t.workflows.is_empty()
            && let Some(spec) = catalog.condition(&t.condition)
        {
            per_node
                .entry(name.as_str())
                .or_default()
                .entry(t.condition.clone())
                .or_insert_with(|| Candidate {
                    condition: t.condition.clone(),
                    priority: spec.priority,
                    reason: t.reason.clone(),
                    fingerprint: t.fingerprint.clone(),
                });
        }
    }

    for (node, cands) in per_node {
        let mut cands: Vec<Candidate> = cands.into_values().collect();
        cands.sort_by(|a, b| (a.priority, &a.condition).cmp(&(b.priority, &b.condition)));
        let chosen = cands.remove(0);
        let spec = catalog
            .condition(&chosen.condition)
            .expect("candidate is in catalog");
        let sop = catalog.sop(&spec.sop).expect("catalog validated");
        let nv = view.nodes.get(node);
        let ticket = nv.and_then(|n| n.ticket.as_ref());
        let continues_ticket =
            matches!(ticket, Some(Ok(t)) if t.status.is_open() && t.condition == chosen.condition);

        let mut block: Option<(BlockReason, String)> = None;
        if let Some(n) = nv {
            if n.control_plane {
                block = Some((
                    BlockReason::ControlPlane,
                    "control-plane node: never touched".into(),
                ));
            } else if n.disabled {
                block = Some((
                    BlockReason::Disabled,
                    "node opted out (ark.io/disable=true)".into(),
                ));
            }
        }
        if block.is_none() {
            block = match ticket {
                Some(Err(e)) => Some((BlockReason::InvalidTicket, format!("invalid ticket: {e}"))),
                Some(Ok(t)) if t.status == TicketStatus::Escalated => Some((
                    BlockReason::Escalated,
                    format!(
                        "ticket for {} escalated to humans: no automatic action until it is closed",
                        t.condition
                    ),
                )),
                Some(Ok(t)) if !continues_ticket && !t.status.is_open() => {
                    new_ticket_block(t, config, now)
                }
                _ => None,
            };
        }

        let deferred = cands
            .iter()
            .map(|c| Deferred {
                condition: c.condition.clone(),
                priority: c.priority,
            })
            .collect();
        out.nodes.push(NodePlan {
            node: node.to_owned(),
            condition: chosen.condition.clone(),
            priority: chosen.priority,
            sop: spec.sop.clone(),
            steps: sop.steps.iter().map(ToString::to_string).collect(),
            blocked: block.as_ref().map(|b| b.1.clone()),
            deferred,
            step_list: sop.steps.clone(),
            block_reason: block.map(|b| b.0),
            reason: chosen.reason,
            fingerprint: chosen.fingerprint,
            continues_ticket,
        });
    }

    // Most urgent first: NotReady, then Cordon, then Emergency by priority; ties by node name.
    out.nodes
        .sort_by(|a, b| (a.priority, &a.node).cmp(&(b.priority, &b.node)));

    // Disruption budget over one consistent view: every unschedulable node counts (manual
    // cordons too); a node that is already unschedulable needs no new budget.
    let total = if view.live {
        view.nodes.len()
    } else {
        out.nodes.len()
    };
    let limit = config.budget.limit(total);
    let mut unschedulable = view.unschedulable();
    for p in &mut out.nodes {
        if p.block_reason.is_some() {
            continue;
        }
        let already_out = view.nodes.get(&p.node).is_some_and(|n| n.unschedulable);
        let sop_disrupts = p.step_list.iter().any(Step::disrupts);
        if !sop_disrupts || already_out {
            continue;
        }
        if unschedulable < limit {
            unschedulable += 1;
        } else {
            p.block_reason = Some(BlockReason::DisruptionBudget);
            p.blocked = Some(format!(
                "disruption budget: {unschedulable} of {total} nodes unschedulable, limit {limit}"
            ));
        }
    }

    out.ignored = ignored
        .into_iter()
        .map(|(node, condition, reason)| Ignored {
            node,
            condition,
            reason,
        })
        .collect();
    out
}

/// Nodes whose open ticket never acted and whose condition is no longer planned (it resolved):
/// the executor closes these tickets.
pub fn stale_tickets<'a>(plan: &Plan, view: &'a ClusterView) -> Vec<&'a NodeView> {
    view.nodes
        .values()
        .filter(|n| {
            matches!(&n.ticket, Some(Ok(t)) if t.status.is_open() && t.workflows.is_empty())
                && !plan.nodes.iter().any(|p| p.node == n.name)
        })
        .collect()
}

/// Cooldown and repeat-offender checks before a new remediation of a node.
fn new_ticket_block(
    previous: &Ticket,
    config: &Config,
    now: Timestamp,
) -> Option<(BlockReason, String)> {
    let ro = &config.repeat_offender;
    if ro.max_remediations > 0
        && previous.remediations_since(now, ro.window_seconds) >= ro.max_remediations as usize
    {
        return Some((
            BlockReason::RepeatOffender,
            format!(
                "repeat offender: {} remediations within {} s: escalated, no more automatic action",
                previous.remediations_since(now, ro.window_seconds),
                ro.window_seconds
            ),
        ));
    }
    if previous.workflows.is_empty() {
        return None; // it never acted (waited for budget, then resolved): nothing to cool down
    }
    let closed = previous.closed_at.unwrap_or(previous.created_at);
    let until = closed
        .as_second()
        .saturating_add(config.cooldown_seconds as i64);
    if now.as_second() < until {
        return Some((
            BlockReason::Cooldown,
            format!(
                "cooldown: last ticket closed at {closed}, next remediation after {}",
                Timestamp::from_second(until).unwrap_or(now)
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertStatus;
    use crate::ticket::{StepStatus, Workflow};

    fn now() -> Timestamp {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    fn alert(node: &str, condition: &str) -> Alert {
        let mut labels = BTreeMap::new();
        labels.insert("node".to_owned(), node.to_owned());
        labels.insert("condition".to_owned(), condition.to_owned());
        Alert {
            fingerprint: format!("{node}/{condition}"),
            status: AlertStatus::Firing,
            labels,
            annotations: BTreeMap::new(),
            starts_at: "2026-11-22T11:00:00Z".parse().unwrap(),
            ends_at: None,
        }
    }

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.into(),
            unschedulable: false,
            control_plane: false,
            disabled: false,
            ticket: None,
        }
    }

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
        closed.history = vec![now(); 3];
        n.ticket = Some(Ok(closed));
        let p = plan(&[alert("n1", "GpuHung")], &cat, &c, &view(vec![n]), now());
        assert_eq!(p.nodes[0].block_reason, Some(BlockReason::RepeatOffender));
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
}
