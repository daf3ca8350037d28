//! Collectors: everything that produces events or metrics for the exporter.
//!
//! # Adding a collector (procfs, eBPF, NVML, ...)
//! One file plus one match arm:
//! 1. `collectors/<name>.rs` with a type implementing [`Collector`]; its `run` gets a
//!    [`CollectorContext`] and loops until `ctx.shutdown` flips to `true`. A procfs/sysfs
//!    collector is instead a [`host::HostSource`] in `collectors/host/<name>.rs`, with its arm in
//!    [`host::source`] (the one list the service, the golden test and the benchmark share).
//! 2. A variant in [`CollectorKind`] with its name, default on/off state and the arm in
//!    [`CollectorKind::build`] that constructs it from its own section of the [`Config`].
//!
//! What a collector may do with its context:
//! - send [`Event`](crate::event::Event)s into the pipeline with `ctx.events.send(ev)` (never
//!   blocks; a full queue drops and counts). Tag them with `ctx.events.with_source("nvml")`
//!   (the `source` label of `ark_events_total`) — `CollectorContext::new` already does that;
//! - publish whole metric families with `ctx.telemetry.snapshots.publish("<name>", families)`
//!   after each poll (build them with [`crate::metrics::family`]); a scrape only encodes what
//!   was last published and never waits on hardware;
//! - or register its own counters in `ctx.telemetry.registry` (an explicit registry; the `node`
//!   label is added to every series automatically);
//! - report health with `ctx.status.set_up(..)` and `ctx.status.set_duration(..)`
//!   (`ark_collector_up{collector}` / `ark_collector_duration_seconds{collector}`).
//!
//! Enabling: each kind has a default; the config's `[collectors]` table (`probe = false`) and the
//! `--collector NAME` / `--no-collector NAME` flags override it, flags last.

pub mod ebpf;
pub mod host;
pub mod kmsg;
pub mod nvml;
pub mod pods;
pub mod probe;

use std::future::Future;
use std::pin::Pin;

use crate::config::Config;
use crate::gpu_map::GpuMap;
use crate::metrics::{CollectorStatus, Telemetry};
use crate::pipeline::EventSender;
use crate::pods::PodResolver;

/// What [`Collector::run`] returns.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The collectors this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CollectorKind {
    /// External probes (`--probe PATH`) speaking the Ark JSON Lines protocol.
    Probe,
    /// Kernel programs: TCP retransmits, block I/O latency, exits, OOM kills.
    Ebpf,
    /// NVIDIA GPUs through NVML (off by default: `--collector nvml`).
    Nvml,
    /// `/proc/net/dev` + `/sys/class/net` ([`host::netdev`]).
    Netdev,
    /// `/sys/class/infiniband` ([`host::infiniband`]).
    Infiniband,
    /// `/proc/diskstats` ([`host::block`]).
    Block,
    /// `/proc/pressure` ([`host::pressure`]).
    Pressure,
    /// Processes holding GPUs, RDMA devices or sockets ([`host::process`]).
    Process,
    /// Kubernetes watch of this node's pods for attribution ([`pods`]).
    Pods,
    /// The kernel log: XIDs, SXids, PCIe AER, OOM kills, hung tasks ([`kmsg`]).
    Kmsg,
}

impl CollectorKind {
    pub const ALL: &'static [CollectorKind] = &[
        CollectorKind::Probe,
        CollectorKind::Ebpf,
        CollectorKind::Nvml,
        CollectorKind::Netdev,
        CollectorKind::Infiniband,
        CollectorKind::Block,
        CollectorKind::Pressure,
        CollectorKind::Process,
        CollectorKind::Pods,
        CollectorKind::Kmsg,
    ];

    /// The `collector` label and the flag/config name.
    pub fn name(self) -> &'static str {
        match self {
            CollectorKind::Probe => "probe",
            CollectorKind::Ebpf => "ebpf",
            CollectorKind::Nvml => "nvml",
            CollectorKind::Netdev => "netdev",
            CollectorKind::Infiniband => "infiniband",
            CollectorKind::Block => "block",
            CollectorKind::Pressure => "pressure",
            CollectorKind::Process => "process",
            CollectorKind::Pods => "pods",
            CollectorKind::Kmsg => "kmsg",
        }
    }

    /// On unless disabled?
    pub fn default_enabled(self) -> bool {
        match self {
            CollectorKind::Probe => true,
            CollectorKind::Ebpf => true,
            CollectorKind::Nvml => false,
            // Host collectors whose files are absent report `up 0` and cost nothing.
            CollectorKind::Netdev
            | CollectorKind::Infiniband
            | CollectorKind::Block
            | CollectorKind::Pressure
            | CollectorKind::Process
            | CollectorKind::Pods
            | CollectorKind::Kmsg => true,
        }
    }

    pub fn parse(name: &str) -> Option<CollectorKind> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Builds the collector from its own section of the configuration. The one match arm per
    /// collector; the procfs/sysfs ones are listed in [`host::source`].
    pub fn build(self, cfg: &Config) -> crate::Result<Box<dyn Collector>> {
        let log_interval = cfg.log_interval();
        Ok(match self {
            CollectorKind::Probe => Box::new(probe::ProbeCollector::new(
                &cfg.probes,
                &cfg.probe,
                log_interval,
            )),
            CollectorKind::Ebpf => Box::new(ebpf::EbpfCollector::new(
                cfg.ebpf.settings(),
                &cfg.host.sysfs,
            )),
            CollectorKind::Nvml => Box::new(
                nvml::NvmlCollector::new(&cfg.nvml, &cfg.host.procfs).with_sysfs(&cfg.host.sysfs),
            ),
            CollectorKind::Pods => Box::new(pods::PodsCollector::new(&cfg.host, log_interval)),
            CollectorKind::Kmsg => Box::new(kmsg::KmsgCollector::new(&cfg.kmsg, &cfg.host)),
            CollectorKind::Netdev
            | CollectorKind::Infiniband
            | CollectorKind::Block
            | CollectorKind::Pressure
            | CollectorKind::Process => host::collector(self, &cfg.host, log_interval),
        })
    }
}

/// A running source of events and/or metrics.
pub trait Collector: Send {
    /// Runs until `ctx.shutdown` becomes `true`. Must never block the async runtime: do blocking
    /// I/O with `tokio::task::spawn_blocking` or on its own thread.
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture;
}

/// Everything a collector gets.
#[derive(Clone)]
pub struct CollectorContext {
    pub events: EventSender,
    pub telemetry: Telemetry,
    pub status: CollectorStatus,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Pod attribution shared by all collectors (see [`crate::pods`]); `serve` installs one
    /// resolver for all of them with [`CollectorContext::with_pods`].
    pub pods: PodResolver,
    /// PCI bus id → GPU index, one map for all collectors: NVML fills it, the kernel log reads
    /// it; `serve` installs the shared one with [`CollectorContext::with_gpus`].
    pub gpus: GpuMap,
}

impl CollectorContext {
    /// Context for `kind`: events tagged `source=<name>`, status series created.
    pub fn new(
        kind: CollectorKind,
        events: &EventSender,
        telemetry: &Telemetry,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        CollectorContext {
            events: events.with_source(kind.name()),
            telemetry: telemetry.clone(),
            status: telemetry.collector(kind.name()),
            shutdown,
            pods: PodResolver::new(std::path::Path::new("/sys")),
            gpus: GpuMap::default(),
        }
    }

    /// Uses `pods` (shared with the other collectors) for attribution.
    pub fn with_pods(mut self, pods: PodResolver) -> Self {
        self.pods = pods;
        self
    }

    /// Uses `gpus` (shared with the other collectors) for bus id → index.
    pub fn with_gpus(mut self, gpus: GpuMap) -> Self {
        self.gpus = gpus;
        self
    }
}

/// Which collectors run: defaults, then the config table, then the flags.
pub fn enabled(
    cfg: &Config,
    enable: &[String],
    disable: &[String],
) -> crate::Result<Vec<CollectorKind>> {
    for name in cfg.collectors.keys().chain(enable).chain(disable) {
        if CollectorKind::parse(name).is_none() {
            let known: Vec<_> = CollectorKind::ALL.iter().map(|k| k.name()).collect();
            return Err(crate::Error::Config {
                detail: format!("unknown collector {name:?} (known: {})", known.join(", ")),
            });
        }
    }
    Ok(CollectorKind::ALL
        .iter()
        .copied()
        .filter(|k| {
            let mut on = cfg
                .collectors
                .get(k.name())
                .copied()
                .unwrap_or(k.default_enabled());
            if enable.iter().any(|n| n == k.name()) {
                on = true;
            }
            if disable.iter().any(|n| n == k.name()) {
                on = false;
            }
            on
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enable_disable_order() {
        let mut cfg = Config::default();
        let defaults: Vec<_> = CollectorKind::ALL
            .iter()
            .copied()
            .filter(|k| *k != CollectorKind::Nvml)
            .collect();
        assert_eq!(enabled(&cfg, &[], &[]).unwrap(), defaults);
        for k in &defaults {
            cfg.collectors.insert(k.name().into(), false);
        }
        assert!(enabled(&cfg, &[], &[]).unwrap().is_empty());
        assert_eq!(
            enabled(&cfg, &["probe".into()], &[]).unwrap(),
            [CollectorKind::Probe]
        );
        assert!(
            enabled(&cfg, &["probe".into()], &["probe".into()])
                .unwrap()
                .is_empty()
        );
        assert!(enabled(&cfg, &["nope".into()], &[]).is_err());
    }
}
