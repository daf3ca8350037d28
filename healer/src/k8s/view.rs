//! Node objects → the planner's [`ClusterView`]: pure.

use k8s_openapi::api::core::v1::Node;

use crate::Result;
use crate::planner::{ClusterView, NodeView};
use crate::ticket::{TICKET_ANNOTATION, Ticket};

pub const DISABLE_LABEL: &str = "ark.io/disable";
const CONTROL_PLANE_LABELS: &[&str] = &[
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// The planner's view of a node list.
pub fn view_of(nodes: &[Node]) -> ClusterView {
    ClusterView {
        nodes: nodes
            .iter()
            .map(|n| {
                let v = node_view(n);
                (v.name.clone(), v)
            })
            .collect(),
        live: true,
    }
}

/// What the planner needs from a Node object.
pub fn node_view(n: &Node) -> NodeView {
    let name = n.metadata.name.clone().unwrap_or_default();
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let ticket = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TICKET_ANNOTATION))
        .map(|text| Ticket::from_annotation(&name, text).map_err(|e| e.to_string()));
    NodeView {
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        control_plane: CONTROL_PLANE_LABELS.iter().any(|l| labels.contains_key(*l)),
        disabled: labels.get(DISABLE_LABEL).is_some_and(|v| v == "true"),
        ticket,
        name,
    }
}

/// The ticket on a node, if any (parse errors included).
pub fn node_ticket(n: &Node) -> Option<Result<Ticket>> {
    let name = n.metadata.name.clone().unwrap_or_default();
    n.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TICKET_ANNOTATION))
        .map(|text| Ticket::from_annotation(&name, text))
}
