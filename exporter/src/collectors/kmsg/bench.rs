//! `ark-exporter bench kmsg`: parse + classify rate over a mixed corpus built from the test
//! fixtures (plus the ordinary kernel chatter that makes up most of a real log), and a storm: the
//! collector following a file while a writer appends `--rate` lines/s for `--seconds`, with the
//! collector thread's CPU time (`/proc/thread-self/schedstat`).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use super::parse::{Classifier, parse_line};
use super::state::{KmsgState, Lookup};
use super::{KmsgSection, run_blocking};
use crate::collectors::{CollectorContext, CollectorKind};
use crate::gpu_map::GpuMap;
use crate::metrics::Telemetry;
use crate::pipeline::{self, Clock, Pipeline, PipelineConfig};
use crate::rules::format::DurationSpec;

#[derive(Debug, Args)]
pub struct KmsgBenchArgs {
    /// Lines parsed and classified in the rate test.
    #[arg(long, default_value_t = 2_000_000)]
    pub lines: usize,
    /// Storm: lines appended per second to the followed file (0: no storm).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Storm duration.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
}

const FIXTURES: [&[u8]; 8] = [
    include_bytes!("../../../tests/fixtures/kmsg/xid.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/fell_off_bus.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/xid154.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/nvlink5.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/sxid.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/aer.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/kernel.txt"),
    include_bytes!("../../../tests/fixtures/kmsg/hostile.txt"),
];

/// Ordinary lines (nothing to find in them), the bulk of a real kernel log.
const CHATTER: [&str; 6] = [
    "6,9001,7000000000,-;eth0: renamed from veth1a2b3c4",
    "6,9002,7000000100,-;IPv6: ADDRCONF(NETDEV_CHANGE): cali12ab34cd56e: link becomes ready",
    "[ 7000.000200] EXT4-fs (nvme0n1p1): mounted filesystem with ordered data mode. Quota mode: none.",
    "6,9004,7000000300,-;audit: type=1400 audit(1700000000.123:456): apparmor=\"DENIED\" operation=\"open\"",
    "Oct 02 10:41:07 gpu-node-17 kernel: cni0: port 3(veth9f8e7d6c) entered forwarding state",
    "6,9006,7000000500,-;nvme nvme0: 64/0/0 default/read/poll queues",
];

/// The corpus: every fixture line, and four chatter lines for each.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in FIXTURES {
        for l in f.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            out.push(l.to_vec());
            for c in CHATTER.iter().cycle().skip(out.len() % 6).take(4) {
                out.push(c.as_bytes().to_vec());
            }
        }
    }
    out
}

fn thread_cpu_s() -> Option<f64> {
    let t = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = t.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

pub fn run(a: KmsgBenchArgs) -> anyhow::Result<()> {
    let corpus = corpus();
    let now = crate::collectors::kmsg::wall_ms();
    let mut classifier = Classifier::default();
    let mut recognised = 0usize;
    let t0 = Instant::now();
    for i in 0..a.lines {
        if let Ok(l) = parse_line(&corpus[i % corpus.len()], now)
            && l.is_kernel()
            && !matches!(classifier.classify(l.message), super::parse::Class::Ignored)
        {
            recognised += 1;
        }
    }
    let parse_s = t0.elapsed().as_secs_f64();
    // The whole per-line path (parse, classify, count, events) without I/O.
    let gpus = GpuMap::default();
    for i in 0..8u32 {
        gpus.insert(&format!("0000:{:02x}:00.0", 0x3b + i), i);
    }
    let none = std::path::Path::new("/nonexistent");
    let mut state = KmsgState::new(Lookup::new(gpus, none, none), 0, None, 512, false);
    let mut events = Vec::new();
    let t1 = Instant::now();
    for i in 0..a.lines {
        state.handle(&corpus[i % corpus.len()], now, &mut events);
        events.clear();
    }
    let state_s = t1.elapsed().as_secs_f64();
    let storm = if a.rate > 0 {
        Some(storm(&a, &corpus)?)
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(
        &mut out,
        &json!({
            "corpus_lines": corpus.len(),
            "lines": a.lines,
            "recognised": recognised,
            "parse_classify_lines_per_s": (a.lines as f64 / parse_s).round(),
            "handle_lines_per_s": (a.lines as f64 / state_s).round(),
            "storm": storm,
            "target_lines_per_s": 1_000_000,
        }),
    )?;
    writeln!(out)?;
    Ok(())
}

fn storm(a: &KmsgBenchArgs, corpus: &[Vec<u8>]) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile_dir()?;
    let path = dir.join("kmsg-storm.log");
    std::fs::write(&path, b"")?;
    let telemetry = Telemetry::new("bench")?;
    let p = Pipeline::new(
        PipelineConfig::default(),
        Clock::Wall,
        None,
        telemetry.dropped.clone(),
    );
    let running = pipeline::spawn(p, telemetry.clone())?;
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = CollectorContext::new(CollectorKind::Kmsg, &running.sender, &telemetry, stop_rx);
    let section = KmsgSection {
        path: path.clone(),
        poll_interval: DurationSpec(250),
        ..KmsgSection::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let none = std::path::Path::new("/nonexistent");
    let mut state = KmsgState::new(
        Lookup::new(ctx.gpus.clone(), none, none),
        0,
        None,
        512,
        false,
    );
    let thread_stop = stop.clone();
    let collector = std::thread::spawn(move || {
        let c0 = thread_cpu_s();
        run_blocking(&section, &mut state, &ctx, &thread_stop);
        let total: u64 = super::state::RESULTS.iter().map(|r| state.lines(r)).sum();
        (c0.zip(thread_cpu_s()).map(|(a, b)| b - a), total)
    });
    let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
    let total = u64::from(a.rate) * u64::from(a.seconds);
    let start = Instant::now();
    let mut written = 0u64;
    let mut buf = Vec::new();
    while written < total {
        // Write in 10 ms batches at the requested rate.
        let due = ((start.elapsed().as_secs_f64() * f64::from(a.rate)) as u64).min(total);
        buf.clear();
        while written < due {
            buf.extend_from_slice(&corpus[written as usize % corpus.len()]);
            buf.push(b'\n');
            written += 1;
        }
        f.write_all(&buf)?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = start.elapsed().as_secs_f64();
    // Let the follower catch up (one poll), then stop it.
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let (cpu, read) = collector
        .join()
        .map_err(|_| anyhow::anyhow!("collector thread panicked"))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "rate_lines_per_s": a.rate,
        "seconds": wall,
        "lines_written": written,
        "lines_read": read,
        "collector_thread_cpu_s": cpu,
        "collector_thread_cpu_percent": cpu.map(|c| (c / (wall + 0.6) * 1000.0).round() / 10.0),
    }))
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("ark-kmsg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
