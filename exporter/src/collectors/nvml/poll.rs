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
    /// The same for the first cycle: without persistence mode the driver initialises each GPU
    /// on first use, which can take seconds.
    pub first_timeout: Duration,
    /// Consecutive timeouts before a silent device is also sent to the graph as `GPU_LOST`
    /// (`ark_gpu_up` is 0 from the first one). An explicit "lost" answer is sent at once.
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
    pub up: bool,
    /// Why it is down (log reason), `None` while up.
    pub down_reason: Option<&'static str>,
    pub sample_seconds: Option<f64>,
    /// Last uncorrected ECC count seen, to emit `ECC_DBE` on increases only.
    last_uncorrected: Option<u64>,
    /// Consecutive cycles without an answer in time.
    timeouts: u32,
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
        let lost_after = self.settings.lost_after_timeouts.max(1);
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
                st.timeouts = if matches!(e, GpuError::Timeout { .. }) {
                    st.timeouts.saturating_add(1)
                } else {
                    0
                };
                // A slow answer is not yet a lost GPU for the graph (its consumers would all be
                // marked blocked); a device that stays silent, or says it is lost, is.
                // Re-sent every cycle while down, so the BlockedBy edge lives as long as the fault.
                if st.timeouts == 0 || st.timeouts >= lost_after {
                    events.push(ev(ts, EventType::ErrorHw, gpu, None, "GPU_LOST".to_owned()));
                }
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
        st.timeouts = 0;
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
        assert!(p.devices().iter().all(|d| d.up));

        let ev2 = p.poll(2_000);
        // gpu 3 lost: GPU_LOST, no more utilisation from it; the ECC count did not grow.
        assert_eq!(values(&ev2, 3, EventType::ErrorHw), ["GPU_LOST"]);
        assert!(values(&ev2, 3, EventType::ComputeUtil).is_empty());
        assert!(values(&ev2, 1, EventType::ErrorHw).is_empty());
        let d3 = &p.devices()[3];
        assert!(!d3.up);
        assert_eq!(d3.down_reason, Some("lost"));

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
            let up: Vec<bool> = p.devices().iter().map(|d| d.up).collect();
            assert_eq!(up, [true, false, true], "cycle {cycle}");
            assert_eq!(p.devices()[1].down_reason, Some("timeout"));
            // Down on /metrics at once; GPU_LOST for the graph from the third silent cycle on.
            let lost: &[&str] = if cycle >= 2 { &["GPU_LOST"] } else { &[] };
            assert_eq!(values(&ev, 1, EventType::ErrorHw), lost, "cycle {cycle}");
            assert!(!values(&ev, 0, EventType::ComputeUtil).is_empty());
        }
        gate.release();
        // The stuck call returns (its answer is stale and dropped); the worker is asked again.
        let mut recovered = false;
        for cycle in 3..200 {
            let ev = p.poll(cycle);
            if p.devices()[1].up {
                assert_eq!(values(&ev, 1, EventType::ErrorHw), ["recovered"]);
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
        assert_eq!(values(&ev, 0, EventType::ErrorHw), ["GPU_LOST"]);
        let f = p.families();
        assert_eq!(value(&f, "ark_gpu_up", &[("gpu", "0")]), Some(0.0));
        assert!(
            rows(&f, "ark_gpu_info").is_empty(),
            "no identity was ever read"
        );
        // The worker survived the panic and is asked again.
        let ev = p.poll(2);
        assert_eq!(values(&ev, 0, EventType::ErrorHw), ["GPU_LOST"]);
    }
}
