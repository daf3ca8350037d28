//! Real Prometheus and Alertmanager (Debian packages) with generated configs, on free loopback
//! ports, ready only when Prometheus sees its targets up and its Alertmanager discovered.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::service::{Service, ensure_port_free, free_port, prom_duration, wait_for};

/// Path of a service binary: `$ARK_<NAME>_BIN` or the Debian package's path.
fn binary(env: &str, default: &str) -> Result<PathBuf> {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into());
    if !p.exists() {
        bail!(
            "{} not found (set {env} or install the Debian package: scripts/test installs it)",
            p.display()
        );
    }
    Ok(p)
}

/// `wanted` if it is free (a clear error if not), else any free port.
fn pick_port(wanted: Option<u16>) -> Result<u16> {
    match wanted {
        Some(p) => {
            ensure_port_free(p)?;
            Ok(p)
        }
        None => Ok(free_port()),
    }
}

/// One static scrape target, scraped as deploy/prometheus scrapes the exporter: its `labels` are
/// target labels and win over what the target exports (a clashing exported label arrives as
/// `exported_<name>`, e.g. the exporter's own `node`).
#[derive(Debug, Clone)]
pub struct Target {
    pub job: String,
    /// `127.0.0.1:port`
    pub addr: String,
    pub labels: BTreeMap<String, String>,
}

impl Target {
    pub fn new(job: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            job: job.into(),
            addr: addr.into(),
            labels: BTreeMap::new(),
        }
    }

    /// A target that runs on Kubernetes node `node`: the `node` label that deploy/ takes from
    /// the scraped pod's node (`__meta_kubernetes_pod_node_name`), never from the target itself.
    pub fn on_node(job: impl Into<String>, addr: impl Into<String>, node: &str) -> Self {
        Self::new(job, addr).label("node", node)
    }

    pub fn label(mut self, name: &str, value: &str) -> Self {
        self.labels.insert(name.to_owned(), value.to_owned());
        self
    }
}

/// What Prometheus scrapes and evaluates.
#[derive(Debug, Clone)]
pub struct PromConfig {
    pub scrape_interval: Duration,
    pub evaluation_interval: Duration,
    pub targets: Vec<Target>,
    /// Whole scrape jobs as written in a Prometheus config (e.g. deploy/prometheus/scrape.yml's
    /// with a static target in place of Kubernetes discovery), added after `targets`.
    pub jobs: Vec<serde_yaml::Value>,
    pub rule_files: Vec<PathBuf>,
    /// `127.0.0.1:port` of an Alertmanager to send alerts to.
    pub alertmanager: Option<String>,
    /// Readiness also waits for every target to be `up` (turn off for tests of a down target).
    pub wait_targets_up: bool,
    /// Use this port instead of a free one (fails clearly when taken).
    pub port: Option<u16>,
}

impl Default for PromConfig {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_secs(1),
            evaluation_interval: Duration::from_secs(1),
            targets: Vec::new(),
            rule_files: Vec::new(),
            alertmanager: None,
            wait_targets_up: true,
            port: None,
            jobs: Vec::new(),
        }
    }
}

/// `scrape_configs:` of `cfg`: one job per target (Prometheus' defaults: target labels win),
/// then `cfg.jobs`.
fn scrape_configs(cfg: &PromConfig) -> serde_yaml::Value {
    use serde_yaml::Value;
    let mut jobs: Vec<Value> = cfg
        .targets
        .iter()
        .map(|t| {
            let mut sc = serde_yaml::Mapping::new();
            sc.insert(
                "targets".into(),
                Value::Sequence(vec![t.addr.clone().into()]),
            );
            if !t.labels.is_empty() {
                let labels = t
                    .labels
                    .iter()
                    .map(|(k, v)| (Value::from(k.clone()), Value::from(v.clone())))
                    .collect();
                sc.insert("labels".into(), Value::Mapping(labels));
            }
            let mut job = serde_yaml::Mapping::new();
            job.insert("job_name".into(), t.job.clone().into());
            job.insert("static_configs".into(), Value::Sequence(vec![sc.into()]));
            Value::Mapping(job)
        })
        .collect();
    jobs.extend(cfg.jobs.iter().cloned());
    let mut top = serde_yaml::Mapping::new();
    top.insert("scrape_configs".into(), Value::Sequence(jobs));
    Value::Mapping(top)
}

/// How many static targets `cfg` has, `jobs` included.
fn target_count(cfg: &PromConfig) -> usize {
    let in_jobs: usize = cfg
        .jobs
        .iter()
        .filter_map(|j| j["static_configs"].as_sequence())
        .flatten()
        .filter_map(|sc| sc["targets"].as_sequence())
        .map(Vec::len)
        .sum();
    cfg.targets.len() + in_jobs
}

/// A running Prometheus. Stopped on drop.
#[derive(Debug)]
pub struct Prometheus {
    pub port: u16,
    pub service: Service,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Prometheus {
    pub async fn start(cfg: PromConfig) -> Result<Self> {
        let bin = binary("ARK_PROMETHEUS_BIN", "/usr/bin/prometheus")?;
        let dir = tempfile::Builder::new()
            .prefix("ark-prometheus-")
            .tempdir()?;
        let port = pick_port(cfg.port)?;
        let interval = prom_duration(cfg.scrape_interval);
        let mut yaml = format!(
            "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {}\n",
            prom_duration(cfg.evaluation_interval)
        );
        if !cfg.rule_files.is_empty() {
            yaml.push_str("rule_files:\n");
            for f in &cfg.rule_files {
                let abs = std::fs::canonicalize(f)
                    .with_context(|| format!("rule file {}", f.display()))?;
                yaml.push_str(&format!("  - {:?}\n", abs.display().to_string()));
            }
        }
        if let Some(am) = &cfg.alertmanager {
            yaml.push_str(&format!(
                "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [{am:?}]\n"
            ));
        }
        yaml.push_str(&serde_yaml::to_string(&scrape_configs(&cfg))?);
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, yaml)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.external-url=http://127.0.0.1:{port}/"))
            .arg("--web.enable-lifecycle")
            .arg("--log.level=warn");
        let service = Service::spawn("prometheus", &mut cmd, &dir.path().join("prometheus.log"))?;
        let prom = Self {
            port,
            service,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            _dir: dir,
        };
        prom.wait_ready(&cfg).await?;
        Ok(prom)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url()))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .with_context(|| format!("GET {path}: not JSON"))?;
        if !status.is_success() || body["status"] != "success" {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body["data"].clone())
    }

    async fn wait_ready(&self, cfg: &PromConfig) -> Result<()> {
        let expect_targets = target_count(cfg);
        let wait_up = cfg.wait_targets_up;
        let want_am = cfg.alertmanager.is_some();
        // Static targets and the Alertmanager list appear on the discovery manager's first
        // 5 s tick, so "ready" alone is not enough (shared/REAL-SERVICES.md).
        wait_for(
            "Prometheus targets and alertmanagers",
            Duration::from_secs(30),
            &[&self.service],
            || async {
                let targets = self.get_json("/api/v1/targets").await?;
                let active = targets["activeTargets"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if active.len() < expect_targets {
                    return Ok(None);
                }
                if wait_up && !active.iter().all(|t| t["health"] == "up") {
                    return Ok(None);
                }
                if want_am {
                    let ams = self.get_json("/api/v1/alertmanagers").await?;
                    if ams["activeAlertmanagers"]
                        .as_array()
                        .is_none_or(|a| a.is_empty())
                    {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await
    }

    /// Instant query; returns `data.result`.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>> {
        self.api_result("query", &[("query", promql.to_owned())])
            .await
    }

    /// Range query from `start` to `end` (Unix seconds) at `step`; returns `data.result` (a
    /// matrix: one entry per series, with `values` as `[time, "value"]` pairs).
    pub async fn query_range(
        &self,
        promql: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Value>> {
        let params = [
            ("query", promql.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", format!("{}", step.as_secs_f64())),
        ];
        self.api_result("query_range", &params).await
    }

    /// `GET /api/v1/<endpoint>?<params>`; `data.result`, or an error with Prometheus' answer.
    async fn api_result(&self, endpoint: &str, params: &[(&str, String)]) -> Result<Vec<Value>> {
        let resp = self
            .http
            .get(format!("{}/api/v1/{endpoint}", self.url()))
            .query(params)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        if !status.is_success() || body["status"] != "success" {
            bail!("{endpoint} {params:?}: {status}: {body}");
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `GET /api/v1/status/buildinfo` data.
    pub async fn build_info(&self) -> Result<Value> {
        self.get_json("/api/v1/status/buildinfo").await
    }

    /// Alerts as Prometheus sees them (`GET /api/v1/alerts`).
    pub async fn alerts(&self) -> Result<Vec<Value>> {
        Ok(self.get_json("/api/v1/alerts").await?["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// Where and how Alertmanager delivers.
#[derive(Debug, Clone)]
pub struct AmConfig {
    pub webhook_url: String,
    pub bearer_token: Option<String>,
    pub group_by: Vec<String>,
    pub group_wait: Duration,
    pub group_interval: Duration,
    pub repeat_interval: Duration,
    pub port: Option<u16>,
    /// `inhibit_rules` of the configuration, as YAML (a sequence); see
    /// [`shipped_inhibit_rules`] for the ones `deploy/alertmanager/alertmanager.yml` ships.
    pub inhibit_rules: Option<String>,
}

/// The `inhibit_rules` of the shipped `deploy/alertmanager/alertmanager.yml`, as YAML, so that
/// tests run Alertmanager with exactly the inhibitions users deploy.
pub fn shipped_inhibit_rules() -> Result<String> {
    let path = crate::repo_root().join("deploy/alertmanager/alertmanager.yml");
    let text = std::fs::read_to_string(&path)?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
    let Some(rules) = doc.get("inhibit_rules") else {
        bail!("{} has no inhibit_rules", path.display());
    };
    Ok(serde_yaml::to_string(rules)?)
}

impl AmConfig {
    pub fn webhook(url: impl Into<String>) -> Self {
        Self {
            webhook_url: url.into(),
            bearer_token: None,
            group_by: vec!["node".into()],
            group_wait: Duration::ZERO,
            group_interval: Duration::from_secs(1),
            repeat_interval: Duration::from_secs(3600),
            port: None,
            inhibit_rules: None,
        }
    }
}

/// A running Alertmanager (gossip off). Stopped on drop.
#[derive(Debug)]
pub struct Alertmanager {
    pub port: u16,
    pub service: Service,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Alertmanager {
    pub async fn start(cfg: AmConfig) -> Result<Self> {
        let auth = match &cfg.bearer_token {
            Some(t) => format!(
                "        http_config:\n          authorization:\n            type: Bearer\n            credentials: {t:?}\n"
            ),
            None => String::new(),
        };
        let yaml = format!(
            "route:\n  receiver: hook\n  group_by: {group_by:?}\n  group_wait: {gw}\n  group_interval: {gi}\n  repeat_interval: {ri}\n\
             receivers:\n  - name: hook\n    webhook_configs:\n      - url: {url:?}\n        send_resolved: true\n{auth}",
            group_by = cfg.group_by,
            gw = prom_duration(cfg.group_wait),
            gi = prom_duration(cfg.group_interval),
            ri = prom_duration(cfg.repeat_interval),
            url = cfg.webhook_url,
        );
        let yaml = match &cfg.inhibit_rules {
            // JSON is YAML: one line, whatever the indentation of the source.
            Some(rules) => {
                let v: serde_yaml::Value = serde_yaml::from_str(rules)?;
                format!("{yaml}inhibit_rules: {}\n", serde_json::to_string(&v)?)
            }
            None => yaml,
        };
        Self::start_config(&yaml, cfg.port).await
    }

    /// Starts Alertmanager on a whole configuration file's text (e.g. the shipped
    /// `deploy/alertmanager/alertmanager.yml` with its receiver pointed at a test sink).
    pub async fn start_config(yaml: &str, port: Option<u16>) -> Result<Self> {
        let bin = binary("ARK_ALERTMANAGER_BIN", "/usr/bin/prometheus-alertmanager")?;
        let dir = tempfile::Builder::new()
            .prefix("ark-alertmanager-")
            .tempdir()?;
        let port = pick_port(port)?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, yaml)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--web.external-url=http://127.0.0.1:{port}/"))
            // Empty disables gossip; with it on, the first notification waits ~10 s.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn");
        let service = Service::spawn(
            "alertmanager",
            &mut cmd,
            &dir.path().join("alertmanager.log"),
        )?;
        let am = Self {
            port,
            service,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            _dir: dir,
        };
        let url = format!("{}/-/ready", am.url());
        wait_for(
            "Alertmanager /-/ready",
            Duration::from_secs(30),
            &[&am.service],
            || async {
                Ok(am
                    .http
                    .get(&url)
                    .send()
                    .await?
                    .status()
                    .is_success()
                    .then_some(()))
            },
        )
        .await?;
        Ok(am)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Injects alerts (`POST /api/v2/alerts`), as Prometheus would.
    pub async fn post_alerts(&self, alerts: &Value) -> Result<()> {
        let resp = self
            .http
            .post(format!("{}/api/v2/alerts", self.url()))
            .json(alerts)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "POST /api/v2/alerts: {}: {}",
                resp.status(),
                resp.text().await?
            );
        }
        Ok(())
    }

    /// `GET /api/v2/status`.
    pub async fn status(&self) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}/api/v2/status", self.url()))
            .send()
            .await?;
        Ok(resp.error_for_status()?.json().await?)
    }

    /// `GET /api/v2/alerts`: every alert Alertmanager holds, inhibited and silenced included
    /// (`status.state` is `active`, `suppressed` or `unprocessed`; `status.inhibitedBy` lists
    /// the fingerprints of the alerts that inhibit it: [`is_inhibited`]).
    pub async fn alerts(&self) -> Result<Vec<Value>> {
        let resp = self
            .http
            .get(format!("{}/api/v2/alerts", self.url()))
            .send()
            .await?;
        Ok(resp.error_for_status()?.json().await?)
    }
}

/// Whether an alert of [`Alertmanager::alerts`] is held back by an inhibit rule.
pub fn is_inhibited(alert: &Value) -> bool {
    alert["status"]["inhibitedBy"]
        .as_array()
        .is_some_and(|v| !v.is_empty())
}
