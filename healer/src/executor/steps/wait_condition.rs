//! `WaitCondition`: wait until the ticket's condition stops firing (Alertmanager sent
//! `resolved`), bounded by `timeoutSeconds` from the step's start.

use super::{Outcome, StepCtx};

pub fn run<C>(ctx: &StepCtx<'_, C>, timeout_seconds: u64) -> Outcome {
    if !ctx.condition_firing {
        return Outcome::Done {
            message: format!("{} resolved", ctx.ticket.condition),
            patch: None,
        };
    }
    if ctx.elapsed_seconds() >= timeout_seconds {
        return Outcome::Failed {
            message: format!(
                "{} still firing after {timeout_seconds} s",
                ctx.ticket.condition
            ),
        };
    }
    Outcome::Waiting {
        message: format!("waiting for {} to resolve", ctx.ticket.condition),
        job: None,
    }
}
