//! `Notify`: a Kubernetes Event only (the executor posts it with the step's message).

use super::{Outcome, StepCtx};

pub fn run<C>(ctx: &StepCtx<'_, C>) -> Outcome {
    Outcome::Done {
        message: format!(
            "{} on {}: {}",
            ctx.ticket.condition, ctx.node_name, ctx.ticket.reason
        ),
        patch: None,
    }
}
