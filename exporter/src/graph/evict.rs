//! Keeping the graph bounded: TTL expiry, the byte budget (values first, then nodes, then
//! edges, least recent first) and the node/edge caps, all on second-chance FIFO queues.

use super::*;

impl Graph {
    /// Sheds metadata values, then nodes, then edges, least recent first (what the current
    /// event touched last of all), until the graph is within `max_bytes`.
    pub(super) fn enforce_budget(&mut self) {
        while self.bytes > self.limits.max_bytes {
            if self.shed_one_value(false) {
                self.evictions.values_bytes += 1;
            } else if self.evict_one_node() {
                self.evictions.nodes_bytes += 1;
            } else if self.evict_one_edge() {
                self.evictions.edges_bytes += 1;
            } else if self.shed_one_value(true) {
                self.evictions.values_bytes += 1;
            } else {
                break;
            }
        }
    }

    /// Drops the heap values of the node whose values were written least recently (second
    /// chance). Values written at the current time are spared unless `force`. False when no
    /// node holds values that may go.
    pub(super) fn shed_one_value(&mut self, force: bool) -> bool {
        let mut spins = self.value_queue.len();
        while let Some(q) = self.value_queue.pop_front() {
            let now = self.now;
            let n = &mut self.nodes[q.idx as usize];
            if !n.alive || n.generation != q.generation {
                continue;
            }
            if n.heap == 0 {
                n.value_queued = false;
                continue;
            }
            let current = n.values_at >= now && !force;
            if n.values_at > q.at || current {
                let at = n.values_at;
                self.value_queue.push_back(QEntry { at, ..q });
                // Only reprieves of current entries spend `spins`: a stale entry is requeued
                // at its last write once, so it cannot loop.
                if n.values_at <= q.at {
                    if spins == 0 {
                        return false;
                    }
                    spins -= 1;
                }
                continue;
            }
            n.value_queued = false;
            n.values.retain(|(_, v)| v.heap_len() == 0);
            n.values.shrink_to_fit();
            n.heap = 0;
            self.recost(q.idx);
            if self.track {
                self.changes.push(Change::NodeTouched { idx: q.idx });
            }
            return true;
        }
        false
    }

    /// Expire from the front of each queue while the front is older than its TTL.
    pub(super) fn expire(&mut self) {
        if self.now < self.next_expire {
            return;
        }
        self.expire_slow();
    }

    pub(super) fn ttl_of(&self, class: usize) -> i64 {
        if class == 0 {
            self.limits.ttl_ms.max(1)
        } else {
            self.limits.error_ttl_ms.max(1)
        }
    }

    /// Lowers `next_expire` for an entry queued at `at` in `class`.
    pub(super) fn note_queued(&mut self, class: usize, at: i64) {
        let due = at.saturating_add(self.ttl_of(class));
        if due < self.next_expire {
            self.next_expire = due;
        }
    }

    pub(super) fn expire_slow(&mut self) {
        for class in 0..2 {
            let deadline = self.now.saturating_sub(self.ttl_of(class));
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
            let deadline = self.now.saturating_sub(self.ttl_of(class));
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
    pub(super) fn compact_queues(&mut self) {
        let node_bound = 2 * self.total_nodes() + 1024;
        if self.value_queue.len() > node_bound {
            let nodes = &self.nodes;
            self.value_queue.retain(|q| {
                let n = &nodes[q.idx as usize];
                n.alive && n.generation == q.generation
            });
        }
        for class in 0..2 {
            if self.node_queues[class].len() > node_bound {
                let nodes = &self.nodes;
                self.node_queues[class].retain(|q| {
                    let n = &nodes[q.idx as usize];
                    n.alive && n.generation == q.generation
                });
            }
        }
        let edge_bound = 2 * self.total_edges() + 1024;
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

    /// Evicts the least recently seen node (second-chance FIFO); when one producer holds more
    /// than half of the nodes, the least recently seen of ITS nodes (the others get a reprieve).
    /// False when nothing is left.
    pub(super) fn evict_one_node(&mut self) -> bool {
        let dominant = self.owners.dominant(self.total_nodes());
        for class in 0..2 {
            let nodes = &self.nodes;
            let oldest = pop_least_recent(&mut self.node_queues[class], self.now, |q| {
                let n = &nodes[q.idx as usize];
                let spare = dominant.is_some_and(|d| d != n.owner);
                (n.alive && n.generation == q.generation).then_some((n.last_seen, spare))
            });
            if let Some(q) = oldest {
                self.remove_node(q.idx);
                return true;
            }
        }
        false
    }

    pub(super) fn evict_one_edge(&mut self) -> bool {
        for class in 0..2 {
            let edges = &self.edges;
            let oldest = pop_least_recent(&mut self.edge_queues[class], self.now, |q| {
                let e = &edges[q.idx as usize];
                (e.alive && e.uid as u32 == q.generation).then_some((e.last_seen, false))
            });
            if let Some(q) = oldest {
                self.remove_edge(q.idx);
                return true;
            }
        }
        false
    }
}

/// The entry of `queue` seen least recently, taken out of it (second-chance FIFO).
/// `last_seen` is `None` for a stale entry (its node or edge is gone), else when it was last
/// seen and whether to spare it. Entries seen at `now` (e.g. created by the event being applied)
/// and spared ones get a reprieve while other candidates exist; `spins` bounds the loop when
/// none do. Only reprieves of current or spared entries spend `spins`: a stale entry is requeued
/// at its last sighting once, so it cannot loop.
fn pop_least_recent(
    queue: &mut std::collections::VecDeque<QEntry>,
    now: i64,
    last_seen: impl Fn(&QEntry) -> Option<(i64, bool)>,
) -> Option<QEntry> {
    let mut spins = queue.len();
    while let Some(q) = queue.pop_front() {
        let Some((seen, spare)) = last_seen(&q) else {
            continue;
        };
        let current = (seen >= now || spare) && spins > 0;
        if seen > q.at || current {
            if seen <= q.at {
                spins = spins.saturating_sub(1);
            }
            queue.push_back(QEntry { at: seen, ..q });
            continue;
        }
        return Some(q);
    }
    None
}
