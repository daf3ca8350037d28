//! Mutation of the graph: ingest, node/edge creation and removal, expiry and eviction.

use super::*;

impl Graph {
    /// Applies one event. Cost: a handful of hash look-ups; independent of the graph's size.
    ///
    /// The event's timestamp orders and ages this event; it also moves the graph's clock when it
    /// is newer (replay). Live callers [`Graph::advance`] to their own clock first and never hand
    /// in a timestamp beyond it, so one event cannot move "now" for everyone else.
    pub fn ingest(&mut self, ev: &Event) {
        if ev.ts > self.now {
            self.now = ev.ts;
        }
        self.expire();
        self.apply_event(ev);
        self.enforce_budget();
    }

    fn apply_event(&mut self, ev: &Event) {
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

    pub(super) fn valid(&self, idx: u32, generation: u32) -> bool {
        let n = &self.nodes[idx as usize];
        n.alive && n.generation == generation
    }

    /// Sets pod/namespace of a process (for collectors that resolve them from cgroups).
    pub fn annotate_process(&mut self, pid: u32, pod: Option<&str>, namespace: Option<&str>) {
        if let Some(&p) = self.pid_index.get(&pid) {
            let n = &mut self.nodes[p as usize];
            set_opt(&mut n.pod, pod);
            set_opt(&mut n.namespace, namespace);
            self.recost(p);
            self.enforce_budget();
        }
    }

    /// Charges node `i` what it holds now.
    pub(super) fn recost(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        let new = node_cost(n);
        self.bytes = self.bytes + new - n.cost as usize;
        n.cost = new as u32;
    }

    pub(super) fn set_process_meta(&mut self, p: u32, ev: &Event) {
        let n = &mut self.nodes[p as usize];
        if n.kind != NodeKind::Process {
            return;
        }
        set_opt(&mut n.job, ev.job_id.as_deref());
        set_opt(&mut n.pod, ev.pod.as_deref());
        set_opt(&mut n.namespace, ev.namespace.as_deref());
        self.recost(p);
    }

    pub(super) fn touch_values(&mut self, idx: u32, t: EventType, value: &str) {
        let now = self.now;
        let n = &mut self.nodes[idx as usize];
        n.last_type = Some(t);
        // Only a write that changes what is on the heap (or adds a slot) changes the charge: the
        // common rewrite of a short value costs nothing extra.
        let (old, new, pushed) = match n.values.iter_mut().find(|(k, _)| *k == t) {
            Some((_, v)) => {
                let old = v.heap_len();
                v.set(value);
                (old, v.heap_len(), false)
            }
            None => {
                let v = ShortStr::new(value);
                let new = v.heap_len();
                n.values.push((t, v));
                (0, new, true)
            }
        };
        n.heap = (n.heap as usize + new - old) as u32;
        if new > 0 {
            n.values_at = now;
            if !n.value_queued {
                n.value_queued = true;
                let generation = n.generation;
                self.value_queue.push_back(QEntry {
                    idx,
                    generation,
                    at: now,
                });
            }
        }
        if pushed || new != old {
            self.recost(idx);
        }
        if self.track {
            self.changes.push(Change::NodeTouched { idx });
        }
    }

    pub(super) fn ensure_process(&mut self, pid: u32, ts: i64) -> u32 {
        if let Some(&i) = self.pid_index.get(&pid) {
            self.refresh_node(i, ts);
            return i;
        }
        let i = self.new_node(NodeKind::Process, format!("pid-{pid}").into(), pid, ts);
        self.pid_index.insert(pid, i);
        i
    }

    pub(super) fn ensure_named(&mut self, kind: NodeKind, entity: &str, ts: i64) -> u32 {
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

    pub(super) fn refresh_node(&mut self, i: u32, ts: i64) {
        let n = &mut self.nodes[i as usize];
        if ts > n.last_seen {
            n.last_seen = ts;
        }
        let owner = self.owners.current;
        if n.owner != owner {
            self.owners.nodes[n.owner as usize] -= 1;
            self.owners.nodes[owner as usize] += 1;
            n.owner = owner;
        }
    }

    pub(super) fn new_node(&mut self, kind: NodeKind, name: Box<str>, pid: u32, ts: i64) -> u32 {
        while self.total_nodes() >= self.limits.max_nodes.max(1) {
            if !self.evict_one_node() {
                break;
            }
            self.evictions.nodes_cap += 1;
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
            cost: 0,
            heap: 0,
            values_at: ts,
            value_queued: false,
            owner: self.owners.current,
        };
        self.owners.nodes[self.owners.current as usize] += 1;
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
        self.recost(idx);
        let generation = self.nodes[idx as usize].generation;
        self.node_queues[queue_class_node(kind)].push_back(QEntry {
            idx,
            generation,
            at: ts,
        });
        self.note_queued(queue_class_node(kind), ts);
        idx
    }

    pub(super) fn upsert_edge(&mut self, from: u32, to: u32, kind: EdgeKind, ts: i64) {
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
            self.evictions.edges_cap += 1;
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
        self.bytes += EDGE_BASE;
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

    pub(super) fn remove_edge_between(&mut self, from: u32, to: u32, kind: EdgeKind) {
        if let Some(&e) = self.edge_index.get(&edge_key(from, to, kind)) {
            self.remove_edge(e);
        }
    }

    pub(super) fn remove_edge(&mut self, e: u32) {
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
        self.bytes -= EDGE_BASE;
        if self.track {
            self.changes.push(Change::EdgeRemoved { uid, kind });
        }
    }

    pub(super) fn remove_node(&mut self, i: u32) {
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
            n.job = None;
            n.pod = None;
            n.namespace = None;
            n.heap = 0;
            n.value_queued = false;
            self.bytes -= n.cost as usize;
            n.cost = 0;
            self.owners.nodes[n.owner as usize] -= 1;
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

    pub(super) fn remove_error_of(&mut self, entity: &str) {
        if let Some(&e) = self.error_index.get(entity) {
            self.remove_node(e);
        }
    }

    /// Edge endpoints and kind for a live edge id.
    pub(super) fn edge(&self, e: u32) -> &Edge {
        &self.edges[e as usize]
    }
}
