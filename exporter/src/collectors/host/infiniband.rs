//! The `infiniband` collector: `<sysfs>/class/infiniband/<dev>/ports/<n>/` — `state`,
//! `phys_state`, `rate`, `counters/*` and `hw_counters/*` (RoCE congestion and transport
//! counters such as `np_cnp_sent`, `rp_cnp_handled`, `out_of_sequence`, where the driver has
//! them). Entity id of a port: the device name for port 1 (`mlx5_0`), `<dev>:<port>` for others.
//!
//! Events: a port leaving ACTIVE → `topo.link_down` (re-sent while it lasts; also at first sight
//! unless the port is administratively `Disabled`), back to ACTIVE → clearing `topo.link_down`
//! `up`; link/symbol/receive error counters or RoCE timeout/RNR counters rising → `error.net`;
//! `out_of_sequence` rising (RoCE packet loss) → `transport.drop` with the count. First readings
//! are baselines and resets give no delta (see [`super::host::counter_delta`]).

use std::collections::HashMap;
use std::path::Path;

use prometheus::proto::{MetricFamily, MetricType};

use super::{
    CounterTracker, HostConfig, HostSource, PollError, PollOutput, Refresh, Rows, event,
    parse_counter, read_attr,
};
use crate::event::EventType;
use crate::metrics::family;

/// Port counters with their own family: (file, family, help, scale).
const PORT_COUNTERS: &[(&str, &str, &str, f64)] = &[
    (
        "link_downed",
        "ark_ib_link_downed_total",
        "Times the port's link went down (link error recovery failed).",
        1.0,
    ),
    (
        "symbol_error",
        "ark_ib_symbol_errors_total",
        "Minor link errors detected on a physical lane.",
        1.0,
    ),
    (
        "port_rcv_errors",
        "ark_ib_port_rcv_errors_total",
        "Packets with errors received on the port.",
        1.0,
    ),
    (
        "port_xmit_wait",
        "ark_ib_port_xmit_wait_total",
        "Ticks during which the port had data to send but no flow-control credits (congestion).",
        1.0,
    ),
    (
        "port_xmit_discards",
        "ark_ib_port_xmit_discards_total",
        "Outbound packets discarded by the port (down or congested).",
        1.0,
    ),
    (
        "link_error_recovery",
        "ark_ib_link_error_recovery_total",
        "Successful link error recoveries (retrains).",
        1.0,
    ),
    (
        "port_rcv_data",
        "ark_ib_port_receive_bytes_total",
        "Bytes received on the port (the kernel counts 4-byte words).",
        4.0,
    ),
    (
        "port_xmit_data",
        "ark_ib_port_transmit_bytes_total",
        "Bytes transmitted on the port (the kernel counts 4-byte words).",
        4.0,
    ),
    (
        "port_rcv_packets",
        "ark_ib_port_receive_packets_total",
        "Packets received on the port.",
        1.0,
    ),
    (
        "port_xmit_packets",
        "ark_ib_port_transmit_packets_total",
        "Packets transmitted on the port.",
        1.0,
    ),
];

/// RoCE hw counters with their own family.
const HW_COUNTERS: &[(&str, &str, &str)] = &[
    (
        "np_cnp_sent",
        "ark_ib_np_cnp_sent_total",
        "RoCE congestion notification packets sent (this port saw ECN-marked traffic).",
    ),
    (
        "rp_cnp_handled",
        "ark_ib_rp_cnp_handled_total",
        "RoCE congestion notification packets handled (this port's sender was slowed down).",
    ),
    (
        "out_of_sequence",
        "ark_ib_out_of_sequence_total",
        "RoCE packets received out of sequence (packet loss on the fabric).",
    ),
    (
        "np_ecn_marked_roce_packets",
        "ark_ib_np_ecn_marked_roce_packets_total",
        "RoCE packets received with an ECN congestion mark.",
    ),
];

/// Counters whose rise is an `error.net` (with a word the rules match on).
const ERROR_COUNTERS: &[(&str, &str)] = &[
    ("link_downed", "link down"),
    ("symbol_error", "symbol errors"),
    ("port_rcv_errors", "receive errors"),
    ("link_error_recovery", "link retrain"),
    ("local_link_integrity_errors", "link integrity"),
    ("excessive_buffer_overrun_errors", "buffer overrun"),
    ("port_rcv_remote_physical_errors", "remote physical errors"),
    ("local_ack_timeout_err", "ack timeout"),
    ("rnr_nak_retry_err", "RNR retry exceeded"),
    ("packet_seq_err", "packet sequence errors"),
    ("implied_nak_seq_err", "implied NAK sequence errors"),
];

/// hw_counters entries that are settings, not counters.
const NOT_COUNTERS: &[&str] = &["lifespan"];

/// Most counter files read per port (each directory is bounded).
const MAX_COUNTERS_PER_DIR: usize = 96;

/// One port as read from sysfs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IbPort {
    pub device: String,
    pub port: String,
    /// Numeric part of `state` (`4: ACTIVE` → 4); `None` when missing or garbage.
    pub state: Option<u32>,
    pub state_text: String,
    pub phys_state: Option<u32>,
    pub phys_state_text: String,
    /// Bytes per second from `rate`.
    pub rate_bytes: Option<f64>,
    pub counters: Vec<(String, u64)>,
    pub hw_counters: Vec<(String, u64)>,
}

/// Pure: `"4: ACTIVE"` → `(4, "ACTIVE")`.
pub fn parse_state(s: &str) -> Option<(u32, String)> {
    let (n, text) = s.trim().split_once(':')?;
    Some((n.trim().parse().ok()?, text.trim().to_owned()))
}

/// Pure: `"100 Gb/sec (4X EDR)"` → bytes per second.
pub fn parse_rate(s: &str) -> Option<f64> {
    let mut it = s.split_ascii_whitespace();
    let v: f64 = it.next()?.parse().ok()?;
    let unit = it.next()?;
    let bits = match unit {
        "Gb/sec" => 1e9,
        "Mb/sec" => 1e6,
        _ => return None,
    };
    (v.is_finite() && v >= 0.0).then_some(v * bits / 8.0)
}

/// Reads the counter files of one directory (sorted, bounded); garbage files go to `bad`.
fn read_counter_dir(dir: &Path, bad: &mut Vec<String>) -> Vec<(String, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !NOT_COUNTERS.contains(&n.as_str()) && n.len() <= 64)
        .take(MAX_COUNTERS_PER_DIR)
        .collect();
    names.sort_unstable();
    names
        .into_iter()
        .filter_map(|n| {
            let v = read_attr(&dir.join(&n))?;
            match parse_counter(&v) {
                Some(c) => Some((n, c)),
                None => {
                    bad.push(format!("{}: {:?}", dir.join(&n).display(), truncate(&v)));
                    None
                }
            }
        })
        .collect()
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Reads one port directory.
pub fn read_port(dir: &Path, device: &str, port: &str, bad: &mut Vec<String>) -> IbPort {
    let state = read_attr(&dir.join("state")).map(|s| (parse_state(&s), s));
    let phys = read_attr(&dir.join("phys_state")).map(|s| (parse_state(&s), s));
    let mut p = IbPort {
        device: device.to_owned(),
        port: port.to_owned(),
        rate_bytes: read_attr(&dir.join("rate")).and_then(|r| parse_rate(&r)),
        counters: read_counter_dir(&dir.join("counters"), bad),
        hw_counters: read_counter_dir(&dir.join("hw_counters"), bad),
        ..IbPort::default()
    };
    if let Some((parsed, raw)) = state {
        match parsed {
            Some((n, t)) => (p.state, p.state_text) = (Some(n), t),
            None => bad.push(format!("{}/state: {:?}", dir.display(), truncate(&raw))),
        }
    }
    if let Some((parsed, raw)) = phys {
        match parsed {
            Some((n, t)) => (p.phys_state, p.phys_state_text) = (Some(n), t),
            None => bad.push(format!(
                "{}/phys_state: {:?}",
                dir.display(),
                truncate(&raw)
            )),
        }
    }
    p
}

/// `mlx5_0` for port 1, `mlx5_0:2` for the others.
pub fn port_entity(device: &str, port: &str) -> String {
    if port == "1" {
        device.to_owned()
    } else {
        format!("{device}:{port}")
    }
}

const ACTIVE: u32 = 4;
const PHYS_DISABLED: u32 = 3;

/// See the module docs.
pub struct InfinibandCollector {
    cfg: HostConfig,
    counters: CounterTracker<(String, String)>,
    /// entity → reported down.
    down: HashMap<String, bool>,
    refresh: Refresh<String>,
}

impl InfinibandCollector {
    pub fn new(cfg: &HostConfig) -> Self {
        InfinibandCollector {
            cfg: cfg.clone(),
            counters: CounterTracker::new(cfg.max_devices * 2 * MAX_COUNTERS_PER_DIR),
            down: HashMap::new(),
            refresh: Refresh::new(cfg.refresh_ms(), cfg.max_devices),
        }
    }

    fn ports(&self, bad: &mut Vec<String>) -> Result<Vec<IbPort>, PollError> {
        let root = self.cfg.sys("class/infiniband");
        let absent = || PollError::Absent {
            path: root.clone(),
            what: "no InfiniBand/RoCE devices",
        };
        let rd = std::fs::read_dir(&root).map_err(|_| absent())?;
        let mut devs: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .take(self.cfg.max_devices)
            .collect();
        if devs.is_empty() {
            return Err(absent());
        }
        devs.sort_unstable();
        let mut ports = Vec::new();
        'devs: for dev in devs {
            let pdir = root.join(&dev).join("ports");
            let Ok(rd) = std::fs::read_dir(&pdir) else {
                bad.push(format!("{}: unreadable", pdir.display()));
                continue;
            };
            let mut nums: Vec<(u32, String)> = rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| Some((n.parse().ok()?, n)))
                .take(self.cfg.max_devices)
                .collect();
            nums.sort_unstable();
            for (_, n) in nums {
                if ports.len() >= self.cfg.max_devices {
                    break 'devs;
                }
                ports.push(read_port(&pdir.join(&n), &dev, &n, bad));
            }
        }
        Ok(ports)
    }
}

impl HostSource for InfinibandCollector {
    fn poll(&mut self, now: i64) -> Result<PollOutput, PollError> {
        let mut out = PollOutput::default();
        let ports = self.ports(&mut out.bad_input)?;
        let mut fams: HashMap<&'static str, Rows> = HashMap::new();
        let mut other_port = Vec::new();
        let mut other_hw = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in &ports {
            let labels = || vec![("device", p.device.clone()), ("port", p.port.clone())];
            let entity = port_entity(&p.device, &p.port);
            seen.insert(entity.clone());
            if let Some(s) = p.state {
                fams.entry("up")
                    .or_default()
                    .push((labels(), f64::from(u8::from(s == ACTIVE))));
                fams.entry("state")
                    .or_default()
                    .push((labels(), f64::from(s)));
            }
            if let Some(s) = p.phys_state {
                fams.entry("phys")
                    .or_default()
                    .push((labels(), f64::from(s)));
            }
            if let Some(r) = p.rate_bytes {
                fams.entry("rate").or_default().push((labels(), r));
            }
            // Port state → topo.link_down.
            if let Some(s) = p.state {
                let reported = self.down.get(&entity).copied();
                if s == ACTIVE {
                    if reported == Some(true) {
                        self.refresh.forget(&entity);
                        out.events
                            .push(event(now, EventType::TopoLinkDown, &entity, "up".into()));
                    }
                    self.down.insert(entity.clone(), false);
                } else {
                    let admin_off = p.phys_state == Some(PHYS_DISABLED);
                    let report = reported == Some(true) || !admin_off;
                    if report && self.refresh.due(&entity, now) {
                        out.events.push(event(
                            now,
                            EventType::TopoLinkDown,
                            &entity,
                            format!(
                                "ib port state {} ({}), phys_state {}",
                                s,
                                p.state_text,
                                if p.phys_state_text.is_empty() {
                                    "unknown"
                                } else {
                                    &p.phys_state_text
                                }
                            ),
                        ));
                    }
                    self.down.insert(entity.clone(), report);
                }
            }
            // Counters → families and deltas.
            let mut errors = Vec::new();
            let mut seq_loss = 0;
            for (dir, list) in [("counters", &p.counters), ("hw_counters", &p.hw_counters)] {
                for (name, v) in list {
                    let inc = self
                        .counters
                        .update(&(entity.clone(), format!("{dir}/{name}")), *v)
                        .increase();
                    if inc > 0 {
                        if name == "out_of_sequence" {
                            seq_loss += inc;
                        } else if let Some((_, word)) =
                            ERROR_COUNTERS.iter().find(|(n, _)| n == name)
                        {
                            errors.push(format!("{name} +{inc} ({word})"));
                        }
                    }
                    let named = if dir == "counters" {
                        PORT_COUNTERS
                            .iter()
                            .find(|c| c.0 == name)
                            .map(|c| (c.1, *v as f64 * c.3))
                    } else {
                        HW_COUNTERS
                            .iter()
                            .find(|c| c.0 == name)
                            .map(|c| (c.1, *v as f64))
                    };
                    match named {
                        Some((fam, value)) => fams.entry(fam).or_default().push((labels(), value)),
                        None => {
                            let mut l = labels();
                            l.push(("counter", name.clone()));
                            if dir == "counters" {
                                other_port.push((l, *v as f64));
                            } else {
                                other_hw.push((l, *v as f64));
                            }
                        }
                    }
                }
            }
            if !errors.is_empty() {
                out.events.push(event(
                    now,
                    EventType::ErrorNet,
                    &entity,
                    format!("ib {}", errors.join(", ")),
                ));
            }
            if seq_loss > 0 {
                out.events.push(event(
                    now,
                    EventType::TransportDrop,
                    &entity,
                    seq_loss.to_string(),
                ));
            }
        }
        self.down.retain(|k, _| seen.contains(k));
        self.counters.sweep();
        let mut take = |k: &str| fams.remove(k).unwrap_or_default();
        let mut families: Vec<MetricFamily> = vec![
            family(
                "ark_ib_port_up",
                "1 when the InfiniBand/RoCE port's state is ACTIVE.",
                MetricType::GAUGE,
                take("up"),
            ),
            family(
                "ark_ib_port_state",
                "Logical port state (1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER).",
                MetricType::GAUGE,
                take("state"),
            ),
            family(
                "ark_ib_port_phys_state",
                "Physical port state (2 Polling, 3 Disabled, 5 LinkUp, 6 LinkErrorRecovery, ...).",
                MetricType::GAUGE,
                take("phys"),
            ),
            family(
                "ark_ib_port_rate_bytes_per_second",
                "Signalling rate of the port.",
                MetricType::GAUGE,
                take("rate"),
            ),
        ];
        for (_, fam, help, _) in PORT_COUNTERS {
            families.push(family(fam, help, MetricType::COUNTER, take(fam)));
        }
        for (_, fam, help) in HW_COUNTERS {
            families.push(family(fam, help, MetricType::COUNTER, take(fam)));
        }
        families.push(family(
            "ark_ib_port_other_events_total",
            "Other counters of counters/ of an InfiniBand port, by file name.",
            MetricType::COUNTER,
            other_port,
        ));
        families.push(family(
            "ark_ib_hw_events_total",
            "Other driver counters of hw_counters/ of an InfiniBand/RoCE port, by file name.",
            MetricType::COUNTER,
            other_hw,
        ));
        out.families = families;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_state_and_rate() {
        assert_eq!(parse_state("4: ACTIVE\n"), Some((4, "ACTIVE".into())));
        assert_eq!(parse_state("5: LinkUp"), Some((5, "LinkUp".into())));
        assert_eq!(parse_state("ACTIVE"), None);
        assert_eq!(parse_state("x: y"), None);
        assert_eq!(parse_rate("100 Gb/sec (4X EDR)"), Some(12.5e9));
        assert_eq!(parse_rate("400 Gb/sec (4X NDR)"), Some(50e9));
        assert_eq!(parse_rate("2.5 Gb/sec (1X SDR)"), Some(312_500_000.0));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("10 furlongs"), None);
        assert_eq!(port_entity("mlx5_0", "1"), "mlx5_0");
        assert_eq!(port_entity("mlx4_0", "2"), "mlx4_0:2");
    }
}
