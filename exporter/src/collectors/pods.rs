//! The `pods` collector: watches the pods of this node (`spec.nodeName=<node>` field selector)
//! in the Kubernetes API and feeds the shared [`PodResolver`] (pod UID → namespace, name,
//! container names, job), so that the `process` collector's series and events, and the eBPF
//! collector's [`PodResolver::by_cgroup_id`] look-ups, carry pod names.
//!
//! Cluster access: `--kubeconfig` (`[host] kubeconfig`), else kube's inference (`KUBECONFIG`,
//! `~/.kube/config`, in-cluster service account). Without any, the collector logs one line,
//! reports `up 0` and attribution stops at the pod UID. It needs `get/list/watch` on pods.
//! `up` is 1 once the first list completed and while the watch is healthy; watch errors are
//! retried with kube's default backoff and logged rate-limited.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};

use super::host::HostConfig;
use super::{BoxFuture, Collector, CollectorContext};
use crate::metrics::CollectorStatus;
use crate::pods::{ClusterState, PodResolver};
use crate::ratelimit::LogLimiter;

/// See the module docs.
pub struct PodsCollector {
    host: HostConfig,
    log_interval: Duration,
}

impl PodsCollector {
    /// The `[host]` section names the kubeconfig and the node.
    pub fn new(host: &HostConfig, log_interval: Duration) -> Self {
        PodsCollector {
            host: host.clone(),
            log_interval,
        }
    }
}

/// A kube client from the configuration; `Ok(None)` when no cluster is configured.
pub async fn client(host: &HostConfig) -> crate::Result<Option<kube::Client>> {
    let config = match &host.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| crate::Error::Config {
                detail: format!("kubeconfig {}: {e}", path.display()),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| crate::Error::Config {
                    detail: format!("kubeconfig {}: {e}", path.display()),
                })?
        }
        None => match kube::Config::infer().await {
            Ok(c) => c,
            Err(_) => return Ok(None),
        },
    };
    kube::Client::try_from(config)
        .map(Some)
        .map_err(|e| crate::Error::Config {
            detail: format!("kubernetes client: {e}"),
        })
}

/// Watches this node's pods into `resolver` until `shutdown` flips. Returns when there is no
/// cluster (after setting [`ClusterState::NoCluster`]) or on shutdown.
pub async fn watch(
    host: &HostConfig,
    resolver: &PodResolver,
    status: &CollectorStatus,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    log_interval: Duration,
) {
    let node = host.node_name.clone().unwrap_or_default();
    let client = match client(host).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            resolver.set_cluster_state(ClusterState::NoCluster);
            status.set_up(false);
            tracing::info!(
                "No Kubernetes cluster configured (no --kubeconfig, KUBECONFIG, ~/.kube/config or in-cluster service account): pod attribution stops at the pod UID"
            );
            return;
        }
        Err(e) => {
            resolver.set_cluster_state(ClusterState::NoCluster);
            status.set_up(false);
            tracing::warn!(error = %e, "Kubernetes client not configured: pod attribution stops at the pod UID");
            return;
        }
    };
    if node.is_empty() {
        tracing::warn!("No node name: watching pods of every node");
    }
    resolver.set_cluster_state(ClusterState::Syncing);
    let api: Api<Pod> = Api::all(client);
    let mut wc = watcher::Config::default();
    if !node.is_empty() {
        wc = wc.fields(&format!("spec.nodeName={node}"));
    }
    let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
    let mut err_log = LogLimiter::new(log_interval);
    let mut synced_once = false;
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = shutdown.changed() => return,
        };
        let t0 = Instant::now();
        match next {
            None => return,
            Some(Ok(ev)) => match ev {
                WatchEvent::Init => resolver.begin_resync(),
                WatchEvent::InitApply(p) | WatchEvent::Apply(p) => resolver.apply_pod(&p),
                WatchEvent::Delete(p) => resolver.delete_pod(&p),
                WatchEvent::InitDone => {
                    resolver.end_resync();
                    status.set_up(true);
                    if !synced_once {
                        tracing::info!(node = %node, pods = resolver.pod_count(), "Pod watch synced: pod attribution on");
                        synced_once = true;
                    }
                }
            },
            Some(Err(e)) => {
                status.set_up(false);
                if let Some(suppressed) = err_log.allow(Instant::now()) {
                    tracing::warn!(node = %node, error = %e, suppressed, "Pod watch failed; retrying with backoff");
                }
            }
        }
        status.set_duration(t0.elapsed().as_secs_f64());
    }
}

impl Collector for PodsCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        Box::pin(async move {
            ctx.status.set_up(false);
            watch(
                &self.host,
                &ctx.pods,
                &ctx.status,
                ctx.shutdown.clone(),
                self.log_interval,
            )
            .await;
        })
    }
}
