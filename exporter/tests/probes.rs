//! External probes for real: shell scripts as probes, the real pipeline thread, the real
//! registry. Covers the bad-probe cases of the issue: malformed output, huge lines, non-UTF-8,
//! a probe that exits instantly, one that does not exist, one that floods, one that hangs.
//! No timed assertions: every wait polls until a condition holds (bounded by a generous limit).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ark_exporter::collectors::{CollectorContext, CollectorKind};
use ark_exporter::config::{Config, ProbeSpec};
use ark_exporter::metrics::Telemetry;
use ark_exporter::pipeline::{self, Clock, Pipeline, PipelineConfig};
use ark_exporter::rules::format::DurationSpec;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn config(probes: &[&Path]) -> Config {
    let mut cfg = Config {
        probes: probes
            .iter()
            .map(|p| ProbeSpec::Path(p.to_string_lossy().into_owned()))
            .collect(),
        ..Config::default()
    };
    cfg.probe.backoff_initial = DurationSpec(10);
    cfg.probe.backoff_max = DurationSpec(50);
    cfg
}

async fn wait_for(telemetry: &Telemetry, what: &str, pred: impl Fn(&str) -> bool) -> String {
    for _ in 0..1000 {
        let text = telemetry.encode();
        if pred(&text) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}:\n{}", telemetry.encode());
}

fn value(text: &str, series_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Running {
    telemetry: Telemetry,
    stop: tokio::sync::watch::Sender<bool>,
    client: pipeline::PipelineClient,
}

fn start(cfg: &Config) -> Running {
    let telemetry = Telemetry::new("t").unwrap();
    let pc = PipelineConfig {
        publish_interval: Duration::from_millis(5),
        ..PipelineConfig::default()
    };
    let p = Pipeline::new(pc, Clock::Wall, None, telemetry.dropped.clone());
    let running = pipeline::spawn(p, telemetry.clone()).unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let c = CollectorKind::Probe.build(cfg).unwrap();
    let ctx = CollectorContext::new(CollectorKind::Probe, &running.sender, &telemetry, stop_rx);
    tokio::spawn(c.run(ctx));
    Running {
        telemetry,
        stop,
        client: running.client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_bad_lines_from_a_probe() {
    let d = tempfile::tempdir().unwrap();
    let huge = "x".repeat(70 * 1024);
    let p = script(
        d.path(),
        "inject.sh",
        &format!(
            r#"now=$(date +%s%3N)
echo "{{\"ts\": $now, \"event_type\": \"compute.util\", \"entity_id\": \"gpu-0\", \"job_id\": \"j\", \"pid\": 42, \"value\": \"97\"}}"
echo "{{\"ts\": $now, \"event_type\": \"error.hw\", \"entity_id\": \"gpu-0\", \"job_id\": null, \"pid\": null, \"value\": \"XID 79\"}}"
echo "garbage"
echo "{{\"ts\": $now, \"event_type\": \"nope\", \"entity_id\": \"gpu-0\", \"value\": \"1\"}}"
echo "{{\"ts\": 99999999999999, \"event_type\": \"compute.util\", \"entity_id\": \"gpu-0\", \"value\": \"1\"}}"
echo "{{\"ts\": 1000, \"event_type\": \"compute.util\", \"entity_id\": \"gpu-0\", \"value\": \"1\"}}"
echo "{huge}"
printf '\377\376\n'
echo "probe log line" >&2
exec sleep 1000"#
        ),
    );
    let r = start(&config(&[&p]));
    let text = wait_for(&r.telemetry, "events and drops", |t| {
        t.contains("ark_blocked_by{resource=\"gpu-0\",error=\"error.hw\"")
            && value(t, "ark_probe_malformed_lines_total{probe=\"inject.sh\"") >= 4.0
            && value(t, "ark_events_clamped_total{reason=\"timestamp_past\"") >= 1.0
    })
    .await;
    assert_eq!(
        value(
            &text,
            "ark_events_total{event_type=\"compute.util\",source=\"probe\""
        ),
        3.0,
        "the two events with absurd timestamps are applied at the clock's time"
    );
    assert_eq!(
        value(
            &text,
            "ark_events_clamped_total{reason=\"timestamp_future\""
        ),
        1.0
    );
    assert_eq!(
        value(&text, "ark_events_dropped_total{reason=\"malformed_json\""),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "ark_events_dropped_total{reason=\"unknown_event_type\""
        ),
        1.0
    );
    assert_eq!(
        value(&text, "ark_events_dropped_total{reason=\"oversized_line\""),
        1.0
    );
    assert_eq!(
        value(&text, "ark_events_dropped_total{reason=\"invalid_utf8\""),
        1.0
    );
    assert_eq!(value(&text, "ark_collector_up{collector=\"probe\""), 1.0);
    let why = r.client.why(42).await.unwrap().unwrap();
    assert_eq!(why[0].cause, "error.hw");
    r.stop.send(true).unwrap();
    r.client.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_exit_and_missing_probe_are_restarted_with_backoff() {
    let d = tempfile::tempdir().unwrap();
    let quick = script(d.path(), "quick.sh", "exit 3");
    let missing = d.path().join("missing.sh");
    let r = start(&config(&[&quick, &missing]));
    let text = wait_for(&r.telemetry, "restarts", |t| {
        value(t, "ark_probe_restarts_total{probe=\"quick.sh\"") >= 3.0
            && value(t, "ark_probe_restarts_total{probe=\"missing.sh\"") >= 3.0
    })
    .await;
    assert_eq!(value(&text, "ark_collector_up{collector=\"probe\""), 0.0);
    // The exporter still answers.
    assert!(r.client.is_running());
    r.stop.send(true).unwrap();
    r.client.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_probe_is_dropped_not_waited_for() {
    let d = tempfile::tempdir().unwrap();
    let p = script(
        d.path(),
        "flood.sh",
        r#"exec yes '{"ts": 1700000000000, "event_type": "compute.util", "entity_id": "gpu-0", "value": "1"}'"#,
    );
    let telemetry = Telemetry::new("t").unwrap();
    // Nobody drains this queue: the probe must not block, it must drop and count.
    let (sender, _rx) = pipeline::channel(16, telemetry.dropped.clone());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let c = CollectorKind::Probe.build(&config(&[&p])).unwrap();
    let ctx = CollectorContext::new(CollectorKind::Probe, &sender, &telemetry, stop_rx);
    let task = tokio::spawn(c.run(ctx));
    wait_for(&telemetry, "queue_full drops", |t| {
        value(t, "ark_events_dropped_total{reason=\"queue_full\"") >= 10_000.0
    })
    .await;
    stop.send(true).unwrap();
    // Shutdown ends the collector even while the probe floods.
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("collector stops on shutdown")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_probe_costs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = script(d.path(), "hang.sh", "exec sleep 1000");
    let r = start(&config(&[&p]));
    let text = wait_for(&r.telemetry, "probe up", |t| {
        value(t, "ark_collector_up{collector=\"probe\"") == 1.0
    })
    .await;
    assert_eq!(
        value(&text, "ark_probe_restarts_total{probe=\"hang.sh\""),
        0.0
    );
    // Queries are answered while the probe says nothing.
    assert!(r.client.why(1).await.unwrap().is_none());
    r.stop.send(true).unwrap();
    r.client.shutdown();
}
