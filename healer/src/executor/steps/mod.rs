//! SOP step kinds, one file each. A step looks at the node and its ticket and says what it did:
//! [`Outcome`]. Steps are idempotent: the executor may run a step again after a crash or a 409
//! (its record is written only after it acted), so running one twice must do nothing new.
//! Node mutations are returned as a merge patch that the executor applies together with the
//! ticket record, in one request guarded by the node's resourceVersion.

mod cordon;
mod drain;
mod escalate;
mod notify;
mod run_job;
mod taint;
mod uncordon;
mod wait_condition;

pub use run_job::{JobTemplates, job_name};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::Value;

use crate::Result;
use crate::catalog::Step;
use crate::k8s::Cluster;
use crate::ticket::Ticket;

/// Everything a step may look at.
pub struct StepCtx<'a, C> {
    pub cluster: &'a C,
    pub node: &'a Node,
    pub node_name: &'a str,
    pub ticket: &'a Ticket,
    pub index: usize,
    /// When this step was first started (its Running record), for its time bound.
    pub started: Timestamp,
    pub now: Timestamp,
    pub jobs: &'a JobTemplates,
    pub jobs_namespace: &'a str,
    /// Is the ticket's condition still firing?
    pub condition_firing: bool,
    /// The `gpu` label of the alert, for templates.
    pub gpu: &'a str,
}

impl<C> StepCtx<'_, C> {
    pub fn elapsed_seconds(&self) -> u64 {
        (self.now.as_second() - self.started.as_second()).max(0) as u64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The step is complete. `patch`: node changes to apply atomically with the record.
    Done {
        message: String,
        patch: Option<Value>,
    },
    /// Not complete yet; look again on the next reconcile.
    Waiting {
        message: String,
        job: Option<String>,
    },
    /// The step failed for good: the SOP escalates.
    Failed { message: String },
}

/// Does this step need a Running record before it acts (it spans several reconciles)?
pub fn is_long_running(step: &Step) -> bool {
    matches!(
        step,
        Step::Drain { .. } | Step::RunJob { .. } | Step::WaitCondition { .. }
    )
}

pub async fn execute<C: Cluster>(step: &Step, ctx: &StepCtx<'_, C>) -> Result<Outcome> {
    match step {
        Step::Cordon => Ok(cordon::run(ctx)),
        Step::Taint { key, effect } => Ok(taint::run(ctx, key, effect)),
        Step::Drain { timeout_seconds } => drain::run(ctx, *timeout_seconds).await,
        Step::RunJob {
            template,
            timeout_seconds,
            ..
        } => run_job::run(ctx, template, *timeout_seconds).await,
        Step::WaitCondition { timeout_seconds } => Ok(wait_condition::run(ctx, *timeout_seconds)),
        Step::Uncordon => Ok(uncordon::run(ctx)),
        Step::Escalate => Ok(escalate::run(ctx)),
        Step::Notify => Ok(notify::run(ctx)),
    }
}
