//! What the kernel log has said so far: counters, last-XID times and the events for the
//! pipeline. Fed one raw line at a time by the reader ([`super::follow`]); pure apart from the
//! small sysfs/procfs look-ups of [`Lookup`] (bus id → GPU index, PCI class), which are cached.
//!
//! Restart semantics: a kmsg record (`/dev/kmsg`, or a kmsg dump) older than the exporter's
//! start (boot time + the record's microseconds) is *backlog*: it is not counted and sends no
//! event, but the most recent fatal XID per GPU in it is published in
//! `ark_gpu_last_xid_timestamp_seconds` with its true time (and its counter at 0), so "an XID
//! in the last 10 minutes" still holds after a restart and nothing is counted twice. Lines of
//! the other formats are a replayed file: all of them count.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use prometheus::proto::{MetricFamily, MetricType};

use super::parse::{Class, Classifier, Format, KernelEvent, LineError, Stamp, parse_line};
use crate::collectors::nvml::xid::{self, XidClass};
use crate::event::{Event, EventType};
use crate::gpu_map::GpuMap;
use crate::metrics::family;

/// `result` values of `ark_kmsg_lines_total`.
pub const RESULTS: [&str; 4] = ["recognized", "ignored", "malformed", "oversized"];
/// `kind` values of `ark_kernel_events_total`.
pub const KINDS: [&str; 6] = [
    "oom_kill",
    "hung_task",
    "soft_lockup",
    "mce",
    "segfault",
    "link_down",
];
/// A "fallen off the bus" message within this of an Xid 79 line for the same GPU is the same
/// fault.
pub const FELL_OFF_WINDOW_MS: i64 = 10_000;
/// Most cached look-ups.
const MAX_CACHE: usize = 256;

/// Bus id → `gpu` label and → PCI class, from the shared [`GpuMap`], procfs and sysfs.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub gpus: GpuMap,
    pub procfs: PathBuf,
    pub sysfs: PathBuf,
    /// `Device Minor` per bus id (`None`: the driver does not know it).
    minors: HashMap<String, Option<u32>>,
    classes: HashMap<String, &'static str>,
}

impl Lookup {
    pub fn new(gpus: GpuMap, procfs: &Path, sysfs: &Path) -> Self {
        Lookup {
            gpus,
            procfs: procfs.to_owned(),
            sysfs: sysfs.to_owned(),
            minors: HashMap::new(),
            classes: HashMap::new(),
        }
    }

    /// NVML's index, else the driver's `Device Minor`, else the bus id itself.
    pub fn gpu_label(&mut self, bdf: &str) -> String {
        if let Some(i) = self.gpus.index(bdf) {
            return i.to_string();
        }
        if let Some(m) = self.minors.get(bdf) {
            return m.map_or_else(|| bdf.to_owned(), |i| i.to_string());
        }
        let info = self
            .procfs
            .join("driver/nvidia/gpus")
            .join(bdf)
            .join("information");
        let minor = std::fs::read_to_string(info).ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Device Minor:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
        if self.minors.len() < MAX_CACHE {
            self.minors.insert(bdf.to_owned(), minor);
        }
        minor.map_or_else(|| bdf.to_owned(), |i| i.to_string())
    }

    /// `gpu|nic|nvswitch|other` from `<sysfs>/bus/pci/devices/<bdf>/{class,vendor}`.
    pub fn pci_class(&mut self, bdf: &str) -> &'static str {
        if let Some(c) = self.classes.get(bdf) {
            return c;
        }
        let dir = self.sysfs.join("bus/pci/devices").join(bdf);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let class = read("class");
        let class = class.trim().trim_start_matches("0x");
        let c = match class.get(..4) {
            Some("0302" | "0300") => "gpu",
            Some("0207" | "0200") => "nic",
            Some("0680") if read("vendor").trim() == "0x10de" => "nvswitch",
            _ => "other",
        };
        if self.classes.len() < MAX_CACHE {
            self.classes.insert(bdf.to_owned(), c);
        }
        c
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct XidEntry {
    count: u64,
    last_ms: i64,
    /// Published from the backlog only (count 0).
    backlog: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct KmsgState {
    classifier: Classifier,
    lookup: Lookup,
    start_ms: i64,
    /// Boot time (Unix ms) for kmsg microseconds; `None` when `/proc/stat` had none.
    boot_ms: Option<i64>,
    max_series: usize,
    block_application_xids: bool,
    lines: [u64; 4],
    kinds: [u64; 6],
    xids: BTreeMap<(String, u32), XidEntry>,
    sxids: BTreeMap<(String, u32, &'static str), u64>,
    aer: BTreeMap<(String, &'static str, &'static str), u64>,
    recovery: BTreeMap<(String, &'static str), u64>,
    /// Last XID 79 per GPU: (time, synthesized from "fallen off the bus").
    last79: BTreeMap<String, (i64, bool)>,
    /// Records lost to ring-buffer overwrites (EPIPE).
    pub overwritten: u64,
    /// Series not created because of `max_series`.
    pub dropped: u64,
}

/// Unix ms of boot from `<procfs>/stat` (`btime`).
pub fn boot_ms(procfs: &Path) -> Option<i64> {
    let t = std::fs::read_to_string(procfs.join("stat")).ok()?;
    t.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|s| s * 1000)
}

impl KmsgState {
    pub fn new(
        lookup: Lookup,
        start_ms: i64,
        boot_ms: Option<i64>,
        max_series: usize,
        block_application_xids: bool,
    ) -> Self {
        KmsgState {
            classifier: Classifier::default(),
            lookup,
            start_ms,
            boot_ms,
            max_series,
            block_application_xids,
            lines: [0; 4],
            kinds: [0; 6],
            xids: BTreeMap::new(),
            sxids: BTreeMap::new(),
            aer: BTreeMap::new(),
            recovery: BTreeMap::new(),
            last79: BTreeMap::new(),
            overwritten: 0,
            dropped: 0,
        }
    }

    /// `ark_kmsg_lines_total{result}` by index of [`RESULTS`].
    pub fn lines(&self, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| self.lines[i])
    }

    fn series(&self) -> usize {
        self.xids.len() + self.sxids.len() + self.aer.len() + self.recovery.len()
    }

    /// Counts a line that could not be read whole (the reader's own oversize check).
    pub fn count_oversized(&mut self) {
        self.lines[3] += 1;
    }

    /// Handles one raw line or record; appends the pipeline events to `out`.
    pub fn handle(&mut self, raw: &[u8], now_ms: i64, out: &mut Vec<Event>) {
        let line = match parse_line(raw, now_ms) {
            Ok(l) => l,
            Err(LineError::Oversized) => return self.lines[3] += 1,
            Err(LineError::Malformed) => return self.lines[2] += 1,
            Err(LineError::Skip) => return self.lines[1] += 1,
        };
        if !line.is_kernel() {
            return self.lines[1] += 1;
        }
        let ts = match (line.stamp, line.format) {
            (Stamp::Wall(ms), _) => ms,
            (Stamp::Boot(us), Format::Kmsg) => self
                .boot_ms
                .map_or(now_ms, |b| b.saturating_add((us / 1000) as i64)),
            // `[ 1234.5]` of a saved file: the boot it counts from is unknown.
            (Stamp::Boot(_), _) => now_ms,
        };
        let backlog = line.format == Format::Kmsg && self.boot_ms.is_some() && ts < self.start_ms;
        let ev = match self.classifier.classify(line.message) {
            Class::Ignored => return self.lines[1] += 1,
            Class::Known => return self.lines[0] += 1,
            Class::Event(ev) => ev,
        };
        self.lines[0] += 1;
        if backlog {
            return self.backlog(ev, ts);
        }
        self.apply(ev, ts, out);
    }

    fn fatal(xid: u32, ev: &KernelEvent) -> bool {
        let nonfatal = matches!(
            ev,
            KernelEvent::Xid {
                severity: Some(super::parse::Severity::Nonfatal),
                ..
            }
        );
        !nonfatal && xid::class_of(Some(u64::from(xid))) == XidClass::Fault
    }

    /// The most recent fatal XID per GPU of the ring buffer: its time, counter 0.
    fn backlog(&mut self, ev: KernelEvent, ts: i64) {
        let KernelEvent::Xid { ref bdf, xid, .. } = ev else {
            return;
        };
        if !Self::fatal(xid, &ev) {
            return;
        }
        let gpu = self.lookup.gpu_label(bdf);
        self.xids
            .retain(|(g, _), e| !(e.backlog && e.count == 0 && *g == gpu));
        if let Some(e) = self.xids.get_mut(&(gpu.clone(), xid)) {
            e.last_ms = e.last_ms.max(ts);
        } else if self.series() < self.max_series {
            self.xids.insert(
                (gpu, xid),
                XidEntry {
                    count: 0,
                    last_ms: ts,
                    backlog: true,
                },
            );
        } else {
            self.dropped += 1;
        }
    }

    fn bump<K: Ord>(map: &mut BTreeMap<K, u64>, key: K, cap: bool, dropped: &mut u64) {
        match map.get_mut(&key) {
            Some(n) => *n += 1,
            None if cap => *dropped += 1,
            None => {
                map.insert(key, 1);
            }
        }
    }

    fn apply(&mut self, ev: KernelEvent, ts: i64, out: &mut Vec<Event>) {
        let full = self.series() >= self.max_series;
        let base = |event_type, entity_id: String, pid, value: String| {
            Event::new(ts, event_type, entity_id, pid, value)
        };
        if let Some(kind) = ev.kind() {
            let i = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
            self.kinds[i] += 1;
        }
        match ev {
            KernelEvent::Xid {
                ref bdf,
                xid,
                severity,
                recovery,
                fell_off,
            } => {
                let gpu = self.lookup.gpu_label(bdf);
                if xid == 79 {
                    let prev = self.last79.get(&gpu).copied();
                    let near = prev.is_some_and(|(t, _)| (ts - t).abs() <= FELL_OFF_WINDOW_MS);
                    // An Xid 79 line and a "fallen off the bus" message of one fault count once.
                    let dup = near && (fell_off || prev.is_some_and(|(_, f)| f));
                    if self.last79.len() < MAX_CACHE || prev.is_some() {
                        self.last79.insert(gpu.clone(), (ts, fell_off));
                    }
                    if dup {
                        return;
                    }
                }
                match self.xids.get_mut(&(gpu.clone(), xid)) {
                    Some(e) => {
                        e.count += 1;
                        e.last_ms = e.last_ms.max(ts);
                        e.backlog = false;
                    }
                    None if full => self.dropped += 1,
                    None => {
                        self.xids.insert(
                            (gpu.clone(), xid),
                            XidEntry {
                                count: 1,
                                last_ms: ts,
                                backlog: false,
                            },
                        );
                    }
                }
                if let Some(a) = recovery {
                    Self::bump(
                        &mut self.recovery,
                        (gpu.clone(), a.label()),
                        full,
                        &mut self.dropped,
                    );
                }
                let blocks = match severity {
                    Some(s) => s == super::parse::Severity::Fatal,
                    None => xid::blocks(Some(u64::from(xid)), self.block_application_xids),
                };
                if blocks {
                    let mut value = format!("XID_{xid}");
                    if let Some(s) = severity {
                        value.push_str(&format!(" severity={}", s.label()));
                    }
                    if fell_off {
                        value.push_str(" fallen off the bus");
                    }
                    out.push(base(EventType::ErrorHw, format!("gpu-{gpu}"), None, value));
                }
            }
            KernelEvent::Sxid {
                device,
                sxid,
                severity,
            } => Self::bump(
                &mut self.sxids,
                (device, sxid, severity.label()),
                full,
                &mut self.dropped,
            ),
            KernelEvent::Aer {
                reporter,
                device,
                severity,
            } => {
                let Some(dev) = device.or(reporter) else {
                    return;
                };
                let class = self.lookup.pci_class(&dev);
                Self::bump(
                    &mut self.aer,
                    (dev, severity.label(), class),
                    full,
                    &mut self.dropped,
                );
            }
            KernelEvent::OomKill { pid, comm } => out.push(base(
                EventType::ProcessState,
                format!("pid-{pid}"),
                Some(pid),
                format!("exited: OOM killed (out of memory) comm={comm}"),
            )),
            _ => {}
        }
    }

    /// Every family of the collector.
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut out = vec![
            family(
                "ark_kmsg_lines_total",
                "Kernel-log lines read, by what became of them.",
                MetricType::COUNTER,
                RESULTS
                    .iter()
                    .zip(self.lines)
                    .map(|(r, n)| (vec![("result", (*r).to_owned())], n as f64)),
            ),
            family(
                "ark_kernel_events_total",
                "Kernel messages of interest since the exporter started, by kind.",
                MetricType::COUNTER,
                KINDS
                    .iter()
                    .zip(self.kinds)
                    .map(|(k, n)| (vec![("kind", (*k).to_owned())], n as f64)),
            ),
            family(
                "ark_kmsg_records_overwritten_total",
                "Kernel-log records overwritten in the ring buffer before they were read.",
                MetricType::COUNTER,
                [(vec![], self.overwritten as f64)],
            ),
            family(
                "ark_kmsg_series_dropped_total",
                "Kernel-log faults not exported because the series cap was reached.",
                MetricType::COUNTER,
                [(vec![], self.dropped as f64)],
            ),
        ];
        let xl = |(g, x): &(String, u32)| {
            vec![
                ("gpu", g.clone()),
                ("xid", x.to_string()),
                ("source", "kmsg".to_owned()),
            ]
        };
        if !self.xids.is_empty() {
            out.push(family(
                "ark_gpu_xid_errors_total",
                "XID errors reported by the GPU driver, by GPU and XID.",
                MetricType::COUNTER,
                self.xids.iter().map(|(k, e)| (xl(k), e.count as f64)),
            ));
            out.push(family(
                "ark_gpu_last_xid_timestamp_seconds",
                "Unix time of the most recent XID, by GPU and XID.",
                MetricType::GAUGE,
                self.xids
                    .iter()
                    .map(|(k, e)| (xl(k), e.last_ms as f64 / 1000.0)),
            ));
        }
        if !self.sxids.is_empty() {
            out.push(family(
                "ark_nvswitch_sxid_errors_total",
                "NVSwitch SXid errors in the kernel log, by switch, SXid and severity.",
                MetricType::COUNTER,
                self.sxids.iter().map(|((d, x, s), n)| {
                    (
                        vec![
                            ("device", d.clone()),
                            ("sxid", x.to_string()),
                            ("severity", (*s).to_owned()),
                        ],
                        *n as f64,
                    )
                }),
            ));
        }
        if !self.aer.is_empty() {
            out.push(family(
                "ark_pcie_aer_errors_total",
                "PCIe AER errors in the kernel log, by affected device, severity and device class.",
                MetricType::COUNTER,
                self.aer.iter().map(|((d, s, c), n)| {
                    (
                        vec![
                            ("device", d.clone()),
                            ("severity", (*s).to_owned()),
                            ("class", (*c).to_owned()),
                        ],
                        *n as f64,
                    )
                }),
            ));
        }
        if !self.recovery.is_empty() {
            out.push(family(
                "ark_gpu_recovery_actions_total",
                "XID 154 recovery actions the driver asked for, by GPU and action.",
                MetricType::COUNTER,
                self.recovery.iter().map(|((g, a), n)| {
                    (
                        vec![("gpu", g.clone()), ("action", (*a).to_owned())],
                        *n as f64,
                    )
                }),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/kmsg")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn state(boot: Option<i64>, start: i64) -> KmsgState {
        let none = Path::new("/nonexistent-ark-test");
        KmsgState::new(
            Lookup::new(GpuMap::default(), none, none),
            start,
            boot,
            512,
            false,
        )
    }

    fn feed(s: &mut KmsgState, text: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        for l in text.split(|&b| b == b'\n') {
            if !l.is_empty() {
                s.handle(l, NOW, &mut out);
            }
        }
        out
    }

    /// value of the series of `name` whose labels include all of `want`.
    fn value(s: &KmsgState, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        let fams = s.families();
        let f = fams.iter().find(|f| f.name() == name)?;
        f.get_metric()
            .iter()
            .find(|m| {
                want.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .map(|m| {
                if name.ends_with("_total") {
                    m.get_counter().get_value()
                } else {
                    m.get_gauge().get_value()
                }
            })
    }

    fn xid(s: &KmsgState, gpu: &str, x: &str) -> Option<f64> {
        value(s, "ark_gpu_xid_errors_total", &[("gpu", gpu), ("xid", x)])
    }

    #[test]
    fn xid_lines_with_and_without_pci_prefix() {
        let mut s = state(None, 0);
        s.lookup.gpus.insert("0000:3b:00.0", 2);
        let ev = feed(&mut s, &fixture("xid.txt"));
        assert_eq!(xid(&s, "2", "79"), Some(1.0));
        assert_eq!(xid(&s, "0000:86:00.0", "48"), Some(1.0), "no PCI: prefix");
        assert_eq!(xid(&s, "2", "13"), Some(1.0));
        assert_eq!(xid(&s, "0000:af:00.0", "94"), Some(1.0), "caller= field");
        // Faults block (79, 48); application XIDs (13, 94) are counted only.
        let v: Vec<_> = ev
            .iter()
            .map(|e| (e.entity_id.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(v, [("gpu-2", "XID_79"), ("gpu-0000:86:00.0", "XID_48")]);
        assert!(ev.iter().all(|e| e.event_type == EventType::ErrorHw));
        assert_eq!(s.lines("recognized"), 6);
        assert_eq!(s.lines("ignored"), 2, "continuation lines");
    }

    #[test]
    fn fallen_off_the_bus_counts_as_79_once() {
        let mut s = state(None, 0);
        let ev = feed(&mut s, &fixture("fell_off_bus.txt"));
        assert_eq!(xid(&s, "0000:3b:00.0", "79"), Some(1.0), "one-line form");
        assert_eq!(xid(&s, "0000:5e:00.0", "79"), Some(1.0), "three-line form");
        assert_eq!(
            xid(&s, "0000:86:00.0", "79"),
            Some(1.0),
            "Xid 79 line + fallen off the bus = one fault"
        );
        assert_eq!(ev.len(), 3);
        let ts = value(
            &s,
            "ark_gpu_last_xid_timestamp_seconds",
            &[("gpu", "0000:3b:00.0")],
        );
        // Sun Feb 23 16:24:18 2025 UTC
        assert_eq!(ts, Some(1_740_327_858.0));
    }

    #[test]
    fn xid_154_recovery_actions() {
        let mut s = state(None, 0);
        let ev = feed(&mut s, &fixture("xid154.txt"));
        assert!(ev.is_empty(), "154 is informational: no BlockedBy");
        let a = |g: &str, act: &str| {
            value(
                &s,
                "ark_gpu_recovery_actions_total",
                &[("gpu", g), ("action", act)],
            )
        };
        assert_eq!(a("0000:3b:00.0", "gpu_reset"), Some(1.0));
        assert_eq!(a("0000:3b:00.0", "node_reboot"), Some(1.0));
        assert_eq!(a("0000:86:00.0", "drain_p2p"), Some(1.0));
        assert_eq!(a("0000:86:00.0", "drain_and_reset"), Some(1.0));
        assert_eq!(a("0000:86:00.0", "none"), Some(1.0));
        assert_eq!(xid(&s, "0000:86:00.0", "154"), Some(3.0));
        let ts = value(
            &s,
            "ark_gpu_last_xid_timestamp_seconds",
            &[("gpu", "0000:3b:00.0")],
        );
        assert_eq!(ts, Some(1_737_434_564.0), "ISO time, 2025-01-21T04:42:44Z");
    }

    #[test]
    fn nvlink5_severity_and_user_lines_ignored() {
        let mut s = state(None, 0);
        let ev = feed(&mut s, &fixture("nvlink5.txt"));
        assert_eq!(
            xid(&s, "0018:01:00.0", "149"),
            Some(1.0),
            "the python[991] line is not the kernel"
        );
        assert_eq!(xid(&s, "0018:01:00.0", "145"), Some(1.0));
        assert_eq!(xid(&s, "0018:01:00.0", "144"), Some(1.0));
        let v: Vec<_> = ev.iter().map(|e| e.value.as_str()).collect();
        assert_eq!(
            v,
            ["XID_149 severity=fatal"],
            "nonfatal NVLink XIDs do not block"
        );
        assert_eq!(s.lines("ignored"), 1);
        // Journal lines have no year: 2025 (the year of NOW) unless that is in the future.
        let ts = value(&s, "ark_gpu_last_xid_timestamp_seconds", &[("xid", "149")]).unwrap();
        assert!((1_759_000_000.0..1_767_225_600.0).contains(&ts), "{ts}");
    }

    #[test]
    fn nvswitch_sxids() {
        let mut s = state(None, 0);
        feed(&mut s, &fixture("sxid.txt"));
        let sx = |d: &str, x: &str, sev: &str| {
            value(
                &s,
                "ark_nvswitch_sxid_errors_total",
                &[("device", d), ("sxid", x), ("severity", sev)],
            )
        };
        assert_eq!(
            sx("0000:05:00.0", "12028", "nonfatal"),
            Some(1.0),
            "detail lines not counted"
        );
        assert_eq!(sx("0000:08:00.0", "24007", "fatal"), Some(1.0));
        assert_eq!(s.lines("recognized"), 4);
    }

    #[test]
    fn pcie_aer_once_per_error_with_the_affected_device() {
        let mut s = state(None, 0);
        feed(&mut s, &fixture("aer.txt"));
        let a = |d: &str, sev: &str| {
            value(
                &s,
                "ark_pcie_aer_errors_total",
                &[("device", d), ("severity", sev)],
            )
        };
        assert_eq!(
            a("0000:3b:00.0", "corrected"),
            Some(1.0),
            "received + Bus Error = one"
        );
        assert_eq!(a("0000:5e:00.0", "uncorrected_nonfatal"), Some(1.0));
        assert_eq!(a("0000:86:00.0", "uncorrected_fatal"), Some(1.0));
        assert_eq!(
            a("0000:00:07.0", "uncorrected_fatal"),
            Some(1.0),
            "no device: the reporter"
        );
        assert_eq!(
            a("0000:af:00.0", "corrected"),
            Some(1.0),
            "Bus Error line alone"
        );
        assert_eq!(
            value(&s, "ark_pcie_aer_errors_total", &[("class", "other")]),
            Some(1.0),
            "no sysfs here"
        );
    }

    #[test]
    fn pci_class_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let dev = |bdf: &str, class: &str, vendor: &str| {
            let d = dir.path().join("bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), class).unwrap();
            std::fs::write(d.join("vendor"), vendor).unwrap();
        };
        dev("0000:3b:00.0", "0x030200\n", "0x10de\n");
        dev("0000:5e:00.0", "0x020700\n", "0x15b3\n");
        dev("0000:05:00.0", "0x068000\n", "0x10de\n");
        dev("0000:06:00.0", "0x068000\n", "0x8086\n");
        let mut l = Lookup::new(GpuMap::default(), dir.path(), dir.path());
        assert_eq!(l.pci_class("0000:3b:00.0"), "gpu");
        assert_eq!(l.pci_class("0000:5e:00.0"), "nic");
        assert_eq!(l.pci_class("0000:05:00.0"), "nvswitch");
        assert_eq!(l.pci_class("0000:06:00.0"), "other");
        assert_eq!(l.pci_class("0000:07:00.0"), "other");
        let info = dir.path().join("driver/nvidia/gpus/0000:3b:00.0");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("information"), "Model: H100\nDevice Minor: 5\n").unwrap();
        assert_eq!(l.gpu_label("0000:3b:00.0"), "5", "procfs Device Minor");
        l.gpus.insert("0000:3b:00.0", 1);
        assert_eq!(l.gpu_label("0000:3b:00.0"), "1", "NVML first");
        assert_eq!(
            l.gpu_label("0000:99:00.0"),
            "0000:99:00.0",
            "else the bus id"
        );
    }

    #[test]
    fn kernel_events() {
        let mut s = state(None, 0);
        let ev = feed(&mut s, &fixture("kernel.txt"));
        let k = |kind: &str| value(&s, "ark_kernel_events_total", &[("kind", kind)]);
        assert_eq!(k("oom_kill"), Some(3.0));
        assert_eq!(k("hung_task"), Some(1.0));
        assert_eq!(k("soft_lockup"), Some(1.0));
        assert_eq!(k("mce"), Some(1.0), "one MCE dump");
        assert_eq!(k("segfault"), Some(1.0), "libnccl only, not bash");
        assert_eq!(k("link_down"), Some(3.0), "cable unplugged, mlx5 ib0, ib1");
        let exits: Vec<_> = ev
            .iter()
            .map(|e| (e.event_type, e.entity_id.as_str(), e.pid))
            .collect();
        assert_eq!(
            exits,
            [
                (EventType::ProcessState, "pid-1234", Some(1234)),
                (EventType::ProcessState, "pid-2345", Some(2345)),
                (EventType::ProcessState, "pid-3456", Some(3456)),
            ]
        );
        assert!(ev[0].value.starts_with("exited"), "the graph's exit state");
    }

    #[test]
    fn hostile_input_is_counted_never_a_panic() {
        let mut s = state(None, 0);
        feed(&mut s, &fixture("hostile.txt"));
        let total: u64 = RESULTS.iter().map(|r| s.lines(r)).sum();
        assert_eq!(total, 18);
        assert!(s.lines("malformed") >= 8, "{}", s.lines("malformed"));
        let mut out = Vec::new();
        s.handle(&vec![b'a'; 1 << 20], NOW, &mut out);
        assert_eq!(s.lines("oversized"), 1);
        // Every prefix of every fixture line, and bytes cut anywhere.
        for name in [
            "xid.txt",
            "aer.txt",
            "kernel.txt",
            "hostile.txt",
            "xid154.txt",
        ] {
            for l in fixture(name).split(|&b| b == b'\n') {
                for i in 0..l.len() {
                    s.handle(&l[..i], NOW, &mut out);
                    s.handle(&l[i..], NOW, &mut out);
                }
            }
        }
    }

    #[test]
    fn restart_backlog_publishes_the_last_fatal_xid_without_counting() {
        let boot = NOW - 3_600_000;
        let mut s = state(Some(boot), NOW - 60_000);
        let rec = |seq: u32, at_ms: i64, msg: &str| {
            format!("3,{seq},{},-;{msg}", (at_ms - boot) * 1000).into_bytes()
        };
        let mut out = Vec::new();
        let old = NOW - 600_000;
        for (i, t) in [(1, old - 10_000), (2, old)] {
            s.handle(
                &rec(i, t, "NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE"),
                NOW,
                &mut out,
            );
        }
        s.handle(
            &rec(3, old, "NVRM: Xid (PCI:0000:3b:00): 13, app"),
            NOW,
            &mut out,
        );
        s.handle(
            &rec(4, old, "Out of memory: Killed process 9 (x)"),
            NOW,
            &mut out,
        );
        assert!(out.is_empty(), "backlog sends nothing");
        assert_eq!(xid(&s, "0000:3b:00.0", "48"), Some(0.0));
        assert_eq!(xid(&s, "0000:3b:00.0", "13"), None, "not fatal");
        assert_eq!(
            value(&s, "ark_gpu_last_xid_timestamp_seconds", &[("xid", "48")]),
            Some(old as f64 / 1000.0)
        );
        assert_eq!(
            value(&s, "ark_kernel_events_total", &[("kind", "oom_kill")]),
            Some(0.0)
        );
        // A record after the start counts.
        s.handle(
            &rec(
                5,
                NOW - 1_000,
                "NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE",
            ),
            NOW,
            &mut out,
        );
        assert_eq!(xid(&s, "0000:3b:00.0", "48"), Some(1.0));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn series_are_capped() {
        let none = Path::new("/nonexistent-ark-test");
        let mut s = KmsgState::new(
            Lookup::new(GpuMap::default(), none, none),
            0,
            None,
            4,
            false,
        );
        let mut out = Vec::new();
        for x in 0..10 {
            let l = format!("4,1,2,-;nvidia-nvswitch0: SXid (PCI:0000:05:00.0): {x}, Fatal, y");
            s.handle(l.as_bytes(), NOW, &mut out);
        }
        assert_eq!(s.sxids.len(), 4);
        assert_eq!(s.dropped, 6);
    }
}
