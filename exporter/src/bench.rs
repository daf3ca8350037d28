//! `ark-exporter bench ...`: reproducible micro-benchmarks that print JSON. Inputs are generated
//! in memory before the timed region; only the operation named is timed. Not tests: they assert
//! nothing. Run them on a release build.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::event::{Event, EventType, parse_line};
use crate::graph::{EdgeKind, NodeKind};
use crate::metrics::Telemetry;
use crate::pipeline::{Clock, Pipeline, PipelineConfig};
use crate::rules::format::{LoadedRule, RuleSpec};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Graph ingestion: events/s on the synthetic workload of the exporter issue.
    Graph(GraphArgs),
    /// `error.hw` on a resource with many consuming processes: amortised cost per error event.
    ErrorFanout(FanoutArgs),
    /// Per-event cost of graph + 30 rules at 1k/10k/100k graph nodes.
    Rules(RulesArgs),
    /// JSON Lines parsing: lines/s.
    Parse(ParseArgs),
    /// The hostile flood of issue 15 (entities × 12 event types, ~4 KiB values, 200-byte ids,
    /// a pid each) parsed and applied on the live clock: peak RSS and what the budget shed.
    Flood(FloodArgs),
    /// NVML collector: /metrics encode of GPUs × processes, poll cost, XID → /metrics latency.
    Nvml(crate::collectors::nvml::bench::NvmlBenchArgs),
    /// One full collection of every procfs/sysfs host collector: median/p90 ms.
    Host(crate::collectors::host::HostBenchArgs),
    /// Kernel log: parse + classify lines/s over the fixture corpus, and the collector's CPU
    /// while following a file that grows by `--rate` lines/s.
    Kmsg(crate::collectors::kmsg::bench::KmsgBenchArgs),
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// Events ingested (event n: pid 1000 + n % P, entity gpu-{n % R}, job job-{n % 64},
    /// transport.drop when n % 10 == 0 else compute.util, value n % 100, ts base + n).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Distinct resources R.
    #[arg(long, default_value_t = 8)]
    pub resources: u64,
    /// Distinct pids P.
    #[arg(long, default_value_t = 1024)]
    pub pids: u64,
    /// Add one `error.hw` every K events on a random resource (0: none).
    #[arg(long, default_value_t = 0)]
    pub errors: u64,
    /// Graph node cap (default: the exporter's default).
    #[arg(long)]
    pub max_nodes: Option<usize>,
    /// Graph edge cap (default: the exporter's default).
    #[arg(long)]
    pub max_edges: Option<usize>,
    /// Generate each event just before applying it instead of up front (generation is then
    /// inside the timed region): peak RSS then measures the graph, not the stored workload.
    #[arg(long)]
    pub stream: bool,
}

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Processes consuming the resource.
    #[arg(long, default_value_t = 50_000)]
    pub consumers: u32,
    /// Error events timed.
    #[arg(long, default_value_t = 100_000)]
    pub errors: u64,
}

#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Rules directory to start from; synthetic rules fill up to --rules-count.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    pub rules_count: usize,
    /// Graph sizes (nodes) to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub nodes: Vec<u64>,
    /// Events timed per size.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
}

#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Distinct entities (each gets every event type, type by type).
    #[arg(long, default_value_t = 20_000)]
    pub entities: u64,
    /// Graph byte budget (default: the exporter's default, 32 MiB).
    #[arg(long)]
    pub max_bytes: Option<usize>,
    /// Rules directory applied as well (e.g. `rules`).
    #[arg(long)]
    pub rules: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ParseArgs {
    /// Lines parsed (the graph workload serialised as JSON Lines).
    #[arg(long, default_value_t = 1_000_000)]
    pub lines: u64,
}

/// Peak resident set size, from /proc/self/status (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

const BASE_TS: i64 = 1_700_000_000_000;

/// The issue's workload: event n has pid 1000 + n % P, entity gpu-{n % R}, node node-{n % 16},
/// job job-{n % 64}, transport.drop when n % 10 == 0 else compute.util, value {n % 100},
/// ts base + n; plus one error.hw every K events on a pseudo-random resource.
pub fn workload(events: u64, resources: u64, pids: u64, errors: u64) -> Vec<Event> {
    let mut out = Vec::with_capacity(events as usize + (events / errors.max(1)) as usize);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    for n in 0..events {
        out.push(Event {
            ts: BASE_TS + n as i64,
            event_type: if n % 10 == 0 {
                EventType::TransportDrop
            } else {
                EventType::ComputeUtil
            },
            entity_id: format!("gpu-{}", n % resources.max(1)),
            job_id: Some(format!("job-{}", n % 64)),
            pid: Some((1000 + n % pids.max(1)) as u32),
            value: (n % 100).to_string(),
            node_id: Some(format!("node-{}", n % 16)),
            pod: None,
            namespace: None,
        });
        if errors > 0 && n % errors == errors - 1 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            out.push(Event {
                ts: BASE_TS + n as i64,
                event_type: EventType::ErrorHw,
                entity_id: format!("gpu-{}", rng % resources.max(1)),
                job_id: None,
                pid: None,
                value: "XID 79".to_owned(),
                node_id: Some(format!("node-{}", n % 16)),
                pod: None,
                namespace: None,
            });
        }
    }
    out
}

fn print(v: serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &v)?;
    writeln!(out)?;
    Ok(())
}

fn pipeline(cfg: PipelineConfig, rules: Option<&[LoadedRule]>) -> anyhow::Result<Pipeline> {
    let t = Telemetry::new("bench")?;
    Ok(Pipeline::new(
        cfg,
        Clock::EventTime,
        rules,
        t.dropped.clone(),
    ))
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Graph(a) => bench_graph(a),
        BenchCommand::ErrorFanout(a) => bench_fanout(a),
        BenchCommand::Rules(a) => bench_rules(a),
        BenchCommand::Parse(a) => bench_parse(a),
        BenchCommand::Flood(a) => bench_flood(a),
        BenchCommand::Nvml(a) => crate::collectors::nvml::bench::run(a),
        BenchCommand::Host(a) => print(crate::collectors::host::bench(&a)),
        BenchCommand::Kmsg(a) => crate::collectors::kmsg::bench::run(a),
    }
}

fn bench_graph(a: GraphArgs) -> anyhow::Result<()> {
    let events = if a.stream {
        Vec::new()
    } else {
        workload(a.events, a.resources, a.pids, a.errors)
    };
    let mut cfg = PipelineConfig::default();
    if let Some(n) = a.max_nodes {
        cfg.graph.max_nodes = n;
    }
    if let Some(n) = a.max_edges {
        cfg.graph.max_edges = n;
    }
    let mut p = pipeline(cfg, None)?;
    let rss_before = peak_rss_bytes();
    let t0 = Instant::now();
    let mut count = 0usize;
    if a.stream {
        // Chunks of 1024 keep the generator's memory constant.
        let mut n = 0;
        while n < a.events {
            let chunk = 1024.min(a.events - n);
            for mut ev in workload(chunk, a.resources, a.pids, a.errors) {
                ev.ts += n as i64;
                if let Some(pid) = ev.pid.as_mut() {
                    *pid = (1000 + (u64::from(*pid) - 1000 + n) % a.pids.max(1)) as u32;
                }
                p.apply(&ev, "bench");
                count += 1;
            }
            n += chunk;
        }
    } else {
        for ev in &events {
            p.apply(ev, "bench");
        }
        count = events.len();
    }
    let elapsed = t0.elapsed();
    let g = p.graph();
    let ev = g.evictions();
    print(json!({
        "events": count,
        "stream": a.stream,
        "events_per_sec": (count as f64 / elapsed.as_secs_f64()).round(),
        "peak_rss_before_ingest_bytes": rss_before,
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
        "nodes": g.total_nodes(),
        "edges": g.total_edges(),
        "nodes_by_kind": NodeKind::ALL.map(|k| (k.as_str(), g.node_count(k))).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "edges_by_kind": EdgeKind::ALL.map(|k| (k.as_str(), g.edge_count(k))).into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "evicted": ev,
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}

fn bench_fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let mut p = pipeline(PipelineConfig::default(), None)?;
    let setup: Vec<Event> = (0..a.consumers)
        .map(|i| Event {
            ts: BASE_TS,
            event_type: EventType::ComputeUtil,
            entity_id: "gpu-0".to_owned(),
            job_id: Some(format!("job-{}", i % 64)),
            pid: Some(100_000 + i),
            value: "50".to_owned(),
            node_id: None,
            pod: None,
            namespace: None,
        })
        .collect();
    for ev in &setup {
        p.apply(ev, "bench");
    }
    let errors: Vec<Event> = (0..a.errors)
        .map(|i| Event {
            ts: BASE_TS + 1 + (i / 1000) as i64,
            event_type: EventType::ErrorHw,
            entity_id: "gpu-0".to_owned(),
            job_id: None,
            pid: None,
            value: format!("XID {}", 48 + i % 3),
            node_id: None,
            pod: None,
            namespace: None,
        })
        .collect();
    let t0 = Instant::now();
    for ev in &errors {
        p.apply(ev, "bench");
    }
    let elapsed = t0.elapsed();
    // A query after the errors resolves the transitive blockage for one consumer.
    let q0 = Instant::now();
    let why = p.why(100_000 + a.consumers - 1).unwrap_or_default();
    let why_us = q0.elapsed().as_secs_f64() * 1e6;
    let e0 = Instant::now();
    let families = p.families();
    let export_ms = e0.elapsed().as_secs_f64() * 1000.0;
    print(json!({
        "consumers": a.consumers,
        "error_events": a.errors,
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
        "us_per_error_event": elapsed.as_secs_f64() * 1e6 / a.errors.max(1) as f64,
        "why_us": why_us,
        "why_causes": why.len(),
        "export_ms": export_ms,
        "families": families.len(),
        "edges": p.graph().total_edges(),
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}

/// Synthetic rules mixing every condition type, used to reach `--rules-count`.
fn synthetic_rule(i: usize) -> anyhow::Result<LoadedRule> {
    let cond = match i % 6 {
        0 => format!("[{{type: event, event_type: error.hw, entity_id_pattern: \"gpu-{i}|gpu-x*\", value_pattern: \"XID 4{}\"}}]", i % 10),
        1 => "[{type: event, event_type: compute.util, entity_id_pattern: \"gpu-*\", value_threshold: 99.5}, {type: graph, edge_type: waits_on, to_pattern: \"gpu-*\"}]".to_owned(),
        2 => format!("[{{type: signal, signal: network.tcp.retransmit_rate_1m, op: gte, target: {}}}]", 100 + i),
        3 => "{any: [{type: metric, node_type: Resource, entity_id_pattern: \"nvme*\", metrics: [{key: storage.qdepth, op: gt, target: 64}]}, {type: event, event_type: storage.qdepth, value_threshold: 1000}]}".to_owned(),
        4 => "[{type: event, event_type: intent.run}, {type: event, event_type: compute.util, negate: true, window: 5m}]".to_owned(),
        _ => format!("[{{type: signal, signal: hardware.gpu.util_avg_1m, op: lt, target: {}}}, {{type: event, event_type: transport.drop, count: 5, window: 30s}}]", i % 7),
    };
    let join = if i.is_multiple_of(4) {
        "join: entity\n"
    } else {
        ""
    };
    let text = format!(
        "id: synthetic.{i}\nname: synthetic {i}\nscene: synthetic.scene.{i}\npriority: {}\n{join}conditions: {cond}\nsolution_steps: [{{step: 1, action: \"look\"}}]\nrelated_evidences: [x]\napplicability: {{}}\n",
        i % 100
    );
    let spec: RuleSpec = serde_yaml::from_str(&text)?;
    Ok(LoadedRule {
        id: format!("synthetic.{i}"),
        pack: "synthetic".to_owned(),
        file: PathBuf::from("<synthetic>"),
        spec,
    })
}

fn bench_rules(a: RulesArgs) -> anyhow::Result<()> {
    let mut rules = match &a.rules {
        Some(d) => crate::rules::load_dir(d, false)?.rules,
        None => Vec::new(),
    };
    let from_pack = rules.len();
    let mut i = 0;
    while rules.len() < a.rules_count {
        rules.push(synthetic_rule(i)?);
        i += 1;
    }
    rules.truncate(a.rules_count.max(1));
    let mut results = Vec::new();
    for &nodes in &a.nodes {
        // Build a graph of ~`nodes` nodes: processes spread over 64 resources.
        let pids = nodes.saturating_sub(64).max(1);
        let setup = workload(pids, 64, pids, 0);
        let timed = workload(a.events, 64, pids, 1000);
        let mut cfg = PipelineConfig::default();
        cfg.graph.max_nodes = cfg.graph.max_nodes.max(nodes as usize * 2);
        cfg.graph.max_edges = cfg.graph.max_edges.max(nodes as usize * 4);
        let mut with_rules = pipeline(cfg.clone(), Some(&rules))?;
        let mut graph_only = pipeline(cfg, None)?;
        for ev in &setup {
            with_rules.apply(ev, "bench");
            graph_only.apply(ev, "bench");
        }
        // Move timed events after the setup in time.
        let shift = setup.len() as i64;
        let timed: Vec<Event> = timed
            .into_iter()
            .map(|mut e| {
                e.ts += shift;
                e
            })
            .collect();
        let t0 = Instant::now();
        for ev in &timed {
            graph_only.apply(ev, "bench");
        }
        let graph_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for ev in &timed {
            with_rules.apply(ev, "bench");
        }
        let total_s = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        with_rules.tick(None);
        let tick_us = t2.elapsed().as_secs_f64() * 1e6;
        let n = timed.len() as f64;
        results.push(json!({
            "graph_nodes": with_rules.graph().total_nodes(),
            "events": timed.len(),
            "us_per_event_graph_and_rules": total_s * 1e6 / n,
            "us_per_event_graph_only": graph_s * 1e6 / n,
            "us_per_event_rules": ((total_s - graph_s) * 1e6 / n).max(0.0),
            "tick_us": tick_us,
            "active_scenes": with_rules.engine().map_or(0, |e| e.active_scenes().len()),
            "rule_evaluations": with_rules.engine().map_or(0, |e| e.evaluations),
        }));
    }
    print(json!({
        "rules": rules.len(),
        "rules_from_pack": from_pack.min(rules.len()),
        "results": results,
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}

fn bench_parse(a: ParseArgs) -> anyhow::Result<()> {
    let lines: Vec<String> = workload(a.lines, 8, 1024, 0)
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let t0 = Instant::now();
    let mut ok = 0u64;
    for l in &lines {
        if parse_line(l.as_bytes()).is_ok() {
            ok += 1;
        }
    }
    let elapsed = t0.elapsed();
    print(json!({
        "lines": lines.len(),
        "parsed_ok": ok,
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
        "lines_per_sec": (lines.len() as f64 / elapsed.as_secs_f64()).round(),
        "mb_per_sec": bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        "avg_line_bytes": bytes / lines.len().max(1),
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}

fn bench_flood(a: FloodArgs) -> anyhow::Result<()> {
    let mut cfg = PipelineConfig::default();
    if let Some(b) = a.max_bytes {
        cfg.graph.max_bytes = b;
    }
    let rules = match &a.rules {
        Some(d) => Some(crate::rules::load_dir(d, false)?.rules),
        None => None,
    };
    let t = Telemetry::new("bench")?;
    let mut p = Pipeline::new(cfg, Clock::Wall, rules.as_deref(), t.dropped.clone());
    let rss_before = peak_rss_bytes();
    let pad = "x".repeat(190);
    let value = "v".repeat(4000);
    let types = EventType::ALL.map(EventType::as_str);
    let mut line = String::with_capacity(8192);
    let t0 = Instant::now();
    let mut n = 0u64;
    for ty in types {
        for e in 0..a.entities {
            use std::fmt::Write as _;
            line.clear();
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            write!(
                line,
                r#"{{"ts":{ts},"event_type":"{ty}","entity_id":"e{e:08}{pad}","job_id":"flood-{}","pid":{},"value":"{value}{e}"}}"#,
                e % 64,
                100_000 + e
            )?;
            p.handle_line(line.as_bytes(), "probe");
            n += 1;
            if n.is_multiple_of(4096) {
                p.tick(None);
            }
        }
    }
    p.tick(None);
    let secs = t0.elapsed().as_secs_f64();
    let g = p.graph();
    let ev = g.evictions();
    print(json!({
        "bench": "flood",
        "events": n,
        "entities": a.entities,
        "seconds": secs,
        "events_per_sec": n as f64 / secs,
        "graph_bytes": g.bytes(),
        "graph_max_bytes": g.limits().max_bytes,
        "nodes": g.total_nodes(),
        "edges": g.total_edges(),
        "evictions": ev,
        "strings_clipped": p.clipped(),
        "engine_state_bytes": p.engine().map(crate::rules::Engine::state_bytes),
        "peak_rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
    }))
}
