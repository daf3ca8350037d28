//! The ticket: the healer's only durable state, stored as YAML in the node annotation
//! `ark.io/ticket` (at most 4 KiB). Pure parse/serialize; tolerant of hand edits (unknown keys are
//! ignored, optional keys may be removed) and precise when an edit broke it.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const TICKET_ANNOTATION: &str = "ark.io/ticket";
/// Kubernetes allows far more, but a ticket that large would be a bug; we keep it to 4 KiB.
pub const TICKET_MAX_BYTES: usize = 4096;
/// How many past remediation start times a ticket keeps (for repeat-offender escalation).
const HISTORY_MAX: usize = 20;
const TEXT_MAX: usize = 256;
/// Names (condition, SOP, action) are catalog names; anything longer was not written by us.
const NAME_MAX: usize = 128;
/// A fingerprint longer than this is stored as its 16-hex FNV-1a hash (Alertmanager's are 16).
pub const FINGERPRINT_MAX: usize = 64;
/// The ticket layout this release writes. 1 (absent): written before tickets pinned their SOP.
/// `jobs` did not change it: an older release of schema 2 ignores the key (tolerant reader) and,
/// if it rewrites the ticket, drops it, which loses only information for people.
pub const SCHEMA: u32 = 2;
/// Conditions whose alerts tie a node to a training job (label `job_id`): the cross-node rules of
/// issue 18. Every firing one is recorded in the node's ticket (`jobs`), whichever condition the
/// ticket works on; see [`Ticket::record_jobs`].
pub const JOB_CONDITIONS: [&str; 2] = ["JobBlockedByNode", "JobStragglerNode"];
/// Job relations a ticket keeps: the newest by `since`.
pub const JOBS_MAX: usize = 16;
/// Bytes of a recorded job id. A Kubernetes name that is a DNS label (63) fits as is; a longer one
/// keeps a prefix and the hash of the whole, so distinct long ids stay distinct. With
/// [`JOBS_MAX`] entries and a condition that is a catalog name, `jobs` is bounded in bytes.
pub const JOB_ID_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TicketStatus {
    Created,
    Resolving,
    Resolved,
    Escalated,
    Closed,
}

impl TicketStatus {
    /// An open ticket is one the healer still works on.
    pub fn is_open(self) -> bool {
        matches!(self, TicketStatus::Created | TicketStatus::Resolving)
    }

    /// Open, or escalated to people: the incident is not over (its cordon, budget share and
    /// job relations still belong to it).
    pub fn is_unfinished(self) -> bool {
        self.is_open() || self == TicketStatus::Escalated
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
    Skipped,
    Blocked,
}

/// One disruptive remediation of the node, carried from ticket to ticket: cooldown and
/// repeat-offender count these, and only against conditions at most as urgent (I3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remediation {
    pub at: Timestamp,
    pub priority: u32,
}

/// One training job this node stalls (`JobBlockedByNode`) or slows (`JobStragglerNode`), as its
/// alert said. Information for people and for the job-level tests: the healer decides nothing on
/// it (the node's most urgent condition does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRelation {
    pub job_id: String,
    pub condition: String,
    /// The alert's `victim_nodes` annotation: how many nodes of the job wait on this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub victim_nodes: Option<u32>,
    /// `startsAt` of the earliest alert occurrence that reported this relation.
    #[serde(default)]
    pub since: Timestamp,
}

impl JobRelation {
    /// The relation one alert reports, clipped: control characters replaced, the job id cut to
    /// [`JOB_ID_MAX`] bytes (plus a hash of the whole when it was longer), the condition to a name's
    /// length; a `victim_nodes` that is not a non-negative number is left out. `None` for an empty
    /// job id.
    pub fn new(
        job_id: &str,
        condition: &str,
        victim_nodes: Option<&str>,
        since: Timestamp,
    ) -> Option<Self> {
        if job_id.is_empty() {
            return None;
        }
        Some(JobRelation {
            job_id: clip_label(job_id, JOB_ID_MAX),
            condition: clip_label(condition, NAME_MAX),
            victim_nodes: victim_nodes.and_then(parse_count),
            since,
        })
    }

    fn key(&self) -> (&str, &str) {
        (&self.job_id, &self.condition)
    }

    /// Clips a relation read from a (possibly hand-edited) ticket like [`JobRelation::new`].
    fn compact(&mut self) {
        if self.job_id.len() > JOB_ID_MAX || self.job_id.chars().any(char::is_control) {
            self.job_id = clip_label(&self.job_id, JOB_ID_MAX);
        }
        if self.condition.len() > NAME_MAX || self.condition.chars().any(char::is_control) {
            self.condition = clip_label(&self.condition, NAME_MAX);
        }
    }
}

/// `victim_nodes` as Prometheus renders a count (`3`, `3.0`, `3e+00`); anything else is `None`.
fn parse_count(v: &str) -> Option<u32> {
    let v = v.trim();
    v.parse::<u32>().ok().or_else(|| {
        v.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f.min(f64::from(u32::MAX)) as u32)
    })
}

/// A label value fit for the ticket: control characters (a newline, NUL, an escape sequence) become
/// `?`; over `max` bytes, a prefix cut at a char boundary, `~` and the 16-hex FNV-1a hash of the
/// whole value.
fn clip_label(v: &str, max: usize) -> String {
    let mut s: String = v
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.len() > max {
        let hash = fnv1a_hex(v);
        clip_to(&mut s, max.saturating_sub(hash.len() + 1));
        s.push('~');
        s.push_str(&hash);
    }
    s
}

/// Puts job relations in their stored form: one per (job, condition) (the earliest `since`, the
/// largest victim count), sorted oldest first, at most the [`JOBS_MAX`] newest.
pub fn normalize_jobs(jobs: &mut Vec<JobRelation>) {
    for j in jobs.iter_mut() {
        j.compact();
    }
    jobs.sort_by(|a, b| a.key().cmp(&b.key()).then(a.since.cmp(&b.since)));
    jobs.dedup_by(|later, first| {
        if later.key() != first.key() {
            return false;
        }
        first.victim_nodes = first.victim_nodes.max(later.victim_nodes);
        true
    });
    jobs.sort_by(|a, b| (a.since, a.key()).cmp(&(b.since, b.key())));
    if jobs.len() > JOBS_MAX {
        let drop = jobs.len() - JOBS_MAX;
        jobs.drain(..drop);
    }
}

/// One executed (or executing) SOP step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    pub action: String,
    pub status: StepStatus,
    pub at: Timestamp,
    /// Index of the step in the SOP; absent in hand-written entries (then the list order is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// [`SCHEMA`] when written by this release; absent in older tickets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<u32>,
    pub condition: String,
    #[serde(default)]
    pub reason: String,
    pub status: TicketStatus,
    pub created_at: Timestamp,
    #[serde(default = "one")]
    pub attempts: u32,
    #[serde(default)]
    pub workflows: Vec<Workflow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sop: Option<String>,
    /// [`crate::catalog::SopSpec::digest`] of the steps this ticket follows (I6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sop_digest: Option<String>,
    /// Priority of the condition when the ticket was opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// `startsAt` of the alert occurrence this ticket remediates: a finished ticket is not
    /// followed by another for the same occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_started_at: Option<Timestamp>,
    /// Why the last action was blocked (budget, cooldown, ...), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
    /// Schema 1 only: start times of past remediations, disruptive or not. Read, never written:
    /// it cannot say which were disruptive, so it no longer counts (see `remediations`).
    #[serde(default, skip_serializing)]
    pub history: Vec<Timestamp>,
    /// Past disruptive remediations of this node, this one included once it disrupted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remediations: Vec<Remediation>,
    /// This ticket ran a disruptive step (so it counts against the budget while open, and
    /// towards cooldown after it closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disrupted: bool,
    /// The healer cordoned this node (so it may uncordon it); a manual cordon is never undone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned_by_healer: bool,
    /// Training jobs this node stalls or slows ([`JOB_CONDITIONS`]), oldest first, at most
    /// [`JOBS_MAX`]: kept for the ticket's life and carried to the ticket that supersedes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobRelation>,
}

fn one() -> u32 {
    1
}

/// Cuts a free-text field (reason, message, block) to what a ticket stores.
pub fn clip_text(s: &mut String) {
    clip_to(s, TEXT_MAX);
}

/// Cuts `s` to at most `max` bytes at a char boundary.
pub fn clip_to(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.shrink_to_fit();
    }
}

/// A fingerprint that fits the ticket: as is up to [`FINGERPRINT_MAX`] bytes, else its FNV-1a
/// hash (distinct long fingerprints stay distinct).
pub fn short_fingerprint(fp: &str) -> String {
    if fp.len() <= FINGERPRINT_MAX {
        return fp.to_owned();
    }
    fnv1a_hex(fp)
}

/// The 16-hex FNV-1a hash of `s`: stable across runs and platforms.
fn fnv1a_hex(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Ticket {
    /// A fresh ticket for `condition`, carrying the remediation history of `previous`.
    pub fn new(
        condition: &str,
        reason: &str,
        sop: &str,
        fingerprint: Option<&str>,
        now: Timestamp,
        previous: Option<&Ticket>,
    ) -> Self {
        let remediations = previous.map(|p| p.remediations.clone()).unwrap_or_default();
        // The jobs a node stalls belong to the incident, not to one condition: a ticket that
        // supersedes an unfinished one (open, or escalated to people) keeps them. A finished
        // incident's jobs are not carried into the next one.
        let jobs = previous
            .filter(|p| p.status.is_unfinished())
            .map(|p| p.jobs.clone())
            .unwrap_or_default();
        let attempts = previous
            .filter(|p| p.condition == condition)
            .map_or(1, |p| p.attempts.saturating_add(1));
        // The ticket id (Job names) is createdAt in seconds: never the previous ticket's.
        let created_at = match previous {
            Some(p) if now.as_second() <= p.created_at.as_second() => {
                Timestamp::from_second(p.created_at.as_second().saturating_add(1)).unwrap_or(now)
            }
            _ => now,
        };
        let mut t = Ticket {
            schema: Some(SCHEMA),
            condition: condition.to_owned(),
            reason: reason.to_owned(),
            status: TicketStatus::Created,
            created_at,
            attempts,
            workflows: Vec::new(),
            sop: Some(sop.to_owned()),
            sop_digest: None,
            priority: None,
            fingerprint: fingerprint.map(short_fingerprint),
            alert_started_at: None,
            blocked: None,
            closed_at: None,
            history: Vec::new(),
            remediations,
            disrupted: false,
            cordoned_by_healer: false,
            jobs,
        };
        t.compact();
        t
    }

    /// Identity of this ticket, stable across restarts: used to name its Jobs.
    pub fn id(&self) -> String {
        format!("{}", self.created_at.as_second())
    }

    /// The workflow entry of SOP step `index`: by its `step` field, else by position.
    pub fn workflow(&self, index: usize) -> Option<&Workflow> {
        self.workflows
            .iter()
            .find(|w| w.step == Some(index))
            .or_else(|| self.workflows.get(index).filter(|w| w.step.is_none()))
    }

    /// Index of the first SOP step that has not succeeded/been skipped.
    pub fn next_step(&self, steps: usize) -> Option<usize> {
        (0..steps).find(|&i| {
            !matches!(
                self.workflow(i).map(|w| w.status),
                Some(StepStatus::Succeeded | StepStatus::Skipped)
            )
        })
    }

    /// Records the state of step `index`, replacing its previous entry.
    pub fn record(&mut self, index: usize, entry: Workflow) {
        let mut entry = entry;
        entry.step = Some(index);
        if let Some(m) = entry.message.as_mut() {
            clip_text(m);
        }
        if let Some(pos) = self
            .workflows
            .iter()
            .position(|w| w.step == Some(index))
            .or_else(|| {
                (index < self.workflows.len() && self.workflows[index].step.is_none())
                    .then_some(index)
            })
        {
            self.workflows[pos] = entry;
        } else {
            self.workflows.push(entry);
        }
    }

    /// Disruptive remediations started within `window_seconds` before `now` by a condition at
    /// most as urgent as `priority` (a larger or equal priority number).
    pub fn remediations_since(&self, now: Timestamp, window_seconds: u64, priority: u32) -> usize {
        let from = now.as_second().saturating_sub(window_seconds as i64);
        self.remediations
            .iter()
            .filter(|r| r.at.as_second() >= from && r.priority <= priority)
            .count()
    }

    /// Records the job relations of the node's firing job alerts (`relations`, from the plan):
    /// new ones are added, a known one keeps its earliest `since` and takes the current victim
    /// count. Relations whose alert resolved stay (the ticket is the incident's record); at most
    /// the [`JOBS_MAX`] newest are kept, and only as many as the ticket has room for once
    /// everything else in it is written (jobs are the first thing shed, see
    /// [`Ticket::to_annotation`]). Returns whether `jobs` changed, i.e. whether the ticket must be
    /// written: the same alerts again change nothing, so they cost no write (and what does not
    /// fit is dropped here, so it is not re-added and re-written every pass).
    pub fn record_jobs(&mut self, relations: &[JobRelation]) -> bool {
        if relations.is_empty() {
            return false;
        }
        let mut merged = self.jobs.clone();
        for r in relations {
            match merged.iter_mut().find(|j| j.key() == r.key()) {
                Some(j) => {
                    j.since = j.since.min(r.since);
                    if r.victim_nodes.is_some() {
                        j.victim_nodes = r.victim_nodes;
                    }
                }
                None => merged.push(r.clone()),
            }
        }
        normalize_jobs(&mut merged);
        if merged == self.jobs {
            return false;
        }
        let mut t = self.clone();
        t.jobs = merged;
        if let Ok((fitted, _)) = t.fitted("") {
            t.jobs = fitted.jobs;
        }
        if t.jobs == self.jobs {
            return false;
        }
        self.jobs = t.jobs;
        true
    }

    /// Clips every free-text field, so that any ticket fits [`TICKET_MAX_BYTES`] (I5).
    fn compact(&mut self) {
        clip_text(&mut self.reason);
        clip_to(&mut self.condition, NAME_MAX);
        if let Some(b) = self.blocked.as_mut() {
            clip_text(b);
        }
        for s in [&mut self.sop, &mut self.sop_digest].into_iter().flatten() {
            clip_to(s, NAME_MAX);
        }
        if let Some(f) = self.fingerprint.as_mut() {
            *f = short_fingerprint(f);
        }
        for w in &mut self.workflows {
            clip_to(&mut w.action, NAME_MAX);
            if let Some(m) = w.message.as_mut() {
                clip_text(m);
            }
            if let Some(j) = w.job.as_mut() {
                clip_to(j, NAME_MAX);
            }
        }
        if self.remediations.len() > HISTORY_MAX {
            let drop = self.remediations.len() - HISTORY_MAX;
            self.remediations.drain(..drop);
        }
        normalize_jobs(&mut self.jobs);
    }

    /// YAML for the annotation; errors rather than writing more than [`TICKET_MAX_BYTES`].
    pub fn to_annotation(&self, node: &str) -> Result<String> {
        self.fitted(node).map(|(_, text)| text)
    }

    /// The ticket as written, and its YAML: compacted, then shed of the least useful data until it
    /// fits — the oldest job relations but the newest (information for people), then old
    /// remediations (cooldown and repeat-offender need them: after jobs), then step messages, then
    /// the last job relation.
    fn fitted(&self, node: &str) -> Result<(Ticket, String)> {
        let mut t = self.clone();
        t.compact();
        let mut text = serde_yaml::to_string(&t).map_err(|e| Error::Ticket {
            node: node.to_owned(),
            message: e.to_string(),
        })?;
        while text.len() > TICKET_MAX_BYTES && t.jobs.len() > 1 {
            t.jobs.remove(0);
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        while text.len() > TICKET_MAX_BYTES && t.remediations.len() > 1 {
            t.remediations.remove(0);
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        if text.len() > TICKET_MAX_BYTES {
            for w in &mut t.workflows {
                w.message = None;
            }
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        if text.len() > TICKET_MAX_BYTES {
            t.jobs.clear();
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        if text.len() > TICKET_MAX_BYTES {
            return Err(Error::TicketTooLarge {
                node: node.to_owned(),
                size: text.len(),
                limit: TICKET_MAX_BYTES,
            });
        }
        Ok((t, text))
    }

    /// Parses the annotation. The error names the node and says what is wrong and where.
    pub fn from_annotation(node: &str, text: &str) -> Result<Self> {
        if text.len() > TICKET_MAX_BYTES {
            return Err(Error::TicketTooLarge {
                node: node.to_owned(),
                size: text.len(),
                limit: TICKET_MAX_BYTES,
            });
        }
        let t: Ticket = serde_yaml::from_str(text).map_err(|e| Error::Ticket {
            node: node.to_owned(),
            message: match e.location() {
                Some(l) => format!(
                    "{e} (line {}, column {}); fix or delete the {TICKET_ANNOTATION} annotation",
                    l.line(),
                    l.column()
                ),
                None => format!("{e}; fix or delete the {TICKET_ANNOTATION} annotation"),
            },
        })?;
        // A ticket of a newer release (after a rollback) may mean things this release does not
        // know: it is left untouched, like a broken one, instead of being rewritten without them.
        if let Some(v) = t.schema.filter(|v| *v > SCHEMA) {
            return Err(Error::Ticket {
                node: node.to_owned(),
                message: format!(
                    "ticket schema {v} was written by a newer ark-healer (this one writes {SCHEMA}); \
                     it will not touch the node until upgraded again, or until the \
                     {TICKET_ANNOTATION} annotation is removed"
                ),
            });
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = "condition: GpuFellOffBus
reason: \"XID 79 on gpu 3\"
status: resolving            # created | resolving | resolved | escalated | closed
createdAt: 2026-11-22T10:00:00Z
attempts: 1
workflows:
  - {action: Cordon, status: Succeeded, at: 2026-11-22T10:00:01Z}
  - {action: Drain, status: Running, at: 2026-11-22T10:00:02Z}
";

    #[test]
    fn parses_the_design_example() {
        let t = Ticket::from_annotation("n1", DESIGN_EXAMPLE).unwrap();
        assert_eq!(t.condition, "GpuFellOffBus");
        assert_eq!(t.status, TicketStatus::Resolving);
        assert_eq!(t.workflows.len(), 2);
        assert_eq!(t.workflow(0).unwrap().status, StepStatus::Succeeded);
        assert_eq!(t.next_step(5), Some(1));
    }

    #[test]
    fn round_trips() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut t = Ticket::new("GpuHung", "XID 109", "gpu-reset", Some("fp"), now, None);
        t.record(
            0,
            Workflow {
                action: "Cordon".into(),
                status: StepStatus::Succeeded,
                at: now,
                step: None,
                job: None,
                message: None,
                retries: None,
            },
        );
        let text = t.to_annotation("n1").unwrap();
        assert!(text.contains("createdAt: 2026-11-22T10:00:00Z"), "{text}");
        assert!(text.contains("action: Cordon"), "{text}");
        let back = Ticket::from_annotation("n1", &text).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.next_step(3), Some(1));
    }

    #[test]
    fn hand_edits_are_tolerated_or_reported_clearly() {
        // Unknown keys (a human's note) and missing optional keys are fine.
        let edited = "condition: GpuHung\nstatus: closed\ncreatedAt: 2026-11-22T10:00:00Z\nnote: fixed the riser by hand\n";
        let t = Ticket::from_annotation("n1", edited).unwrap();
        assert_eq!(t.status, TicketStatus::Closed);
        assert_eq!(t.attempts, 1);
        // A typo in a status is an error that names the node and the line.
        let broken = "condition: GpuHung\nstatus: fixed\ncreatedAt: 2026-11-22T10:00:00Z\n";
        let e = Ticket::from_annotation("gpu-17", broken)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpu-17") && e.contains("line 2"), "{e}");
        let e = Ticket::from_annotation("n1", "{{{{")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ark.io/ticket"), "{e}");
    }

    #[test]
    fn stays_under_4k() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut t = Ticket::new("GpuHung", &"x".repeat(10_000), "gpu-reset", None, now, None);
        t.remediations = vec![
            Remediation {
                at: now,
                priority: 3
            };
            500
        ];
        for i in 0..8 {
            t.record(
                i,
                Workflow {
                    action: "RunJob".into(),
                    status: StepStatus::Failed,
                    at: now,
                    step: None,
                    job: Some(format!("ark-{i}")),
                    message: Some("m".repeat(5_000)),
                    retries: Some(3),
                },
            );
        }
        let text = t.to_annotation("n1").unwrap();
        assert!(text.len() <= TICKET_MAX_BYTES, "{}", text.len());
        assert!(Ticket::from_annotation("n1", &"a".repeat(5000)).is_err());
    }

    #[test]
    fn new_ticket_carries_disruptive_remediations_and_counts_attempts() {
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let mut first = Ticket::new("GpuHung", "", "gpu-reset", None, t0, None);
        first.remediations.push(Remediation {
            at: t0,
            priority: 3,
        });
        let second = Ticket::new("GpuHung", "", "gpu-reset", None, t1, Some(&first));
        assert_eq!(second.attempts, 2);
        assert_eq!(second.remediations, first.remediations);
        assert_eq!(second.remediations_since(t1, 3600, 3), 0);
        assert_eq!(second.remediations_since(t1, 86_400, 3), 1);
        // Started by a less urgent condition: never counts against a more urgent one (I3).
        assert_eq!(second.remediations_since(t1, 86_400, 2), 0);
        assert_ne!(first.id(), second.id());
    }

    #[test]
    fn a_ticket_of_a_newer_schema_is_refused_not_rewritten() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t = Ticket::new("GpuHung", "r", "gpu-reset", None, now, None);
        let text = t.to_annotation("n1").unwrap();
        assert!(Ticket::from_annotation("n1", &text).is_ok());
        let newer = text.replace("schema: 2", "schema: 3");
        assert_ne!(newer, text);
        let err = Ticket::from_annotation("n1", &newer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("newer ark-healer"), "{err}");
    }

    #[test]
    fn schema_1_tickets_are_still_read_and_written_as_schema_2() {
        // As written by the previous release: `history`, no schema, no digest.
        let old = "condition: GpuHung\nreason: xid 109\nstatus: resolving\ncreatedAt: 2026-11-22T10:00:00Z\nattempts: 1\nworkflows:\n- action: Cordon\n  status: Succeeded\n  at: 2026-11-22T10:00:01Z\n  step: 0\nsop: gpu-reset\nhistory:\n- 2026-11-22T10:00:00Z\ncordonedByHealer: true\n";
        let t = Ticket::from_annotation("n1", old).unwrap();
        assert_eq!(t.schema, None);
        assert_eq!(t.sop_digest, None);
        assert_eq!(t.history.len(), 1);
        assert!(t.cordoned_by_healer);
        let mut t2 = t.clone();
        t2.schema = Some(SCHEMA);
        let text = t2.to_annotation("n1").unwrap();
        assert!(
            text.contains("schema: 2") && !text.contains("history"),
            "{text}"
        );
    }

    #[test]
    fn a_huge_fingerprint_and_huge_names_still_fit() {
        // Issue 14 scenario 6: a ~5 KB fingerprint made the ticket unwritable forever.
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let fp = "f".repeat(5000);
        let mut t = Ticket::new(
            &"C".repeat(5000),
            "r",
            &"s".repeat(5000),
            Some(&fp),
            now,
            None,
        );
        t.sop_digest = Some("d".repeat(5000));
        let text = t.to_annotation("n1").unwrap();
        assert!(text.len() <= TICKET_MAX_BYTES, "{}", text.len());
        let back = Ticket::from_annotation("n1", &text).unwrap();
        assert_eq!(
            back.fingerprint.as_deref(),
            Some(short_fingerprint(&fp).as_str())
        );
        assert_ne!(short_fingerprint(&fp), short_fingerprint(&"g".repeat(5000)));
        assert_eq!(short_fingerprint("abc123"), "abc123");
    }

    fn rel(job: &str, condition: &str, victims: Option<&str>, at: &str) -> JobRelation {
        JobRelation::new(job, condition, victims, at.parse().unwrap()).unwrap()
    }

    #[test]
    fn old_tickets_without_jobs_parse_and_jobs_round_trip() {
        let t = Ticket::from_annotation("n1", DESIGN_EXAMPLE).unwrap();
        assert!(t.jobs.is_empty());
        let text = t.to_annotation("n1").unwrap();
        assert!(!text.contains("jobs"), "empty jobs are not written: {text}");

        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut t = Ticket::new("GpuFellOffBus", "XID 79", "reboot", None, now, None);
        assert!(t.record_jobs(&[rel(
            "train-42",
            "JobBlockedByNode",
            Some("7"),
            "2026-11-22T10:00:05Z"
        )]));
        let text = t.to_annotation("n1").unwrap();
        assert!(
            text.contains("jobId: train-42") && text.contains("victimNodes: 7"),
            "{text}"
        );
        let back = Ticket::from_annotation("n1", &text).unwrap();
        assert_eq!(back, t);
        // Hand-written entries without the optional keys are read too.
        let hand = text.replace("  victimNodes: 7\n", "");
        let back = Ticket::from_annotation("n1", &hand).unwrap();
        assert_eq!(back.jobs[0].victim_nodes, None);
    }

    #[test]
    fn record_jobs_says_whether_anything_changed() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, now, None);
        assert!(!t.record_jobs(&[]));
        let a = rel(
            "train-1",
            "JobBlockedByNode",
            Some("3"),
            "2026-11-22T10:00:00Z",
        );
        assert!(t.record_jobs(std::slice::from_ref(&a)));
        assert!(!t.record_jobs(std::slice::from_ref(&a)), "the same again");
        // A later occurrence: the earliest `since` stays, the victim count is the current one.
        let later = rel(
            "train-1",
            "JobBlockedByNode",
            Some("5"),
            "2026-11-22T11:00:00Z",
        );
        assert!(t.record_jobs(std::slice::from_ref(&later)));
        assert_eq!(t.jobs.len(), 1);
        assert_eq!(t.jobs[0].since, a.since);
        assert_eq!(t.jobs[0].victim_nodes, Some(5));
        // No count in the alert: the known one stays.
        let none = rel("train-1", "JobBlockedByNode", None, "2026-11-22T11:00:00Z");
        assert!(!t.record_jobs(&[none]));
        // Same job, other condition: a second relation.
        let slow = rel("train-1", "JobStragglerNode", None, "2026-11-22T11:00:00Z");
        assert!(t.record_jobs(std::slice::from_ref(&slow)));
        assert_eq!(t.jobs.len(), 2);
        // A relation no longer reported (its alert resolved) stays.
        assert!(!t.record_jobs(&[slow]));
        assert_eq!(t.jobs.len(), 2);
        assert!(t.jobs.iter().any(|j| j.key() == a.key()));
    }

    #[test]
    fn a_hundred_jobs_keep_the_newest_sixteen() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, now, None);
        let many: Vec<JobRelation> = (0..100)
            .map(|i| {
                JobRelation::new(
                    &format!("job-{i:03}"),
                    "JobStragglerNode",
                    Some("1"),
                    Timestamp::from_second(now.as_second() + i).unwrap(),
                )
                .unwrap()
            })
            .collect();
        assert!(t.record_jobs(&many));
        assert_eq!(t.jobs.len(), JOBS_MAX);
        assert_eq!(t.jobs[0].job_id, "job-084");
        assert_eq!(t.jobs[JOBS_MAX - 1].job_id, "job-099");
        assert!(!t.record_jobs(&many), "idempotent at the bound");
        // An older relation than all kept ones is not taken in (and is not a change).
        let old = JobRelation::new("ancient", "JobStragglerNode", None, now).unwrap();
        assert!(!t.record_jobs(&[old]));
        assert!(t.to_annotation("n1").unwrap().len() <= TICKET_MAX_BYTES);
    }

    #[test]
    fn hostile_job_labels_are_clipped() {
        let at: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        assert!(JobRelation::new("", "JobBlockedByNode", None, at).is_none());
        let evil = format!("a\nb\u{1b}[2J\0{}", "é".repeat(10_000));
        let r = JobRelation::new(&evil, &"C\n".repeat(500), Some("NaN"), at).unwrap();
        assert!(r.job_id.len() <= JOB_ID_MAX, "{}", r.job_id.len());
        assert!(r.job_id.starts_with("a?b?[2J?"), "{:?}", r.job_id);
        assert!(!r.job_id.chars().any(char::is_control));
        assert!(r.condition.len() <= NAME_MAX && !r.condition.contains('\n'));
        assert_eq!(r.victim_nodes, None);
        // Distinct long ids stay distinct; a DNS-label-sized id is kept as is.
        let other = JobRelation::new(&format!("{evil}!"), "c", None, at).unwrap();
        assert_ne!(r.job_id, other.job_id);
        let dns = "j".repeat(63);
        assert_eq!(JobRelation::new(&dns, "c", None, at).unwrap().job_id, dns);
        // Counts as Prometheus renders them; anything else is left out.
        for (v, want) in [
            ("3", Some(3)),
            (" 3 ", Some(3)),
            ("3.0", Some(3)),
            ("1e+01", Some(10)),
            ("-1", None),
            ("+Inf", None),
            ("lots", None),
            ("99999999999", Some(u32::MAX)),
        ] {
            assert_eq!(parse_count(v), want, "{v}");
        }
        // Entries a human wrote are clipped on the next write too.
        let mut t = Ticket::new("GpuHung", "", "gpu-reset", None, at, None);
        t.jobs = vec![JobRelation {
            job_id: evil.clone(),
            condition: "JobBlockedByNode".into(),
            victim_nodes: None,
            since: at,
        }];
        let text = t.to_annotation("n1").unwrap();
        let back = Ticket::from_annotation("n1", &text).unwrap();
        assert!(back.jobs[0].job_id.len() <= JOB_ID_MAX);
        assert!(!back.jobs[0].job_id.chars().any(char::is_control));
    }

    #[test]
    fn jobs_are_shed_first_and_what_does_not_fit_is_not_rewritten() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        // A ticket near its limit: long reason, messages, many remediations.
        let mut t = Ticket::new("GpuHung", &"r".repeat(300), "gpu-reset", None, now, None);
        t.remediations = vec![
            Remediation {
                at: now,
                priority: 3
            };
            HISTORY_MAX
        ];
        for i in 0..7 {
            t.record(
                i,
                Workflow {
                    action: "RunJob".into(),
                    status: StepStatus::Succeeded,
                    at: now,
                    step: None,
                    job: Some(format!("ark-gpu-reset-{}-{i}", "n".repeat(40))),
                    message: Some("m".repeat(200)),
                    retries: None,
                },
            );
        }
        let many: Vec<JobRelation> = (0..16)
            .map(|i| {
                JobRelation::new(
                    &format!("{i:02}{}", "j".repeat(70)),
                    "JobBlockedByNode",
                    Some("100"),
                    Timestamp::from_second(now.as_second() + i).unwrap(),
                )
                .unwrap()
            })
            .collect();
        assert!(t.record_jobs(&many));
        assert!(
            !t.jobs.is_empty() && t.jobs.len() < JOBS_MAX,
            "{}",
            t.jobs.len()
        );
        // The newest are the ones kept; the remediations and messages are untouched.
        assert_eq!(t.jobs.last().unwrap().job_id, many[15].job_id);
        let text = t.to_annotation("n1").unwrap();
        assert!(text.len() <= TICKET_MAX_BYTES);
        let back = Ticket::from_annotation("n1", &text).unwrap();
        assert_eq!(back.remediations.len(), HISTORY_MAX);
        assert!(back.workflows.iter().all(|w| w.message.is_some()));
        assert_eq!(back.jobs, t.jobs);
        // Re-read and offered the same alerts again: nothing to write (no write per pass).
        let mut again = back.clone();
        assert!(!again.record_jobs(&many));
        assert_eq!(again, back);
    }

    #[test]
    fn a_superseding_ticket_keeps_the_jobs_a_new_incident_does_not() {
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-22T10:05:00Z".parse().unwrap();
        let mut first = Ticket::new("JobBlockedByNode", "", "cordon-diagnose", None, t0, None);
        first.record_jobs(&[rel(
            "train-42",
            "JobBlockedByNode",
            Some("3"),
            "2026-11-22T10:00:00Z",
        )]);
        for (status, kept) in [
            (TicketStatus::Created, true),
            (TicketStatus::Resolving, true),
            (TicketStatus::Escalated, true),
            (TicketStatus::Resolved, false),
            (TicketStatus::Closed, false),
        ] {
            first.status = status;
            let next = Ticket::new("GpuFellOffBus", "", "reboot", None, t1, Some(&first));
            assert_eq!(!next.jobs.is_empty(), kept, "{status:?}");
        }
    }

    #[test]
    fn hand_edited_jobs_are_read_and_written_back_normalized() {
        // The fuzz seed `fuzz/seeds/ticket_annotation/jobs`: a duplicate, control characters,
        // a missing `since`.
        let text = include_str!("../../fuzz/seeds/ticket_annotation/jobs");
        let t = Ticket::from_annotation("n1", text).unwrap();
        assert_eq!(t.jobs.len(), 3);
        let again = t.to_annotation("n1").unwrap();
        let back = Ticket::from_annotation("n1", &again).unwrap();
        assert_eq!(back.jobs.len(), 2, "{again}");
        let blocked = back.jobs.iter().find(|j| j.job_id == "train-42").unwrap();
        assert_eq!(
            blocked.since,
            "2026-12-04T01:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(blocked.victim_nodes, Some(7));
        assert!(
            back.jobs
                .iter()
                .all(|j| !j.job_id.chars().any(char::is_control))
        );
        // Written back once, it is stable: its own relations change nothing.
        let mut same = back.clone();
        let own = back.jobs.clone();
        assert!(!same.record_jobs(&own));
        assert_eq!(same.to_annotation("n1").unwrap(), again);
    }
}
