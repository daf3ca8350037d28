//! The condition catalog: condition → priority → SOP (a list of [`Step`]s), and the XID →
//! condition mapping. The default is embedded (`healer/catalog.yaml`); a file overrides or extends
//! it entry by entry. Pure: [`Catalog::load`] is the only function that reads a file.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const DEFAULT_CATALOG: &str = include_str!("../catalog.yaml");
/// NVIDIA's XID catalog (copy of `shared/data/xid-catalog.csv`): the source of the XID → condition
/// mapping, derived from its `immediate_action` column by [`condition_for_action`].
const XID_CATALOG: &str = include_str!("../data/xid-catalog.csv");

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

/// Maps NVIDIA's `immediate_action` to a catalog condition (see `data/xid-catalog.csv`).
/// DESIGN.md's lists win where they are more specific (e.g. XID 48 is GpuXidFatal although its
/// action is `WORKFLOW_XID_48`; XID 43 is an application error although its action is `IGNORE`).
pub fn condition_for_action(xid: u32, action: &str) -> Option<&'static str> {
    match xid {
        48 => return Some("GpuXidFatal"),
        13 | 31 | 43 | 45 | 68 | 94 => return Some("GpuXidApplication"),
        _ => {}
    }
    match action {
        "RESTART_BM" => Some("GpuFellOffBus"),
        "RESET_GPU" => Some("GpuXidFatal"),
        "WORKFLOW_NVLINK_ERR" | "WORKFLOW_NVLINK5_ERR" => Some("GpuNvlinkDown"),
        "RESTART_APP" => Some("GpuXidApplication"),
        _ => None,
    }
}

/// Derives XID → condition from the embedded CSV (`xid,mnemonic,description,immediate_action,...`).
fn xid_table() -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for line in XID_CATALOG.lines().skip(1) {
        let fields = split_csv(line);
        let (Some(xid), Some(action)) = (fields.first(), fields.get(3)) else {
            continue;
        };
        let Ok(xid) = xid.parse::<u32>() else {
            continue;
        };
        if let Some(c) = condition_for_action(xid, action) {
            out.insert(xid, c.to_owned());
        }
    }
    out
}

/// Minimal CSV split with double-quoted fields (the catalog quotes descriptions with commas).
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
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
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_matches_design_priorities() {
        let c = Catalog::embedded().unwrap();
        let p = |n: &str| c.condition(n).unwrap().priority;
        assert_eq!(p("NodeNotReady"), 0);
        assert_eq!(p("NodeCordoned"), 1);
        assert_eq!(p("GpuFellOffBus"), 2);
        for n in [
            "GpuXidFatal",
            "GpuEccDoubleBit",
            "GpuRowRemapFailure",
            "GpuHung",
        ] {
            assert_eq!(p(n), 3, "{n}");
        }
        assert_eq!(p("GpuNvlinkDown"), 4);
        assert_eq!(p("IbPortDown"), 5);
        assert_eq!(p("IbLinkFlapping"), 6);
        assert_eq!(p("PcieLinkDegraded"), 10);
        assert_eq!(p("NetworkRetransmitStorm"), 20);
        assert_eq!(p("DiskIoSlow"), 30);
        assert_eq!(p("WorkloadStalled"), 40);
        assert_eq!(p("GpuThermalThrottle"), 100);
        assert_eq!(p("GpuHighTemperature"), 100);
        assert_eq!(p("GpuXidApplication"), 1000);
    }

    #[test]
    fn xid_mapping_is_derived_from_the_nvidia_catalog() {
        let c = Catalog::embedded().unwrap();
        assert_eq!(c.resolve(None, Some("79")), Some("GpuFellOffBus"));
        for xid in [48, 64, 95, 62, 109, 119, 120, 136, 140, 143, 155, 156, 158] {
            assert_eq!(
                c.resolve(None, Some(&xid.to_string())),
                Some("GpuXidFatal"),
                "{xid}"
            );
        }
        assert_eq!(c.resolve(None, Some("74")), Some("GpuNvlinkDown"));
        for xid in [13, 31, 43, 45, 68, 94] {
            assert_eq!(
                c.resolve(None, Some(&xid.to_string())),
                Some("GpuXidApplication")
            );
        }
        // IGNORE-only XIDs (63: remapping event) map to nothing.
        assert_eq!(c.resolve(None, Some("63")), None);
        assert_eq!(c.resolve(None, Some("not-a-number")), None);
        // The condition label wins when known; unknown falls back to xid.
        assert_eq!(c.resolve(Some("GpuHung"), Some("79")), Some("GpuHung"));
        assert_eq!(c.resolve(Some("Bogus"), Some("79")), Some("GpuFellOffBus"));
        assert_eq!(c.resolve(Some("Bogus"), None), None);
    }

    #[test]
    fn default_sops_follow_the_xid_guidance() {
        let c = Catalog::embedded().unwrap();
        let sop = |cond: &str| &c.sop(&c.condition(cond).unwrap().sop).unwrap().steps;
        assert!(sop("GpuFellOffBus").contains(&Step::RunJob {
            template: "reboot".into(),
            timeout_seconds: 1200,
            disruptive: None,
        }));
        assert!(
            sop("GpuXidFatal")
                .iter()
                .any(|s| matches!(s, Step::RunJob { template, .. } if template == "gpu-reset"))
        );
        let nvlink = sop("GpuNvlinkDown");
        assert_eq!(nvlink[0], Step::Cordon);
        assert!(
            nvlink
                .iter()
                .any(|s| matches!(s, Step::RunJob { template, .. } if template == "diagnose"))
        );
        assert_eq!(sop("GpuXidApplication"), &vec![Step::Notify]);
    }

    #[test]
    fn file_overrides_entries_and_is_validated() {
        let over = "conditions:\n  GpuHung: {priority: 7, sop: notify}\n  Custom: {priority: 50, sop: quiet}\nsops:\n  quiet: {steps: [{action: Notify}], dryRun: true}\n";
        let c = Catalog::from_yaml(DEFAULT_CATALOG, Some(over), "test").unwrap();
        assert_eq!(c.condition("GpuHung").unwrap().priority, 7);
        assert!(c.sop("quiet").unwrap().dry_run);
        assert_eq!(c.condition("NodeNotReady").unwrap().priority, 0);

        let bad_sop = "conditions:\n  X: {priority: 5, sop: nope}\n";
        let e = Catalog::from_yaml(DEFAULT_CATALOG, Some(bad_sop), "f.yaml").unwrap_err();
        assert!(e.to_string().contains("unknown SOP"), "{e}");
        let bad_job = "sops:\n  s: {steps: [{action: RunJob, template: format-disk}]}\n";
        assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(bad_job), "f").is_err());
        let unknown_key = "conditions:\n  X: {priority: 5, sop: notify, colour: red}\n";
        assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(unknown_key), "f").is_err());
    }

    #[test]
    fn a_sop_that_disrupts_before_it_cordons_is_refused() {
        // Issue 14 scenario 5: this SOP took 100 nodes out with a budget of 2.
        let sneaky = "sops:\n  sneaky: {steps: [{action: Taint, key: ark.io/unhealthy, effect: NoExecute}, {action: RunJob, template: reboot}]}\n";
        let e = Catalog::from_yaml(DEFAULT_CATALOG, Some(sneaky), "f.yaml").unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("sneaky") && e.contains("disrupts before it cordons"),
            "{e}"
        );
        let job_first =
            "sops:\n  j: {steps: [{action: RunJob, template: gpu-reset}, {action: Cordon}]}\n";
        assert!(Catalog::from_yaml(DEFAULT_CATALOG, Some(job_first), "f").is_err());
        // A diagnose Job first is fine (not disruptive), and so is a Job marked harmless.
        let ok = "sops:\n  d: {steps: [{action: RunJob, template: diagnose}, {action: Cordon}, {action: Taint, effect: NoExecute}]}\n  r: {steps: [{action: RunJob, template: repair, disruptive: false}]}\n";
        Catalog::from_yaml(DEFAULT_CATALOG, Some(ok), "f").unwrap();
        let soft = "sops:\n  s: {steps: [{action: Taint, effect: PreferNoSchedule}]}\n";
        Catalog::from_yaml(DEFAULT_CATALOG, Some(soft), "f").unwrap();
    }

    #[test]
    fn what_disrupts_and_the_digest_pins_the_steps() {
        let c = Catalog::embedded().unwrap();
        let reboot = c.sop("reboot").unwrap();
        assert!(reboot.disrupts());
        assert!(!c.sop("diagnose-notify").unwrap().disrupts());
        assert!(!c.sop("verify-and-uncordon").unwrap().disrupts());
        assert_eq!(reboot.digest(), c.sop("reboot").unwrap().digest());
        assert_ne!(reboot.digest(), c.sop("gpu-reset").unwrap().digest());
        let taint = |effect: &str| Step::Taint {
            key: UNHEALTHY_TAINT.into(),
            effect: effect.into(),
        };
        assert!(taint("NoExecute").disrupts() && taint("NoSchedule").disrupts());
        assert!(!taint("PreferNoSchedule").disrupts());
    }

    #[test]
    fn priority_classes() {
        assert_eq!(PriorityClass::of(0), PriorityClass::NotReady);
        assert_eq!(PriorityClass::of(1), PriorityClass::Cordon);
        assert_eq!(PriorityClass::of(2), PriorityClass::Emergency);
        assert_eq!(PriorityClass::of(99), PriorityClass::Emergency);
        assert_eq!(PriorityClass::of(100), PriorityClass::CanIgnore);
        assert_eq!(PriorityClass::of(999), PriorityClass::CanIgnore);
        assert_eq!(PriorityClass::of(1000), PriorityClass::MustIgnore);
    }
}
