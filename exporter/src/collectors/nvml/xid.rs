//! XIDs: which ones block a GPU in the causal graph, and the monotonic per-(gpu, xid) state behind
//! `ark_gpu_xid_errors_total` / `ark_gpu_last_xid_timestamp_seconds`.
//!
//! Classification is the `ark_class` column of `data/xid.csv` (the repository's one XID table,
//! NVIDIA's catalog plus Ark's columns; the healer's conditions and the alerts' XID lists come
//! from the same rows):
//! - **application** XIDs (DESIGN.md's `GpuXidApplication` list 13, 31, 43, 45, 68, 94, and every
//!   XID whose immediate action is `RESTART_APP`) are the workload's fault, not the GPU's;
//! - **informational** XIDs (immediate action `IGNORE`, or 154 "recovery action changed", which
//!   only qualifies another XID) say nothing new about the GPU;
//! - everything else, including XIDs the table does not know, is a **fault** of the GPU.
//!
//! Every XID is counted and time-stamped. Only faults become `error.hw` events (and therefore a
//! BlockedBy edge that every consuming process inherits): an application XID raised by one job
//! must not mark the other tenants of a shared GPU as blocked. `block_application_xids = true` in
//! `[nvml]` turns application XIDs into events too.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use prometheus::proto::{MetricFamily, MetricType};

use super::source::XidEvent;
use crate::metrics::family;

const XID_CSV: &str = include_str!("../../../../data/xid.csv");

/// The one parser of `data/xid.csv` (shared with the healer and the tests).
mod table {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/xid.rs"));
}
pub use table::{XidClass, XidRow, parse_xid_csv};

/// Most (gpu, xid) series kept; later new pairs fold into `xid="other"` of their GPU.
pub const MAX_XID_SERIES: usize = 512;

fn catalog() -> &'static BTreeMap<u64, XidClass> {
    static TABLE: OnceLock<BTreeMap<u64, XidClass>> = OnceLock::new();
    TABLE.get_or_init(|| {
        parse_xid_csv(XID_CSV)
            .expect("data/xid.csv is valid (tested)")
            .into_iter()
            .map(|r| (u64::from(r.xid), r.class))
            .collect()
    })
}

/// Class of an XID (`None`: NVML could not say which → a fault, to be safe).
pub fn class_of(xid: Option<u64>) -> XidClass {
    xid.and_then(|x| catalog().get(&x).copied())
        .unwrap_or(XidClass::Fault)
}

/// Does this XID put a BlockedBy edge on its GPU?
pub fn blocks(xid: Option<u64>, block_application_xids: bool) -> bool {
    match class_of(xid) {
        XidClass::Fault => true,
        XidClass::Application => block_application_xids,
        XidClass::Informational => false,
    }
}

/// The `xid` label and the `XID_<n>` event value.
pub fn xid_label(xid: Option<u64>) -> String {
    xid.map_or_else(|| "unknown".to_owned(), |x| x.to_string())
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u64,
    last_ts_ms: i64,
}

/// Counts and last-seen times per (gpu, xid). Counters only ever go up for the life of the
/// process, and the timestamp moves on every XID, so a dashboard tells a new XID from an old one
/// even across a counter reset.
#[derive(Debug, Default)]
pub struct XidState {
    entries: BTreeMap<(u32, String), Entry>,
}

impl XidState {
    pub fn record(&mut self, ev: &XidEvent, ts_ms: i64) {
        let mut key = (ev.gpu, xid_label(ev.xid));
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_XID_SERIES {
            key.1 = "other".to_owned();
        }
        let e = self.entries.entry(key).or_insert(Entry {
            count: 0,
            last_ts_ms: ts_ms,
        });
        e.count += 1;
        e.last_ts_ms = e.last_ts_ms.max(ts_ms);
    }

    /// Total XIDs recorded for one GPU (tests).
    pub fn count(&self, gpu: u32, xid: &str) -> u64 {
        self.entries
            .get(&(gpu, xid.to_owned()))
            .map_or(0, |e| e.count)
    }

    pub fn families(&self) -> Vec<MetricFamily> {
        let labels =
            |(gpu, xid): &(u32, String)| vec![("gpu", gpu.to_string()), ("xid", xid.clone())];
        vec![
            family(
                "ark_gpu_xid_errors_total",
                "XID errors reported by the driver (NVML critical XID events) since the exporter started.",
                MetricType::COUNTER,
                self.entries
                    .iter()
                    .map(|(k, e)| (labels(k), e.count as f64)),
            ),
            family(
                "ark_gpu_last_xid_timestamp_seconds",
                "Unix time of the last XID of this kind on this GPU.",
                MetricType::GAUGE,
                self.entries
                    .iter()
                    .map(|(k, e)| (labels(k), e.last_ts_ms as f64 / 1000.0)),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_classes_follow_nvidia_and_design() {
        let t = catalog();
        assert!(t.len() > 150, "catalog not parsed: {} rows", t.len());
        // DESIGN.md: GpuFellOffBus 79, GpuXidFatal list, GpuNvlinkDown 74, GpuHung 46 → faults.
        for x in [
            79, 48, 64, 95, 62, 109, 119, 120, 136, 140, 143, 155, 156, 158, 74, 46,
        ] {
            assert_eq!(class_of(Some(x)), XidClass::Fault, "xid {x}");
            assert!(blocks(Some(x), false));
        }
        for x in [13, 31, 43, 45, 68, 94, 8] {
            assert_eq!(class_of(Some(x)), XidClass::Application, "xid {x}");
            assert!(!blocks(Some(x), false));
            assert!(blocks(Some(x), true));
        }
        // 63: row remapping event (IGNORE); 92: excessive SBE rate (IGNORE); 154: qualifier.
        for x in [63, 92, 154] {
            assert_eq!(class_of(Some(x)), XidClass::Informational, "xid {x}");
            assert!(!blocks(Some(x), true));
        }
        // Unknown to the catalog, or unreadable: treated as a fault.
        assert_eq!(class_of(Some(100_000)), XidClass::Fault);
        assert_eq!(class_of(None), XidClass::Fault);
    }

    #[test]
    fn quoted_commas_do_not_shift_the_columns() {
        let h = table::XID_CSV_HEADER;
        let t = parse_xid_csv(&format!(
            "{h}\n45,X,\"a, b, c\",WORKFLOW_XID_45,x,application,GpuXidApplication\n\
             900,Y,\"q,\"\"r\"\"\",RESTART_APP,,application,\n901,Z,\"q\",IGNORE,,informational,\n"
        ))
        .unwrap();
        assert_eq!(t[0].class, XidClass::Application);
        assert_eq!(t[0].condition.as_deref(), Some("GpuXidApplication"));
        assert_eq!(t[1].immediate_action, "RESTART_APP");
        assert_eq!(t[1].condition, None);
        assert_eq!(t[2].class, XidClass::Informational);
    }

    #[test]
    fn a_bad_table_is_an_error_naming_its_line() {
        let h = table::XID_CSV_HEADER;
        for (text, needle) in [
            ("xid,m\n".to_owned(), "header"),
            (
                format!("{h}\n1,A,d,a,i,fault,\n1,B,d,a,i,fault,\n"),
                "line 3: xid 1 is not after",
            ),
            (format!("{h}\nx,A,d,a,i,fault,\n"), "line 2: xid \"x\""),
            (format!("{h}\n1,A,d,a,i,broken,\n"), "ark_class \"broken\""),
            (format!("{h}\n1,A,d,a,i,fault\n"), "6 fields"),
            (format!("{h}\n1,A,\"d,a,i,fault,\n"), "unterminated"),
            (format!("{h}\n1,A,d,a,i,fault,Gpu Hung\n"), "is not a name"),
        ] {
            let e = parse_xid_csv(&text).unwrap_err();
            assert!(e.contains(needle), "{e} (wanted {needle:?})");
        }
    }

    #[test]
    fn counters_are_monotonic_and_timestamps_move() {
        let mut s = XidState::default();
        let ev = XidEvent {
            gpu: 3,
            xid: Some(79),
        };
        s.record(&ev, 1_000);
        s.record(&ev, 5_000);
        s.record(&ev, 4_000); // out of order: the timestamp never goes back
        assert_eq!(s.count(3, "79"), 3);
        let fams = s.families();
        let ts = fams[1].get_metric()[0].get_gauge().get_value();
        assert!((ts - 5.0).abs() < 1e-9, "{ts}");
        s.record(&XidEvent { gpu: 0, xid: None }, 6_000);
        assert_eq!(s.count(0, "unknown"), 1);
    }

    #[test]
    fn series_are_capped() {
        let mut s = XidState::default();
        for x in 0..(MAX_XID_SERIES as u64 + 50) {
            s.record(
                &XidEvent {
                    gpu: 1,
                    xid: Some(x),
                },
                1,
            );
        }
        assert_eq!(s.entries.len(), MAX_XID_SERIES + 1);
        assert_eq!(s.count(1, "other"), 50);
    }
}
