//! The `process` collector: processes that hold a GPU (`/dev/nvidia<N>`), an RDMA device
//! (`/dev/infiniband/uverbs<N>`, mapped to its HCA through `<sysfs>/class/infiniband_verbs`) or
//! a socket. For each: state from `<procfs>/<pid>/stat`, its pod from `<procfs>/<pid>/cgroup`
//! ([`crate::pods`]), and, in D state (uninterruptible sleep), the device it waits on where that
//! can be inferred — `wchan` (GPU driver, RDMA, block layer symbols), the devices among its open
//! fds, and `<procfs>/<pid>/io` progress (read only while it is in D state); a process blocked in the block layer waits on the disk
//! holding its open files (`st_dev` mapped through `<procfs>/diskstats`).
//!
//! Bounded work: at most `max_processes_scanned` pids are listed per poll; open fds are read
//! (one `readlink` each, at most `max_fds_per_process`) for at most
//! `fd_scan_processes_per_poll` new processes per poll, and a process that holds nothing of
//! interest is looked at again only after `reclassify_after`; at most `max_processes_tracked`
//! processes are tracked (GPU/RDMA holders first, then pod processes with sockets, then host
//! processes with sockets). A tracked process costs one `stat` read per poll.
//!
//! Events (`process.state`, with pid, pod, namespace and the pod's job): per held resource
//! (`gpu-<n>`, `mlx5_0`) the state letter (`D` on the resource it waits on makes the graph's
//! WaitsOn edge, anything else Consumes); a pod process holding only sockets is reported on its
//! own node (`pid-<pid>`), a host process holding only sockets only in metrics (else every
//! daemon would be in the graph); sent on change and re-sent every `event_refresh`. A tracked process that
//! disappears, becomes a zombie or whose pid is reused → `process.state` `exited`.
//!
//! Metrics (bounded by `max_processes_tracked`):
//! `ark_process_info{pid,comm,pod,pod_uid,namespace,container}`,
//! `ark_process_uninterruptible{pid,pod,namespace,container}`,
//! `ark_process_holds{pid,pod,namespace,container,resource}`,
//! `ark_process_waits_on{pid,pod,namespace,container,resource}`, `ark_processes_tracked`,
//! `ark_process_exits_total`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;

use prometheus::proto::MetricType;

use super::{HostConfig, HostSource, PollError, PollOutput, Refresh, read_into};
use crate::event::{Event, EventType};
use crate::metrics::family;
use crate::pods::{CgroupInfo, PodRef, PodResolver, parse_cgroup};

mod parse;

use self::parse::MAX_STAT_FDS;
pub use self::parse::{
    Holds, ProcStat, WaitClass, classify_wchan, disk_of, parse_io, parse_last_pid, parse_stat,
};

const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, Clone)]
struct Known {
    start: u64,
    classified_at: i64,
}

#[derive(Debug, Clone)]
struct Tracked {
    start: u64,
    comm: String,
    state: char,
    rank: u8,
    holds: Holds,
    cgroup: Option<CgroupInfo>,
    /// Resource entities it holds (`gpu-0`, `mlx5_0`, `nvme0n1`).
    resources: Vec<String>,
    waits_on: Option<String>,
    /// Last (resource → state sent).
    sent: BTreeMap<String, char>,
    last_io: Option<u64>,
}

/// See the module docs.
pub struct ProcessCollector {
    cfg: HostConfig,
    pods: PodResolver,
    buf: String,
    known: HashMap<u32, Known>,
    tracked: BTreeMap<u32, Tracked>,
    refresh: Refresh<(u32, String)>,
    cursor: usize,
    exits_total: u64,
    listing: Listing,
}

/// The last listing of `<procfs>`.
#[derive(Debug, Default)]
struct Listing {
    pids: Vec<u32>,
    /// `/proc/loadavg`'s last pid when it was taken.
    last_pid: Option<u64>,
    at: i64,
}

impl ProcessCollector {
    pub fn new(cfg: &HostConfig, pods: PodResolver) -> Self {
        ProcessCollector {
            cfg: cfg.clone(),
            pods,
            buf: String::new(),
            known: HashMap::new(),
            tracked: BTreeMap::new(),
            refresh: Refresh::new(cfg.refresh_ms(), cfg.max_processes_tracked * 8),
            cursor: 0,
            exits_total: 0,
            listing: Listing::default(),
        }
    }

    /// The most recently allocated pid, when `procfs` is this process's pid namespace (else
    /// `None`: a foreign namespace's forks would not show).
    fn last_pid(&mut self) -> Option<u64> {
        let me = std::fs::read_link(self.cfg.proc("self")).ok()?;
        if me.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
        read_into(&self.cfg.proc("loadavg"), &mut self.buf).ok()?;
        parse_last_pid(&self.buf)
    }

    fn read_stat(&mut self, pid: u32) -> Option<ProcStat> {
        let p = self.cfg.procfs.join(pid.to_string()).join("stat");
        read_into(&p, &mut self.buf).ok()?;
        parse_stat(&self.buf)
    }

    /// Reads the fd links of a process (bounded).
    fn read_holds(&self, pid: u32) -> Holds {
        let mut h = Holds::default();
        let dir = self.cfg.procfs.join(pid.to_string()).join("fd");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return h;
        };
        for e in rd.filter_map(|e| e.ok()).take(self.cfg.max_fds_per_process) {
            if let Ok(t) = std::fs::read_link(e.path()) {
                h.add_target(&t.to_string_lossy());
            }
        }
        h
    }

    fn ib_of_uverbs(&self, uverbs: &str) -> Option<String> {
        let p = self
            .cfg
            .sys("class/infiniband_verbs")
            .join(uverbs)
            .join("ibdev");
        super::read_attr(&p).filter(|s| !s.is_empty() && s.len() <= 64)
    }

    fn resources_of(&self, h: &Holds) -> Vec<String> {
        let mut r: Vec<String> = h.gpus.iter().map(|g| format!("gpu-{g}")).collect();
        for u in &h.uverbs {
            if let Some(ib) = self.ib_of_uverbs(u)
                && !r.contains(&ib)
            {
                r.push(ib);
            }
        }
        r.extend(h.disks.iter().cloned());
        r.sort();
        r
    }

    /// The disk holding most of the process's open regular files.
    fn disk_of_files(&mut self, pid: u32, files: usize) -> Option<String> {
        if files == 0 {
            return None;
        }
        let mut by_dev: HashMap<(u32, u32), usize> = HashMap::new();
        let dir = self.cfg.procfs.join(pid.to_string()).join("fd");
        let rd = std::fs::read_dir(&dir).ok()?;
        for e in rd.filter_map(|e| e.ok()).take(self.cfg.max_fds_per_process) {
            if by_dev.values().sum::<usize>() >= MAX_STAT_FDS {
                break;
            }
            let Ok(m) = std::fs::metadata(e.path()) else {
                continue;
            };
            if m.is_file() {
                let dev = m.dev();
                let (maj, min) = (libc_major(dev), libc_minor(dev));
                *by_dev.entry((maj, min)).or_default() += 1;
            }
        }
        let (&(maj, min), _) = by_dev
            .iter()
            .max_by_key(|(k, n)| (**n, std::cmp::Reverse(**k)))?;
        let path = self.cfg.proc("diskstats");
        read_into(&path, &mut self.buf).ok()?;
        let (disks, _) = super::block::parse_diskstats(&self.buf);
        disks
            .iter()
            .find(|d| d.major == maj && d.minor == min)
            .map(|d| disk_of(&d.device).to_owned())
    }

    fn infer_wait(&mut self, pid: u32, t: &Tracked, io_progress: bool) -> Option<String> {
        let wchan = super::read_attr(&self.cfg.procfs.join(pid.to_string()).join("wchan"))
            .unwrap_or_default();
        let class = classify_wchan(&wchan);
        let gpu = t.resources.iter().find(|r| r.starts_with("gpu-")).cloned();
        let ib = t
            .resources
            .iter()
            .find(|r| !r.starts_with("gpu-") && !t.holds.disks.contains(r))
            .cloned();
        let disk = t.holds.disks.first().cloned();
        match class {
            WaitClass::Gpu => gpu,
            WaitClass::Rdma => ib,
            WaitClass::Block => disk.or_else(|| self.disk_of_files(pid, t.holds.files.len())),
            WaitClass::Unknown if io_progress => {
                disk.or_else(|| self.disk_of_files(pid, t.holds.files.len()))
            }
            WaitClass::Network | WaitClass::Unknown => None,
        }
    }

    /// The exit event of a tracked process; `None` when it never was in the graph.
    fn exit_event(&mut self, now: i64, pid: u32, t: &Tracked, why: &str) -> Option<Event> {
        self.exits_total += 1;
        for r in t.sent.keys() {
            self.refresh.forget(&(pid, r.clone()));
        }
        let entity = t
            .resources
            .first()
            .cloned()
            .unwrap_or_else(|| format!("pid-{pid}"));
        let pod = t.cgroup.as_ref().and_then(|c| self.pods.resolve(c));
        (!t.sent.is_empty())
            .then(|| state_event(now, pid, &entity, format!("exited ({why})"), pod.as_ref()))
    }
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

fn state_event(now: i64, pid: u32, entity: &str, value: String, pod: Option<&PodRef>) -> Event {
    Event {
        ts: now,
        event_type: EventType::ProcessState,
        entity_id: entity.to_owned(),
        job_id: pod.and_then(|p| p.job.clone()),
        pid: Some(pid),
        value,
        node_id: None,
        pod: pod.and_then(|p| p.name.clone()),
        namespace: pod.and_then(|p| p.namespace.clone()),
    }
}

/// `pod`, `namespace`, `container` label values ("" when unknown).
fn pod_labels(p: Option<&PodRef>) -> [String; 3] {
    [
        p.and_then(|p| p.name.clone()).unwrap_or_default(),
        p.and_then(|p| p.namespace.clone()).unwrap_or_default(),
        p.and_then(|p| p.container.clone()).unwrap_or_default(),
    ]
}

impl HostSource for ProcessCollector {
    fn poll(&mut self, now: i64) -> Result<PollOutput, PollError> {
        let mut out = PollOutput::default();
        let procfs = self.cfg.procfs.clone();
        // Listing /proc is most of this collector's cost on a busy host. No pid allocated since
        // the last listing (`/proc/loadavg`'s last field, trusted only when `procfs` is our own
        // pid namespace) means no new process: the cached list serves, gone pids just fail
        // their `stat`. It is listed again at least every `reclassify_after`.
        let last_pid = self.last_pid();
        let fresh = last_pid.is_some()
            && last_pid == self.listing.last_pid
            && now - self.listing.at < self.cfg.reclassify_after.0.max(1)
            && !self.listing.pids.is_empty();
        if !fresh {
            let rd = std::fs::read_dir(&procfs).map_err(|source| crate::Error::Io {
                path: procfs.clone(),
                source,
            })?;
            let mut listed: Vec<u32> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            listed.sort_unstable();
            self.listing = Listing {
                pids: listed,
                last_pid,
                at: now,
            };
        }
        let mut pids = self.listing.pids.clone();
        if pids.is_empty() {
            return Err(PollError::Absent {
                path: procfs,
                what: "procfs without processes",
            });
        }
        let complete = pids.len() <= self.cfg.max_processes_scanned;
        if !complete {
            // A rotating window, so every pid is reached over successive polls.
            let n = self.cfg.max_processes_scanned;
            let start = self.cursor % pids.len();
            pids.rotate_left(start);
            pids.truncate(n);
            self.cursor = start + n;
            pids.sort_unstable();
        }

        // 1. Tracked processes: state, exits, pid reuse.
        let tracked_pids: Vec<u32> = self.tracked.keys().copied().collect();
        for pid in tracked_pids {
            let st = self.read_stat(pid);
            let Some(mut t) = self.tracked.remove(&pid) else {
                continue;
            };
            match st {
                None => {
                    let ev = self.exit_event(now, pid, &t, "gone");
                    out.events.extend(ev);
                    self.known.remove(&pid);
                }
                Some(s) if s.start != t.start => {
                    let ev = self.exit_event(now, pid, &t, "pid reused");
                    out.events.extend(ev);
                    self.known.remove(&pid);
                }
                Some(s) if matches!(s.state, 'Z' | 'X') => {
                    let ev = self.exit_event(now, pid, &t, "zombie");
                    out.events.extend(ev);
                    // Known (same start): not classified again until it is reaped.
                }
                Some(s) => {
                    t.state = s.state;
                    t.comm = s.comm;
                    self.tracked.insert(pid, t);
                }
            }
        }

        // 2. New processes (or due for another look): classify a bounded batch.
        let mut budget = self.cfg.fd_scan_processes_per_poll;
        let reclass = self.cfg.reclassify_after.0.max(1);
        for &pid in &pids {
            if budget == 0 {
                break;
            }
            if self.tracked.contains_key(&pid) {
                continue;
            }
            if let Some(k) = self.known.get(&pid)
                && now - k.classified_at < reclass
            {
                continue;
            }
            let Some(st) = self.read_stat(pid) else {
                continue;
            };
            if st.flags & PF_KTHREAD != 0 {
                self.known.insert(
                    pid,
                    Known {
                        start: st.start,
                        classified_at: i64::MAX / 2,
                    },
                );
                continue;
            }
            if self.known.get(&pid).is_some_and(|k| k.start != st.start) {
                self.known.remove(&pid);
            }
            budget -= 1;
            let holds = self.read_holds(pid);
            if self.known.len() < self.cfg.max_processes_scanned {
                self.known.insert(
                    pid,
                    Known {
                        start: st.start,
                        classified_at: now,
                    },
                );
            }
            if !holds.interesting() || matches!(st.state, 'Z' | 'X') {
                continue;
            }
            let cg_path = procfs.join(pid.to_string()).join("cgroup");
            let cgroup = match read_into(&cg_path, &mut self.buf) {
                Ok(()) => parse_cgroup(&self.buf),
                Err(_) => None,
            };
            if let Some(c) = &cgroup
                && c.v2
                && c.pod_uid.is_some()
                && let Some(id) = self.pods.cgroup_id_of(&c.path)
            {
                self.pods.record_cgroup(id, c);
            }
            let in_pod = cgroup.as_ref().is_some_and(|c| c.pod_uid.is_some());
            let rank = holds.rank(in_pod);
            if self.tracked.len() >= self.cfg.max_processes_tracked {
                // Full: replace the least important tracked process if this one ranks higher.
                let worst = self
                    .tracked
                    .iter()
                    .max_by_key(|(p, t)| (t.rank, **p))
                    .map(|(p, t)| (*p, t.rank));
                match worst {
                    Some((wp, wr)) if wr > rank => {
                        if let Some(t) = self.tracked.remove(&wp) {
                            for r in t.sent.keys() {
                                self.refresh.forget(&(wp, r.clone()));
                            }
                        }
                    }
                    _ => continue,
                }
            }
            let resources = self.resources_of(&holds);
            self.tracked.insert(
                pid,
                Tracked {
                    start: st.start,
                    comm: st.comm,
                    state: st.state,
                    rank,
                    holds,
                    cgroup,
                    resources,
                    waits_on: None,
                    sent: BTreeMap::new(),
                    last_io: None,
                },
            );
        }
        // A spent budget leaves processes to classify: the next poll should not wait long.
        out.more = budget == 0;
        if complete {
            let live: std::collections::HashSet<u32> = pids.iter().copied().collect();
            self.known.retain(|p, _| live.contains(p));
        } else if self.known.len() >= self.cfg.max_processes_scanned {
            self.known.clear();
        }

        // 3. Waits and events.
        let tracked_pids: Vec<u32> = self.tracked.keys().copied().collect();
        let mut info = Vec::new();
        let mut unint = Vec::new();
        let mut holds_rows = Vec::new();
        let mut waits_rows = Vec::new();
        for pid in tracked_pids {
            let Some(mut t) = self.tracked.remove(&pid) else {
                continue;
            };
            // I/O progress only matters to a D-state process: its io file is read only then
            // (two D polls in a row tell progress), not for every tracked process every poll.
            let io = if t.state == 'D' {
                let p = procfs.join(pid.to_string()).join("io");
                match read_into(&p, &mut self.buf) {
                    Ok(()) => parse_io(&self.buf),
                    Err(_) => None,
                }
            } else {
                None
            };
            let io_progress = matches!((t.last_io, io), (Some(a), Some(b)) if b > a);
            t.last_io = io;
            t.waits_on = if t.state == 'D' {
                self.infer_wait(pid, &t, io_progress)
            } else {
                None
            };
            let pod = t.cgroup.as_ref().and_then(|c| self.pods.resolve(c));
            // Desired (entity → state) this poll.
            let mut want: BTreeMap<String, char> = BTreeMap::new();
            let calm = if t.state == 'D' { 'S' } else { t.state };
            for r in &t.resources {
                want.insert(r.clone(), calm);
            }
            if let Some(w) = &t.waits_on {
                want.insert(w.clone(), 'D');
            }
            // A process holding only sockets goes into the graph (its own node) when it is a pod's;
            // host daemons with sockets are metrics only, or the graph fills with sshd & co.
            if want.is_empty() && t.cgroup.as_ref().is_some_and(|c| c.pod_uid.is_some()) {
                want.insert(format!("pid-{pid}"), t.state);
            }
            for (entity, st) in &want {
                let changed = t.sent.get(entity) != Some(st);
                let key = (pid, entity.clone());
                if changed {
                    self.refresh.forget(&key);
                }
                if self.refresh.due(&key, now) {
                    out.events
                        .push(state_event(now, pid, entity, st.to_string(), pod.as_ref()));
                }
            }
            // A wait that ended on a resource it does not hold: say so, then forget it.
            for (entity, st) in &t.sent {
                if *st == 'D' && !want.contains_key(entity) {
                    out.events.push(state_event(
                        now,
                        pid,
                        entity,
                        t.state.to_string(),
                        pod.as_ref(),
                    ));
                    self.refresh.forget(&(pid, entity.clone()));
                }
            }
            t.sent = want;
            let [pn, ns, ct] = pod_labels(pod.as_ref());
            let base = |extra: Option<(&'static str, String)>| {
                let mut v = vec![
                    ("pid", pid.to_string()),
                    ("pod", pn.clone()),
                    ("namespace", ns.clone()),
                    ("container", ct.clone()),
                ];
                v.extend(extra);
                v
            };
            let mut l = base(Some(("comm", t.comm.clone())));
            l.push((
                "pod_uid",
                pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default(),
            ));
            info.push((l, 1.0));
            unint.push((base(None), f64::from(u8::from(t.state == 'D'))));
            for r in &t.resources {
                holds_rows.push((base(Some(("resource", r.clone()))), 1.0));
            }
            if t.holds.sockets > 0 {
                holds_rows.push((base(Some(("resource", "socket".to_owned()))), 1.0));
            }
            if let Some(w) = &t.waits_on {
                waits_rows.push((base(Some(("resource", w.clone()))), 1.0));
            }
            self.tracked.insert(pid, t);
        }
        let n = self.tracked.len();
        out.families = vec![
            family(
                "ark_process_info",
                "A tracked process (holds a GPU, an RDMA device or a socket), with its pod.",
                MetricType::GAUGE,
                info,
            ),
            family(
                "ark_process_uninterruptible",
                "1 while the process is in uninterruptible sleep (D state).",
                MetricType::GAUGE,
                unint,
            ),
            family(
                "ark_process_holds",
                "1 per device (gpu-<n>, RDMA device, disk) or `socket` the process has open.",
                MetricType::GAUGE,
                holds_rows,
            ),
            family(
                "ark_process_waits_on",
                "1 for the device a D-state process is inferred to wait on.",
                MetricType::GAUGE,
                waits_rows,
            ),
            family(
                "ark_processes_tracked",
                "Processes tracked by the process collector.",
                MetricType::GAUGE,
                [(Vec::new(), n as f64)],
            ),
            family(
                "ark_process_exits_total",
                "Tracked processes seen exiting.",
                MetricType::COUNTER,
                [(Vec::new(), self.exits_total as f64)],
            ),
        ];
        Ok(out)
    }
}

impl ProcessCollector {
    /// How many processes are tracked (tests, benchmark).
    pub fn tracked_count(&self) -> usize {
        self.tracked.len()
    }
}
