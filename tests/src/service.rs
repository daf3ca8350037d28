//! A child process that is a real service under test: started with its output in a log file,
//! polled for readiness, and stopped by PID (SIGTERM, then SIGKILL) when dropped, so no test
//! leaves a process behind even when it fails.

use std::fs::File;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running service process. Dropping it stops the process.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Mutex<Child>,
    log: PathBuf,
}

impl Service {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child: Mutex::new(child),
            log: log.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.lock().id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        // A poisoned lock only means another test thread panicked; the child is still valid.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` with the log's tail when the process has exited.
    pub fn ensure_running(&self) -> Result<()> {
        if let Some(status) = self.lock().try_wait()? {
            bail!(
                "{} exited ({status}) before it was ready; log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the service's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            text = String::from_utf8_lossy(&buf).into_owned();
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `signal` to the process (e.g. `libc::SIGKILL` to simulate a crash).
    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with a PID we spawned and still own (not yet reaped); no memory is
        // touched. std offers only SIGKILL (`Child::kill`), and a graceful stop needs SIGTERM.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Stops the process: SIGTERM, up to 5 s grace, then SIGKILL. Idempotent.
    pub fn stop(&self) {
        let mut child = self.lock();
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        drop(child);
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut child = self.lock();
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until the process exits on its own, up to `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.lock().try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 must work on loopback")
}

/// `Err` with a clear message when `port` is already taken on 127.0.0.1.
pub fn ensure_port_free(port: u16) -> Result<()> {
    match TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "port 127.0.0.1:{port} is already in use ({e}); stop what holds it or pick another port"
        ),
    }
}

/// Polls `probe` every 50 ms until it yields `Some`, checking that each service in `alive` is
/// still running; fails after `timeout` with the last probe error and the services' log tails.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    alive: &[&Service],
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    loop {
        for s in alive {
            s.ensure_running()?;
        }
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            let logs: Vec<String> = alive
                .iter()
                .map(|s| {
                    format!(
                        "--- {} ({}):\n{}",
                        s.name(),
                        s.log_path().display(),
                        s.log_tail(15)
                    )
                })
                .collect();
            bail!(
                "timed out after {timeout:?} waiting for {what} (last: {last})\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Formats a duration the way Prometheus and Alertmanager configs expect (`1s`, `100ms`).
pub fn prom_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_reported_clearly() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let err = ensure_port_free(port).unwrap_err().to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{port} is already in use")),
            "{err}"
        );
        drop(l);
        ensure_port_free(port).unwrap();
    }

    #[tokio::test]
    async fn a_service_that_dies_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("svc.log");
        let svc = Service::spawn(
            "dying",
            Command::new("sh").args(["-c", "echo 'bind: address already in use'; exit 3"]),
            &log,
        )
        .unwrap();
        let err = wait_for("never", Duration::from_secs(10), &[&svc], || async {
            Ok(None::<()>)
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("dying exited"), "{err}");
        assert!(err.contains("address already in use"), "{err}");
        assert!(err.contains(&log.display().to_string()), "{err}");
    }

    #[test]
    fn stop_kills_a_process_that_ignores_sigterm_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::spawn(
            "stubborn",
            Command::new("sh").args(["-c", "trap '' TERM; while :; do sleep 0.1; done"]),
            &dir.path().join("s.log"),
        )
        .unwrap();
        let pid = svc.pid();
        std::thread::sleep(Duration::from_millis(200));
        drop(svc);
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false);
        assert!(!alive, "pid {pid} still alive after drop");
    }

    #[test]
    fn durations_in_prometheus_syntax() {
        assert_eq!(prom_duration(Duration::from_secs(1)), "1s");
        assert_eq!(prom_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(prom_duration(Duration::from_millis(1500)), "1500ms");
    }
}
