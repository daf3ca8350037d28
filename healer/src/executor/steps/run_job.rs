//! `RunJob{template}`: run a Job from `deploy/jobs/<template>.yaml` on the node and wait for it.
//! The Job's name is derived from the ticket (node, ticket id, step index), so a restarted healer
//! finds the Job it already created instead of starting a second one (never a second reboot).
//! A Job is deleted (propagationPolicy Background, or its pods would be orphaned) only after its
//! success is recorded in the ticket; so "no Job and the step not Succeeded" means "never
//! created".

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::batch::v1::Job;

use super::{Outcome, StepCtx};
use crate::catalog::JOB_TEMPLATES;
use crate::k8s::Cluster;
use crate::{Error, Result};

/// Job templates by name: embedded from `deploy/jobs/`, or read from a directory.
#[derive(Debug, Clone)]
pub struct JobTemplates {
    templates: BTreeMap<String, String>,
}

impl JobTemplates {
    pub fn embedded() -> Self {
        let t = [
            (
                "reboot",
                include_str!("../../../../deploy/jobs/reboot.yaml"),
            ),
            (
                "gpu-reset",
                include_str!("../../../../deploy/jobs/gpu-reset.yaml"),
            ),
            (
                "healthcheck",
                include_str!("../../../../deploy/jobs/healthcheck.yaml"),
            ),
            (
                "diagnose",
                include_str!("../../../../deploy/jobs/diagnose.yaml"),
            ),
            (
                "repair",
                include_str!("../../../../deploy/jobs/repair.yaml"),
            ),
        ];
        JobTemplates {
            templates: t
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(Self::embedded());
        };
        let mut templates = BTreeMap::new();
        for name in JOB_TEMPLATES {
            let path = dir.join(format!("{name}.yaml"));
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            templates.insert((*name).to_owned(), text);
        }
        let t = JobTemplates { templates };
        for name in JOB_TEMPLATES {
            t.render(name, "ark-check", "default", "node", "all", "X", "0")?;
        }
        Ok(t)
    }

    /// The Job for `template`, placeholders substituted, name/namespace/labels/nodeName forced.
    #[allow(clippy::too_many_arguments)]
    pub fn render(
        &self,
        template: &str,
        name: &str,
        namespace: &str,
        node: &str,
        gpu: &str,
        condition: &str,
        ticket: &str,
    ) -> Result<Job> {
        let err = |message: String| Error::JobTemplate {
            template: template.to_owned(),
            message,
        };
        // The values come from alert labels (anyone who can post to Alertmanager sets them) and
        // are pasted into the YAML of a privileged pod spec: only plain tokens may go in, so a
        // quote or a newline can never change the spec's structure.
        for (placeholder, value) in [
            ("NODE", node),
            ("GPU", gpu),
            ("CONDITION", condition),
            ("TICKET", ticket),
        ] {
            if !is_plain_token(value) {
                return Err(err(format!(
                    "refusing to substitute ${{{placeholder}}} = {value:?}: only letters, digits \
                     and .:_- are allowed (at most 253 characters)"
                )));
            }
        }
        let text = self
            .templates
            .get(template)
            .ok_or_else(|| err("no such template".into()))?
            .replace("${NODE}", node)
            .replace("${GPU}", gpu)
            .replace("${CONDITION}", condition)
            .replace("${TICKET}", ticket);
        let mut job: Job = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
        job.metadata.name = Some(name.to_owned());
        job.metadata.namespace = Some(namespace.to_owned());
        let labels = job.metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.insert("app.kubernetes.io/managed-by".into(), "ark-healer".into());
        labels.insert("ark.io/template".into(), template.to_owned());
        let spec = job
            .spec
            .as_mut()
            .ok_or_else(|| err("Job has no spec".into()))?;
        let pod = spec
            .template
            .spec
            .as_mut()
            .ok_or_else(|| err("Job has no pod spec".into()))?;
        pod.node_name = Some(node.to_owned());
        Ok(job)
    }
}

/// True for a non-empty value of at most 253 letters, digits, `.`, `:`, `_` or `-` (node names,
/// GPU indexes or bus ids, condition names, ticket ids) — nothing YAML could read as structure.
fn is_plain_token(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '_' | '-'))
}

/// Deterministic Job name for step `index` of ticket `ticket_id` on `node` (≤ 63 characters).
pub fn job_name(template: &str, node: &str, ticket_id: &str, index: usize) -> String {
    let name = format!("ark-{template}-{node}-{ticket_id}-{index}");
    if name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return name;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ark-{template}-{h:016x}-{ticket_id}-{index}")
}

pub async fn run<C: Cluster>(
    ctx: &StepCtx<'_, C>,
    template: &str,
    timeout_seconds: u64,
) -> Result<Outcome> {
    let name = job_name(template, ctx.node_name, &ctx.ticket.id(), ctx.index);
    let existing = ctx.cluster.get_job(ctx.jobs_namespace, &name).await?;
    let Some(job) = existing else {
        let job = ctx.jobs.render(
            template,
            &name,
            ctx.jobs_namespace,
            ctx.node_name,
            ctx.gpu,
            &ctx.ticket.condition,
            &ctx.ticket.id(),
        )?;
        ctx.cluster.create_job(ctx.jobs_namespace, &job).await?;
        return Ok(Outcome::Waiting {
            message: format!("Job {name} created"),
            job: Some(name),
        });
    };
    let status = job.status.unwrap_or_default();
    if status.succeeded.unwrap_or(0) >= 1 {
        return Ok(Outcome::Done {
            message: format!("Job {name} succeeded"),
            patch: None,
        });
    }
    let failed = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Failed" && c.status == "True");
    if failed {
        return Ok(Outcome::Failed {
            message: format!("Job {name} failed"),
        });
    }
    if ctx.elapsed_seconds() >= timeout_seconds {
        return Ok(Outcome::Failed {
            message: format!("Job {name} did not finish within {timeout_seconds} s"),
        });
    }
    Ok(Outcome::Waiting {
        message: format!("Job {name} running"),
        job: Some(name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_with_node_binding() {
        let t = JobTemplates::embedded();
        for name in JOB_TEMPLATES {
            let job = t
                .render(
                    name,
                    "ark-x",
                    "ark-system",
                    "gpu-node-1",
                    "3",
                    "GpuHung",
                    "1",
                )
                .unwrap();
            assert_eq!(job.metadata.name.as_deref(), Some("ark-x"));
            let pod = job.spec.unwrap().template.spec.unwrap();
            assert_eq!(pod.node_name.as_deref(), Some("gpu-node-1"));
            assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        }
        assert!(
            t.render("format-disk", "x", "ns", "n", "0", "c", "1")
                .is_err()
        );
    }

    #[test]
    fn label_values_cannot_change_the_job_yaml() {
        let t = JobTemplates::embedded();
        for hostile in [
            "3\"\n        privileged: true",
            "0\ncommand: [rm, -rf, /]",
            "",
            "${NODE}",
            "a b",
            &"x".repeat(254),
        ] {
            let e = t
                .render(
                    "gpu-reset",
                    "ark-x",
                    "ark-system",
                    "n1",
                    hostile,
                    "GpuHung",
                    "1",
                )
                .expect_err(hostile);
            assert!(
                e.to_string().contains("refusing to substitute ${GPU}"),
                "{e}"
            );
        }
        for ok in ["3", "all", "00000000:3B:00.0", "GPU-1a2b_3"] {
            t.render("gpu-reset", "ark-x", "ark-system", "n1", ok, "GpuHung", "1")
                .unwrap();
        }
    }

    #[test]
    fn job_names_are_deterministic_and_valid() {
        let a = job_name("reboot", "n1", "1763805600", 3);
        assert_eq!(a, "ark-reboot-n1-1763805600-3");
        assert_eq!(a, job_name("reboot", "n1", "1763805600", 3));
        let long = job_name(
            "healthcheck",
            &"very-long-node-name.".repeat(5),
            "1763805600",
            5,
        );
        assert!(long.len() <= 63, "{long}");
        assert!(!long.contains('.'));
    }
}
