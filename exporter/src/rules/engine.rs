//! Incremental rule evaluation.
//!
//! Rules are compiled into a flat arena of conditions. Each leaf keeps just enough state to
//! answer "does it hold now" in O(1): recent hit timestamps for `event`, per-second buckets for
//! `signal`, the set of matching edges for `graph`, the set of matching nodes for `metric`.
//! An event only touches the leaves indexed by its type (and, through the graph's change feed,
//! the graph/metric leaves whose edges or nodes changed), then re-evaluates only the rules those
//! leaves belong to. Nothing walks the graph, so the cost per event does not grow with it.
//! A periodic [`Engine::tick`] re-evaluates everything for conditions that change by time alone
//! (windows sliding, negations becoming true).

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::format::{Condition, ConditionKind, ConditionsSpec, JoinKey, LoadedRule, MetricCmp};
use super::glob::{Glob, Substrings};
use crate::event::{Event, EventType};
use crate::graph::{Change, EdgeKind, Graph, NodeKind, NodeView};

/// Engine knobs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Window of `event` conditions without an explicit `window` (and of negations).
    pub default_window_ms: i64,
    /// Most join keys tracked per condition and per rule.
    pub max_keys: usize,
    /// Bytes of per-key state (join keys, hit times, buckets, matches, active scenes) the engine
    /// may hold, by its own accounting ([`Engine::state_bytes`]); new keys beyond it are dropped
    /// and counted in `keys_dropped`.
    pub max_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_window_ms: 900_000,
            max_keys: 10_000,
            max_bytes: 8 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Gt,
    Lt,
    Eq,
    Gte,
    Lte,
    Ne,
    Contains,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    Numeric,
    String,
    Auto,
}

#[derive(Debug, Clone)]
struct Cmp {
    op: Op,
    target: String,
    target_num: Option<f64>,
    vt: ValueType,
}

fn yaml_to_string(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Cmp {
    fn new(
        op: Option<&str>,
        target: Option<&serde_yaml::Value>,
        vt: Option<&str>,
    ) -> Result<Self, String> {
        let op = match op.unwrap_or("gte") {
            "gt" => Op::Gt,
            "lt" => Op::Lt,
            "eq" => Op::Eq,
            "gte" => Op::Gte,
            "lte" => Op::Lte,
            "ne" => Op::Ne,
            "contains" => Op::Contains,
            other => return Err(format!("unknown op {other}")),
        };
        let target = match target {
            Some(v) => yaml_to_string(v).ok_or("target must be a scalar")?,
            None => return Err("missing target".to_owned()),
        };
        let vt = match vt.unwrap_or("auto") {
            "numeric" => ValueType::Numeric,
            "string" => ValueType::String,
            "auto" => ValueType::Auto,
            other => return Err(format!("unknown value_type {other}")),
        };
        Ok(Cmp {
            op,
            target_num: target.trim().parse().ok(),
            target,
            vt,
        })
    }

    fn test_num(&self, x: f64) -> bool {
        match self.target_num {
            Some(t) if self.vt != ValueType::String => num_op(self.op, x, t),
            _ => self.test_str(&x.to_string()),
        }
    }

    fn test_str(&self, s: &str) -> bool {
        if self.op == Op::Contains {
            return s.contains(self.target.as_str());
        }
        let num = match (self.vt, s.trim().parse::<f64>().ok(), self.target_num) {
            (ValueType::String, _, _) => None,
            (_, Some(a), Some(b)) => Some((a, b)),
            (ValueType::Numeric, _, _) => return false,
            _ => None,
        };
        match num {
            Some((a, b)) => num_op(self.op, a, b),
            None => {
                let o = s.cmp(self.target.as_str());
                match self.op {
                    Op::Gt => o.is_gt(),
                    Op::Lt => o.is_lt(),
                    Op::Eq => o.is_eq(),
                    Op::Gte => o.is_ge(),
                    Op::Lte => o.is_le(),
                    Op::Ne => o.is_ne(),
                    Op::Contains => false,
                }
            }
        }
    }
}

fn num_op(op: Op, a: f64, b: f64) -> bool {
    match op {
        Op::Gt => a > b,
        Op::Lt => a < b,
        Op::Eq => a == b,
        Op::Gte => a >= b,
        Op::Lte => a <= b,
        Op::Ne => a != b,
        Op::Contains => false,
    }
}

/// Recent hits of an event condition for one key (or globally).
#[derive(Debug, Default)]
struct Hits {
    ts: VecDeque<i64>,
    last: i64,
    entity: Box<str>,
    job: Option<Box<str>>,
}

impl Hits {
    fn record(&mut self, ev: &Event, keep: usize) {
        self.ts.push_back(ev.ts);
        while self.ts.len() > keep {
            self.ts.pop_front();
        }
        self.last = self.last.max(ev.ts);
        if *self.entity != *ev.entity_id {
            self.entity = ev.entity_id.as_str().into();
        }
        if self.job.as_deref() != ev.job_id.as_deref() {
            self.job = ev.job_id.as_deref().map(Into::into);
        }
    }
    fn holds(&self, now: i64, window: i64, count: usize) -> bool {
        self.ts.len() >= count
            && self
                .ts
                .front()
                .is_some_and(|&t| t > now.saturating_sub(window))
    }
}

/// Per-second buckets: (second, count, sum, numeric samples).
#[derive(Debug, Default)]
struct Buckets(VecDeque<(i64, u32, f64, u32)>);

impl Buckets {
    fn add(&mut self, ts: i64, x: Option<f64>, window: i64) {
        let sec = ts.div_euclid(1000);
        match self.0.back_mut() {
            Some(b) if b.0 == sec => {
                b.1 += 1;
                if let Some(x) = x {
                    b.2 += x;
                    b.3 += 1;
                }
            }
            _ => self
                .0
                .push_back((sec, 1, x.unwrap_or(0.0), u32::from(x.is_some()))),
        }
        let oldest = ts.saturating_sub(window).div_euclid(1000);
        while self.0.front().is_some_and(|b| b.0 < oldest) {
            self.0.pop_front();
        }
        // Out-of-order input can grow the deque; its length is bounded by the window anyway.
        if self.0.len() > 4096 {
            self.0.pop_front();
        }
    }
    fn stats(&self, now: i64, window: i64) -> (u64, f64, u64) {
        let from = now.saturating_sub(window).div_euclid(1000);
        self.0
            .iter()
            .filter(|b| b.0 > from && b.0 <= now.div_euclid(1000))
            .fold((0, 0.0, 0), |(c, s, n), b| {
                (c + u64::from(b.1), s + b.2, n + u64::from(b.3))
            })
    }
    fn last(&self) -> i64 {
        self.0.back().map_or(i64::MIN, |b| b.0 * 1000)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignalKind {
    /// `transport.drop` events mentioning retransmit/drop, per second.
    RetransmitRate,
    /// Mean numeric `compute.util`.
    GpuUtilAvg,
    /// Extension `event_rate:<type>`: events of a type per second.
    EventRate(EventType),
    /// Extension `value_avg:<type>`: mean numeric value of a type.
    ValueAvg(EventType),
}

impl SignalKind {
    fn parse(s: &str) -> Option<SignalKind> {
        match s {
            "network.tcp.retransmit_rate_1m" => Some(SignalKind::RetransmitRate),
            "hardware.gpu.util_avg_1m" => Some(SignalKind::GpuUtilAvg),
            _ => {
                if let Some(t) = s.strip_prefix("event_rate:") {
                    EventType::parse(t).map(SignalKind::EventRate)
                } else if let Some(t) = s.strip_prefix("value_avg:") {
                    EventType::parse(t).map(SignalKind::ValueAvg)
                } else {
                    None
                }
            }
        }
    }
    fn source(self) -> EventType {
        match self {
            SignalKind::RetransmitRate => EventType::TransportDrop,
            SignalKind::GpuUtilAvg => EventType::ComputeUtil,
            SignalKind::EventRate(t) | SignalKind::ValueAvg(t) => t,
        }
    }
    /// Whether the event counts, and its numeric sample.
    fn sample(self, ev: &Event) -> Option<Option<f64>> {
        match self {
            SignalKind::RetransmitRate => {
                let v = ev.value.to_ascii_lowercase();
                (v.contains("retrans") || v.contains("drop")).then_some(None)
            }
            SignalKind::EventRate(_) => Some(None),
            SignalKind::GpuUtilAvg | SignalKind::ValueAvg(_) => ev
                .value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(Some),
        }
    }
    fn value(self, (count, sum, n): (u64, f64, u64), window: i64) -> Option<f64> {
        match self {
            SignalKind::RetransmitRate | SignalKind::EventRate(_) => {
                Some(count as f64 / (window as f64 / 1000.0))
            }
            SignalKind::GpuUtilAvg | SignalKind::ValueAvg(_) => (n > 0).then(|| sum / n as f64),
        }
    }
}

#[derive(Debug)]
enum Kind {
    Event {
        t: EventType,
        entity: Option<Glob>,
        value: Option<Substrings>,
        threshold: Option<f64>,
        global: Hits,
        keyed: FxHashMap<Box<str>, Hits>,
    },
    Signal {
        sig: SignalKind,
        entity: Option<Glob>,
        cmp: Cmp,
        global: Buckets,
        keyed: FxHashMap<Box<str>, Buckets>,
    },
    Graph {
        kind: EdgeKind,
        from: Option<Glob>,
        to: Option<Glob>,
        /// uid -> join key of each matching edge.
        matches: FxHashMap<u64, Option<Box<str>>>,
        keyed: FxHashMap<Box<str>, u32>,
    },
    Metric {
        node_kind: Option<NodeKind>,
        entity: Option<Glob>,
        cmps: Vec<(String, Cmp)>,
        /// node idx -> (generation, join key).
        matches: FxHashMap<u32, (u32, Option<Box<str>>)>,
        keyed: FxHashMap<Box<str>, u32>,
    },
    Any(Vec<usize>),
    All(Vec<usize>),
}

#[derive(Debug)]
struct Cond {
    rule: usize,
    negate: bool,
    window: i64,
    count: usize,
    kind: Kind,
}

/// A compiled rule and its reporting fields.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub scene: String,
    pub priority: u32,
    pub severity: String,
    pub reason_codes: Vec<String>,
    pub actions: Vec<String>,
    pub evidence: Vec<String>,
    pub join: Option<JoinKey>,
    root: usize,
    leaves: Vec<usize>,
    max_window: i64,
    /// Join keys seen: first and last sighting.
    keys: FxHashMap<Box<str>, (i64, i64)>,
}

/// A scene that holds now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveScene {
    pub rule_id: String,
    pub scene: String,
    pub entity: String,
    pub job: String,
    pub severity: String,
    pub since_ms: i64,
}

/// One matched rule, as `replay --format json` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SceneMatch {
    pub scene: String,
    pub rule_id: String,
    pub reason_codes: Vec<String>,
    pub actions: Vec<String>,
    pub evidence: Vec<String>,
    pub severity: String,
    pub priority: u32,
    /// Entities the scene holds for (one per join key; the last matching entity otherwise).
    pub entities: Vec<String>,
}

#[derive(Debug, Clone)]
struct ActiveInfo {
    since: i64,
    entity: String,
    job: String,
}

/// The rule engine. Single owner (the pipeline), like the graph.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    rules: Vec<Rule>,
    conds: Vec<Cond>,
    by_event: [Vec<usize>; EventType::COUNT],
    by_edge: [Vec<usize>; 3],
    metric_leaves: Vec<usize>,
    /// Rules with a join, by the event types their leaves look at (for key sightings).
    join_rules_by_event: [Vec<usize>; EventType::COUNT],
    first_ts: Option<i64>,
    active: BTreeMap<(usize, Box<str>), ActiveInfo>,
    dirty: Vec<(usize, Option<Box<str>>)>,
    /// Join keys not tracked because a cap (count or bytes) was hit.
    pub keys_dropped: u64,
    /// Bytes of per-key state by the engine's accounting: measured on every tick, estimated
    /// upwards in between as keys are added.
    state_bytes: usize,
    /// Rule evaluations done (for the bench and self-metrics).
    pub evaluations: u64,
}

fn severity_of(priority: u32) -> &'static str {
    match priority {
        90.. => "critical",
        60..=89 => "warning",
        _ => "info",
    }
}

struct Compiler<'a> {
    cfg: &'a EngineConfig,
    conds: Vec<Cond>,
    rule: usize,
    leaves: Vec<usize>,
    max_window: i64,
}

impl Compiler<'_> {
    fn compile(&mut self, c: &Condition) -> Result<usize, String> {
        let mut window = c.window.map(|w| w.0);
        let kind = match &c.kind {
            ConditionKind::Event {
                event_type,
                entity_id_pattern,
                value_pattern,
                value_threshold,
            } => Kind::Event {
                t: EventType::parse(event_type)
                    .ok_or_else(|| format!("unknown event_type {event_type}"))?,
                entity: entity_id_pattern.as_deref().map(Glob::new),
                value: value_pattern.as_deref().map(Substrings::new),
                threshold: *value_threshold,
                global: Hits::default(),
                keyed: FxHashMap::default(),
            },
            ConditionKind::Signal {
                signal,
                entity_id_pattern,
                op,
                target,
                value_type,
            } => {
                window.get_or_insert(60_000);
                Kind::Signal {
                    sig: SignalKind::parse(signal)
                        .ok_or_else(|| format!("unknown signal {signal}"))?,
                    entity: entity_id_pattern.as_deref().map(Glob::new),
                    cmp: Cmp::new(op.as_deref(), target.as_ref(), value_type.as_deref())?,
                    global: Buckets::default(),
                    keyed: FxHashMap::default(),
                }
            }
            ConditionKind::Graph {
                edge_type,
                from_pattern,
                to_pattern,
            } => Kind::Graph {
                kind: EdgeKind::parse(edge_type)
                    .ok_or_else(|| format!("unknown edge_type {edge_type}"))?,
                from: from_pattern.as_deref().map(Glob::new),
                to: to_pattern.as_deref().map(Glob::new),
                matches: FxHashMap::default(),
                keyed: FxHashMap::default(),
            },
            ConditionKind::Metric {
                node_type,
                entity_id_pattern,
                metrics,
            } => {
                let node_kind = match node_type.as_deref() {
                    None => None,
                    Some("Process" | "process") => Some(NodeKind::Process),
                    Some("Resource" | "resource") => Some(NodeKind::Resource),
                    Some("Error" | "error") => Some(NodeKind::Error),
                    Some(other) => return Err(format!("unknown node_type {other}")),
                };
                let cmps = metrics
                    .iter()
                    .map(
                        |MetricCmp {
                             key,
                             op,
                             target,
                             value_type,
                         }| {
                            Cmp::new(Some(op), Some(target), value_type.as_deref())
                                .map(|c| (key.clone(), c))
                        },
                    )
                    .collect::<Result<_, _>>()?;
                Kind::Metric {
                    node_kind,
                    entity: entity_id_pattern.as_deref().map(Glob::new),
                    cmps,
                    matches: FxHashMap::default(),
                    keyed: FxHashMap::default(),
                }
            }
            ConditionKind::Any { conditions } => Kind::Any(
                conditions
                    .iter()
                    .map(|c| self.compile(c))
                    .collect::<Result<_, _>>()?,
            ),
            ConditionKind::All { conditions } => Kind::All(
                conditions
                    .iter()
                    .map(|c| self.compile(c))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let window = window.unwrap_or(self.cfg.default_window_ms);
        self.max_window = self.max_window.max(window);
        let is_leaf = !matches!(kind, Kind::Any(_) | Kind::All(_));
        self.conds.push(Cond {
            rule: self.rule,
            negate: c.negate,
            window,
            count: c.count.unwrap_or(1).max(1) as usize,
            kind,
        });
        let idx = self.conds.len() - 1;
        if is_leaf {
            self.leaves.push(idx);
        }
        Ok(idx)
    }
}

/// Join key of an event.
fn event_key(join: JoinKey, ev: &Event) -> Option<Box<str>> {
    match join {
        JoinKey::Entity => Some(ev.entity_id.as_str().into()),
        JoinKey::Pid => ev.pid.map(|p| p.to_string().into()),
        JoinKey::Job => ev.job_id.as_deref().map(Into::into),
    }
}

fn node_key(join: JoinKey, n: NodeView<'_>) -> Option<Box<str>> {
    match join {
        JoinKey::Entity => match n.kind() {
            NodeKind::Error => n.name().strip_prefix("error-").map(Into::into),
            _ => Some(n.name().into()),
        },
        JoinKey::Pid => n.pid().map(|p| p.to_string().into()),
        JoinKey::Job => n.job().map(Into::into),
    }
}

fn edge_key(join: JoinKey, from: NodeView<'_>, to: NodeView<'_>) -> Option<Box<str>> {
    match join {
        JoinKey::Entity => {
            if to.kind() == NodeKind::Resource || from.kind() != NodeKind::Resource {
                node_key(join, to)
            } else {
                node_key(join, from)
            }
        }
        JoinKey::Pid | JoinKey::Job => node_key(join, from).or_else(|| node_key(join, to)),
    }
}

fn cmp_node(
    n: NodeView<'_>,
    node_kind: Option<NodeKind>,
    entity: &Option<Glob>,
    cmps: &[(String, Cmp)],
) -> bool {
    node_kind.is_none_or(|k| k == n.kind())
        && entity.as_ref().is_none_or(|g| g.matches(n.name()))
        && cmps
            .iter()
            .all(|(key, c)| n.meta(key).is_some_and(|v| c.test_str(&v)))
}

impl Engine {
    /// Compiles rules; rules that do not compile are returned with the reason and left out.
    pub fn new(rules: &[LoadedRule], cfg: EngineConfig) -> (Engine, Vec<(String, String)>) {
        let mut e = Engine {
            cfg,
            rules: Vec::new(),
            conds: Vec::new(),
            by_event: Default::default(),
            by_edge: Default::default(),
            metric_leaves: Vec::new(),
            join_rules_by_event: Default::default(),
            first_ts: None,
            active: BTreeMap::new(),
            dirty: Vec::new(),
            keys_dropped: 0,
            state_bytes: 0,
            evaluations: 0,
        };
        let mut rejected = Vec::new();
        for lr in rules {
            if let Err(why) = e.add_rule(lr) {
                rejected.push((lr.id.clone(), why));
            }
        }
        (e, rejected)
    }

    fn add_rule(&mut self, lr: &LoadedRule) -> Result<(), String> {
        let spec = &lr.spec;
        let mut c = Compiler {
            cfg: &self.cfg,
            conds: std::mem::take(&mut self.conds),
            rule: self.rules.len(),
            leaves: Vec::new(),
            max_window: 0,
        };
        let saved = c.conds.len();
        let wrap = |conditions: Vec<Condition>, any: bool| Condition {
            kind: if any {
                ConditionKind::Any { conditions }
            } else {
                ConditionKind::All { conditions }
            },
            window: None,
            negate: false,
            count: None,
        };
        let root_spec = match &spec.conditions {
            ConditionsSpec::List(v) => wrap(v.clone(), false),
            ConditionsSpec::Group(g) => match (&g.all, &g.any) {
                (Some(all), None) => wrap(all.clone(), false),
                (None, Some(any)) => wrap(any.clone(), true),
                (Some(all), Some(any)) => wrap(
                    vec![wrap(all.clone(), false), wrap(any.clone(), true)],
                    false,
                ),
                (None, None) => return Err("conditions: need a list, all: or any:".to_owned()),
            },
        };
        let root = match c.compile(&root_spec) {
            Ok(r) => r,
            Err(why) => {
                c.conds.truncate(saved);
                self.conds = c.conds;
                return Err(why);
            }
        };
        if c.leaves.is_empty() {
            c.conds.truncate(saved);
            self.conds = c.conds;
            return Err("a rule needs at least one condition".to_owned());
        }
        let (leaves, max_window) = (c.leaves, c.max_window);
        self.conds = c.conds;
        let rule_idx = self.rules.len();
        for &l in &leaves {
            match &self.conds[l].kind {
                Kind::Event { t, .. } => self.by_event[*t as usize].push(l),
                Kind::Signal { sig, .. } => self.by_event[sig.source() as usize].push(l),
                Kind::Graph { kind, .. } => self.by_edge[*kind as usize].push(l),
                Kind::Metric { .. } => self.metric_leaves.push(l),
                Kind::Any(_) | Kind::All(_) => {}
            }
            if spec.join.is_some() {
                let t = match &self.conds[l].kind {
                    Kind::Event { t, .. } => Some(*t),
                    Kind::Signal { sig, .. } => Some(sig.source()),
                    _ => None,
                };
                if let Some(t) = t {
                    let v = &mut self.join_rules_by_event[t as usize];
                    if !v.contains(&rule_idx) {
                        v.push(rule_idx);
                    }
                }
            }
        }
        self.rules.push(Rule {
            id: lr.id.clone(),
            name: spec.name.clone(),
            scene: spec.scene.clone(),
            priority: spec.priority,
            severity: spec
                .severity
                .clone()
                .unwrap_or_else(|| severity_of(spec.priority).to_owned()),
            reason_codes: spec.reason_codes.clone(),
            actions: spec
                .solution_steps
                .iter()
                .map(|s| s.action.clone())
                .collect(),
            evidence: spec.related_evidences.clone(),
            join: spec.join,
            root,
            leaves,
            max_window: max_window.max(self.cfg.default_window_ms),
            keys: FxHashMap::default(),
        });
        Ok(())
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn mark(&mut self, rule: usize, key: Option<Box<str>>) {
        if !self.dirty.iter().any(|(r, k)| *r == rule && *k == key) {
            self.dirty.push((rule, key));
        }
    }

    /// Feeds one event (already applied to `graph`, whose changes are `changes`), then
    /// re-evaluates the rules it can affect.
    pub fn on_event(&mut self, ev: &Event, graph: &Graph, changes: &[Change]) {
        let now = graph.now();
        self.first_ts.get_or_insert(ev.ts.min(now));
        let max_keys = self.cfg.max_keys;
        let max_bytes = self.cfg.max_bytes;
        // Key sightings for join rules (needed by negations: "absent for the window").
        for i in 0..self.join_rules_by_event[ev.event_type as usize].len() {
            let r = self.join_rules_by_event[ev.event_type as usize][i];
            let rule = &mut self.rules[r];
            let Some(join) = rule.join else { continue };
            if let Some(k) = event_key(join, ev) {
                if let Some(e) = rule.keys.get_mut(&k) {
                    e.1 = e.1.max(ev.ts);
                } else if rule.keys.len() < max_keys && self.state_bytes < max_bytes {
                    self.state_bytes += KEY_BYTES + k.len();
                    rule.keys.insert(k, (ev.ts, ev.ts));
                } else {
                    self.keys_dropped += 1;
                }
            }
        }
        for i in 0..self.by_event[ev.event_type as usize].len() {
            let ci = self.by_event[ev.event_type as usize][i];
            let rule = self.conds[ci].rule;
            let join = self.rules[rule].join;
            let cond = &mut self.conds[ci];
            let (window, count) = (cond.window, cond.count);
            let mut hit = None;
            match &mut cond.kind {
                Kind::Event {
                    entity,
                    value,
                    threshold,
                    global,
                    keyed,
                    ..
                } => {
                    let ok = entity.as_ref().is_none_or(|g| g.matches(&ev.entity_id))
                        && value.as_ref().is_none_or(|v| v.matches(&ev.value))
                        && threshold
                            .is_none_or(|t| ev.value.trim().parse::<f64>().is_ok_and(|x| x >= t));
                    if ok {
                        match join.map(|j| event_key(j, ev)) {
                            None => {
                                global.record(ev, count);
                                hit = Some(None);
                            }
                            Some(Some(k)) => {
                                if let Some(h) = keyed.get_mut(&k) {
                                    h.record(ev, count);
                                    hit = Some(Some(k));
                                } else if keyed.len() < max_keys && self.state_bytes < max_bytes {
                                    self.state_bytes += KEY_BYTES + k.len() + hits_bytes(count);
                                    keyed.entry(k.clone()).or_default().record(ev, count);
                                    hit = Some(Some(k));
                                } else {
                                    self.keys_dropped += 1;
                                }
                            }
                            Some(None) => {}
                        }
                    }
                }
                Kind::Signal {
                    sig,
                    entity,
                    global,
                    keyed,
                    ..
                } => {
                    let sample = if entity.as_ref().is_none_or(|g| g.matches(&ev.entity_id)) {
                        sig.sample(ev)
                    } else {
                        None
                    };
                    if let Some(x) = sample {
                        match join.map(|j| event_key(j, ev)) {
                            None => {
                                global.add(ev.ts, x, window);
                                hit = Some(None);
                            }
                            Some(Some(k)) => {
                                if let Some(b) = keyed.get_mut(&k) {
                                    b.add(ev.ts, x, window);
                                    hit = Some(Some(k));
                                } else if keyed.len() < max_keys && self.state_bytes < max_bytes {
                                    self.state_bytes += KEY_BYTES + k.len() + buckets_bytes(window);
                                    keyed.entry(k.clone()).or_default().add(ev.ts, x, window);
                                    hit = Some(Some(k));
                                } else {
                                    self.keys_dropped += 1;
                                }
                            }
                            Some(None) => {}
                        }
                    }
                }
                _ => {}
            }
            if let Some(k) = hit {
                self.mark(rule, k);
            }
        }
        for ch in changes {
            self.on_change(*ch, graph);
        }
        self.flush(now, Some(ev));
    }

    /// Feeds graph changes that happened without an event (expiry on a tick).
    pub fn on_changes(&mut self, graph: &Graph, changes: &[Change]) {
        for ch in changes {
            self.on_change(*ch, graph);
        }
        self.flush(graph.now(), None);
    }

    fn flush(&mut self, now: i64, ev: Option<&Event>) {
        let dirty = std::mem::take(&mut self.dirty);
        for (rule, key) in &dirty {
            self.evaluate(*rule, key.as_deref(), now, ev);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    fn on_change(&mut self, ch: Change, graph: &Graph) {
        let max_keys = self.cfg.max_keys;
        let max_bytes = self.cfg.max_bytes;
        match ch {
            Change::EdgeAdded {
                uid,
                kind: ek,
                from,
                to,
            } => {
                let (Some(f), Some(t)) = (graph.node(from), graph.node(to)) else {
                    return;
                };
                for i in 0..self.by_edge[ek as usize].len() {
                    let ci = self.by_edge[ek as usize][i];
                    let rule = self.conds[ci].rule;
                    let join = self.rules[rule].join;
                    if let Kind::Graph {
                        from: fp,
                        to: tp,
                        matches,
                        keyed,
                        ..
                    } = &mut self.conds[ci].kind
                        && fp.as_ref().is_none_or(|g| g.matches(f.name()))
                        && tp.as_ref().is_none_or(|g| g.matches(t.name()))
                    {
                        let key = join.and_then(|j| edge_key(j, f, t));
                        if let Some(k) = &key {
                            if !keyed.contains_key(k)
                                && (keyed.len() >= max_keys || self.state_bytes >= max_bytes)
                            {
                                self.keys_dropped += 1;
                                continue;
                            }
                            self.state_bytes += KEY_BYTES + k.len();
                            *keyed.entry(k.clone()).or_default() += 1;
                        }
                        self.state_bytes += MATCH_BYTES;
                        matches.insert(uid, key.clone());
                        self.mark(rule, key);
                    }
                }
            }
            Change::EdgeRemoved { uid, kind: ek } => {
                for i in 0..self.by_edge[ek as usize].len() {
                    let ci = self.by_edge[ek as usize][i];
                    let rule = self.conds[ci].rule;
                    if let Kind::Graph { matches, keyed, .. } = &mut self.conds[ci].kind
                        && let Some(key) = matches.remove(&uid)
                    {
                        if let Some(k) = &key {
                            dec(keyed, k);
                        }
                        self.mark(rule, key);
                    }
                }
            }
            Change::NodeTouched { idx } => {
                let Some(n) = graph.node(idx) else { return };
                for i in 0..self.metric_leaves.len() {
                    let ci = self.metric_leaves[i];
                    let rule = self.conds[ci].rule;
                    let join = self.rules[rule].join;
                    if let Kind::Metric {
                        node_kind,
                        entity,
                        cmps,
                        matches,
                        keyed,
                    } = &mut self.conds[ci].kind
                    {
                        let ok = cmp_node(n, *node_kind, entity, cmps);
                        let had = matches.get(&idx).is_some_and(|(g, _)| *g == n.generation());
                        if ok && !had {
                            let key = join.and_then(|j| node_key(j, n));
                            if let Some(k) = &key {
                                if !keyed.contains_key(k)
                                    && (keyed.len() >= max_keys || self.state_bytes >= max_bytes)
                                {
                                    self.keys_dropped += 1;
                                    continue;
                                }
                                self.state_bytes += KEY_BYTES + k.len();
                                *keyed.entry(k.clone()).or_default() += 1;
                            }
                            self.state_bytes += MATCH_BYTES;
                            if let Some((_, Some(old))) =
                                matches.insert(idx, (n.generation(), key.clone()))
                            {
                                dec(keyed, &old);
                            }
                            self.mark(rule, key);
                        } else if !ok && let Some((_, key)) = matches.remove(&idx) {
                            if let Some(k) = &key {
                                dec(keyed, k);
                            }
                            self.mark(rule, key);
                        }
                    }
                }
            }
            Change::NodeRemoved { idx, generation } => {
                for i in 0..self.metric_leaves.len() {
                    let ci = self.metric_leaves[i];
                    let rule = self.conds[ci].rule;
                    if let Kind::Metric { matches, keyed, .. } = &mut self.conds[ci].kind
                        && matches.get(&idx).is_some_and(|(g, _)| *g == generation)
                        && let Some((_, key)) = matches.remove(&idx)
                    {
                        if let Some(k) = &key {
                            dec(keyed, k);
                        }
                        self.mark(rule, key);
                    }
                }
            }
        }
    }

    /// Does condition `ci` hold now (for `key` when the rule joins)?
    fn holds(&self, ci: usize, key: Option<&str>, now: i64) -> bool {
        let c = &self.conds[ci];
        let positive = match &c.kind {
            Kind::Event { global, keyed, .. } => match key {
                None => global.holds(now, c.window, c.count),
                Some(k) => keyed
                    .get(k)
                    .is_some_and(|h| h.holds(now, c.window, c.count)),
            },
            Kind::Signal {
                sig,
                cmp,
                global,
                keyed,
                ..
            } => {
                let b = match key {
                    None => Some(global),
                    Some(k) => keyed.get(k),
                };
                let stats = b.map_or((0, 0.0, 0), |b| b.stats(now, c.window));
                sig.value(stats, c.window).is_some_and(|v| cmp.test_num(v))
            }
            Kind::Graph { keyed, .. } | Kind::Metric { keyed, .. } if key.is_some() => {
                key.is_some_and(|k| keyed.get(k).is_some_and(|&n| n > 0))
            }
            Kind::Graph { matches, .. } => !matches.is_empty(),
            Kind::Metric { matches, .. } => !matches.is_empty(),
            Kind::Any(v) => v.iter().any(|&i| self.holds(i, key, now)),
            Kind::All(v) => v.iter().all(|&i| self.holds(i, key, now)),
        };
        if !c.negate {
            return positive;
        }
        // "Absent for the window": only once we have watched (this key) for a whole window.
        let since = match key {
            None => self.first_ts,
            Some(k) => self.rules[c.rule].keys.get(k).map(|s| s.0),
        };
        !positive && since.is_some_and(|s| now.saturating_sub(s) >= c.window)
    }

    /// Entity/job labels of a holding scene: from the freshest matching event of its leaves.
    fn labels(&self, rule: usize, key: Option<&str>, ev: Option<&Event>) -> (String, String) {
        let r = &self.rules[rule];
        let mut best: Option<(i64, &str, Option<&str>)> = None;
        for &l in &r.leaves {
            let c = &self.conds[l];
            if c.negate {
                continue;
            }
            let hits = match (&c.kind, key) {
                (Kind::Event { global, .. }, None) => Some(global),
                (Kind::Event { keyed, .. }, Some(k)) => keyed.get(k),
                _ => None,
            };
            if let Some(h) = hits.filter(|h| !h.ts.is_empty())
                && best.is_none_or(|b| h.last > b.0)
            {
                best = Some((h.last, &h.entity, h.job.as_deref()));
            }
        }
        match (best, r.join, key) {
            (Some((_, e, j)), _, _) => (e.to_owned(), j.unwrap_or("").to_owned()),
            (None, Some(JoinKey::Entity), Some(k)) => (k.to_owned(), String::new()),
            (None, Some(JoinKey::Job), Some(k)) => (String::new(), k.to_owned()),
            (None, Some(JoinKey::Pid), Some(k)) => (format!("pid-{k}"), String::new()),
            _ => match ev {
                Some(ev) => (ev.entity_id.clone(), ev.job_id.clone().unwrap_or_default()),
                None => (String::new(), String::new()),
            },
        }
    }

    fn evaluate(&mut self, rule: usize, key: Option<&str>, now: i64, ev: Option<&Event>) {
        self.evaluations += 1;
        let root = self.rules[rule].root;
        let holds = self.holds(root, key, now);
        let k: Box<str> = key.unwrap_or("").into();
        let slot = (rule, k);
        if holds {
            let (entity, job) = self.labels(rule, key, ev);
            match self.active.get_mut(&slot) {
                Some(a) => {
                    a.entity = entity;
                    a.job = job;
                }
                None => {
                    self.active.insert(
                        slot,
                        ActiveInfo {
                            since: now,
                            entity,
                            job,
                        },
                    );
                }
            }
        } else {
            self.active.remove(&slot);
        }
    }

    /// Re-evaluates every rule at `now` (windows slide, negations mature) and prunes old state.
    pub fn tick(&mut self, now: i64) {
        self.first_ts.get_or_insert(now);
        for c in &mut self.conds {
            // Saturating: event time is whatever the input says (a replay before any event ticks
            // at i64::MIN, a probe may write a negative ts); fuzzing found the overflow.
            let horizon = now.saturating_sub(c.window);
            match &mut c.kind {
                Kind::Event { keyed, .. } => keyed.retain(|_, h| h.last > horizon),
                Kind::Signal { keyed, .. } => keyed.retain(|_, b| b.last() > horizon),
                _ => {}
            }
        }
        for r in 0..self.rules.len() {
            if self.rules[r].join.is_none() {
                self.evaluate(r, None, now, None);
                continue;
            }
            let horizon = now.saturating_sub(self.rules[r].max_window.saturating_mul(2));
            self.rules[r].keys.retain(|_, s| s.1 > horizon);
            let mut keys: Vec<Box<str>> = self.rules[r].keys.keys().cloned().collect();
            // Keys only known from graph/metric leaves count too.
            for &l in &self.rules[r].leaves {
                if let Kind::Graph { keyed, .. } | Kind::Metric { keyed, .. } = &self.conds[l].kind
                {
                    keys.extend(keyed.keys().cloned());
                }
            }
            keys.sort();
            keys.dedup();
            for k in &keys {
                self.evaluate(r, Some(k), now, None);
            }
            // Scenes whose key vanished entirely.
            let stale: Vec<_> = self
                .active
                .range((r, Box::<str>::from(""))..(r + 1, Box::<str>::from("")))
                .filter(|((_, k), _)| keys.binary_search(k).is_err())
                .map(|(s, _)| s.clone())
                .collect();
            for s in stale {
                self.active.remove(&s);
            }
        }
        self.state_bytes = self.measure();
    }

    /// Scenes that hold now, sorted by rule then entity.
    pub fn active_scenes(&self) -> Vec<ActiveScene> {
        self.active
            .iter()
            .map(|((r, _), a)| {
                let rule = &self.rules[*r];
                ActiveScene {
                    rule_id: rule.id.clone(),
                    scene: rule.scene.clone(),
                    entity: a.entity.clone(),
                    job: a.job.clone(),
                    severity: rule.severity.clone(),
                    since_ms: a.since,
                }
            })
            .collect()
    }

    /// Matched rules (one entry per rule), highest priority first.
    pub fn matches(&self) -> Vec<SceneMatch> {
        let mut by_rule: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for ((r, _), a) in &self.active {
            let v = by_rule.entry(*r).or_default();
            if !a.entity.is_empty() && !v.contains(&a.entity) {
                v.push(a.entity.clone());
            }
        }
        let mut out: Vec<SceneMatch> = by_rule
            .into_iter()
            .map(|(r, mut entities)| {
                entities.sort();
                let rule = &self.rules[r];
                SceneMatch {
                    scene: rule.scene.clone(),
                    rule_id: rule.id.clone(),
                    reason_codes: rule.reason_codes.clone(),
                    actions: rule.actions.clone(),
                    evidence: rule.evidence.clone(),
                    severity: rule.severity.clone(),
                    priority: rule.priority,
                    entities,
                }
            })
            .collect();
        out.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.rule_id.cmp(&b.rule_id)));
        out
    }
}

/// Charge of one key in a map (hash-table entry, box header and slack), without its bytes.
const KEY_BYTES: usize = 48;
/// Charge of one matching edge or node of a graph/metric leaf.
const MATCH_BYTES: usize = 48;
/// Charge of one active scene, without its strings.
const ACTIVE_BYTES: usize = 96;

/// Upper estimate of a new [`Hits`]: `count` times and entity/job labels at their bound.
fn hits_bytes(count: usize) -> usize {
    std::mem::size_of::<Hits>() + count * 8 + 2 * crate::event::MAX_STORED_ID_BYTES
}

/// Upper estimate of new [`Buckets`] over `window` (one bucket per second, at most 4096).
fn buckets_bytes(window: i64) -> usize {
    let n = (window / 1000 + 2).clamp(1, 4096) as usize;
    std::mem::size_of::<Buckets>() + n * std::mem::size_of::<(i64, u32, f64, u32)>()
}

fn keyed_bytes(keyed: &FxHashMap<Box<str>, u32>) -> usize {
    keyed.keys().map(|k| KEY_BYTES + k.len()).sum()
}

impl Engine {
    /// Bytes of per-key state by the engine's accounting (bounded by `max_bytes`).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// Measures what the per-key state holds now (done on every tick, O(keys)).
    fn measure(&self) -> usize {
        let key = |k: &str| KEY_BYTES + k.len();
        let mut b: usize = self
            .rules
            .iter()
            .flat_map(|r| r.keys.keys())
            .map(|k| key(k))
            .sum();
        for c in &self.conds {
            b += match &c.kind {
                Kind::Event { keyed, .. } => keyed
                    .iter()
                    .map(|(k, h)| {
                        key(k)
                            + std::mem::size_of::<Hits>()
                            + h.ts.capacity() * 8
                            + h.entity.len()
                            + h.job.as_deref().map_or(0, str::len)
                    })
                    .sum(),
                Kind::Signal { keyed, .. } => keyed
                    .iter()
                    .map(|(k, bk)| {
                        key(k)
                            + std::mem::size_of::<Buckets>()
                            + bk.0.capacity() * std::mem::size_of::<(i64, u32, f64, u32)>()
                    })
                    .sum(),
                Kind::Graph { matches, keyed, .. } => {
                    matches
                        .values()
                        .map(|k| MATCH_BYTES + k.as_deref().map_or(0, str::len))
                        .sum::<usize>()
                        + keyed_bytes(keyed)
                }
                Kind::Metric { matches, keyed, .. } => {
                    matches
                        .values()
                        .map(|(_, k)| MATCH_BYTES + k.as_deref().map_or(0, str::len))
                        .sum::<usize>()
                        + keyed_bytes(keyed)
                }
                Kind::Any(_) | Kind::All(_) => 0,
            };
        }
        b + self
            .active
            .iter()
            .map(|((_, k), a)| ACTIVE_BYTES + k.len() + a.entity.len() + a.job.len())
            .sum::<usize>()
    }
}

fn dec(keyed: &mut FxHashMap<Box<str>, u32>, k: &str) {
    if let Some(n) = keyed.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            keyed.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphLimits;
    use crate::rules::format::RuleSpec;
    use std::path::PathBuf;

    fn rule(id: &str, body: &str) -> LoadedRule {
        let text = format!(
            "id: {id}\nname: {id}\nscene: scene.{id}\npriority: 50\n{body}\nsolution_steps: [{{step: 1, action: act}}]\nrelated_evidences: [e]\napplicability: {{}}\n"
        );
        let spec: RuleSpec = serde_yaml::from_str(&text).unwrap();
        LoadedRule {
            id: id.to_owned(),
            pack: "t".to_owned(),
            file: PathBuf::new(),
            spec,
        }
    }

    struct World {
        g: Graph,
        e: Engine,
        buf: Vec<Change>,
    }

    impl World {
        fn new(rules: &[LoadedRule], limits: GraphLimits) -> World {
            let (e, rejected) = Engine::new(rules, EngineConfig::default());
            assert!(rejected.is_empty(), "{rejected:?}");
            let mut g = Graph::new(limits);
            g.track_changes(true);
            World {
                g,
                e,
                buf: Vec::new(),
            }
        }
        fn feed(
            &mut self,
            ts: i64,
            t: EventType,
            entity: &str,
            pid: Option<u32>,
            job: Option<&str>,
            value: &str,
        ) {
            let ev = Event {
                ts,
                event_type: t,
                entity_id: entity.into(),
                job_id: job.map(Into::into),
                pid,
                value: value.into(),
                node_id: None,
                pod: None,
                namespace: None,
            };
            self.g.ingest(&ev);
            self.buf.clear();
            self.buf.extend(self.g.drain_changes());
            self.e.on_event(&ev, &self.g, &self.buf);
        }
        fn tick(&mut self, now: i64) {
            self.g.advance(now);
            self.buf.clear();
            self.buf.extend(self.g.drain_changes());
            self.e.on_changes(&self.g, &self.buf);
            self.e.tick(self.g.now());
        }
        fn active(&self) -> Vec<(String, String)> {
            self.e
                .active_scenes()
                .into_iter()
                .map(|s| (s.rule_id, s.entity))
                .collect()
        }
    }

    #[test]
    fn graph_conditions_follow_edges_in_and_out() {
        let limits = GraphLimits {
            ttl_ms: 1000,
            ..GraphLimits::default()
        };
        let mut w = World::new(
            &[rule(
                "g",
                "conditions: [{type: graph, edge_type: waits_on, from_pattern: \"pid-*\", to_pattern: \"nvme*\"}]",
            )],
            limits,
        );
        w.feed(0, EventType::ProcessState, "nvme0n1", Some(1), None, "R");
        assert!(w.active().is_empty());
        w.feed(10, EventType::ProcessState, "nvme0n1", Some(1), None, "D");
        assert_eq!(w.active().len(), 1);
        w.feed(20, EventType::ProcessState, "nvme0n1", Some(1), None, "R");
        assert!(w.active().is_empty(), "edge removed -> condition gone");
        w.feed(30, EventType::ProcessState, "nvme0n1", Some(1), None, "D");
        assert_eq!(w.active().len(), 1);
        w.tick(5000);
        assert!(w.active().is_empty(), "edge expired -> condition gone");
    }

    #[test]
    fn metric_conditions_track_node_metadata() {
        let mut w = World::new(
            &[rule(
                "m",
                "conditions: [{type: metric, node_type: Resource, entity_id_pattern: \"gpu-*\", metrics: [{key: compute.util, op: gte, target: 95, value_type: numeric}]}]",
            )],
            GraphLimits::default(),
        );
        w.feed(0, EventType::ComputeUtil, "gpu-0", None, None, "50");
        assert!(w.active().is_empty());
        w.feed(1, EventType::ComputeUtil, "gpu-0", None, None, "99");
        assert_eq!(w.active().len(), 1);
        w.feed(2, EventType::ComputeUtil, "gpu-0", None, None, "10");
        assert!(w.active().is_empty());
        w.feed(3, EventType::ComputeUtil, "nvme0", None, None, "99");
        assert!(w.active().is_empty(), "pattern excludes it");
    }

    #[test]
    fn retransmit_signal_is_drops_per_second_over_a_minute() {
        let mut w = World::new(
            &[rule(
                "s",
                "conditions: [{type: signal, signal: network.tcp.retransmit_rate_1m, op: gte, target: 0.5}]",
            )],
            GraphLimits::default(),
        );
        for i in 0..29 {
            w.feed(
                i * 1000,
                EventType::TransportDrop,
                "network-eth0",
                None,
                None,
                "tcp retransmit",
            );
        }
        assert!(w.active().is_empty(), "29/60 < 0.5");
        w.feed(
            29_000,
            EventType::TransportDrop,
            "network-eth0",
            None,
            None,
            "bw 100",
        ); // not a drop
        assert!(w.active().is_empty());
        w.feed(
            29_500,
            EventType::TransportDrop,
            "network-eth0",
            None,
            None,
            "packet DROP",
        );
        assert_eq!(w.active().len(), 1, "30/60 >= 0.5");
        w.tick(120_000);
        assert!(w.active().is_empty(), "window slid past");
    }

    /// Regression (found by `scripts/fuzz`, target rule_pack): ticking before any event (the
    /// graph's clock is still i64::MIN, as in `ark-exporter replay` of an empty file) or at a
    /// negative event time overflowed the window arithmetic.
    #[test]
    fn ticks_at_extreme_times_do_not_overflow() {
        let rules = [
            rule(
                "n",
                "join: job\nconditions: [{type: event, event_type: intent.run, window: 1h}, {type: event, event_type: compute.util, negate: true, window: 5m}]",
            ),
            rule(
                "s",
                "conditions: [{type: signal, signal: network.tcp.retransmit_rate_1m, op: gt, target: 0.1}]",
            ),
        ];
        let mut w = World::new(&rules, GraphLimits::default());
        w.tick(i64::MIN);
        w.feed(
            i64::MIN,
            EventType::IntentRun,
            "gpu-0",
            Some(1),
            Some("a"),
            "run",
        );
        w.feed(
            i64::MIN + 1,
            EventType::TransportDrop,
            "network-eth0",
            Some(1),
            None,
            "1",
        );
        w.tick(i64::MIN + 3_600_000);
        w.feed(
            i64::MAX,
            EventType::IntentRun,
            "gpu-0",
            Some(1),
            Some("a"),
            "run",
        );
        w.tick(i64::MAX);
        let _ = w.active();
    }

    #[test]
    fn negation_matures_per_key_and_joins_do_not_mix_keys() {
        let mut w = World::new(
            &[rule(
                "n",
                "join: job\nconditions: [{type: event, event_type: intent.run}, {type: event, event_type: compute.util, negate: true, window: 1m}]",
            )],
            GraphLimits::default(),
        );
        w.feed(0, EventType::IntentRun, "gpu-0", Some(1), Some("a"), "run");
        w.feed(0, EventType::IntentRun, "gpu-1", Some(2), Some("b"), "run");
        w.tick(30_000);
        assert!(w.active().is_empty(), "not watched for a whole window yet");
        w.feed(
            50_000,
            EventType::ComputeUtil,
            "gpu-1",
            Some(2),
            Some("b"),
            "90",
        );
        w.tick(61_000);
        let a = w.active();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].1, "gpu-0", "only job a is without progress");
        w.feed(
            62_000,
            EventType::ComputeUtil,
            "gpu-0",
            Some(1),
            Some("a"),
            "90",
        );
        assert!(w.active().is_empty());
    }

    #[test]
    fn per_key_state_is_bounded_in_bytes() {
        // A joined rule with an event, a signal and a graph leaf: every new job is a new key.
        let rules = [rule(
            "b",
            "join: entity\nconditions: [{type: event, event_type: transport.drop, count: 3}, {type: signal, signal: network.tcp.retransmit_rate_1m, op: gte, target: 0.5}, {type: graph, edge_type: waits_on}]",
        )];
        let max = 256 * 1024;
        let (e, rejected) = Engine::new(
            &rules,
            EngineConfig {
                max_bytes: max,
                ..EngineConfig::default()
            },
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let mut w = World::new(&[], GraphLimits::default());
        w.e = e;
        let long = "n".repeat(100);
        for i in 0..5_000u32 {
            let entity = format!("network-{i}-{long}");
            w.feed(
                i64::from(i),
                EventType::TransportDrop,
                &entity,
                Some(i),
                None,
                "retransmit",
            );
            if i % 500 == 0 {
                w.tick(i64::from(i));
                assert!(w.e.state_bytes() <= max + 4096, "{}", w.e.state_bytes());
            }
        }
        w.tick(5_000);
        let measured = w.e.state_bytes();
        assert!(measured <= max + 4096, "{measured} over {max}");
        assert!(
            measured > max / 2,
            "the budget is used, not undercounted: {measured}"
        );
        assert!(
            w.e.keys_dropped > 0,
            "new keys beyond the budget are counted"
        );
    }

    #[test]
    fn count_needs_that_many_in_the_window() {
        let mut w = World::new(
            &[rule(
                "c",
                "conditions: [{type: event, event_type: error.hw, value_pattern: XID, count: 3, window: 10m}]",
            )],
            GraphLimits::default(),
        );
        w.feed(0, EventType::ErrorHw, "gpu-0", None, None, "XID 13");
        w.feed(1000, EventType::ErrorHw, "gpu-0", None, None, "XID 13");
        assert!(w.active().is_empty());
        w.feed(2000, EventType::ErrorHw, "gpu-0", None, None, "ECC"); // no XID
        assert!(w.active().is_empty());
        w.feed(700_000, EventType::ErrorHw, "gpu-0", None, None, "XID 13");
        assert!(
            w.active().is_empty(),
            "the first two fell out of the window"
        );
        w.feed(701_000, EventType::ErrorHw, "gpu-0", None, None, "XID 13");
        w.feed(702_000, EventType::ErrorHw, "gpu-0", None, None, "XID 13");
        assert_eq!(w.active().len(), 1);
    }

    #[test]
    fn bad_rules_are_rejected_with_a_reason() {
        let rules = [
            rule("a", "conditions: [{type: event, event_type: nope}]"),
            rule("b", "conditions: [{type: graph, edge_type: loves}]"),
            rule(
                "c",
                "conditions: [{type: signal, signal: made.up, op: gt, target: 1}]",
            ),
            rule(
                "d",
                "conditions: [{type: signal, signal: hardware.gpu.util_avg_1m, op: approx, target: 1}]",
            ),
            rule("e", "conditions: []"),
            rule(
                "ok",
                "conditions: [{type: event, event_type: error.hw, value_threshold: \"5\"}]",
            ),
        ];
        let (e, rejected) = Engine::new(&rules, EngineConfig::default());
        assert_eq!(rejected.len(), 5, "{rejected:?}");
        assert_eq!(e.rules().len(), 1);
    }

    #[test]
    fn cmp_semantics() {
        let c = |op: &str, t: &str, vt: Option<&str>| {
            Cmp::new(Some(op), Some(&serde_yaml::Value::String(t.into())), vt).unwrap()
        };
        assert!(
            c("gt", "5", None).test_str("10"),
            "auto: numeric when both parse"
        );
        assert!(
            !c("gt", "5", Some("string")).test_str("10"),
            "string: lexicographic"
        );
        assert!(!c("gt", "5", Some("numeric")).test_str("abc"));
        assert!(c("contains", "XID", None).test_str("XID 79"));
        assert!(c("ne", "a", None).test_str("b"));
        assert!(c("eq", "1.0", None).test_str("1"));
    }
}
