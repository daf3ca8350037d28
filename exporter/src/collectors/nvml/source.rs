//! The hardware boundary of the NVML collector (STYLE.md item 9): the [`GpuSource`] trait and the
//! plain data it returns. Nothing here talks to a GPU; [`super::real::NvmlSource`] does (the
//! default), [`super::recorded::RecordedSource`] replays scripted samples for tests and benches.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Most NVLink links a device can have (`NVML_NVLINK_MAX_LINKS`); also the cap on link series.
pub const MAX_NVLINKS: u32 = 18;

/// Throttle reasons, with NVML's bit values (`nvmlClocksThrottleReason*`) and the `reason` label
/// of `ark_gpu_throttle_active`. The alert `GpuThermalThrottle` matches `.*thermal.*`.
pub const THROTTLE_REASONS: [(u64, &str); 10] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "user_defined_clocks"),
];

/// Every throttle bit we know.
pub const ALL_THROTTLE_BITS: u64 = 0x3ff;

/// Why NVML could not be asked: the bounded `reason` label of `ark_nvml_errors_total`. Every
/// class here is about software (library, driver, permissions, API support), never about the
/// hardware: a GPU that cannot be observed for one of these reasons is `ark_gpu_observable 0`,
/// not `ark_gpu_up 0` ("cannot observe ≠ broken", docs/nvml.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// `libnvidia-ml.so` could not be loaded.
    LibraryNotFound,
    /// A symbol the call needs is missing from the library (`NVML_ERROR_FUNCTION_NOT_FOUND`).
    FunctionNotFound,
    /// `nvmlInit` failed for another reason.
    InitFailed,
    /// Driver and library versions differ (`NVML_ERROR_LIB_RM_VERSION_MISMATCH`, e.g. after a
    /// driver upgrade without a reboot).
    DriverMismatch,
    /// The kernel driver is not loaded.
    DriverNotLoaded,
    /// `NVML_ERROR_NO_PERMISSION`.
    NoPermission,
    /// `NVML_ERROR_NOT_SUPPORTED` on a call every GPU supports.
    NotSupported,
    /// `NVML_ERROR_UNINITIALIZED`.
    Uninitialized,
    /// NVML works but sees no GPU.
    NoGpu,
    /// Any other NVML error code.
    Other,
}

impl Cause {
    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::LibraryNotFound => "library_not_found",
            Cause::FunctionNotFound => "function_not_found",
            Cause::InitFailed => "init_failed",
            Cause::DriverMismatch => "driver_mismatch",
            Cause::DriverNotLoaded => "driver_not_loaded",
            Cause::NoPermission => "no_permission",
            Cause::NotSupported => "not_supported",
            Cause::Uninitialized => "uninitialized",
            Cause::NoGpu => "no_gpu",
            Cause::Other => "other",
        }
    }
}

/// Why a device or the library did not answer. Only [`GpuError::Lost`] is evidence about the
/// hardware; every other variant means "cannot observe".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// NVML as a whole cannot be used (no library, init failure, driver/library mismatch, no
    /// permission, no GPU): `ark_collector_up{collector="nvml"} 0`, no GPU is called broken.
    #[error("NVML unavailable ({}): {detail}", cause.label())]
    Unavailable { cause: Cause, detail: String },
    /// NVML says the device is gone (`NVML_ERROR_GPU_IS_LOST`, `NVML_ERROR_RESET_REQUIRED`):
    /// the only NVML answer that sets `ark_gpu_up 0` and sends `GPU_LOST` to the graph.
    #[error("GPU {gpu} lost: {detail}")]
    Lost { gpu: u32, detail: String },
    /// The device did not answer within the per-device timeout (its worker is still stuck):
    /// unobservable, not lost (a hung driver call is not a fallen GPU).
    #[error("GPU {gpu} did not answer within {timeout_ms} ms")]
    Timeout { gpu: u32, timeout_ms: u64 },
    /// The device's calls fail for a software reason (see [`Cause`]): unobservable, not lost.
    #[error("GPU {gpu} cannot be observed ({}): {detail}", cause.label())]
    Unobservable {
        gpu: u32,
        cause: Cause,
        detail: String,
    },
    /// A call that is not about one device failed (event set, device count), or the binding
    /// panicked.
    #[error("NVML call {call} failed: {detail}")]
    Call { call: &'static str, detail: String },
}

impl GpuError {
    /// Short, bounded reason: logs and the `reason` label of `ark_nvml_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            GpuError::Unavailable { cause, .. } | GpuError::Unobservable { cause, .. } => {
                cause.label()
            }
            GpuError::Lost { .. } => "gpu_lost",
            GpuError::Timeout { .. } => "timeout",
            GpuError::Call { .. } => "call_failed",
        }
    }

    /// Evidence that the GPU itself is gone (as opposed to "NVML could not tell").
    pub fn is_evidence(&self) -> bool {
        matches!(self, GpuError::Lost { .. })
    }
}

/// Identity of a device (`ark_gpu_info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInfo {
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
}

/// Throttle state: bit masks in [`THROTTLE_REASONS`] terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    /// Reasons the device can report (each gets a series, 0 or 1).
    pub supported: u64,
    /// Reasons active now.
    pub active: u64,
}

/// Volatile ECC counts (since the driver loaded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ecc {
    pub corrected: u64,
    pub uncorrected: u64,
}

/// Row remapping (Ampere and newer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemappedRows {
    /// Rows remapped because of correctable / uncorrectable errors.
    pub corrected: u64,
    pub uncorrected: u64,
    /// A remapping waits for the next GPU reset.
    pub pending: bool,
    /// A remapping failed: the GPU has no spare rows left.
    pub failed: bool,
}

/// Page retirement (before Ampere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetiredPages {
    pub single_bit: u64,
    pub double_bit: u64,
    /// A retirement waits for the next reboot / driver reload.
    pub pending: bool,
}

/// PCIe link; each part `None` when the device does not report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pcie {
    pub gen_current: Option<u32>,
    pub gen_max: Option<u32>,
    pub width_current: Option<u32>,
    pub width_max: Option<u32>,
}

/// Compute or graphics context (a pid can hold both; it is reported once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProcessKind {
    Compute,
    Graphics,
}

/// A process holding a context on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcess {
    /// Host pid (the exporter runs with `hostPID`).
    pub pid: u32,
    /// `None` where NVML cannot tell (e.g. under some virtualisation modes).
    pub used_memory_bytes: Option<u64>,
    pub kind: ProcessKind,
}

/// One answer of one device. `None`/empty parts: the device does not support that query.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSample {
    pub info: GpuInfo,
    /// 0..1
    pub utilization_ratio: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub throttle: Option<Throttle>,
    pub ecc: Option<Ecc>,
    pub remapped_rows: Option<RemappedRows>,
    pub retired_pages: Option<RetiredPages>,
    /// `(link, up)` for every link the device has.
    pub nvlinks: Vec<(u32, bool)>,
    pub pcie: Pcie,
    pub processes: Vec<GpuProcess>,
}

/// One XID reported by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    /// Device index (`gpu` label, entity `gpu-<index>`).
    pub gpu: u32,
    /// `None` when NVML could not tell which XID it was.
    pub xid: Option<u64>,
}

/// A GPU backend. All methods block and may block for a long time on a sick device: the collector
/// calls them on its own threads, one per device for [`GpuSource::sample`], so that one hung GPU
/// does not hold up the others, the async runtime or a scrape.
pub trait GpuSource: Send + Sync {
    /// Driver version (`ark_gpu_info{driver_version}`); empty when unknown.
    fn driver_version(&self) -> String;
    /// Number of devices NVML sees.
    fn device_count(&self) -> Result<u32, GpuError>;
    /// Everything about device `index` in one go. `Err(Lost)` when the device stops answering.
    fn sample(&self, index: u32) -> Result<DeviceSample, GpuError>;
    /// Registers for critical XID events on devices `0..devices` and calls `on_xid` for each one
    /// until `stop` is set. Waits at most `wait` at a time so that `stop` is seen promptly.
    /// `Err` when nothing could be registered.
    fn watch_xids(
        &self,
        devices: u32,
        stop: &AtomicBool,
        wait: Duration,
        on_xid: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError>;
}
