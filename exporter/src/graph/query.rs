//! Reading the graph: `why` for one process and the bounded export of the causal families.

use std::collections::VecDeque;

use rustc_hash::{FxHashMap, FxHashSet};

use super::*;

impl Graph {
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

    /// Per training job on this node: its live processes and the mean of their latest
    /// `compute.util` (as a ratio), at most `budget` series in all (a job costs one series, two
    /// once it has a progress ratio; a job's two series are kept or cut together so the two
    /// families always name the same jobs). Processes without a job id are not counted.
    ///
    /// Jobs with the most processes come first, then by job id: a training job holds several
    /// processes (GPUs) on its node, so a flood of one-process job ids (a broken or hostile
    /// probe) is what gets cut, not the job the straggler alert watches. The order is total, so
    /// the same graph always exports the same jobs. Cost: one pass over the live processes
    /// (bounded by `graph.max_nodes`), no walk.
    pub fn export_jobs(&self, budget: usize) -> JobExport {
        // (processes, sum of percentages, processes with a reading)
        let mut jobs: FxHashMap<&str, (u64, f64, u64)> = FxHashMap::default();
        for &i in self.pid_index.values() {
            let n = &self.nodes[i as usize];
            let Some(job) = n.job.as_deref().filter(|j| !j.is_empty()) else {
                continue;
            };
            let e = jobs.entry(job).or_default();
            e.0 += 1;
            let util = n
                .values
                .iter()
                .find(|(t, _)| *t == EventType::ComputeUtil)
                .and_then(|(_, v)| util_percent(v.as_str()));
            if let Some(pct) = util {
                e.1 += pct;
                e.2 += 1;
            }
        }
        let mut rows: Vec<_> = jobs.into_iter().collect();
        rows.sort_unstable_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(b.0)));
        let mut out = JobExport::default();
        let mut left = budget;
        for (job, (processes, sum, with_util)) in rows {
            let progress =
                (with_util > 0).then(|| (sum / (100.0 * with_util as f64)).clamp(0.0, 1.0));
            let cost = 1 + usize::from(progress.is_some());
            if cost > left {
                // The exported jobs are a prefix of the order: once one is cut, all that
                // follow are (no job further down slips into a gap).
                left = 0;
                out.cut[0] += 1;
                out.cut[1] += u64::from(progress.is_some());
                continue;
            }
            left -= cost;
            out.rows.push(JobRow {
                job: job.to_owned(),
                processes,
                progress,
            });
        }
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

    /// Pids of the live process nodes (unordered).
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.pid_index.keys().copied()
    }

    /// Looks up a resource node by entity id.
    pub fn resource(&self, entity: &str) -> Option<NodeView<'_>> {
        self.resource_index.get(entity).and_then(|&i| self.node(i))
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
