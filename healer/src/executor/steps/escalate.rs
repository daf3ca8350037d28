//! `Escalate`: hand the node to humans. The executor marks the ticket `escalated` and posts a
//! Warning Event; no automatic action follows until a human closes the ticket.

use super::{Outcome, StepCtx};

pub fn run<C>(ctx: &StepCtx<'_, C>) -> Outcome {
    Outcome::Done {
        message: format!(
            "escalated to humans: {} ({}); set status: closed in the ticket when done",
            ctx.ticket.condition, ctx.ticket.reason
        ),
        patch: None,
    }
}
