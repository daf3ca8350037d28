//! The ticket lifecycle: every transition a ticket goes through — open, continue, supersede,
//! re-plan, begin a step, record its outcome, block, finish, close, record the node's jobs — as
//! pure functions over [`Ticket`]. The executor decides nothing about tickets itself: it asks
//! this module what the ticket becomes and writes that. Unit-tested case by case here and
//! property-tested against the safety invariants in `tests.rs`.

use jiff::Timestamp;

use crate::catalog::Step;
use crate::planner::{BlockReason, NodePlan};
use crate::ticket::{Remediation, StepStatus, Ticket, TicketStatus, Workflow, clip_text};

/// How a pass takes up a node's ticket.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// The open ticket of this condition, following the planned SOP: continue it.
    Continue(Ticket),
    /// A new ticket (not yet written).
    Open {
        ticket: Ticket,
        /// Why the previous open ticket, if any, was replaced.
        replaced: Option<Replaced>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// A more urgent condition took over the node.
    Superseded { condition: String },
    /// The ticket pinned an SOP that the catalog no longer has as it was (I6): closed and
    /// planned again, never remapped.
    SopChanged { condition: String },
}

impl Replaced {
    pub fn message(&self, new: &str) -> String {
        match self {
            Replaced::Superseded { condition } => {
                format!("ticket for {condition} superseded by more urgent {new}")
            }
            Replaced::SopChanged { condition } => format!(
                "ticket for {condition} closed: its SOP changed in the catalog; planned again"
            ),
        }
    }
}

/// Does the open ticket `t` follow exactly the SOP of `p` (I6)? Schema 2 tickets pin the SOP by
/// name and digest. Older ones (no digest) continue only while every record's action is the
/// action of the planned step at its index.
pub fn follows(t: &Ticket, p: &NodePlan) -> bool {
    if t.sop.as_deref().is_some_and(|s| s != p.sop) {
        return false;
    }
    match &t.sop_digest {
        Some(d) => *d == p.sop_digest,
        None => (0..p.step_list.len().max(t.workflows.len())).all(|i| match t.workflow(i) {
            None => true,
            Some(w) => p.step_list.get(i).is_some_and(|s| s.action() == w.action),
        }),
    }
}

/// A new ticket for plan `p`, pinned to its SOP (I6), carrying `previous`'s history.
fn pinned(p: &NodePlan, previous: Option<&Ticket>, now: Timestamp) -> Ticket {
    let mut t = Ticket::new(
        &p.condition,
        &p.reason,
        &p.sop,
        p.fingerprint.as_deref(),
        now,
        previous,
    );
    t.sop_digest = Some(p.sop_digest.clone());
    t.priority = Some(p.priority);
    t.alert_started_at = p.alert_started_at;
    t
}

/// Which ticket a pass works on for plan `p`, given the node's current ticket.
pub fn start(current: Option<Ticket>, p: &NodePlan, now: Timestamp) -> Start {
    let replaced = match &current {
        Some(t) if t.status.is_open() && t.condition == p.condition => {
            if follows(t, p) {
                return Start::Continue(current.expect("matched Some"));
            }
            Some(Replaced::SopChanged {
                condition: t.condition.clone(),
            })
        }
        // An escalated ticket is superseded only by a more urgent condition (the planner holds
        // the node for humans otherwise).
        Some(t) if t.status.is_unfinished() => Some(Replaced::Superseded {
            condition: t.condition.clone(),
        }),
        _ => None,
    };
    let mut t = pinned(p, current.as_ref(), now);
    if let Some(old) = current.as_ref().filter(|o| o.status.is_unfinished()) {
        // The node stays as the old ticket left it: its cordon is still ours to undo, and it
        // still counts against the budget. From an escalated ticket too: a JobBlockedByNode
        // cordon-diagnose that escalated, then superseded by the culprit's GpuHung, would
        // otherwise leave the healer's own cordon behind after a successful reset.
        t.cordoned_by_healer = old.cordoned_by_healer;
        t.disrupted = old.disrupted;
    }
    Start::Open {
        ticket: t,
        replaced,
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

/// Marks the ticket as having taken capacity away (I1, I3): from now on the node counts against
/// the budget while the ticket is open, and this remediation counts for cooldown and
/// repeat-offender.
fn disrupt(t: &mut Ticket) {
    t.disrupted = true;
    if !t.remediations.iter().any(|r| r.at == t.created_at) {
        t.remediations.push(Remediation {
            at: t.created_at,
            priority: t.priority.unwrap_or(0),
        });
    }
}

/// A long-running step starts: its `Running` record is written before it acts, so its deadline
/// counts from here and a restarted healer finds it.
pub fn begin(t: &mut Ticket, index: usize, step: &Step, job: Option<String>, now: Timestamp) {
    t.status = TicketStatus::Resolving;
    t.blocked = None;
    if step.disrupts() {
        disrupt(t);
    }
    t.record(
        index,
        workflow(step, StepStatus::Running, now, job, None, None),
    );
}

/// Step `index` succeeded. `patched`: the step changed the node (a Cordon that was ours).
/// Returns true when the SOP ends here (Escalate hands the node to humans).
pub fn succeed(
    t: &mut Ticket,
    index: usize,
    step: &Step,
    message: String,
    job: Option<String>,
    patched: bool,
    now: Timestamp,
) -> bool {
    let retries = t.workflow(index).and_then(|w| w.retries);
    if matches!(step, Step::Cordon) && patched {
        t.cordoned_by_healer = true;
    }
    if step.disrupts() {
        disrupt(t);
    }
    let escalates = matches!(step, Step::Escalate);
    t.status = if escalates {
        TicketStatus::Escalated
    } else {
        TicketStatus::Resolving
    };
    t.blocked = None;
    t.record(
        index,
        workflow(
            step,
            StepStatus::Succeeded,
            now,
            job,
            Some(message),
            retries,
        ),
    );
    escalates
}

/// Step `index` is not done yet. Returns true when the record changed (and must be written):
/// a new message or Job; the same message again is not rewritten every pass.
pub fn wait(
    t: &mut Ticket,
    index: usize,
    step: &Step,
    message: String,
    job: Option<String>,
    now: Timestamp,
) -> bool {
    let prev = t
        .workflow(index)
        .filter(|w| w.status == StepStatus::Running)
        .cloned()
        .unwrap_or_else(|| workflow(step, StepStatus::Running, now, None, None, None));
    // The record holds the message clipped: compare like with like.
    let mut clipped = message.clone();
    clip_text(&mut clipped);
    if prev.message.as_deref() == Some(clipped.as_str()) && (job.is_none() || prev.job == job) {
        return false;
    }
    let mut w = prev;
    w.message = Some(message);
    w.retries = Some(w.retries.unwrap_or(0).saturating_add(1));
    if job.is_some() {
        w.job = job;
    }
    t.record(index, w);
    true
}

/// Step `index` failed for good: the SOP escalates to humans with the reason in the ticket.
pub fn fail(
    t: &mut Ticket,
    index: usize,
    step: &Step,
    message: String,
    job: Option<String>,
    now: Timestamp,
) {
    t.status = TicketStatus::Escalated;
    t.record(
        index,
        workflow(step, StepStatus::Failed, now, job, Some(message), None),
    );
}

/// What an API error during a step means (I5): the step's deadline holds whatever the API
/// answers. Past `timeoutSeconds` from the step's start the error escalates; before, it is
/// recorded and the step is tried again next pass. Steps without a deadline (one request each)
/// are retried next pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorVerdict {
    Retry { message: String },
    Escalate { message: String },
}

pub fn step_error(step: &Step, started: Timestamp, now: Timestamp, error: &str) -> ErrorVerdict {
    let elapsed = now.as_second().saturating_sub(started.as_second()).max(0) as u64;
    match step.timeout_seconds() {
        Some(limit) if elapsed >= limit => ErrorVerdict::Escalate {
            message: format!("{step} gave up after {limit} s: last error: {error}"),
        },
        _ => ErrorVerdict::Retry {
            message: format!("{step}: {error} (retrying)"),
        },
    }
}

/// The plan's job relations are recorded in the ticket the pass works on (whatever its
/// condition: the node has one ticket, and a job alert that is not the node's most urgent
/// condition starts nothing). Returns true when the ticket changed and must be written; the same
/// relations again return false, so a pass that has nothing else to write writes nothing.
pub fn record_jobs(t: &mut Ticket, p: &NodePlan) -> bool {
    t.record_jobs(&p.jobs)
}

/// Every step succeeded: the ticket is resolved.
pub fn finish(t: &mut Ticket, now: Timestamp) {
    t.status = TicketStatus::Resolved;
    t.closed_at = Some(now);
    t.blocked = None;
}

/// An open ticket that never acted, whose condition resolved: closed. `None`: nothing to close.
pub fn close_unstarted(current: Option<Ticket>, now: Timestamp) -> Option<Ticket> {
    let mut t = current.filter(|t| t.status.is_open() && t.workflows.is_empty())?;
    t.status = TicketStatus::Closed;
    t.closed_at = Some(now);
    t.blocked = Some("condition resolved before any action".into());
    Some(t)
}

/// The ticket to write when plan `p` is blocked for `reason` (budget, cooldown, repeat
/// offender), or `None` when nothing needs writing (unchanged, or a ticket we must not touch).
/// The plan's job relations are recorded as well ([`record_jobs`]).
pub fn block(
    current: Option<Ticket>,
    p: &NodePlan,
    reason: BlockReason,
    message: &str,
    now: Timestamp,
) -> Option<Ticket> {
    let fresh = |prev: Option<&Ticket>| pinned(p, prev, now);
    let mut t = match current {
        Some(t) if t.status.is_open() && t.condition == p.condition => t,
        prev if reason == BlockReason::RepeatOffender => {
            let mut t = fresh(prev.as_ref());
            t.status = TicketStatus::Escalated;
            t
        }
        Some(t) if reason == BlockReason::Cooldown => t,
        prev => fresh(prev.as_ref()),
    };
    let jobs_changed = record_jobs(&mut t, p);
    let mut clipped = message.to_owned();
    clip_text(&mut clipped);
    if t.blocked.as_deref() == Some(clipped.as_str()) && !jobs_changed {
        return None;
    }
    t.blocked = Some(clipped);
    Some(t)
}

#[cfg(test)]
mod tests;
