//! Fixtures shared by the unit tests of the planner, the lifecycle and the executor.

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::alerts::{Alert, AlertStatus};
use crate::planner::NodeView;

/// The tests' "now": an hour after [`alert`]'s `startsAt`.
pub fn now() -> Timestamp {
    "2026-11-22T12:00:00Z".parse().unwrap()
}

/// An alert for `condition` on `node` with `status`, fingerprint `node/condition`.
pub fn alert_with(node: &str, condition: &str, status: AlertStatus) -> Alert {
    Alert {
        fingerprint: format!("{node}/{condition}"),
        status,
        labels: [
            ("node".to_owned(), node.to_owned()),
            ("condition".to_owned(), condition.to_owned()),
        ]
        .into(),
        annotations: BTreeMap::new(),
        starts_at: "2026-11-22T11:00:00Z".parse().unwrap(),
        ends_at: None,
    }
}

/// A firing [`alert_with`].
pub fn alert(node: &str, condition: &str) -> Alert {
    alert_with(node, condition, AlertStatus::Firing)
}

/// A schedulable worker node without a ticket.
pub fn node(name: &str) -> NodeView {
    NodeView {
        name: name.into(),
        unschedulable: false,
        control_plane: false,
        disabled: false,
        ticket: None,
    }
}
