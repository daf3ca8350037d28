//! Kubernetes: the only code that talks to the cluster. [`Cluster`] is every operation the
//! executor and its steps need; [`client::Kube`] is the real one (kube-rs, our own retry policy,
//! writes fenced by the Lease), and [`fake::FakeCluster`] an in-memory one for fast unit and
//! property tests of the executor. [`view`] turns Node objects into the planner's view and
//! [`leader`] runs the Lease election and owns the write fence.

pub mod cache;
pub mod client;
#[cfg(test)]
pub mod fake;
pub mod leader;
pub mod pacing;
pub mod view;

use std::future::Future;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::Value;

use crate::Result;

pub use cache::{NodeCache, Refusal, Snapshot};
pub use client::{Kube, client};
pub use leader::{Fence, LeaderElector};
pub use view::{node_ticket, node_view, view_of};

/// The answer of the Eviction API for one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Evicted,
    /// 429: a PodDisruptionBudget does not allow it now.
    Refused,
    /// 404: the pod is gone already.
    Gone,
}

/// Kubernetes operations of the executor. Every write is fenced (I2): it is not sent, nor
/// retried, unless this replica holds the Lease with margin at that moment; an error says so.
pub trait Cluster: Send + Sync {
    fn list_nodes(&self) -> impl Future<Output = Result<Vec<Node>>> + Send;
    fn get_node(&self, name: &str) -> impl Future<Output = Result<Option<Node>>> + Send;
    /// A JSON merge patch guarded by the node's `resourceVersion`: `Ok(None)` on 409 (the node
    /// changed since it was read; read again and recompute).
    fn patch_node(
        &self,
        name: &str,
        resource_version: &str,
        patch: &Value,
    ) -> impl Future<Output = Result<Option<Node>>> + Send;
    /// Pods bound to `node`.
    fn pods_on_node(&self, node: &str) -> impl Future<Output = Result<Vec<Pod>>> + Send;
    fn evict(&self, namespace: &str, pod: &str) -> impl Future<Output = Result<Eviction>> + Send;
    fn get_job(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Job>>> + Send;
    /// Creates the Job; one that exists already (409) is success: its name is derived from the
    /// ticket, so it is ours.
    fn create_job(&self, namespace: &str, job: &Job) -> impl Future<Output = Result<()>> + Send;
    /// Deletes a finished Job and its pods; one already gone is success.
    fn delete_job(&self, namespace: &str, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Records a core/v1 Event about `node` in the background; failures are logged only.
    fn event(&self, node: &Node, warning: bool, reason: &str, message: &str);
}
