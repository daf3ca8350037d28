//! The brake: `ark-healer pause` stops every write to Nodes without a restart, and the stop
//! survives failover. The state is one annotation, [`ANNOTATION`], on the healer's own Lease
//! (`[lease] namespace/name`), so every replica — the leader now and whichever replica leads
//! next — reads the same switch at the start of each reconcile pass. While paused the healer
//! keeps receiving and storing alerts and still plans: each plan is reported (audit log,
//! `ark_healer_actions_blocked_total{reason="paused"}`) as what it would do, as in dry-run, and
//! nothing is written to any Node. `ark-healer resume` removes the annotation; the next pass
//! acts. A Lease the healer cannot read, or an annotation it cannot parse, counts as paused: the
//! brake fails closed.
//!
//! A pass already past its pause check finishes its current steps: the brake takes effect
//! within one reconcile pass (`reconcile_interval_seconds`), not mid-request.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};

use crate::k8s::Kube;
use crate::planner::{BlockReason, Plan};
use crate::{Error, Result};

/// Annotation on the healer's Lease: a JSON [`Pause`]. Absent: not paused.
pub const ANNOTATION: &str = "ark.io/paused";

/// Longest reason kept (bytes); a longer one is clipped on write.
pub const MAX_REASON_BYTES: usize = 512;

/// Who paused, when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub by: String,
    pub at: String,
    pub reason: String,
}

impl Pause {
    pub fn new(by: &str, reason: &str, now: Timestamp) -> Self {
        let mut by = by.to_owned();
        crate::ticket::clip_text(&mut by);
        Pause {
            by,
            at: now.to_string(),
            reason: crate::alerts::clip::clipped_str(reason, MAX_REASON_BYTES).to_owned(),
        }
    }
}

/// The pause a Lease carries. An annotation that is not a [`Pause`] still pauses (someone meant
/// to stop the healer), with a reason that says so.
pub fn of_lease(lease: &Lease) -> Option<Pause> {
    let raw = lease.metadata.annotations.as_ref()?.get(ANNOTATION)?;
    Some(serde_json::from_str(raw).unwrap_or_else(|e| Pause {
        by: "unknown".into(),
        at: String::new(),
        reason: format!("unreadable {ANNOTATION} annotation ({e}): treated as paused"),
    }))
}

/// Turns a plan into what a paused healer does with it: nothing written, every node reported
/// as blocked (`paused`) with what it would have done. Plans already blocked for another reason
/// keep that reason but are reported without writing their ticket.
pub fn apply(plan: &mut Plan, pause: &Pause) {
    plan.dry_run = true;
    for p in &mut plan.nodes {
        p.dry_run = true;
        p.needs_confirmation = false;
        if p.block_reason.is_none() {
            p.block_reason = Some(BlockReason::Paused);
            p.blocked = Some(format!(
                "paused by {} since {} ({}): would run {} for {}: {}",
                pause.by,
                pause.at,
                pause.reason,
                p.sop,
                p.condition,
                p.steps.join(", ")
            ));
        }
    }
}

/// The pause state the cluster holds now. `Err`: it could not be read (the caller fails closed).
pub async fn read(kube: &Kube, namespace: &str, name: &str) -> Result<Option<Pause>> {
    let api: Api<Lease> = Api::namespaced(kube.client.clone(), namespace);
    let lease = kube.call("get lease", || api.get_opt(name)).await?;
    Ok(lease.as_ref().and_then(of_lease))
}

/// Sets (`Some`) or clears (`None`) the pause. A merge patch of the annotation only, so it never
/// conflicts with the leader's renewals; the Lease is created (holderless) when missing.
pub async fn write(kube: &Kube, namespace: &str, name: &str, pause: Option<&Pause>) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(kube.client.clone(), namespace);
    let value = match pause {
        Some(p) => {
            serde_json::Value::String(serde_json::to_string(p).map_err(|e| Error::Config {
                message: format!("pause: {e}"),
            })?)
        }
        None => serde_json::Value::Null,
    };
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION: value}}});
    let pp = PatchParams::default();
    let patch = Patch::Merge(&patch);
    let patched = kube
        .call("patch lease", || api.patch(name, &pp, &patch))
        .await;
    match patched {
        Ok(_) => Ok(()),
        Err(e) if e.api_status() == Some(404) => {
            let Some(p) = pause else { return Ok(()) };
            let mut lease = Lease::default();
            lease.metadata.name = Some(name.to_owned());
            lease.metadata.namespace = Some(namespace.to_owned());
            lease.metadata.annotations = Some(
                [(
                    ANNOTATION.to_owned(),
                    serde_json::to_string(p).unwrap_or_default(),
                )]
                .into(),
            );
            let pp = PostParams::default();
            kube.call("create lease", || api.create(&pp, &lease))
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// What `ark-healer status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    pub lease: String,
    pub paused: Option<Pause>,
    /// `holderIdentity`; `None`: nobody leads.
    pub leader: Option<String>,
    pub renewed: Option<String>,
    /// Seconds since the last renewal, against this machine's clock.
    pub renewed_seconds_ago: Option<i64>,
}

/// Reads the brake and the leadership from the Lease.
pub async fn status(kube: &Kube, namespace: &str, name: &str, now: Timestamp) -> Result<Status> {
    let api: Api<Lease> = Api::namespaced(kube.client.clone(), namespace);
    let lease = kube.call("get lease", || api.get_opt(name)).await?;
    let spec = lease.as_ref().and_then(|l| l.spec.as_ref());
    let renew = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    Ok(Status {
        lease: format!("{namespace}/{name}"),
        paused: lease.as_ref().and_then(of_lease),
        leader: spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        renewed: renew.map(|t| t.to_string()),
        renewed_seconds_ago: renew.map(|t| now.as_second() - t.as_second()),
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.paused {
            Some(p) => writeln!(
                f,
                "remediation: PAUSED by {} since {}: {}",
                p.by, p.at, p.reason
            )?,
            None => writeln!(f, "remediation: active (not paused)")?,
        }
        match (&self.leader, &self.renewed, self.renewed_seconds_ago) {
            (Some(l), Some(r), Some(ago)) => writeln!(
                f,
                "leader: {l} (Lease {}, renewed {r}, {ago} s ago)",
                self.lease
            ),
            _ => writeln!(f, "leader: none (Lease {})", self.lease),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::config::Config;
    use crate::planner::{ClusterView, PlanInput};
    use crate::testkit::{alert, node, now};

    /// The real planner's plan for GpuHung on n1, then `blocked` forced onto it.
    fn plan_with(blocked: Option<BlockReason>) -> Plan {
        let catalog = Catalog::embedded().unwrap();
        let view = ClusterView {
            nodes: [("n1".to_owned(), node("n1"))].into(),
            live: true,
        };
        let mut plan = crate::planner::plan(&PlanInput {
            alerts: &[alert("n1", "GpuHung")],
            catalog: &catalog,
            config: &Config::default(),
            view: &view,
            now: now(),
            silence_means_resolved: true,
        });
        let p = &mut plan.nodes[0];
        assert!(!p.dry_run && p.block_reason.is_none(), "{p:?}");
        if blocked.is_some() {
            p.block_reason = blocked;
        }
        plan
    }

    #[test]
    fn a_paused_plan_writes_nothing_and_says_what_it_would_do() {
        let pause = Pause::new("sre@example", "firmware rollout", Timestamp::UNIX_EPOCH);
        let mut plan = plan_with(None);
        apply(&mut plan, &pause);
        let p = &plan.nodes[0];
        assert!(plan.dry_run && p.dry_run && !p.needs_confirmation);
        assert_eq!(p.block_reason, Some(BlockReason::Paused));
        let msg = p.blocked.as_deref().unwrap_or_default();
        assert!(
            msg.contains("sre@example") && msg.contains("firmware rollout"),
            "{msg}"
        );
    }

    #[test]
    fn a_plan_blocked_for_another_reason_keeps_it_but_writes_nothing() {
        let pause = Pause::new("sre", "x", Timestamp::UNIX_EPOCH);
        let mut plan = plan_with(Some(BlockReason::Cooldown));
        apply(&mut plan, &pause);
        assert_eq!(plan.nodes[0].block_reason, Some(BlockReason::Cooldown));
        assert!(plan.nodes[0].dry_run);
    }

    #[test]
    fn an_unreadable_annotation_still_pauses_and_a_missing_one_does_not() {
        let mut lease = Lease::default();
        assert_eq!(of_lease(&lease), None);
        lease.metadata.annotations = Some([(ANNOTATION.to_owned(), "yes".to_owned())].into());
        let p = of_lease(&lease).expect("paused");
        assert!(p.reason.contains("unreadable"), "{p:?}");
        let real = Pause::new("a", "b", Timestamp::UNIX_EPOCH);
        lease.metadata.annotations =
            Some([(ANNOTATION.to_owned(), serde_json::to_string(&real).unwrap())].into());
        assert_eq!(of_lease(&lease), Some(real));
    }

    #[test]
    fn reasons_are_clipped_on_a_char_boundary() {
        let p = Pause::new("a", &"é".repeat(1000), Timestamp::UNIX_EPOCH);
        assert!(p.reason.len() <= MAX_REASON_BYTES);
        assert!(p.reason.chars().all(|c| c == 'é'));
    }
}
