//! The `ebpf` collector: TCP retransmits per flow and pod, block I/O latency, process exits and
//! OOM kills, from the kernel-side programs in `ebpf/ark.bpf.c` (loaded with aya).
//!
//! It runs on its own blocking thread that sleeps in `poll(2)` on the ring buffer's fd: the
//! kernel wakes it when records arrive (nothing to do, no wake-up), and after a drain it waits
//! at least [`DRAIN_EVERY`] so a burst is taken in batches; the maps are read every
//! `poll_interval` into a metrics snapshot. It may touch: the BPF syscall, `/sys/kernel/btf/vmlinux`,
//! `<sysfs>/dev/block` (device names) and the host's interface addresses (to name the NIC a
//! flow uses). cgroup ids are attributed by the shared [`crate::pods::PodResolver`] (the one
//! cgroup → pod authority).
//!
//! Degradation: built without clang, missing CAP_BPF/CAP_PERFMON, no BTF → `ark_collector_up
//! {collector="ebpf"} 0` and one log line saying why; the rest of the exporter runs on.
//!
//! Caps: kernel maps as in `ebpf/ark.h`; userspace: [`MAX_POD_SERIES`] retransmit series,
//! [`MAX_IO_SERIES`] histogram series, [`crate::pods::MAX_CGROUP_IDS`] indexed cgroups,
//! [`kernel::MAX_TRACKED_FLOWS`] remembered flow counts.

pub mod kernel;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use tracing::{info, warn};

use self::kernel::{Flow, FlowTotals, IoHistogram, IoOp, KernelEvent, ProbeConfig, Probes};
use super::{BoxFuture, Collector, CollectorContext};
use crate::event::{Event, EventType};
use crate::metrics::family;
use crate::pods::PodResolver;

/// Least time between two drains of the ring buffer (events reach the pipeline within that).
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// Longest sleep without looking at the shutdown flag.
const SHUTDOWN_CHECK: Duration = Duration::from_millis(500);
/// Most `(pod, namespace)` series of `ark_tcp_retransmits_total`; the rest add to `pod="_other"`.
pub const MAX_POD_SERIES: usize = 256;
/// Most `(device, op)` series of `ark_block_io_latency_seconds`.
pub const MAX_IO_SERIES: usize = 128;
/// Most records taken from the ring buffer per drain (the rest wait for the next one).
const DRAIN_BATCH: usize = 4096;

/// Most pids of one cgroup linked to a retransmit; a cgroup with more is too crowded to say.
pub const MAX_PIDS_PER_CGROUP: usize = 16;

/// What the collector does (`[ebpf]` in the config file).
#[derive(Debug, Clone)]
pub struct EbpfSettings {
    pub slow_io: Duration,
    pub poll_interval: Duration,
    pub retransmit_event_gap: Duration,
}

impl Default for EbpfSettings {
    fn default() -> Self {
        Self {
            slow_io: Duration::from_millis(100),
            poll_interval: Duration::from_secs(1),
            retransmit_event_gap: Duration::from_secs(1),
        }
    }
}

/// See the module docs.
pub struct EbpfCollector {
    settings: EbpfSettings,
    sysfs: PathBuf,
}

impl EbpfCollector {
    /// The `[ebpf]` settings; `sysfs` names block devices.
    pub fn new(settings: EbpfSettings, sysfs: &Path) -> Self {
        Self {
            settings,
            sysfs: sysfs.to_owned(),
        }
    }
}

impl Collector for EbpfCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        Box::pin(async move {
            let status = ctx.status.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || run_blocking(*self, ctx)).await {
                warn!(error = %e, "eBPF collector thread ended abnormally");
                status.set_up(false);
            }
        })
    }
}

fn run_blocking(c: EbpfCollector, ctx: CollectorContext) {
    let cfg = ProbeConfig {
        slow_io: c.settings.slow_io,
        retransmit_event_gap: c.settings.retransmit_event_gap,
    };
    let mut probes = match Probes::load(&cfg) {
        Ok(p) => p,
        Err(e) => {
            warn!(collector = "ebpf", error = %e, "eBPF collector not running: {e}");
            ctx.status.set_up(false);
            return;
        }
    };
    info!(
        startup_ms = probes.startup.as_secs_f64() * 1e3,
        attached = ?probes.attached,
        skipped = ?probes.skipped,
        "eBPF programs loaded and attached"
    );
    ctx.status.set_up(true);
    let mut state = State::new(&c, ctx.pods.clone());
    let mut last_poll: Option<Instant> = None;
    let mut batch = Vec::new();
    while !*ctx.shutdown.borrow() {
        batch.clear();
        state.unparsed += probes.drain(DRAIN_BATCH, &mut batch) as u64;
        for ev in batch.drain(..) {
            for out in state.translate(ev) {
                ctx.events.send(out);
            }
        }
        if last_poll.is_none_or(|t| t.elapsed() >= c.settings.poll_interval) {
            let t = Instant::now();
            let families = state.poll(&probes);
            ctx.telemetry.snapshots.publish("ebpf", families);
            ctx.status.set_duration(t.elapsed().as_secs_f64());
            last_poll = Some(t);
        }
        std::thread::sleep(DRAIN_EVERY);
        let next_poll = last_poll.map_or(Duration::ZERO, |t| {
            c.settings.poll_interval.saturating_sub(t.elapsed())
        });
        wait_readable(probes.ring_fd(), next_poll.min(SHUTDOWN_CHECK));
    }
}

/// Sleeps until `fd` is readable or `timeout` passed (an error or a signal ends it early, which
/// only costs one extra loop).
fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Attribution of one cgroup.
#[derive(Debug, Clone, Default)]
struct Owner {
    pod: String,
    namespace: String,
    /// Pids to link in the graph; empty when the cgroup is a mount root or too crowded to say.
    pids: Vec<u32>,
}

/// Userspace state between polls: attribution caches and monotonic totals.
struct State {
    pods: PodResolver,
    sysfs: PathBuf,
    totals: FlowTotals<(String, String)>,
    ifaces: HashMap<IpAddr, String>,
    ifaces_at: Option<Instant>,
    devnames: HashMap<(u32, u32), String>,
    unparsed: u64,
}

impl State {
    fn new(c: &EbpfCollector, pods: PodResolver) -> Self {
        Self {
            pods,
            sysfs: c.sysfs.clone(),
            totals: FlowTotals::default(),
            ifaces: HashMap::new(),
            ifaces_at: None,
            devnames: HashMap::new(),
            unparsed: 0,
        }
    }

    /// Pod and namespace of a cgroup; `with_pids` also names its processes (only retransmits
    /// link pids: reading `cgroup.procs` for every exit would be wasted work).
    fn owner(&mut self, cgroup_id: u64, with_pids: bool) -> Owner {
        let Some(path) = self.pods.cgroup_path(cgroup_id) else {
            return Owner::default();
        };
        let (pod, namespace) = match self.pods.by_cgroup_id(cgroup_id) {
            Some(p) => match (p.name, p.namespace) {
                (Some(n), Some(ns)) => (n, ns),
                _ => (p.uid, String::new()),
            },
            None => (String::new(), String::new()),
        };
        // A mount root holds every host process: naming some of them would be a guess.
        let pids = if !with_pids || path == "/" {
            Vec::new()
        } else {
            let pids = self.pods.cgroup_pids(cgroup_id, MAX_PIDS_PER_CGROUP);
            if pids.len() >= MAX_PIDS_PER_CGROUP {
                Vec::new()
            } else {
                pids
            }
        };
        Owner {
            pod,
            namespace,
            pids,
        }
    }

    fn iface(&mut self, addr: IpAddr) -> String {
        if self
            .ifaces_at
            .is_none_or(|t| t.elapsed() > Duration::from_secs(30))
            || !self.ifaces.contains_key(&addr)
                && self
                    .ifaces_at
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            self.ifaces = local_addresses();
            self.ifaces_at = Some(Instant::now());
        }
        self.ifaces
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    }

    fn devname(&mut self, dev: (u32, u32)) -> String {
        if let Some(n) = self.devnames.get(&dev) {
            return n.clone();
        }
        let name = device_name(&self.sysfs, dev);
        if self.devnames.len() < 4096 {
            self.devnames.insert(dev, name.clone());
        }
        name
    }

    /// Kernel record → pipeline events.
    fn translate(&mut self, ev: KernelEvent) -> Vec<Event> {
        let ts = now_ms();
        let base = |event_type, entity_id: String, pid, value: String, o: &Owner| Event {
            ts,
            event_type,
            entity_id,
            job_id: None,
            pid,
            value,
            node_id: None,
            pod: (!o.pod.is_empty()).then(|| o.pod.clone()),
            namespace: (!o.namespace.is_empty()).then(|| o.namespace.clone()),
        };
        match ev {
            KernelEvent::Retransmit {
                cgroup_id,
                flow,
                count,
            } => {
                let o = self.owner(cgroup_id, true);
                let entity = format!("network-{}", self.iface(flow.saddr));
                let value = format!("tcp retransmit count={count} {}", flow_str(&flow));
                if o.pids.is_empty() {
                    return vec![base(EventType::TransportDrop, entity, None, value, &o)];
                }
                o.pids
                    .iter()
                    .map(|&p| {
                        base(
                            EventType::TransportDrop,
                            entity.clone(),
                            Some(p),
                            value.clone(),
                            &o,
                        )
                    })
                    .collect()
            }
            KernelEvent::SlowIo {
                pid,
                cgroup_id,
                dev,
                ..
            } => {
                let o = self.owner(cgroup_id, false);
                let dev = self.devname(dev);
                // `waiting` makes the graph link the issuing process WaitsOn the device; the
                // latency itself is in the histogram.
                vec![base(
                    EventType::ProcessState,
                    dev,
                    (pid != 0).then_some(pid),
                    "waiting".into(),
                    &o,
                )]
            }
            KernelEvent::Exit {
                pid,
                cgroup_id,
                code,
                signal,
                comm,
            } => {
                let o = self.owner(cgroup_id, false);
                let value = if signal != 0 {
                    format!("exited signal={signal} comm={comm}")
                } else {
                    format!("exited code={code} comm={comm}")
                };
                vec![base(
                    EventType::ProcessState,
                    format!("pid-{pid}"),
                    Some(pid),
                    value,
                    &o,
                )]
            }
            KernelEvent::OomKill { pid } => vec![base(
                EventType::ProcessState,
                format!("pid-{pid}"),
                Some(pid),
                "exited: OOM killed (out of memory)".into(),
                &Owner::default(),
            )],
        }
    }

    /// Reads the maps into metric families.
    fn poll(&mut self, probes: &Probes) -> Vec<MetricFamily> {
        let mut families = Vec::new();
        if let Ok(flows) = probes.flows() {
            let mut keys: HashMap<u64, (String, String)> = HashMap::new();
            let mut new_keys = std::collections::HashSet::new();
            for &(_, cg, _) in &flows {
                if keys.contains_key(&cg) {
                    continue;
                }
                let o = self.owner(cg, false);
                let mut k = (o.pod, o.namespace);
                if !self.totals.totals().contains_key(&k) {
                    if self.totals.totals().len() + new_keys.len() >= MAX_POD_SERIES {
                        k = ("_other".to_owned(), String::new());
                    } else {
                        new_keys.insert(k.clone());
                    }
                }
                keys.insert(cg, k);
            }
            self.totals
                .update(&flows, |cg| keys.get(&cg).cloned().unwrap_or_default());
        }
        let named: BTreeMap<(String, IoOp), IoHistogram> = match probes.io_histograms() {
            Ok(hists) => hists
                .into_iter()
                .take(MAX_IO_SERIES)
                .map(|((dev, op), h)| ((self.devname(dev), op), h))
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        families.extend(build_families(&Readings {
            retransmits: self.totals.totals(),
            io: &named,
            lost: probes.lost(),
            unparsed: self.unparsed,
            attached: &probes.attached,
        }));
        families
    }
}

/// What one poll read, ready to become metric families.
struct Readings<'a> {
    retransmits: &'a BTreeMap<(String, String), u64>,
    io: &'a BTreeMap<(String, IoOp), IoHistogram>,
    lost: u64,
    unparsed: u64,
    attached: &'a [(&'static str, &'static str)],
}

/// The collector's metric families (pure: the golden test drives it).
fn build_families(r: &Readings<'_>) -> Vec<MetricFamily> {
    vec![
        family(
            "ark_tcp_retransmits_total",
            "TCP segments retransmitted, by the pod owning the socket (pod=\"\" for host processes).",
            MetricType::COUNTER,
            r.retransmits.iter().map(|((pod, ns), v)| {
                (
                    vec![("pod", pod.clone()), ("namespace", ns.clone())],
                    *v as f64,
                )
            }),
        ),
        io_family(r.io),
        family(
            "ark_ebpf_events_lost_total",
            "Ring-buffer records the kernel dropped because userspace was behind.",
            MetricType::COUNTER,
            [(Vec::new(), r.lost as f64)],
        ),
        family(
            "ark_ebpf_records_unparsed_total",
            "Ring-buffer records userspace could not parse (kernel object newer than userspace).",
            MetricType::COUNTER,
            [(Vec::new(), r.unparsed as f64)],
        ),
        family(
            "ark_ebpf_program_attached",
            "1 for each attached BPF program, by attach point.",
            MetricType::GAUGE,
            r.attached.iter().map(|(p, a)| {
                (
                    vec![("program", (*p).to_owned()), ("attach", (*a).to_owned())],
                    1.0,
                )
            }),
        ),
    ]
}

fn flow_str(f: &Flow) -> String {
    let fmt = |a: IpAddr, p: u16| match a {
        IpAddr::V4(v) => format!("{v}:{p}"),
        IpAddr::V6(v) => format!("[{v}]:{p}"),
    };
    format!("{}->{}", fmt(f.saddr, f.sport), fmt(f.daddr, f.dport))
}

/// `ark_block_io_latency_seconds` from the kernel's per-bucket counts.
fn io_family(hists: &BTreeMap<(String, IoOp), IoHistogram>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name("ark_block_io_latency_seconds".into());
    mf.set_help("Block I/O latency from issue to completion, by device and operation.".into());
    mf.set_field_type(MetricType::HISTOGRAM);
    let metrics = hists
        .iter()
        .map(|((dev, op), h)| {
            let labels = [("device", dev.as_str()), ("op", op.as_str())]
                .into_iter()
                .map(|(k, v)| {
                    let mut lp = LabelPair::default();
                    lp.set_name(k.into());
                    lp.set_value(v.into());
                    lp
                })
                .collect();
            let mut m = Metric::from_label(labels);
            let mut hist = Histogram::default();
            let mut cumulative = 0u64;
            let buckets = (0..kernel::IO_BUCKETS - 1)
                .map(|i| {
                    cumulative += h.buckets[i];
                    let mut b = Bucket::default();
                    b.set_upper_bound(IoHistogram::upper_bound(i));
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect();
            hist.set_bucket(buckets);
            hist.set_sample_count(h.count());
            hist.set_sample_sum(h.sum_ns as f64 / 1e9);
            m.set_histogram(hist);
            m
        })
        .collect();
    mf.set_metric(metrics);
    mf
}

/// `DEVNAME` from `<sysfs>/dev/block/<major>:<minor>/uevent`, else `major:minor`.
fn device_name(sysfs: &Path, (major, minor): (u32, u32)) -> String {
    std::fs::read_to_string(sysfs.join(format!("dev/block/{major}:{minor}/uevent")))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

/// Local address → interface name.
fn local_addresses() -> HashMap<IpAddr, String> {
    let mut out = HashMap::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(addr) = ifa.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            out.entry(ip).or_insert(ifa.interface_name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exporter tests' one golden helper.
    mod golden {
        include!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/common/golden.rs"
        ));
    }

    #[test]
    fn histogram_family_is_cumulative_with_inf_implied() {
        let mut h = IoHistogram::default();
        h.buckets[0] = 2;
        h.buckets[10] = 3;
        h.buckets[kernel::IO_BUCKETS - 1] = 1; // beyond the last finite bound
        h.sum_ns = 5_000_000_000;
        let mut m = BTreeMap::new();
        m.insert(("vda".to_owned(), IoOp::Write), h);
        let mf = io_family(&m);
        let hist = mf.get_metric()[0].get_histogram();
        assert_eq!(hist.get_sample_count(), 6);
        assert_eq!(hist.get_sample_sum(), 5.0);
        let b = hist.get_bucket();
        assert_eq!(b.len(), kernel::IO_BUCKETS - 1);
        assert_eq!(b[0].cumulative_count(), 2);
        assert_eq!(b[9].cumulative_count(), 2);
        assert_eq!(b[10].cumulative_count(), 5);
        assert_eq!(
            b.last().unwrap().cumulative_count(),
            5,
            "the +Inf sample is only in count"
        );
    }

    /// The families as `/metrics` shows them, against `exporter/tests/golden/ebpf_metrics.txt`
    /// (`ARK_UPDATE_GOLDEN=1` regenerates it), and through `promtool check metrics`.
    #[test]
    fn golden_metrics() {
        let mut retransmits = BTreeMap::new();
        retransmits.insert((String::new(), String::new()), 3);
        retransmits.insert(("trainer-0".to_owned(), "ml".to_owned()), 57);
        let mut io = BTreeMap::new();
        let mut h = IoHistogram::default();
        h.buckets[7] = 90; // ≤ 128 µs
        h.buckets[12] = 9; // ≤ 4 ms
        h.buckets[18] = 1; // ≤ 262 ms: a slow one
        h.sum_ns = 310_000_000;
        io.insert(("nvme0n1".to_owned(), IoOp::Write), h);
        let attached = [("tcp_retransmit", "tp_btf/tcp_retransmit_skb")];
        let t = crate::metrics::Telemetry::new("golden").unwrap();
        t.snapshots.publish(
            "ebpf",
            build_families(&Readings {
                retransmits: &retransmits,
                io: &io,
                lost: 0,
                unparsed: 0,
                attached: &attached,
            }),
        );
        let text: String = t
            .encode()
            .lines()
            .filter(|l| {
                l.contains("ark_tcp_") || l.contains("ark_block_") || l.contains("ark_ebpf_")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/ebpf_metrics.txt");
        golden::compare_or_update(&path, &text, golden::Order::Exact);
        let out = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .expect("promtool (Debian package prometheus) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn device_names_from_sysfs_or_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("dev/block/259:0");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("uevent"),
            "MAJOR=259\nMINOR=0\nDEVNAME=nvme0n1\nDEVTYPE=disk\n",
        )
        .unwrap();
        assert_eq!(device_name(dir.path(), (259, 0)), "nvme0n1");
        assert_eq!(device_name(dir.path(), (8, 0)), "8:0");
    }

    #[test]
    fn loopback_is_a_local_address() {
        let m = local_addresses();
        assert_eq!(
            m.get(&"127.0.0.1".parse::<IpAddr>().unwrap())
                .map(String::as_str),
            Some("lo")
        );
    }
}
