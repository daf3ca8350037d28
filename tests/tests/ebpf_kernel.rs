//! The eBPF collector on the real kernel: TCP retransmits made by an nftables rule that drops
//! ~30 % of a test port's packets in a network namespace of our own must show up in the
//! exporter's `/metrics`, attributed to the pod whose (synthetic) cgroup the sender runs in; and
//! `dd oflag=direct` must grow the block-latency histogram. Needs root (CAP_BPF, CAP_PERFMON,
//! CAP_NET_ADMIN, CAP_SYS_ADMIN); without it the test says so and skips. The namespace, the
//! nftables table (inside it) and the cgroups are removed in all cases.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ark_harness::{Service, free_port, wait_for};

const POD_UID: &str = "5e1f7c2a-9b3d-4e8f-a0c1-d2e3f4a5b6c7";
const CID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn is_root_with_caps() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    // CAP_NET_ADMIN (12) for the namespace, CAP_SYS_ADMIN (21) for mounts and BPF.
    eff & (1 << 12) != 0 && eff & (1 << 21) != 0
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything the test creates in the kernel; removed on drop, whatever happened.
struct KernelFixture {
    netns: String,
    cgroup_root: PathBuf,
    mounted: Option<PathBuf>,
    pod_cgroup: PathBuf,
}

impl KernelFixture {
    fn create(port: u16) -> Result<Self> {
        let id = std::process::id();
        let netns = format!("ark-ebpf-{id}");
        // A cgroup2 hierarchy: the host's if it has one, else a private mount.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let existing = mountinfo.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.starts_with("cgroup2 "))
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        });
        let (root, mounted) = match existing {
            Some(r) => (r, None),
            None => {
                let m = PathBuf::from(format!("/run/ark-test-cgroup2-{id}"));
                std::fs::create_dir_all(&m)?;
                run(
                    "mount",
                    &["-t", "cgroup2", "none", m.to_str().unwrap_or_default()],
                )?;
                (m.clone(), Some(m))
            }
        };
        let cgroup_root = root.join(format!("ark-test-{id}"));
        let pod_cgroup = cgroup_root.join(format!("kubepods/besteffort/pod{POD_UID}/{CID}"));
        let fx = KernelFixture {
            netns,
            cgroup_root,
            mounted,
            pod_cgroup,
        };
        std::fs::create_dir_all(&fx.pod_cgroup).context("creating the test cgroup")?;
        run("ip", &["netns", "add", &fx.netns])?;
        run("ip", &["-n", &fx.netns, "link", "set", "lo", "up"])?;
        // Drop on INPUT: a drop on OUTPUT is a local error to TCP, not a retransmit.
        let rules = format!(
            "table inet ark_test {{\n chain in {{\n  type filter hook input priority 0;\n  \
             tcp dport {port} numgen random mod 100 < 30 drop\n }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("ark-test-{id}.nft"));
        std::fs::write(&file, rules)?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &fx.netns,
                "nft",
                "-f",
                file.to_str().unwrap_or_default(),
            ],
        )?;
        let _ = std::fs::remove_file(&file);
        Ok(fx)
    }
}

impl Drop for KernelFixture {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.netns]);
        // Leaf first; a cgroup can be removed once its processes are gone.
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut p = self.pod_cgroup.clone();
        while p.starts_with(&self.cgroup_root) {
            dirs.push(p.clone());
            if !p.pop() {
                break;
            }
        }
        for d in dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some(m) = &self.mounted {
            let _ = run("umount", &[m.to_str().unwrap_or_default()]);
            let _ = std::fs::remove_dir(m);
        }
    }
}

const SENDER: &str = r#"
import socket, threading, time, sys
port = int(sys.argv[1]); secs = float(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(1)
def sink():
    c, _ = srv.accept()
    while c.recv(65536): pass
threading.Thread(target=sink, daemon=True).start()
cl = socket.create_connection(("127.0.0.1", port))
end = time.time() + secs; buf = b"x" * 16384
while time.time() < end:
    cl.sendall(buf); time.sleep(0.001)
"#;

async fn scrape(port: u16) -> Result<String> {
    Ok(reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?)
}

fn sum_of(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[tokio::test]
async fn retransmits_and_block_latency_from_the_real_kernel() -> Result<()> {
    if ark_harness::skip_without_services("retransmits_and_block_latency_from_the_real_kernel") {
        return Ok(());
    }
    if !is_root_with_caps() {
        eprintln!(
            "SKIPPED retransmits_and_block_latency_from_the_real_kernel: needs root \
             (CAP_SYS_ADMIN, CAP_NET_ADMIN) to load BPF and create a network namespace"
        );
        return Ok(());
    }
    let test_port = 20_000 + (std::process::id() % 20_000) as u16;
    let fx = KernelFixture::create(test_port)?;

    let dir = tempfile::tempdir()?;
    let web = free_port();
    let exporter = Service::spawn(
        "ark-exporter",
        Command::new(ark_harness::bin_path("ark-exporter"))
            .args(["--web.listen-address", &format!("127.0.0.1:{web}")])
            .args(["--node-name", "ebpf-test", "--no-collector", "probe"])
            .env("ARK_EBPF__POLL_INTERVAL", "200ms"),
        &dir.path().join("exporter.log"),
    )?;
    wait_for(
        "eBPF collector up",
        Duration::from_secs(30),
        &[&exporter],
        || async {
            let m = scrape(web).await?;
            if m.contains("ark_collector_up{collector=\"ebpf\",node=\"ebpf-test\"} 0") {
                bail!(
                    "eBPF collector reports up 0; exporter log:\n{}",
                    exporter.log_tail(20)
                );
            }
            Ok(
                m.contains("ark_collector_up{collector=\"ebpf\",node=\"ebpf-test\"} 1")
                    .then_some(()),
            )
        },
    )
    .await?;

    // The sender runs in the pod's cgroup (its sockets inherit it) and the test namespace.
    let procs = fx.pod_cgroup.join("cgroup.procs");
    let script = format!(
        "echo $$ > {procs} && exec ip netns exec {ns} python3 -c '{SENDER}' {test_port} 4",
        procs = path_str(&procs),
        ns = fx.netns,
    );
    let sender = Service::spawn(
        "tcp-sender",
        Command::new("sh").args(["-c", &script]),
        &dir.path().join("sender.log"),
    )?;
    let sender_pid = sender.pid();
    let series =
        format!("ark_tcp_retransmits_total{{pod=\"{POD_UID}\",namespace=\"\",node=\"ebpf-test\"}}");
    let retransmits = wait_for(
        "retransmits attributed to the test pod",
        Duration::from_secs(30),
        &[&exporter],
        || async {
            let m = scrape(web).await?;
            let v = sum_of(&m, &series);
            Ok((v > 0.0).then_some((v, m)))
        },
    )
    .await?;
    assert!(retransmits.0 > 0.0);
    // The sender process (found through its cgroup) WaitsOn the loopback interface.
    let waits = format!("pid=\"{sender_pid}\"");
    let m = wait_for(
        "WaitsOn edge of the sender",
        Duration::from_secs(10),
        &[&exporter],
        || async {
            let m = scrape(web).await?;
            Ok(m.lines()
                .any(|l| {
                    l.starts_with("ark_waits_on{")
                        && l.contains(&waits)
                        && l.contains("resource=\"network-lo\"")
                })
                .then_some(m))
        },
    )
    .await?;
    assert!(m.contains("ark_ebpf_program_attached{"));
    let _ = sender.wait_exit(Duration::from_secs(30));

    // Direct I/O on a real disk (not tmpfs) grows the latency histogram.
    let before = sum_of(&scrape(web).await?, "ark_block_io_latency_seconds_count{");
    let file = PathBuf::from(format!("/var/tmp/ark-ebpf-dd-{}", std::process::id()));
    let dd = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", path_str(&file)),
            "bs=4k",
            "count=256",
            "oflag=direct",
        ],
    );
    let _ = std::fs::remove_file(&file);
    dd?;
    wait_for(
        "block latency histogram to grow",
        Duration::from_secs(10),
        &[&exporter],
        || async {
            let after = sum_of(&scrape(web).await?, "ark_block_io_latency_seconds_count{");
            Ok((after >= before + 256.0).then_some(()))
        },
    )
    .await?;
    drop(fx);
    Ok(())
}
