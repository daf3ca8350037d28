//! The executor: the only code that mutates the cluster. One reconcile pass = one consistent view
//! of all nodes → [`planner::plan`] → for each node that may act, advance its SOP one step at a
//! time. Each step is recorded in the ticket annotation (atomically with the node change it made,
//! guarded by resourceVersion), in an Event and in the audit log. The ticket is the only state:
//! a restarted healer reads it and continues with the first step that has not succeeded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::{Kube, node_ticket};
use crate::Result;
use crate::alerts::{AlertStore, ConditionState};
use crate::audit::{Audit, AuditRecord};
use crate::catalog::{Catalog, Step};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::planner::{self, BlockReason, ClusterView, NodePlan, Plan};
use crate::steps::{self, JobTemplates, Outcome, StepCtx};
use crate::ticket::{StepStatus, TICKET_ANNOTATION, Ticket, TicketStatus, Workflow};

pub struct Executor {
    pub kube: Option<Kube>,
    pub catalog: Catalog,
    pub config: Config,
    pub jobs: JobTemplates,
    pub audit: Audit,
    pub metrics: Metrics,
    pub alerts: Arc<Mutex<AlertStore>>,
    started: Instant,
    /// Last block reported per node (reason, message): a block is counted once per node and
    /// reason, not once per pass; the ticket is rewritten only when the message changes.
    reported: Mutex<HashMap<String, (BlockReason, String)>>,
    /// Whether this replica holds the Lease (`None`: leader election off). Checked before every
    /// step, so a replica that loses the Lease mid-pass stops acting at the next step boundary.
    leading: Option<Arc<AtomicBool>>,
}

/// How long after start an alert we have not heard about counts as unknown rather than resolved:
/// Alertmanager re-sends firing alerts on `repeat_interval`, so silence right after a restart
/// proves nothing.
const STARTUP_GRACE_SECONDS: u64 = 300;

impl Executor {
    pub fn new(
        kube: Option<Kube>,
        catalog: Catalog,
        config: Config,
        jobs: JobTemplates,
        audit: Audit,
        metrics: Metrics,
        alerts: Arc<Mutex<AlertStore>>,
    ) -> Self {
        Executor {
            kube,
            catalog,
            config,
            jobs,
            audit,
            metrics,
            alerts,
            started: Instant::now(),
            reported: Mutex::new(HashMap::new()),
            leading: None,
        }
    }

    /// Acts only while `leading` is true (checked before each step).
    pub fn with_leadership(mut self, leading: Arc<AtomicBool>) -> Self {
        self.leading = Some(leading);
        self
    }

    fn is_leading(&self) -> bool {
        self.leading
            .as_ref()
            .is_none_or(|l| l.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn store(&self) -> std::sync::MutexGuard<'_, AlertStore> {
        self.alerts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One pass: read the cluster, plan, act. Returns the plan it acted on.
    ///
    /// `only`: advance only these nodes' SOPs (the nodes new alerts arrived for), so a new alert
    /// does not wait behind every node whose Job is still running; `None` (the periodic pass)
    /// advances all. Planning, and so the disruption budget, always covers the whole cluster.
    pub async fn reconcile(&self, only: Option<&HashSet<String>>) -> Result<Plan> {
        let (view, listed): (ClusterView, HashMap<String, Node>) = match &self.kube {
            Some(k) => {
                let nodes = k.list_nodes().await?;
                let view = super::view_of(&nodes);
                let listed = nodes
                    .into_iter()
                    .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
                    .collect();
                (view, listed)
            }
            None => (ClusterView::default(), HashMap::new()),
        };
        let listed = &listed;
        let now = Timestamp::now();
        // Forget what Alertmanager stopped re-sending before planning on it (I4).
        self.store().expire(now);
        let alerts = self.store().snapshot();
        let plan = planner::plan(&alerts, &self.catalog, &self.config, &view, now);
        self.update_gauges(&plan, &view);
        if !self.config.dry_run {
            for n in planner::stale_tickets(&plan, &view) {
                self.close_stale(&n.name).await;
            }
        }

        let mut runnable = Vec::new();
        let mut blocked = Vec::new();
        for p in &plan.nodes {
            let sop_dry = self.catalog.sop(&p.sop).is_some_and(|s| s.dry_run);
            let dry = self.config.dry_run || sop_dry || self.kube.is_none();
            match (p.block_reason, dry) {
                (Some(reason), _) => {
                    blocked.push((p, reason, p.blocked.clone().unwrap_or_default(), dry));
                }
                (None, true) => {
                    let msg = format!(
                        "dry-run: would run {} for {}: {}",
                        p.sop,
                        p.condition,
                        p.steps.join(", ")
                    );
                    blocked.push((p, BlockReason::DryRun, msg, true));
                }
                (None, false) => {
                    self.reported
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&p.node);
                    if only.is_none_or(|o| o.contains(&p.node)) {
                        runnable.push(p);
                    }
                }
            }
        }
        futures::stream::iter(blocked)
            .for_each_concurrent(
                self.config.max_concurrent_nodes,
                |(p, reason, msg, dry)| async move {
                    self.report_block(p, reason, &msg, dry).await;
                },
            )
            .await;
        if let Some(kube) = &self.kube {
            futures::stream::iter(runnable)
                .for_each_concurrent(self.config.max_concurrent_nodes, |p| async move {
                    if let Err(e) = self.advance(kube, p, listed.get(&p.node).cloned()).await {
                        tracing::warn!(node = %p.node, condition = %p.condition, error = %e, "SOP step failed; retried next pass");
                    }
                })
                .await;
        }
        Ok(plan)
    }

    /// Closes an open ticket that never acted and whose condition resolved meanwhile.
    async fn close_stale(&self, node: &str) {
        let Some(kube) = &self.kube else { return };
        let now = Timestamp::now();
        let res = kube
            .mutate_node(node, |n| match node_ticket(n) {
                Some(Ok(mut t)) if t.status.is_open() && t.workflows.is_empty() => {
                    t.status = TicketStatus::Closed;
                    t.closed_at = Some(now);
                    t.blocked = Some("condition resolved before any action".into());
                    Ok(Some(ticket_patch(node, &t)?))
                }
                _ => Ok(None),
            })
            .await;
        match res {
            Ok(_) => {
                self.reported
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(node);
                self.audit.record(&AuditRecord {
                    ts: now,
                    node,
                    condition: "",
                    sop: "",
                    step: None,
                    action: "Close",
                    status: "Closed",
                    message: "condition resolved before any action",
                    dry_run: false,
                });
            }
            Err(e) => tracing::warn!(node, error = %e, "Stale ticket not closed"),
        }
    }

    fn update_gauges(&self, plan: &Plan, view: &ClusterView) {
        let open = view
            .nodes
            .values()
            .filter(|n| matches!(&n.ticket, Some(Ok(t)) if t.status.is_open()))
            .count();
        self.metrics.tickets_open.set(open as i64);
        self.metrics.condition_nodes.reset();
        for p in &plan.nodes {
            self.metrics
                .condition_nodes
                .with_label_values(&[p.condition.as_str()])
                .inc();
        }
    }

    /// Counts a block once per (node, reason), records it in the audit log and, where the node
    /// may be written, in its ticket.
    async fn report_block(&self, p: &NodePlan, reason: BlockReason, message: &str, dry: bool) {
        let message = format!("{}: {message}", p.condition);
        let message = message.as_str();
        let new_reason = {
            let mut rep = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let prev = rep.insert(p.node.clone(), (reason, message.to_owned()));
            match prev {
                Some((r, m)) if r == reason && m == message => return,
                Some((r, _)) => r != reason,
                None => true,
            }
        };
        if new_reason {
            self.metrics
                .actions_blocked
                .with_label_values(&[reason.label()])
                .inc();
        }
        tracing::info!(node = %p.node, condition = %p.condition, reason = reason.label(), "Remediation blocked: {message}");
        self.audit.record(&AuditRecord {
            ts: Timestamp::now(),
            node: &p.node,
            condition: &p.condition,
            sop: &p.sop,
            step: None,
            action: "Plan",
            status: "Blocked",
            message,
            dry_run: dry,
        });
        // A ticket a human broke is never rewritten, but it is announced where people look: one
        // Warning Event per distinct problem (this point is reached once per reason/message).
        if reason == BlockReason::InvalidTicket
            && !dry
            && let Some(kube) = &self.kube
            && let Ok(Some(node)) = kube.get_node(&p.node).await
        {
            kube.event(
                &self.config.events_namespace,
                &node,
                true,
                "InvalidTicket",
                &format!("{message}; Ark will not act on this node until the ark.io/ticket annotation is fixed or removed"),
            );
        }
        // Never write to nodes that must stay untouched, to a ticket a human broke, or in dry-run.
        let writable = matches!(
            reason,
            BlockReason::DisruptionBudget | BlockReason::Cooldown | BlockReason::RepeatOffender
        );
        if dry || !writable {
            return;
        }
        let Some(kube) = &self.kube else { return };
        let now = Timestamp::now();
        let res = kube
            .mutate_node(&p.node, |node| {
                let prev = match node_ticket(node) {
                    Some(Ok(t)) => Some(t),
                    Some(Err(_)) => return Ok(None),
                    None => None,
                };
                let mut t = match prev {
                    Some(t) if t.status.is_open() && t.condition == p.condition => t,
                    prev if reason == BlockReason::RepeatOffender => {
                        let mut t = Ticket::new(
                            &p.condition,
                            &p.reason,
                            &p.sop,
                            p.fingerprint.as_deref(),
                            now,
                            prev.as_ref(),
                        );
                        t.history.pop(); // not a remediation: none will run
                        t.status = TicketStatus::Escalated;
                        t
                    }
                    Some(t) if reason == BlockReason::Cooldown => t,
                    prev => {
                        let mut t = Ticket::new(
                            &p.condition,
                            &p.reason,
                            &p.sop,
                            p.fingerprint.as_deref(),
                            now,
                            prev.as_ref(),
                        );
                        t.history.pop(); // waiting for budget is not a remediation
                        t
                    }
                };
                if t.blocked.as_deref() == Some(message) {
                    return Ok(None);
                }
                t.blocked = Some(message.to_owned());
                Ok(Some(ticket_patch(&p.node, &t)?))
            })
            .await;
        match res {
            Ok(Some(node)) if reason == BlockReason::RepeatOffender => {
                kube.event(
                    &self.config.events_namespace,
                    &node,
                    true,
                    "Escalated",
                    message,
                );
                self.metrics
                    .sop_total
                    .with_label_values(&[p.sop.as_str(), "escalated"])
                    .inc();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %p.node, error = %e, "Block not recorded in the ticket")
            }
        }
    }

    fn condition_resolved(&self, node: &str, condition: &str) -> bool {
        let state = self.store().condition_state(node, |a| {
            self.catalog
                .resolve(a.condition(), a.labels.get("xid").map(String::as_str))
                == Some(condition)
        });
        match state {
            ConditionState::Firing => false,
            ConditionState::Resolved => true,
            ConditionState::Unknown => self.started.elapsed().as_secs() >= STARTUP_GRACE_SECONDS,
        }
    }

    fn gpu_of(&self, node: &str, condition: &str) -> String {
        self.store()
            .firing()
            .filter(|a| a.node() == Some(node) && a.condition() == Some(condition))
            .find_map(|a| a.labels.get("gpu").filter(|g| !g.is_empty()).cloned())
            .unwrap_or_else(|| "all".into())
    }

    fn audit_step(
        &self,
        p: &NodePlan,
        step: Option<usize>,
        action: &str,
        status: &str,
        message: &str,
    ) {
        self.audit.record(&AuditRecord {
            ts: Timestamp::now(),
            node: &p.node,
            condition: &p.condition,
            sop: &p.sop,
            step,
            action,
            status,
            message,
            dry_run: false,
        });
    }

    /// Advances one node's SOP as far as it can go now, one recorded step at a time.
    /// `first`: the node as just listed, if at hand (saves a GET).
    pub async fn advance(&self, kube: &Kube, p: &NodePlan, first: Option<Node>) -> Result<()> {
        let ns = self.config.events_namespace.as_str();
        // The node as our last write returned it: saves a GET per step. None: read it.
        let mut cached: Option<Node> = first;
        let mut opening: Option<String> = None;
        // Bound the loop: every iteration either completes a step or returns.
        for _ in 0..(p.step_list.len() * 3 + 6) {
            if !self.is_leading() {
                tracing::info!(node = %p.node, "Lost the Lease: stopping before the next step");
                return Ok(());
            }
            let now = Timestamp::now();
            let node = match cached.take() {
                Some(n) => n,
                None => match kube.get_node(&p.node).await? {
                    Some(n) => n,
                    None => return Ok(()),
                },
            };
            let current = match node_ticket(&node) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return Err(e),
                None => None,
            };
            let mut ticket = match current {
                Some(t) if t.status.is_open() && t.condition == p.condition => t,
                prev => {
                    // Start a new ticket (superseding a less urgent open one, if any).
                    let mut t = Ticket::new(
                        &p.condition,
                        &p.reason,
                        &p.sop,
                        p.fingerprint.as_deref(),
                        now,
                        prev.as_ref(),
                    );
                    if let Some(old) = prev.as_ref().filter(|o| o.status.is_open()) {
                        t.cordoned_by_healer = old.cordoned_by_healer;
                        let msg = format!(
                            "ticket for {} superseded by more urgent {}",
                            old.condition, p.condition
                        );
                        self.audit_step(p, None, "Supersede", "Succeeded", &msg);
                    }
                    // Written together with the first step's record (one request); announced
                    // once that write succeeded.
                    opening = Some(format!(
                        "{} ({}): SOP {} started",
                        p.condition, p.reason, p.sop
                    ));
                    t
                }
            };
            let Some(index) = ticket.next_step(p.step_list.len()) else {
                return self.finish(kube, &node, p, ticket, now).await;
            };
            let step = &p.step_list[index];
            let running = ticket
                .workflow(index)
                .filter(|w| w.status == StepStatus::Running)
                .cloned();
            if steps::is_long_running(step) && running.is_none() {
                ticket.status = TicketStatus::Resolving;
                ticket.blocked = None;
                ticket.record(
                    index,
                    workflow(
                        step,
                        StepStatus::Running,
                        now,
                        job_for(step, p, &ticket, index),
                        None,
                        None,
                    ),
                );
                if let Some(node) = self
                    .write(kube, &node, &ticket, None, &mut opening, p)
                    .await?
                {
                    self.audit_step(p, Some(index), step.action(), "Running", &step.to_string());
                    kube.event(
                        ns,
                        &node,
                        false,
                        &format!("{}Started", step.action()),
                        &format!("{step} started"),
                    );
                    cached = Some(node);
                }
                continue;
            }
            let started = running.as_ref().map_or(now, |w| w.at);
            let firing = !self.condition_resolved(&p.node, &p.condition);
            let gpu = self.gpu_of(&p.node, &p.condition);
            let ctx = StepCtx {
                kube,
                node: &node,
                node_name: &p.node,
                ticket: &ticket,
                index,
                started,
                now,
                jobs: &self.jobs,
                jobs_namespace: &self.config.jobs_namespace,
                condition_firing: firing,
                gpu: &gpu,
            };
            let outcome = steps::execute(step, &ctx).await?;
            tracing::debug!(node = %p.node, index, step = %step, outcome = ?outcome, "Step evaluated");
            match outcome {
                Outcome::Done { message, patch } => {
                    let job = job_for(step, p, &ticket, index);
                    let retries = running.as_ref().and_then(|w| w.retries);
                    if matches!(step, Step::Cordon) && patch.is_some() {
                        ticket.cordoned_by_healer = true;
                    }
                    ticket.status = if matches!(step, Step::Escalate) {
                        TicketStatus::Escalated
                    } else {
                        TicketStatus::Resolving
                    };
                    ticket.blocked = None;
                    ticket.record(
                        index,
                        workflow(
                            step,
                            StepStatus::Succeeded,
                            now,
                            job.clone(),
                            Some(message.clone()),
                            retries,
                        ),
                    );
                    let Some(node) = self
                        .write(kube, &node, &ticket, patch, &mut opening, p)
                        .await?
                    else {
                        continue; // 409: node changed since we read it; recompute the step
                    };
                    self.metrics
                        .steps_total
                        .with_label_values(&[step.action(), "Succeeded"])
                        .inc();
                    self.audit_step(p, Some(index), step.action(), "Succeeded", &message);
                    let warn = matches!(step, Step::Escalate);
                    kube.event(ns, &node, warn, step.action(), &message);
                    cached = Some(node);
                    if let Some(job) = job {
                        steps::run_job_cleanup(kube, &self.config.jobs_namespace, &job).await;
                    }
                    if matches!(step, Step::Escalate) {
                        self.metrics
                            .sop_total
                            .with_label_values(&[p.sop.as_str(), "escalated"])
                            .inc();
                        return Ok(());
                    }
                }
                Outcome::Waiting { message, job } => {
                    let prev = running.unwrap_or_else(|| {
                        workflow(step, StepStatus::Running, now, None, None, None)
                    });
                    if prev.message.as_deref() != Some(message.as_str())
                        || (job.is_some() && prev.job != job)
                    {
                        let mut w = prev.clone();
                        w.message = Some(message.clone());
                        w.retries = Some(w.retries.unwrap_or(0).saturating_add(1));
                        if job.is_some() {
                            w.job = job;
                        }
                        ticket.record(index, w);
                        self.write(kube, &node, &ticket, None, &mut opening, p)
                            .await?;
                        self.audit_step(p, Some(index), step.action(), "Running", &message);
                    }
                    return Ok(());
                }
                Outcome::Failed { message } => {
                    ticket.status = TicketStatus::Escalated;
                    let job = job_for(step, p, &ticket, index);
                    ticket.record(
                        index,
                        workflow(
                            step,
                            StepStatus::Failed,
                            now,
                            job,
                            Some(message.clone()),
                            None,
                        ),
                    );
                    let Some(node) = self
                        .write(kube, &node, &ticket, None, &mut opening, p)
                        .await?
                    else {
                        continue;
                    };
                    self.metrics
                        .steps_total
                        .with_label_values(&[step.action(), "Failed"])
                        .inc();
                    self.metrics
                        .sop_total
                        .with_label_values(&[p.sop.as_str(), "escalated"])
                        .inc();
                    self.audit_step(p, Some(index), step.action(), "Failed", &message);
                    kube.event(
                        ns,
                        &node,
                        true,
                        "Escalated",
                        &format!("{step} failed: {message}; escalated to humans"),
                    );
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn finish(
        &self,
        kube: &Kube,
        node: &Node,
        p: &NodePlan,
        mut ticket: Ticket,
        now: Timestamp,
    ) -> Result<()> {
        ticket.status = TicketStatus::Resolved;
        ticket.closed_at = Some(now);
        ticket.blocked = None;
        if let Some(node) = self.write(kube, node, &ticket, None, &mut None, p).await? {
            let secs = (now.as_second() - ticket.created_at.as_second()).max(0) as f64;
            self.metrics.selfheal_duration.observe(secs);
            self.metrics
                .sop_total
                .with_label_values(&[p.sop.as_str(), "resolved"])
                .inc();
            let msg = format!("{} resolved after {secs} s", p.condition);
            self.audit_step(p, None, "Close", "Resolved", &msg);
            kube.event(
                &self.config.events_namespace,
                &node,
                false,
                "RemediationResolved",
                &msg,
            );
        }
        Ok(())
    }

    /// Writes the ticket (and `extra`, a merge patch from a step) in one request guarded by the
    /// resourceVersion `node` was read at. `None` = 409, the caller re-reads.
    async fn write(
        &self,
        kube: &Kube,
        node: &Node,
        ticket: &Ticket,
        extra: Option<Value>,
        opening: &mut Option<String>,
        p: &NodePlan,
    ) -> Result<Option<Node>> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut patch = ticket_patch(&name, ticket)?;
        if let Some(Value::Object(extra)) = extra {
            for (k, v) in extra {
                if k == "metadata" {
                    continue;
                }
                patch[k] = v;
            }
        }
        patch["metadata"]["resourceVersion"] =
            json!(node.metadata.resource_version.clone().unwrap_or_default());
        let api = kube.nodes();
        let pp = PatchParams::default();
        let pa = Patch::Merge(&patch);
        match kube.call("patch node", || api.patch(&name, &pp, &pa)).await {
            Ok(n) => {
                if let Some(msg) = opening.take() {
                    self.audit_step(p, None, "Open", "Created", &msg);
                    kube.event(
                        &self.config.events_namespace,
                        &n,
                        true,
                        "RemediationStarted",
                        &msg,
                    );
                }
                Ok(Some(n))
            }
            Err(e) if e.api_status() == Some(409) => {
                kube.metrics
                    .kube_retries
                    .with_label_values(&["conflict"])
                    .inc();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

fn ticket_patch(node: &str, t: &Ticket) -> Result<Value> {
    let text = t.to_annotation(node)?;
    Ok(json!({"metadata": {"annotations": {TICKET_ANNOTATION: text}}}))
}

fn job_for(step: &Step, p: &NodePlan, t: &Ticket, index: usize) -> Option<String> {
    match step {
        Step::RunJob { template, .. } => Some(steps::job_name(template, &p.node, &t.id(), index)),
        _ => None,
    }
}

fn workflow(
    step: &Step,
    status: StepStatus,
    at: Timestamp,
    job: Option<String>,
    message: Option<String>,
    retries: Option<u32>,
) -> Workflow {
    Workflow {
        action: step.action().to_owned(),
        status,
        at,
        step: None,
        job,
        message,
        retries,
    }
}
