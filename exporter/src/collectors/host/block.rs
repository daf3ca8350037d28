//! The `block` collector: `<procfs>/diskstats` → per-device I/O counters, time spent doing I/O
//! and requests in flight. Partitions and virtual devices (`loop`, `ram`, `zram`, `fd`, `sr`)
//! are left out: the whole disk is the resource a process waits on.
//!
//! Metrics: `ark_block_{reads,writes}_completed_total`, `ark_block_{read,written}_bytes_total`,
//! `ark_block_{read,write}_time_seconds_total`, `ark_block_io_time_seconds_total`,
//! `ark_block_io_weighted_time_seconds_total`, `ark_block_io_in_flight` (all `{device}`).
//! Events (entity: the device name, `nvme0n1`): `storage.qdepth` = requests in flight (while
//! non-zero, and once when it drops to zero); `storage.iops` = completed I/Os per second since the
//! last poll (while non-zero). A counter that goes down (reset) gives no rate for that poll.

use std::collections::HashMap;

use prometheus::proto::MetricType;

use super::{
    CounterTracker, HostConfig, HostSource, PollError, PollOutput, Rows, event, is_absent,
    read_into,
};
use crate::event::EventType;
use crate::metrics::family;

/// One line of `/proc/diskstats` (the fields this collector uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskStats {
    pub major: u32,
    pub minor: u32,
    pub device: String,
    pub reads: u64,
    pub sectors_read: u64,
    pub read_ms: u64,
    pub writes: u64,
    pub sectors_written: u64,
    pub write_ms: u64,
    pub in_flight: u64,
    pub io_ms: u64,
    pub weighted_io_ms: u64,
}

/// Pure: parses `/proc/diskstats` (11, 15 or 17 counters per line); bad lines are returned.
pub fn parse_diskstats(text: &str) -> (Vec<DiskStats>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let nums: Option<Option<Vec<u64>>> = f
            .get(3..)
            .map(|r| r.iter().map(|x| x.parse().ok()).collect());
        let (Some(Ok(major)), Some(Ok(minor)), Some(name), Some(Some(n))) = (
            f.first().map(|x| x.parse::<u32>()),
            f.get(1).map(|x| x.parse::<u32>()),
            f.get(2),
            nums,
        ) else {
            bad.push(line.chars().take(120).collect());
            continue;
        };
        if n.len() < 11 || name.len() > 64 {
            bad.push(line.chars().take(120).collect());
            continue;
        }
        out.push(DiskStats {
            major,
            minor,
            device: (*name).to_owned(),
            reads: n[0],
            sectors_read: n[2],
            read_ms: n[3],
            writes: n[4],
            sectors_written: n[6],
            write_ms: n[7],
            in_flight: n[8],
            io_ms: n[9],
            weighted_io_ms: n[10],
        });
    }
    (out, bad)
}

fn strip_digits(s: &str) -> (&str, &str) {
    let cut = s.trim_end_matches(|c: char| c.is_ascii_digit());
    (cut, &s[cut.len()..])
}

/// Pure: true for partitions and virtual devices that are not a workload's disk.
pub fn is_ignored_device(name: &str) -> bool {
    let (stem, digits) = strip_digits(name);
    if matches!(stem, "loop" | "ram" | "zram" | "fd" | "sr") && !digits.is_empty() {
        return true;
    }
    // nvme0n1p1, mmcblk0p1: a `p<digits>` suffix after a digit.
    if !digits.is_empty()
        && let Some(before) = stem.strip_suffix('p')
        && before.ends_with(|c: char| c.is_ascii_digit())
        && (before.starts_with("nvme") || before.starts_with("mmcblk"))
    {
        return true;
    }
    // sda1, vdb2, xvda1, hda1.
    if !digits.is_empty() {
        for prefix in ["sd", "vd", "xvd", "hd"] {
            if let Some(letters) = stem.strip_prefix(prefix)
                && !letters.is_empty()
                && letters.chars().all(|c| c.is_ascii_lowercase())
            {
                return true;
            }
        }
    }
    false
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ctr {
    Reads,
    Writes,
}

/// See the module docs.
pub struct BlockCollector {
    cfg: HostConfig,
    buf: String,
    counters: CounterTracker<(String, Ctr)>,
    in_flight: HashMap<String, u64>,
    last_poll: Option<i64>,
}

impl BlockCollector {
    pub fn new(cfg: &HostConfig) -> Self {
        BlockCollector {
            cfg: cfg.clone(),
            buf: String::new(),
            counters: CounterTracker::new(cfg.max_devices * 2),
            in_flight: HashMap::new(),
            last_poll: None,
        }
    }
}

impl HostSource for BlockCollector {
    fn poll(&mut self, now: i64) -> Result<PollOutput, PollError> {
        let path = self.cfg.proc("diskstats");
        if let Err(e) = read_into(&path, &mut self.buf) {
            return Err(if is_absent(&e) {
                PollError::Absent {
                    path,
                    what: "no block device statistics",
                }
            } else {
                e.into()
            });
        }
        let (mut disks, bad_input) = parse_diskstats(&self.buf);
        disks.retain(|d| !is_ignored_device(&d.device));
        disks.sort_by(|a, b| a.device.cmp(&b.device));
        disks.dedup_by(|a, b| a.device == b.device);
        disks.truncate(self.cfg.max_devices);
        let dt_s = self
            .last_poll
            .map(|t| (now - t) as f64 / 1000.0)
            .filter(|d| *d > 0.0);
        self.last_poll = Some(now);
        let mut out = PollOutput {
            bad_input,
            ..PollOutput::default()
        };
        let mut rows: [Rows; 9] = Default::default();
        let mut flight = HashMap::new();
        for d in &disks {
            let l = || vec![("device", d.device.clone())];
            let vals = [
                d.reads as f64,
                d.writes as f64,
                d.sectors_read as f64 * 512.0,
                d.sectors_written as f64 * 512.0,
                d.read_ms as f64 / 1000.0,
                d.write_ms as f64 / 1000.0,
                d.io_ms as f64 / 1000.0,
                d.weighted_io_ms as f64 / 1000.0,
                d.in_flight as f64,
            ];
            for (r, v) in rows.iter_mut().zip(vals) {
                r.push((l(), v));
            }
            let r = self
                .counters
                .update(&(d.device.clone(), Ctr::Reads), d.reads);
            let w = self
                .counters
                .update(&(d.device.clone(), Ctr::Writes), d.writes);
            let ios = r.increase() + w.increase();
            if let Some(dt) = dt_s
                && ios > 0
            {
                let iops = (ios as f64 / dt).round();
                out.events.push(event(
                    now,
                    EventType::StorageIops,
                    &d.device,
                    format!("{iops}"),
                ));
            }
            let prev = self.in_flight.get(&d.device).copied().unwrap_or(0);
            if d.in_flight > 0 || prev > 0 {
                out.events.push(event(
                    now,
                    EventType::StorageQdepth,
                    &d.device,
                    d.in_flight.to_string(),
                ));
            }
            flight.insert(d.device.clone(), d.in_flight);
        }
        self.in_flight = flight;
        self.counters.sweep();
        let [
            reads,
            writes,
            rbytes,
            wbytes,
            rtime,
            wtime,
            io,
            weighted,
            inflight,
        ] = rows;
        out.families = vec![
            family(
                "ark_block_reads_completed_total",
                "Reads completed by a block device.",
                MetricType::COUNTER,
                reads,
            ),
            family(
                "ark_block_writes_completed_total",
                "Writes completed by a block device.",
                MetricType::COUNTER,
                writes,
            ),
            family(
                "ark_block_read_bytes_total",
                "Bytes read from a block device.",
                MetricType::COUNTER,
                rbytes,
            ),
            family(
                "ark_block_written_bytes_total",
                "Bytes written to a block device.",
                MetricType::COUNTER,
                wbytes,
            ),
            family(
                "ark_block_read_time_seconds_total",
                "Time spent by all reads of a block device.",
                MetricType::COUNTER,
                rtime,
            ),
            family(
                "ark_block_write_time_seconds_total",
                "Time spent by all writes of a block device.",
                MetricType::COUNTER,
                wtime,
            ),
            family(
                "ark_block_io_time_seconds_total",
                "Time a block device had I/O in flight (its busy time).",
                MetricType::COUNTER,
                io,
            ),
            family(
                "ark_block_io_weighted_time_seconds_total",
                "I/O time weighted by the number of requests in flight (queue pressure).",
                MetricType::COUNTER,
                weighted,
            ),
            family(
                "ark_block_io_in_flight",
                "I/O requests issued to the device and not yet completed.",
                MetricType::GAUGE,
                inflight,
            ),
        ];
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_kernel_layouts() {
        let text = "   8       0 sda 100 5 2000 30 200 7 4000 60 3 90 120\n\
                    259       0 nvme0n1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n\
                    259       1 nvme0n1p1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n\
                    garbage\n   8 1 sdz 1 2 3\n   x 1 sdy 1 2 3 4 5 6 7 8 9 10 11\n";
        let (d, bad) = parse_diskstats(text);
        assert_eq!(d.len(), 3);
        assert_eq!(bad.len(), 3);
        assert_eq!(d[0].device, "sda");
        assert_eq!((d[0].reads, d[0].writes, d[0].in_flight), (100, 200, 3));
        assert_eq!((d[0].io_ms, d[0].weighted_io_ms), (90, 120));
        assert_eq!(d[1].sectors_written, 7);
    }

    #[test]
    fn partitions_and_virtual_devices_are_ignored() {
        for n in [
            "sda1",
            "vdb12",
            "xvda1",
            "nvme0n1p1",
            "mmcblk0p2",
            "loop0",
            "ram3",
            "zram0",
            "sr0",
        ] {
            assert!(is_ignored_device(n), "{n}");
        }
        for n in [
            "sda", "vdb", "nvme0n1", "nvme10n2", "mmcblk0", "dm-0", "md0", "loop",
        ] {
            assert!(!is_ignored_device(n), "{n}");
        }
    }
}
