//! The Ark rule-pack format (wire types) and its loader. Old packs load unmodified; the Ark
//! extensions (`window`, `negate`, `count`, `join`, `severity`) are optional keys documented in
//! `rules/README.md`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::glob::Glob;
use crate::{Error, Result};

/// `manifest.yaml`.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub version: u32,
    #[serde(default)]
    pub packs: Vec<PackRef>,
    #[serde(default)]
    pub legacy: Option<Legacy>,
}

#[derive(Debug, Deserialize)]
pub struct PackRef {
    pub name: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub dir: String,
}

#[derive(Debug, Deserialize)]
pub struct Legacy {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_legacy_patterns")]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

fn yes() -> bool {
    true
}

fn default_legacy_patterns() -> Vec<String> {
    vec!["*.yaml".to_owned()]
}

/// One rule as written in a pack.
#[derive(Debug, Clone, Deserialize)]
pub struct RuleSpec {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    pub scene: String,
    pub priority: u32,
    #[serde(default)]
    pub reason_codes: Vec<String>,
    pub conditions: ConditionsSpec,
    #[serde(default)]
    pub root_cause_pattern: Option<RootCausePattern>,
    pub solution_steps: Vec<SolutionStep>,
    pub related_evidences: Vec<String>,
    pub applicability: Applicability,
    /// Extension: evaluate all conditions for the same `entity`, `pid` or `job`.
    #[serde(default)]
    pub join: Option<JoinKey>,
    /// Extension: `critical|warning|info`; default derived from `priority`.
    #[serde(default)]
    pub severity: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinKey {
    Entity,
    Pid,
    Job,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ConditionsSpec {
    List(Vec<Condition>),
    Group(Group),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Group {
    #[serde(default)]
    pub all: Option<Vec<Condition>>,
    #[serde(default)]
    pub any: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RootCausePattern {
    pub primary: String,
    #[serde(default)]
    pub secondary: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SolutionStep {
    #[serde(default)]
    pub step: Option<u32>,
    pub action: String,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub manual: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Applicability {
    #[serde(default)]
    pub min_confidence: Option<f64>,
    #[serde(default)]
    pub required_events: Vec<String>,
}

/// One condition; the extension keys sit beside `type`.
#[derive(Debug, Clone, Deserialize)]
pub struct Condition {
    #[serde(flatten)]
    pub kind: ConditionKind,
    /// Extension: how far back this condition looks (`30s`, `10m`, `1h` or seconds).
    #[serde(default)]
    pub window: Option<DurationSpec>,
    /// Extension: the condition holds when the inner test does not.
    #[serde(default)]
    pub negate: bool,
    /// Extension (event conditions): at least this many matching events in the window.
    #[serde(default)]
    pub count: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConditionKind {
    Event {
        event_type: String,
        #[serde(default)]
        entity_id_pattern: Option<String>,
        #[serde(default)]
        value_pattern: Option<String>,
        #[serde(default, deserialize_with = "lenient_f64")]
        value_threshold: Option<f64>,
    },
    Graph {
        edge_type: String,
        #[serde(default)]
        from_pattern: Option<String>,
        #[serde(default)]
        to_pattern: Option<String>,
    },
    Metric {
        #[serde(default)]
        node_type: Option<String>,
        #[serde(default)]
        entity_id_pattern: Option<String>,
        metrics: Vec<MetricCmp>,
    },
    Signal {
        signal: String,
        #[serde(default)]
        entity_id_pattern: Option<String>,
        #[serde(default)]
        op: Option<String>,
        #[serde(default)]
        target: Option<serde_yaml::Value>,
        #[serde(default)]
        value_type: Option<String>,
    },
    Any {
        conditions: Vec<Condition>,
    },
    All {
        conditions: Vec<Condition>,
    },
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetricCmp {
    pub key: String,
    pub op: String,
    pub target: serde_yaml::Value,
    #[serde(default)]
    pub value_type: Option<String>,
}

/// A number, or a string holding one (`"0.5"`): hand-written packs use both.
fn lenient_f64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<f64>, D::Error> {
    match Option::<serde_yaml::Value>::deserialize(d)? {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(serde_yaml::Value::Number(n)) => Ok(n.as_f64()),
        Some(serde_yaml::Value::String(s)) => s.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!("value_threshold {s:?} is not a number"))
        }),
        Some(other) => Err(serde::de::Error::custom(format!(
            "value_threshold must be a number, got {other:?}"
        ))),
    }
}

/// `30s`, `5m`, `2h`, `1500ms` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSpec(pub i64);

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        let parsed = match &v {
            serde_yaml::Value::Number(n) => n.as_f64().map(|s| (s * 1000.0) as i64),
            serde_yaml::Value::String(s) => parse_duration_ms(s),
            _ => None,
        };
        match parsed {
            Some(ms) if ms > 0 => Ok(DurationSpec(ms)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid duration {v:?}: expected e.g. 30s, 5m, 1h"
            ))),
        }
    }
}

/// Parses `30s`, `5m`, `2h`, `1d`, `1500ms` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v < 1e9).then_some((v * mult) as i64)
}

/// A rule with its resolved id and pack.
#[derive(Debug, Clone)]
pub struct LoadedRule {
    pub id: String,
    pub pack: String,
    pub file: PathBuf,
    pub spec: RuleSpec,
}

/// What a rules directory yielded.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<LoadedRule>,
    /// Files (or rules) skipped, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml") | Some("yml")
    )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if ft.is_file() && is_yaml(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// A rules file holds one rule, or a list of rules.
#[derive(Deserialize)]
#[serde(untagged)]
enum RuleFile {
    One(Box<RuleSpec>),
    Many(Vec<RuleSpec>),
}

/// Largest rule file read (a rules directory is configuration, not input, but stay bounded).
const MAX_RULE_FILE: u64 = 4 * 1024 * 1024;

fn load_file(path: &Path) -> std::result::Result<Vec<RuleSpec>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_RULE_FILE {
        return Err(format!("file larger than {MAX_RULE_FILE} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    match serde_yaml::from_str::<RuleFile>(&text) {
        Ok(RuleFile::One(r)) => Ok(vec![*r]),
        Ok(RuleFile::Many(v)) => Ok(v),
        // Re-parse as a single rule for a useful message.
        Err(_) => match serde_yaml::from_str::<RuleSpec>(&text) {
            Ok(r) => Ok(vec![r]),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Loads a rules directory (`manifest.yaml` + packs + legacy files). A file that fails to parse
/// is skipped and listed in [`RuleSet::skipped`]; with `strict` it is an error instead.
pub fn load_dir(dir: &Path, strict: bool) -> Result<RuleSet> {
    let manifest_path = dir.join("manifest.yaml");
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| Error::Io {
        path: manifest_path.clone(),
        source,
    })?;
    let manifest: Manifest = serde_yaml::from_str(&text).map_err(|e| Error::Rules {
        path: manifest_path.clone(),
        detail: e.to_string(),
    })?;
    if manifest.version != 1 {
        return Err(Error::Rules {
            path: manifest_path,
            detail: format!("unsupported manifest version {}", manifest.version),
        });
    }
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for pack in manifest.packs.iter().filter(|p| p.enabled) {
        let pdir = dir.join(&pack.dir);
        let mut found = Vec::new();
        if pdir.is_dir() {
            walk(&pdir, &mut found).map_err(|source| Error::Io {
                path: pdir.clone(),
                source,
            })?;
        }
        files.extend(found.into_iter().map(|f| (pack.name.clone(), f)));
    }
    if let Some(legacy) = manifest.legacy.as_ref().filter(|l| l.enabled) {
        let patterns: Vec<Glob> = legacy.patterns.iter().map(|p| Glob::new(p)).collect();
        let exclude: Vec<Glob> = legacy.exclude.iter().map(|p| Glob::new(p)).collect();
        let mut top: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        top.sort();
        for p in top {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name == "manifest.yaml"
                || !patterns.iter().any(|g| g.matches(name))
                || exclude.iter().any(|g| g.matches(name))
            {
                continue;
            }
            files.push(("legacy".to_owned(), p));
        }
        let ldir = dir.join("legacy");
        if ldir.is_dir() {
            let mut found = Vec::new();
            walk(&ldir, &mut found).map_err(|source| Error::Io {
                path: ldir.clone(),
                source,
            })?;
            files.extend(found.into_iter().map(|f| ("legacy".to_owned(), f)));
        }
    }
    let mut set = RuleSet::default();
    let mut ids = HashSet::new();
    for (pack, file) in files {
        let specs = match load_file(&file) {
            Ok(s) => s,
            Err(detail) => {
                if strict {
                    return Err(Error::Rules { path: file, detail });
                }
                set.skipped.push((file, detail));
                continue;
            }
        };
        for spec in specs {
            let id = spec
                .id
                .clone()
                .unwrap_or_else(|| format!("{pack}.{}", spec.scene));
            if !ids.insert(id.clone()) {
                let detail = format!("duplicate rule id {id}");
                if strict {
                    return Err(Error::Rules { path: file, detail });
                }
                set.skipped.push((file.clone(), detail));
                continue;
            }
            set.rules.push(LoadedRule {
                id,
                pack: pack.clone(),
                file: file.clone(),
                spec,
            });
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = r#"
id: network.tcp.retransmit_burst.v1
name: "TCP retransmit burst"
scene: "network.tcp.retransmit_burst"
priority: 80
reason_codes: ["TCP_RETRANSMIT_BURST"]
conditions:
  - type: signal
    signal: network.tcp.retransmit_rate_1m
    op: gte
    target: 0.05
  - type: any
    conditions:
      - {type: event, event_type: transport.drop, entity_id_pattern: "network-*|mlx5_*"}
      - {type: graph, edge_type: waits_on, to_pattern: "network-*"}
root_cause_pattern: {primary: "network", secondary: ["nic"]}
solution_steps:
  - {step: 1, action: "Check retransmit rate", command: "netstat -s", manual: false}
  - {step: 2, action: "Escalate", command: null}
related_evidences: ["transport.drop", "signal.network.tcp.retransmit_rate_1m"]
applicability: {min_confidence: 0.75, required_events: ["transport.drop"]}
"#;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn loads_packs_legacy_and_skips_bad_files() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "manifest.yaml",
            "version: 1\npacks:\n  - {name: network, enabled: true, dir: network}\n  - {name: off, enabled: false, dir: off}\n  - {name: empty, enabled: true, dir: empty}\nlegacy:\n  enabled: true\n  patterns: [\"*.yaml\"]\n  exclude: [\"manifest.yaml\", \"*/**\"]\n",
        );
        write(d.path(), "network/tcp/burst.yaml", RULE);
        write(d.path(), "network/fixtures/notes.txt", "not yaml");
        write(d.path(), "network/broken.yml", "id: [unclosed");
        write(d.path(), "off/x.yaml", RULE);
        std::fs::create_dir_all(d.path().join("empty")).unwrap();
        let legacy = RULE
            .replace("id: network.tcp.retransmit_burst.v1\n", "")
            .replace(
                "scene: \"network.tcp.retransmit_burst\"",
                "scene: legacy.scene",
            );
        write(d.path(), "old.yaml", &legacy);
        let set = load_dir(d.path(), false).unwrap();
        let ids: Vec<_> = set.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["network.tcp.retransmit_burst.v1", "legacy.legacy.scene"]
        );
        assert_eq!(set.skipped.len(), 1);
        assert!(
            load_dir(d.path(), true).is_err(),
            "strict mode fails on the broken file"
        );
        let r = &set.rules[0].spec;
        assert_eq!(r.solution_steps[1].command, None);
        assert!(!r.solution_steps[1].manual);
    }

    #[test]
    fn duplicate_ids_and_bad_versions() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "manifest.yaml",
            "version: 1\npacks:\n  - {name: a, dir: a}\n",
        );
        write(d.path(), "a/1.yaml", RULE);
        write(d.path(), "a/2.yaml", RULE);
        let set = load_dir(d.path(), false).unwrap();
        assert_eq!(set.rules.len(), 1);
        assert!(set.skipped[0].1.contains("duplicate"));
        write(d.path(), "manifest.yaml", "version: 2\npacks: []\n");
        assert!(load_dir(d.path(), false).is_err());
        write(d.path(), "manifest.yaml", "version: [\n");
        assert!(load_dir(d.path(), false).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(load_dir(empty.path(), false).is_err(), "no manifest");
    }

    #[test]
    fn group_forms_and_extensions_parse() {
        let text = RULE.replace(
            "conditions:\n  - type: signal",
            "join: entity\nseverity: critical\nconditions:\n  all:\n  - type: signal\n    window: 5m\n    negate: true",
        );
        // Re-indent is not needed: the list items are nested under `all:` at the same depth.
        let spec: RuleSpec = serde_yaml::from_str(&text).unwrap();
        assert_eq!(spec.join, Some(JoinKey::Entity));
        match spec.conditions {
            ConditionsSpec::Group(g) => {
                let all = g.all.unwrap();
                assert!(all[0].negate);
                assert_eq!(all[0].window, Some(DurationSpec(300_000)));
            }
            ConditionsSpec::List(_) => panic!("expected a group"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("1500ms"), Some(1500));
        assert_eq!(parse_duration_ms("2"), Some(2000));
        assert_eq!(parse_duration_ms("-1s"), None);
        assert_eq!(parse_duration_ms("abc"), None);
    }
}
