//! Shared helpers of the `healer_*` integration tests: the real ark-healer binary as a service,
//! Alertmanager-shaped payloads and ticket accessors.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use ark_harness::{KubeCluster, Service, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

pub const TOKEN: &str = "healer-test-token";
pub const WAIT: Duration = Duration::from_secs(60);

/// The healer binary running as a service, with its own config, token file and audit log.
pub struct Healer {
    pub service: Service,
    pub port: u16,
    pub dir: PathBuf,
}

impl Healer {
    pub fn start(kube: &KubeCluster, dir: &Path, name: &str, toml: &str) -> Result<Self> {
        Self::start_with_kubeconfig(dir, name, toml, &kube.kubeconfig("healer"))
    }

    /// [`Healer::start`] with a kubeconfig of the caller's (e.g. one whose server is a proxy).
    pub fn start_with_kubeconfig(
        dir: &Path,
        name: &str,
        toml: &str,
        kubeconfig: &Path,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let token = dir.join("token");
        std::fs::write(&token, TOKEN)?;
        let audit = dir.join("audit.jsonl");
        let config = dir.join("healer.toml");
        std::fs::write(
            &config,
            format!(
                "{}audit_log = \"{}\"\n{toml}",
                if toml.contains("reconcile_interval_seconds") {
                    ""
                } else {
                    "reconcile_interval_seconds = 1\n"
                },
                audit.display()
            ),
        )?;
        let port = ark_harness::free_port();
        let mut cmd = Command::new(ark_harness::bin_path("ark-healer"));
        cmd.arg("serve")
            .arg("--web.listen-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--webhook-token-file")
            .arg(&token)
            .arg("--config")
            .arg(&config)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--identity")
            .arg(name)
            .env("RUST_LOG", "info,ark_healer=debug");
        let service = Service::spawn(name, &mut cmd, &dir.join(format!("{name}.log")))?;
        Ok(Healer {
            service,
            port,
            dir: dir.to_owned(),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn ready(&self) -> Result<()> {
        let url = self.url("/readyz");
        wait_for("healer /readyz", WAIT, &[&self.service], || async {
            Ok(reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ()))
        })
        .await
    }

    pub async fn is_ready(&self) -> bool {
        reqwest::get(self.url("/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    /// Is this replica the leader (`ark_healer_is_leader 1` on `/metrics`)? `/readyz` only
    /// says the process serves (every replica is ready; only the leader acts).
    pub async fn is_leader(&self) -> bool {
        self.metrics()
            .await
            .is_ok_and(|m| m.lines().any(|l| l.trim() == "ark_healer_is_leader 1"))
    }

    /// Waits until this replica leads (`ark_healer_is_leader 1` on `/metrics`).
    pub async fn wait_leader(&self) -> Result<()> {
        wait_for(
            &format!("{} leading (ark_healer_is_leader 1)", self.service.name()),
            WAIT,
            &[&self.service],
            || async { Ok(self.is_leader().await.then_some(())) },
        )
        .await
        .with_context(|| format!("healer log:\n{}", self.service.log_tail(40)))
    }

    pub async fn post(&self, body: &Value) -> Result<(u16, Value)> {
        // A bounded request: a healer that stops answering fails the test instead of hanging it
        // (one flapping-test run once hung for 875 s).
        let r = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?
            .post(self.url("/api/v1/alerts"))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await?;
        let code = r.status().as_u16();
        Ok((code, r.json().await.unwrap_or(Value::Null)))
    }

    pub async fn metrics(&self) -> Result<String> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(client
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }
}

pub fn alert(node: &str, condition: &str, firing: bool, starts: &str) -> Value {
    json!({
        "status": if firing { "firing" } else { "resolved" },
        "labels": {"alertname": condition, "node": node, "condition": condition, "severity": "critical", "gpu": "0"},
        "annotations": {"summary": format!("{condition} on {node}")},
        "startsAt": starts,
        "endsAt": if firing { "0001-01-01T00:00:00Z" } else { "2026-11-22T11:00:00Z" },
        "generatorURL": "http://prometheus/graph",
        "fingerprint": format!("{node}-{condition}"),
    })
}

pub fn payload(alerts: Vec<Value>) -> Value {
    json!({
        "version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing",
        "receiver": "ark-healer", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": alerts,
    })
}

/// The ticket annotation of a node, as YAML.
pub fn ticket(node: &Node) -> Option<serde_yaml::Value> {
    let text = node.metadata.annotations.as_ref()?.get("ark.io/ticket")?;
    Some(serde_yaml::from_str(text).expect("ticket annotation is YAML"))
}

pub fn workflow_status(t: &serde_yaml::Value, action: &str) -> Vec<String> {
    t["workflows"]
        .as_sequence()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["action"].as_str() == Some(action))
                .map(|w| w["status"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

pub fn unschedulable(n: &Node) -> bool {
    n.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

pub fn taint_keys(n: &Node) -> Vec<String> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect()
}

pub async fn setup_rbac(kube: &KubeCluster) -> Result<()> {
    kube.ensure_namespace("ark-system").await?;
    let rbac = ark_harness::repo_root().join("deploy/healer/rbac.yaml");
    kube.kubectl(&["apply", "-f", rbac.to_str().context("path")?])?;
    Ok(())
}

pub async fn wait_node<T>(
    api: &Api<Node>,
    name: &str,
    what: &str,
    healer: &Healer,
    f: impl Fn(&Node) -> Option<T>,
) -> Result<T> {
    wait_for(what, WAIT, &[&healer.service], || async {
        let n = api.get(name).await?;
        Ok(f(&n))
    })
    .await
    .with_context(|| format!("healer log:\n{}", healer.service.log_tail(40)))
}

pub async fn wait_job(kube: &kube::Client, template: &str, healer: &Healer) -> Result<String> {
    let jobs: Api<Job> = Api::namespaced(kube.clone(), "ark-system");
    let lp = ListParams::default().labels(&format!("ark.io/template={template}"));
    wait_for(
        &format!("{template} Job"),
        WAIT,
        &[&healer.service],
        || async {
            let items = jobs.list(&lp).await?.items;
            Ok(items.first().and_then(|j| j.metadata.name.clone()))
        },
    )
    .await
    .with_context(|| format!("healer log:\n{}", healer.service.log_tail(40)))
}

pub async fn count_jobs(kube: &kube::Client, template: &str) -> Result<usize> {
    let jobs: Api<Job> = Api::namespaced(kube.clone(), "ark-system");
    let lp = ListParams::default().labels(&format!("ark.io/template={template}"));
    Ok(jobs.list(&lp).await?.items.len())
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The start of every real-apiserver healer test: `None` (and a line naming `test`) when
/// services are switched off, else a fresh cluster with the healer's RBAC and an admin client.
pub async fn cluster_for(test: &str) -> Result<Option<(KubeCluster, kube::Client)>> {
    if ark_harness::skip_without_services(test) {
        return Ok(None);
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    Ok(Some((kube, admin)))
}
