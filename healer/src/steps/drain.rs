//! `Drain`: evict the node's pods through the Eviction API, so PodDisruptionBudgets are honoured.
//! DaemonSet pods, mirror (static) pods and finished pods are skipped; only pods bound to this
//! node are touched. A PDB refusal (429) is not retried here: the next reconcile tries again
//! (that interval is the backoff), until `timeoutSeconds` from the step's start, then the SOP
//! escalates.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};

use super::{Outcome, StepCtx};
use crate::{Error, Result};

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

pub async fn run(ctx: &StepCtx<'_>, timeout_seconds: u64) -> Result<Outcome> {
    let all: Api<Pod> = Api::all(ctx.kube.client.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let pods = ctx.kube.call("list pods", || all.list(&lp)).await?;
    let (mut remaining, mut blocked, mut evicted) = (0usize, 0usize, 0usize);
    let timeout = std::time::Duration::from_secs(ctx.kube.policy.request_timeout_seconds);
    for pod in pods.items.iter().filter(|p| evictable(p)) {
        remaining += 1;
        if pod.metadata.deletion_timestamp.is_some() {
            continue; // already terminating
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(ctx.kube.client.clone(), &ns);
        // 1.20 has no policy/v1; a body without apiVersion is accepted by every version.
        let body = json!({"metadata": {"name": name, "namespace": ns}});
        let res = tokio::time::timeout(
            timeout,
            api.create_subresource::<_, Value>("eviction", &name, &PostParams::default(), &body),
        )
        .await;
        match res {
            Ok(Ok(_)) => evicted += 1,
            Ok(Err(kube::Error::Api(s))) if s.code == 429 => {
                blocked += 1;
                tracing::debug!(node = ctx.node_name, pod = %name, namespace = %ns, "Eviction refused by a PodDisruptionBudget");
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => remaining -= 1,
            Ok(Err(e)) => return Err(Error::kube("evict pod", e)),
            Err(_) => blocked += 1,
        }
    }
    if remaining == 0 {
        return Ok(Outcome::Done {
            message: "drained: no evictable pods left".into(),
            patch: None,
        });
    }
    if ctx.elapsed_seconds() >= timeout_seconds {
        return Ok(Outcome::Failed {
            message: format!(
                "drain timed out after {timeout_seconds} s: {remaining} pods left, {blocked} refused by PodDisruptionBudgets"
            ),
        });
    }
    Ok(Outcome::Waiting {
        message: format!(
            "draining: {evicted} evicted now, {remaining} pods left, {blocked} refused by PodDisruptionBudgets"
        ),
        job: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
