//! `Cordon`: mark the node unschedulable. Touches only `spec.unschedulable`.

use serde_json::json;

use super::{Outcome, StepCtx};

pub fn run<C>(ctx: &StepCtx<'_, C>) -> Outcome {
    let already = ctx
        .node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if already {
        return Outcome::Done {
            message: "node was already unschedulable".into(),
            patch: None,
        };
    }
    Outcome::Done {
        message: "cordoned".into(),
        patch: Some(json!({"spec": {"unschedulable": true}})),
    }
}
