//! Unit tests with hostile but valid input, and the property test of the store's promises.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

/// Receipt and alert times are seconds after this (2026-11-18).
const T0: i64 = 1_795_000_000;

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(T0 + secs).unwrap()
}

fn alert(fp: &str, status: AlertStatus, starts: i64) -> Alert {
    Alert {
        fingerprint: fp.into(),
        status,
        labels: [
            ("node".to_owned(), "n1".to_owned()),
            ("condition".to_owned(), "GpuHung".to_owned()),
        ]
        .into(),
        annotations: BTreeMap::new(),
        starts_at: at(starts),
        ends_at: None,
    }
}

/// An alert with an annotation of `pad` bytes.
fn padded(fp: &str, status: AlertStatus, starts: i64, pad: usize) -> Alert {
    let mut a = alert(fp, status, starts);
    a.annotations.insert("pad".into(), "x".repeat(pad));
    a
}

fn limits(max_alerts: usize, max_bytes: usize) -> StoreLimits {
    StoreLimits {
        max_alerts,
        max_bytes,
        firing_expiry_seconds: 7200,
    }
}

fn roomy() -> AlertStore {
    AlertStore::new(limits(100, usize::MAX))
}

use AlertStatus::{Firing, Resolved};

/// The store's bookkeeping agrees with its entries, and its bounds hold.
fn check(s: &AlertStore) {
    let sum: usize = s.snapshot().iter().map(Alert::bytes).sum();
    assert_eq!(s.bytes(), sum);
    let resolved: usize = s
        .entries
        .values()
        .filter(|e| e.alert.status == Resolved)
        .map(|e| e.bytes)
        .sum();
    assert_eq!(s.resolved_bytes, resolved);
    assert_eq!(
        s.firing_by_age.len() + s.resolved_by_age.len(),
        s.entries.len()
    );
    for (fp, e) in &s.entries {
        assert_eq!(&e.alert.fingerprint, fp);
        assert_eq!(e.bytes, e.alert.bytes());
        let index = match e.alert.status {
            Firing => &s.firing_by_age,
            Resolved => &s.resolved_by_age,
        };
        assert_eq!(index.get(&e.age), Some(fp));
    }
    assert!(s.bytes() <= s.limits.max_bytes);
    assert!(s.len() <= s.limits.max_alerts);
}

#[test]
fn store_dedups_and_ignores_out_of_order() {
    let mut s = roomy();
    let now = at(0);
    assert_eq!(s.apply(alert("a", Firing, 0), now), Applied::Changed);
    assert_eq!(s.apply(alert("a", Firing, 0), now), Applied::Duplicate);
    assert!(s.is_firing("n1", "GpuHung"));
    assert_eq!(s.apply(alert("a", Resolved, 0), now), Applied::Changed);
    // The firing notification of the same occurrence arriving late must not reopen it.
    assert_eq!(s.apply(alert("a", Firing, 0), now), Applied::Stale);
    assert!(!s.is_firing("n1", "GpuHung"));
    // A new occurrence (later startsAt) reopens.
    assert_eq!(s.apply(alert("a", Firing, 3600), now), Applied::Changed);
    assert!(s.is_firing("n1", "GpuHung"));
    // A resolution, or a firing, of the old occurrence arriving late is stale.
    assert_eq!(s.apply(alert("a", Resolved, 0), now), Applied::Stale);
    assert_eq!(s.apply(alert("a", Firing, 0), now), Applied::Stale);
    assert!(s.is_firing("n1", "GpuHung"));
    assert_eq!(s.len(), 1);
    check(&s);
}

#[test]
fn condition_state_tells_firing_resolved_and_unknown() {
    let mut s = roomy();
    let is = |a: &Alert| a.condition() == Some("GpuHung");
    assert_eq!(s.condition_state("n1", is), ConditionState::Unknown);
    s.apply(alert("a", Resolved, 0), at(0));
    assert_eq!(s.condition_state("n1", is), ConditionState::Resolved);
    s.apply(alert("b", Firing, 0), at(0));
    assert_eq!(s.condition_state("n1", is), ConditionState::Firing);
    assert_eq!(s.condition_state("n2", is), ConditionState::Unknown);
    assert_eq!(s.firing().count(), 1);
}

#[test]
fn firing_alert_not_resent_expires() {
    let mut s = roomy();
    s.apply(alert("a", Firing, 0), at(0));
    assert_eq!(s.expire(at(7200)), Expired::default());
    assert!(s.is_firing("n1", "GpuHung"));
    assert_eq!(
        s.expire(at(7201)),
        Expired {
            firing: 1,
            resolved: 0
        }
    );
    assert!(s.is_empty());
    assert_eq!(
        s.condition_state("n1", |_| true),
        ConditionState::Unknown,
        "forgotten, not resolved"
    );
    check(&s);
}

#[test]
fn resends_refresh_expiry() {
    let mut s = roomy();
    s.apply(alert("a", Firing, 0), at(0));
    // Alertmanager's repeat_interval: the same occurrence, re-sent.
    for t in [900, 1800, 7000] {
        assert_eq!(s.apply(alert("a", Firing, 0), at(t)), Applied::Duplicate);
    }
    assert_eq!(s.expire(at(7000 + 7200)).firing, 0);
    assert!(s.is_firing("n1", "GpuHung"));
    // A re-send with an older receipt time (another clock) does not age it.
    s.apply(alert("a", Firing, 0), at(10));
    assert_eq!(s.expire(at(7000 + 7200)).firing, 0);
    assert_eq!(s.expire(at(7000 + 7201)).firing, 1);
    // A stale re-send does not refresh what it could not change.
    s.apply(alert("b", Resolved, 100), at(0));
    assert_eq!(s.apply(alert("b", Firing, 0), at(3000)), Applied::Stale);
    assert_eq!(s.expire(at(3601)).resolved, 1);
    check(&s);
}

#[test]
fn resolved_alerts_are_forgotten_an_hour_after_receipt_not_after_alert_time() {
    let mut s = AlertStore::new(StoreLimits {
        firing_expiry_seconds: 60,
        ..limits(100, usize::MAX)
    });
    // Alertmanager times far in the past: still kept, we just received it.
    let mut old = alert("a", Resolved, 0);
    old.starts_at = "2020-01-01T00:00:00Z".parse().unwrap();
    s.apply(old, at(0));
    // The firing window does not apply to resolved alerts.
    assert_eq!(s.expire(at(3600)), Expired::default());
    assert_eq!(s.len(), 1);
    assert_eq!(s.expire(at(3601)).resolved, 1);
    assert!(s.is_empty());
}

#[test]
fn expiry_windows_out_of_range_expire_nothing() {
    let mut s = AlertStore::new(StoreLimits {
        firing_expiry_seconds: u64::MAX,
        ..limits(100, usize::MAX)
    });
    s.apply(alert("a", Firing, 0), at(0));
    assert_eq!(s.expire(Timestamp::MAX).firing, 0);
    assert_eq!(s.expire(Timestamp::MIN), Expired::default());
    assert_eq!(s.len(), 1);
}

#[test]
fn budget_evicts_resolved_alerts_oldest_received_first() {
    let size = padded("r1", Resolved, 0, 1000).bytes();
    let mut s = AlertStore::new(limits(100, 3 * size));
    // r1 is applied first but received later than r2 (receipt time is what counts).
    s.apply(padded("r1", Resolved, 0, 1000), at(10));
    s.apply(padded("r2", Resolved, 0, 1000), at(5));
    s.apply(padded("r3", Resolved, 0, 1000), at(20));
    // A re-send makes r2 the most recently received.
    assert_eq!(
        s.apply(padded("r2", Resolved, 0, 1000), at(30)),
        Applied::Duplicate
    );
    assert_eq!(s.bytes(), 3 * size);
    let mut evicted = Vec::new();
    for fp in ["f1", "f2", "f3"] {
        assert_eq!(
            s.apply(padded(fp, Firing, 0, 1000), at(40)),
            Applied::Changed
        );
        check(&s);
        let gone: Vec<&str> = ["r1", "r2", "r3"]
            .into_iter()
            .filter(|r| s.get(r).is_none() && !evicted.contains(r))
            .collect();
        assert_eq!(gone.len(), 1, "one eviction per insert: {gone:?}");
        evicted.extend(gone);
    }
    assert_eq!(evicted, ["r1", "r3", "r2"]);
    // Now full of firing alerts: the next new one is refused, nothing changes.
    let before = (s.bytes(), s.len());
    assert_eq!(
        s.apply(padded("f4", Firing, 0, 1000), at(50)),
        Applied::Rejected
    );
    assert_eq!(s.apply(alert("tiny", Firing, 0), at(50)), Applied::Rejected);
    assert_eq!(s.apply(alert("r9", Resolved, 0), at(50)), Applied::Rejected);
    assert_eq!((s.bytes(), s.len()), before);
    assert!(s.get("f4").is_none());
    check(&s);
}

#[test]
fn count_limit_holds_and_evicts_resolved_first() {
    let mut s = AlertStore::new(limits(2, usize::MAX));
    s.apply(alert("a", Firing, 0), at(0));
    s.apply(alert("b", Resolved, 0), at(0));
    assert_eq!(s.apply(alert("c", Firing, 0), at(0)), Applied::Changed);
    assert!(s.get("b").is_none());
    assert_eq!(s.apply(alert("d", Firing, 0), at(0)), Applied::Rejected);
    assert_eq!(s.len(), 2);
    let mut none = AlertStore::new(limits(0, usize::MAX));
    assert_eq!(none.apply(alert("a", Firing, 0), at(0)), Applied::Rejected);
    check(&s);
}

#[test]
fn an_alert_larger_than_the_whole_budget_evicts_nothing() {
    let mut s = AlertStore::new(limits(100, 4096));
    s.apply(alert("r", Resolved, 0), at(0));
    assert_eq!(
        s.apply(padded("huge", Firing, 0, 5000), at(1)),
        Applied::Rejected
    );
    // Rejected before any eviction: what could not help stays.
    assert!(s.get("r").is_some());
    check(&s);
}

#[test]
fn a_known_alert_changes_state_even_when_the_budget_is_full() {
    let size = alert("f1", Firing, 0).bytes();
    let mut s = AlertStore::new(limits(100, 2 * size));
    s.apply(alert("f1", Firing, 0), at(0));
    s.apply(alert("f2", Firing, 0), at(0));
    // Its resolution carries a large annotation: no room, but a resolution is never lost.
    let big = padded("f1", Resolved, 0, 10_000);
    assert_eq!(s.apply(big, at(1)), Applied::Changed);
    let got = s.get("f1").unwrap();
    assert_eq!(got.status, Resolved);
    assert!(got.annotations.is_empty(), "known content kept");
    // Nor is a new occurrence of a known alert.
    assert_eq!(
        s.apply(padded("f1", Firing, 60, 10_000), at(2)),
        Applied::Changed
    );
    assert_eq!(s.get("f1").unwrap().starts_at, at(60));
    assert_eq!(s.bytes(), 2 * size);
    check(&s);
}

#[test]
fn a_changed_alert_uses_its_new_content_when_it_fits() {
    let mut s = roomy();
    s.apply(alert("a", Firing, 0), at(0));
    let small = s.bytes();
    s.apply(padded("a", Resolved, 0, 500), at(1));
    assert_eq!(
        s.bytes(),
        small + "pad".len() + 500 + crate::alerts::ENTRY_OVERHEAD
    );
    assert_eq!(s.get("a").unwrap().annotations["pad"].len(), 500);
    s.expire(at(3602));
    assert_eq!(s.bytes(), 0);
    check(&s);
}

#[test]
fn thousands_of_large_alerts_stay_within_the_budget() {
    // Scenario 6 of issue 14: 6,000 large authenticated alerts took the healer to 971 MiB.
    let max = 8 << 20;
    let mut s = AlertStore::new(limits(200_000, max));
    let mut rejected = 0;
    for i in 0..6000 {
        let fp = format!("{i:016x}");
        let a = padded(&fp, Firing, 0, 64 * 1024);
        if s.apply(a, at(i)) == Applied::Rejected {
            rejected += 1;
        }
    }
    assert!(s.bytes() <= max);
    assert!(rejected > 5000, "{rejected}");
    check(&s);
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    /// Receive an alert `after` seconds after the previous step.
    Apply {
        fp: u8,
        firing: bool,
        /// startsAt, in minutes after T0: few values, so that occurrences repeat.
        starts: u8,
        pad: usize,
        after: u16,
    },
    Expire {
        after: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, any::<bool>(), 0u8..4, 0usize..3000, 0u16..1200).prop_map(
            |(fp, firing, starts, pad, after)| Op::Apply { fp, firing, starts, pad, after }
        ),
        1 => (0u16..4000).prop_map(|after| Op::Expire { after }),
    ]
}

/// 256 cases unless `PROPTEST_CASES` says otherwise.
fn cases() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(cases())]

    /// The promises of the module docs, under random sequences of apply/expire with random
    /// sizes and limits.
    #[test]
    fn store_invariants_hold_under_random_apply_and_expire(
        max_alerts in 0usize..6,
        max_bytes in 0usize..12_000,
        firing_expiry_seconds in 0u64..5000,
        ops in proptest::collection::vec(op(), 1..100),
    ) {
        let mut s = AlertStore::new(StoreLimits { max_alerts, max_bytes, firing_expiry_seconds });
        let mut now = 0i64;
        // Per fingerprint, the latest startsAt the store knows as resolved, while it remembers.
        let mut resolved_floor: HashMap<String, Timestamp> = HashMap::new();
        for op in ops {
            match op {
                Op::Apply { fp, firing, starts, pad, after } => {
                    now += i64::from(after);
                    let fp = format!("f{fp}");
                    let status = if firing { Firing } else { Resolved };
                    let a = padded(&fp, status, i64::from(starts) * 60, pad);
                    let before = s.get(&fp).cloned();
                    let firing_bytes = s.bytes() - s.resolved_bytes;
                    let firing_count = s.firing().count();
                    let (len, bytes) = (s.len(), s.bytes());
                    match s.apply(a.clone(), at(now)) {
                        Applied::Changed => {
                            let got = s.get(&fp).unwrap();
                            prop_assert_eq!(got.status, a.status);
                            prop_assert_eq!(got.starts_at, a.starts_at);
                            if before.is_none() {
                                prop_assert_eq!(got, &a);
                            }
                        }
                        Applied::Duplicate | Applied::Stale => {
                            prop_assert!(before.is_some());
                            prop_assert_eq!(s.get(&fp), before.as_ref());
                            prop_assert_eq!((s.len(), s.bytes()), (len, bytes));
                        }
                        Applied::Rejected => {
                            prop_assert!(before.is_none());
                            prop_assert!(s.get(&fp).is_none());
                            prop_assert_eq!((s.len(), s.bytes()), (len, bytes));
                            // Refused only when evicting every resolved alert would not do.
                            prop_assert!(
                                firing_count >= max_alerts
                                    || firing_bytes + a.bytes() > max_bytes
                            );
                        }
                    }
                }
                Op::Expire { after } => {
                    now += i64::from(after);
                    s.expire(at(now));
                    for e in s.entries.values() {
                        let window = match e.alert.status {
                            Firing => firing_expiry_seconds as i64,
                            Resolved => RESOLVED_MEMORY_SECONDS,
                        };
                        prop_assert!(e.age.0 >= at(now - window), "{e:?} outlived its window");
                    }
                }
            }
            check(&s);
            for i in 0..6 {
                let fp = format!("f{i}");
                match s.get(&fp) {
                    None => {
                        resolved_floor.remove(&fp);
                    }
                    Some(a) if a.status == Firing => {
                        if let Some(floor) = resolved_floor.get(&fp) {
                            prop_assert!(a.starts_at > *floor, "resolved {floor} came back: {a:?}");
                        }
                    }
                    Some(a) => {
                        let floor = resolved_floor.entry(fp).or_insert(a.starts_at);
                        *floor = (*floor).max(a.starts_at);
                    }
                }
            }
        }
    }
}
