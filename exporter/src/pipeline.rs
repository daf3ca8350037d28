//! The pipeline: the single writer of the causal graph and the rule engine.
//!
//! [`Pipeline`] is plain data + methods (used directly by `replay`, tests and benches). In
//! `serve` mode [`spawn`] moves it onto its own OS thread, fed by a bounded channel: sources hold
//! an [`EventSender`] (never blocks: a full queue drops and counts `queue_full`), the HTTP layer
//! holds a [`PipelineClient`] for `why` queries. The thread publishes a metrics snapshot at most
//! every `publish_interval` while events flow, and ticks the rule engine every `tick_interval`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::proto::{MetricFamily, MetricType};
use serde::Serialize;

use crate::event::{Event, EventType, ParseError, parse_line};
use crate::gpu_faults::GpuFaults;
use crate::graph::{Change, EdgeKind, Graph, GraphLimits, NodeKind, RootCause};
use crate::metrics::{DropCounters, Telemetry, family};
use crate::ratelimit::LogLimiter;
use crate::rules::{Engine, EngineConfig, LoadedRule, SceneMatch};

/// How the pipeline judges timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Live: compare with the wall clock.
    Wall,
    /// Replay: compare with the newest event time seen so far.
    EventTime,
}

/// What happens to an event whose timestamp is too far ahead of or behind the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampPolicy {
    /// Apply it with the clock's current time instead (counted in `ark_events_clamped_total`).
    /// A probe with a wrong clock still feeds the graph, and cannot move time for everyone.
    Clamp,
    /// Drop it (counted in `ark_events_dropped_total{reason="timestamp_future|timestamp_past"}`).
    Drop,
}

/// Pipeline knobs (the `[pipeline]`, `[graph]` and `[rules]` sections of the config).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub graph: GraphLimits,
    pub engine: EngineConfig,
    /// Events further ahead than this are dropped (`timestamp_future`).
    pub max_future_ms: i64,
    /// Replay only: largest forward jump of event time accepted.
    pub replay_max_gap_ms: i64,
    /// Events older than this (relative to the clock) are clamped or dropped (`timestamp_past`).
    pub max_past_ms: i64,
    pub timestamp_policy: TimestampPolicy,
    /// RSS above which the graph sheds its oldest quarter on the next tick (0: off).
    pub max_rss_bytes: u64,
    /// Most causal series (`ark_waits_on` + `ark_blocked_by` + `ark_root_cause` +
    /// `ark_scene_active`) exported.
    pub series_budget: usize,
    /// Most nodes visited per export when resolving root causes.
    pub walk_budget: usize,
    pub queue_capacity: usize,
    pub publish_interval: Duration,
    pub tick_interval: Duration,
    pub log_interval: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            graph: GraphLimits::default(),
            engine: EngineConfig::default(),
            max_future_ms: 5 * 60_000,
            replay_max_gap_ms: 24 * 3_600_000,
            max_past_ms: 3_600_000,
            timestamp_policy: TimestampPolicy::Clamp,
            max_rss_bytes: 256 * 1024 * 1024,
            // DESIGN.md "Scale": ≤ 2,000 series per node in all. An 8-GPU node with 64 GPU
            // processes needs ~800 NVML series, the host collectors and self metrics ~200: the
            // causal graph gets the remaining 1,000.
            series_budget: 1000,
            walk_budget: 200_000,
            queue_capacity: 65_536,
            publish_interval: Duration::from_millis(25),
            tick_interval: Duration::from_secs(1),
            log_interval: Duration::from_secs(10),
        }
    }
}

/// Current resident set size, from /proc/self/statm (0 when unavailable).
pub fn current_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What `replay` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub scenes: Vec<SceneMatch>,
    pub root_causes: Vec<RootCause>,
    pub stats: ReplayStats,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayStats {
    pub lines: u64,
    pub accepted: u64,
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
}

/// The single writer. See the module docs.
pub struct Pipeline {
    cfg: PipelineConfig,
    clock: Clock,
    graph: Graph,
    engine: Option<Engine>,
    changes: Vec<Change>,
    counts: Vec<(&'static str, [u64; EventType::COUNT])>,
    dropped: DropCounters,
    limiters: Vec<(&'static str, LogLimiter)>,
    rules_rejected: usize,
    /// Events clamped: [future, past].
    clamped: [u64; 2],
    /// Nodes shed because RSS went over `max_rss_bytes`.
    shed: u64,
    /// Set when something changed since the last snapshot.
    dirty: bool,
    stats: ReplayStats,
    /// XID / ECC counters from events of sources other than the NVML collector.
    gpu_faults: GpuFaults,
}

impl Pipeline {
    /// A pipeline with optional rules (`None`: graph only).
    pub fn new(
        cfg: PipelineConfig,
        clock: Clock,
        rules: Option<&[LoadedRule]>,
        dropped: DropCounters,
    ) -> Self {
        let mut graph = Graph::new(cfg.graph.clone());
        let mut rules_rejected = 0;
        let engine = rules.map(|r| {
            let (engine, rejected) = Engine::new(r, cfg.engine.clone());
            for (id, why) in &rejected {
                tracing::warn!(rule = %id, reason = %why, "Rule skipped: it does not compile");
            }
            rules_rejected = rejected.len();
            engine
        });
        graph.track_changes(engine.is_some());
        Pipeline {
            cfg,
            clock,
            graph,
            engine,
            changes: Vec::new(),
            counts: Vec::new(),
            dropped,
            limiters: Vec::new(),
            rules_rejected,
            clamped: [0; 2],
            shed: 0,
            dirty: true,
            stats: ReplayStats::default(),
            gpu_faults: GpuFaults::default(),
        }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    fn log_drop(&mut self, reason: &'static str, source: &str, detail: &dyn std::fmt::Display) {
        let interval = self.cfg.log_interval;
        let idx = match self.limiters.iter().position(|(r, _)| *r == reason) {
            Some(i) => i,
            None => {
                self.limiters.push((reason, LogLimiter::new(interval)));
                self.limiters.len() - 1
            }
        };
        if let Some(suppressed) = self.limiters[idx].1.allow(Instant::now()) {
            tracing::warn!(source, reason, suppressed, detail = %detail, "Event dropped");
        }
    }

    fn drop_event(&mut self, reason: &'static str, source: &str, detail: &dyn std::fmt::Display) {
        self.dropped.inc(reason);
        *self.stats.dropped.entry(reason).or_default() += 1;
        self.log_drop(reason, source, detail);
    }

    /// Parses and applies one protocol line (replay path; probes parse on their own task).
    pub fn handle_line(&mut self, line: &[u8], source: &'static str) {
        self.stats.lines += 1;
        match parse_line(line) {
            Ok(ev) => self.handle_event(&ev, source),
            Err(e) => self.handle_parse_error(&e, source),
        }
    }

    /// Counts a line a source could not parse.
    pub fn handle_parse_error(&mut self, e: &ParseError, source: &'static str) {
        self.drop_event(e.reason(), source, e);
    }

    /// Validates the timestamp, then applies the event to the graph and the rules.
    pub fn handle_event(&mut self, ev: &Event, source: &'static str) {
        let now = match self.clock {
            Clock::Wall => wall_ms(),
            Clock::EventTime => self.graph.now(),
        };
        // Nothing, recorded or live, can come from the future of the wall clock: this also keeps
        // a bogus first line of a replay from setting the replay clock.
        let wall_limit = wall_ms().saturating_add(self.cfg.max_future_ms);
        let limit = match self.clock {
            Clock::Wall => wall_limit,
            Clock::EventTime if now == i64::MIN => wall_limit,
            Clock::EventTime => now
                .saturating_add(self.cfg.replay_max_gap_ms)
                .min(wall_limit),
        };
        if now == i64::MIN && ev.ts > limit {
            // First event of a replay and already absurd: no clock to clamp to.
            return self.drop_event(
                "timestamp_future",
                source,
                &format_args!("ts {} is in the future", ev.ts),
            );
        }
        if now != i64::MIN {
            let off = if ev.ts > limit {
                Some((
                    "timestamp_future",
                    0,
                    format!("ts {} is {} ms ahead", ev.ts, ev.ts - now),
                ))
            } else if ev.ts < now.saturating_sub(self.cfg.max_past_ms) {
                Some((
                    "timestamp_past",
                    1,
                    format!("ts {} is {} ms behind", ev.ts, now - ev.ts),
                ))
            } else {
                None
            };
            if let Some((reason, i, detail)) = off {
                if self.cfg.timestamp_policy == TimestampPolicy::Drop {
                    return self.drop_event(reason, source, &detail);
                }
                self.clamped[i] += 1;
                self.log_drop(reason, source, &format_args!("{detail}; clamped to {now}"));
                let mut ev = ev.clone();
                ev.ts = now;
                return self.apply(&ev, source);
            }
        }
        self.apply(ev, source);
    }

    /// Applies an already validated event (benches call this directly).
    pub fn apply(&mut self, ev: &Event, source: &'static str) {
        self.stats.accepted += 1;
        let counts = match self.counts.iter().position(|(s, _)| *s == source) {
            Some(i) => &mut self.counts[i].1,
            None => {
                self.counts.push((source, [0; EventType::COUNT]));
                &mut self.counts.last_mut().expect("just pushed").1
            }
        };
        counts[ev.event_type as usize] += 1;
        // The NVML collector keeps its own XID/ECC counters; everything else is derived here.
        if source != "nvml" {
            self.gpu_faults.observe(ev);
        }
        self.graph.ingest(ev);
        if let Some(engine) = self.engine.as_mut() {
            self.changes.clear();
            self.changes.extend(self.graph.drain_changes());
            engine.on_event(ev, &self.graph, &self.changes);
        }
        self.dirty = true;
    }

    /// Advances time (wall clock in serve mode) and re-evaluates time-dependent rules.
    pub fn tick(&mut self, now: Option<i64>) {
        let now = now.unwrap_or_else(|| match self.clock {
            Clock::Wall => wall_ms(),
            Clock::EventTime => self.graph.now(),
        });
        self.graph.advance(now);
        if self.cfg.max_rss_bytes > 0 && self.clock == Clock::Wall {
            let rss = current_rss_bytes();
            if rss > self.cfg.max_rss_bytes {
                let target = self.graph.total_nodes() * 3 / 4;
                let shed = self.graph.shrink_to(target);
                self.shed += shed as u64;
                self.log_drop(
                    "memory",
                    "graph",
                    &format_args!("RSS {rss} bytes over the cap, shed {shed} oldest nodes"),
                );
            }
        }
        if let Some(engine) = self.engine.as_mut() {
            self.changes.clear();
            self.changes.extend(self.graph.drain_changes());
            // Expiry changes go through the same path as event changes.
            engine.on_changes(&self.graph, &self.changes);
            engine.tick(self.graph.now());
        }
        self.dirty = true;
    }

    /// Root causes of one process (`None`: unknown pid).
    pub fn why(&self, pid: u32) -> Option<Vec<RootCause>> {
        self.graph.why(pid)
    }

    /// Everything `replay` prints, evaluated at the newest event time.
    pub fn report(&mut self) -> ReplayReport {
        self.tick(None);
        let mut pids: Vec<u32> = self.graph.pids().collect();
        pids.sort_unstable();
        let root_causes = pids
            .into_iter()
            .filter_map(|p| self.graph.why(p))
            .flatten()
            .take(self.cfg.series_budget)
            .collect();
        ReplayReport {
            scenes: self
                .engine
                .as_ref()
                .map(Engine::matches)
                .unwrap_or_default(),
            root_causes,
            stats: self.stats.clone(),
        }
    }

    /// Builds the pipeline's metric families (bounded by `series_budget`).
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut fams = self.gpu_faults.families();
        let g = &self.graph;
        fams.push(family(
            "ark_graph_nodes",
            "Live nodes in the causal graph, by kind.",
            MetricType::GAUGE,
            NodeKind::ALL.map(|k| {
                (
                    vec![("kind", k.as_str().to_owned())],
                    g.node_count(k) as f64,
                )
            }),
        ));
        fams.push(family(
            "ark_graph_edges",
            "Live edges in the causal graph, by kind.",
            MetricType::GAUGE,
            EdgeKind::ALL.map(|k| {
                (
                    vec![("kind", k.as_str().to_owned())],
                    g.edge_count(k) as f64,
                )
            }),
        ));
        let ev = g.evictions();
        fams.push(family(
            "ark_graph_evictions_total",
            "Graph entries removed, by what (node|edge) and why (ttl|cap).",
            MetricType::COUNTER,
            [
                ("node", "cap", ev.nodes_cap),
                ("node", "ttl", ev.nodes_ttl),
                ("edge", "cap", ev.edges_cap),
                ("edge", "ttl", ev.edges_ttl),
            ]
            .map(|(w, r, v)| {
                (
                    vec![("what", w.to_owned()), ("reason", r.to_owned())],
                    v as f64,
                )
            }),
        ));
        fams.push(family(
            "ark_events_clamped_total",
            "Events applied with the clock's time because theirs was too far ahead or behind.",
            MetricType::COUNTER,
            [
                ("timestamp_future", self.clamped[0]),
                ("timestamp_past", self.clamped[1]),
            ]
            .map(|(r, v)| (vec![("reason", r.to_owned())], v as f64)),
        ));
        fams.push(family(
            "ark_graph_shed_nodes_total",
            "Graph nodes evicted because the process RSS went over pipeline.max_rss.",
            MetricType::COUNTER,
            [(vec![], self.shed as f64)],
        ));
        let mut rows = Vec::new();
        for (source, counts) in &self.counts {
            for t in EventType::ALL {
                if counts[t as usize] > 0 {
                    rows.push((
                        vec![
                            ("event_type", t.as_str().to_owned()),
                            ("source", (*source).to_owned()),
                        ],
                        counts[t as usize] as f64,
                    ));
                }
            }
        }
        fams.push(family(
            "ark_events_total",
            "Events applied to the causal graph, by type and source.",
            MetricType::COUNTER,
            rows,
        ));

        let mut budget = self.cfg.series_budget;
        let mut scene_cut = 0u64;
        if let Some(engine) = &self.engine {
            let scenes = engine.active_scenes();
            let total = scenes.len();
            let keep: Vec<_> = scenes.into_iter().take(budget).collect();
            scene_cut = (total - keep.len()) as u64;
            budget -= keep.len();
            fams.push(family(
                "ark_scene_active",
                "1 while a rule's scene holds (per entity for joined rules).",
                MetricType::GAUGE,
                keep.into_iter().map(|s| {
                    (
                        vec![
                            ("scene", s.scene),
                            ("entity", s.entity),
                            ("job_id", s.job),
                            ("severity", s.severity),
                        ],
                        1.0,
                    )
                }),
            ));
            fams.push(family(
                "ark_rules_loaded",
                "Rules compiled into the engine (rejected: failed to compile).",
                MetricType::GAUGE,
                [
                    (
                        vec![("state", "loaded".to_owned())],
                        engine.rules().len() as f64,
                    ),
                    (
                        vec![("state", "rejected".to_owned())],
                        self.rules_rejected as f64,
                    ),
                ],
            ));
        }
        let x = g.export(budget, self.cfg.walk_budget);
        fams.push(family(
            "ark_waits_on",
            "1 while a process waits on a resource (WaitsOn edge alive).",
            MetricType::GAUGE,
            x.waits_on.into_iter().map(|[pid, job, pod, ns, res]| {
                (
                    vec![
                        ("pid", pid),
                        ("job_id", job),
                        ("pod", pod),
                        ("namespace", ns),
                        ("resource", res),
                    ],
                    1.0,
                )
            }),
        ));
        fams.push(family(
            "ark_blocked_by",
            "1 while a resource (or process) has an error (BlockedBy edge alive).",
            MetricType::GAUGE,
            x.blocked_by
                .into_iter()
                .map(|[res, err]| (vec![("resource", res), ("error", err)], 1.0)),
        ));
        fams.push(family(
            "ark_root_cause",
            "1 per (job, resource, cause) a workload is blocked by, resolved transitively.",
            MetricType::GAUGE,
            x.root_cause.into_iter().map(|[job, pod, ns, res, cause]| {
                (
                    vec![
                        ("job_id", job),
                        ("pod", pod),
                        ("namespace", ns),
                        ("resource", res),
                        ("cause", cause),
                    ],
                    1.0,
                )
            }),
        ));
        fams.push(family(
            "ark_causal_series_truncated",
            "Causal series left out of the last snapshot by the series budget, per family.",
            MetricType::GAUGE,
            [
                ("ark_waits_on", x.cut[0]),
                ("ark_blocked_by", x.cut[1]),
                ("ark_root_cause", x.cut[2]),
                ("ark_scene_active", scene_cut),
            ]
            .map(|(f, v)| (vec![("family", f.to_owned())], v as f64)),
        ));
        fams
    }

    /// Publishes the snapshot if anything changed.
    pub fn publish(&mut self, telemetry: &Telemetry) {
        if self.dirty {
            telemetry.snapshots.publish("pipeline", self.families());
            self.dirty = false;
        }
    }
}

/// Messages to the pipeline thread.
pub enum Msg {
    Event(Box<Event>, &'static str),
    Why(u32, tokio::sync::oneshot::Sender<Option<Vec<RootCause>>>),
    Scenes(tokio::sync::oneshot::Sender<Vec<crate::rules::ActiveScene>>),
    Shutdown,
}

/// Handle for event sources. Cloning is cheap. Never blocks.
#[derive(Clone)]
pub struct EventSender {
    tx: SyncSender<Msg>,
    dropped: DropCounters,
    source: &'static str,
}

impl EventSender {
    /// The same channel, tagged with another `source` label.
    pub fn with_source(&self, source: &'static str) -> EventSender {
        EventSender {
            source,
            ..self.clone()
        }
    }

    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Queues an event; `false` when it was dropped (queue full or pipeline gone), which is
    /// counted in `ark_events_dropped_total`.
    pub fn send(&self, ev: Event) -> bool {
        match self.tx.try_send(Msg::Event(Box::new(ev), self.source)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.inc("queue_full");
                false
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc("pipeline_closed");
                false
            }
        }
    }

    /// Counts a line a source could not parse (`ark_events_dropped_total{reason}`).
    pub fn count_bad_line(&self, e: &ParseError) {
        self.dropped.inc(e.reason());
    }
}

/// Handle for queries (HTTP).
#[derive(Clone)]
pub struct PipelineClient {
    tx: SyncSender<Msg>,
    running: Arc<AtomicBool>,
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("pipeline busy")]
    Busy,
    #[error("pipeline stopped")]
    Stopped,
}

impl PipelineClient {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub async fn why(&self, pid: u32) -> Result<Option<Vec<RootCause>>, QueryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Msg::Why(pid, tx), rx).await
    }

    pub async fn scenes(&self) -> Result<Vec<crate::rules::ActiveScene>, QueryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Msg::Scenes(tx), rx).await
    }

    async fn ask<T>(
        &self,
        msg: Msg,
        rx: tokio::sync::oneshot::Receiver<T>,
    ) -> Result<T, QueryError> {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(QueryError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(QueryError::Stopped),
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(QueryError::Stopped),
            Err(_) => Err(QueryError::Busy),
        }
    }

    /// Asks the thread to stop (best effort).
    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Msg::Shutdown);
    }
}

/// A running pipeline thread.
pub struct Running {
    pub sender: EventSender,
    pub client: PipelineClient,
    pub thread: std::thread::JoinHandle<()>,
}

/// A bounded event channel without a pipeline behind it (tests, tools). The receiver gets
/// [`Msg`]s; [`spawn`] uses the same channel.
pub fn channel(capacity: usize, dropped: DropCounters) -> (EventSender, Receiver<Msg>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    (
        EventSender {
            tx,
            dropped,
            source: "probe",
        },
        rx,
    )
}

/// Moves the pipeline onto its own thread.
pub fn spawn(mut p: Pipeline, telemetry: Telemetry) -> std::io::Result<Running> {
    let (tx, rx) = std::sync::mpsc::sync_channel(p.cfg.queue_capacity.max(16));
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let dropped = telemetry.dropped.clone();
    p.publish(&telemetry);
    let thread = std::thread::Builder::new()
        .name("ark-pipeline".to_owned())
        .spawn(move || {
            run(&mut p, &rx, &telemetry);
            flag.store(false, Ordering::Relaxed);
        })?;
    Ok(Running {
        sender: EventSender {
            tx: tx.clone(),
            dropped,
            source: "probe",
        },
        client: PipelineClient { tx, running },
        thread,
    })
}

fn run(p: &mut Pipeline, rx: &Receiver<Msg>, telemetry: &Telemetry) {
    let mut next_tick = Instant::now() + p.cfg.tick_interval;
    let mut last_publish = Instant::now();
    // Gap between snapshots: the configured interval, stretched so that building snapshots
    // (which resolves root causes, bounded by walk_budget) never takes more than ~20 % of the
    // pipeline thread under a continuous event flow.
    let mut gap = p.cfg.publish_interval;
    loop {
        let now = Instant::now();
        let mut deadline = next_tick;
        if p.dirty {
            deadline = deadline.min(last_publish + gap);
        }
        let msg = match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = msg;
        // Drain what is queued, but come up for air to publish and tick.
        let mut budget = 4096;
        while let Some(m) = next.take() {
            match m {
                Msg::Event(ev, source) => p.handle_event(&ev, source),
                Msg::Why(pid, reply) => {
                    let _ = reply.send(p.why(pid));
                }
                Msg::Scenes(reply) => {
                    let scenes = p.engine().map(|e| e.active_scenes()).unwrap_or_default();
                    let _ = reply.send(scenes);
                }
                Msg::Shutdown => return,
            }
            budget -= 1;
            if budget > 0 {
                next = rx.try_recv().ok();
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            p.tick(None);
            next_tick = now + p.cfg.tick_interval;
        }
        if p.dirty && now >= last_publish + gap {
            let t0 = Instant::now();
            p.publish(telemetry);
            last_publish = now;
            let took = t0.elapsed();
            gap = p.cfg.publish_interval.max(took * 4);
            if took > Duration::from_millis(100) {
                tracing::debug!(ms = took.as_millis() as u64, "Slow snapshot");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64) -> Event {
        Event {
            ts,
            event_type: EventType::ComputeUtil,
            entity_id: "gpu-0".into(),
            job_id: None,
            pid: Some(1),
            value: "1".into(),
            node_id: None,
            pod: None,
            namespace: None,
        }
    }

    #[test]
    fn timestamps_far_off_are_clamped_or_dropped() {
        let t = Telemetry::new("n").unwrap();
        let mut p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            None,
            t.dropped.clone(),
        );
        let base = 1_700_000_000_000;
        p.handle_event(&ev(base), "test");
        p.handle_event(&ev(base + 30 * 86_400_000), "test");
        p.handle_event(&ev(base - 2 * 3_600_000), "test");
        assert_eq!(p.clamped, [1, 1]);
        assert_eq!(
            p.graph().now(),
            base,
            "a clamped event does not move the clock"
        );
        // A replay whose first line is beyond the wall clock has no clock to clamp to: dropped.
        let mut p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            None,
            t.dropped.clone(),
        );
        p.handle_event(&ev(wall_ms() + 86_400_000), "test");
        assert_eq!(t.dropped.get("timestamp_future"), 1);
        assert_eq!(p.graph().total_nodes(), 0);
        let cfg = PipelineConfig {
            timestamp_policy: TimestampPolicy::Drop,
            ..PipelineConfig::default()
        };
        let mut p = Pipeline::new(cfg, Clock::Wall, None, t.dropped.clone());
        p.handle_event(&ev(wall_ms() + 86_400_000), "test");
        p.handle_event(&ev(0), "test");
        p.handle_event(&ev(wall_ms()), "test");
        assert_eq!(t.dropped.get("timestamp_future"), 2);
        assert_eq!(t.dropped.get("timestamp_past"), 1);
        assert_eq!(p.stats.accepted, 1);
    }

    #[test]
    fn bad_lines_are_counted_by_reason_and_never_stop_the_pipeline() {
        let t = Telemetry::new("n").unwrap();
        let mut p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            Some(&[]),
            t.dropped.clone(),
        );
        let lines: Vec<Vec<u8>> = vec![
            b"{".to_vec(),
            b"\xff\xfe".to_vec(),
            br#"{"ts":1,"event_type":"x.y","entity_id":"g","value":"1"}"#.to_vec(),
            br#"{"ts":1,"event_type":"compute.util","value":"1"}"#.to_vec(),
            vec![b'a'; crate::event::MAX_LINE_BYTES + 10],
            br#"{"ts":1700000000000,"event_type":"compute.util","entity_id":"g","value":"1"}"#
                .to_vec(),
        ];
        for _ in 0..1000 {
            for l in &lines {
                p.handle_line(l, "test");
            }
        }
        for r in [
            "malformed_json",
            "invalid_utf8",
            "unknown_event_type",
            "missing_field",
            "oversized_line",
        ] {
            assert_eq!(t.dropped.get(r), 1000, "{r}");
        }
        assert_eq!(p.stats.accepted, 1000);
    }

    #[test]
    fn shrink_keeps_the_newest() {
        let t = Telemetry::new("n").unwrap();
        let mut p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            None,
            t.dropped.clone(),
        );
        for i in 0..100u32 {
            let mut e = ev(1_700_000_000_000 + i64::from(i));
            e.pid = Some(i);
            p.apply(&e, "test");
        }
        let before = p.graph.total_nodes();
        let shed = p.graph.shrink_to(before / 2);
        assert_eq!(p.graph().total_nodes(), before / 2);
        assert!(shed > 0);
        assert!(p.graph().process(99).is_some());
        assert!(p.graph().process(0).is_none());
    }
}
