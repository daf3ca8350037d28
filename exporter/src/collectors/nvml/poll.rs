//! One polling cycle over every device: each device is sampled on its own worker thread, the
//! cycle waits for all answers up to the per-device timeout, and whatever did not answer in time
//! is reported unobservable (`ark_gpu_observable 0`) while the others are reported normally. A
//! hung NVML call therefore holds up only its own device, and the next cycle does not queue more
//! work behind it: a worker that is still busy is simply reported as not answering again.
//!
//! Cannot observe ≠ broken (docs/nvml.md): `ark_gpu_up 0` and `GPU_LOST` only on evidence —
//! NVML's explicit "GPU is lost" ([`GpuError::Lost`]) or the GPU's PCI directory gone from sysfs
//! (`ark_gpu_pci_present 0`; the bus id is remembered from the first good answer and checked
//! every cycle). Timeouts and software failures (driver/library mismatch, permission, ...) only
//! clear `ark_gpu_observable`; `ark_gpu_up` then keeps its last evidence: absent after a good
//! answer, 0 after a loss (a lost GPU stays lost until it answers again).
//!
//! [`Poller::poll`] returns the events of the cycle and keeps the state [`Poller::families`]
//! encodes; the caller publishes and sends them. Tests drive it directly with a recorded source.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use prometheus::proto::{MetricFamily, MetricType};

use super::source::{DeviceSample, GpuError, GpuInfo, GpuProcess, GpuSource, THROTTLE_REASONS};
use super::{PodRef, PodResolver};
use crate::event::{Event, EventType};
use crate::gpu_map::{GpuMap, normalize_bdf};
use crate::metrics::family;

/// `reason` of a GPU whose PCI directory disappeared from sysfs.
pub const PCI_GONE: &str = "pci_gone";

/// Limits and timeouts of a [`Poller`].
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// How long a cycle waits for a device before reporting it as not answering.
    pub device_timeout: Duration,
    /// The same for the first cycle: without persistence mode the driver initialises each GPU
    /// on first use, which can take seconds.
    pub first_timeout: Duration,
    /// Consecutive timeouts before a silent device is logged as "still unobservable" (once).
    /// Timeouts no longer make a GPU lost: only NVML's "lost" answer or sysfs do.
    pub lost_after_timeouts: u32,
    /// Processes exported per GPU (largest memory first); the rest are counted only.
    pub max_processes_per_gpu: usize,
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            device_timeout: Duration::from_secs(2),
            first_timeout: Duration::from_secs(30),
            lost_after_timeouts: 3,
            max_processes_per_gpu: 128,
        }
    }
}

struct Answer {
    gpu: u32,
    cycle: u64,
    result: Result<DeviceSample, GpuError>,
    took: Duration,
}

struct Worker {
    req: SyncSender<u64>,
    busy: Arc<AtomicBool>,
}

/// A sampled process with its pod, if the resolver knew it.
#[derive(Debug, Clone)]
pub struct ProcessRow {
    pub process: GpuProcess,
    pub pod: PodRef,
}

/// What the collector knows about one device.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    /// Last known identity (kept while the device is down, so dashboards can still name it).
    pub info: Option<GpuInfo>,
    /// Last good sample while the device answers; `None` while it is down.
    pub sample: Option<DeviceSample>,
    /// Exported processes (capped), sorted by pid.
    pub processes: Vec<ProcessRow>,
    /// Processes seen before the cap.
    pub processes_total: usize,
    /// NVML answered the last poll (a sample, or "lost"): `ark_gpu_observable`.
    pub observable: bool,
    /// Evidence that the GPU is gone (NVML said lost, or its PCI directory is gone); cleared by
    /// the next good answer.
    pub lost: bool,
    /// Why it is unobservable or lost ([`GpuError::reason`] or [`PCI_GONE`]), `None` while up.
    pub down_reason: Option<&'static str>,
    /// Normalised PCI bus id from the first good answer (sysfs form).
    pub bus_id: Option<String>,
    /// Its directory in `<sysfs>/bus/pci/devices` exists; `None` when unknown (no bus id yet,
    /// no sysfs configured, or the directory listing itself unreadable).
    pub pci_present: Option<bool>,
    pub sample_seconds: Option<f64>,
    /// Last uncorrected ECC count seen, to emit `ECC_DBE` on increases only.
    last_uncorrected: Option<u64>,
    /// Consecutive cycles without an answer in time.
    timeouts: u32,
    /// Has the device been polled at all.
    seen: bool,
}

impl DeviceState {
    /// `ark_gpu_up`: `Some(false)` on evidence of loss, `Some(true)` while NVML answers, `None`
    /// (absent) while unobservable without evidence.
    pub fn up(&self) -> Option<bool> {
        if self.lost {
            Some(false)
        } else if self.observable {
            Some(true)
        } else {
            None
        }
    }
}

/// See the module docs.
pub struct Poller {
    source: Arc<dyn GpuSource>,
    settings: PollSettings,
    resolver: Option<PodResolver>,
    workers: Vec<Worker>,
    answers: Receiver<Answer>,
    devices: Vec<DeviceState>,
    driver_version: String,
    cycle: u64,
    /// sysfs root for the PCI presence check; `None`: not checked.
    sysfs: Option<PathBuf>,
    /// Filled with bus id → index from the first good answer of each GPU.
    gpu_map: Option<GpuMap>,
    /// `ark_nvml_errors_total{reason}`.
    errors: BTreeMap<&'static str, u64>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("devices", &self.devices.len())
            .field("cycle", &self.cycle)
            .finish_non_exhaustive()
    }
}

fn spawn_worker(
    source: Arc<dyn GpuSource>,
    gpu: u32,
    answers: Sender<Answer>,
) -> std::io::Result<Worker> {
    let (req, rx) = std::sync::mpsc::sync_channel::<u64>(1);
    let busy = Arc::new(AtomicBool::new(false));
    let flag = busy.clone();
    std::thread::Builder::new()
        .name(format!("ark-nvml-gpu{gpu}"))
        .spawn(move || {
            // Ends when the poller (the request sender) goes away.
            while let Ok(cycle) = rx.recv() {
                let t0 = Instant::now();
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| source.sample(gpu)))
                    .unwrap_or_else(|_| {
                        Err(GpuError::Call {
                            call: "sample",
                            detail: "the NVML binding panicked".to_owned(),
                        })
                    });
                let took = t0.elapsed();
                flag.store(false, Ordering::Release);
                if answers
                    .send(Answer {
                        gpu,
                        cycle,
                        result,
                        took,
                    })
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(Worker { req, busy })
}

fn ev(ts: i64, t: EventType, gpu: u32, pid: Option<u32>, value: String) -> Event {
    Event::new(ts, t, format!("gpu-{gpu}"), pid, value)
}

/// Is `bdf`'s directory in `<sysfs>/bus/pci/devices`? `None` when it cannot be told (no sysfs
/// root, or the device list itself unreadable: a missing `/sys` mount is no evidence about a GPU).
fn pci_present(sysfs: Option<&std::path::Path>, bdf: &str) -> Option<bool> {
    let devices = sysfs?.join("bus/pci/devices");
    std::fs::symlink_metadata(&devices)
        .ok()
        .filter(|m| m.is_dir())?;
    Some(std::fs::symlink_metadata(devices.join(bdf)).is_ok())
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl Poller {
    /// Starts one worker thread per device `0..devices`.
    pub fn new(
        source: Arc<dyn GpuSource>,
        devices: u32,
        settings: PollSettings,
        resolver: Option<PodResolver>,
    ) -> std::io::Result<Poller> {
        let (tx, answers) = std::sync::mpsc::channel();
        let workers = (0..devices)
            .map(|gpu| spawn_worker(source.clone(), gpu, tx.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Poller {
            driver_version: source.driver_version(),
            source,
            settings,
            resolver,
            workers,
            answers,
            devices: vec![DeviceState::default(); devices as usize],
            cycle: 0,
            sysfs: None,
            gpu_map: None,
            errors: BTreeMap::new(),
        })
    }

    /// Checks each GPU's `<sysfs>/bus/pci/devices/<bdf>` every cycle (`[host] sysfs`).
    pub fn with_sysfs(mut self, sysfs: impl Into<PathBuf>) -> Self {
        self.sysfs = Some(sysfs.into());
        self
    }

    /// Fills `map` with each GPU's bus id → index (the kernel log reads it).
    pub fn with_gpu_map(mut self, map: GpuMap) -> Self {
        self.gpu_map = Some(map);
        self
    }

    /// Starts `ark_nvml_errors_total` from counts seen before the poller existed (opening NVML).
    pub fn with_errors(mut self, errors: BTreeMap<&'static str, u64>) -> Self {
        self.errors = errors;
        self
    }

    /// NVML answered for at least one device in the last cycle: the collector works. `false`
    /// when every device timed out or failed for a software reason (`ark_collector_up 0`).
    pub fn any_observable(&self) -> bool {
        self.devices.iter().any(|d| d.observable)
    }

    pub fn devices(&self) -> &[DeviceState] {
        &self.devices
    }

    pub fn source(&self) -> &Arc<dyn GpuSource> {
        &self.source
    }

    /// One cycle; `now_ms` stamps the events. Returns the cycle's events.
    pub fn poll(&mut self, now_ms: i64) -> Vec<Event> {
        self.cycle += 1;
        let cycle = self.cycle;
        let mut asked = vec![false; self.workers.len()];
        let mut pending = 0usize;
        for (i, w) in self.workers.iter().enumerate() {
            // A worker still busy from an earlier cycle is stuck in NVML: do not queue behind it.
            if w.busy.swap(true, Ordering::AcqRel) {
                continue;
            }
            if w.req.try_send(cycle).is_ok() {
                asked[i] = true;
                pending += 1;
            } else {
                w.busy.store(false, Ordering::Release);
            }
        }
        let mut answers: Vec<Option<Answer>> = (0..self.workers.len()).map(|_| None).collect();
        let timeout = if cycle == 1 {
            self.settings
                .first_timeout
                .max(self.settings.device_timeout)
        } else {
            self.settings.device_timeout
        };
        let deadline = Instant::now() + timeout;
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(a) if a.cycle == cycle => {
                    let i = a.gpu as usize;
                    if asked.get(i) == Some(&true) && answers[i].is_none() {
                        pending -= 1;
                        answers[i] = Some(a);
                    }
                }
                // A late answer from an earlier cycle: superseded by this one.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let timeout_ms = timeout.as_millis() as u64;
        let mut events = Vec::new();
        for (i, a) in answers.into_iter().enumerate() {
            let gpu = i as u32;
            let (result, took) = match a {
                Some(a) => (a.result, Some(a.took)),
                None => (Err(GpuError::Timeout { gpu, timeout_ms }), None),
            };
            self.apply(gpu, result, took, now_ms, &mut events);
        }
        events
    }

    /// Folds one device's answer into its state and appends the events it implies.
    fn apply(
        &mut self,
        gpu: u32,
        result: Result<DeviceSample, GpuError>,
        took: Option<Duration>,
        ts: i64,
        events: &mut Vec<Event>,
    ) {
        let max_procs = self.settings.max_processes_per_gpu;
        let quiet_after = self.settings.lost_after_timeouts.max(1);
        let resolver = self.resolver.clone();
        if let Err(e) = &result {
            *self.errors.entry(e.reason()).or_insert(0) += 1;
        }
        // sysfs first: a GPU whose PCI directory is gone is lost whatever NVML says.
        let sysfs = self.sysfs.as_deref();
        let pci = self.devices[gpu as usize]
            .bus_id
            .as_deref()
            .and_then(|b| pci_present(sysfs, b));
        let result = match (pci, result) {
            (Some(false), r) => Err((r.is_ok() || matches!(r, Err(GpuError::Lost { .. })), None)),
            (_, Ok(s)) => Ok(s),
            (_, Err(e)) => Err((matches!(e, GpuError::Lost { .. }), Some(e))),
        };
        let st = &mut self.devices[gpu as usize];
        st.sample_seconds = took.map(|d| d.as_secs_f64());
        st.pci_present = pci;
        let was_lost = st.lost;
        let was_observable = st.observable;
        let seen_before = st.seen;
        st.seen = true;
        let mut s = match result {
            Ok(s) => s,
            Err((answered, e)) => {
                st.observable = answered;
                st.sample = None;
                st.processes.clear();
                st.processes_total = 0;
                let evidence = match &e {
                    None => Some(PCI_GONE),
                    Some(e @ GpuError::Lost { .. }) => Some(e.reason()),
                    Some(_) => None,
                };
                if let Some(reason) = evidence {
                    if !was_lost {
                        tracing::warn!(gpu, reason, error = ?e.as_ref().map(ToString::to_string),
                            "GPU lost: ark_gpu_up 0, GPU_LOST sent to the causal graph");
                    }
                    st.lost = true;
                    st.timeouts = 0;
                    st.down_reason = Some(reason);
                } else if let Some(e) = e {
                    // Cannot observe ≠ broken: no ark_gpu_up 0, no GPU_LOST; a GPU lost before
                    // stays lost (the evidence stands until a good answer).
                    st.timeouts = if matches!(e, GpuError::Timeout { .. }) {
                        st.timeouts.saturating_add(1)
                    } else {
                        0
                    };
                    if was_observable || !seen_before || st.timeouts == quiet_after {
                        tracing::warn!(gpu, reason = e.reason(), error = %e, timeouts = st.timeouts,
                            "GPU cannot be observed: ark_gpu_observable 0 (not a hardware fault: ark_gpu_up is not set to 0)");
                    }
                    if !st.lost {
                        st.down_reason = Some(e.reason());
                    }
                }
                // Re-sent every cycle while lost, so the BlockedBy edge lives as long as the fault.
                if st.lost {
                    events.push(ev(ts, EventType::ErrorHw, gpu, None, "GPU_LOST".to_owned()));
                }
                return;
            }
        };
        if was_lost {
            tracing::info!(gpu, "GPU answers again: ark_gpu_up 1");
            // Clears the GPU's BlockedBy edge: it was reset or came back by itself.
            events.push(ev(
                ts,
                EventType::ErrorHw,
                gpu,
                None,
                "recovered".to_owned(),
            ));
        } else if !was_observable && seen_before {
            tracing::info!(gpu, "GPU observable again");
        }
        st.observable = true;
        st.lost = false;
        st.down_reason = None;
        st.timeouts = 0;
        if st.bus_id.is_none() {
            st.bus_id = normalize_bdf(&s.info.pci_bus_id);
            if let (Some(b), Some(map)) = (&st.bus_id, &self.gpu_map) {
                map.insert(b, gpu);
            }
            st.pci_present = st.bus_id.as_deref().and_then(|b| pci_present(sysfs, b));
        }
        st.info = Some(s.info.clone());

        // Processes: largest memory first under the cap, then by pid for stable output.
        let mut procs = std::mem::take(&mut s.processes);
        st.processes_total = procs.len();
        procs.sort_by(|a, b| {
            b.used_memory_bytes
                .cmp(&a.used_memory_bytes)
                .then(a.pid.cmp(&b.pid))
        });
        procs.truncate(max_procs);
        procs.sort_by_key(|p| p.pid);
        st.processes = procs
            .into_iter()
            .map(|p| ProcessRow {
                pod: resolver.as_ref().and_then(|r| r(p.pid)).unwrap_or_default(),
                process: p,
            })
            .collect();

        // Events: utilisation/memory per GPU and per process (Consumes process → gpu), errors.
        let util_pct = s.utilization_ratio.map(|u| (u * 100.0).round() as i64);
        if let Some(u) = util_pct {
            events.push(ev(ts, EventType::ComputeUtil, gpu, None, u.to_string()));
        }
        if let Some(m) = s.memory_used_bytes {
            events.push(ev(ts, EventType::ComputeMem, gpu, None, m.to_string()));
        }
        for row in &st.processes {
            let p = &row.process;
            let with_pod = |mut e: Event| {
                e.pod = non_empty(&row.pod.pod);
                e.namespace = non_empty(&row.pod.namespace);
                e
            };
            // The GPU's utilisation stands in for the process's (NVML has no cheap per-process
            // figure). Unknown utilisation is left out rather than sent as 0, which would look
            // like a stalled job; the process still Consumes the GPU through compute.mem.
            if let Some(u) = util_pct {
                events.push(with_pod(ev(
                    ts,
                    EventType::ComputeUtil,
                    gpu,
                    Some(p.pid),
                    u.to_string(),
                )));
            }
            let mem = match (p.used_memory_bytes, util_pct) {
                (Some(m), _) => Some(m.to_string()),
                (None, None) => Some("unknown".to_owned()),
                (None, Some(_)) => None,
            };
            if let Some(m) = mem {
                events.push(with_pod(ev(ts, EventType::ComputeMem, gpu, Some(p.pid), m)));
            }
        }
        if let Some(ecc) = s.ecc {
            let prev = st.last_uncorrected.unwrap_or(0);
            if ecc.uncorrected > prev {
                tracing::warn!(
                    gpu,
                    uncorrected = ecc.uncorrected,
                    "Uncorrected (double-bit) ECC errors"
                );
                events.push(ev(
                    ts,
                    EventType::ErrorHw,
                    gpu,
                    None,
                    format!("ECC_DBE uncorrected={}", ecc.uncorrected),
                ));
            }
            st.last_uncorrected = Some(ecc.uncorrected);
        }
        if s.remapped_rows.is_some_and(|r| r.failed) {
            events.push(ev(
                ts,
                EventType::ErrorHw,
                gpu,
                None,
                "ECC row remap failure".to_owned(),
            ));
        }
        for &(link, up) in &s.nvlinks {
            if !up {
                events.push(ev(
                    ts,
                    EventType::TopoLinkDown,
                    gpu,
                    None,
                    format!("nvlink {link} down"),
                ));
            }
        }
        // Generation drops at idle to save power, so only a narrower link is a fault.
        if let (Some(cur), Some(max)) = (s.pcie.width_current, s.pcie.width_max)
            && cur < max
        {
            events.push(ev(
                ts,
                EventType::TopoLinkDown,
                gpu,
                None,
                format!("PCIe link width x{cur} of x{max}"),
            ));
        }
        st.sample = Some(s);
    }

    /// The `nvml` snapshot: every per-GPU family except the XID ones, and the error counter.
    pub fn families(&self) -> Vec<MetricFamily> {
        let mut f = families(&self.devices, &self.driver_version);
        f.push(errors_family(&self.errors));
        f
    }
}

type Row = (Vec<(&'static str, String)>, f64);

fn gpu_l(gpu: usize) -> Vec<(&'static str, String)> {
    vec![("gpu", gpu.to_string())]
}

fn with(gpu: usize, k: &'static str, v: impl Into<String>) -> Vec<(&'static str, String)> {
    vec![("gpu", gpu.to_string()), (k, v.into())]
}

fn b(x: bool) -> f64 {
    if x { 1.0 } else { 0.0 }
}

/// `ark_nvml_errors_total{reason}` (bounded: [`GpuError::reason`] values).
pub fn errors_family(errors: &BTreeMap<&'static str, u64>) -> MetricFamily {
    family(
        "ark_nvml_errors_total",
        "NVML failures by class (per device and cycle, and when opening NVML); only gpu_lost is about the hardware.",
        MetricType::COUNTER,
        errors
            .iter()
            .map(|(r, n)| (vec![("reason", (*r).to_owned())], *n as f64))
            .collect::<Vec<Row>>(),
    )
}

/// Builds the per-GPU families from device states (pure; the bench times this plus encoding).
pub fn families(devices: &[DeviceState], driver_version: &str) -> Vec<MetricFamily> {
    let mut info: Vec<Row> = Vec::new();
    let mut up: Vec<Row> = Vec::new();
    let mut observable: Vec<Row> = Vec::new();
    let mut pci: Vec<Row> = Vec::new();
    let mut util: Vec<Row> = Vec::new();
    let mut mem_used: Vec<Row> = Vec::new();
    let mut mem_total: Vec<Row> = Vec::new();
    let mut temp: Vec<Row> = Vec::new();
    let mut power: Vec<Row> = Vec::new();
    let mut throttle: Vec<Row> = Vec::new();
    let mut ecc: Vec<Row> = Vec::new();
    let mut remapped: Vec<Row> = Vec::new();
    let mut remaps: Vec<Row> = Vec::new();
    let mut retired: Vec<Row> = Vec::new();
    let mut retired_pending: Vec<Row> = Vec::new();
    let mut nvlink: Vec<Row> = Vec::new();
    let mut width: Vec<Row> = Vec::new();
    let mut generation: Vec<Row> = Vec::new();
    let mut proc_mem: Vec<Row> = Vec::new();
    let mut proc_count: Vec<Row> = Vec::new();
    let mut took: Vec<Row> = Vec::new();
    for (g, d) in devices.iter().enumerate() {
        if !d.seen {
            continue;
        }
        if let Some(i) = &d.info {
            info.push((
                vec![
                    ("gpu", g.to_string()),
                    ("uuid", i.uuid.clone()),
                    ("model", i.model.clone()),
                    ("pci_bus_id", i.pci_bus_id.clone()),
                    ("driver_version", driver_version.to_owned()),
                ],
                1.0,
            ));
        }
        if let Some(u) = d.up() {
            up.push((gpu_l(g), b(u)));
        }
        observable.push((gpu_l(g), b(d.observable)));
        if let Some(p) = d.pci_present {
            pci.push((gpu_l(g), b(p)));
        }
        if let Some(t) = d.sample_seconds {
            took.push((gpu_l(g), t));
        }
        let Some(s) = d.sample.as_ref().filter(|_| d.up() == Some(true)) else {
            continue;
        };
        let opt = |rows: &mut Vec<Row>, v: Option<f64>| {
            if let Some(v) = v {
                rows.push((gpu_l(g), v));
            }
        };
        opt(&mut util, s.utilization_ratio);
        opt(&mut mem_used, s.memory_used_bytes.map(|v| v as f64));
        opt(&mut mem_total, s.memory_total_bytes.map(|v| v as f64));
        opt(&mut temp, s.temperature_celsius);
        opt(&mut power, s.power_watts);
        opt(&mut proc_count, Some(d.processes_total as f64));
        if let Some(t) = s.throttle {
            for (bit, name) in THROTTLE_REASONS {
                if t.supported & bit != 0 {
                    throttle.push((with(g, "reason", name), b(t.active & bit != 0)));
                }
            }
        }
        if let Some(e) = s.ecc {
            ecc.push((with(g, "kind", "corrected"), e.corrected as f64));
            ecc.push((with(g, "kind", "uncorrected"), e.uncorrected as f64));
        }
        if let Some(r) = s.remapped_rows {
            remapped.push((with(g, "state", "pending"), b(r.pending)));
            remapped.push((with(g, "state", "failed"), b(r.failed)));
            remaps.push((with(g, "cause", "corrected"), r.corrected as f64));
            remaps.push((with(g, "cause", "uncorrected"), r.uncorrected as f64));
        }
        if let Some(r) = s.retired_pages {
            retired.push((with(g, "cause", "single_bit"), r.single_bit as f64));
            retired.push((with(g, "cause", "double_bit"), r.double_bit as f64));
            retired_pending.push((gpu_l(g), b(r.pending)));
        }
        for &(link, is_up) in &s.nvlinks {
            nvlink.push((with(g, "link", link.to_string()), b(is_up)));
        }
        let p = s.pcie;
        for (which, w, gen_) in [
            ("current", p.width_current, p.gen_current),
            ("max", p.width_max, p.gen_max),
        ] {
            if let Some(v) = w {
                width.push((with(g, "which", which), f64::from(v)));
            }
            if let Some(v) = gen_ {
                generation.push((with(g, "which", which), f64::from(v)));
            }
        }
        for row in &d.processes {
            if let Some(m) = row.process.used_memory_bytes {
                proc_mem.push((
                    vec![
                        ("gpu", g.to_string()),
                        ("pid", row.process.pid.to_string()),
                        ("pod", row.pod.pod.clone()),
                        ("namespace", row.pod.namespace.clone()),
                        ("container", row.pod.container.clone()),
                    ],
                    m as f64,
                ));
            }
        }
    }
    use MetricType::{COUNTER, GAUGE};
    [
        ("ark_gpu_info", "GPU identity (value 1; last known while the GPU is down).", GAUGE, info),
        ("ark_gpu_up", "1 when the GPU answered NVML, 0 only on evidence it is gone (NVML GPU_IS_LOST or its PCI device gone); absent while it cannot be observed.", GAUGE, up),
        ("ark_gpu_observable", "1 when NVML answered for the GPU in the last poll, 0 when it timed out or failed for a software reason (cannot observe is not broken).", GAUGE, observable),
        ("ark_gpu_pci_present", "1 while the GPU's PCI device directory exists in sysfs, 0 once it is gone (fallen off the bus).", GAUGE, pci),
        ("ark_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU.", GAUGE, util),
        ("ark_gpu_memory_used_bytes", "GPU memory in use.", GAUGE, mem_used),
        ("ark_gpu_memory_total_bytes", "GPU memory installed.", GAUGE, mem_total),
        ("ark_gpu_temperature_celsius", "GPU die temperature.", GAUGE, temp),
        ("ark_gpu_power_watts", "GPU board power draw.", GAUGE, power),
        ("ark_gpu_throttle_active", "1 while the clocks are reduced for this reason (every reason the GPU supports is listed).", GAUGE, throttle),
        ("ark_gpu_ecc_errors_total", "ECC errors since the driver loaded (volatile counters).", COUNTER, ecc),
        ("ark_gpu_remapped_rows", "Row remapping state: pending (waits for a GPU reset) and failed (no spare rows left), 0 or 1.", GAUGE, remapped),
        ("ark_gpu_row_remaps", "Memory rows remapped over the GPU's life, by the kind of error that caused it.", GAUGE, remaps),
        ("ark_gpu_retired_pages", "Memory pages retired over the GPU's life (GPUs before Ampere), by cause.", GAUGE, retired),
        ("ark_gpu_retired_pages_pending", "1 while a page retirement waits for the next driver reload.", GAUGE, retired_pending),
        ("ark_gpu_nvlink_up", "1 while the NVLink link is active.", GAUGE, nvlink),
        ("ark_gpu_pcie_link_width", "PCIe link width in lanes, current and maximum.", GAUGE, width),
        ("ark_gpu_pcie_link_generation", "PCIe link generation, current and maximum.", GAUGE, generation),
        ("ark_gpu_processes", "Processes with a context on the GPU (before the per-GPU cap).", GAUGE, proc_count),
        ("ark_gpu_process_memory_bytes", "GPU memory used by a process (pod labels empty when unknown).", GAUGE, proc_mem),
        ("ark_gpu_sample_duration_seconds", "Wall time of the last NVML sample of the GPU.", GAUGE, took),
    ]
    .into_iter()
    .map(|(name, help, kind, rows)| family(name, help, kind, rows))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::super::recorded::{Gate, RecordedSource, Step, golden, h100};
    use super::*;

    fn values(events: &[Event], gpu: u32, t: EventType) -> Vec<String> {
        let ent = format!("gpu-{gpu}");
        events
            .iter()
            .filter(|e| e.entity_id == ent && e.event_type == t)
            .map(|e| e.value.clone())
            .collect()
    }

    fn poller(src: RecordedSource, n: u32, settings: PollSettings) -> Poller {
        Poller::new(Arc::new(src), n, settings, None).unwrap()
    }

    fn rows(f: &[MetricFamily], name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        f.iter()
            .filter(|m| m.name() == name)
            .flat_map(|mf| {
                let counter = mf.get_field_type() == MetricType::COUNTER;
                mf.get_metric().iter().map(move |m| {
                    let labels = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_owned(), l.value().to_owned()))
                        .collect();
                    let v = if counter {
                        m.get_counter().get_value()
                    } else {
                        m.get_gauge().get_value()
                    };
                    (labels, v)
                })
            })
            .collect()
    }

    fn value(f: &[MetricFamily], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        rows(f, name)
            .into_iter()
            .find(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|(_, v)| v)
    }

    #[test]
    fn golden_cycles_report_faults_as_events_and_metrics() {
        let mut p = poller(golden(), 4, PollSettings::default());
        let ev1 = p.poll(1_000);
        // Double-bit ECC on gpu 1 (first sight of a non-zero volatile count).
        assert_eq!(
            values(&ev1, 1, EventType::ErrorHw),
            ["ECC_DBE uncorrected=2"]
        );
        // NVLink 2 down and the x8 link on gpu 2; the Gen3 link alone is not an event.
        assert_eq!(
            values(&ev1, 2, EventType::TopoLinkDown),
            ["nvlink 2 down", "PCIe link width x8 of x16"]
        );
        // Every GPU process Consumes its GPU (compute.util with its pid).
        for (gpu, pid) in [(0, 4242), (0, 4243), (1, 5151), (2, 6161), (3, 7171)] {
            assert!(
                ev1.iter().any(|e| e.pid == Some(pid)
                    && e.entity_id == format!("gpu-{gpu}")
                    && e.event_type == EventType::ComputeUtil),
                "pid {pid}"
            );
        }
        assert!(values(&ev1, 0, EventType::ErrorHw).is_empty());
        assert!(p.devices().iter().all(|d| d.up() == Some(true)));

        let ev2 = p.poll(2_000);
        // gpu 3 lost: GPU_LOST, no more utilisation from it; the ECC count did not grow.
        assert_eq!(values(&ev2, 3, EventType::ErrorHw), ["GPU_LOST"]);
        assert!(values(&ev2, 3, EventType::ComputeUtil).is_empty());
        assert!(values(&ev2, 1, EventType::ErrorHw).is_empty());
        let d3 = &p.devices()[3];
        assert_eq!(d3.up(), Some(false));
        assert!(d3.observable, "NVML answered: the GPU is lost");
        assert_eq!(d3.down_reason, Some("gpu_lost"));

        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "3")]), Some(0.0));
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), Some(1.0));
        // A lost GPU keeps its identity but no stale gauges.
        assert!(value(&f, "ark_gpu_info", &[("gpu", "3")]).is_some());
        assert_eq!(
            value(&f, "ark_gpu_utilization_ratio", &[("gpu", "3")]),
            None
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_ecc_errors_total",
                &[("gpu", "1"), ("kind", "uncorrected")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_remapped_rows",
                &[("gpu", "1"), ("state", "pending")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&f, "ark_gpu_nvlink_up", &[("gpu", "2"), ("link", "2")]),
            Some(0.0)
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_pcie_link_width",
                &[("gpu", "2"), ("which", "current")]
            ),
            Some(8.0)
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_throttle_active",
                &[("gpu", "2"), ("reason", "hw_thermal_slowdown")]
            ),
            Some(1.0)
        );
        // Supported but inactive reasons are exported as 0; unsupported ones not at all.
        assert_eq!(
            value(
                &f,
                "ark_gpu_throttle_active",
                &[("gpu", "0"), ("reason", "gpu_idle")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_throttle_active",
                &[("gpu", "0"), ("reason", "user_defined_clocks")]
            ),
            None
        );
    }

    #[test]
    fn a_hung_device_does_not_stall_the_others_and_recovers() {
        let src = RecordedSource::new(3);
        let gate = Gate::default();
        src.answer(0, h100(0, &[]));
        src.push(1, Step::Hang(gate.clone()));
        src.answer(1, h100(1, &[(77, 1 << 30)]));
        src.answer(2, h100(2, &[]));
        let settings = PollSettings {
            device_timeout: Duration::from_millis(100),
            first_timeout: Duration::from_millis(100),
            lost_after_timeouts: 3,
            ..PollSettings::default()
        };
        let mut p = poller(src, 3, settings);
        for cycle in 0..4 {
            let ev = p.poll(cycle);
            let up: Vec<Option<bool>> = p.devices().iter().map(DeviceState::up).collect();
            // Cannot observe ≠ broken: a hung GPU is unobservable, never up 0 nor GPU_LOST.
            assert_eq!(up, [Some(true), None, Some(true)], "cycle {cycle}");
            assert!(!p.devices()[1].observable);
            assert_eq!(p.devices()[1].down_reason, Some("timeout"));
            assert!(
                values(&ev, 1, EventType::ErrorHw).is_empty(),
                "cycle {cycle}"
            );
            let f = p.families();
            assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "1")]), None);
            assert_eq!(value(&f, "ark_gpu_observable", &[("gpu", "1")]), Some(0.0));
            assert_eq!(value(&f, "ark_gpu_observable", &[("gpu", "0")]), Some(1.0));
            assert!(p.any_observable());
            assert!(!values(&ev, 0, EventType::ComputeUtil).is_empty());
        }
        gate.release();
        // The stuck call returns (its answer is stale and dropped); the worker is asked again.
        let mut recovered = false;
        for cycle in 3..200 {
            let ev = p.poll(cycle);
            if p.devices()[1].observable {
                // It was never lost, so there is no BlockedBy edge to clear.
                assert!(values(&ev, 1, EventType::ErrorHw).is_empty());
                assert_eq!(p.devices()[1].up(), Some(true));
                recovered = true;
                break;
            }
        }
        assert!(recovered, "gpu 1 never came back after its call returned");
    }

    #[test]
    fn processes_are_capped_by_memory_and_attributed_to_pods() {
        let src = RecordedSource::new(1);
        let procs: Vec<(u32, u64)> = (0..10).map(|i| (1000 + i, u64::from(i) << 20)).collect();
        src.answer(0, h100(0, &procs));
        let resolver: PodResolver = Arc::new(|pid| {
            (pid % 2 == 0).then(|| PodRef {
                pod: format!("trainer-{pid}"),
                namespace: "ml".to_owned(),
                container: "main".to_owned(),
            })
        });
        let settings = PollSettings {
            max_processes_per_gpu: 4,
            ..PollSettings::default()
        };
        let mut p = Poller::new(Arc::new(src), 1, settings, Some(resolver)).unwrap();
        let ev = p.poll(1);
        let f = p.families();
        let pids: Vec<String> = rows(&f, "ark_gpu_process_memory_bytes")
            .into_iter()
            .map(|(l, _)| l.iter().find(|(k, _)| k == "pid").unwrap().1.clone())
            .collect();
        // The four largest, in pid order.
        assert_eq!(pids, ["1006", "1007", "1008", "1009"]);
        assert_eq!(value(&f, "ark_gpu_processes", &[("gpu", "0")]), Some(10.0));
        assert_eq!(
            value(
                &f,
                "ark_gpu_process_memory_bytes",
                &[
                    ("pid", "1008"),
                    ("pod", "trainer-1008"),
                    ("namespace", "ml"),
                    ("container", "main")
                ]
            ),
            Some(f64::from(8u32 << 20))
        );
        assert_eq!(
            value(
                &f,
                "ark_gpu_process_memory_bytes",
                &[("pid", "1007"), ("pod", "")]
            ),
            Some(f64::from(7u32 << 20))
        );
        let e = ev
            .iter()
            .find(|e| e.pid == Some(1008) && e.event_type == EventType::ComputeMem)
            .unwrap();
        assert_eq!(e.pod.as_deref(), Some("trainer-1008"));
        assert_eq!(e.namespace.as_deref(), Some("ml"));
        assert!(
            !ev.iter().any(|e| e.pid == Some(1000)),
            "capped pid leaked into events"
        );
    }

    #[test]
    fn unknown_utilisation_is_not_sent_as_zero_but_the_process_still_consumes_the_gpu() {
        // E.g. a MIG-enabled GPU: no device utilisation, no per-process memory.
        let src = RecordedSource::new(1);
        let mut s = h100(0, &[(900, 0)]);
        s.utilization_ratio = None;
        s.processes[0].used_memory_bytes = None;
        src.answer(0, s);
        let mut p = poller(src, 1, PollSettings::default());
        let ev = p.poll(1);
        let of_pid: Vec<(EventType, String)> = ev
            .iter()
            .filter(|e| e.pid == Some(900))
            .map(|e| (e.event_type, e.value.clone()))
            .collect();
        assert_eq!(of_pid, [(EventType::ComputeMem, "unknown".to_owned())]);
        assert!(values(&ev, 0, EventType::ComputeUtil).is_empty());
        let f = p.families();
        assert_eq!(
            value(&f, "ark_gpu_utilization_ratio", &[("gpu", "0")]),
            None
        );
        assert!(rows(&f, "ark_gpu_process_memory_bytes").is_empty());
        assert_eq!(value(&f, "ark_gpu_processes", &[("gpu", "0")]), Some(1.0));
    }

    #[test]
    fn a_device_down_from_the_start_is_reported_and_a_panicking_source_is_contained() {
        struct Panics;
        impl GpuSource for Panics {
            fn driver_version(&self) -> String {
                String::new()
            }
            fn device_count(&self) -> Result<u32, GpuError> {
                Ok(1)
            }
            fn sample(&self, _: u32) -> Result<DeviceSample, GpuError> {
                panic!("binding bug")
            }
            fn watch_xids(
                &self,
                _: u32,
                _: &AtomicBool,
                _: Duration,
                _: &mut dyn FnMut(super::super::XidEvent),
            ) -> Result<(), GpuError> {
                Ok(())
            }
        }
        let mut p = Poller::new(Arc::new(Panics), 1, PollSettings::default(), None).unwrap();
        let ev = p.poll(1);
        // A binding bug is ours, not the GPU's: unobservable, no GPU_LOST, no up 0.
        assert!(values(&ev, 0, EventType::ErrorHw).is_empty());
        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), None);
        assert_eq!(value(&f, "ark_gpu_observable", &[("gpu", "0")]), Some(0.0));
        assert!(!p.any_observable());
        assert!(
            rows(&f, "ark_gpu_info").is_empty(),
            "no identity was ever read"
        );
        // The worker survived the panic and is asked again.
        p.poll(2);
        let f = p.families();
        assert_eq!(
            value(&f, "ark_nvml_errors_total", &[("reason", "call_failed")]),
            Some(2.0)
        );
    }

    /// Every software-side failure class: unobservable, counted by reason, never up 0 or
    /// GPU_LOST; the collector is down only while no GPU answers.
    #[test]
    fn software_failures_make_a_gpu_unobservable_never_down() {
        use super::super::source::Cause;
        let causes = [
            Cause::DriverMismatch,
            Cause::NoPermission,
            Cause::NotSupported,
            Cause::Uninitialized,
            Cause::DriverNotLoaded,
            Cause::FunctionNotFound,
            Cause::Other,
        ];
        for cause in causes {
            let src = RecordedSource::new(2);
            src.answer(0, h100(0, &[]));
            src.answer(1, h100(1, &[(77, 1 << 30)]));
            src.fail(
                1,
                GpuError::Unobservable {
                    gpu: 1,
                    cause,
                    detail: "stub".to_owned(),
                },
            );
            let mut p = poller(src, 2, PollSettings::default());
            p.poll(1);
            for cycle in 2..5 {
                let ev = p.poll(cycle);
                assert!(values(&ev, 1, EventType::ErrorHw).is_empty(), "{cause:?}");
                // No utilisation or process events from what cannot be read.
                assert!(
                    values(&ev, 1, EventType::ComputeUtil).is_empty(),
                    "{cause:?}"
                );
            }
            let f = p.families();
            assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "1")]), None, "{cause:?}");
            assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), Some(1.0));
            assert_eq!(value(&f, "ark_gpu_observable", &[("gpu", "1")]), Some(0.0));
            assert_eq!(
                value(&f, "ark_nvml_errors_total", &[("reason", cause.label())]),
                Some(3.0),
                "{cause:?}"
            );
            // Identity stays, stale gauges go.
            assert!(value(&f, "ark_gpu_info", &[("gpu", "1")]).is_some());
            assert_eq!(
                value(&f, "ark_gpu_utilization_ratio", &[("gpu", "1")]),
                None
            );
            assert!(p.any_observable(), "gpu 0 still answers");
        }
        // NVML failing for every GPU: the collector's failure (collector_up 0 in the runner).
        let src = RecordedSource::new(1);
        src.fail(
            0,
            GpuError::Unobservable {
                gpu: 0,
                cause: Cause::DriverMismatch,
                detail: "Driver/library version mismatch".to_owned(),
            },
        );
        let mut p = poller(src, 1, PollSettings::default());
        p.poll(1);
        assert!(!p.any_observable());
        assert_eq!(value(&p.families(), "ark_gpu_up", &[("gpu", "0")]), None);
    }

    /// A lost GPU stays lost (up 0, GPU_LOST every cycle) while it is unobservable afterwards,
    /// and a good answer clears it with `recovered`.
    #[test]
    fn evidence_of_loss_stands_until_a_good_answer() {
        let src = RecordedSource::new(1);
        src.fail(
            0,
            GpuError::Lost {
                gpu: 0,
                detail: "GPU is lost".to_owned(),
            },
        );
        src.fail(
            0,
            GpuError::Timeout {
                gpu: 0,
                timeout_ms: 1,
            },
        );
        src.answer(0, h100(0, &[]));
        let mut p = poller(src, 1, PollSettings::default());
        let ev = p.poll(1);
        assert_eq!(values(&ev, 0, EventType::ErrorHw), ["GPU_LOST"]);
        assert_eq!(p.devices()[0].up(), Some(false));
        assert!(
            p.any_observable(),
            "NVML answered \"lost\": the collector works"
        );
        let ev = p.poll(2);
        assert_eq!(values(&ev, 0, EventType::ErrorHw), ["GPU_LOST"]);
        assert_eq!(
            value(&p.families(), "ark_gpu_up", &[("gpu", "0")]),
            Some(0.0)
        );
        assert_eq!(
            value(&p.families(), "ark_gpu_observable", &[("gpu", "0")]),
            Some(0.0)
        );
        let ev = p.poll(3);
        assert_eq!(values(&ev, 0, EventType::ErrorHw), ["recovered"]);
        assert_eq!(
            value(&p.families(), "ark_gpu_up", &[("gpu", "0")]),
            Some(1.0)
        );
    }

    /// The PCI directory gone from sysfs is evidence (up 0, pci_present 0, GPU_LOST) whatever
    /// NVML answers; no sysfs at all is no evidence. The bus id → index map is filled.
    #[test]
    fn a_gpu_gone_from_sysfs_is_lost_and_a_missing_sysfs_is_not_evidence() {
        let d = tempfile::tempdir().unwrap();
        let devs = d.path().join("bus/pci/devices");
        std::fs::create_dir_all(devs.join("0000:18:00.0")).unwrap();
        std::fs::create_dir_all(devs.join("0000:28:00.0")).unwrap();
        let src = RecordedSource::new(2);
        src.answer(0, h100(0, &[]));
        src.answer(1, h100(1, &[]));
        src.fail(
            1,
            GpuError::Timeout {
                gpu: 1,
                timeout_ms: 1,
            },
        );
        let map = GpuMap::default();
        let mut p = poller(src, 2, PollSettings::default())
            .with_sysfs(d.path())
            .with_gpu_map(map.clone());
        p.poll(1);
        assert_eq!(map.index("00000000:28:00.0"), Some(1));
        assert_eq!(map.index("0000:18:00.0"), Some(0));
        assert_eq!(
            value(&p.families(), "ark_gpu_pci_present", &[("gpu", "1")]),
            Some(1.0)
        );
        // Timing out with its PCI device present: unobservable only.
        p.poll(2);
        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_pci_present", &[("gpu", "1")]), Some(1.0));
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "1")]), None);
        std::fs::remove_dir(devs.join("0000:28:00.0")).unwrap();
        let ev = p.poll(3);
        assert_eq!(values(&ev, 1, EventType::ErrorHw), ["GPU_LOST"]);
        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "1")]), Some(0.0));
        assert_eq!(value(&f, "ark_gpu_pci_present", &[("gpu", "1")]), Some(0.0));
        assert_eq!(p.devices()[1].down_reason, Some(PCI_GONE));
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), Some(1.0));
        // sysfs unmounted: nothing is known, nothing is lost.
        std::fs::remove_dir_all(d.path().join("bus")).unwrap();
        p.poll(4);
        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), Some(1.0));
        assert_eq!(value(&f, "ark_gpu_pci_present", &[("gpu", "0")]), None);
    }
}
