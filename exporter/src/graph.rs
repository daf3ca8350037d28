//! The causal graph: processes, resources and errors joined by Consumes / WaitsOn / BlockedBy.
//!
//! Ownership model: exactly one thread (the pipeline) owns a `Graph` and mutates it; readers get
//! answers through the pipeline (queries) or the bounded export it builds (snapshots). There is
//! no lock anywhere in here, so there is no lock order to get wrong.
//!
//! Costs, which are the point of this module:
//! - nodes and edges live in slabs addressed by `u32`; ids are interned once per node (a process
//!   by pid, a resource or error by its entity id), so an event costs a few hash look-ups;
//! - an error is one BlockedBy edge on its resource, never a fan-out to the consumers: who is
//!   blocked is resolved transitively when someone asks (`why`) or when metrics are exported;
//! - expiry and caps use FIFO queues with a second chance (an entry refreshed since it was queued
//!   is queued again), so nothing ever scans all nodes or edges per event;
//! - every node and edge carries first/last sighting; each sighting refreshes `last_seen`.

use std::collections::VecDeque;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventType};

/// Kind of a graph node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Process,
    Resource,
    Error,
}

impl NodeKind {
    pub const ALL: [NodeKind; 3] = [NodeKind::Process, NodeKind::Resource, NodeKind::Error];
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Process => "process",
            NodeKind::Resource => "resource",
            NodeKind::Error => "error",
        }
    }
}

/// Kind of a graph edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeKind {
    Consumes,
    WaitsOn,
    BlockedBy,
}

impl EdgeKind {
    pub const ALL: [EdgeKind; 3] = [EdgeKind::Consumes, EdgeKind::WaitsOn, EdgeKind::BlockedBy];
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Consumes => "consumes",
            EdgeKind::WaitsOn => "waits_on",
            EdgeKind::BlockedBy => "blocked_by",
        }
    }
    pub fn parse(s: &str) -> Option<EdgeKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Limits of the graph. Defaults keep RSS well under 256 MiB whatever the input.
#[derive(Debug, Clone)]
pub struct GraphLimits {
    /// Lifetime of a process/resource node and of Consumes/WaitsOn edges after their last sighting.
    pub ttl_ms: i64,
    /// Lifetime of error nodes and BlockedBy edges after their last sighting.
    pub error_ttl_ms: i64,
    pub max_nodes: usize,
    pub max_edges: usize,
    /// `storage.qdepth` at or above this makes the process wait on the device.
    pub qdepth_waits_on: f64,
}

impl Default for GraphLimits {
    fn default() -> Self {
        GraphLimits {
            ttl_ms: 300_000,
            error_ttl_ms: 600_000,
            max_nodes: 200_000,
            max_edges: 400_000,
            qdepth_waits_on: 64.0,
        }
    }
}

/// A short string stored inline when it fits: metadata values are rewritten on every event and
/// must not allocate on the hot path.
#[derive(Clone, Debug)]
enum ShortStr {
    Inline { len: u8, buf: [u8; 22] },
    Heap(Box<str>),
}

impl ShortStr {
    fn new(s: &str) -> Self {
        if s.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            ShortStr::Inline {
                len: s.len() as u8,
                buf,
            }
        } else {
            ShortStr::Heap(s.into())
        }
    }
    fn as_str(&self) -> &str {
        match self {
            // Only ever filled from a &str, cut at its length: always valid UTF-8.
            ShortStr::Inline { len, buf } => {
                std::str::from_utf8(&buf[..*len as usize]).unwrap_or_default()
            }
            ShortStr::Heap(s) => s,
        }
    }
    fn set(&mut self, s: &str) {
        match self {
            // Overwrite in place: no validation, no allocation (this runs on every event).
            ShortStr::Inline { len, buf } if s.len() <= buf.len() => {
                buf[..s.len()].copy_from_slice(s.as_bytes());
                *len = s.len() as u8;
            }
            ShortStr::Heap(h) if **h == *s => {}
            _ => *self = ShortStr::new(s),
        }
    }
}

/// One node. Public read access is through [`NodeView`].
#[derive(Debug)]
struct Node {
    kind: NodeKind,
    alive: bool,
    generation: u32,
    name: Box<str>,
    pid: u32,
    first_seen: i64,
    last_seen: i64,
    out: Vec<u32>,
    inn: Vec<u32>,
    job: Option<Box<str>>,
    pod: Option<Box<str>>,
    namespace: Option<Box<str>>,
    last_type: Option<EventType>,
    values: Vec<(EventType, ShortStr)>,
    error_kinds: u8,
    error_count: u64,
}

#[derive(Debug)]
struct Edge {
    kind: EdgeKind,
    alive: bool,
    uid: u64,
    from: u32,
    to: u32,
    first_seen: i64,
    last_seen: i64,
    out_pos: u32,
    in_pos: u32,
    kind_pos: u32,
}

#[derive(Debug, Clone, Copy)]
struct QEntry {
    idx: u32,
    generation: u32,
    at: i64,
}

/// A change the rule engine follows (only recorded when [`Graph::track_changes`] is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    EdgeAdded {
        uid: u64,
        kind: EdgeKind,
        from: u32,
        to: u32,
    },
    EdgeRemoved {
        uid: u64,
        kind: EdgeKind,
    },
    NodeTouched {
        idx: u32,
    },
    NodeRemoved {
        idx: u32,
        generation: u32,
    },
}

/// Counters of what the graph threw away.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Evictions {
    pub nodes_cap: u64,
    pub nodes_ttl: u64,
    pub edges_cap: u64,
    pub edges_ttl: u64,
}

/// Read-only view of a node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'g> {
    g: &'g Graph,
    idx: u32,
}

impl<'g> NodeView<'g> {
    fn n(&self) -> &'g Node {
        &self.g.nodes[self.idx as usize]
    }
    pub fn idx(&self) -> u32 {
        self.idx
    }
    pub fn generation(&self) -> u32 {
        self.n().generation
    }
    pub fn kind(&self) -> NodeKind {
        self.n().kind
    }
    /// The node id of the rule format: `pid-<pid>`, the entity id, or `error-<entity id>`.
    pub fn name(&self) -> &'g str {
        &self.n().name
    }
    pub fn pid(&self) -> Option<u32> {
        (self.n().kind == NodeKind::Process).then_some(self.n().pid)
    }
    pub fn job(&self) -> Option<&'g str> {
        self.n().job.as_deref()
    }
    pub fn pod(&self) -> Option<&'g str> {
        self.n().pod.as_deref()
    }
    pub fn namespace(&self) -> Option<&'g str> {
        self.n().namespace.as_deref()
    }
    pub fn last_seen(&self) -> i64 {
        self.n().last_seen
    }
    pub fn first_seen(&self) -> i64 {
        self.n().first_seen
    }
    /// Error event types seen on an error node.
    pub fn error_kinds(&self) -> impl Iterator<Item = EventType> + 'g {
        let bits = self.n().error_kinds;
        ERROR_TYPES
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| bits & (1 << i) != 0)
            .map(|(_, t)| t)
    }
    /// Metadata for `metric` conditions; `None` when the key is unknown or unset.
    /// Keys: an event type name (its last value), `value`, `last_event_type`, `entity_id`,
    /// `job_id`, `pid`, `pod`, `namespace`, `state`, `kind`, `error_count`.
    pub fn meta(&self, key: &str) -> Option<String> {
        let n = self.n();
        let val = |t: EventType| {
            n.values
                .iter()
                .find(|(k, _)| *k == t)
                .map(|(_, v)| v.as_str().to_owned())
        };
        match key {
            "value" => n.last_type.and_then(val),
            "last_event_type" => n.last_type.map(|t| t.as_str().to_owned()),
            "entity_id" | "id" => Some(n.name.to_string()),
            "job_id" | "job" => n.job.as_deref().map(str::to_owned),
            "pod" => n.pod.as_deref().map(str::to_owned),
            "namespace" => n.namespace.as_deref().map(str::to_owned),
            "pid" => self.pid().map(|p| p.to_string()),
            "state" => val(EventType::ProcessState),
            "kind" => self.error_kinds().last().map(|t| t.as_str().to_owned()),
            "error_count" => (n.kind == NodeKind::Error).then(|| n.error_count.to_string()),
            other => EventType::parse(other).and_then(val),
        }
    }
}

const ERROR_TYPES: [EventType; 3] = [
    EventType::ErrorHw,
    EventType::ErrorNet,
    EventType::TopoLinkDown,
];

fn error_bit(t: EventType) -> u8 {
    match t {
        EventType::ErrorHw => 1,
        EventType::ErrorNet => 2,
        _ => 4,
    }
}

/// One hop of a causal chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    pub from: String,
    pub edge: EdgeKind,
    pub to: String,
}

/// Why a process is stuck: what it is blocked by, through which chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootCause {
    pub pid: u32,
    pub job: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// The node the cause sits on (the errored resource, or the resource waited on).
    pub resource: String,
    /// `error.hw` / `error.net` / `topo.link_down`, or `waits_on` when no error is reachable.
    pub cause: String,
    /// Last error value seen on the resource (e.g. `XID 79`), when there is one.
    pub detail: Option<String>,
    pub chain: Vec<Hop>,
}

/// Rows of the causal metric families, already bounded and sorted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CausalExport {
    /// (pid, job, pod, namespace, resource)
    pub waits_on: Vec<[String; 5]>,
    /// (resource, error)
    pub blocked_by: Vec<[String; 2]>,
    /// (job, pod, namespace, resource, cause)
    pub root_cause: Vec<[String; 5]>,
    /// Series cut by the budget, per family.
    pub cut: [u64; 3],
}

/// The causal graph. See the module docs.
#[derive(Debug)]
pub struct Graph {
    limits: GraphLimits,
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    edges: Vec<Edge>,
    free_edges: Vec<u32>,
    pid_index: FxHashMap<u32, u32>,
    resource_index: FxHashMap<Box<str>, u32>,
    error_index: FxHashMap<Box<str>, u32>,
    edge_index: FxHashMap<u64, u32>,
    /// [normal, error] expiry/eviction queues.
    node_queues: [VecDeque<QEntry>; 2],
    edge_queues: [VecDeque<QEntry>; 2],
    kind_lists: [Vec<u32>; 3],
    live_nodes: [usize; 3],
    now: i64,
    /// No queue front expires before this: `expire` is a comparison until then.
    next_expire: i64,
    next_uid: u64,
    evictions: Evictions,
    changes: Vec<Change>,
    track: bool,
}

fn edge_key(from: u32, to: u32, kind: EdgeKind) -> u64 {
    (u64::from(from) << 32) | (u64::from(to) << 2) | kind as u64
}

fn parse_pid_entity(entity: &str) -> Option<u32> {
    entity.strip_prefix("pid-")?.parse().ok()
}

fn queue_class_node(kind: NodeKind) -> usize {
    usize::from(kind == NodeKind::Error)
}

fn queue_class_edge(kind: EdgeKind) -> usize {
    usize::from(kind == EdgeKind::BlockedBy)
}

/// `process.state` values meaning "stalled on the entity".
fn is_waiting_state(v: &str) -> bool {
    let v = v.trim();
    v == "D"
        || [
            "disk-sleep",
            "uninterruptible",
            "stalled",
            "blocked",
            "waiting",
            "hung",
        ]
        .iter()
        .any(|w| v.eq_ignore_ascii_case(w))
}

/// `process.state` values meaning "gone".
fn is_exit_state(v: &str) -> bool {
    let v = v.trim();
    v == "Z"
        || v == "X"
        || ["exited", "exit", "dead", "zombie", "terminated", "killed"]
            .iter()
            .any(|w| v.eq_ignore_ascii_case(w))
        || v.starts_with("exited")
}

/// Error values meaning "the error is over".
fn is_clear_value(v: &str) -> bool {
    let v = v.trim();
    ["cleared", "recovered", "resolved", "ok", "link_up", "up"]
        .iter()
        .any(|w| v.eq_ignore_ascii_case(w))
}

impl Graph {
    pub fn new(limits: GraphLimits) -> Self {
        Graph {
            limits,
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            edges: Vec::new(),
            free_edges: Vec::new(),
            pid_index: FxHashMap::default(),
            resource_index: FxHashMap::default(),
            error_index: FxHashMap::default(),
            edge_index: FxHashMap::default(),
            node_queues: Default::default(),
            edge_queues: Default::default(),
            kind_lists: Default::default(),
            live_nodes: [0; 3],
            now: i64::MIN,
            next_expire: i64::MIN,
            next_uid: 0,
            evictions: Evictions::default(),
            changes: Vec::new(),
            track: false,
        }
    }

    pub fn limits(&self) -> &GraphLimits {
        &self.limits
    }

    /// Record [`Change`]s for [`Graph::drain_changes`] (the rule engine turns this on).
    pub fn track_changes(&mut self, on: bool) {
        self.track = on;
        self.changes.clear();
    }

    /// Changes since the last call.
    pub fn drain_changes(&mut self) -> std::vec::Drain<'_, Change> {
        self.changes.drain(..)
    }

    pub fn now(&self) -> i64 {
        self.now
    }

    pub fn node_count(&self, kind: NodeKind) -> usize {
        self.live_nodes[kind as usize]
    }

    pub fn edge_count(&self, kind: EdgeKind) -> usize {
        self.kind_lists[kind as usize].len()
    }

    pub fn total_nodes(&self) -> usize {
        self.live_nodes.iter().sum()
    }

    pub fn total_edges(&self) -> usize {
        self.kind_lists.iter().map(Vec::len).sum()
    }

    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// View of a live node.
    pub fn node(&self, idx: u32) -> Option<NodeView<'_>> {
        let n = self.nodes.get(idx as usize)?;
        n.alive.then_some(NodeView { g: self, idx })
    }

    /// View of a live node if it still has the given generation.
    pub fn node_gen(&self, idx: u32, generation: u32) -> Option<NodeView<'_>> {
        self.node(idx).filter(|v| v.generation() == generation)
    }

    pub fn process(&self, pid: u32) -> Option<NodeView<'_>> {
        self.pid_index.get(&pid).and_then(|&i| self.node(i))
    }

    /// Moves the clock forward (never back) and expires what outlived its TTL.
    pub fn advance(&mut self, now: i64) {
        if now > self.now {
            self.now = now;
        }
        self.expire();
    }

    /// Applies one event. Cost: a handful of hash look-ups; independent of the graph's size.
    pub fn ingest(&mut self, ev: &Event) {
        if ev.ts > self.now {
            self.now = ev.ts;
        }
        self.expire();
        let ts = ev.ts;
        let t = ev.event_type;
        let ent = match parse_pid_entity(&ev.entity_id) {
            Some(pid) => self.ensure_process(pid, ts),
            None => self.ensure_named(NodeKind::Resource, &ev.entity_id, ts),
        };
        self.touch_values(ent, t, &ev.value);
        let ent_gen = self.nodes[ent as usize].generation;
        let proc = match ev.pid {
            Some(pid) => {
                let p = self.ensure_process(pid, ts);
                self.set_process_meta(p, ev);
                if p != ent {
                    self.touch_values(p, t, &ev.value);
                }
                Some(p)
            }
            None => None,
        };
        let proc_gen = proc.map(|p| self.nodes[p as usize].generation);
        // With tiny caps, creating one node can evict the other (and reuse its slot): then
        // there is nothing sane to link.
        if !self.valid(ent, ent_gen) {
            return;
        }
        match t {
            _ if t.is_error() => {
                if is_clear_value(&ev.value) {
                    if let Some(&e) = self.error_index.get(ev.entity_id.as_str()) {
                        self.remove_edge_between(ent, e, EdgeKind::BlockedBy);
                    }
                } else {
                    let e = self.ensure_named(NodeKind::Error, &ev.entity_id, ts);
                    {
                        let en = &mut self.nodes[e as usize];
                        en.error_kinds |= error_bit(t);
                        en.error_count += 1;
                    }
                    self.touch_values(e, t, &ev.value);
                    if !self.valid(ent, ent_gen) {
                        return;
                    }
                    self.upsert_edge(ent, e, EdgeKind::BlockedBy, ts);
                }
                if let (Some(p), Some(pg)) = (proc, proc_gen)
                    && self.valid(p, pg)
                {
                    self.upsert_edge(p, ent, EdgeKind::Consumes, ts);
                }
            }
            EventType::ProcessState => {
                if let Some(p) = proc {
                    if is_exit_state(&ev.value) {
                        self.remove_node(p);
                    } else if is_waiting_state(&ev.value) {
                        self.upsert_edge(p, ent, EdgeKind::WaitsOn, ts);
                    } else {
                        self.remove_edge_between(p, ent, EdgeKind::WaitsOn);
                        self.upsert_edge(p, ent, EdgeKind::Consumes, ts);
                    }
                }
            }
            EventType::TransportDrop => {
                if let Some(p) = proc {
                    self.upsert_edge(p, ent, EdgeKind::WaitsOn, ts);
                }
            }
            EventType::StorageQdepth => {
                if let Some(p) = proc {
                    let deep = ev
                        .value
                        .trim()
                        .parse::<f64>()
                        .is_ok_and(|q| q >= self.limits.qdepth_waits_on);
                    let kind = if deep {
                        EdgeKind::WaitsOn
                    } else {
                        EdgeKind::Consumes
                    };
                    self.upsert_edge(p, ent, kind, ts);
                }
            }
            _ => {
                if let Some(p) = proc {
                    self.upsert_edge(p, ent, EdgeKind::Consumes, ts);
                }
            }
        }
    }

    fn valid(&self, idx: u32, generation: u32) -> bool {
        let n = &self.nodes[idx as usize];
        n.alive && n.generation == generation
    }

    /// Sets pod/namespace of a process (for collectors that resolve them from cgroups).
    pub fn annotate_process(&mut self, pid: u32, pod: Option<&str>, namespace: Option<&str>) {
        if let Some(&p) = self.pid_index.get(&pid) {
            let n = &mut self.nodes[p as usize];
            set_opt(&mut n.pod, pod);
            set_opt(&mut n.namespace, namespace);
        }
    }

    fn set_process_meta(&mut self, p: u32, ev: &Event) {
        let n = &mut self.nodes[p as usize];
        if n.kind != NodeKind::Process {
            return;
        }
        set_opt(&mut n.job, ev.job_id.as_deref());
        set_opt(&mut n.pod, ev.pod.as_deref());
        set_opt(&mut n.namespace, ev.namespace.as_deref());
    }

    fn touch_values(&mut self, idx: u32, t: EventType, value: &str) {
        let n = &mut self.nodes[idx as usize];
        n.last_type = Some(t);
        match n.values.iter_mut().find(|(k, _)| *k == t) {
            Some((_, v)) => v.set(value),
            None => n.values.push((t, ShortStr::new(value))),
        }
        if self.track {
            self.changes.push(Change::NodeTouched { idx });
        }
    }

    fn ensure_process(&mut self, pid: u32, ts: i64) -> u32 {
        if let Some(&i) = self.pid_index.get(&pid) {
            self.refresh_node(i, ts);
            return i;
        }
        let i = self.new_node(NodeKind::Process, format!("pid-{pid}").into(), pid, ts);
        self.pid_index.insert(pid, i);
        i
    }

    fn ensure_named(&mut self, kind: NodeKind, entity: &str, ts: i64) -> u32 {
        let index = if kind == NodeKind::Error {
            &self.error_index
        } else {
            &self.resource_index
        };
        if let Some(&i) = index.get(entity) {
            self.refresh_node(i, ts);
            return i;
        }
        let name: Box<str> = if kind == NodeKind::Error {
            format!("error-{entity}").into()
        } else {
            entity.into()
        };
        let i = self.new_node(kind, name, 0, ts);
        let index = if kind == NodeKind::Error {
            &mut self.error_index
        } else {
            &mut self.resource_index
        };
        index.insert(entity.into(), i);
        i
    }

    fn refresh_node(&mut self, i: u32, ts: i64) {
        let n = &mut self.nodes[i as usize];
        if ts > n.last_seen {
            n.last_seen = ts;
        }
    }

    fn new_node(&mut self, kind: NodeKind, name: Box<str>, pid: u32, ts: i64) -> u32 {
        while self.total_nodes() >= self.limits.max_nodes.max(1) {
            if !self.evict_one_node() {
                break;
            }
        }
        let node = Node {
            kind,
            alive: true,
            generation: 0,
            name,
            pid,
            first_seen: ts,
            last_seen: ts,
            out: Vec::new(),
            inn: Vec::new(),
            job: None,
            pod: None,
            namespace: None,
            last_type: None,
            values: Vec::new(),
            error_kinds: 0,
            error_count: 0,
        };
        let idx = match self.free_nodes.pop() {
            Some(i) => {
                let generation = self.nodes[i as usize].generation.wrapping_add(1);
                self.nodes[i as usize] = Node { generation, ..node };
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.live_nodes[kind as usize] += 1;
        let generation = self.nodes[idx as usize].generation;
        self.node_queues[queue_class_node(kind)].push_back(QEntry {
            idx,
            generation,
            at: ts,
        });
        self.note_queued(queue_class_node(kind), ts);
        idx
    }

    fn upsert_edge(&mut self, from: u32, to: u32, kind: EdgeKind, ts: i64) {
        if from == to || !self.nodes[from as usize].alive || !self.nodes[to as usize].alive {
            return;
        }
        let key = edge_key(from, to, kind);
        if let Some(&e) = self.edge_index.get(&key) {
            let edge = &mut self.edges[e as usize];
            if ts > edge.last_seen {
                edge.last_seen = ts;
            }
            return;
        }
        while self.total_edges() >= self.limits.max_edges.max(1) {
            if !self.evict_one_edge() {
                break;
            }
        }
        let uid = self.next_uid;
        self.next_uid += 1;
        let edge = Edge {
            kind,
            alive: true,
            uid,
            from,
            to,
            first_seen: ts,
            last_seen: ts,
            out_pos: self.nodes[from as usize].out.len() as u32,
            in_pos: self.nodes[to as usize].inn.len() as u32,
            kind_pos: self.kind_lists[kind as usize].len() as u32,
        };
        let e = match self.free_edges.pop() {
            Some(i) => {
                self.edges[i as usize] = edge;
                i
            }
            None => {
                self.edges.push(edge);
                (self.edges.len() - 1) as u32
            }
        };
        self.nodes[from as usize].out.push(e);
        self.nodes[to as usize].inn.push(e);
        self.kind_lists[kind as usize].push(e);
        self.edge_index.insert(key, e);
        // The generation in a queue entry of an edge is the low half of its uid.
        self.edge_queues[queue_class_edge(kind)].push_back(QEntry {
            idx: e,
            generation: uid as u32,
            at: ts,
        });
        self.note_queued(queue_class_edge(kind), ts);
        if self.track {
            self.changes.push(Change::EdgeAdded {
                uid,
                kind,
                from,
                to,
            });
        }
    }

    fn remove_edge_between(&mut self, from: u32, to: u32, kind: EdgeKind) {
        if let Some(&e) = self.edge_index.get(&edge_key(from, to, kind)) {
            self.remove_edge(e);
        }
    }

    fn remove_edge(&mut self, e: u32) {
        let (kind, from, to, out_pos, in_pos, kind_pos, uid) = {
            let ed = &mut self.edges[e as usize];
            if !ed.alive {
                return;
            }
            ed.alive = false;
            (
                ed.kind,
                ed.from,
                ed.to,
                ed.out_pos,
                ed.in_pos,
                ed.kind_pos,
                ed.uid,
            )
        };
        // swap_remove from the three position-indexed lists, fixing the moved edge's position.
        let out = &mut self.nodes[from as usize].out;
        out.swap_remove(out_pos as usize);
        if let Some(&moved) = out.get(out_pos as usize) {
            self.edges[moved as usize].out_pos = out_pos;
        }
        let inn = &mut self.nodes[to as usize].inn;
        inn.swap_remove(in_pos as usize);
        if let Some(&moved) = inn.get(in_pos as usize) {
            self.edges[moved as usize].in_pos = in_pos;
        }
        let list = &mut self.kind_lists[kind as usize];
        list.swap_remove(kind_pos as usize);
        if let Some(&moved) = list.get(kind_pos as usize) {
            self.edges[moved as usize].kind_pos = kind_pos;
        }
        self.edge_index.remove(&edge_key(from, to, kind));
        self.free_edges.push(e);
        if self.track {
            self.changes.push(Change::EdgeRemoved { uid, kind });
        }
    }

    fn remove_node(&mut self, i: u32) {
        if !self.nodes[i as usize].alive {
            return;
        }
        while let Some(&e) = self.nodes[i as usize].out.last() {
            self.remove_edge(e);
        }
        while let Some(&e) = self.nodes[i as usize].inn.last() {
            self.remove_edge(e);
        }
        let (kind, generation, name, pid) = {
            let n = &mut self.nodes[i as usize];
            n.alive = false;
            n.values = Vec::new();
            n.out = Vec::new();
            n.inn = Vec::new();
            (n.kind, n.generation, std::mem::take(&mut n.name), n.pid)
        };
        match kind {
            NodeKind::Process => {
                self.pid_index.remove(&pid);
                // A process can carry an error too (entity `pid-N`).
                self.remove_error_of(&format!("pid-{pid}"));
            }
            NodeKind::Resource => {
                self.resource_index.remove(&*name);
                self.remove_error_of(&name);
            }
            NodeKind::Error => {
                if let Some(entity) = name.strip_prefix("error-") {
                    self.error_index.remove(entity);
                }
            }
        }
        self.live_nodes[kind as usize] -= 1;
        self.free_nodes.push(i);
        if self.track {
            self.changes
                .push(Change::NodeRemoved { idx: i, generation });
        }
    }

    fn remove_error_of(&mut self, entity: &str) {
        if let Some(&e) = self.error_index.get(entity) {
            self.remove_node(e);
        }
    }

    /// Expire from the front of each queue while the front is older than its TTL.
    fn expire(&mut self) {
        if self.now < self.next_expire {
            return;
        }
        self.expire_slow();
    }

    fn ttl_of(&self, class: usize) -> i64 {
        if class == 0 {
            self.limits.ttl_ms.max(1)
        } else {
            self.limits.error_ttl_ms.max(1)
        }
    }

    /// Lowers `next_expire` for an entry queued at `at` in `class`.
    fn note_queued(&mut self, class: usize, at: i64) {
        let due = at.saturating_add(self.ttl_of(class));
        if due < self.next_expire {
            self.next_expire = due;
        }
    }

    fn expire_slow(&mut self) {
        for class in 0..2 {
            let ttl = if class == 0 {
                self.limits.ttl_ms
            } else {
                self.limits.error_ttl_ms
            };
            let deadline = self.now.saturating_sub(ttl.max(1));
            while let Some(&q) = self.edge_queues[class].front() {
                if q.at > deadline {
                    break;
                }
                self.edge_queues[class].pop_front();
                let ed = &self.edges[q.idx as usize];
                if !ed.alive || ed.uid as u32 != q.generation {
                    continue;
                }
                if ed.last_seen > deadline {
                    let at = ed.last_seen;
                    self.edge_queues[class].push_back(QEntry { at, ..q });
                } else {
                    self.remove_edge(q.idx);
                    self.evictions.edges_ttl += 1;
                }
            }
        }
        for class in 0..2 {
            let ttl = if class == 0 {
                self.limits.ttl_ms
            } else {
                self.limits.error_ttl_ms
            };
            let deadline = self.now.saturating_sub(ttl.max(1));
            while let Some(&q) = self.node_queues[class].front() {
                if q.at > deadline {
                    break;
                }
                self.node_queues[class].pop_front();
                let n = &self.nodes[q.idx as usize];
                if !n.alive || n.generation != q.generation {
                    continue;
                }
                // A node with a live error stays while the error does (errors outlive sightings).
                let errored = n
                    .out
                    .iter()
                    .any(|&e| self.edges[e as usize].kind == EdgeKind::BlockedBy);
                if n.last_seen > deadline || errored {
                    let at = if errored { self.now } else { n.last_seen };
                    self.node_queues[class].push_back(QEntry { at, ..q });
                } else {
                    self.remove_node(q.idx);
                    self.evictions.nodes_ttl += 1;
                }
            }
        }
        self.compact_queues();
        let mut next = i64::MAX;
        for class in 0..2 {
            let ttl = self.ttl_of(class);
            for q in [
                self.node_queues[class].front(),
                self.edge_queues[class].front(),
            ]
            .into_iter()
            .flatten()
            {
                next = next.min(q.at.saturating_add(ttl));
            }
        }
        // Entries are only approximately ordered (second chance); re-check at least once a
        // second of event time so a young entry at the front never hides an old one for long.
        self.next_expire = next.min(self.now.saturating_add(1000));
    }

    /// Entries of nodes/edges removed by other means stay queued until popped; keep that bounded.
    fn compact_queues(&mut self) {
        let node_bound = 4 * self.limits.max_nodes.max(1024);
        for class in 0..2 {
            if self.node_queues[class].len() > node_bound {
                let nodes = &self.nodes;
                self.node_queues[class].retain(|q| {
                    let n = &nodes[q.idx as usize];
                    n.alive && n.generation == q.generation
                });
            }
        }
        let edge_bound = 4 * self.limits.max_edges.max(1024);
        for class in 0..2 {
            if self.edge_queues[class].len() > edge_bound {
                let edges = &self.edges;
                self.edge_queues[class].retain(|q| {
                    let e = &edges[q.idx as usize];
                    e.alive && e.uid as u32 == q.generation
                });
            }
        }
    }

    /// Evicts the least recently seen node (second-chance FIFO). False when nothing is left.
    fn evict_one_node(&mut self) -> bool {
        for class in 0..2 {
            // Entries seen at the current time (e.g. created by the event being applied) get a
            // reprieve while older candidates exist; `spins` bounds the loop when none do.
            let mut spins = self.node_queues[class].len();
            while let Some(q) = self.node_queues[class].pop_front() {
                let n = &self.nodes[q.idx as usize];
                if !n.alive || n.generation != q.generation {
                    continue;
                }
                let current = n.last_seen >= self.now && spins > 0;
                if n.last_seen > q.at || current {
                    spins = spins.saturating_sub(1);
                    let at = n.last_seen;
                    self.node_queues[class].push_back(QEntry { at, ..q });
                    continue;
                }
                self.remove_node(q.idx);
                self.evictions.nodes_cap += 1;
                return true;
            }
        }
        false
    }

    fn evict_one_edge(&mut self) -> bool {
        for class in 0..2 {
            // Entries seen at the current time (e.g. created by the event being applied) get a
            // reprieve while older candidates exist; `spins` bounds the loop when none do.
            let mut spins = self.edge_queues[class].len();
            while let Some(q) = self.edge_queues[class].pop_front() {
                let e = &self.edges[q.idx as usize];
                if !e.alive || e.uid as u32 != q.generation {
                    continue;
                }
                let current = e.last_seen >= self.now && spins > 0;
                if e.last_seen > q.at || current {
                    spins = spins.saturating_sub(1);
                    let at = e.last_seen;
                    self.edge_queues[class].push_back(QEntry { at, ..q });
                    continue;
                }
                self.remove_edge(q.idx);
                self.evictions.edges_cap += 1;
                return true;
            }
        }
        false
    }

    /// Edge endpoints and kind for a live edge id.
    fn edge(&self, e: u32) -> &Edge {
        &self.edges[e as usize]
    }

    /// Root causes of a process: the errors reachable over Consumes/WaitsOn/BlockedBy edges at any
    /// depth (with the chain that reaches each), else the resources it waits on. Cost: the size of
    /// what is reachable from this one process, never the whole graph.
    pub fn why(&self, pid: u32) -> Option<Vec<RootCause>> {
        let start = *self.pid_index.get(&pid)?;
        let p = &self.nodes[start as usize];
        let mut parent: FxHashMap<u32, u32> = FxHashMap::default(); // node -> edge used to reach it
        let mut queue = VecDeque::from([start]);
        let mut seen = FxHashSet::default();
        seen.insert(start);
        let mut errors = Vec::new();
        while let Some(n) = queue.pop_front() {
            for &e in &self.nodes[n as usize].out {
                let ed = self.edge(e);
                if seen.insert(ed.to) {
                    parent.insert(ed.to, e);
                    if self.nodes[ed.to as usize].kind == NodeKind::Error {
                        errors.push(ed.to);
                    } else {
                        queue.push_back(ed.to);
                    }
                }
            }
        }
        let chain_to = |target: u32| {
            let mut hops = Vec::new();
            let mut cur = target;
            while let Some(&e) = parent.get(&cur) {
                let ed = self.edge(e);
                hops.push(Hop {
                    from: self.nodes[ed.from as usize].name.to_string(),
                    edge: ed.kind,
                    to: self.nodes[ed.to as usize].name.to_string(),
                });
                cur = ed.from;
            }
            hops.reverse();
            hops
        };
        let mk = |resource: &str, cause: String, detail: Option<String>, chain| RootCause {
            pid,
            job: p.job.as_deref().map(str::to_owned),
            pod: p.pod.as_deref().map(str::to_owned),
            namespace: p.namespace.as_deref().map(str::to_owned),
            resource: resource.to_owned(),
            cause,
            detail,
            chain,
        };
        let mut out = Vec::new();
        for err in errors {
            let chain = chain_to(err);
            let owner = chain.last().map(|h| h.from.clone()).unwrap_or_default();
            let view = NodeView { g: self, idx: err };
            let detail = view.meta("value");
            for kind in view.error_kinds() {
                out.push(mk(
                    &owner,
                    kind.as_str().to_owned(),
                    detail.clone(),
                    chain.clone(),
                ));
            }
        }
        if out.is_empty() {
            for &e in &p.out {
                let ed = self.edge(e);
                if ed.kind == EdgeKind::WaitsOn {
                    let r = &self.nodes[ed.to as usize].name;
                    out.push(mk(r, "waits_on".to_owned(), None, chain_to(ed.to)));
                }
            }
        }
        out.sort_by(|a, b| (&a.resource, &a.cause).cmp(&(&b.resource, &b.cause)));
        Some(out)
    }

    /// Builds the causal families with at most `budget` series in all (waits_on first, then
    /// blocked_by, then root_cause), sorted, counting what was cut. Work is bounded by
    /// `walk_budget` node visits whatever the graph holds.
    pub fn export(&self, budget: usize, walk_budget: usize) -> CausalExport {
        // Rows borrow from the graph while they are deduplicated and sorted; only the rows that
        // fit the budget are turned into owned strings (a resource with 50,000 consumers in 64
        // jobs costs 50,000 set look-ups, not 250,000 allocations).
        fn s(o: &Option<Box<str>>) -> &str {
            o.as_deref().unwrap_or("")
        }
        let mut out = CausalExport::default();
        let mut left = budget;

        let mut waits: FxHashSet<(Option<u32>, &str, &str, &str, &str)> = FxHashSet::default();
        for &e in &self.kind_lists[EdgeKind::WaitsOn as usize] {
            let ed = self.edge(e);
            let p = &self.nodes[ed.from as usize];
            let pid = (p.kind == NodeKind::Process).then_some(p.pid);
            waits.insert((
                pid,
                s(&p.job),
                s(&p.pod),
                s(&p.namespace),
                &self.nodes[ed.to as usize].name,
            ));
        }
        take_budget(
            waits,
            &mut left,
            &mut out.waits_on,
            &mut out.cut[0],
            |(pid, j, p, n, r)| {
                [
                    pid.map(|p| p.to_string()).unwrap_or_default(),
                    j.to_owned(),
                    p.to_owned(),
                    n.to_owned(),
                    r.to_owned(),
                ]
            },
        );

        let mut blocked: FxHashSet<(&str, &str)> = FxHashSet::default();
        let mut walk_left = walk_budget;
        // Bitmaps by node index: cheaper than hash sets for a walk over many nodes.
        let words = self.nodes.len().div_ceil(64);
        let mut reached = vec![0u64; words];
        let mut seen = vec![0u64; words];
        let mut touched: Vec<u32> = Vec::new();
        let mut causes: FxHashSet<(&str, &str, &str, &str, &str)> = FxHashSet::default();
        for &e in &self.kind_lists[EdgeKind::BlockedBy as usize] {
            let ed = self.edge(e);
            let owner = ed.from;
            let owner_name: &str = &self.nodes[owner as usize].name;
            let view = NodeView {
                g: self,
                idx: ed.to,
            };
            let kinds: Vec<&str> = view.error_kinds().map(EventType::as_str).collect();
            for k in &kinds {
                blocked.insert((owner_name, k));
            }
            // Walk backwards from the errored node to every process that depends on it.
            // `seen` is shared by the walks and cleared through `touched`.
            for &t in &touched {
                seen[(t / 64) as usize] = 0;
            }
            touched.clear();
            let mut queue = VecDeque::from([owner]);
            set_bit(&mut seen, owner);
            touched.push(owner);
            while let Some(n) = queue.pop_front() {
                if walk_left == 0 {
                    break;
                }
                walk_left -= 1;
                let node = &self.nodes[n as usize];
                if node.kind == NodeKind::Process {
                    set_bit(&mut reached, n);
                    for k in &kinds {
                        causes.insert((
                            s(&node.job),
                            s(&node.pod),
                            s(&node.namespace),
                            owner_name,
                            k,
                        ));
                    }
                }
                for &ie in &node.inn {
                    let ied = self.edge(ie);
                    if ied.kind != EdgeKind::BlockedBy && set_bit(&mut seen, ied.from) {
                        touched.push(ied.from);
                        queue.push_back(ied.from);
                    }
                }
            }
        }
        for &e in &self.kind_lists[EdgeKind::WaitsOn as usize] {
            let ed = self.edge(e);
            let p = &self.nodes[ed.from as usize];
            if p.kind == NodeKind::Process && !get_bit(&reached, ed.from) {
                causes.insert((
                    s(&p.job),
                    s(&p.pod),
                    s(&p.namespace),
                    &self.nodes[ed.to as usize].name,
                    "waits_on",
                ));
            }
        }
        take_budget(
            blocked,
            &mut left,
            &mut out.blocked_by,
            &mut out.cut[1],
            |(r, e)| [r.to_owned(), e.to_owned()],
        );
        take_budget(
            causes,
            &mut left,
            &mut out.root_cause,
            &mut out.cut[2],
            |(j, p, n, r, c)| {
                [
                    j.to_owned(),
                    p.to_owned(),
                    n.to_owned(),
                    r.to_owned(),
                    c.to_owned(),
                ]
            },
        );
        out
    }

    /// Iterates live edges of one kind as (uid, from, to).
    pub fn edges_of(&self, kind: EdgeKind) -> impl Iterator<Item = (u64, u32, u32)> + '_ {
        self.kind_lists[kind as usize].iter().map(|&e| {
            let ed = self.edge(e);
            (ed.uid, ed.from, ed.to)
        })
    }

    /// First and last sighting of the edge between two nodes, if it exists.
    pub fn edge_seen(&self, from: u32, to: u32, kind: EdgeKind) -> Option<(i64, i64)> {
        let e = self.edge_index.get(&edge_key(from, to, kind))?;
        let ed = self.edge(*e);
        Some((ed.first_seen, ed.last_seen))
    }

    /// Evicts least recently seen nodes until at most `target` remain; returns how many went.
    pub fn shrink_to(&mut self, target: usize) -> usize {
        let mut n = 0;
        while self.total_nodes() > target && self.evict_one_node() {
            n += 1;
        }
        n
    }

    /// Pids of the live process nodes (unordered).
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.pid_index.keys().copied()
    }

    /// Looks up a resource node by entity id.
    pub fn resource(&self, entity: &str) -> Option<NodeView<'_>> {
        self.resource_index.get(entity).and_then(|&i| self.node(i))
    }
}

fn set_opt(slot: &mut Option<Box<str>>, v: Option<&str>) {
    if let Some(v) = v
        && slot.as_deref() != Some(v)
    {
        *slot = Some(v.into());
    }
}

/// Sets bit `i`; true when it was clear.
fn set_bit(bits: &mut [u64], i: u32) -> bool {
    let (w, b) = ((i / 64) as usize, i % 64);
    let was = bits[w] & (1 << b) != 0;
    bits[w] |= 1 << b;
    !was
}

fn get_bit(bits: &[u64], i: u32) -> bool {
    bits[(i / 64) as usize] & (1 << (i % 64)) != 0
}

/// Sorts the unique rows, keeps what fits the budget (as owned rows), counts the rest.
fn take_budget<T: Ord, U>(
    rows: FxHashSet<T>,
    left: &mut usize,
    out: &mut Vec<U>,
    cut: &mut u64,
    own: impl Fn(T) -> U,
) {
    let mut rows: Vec<T> = rows.into_iter().collect();
    rows.sort_unstable();
    let n = rows.len();
    out.extend(rows.into_iter().take(*left).map(own));
    *cut += (n - out.len()) as u64;
    *left -= out.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: i64, t: EventType, entity: &str, pid: Option<u32>, value: &str) -> Event {
        Event {
            ts,
            event_type: t,
            entity_id: entity.to_owned(),
            job_id: pid.map(|p| format!("job-{}", p % 2)),
            pid,
            value: value.to_owned(),
            node_id: None,
            pod: None,
            namespace: None,
        }
    }

    #[test]
    fn consumes_waits_and_blocked_by() {
        let mut g = Graph::new(GraphLimits::default());
        g.track_changes(true);
        g.ingest(&ev(1, EventType::ComputeUtil, "gpu-0", Some(7), "90"));
        g.ingest(&ev(
            2,
            EventType::TransportDrop,
            "network-eth0",
            Some(7),
            "retransmit",
        ));
        g.ingest(&ev(3, EventType::ErrorHw, "gpu-0", None, "XID 79"));
        assert_eq!(g.node_count(NodeKind::Process), 1);
        assert_eq!(g.node_count(NodeKind::Resource), 2);
        assert_eq!(g.node_count(NodeKind::Error), 1);
        assert_eq!(g.edge_count(EdgeKind::Consumes), 1);
        assert_eq!(g.edge_count(EdgeKind::WaitsOn), 1);
        assert_eq!(g.edge_count(EdgeKind::BlockedBy), 1);
        let why = g.why(7).unwrap();
        assert_eq!(why.len(), 1);
        assert_eq!(why[0].resource, "gpu-0");
        assert_eq!(why[0].cause, "error.hw");
        assert_eq!(why[0].detail.as_deref(), Some("XID 79"));
        assert_eq!(why[0].chain.len(), 2);
        assert_eq!(why[0].chain[1].to, "error-gpu-0");
        let changes: Vec<_> = g.drain_changes().collect();
        assert_eq!(
            changes
                .iter()
                .filter(|c| matches!(c, Change::EdgeAdded { .. }))
                .count(),
            3
        );
        assert!(g.why(8).is_none());
    }

    #[test]
    fn waits_on_is_the_cause_without_errors_and_refresh_does_not_duplicate() {
        let mut g = Graph::new(GraphLimits::default());
        for ts in 0..100 {
            g.ingest(&ev(
                ts,
                EventType::TransportDrop,
                "network-eth0",
                Some(1),
                "drop",
            ));
        }
        assert_eq!(g.total_edges(), 1);
        let why = g.why(1).unwrap();
        assert_eq!(why[0].cause, "waits_on");
        assert_eq!(why[0].resource, "network-eth0");
        let x = g.export(100, 1000);
        assert_eq!(x.waits_on.len(), 1);
        assert_eq!(x.root_cause[0][4], "waits_on");
    }

    #[test]
    fn root_cause_at_any_depth() {
        // pid-1 waits on pid-2 which consumes gpu-3, which has an error.
        let mut g = Graph::new(GraphLimits::default());
        g.ingest(&ev(1, EventType::ProcessState, "pid-2", Some(1), "D"));
        g.ingest(&ev(2, EventType::ComputeUtil, "gpu-3", Some(2), "1"));
        g.ingest(&ev(3, EventType::ErrorNet, "gpu-3", None, "link flap"));
        let why = g.why(1).unwrap();
        assert_eq!(why.len(), 1);
        assert_eq!(why[0].chain.len(), 3);
        assert_eq!(why[0].resource, "gpu-3");
        let x = g.export(100, 1000);
        // Both processes are reported as blocked by the same error.
        assert_eq!(x.root_cause.len(), 2, "{:?}", x.root_cause);
        assert_eq!(
            x.blocked_by,
            vec![["gpu-3".to_owned(), "error.net".to_owned()]]
        );
    }

    #[test]
    fn error_is_one_edge_however_many_consumers() {
        let mut g = Graph::new(GraphLimits::default());
        for pid in 0..5000 {
            g.ingest(&ev(1, EventType::ComputeUtil, "gpu-0", Some(pid), "1"));
        }
        let before = g.total_edges();
        g.ingest(&ev(2, EventType::ErrorHw, "gpu-0", None, "ECC"));
        assert_eq!(g.total_edges(), before + 1);
        assert_eq!(g.why(4999).unwrap()[0].cause, "error.hw");
        // Clearing the error removes the edge.
        g.ingest(&ev(3, EventType::ErrorHw, "gpu-0", None, "cleared"));
        assert_eq!(g.total_edges(), before);
        assert!(g.why(4999).unwrap().is_empty());
    }

    #[test]
    fn ttl_expires_and_refresh_keeps_alive() {
        let limits = GraphLimits {
            ttl_ms: 100,
            error_ttl_ms: 200,
            ..GraphLimits::default()
        };
        let mut g = Graph::new(limits);
        g.ingest(&ev(0, EventType::ComputeUtil, "gpu-0", Some(1), "1"));
        g.ingest(&ev(0, EventType::ComputeUtil, "gpu-1", Some(2), "1"));
        g.ingest(&ev(0, EventType::ErrorHw, "gpu-9", None, "x"));
        for ts in (10..=150).step_by(10) {
            g.ingest(&ev(ts, EventType::ComputeUtil, "gpu-0", Some(1), "1"));
        }
        assert!(g.process(1).is_some());
        assert!(g.process(2).is_none(), "pid 2 not refreshed, expired");
        assert!(g.resource("gpu-1").is_none());
        assert_eq!(g.node_count(NodeKind::Error), 1);
        g.advance(1000);
        assert_eq!(g.total_nodes(), 0);
        assert_eq!(g.total_edges(), 0);
        assert!(g.evictions().nodes_ttl >= 5);
    }

    #[test]
    fn caps_bound_the_graph_and_evict_oldest() {
        let limits = GraphLimits {
            max_nodes: 100,
            max_edges: 60,
            ..GraphLimits::default()
        };
        let mut g = Graph::new(limits);
        for pid in 0..10_000u32 {
            g.ingest(&ev(
                i64::from(pid),
                EventType::ComputeUtil,
                "gpu-0",
                Some(pid),
                "1",
            ));
            assert!(g.total_nodes() <= 100);
            assert!(g.total_edges() <= 60);
        }
        assert!(g.process(9_999).is_some());
        assert!(g.process(0).is_none());
        let ev_ = g.evictions();
        assert!(ev_.nodes_cap > 9_000 && ev_.edges_cap > 0);
    }

    #[test]
    fn eviction_spares_what_the_current_event_touches() {
        let limits = GraphLimits {
            max_nodes: 10,
            ..GraphLimits::default()
        };
        let mut g = Graph::new(limits);
        // Fill the graph, refreshing everything so that every entry has had its second chance.
        for round in 0..3 {
            for pid in 0..9u32 {
                g.ingest(&ev(
                    round * 10 + i64::from(pid),
                    EventType::ComputeUtil,
                    "gpu-0",
                    Some(pid),
                    "1",
                ));
            }
        }
        // A new pid and a new resource in one event: both must exist afterwards.
        g.ingest(&ev(100, EventType::ComputeUtil, "gpu-new", Some(500), "1"));
        assert!(g.process(500).is_some());
        assert!(g.resource("gpu-new").is_some());
        assert_eq!(
            g.edge_seen(
                g.process(500).unwrap().idx(),
                g.resource("gpu-new").unwrap().idx(),
                EdgeKind::Consumes
            )
            .map(|s| s.0),
            Some(100)
        );
        assert!(g.total_nodes() <= 10);
        // Every node seen at the same instant: the loop still terminates and the cap holds.
        let mut g = Graph::new(GraphLimits {
            max_nodes: 5,
            ..GraphLimits::default()
        });
        for pid in 0..50u32 {
            g.ingest(&ev(7, EventType::ComputeUtil, "gpu-0", Some(pid), "1"));
        }
        assert!(g.total_nodes() <= 5);
    }

    #[test]
    fn process_exit_removes_it_and_its_edges() {
        let mut g = Graph::new(GraphLimits::default());
        g.ingest(&ev(1, EventType::ComputeUtil, "gpu-0", Some(5), "1"));
        g.ingest(&ev(2, EventType::ProcessState, "gpu-0", Some(5), "D"));
        assert_eq!(g.edge_count(EdgeKind::WaitsOn), 1);
        g.ingest(&ev(3, EventType::ProcessState, "gpu-0", Some(5), "R"));
        assert_eq!(g.edge_count(EdgeKind::WaitsOn), 0);
        g.ingest(&ev(4, EventType::ProcessState, "gpu-0", Some(5), "exited"));
        assert!(g.process(5).is_none());
        assert_eq!(g.total_edges(), 0);
        // pid reuse gets a fresh node.
        g.ingest(&ev(5, EventType::ComputeUtil, "gpu-0", Some(5), "1"));
        assert_eq!(g.process(5).unwrap().first_seen(), 5);
    }

    #[test]
    fn export_respects_the_series_budget() {
        let mut g = Graph::new(GraphLimits::default());
        for pid in 0..50 {
            g.ingest(&ev(
                1,
                EventType::TransportDrop,
                "network-eth0",
                Some(pid),
                "drop",
            ));
        }
        let x = g.export(10, 1000);
        assert_eq!(x.waits_on.len(), 10);
        assert_eq!(x.cut[0], 40);
        assert!(x.root_cause.is_empty());
        assert_eq!(x.cut[2], 2, "two jobs of root causes were cut");
    }

    #[test]
    fn metadata_is_exposed_for_metric_conditions() {
        let mut g = Graph::new(GraphLimits::default());
        g.ingest(&ev(
            1,
            EventType::ComputeMem,
            "gpu-0",
            Some(3),
            "a-very-long-value-that-does-not-fit-inline",
        ));
        g.ingest(&ev(2, EventType::ComputeUtil, "gpu-0", Some(3), "42"));
        let r = g.resource("gpu-0").unwrap();
        assert_eq!(r.meta("compute.util").as_deref(), Some("42"));
        assert_eq!(r.meta("value").as_deref(), Some("42"));
        assert_eq!(
            r.meta("compute.mem").as_deref(),
            Some("a-very-long-value-that-does-not-fit-inline")
        );
        assert_eq!(r.meta("missing"), None);
        let p = g.process(3).unwrap();
        assert_eq!(p.meta("job_id").as_deref(), Some("job-1"));
        assert_eq!(p.meta("pid").as_deref(), Some("3"));
    }
}
