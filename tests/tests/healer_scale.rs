//! The healer at fleet scale on the real apiserver (issue 19): N Nodes created in bulk, a storm
//! of alerts over all of them in Alertmanager's shape (one payload per node group, several
//! alerts of mixed conditions each, sent concurrently), the real ark-healer binary with its
//! production defaults (watch-fed view, write pacing, 5 s reconcile) and a budget of B nodes.
//!
//! It asserts what must hold at any size — the budget is never exceeded (a watch counts
//! unschedulable nodes on every change), no step runs twice (one Job per acting node, ticket
//! steps never repeated), the budget's nodes act and every
//! other node is reported blocked — and prints (and writes to `/tmp/ark-healer-scale.txt`)
//! the numbers: webhook ack p50/p99, plan time per pass, time to acting / reported / all
//! tickets written, apiserver requests, healer peak RSS and CPU.
//!
//! Size from the environment: `ARK_SCALE_NODES` (default 2,000) and `ARK_SCALE_ALERTS`
//! (default 20,000), what `scripts/test` runs. The full benchmark (docs/healer.md
//! "Benchmarks"): `ARK_SCALE_NODES=10000 ARK_SCALE_ALERTS=100000` with a release build.

mod healer_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ark_harness::wait_for;
use futures::StreamExt as _;
use healer_support::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

const BUDGET: usize = 20;
/// Most urgent first; every node gets one of these (all take capacity away).
const DISRUPTIVE: [&str; 7] = [
    "GpuFellOffBus",
    "GpuHung",
    "GpuXidFatal",
    "GpuEccDoubleBit",
    "GpuNvlinkDown",
    "IbPortDown",
    "PcieLinkDegraded",
];
const OTHERS: [&str; 3] = ["NetworkRetransmitStorm", "DiskIoSlow", "WorkloadStalled"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Sum of every sample of `name` (any labels) in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Samples of `name` by label set (the text between the braces).
fn metric_by_labels(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The upper bound of the histogram bucket that holds quantile `q`, and the largest finite
/// bucket bound (`le` values are cumulative).
fn histogram_quantile_bound(text: &str, name: &str, q: f64) -> Option<f64> {
    let buckets = metric_by_labels(text, &format!("{name}_bucket"));
    let mut b: Vec<(f64, f64)> = buckets
        .iter()
        .filter_map(|(l, v)| {
            let le = l.strip_prefix("le=\"")?.strip_suffix('"')?;
            Some((le.parse::<f64>().ok()?, *v))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    b.into_iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| le)
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux ABI this runs on (the kernel's exported tick unit).
    Some(ticks / 100.0)
}

async fn apiserver_requests(client: &kube::Client) -> Result<f64> {
    let req = axum::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(metric_sum(&text, "apiserver_request_total"))
}

fn blocked_by_budget(t: &serde_yaml::Value) -> bool {
    t["blocked"]
        .as_str()
        .is_some_and(|b| b.contains("disruption budget"))
}

#[tokio::test]
async fn healer_scale_storm_over_the_fleet_keeps_the_budget_and_settles() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("healer_scale_storm_over_the_fleet_keeps_the_budget_and_settles").await?
    else {
        return Ok(());
    };
    let n_nodes = env_usize("ARK_SCALE_NODES", 2000).max(BUDGET + 1);
    let n_alerts = env_usize("ARK_SCALE_ALERTS", 20_000).max(n_nodes);
    let per_node = n_alerts.div_ceil(n_nodes);
    let nodes: Api<Node> = Api::all(admin.clone());

    // Bulk creation, 64 at a time; every node with the labels a GPU node carries (the healer
    // keeps only the ones it reads).
    let t = Instant::now();
    let names: Vec<String> = (0..n_nodes).map(|i| format!("gpu-{i:05}")).collect();
    for chunk in names.chunks(64) {
        let mut set = tokio::task::JoinSet::new();
        for name in chunk {
            let (api, name) = (nodes.clone(), name.clone());
            set.spawn(async move {
                let mut labels = serde_json::Map::new();
                labels.insert("kubernetes.io/hostname".into(), json!(name));
                for f in 0..16 {
                    labels.insert(
                        format!("feature.node.kubernetes.io/pci-10de-{f}.present"),
                        json!("true"),
                    );
                }
                labels.insert(
                    "nvidia.com/gpu.product".into(),
                    json!("NVIDIA-H100-80GB-HBM3"),
                );
                labels.insert("nvidia.com/gpu.count".into(), json!("8"));
                let n: Node = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": labels},
                }))?;
                api.create(&PostParams::default(), &n).await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
    }
    let created = t.elapsed();

    // Every change to a node's unschedulable flag is seen: the budget is checked on each one.
    let max_out = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let budget_watch = {
        let (nodes, max_out, stop) = (nodes.clone(), max_out.clone(), stop.clone());
        let list = nodes.list(&ListParams::default()).await?;
        let mut out: BTreeSet<String> = list
            .items
            .iter()
            .filter(|n| unschedulable(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let mut rv = list.metadata.resource_version.unwrap_or_default();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let wp = WatchParams::default().timeout(10);
                let Ok(stream) = nodes.watch(&wp, &rv).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(WatchEvent::Added(n) | WatchEvent::Modified(n)) => {
                            rv = n.metadata.resource_version.clone().unwrap_or(rv);
                            let name = n.metadata.name.clone().unwrap_or_default();
                            if unschedulable(&n) {
                                out.insert(name);
                            } else {
                                out.remove(&name);
                            }
                            max_out.fetch_max(out.len(), Ordering::SeqCst);
                        }
                        Ok(WatchEvent::Bookmark(b)) => rv = b.metadata.resource_version,
                        _ => {}
                    }
                }
            }
        })
    };

    let dir = tempfile::tempdir()?;
    // The store's default byte budget (64 MiB) holds ~65,000 alerts of this shape (~1 KiB each
    // as accounted); the storm must fit whole, so the budget scales with it.
    let alert_bytes = (n_alerts * 1600).max(64 << 20);
    let cfg = format!(
        "reconcile_interval_seconds = 5\nmax_alert_bytes = {alert_bytes}\n[budget]\nmax_unschedulable = {BUDGET}\nmax_unschedulable_percent = 0.0\n[lease]\nnamespace = \"ark-system\"\n"
    );
    let healer = Healer::start(&kube, dir.path(), "healer-scale", &cfg)?;
    healer.wait_leader().await?;
    let pid = healer.service.pid();
    wait_for(
        "healer view synced",
        Duration::from_secs(120),
        &[&healer.service],
        || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let m = healer.metrics().await?;
            Ok((metric_sum(&m, "ark_healer_view_nodes") as usize == n_nodes).then_some(()))
        },
    )
    .await?;
    let rss_synced = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    eprintln!(
        "view synced: {n_nodes} nodes, healer RSS {:.1} MiB",
        rss_synced as f64 / 1024.0
    );
    let before = healer.metrics().await?;
    let api_before = apiserver_requests(&admin).await?;
    let cpu_before = cpu_seconds(pid).context("healer cpu")?;

    // The storm: one payload per node (Alertmanager groups by node), `per_node` alerts each,
    // 32 notifications in flight at once.
    let start = Instant::now();
    let url = healer.url("/api/v1/alerts");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let acks = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n_nodes)));
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (http, url, acks, next) = (http.clone(), url.clone(), acks.clone(), next.clone());
        senders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n_nodes {
                    return anyhow::Ok(());
                }
                let node = format!("gpu-{i:05}");
                let alerts: Vec<Value> = (0..per_node)
                    .map(|k| {
                        let c = if k == 0 {
                            DISRUPTIVE[i % DISRUPTIVE.len()]
                        } else {
                            let all: Vec<&str> =
                                DISRUPTIVE.iter().chain(&OTHERS).copied().collect();
                            all[(i + k) % all.len()]
                        };
                        let mut a = alert(&node, c, true, "2026-12-04T01:00:00Z");
                        a["labels"]["gpu"] = json!((k % 8).to_string());
                        a["fingerprint"] = json!(format!("{node}-{k}"));
                        a
                    })
                    .collect();
                let body = serde_json::to_vec(&payload(alerts))?;
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let code = r.status().as_u16();
                r.bytes().await?;
                ensure!(code == 202, "webhook answered {code}");
                acks.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(t.elapsed().as_secs_f64() * 1000.0);
            }
        });
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    let posted = start.elapsed();
    eprintln!(
        "storm posted in {posted:.1?}; healer RSS {:.1} MiB",
        proc_status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0
    );

    // Acting: the budget's nodes reached their Job (no kubelet runs them, so they stay there).
    let jobs: Api<Job> = Api::namespaced(admin.clone(), "ark-system");
    let acting = wait_for(
        "the budget's nodes acting",
        Duration::from_secs(300),
        &[&healer.service],
        || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = jobs.list(&ListParams::default()).await?.items.len();
            ensure!(n <= BUDGET, "{n} Jobs for a budget of {BUDGET}");
            Ok((n == BUDGET).then(|| start.elapsed()))
        },
    )
    .await?;
    eprintln!("acting after {acting:.1?}");
    let dropped = metric_sum(&healer.metrics().await?, "ark_healer_alerts_dropped_total");
    ensure!(
        dropped == 0.0,
        "{dropped} alerts dropped by the healer's store (store_full)"
    );
    // Reported: every other node is in ark_healer_node_blocked{reason="disruption_budget"}.
    let reported = wait_for(
        "every other node reported blocked",
        Duration::from_secs(300),
        &[&healer.service],
        || async {
            // /metrics is large at this scale: do not let the probe be the healer's CPU.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let m = healer.metrics().await?;
            let dropped = metric_sum(&m, "ark_healer_alerts_dropped_total");
            ensure!(
                dropped == 0.0,
                "{dropped} alerts dropped by the healer's store"
            );
            let blocked = metric_by_labels(&m, "ark_healer_node_blocked")
                .keys()
                .filter(|l| l.contains("reason=\"disruption_budget\""))
                .count();
            Ok((blocked == n_nodes - BUDGET).then(|| start.elapsed()))
        },
    )
    .await?;
    eprintln!("every other node reported blocked after {reported:.1?}");
    // Every other node's ticket says why it waits (paced writes: N / rate seconds at least).
    let rate = 50.0;
    let ticket_bound = Duration::from_secs_f64(n_nodes as f64 / rate * 2.0 + 120.0);
    let settled = wait_for(
        "every blocked node's ticket written",
        ticket_bound,
        &[&healer.service],
        || async {
            // A full list of the fleet from this (debug) test is heavy: not more than one per
            // second per thousand nodes, so the probe does not starve the healer.
            tokio::time::sleep(Duration::from_secs((n_nodes as u64 / 1000).max(2))).await;
            let list = nodes.list(&ListParams::default()).await?.items;
            let waiting = list
                .iter()
                .filter(|n| ticket(n).is_some_and(|t| blocked_by_budget(&t)))
                .count();
            Ok((waiting == n_nodes - BUDGET).then(|| (start.elapsed(), list)))
        },
    )
    .await;
    let (tickets_at, list) = match settled {
        Ok(v) => v,
        Err(e) => return Err(e.context(healer.service.log_tail(40))),
    };
    let after = healer.metrics().await?;
    let cpu = cpu_seconds(pid).context("healer cpu")? - cpu_before;
    let api_requests = apiserver_requests(&admin).await? - api_before;
    let hwm = proc_status_kib(pid, "VmHWM:").context("VmHWM")?;
    stop.store(true, Ordering::SeqCst);
    budget_watch.abort();

    // The budget: never exceeded, and exactly the budget's nodes out now.
    let max_seen = max_out.load(Ordering::SeqCst);
    let out: Vec<&Node> = list.iter().filter(|n| unschedulable(n)).collect();
    ensure!(
        max_seen <= BUDGET,
        "budget exceeded: {max_seen} nodes unschedulable at once"
    );
    ensure!(
        out.len() == BUDGET,
        "{} nodes out, budget {BUDGET}",
        out.len()
    );
    // No step twice: one Job per acting node, one create request each, no repeated step.
    let job_list = jobs.list(&ListParams::default()).await?.items;
    let job_nodes: BTreeSet<String> = job_list
        .iter()
        .filter_map(|j| j.spec.as_ref()?.template.spec.as_ref()?.node_name.clone())
        .collect();
    ensure!(job_list.len() == BUDGET, "{} Jobs", job_list.len());
    let creates = metric_by_labels(&after, "ark_healer_kube_requests_total")
        .get("op=\"create job\"")
        .copied()
        .unwrap_or(0.0);
    // Unfinished Jobs are never deleted and their names come from the ticket, so the list above
    // (one per acting node) is the no-second-Job check; a timed-out create that was retried is a
    // second request, not a second step.
    ensure!(
        creates as usize >= BUDGET,
        "{creates} create-job requests for {BUDGET} Jobs"
    );
    ensure!(
        job_nodes.len() == BUDGET,
        "Jobs on {} nodes",
        job_nodes.len()
    );
    let mut duplicates = 0;
    for n in &list {
        let t = ticket(n).with_context(|| format!("{:?} has no ticket", n.metadata.name))?;
        let steps: Vec<u64> = t["workflows"]
            .as_sequence()
            .map(|ws| ws.iter().filter_map(|w| w["step"].as_u64()).collect())
            .unwrap_or_default();
        let mut dedup = steps.clone();
        dedup.dedup();
        duplicates += steps.len() - dedup.len();
    }
    ensure!(duplicates == 0, "{duplicates} duplicate steps");
    for n in &out {
        let t = ticket(n).context("ticket")?;
        ensure!(workflow_status(&t, "Cordon") == ["Succeeded"], "{t:?}");
    }

    let mut ms = acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ms.sort_by(f64::total_cmp);
    let passes = metric_sum(&after, "ark_healer_plan_duration_seconds_count")
        - metric_sum(&before, "ark_healer_plan_duration_seconds_count");
    let plan_sum = metric_sum(&after, "ark_healer_plan_duration_seconds_sum")
        - metric_sum(&before, "ark_healer_plan_duration_seconds_sum");
    let plan_p99 = histogram_quantile_bound(&after, "ark_healer_plan_duration_seconds", 0.99);
    let pass_p99 = histogram_quantile_bound(&after, "ark_healer_pass_duration_seconds", 0.99);
    let reqs = metric_by_labels(&after, "ark_healer_kube_requests_total");
    let reqs_before = metric_by_labels(&before, "ark_healer_kube_requests_total");
    let healer_requests: f64 = reqs
        .iter()
        .map(|(k, v)| v - reqs_before.get(k).copied().unwrap_or(0.0))
        .sum();
    let by_op: Vec<String> = reqs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                k.trim_start_matches("op=").trim_matches('"'),
                v - reqs_before.get(k).copied().unwrap_or(0.0)
            )
        })
        .collect();
    let relists = metric_sum(&after, "ark_healer_view_relists_total");
    let refused = metric_sum(&after, "ark_healer_passes_refused_total");
    let report = format!(
        "healer scale: {n_nodes} nodes ({created:.1?} to create), {} alerts ({per_node}/node) in {n_nodes} payloads, budget {BUDGET}\n\
         webhook ack: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; all posted in {posted:.1?}\n\
         plan: {passes} passes, mean {:.1} ms, p99 <= {} ms; pass p99 <= {} s\n\
         acting ({BUDGET} nodes at their Job): {acting:.1?}; every other node reported blocked: {reported:.1?}; \
         every blocked ticket written: {tickets_at:.1?}\n\
         apiserver requests: {api_requests} at the apiserver (all clients, this test's included), \
         {healer_requests} from the healer ({})\n\
         healer: peak RSS {:.1} MiB (with the view synced, before the storm: {:.1} MiB), CPU {cpu:.1} s; view relists {relists}, refused passes {refused}\n\
         budget: max {max_seen} unschedulable at once (limit {BUDGET}); duplicate steps {duplicates}; \
         Jobs {} on {} nodes\n",
        per_node * n_nodes,
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1],
        if passes > 0.0 {
            plan_sum / passes * 1000.0
        } else {
            0.0
        },
        plan_p99.map_or("?".into(), |v| format!("{}", v * 1000.0)),
        pass_p99.map_or("?".into(), |v| v.to_string()),
        by_op.join(", "),
        hwm as f64 / 1024.0,
        rss_synced as f64 / 1024.0,
        job_list.len(),
        job_nodes.len(),
    );
    eprint!("{report}");
    std::fs::write("/tmp/ark-healer-scale.txt", &report)?;
    // No pass lists Nodes: a Node list during the storm (pages of it) only comes with a counted
    // relist of the view (on a 410 or repeated watch failures), never from planning.
    let op = |m: &BTreeMap<String, f64>| m.get("op=\"list nodes (view)\"").copied().unwrap_or(0.0);
    let lists = op(&reqs) - op(&reqs_before);
    let relisted = relists - metric_sum(&before, "ark_healer_view_relists_total");
    ensure!(
        lists == 0.0 || relisted > 0.0,
        "{lists} Node list requests during the storm without a counted relist"
    );
    Ok(())
}
