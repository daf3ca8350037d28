//! The executor: carries a [`Plan`] out, and nothing else. It reads no alert and no catalog —
//! the plan says what the condition is, whether it still fires, which steps the SOP has and
//! whether this is a dry run — and it decides nothing about tickets: [`lifecycle`] says what a
//! ticket becomes, the executor writes that (atomically with the node change it records, guarded
//! by resourceVersion), posts an Event and an audit line. The ticket is the only state: a
//! restarted healer reads it and continues with the first step that has not succeeded.
//!
//! Every write goes through the [`Cluster`], whose writes are fenced by the Lease (I2); the
//! executor also stops at the next step boundary when the fence no longer holds.

mod report;
pub mod steps;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

use crate::audit::{Audit, AuditRecord};
use crate::catalog::Step;
use crate::k8s::{Cluster, Fence, node_ticket};
use crate::lifecycle::{self, ErrorVerdict, Start};
use crate::metrics::Metrics;
use crate::planner::{self, BlockReason, ClusterView, NodePlan, Plan};
use crate::ticket::{JobRelation, StepStatus, TICKET_ANNOTATION, Ticket};
use crate::{Error, Result};
use steps::{JobTemplates, Outcome, StepCtx};

/// What was last reported for a blocked node (bounded: the plan clips and bounds its jobs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reported {
    reason: BlockReason,
    message: String,
    jobs: Vec<JobRelation>,
    /// The ticket holds this block (or needs no write). False after a failed write (an API
    /// error, the fence lapsing, conflicts): the next pass writes it again, without counting or
    /// auditing the block a second time.
    written: bool,
}

/// How the executor runs (from the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    pub jobs_namespace: String,
    pub max_concurrent_nodes: usize,
}

pub struct Executor<C> {
    /// `None`: no cluster (dry-run against an empty view).
    cluster: Option<C>,
    settings: Settings,
    jobs: JobTemplates,
    audit: Audit,
    metrics: Metrics,
    fence: Fence,
    /// Last block reported per node: a block is counted once per node and reason, not once per
    /// pass; the ticket is rewritten only when the message or the plan's job relations change.
    reported: Mutex<HashMap<String, Reported>>,
    /// How long one pass may spend recording blocks (their ticket writes are paced): the rest
    /// are recorded by the next passes, so a storm of blocked nodes never holds up the nodes
    /// that act. `None`: no bound (unit tests).
    report_time: Option<std::time::Duration>,
}

impl<C: Cluster> Executor<C> {
    pub fn new(
        cluster: Option<C>,
        settings: Settings,
        jobs: JobTemplates,
        audit: Audit,
        metrics: Metrics,
        fence: Fence,
    ) -> Self {
        Executor {
            cluster,
            settings,
            jobs,
            audit,
            metrics,
            fence,
            reported: Mutex::new(HashMap::new()),
            report_time: None,
        }
    }

    /// Bounds the time one pass spends recording blocks (see `report_time`).
    pub fn with_report_time(mut self, t: std::time::Duration) -> Self {
        self.report_time = Some(t);
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn cluster(&self) -> Option<&C> {
        self.cluster.as_ref()
    }

    /// Carries out `plan`, made from `view`; `listed` are the Node objects `view` was made from
    /// (saves a GET per node). `only`: advance only these nodes' SOPs (the nodes new alerts
    /// arrived for), so a new alert does not wait behind every node whose Job is still running;
    /// `None` (the periodic pass) advances all. Blocks are reported for every node.
    pub async fn execute(
        &self,
        plan: &Plan,
        view: &ClusterView,
        listed: &HashMap<String, Node>,
        only: Option<&HashSet<String>>,
    ) {
        self.update_gauges(plan, view);
        if !self.fence.holds() {
            return;
        }
        if only.is_none() {
            let planned: HashSet<&str> = plan.nodes.iter().map(|p| p.node.as_str()).collect();
            self.reported_map()
                .retain(|n, _| planned.contains(n.as_str()));
        }
        if self.cluster.is_some() && !plan.dry_run {
            for n in planner::stale_tickets(plan, view) {
                self.close_stale(&n.name).await;
            }
        }
        let mut runnable = Vec::new();
        let mut blocked = Vec::new();
        for p in &plan.nodes {
            match (p.block_reason, p.dry_run) {
                (Some(reason), dry) => {
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
                    self.reported_map().remove(&p.node);
                    if only.is_none_or(|o| o.contains(&p.node)) {
                        runnable.push(p);
                    }
                }
            }
        }
        let limit = self.settings.max_concurrent_nodes.max(1);
        // The nodes that act go first: recording 10,000 blocks (paced writes) must not delay
        // the budget's worth of remediations (issue 19).
        if let Some(cluster) = &self.cluster {
            futures::StreamExt::for_each_concurrent(
                futures::stream::iter(runnable),
                limit,
                |p| async move {
                    match self.advance(cluster, p, listed.get(&p.node).cloned()).await {
                        Ok(()) => {}
                        Err(Error::NotLeader { .. }) => {
                            tracing::info!(node = %p.node, "Lease may have lapsed: stopped before the next write");
                        }
                        Err(e) => {
                            tracing::warn!(node = %p.node, condition = %p.condition, error = %e, "SOP step failed; retried next pass");
                        }
                    }
                },
            )
            .await;
        }
        let until = self.report_time.map(|t| std::time::Instant::now() + t);
        futures::StreamExt::for_each_concurrent(
            futures::stream::iter(blocked),
            limit,
            |(p, reason, msg, dry)| async move {
                // Not reached this pass: not marked reported, so the next pass records it.
                if until.is_some_and(|u| std::time::Instant::now() >= u) {
                    return;
                }
                self.report_block(p, reason, &msg, dry).await;
            },
        )
        .await;
    }

    fn reported_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Reported>> {
        self.reported.lock().unwrap_or_else(|e| e.into_inner())
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
    pub async fn advance(&self, c: &C, p: &NodePlan, first: Option<Node>) -> Result<()> {
        // The node as our last write returned it: saves a GET per step. None: read it.
        let mut cached: Option<Node> = first;
        let mut opening: Option<String> = None;
        // Bound the loop: every iteration either completes a step or returns.
        for _ in 0..(p.step_list.len() * 3 + 6) {
            if !self.fence.holds() {
                tracing::info!(node = %p.node, "Not holding the Lease: stopping before the next step");
                return Ok(());
            }
            let now = Timestamp::now();
            let node = match cached.take() {
                Some(n) => n,
                None => match c.get_node(&p.node).await? {
                    Some(n) => n,
                    None => return Ok(()),
                },
            };
            let current = match node_ticket(&node) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return Err(e),
                None => None,
            };
            let mut ticket = match lifecycle::start(current, p, now) {
                Start::Continue(t) => t,
                Start::Open { ticket, replaced } => {
                    if let Some(r) = replaced {
                        self.audit_step(
                            p,
                            None,
                            "Supersede",
                            "Succeeded",
                            &r.message(&p.condition),
                        );
                    }
                    // Written together with the first step's record (one request); announced
                    // once that write succeeded.
                    opening = Some(format!(
                        "{} ({}): SOP {} started",
                        p.condition, p.reason, p.sop
                    ));
                    ticket
                }
            };
            // The job relations ride along with whatever this pass writes; when it writes
            // nothing else (a Job still running), they are written on their own, once.
            let jobs_changed = lifecycle::record_jobs(&mut ticket, p);
            let Some(index) = ticket.next_step(p.step_list.len()) else {
                return self.finish(c, &node, p, ticket, now).await;
            };
            let step = &p.step_list[index];
            let running = ticket
                .workflow(index)
                .filter(|w| w.status == StepStatus::Running)
                .cloned();
            let job = job_for(step, p, &ticket, index);
            if steps::is_long_running(step) && running.is_none() {
                lifecycle::begin(&mut ticket, index, step, job, now);
                if let Some(node) = self.write(c, &node, &ticket, None, &mut opening, p).await? {
                    self.audit_step(p, Some(index), step.action(), "Running", &step.to_string());
                    c.event(
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
            let ctx = StepCtx {
                cluster: c,
                node: &node,
                node_name: &p.node,
                ticket: &ticket,
                index,
                started,
                now,
                jobs: &self.jobs,
                jobs_namespace: &self.settings.jobs_namespace,
                condition_firing: p.condition_firing,
                gpu: &p.gpu,
            };
            let outcome = match steps::execute(step, &ctx).await {
                Ok(o) => o,
                Err(e @ Error::NotLeader { .. }) => return Err(e),
                // I5: an API error counts towards the step's deadline, then escalates with the
                // reason in the ticket.
                Err(e) => match lifecycle::step_error(step, started, now, &e.to_string()) {
                    ErrorVerdict::Escalate { message } => Outcome::Failed { message },
                    ErrorVerdict::Retry { message } => {
                        // A step that never started writes nothing (nothing happened; a new
                        // ticket is written with its first step's record).
                        if running.is_some()
                            && (lifecycle::wait(&mut ticket, index, step, message, None, now)
                                || jobs_changed)
                        {
                            self.write(c, &node, &ticket, None, &mut opening, p).await?;
                        }
                        return Err(e);
                    }
                },
            };
            tracing::debug!(node = %p.node, index, step = %step, outcome = ?outcome, "Step evaluated");
            match outcome {
                Outcome::Done { message, patch } => {
                    let patched = patch.is_some();
                    let escalates = lifecycle::succeed(
                        &mut ticket,
                        index,
                        step,
                        message.clone(),
                        job.clone(),
                        patched,
                        now,
                    );
                    let Some(node) = self
                        .write(c, &node, &ticket, patch, &mut opening, p)
                        .await?
                    else {
                        continue; // 409: node changed since we read it; recompute the step
                    };
                    self.metrics
                        .steps_total
                        .with_label_values(&[step.action(), "Succeeded"])
                        .inc();
                    self.audit_step(p, Some(index), step.action(), "Succeeded", &message);
                    c.event(&node, escalates, step.action(), &message);
                    cached = Some(node);
                    if let Some(job) = job
                        && let Err(e) = c.delete_job(&self.settings.jobs_namespace, &job).await
                    {
                        tracing::warn!(job, error = %e, "Finished Job not deleted");
                    }
                    if escalates {
                        self.metrics
                            .sop_total
                            .with_label_values(&[p.sop.as_str(), "escalated"])
                            .inc();
                        return Ok(());
                    }
                }
                Outcome::Waiting { message, job } => {
                    if lifecycle::wait(&mut ticket, index, step, message.clone(), job, now) {
                        self.write(c, &node, &ticket, None, &mut opening, p).await?;
                        self.audit_step(p, Some(index), step.action(), "Running", &message);
                    } else if jobs_changed {
                        self.write(c, &node, &ticket, None, &mut opening, p).await?;
                    }
                    return Ok(());
                }
                Outcome::Failed { message } => {
                    lifecycle::fail(&mut ticket, index, step, message.clone(), job, now);
                    let Some(node) = self.write(c, &node, &ticket, None, &mut opening, p).await?
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
                    c.event(
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
        c: &C,
        node: &Node,
        p: &NodePlan,
        mut ticket: Ticket,
        now: Timestamp,
    ) -> Result<()> {
        lifecycle::finish(&mut ticket, now);
        if let Some(node) = self.write(c, node, &ticket, None, &mut None, p).await? {
            let secs = (now.as_second() - ticket.created_at.as_second()).max(0) as f64;
            self.metrics.selfheal_duration.observe(secs);
            self.metrics
                .sop_total
                .with_label_values(&[p.sop.as_str(), "resolved"])
                .inc();
            let msg = format!("{} resolved after {secs} s", p.condition);
            self.audit_step(p, None, "Close", "Resolved", &msg);
            c.event(&node, false, "RemediationResolved", &msg);
        }
        Ok(())
    }

    /// Writes the ticket (and `extra`, a merge patch from a step) in one request guarded by the
    /// resourceVersion `node` was read at. `None` = 409, the caller re-reads.
    async fn write(
        &self,
        c: &C,
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
                if k != "metadata" {
                    patch[k] = v;
                }
            }
        }
        let rv = node.metadata.resource_version.clone().unwrap_or_default();
        let written = c.patch_node(&name, &rv, &patch).await?;
        if let (Some(n), Some(msg)) = (&written, opening.take()) {
            self.audit_step(p, None, "Open", "Created", &msg);
            c.event(n, true, "RemediationStarted", &msg);
        }
        Ok(written)
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

#[cfg(test)]
mod tests;
