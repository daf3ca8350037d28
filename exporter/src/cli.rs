//! Command line: `serve` (the default when no subcommand is given), `replay`, `why`, `bench`.
//! Flags say how the process runs; what it does comes from the config file and `ARK_*`
//! environment (see [`crate::config`]). Logs go to stderr; stdout is for command output.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::collectors::{self, CollectorContext};
use crate::config::{Config, ProbeSpec};
use crate::event::{Line, LineReader, MAX_LINE_BYTES};
use crate::http::{AppState, WhyResponse, router};
use crate::metrics::Telemetry;
use crate::pipeline::{self, Clock, Pipeline};
use crate::rules::{RuleSet, load_dir};

const ABOUT: &str = "Ark node exporter: turns node events (external probes speaking Ark JSON Lines, \
and built-in collectors) into a causal graph (process Consumes/WaitsOn resource, resource \
BlockedBy error), evaluates Ark rule packs on it, and serves Prometheus metrics.";

const AFTER: &str = "Examples:
  ark-exporter --web.listen-address 127.0.0.1:9487 --node-name n1 --probe ./inject.sh --rules rules/
  ark-exporter replay events.jsonl --rules rules/ --format json
  ark-exporter why 4242 --url http://127.0.0.1:9487
  ark-exporter bench graph --events 1000000 --resources 8 --pids 1024

Configuration (what the exporter does) is read from --config FILE (TOML, or YAML by extension) and
ARK_* environment variables with `__` between sections, e.g. ARK_GRAPH__MAX_NODES=50000.
See docs/exporter.md for every key, the probe protocol and the metrics.";

/// The `ark-exporter` command line.
#[derive(Debug, Parser)]
#[command(name = "ark-exporter", version = ark_web::VERSION, about = ABOUT, after_help = AFTER)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serve flags, used when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the exporter (the default): collectors + probes → graph → rules → /metrics.
    Serve(Box<ServeArgs>),
    /// Feed a recorded JSON Lines file through the pipeline and report scenes and root causes.
    Replay(ReplayArgs),
    /// Ask a running exporter why a process is stuck (GET /api/v1/why/<pid>).
    Why(WhyArgs),
    /// Benchmarks (print JSON; numbers are for a release build).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter (tracing env-filter syntax, e.g. `info`, `ark_exporter=debug`).
    #[arg(
        long = "log.level",
        env = "ARK_LOG",
        default_value = "info",
        global = true
    )]
    pub log_level: String,
    /// Log format on stderr.
    #[arg(long = "log.format", value_enum, default_value_t, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve /metrics, /healthz, /readyz and /api/v1 on (`:9487` = all interfaces).
    #[arg(
        long = "web.listen-address",
        default_value = ":9487",
        value_name = "ADDR"
    )]
    pub listen: String,
    /// Value of the `node` label on every series (default: env NODE_NAME, else the hostname).
    #[arg(long = "node-name", env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// External probe to run (repeatable): an executable printing Ark events on stdout.
    #[arg(long = "probe", value_name = "PATH")]
    pub probes: Vec<String>,
    /// Rules directory (with manifest.yaml); overrides `rules_dir` of the config.
    #[arg(long = "rules", value_name = "DIR")]
    pub rules: Option<PathBuf>,
    /// Configuration file (TOML, or YAML by extension).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// procfs mount point read by the host collectors (a fixture tree in tests).
    #[arg(long = "path.procfs", value_name = "DIR")]
    pub procfs: Option<PathBuf>,
    /// sysfs mount point read by the host collectors; the cgroup v2 tree is `<DIR>/fs/cgroup`.
    #[arg(long = "path.sysfs", value_name = "DIR")]
    pub sysfs: Option<PathBuf>,
    /// Kernel log read by the kmsg collector: `/dev/kmsg` (default) or a file (saved dmesg,
    /// journal export, kmsg dump) read from its start and followed.
    #[arg(long = "path.kmsg", value_name = "PATH")]
    pub kmsg: Option<PathBuf>,
    /// Kubeconfig for the pod watch (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long = "kubeconfig", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Enable a collector (repeatable; also `--collector.NAME`). Known: probe, ebpf, nvml (nvml is
    /// off by default), netdev, infiniband, block, pressure, process, pods, kmsg.
    #[arg(long = "collector", value_name = "NAME")]
    pub enable: Vec<String>,
    /// Disable a collector (repeatable; also `--no-collector.NAME`).
    #[arg(long = "no-collector", value_name = "NAME")]
    pub disable: Vec<String>,
    /// Server limits and --web.config.file (TLS, client certificates, basic auth).
    #[command(flatten)]
    pub web: ark_web::WebArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Output of `replay`.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum ReplayFormat {
    /// `{"scenes": [...], "root_causes": [...], "stats": {...}}`
    Json,
    /// A human summary.
    #[default]
    Text,
    /// The /metrics exposition the replayed events produce.
    Metrics,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// JSON Lines file to replay (`-` for stdin).
    pub file: PathBuf,
    /// Rules directory; without it only the graph is built.
    #[arg(long = "rules", value_name = "DIR")]
    pub rules: Option<PathBuf>,
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: ReplayFormat,
    /// Configuration file (same keys as serve).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// `node` label for `--format metrics`.
    #[arg(long = "node-name", default_value = "replay")]
    pub node_name: String,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Output of `why`.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum WhyFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct WhyArgs {
    /// Process id to explain.
    pub pid: u32,
    /// Base URL of the running exporter (`http://` or `https://`).
    #[arg(long = "url", default_value = "http://127.0.0.1:9487")]
    pub url: String,
    #[arg(long = "format", value_enum, default_value_t)]
    pub format: WhyFormat,
    /// CA certificate (PEM) that signed the exporter's certificate (https; default: the system
    /// roots).
    #[arg(long = "tls.ca-file", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) when the exporter requires one; with --tls.key-file.
    #[arg(long = "tls.cert-file", value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --tls.cert-file.
    #[arg(long = "tls.key-file", value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// Basic-auth user; the password is read from env ARK_WHY_PASSWORD.
    #[arg(long = "user", value_name = "USER")]
    pub user: Option<String>,
}

fn init_logging(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match log.log_format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

/// Parses arguments and runs the command.
/// Accepts node_exporter-style `--collector.NAME` / `--no-collector.NAME` as spellings of
/// `--collector NAME` / `--no-collector NAME`, which SREs type from habit.
pub fn collector_flag_aliases<I: IntoIterator<Item = std::ffi::OsString>>(
    args: I,
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    for a in args {
        let s = a.to_string_lossy();
        let split = ["--collector.", "--no-collector."]
            .into_iter()
            .find_map(|p| {
                s.strip_prefix(p)
                    .map(|name| (p.trim_end_matches('.'), name))
            });
        match split {
            Some((flag, name)) if !name.is_empty() => {
                out.push(flag.into());
                out.push(name.into());
            }
            _ => out.push(a),
        }
    }
    out
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(collector_flag_aliases(std::env::args_os()));
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(a)) => serve(*a),
        Some(Command::Replay(a)) => replay(a),
        Some(Command::Why(a)) => why(a),
        Some(Command::Bench(b)) => crate::bench::run(b),
    }
}

/// `--node-name`, else NODE_NAME (clap), else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    if let Some(n) = flag.filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `:9487` → `0.0.0.0:9487`.
pub fn parse_listen(addr: &str) -> anyhow::Result<SocketAddr> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_owned()
    };
    full.parse()
        .with_context(|| format!("invalid --web.listen-address {addr:?} (want HOST:PORT or :PORT)"))
}

fn load_rules(dir: &Path, strict: bool) -> anyhow::Result<RuleSet> {
    let set =
        load_dir(dir, strict).with_context(|| format!("loading rules from {}", dir.display()))?;
    for (file, why) in &set.skipped {
        tracing::warn!(file = %file.display(), reason = %why, "Rule file skipped");
    }
    tracing::info!(rules = set.rules.len(), skipped = set.skipped.len(), dir = %dir.display(), "Rules loaded");
    Ok(set)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let mut cfg = Config::load(args.config.as_deref())?;
    for d in cfg.deprecations() {
        tracing::warn!("{d}");
    }
    cfg.probes
        .extend(args.probes.iter().cloned().map(ProbeSpec::Path));
    if args.rules.is_some() {
        cfg.rules_dir.clone_from(&args.rules);
    }
    let kinds = collectors::enabled(&cfg, &args.enable, &args.disable)?;
    let addr = parse_listen(&args.listen)?;
    let limits = args.web.limits()?;
    let web = args.web.web_config()?;
    let node = node_name(args.node_name.as_deref());
    apply_host_flags(&mut cfg, &args, &node);
    let pods = crate::pods::PodResolver::new(&cfg.host.sysfs);
    let telemetry = Telemetry::new(&node)?;
    ark_web::process_and_build_info(
        &telemetry.registry,
        "ark_build_info",
        env!("CARGO_PKG_VERSION"),
    )?;
    let rules = match &cfg.rules_dir {
        Some(d) => Some(load_rules(d, cfg.rules.strict)?),
        None => None,
    };
    let p = Pipeline::new(
        cfg.pipeline(),
        Clock::Wall,
        rules.as_ref().map(|r| &r.rules[..]),
        telemetry.dropped.clone(),
    );
    let running = pipeline::spawn(p, telemetry.clone()).context("starting the pipeline thread")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let gpus = crate::gpu_map::GpuMap::default();
        for kind in &kinds {
            let c = kind.build(&cfg)?;
            let ctx = CollectorContext::new(*kind, &running.sender, &telemetry, stop_rx.clone())
                .with_pods(pods.clone())
                .with_gpus(gpus.clone());
            tokio::spawn(c.run(ctx));
            tracing::info!(collector = kind.name(), "Collector started");
        }
        let ready = Arc::new(AtomicBool::new(true));
        let app = router(AppState {
            telemetry: telemetry.clone(),
            pipeline: Some(running.client.clone()),
            ready: ready.clone(),
        });
        tracing::info!(%addr, node = %node, probes = cfg.probes.len(), tls = web.tls.is_some(), basic_auth = !web.users.is_empty(), "Listening");
        let served = ark_web::serve(listener, app, limits, &web, &[], async move {
            shutdown_signal().await;
            ready.store(false, Ordering::Relaxed);
        })
        .await
        .context("serving HTTP");
        let _ = stop_tx.send(true);
        served
    });
    running.client.shutdown();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// `--path.procfs`, `--path.sysfs`, `--kubeconfig` and the node name into `[host]`.
fn apply_host_flags(cfg: &mut Config, args: &ServeArgs, node: &str) {
    if let Some(p) = &args.procfs {
        cfg.host.procfs.clone_from(p);
    }
    if let Some(p) = &args.sysfs {
        cfg.host.sysfs.clone_from(p);
    }
    if let Some(p) = &args.kmsg {
        cfg.kmsg.path.clone_from(p);
    }
    if args.kubeconfig.is_some() {
        cfg.host.kubeconfig.clone_from(&args.kubeconfig);
    }
    if cfg.host.node_name.is_none() {
        cfg.host.node_name = Some(node.to_owned());
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("Shutting down");
}

/// Replays a file through a pipeline (event-time clock) and returns it for reporting.
pub fn replay_file(
    file: &Path,
    cfg: &Config,
    rules: Option<&RuleSet>,
    telemetry: &Telemetry,
) -> anyhow::Result<Pipeline> {
    let mut p = Pipeline::new(
        cfg.pipeline(),
        Clock::EventTime,
        rules.map(|r| &r.rules[..]),
        telemetry.dropped.clone(),
    );
    let input: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?)
    };
    let mut reader = LineReader::new(
        std::io::BufReader::with_capacity(256 * 1024, input),
        MAX_LINE_BYTES,
    );
    while let Some(line) = reader
        .next_line()
        .with_context(|| format!("reading {}", file.display()))?
    {
        match line {
            Line::Data(l) if l.iter().all(u8::is_ascii_whitespace) => {}
            Line::Data(l) => p.handle_line(l, "replay"),
            Line::Oversized => {
                p.handle_parse_error(&crate::event::ParseError::Oversized, "replay");
            }
        }
    }
    Ok(p)
}

fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let cfg = Config::load(args.config.as_deref())?;
    let rules_dir = args.rules.clone().or_else(|| cfg.rules_dir.clone());
    let rules = match &rules_dir {
        Some(d) => Some(load_rules(d, cfg.rules.strict)?),
        None => None,
    };
    let telemetry = Telemetry::new(&args.node_name)?;
    let mut p = replay_file(&args.file, &cfg, rules.as_ref(), &telemetry)?;
    let report = p.report();
    let mut out = std::io::stdout().lock();
    match args.format {
        ReplayFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        ReplayFormat::Metrics => {
            p.publish(&telemetry);
            out.write_all(telemetry.encode().as_bytes())?;
        }
        ReplayFormat::Text => {
            let s = &report.stats;
            writeln!(
                out,
                "{} lines, {} events applied, dropped: {:?}",
                s.lines, s.accepted, s.dropped
            )?;
            writeln!(out, "Scenes ({}):", report.scenes.len())?;
            for sc in &report.scenes {
                writeln!(
                    out,
                    "  [{}] {} ({}) entities: {}",
                    sc.severity,
                    sc.scene,
                    sc.rule_id,
                    sc.entities.join(", ")
                )?;
                for a in &sc.actions {
                    writeln!(out, "      - {a}")?;
                }
            }
            writeln!(out, "Root causes ({}):", report.root_causes.len())?;
            for rc in &report.root_causes {
                writeln!(
                    out,
                    "  pid {} job {}: {} on {}",
                    rc.pid,
                    rc.job.as_deref().unwrap_or("-"),
                    rc.cause,
                    rc.resource
                )?;
            }
        }
    }
    Ok(())
}

/// Env variable with the basic-auth password of `why --user`.
pub const WHY_PASSWORD_ENV: &str = "ARK_WHY_PASSWORD";

/// The `why` client: http or https (rustls), optional CA, client certificate and basic auth.
fn why_client(args: &WhyArgs) -> anyhow::Result<reqwest::blocking::Client> {
    let mut b = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .use_rustls_tls();
    if let Some(ca) = &args.ca_file {
        let pem =
            std::fs::read(ca).with_context(|| format!("reading --tls.ca-file {}", ca.display()))?;
        for c in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--tls.ca-file {}: not PEM certificates", ca.display()))?
        {
            b = b.add_root_certificate(c);
        }
    }
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        let mut pem = std::fs::read(cert)
            .with_context(|| format!("reading --tls.cert-file {}", cert.display()))?;
        pem.extend(
            std::fs::read(key)
                .with_context(|| format!("reading --tls.key-file {}", key.display()))?,
        );
        b = b.identity(
            reqwest::Identity::from_pem(&pem)
                .context("--tls.cert-file/--tls.key-file: not a PEM certificate and key")?,
        );
    }
    b.build().context("building the HTTP client")
}

/// `--url` as a base URL: `http(s)://HOST:PORT`; a bare `HOST:PORT` (or `:PORT`, on
/// 127.0.0.1) means plain http.
pub fn base_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim_end_matches('/');
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(url.to_owned());
    }
    if url.contains("://") {
        bail!("--url {url:?}: want http://HOST:PORT or https://HOST:PORT");
    }
    Ok(match url.strip_prefix(':') {
        Some(port) => format!("http://127.0.0.1:{port}"),
        None => format!("http://{url}"),
    })
}

fn why(args: WhyArgs) -> anyhow::Result<()> {
    let url = format!("{}/api/v1/why/{}", base_url(&args.url)?, args.pid);
    let mut req = why_client(&args)?
        .get(&url)
        .header(reqwest::header::ACCEPT, "application/json");
    if let Some(user) = &args.user {
        req = req.basic_auth(user, std::env::var(WHY_PASSWORD_ENV).ok());
    }
    let res = req.send().with_context(|| format!("asking {url}"))?;
    let status = res.status();
    let body = res
        .text()
        .with_context(|| format!("reading the answer of {url}"))?;
    let mut out = std::io::stdout().lock();
    if status == reqwest::StatusCode::NOT_FOUND {
        bail!(
            "pid {} is not in the causal graph of {}",
            args.pid,
            args.url
        );
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "{} answered 401: pass --user and set {WHY_PASSWORD_ENV}",
            args.url
        );
    }
    if !status.is_success() {
        bail!("{} answered {}: {}", args.url, status.as_u16(), body.trim());
    }
    match args.format {
        WhyFormat::Json => writeln!(out, "{}", body.trim())?,
        WhyFormat::Text => {
            let w: WhyResponse = serde_json::from_str(&body).context("decoding the answer")?;
            write!(out, "{}", render_why(&w))?;
        }
    }
    Ok(())
}

/// Human rendering of a `why` answer.
pub fn render_why(w: &WhyResponse) -> String {
    let mut s = String::new();
    if w.root_causes.is_empty() {
        s.push_str(&format!(
            "pid {}: nothing blocks it (no error reachable, no WaitsOn edge)\n",
            w.pid
        ));
        return s;
    }
    let first = &w.root_causes[0];
    s.push_str(&format!(
        "pid {} (job {}, pod {}/{}):\n",
        w.pid,
        first.job.as_deref().unwrap_or("-"),
        first.namespace.as_deref().unwrap_or("-"),
        first.pod.as_deref().unwrap_or("-"),
    ));
    for rc in &w.root_causes {
        s.push_str(&format!(
            "  root cause: {} on {}{}\n    chain: ",
            rc.cause,
            rc.resource,
            rc.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
        for (i, h) in rc.chain.iter().enumerate() {
            if i == 0 {
                s.push_str(&h.from);
            }
            s.push_str(&format!(" --{}--> {}", h.edge.as_str(), h.to));
        }
        s.push('\n');
    }
    if w.truncated {
        s.push_str("  (answer truncated to its bounds: more causes or hops exist)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_exporter_style_collector_flags() {
        let args = collector_flag_aliases(
            [
                "ark-exporter",
                "--collector.ebpf",
                "--no-collector.probe",
                "--collector.",
                "x",
            ]
            .map(std::ffi::OsString::from),
        );
        let args: Vec<_> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "ark-exporter",
                "--collector",
                "ebpf",
                "--no-collector",
                "probe",
                "--collector.",
                "x"
            ]
        );
    }

    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_defaults_to_serve() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "ark-exporter",
            "--web.listen-address",
            "127.0.0.1:1",
            "--node-name",
            "n1",
            "--probe",
            "./a.sh",
            "--probe",
            "./b.sh",
            "--rules",
            "rules/",
        ])
        .unwrap();
        assert!(c.command.is_none());
        assert_eq!(c.serve.probes, ["./a.sh", "./b.sh"]);
        assert_eq!(c.serve.listen, "127.0.0.1:1");
        let c = Cli::try_parse_from([
            "ark-exporter",
            "replay",
            "f.jsonl",
            "--rules",
            "r",
            "--format",
            "json",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Some(Command::Replay(ReplayArgs {
                format: ReplayFormat::Json,
                ..
            }))
        ));
    }

    #[test]
    fn why_urls() {
        assert_eq!(base_url("https://h:1/").unwrap(), "https://h:1");
        assert_eq!(base_url("h:1").unwrap(), "http://h:1");
        assert_eq!(base_url(":9487").unwrap(), "http://127.0.0.1:9487");
        assert!(base_url("ftp://h:1").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":9487").unwrap().to_string(), "0.0.0.0:9487");
        assert_eq!(
            parse_listen("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert!(parse_listen("nope").is_err());
    }
}
