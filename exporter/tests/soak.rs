//! Flood and soak (issue "Hardening"): the real binary is fed 1,000,000 distinct pids at
//! 100,000 events/s for a minute by a probe, while a scraper reads `/metrics` every second.
//! It must keep answering, stay under 128 MiB of RSS and within the per-node
//! series budget of DESIGN.md "Scale" (2,000), and account for every event (applied or counted
//! as dropped). The numbers it measured are printed. `ARK_SOAK_SECONDS` shortens or lengthens
//! the run (default 60); `ARK_SOAK_EXPORTER` names the exporter binary to flood (scripts/test
//! passes the release build; default: this profile's build). nextest runs it alone
//! (`.config/nextest.toml`) so the rate it reports is not shared with another test.

mod common;
use common::Kill;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The graph's byte budget (32 MiB) keeps the process far under the DaemonSet limit (256 Mi):
/// the hostile-flood bound of issue 15.
const RSS_CAP_BYTES: u64 = 128 * 1024 * 1024;
const SERIES_BUDGET: usize = 2_000;

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

/// User + system CPU seconds the process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state; utime and stime
    // are the 14th and 15th fields of the line, i.e. the 12th and 13th after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes `rate` events/s of ever-new pids (1,000,000 distinct, then wrapping) for `secs` into
/// `fifo`, which the probe (`cat`) relays to the exporter: the generator runs here, in Rust, so
/// it keeps the rate that a Python generator could not on a 2-core machine. Returns how many
/// events it wrote, and the open pipe (closing it would end the probe).
fn flood(fifo: &std::path::Path, rate: u64, secs: u64) -> (u64, std::fs::File) {
    const BATCH: u64 = 1_000;
    let mut out = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut buf = String::with_capacity(BATCH as usize * 128);
    while start.elapsed() < Duration::from_secs(secs) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        buf.clear();
        for i in n..n + BATCH {
            use std::fmt::Write as _;
            let pid = 1000 + i % 1_000_000;
            let t = if i % 10 == 0 {
                "transport.drop"
            } else {
                "compute.util"
            };
            let _ = writeln!(
                buf,
                r#"{{"ts":{ts},"event_type":"{t}","entity_id":"gpu-{}","job_id":"job-{}","pid":{pid},"value":"{}"}}"#,
                i % 8,
                i % 64,
                i % 100
            );
        }
        out.write_all(buf.as_bytes()).unwrap();
        n += BATCH;
        let due = Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
    (n, out)
}

#[test]
fn a_minute_of_100k_events_per_second_over_a_million_pids() {
    let secs: u64 = std::env::var("ARK_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("events.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    let probe = d.path().join("flood.sh");
    std::fs::write(&probe, format!("#!/bin/sh\nexec cat {}\n", fifo.display())).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The build users deploy is the release one; a debug build drops a good share of 100,000
    // events/s on a 2-core machine (counted, so the test still holds, but the rate is not the
    // one asked for). scripts/test builds the release binary and names it here.
    let bin = std::env::var("ARK_SOAK_EXPORTER")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ark-exporter").to_owned());
    let exporter = Kill(
        Command::new(&bin)
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
    // Blocks in open(2) until the exporter's probe opens the pipe for reading.
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || flood(&fifo, 100_000, secs))
    };
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
    let (sent, _pipe) = writer.join().expect("the flood writer finished");
    let sent = sent as f64;
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
    let cpu = cpu_seconds(pid) / start.elapsed().as_secs_f64() * 100.0;
    eprintln!("soak binary: {bin}");
    eprintln!(
        "soak {secs} s: sent {sent} events ({:.0}/s), applied {applied}, dropped {dropped} \
         (queue full), graph evictions {evicted}; {scrapes} scrapes ({failed} failed, slowest \
         {slowest:?}), peak RSS {:.1} MiB, peak series {max_series}, exporter CPU {cpu:.0}% of one core",
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

/// How long a scrape may take before it counts as failed: Prometheus' default `scrape_timeout`
/// (10 s). A shorter bound would be a timed assertion on a shared 2-core machine, where a whole
/// VM stalls for a second or two now and then (CI once saw 2 of 61 scrapes over 2 s while the
/// slowest answered one took 50 ms); how slow the slowest scrape was is printed, not asserted.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// `/metrics` and friends: the body of a 200 answered within [`SCRAPE_TIMEOUT`], else `None`
/// (a failed scrape).
fn get(port: u16, path: &str) -> Option<String> {
    common::http_get(port, path, SCRAPE_TIMEOUT)
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
}
