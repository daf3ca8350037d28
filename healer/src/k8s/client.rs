//! The real [`Cluster`]: kube-rs with kube's default retry OFF (it retries 429 for minutes, which
//! hangs a PDB-blocked drain). Every request goes through one policy: a per-attempt timeout and a
//! bounded exponential backoff on 429, 5xx and transport errors. Writes are fenced (I2): before
//! every attempt the Lease must still be held with margin, and the attempt's timeout is cut to
//! the time left, so no write is sent — nor retried — once leadership may have lapsed.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::leader::Fence;
use super::pacing::Bucket;
use super::view::view_of;
use super::{Cluster, Eviction};
use crate::config::KubePolicy;
use crate::metrics::Metrics;
use crate::planner::ClusterView;
use crate::{Error, Result};

/// Builds a client from `kubeconfig` (else in-cluster / `KUBECONFIG` inference) with kube's
/// retry off and our timeouts.
pub async fn client(kubeconfig: Option<&Path>, policy: &KubePolicy) -> Result<Client> {
    let cfg_err = |e: &dyn std::fmt::Display| Error::Config {
        message: format!("Kubernetes client: {e}"),
    };
    let mut cfg = match kubeconfig {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|e| cfg_err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| cfg_err(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| cfg_err(&e))?,
    };
    cfg.default_retry = false;
    let t = Duration::from_secs(policy.request_timeout_seconds);
    cfg.connect_timeout = Some(t);
    cfg.read_timeout = Some(t);
    cfg.write_timeout = Some(t);
    Client::try_from(cfg).map_err(|e| cfg_err(&e))
}

/// Kubernetes operations with the healer's retry policy and write fence.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub policy: KubePolicy,
    pub metrics: Metrics,
    /// Writes are sent only while this holds (unfenced when leader election is off).
    pub fence: Fence,
    /// Namespace of Node Events; `default` (the only one for which `involvedObject.namespace`
    /// may stay empty, which is what `kubectl describe node` looks for).
    pub events_namespace: String,
    /// The write pacer shared by every clone (`[kube] max_writes_per_second`).
    pacer: Arc<Mutex<Bucket>>,
    /// The highest resourceVersion of a Node this replica wrote: a pass plans only on a view
    /// that has seen it (read-your-writes for the disruption budget, I1).
    written_rv: Arc<AtomicU64>,
}

/// Should this error be retried, and under which metric label?
fn retry_cause(e: &kube::Error) -> Option<&'static str> {
    match e {
        kube::Error::Api(s) if s.code == 429 => Some("throttled"),
        kube::Error::Api(s) if s.code >= 500 => Some("server_error"),
        kube::Error::Api(_) => None,
        kube::Error::HyperError(_) | kube::Error::Service(_) => Some("transport"),
        _ => None,
    }
}

impl Kube {
    pub fn new(client: Client, policy: KubePolicy, metrics: Metrics) -> Self {
        let pacer = Bucket::new(
            policy.max_writes_per_second,
            policy.write_burst,
            Instant::now(),
        );
        Kube {
            client,
            policy,
            metrics,
            fence: Fence::unfenced(),
            events_namespace: "default".into(),
            pacer: Arc::new(Mutex::new(pacer)),
            written_rv: Arc::default(),
        }
    }

    /// Waits for the write pacer's go (every write attempt takes one token).
    async fn pace(&self) {
        let wait = self
            .pacer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reserve(Instant::now());
        if !wait.is_zero() {
            self.metrics.kube_writes_paced.inc();
            self.metrics
                .kube_write_wait_seconds
                .inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }

    /// Counts one request to the apiserver.
    pub fn count(&self, op: &str) {
        self.metrics.kube_requests.with_label_values(&[op]).inc();
    }

    /// The highest Node resourceVersion this replica wrote (0: none, or not numeric).
    pub fn written_rv(&self) -> u64 {
        self.written_rv.load(Ordering::SeqCst)
    }

    fn wrote(&self, node: &Node) {
        if let Some(rv) = node
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
        {
            self.written_rv.fetch_max(rv, Ordering::SeqCst);
        }
    }

    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    pub fn with_events_namespace(mut self, ns: &str) -> Self {
        self.events_namespace = ns.to_owned();
        self
    }

    /// A read (or the Lease's own write): timeout per attempt, bounded backoff.
    pub async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, kube::Error>>,
    {
        self.attempts(op, false, f).await
    }

    /// A write, fenced by the Lease (I2): see the module docs.
    pub async fn write<T, F, Fut>(&self, op: &str, f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, kube::Error>>,
    {
        self.attempts(op, true, f).await
    }

    async fn attempts<T, F, Fut>(&self, op: &str, fenced: bool, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, kube::Error>>,
    {
        let limit = Duration::from_secs(self.policy.request_timeout_seconds);
        let mut delay = Duration::from_millis(self.policy.backoff_initial_ms);
        let max = Duration::from_millis(self.policy.backoff_max_ms);
        let mut last = String::new();
        for attempt in 1..=self.policy.max_attempts {
            if fenced {
                // Before the fence is looked at: the window is judged after the wait.
                self.pace().await;
            }
            self.count(op);
            let timeout = if fenced {
                match self.fence.write_window() {
                    Some(left) => limit.min(left),
                    None => return Err(self.fenced(op)),
                }
            } else {
                limit
            };
            let cause = match tokio::time::timeout(timeout, f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => match retry_cause(&e) {
                    Some(c) => {
                        last = e.to_string();
                        c
                    }
                    None => return Err(Error::kube(op, e)),
                },
                Err(_) => {
                    last = format!("timed out after {timeout:?}");
                    "timeout"
                }
            };
            self.metrics.kube_retries.with_label_values(&[cause]).inc();
            tracing::debug!(op, attempt, cause, error = %last, "Kubernetes request failed, retrying");
            if attempt < self.policy.max_attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max);
            }
        }
        Err(Error::KubeRetriesExhausted {
            op: op.to_owned(),
            attempts: self.policy.max_attempts,
            last,
        })
    }

    fn fenced(&self, op: &str) -> Error {
        self.metrics
            .kube_retries
            .with_label_values(&["fenced"])
            .inc();
        Error::NotLeader { op: op.to_owned() }
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        let api = self.nodes();
        self.call("get node", || api.get_opt(name)).await
    }

    /// All nodes, as one consistent read.
    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        let api = self.nodes();
        let lp = ListParams::default();
        Ok(self.call("list nodes", || api.list(&lp)).await?.items)
    }

    /// One consistent view of all nodes for the planner.
    pub async fn cluster_view(&self) -> Result<ClusterView> {
        Ok(view_of(&self.list_nodes().await?))
    }
}

impl Cluster for Kube {
    async fn list_nodes(&self) -> Result<Vec<Node>> {
        Kube::list_nodes(self).await
    }

    async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        Kube::get_node(self, name).await
    }

    async fn patch_node(
        &self,
        name: &str,
        resource_version: &str,
        patch: &Value,
    ) -> Result<Option<Node>> {
        let mut patch = patch.clone();
        patch["metadata"]["resourceVersion"] = json!(resource_version);
        let api = self.nodes();
        let pp = PatchParams::default();
        let pa = Patch::Merge(&patch);
        match self.write("patch node", || api.patch(name, &pp, &pa)).await {
            Ok(n) => {
                self.wrote(&n);
                Ok(Some(n))
            }
            Err(e) if e.api_status() == Some(409) => {
                self.metrics
                    .kube_retries
                    .with_label_values(&["conflict"])
                    .inc();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>> {
        let all: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        Ok(self.call("list pods", || all.list(&lp)).await?.items)
    }

    async fn evict(&self, namespace: &str, pod: &str) -> Result<Eviction> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        // 1.20 has no policy/v1; a body without apiVersion is accepted by every version.
        let body = json!({"metadata": {"name": pod, "namespace": namespace}});
        let pp = PostParams::default();
        // One attempt: a refusal or an error is looked at again next pass, within the Drain's
        // deadline; a retry loop here would only hold the pass up.
        self.pace().await;
        self.count("evict pod");
        let Some(left) = self.fence.write_window() else {
            return Err(self.fenced("evict pod"));
        };
        let timeout = Duration::from_secs(self.policy.request_timeout_seconds).min(left);
        let res = tokio::time::timeout(
            timeout,
            api.create_subresource::<_, Value>("eviction", pod, &pp, &body),
        )
        .await;
        match res {
            Ok(Ok(_)) => Ok(Eviction::Evicted),
            Ok(Err(kube::Error::Api(s))) if s.code == 429 => Ok(Eviction::Refused),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => Ok(Eviction::Gone),
            Ok(Err(e)) => Err(Error::kube("evict pod", e)),
            Err(_) => Err(Error::KubeRetriesExhausted {
                op: "evict pod".into(),
                attempts: 1,
                last: format!("timed out after {timeout:?}"),
            }),
        }
    }

    async fn get_job(&self, namespace: &str, name: &str) -> Result<Option<Job>> {
        let api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        self.call("get job", || api.get_opt(name)).await
    }

    async fn create_job(&self, namespace: &str, job: &Job) -> Result<()> {
        let api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let pp = PostParams::default();
        match self.write("create job", || api.create(&pp, job)).await {
            Ok(_) => Ok(()),
            Err(e) if e.api_status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_job(&self, namespace: &str, name: &str) -> Result<()> {
        let api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let dp = DeleteParams::background();
        match self.write("delete job", || api.delete(name, &dp)).await {
            Ok(_) => Ok(()),
            Err(e) if e.api_status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn event(&self, node: &Node, warning: bool, reason: &str, message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let now = Time(Timestamp::now());
        let namespace = self.events_namespace.clone();
        // `kubectl describe node` lists Events whose involvedObject has no namespace; the
        // apiserver accepts those only in `default`. Elsewhere it demands the Event's namespace.
        let involved_ns = (namespace != "default").then(|| namespace.clone());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.ark-healer.")),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                namespace: involved_ns,
                // The kubelet's convention for Node Events: uid = the node's name. `kubectl
                // describe node` 1.20 finds only those (newer ones find these and real uids).
                uid: Some(name.clone()),
                ..Default::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.chars().take(1024).collect()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            source: Some(EventSource {
                component: Some("ark-healer".into()),
                host: None,
            }),
            reporting_component: Some("ark-healer".into()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let kube = self.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            let pp = PostParams::default();
            if let Err(e) = kube.write("create event", || api.create(&pp, &ev)).await {
                tracing::warn!(node = %name, reason, error = %e, "Event not recorded");
            }
        });
    }
}
