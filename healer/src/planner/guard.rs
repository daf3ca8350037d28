//! Cooldown and repeat-offender (I3): pure checks before a new remediation of a node; and the
//! tickets a resolution closes.

use jiff::Timestamp;

use super::{BlockReason, ClusterView, NodeView, Plan};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::ticket::Ticket;

/// The priority a ticket was opened with (older tickets: its condition's, else most urgent).
pub(super) fn ticket_priority(t: &Ticket, catalog: &Catalog) -> u32 {
    t.priority
        .or_else(|| catalog.condition(&t.condition).map(|c| c.priority))
        .unwrap_or(0)
}

/// Cooldown and repeat-offender checks before a new remediation of a node with a condition of
/// `priority` (I3): only disruptive remediations count, and only those started by a condition
/// at most as urgent — a harmless diagnosis never delays a reboot, and a GPU reset never delays
/// the reboot of a GPU that fell off the bus.
pub(super) fn new_ticket_block(
    previous: &Ticket,
    priority: u32,
    catalog: &Catalog,
    config: &Config,
    now: Timestamp,
) -> Option<(BlockReason, String)> {
    let ro = &config.repeat_offender;
    let recent = previous.remediations_since(now, ro.window_seconds, priority);
    if ro.max_remediations > 0 && recent >= ro.max_remediations as usize {
        return Some((
            BlockReason::RepeatOffender,
            format!(
                "repeat offender: {recent} disruptive remediations within {} s: escalated, no more automatic action",
                ro.window_seconds
            ),
        ));
    }
    if !previous.disrupted || priority < ticket_priority(previous, catalog) {
        return None; // nothing disruptive to cool down from, or a more urgent fault
    }
    let closed = previous.closed_at.unwrap_or(previous.created_at);
    let until = closed
        .as_second()
        .saturating_add(config.cooldown_seconds as i64);
    if now.as_second() < until {
        return Some((
            BlockReason::Cooldown,
            format!(
                "cooldown: last ticket closed at {closed}, next remediation after {}",
                Timestamp::from_second(until).unwrap_or(now)
            ),
        ));
    }
    None
}

/// Nodes whose open ticket never acted and whose condition is no longer planned (it resolved):
/// the executor closes these tickets.
pub fn stale_tickets<'a>(plan: &Plan, view: &'a ClusterView) -> Vec<&'a NodeView> {
    view.nodes
        .values()
        .filter(|n| {
            matches!(&n.ticket, Some(Ok(t)) if t.status.is_open() && t.workflows.is_empty())
                && !plan.nodes.iter().any(|p| p.node == n.name)
        })
        .collect()
}
