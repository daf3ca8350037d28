//! Command line: `serve`, `plan`, `tickets`, `pause`/`resume`/`status`, `why`. Flags say how the process runs; what it does comes
//! from the configuration file and `ARK_*` (see [`crate::config`]).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;

use crate::alerts::parse_alert_file;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::k8s;
use crate::metrics::Metrics;
use crate::planner::{self, ClusterView, Plan, PlanInput};
use crate::serve::{ServeOptions, reachable};

pub use crate::serve::TOKEN_ENV;

#[derive(Debug, Parser)]
#[command(
    name = "ark-healer",
    version = ark_web::VERSION,
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
    /// "What would the healer do now?" Plans offline (never writes) for an alert file.
    ///
    /// ALERTS: an Alertmanager webhook payload or a `GET /api/v2/alerts` dump
    /// (`amtool --output=json alert query` or `curl $AM/api/v2/alerts`).
    /// The cluster comes from --nodes, a snapshot (`kubectl get nodes -o json > nodes.json`,
    /// tickets in their annotations included), or from --kubeconfig (a live read); with
    /// neither, an empty cluster (no budget, no tickets). The output lists per node the
    /// condition, the SOP's steps, what blocks it (budget, cooldown, ...) and the deferred
    /// conditions, then the ignored alerts and why.
    #[command(verbatim_doc_comment)]
    Plan {
        /// Alert file (webhook payload or /api/v2/alerts dump).
        #[arg(long)]
        alerts: PathBuf,
        /// Cluster snapshot: the output of `kubectl get nodes -o json` (a List or one Node).
        #[arg(long, conflicts_with = "kubeconfig")]
        nodes: Option<PathBuf>,
        /// Read the nodes from this cluster instead (read-only).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Healer configuration (budget, cooldown, catalog_file, ...), as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Stop all writes to Nodes now, on every replica, without a restart (survives failover).
    ///
    /// Sets the `ark.io/paused` annotation on the healer's Lease (`[lease]` of --config). Alerts
    /// keep arriving and plans keep being made and audited as what the healer would do, but
    /// nothing is written to any Node until `ark-healer resume`. Takes effect within one
    /// reconcile pass. Needs `patch` on leases in the healer's namespace.
    #[command(verbatim_doc_comment)]
    Pause {
        /// Why (shown by `status`, in the audit log and in every blocked plan).
        #[arg(long)]
        reason: String,
        /// Who (default: $USER).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        target: LeaseTarget,
    },
    /// Lift `ark-healer pause`: the next reconcile pass acts again.
    Resume {
        #[command(flatten)]
        target: LeaseTarget,
    },
    /// Is remediation paused, and who leads?
    Status {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Why is this training job stuck? The cross-node chain, from Prometheus (read-only).
    ///
    /// Instant queries to Prometheus' HTTP API: the job's processes and what they wait on
    /// (ark_waits_on, ark_root_cause), the culprit node(s) whose error blocks it, with the
    /// error and since when (ALERTS_FOR_STATE of JobBlockedByNode / WorkloadStalled), the
    /// victim nodes (job_node:ark_job_culprit:max / job_node:ark_job_victim:max, or the same
    /// computed from the raw series when those rules are absent) and, when a cluster is
    /// reachable (--kubeconfig, else KUBECONFIG / ~/.kube/config / in-cluster), the healer's
    /// ticket on each culprit node. An unknown job is an error (exit 1). See docs/why.md.
    #[command(verbatim_doc_comment)]
    Why(WhyArgs),
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

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TextOrJson {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct WhyArgs {
    /// The training job: the `job_id` label of the exporter's series.
    #[arg(long = "job")]
    pub job: String,
    /// Prometheus base URL, e.g. http://prometheus:9090 (a path prefix is kept).
    #[arg(long)]
    pub prometheus: String,
    /// Cluster to read the culprit nodes' tickets from (read-only).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = "text")]
    pub output: TextOrJson,
    /// Seconds for all Prometheus queries together, and again for the cluster reads.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,
    /// At most this many culprits, victims, nodes, process groups and scenes are printed
    /// (what is cut is counted).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub limit: u32,
}

/// The cluster and the healer's Lease (its namespace and name come from `[lease]` of --config).
#[derive(Debug, clap::Args)]
pub struct LeaseTarget {
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Healer configuration, as for `serve` (only `[lease]` and `[kube]` are read).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Webhook, /metrics, /healthz and /readyz.
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
    /// Server limits and --web.config.file (TLS, client certificates, basic auth; the webhook
    /// keeps its bearer token and is not behind basic auth).
    #[command(flatten)]
    pub web: ark_web::WebArgs,
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
        Command::Serve(args) => {
            crate::serve::serve(ServeOptions {
                listen: parse_listen(&args.listen)?,
                token_file: args.token_file,
                dry_run: args.dry_run,
                config: args.config,
                kubeconfig: args.kubeconfig,
                identity: args.identity,
                limits: args.web.limits()?,
                web: args.web.web_config()?,
            })
            .await
        }
        Command::Plan {
            alerts,
            nodes,
            kubeconfig,
            config,
            output,
        } => {
            plan_cmd(
                &alerts,
                nodes.as_deref(),
                kubeconfig.as_deref(),
                config.as_deref(),
                output,
            )
            .await
        }
        Command::Tickets {
            kubeconfig,
            all,
            output,
        } => tickets_cmd(kubeconfig.as_deref(), all, output).await,
        Command::Why(args) => why_cmd(&args).await,
        Command::Pause { reason, by, target } => {
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            let pause = crate::pause::Pause::new(&by, &reason, Timestamp::now());
            let (kube, lease) = lease_target(&target).await?;
            crate::pause::write(&kube, &lease.namespace, &lease.name, Some(&pause)).await?;
            writeln!(
                std::io::stdout().lock(),
                "paused: Lease {}/{} carries {}; nothing is written to Nodes until `ark-healer resume`",
                lease.namespace,
                lease.name,
                crate::pause::ANNOTATION
            )?;
            Ok(())
        }
        Command::Resume { target } => {
            let (kube, lease) = lease_target(&target).await?;
            crate::pause::write(&kube, &lease.namespace, &lease.name, None).await?;
            writeln!(
                std::io::stdout().lock(),
                "resumed: the next reconcile pass acts"
            )?;
            Ok(())
        }
        Command::Status { target, output } => {
            let (kube, lease) = lease_target(&target).await?;
            let st = crate::pause::status(&kube, &lease.namespace, &lease.name, Timestamp::now())
                .await?;
            let mut out = std::io::stdout().lock();
            match output {
                Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&st)?)?,
                Output::Table => write!(out, "{st}")?,
            }
            Ok(())
        }
    }
}

/// A reachable cluster and the `[lease]` of the configuration.
async fn lease_target(t: &LeaseTarget) -> anyhow::Result<(k8s::Kube, crate::config::Lease)> {
    let cfg = Config::load(t.config.as_deref())?;
    let metrics = Metrics::register(&prometheus::Registry::new())?;
    let kube = reachable(t.kubeconfig.as_deref(), &cfg, &metrics)
        .await
        .context("Kubernetes API not reachable")?;
    Ok((kube, cfg.lease))
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

/// Reads `kubectl get nodes -o json` (a List, or a single Node object).
pub fn read_nodes_snapshot(path: &Path) -> anyhow::Result<ClusterView> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: not JSON (expected `kubectl get nodes -o json`)",
            path.display()
        )
    })?;
    let items = match value.get("items") {
        Some(items) => items.clone(),
        None if value.get("kind").and_then(|k| k.as_str()) == Some("Node") => {
            serde_json::Value::Array(vec![value])
        }
        None => anyhow::bail!(
            "{}: neither a List with items nor a Node (expected `kubectl get nodes -o json`)",
            path.display()
        ),
    };
    let nodes: Vec<Node> = serde_json::from_value(items)
        .with_context(|| format!("{}: items are not Node objects", path.display()))?;
    if let Some(i) = nodes.iter().position(|n| n.metadata.name.is_none()) {
        anyhow::bail!("{}: item {i} has no metadata.name", path.display());
    }
    Ok(k8s::view_of(&nodes))
}

async fn plan_cmd(
    alerts: &Path,
    nodes: Option<&Path>,
    kubeconfig: Option<&Path>,
    config: Option<&Path>,
    output: Output,
) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let catalog = Catalog::load(cfg.catalog_file.as_deref())?;
    let body = std::fs::read(alerts).with_context(|| format!("reading {}", alerts.display()))?;
    let alerts = parse_alert_file(&body).with_context(|| format!("{}", alerts.display()))?;
    let view = match (nodes, kubeconfig) {
        (Some(n), _) => read_nodes_snapshot(n)?,
        (None, Some(kc)) => {
            let metrics = Metrics::register(&prometheus::Registry::new())?;
            let kube = reachable(Some(kc), &cfg, &metrics)
                .await
                .context("cluster given with --kubeconfig is not reachable")?;
            kube.cluster_view().await?
        }
        (None, None) => {
            eprintln!(
                "note: no --nodes or --kubeconfig: planning against an empty cluster view (no nodes, no tickets)"
            );
            ClusterView::default()
        }
    };
    let plan = planner::plan(&PlanInput {
        alerts: &alerts,
        catalog: &catalog,
        config: &cfg,
        view: &view,
        now: Timestamp::now(),
        silence_means_resolved: true,
    });
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
            Some(Ok(t)) if all || t.status.is_unfinished() => {
                rows.push(serde_json::json!({
                    "node": name, "condition": t.condition, "status": t.status,
                    "createdAt": t.created_at, "attempts": t.attempts,
                    "step": t.workflows.last().map(|w| format!("{} {:?}", w.action, w.status)),
                    "blocked": t.blocked, "reason": t.reason,
                    "jobs": t.jobs.iter().map(|j| &j.job_id).collect::<Vec<_>>(),
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

async fn why_cmd(a: &WhyArgs) -> anyhow::Result<()> {
    use crate::why;
    why::validate_job_id(&a.job)?;
    let timeout = std::time::Duration::from_secs(a.timeout);
    let prom = why::Prometheus::new(&a.prometheus, timeout, why::MAX_RESPONSE_BYTES)?;
    let at = Timestamp::now();
    let evidence = tokio::time::timeout(timeout, prom.gather(&a.job, at))
        .await
        .map_err(|_| crate::Error::Prometheus {
            url: prom.url().to_owned(),
            message: format!(
                "did not answer within {} s (all queries together)",
                a.timeout
            ),
        })??;
    let mut answer = why::assemble(&a.job, prom.url(), at, &evidence, a.limit as usize)?;
    if !answer.culprits.is_empty() {
        let read = async {
            let kube = why::connect_cluster(a.kubeconfig.as_deref(), timeout).await?;
            why::tickets(&mut answer, &kube).await;
            Ok::<_, String>(())
        };
        let outcome = tokio::time::timeout(timeout, read).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => answer.cluster.error = Some(e),
            Err(_) => {
                answer.cluster.error =
                    Some(format!("the cluster did not answer within {} s", a.timeout))
            }
        }
    }
    let mut out = std::io::stdout().lock();
    match a.output {
        TextOrJson::Json => writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?,
        TextOrJson::Text => why::write_text(&mut out, &answer)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn why_parses_its_flags_and_bounds_them() {
        let cli = Cli::try_parse_from([
            "ark-healer",
            "why",
            "--job",
            "train",
            "--prometheus",
            "http://p:9090",
            "--output",
            "json",
            "--timeout",
            "3",
            "--limit",
            "7",
        ])
        .unwrap();
        let Command::Why(a) = cli.command else {
            panic!("not why");
        };
        assert_eq!(
            (
                a.job.as_str(),
                a.prometheus.as_str(),
                a.output,
                a.timeout,
                a.limit
            ),
            ("train", "http://p:9090", TextOrJson::Json, 3, 7)
        );
        assert!(a.kubeconfig.is_none());
        let base = [
            "ark-healer",
            "why",
            "--job",
            "j",
            "--prometheus",
            "http://p",
        ];
        let defaults = Cli::try_parse_from(base).unwrap();
        let Command::Why(d) = defaults.command else {
            panic!("not why");
        };
        assert_eq!((d.output, d.timeout, d.limit), (TextOrJson::Text, 10, 50));
        for bad in [
            &["--timeout", "0"][..],
            &["--timeout", "601"],
            &["--limit", "0"],
            &["--output", "yaml"],
        ] {
            let args: Vec<&str> = base.iter().copied().chain(bad.iter().copied()).collect();
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?} accepted");
        }
        assert!(Cli::try_parse_from(["ark-healer", "why", "--prometheus", "http://p"]).is_err());
    }
}
