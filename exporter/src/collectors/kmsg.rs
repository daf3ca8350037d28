//! The `kmsg` collector: GPU, NVSwitch, PCIe and kernel faults from the kernel log (see
//! `docs/kmsg.md`). The driver writes XIDs there even when NVML cannot be asked, NVSwitch SXids
//! appear nowhere else, and AER, OOM kills and hung tasks are kernel messages.
//!
//! `--path.kmsg` (`[kmsg] path`, default `/dev/kmsg`) is a character device read record by
//! record, or a regular file (a saved `dmesg`, a journal export, a kmsg dump, mixed formats) read
//! from its start and followed. Reading runs on its own thread ([`follow`]); lines are parsed and
//! classified by [`parse`] and counted by [`state`]. Metrics are published as the `kmsg`
//! snapshot; XIDs that are GPU faults go to the pipeline as `error.hw` on `gpu-<index>`
//! (BlockedBy), OOM kills as a process exit.
//!
//! Only kernel (facility 0) records are classified: userspace can write `/dev/kmsg`, but the
//! kernel gives those records the user facility, so no program can fake an XID this way.

pub mod bench;
pub mod follow;
pub mod parse;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use self::follow::{Reader, Sink, Step};
use self::state::{KmsgState, Lookup};
use super::{BoxFuture, Collector, CollectorContext};
use crate::event::Event;
use crate::rules::format::DurationSpec;

/// `[kmsg]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KmsgSection {
    /// `/dev/kmsg`, or a file to read from its start and follow (`--path.kmsg`).
    pub path: PathBuf,
    /// How often a followed file is checked for growth (and `/dev/kmsg` for new records).
    pub poll_interval: DurationSpec,
    /// How often to try again when the path cannot be opened.
    pub retry_interval: DurationSpec,
    /// Most XID/SXid/AER/recovery series exported; beyond, counted as dropped.
    pub max_series: usize,
    /// Also put a BlockedBy edge on the GPU for application XIDs (as `[nvml]`'s option).
    pub block_application_xids: bool,
}

impl Default for KmsgSection {
    fn default() -> Self {
        KmsgSection {
            path: PathBuf::from("/dev/kmsg"),
            poll_interval: DurationSpec(250),
            retry_interval: DurationSpec(10_000),
            max_series: 512,
            block_application_xids: false,
        }
    }
}

pub(crate) fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// See the module docs.
pub struct KmsgCollector {
    section: KmsgSection,
    procfs: PathBuf,
    sysfs: PathBuf,
}

impl KmsgCollector {
    pub fn new(section: &KmsgSection, host: &super::host::HostConfig) -> Self {
        KmsgCollector {
            section: section.clone(),
            procfs: host.procfs.clone(),
            sysfs: host.sysfs.clone(),
        }
    }
}

/// Feeds lines into the state, collecting events.
struct Feed<'a> {
    state: &'a mut KmsgState,
    events: Vec<Event>,
    dirty: bool,
}

impl Sink for Feed<'_> {
    fn line(&mut self, raw: &[u8]) {
        self.dirty = true;
        self.state.handle(raw, wall_ms(), &mut self.events);
    }
    fn oversized(&mut self) {
        self.dirty = true;
        self.state.count_oversized();
    }
    fn overwritten(&mut self) {
        self.dirty = true;
        self.state.overwritten += 1;
    }
}

/// The collector's loop, on its own thread until `stop`. Public for `bench kmsg`.
pub fn run_blocking(
    section: &KmsgSection,
    state: &mut KmsgState,
    ctx: &CollectorContext,
    stop: &AtomicBool,
) {
    let poll = Duration::from_millis(section.poll_interval.0.clamp(10, 10_000) as u64);
    let retry = Duration::from_millis(section.retry_interval.0.clamp(10, 3_600_000) as u64);
    let sleep = |d: Duration| {
        let until = Instant::now() + d;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(poll.min(until.saturating_duration_since(Instant::now())));
        }
    };
    let mut reader: Option<Reader> = None;
    let mut logged_down = false;
    ctx.telemetry.snapshots.publish("kmsg", state.families());
    while !stop.load(Ordering::Relaxed) {
        if reader.is_none() {
            match Reader::open(&section.path) {
                Ok(r) => {
                    tracing::info!(path = %section.path.display(), "Reading the kernel log");
                    ctx.status.set_up(true);
                    logged_down = false;
                    reader = Some(r);
                }
                Err(e) => {
                    ctx.status.set_up(false);
                    if !logged_down {
                        tracing::warn!(path = %section.path.display(), error = %e,
                            retry_s = retry.as_secs_f64(),
                            "Kernel log unreadable; kmsg collector down, retrying");
                        logged_down = true;
                    }
                    sleep(retry);
                    continue;
                }
            }
        }
        let Some(r) = reader.as_mut() else {
            continue;
        };
        let t0 = Instant::now();
        let mut feed = Feed {
            state: &mut *state,
            events: Vec::new(),
            dirty: false,
        };
        let step = r.step(&mut feed);
        let (events, dirty) = (std::mem::take(&mut feed.events), feed.dirty);
        for ev in events {
            ctx.events.send(ev);
        }
        if dirty {
            ctx.telemetry.snapshots.publish("kmsg", state.families());
            ctx.status.set_duration(t0.elapsed().as_secs_f64());
        }
        match step {
            Ok(Step::Read) => {}
            Ok(Step::Idle) => sleep(poll),
            Err(e) => {
                ctx.status.set_up(false);
                tracing::warn!(path = %section.path.display(), error = %e,
                    "Reading the kernel log failed; reopening");
                reader = None;
                logged_down = true;
                sleep(retry);
            }
        }
    }
}

impl Collector for KmsgCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        Box::pin(async move {
            let stop = Arc::new(AtomicBool::new(false));
            let mut shutdown = ctx.shutdown.clone();
            let lookup = Lookup::new(ctx.gpus.clone(), &self.procfs, &self.sysfs);
            let mut state = KmsgState::new(
                lookup,
                wall_ms(),
                state::boot_ms(&self.procfs),
                self.section.max_series,
                self.section.block_application_xids,
            );
            let (section, thread_ctx, thread_stop) = (self.section, ctx.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name("ark-kmsg".to_owned())
                .spawn(move || run_blocking(&section, &mut state, &thread_ctx, &thread_stop));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "kmsg collector thread could not start");
                return;
            }
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        })
    }
}
