//! Ark node exporter: collectors and probes produce [`event::Event`]s, one pipeline thread
//! applies them to the causal [`graph::Graph`] and the [`rules`] engine, and publishes bounded
//! metric snapshots that `/metrics` only encodes.
//!
//! Map of the crate:
//! - [`event`]: the Ark probe protocol (JSON Lines) and its parser;
//! - [`graph`]: the causal graph (Consumes / WaitsOn / BlockedBy);
//! - [`rules`]: Ark rule packs, loader and incremental engine;
//! - [`pipeline`]: the single writer that owns graph and engine, and the handles to reach it;
//! - [`collectors`]: event sources (`probe`, the procfs/sysfs host collectors, `pods`; eBPF
//!   and NVML plug in the same way);
//! - [`gpu_map`]: PCI bus id → GPU index, shared by the collectors;
//! - [`pods`]: pod attribution (cgroup → pod UID → namespace/name/container; cgroup id → pod);
//! - [`metrics`]: explicit registry, snapshot publishing, self-metrics;
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/api/v1/why/{pid}`;
//! - [`cli`], [`config`], [`bench`]: the binary's commands, configuration and benchmarks.

pub mod bench;
pub mod cli;
pub mod collectors;
pub mod config;
mod error;
pub mod event;
pub mod gpu_faults;
pub mod gpu_map;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod ratelimit;
pub mod rules;

pub use error::{Error, Result};

/// Entry point used by `main.rs`.
pub fn cli_main() -> anyhow::Result<()> {
    cli::main()
}
