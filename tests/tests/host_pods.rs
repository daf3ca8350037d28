//! Pod attribution against the REAL kube-apiserver: the exporter's pod watch (as the
//! `ark-exporter` service account, with a ClusterRole allowing get/list/watch on pods) learns the
//! pods of its node, and a process whose `/proc/<pid>/cgroup` (fixture procfs tree) names the
//! pod's UID is attributed to that pod: namespace, name, container name (from the container
//! statuses) and job; the cgroup v2 id of its container maps to the same pod.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ark_exporter::collectors::host::process::ProcessCollector;
use ark_exporter::collectors::host::{HostConfig, HostSource};
use ark_exporter::collectors::pods::watch;
use ark_exporter::event::EventType;
use ark_exporter::metrics::Telemetry;
use ark_exporter::pods::{ClusterState, PodResolver};
use ark_harness::KubeCluster;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;

const NODE: &str = "gpu-node-7";
const CID: &str = "5a6b7c8d5a6b7c8d5a6b7c8d5a6b7c8d5a6b7c8d5a6b7c8d5a6b7c8d5a6b7c8d";

/// RBAC for the exporter's service account (what deploy/ grants the DaemonSet).
async fn grant_pod_watch(kube: &KubeCluster) -> Result<()> {
    let client = kube.client("admin").await?;
    let role = ApiResource::erase::<k8s_openapi::api::rbac::v1::ClusterRole>(&());
    let binding = ApiResource::erase::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(&());
    let roles: Api<DynamicObject> = Api::all_with(client.clone(), &role);
    let bindings: Api<DynamicObject> = Api::all_with(client, &binding);
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": "ark-exporter-pods"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
            }))?,
        )
        .await?;
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "ark-exporter-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ark-exporter-pods"},
                "subjects": [{"kind": "ServiceAccount", "name": "ark-exporter", "namespace": "ark-system"}],
            }))?,
        )
        .await?;
    Ok(())
}

fn write(root: &Path, rel: &str, text: &str) -> Result<()> {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    std::fs::write(p, text)?;
    Ok(())
}

/// A procfs/sysfs tree with one process (pid 4242) in the pod's container cgroup (v2, systemd
/// driver, containerd), holding GPU 0 and in D state in the NVIDIA driver.
fn fixture_tree(root: &Path, uid: &str) -> Result<String> {
    let slice = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
        uid.replace('-', "_")
    );
    write(
        root,
        "proc/4242/stat",
        "4242 (python3) D 1 4242 4242 0 -1 4194560 1 0 0 0 1 1 0 0 20 0 8 0 777 1 1 0\n",
    )?;
    write(root, "proc/4242/cgroup", &format!("0::/{slice}\n"))?;
    write(root, "proc/4242/wchan", "os_acquire_mutex")?;
    std::fs::create_dir_all(root.join("proc/4242/fd"))?;
    std::os::unix::fs::symlink("/dev/nvidia0", root.join("proc/4242/fd/3"))?;
    write(
        root,
        &format!("sys/fs/cgroup/{slice}/cgroup.procs"),
        "4242\n",
    )?;
    Ok(slice)
}

async fn until<F: FnMut() -> bool>(what: &str, mut f: F) -> Result<()> {
    // A deadline, not a timed assertion: the watch needs a round trip or two.
    for _ in 0..300 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_in_pod_cgroup_maps_to_the_pod_in_the_real_apiserver() -> Result<()> {
    if ark_harness::skip_without_services(
        "process_in_pod_cgroup_maps_to_the_pod_in_the_real_apiserver",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    grant_pod_watch(&kube).await?;
    let pod = kube
        .create_pod("ml", "trainer-0", NODE, &[("job-name", "train-a")])
        .await?;
    // A pod on another node: the field selector keeps it out.
    kube.create_pod("ml", "elsewhere-0", "other-node", &[])
        .await?;
    let uid = pod.metadata.uid.clone().context("pod uid")?;
    // What the kubelet would report: the container's runtime id.
    let pods_api: Api<Pod> = Api::namespaced(kube.client("admin").await?, "ml");
    pods_api
        .patch_status(
            "trainer-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"containerStatuses": [{
                "name": "main", "image": "registry.invalid/ark/pause:1", "imageID": "",
                "ready": true, "restartCount": 0,
                "containerID": format!("containerd://{CID}"),
                "state": {"running": {}},
            }]}})),
        )
        .await?;

    let dir = tempfile::tempdir()?;
    let slice = fixture_tree(dir.path(), &uid)?;
    let host = HostConfig {
        procfs: dir.path().join("proc"),
        sysfs: dir.path().join("sys"),
        kubeconfig: Some(kube.kubeconfig("exporter")),
        node_name: Some(NODE.to_owned()),
        ..HostConfig::default()
    };
    let resolver = PodResolver::new(&host.sysfs);
    let telemetry = Telemetry::new(NODE)?;
    let status = telemetry.collector("pods");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = {
        let (host, resolver, status) = (host.clone(), resolver.clone(), status.clone());
        tokio::spawn(async move {
            watch(&host, &resolver, &status, stop_rx, Duration::from_secs(10)).await;
        })
    };
    until("the pod watch to sync", || {
        resolver.cluster_state() == ClusterState::Synced
            && resolver.lookup(&uid, Some(CID)).container.is_some()
    })
    .await?;
    assert!(status.is_up());
    assert_eq!(resolver.pod_count(), 1, "only this node's pods are watched");

    // The process collector attributes the process to the pod.
    let mut pc = ProcessCollector::new(&host, resolver.clone());
    let out = pc.poll(1_700_000_000_000)?;
    let ev = out
        .events
        .iter()
        .find(|e| e.event_type == EventType::ProcessState && e.pid == Some(4242))
        .context("process.state for pid 4242")?;
    assert_eq!(ev.entity_id, "gpu-0");
    assert_eq!(ev.value, "D");
    assert_eq!(ev.pod.as_deref(), Some("trainer-0"));
    assert_eq!(ev.namespace.as_deref(), Some("ml"));
    assert_eq!(ev.job_id.as_deref(), Some("train-a"));
    telemetry.snapshots.publish("process", out.families);
    let text = telemetry.encode();
    let want = format!(
        "ark_process_info{{pid=\"4242\",pod=\"trainer-0\",namespace=\"ml\",container=\"main\",comm=\"python3\",pod_uid=\"{uid}\",node=\"{NODE}\"}} 1"
    );
    assert!(text.contains(&want), "missing {want}\n{text}");
    assert!(text.contains(
        "ark_process_waits_on{pid=\"4242\",pod=\"trainer-0\",namespace=\"ml\",container=\"main\",resource=\"gpu-0\""
    ));

    // The eBPF collector's look-up: cgroup v2 id (inode of the container's cgroup dir) → pod.
    let ino = std::fs::metadata(host.sysfs.join("fs/cgroup").join(&slice))?.ino();
    let by_id = resolver.by_cgroup_id(ino).context("cgroup id → pod")?;
    assert_eq!(by_id.uid, uid);
    assert_eq!(by_id.name.as_deref(), Some("trainer-0"));
    assert_eq!(by_id.namespace.as_deref(), Some("ml"));
    assert_eq!(by_id.container.as_deref(), Some("main"));

    // Deleting the pod in the apiserver removes it from the resolver (watch event).
    pods_api
        .delete("trainer-0", &DeleteParams::default().grace_period(0))
        .await?;
    until("the delete to arrive", || {
        resolver.lookup(&uid, None).name.is_none()
    })
    .await?;
    assert_eq!(resolver.by_cgroup_id(ino).and_then(|p| p.name), None);

    let _ = stop_tx.send(true);
    watcher.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rbac_the_watch_reports_down_and_attribution_stops_at_the_uid() -> Result<()> {
    if ark_harness::skip_without_services(
        "without_rbac_the_watch_reports_down_and_attribution_stops_at_the_uid",
    ) {
        return Ok(());
    }
    let kube = KubeCluster::start().await?;
    let pod = kube.create_pod("ml", "trainer-1", NODE, &[]).await?;
    let uid = pod.metadata.uid.clone().context("pod uid")?;
    let dir = tempfile::tempdir()?;
    fixture_tree(dir.path(), &uid)?;
    let host = HostConfig {
        procfs: dir.path().join("proc"),
        sysfs: dir.path().join("sys"),
        // `nobody` may not list pods: 403 on every attempt.
        kubeconfig: Some(kube.kubeconfig("nobody")),
        node_name: Some(NODE.to_owned()),
        ..HostConfig::default()
    };
    let resolver = PodResolver::new(&host.sysfs);
    let telemetry = Telemetry::new(NODE)?;
    let status = telemetry.collector("pods");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = {
        let (host, resolver, status) = (host.clone(), resolver.clone(), status.clone());
        tokio::spawn(async move {
            watch(&host, &resolver, &status, stop_rx, Duration::from_secs(10)).await;
        })
    };
    until("the watch to start", || {
        resolver.cluster_state() == ClusterState::Syncing
    })
    .await?;
    // Give the forbidden list a few round trips; it must never sync.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(resolver.cluster_state(), ClusterState::Syncing);
    assert!(!status.is_up());
    let mut pc = ProcessCollector::new(&host, resolver.clone());
    let out = pc.poll(1_700_000_000_000)?;
    let ev = out
        .events
        .iter()
        .find(|e| e.pid == Some(4242))
        .context("event for pid 4242")?;
    assert_eq!(ev.pod, None);
    assert_eq!(resolver.lookup(&uid, Some(CID)).uid, uid);
    let _ = stop_tx.send(true);
    watcher.await?;
    Ok(())
}
