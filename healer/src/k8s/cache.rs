//! The watch-fed Node view (issue 19): one list, then a watch, into a kube-runtime reflector
//! [`Store`] with this module as its only writer; every pass takes one consistent snapshot of it
//! instead of listing all Nodes.
//!
//! The list/watch loop is our own rather than `kube::runtime::watcher` because the view's age
//! needs what that watcher hides: bookmarks, and a watch the server answered. Age = time since
//! the watch last proved live (an event, a bookmark, a completed list, or the server accepting a
//! watch from our resourceVersion); the watch is re-established every `max_view_age / 3`, so a
//! healthy quiet watch stays well under the bound and a dead connection or a down apiserver
//! shows. A pass refuses to act ([`NodeCache::snapshot`]) on a view that is not synced, older
//! than the bound, or has not yet seen this replica's own last Node write — that last rule is
//! read-your-writes for the disruption budget (I1): a cordon we just made must be counted by the
//! next plan, exactly as a fresh list would.
//!
//! Relists are bounded: only a `410 Gone` (our resourceVersion is too old) or repeated watch
//! failures relist, with exponential backoff between lists (1 s doubling to 60 s), and every
//! relist is counted (`ark_healer_view_relists_total{reason}`).
//!
//! Stored objects are slimmed (status, managedFields, foreign annotations and labels dropped;
//! an oversized ticket clipped): the planner and the executor read only `spec`, the healer's own
//! annotations and the labels in [`KEEP_LABEL_PREFIXES`]; every write re-reads what it must
//! (resourceVersion-guarded patches). STYLE 18: a Node's memory here is bounded in bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher::Event;
use tokio::sync::watch;

use super::client::Kube;
use super::view::node_view;
use crate::planner::{ClusterView, NodeView};
use crate::ticket::{TICKET_ANNOTATION, TICKET_MAX_BYTES};

/// Labels the healer reads (control-plane roles, `ark.io/disable`); the others are dropped.
pub const KEEP_LABEL_PREFIXES: &[&str] = &["ark.io/", "node-role.kubernetes.io/"];
const PAGE_SIZE: u32 = 500;
const RELIST_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RELIST_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Watch failures in a row (not 410) before the view is rebuilt from a list.
const WATCH_FAILURES_BEFORE_RELIST: u32 = 5;
/// How long a pass waits for the watch to deliver this replica's own last write.
const OWN_WRITES_WAIT: Duration = Duration::from_secs(2);

/// What a pass may plan on.
pub struct Snapshot {
    pub view: ClusterView,
    pub nodes: HashMap<String, Arc<Node>>,
    /// Age of the view when it was taken.
    pub age: Duration,
}

/// Why a pass must not act on the view now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    NotSynced,
    Stale { age: Duration, max: Duration },
    OwnWritesUnseen { written: u64, seen: u64 },
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotSynced => "not_synced",
            Refusal::Stale { .. } => "stale_view",
            Refusal::OwnWritesUnseen { .. } => "own_writes_unseen",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotSynced => write!(f, "the Node view has not completed its first list"),
            Refusal::Stale { age, max } => write!(
                f,
                "the Node view is {:.1} s old (bound {} s): the watch has not proved live",
                age.as_secs_f64(),
                max.as_secs()
            ),
            Refusal::OwnWritesUnseen { written, seen } => write!(
                f,
                "the Node view has not yet seen this replica's last write (resourceVersion \
                 {written}, view at {seen})"
            ),
        }
    }
}

/// Pure: may a pass act on a view with these properties?
pub fn judge(
    synced: bool,
    age: Option<Duration>,
    max: Duration,
    written: u64,
    seen: u64,
) -> Result<(), Refusal> {
    if !synced {
        return Err(Refusal::NotSynced);
    }
    match age {
        Some(age) if age <= max => {}
        Some(age) => return Err(Refusal::Stale { age, max }),
        None => return Err(Refusal::NotSynced),
    }
    if written > seen {
        return Err(Refusal::OwnWritesUnseen { written, seen });
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Liveness {
    synced: bool,
    proof: Option<Instant>,
}

struct Inner {
    store: Store<Node>,
    live: Mutex<Liveness>,
    /// Highest resourceVersion applied to the store (events and lists arrive in order).
    seen: watch::Sender<u64>,
    /// Parsed views by node, with the resourceVersion they were parsed at: a pass re-parses
    /// only the tickets that changed.
    views: Mutex<HashMap<String, (String, NodeView)>>,
}

/// The reader side, cheap to clone.
#[derive(Clone)]
pub struct NodeCache {
    inner: Arc<Inner>,
    kube: Kube,
    max_age: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops what the healer never reads; bounds the rest in bytes.
pub fn slim(mut n: Node) -> Node {
    n.status = None;
    let m = &mut n.metadata;
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("ark.io/"));
        for (k, v) in a.iter_mut() {
            // A ticket over the limit is invalid whatever follows; keep just enough to say so.
            let limit = if k == TICKET_ANNOTATION {
                TICKET_MAX_BYTES + 1
            } else {
                1024
            };
            if v.len() > limit {
                let mut cut = limit;
                while !v.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.truncate(cut);
            }
        }
    }
    if let Some(l) = m.labels.as_mut() {
        l.retain(|k, _| KEEP_LABEL_PREFIXES.iter().any(|p| k.starts_with(p)));
    }
    n
}

fn rv_of(n: &Node) -> u64 {
    n.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl NodeCache {
    /// Starts the list/watch task; the cache is usable at once (passes refuse until synced).
    pub fn start(kube: Kube) -> (NodeCache, tokio::task::JoinHandle<()>) {
        let writer: Writer<Node> = Writer::default();
        let inner = Arc::new(Inner {
            store: writer.as_reader(),
            live: Mutex::default(),
            seen: watch::Sender::new(0),
            views: Mutex::default(),
        });
        let max_age = Duration::from_secs(kube.policy.max_view_age_seconds.max(3));
        kube.metrics.view_age.set(f64::INFINITY);
        let cache = NodeCache {
            inner,
            kube,
            max_age,
        };
        let task = {
            let (c, ticker) = (cache.clone(), cache.clone());
            tokio::spawn(async move {
                let age = async {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        ticker.publish_age();
                    }
                };
                tokio::select! {
                    () = c.run(writer) => {}
                    () = age => {}
                }
            })
        };
        (cache, task)
    }

    fn age(&self) -> Option<Duration> {
        lock(&self.inner.live).proof.map(|p| p.elapsed())
    }

    fn publish_age(&self) {
        let age = self.age().map_or(f64::INFINITY, |a| a.as_secs_f64());
        self.kube.metrics.view_age.set(age);
    }

    fn proved(&self) {
        lock(&self.inner.live).proof = Some(Instant::now());
    }

    fn saw(&self, rv: u64) {
        self.inner.seen.send_if_modified(|v| {
            let bigger = rv > *v;
            *v = (*v).max(rv);
            bigger
        });
    }

    /// One consistent snapshot for a pass, or why the pass must not act. Waits up to 2 s for the
    /// watch to deliver this replica's own last Node write.
    pub async fn snapshot(&self) -> Result<Snapshot, Refusal> {
        let written = self.kube.written_rv();
        let mut seen = self.inner.seen.subscribe();
        if written > *seen.borrow() {
            let _ = tokio::time::timeout(OWN_WRITES_WAIT, seen.wait_for(|v| *v >= written)).await;
        }
        let synced = lock(&self.inner.live).synced;
        let age = self.age();
        self.publish_age();
        judge(synced, age, self.max_age, written, *seen.borrow())?;
        // One read lock over the store: every node as of one point of the event stream.
        let objects = self.inner.store.state();
        let mut views = lock(&self.inner.views);
        let mut nodes = HashMap::with_capacity(objects.len());
        let mut out = BTreeMap::new();
        for n in objects {
            let name = n.metadata.name.clone().unwrap_or_default();
            let rv = n.metadata.resource_version.clone().unwrap_or_default();
            let v = match views.get(&name) {
                Some((r, v)) if *r == rv => v.clone(),
                _ => {
                    let v = node_view(&n);
                    views.insert(name.clone(), (rv, v.clone()));
                    v
                }
            };
            out.insert(name.clone(), v);
            nodes.insert(name, n);
        }
        views.retain(|k, _| out.contains_key(k));
        self.kube.metrics.view_nodes.set(out.len() as i64);
        Ok(Snapshot {
            view: ClusterView {
                nodes: out,
                live: true,
            },
            nodes,
            age: age.unwrap_or_default(),
        })
    }

    async fn run(self, mut writer: Writer<Node>) {
        let api: Api<Node> = Api::all(self.kube.client.clone());
        let mut reason = "initial";
        let mut backoff = RELIST_BACKOFF_MIN;
        loop {
            self.kube
                .metrics
                .view_relists
                .with_label_values(&[reason])
                .inc();
            let started = Instant::now();
            let rv = match self.list(&api, &mut writer).await {
                Ok(rv) => rv,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "Node list for the view failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RELIST_BACKOFF_MAX);
                    reason = "error";
                    continue;
                }
            };
            tracing::info!(nodes = self.inner.store.len(), took = ?started.elapsed(), "Node view listed");
            reason = self.watch(&api, &mut writer, rv).await;
            // Bounded: never more than one list per backoff period, however the watch fails.
            let since = started.elapsed();
            if since < backoff {
                tokio::time::sleep(backoff - since).await;
            }
            backoff = if since > RELIST_BACKOFF_MAX {
                RELIST_BACKOFF_MIN
            } else {
                (backoff * 2).min(RELIST_BACKOFF_MAX)
            };
        }
    }

    /// A paged list (one consistent read: the continue token pins the first page's revision)
    /// swapped into the store at once. Returns the list's resourceVersion.
    async fn list(&self, api: &Api<Node>, writer: &mut Writer<Node>) -> crate::Result<String> {
        let mut lp = ListParams::default().limit(PAGE_SIZE);
        writer.apply_watcher_event(&Event::Init);
        loop {
            let page = self
                .kube
                .call("list nodes (view)", || api.list(&lp))
                .await?;
            for n in page.items {
                self.saw(rv_of(&n));
                writer.apply_watcher_event(&Event::InitApply(slim(n)));
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => {
                    let rv = page.metadata.resource_version.unwrap_or_default();
                    if let Ok(v) = rv.parse() {
                        self.saw(v);
                    }
                    writer.apply_watcher_event(&Event::InitDone);
                    {
                        let mut live = lock(&self.inner.live);
                        live.synced = true;
                        live.proof = Some(Instant::now());
                    }
                    self.publish_age();
                    return Ok(rv);
                }
            }
        }
    }

    /// Watches from `rv` until the view must be rebuilt; returns the relist reason.
    async fn watch(
        &self,
        api: &Api<Node>,
        writer: &mut Writer<Node>,
        mut rv: String,
    ) -> &'static str {
        let timeout = (self.max_age.as_secs() / 3).max(1);
        // The client's read timeout must not cut a quiet watch before the server ends it.
        let timeout = timeout.min(
            self.kube
                .policy
                .request_timeout_seconds
                .saturating_sub(1)
                .max(1),
        );
        let wp = WatchParams::default().timeout(u32::try_from(timeout).unwrap_or(10));
        let mut failures = 0u32;
        loop {
            self.kube.count("watch nodes (view)");
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(kube::Error::Api(s)) if s.code == 410 => return "expired",
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "Node watch failed to start");
                    if failures >= WATCH_FAILURES_BEFORE_RELIST {
                        return "error";
                    }
                    tokio::time::sleep(RELIST_BACKOFF_MIN * failures).await;
                    continue;
                }
            };
            // The server took our resourceVersion: every change after it is on its way.
            self.proved();
            let mut stream = std::pin::pin!(stream);
            let idle = Duration::from_secs(timeout + 5);
            let mut clean = true;
            loop {
                let item = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(_) => {
                        tracing::debug!("Node watch idle past its timeout: re-watching");
                        clean = false;
                        break;
                    }
                };
                match item {
                    Ok(WatchEvent::Added(n) | WatchEvent::Modified(n)) => {
                        let v = rv_of(&n);
                        if let Some(r) = n.resource_version() {
                            rv = r;
                        }
                        writer.apply_watcher_event(&Event::Apply(slim(n)));
                        self.saw(v);
                        self.proved();
                    }
                    Ok(WatchEvent::Deleted(n)) => {
                        let v = rv_of(&n);
                        if let Some(r) = n.resource_version() {
                            rv = r;
                        }
                        writer.apply_watcher_event(&Event::Delete(n));
                        self.saw(v);
                        self.proved();
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        if let Ok(v) = b.metadata.resource_version.parse() {
                            self.saw(v);
                        }
                        rv = b.metadata.resource_version;
                        self.proved();
                    }
                    Ok(WatchEvent::Error(e)) if e.code == 410 => return "expired",
                    Ok(WatchEvent::Error(e)) => {
                        tracing::warn!(code = e.code, message = %e.message, "Node watch error");
                        clean = false;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "Node watch stream broke: re-watching");
                        clean = false;
                        break;
                    }
                }
            }
            if clean {
                failures = 0;
            } else {
                failures += 1;
                if failures >= WATCH_FAILURES_BEFORE_RELIST {
                    return "error";
                }
                tokio::time::sleep(RELIST_BACKOFF_MIN).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn a_pass_acts_only_on_a_synced_fresh_view_that_saw_our_writes() {
        let fresh = Some(Duration::from_secs(1));
        assert_eq!(judge(true, fresh, MAX, 10, 10), Ok(()));
        assert_eq!(judge(true, fresh, MAX, 0, 0), Ok(()));
        assert_eq!(judge(false, fresh, MAX, 0, 0), Err(Refusal::NotSynced));
        assert_eq!(judge(true, None, MAX, 0, 0), Err(Refusal::NotSynced));
        let old = Some(Duration::from_secs(31));
        assert_eq!(
            judge(true, old, MAX, 0, 0).map_err(|r| r.label()),
            Err("stale_view")
        );
        assert_eq!(
            judge(true, fresh, MAX, 11, 10),
            Err(Refusal::OwnWritesUnseen {
                written: 11,
                seen: 10
            })
        );
        // Exactly at the bound is still fresh.
        assert_eq!(judge(true, Some(MAX), MAX, 0, 0), Ok(()));
    }

    #[test]
    fn slim_keeps_what_the_healer_reads_and_bounds_the_rest() {
        let big_ticket = "x".repeat(TICKET_MAX_BYTES * 4);
        let n = Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some("7".into()),
                labels: Some(
                    [
                        ("ark.io/disable", "true"),
                        ("node-role.kubernetes.io/control-plane", ""),
                        ("feature.node.kubernetes.io/cpu-cpuid.AVX512", "true"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ),
                annotations: Some(
                    [
                        (TICKET_ANNOTATION, big_ticket.as_str()),
                        ("node.alpha.kubernetes.io/ttl", "0"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..Default::default()
            },
            spec: Some(Default::default()),
            status: Some(Default::default()),
        };
        let before = node_view(&n);
        let s = slim(n);
        assert!(s.status.is_none() && s.metadata.managed_fields.is_none());
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.len(), 2, "{labels:?}");
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann.len(), 1);
        assert_eq!(ann[TICKET_ANNOTATION].len(), TICKET_MAX_BYTES + 1);
        // The planner sees the same node: disabled, control plane, an invalid (too large) ticket.
        let after = node_view(&s);
        assert_eq!(
            (after.disabled, after.control_plane),
            (before.disabled, before.control_plane)
        );
        assert!(matches!(after.ticket, Some(Err(_))));
        assert!(matches!(before.ticket, Some(Err(_))));
    }
}
