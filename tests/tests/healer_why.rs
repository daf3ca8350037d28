//! `ark-healer why --job`: the cross-node chain of a training job, read by the real binary from a
//! real Prometheus that scrapes three exporters (fixed `/metrics` text in the exporter's own
//! format: node-2's process is blocked by `error.hw` on `gpu-3`, nodes 1 and 3 wait on the
//! network) and, for the culprit's ticket, a real kube-apiserver on which the real healer
//! remediates node-2. Also: the job dashboard's queries on that Prometheus, the fallback on raw
//! series without the job rules, and the clear errors for a dead Prometheus and hostile answers
//! (those need no service and always run).

mod healer_support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ark_harness::{PromConfig, Prometheus, Target};
use healer_support::*;
use serde_json::Value;

const JOB: &str = "train-llm";

/// The three nodes' `/metrics`, as ark-exporter writes them (its own `node` label arrives in
/// Prometheus as `exported_node`; the target's `node` label wins, as in deploy/prometheus).
fn exporter_metrics(node: &str) -> String {
    match node {
        "node-2" => format!(
            "ark_blocked_by{{resource=\"gpu-3\",error=\"error.hw\",node=\"{node}\"}} 1\n\
             ark_blocked_by{{resource=\"mlx5_1\",error=\"topo.link_down\",node=\"{node}\"}} 1\n\
             ark_root_cause{{job_id=\"{JOB}\",pod=\"trainer-1\",namespace=\"ml\",resource=\"gpu-3\",cause=\"error.hw\",node=\"{node}\"}} 1\n\
             ark_scene_active{{scene=\"hardware.gpu.xid_error\",entity=\"gpu-3\",job_id=\"{JOB}\",severity=\"critical\",node=\"{node}\"}} 1\n"
        ),
        _ => {
            let (pid, pod) = if node == "node-1" {
                ("5001", "trainer-0")
            } else {
                ("5003", "trainer-2")
            };
            let mut m = format!(
                "ark_waits_on{{pid=\"{pid}\",job_id=\"{JOB}\",pod=\"{pod}\",namespace=\"ml\",resource=\"network-ib0\",node=\"{node}\"}} 1\n\
                 ark_root_cause{{job_id=\"{JOB}\",pod=\"{pod}\",namespace=\"ml\",resource=\"network-ib0\",cause=\"waits_on\",node=\"{node}\"}} 1\n"
            );
            if node == "node-1" {
                // Another job on the same node, which only waits: never part of train-llm.
                m.push_str(&format!(
                    "ark_waits_on{{pid=\"7001\",job_id=\"other-job\",pod=\"o-0\",namespace=\"ml\",resource=\"nvme0n1\",node=\"{node}\"}} 1\n\
                     ark_root_cause{{job_id=\"other-job\",pod=\"o-0\",namespace=\"ml\",resource=\"nvme0n1\",cause=\"waits_on\",node=\"{node}\"}} 1\n"
                ));
            }
            m
        }
    }
}

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// One fake exporter per node on a free port, and the one `ark-exporter` scrape job over the
/// three, each target labelled with its node (deploy/prometheus takes it from the pod's node).
async fn exporters() -> Result<(serde_yaml::Value, Vec<tokio::task::JoinHandle<()>>)> {
    let mut targets = Vec::new();
    let mut tasks = Vec::new();
    for node in NODES {
        let body = exporter_metrics(node);
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = body.clone();
                async move { body }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        targets.push(serde_json::json!({
            "targets": [listener.local_addr()?.to_string()],
            "labels": {"node": node},
        }));
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }
    let job = serde_json::json!({"job_name": "ark-exporter", "static_configs": targets});
    Ok((serde_yaml::to_value(job)?, tasks))
}

/// The shipped job rules (alerts/job.rules.yml): `why` reads what they record.
fn job_rules() -> PathBuf {
    ark_harness::repo_root().join("alerts/job.rules.yml")
}

fn workload_rules() -> PathBuf {
    ark_harness::repo_root().join("alerts/workload.rules.yml")
}

/// Runs the real binary. Async: the fake exporters are served by this test's runtime, and a
/// blocked runtime would fail Prometheus' scrapes (and make the series stale) meanwhile.
async fn why(args: &[&str], envs: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(ark_harness::bin_path("ark-healer"));
    cmd.arg("why").args(args).kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .context("ark-healer why ran for over 60 s")??)
}

async fn why_json(args: &[&str], envs: &[(&str, &str)]) -> Result<Value> {
    let out = why(&[args, &["--output", "json"]].concat(), envs).await?;
    ensure!(
        out.status.success(),
        "why {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

async fn why_text(args: &[&str], envs: &[(&str, &str)]) -> Result<String> {
    let out = why(args, envs).await?;
    ensure!(
        out.status.success(),
        "why {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Polls `promql` until it has a result.
async fn wait_series(prom: &Prometheus, promql: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !prom.query(promql).await?.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "Prometheus never had {promql}\n{}",
            prom.service.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| x[key].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The scenario of the issue on real services: node-2's GPU error stalls the job on nodes 1
/// and 3; `why` names node-2 (text and JSON), with the error, since when, the victims and the
/// ticket the real healer wrote on node-2. Unknown jobs are errors. The job dashboard's queries
/// all answer on the same Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_names_the_culprit_node_and_shows_its_ticket() -> Result<()> {
    let Some((kube, admin)) =
        cluster_for("why_names_the_culprit_node_and_shows_its_ticket").await?
    else {
        return Ok(());
    };
    for n in NODES {
        kube.create_node(n, &[]).await?;
    }
    // The real healer remediates node-2 (GpuFellOffBus → reboot SOP); with no kubelet its
    // reboot Job never finishes, so the ticket stays at that step.
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(
        &kube,
        dir.path(),
        "healer-why",
        "[lease]\nnamespace = \"ark-system\"\n",
    )?;
    healer.ready().await?;
    healer.wait_leader().await?;
    let (code, _) = healer
        .post(&payload(vec![alert(
            "node-2",
            "GpuFellOffBus",
            true,
            "2026-12-04T02:00:00Z",
        )]))
        .await?;
    assert_eq!(code, 202);
    wait_job(&admin, "reboot", &healer).await?;

    let (exporter_job, tasks) = exporters().await?;
    let prom = Prometheus::start(PromConfig {
        scrape_interval: Duration::from_millis(200),
        evaluation_interval: Duration::from_millis(200),
        targets: vec![Target::new(
            "ark-healer",
            format!("127.0.0.1:{}", healer.port),
        )],
        jobs: vec![exporter_job],
        rule_files: vec![job_rules(), workload_rules()],
        ..PromConfig::default()
    })
    .await?;
    wait_series(
        &prom,
        &format!("ALERTS_FOR_STATE{{alertname=\"JobBlockedByNode\", job_id=\"{JOB}\"}}"),
    )
    .await?;
    wait_series(
        &prom,
        "ark_healer_ticket_step_started_timestamp_seconds{node=\"node-2\"}",
    )
    .await?;
    let url = prom.url();
    let admin_kc = kube.kubeconfig("admin");
    let admin_kc = admin_kc.to_str().context("path")?;

    // JSON.
    let started = Instant::now();
    let v = why_json(
        &["--job", JOB, "--prometheus", &url, "--kubeconfig", admin_kc],
        &[],
    )
    .await?;
    eprintln!(
        "why --output json answered in {:?}:\n{}",
        started.elapsed(),
        serde_json::to_string_pretty(&v)?
    );
    assert_eq!(v["schema"], "ark.io/why/v1");
    assert_eq!(v["job_id"], JOB);
    assert_eq!(v["source"], "rules");
    let culprits = v["culprits"].as_array().context("culprits")?;
    assert_eq!(culprits.len(), 1, "{culprits:?}");
    let c = &culprits[0];
    assert_eq!(
        (&c["node"], &c["resource"], &c["cause"]),
        (&"node-2".into(), &"gpu-3".into(), &"error.hw".into())
    );
    // Only the error of the resource in the chain, not node-2's unrelated link-down NIC.
    assert_eq!(c["errors"], serde_json::json!(["error.hw"]));
    // The earlier of the culprit's JobBlockedByNode and WorkloadStalled (the same evaluation
    // here, give or take one: either may win).
    assert!(
        c["since_source"]
            .as_str()
            .is_some_and(|s| s.starts_with("ALERTS_FOR_STATE{")),
        "{c}"
    );
    let since: jiff::Timestamp = c["since"].as_str().context("since")?.parse()?;
    let at: jiff::Timestamp = v["evaluated_at"].as_str().context("at")?.parse()?;
    assert!(
        since <= at && at.as_second() - since.as_second() < 120,
        "{since} {at}"
    );
    assert_eq!(c["alert"]["name"], "JobBlockedByNode");
    assert!(
        ["pending", "firing"].contains(&c["alert"]["state"].as_str().unwrap_or_default()),
        "{c}"
    );
    let t = &c["ticket"];
    assert_eq!(t["state"], "ticket", "{t}");
    assert_eq!(t["condition"], "GpuFellOffBus");
    assert_eq!(t["sop"], "reboot");
    assert!(
        t["status"] == "created" || t["status"] == "resolving",
        "{t}"
    );
    assert_eq!(t["step"]["action"], "RunJob", "{t}");
    assert!(
        t["step"]["job"]
            .as_str()
            .is_some_and(|j| j.starts_with("ark-reboot-node-2-")),
        "{t}"
    );
    assert_eq!(t["step"]["status"], "Running", "{t}");
    assert_eq!(
        v["cluster"],
        serde_json::json!({"checked": true, "error": null})
    );
    assert_eq!(names(&v["victims"], "node"), ["node-1", "node-3"]);
    assert_eq!(
        v["victims"][0]["resources"],
        serde_json::json!(["network-ib0"])
    );
    assert_eq!(v["victim_nodes"], 2);
    assert_eq!(
        v["nodes"],
        serde_json::json!([
            {"node": "node-1", "role": "victim"},
            {"node": "node-2", "role": "culprit"},
            {"node": "node-3", "role": "victim"},
        ])
    );
    let procs = v["processes"].as_array().context("processes")?;
    assert_eq!(procs.len(), 3, "{procs:?}");
    assert_eq!(
        procs[0],
        serde_json::json!({"node": "node-1", "namespace": "ml", "pod": "trainer-0",
            "pids": ["5001"], "waits_on": ["network-ib0"],
            "root_causes": [{"resource": "network-ib0", "cause": "waits_on"}]})
    );
    assert_eq!(
        procs[1]["root_causes"],
        serde_json::json!([{"resource": "gpu-3", "cause": "error.hw"}])
    );
    assert!(!v.to_string().contains("other-job") && !v.to_string().contains("7001"));
    assert_eq!(v["scenes"][0]["scene"], "hardware.gpu.xid_error");
    assert_eq!(v["truncated"], serde_json::json!({}));

    // Text.
    let text = why_text(
        &["--job", JOB, "--prometheus", &url, "--kubeconfig", admin_kc],
        &[],
    )
    .await?;
    eprintln!("why (text):\n{text}");
    for want in [
        "job train-llm: blocked by node-2 (2 victim node(s) wait)",
        "node-2  error.hw on gpu-3 (ark_blocked_by: error.hw)",
        "ALERTS_FOR_STATE{alertname=\"JobBlockedByNode\"}",
        "healer  ticket GpuFellOffBus",
        "(sop reboot), step 4 RunJob Running since ",
        "(job ark-reboot-node-2-",
        "VICTIMS (2)",
        "node-1  waits on network-ib0",
        "node-3  waits on network-ib0",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // A reader the apiserver refuses: the chain is still printed, the ticket says why not.
    let nobody = kube.kubeconfig("nobody");
    let v = why_json(
        &[
            "--job",
            JOB,
            "--prometheus",
            &url,
            "--kubeconfig",
            nobody.to_str().context("path")?,
        ],
        &[],
    )
    .await?;
    assert_eq!(v["culprits"][0]["node"], "node-2");
    assert_eq!(v["culprits"][0]["ticket"]["state"], "unavailable", "{v}");
    assert!(
        v["culprits"][0]["ticket"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("403") || e.contains("forbidden")),
        "{v}"
    );

    // --limit cuts lists and says so.
    let v = why_json(
        &["--job", JOB, "--prometheus", &url, "--limit", "1"],
        &[("KUBECONFIG", admin_kc)],
    )
    .await?;
    assert_eq!(names(&v["victims"], "node"), ["node-1"]);
    assert_eq!(v["victim_nodes"], 2);
    assert_eq!(v["truncated"]["victims"], 1);
    assert_eq!(v["truncated"]["processes"], 2);

    // A job that only waits has no culprit, and says so (exit 0).
    let text = why_text(&["--job", "other-job", "--prometheus", &url], &[]).await?;
    assert!(
        text.starts_with("job other-job: 1 node(s) wait, but no node has an error"),
        "{text}"
    );

    // Unknown job: non-zero, a clear message, nothing on stdout.
    let out = why(&["--job", "no-such-job", "--prometheus", &url], &[]).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains(&format!(
            "job \"no-such-job\" is unknown to Prometheus at {url}"
        )),
        "{err}"
    );

    // The job dashboard on the same Prometheus: every query answers, with data unless flagged.
    let problems = job_dashboard_problems(&prom).await?;
    for t in tasks {
        t.abort();
    }
    ensure!(
        problems.is_empty(),
        "dashboards/job.json:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

/// Runs every panel query of dashboards/job.json with `$job_id` = the scenario's job.
async fn job_dashboard_problems(prom: &Prometheus) -> Result<Vec<String>> {
    let path = ark_harness::repo_root().join("dashboards/job.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut problems = Vec::new();
    let mut checked = 0;
    for panel in doc["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?");
        let may_be_empty = panel["arkExpectEmpty"] == true;
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$job_id", JOB);
            ensure!(
                !expr.contains('$'),
                "job.json panel {title:?}: a variable this test does not substitute: {expr}"
            );
            checked += 1;
            match prom.query(&expr).await {
                Ok(r) if r.is_empty() && !may_be_empty => {
                    problems.push(format!("panel {title:?}: no data\n    {expr}"))
                }
                Ok(r) if !r.is_empty() && may_be_empty => {
                    eprintln!("note: job.json panel {title:?} has data although arkExpectEmpty")
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("panel {title:?}: {e:#}")),
            }
        }
    }
    eprintln!("job.json: {checked} queries answered by a real Prometheus");
    ensure!(checked >= 10, "job.json has only {checked} queries");
    Ok(problems)
}

/// Before the job rules exist (or before they were evaluated), `why` computes the same
/// classification from the raw series, and "since" comes from WorkloadStalled. Without any
/// cluster it says the tickets were not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_falls_back_to_raw_series_without_the_job_rules() -> Result<()> {
    if ark_harness::skip_without_services("why_falls_back_to_raw_series_without_the_job_rules") {
        return Ok(());
    }
    let (exporter_job, tasks) = exporters().await?;
    let prom = Prometheus::start(PromConfig {
        scrape_interval: Duration::from_millis(200),
        evaluation_interval: Duration::from_millis(200),
        jobs: vec![exporter_job],
        rule_files: vec![workload_rules()],
        ..PromConfig::default()
    })
    .await?;
    wait_series(
        &prom,
        "ALERTS_FOR_STATE{alertname=\"WorkloadStalled\", node=\"node-2\", resource=\"gpu-3\"}",
    )
    .await?;
    let url = prom.url();
    let home = tempfile::tempdir()?;
    let no_cluster = [
        ("KUBECONFIG", "/nonexistent/kubeconfig"),
        ("HOME", home.path().to_str().context("path")?),
    ];
    let v = why_json(&["--job", JOB, "--prometheus", &url], &no_cluster).await?;
    assert_eq!(v["source"], "raw");
    assert_eq!(names(&v["culprits"], "node"), ["node-2"]);
    let c = &v["culprits"][0];
    assert_eq!(
        (&c["resource"], &c["cause"]),
        (&"gpu-3".into(), &"error.hw".into())
    );
    assert_eq!(
        c["since_source"],
        "ALERTS_FOR_STATE{alertname=\"WorkloadStalled\"}"
    );
    assert_eq!(c["alert"]["name"], "WorkloadStalled");
    assert!(c["ticket"].is_null());
    assert_eq!(names(&v["victims"], "node"), ["node-1", "node-3"]);
    assert_eq!(v["victim_nodes"], 2);
    assert_eq!(v["cluster"]["checked"], false);
    assert!(
        v["cluster"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no Kubernetes client")),
        "{v}"
    );
    let text = why_text(&["--job", JOB, "--prometheus", &url], &no_cluster).await?;
    assert!(text.contains("raw ark_root_cause / ark_waits_on"), "{text}");
    assert!(text.contains("healer  not read (no cluster)"), "{text}");
    assert!(
        text.contains("note: healer tickets not shown: no Kubernetes client"),
        "{text}"
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// A "Prometheus" on a free port that answers every connection with `response` (raw bytes,
/// headers included) or, with `None`, reads the request and never answers.
fn hostile(response: Option<Vec<u8>>) -> Result<String> {
    hostile_after(response, Duration::ZERO)
}

/// [`hostile`], answering each request only after `delay`.
fn hostile_after(response: Option<Vec<u8>>, delay: Duration) -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let response = response.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                std::thread::sleep(delay);
                match response {
                    Some(r) => {
                        let _ = conn.write_all(&r);
                        let _ = conn.shutdown(std::net::Shutdown::Both);
                    }
                    None => std::thread::sleep(Duration::from_secs(60)),
                }
            });
        }
    });
    Ok(url)
}

fn http(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}Connection: close\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Runs `why` against `url` and returns stderr, asserting exit 1, nothing on stdout and an
/// answer within `within`.
async fn why_fails(url: &str, extra: &[&str], within: Duration) -> Result<String> {
    let started = Instant::now();
    let out = why(&[&["--job", JOB, "--prometheus", url], extra].concat(), &[]).await?;
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(took < within, "took {took:?}: {err}");
    assert!(err.starts_with("ark-healer: error: "), "{err}");
    Ok(err)
}

/// Prometheus down, bad URL, and hostile answers: each a clear error (exit 1), never a panic,
/// a hang or an unbounded read. Needs no service.
#[tokio::test]
async fn why_reports_a_dead_prometheus_and_hostile_answers_clearly() -> Result<()> {
    let quick = Duration::from_secs(15);
    // Down: nothing listens.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dead = format!("http://{}", free.local_addr()?);
    drop(free);
    let err = why_fails(&dead, &[], quick).await?;
    assert!(
        err.contains(&format!("Prometheus at {dead}: not reachable")),
        "{err}"
    );

    let err = why_fails("localhost:9090", &[], quick).await?;
    assert!(err.contains("must start with http:// or https://"), "{err}");
    let out = why(&["--job", "", "--prometheus", &dead], &[]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--job: empty"));

    // Malformed JSON.
    let url = hostile(Some(http(
        "200 OK",
        "",
        br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":"#,
    )))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(
        err.contains(&format!("Prometheus at {url}: answer to `ark_waits_on"))
            && err.contains("invalid JSON"),
        "{err}"
    );

    // Valid JSON that is not an instant vector.
    let url = hostile(Some(http(
        "200 OK",
        "",
        br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
    )))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(err.contains("expected an instant vector"), "{err}");

    // Non-200, with Prometheus' own error body and with an arbitrary one.
    let url = hostile(Some(http(
        "422 Unprocessable Entity",
        "",
        br#"{"status":"error","errorType":"execution","error":"query processing would load too many samples"}"#,
    )))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(
        err.contains("HTTP 422 Unprocessable Entity") && err.contains("too many samples"),
        "{err}"
    );
    let url = hostile(Some(http(
        "503 Service Unavailable",
        "",
        b"<html>down</html>",
    )))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(
        err.contains("HTTP 503 Service Unavailable") && err.contains("<html>down</html>"),
        "{err}"
    );

    // Oversized: 9 MiB of samples, announced by Content-Length, and unannounced (read until
    // the connection closes): both refused at the 8 MiB cap.
    let sample = br#"{"metric":{"node":"node-x","job_id":"train-llm"},"value":[1,"1"]},"#;
    let mut big = br#"{"status":"success","data":{"resultType":"vector","result":["#.to_vec();
    while big.len() < 9 << 20 {
        big.extend_from_slice(sample);
    }
    let url = hostile(Some(http(
        "200 OK",
        &format!("Content-Length: {}\r\n", big.len()),
        &big,
    )))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(err.contains("over the 8388608-byte limit"), "{err}");
    let url = hostile(Some(http("200 OK", "", &big)))?;
    let err = why_fails(&url, &[], quick).await?;
    assert!(err.contains("over the 8388608-byte limit"), "{err}");

    // A Prometheus that accepts and never answers: --timeout bounds it.
    let url = hostile(None)?;
    let err = why_fails(&url, &["--timeout", "1"], Duration::from_secs(5)).await?;
    assert!(err.contains("did not answer within 1 s"), "{err}");

    // Each answer in time (400 ms, under the 1 s timeout) but all of them together not: the
    // one --timeout bounds the whole gathering, not each request.
    let url = hostile_after(
        Some(http(
            "200 OK",
            "",
            br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        )),
        Duration::from_millis(400),
    )?;
    let err = why_fails(&url, &["--timeout", "1"], Duration::from_secs(4)).await?;
    assert!(
        err.contains("did not answer within 1 s (all queries together)"),
        "{err}"
    );
    Ok(())
}
