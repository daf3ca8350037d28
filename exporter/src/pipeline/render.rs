//! The pipeline's metric families: the causal graph, the rule engine and the pipeline's own
//! counters rendered as Prometheus families (bounded by `series_budget`). Pure: reads the
//! pipeline, builds families; publishing them is [`super::Pipeline::publish`].

use prometheus::proto::{MetricFamily, MetricType};

use super::Pipeline;
use crate::event::{CLIP_FIELDS, EventType};
use crate::graph::{EdgeKind, NodeKind};
use crate::metrics::family;

impl Pipeline {
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
            "Graph entries removed, by what (node|edge|values) and why (ttl|cap|bytes).",
            MetricType::COUNTER,
            [
                ("node", "bytes", ev.nodes_bytes),
                ("node", "cap", ev.nodes_cap),
                ("node", "ttl", ev.nodes_ttl),
                ("edge", "bytes", ev.edges_bytes),
                ("edge", "cap", ev.edges_cap),
                ("edge", "ttl", ev.edges_ttl),
                ("values", "bytes", ev.values_bytes),
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
            "ark_graph_bytes",
            "Bytes the causal graph holds by its own accounting (budget: graph.max_bytes).",
            MetricType::GAUGE,
            [(vec![], g.bytes() as f64)],
        ));
        fams.push(family(
            "ark_graph_max_bytes",
            "The causal graph's byte budget (graph.max_bytes).",
            MetricType::GAUGE,
            [(vec![], g.limits().max_bytes as f64)],
        ));
        fams.push(family(
            "ark_strings_clipped_total",
            "Event strings clipped to their stored bound (ids and labels 128 bytes, values 256), by field.",
            MetricType::COUNTER,
            CLIP_FIELDS
                .iter()
                .zip(self.clipped.get())
                .map(|(f, n)| (vec![("field", (*f).to_owned())], n as f64)),
        ));
        fams.push(family(
            "ark_events_clock_skew_total",
            "Events stamped more than 1 s ahead of the exporter's clock, applied at its time, by source.",
            MetricType::COUNTER,
            self.skewed
                .iter()
                .map(|(s, n)| (vec![("source", (*s).to_owned())], *n as f64)),
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
        // The job families share the budget and come last: what the causal families export is
        // never displaced by them (a node with a graph that busy is stalled anyway, and a job
        // missing from one node only makes the straggler rules see fewer nodes).
        let jobs =
            g.export_jobs(budget - x.waits_on.len() - x.blocked_by.len() - x.root_cause.len());
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
            "1 per (job_id, resource, cause) a workload is blocked by, resolved transitively.",
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
            "ark_job_processes",
            "Live processes of a training job on this node (the causal graph's processes with that job_id).",
            MetricType::GAUGE,
            jobs.rows
                .iter()
                .map(|r| (vec![("job_id", r.job.clone())], r.processes as f64)),
        ));
        fams.push(family(
            "ark_job_progress_ratio",
            "Mean latest compute.util of a job's processes on this node, as a ratio 0..1 (absent until one reports).",
            MetricType::GAUGE,
            jobs.rows
                .into_iter()
                .filter_map(|r| Some((vec![("job_id", r.job)], r.progress?))),
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
                ("ark_job_processes", jobs.cut[0]),
                ("ark_job_progress_ratio", jobs.cut[1]),
            ]
            .map(|(f, v)| (vec![("family", f.to_owned())], v as f64)),
        ));
        fams
    }
}
