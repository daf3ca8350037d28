//! Golden test (STYLE.md item 8): replay `tests/fixtures/golden.jsonl` with the shipped rules,
//! scrape `/metrics` through the router, compare the sorted text with `tests/golden/metrics.txt`,
//! and run the real `promtool check metrics` on it.
//!
//! Regenerate after an intended change: `ARK_UPDATE_GOLDEN=1 cargo test -p ark-exporter --test golden`.

mod common;

use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ark_exporter::cli::replay_file;
use ark_exporter::config::Config;
use ark_exporter::http::{AppState, router};
use ark_exporter::metrics::Telemetry;
use ark_exporter::rules::load_dir;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn sorted(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

async fn scrape() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = load_dir(&root.join("../rules"), true).unwrap();
    let telemetry = Telemetry::new("golden").unwrap();
    // Series a serving exporter would also have.
    telemetry.collector("probe").set_up(true);
    let _ = telemetry.probes.for_probe("inject.sh");
    let mut p = replay_file(
        &root.join("tests/fixtures/golden.jsonl"),
        &Config::default(),
        Some(&rules),
        &telemetry,
    )
    .unwrap();
    p.tick(None);
    p.publish(&telemetry);
    let app = router(AppState {
        telemetry,
        pipeline: None,
        ready: Arc::new(AtomicBool::new(true)),
    });
    let res = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert!(res.status().is_success());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn metrics_match_golden_and_pass_promtool() {
    let text = scrape().await;
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/metrics.txt");
    if std::env::var_os("ARK_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&golden_path)
        .expect("golden file missing: run with ARK_UPDATE_GOLDEN=1 to create it");
    assert_eq!(
        sorted(&text),
        sorted(&golden),
        "/metrics differs from {} (ARK_UPDATE_GOLDEN=1 regenerates it)",
        golden_path.display()
    );

    // Every series carries the node label.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("node=\"golden\""), "no node label: {line}");
    }
    // What the fixture is there to show.
    for needle in [
        "ark_blocked_by{resource=\"gpu-1\",error=\"error.hw\",node=\"golden\"} 1",
        "ark_root_cause{job_id=\"train-a\",pod=\"trainer-a-0\",namespace=\"ml\",resource=\"gpu-1\",cause=\"error.hw\",node=\"golden\"} 1",
        "ark_waits_on{pid=\"2000\",job_id=\"ckpt\",pod=\"\",namespace=\"\",resource=\"nvme0n1\",node=\"golden\"} 1",
        "ark_scene_active{scene=\"hardware.gpu.xid_error\",entity=\"gpu-1\",job_id=\"\",severity=\"critical\",node=\"golden\"} 1",
        "ark_scene_active{scene=\"network.tcp.retransmit_burst\"",
        "ark_events_dropped_total{reason=\"malformed_json\",node=\"golden\"} 2",
        "ark_events_dropped_total{reason=\"unknown_event_type\",node=\"golden\"} 1",
        "ark_events_dropped_total{reason=\"missing_field\",node=\"golden\"} 1",
        "ark_events_clamped_total{reason=\"timestamp_future\",node=\"golden\"} 1",
        "ark_events_clamped_total{reason=\"timestamp_past\",node=\"golden\"} 1",
        "ark_events_dropped_total{reason=\"oversized_line\",node=\"golden\"} 1",
        "ark_events_dropped_total{reason=\"invalid_utf8\",node=\"golden\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }

    common::promtool_check(&text);
}
