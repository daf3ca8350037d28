//! Issue 14 (healer safety), black box: the real ark-healer binary against the REAL
//! kube-apiserver v1.20 (+ controller-manager) and a real Alertmanager, one test per scenario
//! of the issue (1–8) and per convention of its Deliver §3. Each doc comment says which
//! scenario it attacks and how the healer of `main` before the fix fails it.
//!
//! Tests that need a configuration key the old healer does not know (`lease.margin_seconds`,
//! `[alertmanager]`) leave it out when `ARK_SAFETY_WITHOUT_NEW_KEYS=1`: a diagnostic switch to
//! watch the old binary fail on the behaviour itself instead of refusing the configuration
//! (`ARK_BIN_DIR=<old bins> ARK_SAFETY_WITHOUT_NEW_KEYS=1 cargo nextest run -p ark-tests
//! --test healer_safety`). Never set it against the current binary.
//!
//! Times are measured and printed (stderr); assertions are on what the apiserver, Alertmanager,
//! the healer's endpoints and its audit log hold.

mod healer_support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ark_harness::{Alertmanager, AmConfig, DelayProxy, KubeCluster, WebhookSink, wait_for};
use healer_support::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

/// `(since the poller started, holderIdentity)` at every change.
type HolderTimeline = Vec<(Duration, Option<String>)>;

const T0: &str = "2026-11-22T10:00:00Z";
const NO_BUDGET_LIMIT: &str = "[budget]\nmax_unschedulable = 0\nmax_unschedulable_percent = 0.0\n";
const NO_LEASE: &str = "[lease]\nenabled = false\n";

/// `key` unless `ARK_SAFETY_WITHOUT_NEW_KEYS=1` (see the module doc).
fn new_key(key: &str) -> &str {
    if std::env::var("ARK_SAFETY_WITHOUT_NEW_KEYS").is_ok_and(|v| v == "1") {
        ""
    } else {
        key
    }
}

fn with_fingerprint(mut a: Value, fp: &str) -> Value {
    a["fingerprint"] = json!(fp);
    a
}

fn resolved_at(node: &str, condition: &str, starts: &str, ends: &str, fp: &str) -> Value {
    let mut a = alert(node, condition, false, starts);
    a["endsAt"] = json!(ends);
    with_fingerprint(a, fp)
}

async fn post_ok(h: &Healer, body: &Value) -> Result<()> {
    let (code, resp) = h.post(body).await?;
    if code != 202 {
        bail!("webhook of {} answered {code}: {resp}", h.service.name());
    }
    Ok(())
}

/// Waits for the healer's `/healthz` (the process serves), not for leadership.
async fn wait_up(h: &Healer) -> Result<()> {
    let url = h.url("/healthz");
    wait_for(
        &format!("{} /healthz", h.service.name()),
        WAIT,
        &[&h.service],
        || async {
            Ok(reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ()))
        },
    )
    .await
}

async fn readyz(h: &Healer) -> Option<u16> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?
        .get(h.url("/readyz"))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

fn annotation_len(n: &Node) -> usize {
    n.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("ark.io/ticket"))
        .map_or(0, String::len)
}

fn has_taint(n: &Node, key: &str) -> bool {
    taint_keys(n).iter().any(|k| k == key)
}

/// `(action, status, step, message)` of every workflow entry of a ticket, in list order.
fn workflows(t: &serde_yaml::Value) -> Vec<(String, String, Option<u64>, String)> {
    t["workflows"]
        .as_sequence()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let s = |k: &str| w[k].as_str().unwrap_or_default().to_owned();
                    (s("action"), s("status"), w["step"].as_u64(), s("message"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `within` for `f` on the node; on time-out the error shows the node's ticket.
async fn node_within<T>(
    nodes: &Api<Node>,
    name: &str,
    what: &str,
    within: Duration,
    healer: &Healer,
    f: impl Fn(&Node) -> Option<T>,
) -> Result<T> {
    match wait_for(what, within, &[&healer.service], || async {
        Ok(f(&nodes.get(name).await?))
    })
    .await
    {
        Ok(v) => Ok(v),
        Err(e) => {
            let n = nodes.get(name).await?;
            bail!(
                "{what}: not within {within:?} ({e:#})\nnode {name}: unschedulable {}, taints {:?}, ticket:\n{}\nhealer log:\n{}",
                unschedulable(&n),
                taint_keys(&n),
                n.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("ark.io/ticket"))
                    .cloned()
                    .unwrap_or_else(|| "<none>".into()),
                healer.service.log_tail(25)
            )
        }
    }
}

/// What a node poller saw over the whole watch.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// Most nodes unschedulable at once, and which.
    max_out: usize,
    max_out_nodes: Vec<String>,
    /// Nodes ever unschedulable, with when first seen so (since the watch started).
    ever_out: BTreeMap<String, Duration>,
    /// Nodes ever carrying the `ark.io/unhealthy` taint.
    ever_tainted: BTreeSet<String>,
    polls: usize,
}

/// Lists the nodes every 50 ms until finished, recording [`Seen`].
struct NodeWatch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeWatch {
    async fn start(nodes: Api<Node>) -> Result<Self> {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let started = Instant::now();
        let poll = {
            let seen = seen.clone();
            move |list: Vec<Node>| {
                let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                s.polls += 1;
                let out: Vec<String> = list
                    .iter()
                    .filter(|n| unschedulable(n))
                    .filter_map(|n| n.metadata.name.clone())
                    .collect();
                if out.len() > s.max_out {
                    s.max_out = out.len();
                    s.max_out_nodes = out.clone();
                }
                for n in out {
                    s.ever_out.entry(n).or_insert_with(|| started.elapsed());
                }
                for n in list.iter().filter(|n| has_taint(n, "ark.io/unhealthy")) {
                    if let Some(name) = &n.metadata.name {
                        s.ever_tainted.insert(name.clone());
                    }
                }
            }
        };
        // The baseline before the caller goes on.
        poll(nodes.list(&ListParams::default()).await?.items);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = nodes.list(&ListParams::default()).await {
                    poll(list.items);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(NodeWatch { seen, task })
    }

    async fn finish(self) -> Seen {
        tokio::time::sleep(Duration::from_millis(120)).await;
        self.task.abort();
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A Job made from `template` that is not in `seen` (the healer deletes finished Jobs, but a
/// deleted one may still be listed for a moment); added to `seen`.
async fn wait_new_job(
    admin: &kube::Client,
    template: &str,
    seen: &mut HashSet<String>,
    healer: &Healer,
) -> Result<String> {
    let jobs: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
    let lp = ListParams::default().labels(&format!("ark.io/template={template}"));
    let name = wait_for(
        &format!("a new {template} Job"),
        WAIT,
        &[&healer.service],
        || async {
            Ok(jobs
                .list(&lp)
                .await?
                .items
                .into_iter()
                .filter_map(|j| j.metadata.name)
                .find(|n| !seen.contains(n)))
        },
    )
    .await
    .with_context(|| format!("healer log:\n{}", healer.service.log_tail(30)))?;
    seen.insert(name.clone());
    Ok(name)
}

/// Scenario 1 (I2 fencing). Replica A talks to the apiserver through a proxy that holds node
/// writes and every Lease request; replica B talks to it directly. Budget 1, lease 4 s,
/// margin 1 s. A gets GpuHung for a1 (its write for a1 is held), its Lease lapses, B takes over
/// and cordons a2 (GpuHung posted to B); the proxy releases 8 s after the hold began.
/// Assert: never more than one node unschedulable, a1 never cordoned, no write of A for a1
/// reached the apiserver. `main` fails: A's held PATCH is still waited for (10 s request
/// timeout) and is forwarded on release, or its retry goes out after A lost the Lease → a1 and
/// a2 both unschedulable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_budget_holds_after_failover_with_a_delaying_proxy() -> Result<()> {
    if ark_harness::skip_without_services(
        "safety_budget_holds_after_failover_with_a_delaying_proxy",
    ) {
        return Ok(());
    }
    const HOLD: Duration = Duration::from_secs(8);
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in ["a1", "a2", "s1", "s2", "s3"] {
        kube.create_node(n, &[]).await?;
    }
    let proxy = DelayProxy::start(&kube.url(), Some(&kube.ca_path())).await?;
    let dir = tempfile::tempdir()?;
    let kc_a = proxy.kubeconfig(dir.path(), "replica-a", kube.token("healer"))?;
    let cfg = format!(
        "[budget]\nmax_unschedulable = 1\nmax_unschedulable_percent = 0.0\n\
         [lease]\nnamespace = \"ark-system\"\nduration_seconds = 4\n{}",
        new_key("margin_seconds = 1\n")
    );
    let a = Healer::start_with_kubeconfig(&dir.path().join("a"), "replica-a", &cfg, &kc_a)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", &cfg)?;
    wait_up(&b).await?;
    // B has looked at the Lease (held by A) at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !b.is_leader().await,
        "replica-b leads while replica-a holds the Lease"
    );
    assert!(
        a.is_leader().await,
        "replica-a stopped leading before the test began"
    );
    let watch = NodeWatch::start(nodes.clone()).await?;

    // Hold right after one of A's renewals went through: A then has (almost) a whole lease,
    // minus its margin, in which it believes it may write.
    let renewals = |p: &DelayProxy| {
        p.log()
            .iter()
            .filter(|r| {
                r.method == "PUT"
                    && r.path.starts_with("/apis/coordination.k8s.io")
                    && r.status == Some(200)
            })
            .count()
    };
    let before = renewals(&proxy);
    wait_for(
        "a Lease renewal of replica-a through the proxy",
        Duration::from_secs(10),
        &[&a.service],
        || async { Ok((renewals(&proxy) > before).then_some(())) },
    )
    .await?;
    proxy.hold(Some("PATCH"), "/api/v1/nodes");
    proxy.hold(Some("PUT"), "/api/v1/nodes");
    proxy.hold(None, "/apis/coordination.k8s.io");
    let held_at = Instant::now();
    post_ok(&a, &payload(vec![alert("a1", "GpuHung", true, T0)])).await?;

    // A's write for a1 reaches the proxy and waits there (a fenced healer may also decline to
    // send it at all: both are fine, and both are reported).
    let mut a1_held_after = None;
    while held_at.elapsed() < Duration::from_secs(3) {
        if proxy
            .held_now()
            .iter()
            .any(|r| r.path.starts_with("/api/v1/nodes/a1"))
        {
            a1_held_after = Some(held_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(
        "replica-b leading",
        Duration::from_secs(15),
        &[&b.service],
        || async { Ok(b.is_leader().await.then_some(())) },
    )
    .await?;
    let b_leads = held_at.elapsed();
    post_ok(&b, &payload(vec![alert("a2", "GpuHung", true, T0)])).await?;
    node_within(
        &nodes,
        "a2",
        "replica-b cordons a2",
        Duration::from_secs(20),
        &b,
        |n| unschedulable(n).then_some(()),
    )
    .await?;
    let a2_out = held_at.elapsed();
    // Release no earlier than 8 s after the hold began, and only once a2 is out (else an
    // early a1 would merely block a2 and hide the failure).
    tokio::time::sleep(HOLD.saturating_sub(held_at.elapsed())).await;
    let held_at_release = proxy.held_now();
    proxy.release();
    let released = held_at.elapsed();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let seen = watch.finish().await;
    let log = proxy.log();
    let a1_writes: Vec<_> = log
        .iter()
        .filter(|r| {
            (r.method == "PATCH" || r.method == "PUT") && r.path.starts_with("/api/v1/nodes/a1")
        })
        .collect();
    let lease_held = log
        .iter()
        .filter(|r| r.held && r.path.starts_with("/apis/coordination.k8s.io"))
        .count();
    let lease_forwarded_after_hold = log
        .iter()
        .filter(|r| r.held && r.reached_upstream() && r.path.starts_with("/apis/coordination"))
        .count();
    eprintln!(
        "failover behind a delaying proxy: a1's write held at the proxy after {a1_held_after:?}; \
         replica-b leading {b_leads:?} after the hold, a2 cordoned at {a2_out:?}; released at \
         {released:?} with {} requests still held; writes of replica-a for a1: {a1_writes:?}; \
         Lease requests held {lease_held}, of them forwarded on release {lease_forwarded_after_hold}; \
         most unschedulable at once {} {:?}; ever unschedulable {:?}",
        held_at_release.len(),
        seen.max_out,
        seen.max_out_nodes,
        seen.ever_out
    );
    assert!(
        !seen.ever_out.contains_key("a1"),
        "a1 was cordoned by the old leader after it lost the Lease (seen at {:?}); its writes: {a1_writes:?}",
        seen.ever_out.get("a1")
    );
    assert!(
        seen.max_out <= 1,
        "budget 1 exceeded: {:?} unschedulable at once",
        seen.max_out_nodes
    );
    assert!(
        a1_writes.iter().all(|r| !r.reached_upstream()),
        "a write of replica-a for a1 reached the apiserver: {a1_writes:?}"
    );
    let a1 = nodes.get("a1").await?;
    assert!(ticket(&a1).is_none(), "a1 got a ticket: {:?}", ticket(&a1));
    Ok(())
}

/// Scenario 2 (I3 urgency), cooldown: WorkloadStalled on n runs its diagnose Job (not
/// disruptive), the Job succeeds, the alert resolves and the ticket closes; then GpuFellOffBus
/// on n must cordon it at once. `main` fails: the closed diagnose ticket starts the 1 h
/// cooldown and the urgent fault is blocked ("cooldown: last ticket closed at ...").
#[tokio::test]
async fn safety_a_finished_diagnosis_does_not_put_an_urgent_fault_in_cooldown() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_a_finished_diagnosis_does_not_put_an_urgent_fault_in_cooldown").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("n", &[]).await?;
    let dir = tempfile::tempdir()?;
    // The default cooldown (1 h) and repeat-offender policy: they are what is under test.
    let healer = Healer::start(&kube, dir.path(), "healer-a", NO_LEASE)?;
    healer.ready().await?;

    post_ok(
        &healer,
        &payload(vec![alert("n", "WorkloadStalled", true, T0)]),
    )
    .await?;
    let mut seen = HashSet::new();
    let job = wait_new_job(&admin, "diagnose", &mut seen, &healer).await?;
    post_ok(
        &healer,
        &payload(vec![resolved_at(
            "n",
            "WorkloadStalled",
            T0,
            "2026-11-22T10:05:00Z",
            "n-WorkloadStalled",
        )]),
    )
    .await?;
    kube.finish_job_pods("ark-system", &job, true).await?;
    let closed = wait_node(&nodes, "n", "diagnose ticket resolved", &healer, |n| {
        ticket(n).filter(|t| {
            t["condition"].as_str() == Some("WorkloadStalled")
                && t["status"].as_str() == Some("resolved")
        })
    })
    .await?;
    assert!(
        !unschedulable(&nodes.get("n").await?),
        "a diagnosis cordoned n"
    );

    let t = Instant::now();
    post_ok(
        &healer,
        &payload(vec![alert(
            "n",
            "GpuFellOffBus",
            true,
            "2026-11-22T10:10:00Z",
        )]),
    )
    .await?;
    let tk = node_within(
        &nodes,
        "n",
        "GpuFellOffBus cordons n at once",
        Duration::from_secs(10),
        &healer,
        |n| unschedulable(n).then(|| ticket(n)).flatten(),
    )
    .await?;
    eprintln!(
        "urgent fault after a diagnosis: cordoned {:?} after the alert; diagnose ticket {:?} closed at {:?}",
        t.elapsed(),
        closed["createdAt"],
        closed["closedAt"]
    );
    assert_eq!(tk["condition"].as_str(), Some("GpuFellOffBus"), "{tk:?}");
    Ok(())
}

/// Scenario 2 (I3 urgency), repeat offender: three DiskIoSlow diagnoses of m (cooldown off so
/// they can follow each other), then GpuFellOffBus on m must still act. `main` fails: three
/// remediations of any kind within 24 h make m a "repeat offender" and GpuFellOffBus is
/// blocked.
#[tokio::test]
async fn safety_repeat_offender_counts_only_disruptive_remediations() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_repeat_offender_counts_only_disruptive_remediations").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("m", &[]).await?;
    let dir = tempfile::tempdir()?;
    let cfg = format!("cooldown_seconds = 0\n{NO_LEASE}");
    let healer = Healer::start(&kube, dir.path(), "healer-a", &cfg)?;
    healer.ready().await?;

    let mut seen = HashSet::new();
    let mut created = Vec::new();
    for k in 0..3 {
        let starts = format!("2026-11-22T1{k}:00:00Z");
        let fp = format!("m-DiskIoSlow-{k}");
        post_ok(
            &healer,
            &payload(vec![with_fingerprint(
                alert("m", "DiskIoSlow", true, &starts),
                &fp,
            )]),
        )
        .await?;
        let job = wait_new_job(&admin, "diagnose", &mut seen, &healer).await?;
        post_ok(
            &healer,
            &payload(vec![resolved_at(
                "m",
                "DiskIoSlow",
                &starts,
                &format!("2026-11-22T1{k}:05:00Z"),
                &fp,
            )]),
        )
        .await?;
        kube.finish_job_pods("ark-system", &job, true).await?;
        let t = wait_node(&nodes, "m", "diagnose ticket resolved", &healer, |n| {
            ticket(n).filter(|t| {
                t["status"].as_str() == Some("resolved")
                    && !created.contains(&t["createdAt"].as_str().unwrap_or("").to_owned())
            })
        })
        .await?;
        created.push(t["createdAt"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        !unschedulable(&nodes.get("m").await?),
        "a diagnosis cordoned m"
    );

    let t = Instant::now();
    post_ok(
        &healer,
        &payload(vec![alert(
            "m",
            "GpuFellOffBus",
            true,
            "2026-11-22T14:00:00Z",
        )]),
    )
    .await?;
    let tk = node_within(
        &nodes,
        "m",
        "GpuFellOffBus cordons m after three diagnoses",
        Duration::from_secs(10),
        &healer,
        |n| unschedulable(n).then(|| ticket(n)).flatten(),
    )
    .await?;
    eprintln!(
        "urgent fault after 3 diagnoses (tickets {created:?}): cordoned {:?} after the alert",
        t.elapsed()
    );
    assert_eq!(tk["condition"].as_str(), Some("GpuFellOffBus"), "{tk:?}");
    Ok(())
}

/// Scenario 3 (I4 freshness): the firing alert for r reached only the standby B, its
/// resolution only the leader A, and Alertmanager (the healer's `[alertmanager] url`) does not
/// list it as active. A is stopped (SIGTERM); B leads. Over 10 s, r must never be cordoned,
/// tainted or drained and no step may run for it. `main` (no such key) fails: B cordons,
/// taints and drains r from its stale memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_a_resolved_alert_is_not_resurrected_by_a_failover() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_a_resolved_alert_is_not_resurrected_by_a_failover").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("r", &[]).await?;
    kube.create_node("spare", &[]).await?;
    let sink = WebhookSink::start().await?;
    let am = Alertmanager::start(AmConfig::webhook(sink.url())).await?;
    let dir = tempfile::tempdir()?;
    let am_key = format!(
        "[alertmanager]\nurl = \"{}\"\ntimeout_seconds = 2\n",
        am.url()
    );
    let cfg = format!(
        "{NO_BUDGET_LIMIT}[lease]\nnamespace = \"ark-system\"\nduration_seconds = 4\n{}",
        new_key(&am_key)
    );
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", &cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", &cfg)?;
    wait_up(&b).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!b.is_leader().await, "two leaders");

    post_ok(&b, &payload(vec![alert("r", "GpuHung", true, T0)])).await?;
    post_ok(&a, &payload(vec![alert("r", "GpuHung", false, T0)])).await?;
    // Alertmanager itself does not know the alert as active (it was never injected).
    let active: Value = reqwest::Client::new()
        .get(format!("{}/api/v2/alerts", am.url()))
        .query(&[
            ("active", "true"),
            ("silenced", "false"),
            ("inhibited", "false"),
            ("filter", "node=\"r\""),
        ])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(active, json!([]), "Alertmanager lists an alert for r");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = nodes.get("r").await?;
    assert!(
        !unschedulable(&n) && ticket(&n).is_none(),
        "r acted on before the failover"
    );

    let watch = NodeWatch::start(nodes.clone()).await?;
    let stopped = Instant::now();
    tokio::task::block_in_place(|| a.service.stop());
    wait_for(
        "replica-b leading",
        Duration::from_secs(15),
        &[&b.service],
        || async { Ok(b.is_leader().await.then_some(())) },
    )
    .await?;
    let takeover = stopped.elapsed();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let seen = watch.finish().await;
    let n = nodes.get("r").await?;
    let steps: Vec<Value> = b
        .audit()
        .into_iter()
        .filter(|r| r["node"] == "r")
        .filter(|r| {
            ["Cordon", "Taint", "Drain", "RunJob"].contains(&r["action"].as_str().unwrap_or(""))
        })
        .collect();
    eprintln!(
        "resurrection: replica-b leading {takeover:?} after replica-a's SIGTERM; r ever \
         unschedulable {:?}, ever tainted {}, step records of replica-b for r {steps:?}; ticket {:?}",
        seen.ever_out.get("r"),
        seen.ever_tainted.contains("r"),
        ticket(&n)
    );
    assert!(
        !seen.ever_out.contains_key("r"),
        "r was cordoned from a resolved alert (after {:?})",
        seen.ever_out.get("r")
    );
    assert!(!seen.ever_tainted.contains("r"), "r was tainted");
    assert!(steps.is_empty(), "steps ran for r: {steps:?}");
    let tk = ticket(&n);
    assert!(
        tk.as_ref()
            .is_none_or(|t| t["workflows"].as_sequence().is_none_or(|w| w.is_empty())),
        "r's ticket records steps: {tk:?}"
    );
    Ok(())
}

/// Scenario 4 (I5 deadlines): a pod on d covered by TWO PodDisruptionBudgets, so every
/// eviction answers 500; the SOP's Drain has timeoutSeconds 5. The ticket must end
/// `escalated`, the Drain `Failed` with the error in its message, within the timeout plus a
/// few passes. `main` fails: the drain returns the error before its timeout check, so it stays
/// `Running` for as long as it is watched.
#[tokio::test]
async fn safety_a_drain_whose_evictions_error_escalates_at_its_timeout() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_a_drain_whose_evictions_error_escalates_at_its_timeout").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("d", &[]).await?;
    kube.create_pod("work", "guarded", "d", &[("app", "db")])
        .await?;
    kube.set_pod_ready("work", "guarded").await?;
    // Two PDBs that each allow the disruption: the eviction fails only because there are two.
    kube.create_pdb("work", "db-1", &[("app", "db")], 0).await?;
    kube.create_pdb("work", "db-2", &[("app", "db")], 0).await?;
    let _kubelet = kube.start_fake_kubelet().await?;
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(
        &catalog,
        "sops:\n  gpu-reset:\n    steps:\n      - {action: Cordon}\n      - {action: Drain, timeoutSeconds: 5}\n      - {action: RunJob, template: gpu-reset}\n",
    )?;
    let cfg = format!(
        "catalog_file = \"{}\"\n{NO_BUDGET_LIMIT}{NO_LEASE}",
        catalog.display()
    );
    let healer = Healer::start(&kube, &dir.path().join("h"), "healer-a", &cfg)?;
    healer.ready().await?;
    post_ok(&healer, &payload(vec![alert("d", "GpuHung", true, T0)])).await?;
    wait_node(&nodes, "d", "Drain running", &healer, |n| {
        ticket(n).filter(|t| !workflow_status(t, "Drain").is_empty())
    })
    .await?;
    let t = Instant::now();
    let tk = node_within(
        &nodes,
        "d",
        "ticket escalated by the Drain's deadline",
        Duration::from_secs(5 + 15),
        &healer,
        |n| ticket(n).filter(|t| t["status"].as_str() == Some("escalated")),
    )
    .await?;
    let took = t.elapsed();
    let drain = workflows(&tk)
        .into_iter()
        .find(|w| w.0 == "Drain")
        .context("Drain workflow")?;
    eprintln!("drain under two PDBs: escalated {took:?} after the Drain started; Drain {drain:?}");
    assert_eq!(drain.1, "Failed", "{tk:?}");
    assert!(
        drain.3.contains("PodDisruptionBudget") || drain.3.contains("500"),
        "the Drain's message does not name the error: {:?}",
        drain.3
    );
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "work");
    assert!(pods.get_opt("guarded").await?.is_some());
    assert_eq!(
        count_jobs(&admin, "gpu-reset").await?,
        0,
        "a Job after a failed drain"
    );
    Ok(())
}

const TAINT_FIRST_CATALOG: &str = "conditions:\n  GpuHung: {priority: 3, sop: taint-reboot}\n\
sops:\n  taint-reboot:\n    steps:\n      - {action: Taint, key: ark.io/unhealthy, effect: NoExecute}\n      - {action: RunJob, template: reboot}\n";

/// Scenario 5 (I1 budget), `plan`: a catalog SOP `[Taint NoExecute, RunJob reboot]` disrupts
/// without ever counting against the budget. `ark-healer plan --alerts ... --config ...` must
/// exit non-zero with an error naming the SOP. `main` fails: it loads the catalog and plans
/// every alerting node, none blocked by the budget of 2.
#[test]
fn safety_plan_refuses_a_sop_that_disrupts_before_it_cordons() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, TAINT_FIRST_CATALOG)?;
    let config = dir.path().join("healer.toml");
    std::fs::write(
        &config,
        format!(
            "catalog_file = \"{}\"\n[budget]\nmax_unschedulable = 2\nmax_unschedulable_percent = 0.0\n",
            catalog.display()
        ),
    )?;
    let alerts = dir.path().join("alerts.json");
    let body = payload(
        (0..100)
            .map(|i| alert(&format!("g{i:03}"), "GpuHung", true, T0))
            .collect(),
    );
    std::fs::write(&alerts, serde_json::to_vec(&body)?)?;
    let out = Command::new(ark_harness::bin_path("ark-healer"))
        .arg("plan")
        .arg("--alerts")
        .arg(&alerts)
        .arg("--config")
        .arg(&config)
        .args(["--output", "json"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let plan: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let admitted = plan["nodes"]
            .as_array()
            .map_or(0, |ns| ns.iter().filter(|n| n["blocked"].is_null()).count());
        bail!(
            "plan accepted the catalog (exit 0): {admitted} of 100 nodes admitted with budget 2; stderr: {stderr}"
        );
    }
    eprintln!("plan refused the catalog ({}): {stderr}", out.status);
    assert!(
        stderr.contains("taint-reboot"),
        "the error does not name the SOP: {stderr}"
    );
    Ok(())
}

/// Scenario 5 (I1 budget), `serve`: the same catalog against the real cluster (10 alerting
/// nodes, budget 2): `serve` must exit non-zero with an error naming the SOP. `main` fails: it
/// serves and taints every alerting node NoExecute, far past the budget.
#[tokio::test]
async fn safety_serve_refuses_a_sop_that_disrupts_before_it_cordons() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_serve_refuses_a_sop_that_disrupts_before_it_cordons").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    let names: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
    kube.create_nodes(names.clone()).await?;
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, TAINT_FIRST_CATALOG)?;
    let cfg = format!(
        "catalog_file = \"{}\"\n[budget]\nmax_unschedulable = 2\nmax_unschedulable_percent = 0.0\n{NO_LEASE}",
        catalog.display()
    );
    let healer = Healer::start(&kube, &dir.path().join("h"), "healer-a", &cfg)?;
    let t = Instant::now();
    let mut exited = None;
    while t.elapsed() < Duration::from_secs(20) {
        if let Ok(status) = healer.service.wait_exit(Duration::from_millis(200)) {
            exited = Some(status);
            break;
        }
        if healer.is_ready().await {
            break;
        }
    }
    let Some(status) = exited else {
        // Serving: show what the catalog does to the cluster.
        healer
            .post(&payload(
                names
                    .iter()
                    .map(|n| alert(n, "GpuHung", true, T0))
                    .collect(),
            ))
            .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let tainted = nodes
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|ts| {
                        ts.iter()
                            .any(|t| t.key == "ark.io/unhealthy" && t.effect == "NoExecute")
                    })
            })
            .count();
        bail!(
            "serve accepted the catalog and serves: {tainted} of 10 alerting nodes tainted NoExecute with budget 2"
        );
    };
    let log = healer.service.log_tail(20);
    eprintln!(
        "serve refused the catalog ({status}) after {:?}:\n{log}",
        t.elapsed()
    );
    assert!(!status.success(), "serve exited 0");
    assert!(
        log.contains("taint-reboot"),
        "the error does not name the SOP:\n{log}"
    );
    Ok(())
}

/// Scenario 6 (I5 bounded memory): 6,000 authenticated alerts carrying 120 KB of annotations
/// each (7 per payload, under the 1 MiB body limit), sent as fast as the webhook takes them
/// (503s are retried a little, then dropped). The healer's VmRSS must stay under 256 MiB.
/// `main` fails: it keeps every annotation (`max_alerts` counts alerts, not bytes) and grows
/// towards a GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_memory_is_bounded_in_bytes_under_large_alerts() -> Result<()> {
    if ark_harness::skip_without_services("safety_memory_is_bounded_in_bytes_under_large_alerts") {
        return Ok(());
    }
    const TOTAL: usize = 6_000;
    const PER_PAYLOAD: usize = 7;
    const ANNOTATION: usize = 120_000;
    const LIMIT_KIB: u64 = 256 * 1024;
    const SEND_FOR: Duration = Duration::from_secs(75);
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(&kube, dir.path(), "healer-mem", NO_LEASE)?;
    healer.ready().await?;
    let pid = healer.service.pid();
    let rss_start = vm_rss_kib(pid).unwrap_or(0);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(rss_start));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = vm_rss_kib(pid) {
                    peak.fetch_max(r, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let big: Arc<str> = "x".repeat(ANNOTATION).into();
    let body_of = |p: usize| -> String {
        let alerts: Vec<String> = (p * PER_PAYLOAD..((p + 1) * PER_PAYLOAD).min(TOTAL))
            .map(|i| {
                format!(
                    "{{\"status\":\"firing\",\"labels\":{{\"alertname\":\"GpuHung\",\"condition\":\"GpuHung\",\
                     \"node\":\"ghost-{n}\",\"instance\":\"i{i}\",\"severity\":\"critical\",\"gpu\":\"0\"}},\
                     \"annotations\":{{\"summary\":\"big {i}\",\"description\":\"{big}\"}},\
                     \"startsAt\":\"{T0}\",\"endsAt\":\"0001-01-01T00:00:00Z\",\
                     \"generatorURL\":\"http://prometheus/graph\",\"fingerprint\":\"big-{i}\"}}",
                    n = i % 500,
                )
            })
            .collect();
        format!(
            "{{\"version\":\"4\",\"groupKey\":\"{{}}:{{}}\",\"truncatedAlerts\":0,\"status\":\"firing\",\
             \"receiver\":\"ark-healer\",\"groupLabels\":{{}},\"commonLabels\":{{}},\"commonAnnotations\":{{}},\
             \"externalURL\":\"http://alertmanager:9093\",\"alerts\":[{}]}}",
            alerts.join(",")
        )
    };
    assert!(body_of(0).len() < (1 << 20), "payload over the body limit");
    let payloads = TOTAL.div_ceil(PER_PAYLOAD);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = healer.url("/api/v1/alerts");
    let t = Instant::now();
    let (mut accepted, mut dropped, mut answered_503) = (0usize, 0usize, 0usize);
    let mut other = Vec::new();
    let mut next = 0usize;
    let mut set = tokio::task::JoinSet::new();
    loop {
        while next < payloads && set.len() < 4 && t.elapsed() < SEND_FOR {
            let (client, url, body) = (client.clone(), url.clone(), body_of(next));
            let n = PER_PAYLOAD.min(TOTAL - next * PER_PAYLOAD);
            set.spawn(async move {
                let mut n503 = 0usize;
                for _ in 0..5 {
                    let r = client
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    match r.status().as_u16() {
                        202 => return anyhow::Ok((n, true, n503, None)),
                        503 => {
                            n503 += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        c => return Ok((n, false, n503, Some(c))),
                    }
                }
                Ok((n, false, n503, None))
            });
            next += 1;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (n, ok, n503, code) = r??;
        answered_503 += n503;
        if ok {
            accepted += n;
        } else {
            dropped += n;
        }
        if let Some(c) = code {
            other.push(c);
        }
        healer.service.ensure_running()?;
    }
    let sent_in = t.elapsed();
    // The alerts stay (they keep firing): memory must not stay up there either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_end = vm_rss_kib(pid).unwrap_or(0);
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst).max(rss_end);
    let m = healer.metrics().await?;
    let received: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("ark_healer_alerts_received_total{status=\"firing\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    eprintln!(
        "large alerts: {accepted} of {TOTAL} alerts accepted ({} payloads sent of {payloads}) in {sent_in:?}, \
         {dropped} dropped after 503s, {answered_503} answers 503, other codes {other:?}; \
         received metric {received}; VmRSS start {rss_start} KiB, peak {peak} KiB, end {rss_end} KiB",
        next
    );
    assert!(other.is_empty(), "unexpected webhook answers: {other:?}");
    assert!(accepted > 0, "the webhook took nothing");
    assert!(
        peak < LIMIT_KIB,
        "healer VmRSS peaked at {peak} KiB (limit {LIMIT_KIB} KiB) after {accepted} large alerts"
    );
    healer.service.ensure_running()?;
    Ok(())
}

/// Scenario 6 (I5, tickets fit 4 KiB): an alert with a ~5 KB fingerprint on a real node must
/// still get its ticket written (annotation ≤ 4 KiB) and the node cordoned. `main` fails: the
/// fingerprint is copied into the ticket as is, the ticket is over 4 KiB and unwritable, and
/// the node is never acted on.
#[tokio::test]
async fn safety_a_huge_fingerprint_still_gets_a_ticket() -> Result<()> {
    let Some((kube, admin)) = cluster_for("safety_a_huge_fingerprint_still_gets_a_ticket").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("fp", &[]).await?;
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(&kube, dir.path(), "healer-a", NO_LEASE)?;
    healer.ready().await?;
    let fingerprint = "f".repeat(5_000);
    post_ok(
        &healer,
        &payload(vec![with_fingerprint(
            alert("fp", "GpuHung", true, T0),
            &fingerprint,
        )]),
    )
    .await?;
    let (tk, len) = node_within(
        &nodes,
        "fp",
        "node cordoned with a ticket",
        Duration::from_secs(20),
        &healer,
        |n| {
            (unschedulable(n))
                .then(|| ticket(n).map(|t| (t, annotation_len(n))))
                .flatten()
        },
    )
    .await?;
    eprintln!(
        "5 KB fingerprint: ticket of {len} bytes, fingerprint in it {:?}",
        tk["fingerprint"]
    );
    assert!(len <= 4096, "ticket annotation of {len} bytes");
    assert_eq!(tk["condition"].as_str(), Some("GpuHung"));
    Ok(())
}

/// Scenario 7 (I6 resume): a ticket runs SOP `[Cordon, RunJob diagnose, Notify]`; the healer is
/// stopped while the RunJob waits and restarted with a catalog where a Taint was inserted
/// before the RunJob. The old ticket must be closed and a new one started (its `createdAt`
/// changes), and no record may sit on a step of a different action. `main` fails: it resumes
/// the old ticket by index (same `createdAt`), so the RunJob record of step 1 is taken for
/// the new step 1 (Taint).
#[tokio::test]
async fn safety_a_ticket_is_not_remapped_onto_a_changed_sop() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_a_ticket_is_not_remapped_onto_a_changed_sop").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("rs", &[]).await?;
    let dir = tempfile::tempdir()?;
    let catalog = dir.path().join("catalog.yaml");
    let sop = |steps: &str| {
        format!(
            "conditions:\n  GpuHung: {{priority: 3, sop: resume-test}}\nsops:\n  resume-test:\n    steps:\n{steps}"
        )
    };
    let v1 = "      - {action: Cordon}\n      - {action: RunJob, template: diagnose, timeoutSeconds: 600}\n      - {action: Notify}\n";
    let v2 = "      - {action: Cordon}\n      - {action: Taint, key: ark.io/unhealthy, effect: NoSchedule}\n      - {action: RunJob, template: diagnose, timeoutSeconds: 600}\n      - {action: Notify}\n";
    let v2_actions = ["Cordon", "Taint", "RunJob", "Notify"];
    std::fs::write(&catalog, sop(v1))?;
    // Cooldown and repeat-offender off: what is under test is the resume, not those policies.
    let cfg = format!(
        "catalog_file = \"{}\"\ncooldown_seconds = 0\n[repeat_offender]\nmax_remediations = 0\n{NO_BUDGET_LIMIT}{NO_LEASE}",
        catalog.display()
    );
    let body = payload(vec![alert("rs", "GpuHung", true, T0)]);
    let healer = Healer::start(&kube, dir.path(), "healer-a", &cfg)?;
    healer.ready().await?;
    post_ok(&healer, &body).await?;
    let mut seen = HashSet::new();
    let job1 = wait_new_job(&admin, "diagnose", &mut seen, &healer).await?;
    let before = wait_node(&nodes, "rs", "RunJob running", &healer, |n| {
        ticket(n).filter(|t| workflow_status(t, "RunJob") == ["Running"])
    })
    .await?;
    healer.service.stop();
    drop(healer);

    std::fs::write(&catalog, sop(v2))?;
    // Not in the same second as the first ticket (tickets are named by their second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let healer = Healer::start(&kube, dir.path(), "healer-b", &cfg)?;
    healer.ready().await?;
    // Alertmanager re-sends on repeat_interval: the new process learns the alert again.
    post_ok(&healer, &body).await?;
    let after = node_within(
        &nodes,
        "rs",
        "the ticket progresses under the changed SOP (Taint recorded)",
        Duration::from_secs(30),
        &healer,
        |n| ticket(n).filter(|t| !workflow_status(t, "Taint").is_empty()),
    )
    .await?;
    let (wb, wa) = (workflows(&before), workflows(&after));
    let audit = healer.audit();
    let job2 = {
        let jobs: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
        let lp = ListParams::default().labels("ark.io/template=diagnose");
        jobs.list(&lp)
            .await?
            .items
            .into_iter()
            .filter_map(|j| j.metadata.name)
            .collect::<Vec<_>>()
    };
    eprintln!(
        "resume under a changed SOP: before createdAt {:?} {wb:?}; after createdAt {:?} status {:?} {wa:?}; \
         first diagnose Job {job1}, diagnose Jobs now {job2:?}; audit of the restarted healer: {:?}",
        before["createdAt"],
        after["createdAt"],
        after["status"],
        audit
            .iter()
            .map(|r| format!("{}/{}/{}", r["action"], r["status"], r["step"]))
            .collect::<Vec<_>>()
    );
    assert_ne!(
        after["createdAt"], before["createdAt"],
        "the old ticket was resumed under a changed SOP instead of closed and re-planned"
    );
    for (i, w) in wa.iter().enumerate() {
        let step = w.2.map_or(i, |s| s as usize);
        assert_eq!(
            v2_actions.get(step).copied(),
            Some(w.0.as_str()),
            "record {i} ({w:?}) sits on step {step} of the new SOP {v2_actions:?}"
        );
    }
    Ok(())
}

/// Deliver §3 / scenario 8: a webhook payload with fields this healer does not know (top level
/// and per alert, as a newer Alertmanager may add) is accepted (202) and acted on. `main`
/// fails: 400 (deny_unknown_fields), which Alertmanager never retries.
#[tokio::test]
async fn safety_webhook_accepts_unknown_fields_and_acts() -> Result<()> {
    let Some((kube, admin)) = cluster_for("safety_webhook_accepts_unknown_fields_and_acts").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("u", &[]).await?;
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(&kube, dir.path(), "healer-a", NO_LEASE)?;
    healer.ready().await?;
    let mut a = alert("u", "GpuHung", true, T0);
    a["futureAlertField"] = json!({"added": "in a later Alertmanager"});
    let mut body = payload(vec![a]);
    body["futureTopLevelField"] = json!(["x", 1]);
    let (code, resp) = healer.post(&body).await?;
    assert_eq!(code, 202, "payload with unknown fields: {resp}");
    node_within(
        &nodes,
        "u",
        "node cordoned from a payload with unknown fields",
        Duration::from_secs(20),
        &healer,
        |n| unschedulable(n).then_some(()),
    )
    .await?;
    eprintln!("unknown fields (top level and per alert): 202 and the node cordoned");
    Ok(())
}

/// Deliver §3 / scenario 8: the healer's Node Events show in `kubectl describe node` (the
/// project's kubectl 1.20 against the real apiserver). `main` fails: its Events live in
/// `kube-system` with `involvedObject.namespace=kube-system`, which describe never shows.
/// Measured on this apiserver: kubectl 1.20 lists a Node's Events by the field selector
/// `involvedObject.{kind=Node,name=N,namespace="",uid=N}` — the kubelet's convention of the
/// node NAME as uid; an Event carrying the Node's real uid (or none) is not shown by 1.20
/// (kubectl 1.32 shows real-uid and name-uid Events, not uid-less ones).
#[tokio::test]
async fn safety_node_events_show_in_kubectl_describe_node() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_node_events_show_in_kubectl_describe_node").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("ev", &[]).await?;
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(&kube, dir.path(), "healer-a", NO_LEASE)?;
    healer.ready().await?;
    post_ok(&healer, &payload(vec![alert("ev", "GpuHung", true, T0)])).await?;
    wait_node(&nodes, "ev", "ev cordoned", &healer, |n| {
        unschedulable(n).then_some(())
    })
    .await?;
    let events_section = |text: &str| -> String {
        text.split_once("\nEvents:")
            .map(|(_, e)| e.to_owned())
            .unwrap_or_default()
    };
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(15) {
        last = kube.kubectl(&["describe", "node", "ev"])?;
        if events_section(&last).contains("Cordon") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let section = events_section(&last);
    if !section.contains("Cordon") {
        let all: Api<Event> = Api::all(admin.clone());
        let where_: Vec<String> = all
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some("ev"))
            .map(|e| {
                format!(
                    "{} in {:?} (involvedObject.namespace {:?}, uid {:?})",
                    e.reason.clone().unwrap_or_default(),
                    e.metadata.namespace,
                    e.involved_object.namespace,
                    e.involved_object.uid
                )
            })
            .collect();
        bail!(
            "kubectl describe node ev shows no Cordon Event; Events section:{section}\nthe healer's Events about ev: {where_:?}"
        );
    }
    eprintln!("kubectl describe node ev, Events:{section}");
    Ok(())
}

/// Deliver §3 / scenario 8: readiness means "can serve", not "is leader". With two replicas
/// both answer /readyz 200 while exactly one has `ark_healer_is_leader 1`. `main` fails: the
/// standby answers 503 for ever (a `replicas: 2, maxUnavailable: 1` rolling update cannot
/// progress).
#[tokio::test]
async fn safety_every_replica_is_ready_and_only_one_leads() -> Result<()> {
    if ark_harness::skip_without_services("safety_every_replica_is_ready_and_only_one_leads") {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let dir = tempfile::tempdir()?;
    let cfg = "[lease]\nnamespace = \"ark-system\"\nduration_seconds = 4\n";
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", cfg)?;
    wait_up(&b).await?;
    let mut samples = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push((
            readyz(&a).await,
            readyz(&b).await,
            a.is_leader().await,
            b.is_leader().await,
        ));
    }
    eprintln!("(readyz a, readyz b, a leads, b leads) once a second: {samples:?}");
    for s in &samples {
        assert_eq!(
            (s.0, s.1),
            (Some(200), Some(200)),
            "a replica not ready: {samples:?}"
        );
        assert!(s.2 ^ s.3, "not exactly one leader: {samples:?}");
    }
    Ok(())
}

/// Deliver §3 / scenario 8: on SIGTERM the leader releases its Lease, so the standby leads in
/// clearly less than the lease duration (lease 9 s, renewal every 3 s: a standby waiting the
/// lease out needs 6 s or more; assert < 5 s), and a leader stopped with no standby leaves the
/// Lease with its holderIdentity cleared. `main` fails: the Lease is not released; the
/// standby waits the lease out and the holder stays set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_sigterm_releases_the_lease_for_a_fast_failover() -> Result<()> {
    if ark_harness::skip_without_services("safety_sigterm_releases_the_lease_for_a_fast_failover") {
        return Ok(());
    }
    const LEASE_S: u64 = 9;
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let admin = kube.client("admin").await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "ark-system");
    let dir = tempfile::tempdir()?;
    let cfg = format!("[lease]\nnamespace = \"ark-system\"\nduration_seconds = {LEASE_S}\n");
    let a = Healer::start(&kube, &dir.path().join("a"), "replica-a", &cfg)?;
    a.wait_leader().await?;
    let b = Healer::start(&kube, &dir.path().join("b"), "replica-b", &cfg)?;
    wait_up(&b).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!b.is_leader().await, "two leaders");

    // Holder identities over time, polled every 25 ms.
    let holders: Arc<Mutex<HolderTimeline>> = Arc::default();
    let start = Instant::now();
    let poller = {
        let (holders, leases) = (holders.clone(), leases.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(l) = leases.get("ark-healer").await {
                    let h = l
                        .spec
                        .and_then(|s| s.holder_identity)
                        .filter(|h| !h.is_empty());
                    let mut v = holders.lock().unwrap_or_else(|p| p.into_inner());
                    if v.last().is_none_or(|(_, last)| *last != h) {
                        v.push((start.elapsed(), h));
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let term = Instant::now();
    a.service.signal(libc::SIGTERM);
    let takeover = wait_for(
        "replica-b leading",
        Duration::from_secs(LEASE_S + 5),
        &[&b.service],
        || async { Ok(b.is_leader().await.then(|| term.elapsed())) },
    )
    .await?;
    let a_exit = tokio::task::block_in_place(|| a.service.wait_exit(Duration::from_secs(10)));
    poller.abort();
    let timeline = holders.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!(
        "SIGTERM on the leader: replica-b leading {takeover:?} after it (lease {LEASE_S} s); \
         replica-a exit {a_exit:?}; Lease holder timeline (since the poller started): {timeline:?}"
    );
    assert!(
        takeover < Duration::from_secs(5),
        "the standby took {takeover:?} to lead after SIGTERM on the leader (lease {LEASE_S} s): the Lease was waited out, not released"
    );

    // No standby now: B (leader) is stopped; the Lease it leaves has no holder.
    b.service.signal(libc::SIGTERM);
    let b_exit = tokio::task::block_in_place(|| b.service.wait_exit(Duration::from_secs(10)))?;
    let spec = leases.get("ark-healer").await?.spec.context("lease spec")?;
    eprintln!("replica-b exited {b_exit} on SIGTERM; the Lease after it: {spec:?}");
    assert!(
        spec.holder_identity.as_deref().is_none_or(str::is_empty),
        "the Lease still names {:?} after its holder stopped",
        spec.holder_identity
    );
    Ok(())
}

/// I4 under a partition: with `[alertmanager] url` pointing at an Alertmanager that does not
/// answer, a firing alert from the webhook alone never starts a disruption — the plan is
/// blocked as `unconfirmed`, pass after pass, and the node stays schedulable with no ticket
/// step recorded.
#[tokio::test]
async fn safety_an_unreachable_alertmanager_means_no_disruption() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("safety_an_unreachable_alertmanager_means_no_disruption").await?
    else {
        return Ok(());
    };
    let nodes: Api<Node> = Api::all(admin.clone());
    kube.create_node("u", &[]).await?;
    // A port nobody listens on: connections are refused at once.
    let dead = ark_harness::free_port();
    let cfg = format!(
        "{NO_LEASE}[alertmanager]\nurl = \"http://127.0.0.1:{dead}\"\ntimeout_seconds = 1\n"
    );
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(&kube, dir.path(), "healer-u", &cfg)?;
    healer.ready().await?;
    post_ok(&healer, &payload(vec![alert("u", "GpuHung", true, T0)])).await?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(6) {
        let n = nodes.get("u").await?;
        assert!(!unschedulable(&n), "u cordoned without Alertmanager's word");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = healer.metrics().await?;
    assert!(
        text.contains("ark_healer_actions_blocked_total{reason=\"unconfirmed\"} 1"),
        "{text}"
    );
    let n = nodes.get("u").await?;
    let steps = ticket(&n).map(|t| workflows(&t)).unwrap_or_default();
    assert!(steps.is_empty(), "steps recorded for u: {steps:?}");
    Ok(())
}
