//! The straggler chain with real parts (docs/stragglers.md): probe lines of a job's four nodes,
//! in the protocol's unit (percent), go through the exporter's pipeline; the
//! `ark_job_progress_ratio` each node publishes on `/metrics` becomes the input series of the
//! real `promtool test rules` over the shipped `alerts/straggler.rules.yml`. This is what ties
//! the exporter's unit and label names to the rules: a ratio published in percent, or a label
//! named otherwise, fails here and not only in production.

use std::path::Path;
use std::process::Command;

use ark_exporter::metrics::Telemetry;
use ark_exporter::pipeline::{Clock, Pipeline, PipelineConfig};

const BASE_MS: i64 = 1_700_000_000_000;

/// Per job, the `compute.util` (percent) each of its processes on a node reports.
type Jobs<'a> = &'a [(&'a str, &'a [&'a str])];

/// `/metrics` of one node's exporter after its processes reported `utils` for each job.
fn node_metrics(node: &str, jobs: Jobs<'_>) -> String {
    let t = Telemetry::new(node).unwrap();
    let mut p = Pipeline::new(
        PipelineConfig::default(),
        Clock::EventTime,
        None,
        t.dropped.clone(),
    );
    let mut pid = 1000;
    for (job, utils) in jobs {
        for (gpu, util) in utils.iter().enumerate() {
            pid += 1;
            let line = format!(
                r#"{{"ts": {BASE_MS}, "event_type": "compute.util", "entity_id": "gpu-{gpu}", "job_id": "{job}", "pid": {pid}, "value": "{util}"}}"#
            );
            p.handle_line(line.as_bytes(), "probe");
        }
    }
    p.publish(&t);
    t.encode()
}

/// The value of the series of `family` for `job` in a `/metrics` text.
fn value(text: &str, family: &str, job: &str, node: &str) -> Option<f64> {
    let want = format!(r#"{family}{{job_id="{job}",node="{node}"}} "#);
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map(|v| v.parse().unwrap())
}

#[test]
fn the_exporters_ratio_drives_the_shipped_straggler_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Job train: n4 runs at a quarter of the others. Job slow: every node at 30 %, together.
    let nodes: [(&str, Jobs<'_>); 4] = [
        ("n1", &[("train", &["80", "80"]), ("slow", &["30"])]),
        ("n2", &[("train", &["75", "85"]), ("slow", &["30"])]),
        ("n3", &[("train", &["80", "80"]), ("slow", &["30"])]),
        ("n4", &[("train", &["20", "20"]), ("slow", &["30"])]),
    ];
    let mut series = String::new();
    for (node, jobs) in nodes {
        let text = node_metrics(node, jobs);
        assert_eq!(
            value(&text, "ark_job_processes", "train", node),
            Some(2.0),
            "{text}"
        );
        for job in ["train", "slow"] {
            let v = value(&text, "ark_job_progress_ratio", job, node)
                .unwrap_or_else(|| panic!("no ratio for {job} on {node}:\n{text}"));
            assert!((0.0..=1.0).contains(&v), "{v}");
            // Prometheus stores the exporter's own `node` as `exported_node` and takes `node`
            // from the scrape target (alerts/README.md, "Identity").
            series.push_str(&format!(
                "      - {{series: 'ark_job_progress_ratio{{node=\"{node}\",exported_node=\"{node}\",job_id=\"{job}\",instance=\"{node}:9487\",job=\"ark-exporter\"}}', values: '{v}x20'}}\n"
            ));
        }
    }
    let rules = root.join("alerts/straggler.rules.yml");
    let test = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}    alert_rule_test:
      - {{eval_time: 9m, alertname: JobStragglerNode, exp_alerts: []}}
      - eval_time: 12m
        alertname: JobStragglerNode
        exp_alerts:
          - exp_labels: {{condition: JobStragglerNode, severity: warning, node: n4, job_id: train}}
            exp_annotations:
              summary: Node n4 straggles in job train
              description: "The processes of job train on node n4 have made 25% of the progress (GPU utilisation) of the job's median node for 10 minutes, while the job's other nodes are busy: this node slows the whole job down."
              runbook_url: docs/runbooks/JobStragglerNode.md
"#,
        rules = rules.display()
    );
    let dir = std::env::temp_dir().join(format!("ark-straggler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("straggler.test.yml");
    std::fs::write(&file, &test).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool must be installed (apt-get install prometheus)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
