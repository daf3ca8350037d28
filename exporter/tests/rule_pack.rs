//! The shipped rule pack (`rules/`): every fixture in `rules/tests/*.jsonl` replayed through the
//! pipeline yields exactly the scenes in its `.expect.json`, and every rule has a fixture that
//! fires it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ark_exporter::cli::replay_file;
use ark_exporter::config::Config;
use ark_exporter::metrics::Telemetry;
use ark_exporter::rules::load_dir;

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")
}

#[test]
fn every_fixture_yields_exactly_its_scenes() {
    let rules = load_dir(&rules_dir(), true).expect("the shipped pack loads in strict mode");
    assert!(rules.skipped.is_empty(), "{:?}", rules.skipped);
    let all_scenes: BTreeSet<String> = rules.rules.iter().map(|r| r.spec.scene.clone()).collect();
    let mut fired = BTreeSet::new();
    let mut fixtures: Vec<PathBuf> = std::fs::read_dir(rules_dir().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 10);
    let mut failures = Vec::new();
    for f in &fixtures {
        let expect_path = f.with_extension("expect.json");
        let expect: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&expect_path).unwrap()).unwrap();
        let expected: BTreeSet<String> = expect["scenes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        let telemetry = Telemetry::new("test").unwrap();
        let mut p = replay_file(f, &Config::default(), Some(&rules), &telemetry).unwrap();
        let report = p.report();
        assert!(
            report.stats.dropped.is_empty(),
            "{}: {:?}",
            f.display(),
            report.stats.dropped
        );
        let got: BTreeSet<String> = report.scenes.iter().map(|s| s.scene.clone()).collect();
        if got != expected {
            failures.push(format!(
                "{}: expected {expected:?}, got {got:?}",
                f.display()
            ));
        }
        for s in &report.scenes {
            let rule = rules.rules.iter().find(|r| r.id == s.rule_id).unwrap();
            let actions: Vec<_> = rule
                .spec
                .solution_steps
                .iter()
                .map(|s| s.action.clone())
                .collect();
            assert_eq!(s.actions, actions);
            assert_eq!(s.evidence, rule.spec.related_evidences);
        }
        fired.extend(got);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let unfired: Vec<_> = all_scenes.difference(&fired).collect();
    assert!(
        unfired.is_empty(),
        "rules without a firing fixture: {unfired:?}"
    );
    for required in [
        "hardware.gpu.oom",
        "hardware.gpu.xid_error",
        "hardware.gpu.ecc_error",
        "hardware.gpu.nvlink_degraded",
        "hardware.pcie.degraded",
        "network.nccl.hang",
        "network.tcp.retransmit_burst",
        "network.rdma.latency_spike",
        "storage.io_timeout",
        "workload.crash_loop",
        "workload.stalled",
    ] {
        assert!(all_scenes.contains(required), "missing rule for {required}");
    }
}
