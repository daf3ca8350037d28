//! An in-memory [`Cluster`] for fast unit and property tests of the executor — never the only
//! test of a behaviour: the real-apiserver tests in `tests/` are. It keeps nodes with
//! resourceVersions (409 on a stale one, like the real server), pods, Jobs and Events, can be
//! told to fail operations, and logs every write together with whether the fence held then.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::leader::Fence;
use super::{Cluster, Eviction};
use crate::{Error, Result};

#[derive(Debug, Default)]
pub struct State {
    pub nodes: BTreeMap<String, Node>,
    /// Pods by node: (namespace, name).
    pub pods: BTreeMap<String, Vec<(String, String)>>,
    pub jobs: BTreeMap<String, Job>,
    /// Every Job ever created (by name), so a second creation of one is visible.
    pub jobs_created: Vec<String>,
    pub events: Vec<(String, String)>,
    /// Every write: (operation, node or object, did the fence hold when it was sent).
    pub writes: Vec<(String, String, bool)>,
    /// Operations that fail with a 500 (e.g. "evict", "patch", "get_job").
    pub failing: BTreeSet<String>,
    /// Pods whose eviction a PDB refuses (429).
    pub refused: BTreeSet<String>,
    rv: u64,
}

pub struct FakeCluster {
    pub state: Mutex<State>,
    pub fence: Fence,
}

fn server_error(op: &str) -> Error {
    Error::KubeRetriesExhausted {
        op: op.to_owned(),
        attempts: 1,
        last: "injected: 500 Internal Server Error".into(),
    }
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeCluster {
    pub fn new(fence: Fence) -> Self {
        FakeCluster {
            state: Mutex::new(State::default()),
            fence,
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_node(&self, name: &str, unschedulable: bool) {
        let mut s = self.lock();
        s.rv += 1;
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(s.rv.to_string()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                ..Default::default()
            }),
            status: None,
        };
        s.nodes.insert(name.to_owned(), node);
    }

    /// A human (or kubelet) changes a node: bumps its resourceVersion.
    pub fn edit_node(&self, name: &str, f: impl FnOnce(&mut Node)) {
        let mut s = self.lock();
        s.rv += 1;
        let rv = s.rv.to_string();
        if let Some(n) = s.nodes.get_mut(name) {
            f(n);
            n.metadata.resource_version = Some(rv);
        }
    }

    /// Marks a Job finished (what its pod would do).
    pub fn finish_job(&self, name: &str, ok: bool) {
        let mut s = self.lock();
        if let Some(j) = s.jobs.get_mut(name) {
            let mut st = JobStatus::default();
            if ok {
                st.succeeded = Some(1);
            } else {
                st.conditions = Some(vec![k8s_openapi::api::batch::v1::JobCondition {
                    type_: "Failed".into(),
                    status: "True".into(),
                    ..Default::default()
                }]);
            }
            j.status = Some(st);
        }
    }

    pub fn unschedulable(&self) -> usize {
        self.lock()
            .nodes
            .values()
            .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
            .count()
    }

    fn write(&self, op: &str, what: &str) -> Result<()> {
        let holds = self.fence.holds();
        let mut s = self.lock();
        s.writes.push((op.to_owned(), what.to_owned(), holds));
        if !holds {
            return Err(Error::NotLeader { op: op.to_owned() });
        }
        if s.failing.contains(op) {
            return Err(server_error(op));
        }
        Ok(())
    }
}

impl Cluster for FakeCluster {
    async fn list_nodes(&self) -> Result<Vec<Node>> {
        let s = self.lock();
        if s.failing.contains("list_nodes") {
            return Err(server_error("list nodes"));
        }
        Ok(s.nodes.values().cloned().collect())
    }

    async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        let s = self.lock();
        if s.failing.contains("get_node") {
            return Err(server_error("get node"));
        }
        Ok(s.nodes.get(name).cloned())
    }

    async fn patch_node(&self, name: &str, rv: &str, patch: &Value) -> Result<Option<Node>> {
        self.write("patch", name)?;
        let mut s = self.lock();
        s.rv += 1;
        let next = s.rv.to_string();
        let Some(node) = s.nodes.get_mut(name) else {
            return Err(server_error("patch node (404)"));
        };
        if node.metadata.resource_version.as_deref() != Some(rv) {
            return Ok(None);
        }
        let mut v = serde_json::to_value(&*node).expect("node serializes");
        merge(&mut v, patch);
        let mut n: Node = serde_json::from_value(v).map_err(|e| Error::Config {
            message: format!("fake: patch made an invalid node: {e}"),
        })?;
        n.metadata.resource_version = Some(next);
        *node = n.clone();
        Ok(Some(n))
    }

    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>> {
        let s = self.lock();
        Ok(s.pods
            .get(node)
            .into_iter()
            .flatten()
            .map(|(ns, name)| Pod {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect())
    }

    async fn evict(&self, namespace: &str, pod: &str) -> Result<Eviction> {
        self.write("evict", pod)?;
        let mut s = self.lock();
        if s.refused.contains(pod) {
            return Ok(Eviction::Refused);
        }
        let mut found = false;
        for pods in s.pods.values_mut() {
            let before = pods.len();
            pods.retain(|(ns, n)| !(ns == namespace && n == pod));
            found |= pods.len() != before;
        }
        Ok(if found {
            Eviction::Evicted
        } else {
            Eviction::Gone
        })
    }

    async fn get_job(&self, _namespace: &str, name: &str) -> Result<Option<Job>> {
        let s = self.lock();
        if s.failing.contains("get_job") {
            return Err(server_error("get job"));
        }
        Ok(s.jobs.get(name).cloned())
    }

    async fn create_job(&self, _namespace: &str, job: &Job) -> Result<()> {
        let name = job.metadata.name.clone().unwrap_or_default();
        self.write("create_job", &name)?;
        let mut s = self.lock();
        if !s.jobs.contains_key(&name) {
            s.jobs_created.push(name.clone());
            s.jobs.insert(name, job.clone());
        }
        Ok(())
    }

    async fn delete_job(&self, _namespace: &str, name: &str) -> Result<()> {
        self.write("delete_job", name)?;
        self.lock().jobs.remove(name);
        Ok(())
    }

    fn event(&self, node: &Node, _warning: bool, reason: &str, _message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if self.write("event", &name).is_ok() {
            self.lock().events.push((name, reason.to_owned()));
        }
    }
}
