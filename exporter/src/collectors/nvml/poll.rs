//! One polling cycle over every device: each device is sampled on its own worker thread, the
//! cycle waits for all answers up to the per-device timeout, and whatever did not answer in time
//! is reported down (`ark_gpu_up 0`, `GPU_LOST`) while the others are reported normally. A hung
//! NVML call therefore holds up only its own device, and the next cycle does not queue more work
//! behind it: a worker that is still busy is simply reported as not answering again.
//!
//! [`Poller::poll`] returns the events of the cycle and keeps the state [`Poller::families`]
//! encodes; the caller publishes and sends them. Tests drive it directly with a recorded source.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use prometheus::proto::{MetricFamily, MetricType};

use super::source::{DeviceSample, GpuError, GpuInfo, GpuProcess, GpuSource, THROTTLE_REASONS};
use super::{PodRef, PodResolver};
use crate::event::{Event, EventType};
use crate::metrics::family;

/// Limits and timeouts of a [`Poller`].
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// How long a cycle waits for a device before reporting it as not answering.
    pub device_timeout: Duration,
    /// Processes exported per GPU (largest memory first); the rest are counted only.
    pub max_processes_per_gpu: usize,
}

impl Default for PollSettings {
    fn default() -> Self {
        PollSettings {
            device_timeout: Duration::from_secs(2),
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
    pub up: bool,
    /// Why it is down (log reason), `None` while up.
    pub down_reason: Option<&'static str>,
    pub sample_seconds: Option<f64>,
    /// Last uncorrected ECC count seen, to emit `ECC_DBE` on increases only.
    last_uncorrected: Option<u64>,
    /// Has the device been seen at all (a device down from the start still gets `up 0`).
    seen: bool,
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
    Event {
        ts,
        event_type: t,
        entity_id: format!("gpu-{gpu}"),
        job_id: None,
        pid,
        value,
        node_id: None,
        pod: None,
        namespace: None,
    }
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
        })
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
        let deadline = Instant::now() + self.settings.device_timeout;
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
        let timeout_ms = self.settings.device_timeout.as_millis() as u64;
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
        let resolver = self.resolver.clone();
        let st = &mut self.devices[gpu as usize];
        st.sample_seconds = took.map(|d| d.as_secs_f64());
        let was_up = st.up;
        let seen_before = st.seen;
        st.seen = true;
        let mut s = match result {
            Ok(s) => s,
            Err(e) => {
                if was_up || !seen_before {
                    tracing::warn!(gpu, reason = e.reason(), error = %e,
                        "GPU not answering: ark_gpu_up 0, GPU_LOST sent to the causal graph");
                }
                st.up = false;
                st.down_reason = Some(e.reason());
                st.sample = None;
                st.processes.clear();
                st.processes_total = 0;
                // Re-sent every cycle while down, so the BlockedBy edge lives as long as the fault.
                events.push(ev(ts, EventType::ErrorHw, gpu, None, "GPU_LOST".to_owned()));
                return;
            }
        };
        if !was_up && seen_before {
            tracing::info!(gpu, "GPU answers again: ark_gpu_up 1");
            // Clears the GPU's BlockedBy edge: it was reset or came back by itself.
            events.push(ev(
                ts,
                EventType::ErrorHw,
                gpu,
                None,
                "recovered".to_owned(),
            ));
        }
        st.up = true;
        st.down_reason = None;
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
            // Every GPU process gets a compute.util event (the device's utilisation: NVML has
            // no cheap per-process figure) so that it Consumes the GPU even when its memory is
            // unknown.
            events.push(with_pod(ev(
                ts,
                EventType::ComputeUtil,
                gpu,
                Some(p.pid),
                util_pct.unwrap_or(0).to_string(),
            )));
            if let Some(m) = p.used_memory_bytes {
                events.push(with_pod(ev(
                    ts,
                    EventType::ComputeMem,
                    gpu,
                    Some(p.pid),
                    m.to_string(),
                )));
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

    /// The `nvml` snapshot: every per-GPU family except the XID ones.
    pub fn families(&self) -> Vec<MetricFamily> {
        families(&self.devices, &self.driver_version)
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

/// Builds the per-GPU families from device states (pure; the bench times this plus encoding).
pub fn families(devices: &[DeviceState], driver_version: &str) -> Vec<MetricFamily> {
    let mut info: Vec<Row> = Vec::new();
    let mut up: Vec<Row> = Vec::new();
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
        up.push((gpu_l(g), b(d.up)));
        if let Some(t) = d.sample_seconds {
            took.push((gpu_l(g), t));
        }
        let Some(s) = d.sample.as_ref().filter(|_| d.up) else {
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
        ("ark_gpu_up", "1 when the GPU answered NVML in the last poll, 0 when it is lost or hung.", GAUGE, up),
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
