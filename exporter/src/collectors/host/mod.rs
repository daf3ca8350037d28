//! What the procfs/sysfs collectors (`netdev`, `infiniband`, `block`, `pressure`, `process`)
//! share: the `[host]` configuration (filesystem roots are the `--path.procfs` /
//! `--path.sysfs` flags), the [`HostSource`] trait each of them implements, the polling loop
//! that drives one source, counter-delta tracking that survives wraps and resets, and small
//! read helpers.
//!
//! A source's `poll` is synchronous and does plain file I/O under the configured roots only; the
//! loop runs it on the blocking pool so the async runtime never waits on a slow filesystem. A
//! poll returns whole metric families (published as the collector's snapshot) and events (sent
//! to the pipeline). `poll` never panics on input: unreadable or garbage files are skipped and
//! counted, and the collector's `up` says whether its files exist at all.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::proto::MetricFamily;
use serde::Deserialize;

mod bench;
pub mod block;
pub mod infiniband;
pub mod netdev;
pub mod pressure;
pub mod process;

pub use self::bench::{HostBenchArgs, HostSet, bench};

use super::{BoxFuture, Collector, CollectorContext, CollectorKind};
use crate::event::{Event, EventType};
use crate::pods::PodResolver;
use crate::ratelimit::LogLimiter;
use crate::rules::format::DurationSpec;

/// `[host]`: procfs/sysfs collectors and pod attribution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// procfs mount point (`--path.procfs`).
    pub procfs: PathBuf,
    /// sysfs mount point (`--path.sysfs`); the cgroup v2 tree is `<sysfs>/fs/cgroup`.
    pub sysfs: PathBuf,
    /// Poll interval of every host collector while something happens.
    pub interval: DurationSpec,
    /// While a collector's polls send no events (and leave no work for the next one), its
    /// interval doubles up to this; the first event brings it back to `interval`.
    pub idle_interval: DurationSpec,
    /// A condition that holds (port down, process attached to a device) is re-sent this often
    /// so its graph edge does not expire while it lasts.
    pub event_refresh: DurationSpec,
    /// Most devices (interfaces, IB ports, block devices) one collector exports.
    pub max_devices: usize,
    /// Most `/proc/<pid>` entries looked at per poll.
    pub max_processes_scanned: usize,
    /// Most processes tracked (state, exits, attribution) at once.
    pub max_processes_tracked: usize,
    /// Most processes whose open files are (re)classified per poll: classifying costs one
    /// `readlink` per open fd, so new processes are taken in batches.
    pub fd_scan_processes_per_poll: usize,
    /// Most fds read from one process.
    pub max_fds_per_process: usize,
    /// A classified process that holds nothing of interest is looked at again after this.
    pub reclassify_after: DurationSpec,
    /// Kubeconfig for the pod watch (`--kubeconfig`); else `KUBECONFIG`, `~/.kube/config` or the
    /// in-cluster service account. Without any, attribution stops at the pod UID.
    pub kubeconfig: Option<PathBuf>,
    /// Node whose pods are watched (`spec.nodeName`); `serve` fills it from `--node-name`.
    pub node_name: Option<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            procfs: PathBuf::from("/proc"),
            sysfs: PathBuf::from("/sys"),
            interval: DurationSpec(2_000),
            idle_interval: DurationSpec(8_000),
            event_refresh: DurationSpec(60_000),
            max_devices: 256,
            max_processes_scanned: 8_192,
            max_processes_tracked: 256,
            fd_scan_processes_per_poll: 32,
            max_fds_per_process: 4_096,
            reclassify_after: DurationSpec(60_000),
            kubeconfig: None,
            node_name: None,
        }
    }
}

impl HostConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval.0.max(10) as u64)
    }
    /// The idle interval, never below [`HostConfig::interval`].
    pub fn idle_interval(&self) -> Duration {
        Duration::from_millis(self.idle_interval.0.max(10) as u64).max(self.interval())
    }
    pub fn refresh_ms(&self) -> i64 {
        self.event_refresh.0.max(1)
    }
    /// `<procfs>/<rel>`.
    pub fn proc(&self, rel: &str) -> PathBuf {
        self.procfs.join(rel)
    }
    /// `<sysfs>/<rel>`.
    pub fn sys(&self, rel: &str) -> PathBuf {
        self.sysfs.join(rel)
    }
}

/// Rows of one metric family: (labels, value), as [`crate::metrics::family`] takes them.
pub type Rows = Vec<(Vec<(&'static str, String)>, f64)>;

/// What one poll produced.
#[derive(Debug, Default)]
pub struct PollOutput {
    pub families: Vec<MetricFamily>,
    pub events: Vec<Event>,
    /// Lines or files that could not be parsed this poll (logged rate-limited, counted).
    pub bad_input: Vec<String>,
    /// Work is left for the next poll (a batch budget ran out): poll again at the base interval.
    pub more: bool,
}

/// The next poll interval: back to `base` after a poll that sent events or left work, doubled
/// (up to `idle`) after a quiet one. Pure.
pub fn next_interval(current: Duration, base: Duration, idle: Duration, active: bool) -> Duration {
    if active {
        base
    } else {
        current.saturating_mul(2).clamp(base, idle.max(base))
    }
}

/// Why a poll produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The collector's files do not exist on this machine (no InfiniBand, no PSI, ...).
    #[error("{path} does not exist ({what})")]
    Absent { path: PathBuf, what: &'static str },
    /// Reading failed otherwise.
    #[error(transparent)]
    Read(#[from] crate::Error),
}

/// A procfs/sysfs collector's state between polls.
pub trait HostSource: Send + 'static {
    /// Reads the files and returns families and events. `now_ms` stamps the events.
    fn poll(&mut self, now_ms: i64) -> Result<PollOutput, PollError>;
}

/// Milliseconds since the epoch.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reads a whole (small) file into `buf`, replacing its content. Files under /proc and /sys are
/// generated on read; they are read in one go into a reused buffer.
pub fn read_into(path: &Path, buf: &mut String) -> crate::Result<()> {
    buf.clear();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(buf))
        .map(|_| ())
        .map_err(|source| crate::Error::Io {
            path: path.to_owned(),
            source,
        })
}

/// Reads a one-line sysfs attribute, trimmed; `None` when missing or unreadable.
pub fn read_attr(path: &Path) -> Option<String> {
    let mut s = String::new();
    read_into(path, &mut s).ok()?;
    let t = s.trim();
    Some(if t.len() == s.len() { s } else { t.to_owned() })
}

/// Parses a sysfs counter attribute: a decimal u64 (garbage → `None`).
pub fn parse_counter(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// True when the error means "not there".
pub fn is_absent(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Largest delta accepted as a 32-bit wrap: a u32 counter that went from near `u32::MAX` to a
/// small value wrapped; anything else that went down was reset.
const WRAP_WINDOW: u64 = 1 << 30;

/// What happened to a counter between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// First reading: a baseline, never an event (errors since boot are not new errors).
    First,
    /// The counter grew (possibly across a 32-bit wrap) by this much.
    Grew(u64),
    /// The counter went down (driver reload, reset): new baseline, no delta.
    Reset,
}

impl Delta {
    /// The increase to act on: 0 for a baseline or a reset.
    pub fn increase(self) -> u64 {
        match self {
            Delta::Grew(d) => d,
            Delta::First | Delta::Reset => 0,
        }
    }
}

/// Pure: the change from `prev` to `cur`.
pub fn counter_delta(prev: Option<u64>, cur: u64) -> Delta {
    match prev {
        None => Delta::First,
        Some(p) if cur >= p => Delta::Grew(cur - p),
        Some(p) if p <= u64::from(u32::MAX) && p > u64::from(u32::MAX) - WRAP_WINDOW => {
            let d = (u64::from(u32::MAX) - p) + cur + 1;
            if d <= WRAP_WINDOW {
                Delta::Grew(d)
            } else {
                Delta::Reset
            }
        }
        Some(_) => Delta::Reset,
    }
}

/// Last readings of counters by key, bounded: keys not seen in a poll are forgotten at the next
/// [`CounterTracker::sweep`], and at most `cap` keys are kept.
#[derive(Debug)]
pub struct CounterTracker<K> {
    last: HashMap<K, (u64, u32)>,
    epoch: u32,
    cap: usize,
    /// Resets seen since start (exported as `ark_host_counter_resets_total`).
    pub resets: u64,
}

impl<K: Hash + Eq + Clone> CounterTracker<K> {
    pub fn new(cap: usize) -> Self {
        CounterTracker {
            last: HashMap::new(),
            epoch: 0,
            cap: cap.max(1),
            resets: 0,
        }
    }

    /// Records `cur` for `key` and returns what changed.
    pub fn update(&mut self, key: &K, cur: u64) -> Delta {
        let epoch = self.epoch;
        match self.last.get_mut(key) {
            Some(slot) => {
                let d = counter_delta(Some(slot.0), cur);
                *slot = (cur, epoch);
                if d == Delta::Reset {
                    self.resets += 1;
                }
                d
            }
            None => {
                if self.last.len() < self.cap {
                    self.last.insert(key.clone(), (cur, epoch));
                }
                Delta::First
            }
        }
    }

    /// Ends a poll: forgets keys not updated during it.
    pub fn sweep(&mut self) {
        let epoch = self.epoch;
        self.last.retain(|_, (_, e)| *e == epoch);
        self.epoch = self.epoch.wrapping_add(1);
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Builds an event of a host collector.
pub fn event(ts: i64, t: EventType, entity: &str, value: String) -> Event {
    Event::new(ts, t, entity.to_owned(), None, value)
}

/// Limits conditions re-sent while they hold: `due(key, now)` is true on the first call and
/// then once per `refresh_ms`.
#[derive(Debug)]
pub struct Refresh<K> {
    last: HashMap<K, i64>,
    refresh_ms: i64,
    cap: usize,
}

impl<K: Hash + Eq + Clone> Refresh<K> {
    pub fn new(refresh_ms: i64, cap: usize) -> Self {
        Refresh {
            last: HashMap::new(),
            refresh_ms,
            cap: cap.max(1),
        }
    }
    pub fn due(&mut self, key: &K, now: i64) -> bool {
        match self.last.get_mut(key) {
            Some(t) if now - *t < self.refresh_ms => false,
            Some(t) => {
                *t = now;
                true
            }
            None => {
                if self.last.len() >= self.cap {
                    // Bounded: forget everything rather than grow; worst case one early resend.
                    self.last.clear();
                }
                self.last.insert(key.clone(), now);
                true
            }
        }
    }
    pub fn forget(&mut self, key: &K) {
        self.last.remove(key);
    }
}

impl HostSource for Box<dyn HostSource> {
    fn poll(&mut self, now_ms: i64) -> Result<PollOutput, PollError> {
        (**self).poll(now_ms)
    }
}

/// The host source of `kind` over the `[host]` configuration; `None` for kinds that are not
/// procfs/sysfs collectors. The one list of host collectors: the service
/// ([`CollectorKind::build`]), the golden test and `ark-exporter bench host` ([`HostSet`]) all
/// build them here.
pub fn source(
    kind: CollectorKind,
    cfg: &HostConfig,
    pods: &PodResolver,
) -> Option<Box<dyn HostSource>> {
    Some(match kind {
        CollectorKind::Netdev => Box::new(netdev::NetdevCollector::new(cfg)),
        CollectorKind::Infiniband => Box::new(infiniband::InfinibandCollector::new(cfg)),
        CollectorKind::Block => Box::new(block::BlockCollector::new(cfg)),
        CollectorKind::Pressure => Box::new(pressure::PressureCollector::new(cfg)),
        CollectorKind::Process => Box::new(process::ProcessCollector::new(cfg, pods.clone())),
        CollectorKind::Probe
        | CollectorKind::Ebpf
        | CollectorKind::Nvml
        | CollectorKind::Pods
        | CollectorKind::Kmsg => {
            return None;
        }
    })
}

/// A host source as a [`Collector`]: the one wrapper behind every procfs/sysfs match arm.
pub struct HostCollector {
    kind: CollectorKind,
    host: HostConfig,
    log_interval: Duration,
}

/// The `CollectorKind::build` arm of a host collector.
pub fn collector(
    kind: CollectorKind,
    cfg: &HostConfig,
    log_interval: Duration,
) -> Box<dyn Collector> {
    Box::new(HostCollector {
        kind,
        host: cfg.clone(),
        log_interval,
    })
}

impl Collector for HostCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        let Some(source) = source(self.kind, &self.host, &ctx.pods) else {
            tracing::error!(collector = self.kind.name(), "Not a host collector");
            return Box::pin(async {});
        };
        run_source(
            self.kind.name(),
            source,
            (self.host.interval(), self.host.idle_interval()),
            self.log_interval,
            ctx,
        )
    }
}

/// Runs `source` until shutdown, every `base` interval while it sends events and up to every
/// `idle` while it is quiet ([`next_interval`]; a collector whose files are absent is polled at
/// `idle`): publishes its families under `name`, sends its events, and keeps `ark_collector_up`
/// / `ark_collector_duration_seconds` current. A collector whose files are absent logs that once
/// (one clear line) and reports `up 0`.
pub fn run_source<S: HostSource>(
    name: &'static str,
    source: S,
    (base, idle): (Duration, Duration),
    log_interval: Duration,
    mut ctx: CollectorContext,
) -> BoxFuture {
    Box::pin(async move {
        let mut source = Some(source);
        let mut absent_logged = false;
        let mut fail_log = LogLimiter::new(log_interval);
        let mut bad_log = LogLimiter::new(log_interval);
        let mut was_down = false;
        let mut interval = base;
        loop {
            if *ctx.shutdown.borrow() {
                return;
            }
            let Some(mut s) = source.take() else { return };
            let t0 = Instant::now();
            let joined = tokio::task::spawn_blocking(move || {
                let r = s.poll(wall_ms());
                (s, r)
            })
            .await;
            let (s, result) = match joined {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(collector = name, error = %e, "Collector poll panicked; collector stopped");
                    ctx.status.set_up(false);
                    return;
                }
            };
            source = Some(s);
            ctx.status.set_duration(t0.elapsed().as_secs_f64());
            match result {
                Ok(out) => {
                    if was_down {
                        tracing::info!(collector = name, "Collector reads its files again");
                        was_down = false;
                    }
                    absent_logged = false;
                    interval =
                        next_interval(interval, base, idle, !out.events.is_empty() || out.more);
                    ctx.status.set_up(true);
                    ctx.telemetry.snapshots.publish(name, out.families);
                    for ev in out.events {
                        ctx.events.send(ev);
                    }
                    if let Some(first) = out.bad_input.first()
                        && let Some(suppressed) = bad_log.allow(Instant::now())
                    {
                        tracing::warn!(collector = name, count = out.bad_input.len(), example = %first, suppressed, "Unparsable host input skipped");
                    }
                }
                Err(PollError::Absent { path, what }) => {
                    interval = idle;
                    ctx.status.set_up(false);
                    ctx.telemetry.snapshots.publish(name, Vec::new());
                    if !absent_logged {
                        tracing::info!(collector = name, path = %path.display(), "Collector has nothing to read on this machine ({what}); reporting ark_collector_up 0");
                        absent_logged = true;
                    }
                    was_down = false;
                }
                Err(PollError::Read(e)) => {
                    interval = base;
                    ctx.status.set_up(false);
                    ctx.telemetry.snapshots.publish(name, Vec::new());
                    was_down = true;
                    if let Some(suppressed) = fail_log.allow(Instant::now()) {
                        tracing::warn!(collector = name, error = %e, cause = ?std::error::Error::source(&e), suppressed, "Collector poll failed");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = ctx.shutdown.changed() => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_wraps_and_resets() {
        assert_eq!(counter_delta(None, 5), Delta::First);
        assert_eq!(counter_delta(Some(5), 9), Delta::Grew(4));
        assert_eq!(counter_delta(Some(5), 5), Delta::Grew(0));
        // u32 wrap: MAX-1 → 2 is 4 increments.
        assert_eq!(
            counter_delta(Some(u64::from(u32::MAX) - 1), 2),
            Delta::Grew(4)
        );
        // A reset of a small counter is never a negative or huge delta.
        assert_eq!(counter_delta(Some(1000), 3), Delta::Reset);
        assert_eq!(counter_delta(Some(u64::MAX), 0), Delta::Reset);
        // Near the u32 top but landing high: a reset, not a 3-billion burst.
        assert_eq!(
            counter_delta(Some(u64::from(u32::MAX) - 10), 3_000_000_000),
            Delta::Reset
        );
        assert_eq!(Delta::Reset.increase(), 0);
        assert_eq!(Delta::First.increase(), 0);
    }

    #[test]
    fn tracker_is_bounded_and_forgets() {
        let mut t = CounterTracker::new(2);
        assert_eq!(t.update(&"a", 1), Delta::First);
        assert_eq!(t.update(&"b", 1), Delta::First);
        assert_eq!(t.update(&"c", 1), Delta::First);
        assert_eq!(t.len(), 2);
        t.sweep();
        assert_eq!(t.update(&"a", 3), Delta::Grew(2));
        t.sweep();
        assert_eq!(t.len(), 1);
        assert_eq!(t.update(&"a", 1), Delta::Reset);
        assert_eq!(t.resets, 1);
    }

    #[test]
    fn one_list_of_host_collectors() {
        let cfg = HostConfig::default();
        let pods = PodResolver::new(Path::new("/nonexistent"));
        let host: Vec<_> = CollectorKind::ALL
            .iter()
            .copied()
            .filter(|&k| source(k, &cfg, &pods).is_some())
            .collect();
        assert_eq!(
            host,
            [
                CollectorKind::Netdev,
                CollectorKind::Infiniband,
                CollectorKind::Block,
                CollectorKind::Pressure,
                CollectorKind::Process,
            ]
        );
        // The test/bench set is exactly that list, in that order.
        assert_eq!(HostSet::new(&cfg, &pods).kinds(), host);
    }

    #[test]
    fn interval_backs_off_while_quiet_and_snaps_back() {
        let s = Duration::from_secs;
        let (base, idle) = (s(2), s(8));
        let mut i = base;
        let mut seen = Vec::new();
        for _ in 0..4 {
            i = next_interval(i, base, idle, false);
            seen.push(i.as_secs());
        }
        assert_eq!(seen, [4, 8, 8, 8]);
        assert_eq!(next_interval(i, base, idle, true), base);
        // An idle interval configured below the base never speeds polling up.
        assert_eq!(next_interval(base, base, s(1), false), base);
    }

    #[test]
    fn refresh_limits_resends() {
        let mut r = Refresh::new(1000, 4);
        assert!(r.due(&1, 0));
        assert!(!r.due(&1, 999));
        assert!(r.due(&1, 1000));
        r.forget(&1);
        assert!(r.due(&1, 1001));
    }
}
