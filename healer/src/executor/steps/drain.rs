//! `Drain`: evict the node's pods through the Eviction API, so PodDisruptionBudgets are honoured.
//! DaemonSet pods, mirror (static) pods and finished pods are skipped; only pods bound to this
//! node are touched. A PDB refusal (429) is not retried here: the next reconcile tries again
//! (that interval is the backoff), until `timeoutSeconds` from the step's start, then the SOP
//! escalates. An API error is returned to the executor, which holds the same deadline (I5).

use k8s_openapi::api::core::v1::Pod;

use super::{Outcome, StepCtx};
use crate::Result;
use crate::k8s::{Cluster, Eviction};

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Pods a drain must evict.
pub fn evictable(pod: &Pod) -> bool {
    let daemonset = pod
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !daemonset && !mirror && !finished
}

pub async fn run<C: Cluster>(ctx: &StepCtx<'_, C>, timeout_seconds: u64) -> Result<Outcome> {
    let pods = ctx.cluster.pods_on_node(ctx.node_name).await?;
    let (mut remaining, mut blocked, mut evicted) = (0usize, 0usize, 0usize);
    let mut last_error = None;
    for pod in pods.iter().filter(|p| evictable(p)) {
        remaining += 1;
        if pod.metadata.deletion_timestamp.is_some() {
            continue; // already terminating
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        match ctx.cluster.evict(&ns, &name).await {
            Ok(Eviction::Evicted) => evicted += 1,
            Ok(Eviction::Refused) => {
                blocked += 1;
                tracing::debug!(node = ctx.node_name, pod = %name, namespace = %ns, "Eviction refused by a PodDisruptionBudget");
            }
            Ok(Eviction::Gone) => remaining -= 1,
            // Other pods may still go; the error is reported below (e.g. a pod under two
            // PodDisruptionBudgets answers 500 every time).
            Err(e) => last_error = Some(format!("evicting {ns}/{name}: {e}")),
        }
    }
    if remaining == 0 {
        return Ok(Outcome::Done {
            message: "drained: no evictable pods left".into(),
            patch: None,
        });
    }
    let error = last_error.map_or(String::new(), |e| format!("; last error: {e}"));
    if ctx.elapsed_seconds() >= timeout_seconds {
        return Ok(Outcome::Failed {
            message: format!(
                "drain timed out after {timeout_seconds} s: {remaining} pods left, {blocked} refused by PodDisruptionBudgets{error}"
            ),
        });
    }
    Ok(Outcome::Waiting {
        message: format!(
            "draining: {evicted} evicted now, {remaining} pods left, {blocked} refused by PodDisruptionBudgets{error}"
        ),
        job: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn skips_daemonset_mirror_and_finished_pods() {
        let pod = |v: Value| -> Pod { serde_json::from_value(v).unwrap() };
        assert!(evictable(&pod(json!({"metadata": {"name": "a"}}))));
        assert!(!evictable(&pod(
            json!({"metadata": {"name": "ds", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "1"}]}})
        )));
        assert!(!evictable(&pod(
            json!({"metadata": {"name": "m", "annotations": {MIRROR_ANNOTATION: "x"}}})
        )));
        assert!(!evictable(&pod(
            json!({"metadata": {"name": "f"}, "status": {"phase": "Succeeded"}})
        )));
        assert!(evictable(&pod(
            json!({"metadata": {"name": "rs", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "1"}]}})
        )));
    }
}
