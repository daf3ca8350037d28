//! Loader and reader for Ark's kernel-side programs (`ebpf/ark.bpf.c`): TCP retransmits per flow
//! and cgroup, block I/O latency histograms, process exits and OOM kills.
//!
//! What it may touch: the BPF syscall (through aya), `/sys/kernel/btf/vmlinux`, tracefs for the
//! classic-tracepoint fallbacks, `/proc/self/status` for the capability check. It never blocks
//! on the kernel: maps are read on the collection interval, the ring buffer is drained when its
//! fd is readable.
//!
//! Caps (kernel side, see `ebpf/ark.h`): flows 16,384 (LRU), in-flight requests 16,384 (LRU),
//! I/O histogram keys 8,192, watched pids 8,192, ring buffer 256 KiB. Userspace keeps at most
//! [`MAX_TRACKED_FLOWS`] previous flow counts to turn per-flow counts into monotonic totals.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};

/// The compiled object, built by `build.rs` with clang; empty when clang was missing.
#[cfg(not(ark_no_ebpf))]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ark.bpf.o"));
#[cfg(ark_no_ebpf)]
pub static OBJECT: &[u8] = &[];

/// Bytes of one ring-buffer record (`struct ark_event`).
pub const EVENT_SIZE: usize = 104;
/// Histogram buckets: bucket `i` counts latencies ≤ 2^i µs; the last one is +Inf.
pub const IO_BUCKETS: usize = 26;
const IO_SUM_BUCKET: u8 = 255;
/// Userspace memory of previous per-flow counts (for monotonic totals); oldest dropped first.
pub const MAX_TRACKED_FLOWS: usize = 16_384;

/// Why the eBPF collector is not running. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("built without eBPF support: clang was not found when ark-exporter was compiled")]
    NotBuilt,
    #[error(
        "missing capability {0}: run as root or grant CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"
    )]
    MissingCapability(&'static str),
    #[error(
        "kernel BTF not readable at /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF=y is required): {0}"
    )]
    Btf(#[source] aya::BtfError),
    #[error("loading the BPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("none of the attach points for {0} worked")]
    NoAttach(&'static str),
}

/// One record from the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Retransmit {
        cgroup_id: u64,
        flow: Flow,
        /// Retransmits on this flow so far (exact; events are rate-limited per flow).
        count: u64,
    },
    SlowIo {
        pid: u32,
        cgroup_id: u64,
        dev: (u32, u32),
        op: IoOp,
        latency: Duration,
    },
    Exit {
        pid: u32,
        cgroup_id: u64,
        code: i32,
        signal: i32,
        comm: String,
    },
    OomKill {
        pid: u32,
    },
}

/// A TCP flow as seen by the kernel (local address first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// Block request operation (`REQ_OP_*`), as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
    Other,
}

impl IoOp {
    pub fn from_req_op(op: u32) -> Self {
        match op {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Flush,
            3 => Self::Discard,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Discard => "discard",
            Self::Other => "other",
        }
    }
}

/// Splits a kernel `dev_t` (`major << 20 | minor`) into (major, minor).
pub fn split_dev(dev: u64) -> (u32, u32) {
    ((dev >> 20) as u32, (dev & 0xfffff) as u32)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

fn addr(family: u16, raw: &[u8]) -> Option<IpAddr> {
    match family {
        2 => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        10 => {
            let a: [u8; 16] = raw[..16].try_into().ok()?;
            let v6 = Ipv6Addr::from(a);
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

/// Parses one `struct ark_event`. `None` for a short record or an unknown kind (a newer BPF
/// object than this userspace): the caller counts it, nothing panics.
pub fn parse_event(b: &[u8]) -> Option<KernelEvent> {
    if b.len() < EVENT_SIZE {
        return None;
    }
    let kind = u32_at(b, 0);
    let pid = u32_at(b, 4);
    let cgroup_id = u64_at(b, 8);
    let v1 = u64_at(b, 24);
    let v2 = u64_at(b, 32);
    let v3 = u32_at(b, 40);
    Some(match kind {
        1 => {
            let family = u16_at(b, 44);
            KernelEvent::Retransmit {
                cgroup_id,
                count: v1,
                flow: Flow {
                    saddr: addr(family, &b[52..68])?,
                    sport: u16_at(b, 46),
                    daddr: addr(family, &b[68..84])?,
                    dport: u16_at(b, 48),
                },
            }
        }
        2 => KernelEvent::SlowIo {
            pid,
            cgroup_id,
            dev: split_dev(v2),
            op: IoOp::from_req_op(v3),
            latency: Duration::from_nanos(v1),
        },
        3 => {
            let status = v1 as i32;
            let comm = &b[84..100];
            let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
            KernelEvent::Exit {
                pid,
                cgroup_id,
                code: (status >> 8) & 0xff,
                signal: status & 0x7f,
                comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
            }
        }
        4 => KernelEvent::OomKill { pid },
        _ => return None,
    })
}

/// Parses a `struct ark_flow_key` (48 bytes).
pub fn parse_flow_key(k: &[u8; 48]) -> Option<(Flow, u64)> {
    let family = u16_at(k, 36);
    Some((
        Flow {
            saddr: addr(family, &k[0..16])?,
            daddr: addr(family, &k[16..32])?,
            sport: u16_at(k, 32),
            dport: u16_at(k, 34),
        },
        u64_at(k, 40),
    ))
}

/// Latency histograms keyed by ((major, minor), op).
pub type IoHistograms = BTreeMap<((u32, u32), IoOp), IoHistogram>;

/// Latency histogram of one (device, op), cumulative-ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoHistogram {
    /// Non-cumulative counts per bucket.
    pub buckets: [u64; IO_BUCKETS],
    pub sum_ns: u64,
}

impl IoHistogram {
    /// Upper bound of bucket `i` in seconds (`f64::INFINITY` for the last).
    pub fn upper_bound(i: usize) -> f64 {
        if i + 1 >= IO_BUCKETS {
            f64::INFINITY
        } else {
            (1u64 << i) as f64 / 1e6
        }
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Capabilities needed to load and attach: CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN.
pub fn check_capabilities(proc_status: &str) -> Result<(), EbpfError> {
    let eff = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    if has(SYS_ADMIN) {
        return Ok(());
    }
    if !has(BPF) {
        return Err(EbpfError::MissingCapability("CAP_BPF"));
    }
    if !has(PERFMON) {
        return Err(EbpfError::MissingCapability("CAP_PERFMON"));
    }
    Ok(())
}

/// Settings for the kernel side.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// I/O slower than this becomes a `SlowIo` event.
    pub slow_io: Duration,
    /// At most one retransmit event per flow per this gap (counts stay exact).
    pub retransmit_event_gap: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            slow_io: Duration::from_millis(100),
            retransmit_event_gap: Duration::from_secs(1),
        }
    }
}

/// Loaded and attached programs plus handles to their maps.
pub struct Probes {
    bpf: Ebpf,
    ring: RingBuf<MapData>,
    /// `(program, attach point)` for each attached program.
    pub attached: Vec<(&'static str, &'static str)>,
    /// Programs that could not attach, with why (e.g. the OOM tracepoint without tracefs).
    pub skipped: Vec<(&'static str, String)>,
    /// Load + attach wall time.
    pub startup: Duration,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

fn btf_tp(bpf: &mut Ebpf, btf: &Btf, prog: &'static str, tp: &str) -> Result<(), String> {
    let p: &mut BtfTracePoint = bpf
        .program_mut(prog)
        .ok_or("not in object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    p.load(tp, btf).map_err(|e| format!("{e}"))?;
    p.attach().map_err(|e| format!("{e}"))?;
    Ok(())
}

fn classic_tp(bpf: &mut Ebpf, prog: &'static str, cat: &str, name: &str) -> Result<(), String> {
    let p: &mut TracePoint = bpf
        .program_mut(prog)
        .ok_or("not in object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    p.load().map_err(|e| format!("{e}"))?;
    p.attach(cat, name).map_err(|e| format!("{e}"))?;
    Ok(())
}

impl Probes {
    /// Checks capabilities, loads the object and attaches every program, with fallbacks.
    pub fn load(cfg: &ProbeConfig) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        check_capabilities(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())?;
        let start = Instant::now();
        let btf = Btf::from_sys_fs().map_err(EbpfError::Btf)?;
        let slow = cfg.slow_io.as_nanos() as u64;
        let gap = cfg.retransmit_event_gap.as_nanos() as u64;
        // aya raises RLIMIT_MEMLOCK itself and only warns when it cannot (no CAP_SYS_RESOURCE):
        // kernels ≥ 5.11 account BPF memory to the cgroup instead, so that is not fatal.
        let mut bpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("slow_io_ns", &slow, true)
            .override_global("retransmit_event_gap_ns", &gap, true)
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;
        let mut attached = Vec::new();
        let mut skipped = Vec::new();

        match btf_tp(
            &mut bpf,
            &btf,
            "ark_tcp_retransmit_btf",
            "tcp_retransmit_skb",
        ) {
            Ok(()) => attached.push(("tcp_retransmit", "tp_btf/tcp_retransmit_skb")),
            Err(e1) => match classic_tp(
                &mut bpf,
                "ark_tcp_retransmit_tp",
                "tcp",
                "tcp_retransmit_skb",
            ) {
                Ok(()) => attached.push(("tcp_retransmit", "tracepoint/tcp/tcp_retransmit_skb")),
                Err(e2) => {
                    skipped.push(("tcp_retransmit", format!("tp_btf: {e1}; tracepoint: {e2}")))
                }
            },
        }
        for (prog, tp) in [
            ("ark_block_rq_issue", "block_rq_issue"),
            ("ark_block_rq_complete", "block_rq_complete"),
        ] {
            match btf_tp(&mut bpf, &btf, prog, tp) {
                Ok(()) => attached.push((prog, tp)),
                Err(e) => skipped.push((prog, e)),
            }
        }
        match btf_tp(&mut bpf, &btf, "ark_process_exit", "sched_process_exit") {
            Ok(()) => attached.push(("process_exit", "tp_btf/sched_process_exit")),
            Err(e) => skipped.push(("process_exit", e)),
        }
        match classic_tp(&mut bpf, "ark_oom_victim", "oom", "mark_victim") {
            Ok(()) => attached.push(("oom_kill", "tracepoint/oom/mark_victim")),
            Err(e) => skipped.push((
                "oom_kill",
                format!("{e} (is tracefs mounted at /sys/kernel/tracing?)"),
            )),
        }
        if attached.is_empty() {
            return Err(EbpfError::NoAttach("every program"));
        }
        let ring_map = bpf.take_map("ARK_EVENTS").ok_or(EbpfError::Map {
            map: "ARK_EVENTS",
            reason: "not in object".into(),
        })?;
        let ring = RingBuf::try_from(ring_map).map_err(|e| EbpfError::Map {
            map: "ARK_EVENTS",
            reason: e.to_string(),
        })?;
        Ok(Self {
            bpf,
            ring,
            attached,
            skipped,
            startup: start.elapsed(),
        })
    }

    /// The ring buffer's fd, readable when records are waiting (for `tokio::io::unix::AsyncFd`).
    pub fn ring_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// Moves up to `max` records into `out`; returns how many records did not parse.
    pub fn drain(&mut self, max: usize, out: &mut Vec<KernelEvent>) -> usize {
        let mut bad = 0;
        for _ in 0..max {
            let Some(item) = self.ring.next() else { break };
            match parse_event(&item) {
                Some(e) => out.push(e),
                None => bad += 1,
            }
        }
        bad
    }

    /// Current per-flow retransmit counts with their cgroup ids.
    pub fn flows(&self) -> Result<Vec<(Flow, u64, u64)>, EbpfError> {
        let map = self.bpf.map("ARK_FLOWS").ok_or(EbpfError::Map {
            map: "ARK_FLOWS",
            reason: "missing".into(),
        })?;
        let flows: HashMap<_, [u8; 48], [u64; 2]> =
            HashMap::try_from(map).map_err(|e| EbpfError::Map {
                map: "ARK_FLOWS",
                reason: e.to_string(),
            })?;
        Ok(flows
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| parse_flow_key(&k).map(|(f, cg)| (f, cg, v[0])))
            .collect())
    }

    /// Latency histograms keyed by ((major, minor), op).
    pub fn io_histograms(&self) -> Result<IoHistograms, EbpfError> {
        let map = self.bpf.map("ARK_IO_HIST").ok_or(EbpfError::Map {
            map: "ARK_IO_HIST",
            reason: "missing".into(),
        })?;
        let hist: HashMap<_, [u8; 8], u64> =
            HashMap::try_from(map).map_err(|e| EbpfError::Map {
                map: "ARK_IO_HIST",
                reason: e.to_string(),
            })?;
        let mut out = IoHistograms::new();
        for (k, v) in hist.iter().filter_map(Result::ok) {
            let dev = split_dev(u64::from(u32::from_ne_bytes([k[0], k[1], k[2], k[3]])));
            let h = out
                .entry((dev, IoOp::from_req_op(u32::from(k[4]))))
                .or_default();
            match k[5] {
                IO_SUM_BUCKET => h.sum_ns = v,
                b if usize::from(b) < IO_BUCKETS => h.buckets[usize::from(b)] = v,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Ring-buffer records the kernel could not reserve (userspace too slow).
    pub fn lost(&self) -> u64 {
        self.bpf
            .map("ARK_LOST")
            .and_then(|m| Array::<_, u64>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .unwrap_or(0)
    }

    /// Asks for exit events of `pid` even when it exits cleanly.
    pub fn watch(&mut self, pid: u32) -> Result<(), EbpfError> {
        let map = self.bpf.map_mut("ARK_WATCHED").ok_or(EbpfError::Map {
            map: "ARK_WATCHED",
            reason: "missing".into(),
        })?;
        let mut w: HashMap<_, u32, u8> = HashMap::try_from(map).map_err(|e| EbpfError::Map {
            map: "ARK_WATCHED",
            reason: e.to_string(),
        })?;
        w.insert(pid, 1, 0).map_err(|e| EbpfError::Map {
            map: "ARK_WATCHED",
            reason: e.to_string(),
        })
    }
}

/// Turns per-flow counts (which the kernel's LRU may evict and restart) into monotonic totals
/// per attribution key. Bounded by [`MAX_TRACKED_FLOWS`].
#[derive(Debug, Default)]
pub struct FlowTotals<K: Ord + Clone> {
    last: StdHashMap<(Flow, u64), u64>,
    totals: BTreeMap<K, u64>,
}

impl<K: Ord + Clone> FlowTotals<K> {
    /// Folds a fresh read of the flow map in; `key` attributes a cgroup id.
    pub fn update(&mut self, flows: &[(Flow, u64, u64)], mut key: impl FnMut(u64) -> K) {
        let mut next = StdHashMap::with_capacity(flows.len().min(MAX_TRACKED_FLOWS));
        for &(flow, cg, count) in flows.iter().take(MAX_TRACKED_FLOWS) {
            let prev = self.last.get(&(flow, cg)).copied().unwrap_or(0);
            // A count below the last one means the kernel evicted and restarted the flow.
            let delta = if count >= prev { count - prev } else { count };
            if delta > 0 {
                *self.totals.entry(key(cg)).or_default() += delta;
            }
            next.insert((flow, cg), count);
        }
        self.last = next;
    }

    pub fn totals(&self) -> &BTreeMap<K, u64> {
        &self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32) -> Vec<u8> {
        let mut b = vec![0u8; EVENT_SIZE];
        b[0..4].copy_from_slice(&kind.to_ne_bytes());
        b
    }

    #[test]
    fn parses_a_v4_retransmit() {
        let mut b = record(1);
        b[8..16].copy_from_slice(&42u64.to_ne_bytes());
        b[24..32].copy_from_slice(&7u64.to_ne_bytes());
        b[44..46].copy_from_slice(&2u16.to_ne_bytes());
        b[46..48].copy_from_slice(&40000u16.to_ne_bytes());
        b[48..50].copy_from_slice(&5555u16.to_ne_bytes());
        b[52..56].copy_from_slice(&[10, 0, 0, 1]);
        b[68..72].copy_from_slice(&[10, 0, 0, 2]);
        let e = parse_event(&b).expect("parses");
        assert_eq!(
            e,
            KernelEvent::Retransmit {
                cgroup_id: 42,
                count: 7,
                flow: Flow {
                    saddr: "10.0.0.1".parse().unwrap(),
                    sport: 40000,
                    daddr: "10.0.0.2".parse().unwrap(),
                    dport: 5555
                }
            }
        );
    }

    #[test]
    fn parses_exit_status_and_comm() {
        let mut b = record(3);
        b[4..8].copy_from_slice(&1234u32.to_ne_bytes());
        b[24..32].copy_from_slice(&(9u64).to_ne_bytes()); // killed by SIGKILL
        b[84..91].copy_from_slice(b"python3");
        assert_eq!(
            parse_event(&b),
            Some(KernelEvent::Exit {
                pid: 1234,
                cgroup_id: 0,
                code: 0,
                signal: 9,
                comm: "python3".into()
            })
        );
        b[24..32].copy_from_slice(&((3u64) << 8).to_ne_bytes()); // exit(3)
        assert!(matches!(
            parse_event(&b),
            Some(KernelEvent::Exit {
                code: 3,
                signal: 0,
                ..
            })
        ));
    }

    #[test]
    fn hostile_records_do_not_panic() {
        assert_eq!(parse_event(&[]), None);
        assert_eq!(parse_event(&[1, 0, 0, 0]), None);
        assert_eq!(parse_event(&record(99)), None, "unknown kind");
        let mut b = record(1);
        b[44..46].copy_from_slice(&77u16.to_ne_bytes()); // unknown family
        assert_eq!(parse_event(&b), None);
        let mut b = record(3);
        b[84..100].copy_from_slice(&[0xff; 16]); // comm not UTF-8, no NUL
        assert!(matches!(parse_event(&b), Some(KernelEvent::Exit { .. })));
    }

    #[test]
    fn splits_kernel_dev_t() {
        assert_eq!(split_dev((259 << 20) | 3), (259, 3));
    }

    #[test]
    fn capability_check_names_what_is_missing() {
        assert!(check_capabilities("CapEff:\t000001ffffffffff\n").is_ok());
        assert!(
            check_capabilities("CapEff:\t0000000000200000\n").is_ok(),
            "CAP_SYS_ADMIN alone"
        );
        let bpf_only = format!("CapEff:\t{:016x}\n", 1u64 << 39);
        assert!(matches!(
            check_capabilities(&bpf_only),
            Err(EbpfError::MissingCapability("CAP_PERFMON"))
        ));
        assert!(matches!(
            check_capabilities("CapEff:\t0000000000000000\n"),
            Err(EbpfError::MissingCapability("CAP_BPF"))
        ));
        assert!(matches!(
            check_capabilities("garbage"),
            Err(EbpfError::MissingCapability("CAP_BPF"))
        ));
    }

    #[test]
    fn flow_totals_are_monotonic_across_lru_eviction() {
        let f = Flow {
            saddr: "127.0.0.1".parse().unwrap(),
            sport: 1,
            daddr: "127.0.0.1".parse().unwrap(),
            dport: 2,
        };
        let mut t = FlowTotals::default();
        t.update(&[(f, 5, 3)], |cg| cg);
        t.update(&[(f, 5, 10)], |cg| cg);
        assert_eq!(t.totals()[&5], 10);
        t.update(&[(f, 5, 2)], |cg| cg); // evicted and restarted: +2, never backwards
        assert_eq!(t.totals()[&5], 12);
        t.update(&[], |cg| cg);
        t.update(&[(f, 5, 1)], |cg| cg);
        assert_eq!(t.totals()[&5], 13);
    }

    #[test]
    fn histogram_bounds() {
        assert_eq!(IoHistogram::upper_bound(0), 1e-6);
        assert_eq!(IoHistogram::upper_bound(10), 1024e-6);
        assert!(IoHistogram::upper_bound(IO_BUCKETS - 1).is_infinite());
    }
}
