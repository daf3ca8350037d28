//! The `netdev` collector: `<procfs>/net/dev` (per-interface byte, packet, error and drop
//! counters) and `<sysfs>/class/net/<iface>/{carrier_changes,operstate}`.
//!
//! Metrics: `ark_netdev_{bytes,packets,errors,drops}_total{device,direction}`,
//! `ark_netdev_carrier_changes_total{device}`, `ark_netdev_up{device}`.
//! Events (entity `network-<iface>`): drops rising → `transport.drop` (value: the number of new
//! drops); errors rising → `error.net`; carrier changes rising while up → `error.net`;
//! operstate leaving `up` → `topo.link_down` (re-sent while it lasts), back to `up` → a clearing
//! `topo.link_down` with value `up`. First readings are baselines: no event for errors counted
//! before the exporter started; a counter that goes down is a reset, never a negative delta.
//! `lo` is left out.

use prometheus::proto::MetricType;

use super::{
    CounterTracker, HostConfig, HostSource, PollError, PollOutput, Refresh, event, is_absent,
    parse_counter, read_attr, read_into,
};
use crate::event::EventType;
use crate::metrics::family;

/// One interface line of `/proc/net/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetDevStats {
    pub device: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_drops: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_drops: u64,
}

/// Pure: parses `/proc/net/dev`. Returns the interfaces and the lines that did not parse.
pub fn parse_netdev(text: &str) -> (Vec<NetDevStats>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            // The two header lines have no ':'... except none; anything else without one is junk.
            if !(line.contains('|') || line.trim().is_empty()) {
                bad.push(line.chars().take(120).collect());
            }
            continue;
        };
        let name = name.trim();
        if name.is_empty() || name.contains('|') || name.len() > 64 {
            bad.push(line.chars().take(120).collect());
            continue;
        }
        let nums: Vec<u64> = rest
            .split_ascii_whitespace()
            .map_while(|f| f.parse().ok())
            .collect();
        if nums.len() < 16 || rest.split_ascii_whitespace().count() != nums.len() {
            bad.push(line.chars().take(120).collect());
            continue;
        }
        out.push(NetDevStats {
            device: name.to_owned(),
            rx_bytes: nums[0],
            rx_packets: nums[1],
            rx_errors: nums[2],
            rx_drops: nums[3],
            tx_bytes: nums[8],
            tx_packets: nums[9],
            tx_errors: nums[10],
            tx_drops: nums[11],
        });
    }
    (out, bad)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ctr {
    RxErr,
    TxErr,
    RxDrop,
    TxDrop,
    Carrier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oper {
    Up,
    /// Down since we first saw it: nothing to report.
    DownQuiet,
    /// Went down while watched: `topo.link_down` sent (and re-sent while it lasts).
    DownReported,
}

/// See the module docs.
pub struct NetdevCollector {
    cfg: HostConfig,
    buf: String,
    counters: CounterTracker<(String, Ctr)>,
    oper: std::collections::HashMap<String, Oper>,
    down_refresh: Refresh<String>,
}

impl NetdevCollector {
    pub fn new(cfg: &HostConfig) -> Self {
        NetdevCollector {
            cfg: cfg.clone(),
            buf: String::new(),
            counters: CounterTracker::new(cfg.max_devices * 5),
            oper: std::collections::HashMap::new(),
            down_refresh: Refresh::new(cfg.refresh_ms(), cfg.max_devices),
        }
    }
}

impl HostSource for NetdevCollector {
    fn poll(&mut self, now: i64) -> Result<PollOutput, PollError> {
        let path = self.cfg.proc("net/dev");
        if let Err(e) = read_into(&path, &mut self.buf) {
            return Err(if is_absent(&e) {
                PollError::Absent {
                    path,
                    what: "no network statistics",
                }
            } else {
                e.into()
            });
        }
        let (mut devs, bad_input) = parse_netdev(&self.buf);
        devs.retain(|d| d.device != "lo");
        devs.sort_by(|a, b| a.device.cmp(&b.device));
        devs.dedup_by(|a, b| a.device == b.device);
        devs.truncate(self.cfg.max_devices);
        let mut out = PollOutput {
            bad_input,
            ..PollOutput::default()
        };
        let mut bytes = Vec::new();
        let mut packets = Vec::new();
        let mut errors = Vec::new();
        let mut drops = Vec::new();
        let mut carrier = Vec::new();
        let mut up_rows = Vec::new();
        let mut seen_oper = std::collections::HashSet::new();
        for d in &devs {
            let dev = || vec![("device", d.device.clone())];
            let dir = |dir: &str| vec![("device", d.device.clone()), ("direction", dir.to_owned())];
            bytes.push((dir("rx"), d.rx_bytes as f64));
            bytes.push((dir("tx"), d.tx_bytes as f64));
            packets.push((dir("rx"), d.rx_packets as f64));
            packets.push((dir("tx"), d.tx_packets as f64));
            errors.push((dir("rx"), d.rx_errors as f64));
            errors.push((dir("tx"), d.tx_errors as f64));
            drops.push((dir("rx"), d.rx_drops as f64));
            drops.push((dir("tx"), d.tx_drops as f64));
            let entity = format!("network-{}", d.device);
            let mut inc =
                |c: Ctr, v: u64| self.counters.update(&(d.device.clone(), c), v).increase();
            let (rxe, txe) = (inc(Ctr::RxErr, d.rx_errors), inc(Ctr::TxErr, d.tx_errors));
            let (rxd, txd) = (inc(Ctr::RxDrop, d.rx_drops), inc(Ctr::TxDrop, d.tx_drops));
            if rxd + txd > 0 {
                out.events.push(event(
                    now,
                    EventType::TransportDrop,
                    &entity,
                    (rxd + txd).to_string(),
                ));
            }
            if rxe + txe > 0 {
                out.events.push(event(
                    now,
                    EventType::ErrorNet,
                    &entity,
                    format!("netdev errors +{} (rx +{rxe}, tx +{txe})", rxe + txe),
                ));
            }
            let class = self.cfg.sys("class/net").join(&d.device);
            let carrier_changes = read_attr(&class.join("carrier_changes"))
                .as_deref()
                .and_then(parse_counter);
            let carrier_inc = carrier_changes.map_or(0, |c| inc(Ctr::Carrier, c));
            if let Some(c) = carrier_changes {
                carrier.push((dev(), c as f64));
            }
            let Some(state) = read_attr(&class.join("operstate")) else {
                continue;
            };
            let up = state == "up";
            seen_oper.insert(d.device.clone());
            up_rows.push((dev(), if up { 1.0 } else { 0.0 }));
            // `reported`: the interface went down while we watched, so an error is open.
            let reported = match (self.oper.get(&d.device).copied(), up) {
                (Some(_), true) => {
                    if self.oper.get(&d.device) == Some(&Oper::DownReported) {
                        self.down_refresh.forget(&d.device);
                        out.events
                            .push(event(now, EventType::TopoLinkDown, &entity, "up".into()));
                    }
                    Oper::Up
                }
                (None, true) => Oper::Up,
                // Down at first sight: an unused port, not a new outage.
                (None, false) => Oper::DownQuiet,
                (Some(Oper::DownQuiet), false) => Oper::DownQuiet,
                (Some(Oper::Up | Oper::DownReported), false) => {
                    if self.down_refresh.due(&d.device, now) {
                        out.events.push(event(
                            now,
                            EventType::TopoLinkDown,
                            &entity,
                            format!("operstate {state}"),
                        ));
                    }
                    Oper::DownReported
                }
            };
            self.oper.insert(d.device.clone(), reported);
            if up && carrier_inc > 0 {
                out.events.push(event(
                    now,
                    EventType::ErrorNet,
                    &entity,
                    format!("carrier changes +{carrier_inc}"),
                ));
            }
        }
        self.oper.retain(|k, _| seen_oper.contains(k));
        self.counters.sweep();
        out.families = vec![
            family(
                "ark_netdev_bytes_total",
                "Bytes received (rx) or transmitted (tx) by a network interface.",
                MetricType::COUNTER,
                bytes,
            ),
            family(
                "ark_netdev_packets_total",
                "Packets received (rx) or transmitted (tx) by a network interface.",
                MetricType::COUNTER,
                packets,
            ),
            family(
                "ark_netdev_errors_total",
                "Receive (rx) or transmit (tx) errors of a network interface.",
                MetricType::COUNTER,
                errors,
            ),
            family(
                "ark_netdev_drops_total",
                "Packets dropped on receive (rx) or transmit (tx) by a network interface.",
                MetricType::COUNTER,
                drops,
            ),
            family(
                "ark_netdev_carrier_changes_total",
                "Times the carrier of a network interface went up or down.",
                MetricType::COUNTER,
                carrier,
            ),
            family(
                "ark_netdev_up",
                "1 when the interface's operstate is up.",
                MetricType::GAUGE,
                up_rows,
            ),
        ];
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  104050     994    0    0    0     0          0         0   104050     994    0    0    0     0       0          0
  eth0: 2283943245 1690223    3    7    0     0          0         0 82739382  708421    1    2    0     0       0          0
";

    #[test]
    fn parses_proc_net_dev() {
        let (devs, bad) = parse_netdev(DEV);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(devs.len(), 2);
        let e = &devs[1];
        assert_eq!(e.device, "eth0");
        assert_eq!(
            (e.rx_errors, e.rx_drops, e.tx_errors, e.tx_drops),
            (3, 7, 1, 2)
        );
        assert_eq!(e.rx_bytes, 2_283_943_245);
        assert_eq!(e.tx_packets, 708_421);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let (devs, bad) = parse_netdev(
            "junk\n  eth1: 1 2 3\n  eth2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n:\n  ok0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n",
        );
        assert_eq!(devs.len(), 1);
        assert_eq!(devs[0].device, "ok0");
        assert_eq!(bad.len(), 4);
        assert_eq!(parse_netdev("").0, vec![]);
    }
}
