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

/// Why a device or the library did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// No `libnvidia-ml.so`, no driver, no permission, or no GPU: the collector reports `up 0`.
    #[error("NVML unavailable: {detail}")]
    Unavailable { detail: String },
    /// The device stopped answering (`NVML_ERROR_GPU_IS_LOST`, reset required, driver gone, ...).
    #[error("GPU {gpu} lost: {detail}")]
    Lost { gpu: u32, detail: String },
    /// The device did not answer within the per-device timeout (its worker is still stuck).
    #[error("GPU {gpu} did not answer within {timeout_ms} ms")]
    Timeout { gpu: u32, timeout_ms: u64 },
    /// A call that is not about one device failed (event set, device count).
    #[error("NVML call {call} failed: {detail}")]
    Call { call: &'static str, detail: String },
}

impl GpuError {
    /// Short, bounded reason for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            GpuError::Unavailable { .. } => "unavailable",
            GpuError::Lost { .. } => "lost",
            GpuError::Timeout { .. } => "timeout",
            GpuError::Call { .. } => "call_failed",
        }
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
