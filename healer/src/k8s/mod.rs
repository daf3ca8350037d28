//! The only module that talks to Kubernetes. The client is built with kube's default retry OFF
//! (it retries 429 for minutes, which hangs a PDB-blocked drain) and every request goes through
//! [`Kube::call`]: a per-request timeout and a bounded exponential backoff on 429, 5xx and
//! transport errors. 409 Conflict is handled where it means something: [`Kube::mutate_node`]
//! re-reads the node and recomputes its patch.

pub mod executor;
pub mod leader;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::config::KubePolicy;
use crate::metrics::Metrics;
use crate::planner::{ClusterView, NodeView};
use crate::ticket::{TICKET_ANNOTATION, Ticket};
use crate::{Error, Result};

pub const DISABLE_LABEL: &str = "ark.io/disable";
const CONTROL_PLANE_LABELS: &[&str] = &[
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

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

/// Kubernetes operations with the healer's retry policy.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    pub policy: KubePolicy,
    pub metrics: Metrics,
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
        Kube {
            client,
            policy,
            metrics,
        }
    }

    /// Runs `f` with a timeout per attempt and bounded backoff on 429/5xx/transport errors.
    pub async fn call<T, F, Fut>(&self, op: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, kube::Error>>,
    {
        let timeout = Duration::from_secs(self.policy.request_timeout_seconds);
        let mut delay = Duration::from_millis(self.policy.backoff_initial_ms);
        let max = Duration::from_millis(self.policy.backoff_max_ms);
        let mut last = String::new();
        for attempt in 1..=self.policy.max_attempts {
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

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        let api = self.nodes();
        self.call("get node", || api.get_opt(name)).await
    }

    /// Read-modify-write of a node with optimistic concurrency: `f` sees the current node and
    /// returns a JSON merge patch (or `None`: nothing to do); the patch carries the node's
    /// `resourceVersion`, so a concurrent change gives 409 and we re-read and recompute. This is
    /// required for `spec.taints`, which a patch replaces as a whole.
    pub async fn mutate_node<F>(&self, name: &str, mut f: F) -> Result<Option<Node>>
    where
        F: FnMut(&Node) -> Result<Option<Value>>,
    {
        let api = self.nodes();
        let mut last = String::new();
        for _ in 0..self.policy.max_attempts {
            let Some(node) = self.get_node(name).await? else {
                return Ok(None);
            };
            let Some(mut patch) = f(&node)? else {
                return Ok(Some(node));
            };
            let rv = node.metadata.resource_version.clone().unwrap_or_default();
            patch["metadata"]["resourceVersion"] = json!(rv);
            let pp = PatchParams::default();
            let p = Patch::Merge(&patch);
            match self.call("patch node", || api.patch(name, &pp, &p)).await {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.api_status() == Some(409) => {
                    self.metrics
                        .kube_retries
                        .with_label_values(&["conflict"])
                        .inc();
                    last = e.to_string();
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::KubeRetriesExhausted {
            op: format!("update node {name}"),
            attempts: self.policy.max_attempts,
            last,
        })
    }

    /// One consistent view of all nodes for the planner.
    pub async fn cluster_view(&self) -> Result<ClusterView> {
        let api = self.nodes();
        let lp = ListParams::default();
        let list = self.call("list nodes", || api.list(&lp)).await?;
        let nodes = list
            .items
            .iter()
            .map(|n| {
                let v = node_view(n);
                (v.name.clone(), v)
            })
            .collect();
        Ok(ClusterView { nodes, live: true })
    }

    /// Posts a core/v1 Event about `node` in the background (a step does not wait for it).
    /// Failures are logged, never fatal: the ticket and the audit log are the record that matters.
    pub fn event(&self, namespace: &str, node: &Node, warning: bool, reason: &str, message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let now = Time(Timestamp::now());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.ark-healer.")),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                // 1.20 validates involvedObject.namespace == the Event's namespace.
                namespace: Some(namespace.to_owned()),
                uid: node.metadata.uid.clone(),
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
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let kube = self.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move {
            let pp = PostParams::default();
            if let Err(e) = kube.call("create event", || api.create(&pp, &ev)).await {
                tracing::warn!(node = %name, reason, error = %e, "Event not recorded");
            }
        });
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
