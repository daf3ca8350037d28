//! Every kustomization under `deploy/` renders with today's kubectl (kustomize v5) without a
//! warning, and what it renders is accepted by the project's real kube-apiserver v1.20
//! (`kubectl apply --dry-run=server`); the default install observes only and the `act` overlay
//! remediates; the prometheus-operator overlay renders and its generated
//! PrometheusRule is up to date with `alerts/` and passes `promtool check rules`; the plain
//! Prometheus scrape snippet passes `promtool check config`.
//!
//! Regenerate the PrometheusRule with `scripts/gen-prometheusrule`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use ark_harness::{KubeCluster, repo_root};
use serde::Deserialize;
use serde_yaml::Value;

const GENERATED: &str = "deploy/prometheus-operator/prometheusrule.yaml";

fn rule_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("alerts"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The PrometheusRule text for the current `alerts/*.rules.yml`.
fn generate_prometheus_rule(root: &Path) -> Result<String> {
    let mut groups = Vec::new();
    for f in rule_files(root)? {
        let v: Value = serde_yaml::from_str(&std::fs::read_to_string(&f)?)
            .with_context(|| format!("parsing {}", f.display()))?;
        let Some(gs) = v.get("groups").and_then(Value::as_sequence) else {
            bail!("{} has no `groups`", f.display());
        };
        groups.extend(gs.iter().cloned());
    }
    let doc = serde_yaml::to_value(serde_json::json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ark",
            "namespace": "ark-system",
            "labels": {"app.kubernetes.io/name": "ark", "app.kubernetes.io/part-of": "ark"},
        },
        "spec": {"groups": Value::Null},
    }))?;
    let mut doc = doc;
    doc["spec"]["groups"] = Value::Sequence(groups);
    Ok(format!(
        "# GENERATED from alerts/*.rules.yml by scripts/gen-prometheusrule. Do not edit by hand:\n\
         # a test fails when this file and alerts/ disagree.\n{}",
        serde_yaml::to_string(&doc)?
    ))
}

fn run(cmd: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", cmd.display()))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed ({}):\n{}{}",
            cmd.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kubectl that matches the tests' 1.20 apiserver (from `scripts/build-kube`).
fn kubectl() -> Result<PathBuf> {
    Ok(ark_harness::kube_bin_dir()?.join("kubectl"))
}

/// `kubectl apply --dry-run=server -f -` of `objects` with the 1.20 kubectl against the cluster
/// of `kubeconfig` (in `namespace` when given): kubectl's output, or its failure.
fn dry_run_apply(kubeconfig: &Path, namespace: Option<&str>, objects: &str) -> Result<String> {
    let kc = format!("--kubeconfig={}", kubeconfig.display());
    let mut args = vec![kc.as_str()];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    args.extend(["apply", "--dry-run=server", "-f", "-"]);
    run(&kubectl()?, &args, Some(objects))
}

/// Today's kubectl, whose kustomize (v5) is what users render with: `ARK_KUBECTL`, else
/// `/usr/bin/kubectl` (preinstalled on the machine image, shared/REAL-SERVICES.md).
fn current_kubectl() -> Result<PathBuf> {
    let path = std::env::var_os("ARK_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/kubectl"));
    let version = run(&path, &["version", "--client", "-o", "json"], None).with_context(|| {
        format!(
            "a current kubectl (>= 1.27, kustomize v5) is needed at {} (or set ARK_KUBECTL)",
            path.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&version)?;
    let kustomize = v["kustomizeVersion"].as_str().unwrap_or_default();
    if !kustomize.starts_with("v5") {
        bail!(
            "{} has kustomize {kustomize:?}; rendering needs v5",
            path.display()
        );
    }
    Ok(path)
}

/// `kubectl kustomize <dir>` with today's kubectl; a warning on stderr (e.g. a deprecated
/// field) is a failure.
fn render(dir: &str) -> Result<String> {
    let out = Command::new(current_kubectl()?)
        .args(["kustomize", dir])
        .current_dir(repo_root())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!("kubectl kustomize {dir} ({}):\n{stderr}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Every object of a rendered multi-document YAML.
fn objects(rendered: &str) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            all.push(v);
        }
    }
    Ok(all)
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

/// The healer container's `env` of a rendered Deployment: `(name, value)`.
fn healer_env(objs: &[Value]) -> Result<Vec<(String, String)>> {
    let d = find(objs, "Deployment", "ark-healer")?;
    let c = d["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "ark-healer"))
        .context("no ark-healer container")?;
    Ok(c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

#[test]
fn prometheus_rule_is_generated_from_alerts_and_valid() -> Result<()> {
    let root = repo_root();
    let want = generate_prometheus_rule(&root)?;
    if std::env::var("ARK_UPDATE_GENERATED").is_ok_and(|v| v == "1") {
        std::fs::write(root.join(GENERATED), &want)?;
    }
    let have = std::fs::read_to_string(root.join(GENERATED)).unwrap_or_default();
    assert!(
        have == want,
        "{GENERATED} is out of date with alerts/*.rules.yml: run scripts/gen-prometheusrule"
    );
    // The rules inside it are what promtool accepts.
    let doc: Value = serde_yaml::from_str(&have)?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("embedded.rules.yml");
    let mut groups = serde_yaml::Mapping::new();
    groups.insert("groups".into(), doc["spec"]["groups"].clone());
    std::fs::write(&rules, serde_yaml::to_string(&groups)?)?;
    let out = run(
        Path::new("promtool"),
        &["check", "rules", rules.to_str().unwrap_or_default()],
        None,
    )?;
    assert!(out.contains("SUCCESS"), "{out}");
    let n = doc["spec"]["groups"].as_sequence().map_or(0, Vec::len);
    assert!(
        n >= rule_files(&root)?.len(),
        "every rule file contributes its groups"
    );
    Ok(())
}

#[test]
fn a_stale_prometheus_rule_is_detected() -> Result<()> {
    // The comparison above must be able to fail: a changed alert changes the generated text.
    let root = repo_root();
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir(tmp.path().join("alerts"))?;
    for f in rule_files(&root)? {
        std::fs::copy(
            &f,
            tmp.path()
                .join("alerts")
                .join(f.file_name().unwrap_or_default()),
        )?;
    }
    let before = generate_prometheus_rule(tmp.path())?;
    let first = rule_files(tmp.path())?.remove(0);
    let text = std::fs::read_to_string(&first)?;
    std::fs::write(
        &first,
        text.replacen("severity: critical", "severity: warning", 1),
    )?;
    assert_ne!(before, generate_prometheus_rule(tmp.path())?);
    Ok(())
}

#[test]
fn prometheus_scrape_snippet_is_a_valid_config() -> Result<()> {
    let root = repo_root();
    let snippet: Value = serde_yaml::from_str(&std::fs::read_to_string(
        root.join("deploy/prometheus/scrape.yml"),
    )?)?;
    let dir = tempfile::tempdir()?;
    let mut cfg = serde_yaml::Mapping::new();
    let files: Vec<Value> = rule_files(&root)?
        .iter()
        .map(|p| Value::from(p.display().to_string()))
        .collect();
    cfg.insert("rule_files".into(), Value::Sequence(files));
    // Debian's Prometheus is built without Kubernetes service discovery, so promtool here does
    // not know `kubernetes_sd_configs`: validate everything else (relabelling included) with a
    // static target in its place.
    let mut scrape = snippet["scrape_configs"].clone();
    for job in scrape
        .as_sequence_mut()
        .map(|s| s.iter_mut())
        .into_iter()
        .flatten()
    {
        let Some(m) = job.as_mapping_mut() else {
            continue;
        };
        assert!(
            m.remove("kubernetes_sd_configs").is_some(),
            "jobs discover pods"
        );
        let targets: Value = serde_yaml::from_str("[{targets: ['127.0.0.1:9487']}]")?;
        m.insert("static_configs".into(), targets);
    }
    cfg.insert("scrape_configs".into(), scrape);
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, serde_yaml::to_string(&cfg)?)?;
    let out = run(
        Path::new("promtool"),
        &["check", "config", path.to_str().unwrap_or_default()],
        None,
    )?;
    assert!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[test]
fn overlay_renders_with_servicemonitors_and_rules() -> Result<()> {
    if ark_harness::skip_without_services("overlay_renders_with_servicemonitors_and_rules") {
        return Ok(());
    }
    let out = render("deploy/prometheus-operator")?;
    for kind in [
        "kind: PrometheusRule",
        "kind: ServiceMonitor",
        "kind: DaemonSet",
        "kind: Deployment",
    ] {
        assert!(out.contains(kind), "overlay lacks {kind}");
    }
    Ok(())
}

#[tokio::test]
async fn base_is_accepted_by_a_real_apiserver() -> Result<()> {
    if ark_harness::skip_without_services("base_is_accepted_by_a_real_apiserver") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    let rendered = render("deploy/base")?;
    let kinds: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("kind: "))
        .collect();
    for kind in [
        "Namespace",
        "DaemonSet",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "Service",
    ] {
        assert!(
            kinds.contains(&format!("kind: {kind}").as_str()),
            "base lacks a {kind}: {kinds:?}"
        );
    }
    // Server-side dry run needs the namespace to exist; everything else is only validated.
    kube.kubectl(&["create", "namespace", "ark-system"])?;
    let kubeconfig = kube.kubeconfig("admin");
    let out = dry_run_apply(&kubeconfig, None, &rendered)?;
    assert!(
        out.contains("daemonset.apps/ark-exporter created (server dry run)"),
        "{out}"
    );
    assert!(
        out.contains("deployment.apps/ark-healer created (server dry run)"),
        "{out}"
    );
    // The server really validated it: a broken copy is refused.
    let broken = rendered.replacen("hostPID: true", "hostPID: maybe", 1);
    let err = dry_run_apply(&kubeconfig, None, &broken)
        .expect_err("a non-boolean hostPID must be refused");
    assert!(err.to_string().to_lowercase().contains("hostpid"), "{err}");
    Ok(())
}

/// Deliver 17 §2–3: the default install observes only, the `act` overlay remediates, both carry
/// the recommended labels, the namespace allows the exporter (Pod Security `privileged`), the
/// exporter runs on GPU nodes — and the 1.20 apiserver accepts the act overlay too.
#[tokio::test]
async fn the_default_install_observes_only_and_the_act_overlay_remediates() -> Result<()> {
    if ark_harness::skip_without_services(
        "the_default_install_observes_only_and_the_act_overlay_remediates",
    ) {
        return Ok(());
    }
    let base = objects(&render("deploy/base")?)?;
    let act_text = render("deploy/overlays/act")?;
    let act = objects(&act_text)?;
    for (what, objs) in [("base", &base), ("act", &act)] {
        for o in objs.iter() {
            let labels = &o["metadata"]["labels"];
            for key in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/part-of",
                "app.kubernetes.io/managed-by",
            ] {
                if labels[key].as_str().is_none_or(str::is_empty) {
                    bail!(
                        "{what}: {} {} lacks label {key}",
                        o["kind"].as_str().unwrap_or("?"),
                        o["metadata"]["name"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        let ns = find(objs, "Namespace", "ark-system")?;
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
            "{what}"
        );
        let ds = find(objs, "DaemonSet", "ark-exporter")?;
        assert_eq!(
            ds["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.present"], "true",
            "{what}: the exporter is not placed on GPU nodes"
        );
        assert_eq!(
            ds["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], "exporter",
            "{what}"
        );
    }
    let cm = find(&base, "ConfigMap", "ark-healer")?;
    let toml = cm["data"]["healer.toml"].as_str().context("healer.toml")?;
    assert!(
        toml.lines().any(|l| l.trim() == "dry_run = true"),
        "the default install is not observe-only:\n{toml}"
    );
    let base_env = healer_env(&base)?;
    assert!(
        !base_env.iter().any(|(k, _)| k == "ARK_DRY_RUN"),
        "{base_env:?}"
    );
    let act_env = healer_env(&act)?;
    assert!(
        act_env.contains(&("ARK_DRY_RUN".into(), "false".into())),
        "the act overlay does not turn remediation on: {act_env:?}"
    );
    assert!(
        act_env.iter().any(|(k, _)| k == "POD_NAME"),
        "the act overlay lost the base's env: {act_env:?}"
    );

    let kube = KubeCluster::start().await?;
    kube.kubectl(&["create", "namespace", "ark-system"])?;
    let kubeconfig = kube.kubeconfig("admin");
    let out = dry_run_apply(&kubeconfig, None, &act_text)?;
    assert!(
        out.contains("deployment.apps/ark-healer created (server dry run)"),
        "{out}"
    );

    // The dashboards' provisioning ConfigMap carries every dashboard file, and is valid.
    let dashboards_text = render("dashboards")?;
    let dashboards = objects(&dashboards_text)?;
    let cm = find(&dashboards, "ConfigMap", "ark-dashboards")?;
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    for f in std::fs::read_dir(repo_root().join("dashboards"))? {
        let name = f?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            let data = cm["data"][name.as_str()].as_str().unwrap_or_default();
            assert!(
                serde_json::from_str::<serde_json::Value>(data).is_ok(),
                "dashboards/{name} is not in the provisioning ConfigMap (dashboards/kustomization.yaml)"
            );
        }
    }
    kube.kubectl(&["create", "namespace", "monitoring"])?;
    let out = dry_run_apply(&kubeconfig, Some("monitoring"), &dashboards_text)?;
    assert!(
        out.contains("configmap/ark-dashboards created (server dry run)"),
        "{out}"
    );
    Ok(())
}
