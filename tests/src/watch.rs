//! Watching what the apiserver holds while a test runs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

fn unschedulable(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// Polls the node list every 50 ms and counts schedulable↔unschedulable transitions per node.
pub struct CordonWatch {
    cordons: Arc<AtomicUsize>,
    uncordons: Arc<AtomicUsize>,
    max_out: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CordonWatch {
    pub async fn start(nodes: Api<Node>) -> Result<Self> {
        // The baseline is taken before the caller goes on, so no transition is missed.
        let first: BTreeSet<String> = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| unschedulable(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let cordons = Arc::new(AtomicUsize::new(0));
        let uncordons = Arc::new(AtomicUsize::new(0));
        let max_out = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (c, u, m, stop) = (
                cordons.clone(),
                uncordons.clone(),
                max_out.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut last = Some(first);
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(list) = nodes.list(&ListParams::default()).await {
                        let out: BTreeSet<String> = list
                            .items
                            .iter()
                            .filter(|n| unschedulable(n))
                            .filter_map(|n| n.metadata.name.clone())
                            .collect();
                        m.fetch_max(out.len(), Ordering::SeqCst);
                        if let Some(prev) = &last {
                            c.fetch_add(out.difference(prev).count(), Ordering::SeqCst);
                            u.fetch_add(prev.difference(&out).count(), Ordering::SeqCst);
                        }
                        last = Some(out);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Ok(CordonWatch {
            cordons,
            uncordons,
            max_out,
            stop,
            task,
        })
    }

    /// (cordons, uncordons, most nodes unschedulable at once) seen so far.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.cordons.load(Ordering::SeqCst),
            self.uncordons.load(Ordering::SeqCst),
            self.max_out.load(Ordering::SeqCst),
        )
    }

    pub async fn finish(self) -> (usize, usize, usize) {
        // One more poll so the last state is counted.
        tokio::time::sleep(Duration::from_millis(120)).await;
        self.stop.store(true, Ordering::SeqCst);
        let counts = self.counts();
        let _ = self.task.await;
        counts
    }
}
