//! Benchmarks of the real ark-healer binary (commands that print numbers; they assert only that
//! the work was done, never how fast). Ignored by default; run with a release build:
//!
//! ```sh
//! cargo build --release -p ark-healer
//! ARK_BIN_DIR=target/release cargo nextest run -p ark-tests -E 'binary(/healer_bench/)' \
//!     --run-ignored only --no-capture
//! ```

mod healer_support;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ark_harness::{KubeCluster, Service, wait_for};
use healer_support::*;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let idx = ((sorted_ms.len() as f64 - 1.0) * p).round() as usize;
    sorted_ms[idx]
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "{name}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        ms.len(),
        percentile(&ms, 0.50),
        percentile(&ms, 0.90),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    );
}

/// Webhook acknowledgement latency, open loop at 200 requests/s for 10 s (one alert each, a new
/// fingerprint each), `serve --dry-run` without a cluster so only the ack path is measured.
#[tokio::test]
#[ignore = "benchmark: prints numbers"]
async fn healer_bench_webhook_ack_at_200_rps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN)?;
    let port = ark_harness::free_port();
    let mut cmd = Command::new(ark_harness::bin_path("ark-healer"));
    cmd.args(["serve", "--dry-run", "--web.listen-address"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--webhook-token-file")
        .arg(&token)
        .env("KUBECONFIG", dir.path().join("none"))
        .env("RUST_LOG", "warn");
    let service = Service::spawn("healer-bench", &mut cmd, &dir.path().join("healer.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/readyz");
    wait_for(
        "healer ready",
        Duration::from_secs(30),
        &[&service],
        || async {
            Ok(reqwest::get(&ready)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ()))
        },
    )
    .await?;
    let client = reqwest::Client::new();
    let url = format!("{base}/api/v1/alerts");
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..2000 {
        tick.tick().await;
        let body = serde_json::to_vec(&payload(vec![alert(
            &format!("n{}", i % 500),
            "GpuHung",
            true,
            "2026-11-23T10:00:00Z",
        )]))?;
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let t = Instant::now();
            let r = client
                .post(&url)
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = r.status().as_u16();
            r.bytes().await?;
            anyhow::Ok((status, t.elapsed().as_secs_f64() * 1000.0))
        });
    }
    let mut ms = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (status, t) = r??;
        assert_eq!(status, 202);
        ms.push(t);
    }
    summary("webhook ack at 200 req/s (2000 requests)", ms);
    Ok(())
}

/// Webhook received → node cordoned and ticket written, on the real apiserver with the healer's
/// own RBAC. One node at a time (so each alert finds an idle healer).
#[tokio::test]
#[ignore = "benchmark: prints numbers"]
async fn healer_bench_webhook_to_cordon_on_the_real_apiserver() -> Result<()> {
    let kube = KubeCluster::start().await?;
    setup_rbac(&kube).await?;
    let runs = 50;
    for i in 0..runs {
        kube.create_node(&format!("b{i:03}"), &[]).await?;
    }
    let dir = tempfile::tempdir()?;
    let healer = Healer::start(
        &kube,
        dir.path(),
        "healer-bench",
        "reconcile_interval_seconds = 3600\n[budget]\nmax_unschedulable = 1000\nmax_unschedulable_percent = 0.0\n[lease]\nnamespace = \"ark-system\"\n",
    )?;
    healer.wait_leader().await?;
    let nodes: Api<Node> = Api::all(kube.client("admin").await?);
    let mut ms = Vec::new();
    for i in 0..runs {
        let name = format!("b{i:03}");
        let t = Instant::now();
        let (code, _) = healer
            .post(&payload(vec![alert(
                &name,
                "GpuNvlinkDown",
                true,
                "2026-11-23T10:00:00Z",
            )]))
            .await?;
        assert_eq!(code, 202);
        loop {
            let n = nodes.get(&name).await?;
            let done = unschedulable(&n)
                && ticket(&n).is_some_and(|t| workflow_status(&t, "Cordon") == ["Succeeded"]);
            if done {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{name} not cordoned: {}",
                healer.service.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let n = nodes.get("b000").await?;
    ticket(&n).context("ticket")?;
    summary(
        "webhook -> node cordoned + ticket written (real apiserver)",
        ms,
    );
    Ok(())
}
