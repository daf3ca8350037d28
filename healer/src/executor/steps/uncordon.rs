//! `Uncordon`: return the node to service — only when a healthcheck Job of this ticket
//! succeeded and the condition no longer fires. Removes the healer's taints; leaves the node
//! cordoned if the cordon was not the healer's (a human's cordon is a human's decision).

use serde_json::{Value, json};

use super::taint::current_taints;
use super::{Outcome, StepCtx};
use crate::catalog::UNHEALTHY_TAINT;
use crate::ticket::StepStatus;

pub fn run<C>(ctx: &StepCtx<'_, C>) -> Outcome {
    let healthy = ctx.ticket.workflows.iter().any(|w| {
        w.action == "RunJob"
            && w.status == StepStatus::Succeeded
            && w.job.as_deref().is_some_and(|j| j.contains("healthcheck"))
    });
    if !healthy {
        return Outcome::Failed {
            message: "refusing to uncordon: no successful healthcheck Job in this ticket".into(),
        };
    }
    // NodeCordoned fires until the node is uncordoned: it cannot be a precondition of that.
    if ctx.condition_firing && ctx.ticket.condition != "NodeCordoned" {
        return Outcome::Waiting {
            message: format!("{} still firing: not uncordoning yet", ctx.ticket.condition),
            job: None,
        };
    }
    let taints: Vec<Value> = current_taints(ctx.node)
        .into_iter()
        .filter(|t| t["key"] != UNHEALTHY_TAINT)
        .collect();
    let mut spec = json!({"taints": taints});
    let message = if ctx.ticket.cordoned_by_healer {
        spec["unschedulable"] = json!(false);
        "uncordoned".to_owned()
    } else {
        "taint removed; node left cordoned: the cordon was not the healer's".to_owned()
    };
    Outcome::Done {
        message,
        patch: Some(json!({"spec": spec})),
    }
}
