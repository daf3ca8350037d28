//! Command line: `serve`, `plan`, `tickets`. Flags say how the process runs; what it does comes
//! from the configuration file and `ARK_*` (see [`crate::config`]).

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use tokio::sync::{Notify, mpsc};

use crate::alerts::{AlertStore, Applied, StoreLimits, parse_alert_file};
use crate::audit::Audit;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::k8s::executor::Executor;
use crate::k8s::leader::LeaderElector;
use crate::k8s::{self, Kube};
use crate::metrics::Metrics;
use crate::planner::{self, ClusterView, Plan};
use crate::steps::JobTemplates;
use crate::ticket::TicketStatus;
use crate::webhook::{self, AppState};

pub const TOKEN_ENV: &str = "ARK_HEALER_WEBHOOK_TOKEN";

#[derive(Debug, Parser)]
#[command(
    name = "ark-healer",
    version,
    about = "Ark healer: alerts in, safe remediation out"
)]
pub struct Cli {
    /// Log format.
    #[arg(long = "log.format", global = true, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook and the remediation loop.
    Serve(ServeArgs),
    /// Dry-run: print what would be done for an alert file (webhook payload or /api/v2/alerts dump).
    Plan {
        #[arg(long)]
        alerts: PathBuf,
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// List tickets across nodes (open ones; `--all` for every ticket).
    Tickets {
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long = "web.listen-address", default_value = ":9488")]
    pub listen: String,
    /// File with the webhook bearer token (else env ARK_HEALER_WEBHOOK_TOKEN).
    #[arg(long = "webhook-token-file")]
    pub token_file: Option<PathBuf>,
    /// Never mutate the cluster (overrides the configuration's `dry_run = false`).
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Leader-election identity (default: $POD_NAME, else the hostname, plus the pid).
    #[arg(long)]
    pub identity: Option<String>,
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Plan {
            alerts,
            kubeconfig,
            config,
            output,
        } => plan_cmd(&alerts, kubeconfig.as_deref(), config.as_deref(), output).await,
        Command::Tickets {
            kubeconfig,
            all,
            output,
        } => tickets_cmd(kubeconfig.as_deref(), all, output).await,
    }
}

pub fn parse_listen(addr: &str) -> anyhow::Result<SocketAddr> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    };
    full.parse()
        .with_context(|| format!("invalid --web.listen-address {addr:?}"))
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
async fn reachable(kubeconfig: Option<&Path>, cfg: &Config, metrics: &Metrics) -> Option<Kube> {
    let client = match k8s::client(kubeconfig, &cfg.kube).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "No Kubernetes client");
            return None;
        }
    };
    let t = Duration::from_secs(cfg.kube.request_timeout_seconds);
    match tokio::time::timeout(t, client.apiserver_version()).await {
        Ok(Ok(_)) => Some(Kube::new(client, cfg.kube.clone(), metrics.clone())),
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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    cfg.dry_run |= args.dry_run;
    let token = read_token(args.token_file.as_deref())?;
    let addr = parse_listen(&args.listen)?;
    let catalog = Catalog::load(cfg.catalog_file.as_deref())?;
    let jobs = JobTemplates::load(cfg.jobs_dir.as_deref())?;
    let audit = Audit::open(cfg.audit_log.as_deref())?;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry)?;

    let kube = reachable(args.kubeconfig.as_deref(), &cfg, &metrics).await;
    if kube.is_none() {
        if !cfg.dry_run {
            bail!(
                "Kubernetes API not reachable (use --dry-run to serve and plan without a cluster)"
            );
        }
        tracing::warn!("No reachable cluster: dry-run planning against an empty cluster view");
    }

    let leader = Arc::new(AtomicBool::new(false));
    match (&kube, cfg.lease.enabled) {
        (Some(k), true) => {
            let identity = args.identity.clone().unwrap_or_else(default_identity);
            tracing::info!(identity = %identity, lease = %cfg.lease.name, namespace = %cfg.lease.namespace, "Leader election on");
            let elector =
                LeaderElector::new(k.clone(), cfg.lease.clone(), identity, leader.clone());
            tokio::spawn(elector.run());
        }
        _ => {
            leader.store(true, Ordering::SeqCst);
            metrics.is_leader.set(1);
        }
    }

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
            while let Some(webhook::Batch { alerts, permit }) = rx.recv().await {
                metrics.queue_depth.dec();
                let mut changed = Vec::new();
                {
                    let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                    let now = Timestamp::now();
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
                    // Every replica's store, not only the leader's, forgets stale alerts.
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
    let executor = Arc::new(
        Executor::new(
            kube,
            catalog,
            cfg.clone(),
            jobs,
            audit,
            metrics.clone(),
            store,
        )
        .with_leadership(leader.clone()),
    );
    {
        let executor = executor.clone();
        tokio::spawn(async move {
            let mut next_full = Instant::now();
            loop {
                let wait = next_full.saturating_duration_since(Instant::now());
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
                if !leader.load(Ordering::SeqCst) {
                    next_full = Instant::now() + interval;
                    continue;
                }
                let only = std::mem::take(&mut *dirty.lock().unwrap_or_else(|p| p.into_inner()));
                let result = if Instant::now() >= next_full {
                    next_full = Instant::now() + interval;
                    executor.reconcile(None).await
                } else {
                    executor.reconcile(Some(&only)).await
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "Reconcile pass failed");
                }
            }
        });
    }

    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState::new(
        &token,
        tx,
        metrics,
        ready.clone(),
        webhook::DEFAULT_BODY_LIMIT,
        cfg.max_queue_bytes,
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(address = %addr, dry_run = cfg.dry_run, "Serving webhook and metrics");
    axum::serve(listener, webhook::router(state))
        .with_graceful_shutdown(shutdown())
        .await
        .context("serving HTTP")
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
}

fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "ark-healer".into());
    format!("{base}-{}", std::process::id())
}

async fn plan_cmd(
    alerts: &Path,
    kubeconfig: Option<&Path>,
    config: Option<&Path>,
    output: Output,
) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let catalog = Catalog::load(cfg.catalog_file.as_deref())?;
    let body = std::fs::read(alerts).with_context(|| format!("reading {}", alerts.display()))?;
    let alerts = parse_alert_file(&body)?;
    let view = match kubeconfig {
        Some(kc) => {
            let metrics = Metrics::register(&prometheus::Registry::new())?;
            let kube = reachable(Some(kc), &cfg, &metrics)
                .await
                .context("cluster given with --kubeconfig is not reachable")?;
            kube.cluster_view().await?
        }
        None => {
            eprintln!(
                "note: no --kubeconfig: planning against an empty cluster view (no nodes, no tickets)"
            );
            ClusterView::default()
        }
    };
    let plan = planner::plan(&alerts, &catalog, &cfg, &view, Timestamp::now());
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&plan)?)?,
        Output::Table => write_table(&mut out, &plan)?,
    }
    Ok(())
}

fn write_table(out: &mut impl Write, plan: &Plan) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<24} {:>8} {:<20} STEPS / BLOCKED",
        "NODE", "CONDITION", "PRIORITY", "SOP"
    )?;
    for n in &plan.nodes {
        let what = match &n.blocked {
            Some(b) => format!("BLOCKED: {b}"),
            None => n.steps.join(" → "),
        };
        writeln!(
            out,
            "{:<24} {:<24} {:>8} {:<20} {}",
            n.node, n.condition, n.priority, n.sop, what
        )?;
        for d in &n.deferred {
            writeln!(
                out,
                "{:<24}   deferred: {} ({})",
                "", d.condition, d.priority
            )?;
        }
    }
    if !plan.ignored.is_empty() {
        writeln!(out, "\nIGNORED")?;
        for i in &plan.ignored {
            writeln!(out, "{:<24} {:<24} {}", i.node, i.condition, i.reason)?;
        }
    }
    Ok(())
}

async fn tickets_cmd(kubeconfig: Option<&Path>, all: bool, output: Output) -> anyhow::Result<()> {
    let cfg = Config::load(None)?;
    let metrics = Metrics::register(&prometheus::Registry::new())?;
    let kube = reachable(kubeconfig, &cfg, &metrics)
        .await
        .context("Kubernetes API not reachable")?;
    let view = kube.cluster_view().await?;
    let mut rows = Vec::new();
    for (name, n) in &view.nodes {
        match &n.ticket {
            Some(Ok(t)) if all || t.status.is_open() || t.status == TicketStatus::Escalated => {
                rows.push(serde_json::json!({
                    "node": name, "condition": t.condition, "status": t.status,
                    "createdAt": t.created_at, "attempts": t.attempts,
                    "step": t.workflows.last().map(|w| format!("{} {:?}", w.action, w.status)),
                    "blocked": t.blocked, "reason": t.reason,
                }));
            }
            Some(Err(e)) => rows.push(serde_json::json!({"node": name, "error": e})),
            _ => {}
        }
    }
    let mut out = std::io::stdout().lock();
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<22} {:<10} {:<21} {:<24} BLOCKED",
        "NODE", "CONDITION", "STATUS", "CREATED", "LAST STEP"
    )?;
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
        if r.get("error").is_some() {
            writeln!(out, "{:<24} INVALID TICKET: {}", s("node"), s("error"))?;
            continue;
        }
        writeln!(
            out,
            "{:<24} {:<22} {:<10} {:<21} {:<24} {}",
            s("node"),
            s("condition"),
            s("status"),
            s("createdAt"),
            s("step"),
            s("blocked")
        )?;
    }
    Ok(())
}
