//! A real Kubernetes control plane for tests: etcd (Debian package), kube-apiserver and
//! kube-controller-manager v1.20.2 built from Debian's source package by `scripts/build-kube`.
//! TLS with a generated CA, static token auth, RBAC. No kubelet and no scheduler run: the
//! helpers here play those parts where a test needs them (`start_fake_kubelet`,
//! `finish_job_pods`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::ApiResource;
use serde_json::json;
use tempfile::TempDir;

use crate::service::{Service, free_port, wait_for};

/// Static tokens every cluster accepts: `(name, token, user, groups)`.
const TOKENS: &[(&str, &str, &str, &str)] = &[
    ("admin", "ark-admin-token", "ark-admin", "system:masters"),
    (
        "healer",
        "ark-healer-token",
        "system:serviceaccount:ark-system:ark-healer",
        "system:serviceaccounts,system:serviceaccounts:ark-system,system:authenticated",
    ),
    (
        "exporter",
        "ark-exporter-token",
        "system:serviceaccount:ark-system:ark-exporter",
        "system:serviceaccounts,system:serviceaccounts:ark-system,system:authenticated",
    ),
    (
        "nobody",
        "ark-nobody-token",
        "nobody",
        "system:authenticated",
    ),
];

/// Directory with `kube-apiserver`, `kube-controller-manager` and `kubectl`.
pub fn kube_bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ARK_KUBE_BIN_DIR") {
        let d = PathBuf::from(d);
        if d.join("kube-apiserver").exists() {
            return Ok(d);
        }
        bail!("ARK_KUBE_BIN_DIR={} has no kube-apiserver", d.display());
    }
    let root = std::env::var("ARK_CACHE_DIR").unwrap_or_else(|_| "/var/cache/ark".into());
    if let Ok(entries) = std::fs::read_dir(&root) {
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| {
                d.join("kube-apiserver").exists() && d.join("kube-controller-manager").exists()
            })
            .collect();
        dirs.sort();
        if let Some(d) = dirs.pop() {
            return Ok(d);
        }
    }
    bail!(
        "no kube-apiserver build found under {root}: run scripts/build-kube (scripts/test does) \
         or set ARK_KUBE_BIN_DIR"
    )
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (install the Debian package `openssl`)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Generates a CA, a serving certificate for 127.0.0.1 and a service-account key in `dir`.
fn generate_pki(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=ark-test-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req", "-subj", "/CN=kube-apiserver"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    )?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    Ok(())
}

/// The kube-apiserver command line: TLS, static tokens, RBAC, etcd at `etcd_port`.
fn apiserver_command(bin: &Path, d: &Path, etcd_port: u16, port: u16) -> Command {
    let mut cmd = Command::new(bin.join("kube-apiserver"));
    cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg("--insecure-port=0")
        .arg(format!("--cert-dir={}", d.display()))
        .arg(format!(
            "--tls-cert-file={}",
            d.join("server.crt").display()
        ))
        .arg(format!(
            "--tls-private-key-file={}",
            d.join("server.key").display()
        ))
        .arg(format!(
            "--token-auth-file={}",
            d.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=RBAC")
        .arg(format!(
            "--service-account-key-file={}",
            d.join("sa.key").display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            d.join("sa.key").display()
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--endpoint-reconciler-type=none")
        .arg("--service-cluster-ip-range=10.96.0.0/24")
        .arg("--allow-privileged=true")
        .arg("--profiling=false")
        .arg("--v=0");
    cmd
}

/// Waits until the apiserver on `port` answers `/readyz` and serves namespace `default`.
async fn wait_apiserver_ready(d: &Path, port: u16, watch: &[&Service]) -> Result<()> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.crt"))?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5))
        .build()?;
    let base = format!("https://127.0.0.1:{port}");
    let admin = TOKENS[0].1;
    wait_for(
        "kube-apiserver /readyz and namespace default",
        Duration::from_secs(90),
        watch,
        || async {
            let ready = https
                .get(format!("{base}/readyz"))
                .bearer_auth(admin)
                .send()
                .await?;
            if !ready.status().is_success() {
                return Ok(None);
            }
            let ns = https
                .get(format!("{base}/api/v1/namespaces/default"))
                .bearer_auth(admin)
                .send()
                .await?;
            Ok(ns.status().is_success().then_some(()))
        },
    )
    .await
}

/// A running control plane. Stopped (controller-manager, apiserver, etcd) on drop.
pub struct KubeCluster {
    pub port: u16,
    pub etcd_port: u16,
    bin: PathBuf,
    dir: TempDir,
    apiserver_starts: u32,
    // Field order is drop order: dependants first.
    pub controller_manager: Service,
    pub apiserver: Service,
    pub etcd: Service,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("url", &self.url())
            .finish()
    }
}

impl KubeCluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until they answer.
    pub async fn start() -> Result<Self> {
        let bin = kube_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("ark-kube-").tempdir()?;
        let d = dir.path();
        generate_pki(d)?;
        let tokens: String = TOKENS
            .iter()
            .map(|(_, token, user, groups)| format!("{token},{user},{user},\"{groups}\"\n"))
            .collect();
        std::fs::write(d.join("tokens.csv"), tokens)?;

        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut cmd =
            Command::new(std::env::var("ARK_ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()));
        cmd.arg("--name=ark")
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=ark={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let etcd = Service::spawn("etcd", &mut cmd, &d.join("etcd.log"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        wait_for(
            "etcd /health",
            Duration::from_secs(30),
            &[&etcd],
            || async {
                let r = http.get(format!("{etcd_url}/health")).send().await?;
                Ok(r.text().await?.contains("true").then_some(()))
            },
        )
        .await?;

        let port = free_port();
        let apiserver = Service::spawn(
            "kube-apiserver",
            &mut apiserver_command(&bin, d, etcd_port, port),
            &d.join("kube-apiserver.log"),
        )?;
        wait_apiserver_ready(d, port, &[&etcd, &apiserver]).await?;

        for (name, token, ..) in TOKENS {
            write_kubeconfig(d, name, token, port)?;
        }
        let cm_port = free_port();
        let mut cmd = Command::new(bin.join("kube-controller-manager"));
        cmd.arg(format!(
            "--kubeconfig={}",
            d.join("admin.kubeconfig").display()
        ))
        .arg("--controllers=disruption,garbagecollector,job")
        .arg("--leader-elect=false")
        .arg("--port=0")
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={cm_port}"))
        .arg(format!("--cert-dir={}", d.join("cm-certs").display()))
        .arg("--v=0");
        let controller_manager = Service::spawn(
            "kube-controller-manager",
            &mut cmd,
            &d.join("kube-controller-manager.log"),
        )?;
        let insecure = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()?;
        wait_for(
            "kube-controller-manager /healthz",
            Duration::from_secs(60),
            &[&controller_manager],
            || async {
                let r = insecure
                    .get(format!("https://127.0.0.1:{cm_port}/healthz"))
                    .send()
                    .await?;
                Ok(r.status().is_success().then_some(()))
            },
        )
        .await?;

        Ok(Self {
            port,
            etcd_port,
            bin,
            dir,
            apiserver_starts: 1,
            controller_manager,
            apiserver,
            etcd,
        })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The static bearer token called `name` (`admin`, `healer`, `exporter`, `nobody`).
    pub fn token(&self, name: &str) -> &'static str {
        TOKENS
            .iter()
            .find(|t| t.0 == name)
            .map(|t| t.1)
            .unwrap_or_else(|| panic!("unknown token name {name:?}"))
    }

    /// A kubeconfig file that authenticates with the token called `name`.
    pub fn kubeconfig(&self, name: &str) -> PathBuf {
        self.token(name);
        self.dir.path().join(format!("{name}.kubeconfig"))
    }

    /// A kube client authenticated with the token called `name`.
    pub async fn client(&self, name: &str) -> Result<kube::Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig(name))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs the built `kubectl` as admin; stdout on success, stderr in the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.kubeconfig("admin").display()
            ))
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Path of the built `kubectl`.
    pub fn kubectl_path(&self) -> PathBuf {
        self.bin.join("kubectl")
    }

    /// Stops the apiserver (SIGTERM, then SIGKILL after 5 s); etcd keeps the data, so
    /// [`KubeCluster::apiserver_start`] brings the same cluster back.
    pub fn apiserver_stop(&self) {
        self.apiserver.stop();
    }

    /// Starts the apiserver again on the same port and etcd after [`KubeCluster::apiserver_stop`]
    /// and waits until it is ready. Each start logs to its own file (`kube-apiserver.N.log`).
    pub async fn apiserver_start(&mut self) -> Result<()> {
        self.apiserver.stop();
        self.apiserver_starts += 1;
        let d = self.dir.path();
        let log = d.join(format!("kube-apiserver.{}.log", self.apiserver_starts));
        self.apiserver = Service::spawn(
            "kube-apiserver",
            &mut apiserver_command(&self.bin, d, self.etcd_port, self.port),
            &log,
        )?;
        wait_apiserver_ready(d, self.port, &[&self.etcd, &self.apiserver]).await
    }

    pub async fn create_node(&self, name: &str, labels: &[(&str, &str)]) -> Result<Node> {
        let api: Api<Node> = Api::all(self.client("admin").await?);
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels_map(labels)},
        }))?;
        Ok(api.create(&PostParams::default(), &node).await?)
    }

    /// Creates label-less nodes `names`, 16 requests at a time (for tests with hundreds).
    pub async fn create_nodes(&self, names: impl IntoIterator<Item = String>) -> Result<()> {
        let api: Api<Node> = Api::all(self.client("admin").await?);
        let names: Vec<String> = names.into_iter().collect();
        for chunk in names.chunks(16) {
            let mut set = tokio::task::JoinSet::new();
            for name in chunk {
                let (api, name) = (api.clone(), name.clone());
                set.spawn(async move {
                    let n: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
                    api.create(&PostParams::default(), &n).await?;
                    anyhow::Ok(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
        }
        Ok(())
    }

    pub async fn ensure_namespace(&self, ns: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client("admin").await?);
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A Pod bound to `node` (spec.nodeName), so it counts as running there for a drain.
    pub async fn create_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        self.ensure_namespace(ns).await?;
        let api: Api<Pod> = Api::namespaced(self.client("admin").await?, ns);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels_map(labels)},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "main", "image": "registry.invalid/ark/pause:1"}],
            },
        }))?;
        Ok(api.create(&PostParams::default(), &pod).await?)
    }

    /// A `policy/v1beta1` PodDisruptionBudget (1.20 has no `policy/v1`) with `minAvailable`.
    /// Real-server facts: `maxUnavailable` needs pods with a controller ref (the disruption
    /// controller fails with "found no controller ref" for bare pods), and only Ready pods
    /// count as healthy, so use [`KubeCluster::set_pod_ready`] when evictions should pass.
    pub async fn create_pdb(
        &self,
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        min_available: i32,
    ) -> Result<DynamicObject> {
        self.ensure_namespace(ns).await?;
        let ar = ApiResource {
            group: "policy".into(),
            version: "v1beta1".into(),
            api_version: "policy/v1beta1".into(),
            kind: "PodDisruptionBudget".into(),
            plural: "poddisruptionbudgets".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client("admin").await?, ns, &ar);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "policy/v1beta1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": name},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": labels_map(selector)}},
        }))?;
        Ok(api.create(&PostParams::default(), &obj).await?)
    }

    /// Marks a pod Running and Ready through the status subresource, as a kubelet would.
    pub async fn set_pod_ready(&self, ns: &str, name: &str) -> Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client("admin").await?, ns);
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}
        ]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    /// Plays the kubelet's part in pod deletion: pods with a deletionTimestamp are removed
    /// with grace period 0 (without it an evicted pod stays Terminating forever). Stops on drop.
    pub async fn start_fake_kubelet(&self) -> Result<FakeKubelet> {
        let api: Api<Pod> = Api::all(self.client("admin").await?);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(pods) = api.list(&ListParams::default()).await {
                    for p in pods
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_some())
                    {
                        let (Some(ns), Some(name)) = (&p.metadata.namespace, &p.metadata.name)
                        else {
                            continue;
                        };
                        let nsapi: Api<Pod> = Api::namespaced(api.clone().into_client(), ns);
                        let _ = nsapi
                            .delete(name, &DeleteParams::default().grace_period(0))
                            .await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(FakeKubelet { task })
    }

    /// Marks the pods of Job `job` Succeeded (or Failed) through the status subresource, as a
    /// kubelet would, so the real job controller completes the Job. Waits for the pods to exist.
    pub async fn finish_job_pods(&self, ns: &str, job: &str, success: bool) -> Result<usize> {
        let api: Api<Pod> = Api::namespaced(self.client("admin").await?, ns);
        let lp = ListParams::default().labels(&format!("job-name={job}"));
        let pods = wait_for(
            &format!("pods of Job {ns}/{job}"),
            Duration::from_secs(30),
            &[],
            || async {
                let pods = api.list(&lp).await?.items;
                Ok((!pods.is_empty()).then_some(pods))
            },
        )
        .await?;
        let phase = if success { "Succeeded" } else { "Failed" };
        for p in &pods {
            let name = p.metadata.name.as_deref().unwrap_or_default();
            let status = json!({"status": {"phase": phase, "containerStatuses": [{
                "name": "main", "ready": false, "restartCount": 0, "image": "registry.invalid/ark/pause:1", "imageID": "",
                "state": {"terminated": {"exitCode": if success { 0 } else { 1 }, "reason": phase}}
            }]}});
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
        }
        Ok(pods.len())
    }
}

/// See [`KubeCluster::start_fake_kubelet`].
#[derive(Debug)]
pub struct FakeKubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn labels_map(labels: &[(&str, &str)]) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect()
}

fn write_kubeconfig(dir: &Path, name: &str, token: &str, port: u16) -> Result<()> {
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ark-test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\n\
         users:\n- name: {name}\n  user:\n    token: {token}\n\
         contexts:\n- name: {name}\n  context:\n    cluster: ark-test\n    user: {name}\n    namespace: default\n\
         current-context: {name}\n",
        ca = dir.join("ca.crt").display(),
    );
    std::fs::write(dir.join(format!("{name}.kubeconfig")), yaml)?;
    Ok(())
}
