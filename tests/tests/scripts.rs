//! The shell entry points fail clearly: a missing package manager, an unknown argument.

use std::process::Command;

fn bash(script: &str) -> std::process::Output {
    Command::new("/bin/bash")
        .arg("-c")
        .arg(script)
        .current_dir(ark_harness::repo_root())
        .output()
        .expect("bash runs")
}

#[test]
fn apt_unavailable_is_a_clear_error() {
    // With an empty PATH neither dpkg-query nor apt-get is found.
    let out = bash(". scripts/lib.sh; PATH=/nonexistent ark_apt_install ark-no-such-package");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get is not available"), "{err}");
    assert!(err.contains("ark-no-such-package"), "{err}");
}

#[test]
fn installed_packages_are_not_reinstalled() {
    // bash is always installed: nothing to do, no apt-get call, success.
    let out = bash(". scripts/lib.sh; apt-get() { echo called; exit 9; }; ark_apt_install bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("called"));
}

#[test]
fn scripts_explain_themselves_and_reject_unknown_arguments() {
    for script in ["scripts/test", "scripts/demo"] {
        let help = bash(&format!("{script} --help"));
        assert!(help.status.success(), "{script} --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains(script),
            "{script} --help names itself"
        );
        let bad = bash(&format!("{script} --no-such-flag"));
        assert_eq!(
            bad.status.code(),
            Some(2),
            "{script} exits 2 on an unknown flag"
        );
        assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown argument"));
    }
}

/// Runs `scripts/demo --once` with `extra` arguments and checks the whole timeline; returns it.
fn demo_timeline(name: &str, extra: &[&str], port_region: u32) -> Option<String> {
    if ark_harness::skip_without_services(name) {
        return None;
    }
    // A port base away from the default, so a demo a person left running does not collide; each
    // test its own region of 20,000 ports (the demos run in parallel).
    let base = port_region + (std::process::id() % 2_000) * 10;
    let out = Command::new("scripts/demo")
        .arg("--once")
        .args(extra)
        .env("ARK_DEMO_PORT_BASE", base.to_string())
        .current_dir(ark_harness::repo_root())
        .output()
        .expect("scripts/demo runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "fault ", "metric ", "graph ", "alert ", "notify ", "plan ", "action ", "ticket ",
    ] {
        assert!(text.contains(step), "the timeline lacks `{step}`:\n{text}");
    }
    assert!(
        text.contains("GpuFellOffBus firing in Prometheus"),
        "{text}"
    );
    assert!(
        text.contains("Cordon → Taint(ark.io/unhealthy:NoSchedule) → Drain → RunJob(reboot)"),
        "{text}"
    );
    Some(text)
}

#[test]
fn demo_prints_the_whole_timeline() {
    demo_timeline("demo_prints_the_whole_timeline", &[], 40_000);
}

/// The same fault through the kernel-log path: the driver's line appended to the file the
/// exporter follows is the only evidence, and the exporter's series says it came from there.
#[test]
fn demo_injects_its_fault_through_the_kernel_log() {
    let Some(text) = demo_timeline(
        "demo_injects_its_fault_through_the_kernel_log",
        &["--kmsg"],
        5,
    ) else {
        return;
    };
    assert!(text.contains("NVRM: Xid (PCI:0000:3b:00): 79"), "{text}");
    assert!(
        text.contains(r#"ark_gpu_xid_errors_total{gpu="0000:3b:00.0",xid="79",source="kmsg""#),
        "{text}"
    );
}
