//! The real [`GpuSource`]: NVML through `nvml-wrapper`, which `dlopen`s `libnvidia-ml.so` at run
//! time, so this builds and starts on machines without a GPU (it then fails to open, cleanly).
//!
//! Error policy, per call ("cannot observe ≠ broken", docs/nvml.md):
//! - `GpuLost` / `ResetRequired` — NVML's own statement that the device is gone — make the whole
//!   sample `Err(Lost)`: the only evidence NVML gives about the hardware;
//! - errors that say NVML cannot be used right now (driver not loaded, driver/library version
//!   mismatch, uninitialized) make the sample `Err(Unobservable)`: nothing is known about the GPU;
//! - anything else (`NotSupported`, `NoPermission`, a symbol missing from an older driver, ...)
//!   only leaves that part of the sample empty.
//!
//! `memory_info` is the anchor: every GPU supports it, so when it fails the whole device is
//! unobservable with that error's [`Cause`] (lost only for `GpuLost` / `ResetRequired`).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING,
    NVML_FI_DEV_REMAPPED_UNC, NVML_FI_DEV_RETIRED_DBE, NVML_FI_DEV_RETIRED_PENDING,
    NVML_FI_DEV_RETIRED_SBE,
};

use super::source::{
    ALL_THROTTLE_BITS, Cause, DeviceSample, Ecc, GpuError, GpuInfo, GpuProcess, GpuSource,
    MAX_NVLINKS, Pcie, ProcessKind, RemappedRows, RetiredPages, Throttle, XidEvent,
};
use crate::ratelimit::LogLimiter;

/// Consecutive failed waits after which the XID event set is registered again.
const MAX_WAIT_FAILURES: u32 = 20;

/// The library name NVML is looked up under by default.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so";

/// NVML, opened.
pub struct NvmlSource {
    nvml: Nvml,
    driver_version: String,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("driver_version", &self.driver_version)
            .finish_non_exhaustive()
    }
}

/// NVML's own statement that the device is gone: evidence, `ark_gpu_up 0`.
fn is_lost(e: &NvmlError) -> bool {
    matches!(e, NvmlError::GpuLost | NvmlError::ResetRequired)
}

/// Errors after which nothing on the device can be read (NVML itself is unusable right now).
fn is_unobservable(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::LibRmVersionMismatch
            | NvmlError::IrqIssue
            | NvmlError::Timeout
    )
}

/// The bounded class of an NVML error (the `reason` label).
pub fn cause_of(e: &NvmlError) -> Cause {
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => Cause::LibraryNotFound,
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => Cause::FunctionNotFound,
        NvmlError::LibRmVersionMismatch => Cause::DriverMismatch,
        NvmlError::DriverNotLoaded => Cause::DriverNotLoaded,
        NvmlError::NoPermission => Cause::NoPermission,
        NvmlError::NotSupported => Cause::NotSupported,
        NvmlError::Uninitialized => Cause::Uninitialized,
        _ => Cause::Other,
    }
}

/// A failed call that ends the sample: lost on evidence, unobservable otherwise.
fn device_error(gpu: u32, e: &NvmlError) -> GpuError {
    if is_lost(e) {
        GpuError::Lost {
            gpu,
            detail: e.to_string(),
        }
    } else {
        GpuError::Unobservable {
            gpu,
            cause: cause_of(e),
            detail: e.to_string(),
        }
    }
}

/// Per-call policy: lost or unobservable → the sample fails; anything else → this part is absent.
fn opt<T>(gpu: u32, r: Result<T, NvmlError>) -> Result<Option<T>, GpuError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_lost(&e) || is_unobservable(&e) => Err(device_error(gpu, &e)),
        Err(_) => Ok(None),
    }
}

fn sample_u64(v: &SampleValue) -> Option<u64> {
    match *v {
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::U64(x) => Some(x),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x.is_finite() && x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

fn processes(out: &mut Vec<GpuProcess>, list: Vec<ProcessInfo>, kind: ProcessKind) {
    for p in list {
        let used = match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        };
        match out.iter_mut().find(|q| q.pid == p.pid) {
            // A pid with both a compute and a graphics context is one process.
            Some(q) => q.used_memory_bytes = q.used_memory_bytes.max(used),
            None => out.push(GpuProcess {
                pid: p.pid,
                used_memory_bytes: used,
                kind,
            }),
        }
    }
}

impl NvmlSource {
    /// Loads the library (`library`, else `libnvidia-ml.so` from the loader path) and initialises
    /// NVML. Fails with [`GpuError::Unavailable`] (and the error's [`Cause`]) when there is no
    /// library, driver or permission, or the driver and library versions differ.
    pub fn open(library: Option<&Path>) -> Result<NvmlSource, GpuError> {
        let mut b = Nvml::builder();
        if let Some(p) = library {
            b.lib_path(p.as_os_str());
        } else {
            b.lib_path(OsStr::new(DEFAULT_LIBRARY));
        }
        let nvml = b.init().map_err(|e| GpuError::Unavailable {
            cause: match cause_of(&e) {
                Cause::Other => Cause::InitFailed,
                c => c,
            },
            detail: format!(
                "{} ({e})",
                library.map_or(DEFAULT_LIBRARY.to_owned(), |p| p.display().to_string())
            ),
        })?;
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        Ok(NvmlSource {
            nvml,
            driver_version,
        })
    }

    fn registered_set(&self, devices: &[u32]) -> Result<EventSet<'_>, GpuError> {
        let mut set = self.nvml.create_event_set().map_err(|e| GpuError::Call {
            call: "nvmlEventSetCreate",
            detail: e.to_string(),
        })?;
        for &i in devices {
            let dev = self
                .nvml
                .device_by_index(i)
                .map_err(|e| device_error(i, &e))?;
            set = dev
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| GpuError::Call {
                    call: "nvmlDeviceRegisterEvents",
                    detail: e.error.to_string(),
                })?;
        }
        Ok(set)
    }
}

impl GpuSource for NvmlSource {
    fn driver_version(&self) -> String {
        self.driver_version.clone()
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        self.nvml.device_count().map_err(|e| GpuError::Unavailable {
            cause: cause_of(&e),
            detail: format!("nvmlDeviceGetCount: {e}"),
        })
    }

    fn sample(&self, gpu: u32) -> Result<DeviceSample, GpuError> {
        let dev = self
            .nvml
            .device_by_index(gpu)
            .map_err(|e| device_error(gpu, &e))?;
        let mut s = DeviceSample::default();
        match dev.memory_info() {
            Ok(m) => {
                s.memory_used_bytes = Some(m.used);
                s.memory_total_bytes = Some(m.total);
            }
            Err(NvmlError::NotSupported) => {}
            Err(e) => return Err(device_error(gpu, &e)),
        }
        s.info = GpuInfo {
            uuid: opt(gpu, dev.uuid())?.unwrap_or_default(),
            model: opt(gpu, dev.name())?.unwrap_or_default(),
            pci_bus_id: opt(gpu, dev.pci_info())?
                .map(|p| p.bus_id)
                .unwrap_or_default(),
        };
        // A device that answers "not supported" even to its memory size and UUID (every GPU has
        // both) cannot be observed: an empty sample would read as a healthy idle GPU.
        if s.memory_total_bytes.is_none() && s.info.uuid.is_empty() {
            return Err(GpuError::Unobservable {
                gpu,
                cause: Cause::NotSupported,
                detail: "neither memory size nor UUID readable".to_owned(),
            });
        }
        s.utilization_ratio =
            opt(gpu, dev.utilization_rates())?.map(|u| f64::from(u.gpu.min(100)) / 100.0);
        s.temperature_celsius = opt(gpu, dev.temperature(TemperatureSensor::Gpu))?.map(f64::from);
        s.power_watts = opt(gpu, dev.power_usage())?.map(|mw| f64::from(mw) / 1000.0);
        if let Some(active) = opt(gpu, dev.current_throttle_reasons())? {
            let supported = opt(gpu, dev.supported_throttle_reasons())?
                .map_or(ALL_THROTTLE_BITS, |r| r.bits() & ALL_THROTTLE_BITS);
            s.throttle = Some(Throttle {
                supported,
                active: active.bits() & ALL_THROTTLE_BITS,
            });
        }
        let corrected = opt(
            gpu,
            dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
        )?;
        let uncorrected = opt(
            gpu,
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        )?;
        if corrected.is_some() || uncorrected.is_some() {
            s.ecc = Some(Ecc {
                corrected: corrected.unwrap_or(0),
                uncorrected: uncorrected.unwrap_or(0),
            });
        }
        // One batched call for row remapping (Ampere+) and page retirement (older GPUs); each
        // field is answered or "not supported" on its own.
        let ids = [
            NVML_FI_DEV_REMAPPED_COR,
            NVML_FI_DEV_REMAPPED_UNC,
            NVML_FI_DEV_REMAPPED_PENDING,
            NVML_FI_DEV_REMAPPED_FAILURE,
            NVML_FI_DEV_RETIRED_SBE,
            NVML_FI_DEV_RETIRED_DBE,
            NVML_FI_DEV_RETIRED_PENDING,
        ]
        .map(FieldId);
        if let Some(values) = opt(gpu, dev.field_values_for(&ids))? {
            let v: Vec<Option<u64>> = values
                .iter()
                .map(|r| {
                    r.as_ref()
                        .ok()
                        .and_then(|f| f.value.as_ref().ok())
                        .and_then(sample_u64)
                })
                .collect();
            let get = |i: usize| v.get(i).copied().flatten();
            if get(2).is_some() || get(3).is_some() {
                s.remapped_rows = Some(RemappedRows {
                    corrected: get(0).unwrap_or(0),
                    uncorrected: get(1).unwrap_or(0),
                    pending: get(2).unwrap_or(0) > 0,
                    failed: get(3).unwrap_or(0) > 0,
                });
            }
            if get(4).is_some() || get(5).is_some() {
                s.retired_pages = Some(RetiredPages {
                    single_bit: get(4).unwrap_or(0),
                    double_bit: get(5).unwrap_or(0),
                    pending: get(6).unwrap_or(0) > 0,
                });
            }
        }
        for link in 0..MAX_NVLINKS {
            // Links the device does not have answer NotSupported / InvalidArg: skipped.
            if let Some(up) = opt(gpu, dev.link_wrapper_for(link).is_active())? {
                s.nvlinks.push((link, up));
            }
        }
        s.pcie = Pcie {
            gen_current: opt(gpu, dev.current_pcie_link_gen())?,
            gen_max: opt(gpu, dev.max_pcie_link_gen())?,
            width_current: opt(gpu, dev.current_pcie_link_width())?,
            width_max: opt(gpu, dev.max_pcie_link_width())?,
        };
        if let Some(list) = opt(gpu, dev.running_compute_processes())? {
            processes(&mut s.processes, list, ProcessKind::Compute);
        }
        if let Some(list) = opt(gpu, dev.running_graphics_processes())? {
            processes(&mut s.processes, list, ProcessKind::Graphics);
        }
        Ok(s)
    }

    fn watch_xids(
        &self,
        devices: u32,
        stop: &AtomicBool,
        wait: Duration,
        on_xid: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError> {
        // Register device by device: a device that cannot take the registration (no support, or
        // already lost) must not cost the others their XIDs. NVML frees the set when a
        // registration fails, so the set is rebuilt from the devices that did register.
        let mut registered: Vec<u32> = Vec::new();
        let mut skipped: Vec<(u32, String)> = Vec::new();
        let mut uuids: Vec<(String, u32)> = Vec::new();
        let mut set = Some(self.registered_set(&[])?);
        for i in 0..devices {
            let dev = match self.nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    skipped.push((i, format!("device not reachable: {e}")));
                    continue;
                }
            };
            match dev.supported_event_types() {
                Ok(t) if t.contains(EventTypes::CRITICAL_XID_ERROR) => {}
                Ok(_) => {
                    skipped.push((i, "critical XID events not supported".to_owned()));
                    continue;
                }
                Err(e) => {
                    skipped.push((i, format!("supported events unreadable: {e}")));
                    continue;
                }
            }
            let Some(s) = set.take() else { break };
            match dev.register_events(EventTypes::CRITICAL_XID_ERROR, s) {
                Ok(s) => {
                    set = Some(s);
                    registered.push(i);
                    if let Ok(u) = dev.uuid() {
                        uuids.push((u, i));
                    }
                }
                Err(e) => {
                    skipped.push((i, format!("registration failed: {}", e.error)));
                    set = Some(self.registered_set(&registered)?);
                }
            }
        }
        let set = match set {
            Some(s) if !registered.is_empty() => s,
            // The caller logs this once and retries quietly.
            _ => {
                return Err(GpuError::Call {
                    call: "nvmlDeviceRegisterEvents",
                    detail: format!("no device accepted critical XID events: {skipped:?}"),
                });
            }
        };
        if !skipped.is_empty() {
            tracing::warn!(?skipped, "Critical XID events not watched on some GPUs");
        }
        tracing::info!(gpus = ?registered, "Watching critical XID events");
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
        let mut limiter = LogLimiter::new(Duration::from_secs(60));
        let mut failures = 0u32;
        while !stop.load(Ordering::Relaxed) {
            match set.wait(wait_ms) {
                Ok(data) => {
                    failures = 0;
                    if !data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                        continue;
                    }
                    let xid = match data.event_data {
                        Some(XidError::Value(v)) => Some(v),
                        Some(XidError::Unknown) | None => None,
                    };
                    // The index comes from the handle (no device round trip); the UUID is the
                    // fallback for a device whose index can no longer be read.
                    let gpu = data.device.index().ok().or_else(|| {
                        let u = data.device.uuid().ok()?;
                        uuids.iter().find(|(x, _)| *x == u).map(|(_, i)| *i)
                    });
                    match gpu {
                        Some(gpu) => on_xid(XidEvent { gpu, xid }),
                        None => {
                            if let Some(n) = limiter.allow(Instant::now()) {
                                tracing::warn!(
                                    ?xid,
                                    suppressed = n,
                                    "XID from a device that cannot be identified; dropped"
                                );
                            }
                        }
                    }
                }
                Err(NvmlError::Timeout) => failures = 0,
                Err(e) => {
                    // GpuLost and friends: the poller reports the device; avoid spinning here.
                    // A set that keeps failing (e.g. invalidated by a GPU reset) is given up and
                    // registered again by the caller after its retry interval.
                    failures += 1;
                    if failures >= MAX_WAIT_FAILURES {
                        return Err(GpuError::Call {
                            call: "nvmlEventSetWait",
                            detail: format!("{failures} failures in a row, last: {e}"),
                        });
                    }
                    if let Some(n) = limiter.allow(Instant::now()) {
                        tracing::warn!(error = %e, suppressed = n, "Waiting for XID events failed");
                    }
                    std::thread::sleep(wait.min(Duration::from_secs(1)));
                }
            }
        }
        Ok(())
    }
}
