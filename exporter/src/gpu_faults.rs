//! GPU fault counters derived from `error.hw` events of sources other than the NVML collector:
//! a probe that tails the kernel log for `NVRM: Xid` lines, a replayed incident, a fire drill.
//! They feed the same alerts as NVML's own counters (`ark_gpu_xid_errors_total`,
//! `ark_gpu_last_xid_timestamp_seconds`, `ark_gpu_ecc_errors_total{kind="uncorrected"}`), with
//! `source="events"` so they never collide with the NVML collector's series for the same GPU.
//!
//! Recognised values (case-insensitive): `XID_<n>`, `XID <n>`, `Xid: <n>` → an XID; `ECC_DBE`,
//! anything with `ECC` and `DBE`/`double`/`uncorrect` → an uncorrectable ECC error. Entities must
//! be `gpu-<index>`. Series are capped at [`MAX_SERIES`]; what is beyond is counted as dropped.

use std::collections::BTreeMap;

use prometheus::proto::{MetricFamily, MetricType};

use crate::event::{Event, EventType};
use crate::metrics::family;

/// Most (gpu, xid) plus (gpu) series kept.
pub const MAX_SERIES: usize = 512;

/// See the module docs.
#[derive(Debug, Default)]
pub struct GpuFaults {
    xids: BTreeMap<(u32, u32), (u64, i64)>,
    ecc: BTreeMap<u32, u64>,
    dropped: u64,
}

/// What an `error.hw` value says about a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuFault {
    Xid(u32),
    EccUncorrected,
}

/// Parses a fault out of an event value; `None` for anything else.
pub fn parse_fault(value: &str) -> Option<GpuFault> {
    let v = value.trim();
    let upper = v.to_ascii_uppercase();
    if let Some(rest) = upper.strip_prefix("XID") {
        let digits: String = rest
            .trim_start_matches([' ', '_', ':', '='])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        return digits.parse().ok().map(GpuFault::Xid);
    }
    let ecc = upper.contains("ECC")
        && (upper.contains("DBE") || upper.contains("DOUBLE") || upper.contains("UNCORRECT"));
    ecc.then_some(GpuFault::EccUncorrected)
}

fn gpu_index(entity: &str) -> Option<u32> {
    entity.strip_prefix("gpu-")?.parse().ok()
}

impl GpuFaults {
    /// Counts the event if it is a GPU fault; true when something changed. Any event naming a
    /// GPU starts its ECC counter at 0, so that the first fault is an increase (`increase()`
    /// sees nothing in a series that appears already at 1).
    pub fn observe(&mut self, ev: &Event) -> bool {
        let Some(gpu) = gpu_index(&ev.entity_id) else {
            return false;
        };
        let full = self.xids.len() + self.ecc.len() >= MAX_SERIES;
        let mut changed = false;
        if !full && !self.ecc.contains_key(&gpu) {
            self.ecc.insert(gpu, 0);
            changed = true;
        }
        if ev.event_type != EventType::ErrorHw {
            return changed;
        }
        let Some(fault) = parse_fault(&ev.value) else {
            return changed;
        };
        match fault {
            GpuFault::Xid(xid) => match self.xids.get_mut(&(gpu, xid)) {
                Some((n, ts)) => {
                    *n += 1;
                    *ts = (*ts).max(ev.ts);
                }
                None if full => self.dropped += 1,
                None => {
                    self.xids.insert((gpu, xid), (1, ev.ts));
                }
            },
            GpuFault::EccUncorrected => match self.ecc.get_mut(&gpu) {
                Some(n) => *n += 1,
                None => self.dropped += 1,
            },
        }
        true
    }

    /// Faults that did not fit under [`MAX_SERIES`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn families(&self) -> Vec<MetricFamily> {
        let lbl = |gpu: u32, extra: Option<(&'static str, String)>| {
            let mut l = vec![("gpu", gpu.to_string()), ("source", "events".to_owned())];
            l.extend(extra);
            l
        };
        let mut out = Vec::new();
        if !self.xids.is_empty() {
            out.push(family(
                "ark_gpu_xid_errors_total",
                "XID errors reported by the GPU driver, by GPU and XID.",
                MetricType::COUNTER,
                self.xids
                    .iter()
                    .map(|(&(g, x), &(n, _))| (lbl(g, Some(("xid", x.to_string()))), n as f64)),
            ));
            out.push(family(
                "ark_gpu_last_xid_timestamp_seconds",
                "Unix time of the most recent XID, by GPU and XID.",
                MetricType::GAUGE,
                self.xids.iter().map(|(&(g, x), &(_, ts))| {
                    (lbl(g, Some(("xid", x.to_string()))), ts as f64 / 1000.0)
                }),
            ));
        }
        if !self.ecc.is_empty() {
            out.push(family(
                "ark_gpu_ecc_errors_total",
                "ECC errors since the driver loaded (volatile counters).",
                MetricType::COUNTER,
                self.ecc
                    .iter()
                    .map(|(&g, &n)| (lbl(g, Some(("kind", "uncorrected".to_owned()))), n as f64)),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(entity: &str, value: &str, ts: i64) -> Event {
        Event {
            ts,
            event_type: EventType::ErrorHw,
            entity_id: entity.into(),
            job_id: None,
            pid: None,
            value: value.into(),
            node_id: None,
            pod: None,
            namespace: None,
        }
    }

    #[test]
    fn recognises_xid_and_ecc_spellings() {
        for v in ["XID_79", "xid 79", "Xid: 79, pid=1234", "XID=79"] {
            assert_eq!(parse_fault(v), Some(GpuFault::Xid(79)), "{v}");
        }
        for v in ["ECC_DBE", "ecc double-bit error", "Uncorrectable ECC error"] {
            assert_eq!(parse_fault(v), Some(GpuFault::EccUncorrected), "{v}");
        }
        for v in [
            "",
            "XID",
            "XID_",
            "xid_abc",
            "ECC corrected",
            "GPU_LOST",
            "XID_99999999999",
        ] {
            assert_eq!(parse_fault(v), None, "{v}");
        }
    }

    #[test]
    fn counts_per_gpu_and_xid_and_keeps_the_newest_time() {
        let mut f = GpuFaults::default();
        assert!(f.observe(&ev("gpu-3", "XID_79", 2_000)));
        assert!(
            f.observe(&ev("gpu-3", "XID_79", 1_000)),
            "out of order still counts"
        );
        assert!(f.observe(&ev("gpu-0", "ECC_DBE", 3_000)));
        assert!(!f.observe(&ev("nvme0n1", "XID_79", 1)), "not a GPU");
        let mut not_error = ev("gpu-1", "XID_79", 1);
        not_error.event_type = EventType::ComputeUtil;
        assert!(
            f.observe(&not_error),
            "a GPU seen for the first time starts at 0"
        );
        assert!(!f.observe(&not_error), "and only once");
        let fams = f.families();
        let xid = &fams[0].get_metric()[0];
        assert_eq!(xid.get_counter().get_value(), 2.0);
        assert_eq!(fams[1].get_metric()[0].get_gauge().get_value(), 2.0);
        let ecc: Vec<f64> = fams[2]
            .get_metric()
            .iter()
            .map(|m| m.get_counter().get_value())
            .collect();
        assert_eq!(ecc, [1.0, 0.0, 0.0], "gpu-0 had one, gpu-1 and gpu-3 none");
    }

    #[test]
    fn series_are_capped() {
        let mut f = GpuFaults::default();
        for x in 0..(MAX_SERIES as u32 + 10) {
            f.observe(&ev("gpu-0", &format!("XID_{x}"), 1));
        }
        assert_eq!(f.xids.len() + f.ecc.len(), MAX_SERIES);
        assert_eq!(f.dropped(), 11);
    }
}
