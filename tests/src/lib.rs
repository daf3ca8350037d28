//! Test harness for Ark's integration and end-to-end tests. It starts REAL services — Prometheus
//! and Alertmanager from Debian's packages, etcd + kube-apiserver + kube-controller-manager
//! built from Debian's `kubernetes` source package — on free 127.0.0.1 ports, waits for true
//! readiness (not just a listening socket), and stops them by PID when dropped.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let sink = ark_harness::WebhookSink::start().await?;
//! let am = ark_harness::Alertmanager::start(ark_harness::AmConfig::webhook(sink.url())).await?;
//! let kube = ark_harness::KubeCluster::start().await?;
//! let client = kube.client("admin").await?;
//! # Ok(()) }
//! ```
//!
//! Set `ARK_SKIP_SERVICES=1` (what `scripts/test --quick` does) to skip tests that need the
//! services; they say so on stderr via [`skip_without_services`].

pub mod kubernetes;
pub mod prometheus;
pub mod proxy;
pub mod rules;
pub mod service;
pub mod watch;
pub mod webhook;

use std::path::PathBuf;

pub use kubernetes::{FakeKubelet, KubeCluster, kube_bin_dir};
pub use prometheus::{
    Alertmanager, AmConfig, PromConfig, Prometheus, Target, is_inhibited, shipped_inhibit_rules,
};
pub use proxy::{DelayProxy, ProxyRecord};
pub use rules::scaled_alert_rules;
pub use service::{Service, ensure_port_free, free_port, prom_duration, wait_for};
pub use watch::CordonWatch;
pub use webhook::{Received, WebhookSink};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// Path of a workspace binary (`ark-exporter`, `ark-healer`): `$ARK_BIN_DIR/<name>`, else
/// `<root>/target/debug/<name>`. Panics with the command to run when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("ARK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build it first with `cargo build --workspace --bins` (scripts/test does)",
        p.display()
    );
    p
}

/// True (and a line on stderr naming the test) when service tests are switched off with
/// `ARK_SKIP_SERVICES=1`. Use as `if skip_without_services("name") { return Ok(()); }`.
pub fn skip_without_services(test: &str) -> bool {
    let skip = std::env::var("ARK_SKIP_SERVICES").is_ok_and(|v| v == "1");
    if skip {
        eprintln!(
            "SKIPPED {test}: ARK_SKIP_SERVICES=1 (needs real Prometheus/Alertmanager/kube-apiserver)"
        );
    }
    skip
}
