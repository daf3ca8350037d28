//! NVML collector, end to end:
//! - golden: the recorded 4-GPU scenario (XID 79, double-bit ECC, NVLink down, PCIe downgrade,
//!   a lost GPU) through the poller, the XID sink and the pipeline, scraped through the router,
//!   compared with `tests/golden/nvml_metrics.txt` and checked with the real `promtool`;
//! - graph: the XID makes the consuming pid BlockedBy its GPU (`why`, `ark_root_cause`), an
//!   application XID does not, and the shipped rule pack recognises the events;
//! - the running collector (threads, real pipeline thread, `why` API): an XID is on `/metrics`
//!   without waiting for the polling interval, and shutdown works;
//! - the real NVML source: exercised for real where a GPU and driver exist, otherwise its
//!   "unavailable" path, and the binary with `--collector nvml` keeps serving with `up 0`.
//!
//! Regenerate the golden file after an intended change:
//! `ARK_UPDATE_GOLDEN=1 cargo test -p ark-exporter --test nvml`.
mod common;
use common::promtool_check;
use common::{Kill, http_get};

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ark_exporter::collectors::nvml::poll::{PollSettings, Poller};
use ark_exporter::collectors::nvml::real::NvmlSource;
use ark_exporter::collectors::nvml::recorded;
use ark_exporter::collectors::nvml::source::Cause;
use ark_exporter::collectors::nvml::{
    GpuError, GpuSource, NvmlCollector, PodRef, PodResolver, XidEvent, XidSink,
};
use ark_exporter::collectors::{Collector, CollectorContext, CollectorKind};
use ark_exporter::config::Config;
use ark_exporter::http::{AppState, router};
use ark_exporter::metrics::Telemetry;
use ark_exporter::pipeline::{self, Clock, Pipeline, PipelineConfig};
use ark_exporter::rules::format::DurationSpec;
use ark_exporter::rules::load_dir;
use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// 2025-11-23T12:53:20Z: a fixed clock for the golden run.
const T0: i64 = 1_763_902_400_000;

/// Families this test owns: the GPU ones and what the NVML events do to the graph. The core's
/// other families are covered by `tests/golden.rs` and may change without touching this file.
fn ours(line: &str) -> bool {
    let name = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
        .unwrap_or(line);
    let name = name.split(['{', ' ']).next().unwrap_or("");
    name.starts_with("ark_gpu_")
        || [
            "ark_blocked_by",
            "ark_root_cause",
            "ark_collector_up",
            "ark_events_total",
            "ark_nvml_errors_total",
        ]
        .contains(&name)
}

/// Our families only; sample durations (wall time, the only values that differ between runs)
/// set to 0.
fn normalise(text: &str) -> String {
    text.lines()
        .filter(|l| ours(l))
        .map(|l| {
            if l.starts_with("ark_gpu_sample_duration_seconds{") {
                let (series, _) = l.rsplit_once(' ').unwrap();
                format!("{series} 0")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The value of the first series of `name` carrying all `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn pods() -> PodResolver {
    Arc::new(|pid| {
        (pid == 4242).then(|| PodRef {
            pod: "trainer-0".to_owned(),
            namespace: "ml".to_owned(),
            container: "main".to_owned(),
        })
    })
}

/// The golden scenario: poll, XID 13 on gpu 0 and XID 79 on gpu 3, poll again (gpu 3 lost).
fn golden_run(rules: Option<&[ark_exporter::rules::format::LoadedRule]>) -> (Telemetry, Pipeline) {
    let telemetry = Telemetry::new("golden").unwrap();
    telemetry.collector("nvml").set_up(true);
    // Every GPU's PCI device present (gpu 3 is lost by NVML's word alone).
    let sys = tempfile::tempdir().unwrap();
    for bus in ["18", "28", "38", "48"] {
        std::fs::create_dir_all(sys.path().join(format!("bus/pci/devices/0000:{bus}:00.0")))
            .unwrap();
    }
    let mut poller = Poller::new(
        Arc::new(recorded::golden()),
        4,
        PollSettings::default(),
        Some(pods()),
    )
    .unwrap()
    .with_sysfs(sys.path());
    let sink = XidSink::new(telemetry.clone(), None, Arc::new(|| T0 + 500), false, None);
    let mut p = Pipeline::new(
        Config::default().pipeline(),
        Clock::EventTime,
        rules,
        telemetry.dropped.clone(),
    );
    for e in poller.poll(T0) {
        p.handle_event(&e, "nvml");
    }
    for x in [
        XidEvent {
            gpu: 0,
            xid: Some(13),
        },
        XidEvent {
            gpu: 3,
            xid: Some(79),
        },
    ] {
        if let Some(e) = sink.apply(x) {
            p.handle_event(&e, "nvml");
        }
    }
    for e in poller.poll(T0 + 1_000) {
        p.handle_event(&e, "nvml");
    }
    p.tick(None);
    p.publish(&telemetry);
    telemetry.snapshots.publish("nvml", poller.families());
    (telemetry, p)
}

async fn scrape(app: axum::Router) -> String {
    let res = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert!(res.status().is_success());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn golden_metrics_and_promtool() {
    let (telemetry, _p) = golden_run(None);
    let app = router(AppState {
        telemetry,
        pipeline: None,
        ready: Arc::new(AtomicBool::new(true)),
    });
    let text = normalise(&scrape(app).await);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/nvml_metrics.txt");
    let golden = common::golden::compare_or_update(&path, &text, common::golden::Order::Sorted);
    promtool_check(&golden);

    // What the golden file must say, spelled out so that a regenerated file cannot lose it.
    let s = |name: &str, labels: &[(&str, &str)]| sample(&golden, name, labels);
    assert_eq!(s("ark_gpu_up", &[("gpu", "3")]), Some(0.0));
    for g in ["0", "1", "2"] {
        assert_eq!(s("ark_gpu_up", &[("gpu", g)]), Some(1.0), "gpu {g}");
    }
    assert_eq!(
        s("ark_gpu_xid_errors_total", &[("gpu", "3"), ("xid", "79")]),
        Some(1.0)
    );
    assert_eq!(
        s(
            "ark_gpu_last_xid_timestamp_seconds",
            &[("gpu", "3"), ("xid", "79")]
        ),
        Some((T0 + 500) as f64 / 1000.0)
    );
    assert_eq!(
        s(
            "ark_gpu_ecc_errors_total",
            &[("gpu", "1"), ("kind", "uncorrected")]
        ),
        Some(2.0)
    );
    assert_eq!(
        s("ark_gpu_nvlink_up", &[("gpu", "2"), ("link", "2")]),
        Some(0.0)
    );
    assert_eq!(
        s(
            "ark_gpu_pcie_link_width",
            &[("gpu", "2"), ("which", "current")]
        ),
        Some(8.0)
    );
    assert_eq!(
        s(
            "ark_gpu_pcie_link_generation",
            &[("gpu", "2"), ("which", "max")]
        ),
        Some(5.0)
    );
    assert_eq!(
        s(
            "ark_gpu_process_memory_bytes",
            &[("pid", "4242"), ("pod", "trainer-0"), ("namespace", "ml")]
        ),
        Some(40.0 * (1u64 << 30) as f64)
    );
    // The lost GPU's pid is blocked by it, the XID-13 GPU's pids are not.
    assert_eq!(
        s(
            "ark_root_cause",
            &[("resource", "gpu-3"), ("cause", "error.hw")]
        ),
        Some(1.0)
    );
    assert_eq!(s("ark_root_cause", &[("resource", "gpu-0")]), None);
    assert_eq!(s("ark_collector_up", &[("collector", "nvml")]), Some(1.0));
    for line in golden.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("node=\"golden\""), "no node label: {line}");
    }
}

#[test]
fn an_xid_blocks_the_processes_consuming_that_gpu() {
    let (_t, p) = golden_run(None);
    let rc = p.why(7171).expect("pid 7171 is in the graph");
    assert!(
        rc.iter()
            .any(|r| r.resource == "gpu-3" && r.cause == "error.hw"),
        "{rc:?}"
    );
    let r = rc.iter().find(|r| r.resource == "gpu-3").unwrap();
    let edges: Vec<&str> = r.chain.iter().map(|h| h.edge.as_str()).collect();
    assert_eq!(edges, ["consumes", "blocked_by"], "{r:?}");
    // Double-bit ECC blocks gpu 1's process; NVLink/PCIe faults are topology errors on gpu 2.
    assert!(
        p.why(5151)
            .unwrap()
            .iter()
            .any(|r| r.resource == "gpu-1" && r.cause == "error.hw")
    );
    assert!(
        p.why(6161)
            .unwrap()
            .iter()
            .any(|r| r.resource == "gpu-2" && r.cause == "topo.link_down")
    );
    // XID 13 is the application's fault: the neighbours on gpu 0 are not blocked by it.
    assert_eq!(p.why(4242).unwrap(), []);
    assert_eq!(p.why(4243).unwrap(), []);
    // The pod from the resolver hook reached the graph.
    assert_eq!(
        p.graph()
            .process(4242)
            .and_then(|n| n.pod().map(str::to_owned)),
        Some("trainer-0".to_owned())
    );
}

#[test]
fn the_shipped_rule_pack_recognises_nvml_events() {
    let rules = load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules"),
        true,
    )
    .unwrap();
    let (_t, mut p) = golden_run(Some(&rules.rules));
    let scenes: Vec<String> = p.report().scenes.into_iter().map(|s| s.scene).collect();
    for want in [
        "hardware.gpu.xid_error",
        "hardware.gpu.ecc_error",
        "hardware.gpu.nvlink_degraded",
        "hardware.pcie.degraded",
    ] {
        assert!(scenes.iter().any(|s| s == want), "{want} not in {scenes:?}");
    }

    // XID 74 (NVLink error) as the XID thread reports it, on its own.
    let telemetry = Telemetry::new("x").unwrap();
    let sink = XidSink::new(telemetry.clone(), None, Arc::new(|| T0), false, None);
    let mut p = Pipeline::new(
        Config::default().pipeline(),
        Clock::EventTime,
        Some(&rules.rules),
        telemetry.dropped.clone(),
    );
    let ev = sink
        .apply(XidEvent {
            gpu: 5,
            xid: Some(74),
        })
        .expect("XID 74 is a GPU fault");
    assert_eq!(
        (ev.entity_id.as_str(), ev.value.as_str()),
        ("gpu-5", "XID_74")
    );
    p.handle_event(&ev, "nvml");
    let scenes: Vec<String> = p.report().scenes.into_iter().map(|s| s.scene).collect();
    for want in ["hardware.gpu.nvlink_degraded", "hardware.gpu.xid_error"] {
        assert!(scenes.iter().any(|s| s == want), "{want} not in {scenes:?}");
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gave up waiting (10 s) for: {what}");
}

async fn get(app: &axum::Router, path: &str) -> (u16, String) {
    let res = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_collector_publishes_xids_at_once_and_the_why_api_sees_them() {
    let telemetry = Telemetry::new("e2e").unwrap();
    let p = Pipeline::new(
        PipelineConfig::default(),
        Clock::Wall,
        None,
        telemetry.dropped.clone(),
    );
    let running = pipeline::spawn(p, telemetry.clone()).unwrap();
    let src = Arc::new(recorded::golden());
    let xids = src.xid_sender();
    let mut cfg = Config::default();
    // Ten minutes: anything seen below within seconds did not come from the polling interval.
    cfg.nvml.poll_interval = DurationSpec(600_000);
    let collector = NvmlCollector::new(&cfg.nvml, &cfg.host.procfs).with_source(src);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = CollectorContext::new(CollectorKind::Nvml, &running.sender, &telemetry, stop_rx);
    let task = tokio::spawn(Box::new(collector).run(ctx));
    let app = router(AppState {
        telemetry: telemetry.clone(),
        pipeline: Some(running.client.clone()),
        ready: Arc::new(AtomicBool::new(true)),
    });

    // First poll: every GPU up, pid 7171 known to the graph and blocked by nothing.
    wait_for("first poll on /metrics", || {
        let app = app.clone();
        async move {
            let t = get(&app, "/metrics").await.1;
            sample(&t, "ark_gpu_up", &[("gpu", "3")]) == Some(1.0)
                && sample(&t, "ark_collector_up", &[("collector", "nvml")]) == Some(1.0)
        }
    })
    .await;
    wait_for("pid 7171 in the graph", || {
        let app = app.clone();
        async move {
            let (status, body) = get(&app, "/api/v1/why/7171").await;
            status == 200 && body.contains("\"root_causes\":[]")
        }
    })
    .await;

    xids.send(XidEvent {
        gpu: 3,
        xid: Some(79),
    })
    .unwrap();
    wait_for("XID 79 counted on /metrics", || {
        let app = app.clone();
        async move {
            let t = get(&app, "/metrics").await.1;
            sample(
                &t,
                "ark_gpu_xid_errors_total",
                &[("gpu", "3"), ("xid", "79")],
            ) == Some(1.0)
        }
    })
    .await;
    wait_for("pid 7171 blocked by gpu-3", || {
        let app = app.clone();
        async move {
            let (status, body) = get(&app, "/api/v1/why/7171").await;
            status == 200 && body.contains("\"resource\":\"gpu-3\"") && body.contains("error.hw")
        }
    })
    .await;
    // The XID woke the poller: the lost GPU shows up long before the 10-minute interval.
    wait_for("gpu 3 reported down", || {
        let app = app.clone();
        async move {
            let t = get(&app, "/metrics").await.1;
            sample(&t, "ark_gpu_up", &[("gpu", "3")]) == Some(0.0)
        }
    })
    .await;

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("collector did not stop")
        .unwrap();
    running.client.shutdown();
}

/// STYLE.md item 9: the real backend, tested for real where the machine allows.
#[test]
fn real_nvml_source_where_available() {
    match NvmlSource::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))) {
        Err(GpuError::Unavailable { detail, cause }) => {
            assert!(detail.contains("/nonexistent"), "{detail}");
            assert_eq!(cause, Cause::LibraryNotFound);
        }
        other => panic!("a missing library must be Unavailable, got {other:?}"),
    }
    match NvmlSource::open(None) {
        Err(GpuError::Unavailable { detail, .. }) => {
            // No driver on this machine: the documented degraded path.
            assert!(detail.contains("libnvidia-ml.so"), "{detail}");
        }
        Err(e) => panic!("unexpected error opening NVML: {e}"),
        Ok(src) => {
            // A GPU host: every device answers with an identity and memory, or is reported lost.
            let n = src.device_count().unwrap();
            assert!(!src.driver_version().is_empty());
            for i in 0..n {
                match src.sample(i) {
                    Ok(s) => {
                        assert!(
                            s.info.uuid.starts_with("GPU-") || s.info.uuid.starts_with("MIG-"),
                            "{:?}",
                            s.info
                        );
                        assert!(s.memory_total_bytes.unwrap_or(0) > 0, "gpu {i}: {s:?}");
                        assert!(s.utilization_ratio.is_none_or(|u| (0.0..=1.0).contains(&u)));
                        assert!(s.nvlinks.len() <= 18);
                    }
                    Err(e) => eprintln!("gpu {i} did not answer: {e}"),
                }
            }
        }
    }
}

/// Item 4 of the issue, for real: the binary with `--collector nvml` on this machine.
#[test]
fn binary_with_the_nvml_collector_keeps_serving_without_a_gpu() {
    let nvml_here = NvmlSource::open(None).is_ok_and(|s| s.device_count().is_ok_and(|n| n > 0));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("stderr");
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
            .args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--node-name",
                "n1",
                "--collector",
                "nvml",
                "--log.level",
                "info",
            ])
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let want = if nvml_here { 1.0 } else { 0.0 };
    let mut text = String::new();
    for _ in 0..500 {
        if let Some((200, t)) = http_get(port, "/metrics", Duration::from_secs(5))
            && sample(&t, "ark_collector_up", &[("collector", "nvml")]) == Some(want)
            && (nvml_here
                || std::fs::read_to_string(&log)
                    .unwrap()
                    .contains("NVML collector off"))
        {
            text = t;
            break;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "exporter exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !text.is_empty(),
        "no nvml status on /metrics; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // Everything else keeps working.
    assert_eq!(
        http_get(port, "/readyz", Duration::from_secs(5)).map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        sample(&text, "ark_collector_up", &[("collector", "probe")]),
        Some(1.0)
    );
    assert!(text.contains("ark_graph_nodes{"), "{text}");
    if !nvml_here {
        assert!(!text.contains("ark_gpu_up{"), "{text}");
        let log = std::fs::read_to_string(&log).unwrap();
        assert_eq!(log.matches("NVML collector off").count(), 1, "{log}");
        assert!(log.contains("libnvidia-ml.so"), "{log}");
    }
}

/// Compiles `tests/fixtures/nvml_stub.c` (an ABI stub of a few NVML entry points, see the file).
fn build_stub(dir: &Path) -> std::path::PathBuf {
    build_stub_failing(dir, None)
}

/// The stub with an error class compiled in (see the file's header), as its own library file.
fn build_stub_failing(dir: &Path, class: Option<&str>) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvml_stub.c");
    let out = dir.join(format!("libnvidia-ml-stub-{}.so", class.unwrap_or("ok")));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror"])
        .args(class.map(|c| format!("-DARK_STUB_ERROR=\"{c}\"")))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) is needed to build the NVML ABI stub");
    assert!(status.success(), "building {} failed", src.display());
    out
}

/// The real `NvmlSource` (nvml-wrapper, dlopen, struct layouts, return codes) against the stub:
/// the closest this machine gets to running it. Not a substitute for a GPU.
#[test]
fn real_nvml_source_against_an_abi_stub() {
    use ark_exporter::collectors::nvml::source::Pcie;
    let d = tempfile::tempdir().unwrap();
    let lib = build_stub(d.path());
    let src = NvmlSource::open(Some(&lib)).unwrap();
    assert_eq!(src.driver_version(), "550.90.07");
    assert_eq!(src.device_count().unwrap(), 2);
    let s = src.sample(0).unwrap();
    assert_eq!(s.info.uuid, "GPU-00000000-stub-0000-0000-000000000000");
    assert_eq!(s.info.model, "Stub GPU");
    assert_eq!(s.info.pci_bus_id, "00000000:18:00.0");
    assert_eq!(s.utilization_ratio, Some(0.42));
    assert_eq!(s.memory_used_bytes, Some(1 << 30));
    assert_eq!(s.memory_total_bytes, Some(80 << 30));
    assert_eq!(s.temperature_celsius, Some(55.0));
    assert_eq!(s.power_watts, Some(300.0));
    assert_eq!(
        s.pcie,
        Pcie {
            gen_current: Some(4),
            gen_max: Some(4),
            width_current: Some(8),
            width_max: Some(16),
        }
    );
    assert_eq!(s.nvlinks, [(0, true), (1, false)]);
    // Functions this "driver" lacks are "not supported", not errors.
    assert_eq!(s.ecc, None);
    assert_eq!(s.throttle, None);
    assert_eq!(s.remapped_rows, None);
    assert_eq!(s.retired_pages, None);
    assert!(s.processes.is_empty());
    // NVML_ERROR_GPU_IS_LOST → Lost.
    match src.sample(1) {
        Err(GpuError::Lost { gpu: 1, detail }) => assert!(detail.contains("bus"), "{detail}"),
        other => panic!("gpu 1 must be lost, got {other:?}"),
    }
    // XID events: registered on gpu 0 (gpu 1 is lost), the stub's XID 79 arrives through the
    // real event-set path and is attributed to gpu 0.
    let stop = AtomicBool::new(false);
    let mut got = Vec::new();
    src.watch_xids(2, &stop, Duration::from_millis(50), &mut |x| {
        got.push(x);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(
        got,
        [XidEvent {
            gpu: 0,
            xid: Some(79)
        }]
    );
}

/// The binary serving with the real source on the stub library: one GPU up, one lost, the
/// stub's XID 79 counted and blocking gpu 0 in the graph, everything on `/metrics`.
#[test]
fn binary_with_the_real_source_on_the_abi_stub() {
    let d = tempfile::tempdir().unwrap();
    let lib = build_stub(d.path());
    let cfg = d.path().join("ark.toml");
    std::fs::write(
        &cfg,
        format!(
            "[nvml]\nlibrary = \"{}\"\npoll_interval = \"200ms\"\n",
            lib.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = d.path().join("stderr");
    // gpu 0's PCI device is present (gpu 1 never tells its bus id: it is lost from the start).
    let sys = fake_sysfs(d.path(), &["0000:18:00.0"]);
    let mut child = Kill(
        Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
            .args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--node-name",
                "n1",
                "--collector",
                "nvml",
                "--config",
            ])
            .arg(&cfg)
            .arg("--path.sysfs")
            .arg(&sys)
            .env_remove("NODE_NAME")
            .env_remove("ARK_NVML_STUB_ERROR")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut text = String::new();
    for _ in 0..500 {
        if let Some((200, t)) = http_get(port, "/metrics", Duration::from_secs(5))
            && sample(&t, "ark_gpu_up", &[("gpu", "1")]) == Some(0.0)
            && sample(&t, "ark_gpu_up", &[("gpu", "0")]) == Some(1.0)
            && sample(
                &t,
                "ark_gpu_xid_errors_total",
                &[("gpu", "0"), ("xid", "79")],
            )
            .is_some()
            && sample(
                &t,
                "ark_blocked_by",
                &[("resource", "gpu-0"), ("error", "error.hw")],
            )
            .is_some()
        {
            text = t;
            break;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "exporter exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty(), "no GPU series on /metrics; log:\n{log}");
    let s = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(s("ark_collector_up", &[("collector", "nvml")]), Some(1.0));
    assert_eq!(
        s(
            "ark_gpu_info",
            &[
                ("gpu", "0"),
                ("model", "Stub GPU"),
                ("driver_version", "550.90.07")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(s("ark_gpu_utilization_ratio", &[("gpu", "0")]), Some(0.42));
    assert_eq!(s("ark_gpu_power_watts", &[("gpu", "0")]), Some(300.0));
    assert_eq!(
        s("ark_gpu_nvlink_up", &[("gpu", "0"), ("link", "1")]),
        Some(0.0)
    );
    assert_eq!(
        s(
            "ark_gpu_pcie_link_width",
            &[("gpu", "0"), ("which", "current")]
        ),
        Some(8.0)
    );
    assert_eq!(
        s("ark_gpu_xid_errors_total", &[("gpu", "0"), ("xid", "79")]),
        Some(1.0)
    );
    assert!(
        s(
            "ark_gpu_last_xid_timestamp_seconds",
            &[("gpu", "0"), ("xid", "79")]
        )
        .is_some()
    );
    assert_eq!(
        s(
            "ark_blocked_by",
            &[("resource", "gpu-0"), ("error", "error.hw")]
        ),
        Some(1.0)
    );
    assert_eq!(
        log.matches("Watching critical XID events").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("not watched on some GPUs").count(), 1, "{log}");
    assert!(!log.contains("XID events unavailable"), "{log}");
    assert_eq!(log.matches("GPU lost:").count(), 1, "{log}");
    assert_eq!(s("ark_gpu_pci_present", &[("gpu", "0")]), Some(1.0));
    assert_eq!(s("ark_gpu_observable", &[("gpu", "1")]), Some(1.0));
    assert_eq!(
        s("ark_nvml_errors_total", &[("reason", "gpu_lost")]).map(|v| v > 0.0),
        Some(true)
    );
    // The PCI device disappears (fell off the bus): gpu 0 is lost on that evidence alone.
    std::fs::remove_dir(sys.join("bus/pci/devices/0000:18:00.0")).unwrap();
    let mut gone = false;
    for _ in 0..500 {
        if let Some((200, t)) = http_get(port, "/metrics", Duration::from_secs(5))
            && sample(&t, "ark_gpu_up", &[("gpu", "0")]) == Some(0.0)
            && sample(&t, "ark_gpu_pci_present", &[("gpu", "0")]) == Some(0.0)
        {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gone,
        "gpu 0 not reported lost after its PCI device went away"
    );
    assert!(!log.contains("NVML collector off"), "{log}");
}

/// `<dir>/sys/bus/pci/devices/<bdf>` for each bus id; returns the sysfs root.
fn fake_sysfs(dir: &Path, bdfs: &[&str]) -> std::path::PathBuf {
    let sys = dir.join("sys");
    for b in bdfs {
        std::fs::create_dir_all(sys.join("bus/pci/devices").join(b)).unwrap();
    }
    std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
    sys
}

/// Issue 16 item 5 through the real `NvmlSource`: each error class of the stub library maps to
/// its bounded cause, and only GPU_IS_LOST is `Lost`.
#[test]
fn real_nvml_source_classifies_each_error_class_of_the_stub() {
    let d = tempfile::tempdir().unwrap();
    for (class, cause) in [
        ("init", Cause::InitFailed),
        ("init_mismatch", Cause::DriverMismatch),
    ] {
        let lib = build_stub_failing(d.path(), Some(class));
        match NvmlSource::open(Some(&lib)) {
            Err(e @ GpuError::Unavailable { .. }) => {
                assert_eq!(e.reason(), cause.label(), "{class}: {e}")
            }
            other => panic!("{class}: want Unavailable, got {other:?}"),
        }
    }
    for (class, cause) in [
        ("mismatch", Cause::DriverMismatch),
        ("no_permission", Cause::NoPermission),
        ("not_supported", Cause::NotSupported),
        ("uninitialized", Cause::Uninitialized),
    ] {
        let lib = build_stub_failing(d.path(), Some(class));
        let src = NvmlSource::open(Some(&lib)).unwrap();
        for gpu in 0..2 {
            match src.sample(gpu) {
                Err(e @ GpuError::Unobservable { .. }) => {
                    assert_eq!(e.reason(), cause.label(), "{class}: {e}");
                    assert!(!e.is_evidence());
                }
                other => panic!("{class} gpu {gpu}: want Unobservable, got {other:?}"),
            }
        }
    }
    let lib = build_stub_failing(d.path(), Some("lost"));
    let src = NvmlSource::open(Some(&lib)).unwrap();
    match src.sample(0) {
        Err(e @ GpuError::Lost { .. }) => assert!(e.is_evidence()),
        other => panic!("want Lost, got {other:?}"),
    }
}

/// The binary on the stub, one error class at a time (selected with `ARK_NVML_STUB_ERROR` after
/// a first healthy poll): software classes give `ark_gpu_observable 0` and
/// `ark_collector_up{collector="nvml"} 0` and never `ark_gpu_up 0`; GPU_IS_LOST gives `up 0`.
#[test]
fn binary_reports_software_failures_as_unobservable_and_only_gpu_is_lost_as_down() {
    let d = tempfile::tempdir().unwrap();
    let lib = build_stub(d.path());
    let sys = fake_sysfs(d.path(), &["0000:18:00.0"]);
    let cfg = d.path().join("ark.toml");
    std::fs::write(
        &cfg,
        format!(
            "[nvml]\nlibrary = \"{}\"\npoll_interval = \"100ms\"\ndevice_timeout = \"300ms\"\n\
             first_poll_timeout = \"2s\"\nretry_interval = \"200ms\"\n",
            lib.display()
        ),
    )
    .unwrap();
    let cases: [(&str, Option<&str>, &str); 7] = [
        ("init", None, "init_failed"),
        ("init_mismatch", None, "driver_mismatch"),
        ("mismatch", Some("2"), "driver_mismatch"),
        ("no_permission", Some("2"), "no_permission"),
        ("not_supported", Some("2"), "not_supported"),
        ("timeout", Some("2"), "timeout"),
        ("lost", Some("2"), "gpu_lost"),
    ];
    let children: Vec<_> = cases
        .iter()
        .map(|&(class, after, _)| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = d.path().join(format!("{class}.stderr"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ark-exporter"));
            cmd.args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--node-name",
                "n1",
                "--collector",
                "nvml",
                "--config",
            ])
            .arg(&cfg)
            .arg("--path.sysfs")
            .arg(&sys)
            .env_remove("NODE_NAME")
            .env("ARK_NVML_STUB_ERROR", class)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
            match after {
                Some(n) => cmd.env("ARK_NVML_STUB_ERROR_AFTER", n),
                None => cmd.env_remove("ARK_NVML_STUB_ERROR_AFTER"),
            };
            (port, log, Kill(cmd.spawn().unwrap()))
        })
        .collect();
    for ((class, after, reason), (port, log, mut child)) in cases.into_iter().zip(children) {
        let lost = class == "lost";
        let mut text = String::new();
        for _ in 0..500 {
            if let Some((200, t)) = http_get(port, "/metrics", Duration::from_secs(5)) {
                let errors = sample(&t, "ark_nvml_errors_total", &[("reason", reason)]);
                let done = if lost {
                    sample(&t, "ark_gpu_up", &[("gpu", "0")]) == Some(0.0)
                } else if after.is_some() {
                    sample(&t, "ark_gpu_observable", &[("gpu", "0")]) == Some(0.0)
                        && sample(&t, "ark_gpu_observable", &[("gpu", "1")]) == Some(0.0)
                        && sample(&t, "ark_collector_up", &[("collector", "nvml")]) == Some(0.0)
                } else {
                    sample(&t, "ark_collector_up", &[("collector", "nvml")]) == Some(0.0)
                };
                if done && errors.is_some_and(|v| v > 0.0) {
                    text = t;
                    break;
                }
            }
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "{class}: exporter exited"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(!text.is_empty(), "{class}: not reported; log:\n{log}");
        let down: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ark_gpu_up{") && l.ends_with(" 0"))
            .collect();
        if lost {
            assert_eq!(
                sample(&text, "ark_collector_up", &[("collector", "nvml")]),
                Some(1.0),
                "NVML answered \"lost\": the collector works"
            );
            assert_eq!(
                sample(&text, "ark_gpu_observable", &[("gpu", "0")]),
                Some(1.0)
            );
        } else {
            assert!(down.is_empty(), "{class}: {down:?}\n{log}");
            assert!(!log.contains("GPU lost"), "{class}: {log}");
        }
        if after.is_some() {
            // The first poll was healthy: identity and bus id known, PCI device present.
            assert!(
                sample(&text, "ark_gpu_info", &[("gpu", "0")]).is_some(),
                "{class}"
            );
            assert_eq!(
                sample(&text, "ark_gpu_pci_present", &[("gpu", "0")]),
                Some(1.0),
                "{class}"
            );
        } else {
            assert!(!text.contains("ark_gpu_up{"), "{class}");
            assert!(log.contains("NVML collector off"), "{class}: {log}");
        }
    }
}
