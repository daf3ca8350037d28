//! The `pressure` collector: pressure stall information from `<procfs>/pressure/{cpu,io,memory}`
//! (kernels with PSI). A kernel without PSI, or booted with `psi=0` (the files exist but reading
//! them fails with EOPNOTSUPP), makes the collector report `up 0` once with a log line.
//!
//! Metrics: `ark_pressure_stalled_seconds_total{resource,kind}` (kind `some` = at least one task
//! stalled, `full` = all non-idle tasks stalled) and `ark_pressure_ratio{resource,kind,window}`
//! (the kernel's running averages over 10 s, 60 s and 300 s, as a 0..1 ratio). No events: PSI
//! says the node is starved, not which device a process waits on.

use prometheus::proto::MetricType;

use super::{HostConfig, HostSource, PollError, PollOutput, read_into};
use crate::metrics::family;

/// The PSI resources read.
pub const RESOURCES: [&str; 3] = ["cpu", "io", "memory"];

/// One line of a PSI file.
#[derive(Debug, Clone, PartialEq)]
pub struct Psi {
    /// `some` or `full`.
    pub kind: &'static str,
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Microseconds stalled since boot.
    pub total_us: u64,
}

/// Pure: parses a PSI file; bad lines are returned.
pub fn parse_pressure(text: &str) -> (Vec<Psi>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match parse_line(line) {
            Some(p) => out.push(p),
            None => bad.push(line.chars().take(120).collect()),
        }
    }
    (out, bad)
}

fn parse_line(line: &str) -> Option<Psi> {
    let mut it = line.split_ascii_whitespace();
    let kind = match it.next()? {
        "some" => "some",
        "full" => "full",
        _ => return None,
    };
    let (mut a10, mut a60, mut a300, mut total) = (None, None, None, None);
    for kv in it {
        let (k, v) = kv.split_once('=')?;
        match k {
            "avg10" => a10 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "avg60" => a60 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "avg300" => a300 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "total" => total = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    Some(Psi {
        kind,
        avg10: a10?,
        avg60: a60?,
        avg300: a300?,
        total_us: total?,
    })
}

/// See the module docs.
pub struct PressureCollector {
    cfg: HostConfig,
    buf: String,
}

impl PressureCollector {
    pub fn new(cfg: &HostConfig) -> Self {
        PressureCollector {
            cfg: cfg.clone(),
            buf: String::new(),
        }
    }
}

impl HostSource for PressureCollector {
    fn poll(&mut self, _now: i64) -> Result<PollOutput, PollError> {
        let mut out = PollOutput::default();
        let mut totals = Vec::new();
        let mut ratios = Vec::new();
        let mut read_any = false;
        for res in RESOURCES {
            let path = self.cfg.proc("pressure").join(res);
            if read_into(&path, &mut self.buf).is_err() {
                // Missing (older kernel, or no memory controller) or EOPNOTSUPP (psi=0).
                continue;
            }
            read_any = true;
            let (lines, bad) = parse_pressure(&self.buf);
            out.bad_input
                .extend(bad.into_iter().map(|b| format!("{}: {b}", path.display())));
            for p in lines {
                let l = |extra: Option<&'static str>| {
                    let mut v = vec![("resource", res.to_owned()), ("kind", p.kind.to_owned())];
                    if let Some(w) = extra {
                        v.push(("window", w.to_owned()));
                    }
                    v
                };
                totals.push((l(None), p.total_us as f64 / 1e6));
                ratios.push((l(Some("10s")), p.avg10 / 100.0));
                ratios.push((l(Some("60s")), p.avg60 / 100.0));
                ratios.push((l(Some("300s")), p.avg300 / 100.0));
            }
        }
        if !read_any {
            return Err(PollError::Absent {
                path: self.cfg.proc("pressure"),
                what: "kernel without pressure stall information (PSI)",
            });
        }
        out.families = vec![
            family(
                "ark_pressure_stalled_seconds_total",
                "Time tasks were stalled on the resource (some: at least one, full: all non-idle).",
                MetricType::COUNTER,
                totals,
            ),
            family(
                "ark_pressure_ratio",
                "Share of time tasks were stalled on the resource, averaged over the window.",
                MetricType::GAUGE,
                ratios,
            ),
        ];
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_psi() {
        let (p, bad) = parse_pressure(
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        );
        assert!(bad.is_empty());
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].kind, "some");
        assert_eq!(p[0].avg10, 1.5);
        assert_eq!(p[0].total_us, 123_456);
        assert_eq!(p[1].kind, "full");
        let (p, bad) = parse_pressure(
            "some avg10=x avg60=0 avg300=0 total=1\nhalf avg10=0 avg60=0 avg300=0 total=1\nsome total=5\nsome avg10=NaN avg60=0 avg300=0 total=1\n",
        );
        assert!(p.is_empty());
        assert_eq!(bad.len(), 4);
    }
}
