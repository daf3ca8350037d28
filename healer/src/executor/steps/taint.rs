//! `Taint{key, effect}`: add the taint. `spec.taints` has no merge strategy on the real server (a
//! patch replaces the whole list), so the patch carries the full list read from the node, and the
//! executor guards it with the node's resourceVersion.

use serde_json::{Value, json};

use super::{Outcome, StepCtx};

pub fn with_taint(taints: &[Value], key: &str, effect: &str) -> Option<Vec<Value>> {
    if taints
        .iter()
        .any(|t| t["key"] == key && t["effect"] == effect)
    {
        return None;
    }
    let mut out = taints.to_vec();
    out.push(json!({"key": key, "value": "true", "effect": effect}));
    Some(out)
}

pub fn current_taints(node: &k8s_openapi::api::core::v1::Node) -> Vec<Value> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|ts| {
            ts.iter()
                .filter_map(|t| serde_json::to_value(t).ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn run<C>(ctx: &StepCtx<'_, C>, key: &str, effect: &str) -> Outcome {
    match with_taint(&current_taints(ctx.node), key, effect) {
        None => Outcome::Done {
            message: format!("taint {key}:{effect} already present"),
            patch: None,
        },
        Some(list) => Outcome::Done {
            message: format!("tainted {key}:{effect}"),
            patch: Some(json!({"spec": {"taints": list}})),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_other_taints() {
        let existing = vec![json!({"key": "nvidia.com/gpu", "effect": "NoSchedule"})];
        let out = with_taint(&existing, "ark.io/unhealthy", "NoSchedule").unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["key"], "nvidia.com/gpu");
        assert!(with_taint(&out, "ark.io/unhealthy", "NoSchedule").is_none());
    }
}
