//! The HTTP servers of both binaries under hostile clients (issue 15 scenario 3) and the
//! surface every Prometheus exporter has (scenario 5), on the real `ark-exporter` and
//! `ark-healer` binaries on 127.0.0.1:
//! - header-less, idle, slowloris, slow-body and 380 KB-header connections are all closed
//!   (EOF or reset) and peak RSS stays bounded;
//! - `/healthz` answers while 1,000 hostile connections are held (the pool, and the health
//!   reserve once the pool is full);
//! - gzip, `--web.config.file` (TLS, required client certificate, bcrypt basic auth), build info,
//!   `process_*`, `--version`, the `why` client over https.
//!
//! Times are printed, not asserted; the bound on each wait only ends a test that would hang.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ark_harness::{Service, bin_path, free_port};

const TOKEN: &str = "web-test-token";

struct Bin {
    svc: Service,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Starts `ark-exporter` or `ark-healer` (dry run, no cluster) on a free port, waits for /healthz.
fn start(which: &str, extra: &[&str], tls: bool) -> Bin {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(bin_path(which));
    if which == "ark-exporter" {
        cmd.args(["--web.listen-address", &listen, "--node-name", "n1"])
            .args(["--no-collector", "pods", "--no-collector", "ebpf"]);
    } else {
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        cmd.args(["serve", "--dry-run", "--web.listen-address", &listen])
            .arg("--webhook-token-file")
            .arg(&token)
            .env("KUBECONFIG", dir.path().join("missing-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST");
    }
    cmd.args(extra);
    let svc = Service::spawn(which, &mut cmd, &dir.path().join("log")).unwrap();
    let t0 = Instant::now();
    loop {
        svc.ensure_running().unwrap();
        if tls {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
        } else if get(port, "/healthz").is_some_and(|(s, _)| s == 200) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{which} did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Bin {
        svc,
        port,
        _dir: dir,
    }
}

/// One plain GET on a fresh connection: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out))
}

fn vm_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A hostile connection and what it keeps doing.
struct Hostile {
    s: TcpStream,
    kind: &'static str,
    trickle: Option<&'static [u8]>,
    opened: Instant,
    closed: Option<Duration>,
}

fn open(port: u16, kind: &'static str, first: &[u8], trickle: Option<&'static [u8]>) -> Hostile {
    let opened = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    if !first.is_empty() {
        // A big head may be cut off by the server's 431 + close: that is the point.
        let _ = s.write_all(first);
    }
    s.set_nonblocking(true).unwrap();
    Hostile {
        s,
        kind,
        trickle,
        opened,
        closed: None,
    }
}

/// Drives every connection (trickling bytes, reading) until the server closed each one or
/// `bound` passed; prints how many of each kind closed and when. Returns the ones still open.
fn wait_closed(conns: &mut [Hostile], bound: Duration) -> usize {
    let t0 = Instant::now();
    let mut buf = [0u8; 64 * 1024];
    let mut last_trickle = Instant::now();
    while t0.elapsed() < bound && conns.iter().any(|c| c.closed.is_none()) {
        let trickle_now = last_trickle.elapsed() >= Duration::from_millis(200);
        if trickle_now {
            last_trickle = Instant::now();
        }
        for c in conns.iter_mut().filter(|c| c.closed.is_none()) {
            if trickle_now
                && let Some(b) = c.trickle
                && matches!(c.s.write(b), Err(e) if e.kind() != ErrorKind::WouldBlock)
            {
                c.closed = Some(c.opened.elapsed());
                continue;
            }
            match c.s.read(&mut buf) {
                Ok(0) => c.closed = Some(c.opened.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => c.closed = Some(c.opened.elapsed()),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut kinds: Vec<&str> = conns.iter().map(|c| c.kind).collect();
    kinds.dedup();
    for k in kinds {
        let of: Vec<_> = conns.iter().filter(|c| c.kind == k).collect();
        let closed: Vec<Duration> = of.iter().filter_map(|c| c.closed).collect();
        eprintln!(
            "  {k}: {}/{} closed by the server, the last {:.2} s after it connected",
            closed.len(),
            of.len(),
            closed.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64()
        );
    }
    conns.iter().filter(|c| c.closed.is_none()).count()
}

fn hostile_clients_are_closed(which: &str) {
    let bin = start(
        which,
        &[
            "--web.header-read-timeout",
            "1s",
            "--web.request-timeout",
            "2s",
            "--web.idle-timeout",
            "3s",
        ],
        false,
    );
    let pid = bin.svc.pid();
    let rss0 = vm_kib(pid, "VmRSS:");
    let port = bin.port;
    let mut conns = Vec::new();
    for _ in 0..200 {
        conns.push(open(port, "header-less", b"", None));
    }
    for _ in 0..50 {
        // A complete request, its answer read, then silence on a keep-alive connection.
        conns.push(open(
            port,
            "idle keep-alive",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            None,
        ));
    }
    for _ in 0..50 {
        conns.push(open(
            port,
            "slowloris",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
            Some(b"X-a: b\r\n"),
        ));
    }
    let body_req: &[u8] = if which == "ark-healer" {
        b"POST /api/v1/alerts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer web-test-token\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
    } else {
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
    };
    for _ in 0..50 {
        conns.push(open(port, "slow body", body_req, Some(b" ")));
    }
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Big: 0123456789012345678901234567890123456789012345678901234567890123456789\r\n"
            .repeat(5_000)
    );
    let big: &'static [u8] = Box::leak(big.into_bytes().into_boxed_slice());
    eprintln!(
        "{which}: {} bytes of headers per big-header connection",
        big.len()
    );
    for _ in 0..200 {
        conns.push(open(port, "big headers", big, None));
    }
    let open_left = wait_closed(&mut conns, Duration::from_secs(15));
    let hwm = vm_kib(pid, "VmHWM:");
    eprintln!("{which}: RSS {rss0} KiB at start, peak {hwm} KiB under the hostile clients");
    assert_eq!(open_left, 0, "connections the server never closed");
    assert!(hwm < 128 * 1024, "{which} peaked at {hwm} KiB");
    assert_eq!(get(port, "/healthz").map(|r| r.0), Some(200));
}

#[test]
fn exporter_closes_slowloris_idle_slow_body_and_big_header_connections() {
    hostile_clients_are_closed("ark-exporter");
}

#[test]
fn healer_closes_slowloris_idle_slow_body_and_big_header_connections() {
    hostile_clients_are_closed("ark-healer");
}

/// `/healthz` on a fresh connection while `hostile` header-less connections are held; retried
/// while the health reserve is still full of hostile connections (they go after 1 s).
fn health_under(which: &str, extra: &[&str], hostile: usize) {
    let bin = start(which, extra, false);
    let held: Vec<TcpStream> = (0..hostile)
        .map(|_| TcpStream::connect(("127.0.0.1", bin.port)).unwrap())
        .collect();
    let t0 = Instant::now();
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        let t = Instant::now();
        if let Some((200, _)) = get(bin.port, "/healthz") {
            break Some(t.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let latency = answer.expect("/healthz never answered while hostile connections were held");
    eprintln!(
        "{which} {extra:?}: /healthz answered in {:.1} ms (try {tries}) with {} hostile connections held",
        latency.as_secs_f64() * 1000.0,
        held.len()
    );
    if extra.contains(&"--web.max-connections") {
        // The reserve serves the probes only.
        let (status, _) = get(bin.port, "/metrics").unwrap_or((0, String::new()));
        assert!(
            status == 503 || status == 0,
            "reserve answered /metrics with {status}"
        );
    }
}

#[test]
fn health_answers_while_1000_hostile_connections_are_held() {
    raise_nofile();
    health_under("ark-exporter", &[], 1000);
    health_under("ark-healer", &[], 1000);
    // Pool smaller than the flood: the health reserve answers.
    health_under("ark-exporter", &["--web.max-connections", "100"], 1000);
}

/// The soft open-file limit of this test process raised to its hard limit (1,000 sockets).
#[allow(unsafe_code)]
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed, which lives on this stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    assert!(
        lim.rlim_cur >= 1200,
        "this test holds 1,000 sockets: the open-file limit is {} (raise the hard limit)",
        lim.rlim_cur
    );
}

#[test]
fn metrics_are_gzipped_when_asked_and_carry_build_and_process_metrics() {
    for (which, info) in [
        ("ark-exporter", "ark_build_info{"),
        ("ark-healer", "ark_healer_build_info{"),
    ] {
        let bin = start(which, &[], false);
        let url = format!("http://127.0.0.1:{}/metrics", bin.port);
        let c = reqwest::blocking::Client::new();
        let plain = c.get(&url).send().unwrap();
        assert!(plain.headers().get("content-encoding").is_none());
        let plain = plain.text().unwrap();
        assert!(plain.contains(info), "{plain}");
        assert!(plain.contains("process_resident_memory_bytes"));
        assert!(plain.contains("process_open_fds"));
        let gz = c
            .get(&url)
            .header("Accept-Encoding", "gzip")
            .send()
            .unwrap();
        assert_eq!(gz.headers()["content-encoding"], "gzip");
        let gz = gz.bytes().unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        eprintln!(
            "{which}: /metrics {} bytes plain, {} bytes gzip",
            plain.len(),
            gz.len()
        );
        let v = Command::new(bin_path(which))
            .arg("--version")
            .output()
            .unwrap();
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(
            v.contains(env!("CARGO_PKG_VERSION")) && v.contains("revision"),
            "{v}"
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let st = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) {
    let ext = dir.join("san.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=ark-test-ca",
        ],
    );
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
    // rustls wants PKCS#8 or SEC1 keys: openssl 3 writes PKCS#8.
}

#[test]
fn web_config_tls_client_certs_and_basic_auth_on_both_binaries() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_certs(d);
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let cfg = d.join("web.yml");
    std::fs::write(
        &cfg,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\nbasic_auth_users:\n  prom: '{hash}'\n"
        ),
    )
    .unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.crt")).unwrap()).unwrap();
    let mut id = std::fs::read(d.join("client.crt")).unwrap();
    id.extend(std::fs::read(d.join("client.key")).unwrap());
    let with_cert = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&id).unwrap())
        .build()
        .unwrap();
    let without_cert = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    for which in ["ark-exporter", "ark-healer"] {
        let bin = start(which, &["--web.config.file", cfg_arg], true);
        let base = format!("https://127.0.0.1:{}", bin.port);
        let status = |r: reqwest::blocking::RequestBuilder| r.send().map(|r| r.status().as_u16());
        let m = format!("{base}/metrics");
        assert_eq!(
            status(with_cert.get(&m).basic_auth("prom", Some("s3cret"))).unwrap(),
            200,
            "{which}"
        );
        assert_eq!(
            status(with_cert.get(&m).basic_auth("prom", Some("wrong"))).unwrap(),
            401,
            "{which}"
        );
        assert_eq!(
            status(with_cert.get(&m).basic_auth("nobody", Some("s3cret"))).unwrap(),
            401
        );
        assert_eq!(status(with_cert.get(&m)).unwrap(), 401);
        // Probes need no password.
        assert_eq!(
            status(with_cert.get(format!("{base}/healthz"))).unwrap(),
            200
        );
        // No client certificate: the handshake fails, nothing is served.
        let e = status(without_cert.get(&m).basic_auth("prom", Some("s3cret")));
        assert!(
            e.is_err(),
            "{which} served a client without a certificate: {e:?}"
        );
        // Plain HTTP on the TLS port gets nothing either.
        assert!(get(bin.port, "/metrics").is_none_or(|(s, _)| s != 200));
        if which == "ark-healer" {
            // The webhook keeps its bearer token, outside basic auth.
            let r = with_cert
                .post(format!("{base}/api/v1/alerts"))
                .bearer_auth(TOKEN)
                .json(&serde_json::json!({"version": "4", "status": "firing", "alerts": []}))
                .send()
                .unwrap();
            assert_ne!(r.status().as_u16(), 401);
        } else {
            // `why` over https with the CA, the client certificate and basic auth: it reaches
            // the API (the pid is not in the graph), and a wrong password is a clear 401.
            let why = |pw: &str| {
                Command::new(bin_path("ark-exporter"))
                    .args(["why", "4242", "--url", &base, "--user", "prom"])
                    .arg("--tls.ca-file")
                    .arg(d.join("ca.crt"))
                    .arg("--tls.cert-file")
                    .arg(d.join("client.crt"))
                    .arg("--tls.key-file")
                    .arg(d.join("client.key"))
                    .env("ARK_WHY_PASSWORD", pw)
                    .output()
                    .unwrap()
            };
            let ok = why("s3cret");
            let err = String::from_utf8_lossy(&ok.stderr);
            assert!(err.contains("not in the causal graph"), "{err}");
            let bad = why("wrong");
            let err = String::from_utf8_lossy(&bad.stderr);
            assert!(err.contains("401"), "{err}");
        }
    }
}

#[test]
fn bad_web_config_is_a_clear_error_at_start() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("web.yml");
    std::fs::write(&cfg, "basic_auth_users:\n  prom: plaintext\n").unwrap();
    let out = Command::new(bin_path("ark-exporter"))
        .args(["--web.listen-address", "127.0.0.1:0", "--web.config.file"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a bcrypt hash"), "{err}");
}
