//! `plan()`: pure and deterministic. From the open alerts, the catalog, the safety configuration
//! and one consistent view of the cluster, decide per node which condition is worked on, with
//! which SOP, and what (if anything) blocks it. The dry-run CLI prints exactly this; the executor
//! acts only on it and reads nothing else: a [`NodePlan`] carries all it needs (the steps, whether
//! the condition still fires, the GPU, the dry-run decision, whether Alertmanager must confirm).

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::Timestamp;
use serde::Serialize;

use crate::alerts::{Alert, AlertStatus};
use crate::catalog::{Catalog, PriorityClass, Step};
use crate::config::Config;
use crate::ticket::{JOB_CONDITIONS, JobRelation, Ticket, TicketStatus, normalize_jobs};

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

impl NodeView {
    /// Does this node count against the disruption budget (I1)? Unschedulable for any reason
    /// (manual cordons too), or carrying an open ticket that already took capacity away (a taint,
    /// a drain or a reboot that a human's uncordon did not undo).
    pub fn disrupted(&self) -> bool {
        self.unschedulable
            || matches!(&self.ticket, Some(Ok(t)) if t.status.is_open() && t.disrupted)
    }
}

impl ClusterView {
    pub fn unschedulable(&self) -> usize {
        self.nodes.values().filter(|n| n.unschedulable).count()
    }

    /// Nodes counting against the disruption budget.
    pub fn disrupted(&self) -> usize {
        self.nodes.values().filter(|n| n.disrupted()).count()
    }
}

/// Everything [`plan`] looks at.
#[derive(Debug, Clone, Copy)]
/// `A` is `Alert`, or a shared `Arc<Alert>` (a pass plans over the store's alerts without
/// copying them).
pub struct PlanInput<'a, A = Alert> {
    pub alerts: &'a [A],
    pub catalog: &'a Catalog,
    pub config: &'a Config,
    pub view: &'a ClusterView,
    pub now: Timestamp,
    /// A condition with no alert heard of counts as resolved. False right after a start:
    /// Alertmanager re-sends firing alerts on `repeat_interval`, so silence proves nothing yet.
    pub silence_means_resolved: bool,
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
    /// Alertmanager did not confirm the alert before the first disruptive step (I4).
    Unconfirmed,
    /// This alert occurrence was already remediated by a finished ticket.
    Handled,
    /// `ark-healer pause`: nothing is written to Nodes until `resume` ([`crate::pause`]).
    Paused,
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
            BlockReason::Unconfirmed => "unconfirmed",
            BlockReason::Handled => "handled",
            BlockReason::Paused => "paused",
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
    /// Fingerprints of the firing alerts behind this condition on this node.
    #[serde(skip)]
    pub fingerprints: Vec<String>,
    /// `startsAt` of the alert occurrence this plan remediates.
    #[serde(skip)]
    pub alert_started_at: Option<Timestamp>,
    /// An open ticket for this condition exists: continue it rather than start a new one.
    #[serde(skip)]
    pub continues_ticket: bool,
    /// [`crate::catalog::SopSpec::digest`] of `step_list`: what a new ticket pins (I6).
    #[serde(skip)]
    pub sop_digest: String,
    /// The SOP takes capacity away (it needs budget).
    #[serde(skip)]
    pub disruptive: bool,
    /// Plan and record only: global dry-run, the SOP's `dryRun`, or no cluster.
    #[serde(skip)]
    pub dry_run: bool,
    /// Is the condition still firing (WaitCondition, Uncordon)?
    #[serde(skip)]
    pub condition_firing: bool,
    /// The `gpu` label of a firing alert of the condition, else `all` (Job templates).
    #[serde(skip)]
    pub gpu: String,
    /// Alertmanager must confirm the alert before this pass may act (I4): the SOP disrupts and
    /// this node's ticket has not disrupted yet.
    #[serde(skip)]
    pub needs_confirmation: bool,
    /// The training jobs the node's firing job alerts ([`JOB_CONDITIONS`] with a `job_id`) tie it
    /// to, clipped, at most [`crate::ticket::JOBS_MAX`]: recorded in whichever ticket the node
    /// has, whatever condition it works on (one ticket per node, never a second SOP for them).
    /// In `plan --output json` only when there are any (the shape is the ticket's `jobs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobRelation>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub nodes: Vec<NodePlan>,
    pub ignored: Vec<Ignored>,
    /// Global dry-run (configuration or no cluster): nothing at all is written.
    #[serde(skip)]
    pub dry_run: bool,
}

/// Borrowed from the alerts and the view: only the chosen candidate of a node is copied into its
/// plan (at 10,000 nodes × 10 alerts, owning every candidate's strings was most of the time).
struct Candidate<'a> {
    condition: &'a str,
    priority: u32,
    reason: Reason<'a>,
    fingerprint: Option<&'a str>,
    /// `startsAt` of the alert occurrence (none for an open ticket's own candidate).
    starts_at: Option<Timestamp>,
}

/// Where a candidate's reason comes from, computed only for the chosen one.
enum Reason<'a> {
    Alert(&'a Alert),
    Ticket(&'a str),
}

impl Reason<'_> {
    fn text(&self) -> String {
        match self {
            Reason::Alert(a) => a.reason(),
            Reason::Ticket(r) => (*r).to_owned(),
        }
    }
}

/// Plans every node. Deterministic: the same inputs give the same plan (nodes sorted by
/// priority then name; ignored sorted).
pub fn plan<A: Borrow<Alert>>(input: &PlanInput<'_, A>) -> Plan {
    let PlanInput {
        alerts,
        catalog,
        config,
        view,
        now,
        silence_means_resolved,
    } = *input;
    let mut out = Plan::default();
    // Keyed by the catalog's own condition names: no allocation per alert. The node order does
    // not matter: the plans are sorted below.
    let mut per_node: HashMap<&str, BTreeMap<&str, Candidate>> = HashMap::new();
    // What a plan copies from its SOP, computed once per SOP rather than once per node (the
    // digest serializes the steps): at 10,000 nodes this was a third of the planning time.
    let mut sop_parts: BTreeMap<&str, (String, Vec<String>)> = BTreeMap::new();
    let mut ignored: BTreeSet<(String, String, String)> = BTreeSet::new();

    // Every alert (firing or resolved) by node: the per-node state below looks only at its own.
    let mut by_node: HashMap<&str, Vec<&Alert>> = HashMap::new();
    for a in alerts.iter().map(Borrow::borrow) {
        match a.node() {
            Some(n) => by_node.entry(n).or_default().push(a),
            None if a.status == AlertStatus::Firing => {
                let label = a.condition().unwrap_or("").to_owned();
                ignored.insert((String::new(), label, "alert has no node label".into()));
            }
            None => {}
        }
    }
    for list in by_node.values_mut() {
        // Earliest occurrence first, so the ticket reason names the first alert; deterministic
        // whatever the input order (the gpu label comes from the first). Per node, not over all
        // alerts at once: 100,000 alerts sorted together was most of a pass at 10,000 nodes.
        list.sort_by(|a, b| (a.starts_at, &a.fingerprint).cmp(&(b.starts_at, &b.fingerprint)));
    }
    let firing = by_node.iter().flat_map(|(&node, list)| {
        list.iter()
            .filter(|a| a.status == AlertStatus::Firing)
            .map(move |&a| (node, a))
    });

    for (node, a) in firing {
        let label = || a.condition().unwrap_or("").to_owned();
        let Some(condition) =
            catalog.resolve(a.condition(), a.labels.get("xid").map(String::as_str))
        else {
            let label = label();
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
            .entry(condition)
            .or_insert_with(|| Candidate {
                condition,
                priority: spec.priority,
                reason: Reason::Alert(a),
                fingerprint: Some(a.fingerprint.as_str()),
                starts_at: Some(a.starts_at),
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
                .entry(t.condition.as_str())
                .or_insert_with(|| Candidate {
                    condition: t.condition.as_str(),
                    priority: spec.priority,
                    reason: Reason::Ticket(&t.reason),
                    fingerprint: t.fingerprint.as_deref(),
                    starts_at: t.alert_started_at,
                });
        }
    }

    for (node, cands) in per_node {
        let mut cands: Vec<Candidate> = cands.into_values().collect();
        cands.sort_by(|a, b| (a.priority, &a.condition).cmp(&(b.priority, &b.condition)));
        let chosen = cands.remove(0);
        let spec = catalog
            .condition(chosen.condition)
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
                // An escalated ticket holds the node for humans against conditions at most as
                // urgent as its own; a more urgent fault still gets its SOP (I3).
                Some(Ok(t))
                    if t.status == TicketStatus::Escalated
                        && chosen.priority >= ticket_priority(t, catalog) =>
                {
                    Some((
                        BlockReason::Escalated,
                        format!(
                            "ticket for {} escalated to humans: no automatic action until it is closed",
                            t.condition
                        ),
                    ))
                }
                // The same alert twice is one action: an occurrence a finished ticket already
                // handled (a diagnosis whose alert still fires) is not remediated again; a new
                // occurrence is (then cooldown applies if the last one disrupted).
                Some(Ok(t))
                    if !t.status.is_open()
                        && t.condition == chosen.condition
                        && t.alert_started_at
                            .zip(chosen.starts_at)
                            .is_some_and(|(done, now)| now <= done) =>
                {
                    Some((
                        BlockReason::Handled,
                        format!(
                            "this occurrence of {} was already remediated (ticket {:?}); a new occurrence will be",
                            t.condition, t.status
                        ),
                    ))
                }
                Some(Ok(t)) if !continues_ticket && !t.status.is_open() => {
                    new_ticket_block(t, chosen.priority, catalog, config, now)
                }
                _ => None,
            };
        }

        let deferred = cands
            .iter()
            .map(|c| Deferred {
                condition: c.condition.to_owned(),
                priority: c.priority,
            })
            .collect();
        // (`by_node` holds only this node's alerts.)
        let is_chosen = |a: &Alert| {
            catalog.resolve(a.condition(), a.labels.get("xid").map(String::as_str))
                == Some(chosen.condition)
        };
        let mut state = None;
        let mut gpu = None;
        let mut fingerprints = Vec::new();
        for a in by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter(|a| is_chosen(a))
        {
            match a.status {
                AlertStatus::Firing => {
                    state = Some(true);
                    fingerprints.push(a.fingerprint.clone());
                    if gpu.is_none() {
                        gpu = a.labels.get("gpu").filter(|g| !g.is_empty()).cloned();
                    }
                }
                AlertStatus::Resolved => {
                    state.get_or_insert(false);
                }
            }
        }
        fingerprints.sort();
        let jobs = job_relations(by_node.get(node).map_or(&[][..], Vec::as_slice));
        let condition_firing = state.unwrap_or(!silence_means_resolved);
        let ticket_disrupted = matches!(ticket, Some(Ok(t)) if continues_ticket && t.disrupted);
        let dry_run = config.dry_run || sop.dry_run || !view.live;
        let (sop_digest, steps) = sop_parts
            .entry(spec.sop.as_str())
            .or_insert_with(|| {
                (
                    sop.digest(),
                    sop.steps.iter().map(ToString::to_string).collect(),
                )
            })
            .clone();
        out.nodes.push(NodePlan {
            node: node.to_owned(),
            condition: chosen.condition.to_owned(),
            priority: chosen.priority,
            sop: spec.sop.clone(),
            steps,
            blocked: block.as_ref().map(|b| b.1.clone()),
            deferred,
            step_list: sop.steps.clone(),
            block_reason: block.map(|b| b.0),
            reason: chosen.reason.text(),
            fingerprint: chosen.fingerprint.map(str::to_owned),
            fingerprints,
            alert_started_at: chosen.starts_at,
            continues_ticket,
            sop_digest,
            disruptive: sop.disrupts(),
            dry_run,
            condition_firing,
            gpu: gpu.unwrap_or_else(|| "all".into()),
            needs_confirmation: sop.disrupts() && !ticket_disrupted,
            jobs,
        });
    }

    // Most urgent first: NotReady, then Cordon, then Emergency by priority; ties by node name.
    out.nodes
        .sort_by(|a, b| (a.priority, &a.node).cmp(&(b.priority, &b.node)));

    // Disruption budget over one consistent view (I1): every node that is unschedulable (manual
    // cordons too) or already disrupted by an open ticket counts; such a node needs no new
    // budget. Every SOP that takes capacity away needs it, and cordons first (catalog rule), so
    // an admitted node counts from its first disruptive step on.
    let total = if view.live {
        view.nodes.len()
    } else {
        out.nodes.len()
    };
    let limit = config.budget.limit(total);
    let mut disrupted = view.disrupted();
    for p in &mut out.nodes {
        if p.block_reason.is_some() {
            continue;
        }
        let already_out = view.nodes.get(&p.node).is_some_and(NodeView::disrupted);
        if !p.disruptive || already_out {
            continue;
        }
        if disrupted < limit {
            disrupted += 1;
        } else {
            p.block_reason = Some(BlockReason::DisruptionBudget);
            p.blocked = Some(format!(
                "disruption budget: {disrupted} of {total} nodes unschedulable or disrupted, limit {limit}"
            ));
        }
    }
    for p in &mut out.nodes {
        p.needs_confirmation &= p.block_reason.is_none() && !p.dry_run;
    }
    out.dry_run = config.dry_run || !view.live;

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

/// The job relations of a node's firing alerts: condition in [`JOB_CONDITIONS`], a non-empty
/// `job_id` label, the `victim_nodes` annotation; clipped and bounded like the ticket stores them.
fn job_relations(alerts: &[&Alert]) -> Vec<JobRelation> {
    let mut jobs: Vec<JobRelation> = alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .filter(|a| a.condition().is_some_and(|c| JOB_CONDITIONS.contains(&c)))
        .filter_map(|a| {
            JobRelation::new(
                a.labels.get("job_id").map_or("", String::as_str),
                a.condition().unwrap_or_default(),
                a.annotations.get("victim_nodes").map(String::as_str),
                a.starts_at,
            )
        })
        .collect();
    normalize_jobs(&mut jobs);
    jobs
}

mod guard;
pub use guard::stale_tickets;
use guard::{new_ticket_block, ticket_priority};

#[cfg(test)]
mod tests;
