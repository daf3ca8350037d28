//! `data/xid.csv` is the one source of Ark's XID knowledge: the exporter's classes and the
//! healer's XID → condition map are parsed from it at startup (by `data/xid.rs`, included here
//! too); the alert rules cannot include a file, so this test ties the XID lists of
//! `alerts/gpu.rules.yml` to it: for every condition, the XIDs its alert matches are exactly the
//! table's rows with that `ark_condition`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};
use ark_harness::repo_root;
use serde_yaml::Value as Yaml;

#[allow(dead_code)] // only the condition column is tied here
mod xid_table {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/xid.rs"));
}

type XidSets = BTreeMap<String, BTreeSet<u32>>;

/// Condition → XIDs, from the table.
fn table_sets(csv: &str) -> Result<XidSets> {
    let mut out = XidSets::new();
    for row in xid_table::parse_xid_csv(csv).map_err(anyhow::Error::msg)? {
        if let Some(c) = row.condition {
            out.entry(c).or_default().insert(row.xid);
        }
    }
    Ok(out)
}

/// Alert → XIDs named by its expression's `xid="N"` / `xid=~"A|B"` matchers (alerts without
/// one are left out).
fn rule_sets(rules_yaml: &str) -> Result<XidSets> {
    let doc: Yaml = serde_yaml::from_str(rules_yaml)?;
    let mut out = XidSets::new();
    for group in doc["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let (Some(name), Some(expr)) = (rule["alert"].as_str(), rule["expr"].as_str()) else {
                continue;
            };
            let mut rest = expr;
            while let Some(i) = rest.find("xid") {
                rest = &rest[i + 3..];
                let after = rest.trim_start();
                let Some(value) = after
                    .strip_prefix("=~")
                    .or_else(|| after.strip_prefix('='))
                    .map(str::trim_start)
                    .and_then(|v| v.strip_prefix('"'))
                    .and_then(|v| v.split_once('"'))
                    .map(|(v, _)| v)
                else {
                    continue;
                };
                for part in value.split('|') {
                    let xid: u32 = part.parse().with_context(|| {
                        format!("{name}: xid matcher {value:?} is not a list of numbers")
                    })?;
                    out.entry(name.to_owned()).or_default().insert(xid);
                }
            }
        }
    }
    Ok(out)
}

/// Where the two disagree, in words.
fn differences(table: &XidSets, rules: &XidSets) -> Vec<String> {
    let names: BTreeSet<&String> = table.keys().chain(rules.keys()).collect();
    let empty = BTreeSet::new();
    let mut out = Vec::new();
    for name in names {
        let (t, r) = (
            table.get(name).unwrap_or(&empty),
            rules.get(name).unwrap_or(&empty),
        );
        let missing: Vec<_> = t.difference(r).collect();
        let extra: Vec<_> = r.difference(t).collect();
        if !missing.is_empty() {
            out.push(format!(
                "{name}: XIDs {missing:?} are {name} in data/xid.csv but not in its alert"
            ));
        }
        if !extra.is_empty() {
            out.push(format!(
                "{name}: its alert matches XIDs {extra:?}, which data/xid.csv does not give {name}"
            ));
        }
    }
    out
}

#[test]
fn gpu_alert_xid_lists_are_the_xid_table() -> Result<()> {
    let root = repo_root();
    let table = table_sets(&std::fs::read_to_string(root.join("data/xid.csv"))?)?;
    let rules = rule_sets(&std::fs::read_to_string(root.join("alerts/gpu.rules.yml"))?)?;
    ensure!(
        rules.len() >= 5,
        "XID matchers found only in {:?}",
        rules.keys()
    );
    let diff = differences(&table, &rules);
    ensure!(
        diff.is_empty(),
        "alerts/gpu.rules.yml and data/xid.csv disagree:\n  {}",
        diff.join("\n  ")
    );
    Ok(())
}

#[test]
fn a_divergent_alert_list_is_reported() -> Result<()> {
    let h = xid_table::XID_CSV_HEADER;
    let table = table_sets(&format!(
        "{h}\n46,A,d,RESET_GPU,,fault,GpuHung\n48,B,d,W,,fault,GpuXidFatal\n\
         62,C,d,RESET_GPU,,fault,GpuXidFatal\n"
    ))?;
    let rules = rule_sets(
        "groups:\n  - name: g\n    rules:\n      - alert: GpuXidFatal\n        \
         expr: r{xid=~\"48|64\"}\n      - alert: GpuHung\n        expr: r{xid = \"46\"} or up\n",
    )?;
    assert_eq!(rules["GpuHung"], BTreeSet::from([46]));
    let diff = differences(&table, &rules).join("\n");
    assert!(diff.contains("XIDs [62] are GpuXidFatal"), "{diff}");
    assert!(diff.contains("matches XIDs [64]"), "{diff}");
    assert!(!diff.contains("GpuHung"), "{diff}");
    Ok(())
}
