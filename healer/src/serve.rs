//! `ark-healer serve`: the webhook, the alert store, the Lease and the reconcile loop.
//!
//! Every replica serves and stores what it receives (`/readyz` = can serve); only the Lease
//! holder acts. One pass: a snapshot of the watch-fed Node view ([`NodeCache`]: one consistent
//! view, no full LIST; refused when stale) → [`planner::plan`] (pure) →
//! Alertmanager re-confirms the alerts of plans about to disrupt a node for the first time (I4)
//! → the executor carries the plan out. On SIGTERM the replica stops writing, then releases the
//! Lease so the standby takes over at once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use tokio::sync::{Notify, mpsc};

use crate::alertmanager::Alertmanager;
use crate::alerts::{Alert, AlertStatus, AlertStore, Applied, StoreLimits};
use crate::audit::Audit;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::executor::steps::JobTemplates;
use crate::executor::{Executor, Settings};
use crate::k8s::{self, Fence, Kube, LeaderElector, NodeCache};
use crate::metrics::Metrics;
use crate::planner::{self, BlockReason, ClusterView, Plan, PlanInput};
use crate::webhook::{self, AppState};

pub const TOKEN_ENV: &str = "ARK_HEALER_WEBHOOK_TOKEN";

/// How long after start an alert we have not heard about counts as unknown rather than resolved:
/// Alertmanager re-sends firing alerts on `repeat_interval`, so silence right after a restart
/// proves nothing.
const STARTUP_GRACE: Duration = Duration::from_secs(300);

/// Flags of `serve` (how the process runs).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub dry_run: bool,
    pub config: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub identity: Option<String>,
    pub limits: ark_web::Limits,
    pub web: ark_web::WebConfig,
}

fn read_token(file: Option<&Path>) -> anyhow::Result<String> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading webhook token file {}", f.display()))?,
        None => std::env::var(TOKEN_ENV).unwrap_or_default(),
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("no webhook token: pass --webhook-token-file or set {TOKEN_ENV}");
    }
    Ok(token)
}

/// A client that answered `/version`, or `None`.
pub async fn reachable(kubeconfig: Option<&Path>, cfg: &Config, metrics: &Metrics) -> Option<Kube> {
    let client = match k8s::client(kubeconfig, &cfg.kube).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "No Kubernetes client");
            return None;
        }
    };
    let t = Duration::from_secs(cfg.kube.request_timeout_seconds);
    match tokio::time::timeout(t, client.apiserver_version()).await {
        Ok(Ok(_)) => Some(
            Kube::new(client, cfg.kube.clone(), metrics.clone())
                .with_events_namespace(&cfg.events_namespace),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Kubernetes API not reachable");
            None
        }
        Err(_) => {
            tracing::warn!("Kubernetes API did not answer in time");
            None
        }
    }
}

fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "ark-healer".into());
    format!("{base}-{}", std::process::id())
}

/// What one pass needs besides the executor.
struct Loop {
    catalog: Catalog,
    config: Config,
    store: Arc<Mutex<AlertStore>>,
    alertmanager: Option<Alertmanager>,
    executor: Executor<Kube>,
    /// The watch-fed Node view; `None` without a cluster.
    cache: Option<NodeCache>,
    started: Instant,
}

impl Loop {
    fn store(&self) -> std::sync::MutexGuard<'_, AlertStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn pass(&self, only: Option<&HashSet<String>>) -> crate::Result<Plan> {
        let started = Instant::now();
        let metrics = self.executor.metrics();
        // The watch-fed view (issue 19): one consistent snapshot, never a full Node LIST.
        let snapshot = match &self.cache {
            Some(cache) => match cache.snapshot().await {
                Ok(s) => Some(s),
                Err(refusal) => {
                    metrics
                        .passes_refused
                        .with_label_values(&[refusal.label()])
                        .inc();
                    return Err(crate::Error::ViewRefused {
                        reason: refusal.label(),
                        message: refusal.to_string(),
                    });
                }
            },
            None => None,
        };
        let (view, nodes) = match snapshot {
            Some(s) => (s.view, s.nodes),
            None => (ClusterView::default(), HashMap::new()),
        };
        let now = Timestamp::now();
        if only.is_none() {
            self.sync_from_alertmanager(now).await;
        }
        // I4: a firing alert Alertmanager stopped re-sending is forgotten before planning.
        self.store().expire(now);
        // Shared, not copied: the store's alerts are the pass's (issue 19: a copy per pass held
        // 100,000 alerts twice).
        let alerts = self.store().shared();
        let planning = Instant::now();
        let mut plan = planner::plan(&PlanInput {
            alerts: &alerts,
            catalog: &self.catalog,
            config: &self.config,
            view: &view,
            now,
            silence_means_resolved: self.started.elapsed() >= STARTUP_GRACE,
        });
        metrics
            .plan_duration
            .observe(planning.elapsed().as_secs_f64());
        if let Some(pause) = self.pause_state().await {
            crate::pause::apply(&mut plan, &pause);
        }
        self.confirm(&mut plan, &alerts, only).await;
        // The Node objects of the nodes about to advance (saves a GET each); a stale one costs
        // a 409 and a re-read, never a wrong write.
        let listed: HashMap<String, Node> = plan
            .nodes
            .iter()
            .filter(|p| p.block_reason.is_none())
            .filter_map(|p| nodes.get(&p.node).map(|n| (p.node.clone(), Node::clone(n))))
            .collect();
        self.executor.execute(&plan, &view, &listed, only).await;
        metrics
            .pass_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(plan)
    }

    /// The brake ([`crate::pause`]), read from the Lease on every pass that could write. A Lease
    /// that cannot be read counts as paused (fail closed).
    async fn pause_state(&self) -> Option<crate::pause::Pause> {
        let kube = self.executor.cluster()?;
        let lease = &self.config.lease;
        let state = match crate::pause::read(kube, &lease.namespace, &lease.name).await {
            Ok(p) => p,
            Err(e) => Some(crate::pause::Pause::new(
                "ark-healer",
                &format!(
                    "the pause state on Lease {}/{} is unreadable: {e}",
                    lease.namespace, lease.name
                ),
                Timestamp::now(),
            )),
        };
        self.executor
            .metrics()
            .paused
            .set(i64::from(state.is_some()));
        state
    }

    /// Every replica serves the webhook, so Alertmanager's notifications reach either: on each
    /// periodic pass the leader reads Alertmanager's active alerts and stores them as if
    /// received (a re-send), so an alert delivered to the other replica is acted on within a
    /// reconcile interval. Failures are logged; the webhook path keeps working.
    async fn sync_from_alertmanager(&self, now: Timestamp) {
        let Some(am) = &self.alertmanager else { return };
        match am.active(None, self.config.max_alert_bytes).await {
            Ok(alerts) => {
                let mut store = self.store();
                for a in alerts
                    .into_iter()
                    .filter(|a| a.status == AlertStatus::Firing)
                {
                    store.apply(a, now);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Alertmanager sync failed"),
        }
    }

    /// I4: before a plan disrupts a node for the first time, Alertmanager must list the alert as
    /// active. Not listed: the alert is marked resolved here (it was a replica's stale memory)
    /// and the plan blocked; Alertmanager not answering: blocked, asked again next pass.
    async fn confirm(
        &self,
        plan: &mut Plan,
        alerts: &[Arc<Alert>],
        only: Option<&HashSet<String>>,
    ) {
        let Some(am) = &self.alertmanager else { return };
        for p in plan.nodes.iter_mut().filter(|p| p.needs_confirmation) {
            if only.is_some_and(|o| !o.contains(&p.node)) {
                continue;
            }
            let why = match am.confirms(&self.catalog, &p.node, &p.condition).await {
                Ok(true) => continue,
                Ok(false) => {
                    let now = Timestamp::now();
                    let mut store = self.store();
                    for a in alerts
                        .iter()
                        .filter(|a| p.fingerprints.contains(&a.fingerprint))
                    {
                        let mut resolved = Alert::clone(a);
                        resolved.status = AlertStatus::Resolved;
                        store.apply(resolved, now);
                    }
                    "Alertmanager does not list the alert as active: not acting on this replica's memory".to_owned()
                }
                Err(e) => format!("cannot confirm the alert with Alertmanager: {e}"),
            };
            p.block_reason = Some(BlockReason::Unconfirmed);
            p.blocked = Some(why);
        }
    }
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let mut cfg = Config::load(opts.config.as_deref())?;
    cfg.dry_run |= opts.dry_run;
    let token = read_token(opts.token_file.as_deref())?;
    let catalog = Catalog::load(cfg.catalog_file.as_deref())?;
    let jobs = JobTemplates::load(cfg.jobs_dir.as_deref())?;
    let audit = Audit::open(cfg.audit_log.as_deref())?;
    let alertmanager = match &cfg.alertmanager.url {
        Some(url) => Some(Alertmanager::new(
            url,
            Duration::from_secs(cfg.alertmanager.timeout_seconds.max(1)),
        )?),
        None => {
            tracing::warn!(
                "alertmanager.url is not set: alerts are not re-confirmed before a disruption (I4 off)"
            );
            None
        }
    };
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry)?;
    ark_web::process_and_build_info(
        &registry,
        "ark_healer_build_info",
        env!("CARGO_PKG_VERSION"),
    )?;

    let kube = reachable(opts.kubeconfig.as_deref(), &cfg, &metrics).await;
    if kube.is_none() {
        if !cfg.dry_run {
            bail!(
                "Kubernetes API not reachable (use --dry-run to serve and plan without a cluster)"
            );
        }
        tracing::warn!("No reachable cluster: dry-run planning against an empty cluster view");
    }

    let (fence, elector) = match (&kube, cfg.lease.enabled) {
        (Some(k), true) => {
            let identity = opts.identity.clone().unwrap_or_else(default_identity);
            tracing::info!(identity = %identity, lease = %cfg.lease.name, namespace = %cfg.lease.namespace, "Leader election on");
            let fence = Fence::new(Duration::from_secs(cfg.lease.margin_seconds));
            let elector = Arc::new(LeaderElector::new(
                k.clone(),
                cfg.lease.clone(),
                identity,
                fence.clone(),
            ));
            let task = {
                let elector = elector.clone();
                tokio::spawn(async move { elector.run().await })
            };
            (fence, Some((elector, task)))
        }
        _ => {
            metrics.is_leader.set(1);
            (Fence::unfenced(), None)
        }
    };

    let (tx, mut rx) = mpsc::channel::<webhook::Batch>(cfg.queue_capacity);
    let store = Arc::new(Mutex::new(AlertStore::new(StoreLimits::from(&cfg))));
    let wake = Arc::new(Notify::new());
    // Nodes that received alert changes since the last pass: a wake-up advances only these.
    let dirty: Arc<Mutex<HashSet<String>>> = Arc::default();
    {
        let store = store.clone();
        let wake = wake.clone();
        let dirty = dirty.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Every replica stores what it receives (a standby that takes over has it).
            while let Some(webhook::Batch { alerts, permit }) = rx.recv().await {
                metrics.queue_depth.dec();
                let mut changed = Vec::new();
                {
                    let now = Timestamp::now();
                    let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                    for a in alerts {
                        let node = a.node().map(str::to_owned);
                        match s.apply(a, now) {
                            Applied::Changed => changed.extend(node),
                            Applied::Rejected => metrics
                                .alerts_dropped
                                .with_label_values(&["store_full"])
                                .inc(),
                            Applied::Duplicate | Applied::Stale => {}
                        }
                    }
                    s.expire(now);
                }
                drop(permit);
                if !changed.is_empty() {
                    dirty
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(changed);
                    wake.notify_one();
                }
            }
        });
    }

    let interval = Duration::from_secs(cfg.reconcile_interval_seconds.max(1));
    let settings = Settings {
        jobs_namespace: cfg.jobs_namespace.clone(),
        max_concurrent_nodes: cfg.max_concurrent_nodes,
    };
    let cluster = kube.map(|k| k.with_fence(fence.clone()));
    // Every replica keeps the view warm (a standby that takes over plans at once); its reads
    // are not fenced, its writes are none.
    let (cache, cache_task) = match &cluster {
        Some(k) => {
            let (c, t) = NodeCache::start(k.clone());
            (Some(c), Some(t))
        }
        None => (None, None),
    };
    let executor = Executor::new(
        cluster,
        settings,
        jobs,
        audit,
        metrics.clone(),
        fence.clone(),
    )
    .with_report_time(interval);
    let dry_run = cfg.dry_run;
    let cfg_queue_bytes = cfg.max_queue_bytes;
    let lp = Arc::new(Loop {
        catalog,
        config: cfg,
        store,
        alertmanager,
        executor,
        cache,
        started: Instant::now(),
    });
    let reconciler = {
        let fence = fence.clone();
        tokio::spawn(async move {
            let mut next_full = Instant::now();
            loop {
                let wait = next_full.saturating_duration_since(Instant::now());
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                if !fence.holds() {
                    // A standby keeps what it receives; it plans only once it leads, and does
                    // not report the cluster as it last saw it.
                    lp.executor.metrics().clear_leader_gauges();
                    next_full = Instant::now() + interval;
                    continue;
                }
                let only = std::mem::take(&mut *dirty.lock().unwrap_or_else(|p| p.into_inner()));
                let result = if Instant::now() >= next_full {
                    next_full = Instant::now() + interval;
                    lp.pass(None).await
                } else {
                    lp.pass(Some(&only)).await
                };
                match result {
                    Ok(_) => {}
                    Err(crate::Error::ViewRefused { reason, message }) => {
                        // Nothing was written; the nodes of this wake-up are looked at by the
                        // next full pass, soon.
                        tracing::warn!(reason, "Reconcile pass refused: {message}");
                        next_full = next_full.min(Instant::now() + Duration::from_millis(500));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "Reconcile pass failed"),
                }
            }
        })
    };

    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState::new(
        &token,
        tx,
        metrics,
        ready.clone(),
        webhook::DEFAULT_BODY_LIMIT,
        cfg_queue_bytes,
    );
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(address = %opts.listen, dry_run, tls = opts.web.tls.is_some(), basic_auth = !opts.web.users.is_empty(), "Serving webhook and metrics");
    // The webhook authenticates with its bearer token (Alertmanager sends one credential).
    let served = ark_web::serve(
        listener,
        webhook::router(state),
        opts.limits.clone(),
        &opts.web,
        &["/api/v1/alerts"],
        shutdown(),
    )
    .await
    .context("serving HTTP");

    // Stop acting first, then hand the Lease over: the standby leads at its next look.
    fence.revoke();
    reconciler.abort();
    if let Some(t) = cache_task {
        t.abort();
    }
    if let Some((elector, task)) = elector {
        task.abort();
        match elector.release().await {
            Ok(true) => {}
            Ok(false) => tracing::info!("Not the Lease holder at shutdown: nothing to release"),
            Err(e) => {
                tracing::warn!(error = %e, "Lease not released; the standby takes over when it expires")
            }
        }
    }
    served
}

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("Shutting down: no more actions; releasing the Lease");
}

#[cfg(test)]
mod tests {
    //! The executor as `serve` wires it (acting nodes first, a bound on the time spent
    //! recording blocks), against the in-memory cluster: a storm of blocked nodes costs one
    //! ticket write per node, not one per pass, and never holds up the nodes that act.

    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::k8s::fake::FakeCluster;
    use crate::k8s::{Cluster, view_of};

    fn executor(report_time: Duration) -> Executor<FakeCluster> {
        let fence = Fence::new(Duration::from_millis(100));
        fence.hold_until(Some(Instant::now() + Duration::from_secs(3600)));
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        Executor::new(
            Some(FakeCluster::new(fence.clone())),
            Settings {
                jobs_namespace: "ark-system".into(),
                max_concurrent_nodes: 16,
            },
            JobTemplates::embedded(),
            Audit::open(None).unwrap(),
            metrics,
            fence,
        )
        .with_report_time(report_time)
    }

    async fn pass(exec: &Executor<FakeCluster>, store: &AlertStore, config: &Config) {
        let c = exec.cluster().unwrap();
        let nodes = Cluster::list_nodes(c).await.unwrap();
        let view = view_of(&nodes);
        let listed: HashMap<String, Node> = nodes
            .into_iter()
            .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
            .collect();
        let alerts = store.snapshot();
        let p = planner::plan(&PlanInput {
            alerts: &alerts,
            catalog: &Catalog::embedded().unwrap(),
            config,
            view: &view,
            now: Timestamp::now(),
            silence_means_resolved: true,
        });
        exec.execute(&p, &view, &listed, None).await;
    }

    fn storm(exec: &Executor<FakeCluster>, nodes: usize) -> (AlertStore, Config) {
        let mut config = Config::default();
        config.budget.max_unschedulable = 5;
        config.budget.max_unschedulable_percent = 0.0;
        let mut store = AlertStore::new(StoreLimits::from(&config));
        for i in 0..nodes {
            let n = format!("n{i:03}");
            exec.cluster().unwrap().add_node(&n, false);
            store.apply(
                crate::testkit::alert_with(&n, "GpuHung", AlertStatus::Firing),
                Timestamp::now(),
            );
        }
        (store, config)
    }

    fn patches(exec: &Executor<FakeCluster>) -> HashMap<String, usize> {
        let mut by_node = HashMap::new();
        for (op, what, _) in &exec.cluster().unwrap().lock().writes {
            if op == "patch" {
                *by_node.entry(what.clone()).or_insert(0) += 1;
            }
        }
        by_node
    }

    #[tokio::test]
    async fn a_storm_of_blocked_nodes_is_written_once_per_node_not_once_per_pass() {
        let exec = executor(Duration::from_secs(60));
        let (store, config) = storm(&exec, 200);
        for _ in 0..20 {
            pass(&exec, &store, &config).await;
        }
        let c = exec.cluster().unwrap();
        assert_eq!(c.unschedulable(), 5);
        let by_node = patches(&exec);
        let acting: Vec<&String> = by_node.keys().filter(|n| by_node[*n] > 1).collect();
        assert_eq!(
            acting.len(),
            5,
            "only the acting nodes are written more than once"
        );
        let blocked_once = by_node.values().filter(|v| **v == 1).count();
        assert_eq!(blocked_once, 195, "{by_node:?}");
        // And 20 more passes write nothing new for the blocked nodes.
        let before = patches(&exec);
        for _ in 0..20 {
            pass(&exec, &store, &config).await;
        }
        let after = patches(&exec);
        for (n, v) in &after {
            if before[n] == 1 {
                assert_eq!(*v, 1, "{n} rewritten while its block did not change");
            }
        }
    }

    #[tokio::test]
    async fn recording_blocks_never_delays_the_nodes_that_act() {
        // With time to record every block, the acting nodes are still written first: no patch
        // of a blocked node comes before the last patch of an acting one.
        let exec = executor(Duration::from_secs(60));
        let (store, config) = storm(&exec, 100);
        pass(&exec, &store, &config).await;
        let c = exec.cluster().unwrap();
        {
            let s = c.lock();
            let acting: HashSet<&String> = s
                .nodes
                .iter()
                .filter(|(_, n)| n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true))
                .map(|(name, _)| name)
                .collect();
            assert_eq!(acting.len(), 5);
            let order: Vec<bool> = s
                .writes
                .iter()
                .filter(|w| w.0 == "patch")
                .map(|w| acting.contains(&w.1))
                .collect();
            let last_acting = order.iter().rposition(|a| *a).unwrap();
            let first_blocked = order.iter().position(|a| !*a).unwrap();
            assert!(
                last_acting < first_blocked,
                "a blocked node was written before an acting one: {order:?}"
            );
            assert_eq!(
                order.iter().filter(|a| !**a).count(),
                95,
                "every blocked node recorded once"
            );
        }
        assert_eq!(patches(&exec).len(), 100);
        // No time at all to record blocks: the budget's nodes still act in the first pass, and
        // no blocked node is written.
        let exec = executor(Duration::ZERO);
        let (store, config) = storm(&exec, 100);
        pass(&exec, &store, &config).await;
        assert_eq!(exec.cluster().unwrap().unschedulable(), 5);
        assert_eq!(patches(&exec).len(), 5, "only acting nodes written");
    }
}
