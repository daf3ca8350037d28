//! The `nvml` collector: GPU health from NVML (info, utilisation, memory, temperature, power,
//! throttle reasons, ECC, row remapping / page retirement, NVLink, PCIe, per-process memory),
//! XID events, and lost GPUs. Off by default; `--collector nvml` or `[collectors] nvml = true`.
//!
//! Threads (nothing here runs on the async runtime; `run` only waits for shutdown):
//! - `ark-nvml`: opens NVML (retrying quietly every `retry_interval` when there is no library,
//!   driver or GPU: `ark_collector_up{collector="nvml"} 0` and one log line), then polls every
//!   `poll_interval` through a [`Poller`], publishes the `nvml` snapshot and sends the cycle's
//!   events to the pipeline; the collector is up while NVML answers for at least one GPU;
//! - `ark-nvml-gpu<N>`: one per device, runs the NVML calls of that device, so a hung GPU only
//!   delays itself (see [`poll`]);
//! - `ark-nvml-xid`: waits on NVML's critical-XID event set; every XID updates the `nvml_xid`
//!   snapshot at once (it does not wait for the next poll), is sent as an `error.hw` event when it
//!   is a GPU fault (see [`xid`]) and wakes the poller so that a GPU lost with XID 79 shows
//!   `ark_gpu_up 0` within a second (when NVML or sysfs then confirm the loss).
//!
//! Cannot observe ≠ broken: software-side NVML failures (init, driver/library mismatch,
//! permission, not supported, timeouts) give `ark_gpu_observable 0` and, when NVML as a whole
//! fails, `ark_collector_up{collector="nvml"} 0` — never `ark_gpu_up 0`, which needs evidence
//! (see [`poll`]). Each GPU's bus id → index from its first good answer goes into the shared
//! [`crate::gpu_map::GpuMap`] of the collector context (the kernel log reads it).
//!
//! Hardware sits behind [`GpuSource`]: [`real::NvmlSource`] is the default, [`recorded`] scripts
//! answers for tests and benches. Pod attribution of GPU processes is a hook ([`PodResolver`])
//! the host collectors connect with [`NvmlCollector::with_pod_resolver`]; without it the pod labels
//! are empty. Metric names and behaviour are documented in `docs/nvml.md`.

pub mod bench;
pub mod poll;
pub mod real;
pub mod recorded;
pub mod source;
pub mod xid;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

pub use poll::{PollSettings, Poller};
pub use source::{GpuError, GpuSource, XidEvent};

use super::{BoxFuture, Collector, CollectorContext};
use crate::event::{Event, EventType};
use crate::metrics::Telemetry;
use crate::pipeline::EventSender;
use crate::ratelimit::LogLimiter;
use crate::rules::format::DurationSpec;
use xid::XidState;

/// How long the XID thread waits on NVML at a time (bounds shutdown latency).
const XID_WAIT: Duration = Duration::from_millis(500);
/// Earliest re-poll after an XID woke the poller (an XID storm must not become an NVML storm).
const MIN_POLL_GAP: Duration = Duration::from_secs(1);

/// The pod a host process belongs to (from its cgroup).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

/// pid → pod. Called on the collector's polling thread (never on the runtime), once per GPU
/// process per poll; it may read `/proc` but should be cheap (cache inside if needed).
pub type PodResolver = Arc<dyn Fn(u32) -> Option<PodRef> + Send + Sync>;

/// Opens the GPU backend (the real one by default; tests inject a recorded one).
pub type SourceFactory = Arc<dyn Fn() -> Result<Arc<dyn GpuSource>, GpuError> + Send + Sync>;

/// Wall clock in ms (injectable so tests get stable timestamps).
pub type ClockFn = Arc<dyn Fn() -> i64 + Send + Sync>;

/// `[nvml]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlSection {
    /// Time between two samples of every GPU.
    pub poll_interval: DurationSpec,
    /// A device that has not answered after this long is reported unobservable
    /// (`ark_gpu_observable 0`; not `ark_gpu_up 0`: a slow driver call is no hardware fault).
    pub device_timeout: DurationSpec,
    /// The same for the first poll after start (GPUs without persistence mode wake up slowly).
    pub first_poll_timeout: DurationSpec,
    /// Consecutive silent polls before a still-unobservable GPU is logged again. (Before issue
    /// 16 this sent `GPU_LOST`; timeouts are no evidence of a lost GPU, so it no longer does.)
    pub lost_after_timeouts: u32,
    /// How often to try again when NVML cannot be opened or the XID watch cannot be set up.
    pub retry_interval: DurationSpec,
    /// Devices watched (indexes `0..max_gpus`); more are ignored with a warning.
    pub max_gpus: u32,
    /// Processes exported per GPU (largest memory first).
    pub max_processes_per_gpu: usize,
    /// Path of `libnvidia-ml.so` when it is not on the loader path.
    pub library: Option<PathBuf>,
    /// Also put a BlockedBy edge on the GPU for application XIDs (13, 31, 43, ...).
    pub block_application_xids: bool,
}

impl Default for NvmlSection {
    fn default() -> Self {
        NvmlSection {
            poll_interval: DurationSpec(5_000),
            device_timeout: DurationSpec(2_000),
            first_poll_timeout: DurationSpec(30_000),
            lost_after_timeouts: 3,
            retry_interval: DurationSpec(60_000),
            max_gpus: 64,
            max_processes_per_gpu: 128,
            library: None,
            block_application_xids: false,
        }
    }
}

fn dur(d: DurationSpec) -> Duration {
    Duration::from_millis(d.0.max(1) as u64)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// See the module docs.
pub struct NvmlCollector {
    settings: NvmlSection,
    open: SourceFactory,
    resolver: Option<PodResolver>,
    clock: ClockFn,
    /// procfs root for the default pod attribution (`[host] procfs`).
    procfs: std::path::PathBuf,
    /// sysfs root for the PCI presence check (`[host] sysfs`); `None`: not checked.
    sysfs: Option<std::path::PathBuf>,
}

impl NvmlCollector {
    /// The collector with the real NVML backend.
    pub fn new(section: &NvmlSection, procfs: &std::path::Path) -> Self {
        let settings = section.clone();
        let lib = settings.library.clone();
        NvmlCollector {
            settings,
            open: Arc::new(move || {
                real::NvmlSource::open(lib.as_deref()).map(|s| Arc::new(s) as Arc<dyn GpuSource>)
            }),
            resolver: None,
            clock: Arc::new(wall_ms),
            procfs: procfs.to_owned(),
            sysfs: None,
        }
    }

    /// Checks each GPU's `<sysfs>/bus/pci/devices/<bdf>` every poll (`[host] sysfs`).
    pub fn with_sysfs(mut self, sysfs: &std::path::Path) -> Self {
        self.sysfs = Some(sysfs.to_owned());
        self
    }

    /// Replaces the backend (tests, benches).
    pub fn with_source(mut self, source: Arc<dyn GpuSource>) -> Self {
        self.open = Arc::new(move || Ok(source.clone()));
        self
    }

    /// Connects pod attribution of GPU processes.
    pub fn with_pod_resolver(mut self, resolver: PodResolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Replaces the wall clock (tests).
    pub fn with_clock(mut self, clock: ClockFn) -> Self {
        self.clock = clock;
        self
    }
}

impl Collector for NvmlCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        Box::pin(async move {
            let stop = Arc::new(AtomicBool::new(false));
            let (wake_tx, wake_rx) = std::sync::mpsc::sync_channel(1);
            let mut shutdown = ctx.shutdown.clone();
            // Default attribution: the shared pod watch via the process's cgroup.
            let resolver = self.resolver.or_else(|| {
                let (pods, procfs) = (ctx.pods.clone(), self.procfs.clone());
                Some(Arc::new(move |pid: u32| {
                    let p = pods.resolve_pid(&procfs, pid)?;
                    Some(PodRef {
                        pod: p.name.unwrap_or_default(),
                        namespace: p.namespace.unwrap_or_default(),
                        container: p.container.unwrap_or_default(),
                    })
                }) as PodResolver)
            });
            let runner = Runner {
                settings: self.settings,
                open: self.open,
                resolver,
                clock: self.clock,
                sysfs: self.sysfs,
                ctx,
                stop: stop.clone(),
                wake_tx: wake_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name("ark-nvml".to_owned())
                .spawn(move || runner.run(&wake_rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "NVML collector thread could not start");
                return;
            }
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
            // The threads see the flag within one wait (XID_WAIT, or at once for the poller).
            stop.store(true, Ordering::Relaxed);
            let _ = wake_tx.try_send(());
        })
    }
}

/// Applies XIDs as they arrive: counters + timestamps published at once, `error.hw` for faults.
pub struct XidSink {
    state: Mutex<XidState>,
    telemetry: Telemetry,
    events: Option<EventSender>,
    clock: ClockFn,
    block_application_xids: bool,
    wake: Option<SyncSender<()>>,
    log: Mutex<LogLimiter>,
}

impl XidSink {
    /// `events`: where [`XidSink::handle`] sends; `None` when the caller applies events itself.
    pub fn new(
        telemetry: Telemetry,
        events: Option<EventSender>,
        clock: ClockFn,
        block_application_xids: bool,
        wake: Option<SyncSender<()>>,
    ) -> XidSink {
        XidSink {
            state: Mutex::new(XidState::default()),
            telemetry,
            events,
            clock,
            block_application_xids,
            wake,
            log: Mutex::new(LogLimiter::new(Duration::from_secs(10))),
        }
    }

    /// Records one XID and publishes the `nvml_xid` snapshot at once; returns the `error.hw`
    /// event when the XID is a GPU fault (see [`xid`]). [`XidSink::handle`] also sends it.
    pub fn apply(&self, x: XidEvent) -> Option<Event> {
        let ts = (self.clock)();
        let families = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.record(&x, ts);
            s.families()
        };
        self.telemetry.snapshots.publish("nvml_xid", families);
        let class = xid::class_of(x.xid);
        let blocks = xid::blocks(x.xid, self.block_application_xids);
        let allowed = self
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(gpu = x.gpu, xid = %xid::xid_label(x.xid), ?class, blocks, suppressed,
                "XID error reported by the driver");
        }
        blocks.then(|| Event {
            ts,
            event_type: EventType::ErrorHw,
            entity_id: format!("gpu-{}", x.gpu),
            job_id: None,
            pid: None,
            value: format!("XID_{}", xid::xid_label(x.xid)),
            node_id: None,
            pod: None,
            namespace: None,
        })
    }

    /// [`XidSink::apply`], then sends the event and wakes the poller.
    pub fn handle(&self, x: XidEvent) {
        if let (Some(ev), Some(tx)) = (self.apply(x), &self.events) {
            tx.send(ev);
        }
        if let Some(w) = &self.wake {
            let _ = w.try_send(());
        }
    }
}

struct Runner {
    settings: NvmlSection,
    open: SourceFactory,
    resolver: Option<PodResolver>,
    clock: ClockFn,
    sysfs: Option<std::path::PathBuf>,
    ctx: CollectorContext,
    stop: Arc<AtomicBool>,
    wake_tx: SyncSender<()>,
}

impl Runner {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `deadline`, a wake-up or stop. `true` when woken early.
    fn sleep_until(&self, wake: &Receiver<()>, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match wake.recv_timeout(left) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Opens the backend and counts devices, retrying until it works or the collector stops.
    fn open(
        &self,
        wake: &Receiver<()>,
        errors: &mut BTreeMap<&'static str, u64>,
    ) -> Option<(Arc<dyn GpuSource>, u32)> {
        let retry = dur(self.settings.retry_interval);
        let mut logged = false;
        loop {
            if self.stopped() {
                return None;
            }
            let opened = (self.open)().and_then(|s| match s.device_count()? {
                0 => Err(GpuError::Unavailable {
                    cause: source::Cause::NoGpu,
                    detail: "NVML sees no GPU".to_owned(),
                }),
                n => Ok((s, n)),
            });
            match opened {
                Ok((s, n)) => {
                    if logged {
                        tracing::info!(gpus = n, "NVML available now: GPU collection starts");
                    }
                    return Some((s, n));
                }
                Err(e) => {
                    self.ctx.status.set_up(false);
                    *errors.entry(e.reason()).or_insert(0) += 1;
                    self.ctx
                        .telemetry
                        .snapshots
                        .publish("nvml", vec![poll::errors_family(errors)]);
                    if !logged {
                        tracing::warn!(error = %e, reason = e.reason(), retry_s = retry.as_secs(),
                            "NVML collector off (no NVIDIA library, driver or GPU, or NVML unusable): ark_collector_up{{collector=\"nvml\"}} 0, no GPU is reported broken, everything else keeps running");
                        logged = true;
                    } else {
                        tracing::debug!(error = %e, "NVML still unavailable");
                    }
                }
            }
            self.sleep_until(wake, Instant::now() + retry);
        }
    }

    fn run(self, wake: &Receiver<()>) {
        let mut errors = BTreeMap::new();
        let Some((source, count)) = self.open(wake, &mut errors) else {
            return;
        };
        let gpus = count.min(self.settings.max_gpus.max(1));
        if gpus < count {
            tracing::warn!(
                gpus = count,
                watched = gpus,
                "More GPUs than nvml.max_gpus: the rest are not watched"
            );
        }
        let sink = Arc::new(XidSink::new(
            self.ctx.telemetry.clone(),
            Some(self.ctx.events.clone()),
            self.clock.clone(),
            self.settings.block_application_xids,
            Some(self.wake_tx.clone()),
        ));
        self.spawn_xid_thread(source.clone(), gpus, sink);

        let settings = PollSettings {
            device_timeout: dur(self.settings.device_timeout),
            first_timeout: dur(self.settings.first_poll_timeout),
            lost_after_timeouts: self.settings.lost_after_timeouts,
            max_processes_per_gpu: self.settings.max_processes_per_gpu,
        };
        let mut poller = match Poller::new(source, gpus, settings, self.resolver.clone()) {
            Ok(p) => {
                let p = p.with_errors(errors).with_gpu_map(self.ctx.gpus.clone());
                match &self.sysfs {
                    Some(sys) => p.with_sysfs(sys.clone()),
                    None => p,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "NVML worker threads could not start");
                self.ctx.status.set_up(false);
                return;
            }
        };
        let interval = dur(self.settings.poll_interval);
        while !self.stopped() {
            let t0 = Instant::now();
            let events = poller.poll((self.clock)());
            self.ctx
                .telemetry
                .snapshots
                .publish("nvml", poller.families());
            for e in events {
                self.ctx.events.send(e);
            }
            // NVML as a whole failing (every GPU timed out or unobservable) is the collector's
            // failure, not the hardware's.
            self.ctx.status.set_up(poller.any_observable());
            self.ctx.status.set_duration(t0.elapsed().as_secs_f64());
            if self.sleep_until(wake, t0 + interval) {
                // Woken by an XID (or stop): poll again soon, but never in a tight loop.
                while !self.stopped() && Instant::now() < t0 + MIN_POLL_GAP {
                    self.sleep_until(wake, t0 + MIN_POLL_GAP);
                }
            }
        }
    }

    fn spawn_xid_thread(&self, source: Arc<dyn GpuSource>, gpus: u32, sink: Arc<XidSink>) {
        let stop = self.stop.clone();
        let retry = dur(self.settings.retry_interval);
        let spawned = std::thread::Builder::new()
            .name("ark-nvml-xid".to_owned())
            .spawn(move || {
                let mut logged = false;
                while !stop.load(Ordering::Relaxed) {
                    match source.watch_xids(gpus, &stop, XID_WAIT, &mut |x| sink.handle(x)) {
                        Ok(()) => {}
                        Err(e) => {
                            if !logged {
                                tracing::warn!(error = %e, retry_s = retry.as_secs(),
                                    "XID events unavailable: XIDs are not reported until this succeeds");
                                logged = true;
                            } else {
                                tracing::debug!(error = %e, "XID watch failed again");
                            }
                            let until = Instant::now() + retry;
                            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                                std::thread::sleep(XID_WAIT);
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "XID thread could not start: XIDs are not reported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn nvml_section_defaults_file_and_unknown_keys() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.nvml.poll_interval, DurationSpec(5_000));
        assert!(!c.nvml.block_application_xids);
        assert_eq!(
            crate::collectors::CollectorKind::parse("nvml"),
            Some(crate::collectors::CollectorKind::Nvml)
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ark.toml");
        std::fs::write(
            &f,
            "[collectors]\nnvml = true\n[nvml]\npoll_interval = \"10s\"\ndevice_timeout = \"500ms\"\n\
             max_processes_per_gpu = 8\nlibrary = \"/opt/nvidia/libnvidia-ml.so.1\"\n\
             block_application_xids = true\n",
        )
        .unwrap();
        let c = Config::load(Some(&f)).unwrap();
        assert_eq!(c.nvml.poll_interval, DurationSpec(10_000));
        assert_eq!(c.nvml.device_timeout, DurationSpec(500));
        assert_eq!(c.nvml.max_processes_per_gpu, 8);
        assert_eq!(
            c.nvml.library.as_deref(),
            Some(std::path::Path::new("/opt/nvidia/libnvidia-ml.so.1"))
        );
        assert!(c.nvml.block_application_xids);
        assert!(
            crate::collectors::enabled(&c, &[], &[])
                .unwrap()
                .contains(&crate::collectors::CollectorKind::Nvml)
        );
        std::fs::write(&f, "[nvml]\npoll_intervall = \"10s\"\n").unwrap();
        assert!(Config::load(Some(&f)).is_err());
    }
}
