//! The pipeline: the single writer of the causal graph and the rule engine.
//!
//! [`Pipeline`] is plain data + methods (used directly by `replay`, tests and benches). In
//! `serve` mode [`spawn`] moves it onto its own OS thread, fed by a bounded channel: sources hold
//! an [`EventSender`] (never blocks: a full queue drops and counts `queue_full`), the HTTP layer
//! holds a [`PipelineClient`] for `why` queries. The thread publishes a metrics snapshot at most
//! every `publish_interval` while events flow, and ticks the rule engine every `tick_interval`.
//!
//! One clock: live, "now" is the exporter's own clock ([`Clock::Wall`]). An event's timestamp
//! orders and ages that event only; one ahead of the clock is applied at the clock's time
//! (counted per source in `ark_events_clock_skew_total`), so no probe can move time for the
//! others. Replay ([`Clock::EventTime`]) runs on the newest event time instead.
//!
//! Files: this one holds the pipeline's state and event handling, `render.rs` the metric
//! families it publishes, `thread.rs` the thread, channel and handles.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::event::{ClipCounters, Event, EventType, ParseError, parse_line};
use crate::gpu_faults::GpuFaults;
use crate::graph::{Change, Graph, GraphLimits, RootCause};
use crate::metrics::{DropCounters, Telemetry};
use crate::ratelimit::LogLimiter;
use crate::rules::{Engine, EngineConfig, LoadedRule, SceneMatch};

mod render;
mod thread;

pub use thread::{
    EventSender, Msg, PipelineClient, QueryError, Running, channel, channel_with, spawn,
};

/// How the pipeline tells time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Live: the wall clock is "now"; events never move it.
    Wall,
    /// Live semantics on a clock the caller sets ([`Pipeline::set_time`]): tests and benches.
    Manual,
    /// Replay: the newest event time seen so far is "now".
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

/// Events further ahead of the live clock than this are counted as clock skew (all events
/// ahead are applied at the clock's time; a few milliseconds of jitter is not worth a count).
pub const SKEW_TOLERANCE_MS: i64 = 1_000;

/// Pipeline knobs (the `[pipeline]`, `[graph]` and `[rules]` sections of the config).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub graph: GraphLimits,
    pub engine: EngineConfig,
    /// Events further ahead than this are clamped or dropped (`timestamp_future`).
    pub max_future_ms: i64,
    /// Replay only: largest forward jump of event time accepted.
    pub replay_max_gap_ms: i64,
    /// Events older than this (relative to the clock) are clamped or dropped (`timestamp_past`).
    pub max_past_ms: i64,
    pub timestamp_policy: TimestampPolicy,
    /// Most causal series (`ark_scene_active` + `ark_waits_on` + `ark_blocked_by` +
    /// `ark_root_cause` + `ark_job_processes` + `ark_job_progress_ratio`, taken in that order)
    /// exported.
    pub series_budget: usize,
    /// Most nodes visited per export when resolving root causes.
    pub walk_budget: usize,
    pub queue_capacity: usize,
    /// Most bytes of events queued for the pipeline thread (see `event::event_bytes`); beyond
    /// it events are dropped as `queue_full`.
    pub queue_max_bytes: usize,
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
            // DESIGN.md "Scale": ≤ 2,000 series per node in all. An 8-GPU node with 64 GPU
            // processes needs ~800 NVML series, the host collectors and self metrics ~200: the
            // causal graph gets the remaining 1,000.
            series_budget: 1000,
            walk_budget: 200_000,
            queue_capacity: 65_536,
            queue_max_bytes: 8 * 1024 * 1024,
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
    /// "Now" of [`Clock::Manual`].
    manual_now: i64,
    graph: Graph,
    engine: Option<Engine>,
    changes: Vec<Change>,
    counts: Vec<(&'static str, [u64; EventType::COUNT])>,
    dropped: DropCounters,
    limiters: Vec<(&'static str, LogLimiter)>,
    rules_rejected: usize,
    /// Events clamped: [future, past].
    clamped: [u64; 2],
    /// Events ahead of the live clock by more than [`SKEW_TOLERANCE_MS`], per source.
    skewed: Vec<(&'static str, u64)>,
    /// Strings clipped (shared with the senders, which clip before queueing).
    clipped: Arc<ClipCounters>,
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
            manual_now: 0,
            graph,
            engine,
            changes: Vec::new(),
            counts: Vec::new(),
            dropped,
            limiters: Vec::new(),
            rules_rejected,
            clamped: [0; 2],
            skewed: Vec::new(),
            clipped: Arc::default(),
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

    /// Sets "now" of a [`Clock::Manual`] pipeline (ignored by the other clocks).
    pub fn set_time(&mut self, now_ms: i64) {
        self.manual_now = now_ms;
    }

    /// Strings clipped so far, in `event::CLIP_FIELDS` order.
    pub fn clipped(&self) -> [u64; 6] {
        self.clipped.get()
    }

    /// Events counted as clock skew for `source`.
    pub fn skewed(&self, source: &str) -> u64 {
        self.skewed
            .iter()
            .find(|(s, _)| *s == source)
            .map_or(0, |(_, n)| *n)
    }

    /// The live clock (wall or manual); for replay, the newest event time.
    fn now(&self) -> i64 {
        match self.clock {
            Clock::Wall => wall_ms(),
            Clock::Manual => self.manual_now,
            Clock::EventTime => self.graph.now(),
        }
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

    /// Names the producer (pipeline lane) of the events that follow, for the graph's eviction
    /// fairness ([`Graph::set_producer`]).
    pub fn set_producer(&mut self, lane: u64) {
        self.graph.set_producer(lane);
    }

    /// Validates the timestamp, then applies the event to the graph and the rules.
    pub fn handle_event(&mut self, ev: &Event, source: &'static str) {
        let live = self.clock != Clock::EventTime;
        let now = self.now();
        // Nothing, recorded or live, can come from the future of the wall clock: this also keeps
        // a bogus first line of a replay from setting the replay clock.
        let limit = match self.clock {
            Clock::Wall | Clock::Manual => now.saturating_add(self.cfg.max_future_ms),
            Clock::EventTime if now == i64::MIN => wall_ms().saturating_add(self.cfg.max_future_ms),
            Clock::EventTime => now
                .saturating_add(self.cfg.replay_max_gap_ms)
                .min(wall_ms().saturating_add(self.cfg.max_future_ms)),
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
                return self.apply_at(&ev, source, live.then_some(now));
            }
            if live && ev.ts > now {
                // Ahead of our clock but within max_future: the event happened "now" as far as
                // this exporter can tell. It must not drag the clock forward for everyone.
                if ev.ts - now > SKEW_TOLERANCE_MS {
                    match self.skewed.iter_mut().find(|(s, _)| *s == source) {
                        Some((_, n)) => *n += 1,
                        None => self.skewed.push((source, 1)),
                    }
                }
                let mut ev = ev.clone();
                ev.ts = now;
                return self.apply_at(&ev, source, Some(now));
            }
        }
        self.apply_at(ev, source, live.then_some(now));
    }

    /// Applies an already validated event (benches call this directly). Replay semantics: the
    /// event's time moves the graph's clock when it is newer.
    pub fn apply(&mut self, ev: &Event, source: &'static str) {
        self.apply_at(ev, source, None);
    }

    /// Applies an event; `now` (live clocks) is advanced to first, and is never passed by it.
    fn apply_at(&mut self, ev: &Event, source: &'static str, now: Option<i64>) {
        if ClipCounters::needs_clip(ev) {
            let mut ev = ev.clone();
            self.clipped.clip(&mut ev);
            return self.apply_clipped(&ev, source, now);
        }
        self.apply_clipped(ev, source, now);
    }

    fn apply_clipped(&mut self, ev: &Event, source: &'static str, now: Option<i64>) {
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
        // NVML and the kernel log count their own XIDs (with their own `source`).
        if source != "nvml" && source != "kmsg" {
            self.gpu_faults.observe(ev);
        }
        if let Some(now) = now {
            self.graph.advance(now);
        }
        self.graph.ingest(ev);
        if let Some(engine) = self.engine.as_mut() {
            self.changes.clear();
            self.changes.extend(self.graph.drain_changes());
            engine.on_event(ev, &self.graph, &self.changes);
        }
        self.dirty = true;
    }

    /// Advances time (the live clock, or `now`) and re-evaluates time-dependent rules.
    pub fn tick(&mut self, now: Option<i64>) {
        let now = now.unwrap_or_else(|| self.now());
        self.graph.advance(now);
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

    /// Publishes the snapshot if anything changed.
    pub fn publish(&mut self, telemetry: &Telemetry) {
        if self.dirty {
            telemetry.snapshots.publish("pipeline", self.families());
            self.dirty = false;
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
    fn an_event_ahead_of_the_clock_moves_time_for_nobody() {
        let t = Telemetry::new("n").unwrap();
        let cfg = PipelineConfig {
            graph: GraphLimits {
                ttl_ms: 60_000,
                ..GraphLimits::default()
            },
            ..PipelineConfig::default()
        };
        let mut p = Pipeline::new(cfg, Clock::Manual, None, t.dropped.clone());
        let base = 1_700_000_000_000;
        p.set_time(base);
        let mut honest = ev(base);
        honest.event_type = EventType::TransportDrop;
        honest.entity_id = "network-eth0".into();
        p.handle_event(&honest, "probe");
        p.set_time(base + 1_000);
        let mut skewed = ev(base + 1_000 + 295_000);
        skewed.pid = Some(2);
        p.handle_event(&skewed, "other");
        p.tick(None);
        assert_eq!(p.graph().now(), base + 1_000, "now is the exporter's clock");
        assert_eq!(
            p.graph().edge_count(crate::graph::EdgeKind::WaitsOn),
            1,
            "the other process's live edge stays"
        );
        assert_eq!((p.skewed("other"), p.skewed("probe")), (1, 0));
        let skewed_node = p.graph().process(2).unwrap();
        assert_eq!(skewed_node.last_seen(), base + 1_000, "applied at our time");
        // Within the tolerance: applied at our time too, not counted.
        let mut close = ev(base + 1_500);
        close.pid = Some(3);
        p.handle_event(&close, "other");
        assert_eq!(p.skewed("other"), 1);
        assert_eq!(p.graph().process(3).unwrap().last_seen(), base + 1_000);
        // The skewed event ages like any other: gone after its TTL of our clock.
        p.set_time(base + 1_000 + 60_001);
        p.tick(None);
        assert!(p.graph().process(2).is_none());
        assert!(p.graph().process(1).is_none());
    }

    #[test]
    fn job_families_share_the_series_budget_and_go_with_their_processes() {
        let t = Telemetry::new("n").unwrap();
        let cfg = PipelineConfig {
            series_budget: 10,
            ..PipelineConfig::default()
        };
        let mut p = Pipeline::new(cfg, Clock::EventTime, None, t.dropped.clone());
        let base = 1_700_000_000_000;
        let mut send = |pid: u32, job: &str, t: EventType, entity: &str, value: &str| {
            let mut e = ev(base);
            e.pid = Some(pid);
            e.job_id = Some(job.to_owned());
            e.event_type = t;
            e.entity_id = entity.to_owned();
            e.value = value.to_owned();
            p.handle_event(&e, "probe");
        };
        // Job w: 4 processes waiting on the network, no utilisation: 4 waits_on series and one
        // root_cause series come first; 5 of the 10 are left for the job families.
        for pid in 1..=4 {
            send(pid, "w", EventType::TransportDrop, "network-eth0", "drop");
        }
        send(10, "a", EventType::ComputeUtil, "gpu-0", "90");
        send(11, "a", EventType::ComputeUtil, "gpu-1", "80");
        for (pid, job) in [(20, "b"), (21, "c"), (22, "d"), (23, "e")] {
            send(pid, job, EventType::ComputeUtil, "gpu-2", "10");
        }
        p.publish(&t);
        let out = t.encode();
        let has = |line: &str| out.lines().any(|l| l == line);
        // w (1 series), a (2), b (2): the budget is spent; c, d and e are cut.
        for line in [
            r#"ark_job_processes{job_id="w",node="n"} 4"#,
            r#"ark_job_processes{job_id="a",node="n"} 2"#,
            r#"ark_job_progress_ratio{job_id="a",node="n"} 0.85"#,
            r#"ark_job_processes{job_id="b",node="n"} 1"#,
            r#"ark_job_progress_ratio{job_id="b",node="n"} 0.1"#,
            r#"ark_causal_series_truncated{family="ark_job_processes",node="n"} 3"#,
            r#"ark_causal_series_truncated{family="ark_job_progress_ratio",node="n"} 3"#,
            r#"ark_causal_series_truncated{family="ark_waits_on",node="n"} 0"#,
        ] {
            assert!(has(line), "missing {line}\n{out}");
        }
        assert!(!out.contains(r#"job_id="c""#), "{out}");
        assert!(
            !out.contains(r#"ark_job_progress_ratio{job_id="w""#),
            "no reading, no ratio\n{out}"
        );
        let series = out
            .lines()
            .filter(|l| {
                [
                    "ark_waits_on{",
                    "ark_root_cause{",
                    "ark_blocked_by{",
                    "ark_job_",
                ]
                .iter()
                .any(|f| l.starts_with(f))
            })
            .count();
        assert_eq!(series, 10, "{out}");
        // Once the processes expire, their jobs leave /metrics.
        p.tick(Some(base + PipelineConfig::default().graph.ttl_ms + 1));
        p.publish(&t);
        let out = t.encode();
        assert!(!out.contains("ark_job_processes{"), "{out}");
        assert!(!out.contains("ark_job_progress_ratio{"), "{out}");
        assert!(
            out.lines()
                .any(|l| l
                    == r#"ark_causal_series_truncated{family="ark_job_processes",node="n"} 0"#),
            "{out}"
        );
    }

    #[test]
    fn strings_are_clipped_and_counted_before_they_are_stored() {
        let t = Telemetry::new("n").unwrap();
        let mut p = Pipeline::new(
            PipelineConfig::default(),
            Clock::EventTime,
            None,
            t.dropped.clone(),
        );
        let mut e = ev(1_700_000_000_000);
        e.entity_id = "e".repeat(200);
        e.value = "v".repeat(4000);
        e.job_id = Some("j".repeat(256));
        p.handle_event(&e, "probe");
        assert_eq!(p.clipped(), [1, 1, 0, 0, 0, 1]);
        let r = p.graph().resource(&"e".repeat(128)).unwrap();
        assert_eq!(r.meta("value").map(|v| v.len()), Some(256));
        let text = crate::metrics::Telemetry::new("n").unwrap();
        p.publish(&text);
        let out = text.encode();
        let line = out.lines().find(|l| {
            l.starts_with("ark_strings_clipped_total{") && l.contains(r#"field="value""#)
        });
        assert!(line.is_some_and(|l| l.ends_with(" 1")), "{out}");
    }
}
