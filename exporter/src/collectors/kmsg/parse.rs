//! Pure parsing of kernel-log lines: the record/line formats ([`parse_line`]) and the
//! classification of a kernel message into a [`KernelEvent`] ([`Classifier`]).
//!
//! Formats, recognised line by line (a saved file may mix them):
//! - `/dev/kmsg` records `prio,seq,usec,flags[,...];message`; continuation lines (` KEY=value`)
//!   are ignored;
//! - saved `dmesg -T` (`[Sun Feb 23 16:24:18 2025] msg`, read as UTC) and plain `dmesg`
//!   (`[ 1234.567890] msg`, boot-relative);
//! - `dmesg --time-format iso [-x]` (`kern  :warn  : 2025-01-21T04:41:44,283302+00:00 msg`);
//! - journal/syslog (`Oct 02 10:41:07 host kernel: msg`; no year: the current one, the previous
//!   when that would be in the future).
//!
//! Nothing here allocates for a line that is not recognised, nothing panics on any input (the
//! `kmsg_line` fuzz target), and a line longer than [`MAX_LINE_BYTES`] is `Oversized`.

use crate::gpu_map::normalize_bdf;

/// Longest line classified (bytes); longer ones are counted `oversized`.
pub const MAX_LINE_BYTES: usize = 8 * 1024;

/// When a line happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Unix milliseconds.
    Wall(i64),
    /// Microseconds since boot (kmsg records, `[ 1234.567890]`).
    Boot(u64),
}

/// Which format a line had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Kmsg,
    Ctime,
    Monotonic,
    Iso,
    Journal,
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line<'a> {
    pub format: Format,
    pub stamp: Stamp,
    /// kmsg sequence number.
    pub seq: Option<u64>,
    /// syslog facility (0 = kernel) when the format says.
    pub facility: Option<u8>,
    /// syslog level (0 = emerg .. 7 = debug) when the format says.
    pub level: Option<u8>,
    pub message: &'a str,
}

impl Line<'_> {
    /// Did the kernel write it? A facility other than 0 (or a journal identifier other than
    /// `kernel`) is userspace: `/dev/kmsg` is writable by root processes, which must not be able
    /// to fake an XID.
    pub fn is_kernel(&self) -> bool {
        self.facility.is_none_or(|f| f == 0)
    }
}

/// Why a line is not a [`Line`] (the `result` label, with `ignored` for continuations/blank).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    Oversized,
    /// A blank line or a kmsg continuation (` KEY=value`): nothing to do.
    Skip,
    /// Unknown prefix, bad number, invalid UTF-8, truncated record.
    Malformed,
}

/// Parses one line (without its newline). `now_ms` decides the year of journal lines.
pub fn parse_line(raw: &[u8], now_ms: i64) -> Result<Line<'_>, LineError> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(LineError::Oversized);
    }
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.is_empty() || raw[0] == b' ' || raw[0] == b'\t' {
        return Err(LineError::Skip);
    }
    let s = std::str::from_utf8(raw).map_err(|_| LineError::Malformed)?;
    let first = raw[0];
    let r = if first.is_ascii_digit() {
        if first <= b'9'
            && s.as_bytes().get(4) == Some(&b'-')
            && s.as_bytes().get(10) == Some(&b'T')
        {
            parse_iso(s, None)
        } else {
            parse_kmsg(s)
        }
    } else if first == b'[' {
        parse_bracket(s)
    } else if first.is_ascii_alphabetic() {
        parse_journal(s, now_ms).or_else(|| parse_iso_x(s))
    } else {
        None
    };
    r.ok_or(LineError::Malformed)
}

fn parse_kmsg(s: &str) -> Option<Line<'_>> {
    let semi = s.as_bytes().iter().take(256).position(|&b| b == b';')?;
    let (head, msg) = (&s[..semi], &s[semi + 1..]);
    let mut f = head.split(',');
    let prio: u32 = f.next()?.parse().ok()?;
    let seq: u64 = f.next()?.parse().ok()?;
    let usec: u64 = f.next()?.parse().ok()?;
    let flags = f.next()?;
    if flags.len() > 8 || prio > 1023 * 8 + 7 {
        return None;
    }
    Some(Line {
        format: Format::Kmsg,
        stamp: Stamp::Boot(usec),
        seq: Some(seq),
        facility: Some((prio >> 3).min(255) as u8),
        level: Some((prio & 7) as u8),
        message: msg,
    })
}

fn parse_bracket(s: &str) -> Option<Line<'_>> {
    let close = s.as_bytes().iter().take(64).position(|&b| b == b']')?;
    let inner = s[1..close].trim();
    let msg = s[close + 1..].strip_prefix(' ').unwrap_or(&s[close + 1..]);
    let (format, stamp) = if inner.bytes().next()?.is_ascii_digit() {
        let (sec, frac) = inner.split_once('.').unwrap_or((inner, "0"));
        (Format::Monotonic, Stamp::Boot(secs_frac_us(sec, frac)?))
    } else {
        (Format::Ctime, Stamp::Wall(parse_ctime(inner)?))
    };
    Some(Line {
        format,
        stamp,
        seq: None,
        facility: None,
        level: None,
        message: msg,
    })
}

fn secs_frac_us(sec: &str, frac: &str) -> Option<u64> {
    if sec.is_empty() || sec.len() > 12 || frac.is_empty() || frac.len() > 9 {
        return None;
    }
    let s: u64 = sec.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut us = 0u64;
    for i in 0..6 {
        us = us * 10 + frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
    }
    Some(s * 1_000_000 + us)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn month(s: &str) -> Option<u32> {
    MONTHS.iter().position(|m| *m == s).map(|i| i as u32 + 1)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil year of a Unix millisecond time.
pub fn year_of(ms: i64) -> i64 {
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

fn hms(s: &str) -> Option<i64> {
    let mut it = s.split(':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let sec: i64 = it.next()?.parse().ok()?;
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(h * 3600 + m * 60 + sec)
}

fn civil_ms(y: i64, mo: u32, d: u32, secs: i64) -> Option<i64> {
    if !(1970..=9999).contains(&y) || !(1..=31).contains(&d) {
        return None;
    }
    Some((days_from_civil(y, mo, d) * 86_400 + secs) * 1000)
}

/// `Sun Feb 23 16:24:18 2025` → Unix ms (UTC).
fn parse_ctime(s: &str) -> Option<i64> {
    let mut it = s.split_ascii_whitespace();
    let _wday = it.next()?;
    let mo = month(it.next()?)?;
    let d: u32 = it.next()?.parse().ok()?;
    let t = hms(it.next()?)?;
    let y: i64 = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    civil_ms(y, mo, d, t)
}

/// `kern  :warn  : 2025-...` (`dmesg -x --time-format iso`).
fn parse_iso_x(s: &str) -> Option<Line<'_>> {
    let (fac, rest) = s.split_once(':')?;
    let (lvl, rest) = rest.split_once(':')?;
    let facility = match fac.trim() {
        "kern" => 0,
        "user" => 1,
        "mail" => 2,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "lpr" => 6,
        "news" => 7,
        f if f.len() <= 10 && f.bytes().all(|b| b.is_ascii_alphanumeric()) => 16,
        _ => return None,
    };
    let level = match lvl.trim() {
        "emerg" => 0,
        "alert" => 1,
        "crit" => 2,
        "err" => 3,
        "warn" => 4,
        "notice" => 5,
        "info" => 6,
        "debug" => 7,
        _ => return None,
    };
    let mut l = parse_iso(rest.trim_start(), Some(facility))?;
    l.level = Some(level);
    Some(l)
}

/// `2025-01-21T04:41:44,283302+00:00 msg`.
fn parse_iso(s: &str, facility: Option<u8>) -> Option<Line<'_>> {
    let (ts, msg) = s.split_once(' ').unwrap_or((s, ""));
    let b = ts.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let y: i64 = ts.get(0..4)?.parse().ok()?;
    let mo: u32 = ts.get(5..7)?.parse().ok()?;
    let d: u32 = ts.get(8..10)?.parse().ok()?;
    if !(1..=12).contains(&mo) {
        return None;
    }
    let secs = hms(ts.get(11..19)?)?;
    let mut rest = ts.get(19..)?;
    let mut frac_us = 0i64;
    if let Some(r) = rest.strip_prefix([',', '.']) {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        frac_us = secs_frac_us("0", &r[..n])? as i64;
        rest = &r[n..];
    }
    let offset = match rest {
        "" | "Z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.get(1..)?;
            let (h, m) = o.split_once(':').unwrap_or((o.get(..2)?, o.get(2..)?));
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let ms = civil_ms(y, mo, d, secs - offset)? + frac_us / 1000;
    Some(Line {
        format: Format::Iso,
        stamp: Stamp::Wall(ms),
        seq: None,
        facility,
        level: None,
        message: msg,
    })
}

/// `Oct 02 10:41:07 host kernel: msg`.
fn parse_journal(s: &str, now_ms: i64) -> Option<Line<'_>> {
    let mo = month(s.get(0..3)?)?;
    let rest = s.get(3..)?.trim_start();
    let (d, rest) = rest.split_once(' ')?;
    let d: u32 = d.parse().ok()?;
    let (t, rest) = rest.split_once(' ')?;
    let t = hms(t)?;
    let (_host, rest) = rest.split_once(' ')?;
    let (ident, msg) = rest
        .split_once(": ")
        .unwrap_or((rest.trim_end_matches(':'), ""));
    let year = year_of(now_ms);
    let mut ms = civil_ms(year, mo, d, t)?;
    if ms > now_ms + 86_400_000 {
        ms = civil_ms(year - 1, mo, d, t)?;
    }
    // `kernel:` or `kernel[0]:` is the kernel; anything else is a userspace program.
    let ident = ident.split('[').next().unwrap_or(ident);
    Some(Line {
        format: Format::Journal,
        stamp: Stamp::Wall(ms),
        seq: None,
        facility: Some(if ident == "kernel" { 0 } else { 1 }),
        level: None,
        message: msg,
    })
}

/// Severity of an NVSwitch SXid or an NVLink5 XID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Nonfatal,
}

impl Severity {
    pub fn label(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Nonfatal => "nonfatal",
        }
    }
}

/// XID 154's recovery action (the `action` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryAction {
    None,
    GpuReset,
    NodeReboot,
    DrainP2p,
    DrainAndReset,
}

impl RecoveryAction {
    pub fn label(self) -> &'static str {
        match self {
            RecoveryAction::None => "none",
            RecoveryAction::GpuReset => "gpu_reset",
            RecoveryAction::NodeReboot => "node_reboot",
            RecoveryAction::DrainP2p => "drain_p2p",
            RecoveryAction::DrainAndReset => "drain_and_reset",
        }
    }
}

/// PCIe AER severity (the `severity` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AerSeverity {
    Corrected,
    UncorrectedNonfatal,
    UncorrectedFatal,
}

impl AerSeverity {
    pub fn label(self) -> &'static str {
        match self {
            AerSeverity::Corrected => "corrected",
            AerSeverity::UncorrectedNonfatal => "uncorrected_nonfatal",
            AerSeverity::UncorrectedFatal => "uncorrected_fatal",
        }
    }
}

/// What a kernel message says. Bus ids are normalized (`0000:3b:00.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// `NVRM: Xid (PCI:<bdf>): <n>, ...`; `fell_off` when synthesized from a "fallen off the
    /// bus" message (XID 79).
    Xid {
        bdf: String,
        xid: u32,
        severity: Option<Severity>,
        recovery: Option<RecoveryAction>,
        fell_off: bool,
    },
    Sxid {
        device: String,
        sxid: u32,
        severity: Severity,
    },
    Aer {
        reporter: Option<String>,
        device: Option<String>,
        severity: AerSeverity,
    },
    OomKill {
        pid: u32,
        comm: String,
    },
    HungTask {
        pid: u32,
        comm: String,
    },
    SoftLockup {
        cpu: u32,
    },
    Mce,
    Segfault {
        pid: Option<u32>,
        library: String,
    },
    LinkDown {
        device: String,
    },
}

impl KernelEvent {
    /// The `kind` of `ark_kernel_events_total`, for the classes counted there.
    pub fn kind(&self) -> Option<&'static str> {
        Some(match self {
            KernelEvent::OomKill { .. } => "oom_kill",
            KernelEvent::HungTask { .. } => "hung_task",
            KernelEvent::SoftLockup { .. } => "soft_lockup",
            KernelEvent::Mce => "mce",
            KernelEvent::Segfault { .. } => "segfault",
            KernelEvent::LinkDown { .. } => "link_down",
            _ => return None,
        })
    }
}

/// What a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Counted / sent.
    Event(KernelEvent),
    /// Recognised, but only a detail of (or context for) another line: counted `recognized`,
    /// nothing else (XID header, SXid data line, AER detail, link up, ...).
    Known,
    /// Nothing we look for.
    Ignored,
}

/// Lines within which a detail belongs to the line before (the three-line fallen-off-the-bus
/// message, the AER detail after "error received", the MCE dump).
const CONTEXT_LINES: u64 = 8;

/// Classifies messages; keeps the little context multi-line messages need. Bounded: a few
/// short strings.
#[derive(Debug, Default)]
pub struct Classifier {
    line: u64,
    /// `NVRM: The NVIDIA GPU <bdf>` seen at this line, waiting for "fallen off the bus".
    pending_gpu: Option<(String, u64)>,
    /// Last AER "error received": (device, severity, line).
    last_aer: Option<(Option<String>, AerSeverity, u64)>,
    last_mce: Option<u64>,
}

fn after<'a>(s: &'a str, pat: &str) -> Option<&'a str> {
    s.find(pat).map(|i| &s[i + pat.len()..])
}

fn leading_u32(s: &str) -> Option<u32> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 || n > 9 {
        return None;
    }
    s[..n].parse().ok()
}

/// The bus id in `(PCI:0000:3b:00): ...` / `(0000:3b:00.0): ...`, and the text after `): `.
fn paren_bdf(s: &str) -> Option<(String, &str)> {
    let close = s.find(')')?;
    let inner = &s[..close];
    let inner = inner.strip_prefix("PCI:").unwrap_or(inner);
    let bdf = normalize_bdf(inner)?;
    let rest = s[close + 1..].trim_start_matches(':').trim_start();
    Some((bdf, rest))
}

/// First token that is a bus id (`0000:3b:00.0:`, `PCI:0000:3b:00`, ...).
fn find_bdf(s: &str) -> Option<String> {
    s.split_ascii_whitespace().take(32).find_map(|t| {
        let t = t.trim_start_matches('(').strip_prefix("PCI:").unwrap_or(t);
        let t = t.trim_end_matches([':', ',', '.', ')', ';']);
        if t.len() < 7 || t.len() > 16 {
            return None;
        }
        normalize_bdf(t)
    })
}

fn severity_word(s: &str) -> Option<Severity> {
    let l = s.trim_start();
    if l.starts_with("Non-fatal") || l.starts_with("Nonfatal") || l.starts_with("Non-Fatal") {
        Some(Severity::Nonfatal)
    } else if l.starts_with("Fatal") {
        Some(Severity::Fatal)
    } else {
        None
    }
}

fn recovery_action(s: &str) -> Option<RecoveryAction> {
    let target = match s.rfind(" to ") {
        Some(i) => &s[i..],
        None => s,
    };
    Some(if target.contains("Drain and Reset") {
        RecoveryAction::DrainAndReset
    } else if target.contains("Node Reboot Required") {
        RecoveryAction::NodeReboot
    } else if target.contains("Drain P2P") {
        RecoveryAction::DrainP2p
    } else if target.contains("GPU Reset Required") {
        RecoveryAction::GpuReset
    } else if target.contains("(None)") {
        RecoveryAction::None
    } else {
        return None;
    })
}

fn aer_severity(s: &str) -> Option<AerSeverity> {
    if s.starts_with("Corrected") || s.starts_with("Correctable") {
        Some(AerSeverity::Corrected)
    } else if s.starts_with("Uncorrected (Fatal)") || s.starts_with("Uncorrectable (Fatal)") {
        Some(AerSeverity::UncorrectedFatal)
    } else if s.starts_with("Uncorrected (Non-Fatal)") || s.starts_with("Uncorrectable (Non-Fatal)")
    {
        Some(AerSeverity::UncorrectedNonfatal)
    } else {
        None
    }
}

/// `driver 0000:3b:00.0: ...` → the bus id of the device the kernel prefixed the line with.
fn dev_prefix(msg: &str) -> Option<String> {
    let mut it = msg.splitn(3, ' ');
    let _driver = it.next()?;
    let dev = it.next()?;
    normalize_bdf(dev.trim_end_matches(':'))
}

impl Classifier {
    /// Classifies one kernel message (the message part of a [`Line`]).
    pub fn classify(&mut self, msg: &str) -> Class {
        self.line += 1;
        let msg = msg.trim_end();
        if let Some(i) = msg.find("NVRM: ") {
            return self.nvrm(&msg[i + 6..]);
        }
        if let Some(rest) = after(msg, "SXid (") {
            return sxid(rest);
        }
        if msg.contains("AER: ") || msg.contains("PCIe Bus Error: ") {
            return self.aer(msg);
        }
        if let Some(rest) = after(msg, "ut of memory: Kill") {
            return oom(rest);
        }
        if let Some(rest) = after(msg, "INFO: task ") {
            return hung(rest);
        }
        if let Some(rest) = after(msg, "BUG: soft lockup - CPU#") {
            return match leading_u32(rest) {
                Some(cpu) => Class::Event(KernelEvent::SoftLockup { cpu }),
                None => Class::Known,
            };
        }
        if msg.contains("[Hardware Error]") || msg.contains("Machine check events logged") {
            return self.mce(msg);
        }
        if msg.contains(": segfault at ") {
            return segfault(msg);
        }
        if msg.starts_with("mlx5_core ") || msg.starts_with("ib") || msg.contains(" ib") {
            return link(msg);
        }
        Class::Ignored
    }

    fn nvrm(&mut self, m: &str) -> Class {
        if let Some(rest) = m.strip_prefix("Xid (") {
            let Some((bdf, rest)) = paren_bdf(rest) else {
                return Class::Known;
            };
            let Some(xid) = leading_u32(rest) else {
                return Class::Known;
            };
            let text = rest.split_once(',').map_or("", |(_, t)| t);
            let severity = if (144..=150).contains(&xid) {
                text.split([' ', ',']).find_map(severity_word)
            } else {
                None
            };
            let recovery = (xid == 154).then(|| recovery_action(text)).flatten();
            return Class::Event(KernelEvent::Xid {
                bdf,
                xid,
                severity,
                recovery,
                fell_off: false,
            });
        }
        if m.contains("fallen off the bus") {
            let bdf = find_bdf(m).or_else(|| {
                self.pending_gpu
                    .take()
                    .filter(|(_, at)| self.line - at <= CONTEXT_LINES)
                    .map(|(b, _)| b)
            });
            self.pending_gpu = None;
            return match bdf {
                Some(bdf) => Class::Event(KernelEvent::Xid {
                    bdf,
                    xid: 79,
                    severity: None,
                    recovery: None,
                    fell_off: true,
                }),
                None => Class::Known,
            };
        }
        if let Some(rest) = m.strip_prefix("The NVIDIA GPU ") {
            if let Some(b) = find_bdf(rest) {
                self.pending_gpu = Some((b, self.line));
            }
            return Class::Known;
        }
        if m.starts_with("GPU at PCI:") || m.starts_with("GPU Board Serial") {
            return Class::Known;
        }
        Class::Ignored
    }

    fn aer(&mut self, msg: &str) -> Class {
        if let Some(rest) = after(msg, "AER: ") {
            let rest = rest.strip_prefix("Multiple ").unwrap_or(rest);
            let Some(severity) = aer_severity(rest) else {
                return Class::Known;
            };
            let device = rest
                .find(": ")
                .or_else(|| rest.find(" from "))
                .and_then(|i| find_bdf(&rest[i + 1..]))
                .or_else(|| after(rest, " from ").and_then(find_bdf));
            let reporter = dev_prefix(msg);
            self.last_aer = Some((device.clone(), severity, self.line));
            return Class::Event(KernelEvent::Aer {
                reporter,
                device,
                severity,
            });
        }
        let Some(rest) = after(msg, "PCIe Bus Error: severity=") else {
            return Class::Known;
        };
        let Some(severity) = aer_severity(rest) else {
            return Class::Known;
        };
        let device = dev_prefix(msg);
        // The detail line of an "error received" just counted.
        if let Some((d, s, at)) = &self.last_aer
            && *s == severity
            && self.line - at <= CONTEXT_LINES
            && (d.is_none() || *d == device)
        {
            self.last_aer = None;
            return Class::Known;
        }
        Class::Event(KernelEvent::Aer {
            reporter: None,
            device,
            severity,
        })
    }

    fn mce(&mut self, msg: &str) -> Class {
        let counted = msg.contains("Machine check events logged") || msg.contains("Machine Check");
        if !counted {
            return Class::Known;
        }
        // One MCE prints "events logged" and "CPU n: Machine Check: ..." lines: count once.
        let recent = self
            .last_mce
            .is_some_and(|at| self.line - at <= CONTEXT_LINES);
        self.last_mce = Some(self.line);
        if recent {
            Class::Known
        } else {
            Class::Event(KernelEvent::Mce)
        }
    }
}

fn sxid(rest: &str) -> Class {
    let Some((device, rest)) = paren_bdf(rest) else {
        return Class::Known;
    };
    let Some(sxid) = leading_u32(rest) else {
        return Class::Known;
    };
    // `12028, Non-fatal, Link 32 ...`; the following `12028, Data {...}` lines are details.
    match rest.split_once(',').and_then(|(_, t)| severity_word(t)) {
        Some(severity) => Class::Event(KernelEvent::Sxid {
            device,
            sxid,
            severity,
        }),
        None => Class::Known,
    }
}

/// After `...ut of memory: Kill`: `ed process 1234 (python) ...` / `process 1234 (python) ...`.
fn oom(rest: &str) -> Class {
    let Some(rest) = after(rest, "process ") else {
        return Class::Known;
    };
    let Some(pid) = leading_u32(rest) else {
        return Class::Known;
    };
    let comm = after(rest, "(")
        .and_then(|c| c.split_once(')'))
        .map_or("", |(c, _)| c);
    Class::Event(KernelEvent::OomKill {
        pid,
        comm: comm.chars().take(64).collect(),
    })
}

/// After `INFO: task `: `python:1234 blocked for more than 120 seconds.`
fn hung(rest: &str) -> Class {
    let Some((task, _)) = rest.split_once(" blocked for more than ") else {
        return Class::Ignored;
    };
    let Some((comm, pid)) = task.rsplit_once(':') else {
        return Class::Known;
    };
    match pid.parse() {
        Ok(pid) => Class::Event(KernelEvent::HungTask {
            pid,
            comm: comm.chars().take(64).collect(),
        }),
        Err(_) => Class::Known,
    }
}

/// `python[1234]: segfault at 0 ip ... error 4 in libnccl.so.2[7f..+..]`: only inside NVIDIA's
/// libraries.
fn segfault(msg: &str) -> Class {
    let Some(lib) = after(msg, " in lib") else {
        return Class::Ignored;
    };
    // ASCII only, so the slice below is on a character boundary.
    let name_len = lib
        .bytes()
        .take_while(|&b| b.is_ascii_graphic() && b != b'[')
        .count()
        .min(64);
    let library = format!("lib{}", &lib[..name_len]);
    if !(library.starts_with("libnccl")
        || library.starts_with("libcuda")
        || library.starts_with("libnvidia"))
    {
        return Class::Ignored;
    }
    let pid = msg
        .split_once('[')
        .and_then(|(_, r)| r.split_once("]:"))
        .and_then(|(p, _)| p.parse().ok());
    Class::Event(KernelEvent::Segfault { pid, library })
}

/// mlx5 / IPoIB link state: `mlx5_core 0000:5e:00.0 ib0: Link down`, `ib0: link down`,
/// `mlx5_core 0000:5e:00.0: Port module event: module 0, Cable unplugged`.
fn link(msg: &str) -> Class {
    let lower_end = |s: &str| {
        let n = s.len();
        s.get(n.saturating_sub(9)..)
            .is_some_and(|t| t.eq_ignore_ascii_case("link down"))
    };
    let is_ib_dev = |t: &str| {
        t.strip_prefix("ib")
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()))
    };
    let mlx = msg.starts_with("mlx5_core ");
    let first = msg.split_once(": ").map_or("", |(d, _)| d);
    let ib = first.split(' ').next_back().is_some_and(is_ib_dev);
    if !(mlx || ib) {
        return Class::Ignored;
    }
    let device = first.chars().take(64).collect::<String>();
    if lower_end(msg) {
        return Class::Event(KernelEvent::LinkDown { device });
    }
    if let Some(ev) = after(msg, "Port module event") {
        if ev.contains("unplugged") || ev.contains("error") {
            return Class::Event(KernelEvent::LinkDown { device });
        }
        return Class::Known;
    }
    let n = msg.len();
    if msg
        .get(n.saturating_sub(7)..)
        .is_some_and(|t| t.eq_ignore_ascii_case("link up"))
    {
        return Class::Known;
    }
    Class::Ignored
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    #[test]
    fn record_formats() {
        let l = parse_line(b"6,1203,5023412360,-,caller=T1;NVRM: x", NOW).unwrap();
        assert_eq!(
            (l.format, l.stamp, l.seq, l.facility, l.level, l.message),
            (
                Format::Kmsg,
                Stamp::Boot(5_023_412_360),
                Some(1203),
                Some(0),
                Some(6),
                "NVRM: x"
            )
        );
        let l = parse_line(b"14,1,2,-;user", NOW).unwrap();
        assert_eq!(l.facility, Some(1));
        assert!(!l.is_kernel());
        let l = parse_line(b"[Sun Feb 23 16:24:18 2025] msg", NOW).unwrap();
        assert_eq!(
            (l.stamp, l.message),
            (Stamp::Wall(1_740_327_858_000), "msg")
        );
        let l = parse_line(b"[ 1234.567890] msg", NOW).unwrap();
        assert_eq!(l.stamp, Stamp::Boot(1_234_567_890));
        let l = parse_line(b"kern  :warn  : 2025-01-21T04:41:44,283302+00:00 msg", NOW).unwrap();
        assert_eq!(
            (l.stamp, l.facility, l.level),
            (Stamp::Wall(1_737_434_504_283), Some(0), Some(4))
        );
        let l = parse_line(b"user  :info  : 2025-01-21T05:41:44,0+01:00 m", NOW).unwrap();
        assert_eq!(
            (l.stamp, l.is_kernel()),
            (Stamp::Wall(1_737_434_504_000), false)
        );
        let l = parse_line(b"2025-01-21T04:41:44Z m", NOW).unwrap();
        assert_eq!(l.stamp, Stamp::Wall(1_737_434_504_000));
        let l = parse_line(b"Oct 02 10:41:07 host kernel: msg", NOW).unwrap();
        assert_eq!(
            (l.format, l.message, l.is_kernel()),
            (Format::Journal, "msg", true)
        );
        let l = parse_line(b"Oct 02 10:41:07 host sshd[12]: msg", NOW).unwrap();
        assert!(!l.is_kernel());
        for bad in [&b""[..], b" KEY=v", b"\tx"] {
            assert_eq!(parse_line(bad, NOW), Err(LineError::Skip));
        }
        for bad in [
            &b"hello"[..],
            b"[x] y",
            b"1,2;x",
            b"\xff",
            b"[Sun Feb 30 99:00:00 2025] x",
        ] {
            assert_eq!(parse_line(bad, NOW), Err(LineError::Malformed), "{bad:?}");
        }
        assert_eq!(
            parse_line(&vec![b'6'; MAX_LINE_BYTES + 1], NOW),
            Err(LineError::Oversized)
        );
    }

    #[test]
    fn journal_year_is_never_in_the_future() {
        // On 2026-01-01 a "Dec 31" line is from 2025, a "Jan 01" line from 2026.
        let dec = parse_line(b"Dec 31 23:00:00 h kernel: x", NOW).unwrap();
        assert_eq!(dec.stamp, Stamp::Wall(NOW - 3_600_000));
        let jan = parse_line(b"Jan 01 00:00:01 h kernel: x", NOW).unwrap();
        assert_eq!(jan.stamp, Stamp::Wall(NOW + 1000));
        assert_eq!(year_of(NOW), 2026);
        assert_eq!(year_of(NOW - 1), 2025);
    }

    #[test]
    fn classes() {
        let mut c = Classifier::default();
        let x = |c: &mut Classifier, m: &str| c.classify(m);
        assert_eq!(
            x(
                &mut c,
                "NVRM: Xid (PCI:0000:3B:00): 79, pid=1, name=p, Ch 00000008"
            ),
            Class::Event(KernelEvent::Xid {
                bdf: "0000:3b:00.0".into(),
                xid: 79,
                severity: None,
                recovery: None,
                fell_off: false
            })
        );
        assert_eq!(
            x(
                &mut c,
                "nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Fatal, Link 32"
            ),
            Class::Event(KernelEvent::Sxid {
                device: "0000:05:00.0".into(),
                sxid: 12028,
                severity: Severity::Fatal
            })
        );
        assert_eq!(
            x(
                &mut c,
                "pcieport 0000:00:01.0: AER: Correctable error message received from 0000:3b:00.0"
            ),
            Class::Event(KernelEvent::Aer {
                reporter: Some("0000:00:01.0".into()),
                device: Some("0000:3b:00.0".into()),
                severity: AerSeverity::Corrected
            })
        );
        assert_eq!(
            x(
                &mut c,
                "INFO: task kworker/u8:2:1234 blocked for more than 122 seconds."
            ),
            Class::Event(KernelEvent::HungTask {
                pid: 1234,
                comm: "kworker/u8:2".into()
            })
        );
        assert_eq!(
            x(
                &mut c,
                "python[7]: segfault at 0 ip 1 sp 2 error 4 in libcuda.so.550.54.15[7f+1]"
            ),
            Class::Event(KernelEvent::Segfault {
                pid: Some(7),
                library: "libcuda.so.550.54.15".into()
            })
        );
        assert_eq!(x(&mut c, "eth0: renamed from veth0"), Class::Ignored);
        assert_eq!(x(&mut c, "ib0: link up"), Class::Known);
        // Multi-byte text around the patterns never splits a character.
        for m in [
            "NVRM: Xid (é",
            "é segfault at in libé",
            "ibé: é link down",
            "AER: é",
            "NVRM: The NVIDIA GPU é fallen off the bus",
        ] {
            let _ = x(&mut c, m);
        }
    }
}
