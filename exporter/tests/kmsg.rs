//! The kmsg collector in the real binary: `--path.kmsg FILE` followed (lines appended while it
//! runs reach `/metrics`), restart semantics on a kmsg dump (records older than the start are
//! not counted, the last fatal XID keeps its true time), a missing path (`up 0`), and the real
//! `/dev/kmsg` (a record written by userspace is ignored).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Kill, free_port, http_get};

fn start(kmsg: &Path, sysfs: Option<&Path>) -> (Kill, u16) {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ark-exporter"));
    cmd.args([
        "--web.listen-address",
        &format!("127.0.0.1:{port}"),
        "--node-name",
        "n1",
    ])
    .arg("--path.kmsg")
    .arg(kmsg);
    for c in ["ebpf", "pods", "process", "probe"] {
        cmd.args(["--no-collector", c]);
    }
    if let Some(s) = sysfs {
        cmd.arg("--path.sysfs").arg(s);
    }
    let child = Kill(
        cmd.env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (child, port)
}

fn metrics(port: u16) -> String {
    http_get(port, "/metrics", Duration::from_secs(5)).map_or_else(String::new, |(_, b)| b)
}

/// Waits until every `want` line is on `/metrics`; returns the last text.
fn wait_for(port: u16, want: &[&str]) -> String {
    let t0 = Instant::now();
    loop {
        let text = metrics(port);
        if want.iter().all(|w| text.lines().any(|l| l == *w)) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "missing {want:?} in:\n{}",
            text.lines()
                .filter(|l| l.contains("kmsg") || l.contains("xid") || l.contains("collector_up"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn follows_a_file_from_its_start() {
    let d = tempfile::tempdir().unwrap();
    let sys = d.path().join("sys");
    let dev = sys.join("bus/pci/devices/0000:3b:00.0");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("class"), "0x030200\n").unwrap();
    std::fs::write(dev.join("vendor"), "0x10de\n").unwrap();
    let log = d.path().join("dmesg.txt");
    std::fs::write(
        &log,
        "[Sun Feb 23 16:24:18 2025] nvidia-nvswitch0: SXid (PCI:0000:08:00.0): 24007, Fatal, Link 12 sourcetrack timeout\n\
         [Sun Feb 23 16:24:19 2025] pcieport 0000:00:01.0: AER: Uncorrected (Fatal) error received: 0000:3b:00.0\n",
    )
    .unwrap();
    let (_child, port) = start(&log, Some(&sys));
    wait_for(
        port,
        &[
            r#"ark_collector_up{collector="kmsg",node="n1"} 1"#,
            r#"ark_nvswitch_sxid_errors_total{device="0000:08:00.0",sxid="24007",severity="fatal",node="n1"} 1"#,
            r#"ark_pcie_aer_errors_total{device="0000:3b:00.0",severity="uncorrected_fatal",class="gpu",node="n1"} 1"#,
        ],
    );
    append(
        &log,
        "Oct 02 10:41:07 host kernel: NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.\n\
         Oct 02 10:41:07 host kernel: INFO: task python:1234 blocked for more than 120 seconds.\n",
    );
    let text = wait_for(
        port,
        &[
            r#"ark_gpu_xid_errors_total{gpu="0000:3b:00.0",xid="79",source="kmsg",node="n1"} 1"#,
            r#"ark_kernel_events_total{kind="hung_task",node="n1"} 1"#,
            r#"ark_kmsg_lines_total{result="recognized",node="n1"} 4"#,
        ],
    );
    // The pipeline saw the XID as an event of source kmsg and did not count it again.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ark_gpu_xid_errors_total") && l.contains(r#"source="events""#)),
        "kmsg events counted twice:\n{text}"
    );
    let t0 = Instant::now();
    loop {
        let text = metrics(port);
        if text
            .lines()
            .any(|l| l.starts_with("ark_events_total") && l.contains(r#"source="kmsg""#))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no kmsg event:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Truncation: read again from the start.
    std::fs::write(
        &log,
        "[Sun Feb 23 16:30:00 2025] nvidia-nvswitch0: SXid (PCI:0000:08:00.0): 24007, Fatal, again\n",
    )
    .unwrap();
    wait_for(
        port,
        &[
            r#"ark_nvswitch_sxid_errors_total{device="0000:08:00.0",sxid="24007",severity="fatal",node="n1"} 2"#,
        ],
    );
}

fn boot_s() -> i64 {
    std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn restart_does_not_count_old_records_but_keeps_the_last_fatal_xid_time() {
    let boot = boot_s();
    let usec = |at: f64| ((at - boot as f64) * 1e6) as u64;
    let old = (now_s() - 300.0).floor();
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("kmsg.dump");
    std::fs::write(
        &log,
        format!(
            "3,100,{},-;NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE\n\
             3,101,{},-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus.\n\
             3,102,{},-;Out of memory: Killed process 9 (x)\n",
            usec(old - 60.0),
            usec(old),
            usec(old)
        ),
    )
    .unwrap();
    let (_child, port) = start(&log, None);
    let text = wait_for(
        port,
        &[
            r#"ark_gpu_xid_errors_total{gpu="0000:3b:00.0",xid="79",source="kmsg",node="n1"} 0"#,
            r#"ark_kernel_events_total{kind="oom_kill",node="n1"} 0"#,
        ],
    );
    let ts = value(
        &text,
        r#"ark_gpu_last_xid_timestamp_seconds{gpu="0000:3b:00.0",xid="79",source="kmsg""#,
    )
    .unwrap();
    assert!((ts - old).abs() < 2.0, "true time {old}, published {ts}");
    assert!(
        !text.contains(r#"xid="48""#),
        "only the most recent fatal XID per GPU:\n{text}"
    );
    // A record after the start counts.
    append(
        &log,
        &format!(
            "3,103,{},-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, again\n",
            usec(now_s() + 1.0)
        ),
    );
    wait_for(
        port,
        &[r#"ark_gpu_xid_errors_total{gpu="0000:3b:00.0",xid="79",source="kmsg",node="n1"} 1"#],
    );
}

#[test]
fn missing_path_is_down_not_fatal() {
    let d = tempfile::tempdir().unwrap();
    let (_child, port) = start(&d.path().join("absent"), None);
    wait_for(port, &[r#"ark_collector_up{collector="kmsg",node="n1"} 0"#]);
}

#[test]
fn real_dev_kmsg_ignores_userspace_records() {
    let Ok(mut w) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") else {
        eprintln!("skipped: /dev/kmsg not writable (needs root)");
        return;
    };
    if std::fs::File::open("/dev/kmsg").is_err() {
        eprintln!("skipped: /dev/kmsg not readable");
        return;
    }
    let (_child, port) = start(Path::new("/dev/kmsg"), None);
    let text = wait_for(port, &[r#"ark_collector_up{collector="kmsg",node="n1"} 1"#]);
    // Let it read the ring buffer.
    std::thread::sleep(Duration::from_millis(1500));
    let text2 = metrics(port);
    let ignored = |t: &str| value(t, r#"ark_kmsg_lines_total{result="ignored""#).unwrap_or(0.0);
    let before = ignored(&text2).max(ignored(&text));
    // Userspace asks for facility 0 (`<3>`); the kernel stores it as facility user.
    w.write_all(b"<3>NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=ark-test, forged by userspace\n")
        .unwrap();
    let t0 = Instant::now();
    loop {
        let t = metrics(port);
        if ignored(&t) > before {
            assert!(
                !t.lines().any(|l| l.starts_with("ark_gpu_xid_errors_total")
                    && l.contains(r#"gpu="0000:3b:00.0""#)
                    && l.contains(r#"source="kmsg""#)),
                "a userspace record was taken for an XID:\n{t}"
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the record written to /dev/kmsg was not read"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every fixture through the collector's state: the metric families it publishes, compared with
/// `tests/golden/kmsg_metrics.txt` (sorted; the timestamp values masked, since yearless journal
/// lines take the current year). The golden file is also what ties the kernel-log metric names
/// the alerts use to the exporter (`tests/tests/alerts.rs::metric_names_are_in_the_contract`).
/// Regenerate: `ARK_UPDATE_GOLDEN=1 cargo test -p ark-exporter --test kmsg golden`.
#[test]
fn golden_metrics_of_every_fixture() {
    use ark_exporter::collectors::kmsg::state::{KmsgState, Lookup};
    use ark_exporter::gpu_map::GpuMap;
    let none = Path::new("/nonexistent");
    let gpus = GpuMap::default();
    gpus.insert("0000:3b:00.0", 3);
    let mut state = KmsgState::new(Lookup::new(gpus, none, none), 0, Some(0), 512, false);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kmsg");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let mut events = Vec::new();
    for path in names {
        let bytes = std::fs::read(&path).unwrap();
        for line in bytes.split(|&b| b == b'\n') {
            state.handle(line, 1_700_000_000_000, &mut events);
        }
    }
    let mut text = String::new();
    use prometheus::Encoder;
    let mut buf = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&state.families(), &mut buf)
        .unwrap();
    for line in String::from_utf8(buf).unwrap().lines() {
        match line.strip_prefix("ark_gpu_last_xid_timestamp_seconds{") {
            Some(rest) => {
                let labels = rest.rsplit_once(' ').map_or(rest, |(l, _)| l);
                text.push_str(&format!(
                    "ark_gpu_last_xid_timestamp_seconds{{{labels} <ts>\n"
                ));
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(!events.is_empty());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kmsg_metrics.txt");
    common::golden::compare_or_update(&golden, &text, common::golden::Order::Sorted);
}
