//! A recorded [`GpuSource`]: scripted per-device answers (samples, errors, hangs) and an XID
//! channel. For fast unit tests and the `bench nvml` command only; the real source is
//! [`super::real::NvmlSource`]. The scenarios here are modelled on what NVML reports on an
//! 8×H100 SXM node (values trimmed where the test does not need more, e.g. 4 NVLinks, not 18).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::source::{
    DeviceSample, Ecc, GpuError, GpuInfo, GpuProcess, GpuSource, Pcie, ProcessKind, RemappedRows,
    Throttle, XidEvent,
};

/// Blocks a device's answer until released (a hung NVML call).
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn release(&self) {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.1.notify_all();
    }
    fn wait(&self) {
        let mut open = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        while !*open {
            open = self.0.1.wait(open).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Step {
    Answer(Box<Result<DeviceSample, GpuError>>),
    /// Block until the gate opens, then go on with the next step.
    Hang(Gate),
}

#[derive(Debug, Default)]
struct Script {
    steps: VecDeque<Step>,
    /// Repeated once the steps run out.
    last: Option<Result<DeviceSample, GpuError>>,
}

/// See the module docs.
#[derive(Debug)]
pub struct RecordedSource {
    driver_version: String,
    devices: Vec<Mutex<Script>>,
    xid_rx: Mutex<Option<Receiver<XidEvent>>>,
    xid_tx: Sender<XidEvent>,
}

impl RecordedSource {
    pub fn new(devices: u32) -> RecordedSource {
        let (xid_tx, rx) = std::sync::mpsc::channel();
        RecordedSource {
            driver_version: "550.90.07".to_owned(),
            devices: (0..devices)
                .map(|_| Mutex::new(Script::default()))
                .collect(),
            xid_rx: Mutex::new(Some(rx)),
            xid_tx,
        }
    }

    /// Appends a step to device `gpu`'s script.
    pub fn push(&self, gpu: u32, step: Step) -> &Self {
        self.devices[gpu as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .steps
            .push_back(step);
        self
    }

    pub fn answer(&self, gpu: u32, sample: DeviceSample) -> &Self {
        self.push(gpu, Step::Answer(Box::new(Ok(sample))))
    }

    pub fn fail(&self, gpu: u32, err: GpuError) -> &Self {
        self.push(gpu, Step::Answer(Box::new(Err(err))))
    }

    /// The recorded XID channel: what is sent here comes out of [`GpuSource::watch_xids`].
    pub fn xid_sender(&self) -> Sender<XidEvent> {
        self.xid_tx.clone()
    }
}

impl GpuSource for RecordedSource {
    fn driver_version(&self) -> String {
        self.driver_version.clone()
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        Ok(self.devices.len() as u32)
    }

    fn sample(&self, gpu: u32) -> Result<DeviceSample, GpuError> {
        let Some(dev) = self.devices.get(gpu as usize) else {
            return Err(GpuError::Lost {
                gpu,
                detail: "no such device in the recording".to_owned(),
            });
        };
        loop {
            let step = {
                let mut s = dev.lock().unwrap_or_else(PoisonError::into_inner);
                match s.steps.pop_front() {
                    Some(step) => step,
                    None => {
                        return s.last.clone().unwrap_or_else(|| {
                            Err(GpuError::Lost {
                                gpu,
                                detail: "nothing recorded".to_owned(),
                            })
                        });
                    }
                }
            };
            match step {
                Step::Hang(g) => g.wait(),
                Step::Answer(r) => {
                    let r = *r;
                    dev.lock().unwrap_or_else(PoisonError::into_inner).last = Some(r.clone());
                    return r;
                }
            }
        }
    }

    fn watch_xids(
        &self,
        _devices: u32,
        stop: &AtomicBool,
        wait: Duration,
        on_xid: &mut dyn FnMut(XidEvent),
    ) -> Result<(), GpuError> {
        let rx = self
            .xid_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| GpuError::Call {
                call: "watch_xids",
                detail: "the recorded XID channel is already being watched".to_owned(),
            })?;
        while !stop.load(Ordering::Relaxed) {
            match rx.recv_timeout(wait) {
                Ok(x) => on_xid(x),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
        Ok(())
    }
}

const GIB: u64 = 1 << 30;

/// A healthy H100 SXM 80GB answer with the given `(pid, bytes)` compute processes.
pub fn h100(gpu: u32, processes: &[(u32, u64)]) -> DeviceSample {
    DeviceSample {
        info: GpuInfo {
            uuid: format!("GPU-8c6f2a1e-0000-4000-8000-00000000000{gpu}"),
            model: "NVIDIA H100 80GB HBM3".to_owned(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + gpu * 0x10),
        },
        utilization_ratio: Some(0.97),
        memory_used_bytes: Some(processes.iter().map(|p| p.1).sum::<u64>() + GIB / 2),
        memory_total_bytes: Some(80 * GIB),
        temperature_celsius: Some(64.0),
        power_watts: Some(612.5),
        throttle: Some(Throttle {
            supported: 0x1ff,
            active: 0x4,
        }),
        ecc: Some(Ecc::default()),
        remapped_rows: Some(RemappedRows::default()),
        retired_pages: None,
        nvlinks: (0..4).map(|l| (l, true)).collect(),
        pcie: Pcie {
            gen_current: Some(5),
            gen_max: Some(5),
            width_current: Some(16),
            width_max: Some(16),
        },
        processes: processes
            .iter()
            .map(|&(pid, bytes)| GpuProcess {
                pid,
                used_memory_bytes: Some(bytes),
                kind: ProcessKind::Compute,
            })
            .collect(),
    }
}

/// The golden scenario, 4 GPUs, two polling cycles:
/// - gpu 0: healthy, pids 4242 and 4243 (an application XID 13 arrives on the XID channel);
/// - gpu 1: double-bit ECC (2 uncorrected) and a row remapping pending, pid 5151;
/// - gpu 2: NVLink 2 down, PCIe trained at Gen3 x8 of Gen5 x16, thermal slowdown, pid 6161;
/// - gpu 3: healthy with pid 7171 in cycle 1; XID 79 after it; lost in cycle 2.
pub fn golden() -> RecordedSource {
    let src = RecordedSource::new(4);
    src.answer(0, h100(0, &[(4242, 40 * GIB), (4243, 20 * GIB)]));

    let mut g1 = h100(1, &[(5151, 30 * GIB)]);
    g1.utilization_ratio = Some(0.5);
    g1.ecc = Some(Ecc {
        corrected: 12,
        uncorrected: 2,
    });
    g1.remapped_rows = Some(RemappedRows {
        corrected: 0,
        uncorrected: 1,
        pending: true,
        failed: false,
    });
    src.answer(1, g1);

    let mut g2 = h100(2, &[(6161, 10 * GIB)]);
    g2.utilization_ratio = Some(0.9);
    g2.nvlinks[2].1 = false;
    g2.pcie.gen_current = Some(3);
    g2.pcie.width_current = Some(8);
    g2.temperature_celsius = Some(88.0);
    g2.throttle = Some(Throttle {
        supported: 0x1ff,
        active: 0x40,
    });
    src.answer(2, g2);

    src.answer(3, h100(3, &[(7171, 50 * GIB)]));
    src.fail(
        3,
        GpuError::Lost {
            gpu: 3,
            detail: "GPU is lost".to_owned(),
        },
    );
    src
}

/// `gpus` healthy GPUs with `processes` compute processes each (bench: 8 × 64).
pub fn fleet(gpus: u32, processes: u32) -> RecordedSource {
    let src = RecordedSource::new(gpus);
    for g in 0..gpus {
        let procs: Vec<(u32, u64)> = (0..processes)
            .map(|p| (100_000 + g * 1_000 + p, GIB + u64::from(p) * (1 << 20)))
            .collect();
        src.answer(g, h100(g, &procs));
    }
    src
}
