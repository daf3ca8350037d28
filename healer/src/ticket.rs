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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
    Skipped,
    Blocked,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Why the last action was blocked (budget, cooldown, ...), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
    /// Start times of past remediations of this node (carried from ticket to ticket).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Timestamp>,
    /// The healer cordoned this node (so it may uncordon it); a manual cordon is never undone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned_by_healer: bool,
}

fn one() -> u32 {
    1
}

fn clip(s: &mut String) {
    if s.len() > TEXT_MAX {
        let mut cut = TEXT_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
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
        let mut history = previous.map(|p| p.history.clone()).unwrap_or_default();
        history.push(now);
        let attempts = previous
            .filter(|p| p.condition == condition)
            .map_or(1, |p| p.attempts.saturating_add(1));
        let mut t = Ticket {
            condition: condition.to_owned(),
            reason: reason.to_owned(),
            status: TicketStatus::Created,
            created_at: now,
            attempts,
            workflows: Vec::new(),
            sop: Some(sop.to_owned()),
            fingerprint: fingerprint.map(str::to_owned),
            blocked: None,
            closed_at: None,
            history,
            cordoned_by_healer: false,
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
            clip(m);
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

    /// Remediations started within `window_seconds` before `now`.
    pub fn remediations_since(&self, now: Timestamp, window_seconds: u64) -> usize {
        let from = now.as_second().saturating_sub(window_seconds as i64);
        self.history
            .iter()
            .filter(|t| t.as_second() >= from)
            .count()
    }

    fn compact(&mut self) {
        clip(&mut self.reason);
        if let Some(b) = self.blocked.as_mut() {
            clip(b);
        }
        if self.history.len() > HISTORY_MAX {
            let drop = self.history.len() - HISTORY_MAX;
            self.history.drain(..drop);
        }
    }

    /// YAML for the annotation; errors rather than writing more than [`TICKET_MAX_BYTES`].
    pub fn to_annotation(&self, node: &str) -> Result<String> {
        let mut t = self.clone();
        t.compact();
        let mut text = serde_yaml::to_string(&t).map_err(|e| Error::Ticket {
            node: node.to_owned(),
            message: e.to_string(),
        })?;
        // Shed the least useful data first: old history, then step messages.
        while text.len() > TICKET_MAX_BYTES && t.history.len() > 1 {
            t.history.remove(0);
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        if text.len() > TICKET_MAX_BYTES {
            for w in &mut t.workflows {
                w.message = None;
            }
            text = serde_yaml::to_string(&t).unwrap_or_default();
        }
        if text.len() > TICKET_MAX_BYTES {
            return Err(Error::TicketTooLarge {
                node: node.to_owned(),
                size: text.len(),
                limit: TICKET_MAX_BYTES,
            });
        }
        Ok(text)
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
        serde_yaml::from_str(text).map_err(|e| Error::Ticket {
            node: node.to_owned(),
            message: match e.location() {
                Some(l) => format!(
                    "{e} (line {}, column {}); fix or delete the {TICKET_ANNOTATION} annotation",
                    l.line(),
                    l.column()
                ),
                None => format!("{e}; fix or delete the {TICKET_ANNOTATION} annotation"),
            },
        })
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
        t.history = vec![now; 500];
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
    fn new_ticket_carries_history_and_counts_attempts() {
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let first = Ticket::new("GpuHung", "", "gpu-reset", None, t0, None);
        let second = Ticket::new("GpuHung", "", "gpu-reset", None, t1, Some(&first));
        assert_eq!(second.attempts, 2);
        assert_eq!(second.history, vec![t0, t1]);
        assert_eq!(second.remediations_since(t1, 3600), 1);
        assert_eq!(second.remediations_since(t1, 86_400), 2);
        assert_ne!(first.id(), second.id());
    }
}
