//! `ark-local-cluster`: the test harness's real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager v1.20.2) for `scripts/demo --cluster`, with the Nodes given on the
//! command line, the healer's RBAC applied and a fake kubelet finishing evicted pods. Prints
//! `ready admin=<kubeconfig> healer=<kubeconfig> kubectl=<path>` and runs until SIGTERM/Ctrl-C,
//! then stops everything it started.

#![allow(
    clippy::print_stdout,
    reason = "a CLI whose output is where its cluster is"
)]

use anyhow::{Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let nodes: Vec<String> = std::env::args().skip(1).collect();
    if nodes.iter().any(|n| n.starts_with('-')) || nodes.is_empty() {
        eprintln!(
            "usage: ark-local-cluster NODE...   (starts a local control plane with these Nodes)"
        );
        std::process::exit(2);
    }
    let kube = ark_harness::KubeCluster::start().await?;
    for n in &nodes {
        kube.create_node(n, &[("nvidia.com/gpu.present", "true")])
            .await?;
    }
    kube.ensure_namespace("ark-system").await?;
    let rbac = ark_harness::repo_root().join("deploy/healer/rbac.yaml");
    kube.kubectl(&["apply", "-f", &rbac.display().to_string()])
        .context("applying the healer's RBAC")?;
    let _kubelet = kube.start_fake_kubelet().await?;
    println!(
        "ready admin={} healer={} kubectl={}",
        kube.kubeconfig("admin").display(),
        kube.kubeconfig("healer").display(),
        kube.kubectl_path().display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
