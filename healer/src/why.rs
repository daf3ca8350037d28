//! `ark-healer why --job ID`: the cross-node causal chain of one training job, read from
//! Prometheus' HTTP API (instant queries only) and, when a cluster is reachable, the healer's
//! tickets on the culprit nodes. Read-only: it never writes to Prometheus or Kubernetes.
//!
//! Split as the rest of the crate: [`Prometheus`] does the HTTP (bounded in bytes and time),
//! [`parse_query_response`] is the pure parser of one answer, [`assemble`] is the pure
//! classification of the gathered series into culprits, victims and processes, [`tickets`]
//! reads Node annotations, [`write_text`] renders. The JSON shape is [`Why`] (schema
//! [`SCHEMA`], documented in docs/why.md).
//!
//! Sources, in order of preference:
//! * culprits/victims: the recording rules `job_node:ark_job_culprit:max` and
//!   `job_node:ark_job_victim:max` (alerts/job.rules.yml) when they have series for the job,
//!   else the same classification computed here from raw `ark_root_cause` / `ark_waits_on`;
//! * since when: the earliest `ALERTS_FOR_STATE` (its value is the alert's `activeAt`, pending
//!   included) of `JobBlockedByNode` and of `WorkloadStalled` on that node and resource, else the
//!   first sample of the root-cause series within the last hour (15 s resolution).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::k8s::Kube;
use crate::ticket::Ticket;
use crate::{Error, Result};

/// Schema id of the JSON output.
pub const SCHEMA: &str = "ark.io/why/v1";
/// Largest answer read from Prometheus for one query.
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;
/// Every label value kept from an answer is clipped to this many bytes (STYLE 18).
const LABEL_MAX: usize = 256;
/// A job id longer than this cannot be a real one (the exporter clips ids to 128 bytes).
const JOB_ID_MAX: usize = 1024;
/// How far back the last-resort "since" looks, and at which resolution.
const FIRST_SEEN_WINDOW: &str = "1h:15s";
/// The `cause` of a root cause that is only a wait, not an error.
const WAITS_ON: &str = "waits_on";

pub const CULPRIT_RULE: &str = "job_node:ark_job_culprit:max";
pub const VICTIM_RULE: &str = "job_node:ark_job_victim:max";
pub const VICTIM_COUNT_RULE: &str = "job:ark_job_victim_nodes:count";
pub const BLOCKED_ALERT: &str = "JobBlockedByNode";
pub const STALLED_ALERT: &str = "WorkloadStalled";

/// One series of an instant vector: labels (clipped) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A PromQL string literal (double-quoted) holding `s`.
pub fn promql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Checks a `--job` value before it is put into a query.
pub fn validate_job_id(job_id: &str) -> Result<()> {
    let bad = |message: &str| Error::Config {
        message: format!("--job: {message}"),
    };
    if job_id.is_empty() {
        return Err(bad("empty (the job_id label of the exporter's series)"));
    }
    if job_id.len() > JOB_ID_MAX {
        return Err(bad(&format!(
            "{} bytes, over {JOB_ID_MAX} (job ids are at most 128 bytes in Ark's metrics)",
            job_id.len()
        )));
    }
    if job_id.chars().any(char::is_control) {
        return Err(bad("contains control characters"));
    }
    Ok(())
}

/// The instant queries `why` runs for one job, all at the same evaluation time.
#[derive(Debug, Clone)]
pub struct Queries {
    pub waits: String,
    pub root_causes: String,
    pub blocked_by: String,
    pub culprit_rule: String,
    pub victim_rule: String,
    pub victim_count: String,
    pub alerts: String,
    pub alerts_for_state: String,
    pub first_seen: String,
    pub job_processes: String,
    pub scenes: String,
}

impl Queries {
    pub fn for_job(job_id: &str) -> Self {
        let j = format!("job_id={}", promql_string(job_id));
        let alerts = format!("alertname=~\"{BLOCKED_ALERT}|{STALLED_ALERT}\", {j}");
        Queries {
            waits: format!("ark_waits_on{{{j}}} > 0"),
            root_causes: format!("ark_root_cause{{{j}}} > 0"),
            // The errors behind each culprit resource, on the culprit's node only.
            blocked_by: format!(
                "(ark_blocked_by > 0) and on (node, resource) \
                 (ark_root_cause{{{j}, cause!=\"{WAITS_ON}\"}} > 0)"
            ),
            culprit_rule: format!("{CULPRIT_RULE}{{{j}}} > 0"),
            victim_rule: format!("{VICTIM_RULE}{{{j}}} > 0"),
            victim_count: format!("{VICTIM_COUNT_RULE}{{{j}}}"),
            alerts: format!("ALERTS{{{alerts}}}"),
            alerts_for_state: format!("ALERTS_FOR_STATE{{{alerts}}}"),
            first_seen: format!(
                "min by (node, resource, cause) (min_over_time(timestamp(\
                 ark_root_cause{{{j}, cause!=\"{WAITS_ON}\"}} > 0)[{FIRST_SEEN_WINDOW}]))"
            ),
            job_processes: format!("ark_job_processes{{{j}}}"),
            scenes: format!("ark_scene_active{{{j}}} > 0"),
        }
    }
}

/// What Prometheus answered to [`Queries`].
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub waits: Vec<Sample>,
    pub root_causes: Vec<Sample>,
    pub blocked_by: Vec<Sample>,
    pub culprit_rule: Vec<Sample>,
    pub victim_rule: Vec<Sample>,
    pub victim_count: Vec<Sample>,
    pub alerts: Vec<Sample>,
    pub alerts_for_state: Vec<Sample>,
    pub first_seen: Vec<Sample>,
    pub job_processes: Vec<Sample>,
    pub scenes: Vec<Sample>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiAnswer {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiData {
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct ApiSample {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

fn clip(mut s: String) -> String {
    crate::ticket::clip_to(&mut s, LABEL_MAX);
    s
}

/// Parses one `/api/v1/query` answer (tolerant of unknown fields; strict on what is used):
/// the instant vector, or a message saying what is wrong with it.
pub fn parse_query_response(body: &[u8]) -> std::result::Result<Vec<Sample>, String> {
    let answer: ApiAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("not a Prometheus API answer (invalid JSON: {e})"))?;
    if answer.status != "success" {
        return Err(format!(
            "status {:?}: {}: {}",
            answer.status,
            answer.error_type.as_deref().unwrap_or("?"),
            answer.error.as_deref().unwrap_or("no error message")
        ));
    }
    let data = answer
        .data
        .ok_or("a success without `data` (not a Prometheus API answer)")?;
    if data.result_type != "vector" {
        return Err(format!(
            "result type {:?}, expected an instant vector",
            data.result_type
        ));
    }
    let raw: Vec<ApiSample> = serde_json::from_value(data.result)
        .map_err(|e| format!("`data.result` is not a vector of samples: {e}"))?;
    Ok(raw
        .into_iter()
        .map(|s| Sample {
            labels: s
                .metric
                .into_iter()
                .map(|(k, v)| (clip(k), clip(v)))
                .collect(),
            value: s.value.1.parse().unwrap_or(f64::NAN),
        })
        .collect())
}

/// The full chain of an error's causes on one line (reqwest hides "connection refused" there).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        src = c.source();
    }
    s
}

/// Printable, short: control characters (terminal escapes) become `?`, at most `max` bytes.
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if out.len() > max {
        // The ellipsis is 3 bytes and counts against `max`.
        crate::ticket::clip_to(&mut out, max.saturating_sub('…'.len_utf8()));
        out.push('…');
    }
    out
}

/// Prometheus' HTTP API, for instant queries; every answer bounded in bytes and time.
#[derive(Clone)]
pub struct Prometheus {
    base: String,
    /// `base` without user:password, for messages and the output.
    shown: String,
    http: reqwest::Client,
    timeout: Duration,
    max_bytes: usize,
}

impl Prometheus {
    pub fn new(url: &str, timeout: Duration, max_bytes: usize) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Config {
                message: format!(
                    "--prometheus {url:?} must start with http:// or https:// \
                     (e.g. http://prometheus:9090)"
                ),
            });
        }
        let mut shown = reqwest::Url::parse(&base).map_err(|e| Error::Config {
            message: format!("--prometheus is not a valid URL: {e}"),
        })?;
        // Basic-auth credentials in the URL are sent (reqwest moves them to a header) but never
        // printed.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let shown = shown.as_str().trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::Config {
                message: format!("Prometheus client: {e}"),
            })?;
        Ok(Prometheus {
            base,
            shown,
            http,
            timeout,
            max_bytes,
        })
    }

    /// The base URL as printed: without credentials.
    pub fn url(&self) -> &str {
        &self.shown
    }

    fn err(&self, message: String) -> Error {
        Error::Prometheus {
            url: self.shown.clone(),
            message,
        }
    }

    /// One instant query evaluated at `at`.
    pub async fn query(&self, promql: &str, at: Timestamp) -> Result<Vec<Sample>> {
        let endpoint = format!("{}/api/v1/query", self.base);
        let time = format!("{:.3}", at.as_millisecond() as f64 / 1000.0);
        let q = printable(promql, 160);
        let send_err = |e: reqwest::Error| {
            let e = e.without_url();
            if e.is_timeout() {
                self.err(format!(
                    "did not answer within {} s (query `{q}`)",
                    self.timeout.as_secs()
                ))
            } else if e.is_connect() {
                self.err(format!("not reachable: {}", chain(&e)))
            } else {
                self.err(format!("GET /api/v1/query: {}", chain(&e)))
            }
        };
        let mut resp = self
            .http
            .get(&endpoint)
            .query(&[("query", promql), ("time", time.as_str())])
            .send()
            .await
            .map_err(send_err)?;
        let status = resp.status();
        // Read in chunks and stop at the bound, whatever Content-Length announces.
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(send_err)? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(self.err(format!(
                    "answer to `{q}` is over the {}-byte limit",
                    self.max_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            // Prometheus explains a 4xx/5xx in its JSON; anything else is shown, shortened.
            let why = match parse_query_response(&body) {
                Err(m) if m.starts_with("status") => m,
                _ => format!(
                    "body: {}",
                    printable(&String::from_utf8_lossy(&body[..body.len().min(512)]), 200)
                ),
            };
            return Err(self.err(format!("HTTP {status} to `{q}` ({why})")));
        }
        parse_query_response(&body).map_err(|m| self.err(format!("answer to `{q}`: {m}")))
    }

    /// Runs every query of `job_id` at one evaluation time.
    pub async fn gather(&self, job_id: &str, at: Timestamp) -> Result<Evidence> {
        let q = Queries::for_job(job_id);
        // Sequential on purpose: eleven small queries, and the first error is the one reported.
        Ok(Evidence {
            waits: self.query(&q.waits, at).await?,
            root_causes: self.query(&q.root_causes, at).await?,
            blocked_by: self.query(&q.blocked_by, at).await?,
            culprit_rule: self.query(&q.culprit_rule, at).await?,
            victim_rule: self.query(&q.victim_rule, at).await?,
            victim_count: self.query(&q.victim_count, at).await?,
            alerts: self.query(&q.alerts, at).await?,
            alerts_for_state: self.query(&q.alerts_for_state, at).await?,
            first_seen: self.query(&q.first_seen, at).await?,
            job_processes: self.query(&q.job_processes, at).await?,
            scenes: self.query(&q.scenes, at).await?,
        })
    }
}

/// Where culprits and victims came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `job_node:ark_job_culprit:max` / `job_node:ark_job_victim:max` had series for the job.
    Rules,
    /// Computed here from `ark_root_cause` / `ark_waits_on` (the rules are not loaded, or not
    /// evaluated yet).
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertState {
    pub name: String,
    /// `pending` or `firing` (the `alertstate` label of `ALERTS`).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Culprit {
    pub node: String,
    pub resource: String,
    /// The root cause's error type (`error.hw`, `error.net`, `topo.link_down`, ...).
    pub cause: String,
    /// `error` labels of `ark_blocked_by` on this node and resource.
    pub errors: Vec<String>,
    pub since: Option<Timestamp>,
    /// Which series `since` was read from (see the module docs).
    pub since_source: Option<String>,
    pub alert: Option<AlertState>,
    /// What the healer does about the node; `null` when no cluster was read.
    pub ticket: Option<TicketView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Victim {
    pub node: String,
    /// What the job's processes on that node wait on.
    pub resources: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootCause {
    pub resource: String,
    pub cause: String,
}

/// The job's processes on one node that share a pod (host processes: empty namespace/pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Process {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub pids: Vec<String>,
    pub waits_on: Vec<String>,
    pub root_causes: Vec<RootCause>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scene {
    pub node: String,
    pub scene: String,
    pub entity: String,
    pub severity: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Culprit,
    Victim,
    /// Known to hold the job's processes, neither culprit nor victim.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRole {
    pub node: String,
    pub role: Role,
}

/// The current step of a ticket: the record of the highest SOP step index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepView {
    pub index: Option<usize>,
    pub action: String,
    pub status: String,
    pub at: Timestamp,
    /// The Job of a RunJob step.
    pub job: Option<String>,
    pub message: Option<String>,
}

/// What the healer's `ark.io/ticket` annotation on a culprit node says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TicketView {
    /// The node has no ticket: the healer has not (or not yet) acted on it.
    None,
    NodeNotFound,
    Invalid {
        error: String,
    },
    /// The node could not be read (RBAC, timeout, ...).
    Unavailable {
        error: String,
    },
    /// Boxed: much larger than the other variants.
    Ticket(Box<TicketSummary>),
}

/// A ticket annotation, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TicketSummary {
    pub condition: String,
    pub status: String,
    pub sop: Option<String>,
    pub created_at: Timestamp,
    pub attempts: u32,
    pub step: Option<StepView>,
    pub blocked: Option<String>,
    /// The optional `jobs` list of the ticket (the jobs it was opened for), as names.
    pub jobs: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterRead {
    /// A cluster was reached and the culprit nodes' tickets read.
    pub checked: bool,
    pub error: Option<String>,
}

/// How many entries each list had beyond `--limit` (omitted when nothing was cut).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Truncated {
    #[serde(skip_serializing_if = "is_zero")]
    pub culprits: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub victims: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub nodes: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub processes: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub scenes: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The answer of `ark-healer why`; serialized as is for `--output json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Why {
    pub schema: &'static str,
    pub job_id: String,
    pub prometheus: String,
    pub evaluated_at: Timestamp,
    pub source: Source,
    pub culprits: Vec<Culprit>,
    pub victims: Vec<Victim>,
    /// `job:ark_job_victim_nodes:count` when recorded, else the number of victim nodes.
    pub victim_nodes: usize,
    pub nodes: Vec<NodeRole>,
    pub processes: Vec<Process>,
    pub scenes: Vec<Scene>,
    pub cluster: ClusterRead,
    pub truncated: Truncated,
}

fn cut<T>(v: &mut Vec<T>, limit: usize) -> usize {
    let extra = v.len().saturating_sub(limit);
    v.truncate(limit);
    extra
}

fn ts(secs: f64) -> Option<Timestamp> {
    (secs.is_finite() && secs > 0.0)
        .then(|| Timestamp::from_second(secs as i64).ok())
        .flatten()
}

/// Pure: classifies what Prometheus answered. An error when no series names the job.
pub fn assemble(
    job_id: &str,
    prometheus: &str,
    at: Timestamp,
    ev: &Evidence,
    limit: usize,
) -> Result<Why> {
    let known = [
        &ev.waits,
        &ev.root_causes,
        &ev.culprit_rule,
        &ev.victim_rule,
        &ev.job_processes,
        &ev.scenes,
    ]
    .iter()
    .any(|v| !v.is_empty());
    if !known {
        return Err(Error::UnknownJob {
            job_id: job_id.to_owned(),
            url: prometheus.to_owned(),
            message: "no ark_waits_on, ark_root_cause, ark_scene_active, ark_job_processes or \
                      job_node:ark_job_* series has this job_id now (is the job running, does \
                      the exporter see its processes with a job_id, is the id spelled as in the \
                      job_id label?)"
                .into(),
        });
    }
    let source = if ev.culprit_rule.is_empty() && ev.victim_rule.is_empty() {
        Source::Raw
    } else {
        Source::Rules
    };

    // Culprits: (node, resource, cause).
    let culprit_keys: BTreeSet<(String, String, String)> = match source {
        Source::Rules => &ev.culprit_rule,
        Source::Raw => &ev.root_causes,
    }
    .iter()
    .filter(|s| s.label("cause") != WAITS_ON)
    .map(|s| {
        (
            s.label("node").to_owned(),
            s.label("resource").to_owned(),
            s.label("cause").to_owned(),
        )
    })
    .collect();
    let culprit_nodes: BTreeSet<&str> = culprit_keys.iter().map(|k| k.0.as_str()).collect();

    // Every node the job is seen on, and what its processes wait on there.
    let mut job_nodes: BTreeSet<String> = BTreeSet::new();
    for s in [
        &ev.waits,
        &ev.root_causes,
        &ev.victim_rule,
        &ev.job_processes,
        &ev.scenes,
    ]
    .into_iter()
    .flatten()
    {
        job_nodes.insert(s.label("node").to_owned());
    }
    job_nodes.extend(culprit_nodes.iter().map(|n| (*n).to_owned()));
    let mut waited: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in &ev.waits {
        waited
            .entry(s.label("node"))
            .or_default()
            .insert(s.label("resource"));
    }
    for s in ev
        .root_causes
        .iter()
        .filter(|s| s.label("cause") == WAITS_ON)
    {
        waited
            .entry(s.label("node"))
            .or_default()
            .insert(s.label("resource"));
    }

    let victim_names: BTreeSet<String> = match source {
        Source::Rules => ev
            .victim_rule
            .iter()
            .map(|s| s.label("node").to_owned())
            .collect(),
        // As alerts/job.rules.yml: a node that waits (or has an active scene of the job) and
        // is no culprit.
        Source::Raw => job_nodes
            .iter()
            .filter(|n| {
                !culprit_nodes.contains(n.as_str())
                    && (waited.contains_key(n.as_str())
                        || ev.scenes.iter().any(|s| s.label("node") == n.as_str()))
            })
            .cloned()
            .collect(),
    };
    let mut victims: Vec<Victim> = victim_names
        .iter()
        .map(|n| Victim {
            node: n.clone(),
            resources: waited
                .get(n.as_str())
                .map(|r| r.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default(),
        })
        .collect();
    let victim_nodes = match (source, ev.victim_count.first()) {
        (Source::Rules, Some(s)) if s.value.is_finite() && s.value >= 0.0 => s.value as usize,
        _ => victims.len(),
    };

    // Alerts about the culprit: JobBlockedByNode first, then WorkloadStalled.
    // WorkloadStalled also fires for the victims (cause waits_on) and for scenes (no resource):
    // only the one about this very root cause counts. JobBlockedByNode is about the culprit.
    let matches_alert = |s: &Sample, name: &str, node: &str, resource: &str| {
        s.label("alertname") == name
            && s.label("node") == node
            && s.label("cause") != WAITS_ON
            && (s.label("resource") == resource
                || (name == BLOCKED_ALERT && s.label("resource").is_empty()))
    };
    let mut culprits: Vec<Culprit> = culprit_keys
        .iter()
        .map(|(node, resource, cause)| {
            let errors: BTreeSet<String> = ev
                .blocked_by
                .iter()
                .filter(|s| s.label("node") == node && s.label("resource") == resource)
                .map(|s| s.label("error").to_owned())
                .collect();
            let mut since = None;
            let mut since_source = None;
            let mut alert = None;
            for name in [BLOCKED_ALERT, STALLED_ALERT] {
                if alert.is_none()
                    && let Some(a) = ev
                        .alerts
                        .iter()
                        .find(|s| matches_alert(s, name, node, resource))
                {
                    alert = Some(AlertState {
                        name: name.to_owned(),
                        state: a.label("alertstate").to_owned(),
                    });
                }
                // The earliest of the two: JobBlockedByNode becomes active only once a victim
                // waits, which may be long after the culprit's error (and its WorkloadStalled).
                if let Some(t) = ev
                    .alerts_for_state
                    .iter()
                    .filter(|s| matches_alert(s, name, node, resource))
                    .filter_map(|s| ts(s.value))
                    .min()
                    && since.is_none_or(|s| t < s)
                {
                    since = Some(t);
                    since_source = Some(format!("ALERTS_FOR_STATE{{alertname=\"{name}\"}}"));
                }
            }
            if since.is_none()
                && let Some(t) = ev
                    .first_seen
                    .iter()
                    .filter(|s| {
                        s.label("node") == node
                            && s.label("resource") == resource
                            && s.label("cause") == cause
                    })
                    .filter_map(|s| ts(s.value))
                    .min()
            {
                since = Some(t);
                since_source = Some(format!(
                    "first ark_root_cause sample in the last {}",
                    FIRST_SEEN_WINDOW.split(':').next().unwrap_or("1h")
                ));
            }
            Culprit {
                node: node.clone(),
                resource: resource.clone(),
                cause: cause.clone(),
                errors: errors.into_iter().collect(),
                since,
                since_source,
                alert,
                ticket: None,
            }
        })
        .collect();

    let mut nodes: Vec<NodeRole> = job_nodes
        .iter()
        .map(|n| NodeRole {
            node: n.clone(),
            role: if culprit_nodes.contains(n.as_str()) {
                Role::Culprit
            } else if victim_names.contains(n) {
                Role::Victim
            } else {
                Role::Other
            },
        })
        .collect();

    // Processes grouped by (node, namespace, pod).
    let mut procs: BTreeMap<(String, String, String), Process> = BTreeMap::new();
    let mut entry = |s: &Sample| -> (String, String, String) {
        let key = (
            s.label("node").to_owned(),
            s.label("namespace").to_owned(),
            s.label("pod").to_owned(),
        );
        procs.entry(key.clone()).or_insert_with(|| Process {
            node: key.0.clone(),
            namespace: key.1.clone(),
            pod: key.2.clone(),
            pids: Vec::new(),
            waits_on: Vec::new(),
            root_causes: Vec::new(),
        });
        key
    };
    let mut waits_keys = Vec::new();
    for s in &ev.waits {
        waits_keys.push((entry(s), s));
    }
    let mut root_keys = Vec::new();
    for s in &ev.root_causes {
        root_keys.push((entry(s), s));
    }
    for (k, s) in waits_keys {
        if let Some(p) = procs.get_mut(&k) {
            push_unique(&mut p.pids, s.label("pid"));
            push_unique(&mut p.waits_on, s.label("resource"));
        }
    }
    for (k, s) in root_keys {
        if let Some(p) = procs.get_mut(&k) {
            let rc = RootCause {
                resource: s.label("resource").to_owned(),
                cause: s.label("cause").to_owned(),
            };
            if !p.root_causes.contains(&rc) {
                p.root_causes.push(rc);
            }
        }
    }
    let mut processes: Vec<Process> = procs.into_values().collect();
    for p in &mut processes {
        p.pids
            .sort_by_key(|pid| (pid.parse::<u64>().unwrap_or(u64::MAX), pid.clone()));
        p.waits_on.sort();
        p.root_causes
            .sort_by(|a, b| (&a.cause, &a.resource).cmp(&(&b.cause, &b.resource)));
    }

    let mut scenes: Vec<Scene> = ev
        .scenes
        .iter()
        .map(|s| Scene {
            node: s.label("node").to_owned(),
            scene: s.label("scene").to_owned(),
            entity: s.label("entity").to_owned(),
            severity: s.label("severity").to_owned(),
        })
        .collect();
    scenes.sort_by(|a, b| (&a.node, &a.scene, &a.entity).cmp(&(&b.node, &b.scene, &b.entity)));
    scenes.dedup();

    let truncated = Truncated {
        culprits: cut(&mut culprits, limit),
        victims: cut(&mut victims, limit),
        nodes: cut(&mut nodes, limit),
        processes: cut(&mut processes, limit),
        scenes: cut(&mut scenes, limit),
    };
    Ok(Why {
        schema: SCHEMA,
        job_id: job_id.to_owned(),
        prometheus: prometheus.to_owned(),
        evaluated_at: at,
        source,
        culprits,
        victims,
        victim_nodes,
        nodes,
        processes,
        scenes,
        cluster: ClusterRead {
            checked: false,
            error: None,
        },
        truncated,
    })
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_owned());
    }
}

/// Pure: the view of one Node's ticket annotation (`None` when the node has none).
pub fn ticket_view(ticket: Option<crate::Result<Ticket>>) -> TicketView {
    let Some(ticket) = ticket else {
        return TicketView::None;
    };
    let t = match ticket {
        Ok(t) => t,
        Err(e) => {
            return TicketView::Invalid {
                error: e.to_string(),
            };
        }
    };
    let step = t
        .workflows
        .iter()
        .enumerate()
        .max_by_key(|(i, w)| (w.step.unwrap_or(*i), *i))
        .map(|(_, w)| StepView {
            index: w.step,
            action: w.action.clone(),
            status: format!("{:?}", w.status),
            at: w.at,
            job: w.job.clone(),
            message: w.message.clone(),
        });
    TicketView::Ticket(Box::new(TicketSummary {
        condition: t.condition.clone(),
        status: serde_json::to_value(t.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        sop: t.sop.clone(),
        created_at: t.created_at,
        attempts: t.attempts,
        step,
        blocked: t.blocked.clone(),
        // The jobs the healer recorded on the ticket (ticket.rs `jobs`); none: `null`.
        jobs: (!t.jobs.is_empty()).then(|| t.jobs.iter().map(|j| j.job_id.clone()).collect()),
    }))
}

/// Reads the ticket of every culprit node (one GET per distinct node) into `why`.
pub async fn tickets(why: &mut Why, kube: &Kube) {
    let mut seen: BTreeMap<String, TicketView> = BTreeMap::new();
    for c in &mut why.culprits {
        if !seen.contains_key(&c.node) {
            let view = match kube.get_node(&c.node).await {
                Ok(Some(n)) => ticket_view(crate::k8s::view::node_ticket(&n)),
                Ok(None) => TicketView::NodeNotFound,
                Err(e) => TicketView::Unavailable {
                    error: e.to_string(),
                },
            };
            seen.insert(c.node.clone(), view);
        }
        c.ticket = seen.get(&c.node).cloned();
    }
    why.cluster = ClusterRead {
        checked: true,
        error: None,
    };
}

/// A Kubernetes client for reading tickets, bounded by `timeout` per request (two attempts),
/// or why there is none: `kubeconfig`, else `KUBECONFIG` / `~/.kube/config` / in-cluster.
pub async fn connect_cluster(
    kubeconfig: Option<&std::path::Path>,
    timeout: Duration,
) -> std::result::Result<Kube, String> {
    let policy = crate::config::KubePolicy {
        request_timeout_seconds: timeout.as_secs().max(1),
        max_attempts: 2,
        ..crate::config::KubePolicy::default()
    };
    let client = crate::k8s::client(kubeconfig, &policy)
        .await
        .map_err(|e| format!("no Kubernetes client: {e}"))?;
    match tokio::time::timeout(timeout, client.apiserver_version()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("Kubernetes API not reachable: {}", chain(&e))),
        Err(_) => {
            return Err(format!(
                "Kubernetes API did not answer within {} s",
                timeout.as_secs()
            ));
        }
    }
    let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new())
        .map_err(|e| format!("metrics: {e}"))?;
    Ok(Kube::new(client, policy, metrics))
}

/// "3m05s" for a duration in seconds.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `-` for an empty label (a host process has no pod).
fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { p(s) }
}

fn p(s: &str) -> String {
    printable(s, 96)
}

fn ticket_text(t: &TicketView) -> String {
    match t {
        TicketView::None => "no ticket: the healer has not acted on this node".into(),
        TicketView::NodeNotFound => "no such Node in the cluster".into(),
        TicketView::Invalid { error } => format!("invalid ticket: {}", printable(error, 200)),
        TicketView::Unavailable { error } => {
            format!("ticket not readable: {}", printable(error, 200))
        }
        TicketView::Ticket(t) => {
            let TicketSummary {
                condition,
                status,
                sop,
                step,
                blocked,
                jobs,
                ..
            } = t.as_ref();
            let mut s = format!("ticket {} {status}", p(condition));
            if let Some(sop) = sop {
                let _ = write!(s, " (sop {})", p(sop));
            }
            if let Some(st) = step {
                let n = st.index.map(|i| format!(" {}", i + 1)).unwrap_or_default();
                let _ = write!(
                    s,
                    ", step{n} {} {} since {}",
                    p(&st.action),
                    st.status,
                    st.at
                );
                if let Some(j) = &st.job {
                    let _ = write!(s, " (job {})", p(j));
                }
            }
            if let Some(b) = blocked {
                let _ = write!(s, ", blocked: {}", printable(b, 160));
            }
            if let Some(j) = jobs {
                let names: Vec<String> = j.iter().map(|x| p(x)).collect();
                let _ = write!(s, ", jobs: {}", names.join(", "));
            }
            s
        }
    }
}

fn more(out: &mut impl Write, n: usize, what: &str) -> std::io::Result<()> {
    if n > 0 {
        writeln!(out, "  … and {n} more {what} (raise --limit)")?;
    }
    Ok(())
}

/// Renders `why` for a terminal. Label values are made printable (no terminal escapes).
pub fn write_text(out: &mut impl Write, why: &Why) -> std::io::Result<()> {
    let n_c: BTreeSet<&str> = why.culprits.iter().map(|c| c.node.as_str()).collect();
    let headline = if n_c.is_empty() {
        if why.victim_nodes == 0 {
            "no culprit and no waiting node: nothing in Prometheus blocks it".to_owned()
        } else {
            format!(
                "{} node(s) wait, but no node has an error as root cause (yet)",
                why.victim_nodes
            )
        }
    } else {
        let names: Vec<String> = n_c.iter().map(|n| or_dash(n)).collect();
        format!(
            "blocked by {} ({} victim node(s) wait)",
            names.join(", "),
            why.victim_nodes
        )
    };
    writeln!(out, "job {}: {headline}", p(&why.job_id))?;
    let source = match why.source {
        Source::Rules => {
            "recording rules job_node:ark_job_culprit:max / job_node:ark_job_victim:max"
        }
        Source::Raw => "raw ark_root_cause / ark_waits_on (job recording rules absent)",
    };
    writeln!(
        out,
        "  from {source}; Prometheus {} at {}",
        p(&why.prometheus),
        why.evaluated_at
    )?;

    if !why.culprits.is_empty() {
        writeln!(out, "\nCULPRITS")?;
        for c in &why.culprits {
            let errors = if c.errors.is_empty() {
                String::new()
            } else {
                let e: Vec<String> = c.errors.iter().map(|x| p(x)).collect();
                format!(" (ark_blocked_by: {})", e.join(", "))
            };
            writeln!(
                out,
                "  {}  {} on {}{errors}",
                or_dash(&c.node),
                p(&c.cause),
                or_dash(&c.resource)
            )?;
            match (&c.since, &c.since_source) {
                (Some(t), src) => writeln!(
                    out,
                    "    since   {t} ({} ago; {})",
                    age(why.evaluated_at.as_second() - t.as_second()),
                    src.as_deref().unwrap_or("?")
                )?,
                (None, _) => writeln!(out, "    since   unknown (no alert state, no sample)")?,
            }
            if let Some(a) = &c.alert {
                writeln!(out, "    alert   {} {}", a.name, p(&a.state))?;
            }
            match &c.ticket {
                Some(t) => writeln!(out, "    healer  {}", ticket_text(t))?,
                None => writeln!(out, "    healer  not read (no cluster)")?,
            }
        }
        more(out, why.truncated.culprits, "culprits")?;
    }

    if !why.victims.is_empty() {
        writeln!(out, "\nVICTIMS ({})", why.victim_nodes)?;
        for v in &why.victims {
            let r: Vec<String> = v.resources.iter().map(|x| p(x)).collect();
            let r = if r.is_empty() {
                "-".to_owned()
            } else {
                r.join(", ")
            };
            writeln!(out, "  {}  waits on {r}", or_dash(&v.node))?;
        }
        more(out, why.truncated.victims, "victims")?;
    }

    if !why.processes.is_empty() {
        writeln!(out, "\nPROCESSES")?;
        writeln!(
            out,
            "  {:<20} {:<14} {:<28} {:<18} ROOT CAUSE",
            "NODE", "PID", "POD", "WAITS ON"
        )?;
        for pr in &why.processes {
            let pod = if pr.pod.is_empty() {
                "-".to_owned()
            } else {
                format!("{}/{}", p(&pr.namespace), p(&pr.pod))
            };
            let list = |v: &[String]| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.iter().map(|x| p(x)).collect::<Vec<_>>().join(",")
                }
            };
            let rc = if pr.root_causes.is_empty() {
                "-".to_owned()
            } else {
                pr.root_causes
                    .iter()
                    .map(|r| {
                        if r.cause == WAITS_ON {
                            format!("waits on {}", or_dash(&r.resource))
                        } else {
                            format!("{} on {}", p(&r.cause), or_dash(&r.resource))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            writeln!(
                out,
                "  {:<20} {:<14} {:<28} {:<18} {rc}",
                or_dash(&pr.node),
                list(&pr.pids),
                pod,
                list(&pr.waits_on)
            )?;
        }
        more(out, why.truncated.processes, "process groups")?;
    }

    if !why.scenes.is_empty() {
        writeln!(out, "\nSCENES")?;
        for s in &why.scenes {
            writeln!(
                out,
                "  {}  {} on {} ({})",
                or_dash(&s.node),
                p(&s.scene),
                p(&s.entity),
                p(&s.severity)
            )?;
        }
        more(out, why.truncated.scenes, "scenes")?;
    }
    if let Some(e) = &why.cluster.error {
        writeln!(
            out,
            "\nnote: healer tickets not shown: {}",
            printable(e, 300)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;

    fn sample(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    /// The issue's scenario as raw series: node-2 has the error, nodes 1 and 3 wait.
    fn raw_three_nodes() -> Evidence {
        let wait = |node: &str, pid: &str, pod: &str| {
            sample(
                &[
                    ("node", node),
                    ("pid", pid),
                    ("job_id", "train"),
                    ("namespace", "ml"),
                    ("pod", pod),
                    ("resource", "network-ib0"),
                ],
                1.0,
            )
        };
        let rc = |node: &str, pod: &str, resource: &str, cause: &str| {
            sample(
                &[
                    ("node", node),
                    ("job_id", "train"),
                    ("namespace", "ml"),
                    ("pod", pod),
                    ("resource", resource),
                    ("cause", cause),
                ],
                1.0,
            )
        };
        Evidence {
            waits: vec![wait("node-1", "11", "t-0"), wait("node-3", "33", "t-2")],
            root_causes: vec![
                rc("node-1", "t-0", "network-ib0", "waits_on"),
                rc("node-2", "t-1", "gpu-3", "error.hw"),
                rc("node-3", "t-2", "network-ib0", "waits_on"),
            ],
            blocked_by: vec![sample(
                &[
                    ("node", "node-2"),
                    ("resource", "gpu-3"),
                    ("error", "error.hw"),
                ],
                1.0,
            )],
            first_seen: vec![sample(
                &[
                    ("node", "node-2"),
                    ("resource", "gpu-3"),
                    ("cause", "error.hw"),
                ],
                1_800_000_000.0,
            )],
            ..Evidence::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_100).unwrap()
    }

    #[test]
    fn raw_series_name_the_erroring_node_culprit_and_the_waiting_ones_victims() {
        let why = assemble("train", "http://p", now(), &raw_three_nodes(), 50).unwrap();
        assert_eq!(why.source, Source::Raw);
        assert_eq!(why.culprits.len(), 1);
        let c = &why.culprits[0];
        assert_eq!(
            (c.node.as_str(), c.resource.as_str(), c.cause.as_str()),
            ("node-2", "gpu-3", "error.hw")
        );
        assert_eq!(c.errors, ["error.hw"]);
        assert_eq!(c.since, Timestamp::from_second(1_800_000_000).ok());
        assert!(
            c.since_source
                .as_deref()
                .unwrap()
                .contains("ark_root_cause")
        );
        let v: Vec<&str> = why.victims.iter().map(|v| v.node.as_str()).collect();
        assert_eq!(v, ["node-1", "node-3"]);
        assert_eq!(why.victims[0].resources, ["network-ib0"]);
        assert_eq!(why.victim_nodes, 2);
        let roles: Vec<(&str, Role)> = why
            .nodes
            .iter()
            .map(|n| (n.node.as_str(), n.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("node-1", Role::Victim),
                ("node-2", Role::Culprit),
                ("node-3", Role::Victim)
            ]
        );
        assert_eq!(why.processes.len(), 3);
        assert_eq!(why.processes[0].pids, ["11"]);
        assert!(why.processes[1].pids.is_empty());
        let mut text = Vec::new();
        write_text(&mut text, &why).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with("job train: blocked by node-2 (2 victim node(s) wait)"),
            "{text}"
        );
        assert!(
            text.contains("error.hw on gpu-3 (ark_blocked_by: error.hw)"),
            "{text}"
        );
        assert!(text.contains("1m40s ago"), "{text}");
    }

    #[test]
    fn rules_win_over_raw_series_and_alert_state_gives_since() {
        let mut ev = raw_three_nodes();
        ev.culprit_rule = vec![sample(
            &[
                ("job_id", "train"),
                ("node", "node-2"),
                ("resource", "gpu-3"),
                ("cause", "error.hw"),
            ],
            1.0,
        )];
        // The rules say only node-1 is a victim (e.g. node-3's series were not evaluated yet).
        ev.victim_rule = vec![sample(&[("job_id", "train"), ("node", "node-1")], 1.0)];
        ev.victim_count = vec![sample(&[("job_id", "train")], 1.0)];
        let alert = |name: &str, extra: (&str, &str), v: f64| {
            sample(
                &[
                    ("alertname", name),
                    ("job_id", "train"),
                    ("node", "node-2"),
                    ("resource", "gpu-3"),
                    ("cause", "error.hw"),
                    extra,
                ],
                v,
            )
        };
        ev.alerts = vec![
            alert("WorkloadStalled", ("alertstate", "pending"), 1.0),
            alert("JobBlockedByNode", ("alertstate", "firing"), 1.0),
        ];
        ev.alerts_for_state = vec![
            alert("WorkloadStalled", ("x", "y"), 1_799_999_000.0),
            alert("JobBlockedByNode", ("x", "y"), 1_800_000_050.0),
        ];
        let why = assemble("train", "http://p", now(), &ev, 50).unwrap();
        assert_eq!(why.source, Source::Rules);
        let v: Vec<&str> = why.victims.iter().map(|v| v.node.as_str()).collect();
        assert_eq!(v, ["node-1"]);
        assert_eq!(why.victim_nodes, 1);
        let c = &why.culprits[0];
        assert_eq!(
            c.alert,
            Some(AlertState {
                name: "JobBlockedByNode".into(),
                state: "firing".into()
            })
        );
        // The earlier activeAt: the culprit's WorkloadStalled saw the error before a victim
        // waited (JobBlockedByNode needs both).
        assert_eq!(c.since, Timestamp::from_second(1_799_999_000).ok());
        assert_eq!(
            c.since_source.as_deref(),
            Some("ALERTS_FOR_STATE{alertname=\"WorkloadStalled\"}")
        );
        // And the other way round.
        let mut early = ev.clone();
        early.alerts_for_state[1].value = 1_799_998_000.0;
        let why = assemble("train", "http://p", now(), &early, 50).unwrap();
        assert_eq!(
            why.culprits[0].since_source.as_deref(),
            Some("ALERTS_FOR_STATE{alertname=\"JobBlockedByNode\"}")
        );
        // Without JobBlockedByNode, WorkloadStalled's activeAt is the fallback.
        ev.alerts
            .retain(|s| s.label("alertname") != "JobBlockedByNode");
        ev.alerts_for_state
            .retain(|s| s.label("alertname") != "JobBlockedByNode");
        let why = assemble("train", "http://p", now(), &ev, 50).unwrap();
        assert_eq!(
            why.culprits[0].since,
            Timestamp::from_second(1_799_999_000).ok()
        );
        assert_eq!(
            why.culprits[0].alert.as_ref().unwrap().name,
            "WorkloadStalled"
        );
    }

    #[test]
    fn an_unknown_job_is_an_error_that_says_so() {
        let e = assemble("nope", "http://p", now(), &Evidence::default(), 50).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("\"nope\" is unknown to Prometheus at http://p"),
            "{m}"
        );
        assert!(matches!(e, Error::UnknownJob { .. }));
    }

    #[test]
    fn lists_are_cut_at_the_limit_and_say_how_many_were_cut() {
        let mut ev = Evidence::default();
        for i in 0..30 {
            let n = format!("node-{i:02}");
            ev.waits.push(sample(
                &[("node", &n), ("pid", "1"), ("pod", "p"), ("resource", "r")],
                1.0,
            ));
        }
        let why = assemble("train", "http://p", now(), &ev, 5).unwrap();
        assert_eq!(why.victims.len(), 5);
        assert_eq!(why.truncated.victims, 25);
        assert_eq!(why.victim_nodes, 30);
        assert_eq!(why.truncated.processes, 25);
        let mut text = Vec::new();
        write_text(&mut text, &why).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("… and 25 more victims (raise --limit)"),
            "{text}"
        );
        let json = serde_json::to_value(&why).unwrap();
        assert_eq!(
            json["truncated"],
            serde_json::json!({"victims": 25, "nodes": 25, "processes": 25})
        );
    }

    #[test]
    fn json_has_the_schema_id_and_the_documented_keys() {
        let why = assemble("train", "http://p", now(), &raw_three_nodes(), 50).unwrap();
        let v = serde_json::to_value(&why).unwrap();
        assert_eq!(v["schema"], "ark.io/why/v1");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "cluster",
                "culprits",
                "evaluated_at",
                "job_id",
                "nodes",
                "processes",
                "prometheus",
                "scenes",
                "schema",
                "source",
                "truncated",
                "victim_nodes",
                "victims"
            ]
        );
        assert_eq!(v["culprits"][0]["ticket"], serde_json::Value::Null);
        assert_eq!(v["source"], "raw");
    }

    #[test]
    fn job_ids_are_quoted_for_promql_and_bad_ones_refused() {
        assert_eq!(promql_string(r#"a"b\c"#), r#""a\"b\\c""#);
        let q = Queries::for_job(r#"x"} or up{a=""#);
        assert!(
            q.waits
                .starts_with(r#"ark_waits_on{job_id="x\"} or up{a=\""} > 0"#),
            "{}",
            q.waits
        );
        assert!(validate_job_id("").is_err());
        assert!(validate_job_id("a\nb").is_err());
        assert!(validate_job_id(&"x".repeat(2000)).is_err());
        assert!(validate_job_id("train-llm").is_ok());
    }

    #[test]
    fn hostile_label_values_are_clipped_and_made_printable() {
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[
              {{"metric":{{"node":"\u001b[31mred","pod":"{}"}},"value":[1,"1"]}}]}},"extra":1}}"#,
            "p".repeat(10_000)
        );
        let s = parse_query_response(body.as_bytes()).unwrap();
        assert_eq!(s[0].label("pod").len(), LABEL_MAX);
        assert_eq!(printable(s[0].label("node"), 50), "?[31mred");
        for max in [3, 4, 96, 200] {
            let p = printable(&"é\u{1b}x".repeat(500), max);
            assert!(
                p.len() <= max && p.ends_with('…'),
                "{max}: {} bytes",
                p.len()
            );
        }
    }

    #[test]
    fn answers_that_are_not_instant_vectors_are_clear_errors() {
        let e = parse_query_response(b"{not json").unwrap_err();
        assert!(e.contains("invalid JSON"), "{e}");
        let e = parse_query_response(
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert!(e.contains("bad_data: parse error"), "{e}");
        let e = parse_query_response(
            br#"{"status":"success","data":{"resultType":"scalar","result":[1,"1"]}}"#,
        )
        .unwrap_err();
        assert!(e.contains("expected an instant vector"), "{e}");
        let e = parse_query_response(
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#,
        )
        .unwrap_err();
        assert!(e.contains("not a vector of samples"), "{e}");
        let e = parse_query_response(br#"{"status":"success"}"#).unwrap_err();
        assert!(e.contains("without `data`"), "{e}");
    }

    #[test]
    fn a_ticket_is_summarised_with_its_current_step_and_optional_jobs() {
        let text = "schema: 2\ncondition: GpuFellOffBus\nstatus: resolving\ncreatedAt: 2026-12-04T02:00:00Z\n\
                    sop: reboot\njobs:\n\
                    - {jobId: train, condition: JobBlockedByNode, victimNodes: 2, since: 2026-12-04T02:00:00Z}\n\
                    - {jobId: other, condition: JobStragglerNode, since: 2026-12-04T02:00:00Z}\n\
                    workflows:\n\
                    - {action: Cordon, status: Succeeded, at: 2026-12-04T02:00:01Z, step: 0}\n\
                    - {action: Drain, status: Running, at: 2026-12-04T02:00:02Z, step: 2}\n\
                    - {action: Taint, status: Succeeded, at: 2026-12-04T02:00:01Z, step: 1}\n";
        let TicketView::Ticket(t) = ticket_view(Some(Ticket::from_annotation("n", text))) else {
            panic!("not a ticket view");
        };
        let TicketSummary {
            condition,
            status,
            step,
            jobs,
            ..
        } = *t;
        assert_eq!(
            (condition.as_str(), status.as_str()),
            ("GpuFellOffBus", "resolving")
        );
        let step = step.unwrap();
        assert_eq!(
            (step.index, step.action.as_str(), step.status.as_str()),
            (Some(2), "Drain", "Running")
        );
        assert_eq!(jobs.unwrap(), ["train", "other"]);
        assert_eq!(ticket_view(None), TicketView::None);
        assert!(matches!(
            ticket_view(Some(Ticket::from_annotation("n", "status: ["))),
            TicketView::Invalid { .. }
        ));
        let no_jobs = "condition: GpuHung\nstatus: created\ncreatedAt: 2026-12-04T02:00:00Z\n";
        assert!(matches!(
            ticket_view(Some(Ticket::from_annotation("n", no_jobs))),
            TicketView::Ticket(t) if t.jobs.is_none() && t.step.is_none()
        ));
    }

    async fn serve(app: Router) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        url
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_sent_as_basic_auth() {
        let app = Router::new().route(
            "/api/v1/query",
            get(|h: axum::http::HeaderMap| async move {
                // "ops:s3cret" in base64.
                if h.get("authorization")
                    .is_some_and(|v| v == "Basic b3BzOnMzY3JldA==")
                {
                    (
                        axum::http::StatusCode::OK,
                        r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
                    )
                } else {
                    (axum::http::StatusCode::UNAUTHORIZED, "no")
                }
            }),
        );
        let url = serve(app).await.replace("http://", "http://ops:s3cret@");
        let p = Prometheus::new(&url, Duration::from_secs(2), 4096).unwrap();
        assert_eq!(p.query("up", now()).await.unwrap(), []);
    }

    #[tokio::test]
    async fn bad_answers_and_a_dead_prometheus_are_clear_errors() {
        let at = now();
        let t = Duration::from_secs(2);
        let url =
            serve(Router::new().route("/api/v1/query", get(|| async { "{\"status\": \"succ" })))
                .await;
        let e = Prometheus::new(&url, t, 1 << 20)
            .unwrap()
            .query("up", at)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid JSON"), "{e}");

        let url = serve(Router::new().route(
            "/api/v1/query",
            get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "overloaded") }),
        ))
        .await;
        let e = Prometheus::new(&url, t, 1 << 20)
            .unwrap()
            .query("up", at)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("HTTP 503 Service Unavailable"),
            "{e}"
        );
        assert!(e.to_string().contains("overloaded"), "{e}");

        let url =
            serve(Router::new().route("/api/v1/query", get(|| async { "x".repeat(5000) }))).await;
        let e = Prometheus::new(&url, t, 4096)
            .unwrap()
            .query("up", at)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("over the 4096-byte limit"), "{e}");

        let url = serve(Router::new().route(
            "/api/v1/query",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "{}"
            }),
        ))
        .await;
        let e = Prometheus::new(&url, Duration::from_secs(1), 4096)
            .unwrap()
            .query("up", at)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not answer within 1 s"), "{e}");

        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", free.local_addr().unwrap());
        drop(free);
        let e = Prometheus::new(&dead, t, 4096)
            .unwrap()
            .query("up", at)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not reachable"), "{e}");
        assert!(Prometheus::new("localhost:9090", t, 1).is_err());
        // Credentials in the URL are never printed.
        let with_auth = dead.replace("http://", "http://ops:s3cret@");
        let p = Prometheus::new(&with_auth, t, 4096).unwrap();
        assert_eq!(p.url(), dead);
        let e = p.query("up", at).await.unwrap_err().to_string();
        assert!(e.contains("not reachable") && !e.contains("s3cret"), "{e}");
    }
}
