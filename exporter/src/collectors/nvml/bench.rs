//! `ark-exporter bench nvml`: what the NVML collector costs, printed as JSON. Not a test: it
//! asserts nothing. Run it on a release build.
//!
//! - `encode`: `/metrics` encoding (`Telemetry::encode`, what the handler does) with the snapshot
//!   of `--gpus` × `--processes` from the recorded source (target ≤ 1 ms for 8 × 64);
//! - `families`: building that snapshot from the polled state (once per poll, not per scrape);
//! - `poll`: one polling cycle; with `--source real` this is the NVML cost on the host's GPUs
//!   (target ≤ 20 ms for 8 GPUs);
//! - `xid_to_metrics`: an XID sent into the recorded source's event channel until the new count is
//!   visible in `/metrics` output, through the running collector (XID thread, snapshot publish,
//!   encode), with a real pipeline thread behind it (target ≤ 100 ms).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use super::recorded::fleet;
use super::source::{GpuSource, XidEvent};
use super::{NvmlCollector, PollSettings, Poller, real};
use crate::collectors::{Collector, CollectorContext, CollectorKind};
use crate::config::Config;
use crate::metrics::Telemetry;
use crate::pipeline::{self, Clock, Pipeline, PipelineConfig};

/// Where samples come from.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum BenchSource {
    /// `--gpus` × `--processes` scripted H100 answers.
    #[default]
    Recorded,
    /// The host's GPUs through NVML (`--gpus`/`--processes` ignored; no XID part).
    Real,
}

#[derive(Debug, Args)]
pub struct NvmlBenchArgs {
    #[arg(long, default_value_t = 8)]
    pub gpus: u32,
    #[arg(long, default_value_t = 64)]
    pub processes: u32,
    /// Encodings / polls timed.
    #[arg(long, default_value_t = 2000)]
    pub iterations: u32,
    /// XIDs sent for the latency part.
    #[arg(long, default_value_t = 200)]
    pub xids: u32,
    #[arg(long, value_enum, default_value_t)]
    pub source: BenchSource,
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut d: Vec<Duration>) -> Stats {
    d.sort_unstable();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(d[((d.len() - 1) as f64 * q).round() as usize]);
    Stats {
        mean_ms: d.iter().map(|x| ms(*x)).sum::<f64>() / d.len() as f64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

fn js(s: Stats) -> serde_json::Value {
    json!({"mean_ms": s.mean_ms, "p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms})
}

/// Value of `ark_gpu_xid_errors_total{gpu=.., xid=..}` in an exposition, if present.
pub fn xid_count(text: &str, gpu: u32, xid: &str) -> Option<f64> {
    let g = format!("gpu=\"{gpu}\"");
    let x = format!("xid=\"{xid}\"");
    text.lines()
        .filter(|l| l.starts_with("ark_gpu_xid_errors_total{") && l.contains(&g) && l.contains(&x))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn run(a: NvmlBenchArgs) -> anyhow::Result<()> {
    let iterations = a.iterations.max(1);
    let (source, gpus): (Arc<dyn GpuSource>, u32) = match a.source {
        BenchSource::Recorded => (Arc::new(fleet(a.gpus, a.processes)), a.gpus),
        BenchSource::Real => {
            let s = real::NvmlSource::open(None).context("opening NVML")?;
            let n = s.device_count().context("counting GPUs")?;
            (Arc::new(s), n)
        }
    };
    if gpus == 0 {
        bail!("no GPU to sample");
    }
    let mut poller = Poller::new(source, gpus, PollSettings::default(), None)?;
    let mut polls = Vec::with_capacity(iterations as usize);
    let poll_iters = if a.source == BenchSource::Real {
        iterations.min(200)
    } else {
        iterations.min(50)
    };
    let mut events = 0;
    for _ in 0..poll_iters {
        let t0 = Instant::now();
        events = poller.poll(0).len();
        polls.push(t0.elapsed());
    }
    let up = poller
        .devices()
        .iter()
        .filter(|d| d.up() == Some(true))
        .count();

    let telemetry = Telemetry::new("bench")?;
    telemetry.collector("nvml").set_up(true);
    let mut build = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t0 = Instant::now();
        let fams = poller.families();
        build.push(t0.elapsed());
        telemetry.snapshots.publish("nvml", fams);
    }
    let text = telemetry.encode();
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    let mut encode = Vec::with_capacity(iterations as usize);
    for _ in 0..iterations {
        let t0 = Instant::now();
        let t = telemetry.encode();
        encode.push(t0.elapsed());
        std::hint::black_box(t);
    }

    let xid = match a.source {
        BenchSource::Recorded => Some(xid_latency(a.gpus, a.xids.max(1))?),
        BenchSource::Real => None,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(
        &mut out,
        &json!({
            "source": format!("{:?}", a.source).to_lowercase(),
            "gpus": gpus,
            "gpus_up": up,
            "processes_per_gpu": a.processes,
            "series": series,
            "bytes": text.len(),
            "events_per_poll": events,
            "encode": js(stats(encode)),
            "families": js(stats(build)),
            "poll": js(stats(polls)),
            "xid_to_metrics": xid.map(js),
            "targets": {"encode_ms": 1.0, "poll_ms_real_8_gpus": 20.0, "xid_to_metrics_ms": 100.0},
        }),
    )?;
    writeln!(out)?;
    Ok(())
}

/// Runs the collector on a recorded source with a real pipeline thread and times XID → `/metrics`.
fn xid_latency(gpus: u32, n: u32) -> anyhow::Result<Stats> {
    let telemetry = Telemetry::new("bench")?;
    let p = Pipeline::new(
        PipelineConfig::default(),
        Clock::Wall,
        None,
        telemetry.dropped.clone(),
    );
    let running = pipeline::spawn(p, telemetry.clone())?;
    let src = Arc::new(fleet(gpus, 4));
    let tx = src.xid_sender();
    let cfg = Config::default();
    let collector =
        NvmlCollector::new(&cfg.nvml, &cfg.host.procfs).with_source(src as Arc<dyn GpuSource>);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctx = CollectorContext::new(CollectorKind::Nvml, &running.sender, &telemetry, stop_rx);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let task = std::thread::spawn(move || rt.block_on(Box::new(collector).run(ctx)));
    let mut lat = Vec::with_capacity(n as usize);
    let mut sent = vec![0u32; gpus as usize];
    for i in 1..=n {
        let gpu = i % gpus;
        sent[gpu as usize] += 1;
        let want = f64::from(sent[gpu as usize]);
        let t0 = Instant::now();
        tx.send(XidEvent { gpu, xid: Some(79) })?;
        loop {
            let text = telemetry.encode();
            if xid_count(&text, gpu, "79").is_some_and(|v| v >= want) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("XID {i} not visible on /metrics after 10 s");
            }
            std::thread::yield_now();
        }
        lat.push(t0.elapsed());
    }
    let _ = stop_tx.send(true);
    let _ = task.join();
    running.client.shutdown();
    Ok(stats(lat))
}
