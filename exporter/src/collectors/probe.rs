//! The `probe` collector: runs external executables that print Ark events (JSON Lines) on
//! stdout. stderr goes to our log (rate-limited). A probe that exits is restarted with
//! exponential backoff; malformed lines are counted and dropped; a probe that floods
//! only ever fills its share of the bounded pipeline queue (its drops are counted; every probe has
//! a lane of its own, so the others still get through), one that hangs costs nothing.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::{BoxFuture, Collector, CollectorContext};
use crate::config::{ProbeSection, ProbeSpec};
use crate::event::{MAX_LINE_BYTES, ParseError, parse_line};
use crate::ratelimit::LogLimiter;

/// Restart policy.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Backoff {
    /// Next delay after a run that lasted `ran`, given the previous delay.
    pub fn next(&self, prev: Option<Duration>, ran: Duration) -> Duration {
        match prev {
            Some(p) if ran < self.reset_after => (p * 2).min(self.max),
            _ => self.initial,
        }
    }
}

/// See the module docs.
pub struct ProbeCollector {
    probes: Vec<ProbeSpec>,
    backoff: Backoff,
    log_interval: Duration,
}

impl ProbeCollector {
    /// The `probes` list and the `[probe]` restart policy.
    pub fn new(probes: &[ProbeSpec], policy: &ProbeSection, log_interval: Duration) -> Self {
        let ms = |d: crate::rules::format::DurationSpec| Duration::from_millis(d.0.max(1) as u64);
        ProbeCollector {
            probes: probes.to_vec(),
            backoff: Backoff {
                initial: ms(policy.backoff_initial),
                max: ms(policy.backoff_max),
                reset_after: ms(policy.backoff_reset_after),
            },
            log_interval,
        }
    }
}

impl Collector for ProbeCollector {
    fn run(self: Box<Self>, ctx: CollectorContext) -> BoxFuture {
        Box::pin(async move {
            let total = self.probes.len();
            let running = Arc::new(AtomicUsize::new(0));
            ctx.status.set_up(total == 0);
            let mut tasks = Vec::new();
            for spec in self.probes {
                // A lane of its own per probe: one that floods cannot crowd the others out.
                let mut ctx = ctx.clone();
                ctx.events = ctx.events.new_lane();
                let running = running.clone();
                let backoff = self.backoff;
                let log_interval = self.log_interval;
                tasks.push(tokio::spawn(async move {
                    supervise(spec, ctx, backoff, log_interval, running, total).await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    }
}

/// Makes the probe die with the exporter even when the exporter is killed with SIGKILL (an OOM
/// kill, a node drain's grace period running out), where `kill_on_drop` never runs: otherwise a
/// restarted exporter would leave every probe it had running behind, one set per restart.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec; prctl(PR_SET_PDEATHSIG) is
    // async-signal-safe, allocates nothing and touches no state shared with the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Reads the next line into `buf`, never holding more than `max` bytes of it.
/// `Ok(None)` at EOF, `Ok(Some(true))` for an oversized line (skipped up to its newline).
pub async fn next_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut oversized = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if oversized {
                Some(true)
            } else if buf.is_empty() {
                None
            } else {
                Some(false)
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if !oversized {
            if buf.len() + take > max {
                oversized = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Some(oversized));
        }
    }
}

fn set_running(ctx: &CollectorContext, running: &AtomicUsize, total: usize, delta: isize) {
    let now = if delta > 0 {
        running.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        running.fetch_sub(1, Ordering::Relaxed) - 1
    };
    ctx.status.set_up(now == total);
}

async fn supervise(
    spec: ProbeSpec,
    mut ctx: CollectorContext,
    backoff: Backoff,
    log_interval: Duration,
    running: Arc<AtomicUsize>,
    total: usize,
) {
    let name = spec.name();
    let (restarts, malformed) = ctx.telemetry.probes.for_probe(&name);
    let mut delay: Option<Duration> = None;
    let mut exit_log = LogLimiter::new(log_interval);
    let mut bad_log = LogLimiter::new(log_interval);
    let mut first = true;
    loop {
        if *ctx.shutdown.borrow() {
            return;
        }
        if !first {
            restarts.inc();
        }
        first = false;
        let started = Instant::now();
        let mut cmd = Command::new(spec.path());
        cmd.args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn();
        match child {
            Err(e) => {
                if let Some(suppressed) = exit_log.allow(Instant::now()) {
                    tracing::warn!(probe = %name, path = spec.path(), error = %e, suppressed, "Probe failed to start");
                }
            }
            Ok(mut child) => {
                set_running(&ctx, &running, total, 1);
                if let Some(suppressed) = exit_log.allow(Instant::now()) {
                    tracing::info!(probe = %name, pid = child.id(), suppressed, "Probe started");
                }
                let stderr = child.stderr.take().map(|s| {
                    let name = name.clone();
                    tokio::spawn(forward_stderr(name, BufReader::new(s), log_interval))
                });
                let Some(stdout) = child.stdout.take() else {
                    return;
                };
                let mut reader = BufReader::with_capacity(64 * 1024, stdout);
                let mut buf = Vec::with_capacity(512);
                let mut stopped = false;
                loop {
                    let line = tokio::select! {
                        l = next_line(&mut reader, &mut buf, MAX_LINE_BYTES) => l,
                        _ = ctx.shutdown.changed() => { stopped = true; break; }
                    };
                    let t0 = Instant::now();
                    let res = match line {
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(probe = %name, error = %e, "Reading probe output failed");
                            break;
                        }
                        Ok(Some(true)) => Err(ParseError::Oversized),
                        Ok(Some(false)) => {
                            if buf.iter().all(u8::is_ascii_whitespace) {
                                continue; // blank lines are not events, nor errors
                            }
                            parse_line(&buf)
                        }
                    };
                    match res {
                        Ok(ev) => {
                            ctx.events.send(ev);
                        }
                        Err(e) => {
                            malformed.inc();
                            ctx.events.count_bad_line(&e);
                            if let Some(suppressed) = bad_log.allow(Instant::now()) {
                                tracing::warn!(probe = %name, reason = e.reason(), error = %e, suppressed, "Probe line dropped");
                            }
                        }
                    }
                    ctx.status.set_duration(t0.elapsed().as_secs_f64());
                }
                set_running(&ctx, &running, total, -1);
                if stopped {
                    let _ = child.kill().await;
                    return;
                }
                // stdout closed: the probe exited or closed it; don't wait forever on a probe
                // that keeps running without stdout.
                let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                {
                    Ok(s) => s.ok(),
                    Err(_) => {
                        let _ = child.kill().await;
                        None
                    }
                };
                if let Some(h) = stderr {
                    h.abort();
                }
                if let Some(suppressed) = exit_log.allow(Instant::now()) {
                    tracing::warn!(probe = %name, status = ?status, ran_ms = started.elapsed().as_millis() as u64, suppressed, "Probe exited, restarting with backoff");
                }
            }
        }
        let d = backoff.next(delay, started.elapsed());
        delay = Some(d);
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = ctx.shutdown.changed() => return,
        }
    }
}

async fn forward_stderr<R: AsyncBufRead + Unpin>(name: String, mut r: R, interval: Duration) {
    // At most ~10 lines per second per probe reach the log; the rest are counted in a summary.
    let mut limiter = LogLimiter::new(interval / 100);
    let mut buf = Vec::new();
    while let Ok(Some(_)) = next_line(&mut r, &mut buf, 4096).await {
        if let Some(suppressed) = limiter.allow(Instant::now()) {
            let line = String::from_utf8_lossy(&buf);
            tracing::info!(probe = %name, suppressed, "{}", line.trim_end());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            reset_after: Duration::from_secs(10),
        };
        let short = Duration::from_millis(1);
        let mut d = b.next(None, short);
        assert_eq!(d, Duration::from_millis(100));
        for _ in 0..10 {
            d = b.next(Some(d), short);
        }
        assert_eq!(d, Duration::from_millis(1000));
        assert_eq!(
            b.next(Some(d), Duration::from_secs(60)),
            Duration::from_millis(100)
        );
    }

    #[tokio::test]
    async fn async_line_reader_bounds_lines() {
        let mut input = b"a\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\nb");
        let mut r = BufReader::with_capacity(8, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(next_line(&mut r, &mut buf, 10).await.unwrap(), Some(false));
        assert_eq!(buf, b"a");
        assert_eq!(next_line(&mut r, &mut buf, 10).await.unwrap(), Some(true));
        assert_eq!(next_line(&mut r, &mut buf, 10).await.unwrap(), Some(false));
        assert_eq!(buf, b"b");
        assert_eq!(next_line(&mut r, &mut buf, 10).await.unwrap(), None);
    }
}
