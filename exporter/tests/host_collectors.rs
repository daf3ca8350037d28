//! Host collectors on the checked-in fixture trees (`tests/fixtures/host/{proc,sys}`, built from
//! real kernel file formats by `generate.py` there): golden `/metrics` checked by the real
//! `promtool check metrics`, missing files, garbage content, counters that wrap or reset, port
//! and link transitions, process state / exits and pod attribution from cgroup v1 and v2.
//!
//! Regenerate the golden file after an intended change:
//! `ARK_UPDATE_GOLDEN=1 cargo test -p ark-exporter --test host_collectors`.
mod common;
use common::promtool_check;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ark_exporter::collectors::CollectorKind;
use ark_exporter::collectors::host::infiniband::InfinibandCollector;
use ark_exporter::collectors::host::netdev::NetdevCollector;
use ark_exporter::collectors::host::process::ProcessCollector;
use ark_exporter::collectors::host::{HostConfig, HostSet, HostSource, PollError};
use ark_exporter::event::{Event, EventType};
use ark_exporter::metrics::Telemetry;
use ark_exporter::pods::PodResolver;

const POD_V2: &str = "6f2a3c1e-9b8d-4e7f-a1b2-c3d4e5f60718";
const POD_V1: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const T0: i64 = 1_700_000_000_000;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host")
}

/// Copies a tree, keeping symlinks as symlinks (fd links point at /dev paths that need not exist).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &dest).unwrap();
        } else if t.is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A private, writable copy of the fixture tree.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(&fixture(), dir.path());
        Tree { dir }
    }
    fn cfg(&self) -> HostConfig {
        cfg_at(self.dir.path())
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn cfg_at(root: &Path) -> HostConfig {
    HostConfig {
        procfs: root.join("proc"),
        sysfs: root.join("sys"),
        ..HostConfig::default()
    }
}

fn events_of(src: &mut dyn HostSource, now: i64) -> Vec<Event> {
    src.poll(now).expect("poll").events
}

fn find<'a>(evs: &'a [Event], t: EventType, entity: &str) -> Vec<&'a Event> {
    evs.iter()
        .filter(|e| e.event_type == t && e.entity_id == entity)
        .collect()
}

#[test]
fn golden_metrics_pass_promtool_and_cover_the_design_table() {
    let cfg = cfg_at(&fixture());
    let pods = PodResolver::new(&cfg.sysfs);
    let telemetry = Telemetry::new("fixture").unwrap();
    // The pod watch knows the v2 pod (the v1 pod stays UID-only: not on this node's list).
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "trainer-0", "namespace": "ml", "uid": POD_V2,
                     "labels": {"job-name": "train-a"}},
        "status": {"containerStatuses": [{"name": "main", "image": "x", "imageID": "",
            "ready": true, "restartCount": 0,
            "containerID": format!("containerd://{}", "8e3f2a1b".repeat(8))}]}
    }))
    .unwrap();
    pods.apply_pod(&pod);
    let mut set = HostSet::new(&cfg, &pods);
    // Two polls: the second is the steady state (baselines taken, nothing changed).
    set.poll_into(T0, &telemetry);
    let events = set.poll_into(T0 + 2000, &telemetry);
    let text = telemetry.encode();
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/host_metrics.txt");
    common::golden::compare_or_update(&golden_path, &text, common::golden::Order::Sorted);
    promtool_check(&text);

    // DESIGN.md network/storage rows owned by these collectors, and what the fixture shows.
    for needle in [
        "ark_netdev_errors_total{device=\"eth0\",direction=\"rx\",node=\"fixture\"} 3",
        "ark_netdev_drops_total{device=\"eth0\",direction=\"tx\",node=\"fixture\"} 2",
        "ark_netdev_carrier_changes_total{device=\"eth0\",node=\"fixture\"} 3",
        "ark_netdev_up{device=\"eth1\",node=\"fixture\"} 0",
        "ark_ib_port_up{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 1",
        "ark_ib_port_up{device=\"mlx5_1\",port=\"1\",node=\"fixture\"} 0",
        "ark_ib_link_downed_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 2",
        "ark_ib_symbol_errors_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 17",
        "ark_ib_port_rcv_errors_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 5",
        "ark_ib_port_xmit_wait_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 912345",
        "ark_ib_np_cnp_sent_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 4521",
        "ark_ib_rp_cnp_handled_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 3312",
        "ark_ib_out_of_sequence_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 77",
        "ark_ib_port_rate_bytes_per_second{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 25000000000",
        "ark_ib_port_receive_bytes_total{device=\"mlx5_0\",port=\"1\",node=\"fixture\"} 493827156048",
        "ark_block_io_in_flight{device=\"nvme0n1\",node=\"fixture\"} 17",
        "ark_block_io_time_seconds_total{device=\"nvme0n1\",node=\"fixture\"} 1734",
        "ark_pressure_stalled_seconds_total{resource=\"io\",kind=\"full\",node=\"fixture\"} 80.123456",
        "ark_pressure_ratio{resource=\"io\",kind=\"some\",window=\"10s\",node=\"fixture\"} 0.125",
        "ark_collector_up{collector=\"infiniband\",node=\"fixture\"} 1",
        "ark_processes_tracked{node=\"fixture\"} 3",
        "ark_process_info{pid=\"100\",pod=\"trainer-0\",namespace=\"ml\",container=\"main\",comm=\"python3\",pod_uid=\"6f2a3c1e-9b8d-4e7f-a1b2-c3d4e5f60718\",node=\"fixture\"} 1",
        "ark_process_waits_on{pid=\"200\",pod=\"\",namespace=\"\",container=\"\",resource=\"gpu-1\",node=\"fixture\"} 1",
        "ark_process_waits_on{pid=\"300\",pod=\"\",namespace=\"\",container=\"\",resource=\"nvme0n1\",node=\"fixture\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    // Left out: loopback, loop devices, partitions, settings in hw_counters, garbage.
    for absent in [
        "device=\"lo\"",
        "device=\"loop0\"",
        "device=\"nvme0n1p1\"",
        "device=\"sda1\"",
        "counter=\"lifespan\"",
        "device=\"bad0\"",
        "pid=\"2\"",
        "pid=\"400\"",
        "pid=\"500\"",
    ] {
        assert!(!text.contains(absent), "unexpected {absent}\n{text}");
    }
    // Steady state: nothing rose, so no error events; the in-flight queue is reported.
    assert!(
        events.iter().all(|e| !e.event_type.is_error()),
        "{events:?}"
    );
    assert_eq!(
        find(&events, EventType::StorageQdepth, "nvme0n1")[0].value,
        "17"
    );
}

#[test]
fn absent_files_mean_up_zero_not_errors() {
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(empty.path().join("proc")).unwrap();
    std::fs::create_dir_all(empty.path().join("sys")).unwrap();
    let cfg = cfg_at(empty.path());
    let pods = PodResolver::new(&cfg.sysfs);
    let mut set = HostSet::new(&cfg, &pods);
    for (kind, res) in set.poll(T0) {
        assert!(
            matches!(res, Err(PollError::Absent { .. })),
            "{kind:?}: {res:?}"
        );
    }
    let telemetry = Telemetry::new("n").unwrap();
    set.poll_into(T0, &telemetry);
    let text = telemetry.encode();
    for k in [
        CollectorKind::Netdev,
        CollectorKind::Infiniband,
        CollectorKind::Block,
        CollectorKind::Pressure,
        CollectorKind::Process,
    ] {
        let line = format!(
            "ark_collector_up{{collector=\"{}\",node=\"n\"}} 0",
            k.name()
        );
        assert!(text.contains(&line), "{line}\n{text}");
    }

    // Partly there: PSI without io/memory, IB device without ports, netdev without sysfs.
    let t = Tree::new();
    std::fs::remove_file(t.path("proc/pressure/io")).unwrap();
    std::fs::remove_dir_all(t.path("sys/class/net")).unwrap();
    std::fs::remove_dir_all(t.path("sys/class/infiniband/mlx5_1/ports")).unwrap();
    let cfg = t.cfg();
    let mut set = HostSet::new(&cfg, &pods);
    let telemetry = Telemetry::new("n").unwrap();
    set.poll_into(T0, &telemetry);
    let text = telemetry.encode();
    assert!(text.contains("ark_pressure_ratio{resource=\"cpu\""));
    assert!(!text.contains("resource=\"io\""));
    assert!(text.contains("ark_netdev_errors_total{device=\"eth0\""));
    assert!(!text.contains("ark_netdev_up{"));
    assert!(text.contains("ark_ib_port_up{device=\"mlx5_0\""));
    assert!(!text.contains("device=\"mlx5_1\""));
}

#[test]
fn garbage_content_is_skipped_and_reported() {
    let t = Tree::new();
    t.write(
        "proc/net/dev",
        "\u{0}\u{1}binary junk\nno colon here\n  x: 1 2\n",
    );
    t.write("proc/diskstats", "259 0 nvme0n1 not numbers at all\n");
    t.write("proc/pressure/cpu", "some avg10=1.0 total=oops\n");
    t.write("sys/class/infiniband/mlx5_0/ports/1/state", "ACTIVE?\n");
    t.write("sys/class/infiniband/mlx5_0/ports/1/rate", "very fast\n");
    t.write(
        "sys/class/infiniband/mlx5_0/ports/1/counters/link_downed",
        "-1\n",
    );
    t.write("proc/100/stat", "100 (python3 S\n");
    let cfg = t.cfg();
    let pods = PodResolver::new(&cfg.sysfs);
    let mut set = HostSet::new(&cfg, &pods);
    for (kind, res) in set.poll(T0) {
        let out = res.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        match kind {
            CollectorKind::Netdev | CollectorKind::Block | CollectorKind::Pressure => {
                assert!(!out.bad_input.is_empty(), "{kind:?}");
                let series: usize = out.families.iter().map(|f| f.get_metric().len()).sum();
                assert!(series == 0 || kind == CollectorKind::Pressure, "{kind:?}");
            }
            CollectorKind::Infiniband => {
                assert!(out.bad_input.iter().any(|b| b.contains("state")));
                assert!(out.bad_input.iter().any(|b| b.contains("link_downed")));
                let up = out
                    .families
                    .iter()
                    .find(|f| f.name() == "ark_ib_port_up")
                    .unwrap();
                // mlx5_0's state is garbage: no up series for it, mlx5_1 still reported.
                assert_eq!(up.get_metric().len(), 1);
            }
            _ => {}
        }
    }
}

#[test]
fn counters_wrap_and_reset_without_negative_deltas_or_fake_bursts() {
    let t = Tree::new();
    let cfg = t.cfg();
    let mut ib = InfinibandCollector::new(&cfg);
    let mut net = NetdevCollector::new(&cfg);
    let c = "sys/class/infiniband/mlx5_0/ports/1/counters/";
    // First poll: counters since boot are a baseline, not new errors.
    assert!(
        events_of(&mut ib, T0)
            .iter()
            .all(|e| !e.event_type.is_error())
    );
    assert!(events_of(&mut net, T0).is_empty());

    // Rise: one event per port listing what rose.
    t.write(&format!("{c}symbol_error"), "20\n");
    t.write(&format!("{c}link_downed"), "3\n");
    let ev = events_of(&mut ib, T0 + 2000);
    let err = find(&ev, EventType::ErrorNet, "mlx5_0");
    assert_eq!(err.len(), 1, "{ev:?}");
    assert!(err[0].value.contains("symbol_error +3"), "{}", err[0].value);
    assert!(err[0].value.contains("link_downed +1"), "{}", err[0].value);

    // Reset (driver reload): counters fall to small values → no event at all.
    t.write(&format!("{c}symbol_error"), "0\n");
    t.write(&format!("{c}link_downed"), "0\n");
    t.write(&format!("{c}port_rcv_errors"), "1\n");
    let ev = events_of(&mut ib, T0 + 4000);
    assert!(
        find(&ev, EventType::ErrorNet, "mlx5_0").is_empty(),
        "{ev:?}"
    );
    // ...and counting resumes from the new baseline.
    t.write(&format!("{c}symbol_error"), "2\n");
    let ev = events_of(&mut ib, T0 + 6000);
    assert!(
        find(&ev, EventType::ErrorNet, "mlx5_0")[0]
            .value
            .contains("symbol_error +2")
    );

    // 32-bit wrap of a netdev counter: MAX-1 → 3 is 5 drops, not a reset and not 4 billion.
    let dev = std::fs::read_to_string(t.path("proc/net/dev")).unwrap();
    let wrap_from = u64::from(u32::MAX) - 1;
    t.write(
        "proc/net/dev",
        &dev.replace(
            "2283943245 1690223    3    7",
            &format!("2283943245 1690223    3 {wrap_from}"),
        ),
    );
    // A fresh collector: its baseline is the value near the u32 top (a driver with 32-bit stats).
    let mut net = NetdevCollector::new(&cfg);
    assert!(events_of(&mut net, T0 + 2000).is_empty());
    t.write(
        "proc/net/dev",
        &dev.replace(
            "2283943245 1690223    3    7",
            "2283943245 1690223    3    3",
        ),
    );
    let ev = events_of(&mut net, T0 + 4000);
    let drops = find(&ev, EventType::TransportDrop, "network-eth0");
    assert_eq!(drops.len(), 1, "{ev:?}");
    assert_eq!(drops[0].value, "5");
    // A plain reset of errors: no error event, no negative number anywhere.
    t.write(
        "proc/net/dev",
        &dev.replace("2283943245 1690223    3    7", "0 0    0    3"),
    );
    let ev = events_of(&mut net, T0 + 6000);
    assert!(ev.iter().all(|e| !e.event_type.is_error()), "{ev:?}");
    assert!(ev.iter().all(|e| !e.value.contains('-')), "{ev:?}");
}

#[test]
fn ib_port_down_and_up_and_netdev_link_transitions() {
    let t = Tree::new();
    let cfg = t.cfg();
    let mut ib = InfinibandCollector::new(&cfg);
    let mut net = NetdevCollector::new(&cfg);
    // mlx5_1 is administratively Disabled since before we started: not an outage.
    let ev = events_of(&mut ib, T0);
    assert!(
        find(&ev, EventType::TopoLinkDown, "mlx5_1").is_empty(),
        "{ev:?}"
    );
    assert!(events_of(&mut net, T0).is_empty());

    t.write("sys/class/infiniband/mlx5_0/ports/1/state", "1: DOWN\n");
    t.write(
        "sys/class/infiniband/mlx5_0/ports/1/phys_state",
        "2: Polling\n",
    );
    let ev = events_of(&mut ib, T0 + 2000);
    let down = find(&ev, EventType::TopoLinkDown, "mlx5_0");
    assert_eq!(down.len(), 1, "{ev:?}");
    assert!(down[0].value.contains("DOWN") && down[0].value.contains("Polling"));
    // Still down: not re-sent before the refresh interval, re-sent after it.
    assert!(
        find(
            &events_of(&mut ib, T0 + 4000),
            EventType::TopoLinkDown,
            "mlx5_0"
        )
        .is_empty()
    );
    assert_eq!(
        find(
            &events_of(&mut ib, T0 + 2000 + cfg.refresh_ms()),
            EventType::TopoLinkDown,
            "mlx5_0"
        )
        .len(),
        1
    );
    t.write("sys/class/infiniband/mlx5_0/ports/1/state", "4: ACTIVE\n");
    let ev = events_of(&mut ib, T0 + 3000 + cfg.refresh_ms());
    let up = find(&ev, EventType::TopoLinkDown, "mlx5_0");
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].value, "up");

    // Netdev: eth0 goes down → link_down; carrier flaps while up → error.net.
    t.write("sys/class/net/eth0/operstate", "down\n");
    let ev = events_of(&mut net, T0 + 2000);
    assert_eq!(
        find(&ev, EventType::TopoLinkDown, "network-eth0")[0].value,
        "operstate down"
    );
    t.write("sys/class/net/eth0/operstate", "up\n");
    t.write("sys/class/net/eth0/carrier_changes", "5\n");
    let ev = events_of(&mut net, T0 + 4000);
    assert_eq!(
        find(&ev, EventType::TopoLinkDown, "network-eth0")[0].value,
        "up"
    );
    assert!(
        find(&ev, EventType::ErrorNet, "network-eth0")[0]
            .value
            .contains("carrier changes +2")
    );
    // eth1 was down from the start: never reported.
    assert!(find(&ev, EventType::TopoLinkDown, "network-eth1").is_empty());
}

#[test]
fn processes_states_waits_exits_and_pods_from_cgroup_v1_and_v2() {
    let t = Tree::new();
    let cfg = t.cfg();
    let pods = PodResolver::new(&cfg.sysfs);
    let mut pc = ProcessCollector::new(&cfg, pods.clone());
    let ev = events_of(&mut pc, T0);
    assert_eq!(pc.tracked_count(), 3, "{ev:?}");
    let state = |ev: &[Event], pid: u32, entity: &str| -> Option<String> {
        ev.iter()
            .find(|e| {
                e.event_type == EventType::ProcessState
                    && e.pid == Some(pid)
                    && e.entity_id == entity
            })
            .map(|e| e.value.clone())
    };
    // v2 pod process: holds gpu-0 and mlx5_0 (uverbs0), sleeping → Consumes both.
    assert_eq!(state(&ev, 100, "gpu-0").as_deref(), Some("S"));
    assert_eq!(state(&ev, 100, "mlx5_0").as_deref(), Some("S"));
    // v1 pod process, D in the NVIDIA driver → waits on its GPU.
    assert_eq!(state(&ev, 200, "gpu-1").as_deref(), Some("D"));
    // Host process, D in the block layer with the disk open → waits on nvme0n1.
    assert_eq!(state(&ev, 300, "nvme0n1").as_deref(), Some("D"));
    // No cluster: no pod names, but the UID is known (metrics) and events carry no pod.
    assert!(ev.iter().all(|e| e.pod.is_none()));
    let out = pc.poll(T0 + 2000).unwrap();
    assert!(out.events.is_empty(), "unchanged: {:?}", out.events);
    let info = out
        .families
        .iter()
        .find(|f| f.name() == "ark_process_info")
        .unwrap();
    let uid_of = |pid: &str| {
        info.get_metric()
            .iter()
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "pid" && l.value() == pid)
            })
            .and_then(|m| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == "pod_uid")
                    .map(|l| l.value().to_owned())
            })
    };
    assert_eq!(uid_of("100").as_deref(), Some(POD_V2));
    assert_eq!(uid_of("200").as_deref(), Some(POD_V1));
    assert_eq!(uid_of("300").as_deref(), Some(""));

    // The v2 process's cgroup id maps to its pod (what the eBPF collector asks).
    let scope = std::fs::read_to_string(t.path("proc/100/cgroup")).unwrap();
    let dir = t.path(&format!(
        "sys/fs/cgroup{}",
        scope.trim().trim_start_matches("0::")
    ));
    let ino = std::fs::metadata(&dir).unwrap().ino();
    let p = pods.by_cgroup_id(ino).expect("cgroup id → pod");
    assert_eq!(p.uid, POD_V2);
    assert_eq!(
        p.container_id.as_deref(),
        Some("8e3f2a1b".repeat(8).as_str())
    );
    // The pod-level slice too (walked), and a host cgroup is not a pod.
    let slice_ino = std::fs::metadata(dir.parent().unwrap()).unwrap().ino();
    assert_eq!(
        pods.by_cgroup_id(slice_ino).map(|p| p.uid).as_deref(),
        Some(POD_V2)
    );
    let host_ino = std::fs::metadata(t.path("sys/fs/cgroup/system.slice/sshd.service"))
        .unwrap()
        .ino();
    assert_eq!(pods.by_cgroup_id(host_ino), None);

    // 200 wakes up; 300 exits; 100's pid is reused by another process.
    t.write(
        "proc/200/stat",
        &std::fs::read_to_string(t.path("proc/200/stat"))
            .unwrap()
            .replacen(" D ", " R ", 1),
    );
    std::fs::remove_dir_all(t.path("proc/300")).unwrap();
    t.write(
        "proc/100/stat",
        &std::fs::read_to_string(t.path("proc/100/stat"))
            .unwrap()
            .replace(" 81234 ", " 99999 "),
    );
    let ev = events_of(&mut pc, T0 + 4000);
    assert_eq!(state(&ev, 200, "gpu-1").as_deref(), Some("R"));
    assert!(
        state(&ev, 300, "nvme0n1").is_some_and(|v| v.starts_with("exited")),
        "{ev:?}"
    );
    assert!(
        state(&ev, 100, "gpu-0").is_some_and(|v| v.starts_with("exited")),
        "{ev:?}"
    );
    // Exactly one exit event per process, never a burst.
    let exits = ev.iter().filter(|e| e.value.starts_with("exited")).count();
    assert_eq!(exits, 2, "{ev:?}");
    // The reused pid is a new process: classified again, after the old one's exit.
    let last = ev
        .iter()
        .rev()
        .find(|e| e.pid == Some(100) && e.entity_id == "gpu-0")
        .unwrap();
    assert_eq!(last.value, "S", "{ev:?}");
    assert!(events_of(&mut pc, T0 + 6000).is_empty());
}

#[test]
fn process_tracking_is_bounded() {
    let t = Tree::new();
    for pid in 1000..1040u32 {
        t.write(
            &format!("proc/{pid}/stat"),
            &format!(
                "{pid} (w) S 1 {pid} {pid} 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 1 0 {pid} 1 1 0\n"
            ),
        );
        std::os::unix::fs::symlink("/dev/nvidia2", t.path(&format!("proc/{pid}/fd/3")))
            .or_else(|_| {
                std::fs::create_dir_all(t.path(&format!("proc/{pid}/fd")))?;
                std::os::unix::fs::symlink("/dev/nvidia2", t.path(&format!("proc/{pid}/fd/3")))
            })
            .unwrap();
    }
    let cfg = HostConfig {
        max_processes_tracked: 8,
        fd_scan_processes_per_poll: 5,
        ..t.cfg()
    };
    let mut pc = ProcessCollector::new(&cfg, PodResolver::new(&cfg.sysfs));
    let mut polls = 0;
    for i in 0..20 {
        pc.poll(T0 + i * 2000).unwrap();
        polls += 1;
        assert!(pc.tracked_count() <= 8);
    }
    assert_eq!(pc.tracked_count(), 8, "after {polls} polls");
}

#[test]
fn host_events_link_stalled_processes_to_devices_in_the_causal_graph() {
    use ark_exporter::pipeline::{Clock, Pipeline, PipelineConfig};
    let t = Tree::new();
    let cfg = t.cfg();
    let pods = PodResolver::new(&cfg.sysfs);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "trainer-0", "namespace": "ml", "uid": POD_V2,
                     "labels": {"job-name": "train-a"}},
    }))
    .unwrap();
    pods.apply_pod(&pod);
    let telemetry = Telemetry::new("n").unwrap();
    let mut p = Pipeline::new(
        PipelineConfig::default(),
        Clock::EventTime,
        None,
        telemetry.dropped.clone(),
    );
    let mut set = HostSet::new(&cfg, &pods);
    for ev in set.poll_into(T0, &telemetry) {
        p.apply(&ev, "host");
    }
    // The IB port of pid 100 goes down: pid 100 is blocked by it through Consumes.
    t.write("sys/class/infiniband/mlx5_0/ports/1/state", "1: DOWN\n");
    for ev in set.poll_into(T0 + 2000, &telemetry) {
        p.apply(&ev, "host");
    }
    let why = p.why(100).expect("pid 100 in the graph");
    assert!(
        why.iter()
            .any(|c| c.resource == "mlx5_0" && c.cause == "topo.link_down"),
        "{why:?}"
    );
    let node = p.graph().process(100).unwrap();
    assert_eq!(node.pod(), Some("trainer-0"));
    assert_eq!(node.namespace(), Some("ml"));
    assert_eq!(node.job(), Some("train-a"));
    // The D-state host process waits on the disk it has open.
    let why = p.why(300).expect("pid 300 in the graph");
    assert!(why.iter().any(|c| c.resource == "nvme0n1"), "{why:?}");
}

/// `ark-exporter --path.procfs F/proc --path.sysfs F/sys` serves the fixture's host metrics: the
/// flags reach every host collector.
#[test]
fn serve_with_path_flags_reads_the_fixture_tree() {
    use std::io::Read;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
        .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
        .args(["--node-name", "fx"])
        .arg("--path.procfs")
        .arg(f.join("proc"))
        .arg("--path.sysfs")
        .arg(f.join("sys"))
        .args(["--no-collector", "ebpf", "--no-collector", "pods"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scrape = || -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        Some(raw)
    };
    let want = [
        "ark_ib_port_up{device=\"mlx5_0\",port=\"1\",node=\"fx\"} 1",
        "ark_netdev_drops_total{device=\"eth0\",direction=\"rx\",node=\"fx\"} 7",
        "ark_block_io_in_flight{device=\"nvme0n1\",node=\"fx\"} 17",
        "ark_pressure_ratio{resource=\"io\"",
        "ark_process_waits_on{pid=\"300\"",
        "ark_collector_up{collector=\"infiniband\",node=\"fx\"} 1",
        "ark_collector_up{collector=\"process\",node=\"fx\"} 1",
    ];
    let mut last = String::new();
    // A deadline for the first polls, not a timed assertion.
    for _ in 0..250 {
        if let Some(text) = scrape() {
            last = text;
            if want.iter().all(|w| last.contains(w)) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    let _ = child.kill();
    let _ = child.wait();
    for w in want {
        assert!(last.contains(w), "missing {w}\n{last}");
    }
}

#[test]
fn pid_to_pod_for_other_collectors() {
    // What the NVML collector uses for `ark_gpu_process_memory_bytes{pod,namespace,container}`.
    let cfg = cfg_at(&fixture());
    let pods = PodResolver::new(&cfg.sysfs);
    assert_eq!(
        pods.resolve_pid(&cfg.procfs, 100).map(|p| p.uid).as_deref(),
        Some(POD_V2)
    );
    assert_eq!(
        pods.resolve_pid(&cfg.procfs, 200).map(|p| p.uid).as_deref(),
        Some(POD_V1)
    );
    assert_eq!(pods.resolve_pid(&cfg.procfs, 300), None);
    assert_eq!(pods.resolve_pid(&cfg.procfs, 999_999), None);
}

/// On the real `/proc` the process collector skips listing it while no pid was allocated
/// (`/proc/loadavg`): a process started after the listing must still be found and tracked.
#[test]
fn real_proc_new_process_is_found_despite_the_cached_listing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = HostConfig::default();
    let mut pc = ProcessCollector::new(&cfg, PodResolver::new(Path::new("/sys")));
    let mut now = T0;
    // Classify what runs now (batches of `fd_scan_processes_per_poll`).
    for _ in 0..400 {
        now += 2_000;
        if !pc.poll(now).unwrap().more {
            break;
        }
    }
    let mut child = Command::new("bash")
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port}; exec sleep 30"),
        ])
        .spawn()
        .unwrap();
    let (_conn, _) = listener.accept().unwrap();
    let pid = child.id().to_string();
    let mut found = false;
    for _ in 0..400 {
        now += 2_000;
        let out = pc.poll(now).unwrap();
        found = out
            .families
            .iter()
            .filter(|f| f.name() == "ark_process_info")
            .flat_map(|f| f.get_metric())
            .any(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "pid" && l.value() == pid)
            });
        if found {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "pid {pid} holding a socket was never tracked");
}
