//! Checks of the Prometheus rules (`alerts/`), the Alertmanager route to the healer
//! (`deploy/alertmanager/`) and the Grafana dashboards (`dashboards/`).
//!
//! The PromQL and Alertmanager checks run the real `promtool` and `amtool` (Debian packages
//! `prometheus` and `prometheus-alertmanager`, see shared/REAL-SERVICES.md); nothing here
//! re-implements them. The rest parses the files: rule coverage by `promtool test rules`, the
//! healer label contract, the dashboards' structure and every metric name against the contract
//! in `alerts/metric-names.txt`. Each checker is a function that returns the problems it found,
//! and has a test feeding it a broken input, so a checker that silently passes everything fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Conditions of DESIGN.md's catalog that an alert must exist for. `NodeCordoned` is left out on
/// purpose: a cordon is the healer's own state (or an operator's), and an alert on every cordoned
/// node would have the healer "verify and uncordon" manual cordons.
const CATALOG_WITH_ALERTS: &[&str] = &[
    "NodeNotReady",
    "GpuFellOffBus",
    "GpuXidFatal",
    "GpuEccDoubleBit",
    "GpuRowRemapFailure",
    "GpuHung",
    "GpuNvlinkDown",
    "IbPortDown",
    "IbLinkFlapping",
    "PcieLinkDegraded",
    "NetworkRetransmitStorm",
    "DiskIoSlow",
    "WorkloadStalled",
    "GpuThermalThrottle",
    "GpuHighTemperature",
    "GpuXidApplication",
    // issue 16: the kernel-log conditions of alerts/kernel.rules.yml
    "NvswitchSxidFatal",
    "PcieAerUncorrected",
    "GpuResetRequired",
    "GpuRebootRequired",
    "GpuDrainAndReset",
    "KernelHungTasks",
    // issue 18: cross-node causality (alerts/job.rules.yml)
    "JobBlockedByNode",
    "JobStragglerNode",
];

/// Alerts for people, not for the healer: Ark watching itself (`alerts/ark.rules.yml`,
/// `alerts/identity.rules.yml`). They carry no `condition` label, so Alertmanager never routes
/// them to the healer (alerts/README.md, "Identity"), and `component: ark`; the cluster-wide
/// ones (the healer's own health) have no `node`.
const PEOPLE_ALERTS: &[&str] = &[
    "ArkNodeIdentityMismatch",
    "ArkExporterDown",
    "ArkExporterAbsent",
    "ArkCollectorDown",
    "ArkHealerDown",
    "ArkHealerNoLeader",
    "ArkHealerWebhookErrors",
    "ArkSopEscalated",
    "ArkNodeBlocked",
    "ArkTicketStuck",
    "ArkHealerPaused",
    // issue 16: NVML cannot answer (software-side failure), which is not broken hardware: the
    // healer must not act, people look (alerts/gpu.rules.yml, docs/runbooks/NodeUnobservable.md).
    "NodeUnobservable",
];

/// People alerts about the whole installation rather than one node.
const CLUSTER_WIDE_ALERTS: &[&str] = &[
    "ArkHealerDown",
    "ArkHealerNoLeader",
    "ArkHealerWebhookErrors",
    "ArkHealerPaused",
];

/// The Alertmanager receiver of everything that is not a healer condition.
const DEFAULT_RECEIVER: &str = "default";

const SEVERITIES: &[&str] = &["critical", "warning", "info"];

/// Where the webhook of the healer is, and the receiver that Ark alerts must resolve to.
const HEALER_URL: &str = "http://ark-healer.ark-system.svc:9488/api/v1/alerts";
const HEALER_RECEIVER: &str = "ark-healer";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Files directly in `dir` whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
    out.sort();
    ensure!(!out.is_empty(), "no *{suffix} file in {}", dir.display());
    Ok(out)
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_yaml(path: &Path) -> Result<Yaml> {
    serde_yaml::from_str(&read(path)?).with_context(|| format!("parsing {}", path.display()))
}

/// A scratch file under Cargo's per-target temporary directory.
fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("alerts-{}-{name}", std::process::id()))
}

struct Ran {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn text(&self) -> String {
        format!(
            "exit code {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a tool from the repository root. A missing tool is an error, not a skip: these checks
/// gate every change (shared/STYLE.md item 14).
fn run(program: &str, args: &[String]) -> Result<Ran> {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .with_context(|| {
            format!(
                "running {program}: install it with `apt-get install -y --no-install-recommends \
                 prometheus prometheus-alertmanager`"
            )
        })?;
    Ok(Ran {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn rule_files() -> Result<Vec<PathBuf>> {
    files(&root().join("alerts"), ".rules.yml")
}

fn test_files() -> Result<Vec<PathBuf>> {
    files(&root().join("alerts/tests"), ".test.yml")
}

fn str_map(value: Option<&Yaml>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Yaml::Mapping(map)) = value {
        for (k, v) in map {
            let v = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                Yaml::Bool(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            out.insert(k.as_str().unwrap_or_default().to_string(), v);
        }
    }
    out
}

fn get_str<'a>(value: &'a Yaml, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Yaml::as_str)
}

#[derive(Debug, Default)]
struct Rules {
    alerts: Vec<AlertRule>,
    /// Names of the recording rules.
    records: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct AlertRule {
    file: String,
    name: String,
    expr: String,
    for_: Option<String>,
    keep_firing_for: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn parse_rules(file: &str, doc: &Yaml) -> Result<Rules> {
    let mut rules = Rules::default();
    let groups = doc
        .get("groups")
        .and_then(Yaml::as_sequence)
        .with_context(|| format!("{file}: no `groups` list"))?;
    for group in groups {
        for rule in group
            .get("rules")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            let expr = get_str(rule, "expr").unwrap_or_default().to_string();
            if let Some(name) = get_str(rule, "record") {
                rules.records.insert(name.to_string());
            } else if let Some(name) = get_str(rule, "alert") {
                rules.alerts.push(AlertRule {
                    file: file.to_string(),
                    name: name.to_string(),
                    expr,
                    for_: get_str(rule, "for").map(str::to_string),
                    keep_firing_for: get_str(rule, "keep_firing_for").map(str::to_string),
                    labels: str_map(rule.get("labels")),
                    annotations: str_map(rule.get("annotations")),
                });
            } else {
                bail!("{file}: a rule with neither `alert` nor `record`: {rule:?}");
            }
        }
    }
    Ok(rules)
}

fn load_rules(paths: &[PathBuf]) -> Result<Rules> {
    let mut all = Rules::default();
    for path in paths {
        let rules = parse_rules(&rel(path), &read_yaml(path)?)?;
        all.alerts.extend(rules.alerts);
        all.records.extend(rules.records);
    }
    Ok(all)
}

// ------------------------------------------------------------------------------------------------
// promtool: check rules, test rules

#[test]
fn promtool_check_rules_is_clean() -> Result<()> {
    let paths = rule_files()?;
    let mut args = vec!["check".to_string(), "rules".to_string()];
    args.extend(paths.iter().map(|p| rel(p)));
    let ran = run("promtool", &args)?;
    ensure!(ran.ok, "promtool check rules failed:\n{}", ran.text());
    for path in &paths {
        ensure!(
            ran.stdout
                .contains(&format!("Checking {}\n  SUCCESS", rel(path))),
            "promtool did not report SUCCESS for {}:\n{}",
            rel(path),
            ran.text()
        );
    }
    // Lint warnings (duplicate rules, ...) go to stderr with exit code 0 in 2.42: none allowed.
    ensure!(
        ran.stderr.trim().is_empty(),
        "promtool check rules warned:\n{}",
        ran.text()
    );
    Ok(())
}

#[test]
fn promtool_unit_tests_pass() -> Result<()> {
    let paths = test_files()?;
    let mut args = vec!["test".to_string(), "rules".to_string()];
    args.extend(paths.iter().map(|p| rel(p)));
    let ran = run("promtool", &args)?;
    ensure!(ran.ok, "promtool test rules failed:\n{}", ran.text());
    let successes = ran.stdout.matches("  SUCCESS").count();
    ensure!(
        successes == paths.len(),
        "expected {} SUCCESS lines (one per test file), got {successes}:\n{}",
        paths.len(),
        ran.text()
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// rule coverage: every alerting rule fires in a test and stays quiet in another

#[derive(Debug, Default)]
struct Coverage {
    /// alertname -> number of cases that expect it to fire.
    firing: BTreeMap<String, usize>,
    /// alertname -> number of cases that expect no alert.
    quiet: BTreeMap<String, usize>,
    /// Every expected firing alert's labels, with where it was expected.
    expected: Vec<(String, BTreeMap<String, String>)>,
}

/// Reads one promtool test file. `known` maps each rule file (as written in `rule_files`,
/// resolved against the test file's directory) to the alerts it defines; a case for an alert
/// that the test file does not load is an error, because an empty `exp_alerts` would pass for it
/// without testing anything.
fn add_coverage(
    cov: &mut Coverage,
    file: &str,
    doc: &Yaml,
    loaded_alerts: &BTreeSet<String>,
) -> Result<()> {
    let groups = doc
        .get("tests")
        .and_then(Yaml::as_sequence)
        .with_context(|| format!("{file}: no `tests` list"))?;
    for group in groups {
        for case in group
            .get("alert_rule_test")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            let alert = get_str(case, "alertname")
                .with_context(|| format!("{file}: alert_rule_test without alertname"))?;
            ensure!(
                loaded_alerts.contains(alert),
                "{file}: a case tests alert {alert:?}, which none of the file's rule_files define"
            );
            let expected = case.get("exp_alerts").and_then(Yaml::as_sequence);
            match expected {
                Some(list) if !list.is_empty() => {
                    *cov.firing.entry(alert.to_string()).or_default() += 1;
                    for exp in list {
                        let mut labels = str_map(exp.get("exp_labels"));
                        labels.insert("alertname".into(), alert.to_string());
                        cov.expected.push((file.to_string(), labels));
                    }
                }
                _ => *cov.quiet.entry(alert.to_string()).or_default() += 1,
            }
        }
    }
    Ok(())
}

/// Alerts without a firing case or without a quiet case.
fn coverage_gaps(alerts: &[AlertRule], cov: &Coverage) -> Vec<String> {
    let mut gaps = Vec::new();
    for alert in alerts {
        if !cov.firing.contains_key(&alert.name) {
            gaps.push(format!(
                "{} ({}): no promtool case where it fires (exp_alerts non-empty)",
                alert.name, alert.file
            ));
        }
        if !cov.quiet.contains_key(&alert.name) {
            gaps.push(format!(
                "{} ({}): no promtool case where it must stay quiet (exp_alerts: [])",
                alert.name, alert.file
            ));
        }
    }
    gaps
}

fn load_coverage() -> Result<Coverage> {
    let mut cov = Coverage::default();
    for path in test_files()? {
        let doc = read_yaml(&path)?;
        let dir = path.parent().expect("a test file has a directory");
        let mut loaded = BTreeSet::new();
        for rf in doc
            .get("rule_files")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            let rf = dir.join(rf.as_str().context("rule_files entries are strings")?);
            let rules = parse_rules(&rel(&rf), &read_yaml(&rf)?)?;
            loaded.extend(rules.alerts.into_iter().map(|a| a.name));
        }
        add_coverage(&mut cov, &rel(&path), &doc, &loaded)?;
    }
    Ok(cov)
}

#[test]
fn every_alerting_rule_has_a_firing_and_a_quiet_test() -> Result<()> {
    let rules = load_rules(&rule_files()?)?;
    ensure!(!rules.alerts.is_empty(), "no alerting rules found");
    let cov = load_coverage()?;
    let gaps = coverage_gaps(&rules.alerts, &cov);
    ensure!(
        gaps.is_empty(),
        "alerting rules without tests:\n  {}",
        gaps.join("\n  ")
    );
    for alert in &rules.alerts {
        eprintln!(
            "{:<24} firing cases {:>2}, quiet cases {:>2}",
            alert.name, cov.firing[&alert.name], cov.quiet[&alert.name]
        );
    }
    Ok(())
}

#[test]
fn coverage_check_reports_an_untested_rule() -> Result<()> {
    let doc: Yaml = serde_yaml::from_str(
        "tests:\n- alert_rule_test:\n  - {eval_time: 1m, alertname: A, exp_alerts: [{exp_labels: {x: y}}]}\n  - {eval_time: 2m, alertname: A, exp_alerts: []}\n  - {eval_time: 2m, alertname: B, exp_alerts: []}\n",
    )?;
    let mut cov = Coverage::default();
    let loaded: BTreeSet<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
    add_coverage(&mut cov, "t.yml", &doc, &loaded)?;
    let rule = |name: &str| AlertRule {
        file: "r.yml".into(),
        name: name.into(),
        expr: "up".into(),
        for_: None,
        keep_firing_for: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };
    let gaps = coverage_gaps(&[rule("A"), rule("B"), rule("C")], &cov);
    assert_eq!(gaps.len(), 3, "{gaps:#?}");
    assert!(gaps[0].starts_with("B (r.yml): no promtool case where it fires"));
    assert!(gaps[1].starts_with("C (r.yml): no promtool case where it fires"));
    assert!(gaps[2].starts_with("C (r.yml): no promtool case where it must stay quiet"));

    // A case for an alert the test file does not load is rejected.
    let mut cov = Coverage::default();
    let only_a: BTreeSet<String> = ["A".to_string()].into();
    let err = add_coverage(&mut cov, "t.yml", &doc, &only_a).unwrap_err();
    assert!(err.to_string().contains("\"B\""), "{err}");
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// the healer label contract (DESIGN.md, "Alerts")

/// A Prometheus duration: one or more `<digits><unit>`, units ms, s, m, h, d, w, y.
fn is_duration(text: &str) -> bool {
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .iter()
            .find(|u| rest.starts_with(**u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    !text.is_empty()
}

fn contract_problems(
    alerts: &[AlertRule],
    expected: &[(String, BTreeMap<String, String>)],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for a in alerts {
        let at = format!("{} ({})", a.name, a.file);
        if !names.insert(a.name.clone()) {
            problems.push(format!(
                "{at}: a second rule with this alertname (one rule per condition)"
            ));
        }
        let for_people = PEOPLE_ALERTS.contains(&a.name.as_str());
        match a.labels.get("condition") {
            None if for_people => {}
            Some(c) if for_people => problems.push(format!(
                "{at}: an alert for people has condition {c:?}: it would reach the healer"
            )),
            None => problems.push(format!("{at}: no `condition` label")),
            Some(c) if !CATALOG_WITH_ALERTS.contains(&c.as_str()) => problems.push(format!(
                "{at}: condition {c:?} is not in DESIGN.md's catalog"
            )),
            Some(c) if c != &a.name => {
                problems.push(format!("{at}: condition {c:?} differs from the alertname"))
            }
            Some(_) => {}
        }
        match a.labels.get("severity") {
            Some(s) if SEVERITIES.contains(&s.as_str()) => {}
            other => problems.push(format!(
                "{at}: severity {other:?} is not one of {SEVERITIES:?}"
            )),
        }
        for key in ["summary", "description"] {
            if a.annotations.get(key).is_none_or(|s| s.trim().is_empty()) {
                problems.push(format!("{at}: no `{key}` annotation"));
            }
        }
        if a.for_.is_none() {
            problems.push(format!(
                "{at}: no explicit `for:` (write `for: 0m` when none is wanted)"
            ));
        }
        for (key, value) in [("for", &a.for_), ("keep_firing_for", &a.keep_firing_for)] {
            if let Some(v) = value
                && !is_duration(v)
            {
                problems.push(format!("{at}: {key} {v:?} is not a duration"));
            }
        }
        if !a.expr.contains("node") && !CLUSTER_WIDE_ALERTS.contains(&a.name.as_str()) {
            problems.push(format!("{at}: the expression never mentions `node`"));
        }
        if for_people && a.labels.get("component").map(String::as_str) != Some("ark") {
            problems.push(format!(
                "{at}: an alert for people without `component: ark`"
            ));
        }
    }
    // `node` must survive every expression: each firing expectation of the unit tests has it.
    for (file, labels) in expected {
        for key in ["node", "condition", "severity"] {
            let name = labels["alertname"].as_str();
            if key == "condition" && PEOPLE_ALERTS.contains(&name)
                || key == "node" && CLUSTER_WIDE_ALERTS.contains(&name)
            {
                continue;
            }
            if labels.get(key).is_none_or(|v| v.is_empty()) {
                problems.push(format!(
                    "{file}: an expected {} alert has no `{key}` label: {labels:?}",
                    labels["alertname"]
                ));
            }
        }
    }
    problems
}

#[test]
fn alerts_carry_the_healer_label_contract() -> Result<()> {
    let rules = load_rules(&rule_files()?)?;
    let cov = load_coverage()?;
    let problems = contract_problems(&rules.alerts, &cov.expected);
    ensure!(
        problems.is_empty(),
        "label contract broken:\n  {}",
        problems.join("\n  ")
    );

    let conditions: BTreeSet<&str> = rules
        .alerts
        .iter()
        .filter_map(|a| a.labels.get("condition"))
        .map(String::as_str)
        .collect();
    let missing: Vec<_> = CATALOG_WITH_ALERTS
        .iter()
        .filter(|c| !conditions.contains(**c))
        .collect();
    ensure!(
        missing.is_empty(),
        "catalog conditions without an alerting rule: {missing:?}"
    );

    // The healer's embedded catalog, when it is there, must know every condition we send.
    let catalog = root().join("healer/catalog.yaml");
    if catalog.exists() {
        let doc = read_yaml(&catalog)?;
        let known = doc
            .get("conditions")
            .and_then(Yaml::as_mapping)
            .with_context(|| format!("{}: no `conditions` mapping", rel(&catalog)))?;
        let unknown: Vec<_> = conditions
            .iter()
            .filter(|c| !known.contains_key(Yaml::String(c.to_string())))
            .collect();
        ensure!(
            unknown.is_empty(),
            "conditions unknown to {}: {unknown:?}",
            rel(&catalog)
        );
    } else {
        eprintln!(
            "note: {} absent, healer catalog cross-check skipped",
            rel(&catalog)
        );
    }
    Ok(())
}

#[test]
fn durations_are_recognised() {
    for ok in ["0m", "10m", "1h30m", "500ms", "2d"] {
        assert!(is_duration(ok), "{ok}");
    }
    for bad in ["", "10", "m", "soon", "10 m", "1.5h"] {
        assert!(!is_duration(bad), "{bad}");
    }
}

/// Every alert links its runbook (`docs/runbooks/<Alert>.md`, which must exist), and every
/// runbook belongs to an alert.
#[test]
fn every_alert_has_a_runbook() -> Result<()> {
    let rules = load_rules(&rule_files()?)?;
    let mut problems = Vec::new();
    for a in &rules.alerts {
        let want = format!("docs/runbooks/{}.md", a.name);
        match a.annotations.get("runbook_url") {
            Some(u) if *u == want => {}
            other => problems.push(format!(
                "{} ({}): runbook_url {other:?}, expected {want:?}",
                a.name, a.file
            )),
        }
        let doc = root().join(&want);
        match std::fs::read_to_string(&doc) {
            Ok(text) => {
                for section in [
                    "## What it means",
                    "## What Ark did",
                    "## What a human does next",
                ] {
                    if !text.contains(section) {
                        problems.push(format!("{want}: no {section:?} section"));
                    }
                }
            }
            Err(e) => problems.push(format!("{want}: {e}")),
        }
    }
    let names: BTreeSet<String> = rules
        .alerts
        .iter()
        .map(|a| format!("{}.md", a.name))
        .collect();
    for f in std::fs::read_dir(root().join("docs/runbooks"))? {
        let f = f?.file_name().to_string_lossy().into_owned();
        if f.ends_with(".md") && f != "README.md" && !names.contains(&f) {
            problems.push(format!("docs/runbooks/{f}: no alert of that name"));
        }
    }
    ensure!(
        problems.is_empty(),
        "runbooks:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

#[test]
fn contract_check_reports_an_alert_for_people_that_would_reach_the_healer() {
    let rule = AlertRule {
        file: "identity.rules.yml".into(),
        name: "ArkNodeIdentityMismatch".into(),
        expr: "ark_collector_up{exported_node!=\"\"} unless on (node) up".into(),
        for_: Some("0m".into()),
        keep_firing_for: None,
        labels: [
            (
                "condition".to_string(),
                "ArkNodeIdentityMismatch".to_string(),
            ),
            ("severity".to_string(), "critical".to_string()),
            ("component".to_string(), "ark".to_string()),
        ]
        .into(),
        annotations: [
            ("summary".to_string(), "s".to_string()),
            ("description".to_string(), "d".to_string()),
        ]
        .into(),
    };
    let problems = contract_problems(std::slice::from_ref(&rule), &[]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("it would reach the healer")),
        "{problems:?}"
    );
    let mut without = rule;
    without.labels.remove("condition");
    assert_eq!(contract_problems(&[without], &[]), Vec::<String>::new());
}

#[test]
fn contract_check_reports_a_broken_rule() {
    let bad = AlertRule {
        file: "r.yml".into(),
        name: "GpuHung".into(),
        expr: "up == 0".into(),
        for_: None,
        keep_firing_for: Some("soon".into()),
        labels: [("condition".to_string(), "GpuHang".to_string())].into(),
        annotations: BTreeMap::new(),
    };
    let expected = vec![(
        "t.yml".to_string(),
        [("alertname".to_string(), "GpuHung".to_string())].into(),
    )];
    let problems = contract_problems(&[bad.clone(), bad], &expected);
    let text = problems.join("\n");
    for needle in [
        "second rule with this alertname",
        "\"GpuHang\" is not in DESIGN.md's catalog",
        "severity None",
        "no `summary` annotation",
        "no `description` annotation",
        "no explicit `for:`",
        "\"soon\" is not a duration",
        "never mentions `node`",
        "has no `node` label",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

// ------------------------------------------------------------------------------------------------
// Alertmanager

fn am_config() -> PathBuf {
    root().join("deploy/alertmanager/alertmanager.yml")
}

#[test]
fn amtool_check_config_is_clean() -> Result<()> {
    let ran = run("amtool", &["check-config".into(), rel(&am_config())])?;
    ensure!(ran.ok, "amtool check-config failed:\n{}", ran.text());
    ensure!(
        ran.stdout.contains("SUCCESS"),
        "no SUCCESS from amtool:\n{}",
        ran.text()
    );
    Ok(())
}

/// The parts of the route the healer depends on, read from the file (amtool validates syntax,
/// not intent).
#[test]
fn alertmanager_routes_conditions_to_the_healer_by_node() -> Result<()> {
    let doc = read_yaml(&am_config())?;
    let routes = doc["route"]["routes"]
        .as_sequence()
        .context("route.routes")?;
    let healer = routes
        .iter()
        .find(|r| get_str(r, "receiver") == Some(HEALER_RECEIVER))
        .context("no route to the ark-healer receiver")?;
    let group_by: Vec<_> = healer["group_by"]
        .as_sequence()
        .context("group_by")?
        .iter()
        .collect();
    ensure!(
        group_by == [&Yaml::String("node".into())],
        "healer route group_by {group_by:?}"
    );
    let wait = get_str(healer, "group_wait").context("group_wait")?;
    let secs: u64 = wait
        .trim_end_matches('s')
        .parse()
        .context("group_wait in seconds")?;
    ensure!(secs <= 10, "group_wait {wait} is not small");

    let receiver = doc["receivers"]
        .as_sequence()
        .context("receivers")?
        .iter()
        .find(|r| get_str(r, "name") == Some(HEALER_RECEIVER))
        .context("no ark-healer receiver")?;
    let hooks = receiver["webhook_configs"]
        .as_sequence()
        .context("webhook_configs")?;
    ensure!(hooks.len() == 1, "one webhook expected");
    let hook = &hooks[0];
    ensure!(
        get_str(hook, "url") == Some(HEALER_URL),
        "webhook url {:?}",
        hook["url"]
    );
    ensure!(
        hook["send_resolved"].as_bool() == Some(true),
        "send_resolved must be true"
    );
    let auth = &hook["http_config"]["authorization"];
    ensure!(
        get_str(auth, "credentials_file").is_some_and(|f| f.starts_with('/')),
        "the bearer token must come from an absolute credentials_file: {auth:?}"
    );
    ensure!(
        auth.get("credentials").is_none(),
        "no inline token in the config"
    );
    Ok(())
}

fn route_test(labels: &BTreeMap<String, String>, receiver: &str) -> Result<Option<String>> {
    let mut args = vec![
        "config".to_string(),
        "routes".into(),
        "test".into(),
        format!("--config.file={}", rel(&am_config())),
        format!("--verify.receivers={receiver}"),
    ];
    args.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
    let ran = run("amtool", &args)?;
    let got = ran.stdout.trim();
    if ran.ok && got == receiver {
        Ok(None)
    } else {
        Ok(Some(format!(
            "{labels:?}: expected {receiver}, amtool said:\n{}",
            ran.text()
        )))
    }
}

#[test]
fn amtool_route_cases_resolve_to_the_expected_receiver() -> Result<()> {
    let cases_file = root().join("deploy/alertmanager/routes-test.yml");
    let doc = read_yaml(&cases_file)?;
    let mut cases: Vec<(String, BTreeMap<String, String>, String)> = Vec::new();
    for case in doc["cases"].as_sequence().context("cases")? {
        cases.push((
            get_str(case, "name").unwrap_or("?").to_string(),
            str_map(case.get("labels")),
            get_str(case, "receiver").context("receiver")?.to_string(),
        ));
    }
    ensure!(
        cases.iter().any(|c| c.2 != HEALER_RECEIVER),
        "no negative route case"
    );
    // Every alerting rule, with the labels it really carries, must reach the healer; the
    // alerts for people must not.
    for alert in load_rules(&rule_files()?)?.alerts {
        let mut labels = alert.labels.clone();
        labels.insert("alertname".into(), alert.name.clone());
        labels.insert("node".into(), "gpu-node-1".into());
        let receiver = if PEOPLE_ALERTS.contains(&alert.name.as_str()) {
            DEFAULT_RECEIVER
        } else {
            HEALER_RECEIVER
        };
        cases.push((format!("rule {}", alert.name), labels, receiver.into()));
    }
    let mut failures = Vec::new();
    for (name, labels, receiver) in &cases {
        if let Some(f) = route_test(labels, receiver)? {
            failures.push(format!("{name}: {f}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "route cases failed:\n{}",
        failures.join("\n")
    );
    eprintln!("{} route cases passed", cases.len());

    // The check can fail: a plain alert must not reach the healer.
    let watchdog: BTreeMap<String, String> = [("alertname".into(), "Watchdog".into())].into();
    ensure!(
        route_test(&watchdog, HEALER_RECEIVER)?.is_some(),
        "amtool verify never fails"
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// dashboards

#[derive(Debug)]
struct Query {
    at: String,
    expr: String,
}

/// Grafana's built-in variables that a query may use, with a value to parse with.
const BUILTIN_VARS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "30s"),
    ("__range", "1h"),
    ("__range_s", "3600"),
    ("__interval_ms", "30000"),
];

/// Replaces `$name`, `${name}`, `${name:format}` and `[[name]]` by a value that keeps the
/// PromQL valid: a duration for the interval built-ins, `.*` for template variables. An unknown
/// variable is an error (a typo would otherwise only show as an empty panel).
fn substitute(expr: &str, vars: &BTreeSet<String>) -> Result<String> {
    let value = |name: &str| -> Result<String> {
        if let Some((_, v)) = BUILTIN_VARS.iter().find(|(n, _)| *n == name) {
            Ok(v.to_string())
        } else if vars.contains(name) {
            Ok(".*".to_string())
        } else {
            bail!("unknown template variable ${name} in {expr:?}")
        }
    };
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner
                .find('}')
                .with_context(|| format!("unclosed ${{ in {expr:?}"))?;
            let name = inner[..end].split(':').next().unwrap_or_default();
            out.push_str(&value(name)?);
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            match inner.find("]]") {
                Some(end) if inner[..end].chars().all(|c| is_name(c) || c == ':') => {
                    out.push_str(&value(inner[..end].split(':').next().unwrap_or_default())?);
                    rest = &inner[end + 2..];
                }
                _ => {
                    out.push('[');
                    rest = &tail[1..];
                }
            }
        } else if let Some(after) = tail.strip_prefix('$') {
            let name: String = after.chars().take_while(|c| is_name(*c)).collect();
            ensure!(!name.is_empty(), "a lone $ in {expr:?}");
            out.push_str(&value(&name)?);
            rest = &after[name.len()..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Structural problems of one dashboard, and its queries with variables substituted.
fn check_dashboard(file: &str, doc: &Json) -> (Vec<String>, Vec<Query>) {
    let mut problems = Vec::new();
    let mut queries = Vec::new();
    let schema = doc["schemaVersion"].as_u64().unwrap_or(0);
    if schema < 36 {
        problems.push(format!(
            "{file}: schemaVersion {schema} is older than Grafana 9 (36)"
        ));
    }
    for key in ["uid", "title"] {
        if doc[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{file}: no {key}"));
        }
    }
    let vars = doc["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var_names: BTreeSet<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str())
        .map(str::to_string)
        .collect();
    let ds_ok = vars.iter().any(|v| {
        v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"
    });
    if !ds_ok {
        problems.push(format!(
            "{file}: no `datasource` variable of type datasource/prometheus"
        ));
    }
    for v in &vars {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_default();
            if q.is_empty() {
                problems.push(format!("{file}: variable {} has no query", v["name"]));
            }
            if v["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "{file}: variable {} does not use ${{datasource}}",
                    v["name"]
                ));
            }
        }
    }

    // Rows may nest collapsed panels; visit both levels.
    let mut panels: Vec<&Json> = Vec::new();
    for p in doc["panels"].as_array().into_iter().flatten() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    if panels.iter().all(|p| p["type"] == "row") {
        problems.push(format!("{file}: no panels"));
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let at = format!("{file} panel {title:?}");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            problems.push(format!("{at}: duplicate or missing id {}", p["id"]));
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        if x + w > 24 || g["h"].as_u64().is_none() || g["y"].as_u64().is_none() {
            problems.push(format!("{at}: bad gridPos {g}"));
        }
        if !p["arkExpectEmpty"].is_null() && !p["arkExpectEmpty"].is_boolean() {
            problems.push(format!("{at}: arkExpectEmpty must be true or false"));
        }
        if p["type"] == "row" || p["type"] == "text" {
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!("{at}: datasource is not ${{datasource}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{at}: no targets"));
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            if expr.trim().is_empty() {
                problems.push(format!("{at}: a target without expr"));
                continue;
            }
            if !refs.insert(t["refId"].as_str().unwrap_or_default().to_string()) {
                problems.push(format!("{at}: duplicate refId {}", t["refId"]));
            }
            if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("{at}: target datasource is not ${{datasource}}"));
            }
            match substitute(expr, &var_names) {
                Ok(expr) => queries.push(Query {
                    at: format!("{at} {}", t["refId"]),
                    expr,
                }),
                Err(e) => problems.push(format!("{at}: {e:#}")),
            }
        }
    }
    (problems, queries)
}

/// Parses every query with the real PromQL parser: `promtool check rules` on a file with one
/// recording rule per query. Returns promtool's complaints, named by panel.
fn promtool_parse(name: &str, queries: &[Query]) -> Result<Vec<String>> {
    let rules: Vec<Json> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard:q{i}"), "expr": q.expr}))
        .collect();
    let doc = serde_json::json!({"groups": [{"name": "dashboards", "rules": rules}]});
    let path = scratch(name);
    // YAML is a superset of JSON, and JSON escapes every string exactly.
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    let ran = run(
        "promtool",
        &["check".into(), "rules".into(), path.display().to_string()],
    )?;
    let _ = std::fs::remove_file(&path);
    if ran.ok {
        ensure!(
            ran.stdout
                .contains(&format!("SUCCESS: {} rules found", queries.len())),
            "promtool did not parse all {} queries:\n{}",
            queries.len(),
            ran.text()
        );
        return Ok(Vec::new());
    }
    let mut problems = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        let tag = format!("\"dashboard:q{i}\"");
        if let Some(line) = ran
            .stdout
            .lines()
            .chain(ran.stderr.lines())
            .find(|l| l.contains(&tag))
        {
            problems.push(format!("{}: {}\n    expr: {}", q.at, line, q.expr));
        }
    }
    if problems.is_empty() {
        problems.push(format!("promtool check rules failed:\n{}", ran.text()));
    }
    Ok(problems)
}

fn dashboard_files() -> Result<Vec<PathBuf>> {
    files(&root().join("dashboards"), ".json")
}

#[test]
fn dashboards_are_well_formed_and_every_query_parses() -> Result<()> {
    let mut problems = Vec::new();
    let mut queries = Vec::new();
    let mut uids = BTreeSet::new();
    for path in dashboard_files()? {
        let doc: Json = serde_json::from_str(&read(&path)?)
            .with_context(|| format!("{} is not valid JSON", rel(&path)))?;
        if !uids.insert(doc["uid"].as_str().unwrap_or_default().to_string()) {
            problems.push(format!("{}: uid {} used twice", rel(&path), doc["uid"]));
        }
        let (p, q) = check_dashboard(&rel(&path), &doc);
        problems.extend(p);
        queries.extend(q);
    }
    ensure!(
        problems.is_empty(),
        "dashboard problems:\n  {}",
        problems.join("\n  ")
    );
    let parse = promtool_parse("dashboards.yml", &queries)?;
    ensure!(
        parse.is_empty(),
        "queries that do not parse:\n  {}",
        parse.join("\n  ")
    );
    eprintln!("{} dashboard queries parsed by promtool", queries.len());
    Ok(())
}

#[test]
fn dashboard_checks_report_broken_panels() -> Result<()> {
    let doc = serde_json::json!({
        "uid": "x", "title": "x", "schemaVersion": 39,
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            {"name": "node", "type": "query", "query": {"query": "label_values(up, node)"},
             "datasource": {"type": "prometheus", "uid": "${datasource}"}}]},
        "panels": [
            {"id": 1, "type": "timeseries", "title": "good", "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8},
             "datasource": {"uid": "${datasource}"},
             "targets": [{"refId": "A", "expr": "rate(ark_events_total{node=~\"$node\"}[$__rate_interval])"}]},
            {"id": 2, "type": "timeseries", "title": "unparsable", "gridPos": {"x": 12, "y": 0, "w": 12, "h": 8},
             "datasource": {"uid": "${datasource}"},
             "targets": [{"refId": "A", "expr": "sum(rate(ark_events_total[5m])"}]},
            {"id": 2, "type": "stat", "title": "typo", "gridPos": {"x": 20, "y": 8, "w": 12, "h": 8},
             "datasource": {"uid": "prom"}, "arkExpectEmpty": "yes",
             "targets": [{"refId": "A", "expr": "ark_gpu_up{node=~\"${nodes}\"}"}]}]
    });
    let (problems, queries) = check_dashboard("d.json", &doc);
    let text = problems.join("\n");
    for needle in [
        "duplicate or missing id 2",
        "bad gridPos",
        "arkExpectEmpty must be true or false",
        "datasource is not ${datasource}",
        "unknown template variable $nodes",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[0].expr, "rate(ark_events_total{node=~\".*\"}[1m])");
    let parse = promtool_parse("broken.yml", &queries)?;
    assert_eq!(parse.len(), 1, "{parse:#?}");
    assert!(parse[0].contains("\"unparsable\"") && parse[0].contains("unclosed left parenthesis"));
    Ok(())
}

#[test]
fn substitute_handles_grafana_variable_forms() -> Result<()> {
    let vars: BTreeSet<String> = ["node".to_string(), "gpu".to_string()].into();
    assert_eq!(
        substitute(
            "x{node=~\"${node:regex}\", gpu=~\"[[gpu]]\"}[$__range] offset $__interval",
            &vars
        )?,
        "x{node=~\".*\", gpu=~\".*\"}[1h] offset 30s"
    );
    assert_eq!(substitute("rate(x[5m])", &vars)?, "rate(x[5m])");
    assert!(substitute("x{a=\"$job\"}", &vars).is_err());
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// metric names

/// Names from a Prometheus text exposition: `# TYPE`/`# HELP` names and sample names.
fn exposition_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        let name = if let Some(meta) = line
            .strip_prefix("# TYPE ")
            .or(line.strip_prefix("# HELP "))
        {
            meta.split_whitespace().next()
        } else if line.starts_with('#') {
            None
        } else {
            line.split(['{', ' ']).next()
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_string());
        }
    }
    names
}

/// The metric names a file uses: identifiers starting with `ark_`. Identifiers with a `:` are
/// recording-rule names and are returned apart.
fn used_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut recorded = BTreeSet::new();
    for token in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        let token = token.trim_matches(':');
        if token.contains(':') {
            if token.split(':').count() == 3 && token.contains("ark_") {
                recorded.insert(token.to_string());
            }
        } else if token.starts_with("ark_") {
            metrics.insert(token.to_string());
        }
    }
    (metrics, recorded)
}

fn is_known(name: &str, known: &BTreeSet<String>) -> bool {
    known.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| known.contains(base))
        })
}

/// Problems with the names used in `files` (path, text).
fn metric_name_problems(
    files: &[(String, String)],
    contract: &BTreeSet<String>,
    golden: &BTreeSet<String>,
    golden_files: &str,
    records: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, text) in files {
        let (metrics, recorded) = used_names(text);
        for m in metrics {
            if !is_known(&m, contract) && !is_known(&m, golden) {
                problems.push(format!(
                    "{file}: metric `{m}` is neither in alerts/metric-names.txt (the DESIGN.md \
                     contract) nor in {golden_files}: renamed or misspelt?"
                ));
            }
        }
        for r in recorded {
            if !records.contains(&r) {
                problems.push(format!(
                    "{file}: `{r}` looks like a recording rule but no alerts/*.rules.yml records it"
                ));
            }
        }
    }
    problems
}

#[test]
fn metric_names_are_in_the_contract() -> Result<()> {
    let root = root();
    let contract: BTreeSet<String> = read(&root.join("alerts/metric-names.txt"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    ensure!(
        contract.len() > 30,
        "alerts/metric-names.txt looks truncated"
    );

    let mut golden = BTreeSet::new();
    let mut golden_files: Vec<String> = Vec::new();
    // Every golden /metrics file: the replay's, and each collector's (nvml, ebpf, host, ...).
    for dir in ["exporter/tests/golden", "healer/tests/golden"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        for path in files {
            golden.extend(exposition_names(&read(&path)?));
            golden_files.push(rel(&path));
        }
    }
    let golden_desc = if golden_files.is_empty() {
        "any golden /metrics file (none exists yet)".to_string()
    } else {
        golden_files.join(" or ")
    };

    let mut paths = rule_files()?;
    paths.extend(test_files()?);
    paths.extend(dashboard_files()?);
    let mut texts = Vec::new();
    for p in &paths {
        texts.push((rel(p), read(p)?));
    }
    let records = load_rules(&rule_files()?)?.records;
    let problems = metric_name_problems(&texts, &contract, &golden, &golden_desc, &records);
    ensure!(
        problems.is_empty(),
        "unknown metric names:\n  {}",
        problems.join("\n  ")
    );

    if !golden_files.is_empty() {
        // Informational: contract names the alerts use that the fixture run does not produce
        // (e.g. NVML metrics on a machine without a GPU).
        let used: BTreeSet<String> = texts.iter().flat_map(|(_, t)| used_names(t).0).collect();
        let absent: Vec<_> = used
            .iter()
            .filter(|m| !is_known(m, &golden))
            .filter(|m| {
                // healer names are only expected in the healer's golden file
                !m.starts_with("ark_healer_")
                    || golden_files.iter().any(|g| g.starts_with("healer"))
            })
            .collect();
        // Every collector now has a golden file, so an exporter name the alerts or dashboards
        // use but no golden output contains is a rename that would silently break them.
        let absent: Vec<_> = absent
            .into_iter()
            .filter(|m| m.starts_with("ark_") && !m.starts_with("ark_healer_"))
            .collect();
        ensure!(
            absent.is_empty(),
            "used by alerts/dashboards but produced by no golden /metrics ({golden_desc}): {absent:?}"
        );
    }
    Ok(())
}

#[test]
fn metric_name_check_reports_an_unknown_name() {
    let contract: BTreeSet<String> = [
        "ark_gpu_up".to_string(),
        "ark_block_io_latency_seconds".to_string(),
    ]
    .into();
    let golden: BTreeSet<String> = exposition_names(
        "# HELP ark_new_total New.\n# TYPE ark_new_total counter\nark_new_total{node=\"n\"} 1\n",
    );
    let records: BTreeSet<String> = ["node:ark_gpu_up:count".to_string()].into();
    let files = vec![(
        "a.yml".to_string(),
        "expr: ark_gpu_up == 0 or ark_new_total or ark_block_io_latency_seconds_bucket \
         or node:ark_gpu_up:count or ark_gpu_upp or node:ark_gpu_up:sum"
            .to_string(),
    )];
    let problems = metric_name_problems(&files, &contract, &golden, "golden", &records);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].contains("`ark_gpu_upp` is neither in alerts/metric-names.txt"));
    assert!(problems[1].contains("`node:ark_gpu_up:sum` looks like a recording rule"));
}

// ------------------------------------------------------------------------------------------------
// dashboards against a real Prometheus scraping a fault replay

/// Dashboards whose queries the replay scenario can feed. `healer.json` needs a running healer:
/// `healer_dashboard_returns_data_for_an_alert`.
const REPLAYED_DASHBOARDS: &[&str] = &["gpu-fleet.json", "node.json", "causal.json"];

/// Runs `ark-exporter replay` on `dashboards/tests/fault-replay.jsonl`, serves the `/metrics`
/// it produces to a real Prometheus that loads `alerts/*.rules.yml`, and runs every query of the
/// exporter-fed dashboards: each must succeed, and return data unless its panel carries
/// `arkExpectEmpty: true` (dashboards/README.md).
#[tokio::test]
async fn dashboards_return_data_for_a_fault_replay() -> Result<()> {
    if ark_harness::skip_without_services("dashboards_return_data_for_a_fault_replay") {
        return Ok(());
    }
    let replay = root().join("dashboards/tests/fault-replay.jsonl");
    let mut cmd = Command::new(ark_harness::bin_path("ark-exporter"));
    cmd.arg("replay")
        .arg(&replay)
        .args(["--format", "metrics", "--node-name", "gpu-node-1"]);
    // Scenes need the rule packs; use them once the repository has them.
    if root().join("rules/manifest.yaml").exists() {
        cmd.arg("--rules").arg(root().join("rules"));
    }
    let out = cmd.output()?;
    ensure!(
        out.status.success(),
        "ark-exporter replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8(out.stdout)?;
    ensure!(
        body.contains("ark_root_cause{"),
        "the replay produced no root cause; the scenario is meant to:\n{body}"
    );

    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let prom = ark_harness::Prometheus::start(ark_harness::PromConfig {
        scrape_interval: std::time::Duration::from_millis(100),
        evaluation_interval: std::time::Duration::from_millis(100),
        targets: vec![ark_harness::Target::on_node(
            "ark-exporter",
            addr.to_string(),
            "gpu-node-1",
        )],
        rule_files: rule_files()?,
        ..ark_harness::PromConfig::default()
    })
    .await?;
    // rate() over the substituted $__rate_interval needs two samples, and the rules one
    // evaluation (the replayed root causes make WorkloadStalled pending at once): wait for both.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let rated = prom.query("rate(ark_events_total[1m])").await?;
        let recorded = prom.query("ALERTS").await?;
        if !rated.is_empty() && !recorded.is_empty() {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "Prometheus never had two scrapes and a rule evaluation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let mut problems = Vec::new();
    // promtool parses; only evaluation shows runtime errors (many-to-many matching, duplicate
    // series after label changes). Every rule must have evaluated cleanly.
    let rules: Json = reqwest::get(format!("{}/api/v1/rules", prom.url()))
        .await?
        .json()
        .await?;
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            evaluated += 1;
            if rule["health"] != "ok" {
                problems.push(format!(
                    "rule {} is {}: {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    let expected = load_rules(&rule_files()?)?;
    ensure!(
        evaluated == expected.alerts.len() + expected.records.len(),
        "Prometheus loaded {evaluated} rules, alerts/ has {} alerts and {} records",
        expected.alerts.len(),
        expected.records.len()
    );
    for name in REPLAYED_DASHBOARDS {
        let path = root().join("dashboards").join(name);
        let doc: Json = serde_json::from_str(&read(&path)?)?;
        problems.extend(query_panels(name, &doc, &prom).await?);
    }
    server.abort();
    ensure!(
        problems.is_empty(),
        "dashboard queries:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

/// Runs every panel query of a dashboard (variables substituted) against `prom`. A query that
/// errors is a problem; so is an empty result, unless the panel has `arkExpectEmpty: true`.
async fn query_panels(
    name: &str,
    doc: &Json,
    prom: &ark_harness::Prometheus,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let vars: BTreeSet<String> = doc["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .map(str::to_string)
        .collect();
    let mut checked = 0;
    for panel in doc["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        let may_be_empty = panel["arkExpectEmpty"] == true;
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = substitute(target["expr"].as_str().unwrap_or_default(), &vars)?;
            checked += 1;
            // A series whose value is NaN (a quantile of an empty histogram, 0/0) draws
            // nothing: it counts as no data.
            let result = prom.query(&expr).await.map(|r| {
                r.into_iter()
                    .filter(|s| s["value"][1] != "NaN")
                    .collect::<Vec<_>>()
            });
            match result {
                Ok(result) if result.is_empty() && !may_be_empty => problems.push(format!(
                    "{name} panel {title:?} {}: no data (mark the panel \
                     \"arkExpectEmpty\": true if that is legitimate)\n    {expr}",
                    target["refId"]
                )),
                Ok(result) if !result.is_empty() && may_be_empty => eprintln!(
                    "note: {name} panel {title:?} has data although marked arkExpectEmpty"
                ),
                Ok(_) => {}
                Err(e) => problems.push(format!("{name} panel {title:?}: {e:#}")),
            }
        }
    }
    eprintln!("{name}: {checked} queries answered by a real Prometheus");
    Ok(problems)
}

// ------------------------------------------------------------------------------------------------
// Alertmanager with the real configuration, delivering to a local webhook

/// Starts the real Alertmanager (the harness's) on `deploy/alertmanager/alertmanager.yml`, with
/// only the healer receiver's URL (to `sink`) and token file path (in `dir`) replaced.
async fn shipped_alertmanager(
    sink: &ark_harness::WebhookSink,
    dir: &Path,
) -> Result<ark_harness::Alertmanager> {
    std::fs::create_dir_all(dir)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token\n")?;

    let mut config = read_yaml(&am_config())?;
    let receivers = config["receivers"].as_sequence_mut().context("receivers")?;
    let healer = receivers
        .iter_mut()
        .find(|r| get_str(r, "name") == Some(HEALER_RECEIVER))
        .context("no ark-healer receiver")?;
    let hook = &mut healer["webhook_configs"][0];
    hook["url"] = Yaml::String(sink.url());
    hook["http_config"]["authorization"]["credentials_file"] =
        Yaml::String(token_file.display().to_string());
    ark_harness::Alertmanager::start_config(&serde_yaml::to_string(&config)?, None).await
}

/// Starts the real Alertmanager on `deploy/alertmanager/alertmanager.yml`, with only the webhook
/// URL and the token file path replaced, injects alerts as Prometheus would, and checks what the
/// "healer" receives: one notification per node, Ark alerts only, with the bearer token.
#[tokio::test]
async fn alertmanager_delivers_conditions_per_node_with_the_bearer_token() -> Result<()> {
    if ark_harness::skip_without_services(
        "alertmanager_delivers_conditions_per_node_with_the_bearer_token",
    ) {
        return Ok(());
    }
    let sink = ark_harness::WebhookSink::start().await?;
    let dir = scratch("alertmanager");
    let am = shipped_alertmanager(&sink, &dir).await?;

    let alert =
        |labels: Json| serde_json::json!({"labels": labels, "annotations": {"summary": "s"}});
    let alerts = serde_json::json!([
        alert(
            serde_json::json!({"alertname": "GpuFellOffBus", "condition": "GpuFellOffBus",
            "severity": "critical", "node": "n1", "gpu": "3", "xid": "79"})
        ),
        alert(
            serde_json::json!({"alertname": "GpuHighTemperature", "condition": "GpuHighTemperature",
            "severity": "warning", "node": "n1", "gpu": "1"})
        ),
        alert(
            serde_json::json!({"alertname": "IbPortDown", "condition": "IbPortDown",
            "severity": "critical", "node": "n2", "device": "mlx5_0", "port": "1"})
        ),
        alert(serde_json::json!({"alertname": "Watchdog", "severity": "none"})),
    ]);
    am.post_alerts(&alerts).await?;

    // group_wait (5 s) per node group, then both groups are delivered.
    let by_node =
        |node: &'static str| move |r: &ark_harness::Received| r.body["groupLabels"]["node"] == node;
    let n1 = sink
        .wait_for(std::time::Duration::from_secs(20), by_node("n1"))
        .await?;
    let n2 = sink
        .wait_for(std::time::Duration::from_secs(20), by_node("n2"))
        .await?;
    for (node, got, expected) in [("n1", &n1, 2), ("n2", &n2, 1)] {
        ensure!(
            got.authorization.as_deref() == Some("Bearer s3cret-token"),
            "{node}: Authorization header {:?}",
            got.authorization
        );
        ensure!(
            got.body["version"] == "4",
            "{node}: payload version {}",
            got.body["version"]
        );
        ensure!(
            got.body["receiver"] == HEALER_RECEIVER,
            "{node}: {}",
            got.body["receiver"]
        );
        let list = got.body["alerts"].as_array().context("alerts")?;
        ensure!(
            list.len() == expected,
            "{node}: {} alerts in {}",
            list.len(),
            got.body
        );
        ensure!(
            list.iter()
                .all(|a| a["labels"]["node"] == node && a["status"] == "firing"),
            "{node}: {}",
            got.body
        );
    }
    // Give a wrongly routed Watchdog the same group_wait to show up.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let all = sink.received();
    ensure!(
        all.iter().all(|r| r.body["groupLabels"]["node"].is_string()
            && !r.body.to_string().contains("Watchdog")),
        "something other than a node group reached the healer: {:?}",
        all.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    drop(am);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Issue 18: the shipped inhibition, on the real Alertmanager. A job's culprit alert
/// (JobBlockedByNode on n2, job train) holds back every WorkloadStalled of job train (the victims
/// n1 and n3, and n2's own), and nothing else: another job's stall, a pod's stall without a
/// job_id and the culprit alert itself are delivered. Checked both in Alertmanager's API
/// (`status.inhibitedBy`) and at the webhook. Then the culprit resolves and the victims' stalls,
/// still firing, are delivered: the inhibition lasts exactly as long as its source.
#[tokio::test]
async fn alertmanager_inhibits_the_stalls_of_a_job_blocked_by_one_node() -> Result<()> {
    if ark_harness::skip_without_services(
        "alertmanager_inhibits_the_stalls_of_a_job_blocked_by_one_node",
    ) {
        return Ok(());
    }
    let sink = ark_harness::WebhookSink::start().await?;
    let dir = scratch("alertmanager-inhibit");
    let am = shipped_alertmanager(&sink, &dir).await?;

    let stall = |node: &str, job_id: Option<&str>, pod: &str| {
        let mut labels = serde_json::json!({"alertname": "WorkloadStalled",
            "condition": "WorkloadStalled", "severity": "warning", "node": node, "pod": pod,
            "namespace": "ml", "resource": "network-ib0", "cause": "waits_on"});
        if let Some(j) = job_id {
            labels["job_id"] = Json::String(j.into());
        }
        labels
    };
    let culprit = serde_json::json!({"alertname": "JobBlockedByNode",
        "condition": "JobBlockedByNode", "severity": "warning", "node": "n2", "job_id": "train",
        "resource": "gpu-3", "cause": "error.hw"});
    let post = |labels: Vec<Json>, ends_at: Option<&str>| {
        let alerts: Vec<Json> = labels
            .into_iter()
            .map(|l| {
                let mut a = serde_json::json!({"labels": l, "annotations": {"summary": "s"}});
                if let Some(e) = ends_at {
                    a["endsAt"] = Json::String(e.into());
                }
                a
            })
            .collect();
        let am = &am;
        async move { am.post_alerts(&Json::Array(alerts)).await }
    };
    let victims = vec![
        stall("n1", Some("train"), "train-0"),
        stall("n3", Some("train"), "train-2"),
        stall("n2", Some("train"), "train-1"),
        stall("n4", Some("other"), "other-0"),
        stall("n5", None, "web-0"),
    ];
    // The source first, as Prometheus would send it (its for: is shorter).
    post(vec![culprit.clone()], None).await?;
    post(victims.clone(), None).await?;

    let state = || async {
        let mut by_key = BTreeMap::new();
        for a in am.alerts().await? {
            let l = &a["labels"];
            let key = format!(
                "{}/{}/{}",
                l["alertname"].as_str().unwrap_or("?"),
                l["node"].as_str().unwrap_or("?"),
                l["job_id"].as_str().unwrap_or("-")
            );
            by_key.insert(key, ark_harness::is_inhibited(&a));
        }
        anyhow::Ok(by_key)
    };
    let expected: BTreeMap<String, bool> = [
        ("JobBlockedByNode/n2/train", false),
        ("WorkloadStalled/n1/train", true),
        ("WorkloadStalled/n2/train", true),
        ("WorkloadStalled/n3/train", true),
        ("WorkloadStalled/n4/other", false),
        ("WorkloadStalled/n5/-", false),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // Inhibition is computed when the API is read; wait until all six are there.
    let got = ark_harness::wait_for(
        "six alerts in Alertmanager",
        std::time::Duration::from_secs(20),
        &[&am.service],
        || async {
            let s = state().await?;
            Ok((s.len() == expected.len()).then_some(s))
        },
    )
    .await?;
    ensure!(
        got == expected,
        "inhibited state: got {got:?}, expected {expected:?}"
    );

    // At the webhook (group_wait 5 s per node group): n2 (the culprit alert only), n4 and n5;
    // never n1 or n3, whose only alerts are inhibited.
    let by_node =
        |node: &'static str| move |r: &ark_harness::Received| r.body["groupLabels"]["node"] == node;
    for node in ["n2", "n4", "n5"] {
        sink.wait_for(std::time::Duration::from_secs(20), by_node(node))
            .await
            .with_context(|| format!("{node}'s group delivered"))?;
    }
    let delivered = sink.received();
    let names = |node: &str| -> Vec<String> {
        delivered
            .iter()
            .filter(|r| r.body["groupLabels"]["node"] == node)
            .flat_map(|r| r.body["alerts"].as_array().cloned().unwrap_or_default())
            .map(|a| a["labels"]["alertname"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    ensure!(
        names("n1").is_empty() && names("n3").is_empty(),
        "a victim was delivered: {delivered:?}"
    );
    ensure!(
        names("n2") == ["JobBlockedByNode"],
        "n2 got {:?} (its own stall of the job is inhibited too)",
        names("n2")
    );

    // The culprit resolves (repaired): the victims' stalls, still firing, are no longer held.
    // An endsAt in the past is a resolved alert, as Prometheus sends it.
    post(vec![culprit], Some("2000-01-01T00:00:00Z")).await?;
    post(victims, None).await?;
    ark_harness::wait_for(
        "n1's stall delivered after the culprit resolved",
        std::time::Duration::from_secs(30),
        &[&am.service],
        || async {
            let s = state().await?;
            Ok((s.get("WorkloadStalled/n1/train") == Some(&false)).then_some(()))
        },
    )
    .await?;
    // n1's group flushed (empty: all inhibited) at group_wait; its next flush is a
    // group_interval (30 s) later.
    sink.wait_for(std::time::Duration::from_secs(45), by_node("n1"))
        .await
        .context("n1's stall delivered after the culprit resolved")?;
    drop(am);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// the healer dashboard against a real Prometheus scraping a real (dry-run) healer

/// Starts the real healer in dry-run against a real kube-apiserver, sends it one Alertmanager
/// notification (GpuFellOffBus on a node), lets a real Prometheus scrape its `/metrics`, and runs
/// every query of `healer.json`: each must succeed, and return data unless its panel carries
/// `arkExpectEmpty: true`.
#[tokio::test]
async fn healer_dashboard_returns_data_for_an_alert() -> Result<()> {
    if ark_harness::skip_without_services("healer_dashboard_returns_data_for_an_alert") {
        return Ok(());
    }
    let kube = ark_harness::KubeCluster::start().await?;
    kube.create_node("gpu-node-1", &[]).await?;
    kube.ensure_namespace("ark-system").await?;

    let dir = scratch("healer");
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, "healer-token\n")?;
    let port = ark_harness::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(ark_harness::bin_path("ark-healer"));
    cmd.arg("serve")
        .arg("--dry-run")
        .arg(format!(
            "--kubeconfig={}",
            kube.kubeconfig("admin").display()
        ))
        .arg(format!("--webhook-token-file={}", token_file.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .env("ARK_AUDIT_LOG", dir.join("audit.jsonl"))
        .env("ARK_RECONCILE_INTERVAL_SECONDS", "1");
    let healer = ark_harness::Service::spawn("ark-healer", &mut cmd, &dir.join("healer.log"))?;
    let http = reqwest::Client::new();
    ark_harness::wait_for(
        "ark-healer /readyz",
        std::time::Duration::from_secs(30),
        &[&healer],
        || async {
            let ready = http.get(format!("{url}/readyz")).send().await?;
            Ok(ready.status().is_success().then_some(()))
        },
    )
    .await?;

    let payload = serde_json::json!({
        "version": "4",
        "groupKey": "{}/{condition=~\".+\"}:{node=\"gpu-node-1\"}",
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": HEALER_RECEIVER,
        "groupLabels": {"node": "gpu-node-1"},
        "commonLabels": {"node": "gpu-node-1"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.invalid",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "GpuFellOffBus", "condition": "GpuFellOffBus",
                       "severity": "critical", "node": "gpu-node-1", "gpu": "3", "xid": "79"},
            "annotations": {"summary": "GPU 3 on gpu-node-1 has fallen off the bus"},
            "startsAt": "2026-11-23T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.invalid/graph",
            "fingerprint": "0123456789abcdef"
        }]
    });
    let resp = http
        .post(format!("{url}/api/v1/alerts"))
        .bearer_auth("healer-token")
        .json(&payload)
        .send()
        .await?;
    ensure!(
        resp.status().is_success(),
        "healer answered {}",
        resp.status()
    );

    let prom = ark_harness::Prometheus::start(ark_harness::PromConfig {
        scrape_interval: std::time::Duration::from_millis(100),
        evaluation_interval: std::time::Duration::from_millis(100),
        targets: vec![ark_harness::Target::new(
            "ark-healer",
            format!("127.0.0.1:{port}"),
        )],
        ..ark_harness::PromConfig::default()
    })
    .await?;
    ark_harness::wait_for(
        "two scrapes of the healer after it counted the alert",
        std::time::Duration::from_secs(20),
        &[&healer],
        || async {
            let r = prom
                .query("count_over_time(ark_healer_alerts_received_total[1m]) >= 2 and ark_healer_alerts_received_total > 0")
                .await?;
            Ok((!r.is_empty()).then_some(()))
        },
    )
    .await?;

    let path = root().join("dashboards/healer.json");
    let doc: Json = serde_json::from_str(&read(&path)?)?;
    let problems = query_panels("healer.json", &doc, &prom).await?;
    drop(healer);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        problems.is_empty(),
        "dashboard queries:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}
