//! Catalog loading, validation and the XID mapping.

use super::*;

#[test]
fn embedded_catalog_matches_design_priorities() {
    let c = Catalog::embedded().unwrap();
    let p = |n: &str| c.condition(n).unwrap().priority;
    assert_eq!(p("NodeNotReady"), 0);
    assert_eq!(p("NodeCordoned"), 1);
    assert_eq!(p("GpuFellOffBus"), 2);
    for n in [
        "GpuXidFatal",
        "GpuEccDoubleBit",
        "GpuRowRemapFailure",
        "GpuHung",
    ] {
        assert_eq!(p(n), 3, "{n}");
    }
    assert_eq!(p("GpuNvlinkDown"), 4);
    assert_eq!(p("IbPortDown"), 5);
    assert_eq!(p("IbLinkFlapping"), 6);
    assert_eq!(p("PcieLinkDegraded"), 10);
    assert_eq!(p("NetworkRetransmitStorm"), 20);
    assert_eq!(p("DiskIoSlow"), 30);
    assert_eq!(p("WorkloadStalled"), 40);
    assert_eq!(p("GpuThermalThrottle"), 100);
    assert_eq!(p("GpuHighTemperature"), 100);
    assert_eq!(p("GpuXidApplication"), 1000);
}

/// Issue 16: the kernel-log conditions of `alerts/kernel.rules.yml`. Each resolves by its
/// `condition` label, has the priority class its alert's severity says (critical = 0..5,
/// warning = 6..99) and the SOP the catalog comment argues for.
#[test]
fn kernel_log_conditions_resolve_with_their_priority_and_sop() {
    let c = Catalog::embedded().unwrap();
    let has_job = |steps: &[Step], t: &str| {
        steps
            .iter()
            .any(|s| matches!(s, Step::RunJob { template, .. } if template == t))
    };
    for (cond, priority, sop) in [
        ("NvswitchSxidFatal", 2, "reboot"),
        ("GpuRebootRequired", 2, "reboot"),
        ("GpuResetRequired", 3, "gpu-reset"),
        ("PcieAerUncorrected", 4, "reboot"),
        ("GpuDrainAndReset", 7, "gpu-reset"),
        ("KernelHungTasks", 8, "cordon-diagnose"),
    ] {
        // The alert's condition label wins over any xid label (XID 154 maps to nothing).
        assert_eq!(c.resolve(Some(cond), Some("154")), Some(cond), "{cond}");
        let spec = c.condition(cond).unwrap();
        assert_eq!(
            (spec.priority, spec.sop.as_str()),
            (priority, sop),
            "{cond}"
        );
        assert_eq!(
            PriorityClass::of(spec.priority),
            PriorityClass::Emergency,
            "{cond}"
        );
        let steps = &c.sop(sop).unwrap().steps;
        assert_eq!(steps[0], Step::Cordon, "{cond}: cordon first");
    }
    // XID 154 itself is informational: only its recovery action (the alerts above) acts.
    assert_eq!(c.resolve(None, Some("154")), None);

    let sop = |cond: &str| &c.sop(&c.condition(cond).unwrap().sop).unwrap().steps;
    // A fatal SXid or "Node Reboot Required": drain, then reboot, wait for the alert to resolve.
    for cond in [
        "NvswitchSxidFatal",
        "GpuRebootRequired",
        "PcieAerUncorrected",
    ] {
        let s = sop(cond);
        let drain = s.iter().position(|s| matches!(s, Step::Drain { .. }));
        let reboot = s
            .iter()
            .position(|s| matches!(s, Step::RunJob { template, .. } if template == "reboot"));
        assert!(
            drain.is_some() && drain < reboot,
            "{cond}: drain before reboot: {s:?}"
        );
        assert!(
            s.iter().any(|s| matches!(s, Step::WaitCondition { .. })),
            "{cond}"
        );
        assert!(!has_job(s, "gpu-reset"), "{cond}");
    }
    // GPU reset (now or after a drain): drain, then the gpu-reset Job, never a reboot.
    for cond in ["GpuResetRequired", "GpuDrainAndReset"] {
        let s = sop(cond);
        let drain = s.iter().position(|s| matches!(s, Step::Drain { .. }));
        let reset = s
            .iter()
            .position(|s| matches!(s, Step::RunJob { template, .. } if template == "gpu-reset"));
        assert!(
            drain.is_some() && drain < reset,
            "{cond}: drain before reset: {s:?}"
        );
        assert!(!has_job(s, "reboot"), "{cond}");
    }
    // The more urgent recovery actions win on a node that has several.
    let p = |n: &str| c.condition(n).unwrap().priority;
    assert!(p("GpuRebootRequired") < p("GpuResetRequired"));
    assert!(p("GpuResetRequired") < p("GpuDrainAndReset"));
    // Hung tasks: cordon, diagnose while the hang is live, hand to people; nothing disruptive
    // beyond the cordon and its taint (no reboot, no reset, no drain).
    let hung = sop("KernelHungTasks");
    assert_eq!(hung.last(), Some(&Step::Escalate));
    assert!(has_job(hung, "diagnose"));
    assert!(!has_job(hung, "reboot") && !has_job(hung, "gpu-reset"));
    assert!(!hung.iter().any(|s| matches!(s, Step::Drain { .. })));
    assert!(
        hung.iter()
            .filter(|s| s.disrupts())
            .all(|s| matches!(s, Step::Cordon | Step::Taint { .. })),
        "{hung:?}"
    );
}

#[test]
fn xid_mapping_is_derived_from_the_xid_table() {
    let c = Catalog::embedded().unwrap();
    assert_eq!(c.resolve(None, Some("79")), Some("GpuFellOffBus"));
    // 46 (GPU stopped processing) is GpuHung's XID, as in alerts/gpu.rules.yml.
    assert_eq!(c.resolve(None, Some("46")), Some("GpuHung"));
    assert_eq!(c.resolve(None, Some("110")), Some("GpuXidFatal"));
    assert_eq!(c.resolve(None, Some("145")), Some("GpuNvlinkDown"));
    for xid in [48, 64, 95, 62, 109, 119, 120, 136, 140, 143, 155, 156, 158] {
        assert_eq!(
            c.resolve(None, Some(&xid.to_string())),
            Some("GpuXidFatal"),
            "{xid}"
        );
    }
    assert_eq!(c.resolve(None, Some("74")), Some("GpuNvlinkDown"));
    for xid in [13, 31, 43, 45, 68, 94] {
        assert_eq!(
            c.resolve(None, Some(&xid.to_string())),
            Some("GpuXidApplication")
        );
    }
    // IGNORE-only XIDs (63: remapping event) map to nothing.
    assert_eq!(c.resolve(None, Some("63")), None);
    assert_eq!(c.resolve(None, Some("not-a-number")), None);
    // The condition label wins when known; unknown falls back to xid.
    assert_eq!(c.resolve(Some("GpuHung"), Some("79")), Some("GpuHung"));
    assert_eq!(c.resolve(Some("Bogus"), Some("79")), Some("GpuFellOffBus"));
    assert_eq!(c.resolve(Some("Bogus"), None), None);
}

#[test]
fn default_sops_follow_the_xid_guidance() {
    let c = Catalog::embedded().unwrap();
    let sop = |cond: &str| &c.sop(&c.condition(cond).unwrap().sop).unwrap().steps;
    assert!(sop("GpuFellOffBus").contains(&Step::RunJob {
        template: "reboot".into(),
        timeout_seconds: 1200,
        disruptive: None,
    }));
    assert!(
        sop("GpuXidFatal")
            .iter()
            .any(|s| matches!(s, Step::RunJob { template, .. } if template == "gpu-reset"))
    );
    let nvlink = sop("GpuNvlinkDown");
    assert_eq!(nvlink[0], Step::Cordon);
    assert!(
        nvlink
            .iter()
            .any(|s| matches!(s, Step::RunJob { template, .. } if template == "diagnose"))
    );
    assert_eq!(sop("GpuXidApplication"), &vec![Step::Notify]);
}

#[test]
fn file_overrides_entries_and_is_validated() {
    let over = "conditions:\n  GpuHung: {priority: 7, sop: notify}\n  Custom: {priority: 50, sop: quiet}\nsops:\n  quiet: {steps: [{action: Notify}], dryRun: true}\n";
    let c = Catalog::from_yaml(DEFAULT_CATALOG, Some(over), "test").unwrap();
    assert_eq!(c.condition("GpuHung").unwrap().priority, 7);
    assert!(c.sop("quiet").unwrap().dry_run);
    assert_eq!(c.condition("NodeNotReady").unwrap().priority, 0);

    let bad_sop = "conditions:\n  X: {priority: 5, sop: nope}\n";
    let e = Catalog::from_yaml(DEFAULT_CATALOG, Some(bad_sop), "f.yaml").unwrap_err();
    assert!(e.to_string().contains("unknown SOP"), "{e}");
    let bad_job = "sops:\n  s: {steps: [{action: RunJob, template: format-disk}]}\n";
    assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(bad_job), "f").is_err());
    let unknown_key = "conditions:\n  X: {priority: 5, sop: notify, colour: red}\n";
    assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(unknown_key), "f").is_err());
}

#[test]
fn a_sop_that_disrupts_before_it_cordons_is_refused() {
    // Issue 14 scenario 5: this SOP took 100 nodes out with a budget of 2.
    let sneaky = "sops:\n  sneaky: {steps: [{action: Taint, key: ark.io/unhealthy, effect: NoExecute}, {action: RunJob, template: reboot}]}\n";
    let e = Catalog::from_yaml(DEFAULT_CATALOG, Some(sneaky), "f.yaml").unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("sneaky") && e.contains("disrupts before it cordons"),
        "{e}"
    );
    let job_first =
        "sops:\n  j: {steps: [{action: RunJob, template: gpu-reset}, {action: Cordon}]}\n";
    assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(job_first), "f").is_err());
    // A diagnose Job first is fine (not disruptive), and so is a Job marked harmless.
    let ok = "sops:\n  d: {steps: [{action: RunJob, template: diagnose}, {action: Cordon}, {action: Taint, effect: NoExecute}]}\n  r: {steps: [{action: RunJob, template: repair, disruptive: false}]}\n";
    Catalog::from_yaml(DEFAULT_CATALOG, Some(ok), "f").unwrap();
    let soft = "sops:\n  s: {steps: [{action: Taint, effect: PreferNoSchedule}]}\n";
    Catalog::from_yaml(DEFAULT_CATALOG, Some(soft), "f").unwrap();
}

#[test]
fn what_disrupts_and_the_digest_pins_the_steps() {
    let c = Catalog::embedded().unwrap();
    let reboot = c.sop("reboot").unwrap();
    assert!(reboot.disrupts());
    assert!(!c.sop("diagnose-notify").unwrap().disrupts());
    assert!(!c.sop("verify-and-uncordon").unwrap().disrupts());
    assert_eq!(reboot.digest(), c.sop("reboot").unwrap().digest());
    assert_ne!(reboot.digest(), c.sop("gpu-reset").unwrap().digest());
    let taint = |effect: &str| Step::Taint {
        key: UNHEALTHY_TAINT.into(),
        effect: effect.into(),
    };
    assert!(taint("NoExecute").disrupts() && taint("NoSchedule").disrupts());
    assert!(!taint("PreferNoSchedule").disrupts());
}

#[test]
fn priority_classes() {
    assert_eq!(PriorityClass::of(0), PriorityClass::NotReady);
    assert_eq!(PriorityClass::of(1), PriorityClass::Cordon);
    assert_eq!(PriorityClass::of(2), PriorityClass::Emergency);
    assert_eq!(PriorityClass::of(99), PriorityClass::Emergency);
    assert_eq!(PriorityClass::of(100), PriorityClass::CanIgnore);
    assert_eq!(PriorityClass::of(999), PriorityClass::CanIgnore);
    assert_eq!(PriorityClass::of(1000), PriorityClass::MustIgnore);
}

/// Issue 18: the cross-node job conditions. JobBlockedByNode acts alone only when no hardware
/// alert covers the culprit's error (every hardware condition is more urgent), and then cordons,
/// diagnoses and hands to people — nothing more disruptive; JobStragglerNode takes nothing out
/// of service. Both are the conditions the ticket records jobs for.
#[test]
fn job_conditions_resolve_with_their_priority_and_sop() {
    let c = Catalog::embedded().unwrap();
    let p = |n: &str| c.condition(n).unwrap().priority;
    let sop = |cond: &str| &c.sop(&c.condition(cond).unwrap().sop).unwrap().steps;
    for (cond, priority, sop_name) in [
        ("JobBlockedByNode", 9, "cordon-diagnose"),
        ("JobStragglerNode", 45, "diagnose-notify"),
    ] {
        assert_eq!(c.resolve(Some(cond), None), Some(cond));
        let spec = c.condition(cond).unwrap();
        assert_eq!((spec.priority, spec.sop.as_str()), (priority, sop_name));
        assert_eq!(PriorityClass::of(spec.priority), PriorityClass::Emergency);
    }
    for hw in [
        "GpuFellOffBus",
        "NvswitchSxidFatal",
        "GpuRebootRequired",
        "GpuResetRequired",
        "GpuXidFatal",
        "GpuEccDoubleBit",
        "GpuRowRemapFailure",
        "GpuHung",
        "GpuNvlinkDown",
        "PcieAerUncorrected",
        "IbPortDown",
        "IbLinkFlapping",
        "GpuDrainAndReset",
        "KernelHungTasks",
    ] {
        assert!(
            p(hw) < p("JobBlockedByNode"),
            "{hw} must win on the culprit"
        );
    }
    // Before the symptoms it explains; the straggler after the stall.
    for soft in ["NetworkRetransmitStorm", "DiskIoSlow", "WorkloadStalled"] {
        assert!(p("JobBlockedByNode") < p(soft), "{soft}");
    }
    assert!(p("WorkloadStalled") < p("JobStragglerNode"));

    let blocked = sop("JobBlockedByNode");
    assert_eq!(blocked[0], Step::Cordon);
    assert_eq!(blocked.last(), Some(&Step::Escalate));
    assert!(
        blocked
            .iter()
            .any(|s| matches!(s, Step::RunJob { template, .. } if template == "diagnose"))
    );
    assert!(
        blocked
            .iter()
            .filter(|s| s.disrupts())
            .all(|s| matches!(s, Step::Cordon | Step::Taint { .. })),
        "{blocked:?}"
    );
    assert!(!c.sop("diagnose-notify").unwrap().disrupts());
    for j in crate::ticket::JOB_CONDITIONS {
        assert!(c.condition(j).is_some(), "{j}");
    }
}
