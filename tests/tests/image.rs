//! The container images `scripts/image` builds: each OCI archive carries everything its binary
//! needs. Without a container runtime that runs here (`podman run` is refused on this machine
//! kind, see shared/REAL-SERVICES.md), each image is unpacked with umoci and its entrypoint run
//! inside that root filesystem (a private mount namespace + chroot), with the same arguments,
//! mounts and user its Kubernetes manifest gives it: `--version` answers, and the exporter and
//! the healer serve `/healthz`, `/readyz` and `/metrics` from inside the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ark_harness::{Service, free_port, repo_root, skip_without_services, wait_for};
use serde_json::Value;

/// Builds the images from the binaries the other tests use (`ARK_BIN_DIR`, else target/debug)
/// into `out`: `(name, archive)` per image, as the script printed them.
fn build_images(out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let bin_dir = std::env::var_os("ARK_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug"));
    let run = Command::new(repo_root().join("scripts/image"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out)
        .output()
        .context("running scripts/image")?;
    ensure!(
        run.status.success(),
        "scripts/image failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout)?;
    Ok(stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3).then(|| (f[0].to_owned(), PathBuf::from(f[2])))
        })
        .collect())
}

/// Unpacks `<layout>:<version>` into `bundle` (rootfs + runtime-spec config.json) and returns
/// the config the runtime would use.
fn unpack(layout: &Path, version: &str, bundle: &Path) -> Result<Value> {
    let st = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{version}", layout.display()))
        .arg(bundle)
        .output()
        .context("running umoci unpack")?;
    ensure!(
        st.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    Ok(serde_json::from_slice(&std::fs::read(
        bundle.join("config.json"),
    )?)?)
}

/// The image's entrypoint run as its configured user inside `rootfs`, with `binds` (host path,
/// path inside) mounted read-only in a private mount namespace: what a runtime does, minus
/// cgroups and namespaces the test does not need.
fn in_image(rootfs: &Path, user: (u64, u64), binds: &[(&str, &str)], argv: &[String]) -> Command {
    let mut script = String::from("set -e\n");
    for (host, inside) in binds {
        let target = rootfs.join(inside.trim_start_matches('/'));
        script += &format!(
            "mkdir -p '{t}' && mount --rbind '{host}' '{t}' && mount -o remount,bind,ro '{t}'\n",
            t = target.display()
        );
    }
    script += &format!(
        "exec chroot --userspec={}:{} '{}'",
        user.0,
        user.1,
        rootfs.display()
    );
    for a in argv {
        script += &format!(" '{a}'");
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--fork", "--kill-child", "sh", "-c", &script]);
    // Its own process group, which [`Group`] kills: `--kill-child` alone does not reach a
    // child that changed its user (the kernel clears the parent-death signal on setuid).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd
}

/// Kills the whole process group of a service started by [`in_image`] when dropped (declare it
/// after the [`Service`], so it runs first).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

fn entrypoint_and_user(config: &Value) -> Result<(Vec<String>, (u64, u64))> {
    let p = &config["process"];
    let args: Vec<String> = p["args"]
        .as_array()
        .context("config.json has process.args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let user = (
        p["user"]["uid"].as_u64().unwrap_or(0),
        p["user"]["gid"].as_u64().unwrap_or(0),
    );
    Ok((args, user))
}

/// What a Containerfile under deploy/images/ says the runtime image is: (entrypoint, user, the
/// destinations of its plain `COPY src dst` lines).
fn containerfile(name: &str) -> Result<(Vec<String>, String, Vec<String>)> {
    let path = repo_root().join(format!("deploy/images/{name}.Containerfile"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let runtime = text.rsplit("\nFROM ").next().context("a FROM line")?;
    let mut entry = Vec::new();
    let mut user = String::new();
    let mut copies = Vec::new();
    for line in runtime.lines() {
        if let Some(json) = line.strip_prefix("ENTRYPOINT ") {
            entry = serde_json::from_str(json).context("ENTRYPOINT in exec form")?;
        } else if let Some(u) = line.strip_prefix("USER ") {
            user = u.trim().to_owned();
        } else if let Some(c) = line.strip_prefix("COPY ")
            && !c.starts_with("--from")
        {
            copies.extend(c.split_whitespace().last().map(str::to_owned));
        }
    }
    Ok((entry, user, copies))
}

fn version_of(rootfs: &Path, user: (u64, u64), entry: &[String]) -> Result<String> {
    let mut argv = entry.to_vec();
    argv.push("--version".into());
    let out = in_image(rootfs, user, &[], &argv).output()?;
    ensure!(
        out.status.success(),
        "--version inside the image failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Waits for `/readyz` on `port`, then returns `/healthz` and `/metrics`.
async fn serving(service: &Service, port: u16) -> Result<(String, String)> {
    let base = format!("http://127.0.0.1:{port}");
    wait_for(
        "the image's /readyz",
        Duration::from_secs(60),
        &[service],
        || async {
            Ok(get(&format!("{base}/readyz"))
                .await
                .filter(|(s, _)| *s == 200))
        },
    )
    .await?;
    let (hs, health) = get(&format!("{base}/healthz")).await.context("/healthz")?;
    ensure!(hs == 200, "/healthz answered {hs}");
    let (ms, metrics) = get(&format!("{base}/metrics")).await.context("/metrics")?;
    ensure!(ms == 200, "/metrics answered {ms}");
    Ok((health, metrics))
}

#[tokio::test]
async fn each_image_runs_its_binary_from_its_own_root_filesystem() -> Result<()> {
    if skip_without_services("each_image_runs_its_binary_from_its_own_root_filesystem") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let images = build_images(&dir.path().join("images"))?;
    let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        names == ["ark-exporter", "ark-healer"],
        "scripts/image built {names:?}"
    );
    let version = env!("CARGO_PKG_VERSION");
    for (name, archive) in &images {
        ensure!(
            archive.is_file()
                && archive
                    .to_string_lossy()
                    .ends_with(&format!("{version}.oci.tar")),
            "{name}: no archive at {}",
            archive.display()
        );
        // The archive is a whole OCI layout: what `podman load` / `skopeo copy oci-archive:` read.
        let list = Command::new("tar").arg("-tf").arg(archive).output()?;
        let list = String::from_utf8_lossy(&list.stdout);
        ensure!(
            list.contains("./index.json") && list.contains("./oci-layout"),
            "{name}: the archive is not an OCI layout:\n{list}"
        );
    }

    // The exporter, as deploy/exporter/daemonset.yaml runs it: root, host /proc and /sys under
    // /host, rules from the image.
    let bundle = dir.path().join("exporter");
    let config = unpack(&dir.path().join("images/ark-exporter"), version, &bundle)?;
    let (entry, user) = entrypoint_and_user(&config)?;
    ensure!(
        entry == ["/usr/local/bin/ark-exporter"],
        "exporter entrypoint {entry:?}"
    );
    let rootfs = bundle.join("rootfs");
    ensure!(
        rootfs
            .join("etc/ark-exporter/rules/manifest.yaml")
            .is_file(),
        "the exporter image lacks the rules its DaemonSet reads"
    );
    let v = version_of(&rootfs, user, &entry)?;
    ensure!(
        v.starts_with(&format!("ark-exporter {version}")),
        "--version said {v:?}"
    );
    let port = free_port();
    let mut argv = entry.clone();
    argv.extend(
        [
            &format!("--web.listen-address=127.0.0.1:{port}"),
            "--path.procfs=/host/proc",
            "--path.sysfs=/host/sys",
            "--rules=/etc/ark-exporter/rules",
            "--node-name=image-node",
            // eBPF needs tracefs and BTF mounts the test does not give; its own tests cover it.
            "--no-collector=ebpf",
        ]
        .map(str::to_owned),
    );
    let mut cmd = in_image(
        &rootfs,
        user,
        &[("/proc", "/host/proc"), ("/sys", "/host/sys")],
        &argv,
    );
    let exporter = Service::spawn("image-exporter", &mut cmd, &dir.path().join("exporter.log"))?;
    let exporter_group = Group(exporter.pid());
    let (_, metrics) = serving(&exporter, port).await?;
    // The host collectors read the real /proc and /sys through the image's mounts.
    for want in [
        "ark_collector_up{collector=\"process\"",
        "ark_collector_up{collector=\"netdev\"",
        "node=\"image-node\"",
    ] {
        ensure!(
            metrics.contains(want),
            "exporter /metrics from the image lacks {want}"
        );
    }
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("ark_collector_up{"))
    {
        if line.contains("\"process\"") || line.contains("\"netdev\"") {
            ensure!(
                line.ends_with(" 1"),
                "collector down inside the image: {line}"
            );
        }
    }
    drop(exporter_group);
    drop(exporter);

    // The healer, as deploy/healer/deployment.yaml runs it: uid 65532, config and token mounted
    // under /etc/ark-healer, state in /var/lib/ark-healer. Dry-run and no cluster: it still
    // serves (its own CLI test covers what it does there).
    let bundle = dir.path().join("healer");
    let config = unpack(&dir.path().join("images/ark-healer"), version, &bundle)?;
    let (entry, user) = entrypoint_and_user(&config)?;
    ensure!(user == (65532, 65532), "the healer image runs as {user:?}");
    let (file_entry, file_user, _) = containerfile("healer")?;
    ensure!(
        (&file_entry, file_user.as_str()) == (&entry, "65532:65532"),
        "healer.Containerfile ({file_entry:?}, {file_user}) and scripts/image ({entry:?}) disagree"
    );
    let rootfs = bundle.join("rootfs");
    let v = version_of(&rootfs, user, &entry)?;
    ensure!(
        v.starts_with(&format!("ark-healer {version}")),
        "--version said {v:?}"
    );
    let etc = dir.path().join("healer-etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("token"), "image-test-token")?;
    std::fs::write(
        etc.join("healer.toml"),
        "audit_log = \"/var/lib/ark-healer/audit.jsonl\"\nreconcile_interval_seconds = 1\n",
    )?;
    let port = free_port();
    let mut argv = entry.clone();
    argv.extend(
        [
            "serve",
            "--dry-run",
            &format!("--web.listen-address=127.0.0.1:{port}"),
            "--webhook-token-file=/etc/ark-healer/token",
            "--config=/etc/ark-healer/healer.toml",
        ]
        .map(str::to_owned),
    );
    let etc_host = etc.to_string_lossy().into_owned();
    let mut cmd = in_image(&rootfs, user, &[(&etc_host, "/etc/ark-healer")], &argv);
    // No cluster anywhere: a kubeconfig that does not exist.
    cmd.env("KUBECONFIG", "/etc/ark-healer/no-such-kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST");
    let healer = Service::spawn("image-healer", &mut cmd, &dir.path().join("healer.log"))?;
    let _healer_group = Group(healer.pid());
    let (_, metrics) = serving(&healer, port).await?;
    if !metrics.contains("ark_healer_") {
        bail!("healer /metrics from the image has no ark_healer_ series:\n{metrics}");
    }
    // An alert in: the healer, as uid 65532, plans it and writes its audit log into the image's
    // state directory (an emptyDir in the Deployment).
    let alert = serde_json::json!({
        "version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "ark-healer",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "GpuHung", "node": "n1", "condition": "GpuHung",
                       "severity": "critical", "gpu": "0"},
            "annotations": {}, "startsAt": "2026-11-23T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "image-n1-GpuHung",
        }],
    });
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/v1/alerts"))
        .bearer_auth("image-test-token")
        .json(&alert)
        .send()
        .await?;
    ensure!(r.status() == 202, "the webhook answered {}", r.status());
    let audit = rootfs.join("var/lib/ark-healer/audit.jsonl");
    wait_for(
        "the dry-run plan in the image's audit log",
        Duration::from_secs(30),
        &[&healer],
        || async {
            let text = std::fs::read_to_string(&audit).unwrap_or_default();
            Ok(text.contains("dry-run: would run gpu-reset").then_some(()))
        },
    )
    .await?;
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&audit)?);
    ensure!(
        owner == 65532,
        "{} is owned by uid {owner}",
        audit.display()
    );
    Ok(())
}
