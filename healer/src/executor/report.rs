//! What the executor reports without acting: blocked plans (counted once per node and reason, in
//! the audit log, and in the ticket where the node may be written), tickets closed because their
//! condition resolved before any action, and the plan's gauges.

use jiff::Timestamp;

use super::{Executor, Reported, ticket_patch};
use crate::audit::AuditRecord;
use crate::k8s::{Cluster, node_ticket};
use crate::lifecycle;
use crate::planner::{BlockReason, ClusterView, NodePlan, Plan};
use crate::ticket::{StepStatus, TicketStatus};

impl<C: Cluster> Executor<C> {
    pub(super) fn update_gauges(&self, plan: &Plan, view: &ClusterView) {
        let open = view
            .nodes
            .values()
            .filter(|n| matches!(&n.ticket, Some(Ok(t)) if t.status.is_open()))
            .count();
        self.metrics.tickets_open.set(open as i64);
        self.metrics.condition_nodes.reset();
        self.metrics.node_blocked.reset();
        for p in &plan.nodes {
            self.metrics
                .condition_nodes
                .with_label_values(&[p.condition.as_str()])
                .inc();
            if let Some(
                r @ (BlockReason::DisruptionBudget
                | BlockReason::Cooldown
                | BlockReason::RepeatOffender),
            ) = p.block_reason
            {
                self.metrics
                    .node_blocked
                    .with_label_values(&[p.node.as_str(), r.label()])
                    .set(1);
            }
        }
        // Bounded by the cluster's nodes: at most one series per node in each.
        self.metrics.ticket_step_started.reset();
        self.metrics.tickets_escalated.reset();
        for (name, n) in &view.nodes {
            let Some(Ok(t)) = &n.ticket else { continue };
            if t.status == TicketStatus::Escalated {
                self.metrics
                    .tickets_escalated
                    .with_label_values(&[name.as_str(), t.condition.as_str()])
                    .set(1);
            }
            if t.status.is_open()
                && let Some(w) = t
                    .workflows
                    .last()
                    .filter(|w| w.status == StepStatus::Running)
            {
                self.metrics
                    .ticket_step_started
                    .with_label_values(&[name.as_str(), w.action.as_str()])
                    .set(w.at.as_millisecond() as f64 / 1000.0);
            }
        }
    }

    /// Closes an open ticket that never acted and whose condition resolved meanwhile.
    pub(super) async fn close_stale(&self, node: &str) {
        let Some(c) = &self.cluster else { return };
        let now = Timestamp::now();
        let res = async {
            let Some(n) = c.get_node(node).await? else {
                return Ok(None);
            };
            let current = node_ticket(&n).and_then(Result::ok);
            let Some(t) = lifecycle::close_unstarted(current, now) else {
                return Ok(None);
            };
            let rv = n.metadata.resource_version.clone().unwrap_or_default();
            c.patch_node(node, &rv, &ticket_patch(node, &t)?).await
        }
        .await;
        let res: crate::Result<_> = res;
        match res {
            Ok(Some(_)) => {
                self.reported_map().remove(node);
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
            Ok(None) => {}
            Err(e) => tracing::warn!(node, error = %e, "Stale ticket not closed"),
        }
    }

    /// Counts a block once per (node, reason), records it in the audit log and, where the node
    /// may be written, in its ticket.
    /// Whether the ticket holds the node's last reported block (see `Reported::written`).
    fn mark_written(&self, node: &str, written: bool) {
        if let Some(r) = self.reported_map().get_mut(node) {
            r.written = written;
        }
    }

    pub(super) async fn report_block(
        &self,
        p: &NodePlan,
        reason: BlockReason,
        message: &str,
        dry: bool,
    ) {
        let message = format!("{}: {message}", p.condition);
        let message = message.as_str();
        let (new_reason, same_block) = {
            let mut rep = self.reported_map();
            let prev = rep.insert(
                p.node.clone(),
                Reported {
                    reason,
                    message: message.to_owned(),
                    jobs: p.jobs.clone(),
                    written: false,
                },
            );
            match prev {
                // Unchanged and recorded: nothing to count, log or write.
                Some(r)
                    if r.reason == reason
                        && r.message == message
                        && r.jobs == p.jobs
                        && r.written =>
                {
                    if let Some(e) = rep.get_mut(&p.node) {
                        e.written = true;
                    }
                    return;
                }
                // Only the job relations changed, or the last write failed: the ticket is
                // (re)written, the block is old news.
                Some(r) if r.reason == reason && r.message == message => (false, true),
                Some(r) => (r.reason != reason, false),
                None => (true, false),
            }
        };
        if new_reason {
            self.metrics
                .actions_blocked
                .with_label_values(&[reason.label()])
                .inc();
        }
        if !same_block {
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
        }
        let Some(c) = &self.cluster else {
            self.mark_written(&p.node, true);
            return;
        };
        // A ticket a human broke is never rewritten, but it is announced where people look: one
        // Warning Event per distinct problem (this point is reached once per reason/message).
        if reason == BlockReason::InvalidTicket
            && !dry
            && !same_block
            && let Ok(Some(node)) = c.get_node(&p.node).await
        {
            c.event(
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
            self.mark_written(&p.node, true);
            return;
        }
        let now = Timestamp::now();
        // Ok(None): nothing to write (node gone, a ticket a human broke, already recorded).
        let res = async {
            for _ in 0..3 {
                let Some(n) = c.get_node(&p.node).await? else {
                    return Ok(None);
                };
                let current = match node_ticket(&n) {
                    Some(Ok(t)) => Some(t),
                    Some(Err(_)) => return Ok(None),
                    None => None,
                };
                let Some(t) = lifecycle::block(current, p, reason, message, now) else {
                    return Ok(None);
                };
                let rv = n.metadata.resource_version.clone().unwrap_or_default();
                if let Some(n) = c
                    .patch_node(&p.node, &rv, &ticket_patch(&p.node, &t)?)
                    .await?
                {
                    return Ok(Some((n, t.status)));
                }
            }
            Err(crate::Error::KubeRetriesExhausted {
                op: format!("block record on {}", p.node),
                attempts: 3,
                last: "409 Conflict: the ticket kept changing".into(),
            })
        }
        .await;
        self.mark_written(&p.node, res.is_ok());
        match res {
            Ok(Some((node, TicketStatus::Escalated))) if reason == BlockReason::RepeatOffender => {
                c.event(&node, true, "Escalated", message);
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
}
