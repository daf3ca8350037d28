//! Flood and soak (issue "Hardening"): the real binary is fed 1,000,000 distinct pids at
//! 100,000 events/s for a minute by a probe, while a scraper reads `/metrics` every second.
//! It must keep answering, stay under its RSS cap (256 MiB by default) and within the per-node
//! series budget of DESIGN.md "Scale" (2,000), and account for every event (applied or counted
//! as dropped). The numbers it measured are printed. `ARK_SOAK_SECONDS` shortens or lengthens
//! the run (default 60).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RSS_CAP_BYTES: u64 = 256 * 1024 * 1024;
const SERIES_BUDGET: usize = 2_000;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes `rate` events/s of ever-new pids (1,000,000 distinct, then wrapping) for `secs`.
const FLOOD: &str = r#"
import sys, time
rate, secs = int(sys.argv[1]), float(sys.argv[2])
out = sys.stdout
start = time.time(); n = 0; batch = 2000
while True:
    now = time.time()
    if now - start >= secs: break
    ts = int(now * 1000)
    lines = []
    for i in range(n, n + batch):
        pid = 1000 + i % 1000000
        t = "transport.drop" if i % 10 == 0 else "compute.util"
        lines.append('{"ts":%d,"event_type":"%s","entity_id":"gpu-%d","job_id":"job-%d","pid":%d,"value":"%d"}\n'
                     % (ts, t, i % 8, i % 64, pid, i % 100))
    out.write("".join(lines)); out.flush()
    n += batch
    ahead = n / rate - (time.time() - start)
    if ahead > 0: time.sleep(ahead)
open(sys.argv[3] + ".tmp", "w").write(str(n)); import os; os.rename(sys.argv[3] + ".tmp", sys.argv[3])
time.sleep(3600)
"#;

#[test]
fn a_minute_of_100k_events_per_second_over_a_million_pids() {
    let secs: u64 = std::env::var("ARK_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("flood.py"), FLOOD).unwrap();
    let probe = d.path().join("flood.sh");
    std::fs::write(
        &probe,
        format!(
            "#!/bin/sh\nexec python3 {} 100000 {secs} {}\n",
            d.path().join("flood.py").display(),
            d.path().join("sent").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exporter = Kill(
        Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(["--node-name", "soak", "--no-collector", "ebpf"])
            .args(["--rules", concat!(env!("CARGO_MANIFEST_DIR"), "/../rules")])
            .arg("--probe")
            .arg(&probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = exporter.0.id();
    let start = Instant::now();
    let (mut scrapes, mut failed, mut max_rss, mut max_series) = (0, 0, 0u64, 0usize);
    let mut slowest = Duration::ZERO;
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(secs + 3) {
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        match get(port, "/metrics") {
            Some(text) => {
                scrapes += 1;
                slowest = slowest.max(t.elapsed());
                max_series = max_series.max(text.lines().filter(|l| !l.starts_with('#')).count());
                last = text;
            }
            None => failed += 1,
        }
        max_rss = max_rss.max(rss_bytes(pid));
    }
    // Every event the probe wrote is accounted for: applied to the graph or counted as dropped.
    let sent: f64 = std::fs::read_to_string(d.path().join("sent"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("the flood finished and reported how many events it sent");
    let (mut applied, mut dropped) = (0.0, 0.0);
    for _ in 0..100 {
        if let Some(text) = get(port, "/metrics") {
            applied = text
                .lines()
                .filter(|l| l.starts_with("ark_events_total{") && l.contains("source=\"probe\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            dropped = sum(&text, "ark_events_dropped_total{");
            last = text;
        }
        if applied + dropped >= sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let evicted = sum(&last, "ark_graph_evictions_total{");
    eprintln!(
        "soak {secs} s: sent {sent} events ({:.0}/s), applied {applied}, dropped {dropped} \
         (queue full), graph evictions {evicted}; {scrapes} scrapes ({failed} failed, slowest \
         {slowest:?}), peak RSS {:.1} MiB, peak series {max_series}",
        sent / secs as f64,
        max_rss as f64 / 1048576.0
    );
    // Drops are counted for all sources together (the host collectors add a few events too).
    assert!(applied <= sent, "{applied} applied of {sent} sent");
    assert!(
        applied + dropped >= sent,
        "every event is applied or counted as dropped"
    );
    assert_eq!(failed, 0, "every scrape answered");
    assert!(max_rss < RSS_CAP_BYTES, "RSS {max_rss} over the cap");
    assert!(
        max_series <= SERIES_BUDGET,
        "{max_series} series over the budget"
    );
    assert!(
        evicted > 0.0,
        "old pids were evicted to stay under the caps"
    );
}
