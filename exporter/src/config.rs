//! What the exporter does: figment layers defaults → TOML/YAML file (`--config`) → `ARK_*`
//! environment (`__` separates sections: `ARK_GRAPH__MAX_NODES=50000`). Unknown keys are errors.
//! How the process runs (listen address, node name, log format) are CLI flags, see [`crate::cli`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml, Yaml};
use serde::Deserialize;

use crate::graph::GraphLimits;
use crate::pipeline::{PipelineConfig, TimestampPolicy};
use crate::rules::EngineConfig;
use crate::rules::format::DurationSpec;
use crate::{Error, Result};

/// Top-level keys, used to pick our variables out of `ARK_*` (other tools use that prefix too).
const TOP_KEYS: [&str; 11] = [
    "nvml",
    "kmsg",
    "probes",
    "ebpf",
    "rules_dir",
    "collectors",
    "graph",
    "rules",
    "pipeline",
    "probe",
    "host",
];

/// An external probe: a path, or `{path, args, name}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ProbeSpec {
    Path(String),
    Full {
        path: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        name: Option<String>,
    },
}

impl ProbeSpec {
    pub fn path(&self) -> &str {
        match self {
            ProbeSpec::Path(p) | ProbeSpec::Full { path: p, .. } => p,
        }
    }
    pub fn args(&self) -> &[String] {
        match self {
            ProbeSpec::Path(_) => &[],
            ProbeSpec::Full { args, .. } => args,
        }
    }
    /// The `probe` label: the configured name, else the file name of the executable.
    pub fn name(&self) -> String {
        match self {
            ProbeSpec::Full { name: Some(n), .. } => n.clone(),
            _ => Path::new(self.path()).file_name().map_or_else(
                || self.path().to_owned(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }
}

/// `[graph]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphSection {
    pub ttl: DurationSpec,
    pub error_ttl: DurationSpec,
    pub max_nodes: usize,
    pub max_edges: usize,
    pub qdepth_waits_on: f64,
    /// Byte budget of the graph (see `GraphLimits::max_bytes`).
    pub max_bytes: usize,
}

impl Default for GraphSection {
    fn default() -> Self {
        let d = GraphLimits::default();
        GraphSection {
            ttl: DurationSpec(d.ttl_ms),
            error_ttl: DurationSpec(d.error_ttl_ms),
            max_nodes: d.max_nodes,
            max_edges: d.max_edges,
            qdepth_waits_on: d.qdepth_waits_on,
            max_bytes: d.max_bytes,
        }
    }
}

/// `[rules]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesSection {
    pub default_window: DurationSpec,
    pub max_keys: usize,
    /// A rule file that fails to parse is fatal instead of skipped.
    pub strict: bool,
}

impl Default for RulesSection {
    fn default() -> Self {
        let d = EngineConfig::default();
        RulesSection {
            default_window: DurationSpec(d.default_window_ms),
            max_keys: d.max_keys,
            strict: false,
        }
    }
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSection {
    pub queue_capacity: usize,
    pub max_future_skew: DurationSpec,
    pub max_past: DurationSpec,
    /// `clamp` (default) or `drop` events with out-of-range timestamps.
    pub timestamp_policy: TimestampPolicy,
    pub replay_max_gap: DurationSpec,
    pub series_budget: usize,
    pub walk_budget: usize,
    pub publish_interval: DurationSpec,
    pub tick_interval: DurationSpec,
    pub log_interval: DurationSpec,
    /// Deprecated and ignored (the RSS shedder is gone; `[graph] max_bytes` bounds the graph):
    /// still accepted so that an older configuration keeps loading (CHANGELOG.md, "Upgrade and
    /// rollback policy"); [`Config::deprecations`] says so.
    pub max_rss_bytes: Option<u64>,
}

impl Default for PipelineSection {
    fn default() -> Self {
        let d = PipelineConfig::default();
        PipelineSection {
            queue_capacity: d.queue_capacity,
            max_future_skew: DurationSpec(d.max_future_ms),
            max_past: DurationSpec(d.max_past_ms),
            timestamp_policy: d.timestamp_policy,
            replay_max_gap: DurationSpec(d.replay_max_gap_ms),
            series_budget: d.series_budget,
            walk_budget: d.walk_budget,
            publish_interval: DurationSpec(d.publish_interval.as_millis() as i64),
            tick_interval: DurationSpec(d.tick_interval.as_millis() as i64),
            log_interval: DurationSpec(d.log_interval.as_millis() as i64),
            max_rss_bytes: None,
        }
    }
}

/// `[probe]`: restart policy of external probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSection {
    pub backoff_initial: DurationSpec,
    pub backoff_max: DurationSpec,
    /// A probe that ran this long before exiting restarts with the initial backoff again.
    pub backoff_reset_after: DurationSpec,
}

impl Default for ProbeSection {
    fn default() -> Self {
        ProbeSection {
            backoff_initial: DurationSpec(100),
            backoff_max: DurationSpec(30_000),
            backoff_reset_after: DurationSpec(10_000),
        }
    }
}

/// `[ebpf]`: the eBPF collector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EbpfSection {
    /// Block I/O slower than this links the issuing process WaitsOn the device.
    pub slow_io: DurationSpec,
    /// How often the kernel maps are read into metrics.
    pub poll_interval: DurationSpec,
    /// At most one retransmit event per flow per this interval (counts stay exact).
    pub retransmit_event_gap: DurationSpec,
}

impl Default for EbpfSection {
    fn default() -> Self {
        EbpfSection {
            slow_io: DurationSpec(100),
            poll_interval: DurationSpec(1000),
            retransmit_event_gap: DurationSpec(1000),
        }
    }
}

impl EbpfSection {
    pub fn settings(&self) -> crate::collectors::ebpf::EbpfSettings {
        crate::collectors::ebpf::EbpfSettings {
            slow_io: ms(self.slow_io),
            poll_interval: ms(self.poll_interval),
            retransmit_event_gap: ms(self.retransmit_event_gap),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub probes: Vec<ProbeSpec>,
    pub rules_dir: Option<PathBuf>,
    /// Collector name → enabled (overrides the collector's default).
    pub collectors: BTreeMap<String, bool>,
    pub graph: GraphSection,
    pub rules: RulesSection,
    pub pipeline: PipelineSection,
    pub probe: ProbeSection,
    pub ebpf: EbpfSection,
    /// `[nvml]`: the NVML collector (see `docs/nvml.md`).
    pub nvml: crate::collectors::nvml::NvmlSection,
    /// `[kmsg]`: the kernel-log collector (see `docs/kmsg.md`).
    pub kmsg: crate::collectors::kmsg::KmsgSection,
    /// `[host]`: procfs/sysfs collectors and pod attribution.
    pub host: crate::collectors::host::HostConfig,
}

fn ms(d: DurationSpec) -> Duration {
    Duration::from_millis(d.0.max(1) as u64)
}

impl Config {
    /// Defaults → file (TOML, or YAML by extension) → `ARK_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        let mut fig = Figment::new();
        if let Some(f) = file {
            if !f.is_file() {
                return Err(Error::Config {
                    detail: format!("config file {} not found", f.display()),
                });
            }
            fig = match f.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") => fig.merge(Yaml::file(f)),
                _ => fig.merge(Toml::file(f)),
            };
        }
        let env = Env::prefixed("ARK_")
            .filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                TOP_KEYS
                    .iter()
                    .any(|t| k == *t || k.starts_with(&format!("{t}__")))
            })
            .split("__");
        fig.merge(env).extract().map_err(|e| Error::Config {
            detail: e.to_string(),
        })
    }

    /// Keys this configuration sets that this release accepts but ignores, with what replaces
    /// them: logged at start-up as warnings.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.pipeline.max_rss_bytes.is_some() {
            out.push(
                "[pipeline] max_rss_bytes is deprecated and ignored: the graph is bounded by \
                 [graph] max_bytes"
                    .to_owned(),
            );
        }
        out
    }

    /// How often a repeating warning is logged at most (`[pipeline] log_interval`).
    pub fn log_interval(&self) -> Duration {
        ms(self.pipeline.log_interval)
    }

    /// The pipeline's view of this config.
    pub fn pipeline(&self) -> PipelineConfig {
        let p = &self.pipeline;
        PipelineConfig {
            graph: GraphLimits {
                ttl_ms: self.graph.ttl.0,
                error_ttl_ms: self.graph.error_ttl.0,
                max_nodes: self.graph.max_nodes.max(1),
                max_edges: self.graph.max_edges.max(1),
                qdepth_waits_on: self.graph.qdepth_waits_on,
                max_bytes: self.graph.max_bytes.max(64 * 1024),
            },
            engine: EngineConfig {
                default_window_ms: self.rules.default_window.0,
                max_keys: self.rules.max_keys,
                ..EngineConfig::default()
            },
            max_future_ms: p.max_future_skew.0,
            replay_max_gap_ms: p.replay_max_gap.0,
            max_past_ms: p.max_past.0,
            timestamp_policy: p.timestamp_policy,
            series_budget: p.series_budget,
            walk_budget: p.walk_budget,
            queue_capacity: p.queue_capacity,
            queue_max_bytes: PipelineConfig::default().queue_max_bytes,
            publish_interval: ms(p.publish_interval),
            tick_interval: ms(p.tick_interval),
            log_interval: ms(p.log_interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deprecated_key_still_loads_and_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ark.toml");
        std::fs::write(&f, "[pipeline]\nmax_rss_bytes = 268435456\n").unwrap();
        let c = Config::load(Some(&f)).unwrap();
        assert_eq!(c.deprecations().len(), 1, "{:?}", c.deprecations());
        assert!(Config::load(None).unwrap().deprecations().is_empty());
    }

    #[test]
    fn defaults_file_and_unknown_keys() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.graph.max_nodes, 200_000);
        assert_eq!(c.pipeline.series_budget, 1000);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ark.toml");
        std::fs::write(
            &f,
            "probes = [\"/bin/true\", {path = \"/bin/echo\", args = [\"x\"], name = \"echo1\"}]\n\
             [graph]\nttl = \"2m\"\nmax_nodes = 10\n[collectors]\nprobe = false\n",
        )
        .unwrap();
        let c = Config::load(Some(&f)).unwrap();
        assert_eq!(c.graph.ttl, DurationSpec(120_000));
        assert_eq!(c.graph.max_nodes, 10);
        assert_eq!(c.probes[0].name(), "true");
        assert_eq!(c.probes[1].name(), "echo1");
        assert_eq!(c.probes[1].args(), ["x"]);
        assert_eq!(c.collectors.get("probe"), Some(&false));
        std::fs::write(&f, "[graph]\nmax_nodez = 1\n").unwrap();
        assert!(Config::load(Some(&f)).is_err());
        std::fs::write(&f, "bogus = 1\n").unwrap();
        assert!(Config::load(Some(&f)).is_err());
        std::fs::write(&f, "[graph]\nttl = \"soon\"\n").unwrap();
        assert!(Config::load(Some(&f)).is_err());
        assert!(Config::load(Some(&d.path().join("missing.toml"))).is_err());
    }
}
