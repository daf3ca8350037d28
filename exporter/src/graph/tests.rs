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

/// What the graph should be charged, recounted from scratch.
fn recount(g: &Graph) -> usize {
    let nodes: usize = g.nodes.iter().filter(|n| n.alive).map(node_cost).sum();
    nodes + g.total_edges() * EDGE_BASE
}

#[test]
fn byte_budget_sheds_values_then_the_least_recently_seen_and_fresh_edges_survive() {
    let max = 2 * 1024 * 1024;
    let mut g = Graph::new(GraphLimits {
        max_bytes: max,
        ..GraphLimits::default()
    });
    g.track_changes(true);
    let big = "v".repeat(256);
    let pad = "x".repeat(100);
    for i in 0..20_000u32 {
        let ts = i64::from(i);
        for t in [
            EventType::ComputeUtil,
            EventType::ComputeMem,
            EventType::StorageIops,
            EventType::ErrorHw,
        ] {
            let entity = format!("flood-{i}-{pad}");
            g.ingest(&ev(ts, t, &entity, Some(100_000 + i), &big));
        }
        if i % 10 == 0 {
            g.ingest(&ev(
                ts,
                EventType::TransportDrop,
                "network-eth0",
                Some(1),
                "drop",
            ));
        }
        assert!(g.bytes() <= max, "{} over {max}", g.bytes());
        assert!(g.process(1).is_some(), "the honest process survives at {i}");
        g.drain_changes();
    }
    assert_eq!(g.bytes(), recount(&g), "the accounting matches a recount");
    assert_eq!(
        g.edge_count(EdgeKind::WaitsOn),
        1,
        "the honest edge survives"
    );
    let e = g.evictions();
    assert!(e.values_bytes > 0 && e.nodes_bytes > 0, "{e:?}");
    // The freshest flood entity is whole: values of the current event are spared.
    let last = g.resource(&format!("flood-19999-{pad}")).unwrap();
    assert_eq!(last.meta("error.hw").as_deref(), Some(big.as_str()));
    // Everything expires: nothing is left charged.
    g.advance(i64::MAX / 2);
    assert_eq!(g.total_nodes(), 0);
    assert_eq!(g.bytes(), 0);
}

#[test]
fn accounting_follows_meta_and_removal() {
    let mut g = Graph::new(GraphLimits::default());
    let mut e = ev(1, EventType::ComputeMem, "gpu-0", Some(3), &"m".repeat(200));
    e.pod = Some("p".repeat(300));
    g.ingest(&e);
    assert_eq!(
        g.process(3).unwrap().pod().map(str::len),
        Some(128),
        "clipped"
    );
    g.ingest(&ev(2, EventType::ComputeMem, "gpu-0", Some(3), "short"));
    assert_eq!(g.bytes(), recount(&g));
    g.annotate_process(3, Some("pod-a"), Some("ns"));
    assert_eq!(g.bytes(), recount(&g));
    g.ingest(&ev(3, EventType::ProcessState, "gpu-0", Some(3), "exited"));
    assert_eq!(g.bytes(), recount(&g));
    g.advance(10_000_000);
    assert_eq!(g.bytes(), 0);
}

/// A flood from one producer turns the graph over many times between two refreshes of another
/// producer's edge. Charged to their producers, the flood's nodes go first and the quiet edge
/// stays; charged to one producer (the control), plain least-recent eviction takes it.
#[test]
fn a_dominant_producer_pays_for_its_own_flood() {
    fn run(separate: bool) -> (bool, Graph) {
        let max = 1024 * 1024;
        let mut g = Graph::new(GraphLimits {
            max_bytes: max,
            ..GraphLimits::default()
        });
        let pad = "x".repeat(100);
        let mut survived = true;
        for i in 0..30_000u32 {
            let ts = i64::from(i);
            if i % 10_000 == 0 {
                g.set_producer(if separate { 2 } else { 1 });
                g.ingest(&ev(
                    ts,
                    EventType::TransportDrop,
                    "network-q",
                    Some(1),
                    "drop",
                ));
            }
            g.set_producer(1);
            let entity = format!("flood-{i}-{pad}");
            g.ingest(&ev(
                ts,
                EventType::ComputeUtil,
                &entity,
                Some(100_000 + i),
                "1",
            ));
            assert!(g.bytes() <= max);
            survived &= g.edge_count(EdgeKind::WaitsOn) == 1;
        }
        (survived, g)
    }
    let (survived, g) = run(true);
    assert!(
        survived,
        "the quiet producer's edge was evicted by the flood"
    );
    assert!(g.evictions().nodes_bytes > 20_000, "{:?}", g.evictions());
    // Per-producer counts match a recount.
    let live = g.nodes.iter().filter(|n| n.alive);
    let quiet = live.clone().filter(|n| n.owner != g.owners.current).count();
    assert_eq!(
        quiet as u32,
        g.owners.nodes.iter().sum::<u32>() - g.owners.nodes[g.owners.current as usize]
    );
    assert_eq!(live.count() as u32, g.owners.nodes.iter().sum::<u32>());
    let (control, _) = run(false);
    assert!(
        !control,
        "the control should lose the edge: the test cannot fail otherwise"
    );
}

#[test]
fn producer_slots_are_bounded() {
    let mut g = Graph::new(GraphLimits::default());
    for id in 0..1000 {
        g.set_producer(id);
        g.ingest(&ev(
            id as i64,
            EventType::ComputeUtil,
            &format!("r{id}"),
            None,
            "1",
        ));
    }
    assert_eq!(g.owners.ids.len(), Owners::MAX);
    assert_eq!(g.owners.nodes.iter().sum::<u32>() as usize, g.total_nodes());
}

/// An event of `job` (or none) for `pid` on `entity`.
fn job_ev(ts: i64, t: EventType, entity: &str, pid: u32, job: Option<&str>, value: &str) -> Event {
    Event {
        job_id: job.map(str::to_owned),
        ..ev(ts, t, entity, Some(pid), value)
    }
}

fn util(ts: i64, pid: u32, job: &str, value: &str) -> Event {
    job_ev(
        ts,
        EventType::ComputeUtil,
        &format!("gpu-{}", pid % 8),
        pid,
        Some(job),
        value,
    )
}

fn job_row<'a>(x: &'a JobExport, job: &str) -> Option<&'a JobRow> {
    x.rows.iter().find(|r| r.job == job)
}

#[test]
fn job_rows_count_processes_and_average_their_latest_util() {
    let mut g = Graph::new(GraphLimits::default());
    g.ingest(&util(1, 1, "a", "90"));
    g.ingest(&util(1, 2, "a", "90"));
    // The latest value counts, not a history: pid 1 now runs at 50 %.
    g.ingest(&util(2, 1, "a", "50"));
    // Counted as a process of `a`, but it has no usable reading: not in the mean.
    g.ingest(&util(2, 3, "a", "unknown"));
    // A process of `b` that never reported utilisation: a count, no ratio.
    g.ingest(&job_ev(
        2,
        EventType::ProcessState,
        "gpu-4",
        4,
        Some("b"),
        "R",
    ));
    // Processes without a job id are invisible; so is an empty job id.
    g.ingest(&job_ev(2, EventType::ComputeUtil, "gpu-5", 5, None, "10"));
    g.ingest(&job_ev(
        2,
        EventType::ComputeUtil,
        "gpu-6",
        6,
        Some(""),
        "10",
    ));
    let x = g.export_jobs(100);
    assert_eq!(x.cut, [0, 0]);
    assert_eq!(x.rows.len(), 2, "{:?}", x.rows);
    let a = job_row(&x, "a").unwrap();
    assert_eq!(a.processes, 3);
    assert!((a.progress.unwrap() - 0.7).abs() < 1e-12, "{a:?}");
    let b = job_row(&x, "b").unwrap();
    assert_eq!((b.processes, b.progress), (1, None));
    // Most processes first.
    assert_eq!(x.rows[0].job, "a");
}

#[test]
fn util_percent_clamps_and_ignores_what_is_no_reading() {
    for (v, want) in [
        ("97", 97.0),
        ("97%", 97.0),
        (" 50 % ", 50.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("100", 100.0),
        ("-5", 0.0),
        ("-0", 0.0),
        ("150", 100.0),
        ("1e9", 100.0),
        ("-1e9", 0.0),
    ] {
        let got = util_percent(v).unwrap_or_else(|| panic!("{v:?} is a reading"));
        assert!((got - want).abs() < 1e-12, "{v:?}: {got}");
        assert!(
            got.is_sign_positive(),
            "{v:?}: {got} (a -0 would print as -0)"
        );
    }
    for v in [
        "NaN",
        "nan",
        "inf",
        "-inf",
        "+infinity",
        "1e400",
        "",
        "%",
        "abc",
        "9O",
    ] {
        assert_eq!(util_percent(v), None, "{v:?}");
    }
    // Through the graph: each reading is clamped before the mean, so one bogus value cannot
    // pull it out of 0..1; a job whose readings are all non-numbers has no ratio.
    let mut g = Graph::new(GraphLimits::default());
    g.ingest(&util(1, 1, "clamped", "-20"));
    g.ingest(&util(1, 2, "clamped", "250"));
    g.ingest(&util(1, 3, "clamped", "inf"));
    g.ingest(&util(1, 4, "nan", "NaN"));
    g.ingest(&util(1, 5, "nan", "-inf"));
    let x = g.export_jobs(100);
    let c = job_row(&x, "clamped").unwrap();
    assert_eq!((c.processes, c.progress), (3, Some(0.5)));
    let n = job_row(&x, "nan").unwrap();
    assert_eq!((n.processes, n.progress), (2, None));
    for r in &x.rows {
        assert!(r.progress.is_none_or(|p| (0.0..=1.0).contains(&p)), "{r:?}");
    }
}

#[test]
fn a_job_disappears_when_its_processes_go() {
    let limits = GraphLimits {
        ttl_ms: 100,
        ..GraphLimits::default()
    };
    let mut g = Graph::new(limits);
    g.ingest(&util(0, 1, "a", "90"));
    g.ingest(&util(0, 2, "a", "90"));
    g.ingest(&util(0, 3, "b", "90"));
    // Only pid 1 keeps being seen: pid 2 (job a) and pid 3 (job b) expire on their TTL.
    for ts in (10..=150).step_by(10) {
        g.ingest(&util(ts, 1, "a", "40"));
    }
    let x = g.export_jobs(100);
    assert_eq!(
        x.rows,
        vec![JobRow {
            job: "a".into(),
            processes: 1,
            progress: Some(0.4)
        }]
    );
    // An exited process goes at once, and its job with it.
    g.ingest(&job_ev(
        160,
        EventType::ProcessState,
        "pid-1",
        1,
        Some("a"),
        "exited",
    ));
    assert_eq!(g.export_jobs(100), JobExport::default());
}

#[test]
fn job_series_are_capped_and_what_is_cut_is_counted() {
    let mut g = Graph::new(GraphLimits::default());
    // Thousands of one-process job ids (a broken or hostile probe) and one training job with a
    // process per GPU; one job without a reading among the flood.
    for i in 0..5000u32 {
        g.ingest(&util(1, 10_000 + i, &format!("flood-{i:05}"), "50"));
    }
    g.ingest(&job_ev(
        1,
        EventType::ProcessState,
        "pid-99",
        99,
        Some("flood-quiet"),
        "R",
    ));
    for pid in 0..8 {
        g.ingest(&util(1, pid, "zz-train", "90"));
    }
    let x = g.export_jobs(100);
    // 2 series per job with a ratio: 50 jobs in 100 series, the training job first.
    assert_eq!(x.rows.len(), 50);
    assert_eq!(x.rows[0].job, "zz-train");
    assert_eq!(x.rows[0].processes, 8);
    assert_eq!(x.rows[1].job, "flood-00000", "then by job id");
    let series: usize = x
        .rows
        .iter()
        .map(|r| 1 + usize::from(r.progress.is_some()))
        .sum();
    assert_eq!(series, 100);
    // 5002 jobs, 50 kept; every cut job had a ratio but flood-quiet.
    assert_eq!(x.cut, [5002 - 50, 5001 - 50]);
    // An odd budget: the next job's pair does not fit, so it is cut whole, and so is every
    // job after it, even one that would fit in a single series.
    let x = g.export_jobs(3);
    assert_eq!(x.rows.len(), 1);
    assert_eq!(x.cut, [5001, 5000]);
    let x = g.export_jobs(0);
    assert!(x.rows.is_empty());
    assert_eq!(x.cut, [5002, 5001]);
    // Labels are clipped like every stored string.
    let mut g = Graph::new(GraphLimits::default());
    g.ingest(&util(1, 1, &"j".repeat(300), "90"));
    let x = g.export_jobs(10);
    assert_eq!(x.rows[0].job.len(), crate::event::MAX_STORED_ID_BYTES);
}
