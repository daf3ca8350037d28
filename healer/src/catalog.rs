//! The condition catalog: condition → priority → SOP (a list of [`Step`]s), and the XID →
//! condition mapping. The default is embedded (`healer/catalog.yaml`); a file overrides or extends
//! it entry by entry. Pure: [`Catalog::load`] is the only function that reads a file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const DEFAULT_CATALOG: &str = include_str!("../catalog.yaml");
/// The repository's one XID table (NVIDIA's catalog plus Ark's columns): the XID → condition
/// mapping is its `ark_condition` column.
const XID_CSV: &str = include_str!("../../data/xid.csv");

/// The one parser of `data/xid.csv` (shared with the exporter and the tests).
#[allow(dead_code)] // the healer reads only the condition column
mod xid_table {
    include!(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/xid.rs"));
}

/// The taint the healer puts on nodes it takes out of service.
pub const UNHEALTHY_TAINT: &str = "ark.io/unhealthy";

/// Priority classes of the Aegis scheme (DESIGN.md, "Conditions and priorities").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PriorityClass {
    NotReady,
    Cordon,
    Emergency,
    CanIgnore,
    MustIgnore,
}

impl PriorityClass {
    pub fn of(priority: u32) -> Self {
        match priority {
            0 => PriorityClass::NotReady,
            1 => PriorityClass::Cordon,
            2..=99 => PriorityClass::Emergency,
            100..=999 => PriorityClass::CanIgnore,
            _ => PriorityClass::MustIgnore,
        }
    }
}

/// One SOP step. Serialized with an `action` tag, as in the ticket annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", deny_unknown_fields)]
pub enum Step {
    Cordon,
    Taint {
        #[serde(default = "default_taint_key")]
        key: String,
        #[serde(default = "default_taint_effect")]
        effect: String,
    },
    Drain {
        #[serde(default = "default_timeout", rename = "timeoutSeconds")]
        timeout_seconds: u64,
    },
    RunJob {
        template: String,
        #[serde(default = "default_timeout", rename = "timeoutSeconds")]
        timeout_seconds: u64,
        /// Does this Job take capacity away? Default: by template ([`DISRUPTIVE_TEMPLATES`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disruptive: Option<bool>,
    },
    WaitCondition {
        #[serde(default = "default_timeout", rename = "timeoutSeconds")]
        timeout_seconds: u64,
    },
    Uncordon,
    Escalate,
    Notify,
}

fn default_taint_key() -> String {
    UNHEALTHY_TAINT.to_owned()
}
fn default_taint_effect() -> String {
    "NoSchedule".to_owned()
}
fn default_timeout() -> u64 {
    600
}

impl Step {
    /// The action name recorded in the ticket (`Cordon`, `RunJob`, ...).
    pub fn action(&self) -> &'static str {
        match self {
            Step::Cordon => "Cordon",
            Step::Taint { .. } => "Taint",
            Step::Drain { .. } => "Drain",
            Step::RunJob { .. } => "RunJob",
            Step::WaitCondition { .. } => "WaitCondition",
            Step::Uncordon => "Uncordon",
            Step::Escalate => "Escalate",
            Step::Notify => "Notify",
        }
    }

    /// Does this step take capacity away (and so count against the disruption budget)? Cordon,
    /// Drain, a NoSchedule/NoExecute taint, and the Jobs that reboot, reset or repair (I1).
    pub fn disrupts(&self) -> bool {
        match self {
            Step::Cordon | Step::Drain { .. } => true,
            Step::Taint { effect, .. } => effect == "NoSchedule" || effect == "NoExecute",
            Step::RunJob {
                template,
                disruptive,
                ..
            } => disruptive.unwrap_or_else(|| DISRUPTIVE_TEMPLATES.contains(&template.as_str())),
            Step::WaitCondition { .. } | Step::Uncordon | Step::Escalate | Step::Notify => false,
        }
    }

    /// The step's time bound, for the steps that span several passes.
    pub fn timeout_seconds(&self) -> Option<u64> {
        match self {
            Step::Drain { timeout_seconds }
            | Step::RunJob {
                timeout_seconds, ..
            }
            | Step::WaitCondition { timeout_seconds } => Some(*timeout_seconds),
            _ => None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Taint { key, effect } => write!(f, "Taint({key}:{effect})"),
            Step::RunJob { template, .. } => write!(f, "RunJob({template})"),
            other => f.write_str(other.action()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    pub priority: u32,
    pub sop: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SopSpec {
    pub steps: Vec<Step>,
    /// Per-SOP dry-run: plan and record, never mutate.
    #[serde(default, rename = "dryRun")]
    pub dry_run: bool,
}

impl SopSpec {
    pub fn disrupts(&self) -> bool {
        self.steps.iter().any(Step::disrupts)
    }

    /// A stable digest of the step list (FNV-1a over its JSON): a ticket pins the SOP it follows
    /// by name and digest, so a changed catalog is noticed instead of remapping records (I6).
    pub fn digest(&self) -> String {
        let text = serde_json::to_string(&self.steps).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    conditions: BTreeMap<String, ConditionSpec>,
    #[serde(default)]
    sops: BTreeMap<String, SopSpec>,
    /// Extra or overriding XID → condition entries.
    #[serde(default)]
    xids: BTreeMap<u32, String>,
}

/// Conditions, SOPs and the XID mapping, validated (every condition names a known SOP, every
/// `RunJob` a known template).
#[derive(Debug, Clone)]
pub struct Catalog {
    pub conditions: BTreeMap<String, ConditionSpec>,
    pub sops: BTreeMap<String, SopSpec>,
    pub xids: BTreeMap<u32, String>,
}

/// Job templates shipped in `deploy/jobs/`.
pub const JOB_TEMPLATES: &[&str] = &["reboot", "gpu-reset", "healthcheck", "diagnose", "repair"];

/// At most this many steps per SOP: with every text field clipped, a ticket of that many
/// records always fits its 4 KiB annotation (property-tested in `lifecycle/tests.rs`).
pub const MAX_SOP_STEPS: usize = 16;

/// Job templates that take capacity away (a RunJob may override with `disruptive:`).
pub const DISRUPTIVE_TEMPLATES: &[&str] = &["reboot", "gpu-reset", "repair"];

/// XID → condition from `data/xid.csv` (rows without an `ark_condition` map to nothing).
fn xid_table() -> BTreeMap<u32, String> {
    xid_table::parse_xid_csv(XID_CSV)
        .expect("data/xid.csv is valid (tested)")
        .into_iter()
        .filter_map(|r| Some((r.xid, r.condition?)))
        .collect()
}

impl Catalog {
    /// The embedded default catalog.
    pub fn embedded() -> Result<Self> {
        Self::from_yaml(DEFAULT_CATALOG, None, "embedded")
    }

    /// Embedded default overridden by `text` (YAML); pure.
    pub fn embedded_with(text: &str, origin: &str) -> Result<Self> {
        Self::from_yaml(DEFAULT_CATALOG, Some(text), origin)
    }

    /// Embedded default, overridden entry by entry by `path` when given.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            None => Self::embedded(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                    path: p.to_owned(),
                    source,
                })?;
                Self::from_yaml(DEFAULT_CATALOG, Some(&text), &p.display().to_string())
            }
        }
    }

    /// Default text plus optional override text; pure.
    pub fn from_yaml(default: &str, overrides: Option<&str>, origin: &str) -> Result<Self> {
        let err = |origin: &str, e: &dyn fmt::Display| Error::Catalog {
            origin: origin.to_owned(),
            message: e.to_string(),
        };
        let base: CatalogFile = serde_yaml::from_str(default).map_err(|e| err("embedded", &e))?;
        let mut cat = Catalog {
            conditions: base.conditions,
            sops: base.sops,
            xids: xid_table(),
        };
        cat.xids.extend(base.xids);
        if let Some(text) = overrides {
            let over: CatalogFile = serde_yaml::from_str(text).map_err(|e| err(origin, &e))?;
            cat.conditions.extend(over.conditions);
            cat.sops.extend(over.sops);
            cat.xids.extend(over.xids);
        }
        cat.validate().map_err(|m| err(origin, &m))?;
        Ok(cat)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        for (name, c) in &self.conditions {
            if !self.sops.contains_key(&c.sop) {
                return Err(format!("condition {name} names unknown SOP {:?}", c.sop));
            }
        }
        for (name, s) in &self.sops {
            if s.steps.is_empty() {
                return Err(format!("SOP {name} has no steps"));
            }
            if s.steps.len() > MAX_SOP_STEPS {
                return Err(format!(
                    "SOP {name} has {} steps, more than {MAX_SOP_STEPS} (its ticket must fit 4 KiB)",
                    s.steps.len()
                ));
            }
            // I1: the budget counts unschedulable nodes, so the first step that takes capacity
            // away must be the Cordon that makes the node count.
            if let Some(first) = s.steps.iter().find(|st| st.disrupts())
                && *first != Step::Cordon
            {
                return Err(format!(
                    "SOP {name} disrupts before it cordons: its first disruptive step is {first}; \
                     put a Cordon first so the node counts against the disruption budget"
                ));
            }
            for step in &s.steps {
                if let Step::RunJob { template, .. } = step
                    && !JOB_TEMPLATES.contains(&template.as_str())
                {
                    return Err(format!(
                        "SOP {name} runs unknown job template {template:?} (known: {})",
                        JOB_TEMPLATES.join(", ")
                    ));
                }
            }
        }
        for (xid, c) in &self.xids {
            if !self.conditions.contains_key(c) {
                return Err(format!("XID {xid} maps to unknown condition {c:?}"));
            }
        }
        Ok(())
    }

    pub fn condition(&self, name: &str) -> Option<&ConditionSpec> {
        self.conditions.get(name)
    }

    pub fn sop(&self, name: &str) -> Option<&SopSpec> {
        self.sops.get(name)
    }

    /// The condition an alert stands for: its `condition` label when the catalog knows it, else
    /// the condition of its `xid` label.
    pub fn resolve<'a>(&'a self, condition: Option<&'a str>, xid: Option<&str>) -> Option<&'a str> {
        if let Some(c) = condition
            && self.conditions.contains_key(c)
        {
            return Some(c);
        }
        let xid: u32 = xid?.trim().parse().ok()?;
        self.xids.get(&xid).map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
