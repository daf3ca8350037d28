//! The lifecycle case by case, and the invariants property-tested over random tickets, plans
//! and views: I1 (budget) and I3 (urgency) on the planner, I5 (every ticket fits 4 KiB) and I6
//! (a ticket continues exactly its SOP) on the lifecycle. Default case counts are small so
//! `scripts/test` stays fast; `PROPTEST_CASES=10000 cargo test -p ark-healer --lib` is the
//! long run.

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::alerts::Alert;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::planner::{ClusterView, NodeView, PlanInput, plan};
use crate::testkit::{alert, node, now};
use crate::ticket::TICKET_MAX_BYTES;

fn plan_for(catalog: &Catalog, condition: &str, view: &ClusterView) -> NodePlan {
    let mut config = Config::default();
    config.budget.max_unschedulable = 100;
    config.act_on_can_ignore = true;
    plan(&PlanInput {
        alerts: &[alert("n1", condition)],
        catalog,
        config: &config,
        view,
        now: now(),
        silence_means_resolved: true,
    })
    .nodes
    .remove(0)
}

fn one(v: NodeView) -> ClusterView {
    ClusterView {
        nodes: [(v.name.clone(), v)].into(),
        live: true,
    }
}

#[test]
fn open_continue_supersede_and_replan() {
    let cat = Catalog::embedded().unwrap();
    let p = plan_for(&cat, "GpuHung", &one(node("n1")));
    let Start::Open { ticket, replaced } = start(None, &p, now()) else {
        panic!("a new ticket")
    };
    assert!(replaced.is_none());
    assert_eq!(ticket.sop_digest.as_deref(), Some(p.sop_digest.as_str()));
    assert_eq!(ticket.priority, Some(3));
    // The same plan continues it.
    let mut open = ticket.clone();
    succeed(
        &mut open,
        0,
        &Step::Cordon,
        "cordoned".into(),
        None,
        true,
        now(),
    );
    assert!(open.disrupted && open.cordoned_by_healer);
    assert_eq!(open.remediations.len(), 1);
    assert!(matches!(
        start(Some(open.clone()), &p, now()),
        Start::Continue(_)
    ));
    // A more urgent condition supersedes it and keeps what the node is.
    let urgent = plan_for(&cat, "GpuFellOffBus", &one(node("n1")));
    let Start::Open { ticket, replaced } = start(Some(open.clone()), &urgent, now()) else {
        panic!("superseded")
    };
    assert!(matches!(replaced, Some(Replaced::Superseded { .. })));
    assert!(ticket.cordoned_by_healer && ticket.disrupted);
    assert!(ticket.created_at > open.created_at, "a new ticket id");
    // A changed SOP for the same condition: closed and planned again, never remapped (I6).
    let over =
        "sops:\n  gpu-reset: {steps: [{action: Cordon}, {action: RunJob, template: gpu-reset}]}\n";
    let changed = Catalog::embedded_with(over, "t").unwrap();
    let p2 = plan_for(&changed, "GpuHung", &one(node("n1")));
    let Start::Open { replaced, .. } = start(Some(open), &p2, now()) else {
        panic!("re-planned")
    };
    assert!(matches!(replaced, Some(Replaced::SopChanged { .. })));
}

/// A cordon-diagnose that escalated to people (JobBlockedByNode alone, say), then a more urgent
/// fault on the node: the new SOP takes the node as the escalated ticket left it, so its final
/// Uncordon undoes the healer's own cordon instead of leaving it behind.
#[test]
fn a_more_urgent_sop_takes_over_an_escalated_tickets_cordon() {
    let cat = Catalog::embedded().unwrap();
    let p = plan_for(&cat, "JobBlockedByNode", &one(node("n1")));
    let Start::Open { mut ticket, .. } = start(None, &p, now()) else {
        panic!("a new ticket")
    };
    succeed(
        &mut ticket,
        0,
        &Step::Cordon,
        "cordoned".into(),
        None,
        true,
        now(),
    );
    ticket.status = TicketStatus::Escalated;
    let urgent = plan_for(&cat, "GpuHung", &one(node("n1")));
    let Start::Open {
        ticket: next,
        replaced,
    } = start(Some(ticket), &urgent, now())
    else {
        panic!("superseded")
    };
    assert!(matches!(replaced, Some(Replaced::Superseded { .. })));
    assert!(next.cordoned_by_healer && next.disrupted, "{next:?}");
    // A closed ticket's cordon is not carried (that incident is over).
    let mut closed = next.clone();
    closed.status = TicketStatus::Closed;
    let Start::Open { ticket: fresh, .. } = start(Some(closed), &p, now()) else {
        panic!("a new ticket")
    };
    assert!(!fresh.cordoned_by_healer);
}

#[test]
fn schema_1_tickets_continue_only_while_their_records_match_the_steps() {
    let cat = Catalog::embedded().unwrap();
    let p = plan_for(&cat, "GpuHung", &one(node("n1")));
    let old = "condition: GpuHung\nstatus: resolving\ncreatedAt: 2026-11-22T10:00:00Z\nsop: gpu-reset\nworkflows:\n- {action: Cordon, status: Succeeded, at: 2026-11-22T10:00:01Z}\n- {action: Taint, status: Succeeded, at: 2026-11-22T10:00:01Z}\n";
    let t = Ticket::from_annotation("n1", old).unwrap();
    assert!(follows(&t, &p));
    let remapped = old.replace("action: Taint", "action: Drain");
    let t = Ticket::from_annotation("n1", &remapped).unwrap();
    assert!(!follows(&t, &p));
}

#[test]
fn step_errors_hold_the_deadline() {
    let drain = Step::Drain {
        timeout_seconds: 60,
    };
    let t0: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
    let t1: Timestamp = "2026-11-22T12:00:59Z".parse().unwrap();
    let t2: Timestamp = "2026-11-22T12:01:00Z".parse().unwrap();
    assert!(matches!(
        step_error(&drain, t0, t1, "500"),
        ErrorVerdict::Retry { .. }
    ));
    let ErrorVerdict::Escalate { message } = step_error(&drain, t0, t2, "HTTP 500: two PDBs")
    else {
        panic!("escalates")
    };
    assert!(
        message.contains("two PDBs") && message.contains("60 s"),
        "{message}"
    );
    // One-request steps have no deadline of their own: retried next pass.
    assert!(matches!(
        step_error(&Step::Cordon, t0, t2, "x"),
        ErrorVerdict::Retry { .. }
    ));
}

#[test]
fn waiting_rewrites_only_on_change_and_blocks_write_once() {
    let cat = Catalog::embedded().unwrap();
    let p = plan_for(&cat, "GpuHung", &one(node("n1")));
    let Start::Open { mut ticket, .. } = start(None, &p, now()) else {
        panic!()
    };
    let drain = Step::Drain {
        timeout_seconds: 600,
    };
    begin(&mut ticket, 2, &drain, None, now());
    assert!(wait(
        &mut ticket,
        2,
        &drain,
        "draining: 3 left".into(),
        None,
        now()
    ));
    assert!(!wait(
        &mut ticket,
        2,
        &drain,
        "draining: 3 left".into(),
        None,
        now()
    ));
    assert!(wait(
        &mut ticket,
        2,
        &drain,
        "draining: 2 left".into(),
        None,
        now()
    ));
    let blocked = block(None, &p, BlockReason::DisruptionBudget, "budget", now()).unwrap();
    assert_eq!(blocked.blocked.as_deref(), Some("budget"));
    assert!(
        block(
            Some(blocked),
            &p,
            BlockReason::DisruptionBudget,
            "budget",
            now()
        )
        .is_none()
    );
    let esc = block(None, &p, BlockReason::RepeatOffender, "again", now()).unwrap();
    assert_eq!(esc.status, TicketStatus::Escalated);
    // Closing: only an open ticket that never acted.
    assert!(close_unstarted(Some(ticket.clone()), now()).is_none());
    let fresh = Ticket::new("GpuHung", "", "gpu-reset", None, now(), None);
    let closed = close_unstarted(Some(fresh), now()).unwrap();
    assert_eq!(closed.status, TicketStatus::Closed);
}

// ---- properties ----

const CONDS: &[&str] = &[
    "NodeNotReady",
    "GpuFellOffBus",
    "GpuHung",
    "GpuNvlinkDown",
    "IbPortDown",
    "DiskIoSlow",
    "WorkloadStalled",
    "GpuHighTemperature",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,20}",
        (0usize..6000).prop_map(|n| "é".repeat(n / 2)),
        (0usize..6000).prop_map(|n| "x".repeat(n)),
    ]
}

fn any_ticket() -> impl Strategy<Value = Ticket> {
    (
        0..CONDS.len(),
        prop_oneof![
            Just(TicketStatus::Created),
            Just(TicketStatus::Resolving),
            Just(TicketStatus::Resolved),
            Just(TicketStatus::Escalated),
            Just(TicketStatus::Closed),
        ],
        any::<bool>(),
        proptest::collection::vec((0u32..200, 0i64..200_000), 0..40),
        text(),
        text(),
        0i64..100_000,
    )
        .prop_map(|(c, status, disrupted, rem, reason, fp, age)| {
            let created = Timestamp::from_second(now().as_second() - age).unwrap();
            let mut t = Ticket::new(CONDS[c], &reason, "x", Some(&fp), created, None);
            t.status = status;
            t.disrupted = disrupted;
            t.closed_at = (!status.is_open()).then_some(created);
            t.priority = Some([0, 2, 3, 4, 5, 30, 40, 100][c]);
            t.remediations = rem
                .into_iter()
                .map(|(priority, ago)| crate::ticket::Remediation {
                    at: Timestamp::from_second(now().as_second() - ago).unwrap(),
                    priority,
                })
                .collect();
            t
        })
}

fn any_view() -> impl Strategy<Value = ClusterView> {
    proptest::collection::vec((any::<bool>(), proptest::option::of(any_ticket())), 1..12).prop_map(
        |nodes| ClusterView {
            nodes: nodes
                .into_iter()
                .enumerate()
                .map(|(i, (unschedulable, ticket))| {
                    let mut n = node(&format!("n{i}"));
                    n.unschedulable = unschedulable;
                    n.ticket = ticket.map(Ok);
                    (n.name.clone(), n)
                })
                .collect(),
            live: true,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// I1: admitting the plan never takes the cluster past its budget (manual cordons count; a
    /// cluster already past it gets no new disruption).
    #[test]
    fn budget_holds_for_any_view_and_alerts(
        view in any_view(),
        alerts in proptest::collection::vec((0usize..12, 0..CONDS.len()), 0..40),
        limit in 1u32..5,
    ) {
        let cat = Catalog::embedded().unwrap();
        let mut config = Config::default();
        config.budget.max_unschedulable = limit;
        config.budget.max_unschedulable_percent = 0.0;
        let alerts: Vec<Alert> = alerts
            .into_iter()
            .map(|(n, c)| alert(&format!("n{n}"), CONDS[c]))
            .collect();
        let p = plan(&PlanInput {
            alerts: &alerts, catalog: &cat, config: &config, view: &view, now: now(),
            silence_means_resolved: true,
        });
        let before = view.disrupted();
        let newly = p.nodes.iter().filter(|n| {
            n.block_reason.is_none() && n.disruptive && !view.nodes[&n.node].disrupted()
        }).count();
        prop_assert!(newly == 0 || before + newly <= limit as usize,
            "{before} disrupted + {newly} admitted > {limit}");
    }

    /// I3: whatever a node's history, a condition more urgent than every disruptive remediation
    /// in it is never held by cooldown or repeat-offender.
    #[test]
    fn urgency_is_never_starved(previous in any_ticket(), c in 0..CONDS.len()) {
        let cat = Catalog::embedded().unwrap();
        let mut n = node("n1");
        n.ticket = Some(Ok(previous.clone()));
        let p = plan_for(&cat, CONDS[c], &one(n));
        let mine = cat.condition(CONDS[c]).unwrap().priority;
        let more_urgent = mine < previous.priority.unwrap()
            && previous.remediations.iter().all(|r| mine < r.priority);
        if more_urgent {
            prop_assert!(!matches!(p.block_reason,
                Some(BlockReason::Cooldown | BlockReason::RepeatOffender)), "{p:?}");
        }
        if !previous.disrupted && previous.remediations.is_empty() {
            prop_assert!(!matches!(p.block_reason,
                Some(BlockReason::Cooldown | BlockReason::RepeatOffender)), "{p:?}");
        }
    }

    /// I5: whatever goes through the lifecycle (hostile reasons, fingerprints, messages, every
    /// step of the longest SOP), the ticket is written and fits its 4 KiB annotation.
    #[test]
    fn every_ticket_fits(
        previous in proptest::option::of(any_ticket()),
        messages in proptest::collection::vec(text(), crate::catalog::MAX_SOP_STEPS),
        reason in text(),
        fp in text(),
    ) {
        let cat = Catalog::embedded().unwrap();
        let mut p = plan_for(&cat, "GpuHung", &one(node("n1")));
        p.reason = reason;
        p.fingerprint = Some(fp);
        let job = Step::RunJob { template: "gpu-reset".into(), timeout_seconds: 600, disruptive: None };
        p.step_list = vec![job.clone(); crate::catalog::MAX_SOP_STEPS];
        // The most job relations, each as large as recorded (issue 18).
        p.jobs = (0..crate::ticket::JOBS_MAX as i64)
            .map(|i| crate::ticket::JobRelation::new(
                &format!("{i}{}", "j".repeat(5000)), "JobBlockedByNode", Some("4294967295"),
                Timestamp::from_second(now().as_second() + i).unwrap()).unwrap())
            .collect();
        let mut t = match start(previous, &p, now()) {
            Start::Continue(t) | Start::Open { ticket: t, .. } => t,
        };
        record_jobs(&mut t, &p);
        for (i, m) in messages.into_iter().enumerate() {
            let name = Some(crate::executor::steps::job_name("gpu-reset", &"n".repeat(200), &t.id(), i));
            begin(&mut t, i, &job, name.clone(), now());
            wait(&mut t, i, &job, m.clone(), name.clone(), now());
            if i % 2 == 0 { succeed(&mut t, i, &job, m, name, false, now()); } else { fail(&mut t, i, &job, m, name, now()); }
        }
        let text = t.to_annotation("n1");
        prop_assert!(text.is_ok(), "{text:?}");
        prop_assert!(text.unwrap().len() <= TICKET_MAX_BYTES);
    }

    /// Issue 18: whatever job alerts a node has (any number, hostile ids and counts, any order,
    /// next to any condition and previous ticket), its plan and its ticket hold at most
    /// `JOBS_MAX` clipped relations, the ticket fits 4 KiB, and the same alerts after a write and
    /// a re-read soon change nothing: one write, a second only when the first had to shed other
    /// fields to fit (then the relations get the room that freed), never one per pass.
    #[test]
    fn job_relations_are_bounded_clipped_and_not_rewritten(
        previous in proptest::option::of(any_ticket()),
        jobs in proptest::collection::vec(
            (prop_oneof!["[a-z0-9-]{1,20}", "(?s).{1,40}", text()], 0..2usize,
             prop_oneof!["[0-9]{1,3}", "(?s).{0,12}"], 0i64..10_000),
            0..60),
        c in 0..CONDS.len(),
    ) {
        use crate::ticket::{JOB_CONDITIONS, JOB_ID_MAX, JOBS_MAX};
        let cat = Catalog::embedded().unwrap();
        let mut alerts = vec![alert("n1", CONDS[c])];
        for (i, (id, cond, victims, ago)) in jobs.into_iter().enumerate() {
            let mut a = alert("n1", JOB_CONDITIONS[cond]);
            a.fingerprint = format!("job-{i}");
            a.labels.insert("job_id".into(), id);
            a.annotations.insert("victim_nodes".into(), victims);
            a.starts_at = Timestamp::from_second(now().as_second() - ago).unwrap();
            alerts.push(crate::alerts::Alert::from(crate::alerts::WebhookAlert {
                status: crate::alerts::AlertStatus::Firing,
                labels: a.labels,
                annotations: a.annotations,
                starts_at: a.starts_at,
                ends_at: Timestamp::from_second(-62_135_596_800).unwrap(),
                generator_url: String::new(),
                fingerprint: a.fingerprint,
            }));
        }
        let mut n = node("n1");
        n.ticket = previous.clone().map(Ok);
        let config = Config { act_on_can_ignore: true, ..Config::default() };
        let p = plan(&PlanInput {
            alerts: &alerts, catalog: &cat, config: &config, view: &one(n), now: now(),
            silence_means_resolved: true,
        }).nodes.remove(0);
        prop_assert!(p.jobs.len() <= JOBS_MAX);
        let mut t = match start(previous, &p, now()) {
            Start::Continue(t) | Start::Open { ticket: t, .. } => t,
        };
        let mut writes = usize::from(record_jobs(&mut t, &p));
        for _ in 0..4 {
            let text = t.to_annotation("n1");
            prop_assert!(text.is_ok(), "{text:?}");
            let text = text.unwrap();
            prop_assert!(text.len() <= TICKET_MAX_BYTES);
            t = Ticket::from_annotation("n1", &text).unwrap();
            prop_assert!(t.jobs.len() <= JOBS_MAX);
            for j in &t.jobs {
                prop_assert!(j.job_id.len() <= JOB_ID_MAX && !j.job_id.is_empty(), "{:?}", j.job_id);
                prop_assert!(!j.job_id.chars().any(char::is_control), "{:?}", j.job_id);
            }
            if !record_jobs(&mut t, &p) {
                break;
            }
            writes += 1;
        }
        prop_assert!(writes <= 2, "{writes} writes for the same alerts");
        prop_assert!(!record_jobs(&mut t.clone(), &p), "still changing after {writes} writes");
    }

    /// I6: a ticket continues only under the exact SOP it pinned.
    #[test]
    fn a_ticket_never_continues_under_another_sop(c in 0..CONDS.len(), d in 0..CONDS.len()) {
        let cat = Catalog::embedded().unwrap();
        let p = plan_for(&cat, CONDS[c], &one(node("n1")));
        let Start::Open { mut ticket, .. } = start(None, &p, now()) else { unreachable!() };
        ticket.status = TicketStatus::Resolving;
        let q = plan_for(&cat, CONDS[d], &one(node("n1")));
        let continues = matches!(start(Some(ticket), &q, now()), Start::Continue(_));
        prop_assert_eq!(continues, c == d, "{} -> {}", CONDS[c], CONDS[d]);
    }
}
