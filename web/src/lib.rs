//! The HTTP server both Ark binaries use (`ark-exporter` on :9487, `ark-healer` on :9488).
//!
//! - [`server`]: the accept loop. Every limit is explicit ([`Limits`]): a connection limit with a
//!   small reserve that answers only the health probes, a header-read timeout, a maximum header
//!   size, a request (body) timeout and an idle timeout. See SECURITY.md "HTTP servers".
//! - [`config`]: `--web.config.file` in the Prometheus exporter-toolkit format (TLS, client
//!   certificates, basic auth with bcrypt hashes).
//! - [`layers`]: gzip, the request timeout, basic auth, the health-only filter of the reserve.
//! - [`process_and_build_info`]: `process_*` metrics and `<prefix>_build_info{version,revision}`.

use std::time::Duration;

use anyhow::{Context, bail};

pub mod config;
pub mod layers;
pub mod server;

pub use config::WebConfig;
pub use server::{Server, serve};

/// Git revision of the build (`unknown` outside git), from `build.rs`.
pub const REVISION: &str = env!("ARK_REVISION");

/// Paths served to the reserve connections and never behind basic auth: the kubelet probes.
pub const HEALTH_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Server limits. Defaults fit a node-local exporter scraped every 15 s by a few Prometheus
/// servers; all are flags ([`WebArgs`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Whole request head (request line + headers) must arrive within this, counted from when
    /// the connection waits for a request; also bounds an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Handling of one request, reading its body included: past it, 408 and the connection closes.
    pub request_timeout: Duration,
    /// A connection with no byte in either direction for this long is closed (a client that
    /// stopped reading its response, or stopped sending a body the handler does not read).
    pub idle_timeout: Duration,
    /// Largest request head (hyper's read buffer; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Connections served at once; more are refused at accept (closed at once).
    pub max_connections: usize,
    /// Extra connections, past `max_connections`, that answer only `/healthz` and `/readyz`
    /// with `reserve_timeout` as their header-read timeout and no keep-alive.
    pub health_reserve: usize,
    pub reserve_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
            health_reserve: 32,
            reserve_timeout: Duration::from_secs(1),
        }
    }
}

/// Server flags shared by both binaries (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebArgs {
    /// Exporter-toolkit web configuration (TLS, client certificates, basic auth with bcrypt
    /// hashes); see docs/web-config.md. Without it: plain HTTP, no authentication.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,
    /// Connections served at once; more are closed at accept (past a small health reserve).
    #[arg(long = "web.max-connections", default_value_t = Limits::default().max_connections, value_name = "N")]
    pub max_connections: usize,
    /// Connections kept, past --web.max-connections, for /healthz and /readyz only.
    #[arg(long = "web.health-reserve", default_value_t = Limits::default().health_reserve, value_name = "N")]
    pub health_reserve: usize,
    /// Time for a client to send the whole request head; also the keep-alive idle time.
    #[arg(long = "web.header-read-timeout", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,
    /// Time to handle one request, reading its body included (408 past it).
    #[arg(long = "web.request-timeout", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
    /// A connection silent in both directions this long is closed.
    #[arg(long = "web.idle-timeout", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,
    /// Largest request head in bytes (request line and headers; at least 8192).
    #[arg(long = "web.max-header-bytes", default_value_t = Limits::default().max_header_bytes, value_name = "BYTES")]
    pub max_header_bytes: usize,
}

impl WebArgs {
    /// The limits, checked.
    pub fn limits(&self) -> anyhow::Result<Limits> {
        if self.max_connections == 0 {
            bail!("--web.max-connections must be at least 1");
        }
        if self.max_header_bytes < 8192 {
            bail!(
                "--web.max-header-bytes must be at least 8192 (got {})",
                self.max_header_bytes
            );
        }
        for (flag, d) in [
            ("--web.header-read-timeout", self.header_read_timeout),
            ("--web.request-timeout", self.request_timeout),
            ("--web.idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                bail!("{flag} must be positive");
            }
        }
        Ok(Limits {
            header_read_timeout: self.header_read_timeout,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_header_bytes,
            max_connections: self.max_connections,
            health_reserve: self.health_reserve,
            reserve_timeout: Limits::default()
                .reserve_timeout
                .min(self.header_read_timeout),
        })
    }

    /// The web configuration file, loaded and checked (an empty one without the flag).
    pub fn web_config(&self) -> anyhow::Result<WebConfig> {
        match &self.config_file {
            Some(p) => WebConfig::load(p),
            None => Ok(WebConfig::default()),
        }
    }
}

/// `500ms`, `10s`, `2m`, or plain seconds (`10`).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?} (want e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => bail!("invalid duration unit in {s:?} (want ms, s or m)"),
    };
    Duration::try_from_secs_f64(secs).with_context(|| format!("invalid duration {s:?}"))
}

/// Registers the `process_*` metrics (CPU, RSS, open fds, start time; from /proc/self) and
/// `<build_info_name>{version,revision} 1` in `registry`.
pub fn process_and_build_info(
    registry: &prometheus::Registry,
    build_info_name: &str,
    version: &str,
) -> anyhow::Result<()> {
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering process metrics")?;
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            build_info_name,
            "A metric with a constant 1 labelled by the version and git revision of the build.",
        ),
        &["version", "revision"],
    )?;
    info.with_label_values(&[version, REVISION]).set(1);
    registry
        .register(Box::new(info))
        .context("registering build info")?;
    Ok(())
}

/// `--version` text of both binaries (one workspace version): `0.1.0 (revision 1a2b3c4d5e6f)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("ARK_REVISION"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn build_info_and_process_metrics() {
        let r = prometheus::Registry::new();
        process_and_build_info(&r, "ark_test_build_info", "1.2.3").unwrap();
        let names: Vec<_> = r.gather().iter().map(|f| f.name().to_owned()).collect();
        assert!(
            names.iter().any(|n| n == "process_resident_memory_bytes"),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n == "ark_test_build_info"));
    }
}
