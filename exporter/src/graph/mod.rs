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

use rustc_hash::FxHashMap;
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

/// Limits of the graph. The byte budget is what bounds memory whatever the input; the node and
/// edge caps bound the work of a walk.
#[derive(Debug, Clone)]
pub struct GraphLimits {
    /// Bytes the graph may hold (accounted per node and edge, see [`Graph::bytes`]). Over it, the
    /// metadata values of the least recently written nodes go first, then the least recently
    /// seen nodes (with their edges).
    pub max_bytes: usize,
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
            max_bytes: 32 * 1024 * 1024,
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
    /// Bytes on the heap (0 when inline).
    fn heap_len(&self) -> usize {
        match self {
            ShortStr::Inline { .. } => 0,
            ShortStr::Heap(h) => h.len(),
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
    /// Bytes this node is charged in [`Graph::bytes`] (without its edges).
    cost: u32,
    /// Heap bytes of `values` (the part shed first under memory pressure).
    heap: u32,
    /// Last time a value went to the heap (second chance of the value queue).
    values_at: i64,
    /// An entry for this node is in the value queue.
    value_queued: bool,
    /// Slot of the producer that created or last refreshed it (see [`Owners`]).
    owner: u8,
}

/// Producers (pipeline lanes: a collector, one probe) and how many nodes each holds, so that
/// eviction can make the one that holds most of the graph pay first: a source that floods
/// evicts its own entries, not the few a quiet probe keeps refreshing (issue 15). Bounded: at
/// most [`Owners::MAX`] slots; producers beyond share slot 0 with the unknown ones.
#[derive(Debug)]
struct Owners {
    /// Lane id of each slot (slot 0: unknown).
    ids: Vec<u64>,
    nodes: Vec<u32>,
    current: u8,
}

impl Owners {
    const MAX: usize = 64;

    fn new() -> Self {
        Owners {
            ids: vec![0],
            nodes: vec![0],
            current: 0,
        }
    }

    fn set(&mut self, id: u64) {
        // Consecutive events mostly come from one lane: no scan then (this runs per event).
        if self.ids[self.current as usize] == id {
            return;
        }
        let slot = match self.ids.iter().position(|&x| x == id) {
            Some(i) => i,
            None if self.ids.len() < Self::MAX => {
                self.ids.push(id);
                self.nodes.push(0);
                self.ids.len() - 1
            }
            None => 0,
        };
        self.current = slot as u8;
    }

    /// The slot holding more than half of `total` nodes, if one does.
    fn dominant(&self, total: usize) -> Option<u8> {
        let (slot, &n) = self.nodes.iter().enumerate().max_by_key(|&(_, n)| *n)?;
        (n as usize * 2 > total).then_some(slot as u8)
    }
}

/// Fixed charge of a node: its slab slot, an index entry with hash-table overhead, and up to
/// three queue entries (live ones and those of removed nodes not yet compacted away).
const NODE_BASE: usize = std::mem::size_of::<Node>() + 48 + 4 * std::mem::size_of::<QEntry>();
/// Fixed charge of an edge: its slab slot, its index entry, its positions in the out/in/kind
/// lists and up to three queue entries.
const EDGE_BASE: usize =
    std::mem::size_of::<Edge>() + 32 + 3 * 4 + 3 * std::mem::size_of::<QEntry>();

/// What a node is charged (see [`Graph::bytes`]). The name counts twice: node and index key.
fn node_cost(n: &Node) -> usize {
    let opt = |o: &Option<Box<str>>| o.as_deref().map_or(0, str::len);
    NODE_BASE
        + 2 * n.name.len()
        + opt(&n.job)
        + opt(&n.pod)
        + opt(&n.namespace)
        + n.values.capacity() * std::mem::size_of::<(EventType, ShortStr)>()
        + n.heap as usize
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
    /// Nodes evicted (least recently seen first) to stay under `max_bytes`.
    pub nodes_bytes: u64,
    /// Nodes whose metadata values were dropped to stay under `max_bytes`.
    pub values_bytes: u64,
    /// Edges evicted to stay under `max_bytes` once no node was left to evict.
    pub edges_bytes: u64,
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

/// One training job on this node, as [`Graph::export_jobs`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// The job id (clipped like every stored label, see `event::MAX_STORED_ID_BYTES`).
    pub job: String,
    /// Live process nodes carrying this job id.
    pub processes: u64,
    /// Mean of the latest `compute.util` of those processes as a ratio 0..1 (see
    /// [`util_percent`]); `None` when none of them has reported a usable one.
    pub progress: Option<f64>,
}

/// Rows of `ark_job_processes` / `ark_job_progress_ratio`, already bounded.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct JobExport {
    pub rows: Vec<JobRow>,
    /// Series cut by the budget, per family: (`ark_job_processes`, `ark_job_progress_ratio`).
    pub cut: [u64; 2],
}

/// A `compute.util` value as a utilisation in percent, clamped to 0..100; `None` when it is no
/// reading.
///
/// The unit is percent: what the NVML collector emits (docs/nvml.md) and what the probe
/// protocol documents (docs/exporter.md); a trailing `%` is accepted. Out-of-range numbers are
/// clamped (a negative reading is 0, above 100 is 100) so that one bogus reading cannot pull a
/// mean out of range; NaN and infinities are not readings at all and are ignored, as is text.
/// (Percent, not a ratio, so that a mean of integer readings divides once: 85, not 0.85000001.)
pub fn util_percent(value: &str) -> Option<f64> {
    let v = value.trim();
    let v = v.strip_suffix('%').unwrap_or(v).trim_end();
    let x: f64 = v.parse().ok()?;
    // `+ 0.0` turns a clamped -0 into 0 (Prometheus would print "-0").
    x.is_finite().then(|| x.clamp(0.0, 100.0) + 0.0)
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
    /// Nodes holding heap values, by when they were written (second chance).
    value_queue: VecDeque<QEntry>,
    /// Bytes accounted (see [`Graph::bytes`]).
    bytes: usize,
    kind_lists: [Vec<u32>; 3],
    live_nodes: [usize; 3],
    now: i64,
    /// No queue front expires before this: `expire` is a comparison until then.
    next_expire: i64,
    next_uid: u64,
    evictions: Evictions,
    changes: Vec<Change>,
    track: bool,
    owners: Owners,
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
            value_queue: VecDeque::new(),
            bytes: 0,
            kind_lists: Default::default(),
            live_nodes: [0; 3],
            now: i64::MIN,
            next_expire: i64::MIN,
            next_uid: 0,
            evictions: Evictions::default(),
            changes: Vec::new(),
            track: false,
            owners: Owners::new(),
        }
    }

    /// Names the producer of the events that follow (a pipeline lane id; 0: unknown). Nodes are
    /// charged to the producer that created or last refreshed them; when one producer holds more
    /// than half of the graph, eviction takes its nodes first.
    pub fn set_producer(&mut self, id: u64) {
        self.owners.set(id);
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

    /// Bytes the graph holds by its own accounting: every node and edge is charged its slab
    /// slot, index and queue entries and the heap bytes of its strings. Allocator slack and
    /// hash-table growth are not in it; the budget leaves room for them.
    pub fn bytes(&self) -> usize {
        self.bytes
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
}

fn set_opt(slot: &mut Option<Box<str>>, v: Option<&str>) {
    // Events arrive clipped (`ClipCounters`); pod/namespace from other paths are clipped here.
    let v = v.map(|v| crate::event::clip_str(v, crate::event::MAX_STORED_ID_BYTES));
    if let Some(v) = v
        && slot.as_deref() != Some(v)
    {
        *slot = Some(v.into());
    }
}

mod evict;
mod query;
mod store;
#[cfg(test)]
mod tests;
