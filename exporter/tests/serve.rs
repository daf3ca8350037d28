//! The binary as the e2e test and the scripts run it:
//! `ark-exporter --web.listen-address 127.0.0.1:PORT --node-name n1 --probe ./inject.sh --rules rules/`,
//! then `/healthz`, `/readyz`, `/metrics` and `ark-exporter why <pid>`.

mod common;
use common::{Kill, free_port, http_get};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn serve_probe_rules_metrics_and_why() {
    let d = tempfile::tempdir().unwrap();
    let probe = d.path().join("inject.sh");
    let trigger = d.path().join("go");
    // Waits for the test to create `go`, then writes events: so the test sees them arrive.
    std::fs::write(
        &probe,
        format!(
            r#"#!/bin/sh
while [ ! -e {go} ]; do sleep 0.05; done
now=$(date +%s%3N)
echo "{{\"ts\": $now, \"event_type\": \"compute.util\", \"entity_id\": \"gpu-0\", \"job_id\": \"train\", \"pid\": 4242, \"value\": \"97\"}}"
echo "{{\"ts\": $now, \"event_type\": \"error.hw\", \"entity_id\": \"gpu-0\", \"job_id\": null, \"pid\": null, \"value\": \"XID 79\"}}"
exec sleep 1000
"#,
            go = trigger.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let bin = env!("CARGO_BIN_EXE_ark-exporter");
    let _child = Kill(
        Command::new(bin)
            .args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--node-name",
                "n1",
            ])
            .arg("--probe")
            .arg(&probe)
            .arg("--rules")
            .arg(&rules)
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut up = false;
    for _ in 0..500 {
        if get(port, "/healthz").is_some_and(|(s, _)| s == 200) {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(up, "exporter did not come up");
    assert_eq!(get(port, "/readyz").unwrap().0, 200);
    let (_, before) = get(port, "/metrics").unwrap();
    assert!(
        before.contains("ark_graph_nodes{kind=\"process\",node=\"n1\"} 0"),
        "{before}"
    );
    assert!(
        before.contains("ark_rules_loaded{state=\"loaded\",node=\"n1\"} 11"),
        "{before}"
    );

    std::fs::write(&trigger, "").unwrap();
    let mut text = String::new();
    for _ in 0..500 {
        text = get(port, "/metrics").unwrap().1;
        if text.contains("scene=\"hardware.gpu.xid_error\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        text.contains("ark_scene_active{scene=\"hardware.gpu.xid_error\",entity=\"gpu-0\",job_id=\"\",severity=\"critical\",node=\"n1\"} 1"),
        "{text}"
    );
    assert!(text.contains("ark_root_cause{job_id=\"train\",pod=\"\",namespace=\"\",resource=\"gpu-0\",cause=\"error.hw\",node=\"n1\"} 1"));
    assert!(
        text.contains("ark_events_total{event_type=\"error.hw\",source=\"probe\",node=\"n1\"} 1")
    );

    let (status, body) = get(port, "/api/v1/why/4242").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("error-gpu-0"), "{body}");

    let out = Command::new(bin)
        .args(["why", "4242", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("root cause: error.hw on gpu-0 (XID 79)"),
        "{printed}"
    );
    assert!(
        printed.contains("pid-4242 --consumes--> gpu-0 --blocked_by--> error-gpu-0"),
        "{printed}"
    );

    let out = Command::new(bin)
        .args(["why", "7", "--url", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "unknown pid is an error");
}

#[test]
fn help_and_bad_flags() {
    let bin = env!("CARGO_BIN_EXE_ark-exporter");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--web.listen-address",
        "--probe",
        "--rules",
        "--node-name",
        "replay",
        "why",
        "bench",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
    let out = Command::new(bin).arg("--no-such-flag").output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(bin)
        .args([
            "--web.listen-address",
            "127.0.0.1:1",
            "--no-collector",
            "bogus",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "unknown collector is a startup error"
    );
}

#[test]
fn replay_json_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
        .arg("replay")
        .arg(root.join("../rules/tests/nvlink_xid74.jsonl"))
        .arg("--rules")
        .arg(root.join("../rules"))
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scenes = v["scenes"].as_array().unwrap();
    assert_eq!(scenes.len(), 2);
    for s in scenes {
        for key in ["scene", "rule_id", "reason_codes", "actions", "evidence"] {
            assert!(s.get(key).is_some(), "missing {key}");
        }
    }
    assert!(v["root_causes"].is_array());
    assert_eq!(v["root_causes"][0]["cause"], "error.hw");
}

/// A probe must not outlive its exporter, even one killed with SIGKILL (no destructor runs then).
#[test]
fn probes_die_with_a_killed_exporter() {
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("probe.pid");
    let probe = d.path().join("hang.sh");
    std::fs::write(
        &probe,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 1000\n",
            pidfile.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let mut exporter = Kill(
        Command::new(env!("CARGO_BIN_EXE_ark-exporter"))
            .args(["--web.listen-address", &format!("127.0.0.1:{port}")])
            .args(["--node-name", "n1", "--no-collector", "ebpf"])
            .arg("--probe")
            .arg(&probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut pid = None;
    for _ in 0..500 {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            pid = Some(p);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = pid.expect("the probe started");
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z ") && !s.contains(") X "))
    };
    assert!(alive(pid));
    exporter.0.kill().unwrap(); // SIGKILL
    exporter.0.wait().unwrap();
    let mut gone = false;
    for _ in 0..250 {
        if !alive(pid) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone, "probe {pid} outlived its SIGKILLed exporter");
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get(port, path, Duration::from_secs(5))
}
