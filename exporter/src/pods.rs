//! Pod attribution: process → container → pod.
//!
//! Two steps, kept apart so each can be tested on its own:
//! 1. **cgroup → pod UID and container id** (pure, [`parse_cgroup`] / [`parse_cgroup_path`]):
//!    `/proc/<pid>/cgroup` names the kubelet's cgroup of the pod. Shapes handled (cgroup v1 and
//!    v2; containerd, CRI-O, docker):
//!    - cgroupfs driver: `/kubepods/burstable/pod<uid>/<64-hex id>`, `/kubepods/pod<uid>/<id>`;
//!    - systemd driver: `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid
//!      with _>.slice/cri-containerd-<id>.scope` (also `crio-<id>.scope`, `docker-<id>.scope`);
//!    - systemd driver, v1 with containerd's `systemd_cgroup`:
//!      `.../kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`;
//!    - plain docker (no pod): `/docker/<id>`, `/system.slice/docker-<id>.scope`.
//! 2. **pod UID → namespace/name/container** ([`PodResolver`]): fed by a watch of this node's
//!    pods (`spec.nodeName` field selector; the watch itself is the `pods` collector,
//!    [`crate::collectors::pods`]). Without a cluster, attribution stops at the UID.
//!
//! ## cgroup id → pod (for the eBPF collector)
//! This module is the one cgroup → pod authority: the eBPF collector asks it too.
//! [`PodResolver::by_cgroup_id`] maps a cgroup v2 id — the inode number of the cgroup's
//! directory in the cgroup v2 mount (`<sysfs>/fs/cgroup`, or `<sysfs>/fs/cgroup/unified` on a
//! hybrid v1/v2 host), which is what `bpf_get_current_cgroup_id()` returns — to the pod (and
//! container) that owns it; [`PodResolver::cgroup_path`] and [`PodResolver::cgroup_pids`] name
//! any cgroup's path and processes. Ids are learned by walking the whole v2 tree (bounded by
//! [`MAX_WALK_DIRS`]; at most once per [`RESCAN_INTERVAL`] on a miss) and from the cgroups of
//! processes the `process` collector looks at. Host cgroups are indexed too (their pod is
//! `None`), so a host cgroup costs no walk after the first. It is cheap on a hit (one read lock,
//! one hash look-up) and safe to call from any thread.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

mod cgroup;

pub use self::cgroup::{CgroupInfo, Runtime, parse_cgroup, parse_cgroup_path};

/// Most pods remembered (a kubelet runs at most a few hundred).
pub const MAX_PODS: usize = 4_096;
/// Most cgroup ids remembered.
pub const MAX_CGROUP_IDS: usize = 65_536;
/// Most directories visited by one cgroup tree walk.
pub const MAX_WALK_DIRS: usize = 20_000;
/// A miss in [`PodResolver::by_cgroup_id`] walks the cgroup tree at most this often.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// A pod (and container) a process or cgroup belongs to. Fields other than `uid` are `None`
/// until the pod watch has seen the pod (or when there is no cluster).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodRef {
    pub uid: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// Container name (from the pod's container statuses).
    pub container: Option<String>,
    /// Container id without the `containerd://` prefix.
    pub container_id: Option<String>,
    /// Job the pod belongs to (labels `job-name`, `batch.kubernetes.io/job-name`,
    /// `training.kubeflow.org/job-name`), if any.
    pub job: Option<String>,
}

/// What the watch knows about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodMeta {
    namespace: String,
    name: String,
    job: Option<String>,
    /// (container id without the runtime prefix, container name).
    containers: Vec<(String, String)>,
}

impl PodMeta {
    fn from_pod(p: &Pod) -> Option<(String, PodMeta)> {
        let uid = p.metadata.uid.clone()?;
        let labels = p.metadata.labels.as_ref();
        let job = [
            "batch.kubernetes.io/job-name",
            "job-name",
            "training.kubeflow.org/job-name",
        ]
        .iter()
        .find_map(|k| labels.and_then(|l| l.get(*k)).cloned());
        let mut containers = Vec::new();
        if let Some(st) = &p.status {
            for list in [
                &st.container_statuses,
                &st.init_container_statuses,
                &st.ephemeral_container_statuses,
            ]
            .into_iter()
            .flatten()
            {
                for c in list.iter().take(64) {
                    if let Some(id) = &c.container_id {
                        let bare = id.split_once("://").map_or(id.as_str(), |(_, b)| b);
                        containers.push((bare.to_owned(), c.name.clone()));
                    }
                }
            }
        }
        Some((
            uid.to_ascii_lowercase(),
            PodMeta {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                job,
                containers,
            },
        ))
    }
}

/// Whether pod metadata can be had at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// No watch started yet.
    Unknown,
    /// No cluster configured: attribution stops at the pod UID.
    NoCluster,
    /// Watching; the first list has not completed.
    Syncing,
    /// The pods of this node are known.
    Synced,
}

/// One indexed cgroup v2 directory.
#[derive(Debug, Clone)]
struct Cgroup {
    /// Path relative to the mount, as `/proc/<pid>/cgroup` shows it (`/` for the root).
    path: String,
    /// (pod UID, container id) when the path is a pod's.
    pod: Option<(String, Option<String>)>,
}

impl Cgroup {
    fn of_path(path: String) -> Cgroup {
        let (uid, container) = parse_cgroup_path(&path);
        Cgroup {
            path,
            pod: uid.map(|u| (u, container.map(|c| c.0))),
        }
    }
}

#[derive(Debug)]
struct Inner {
    pods: HashMap<String, PodMeta>,
    by_cgroup: HashMap<u64, Cgroup>,
    last_walk: Option<Instant>,
    resync: Option<HashSet<String>>,
    state: ClusterState,
}

/// Shared, cheap to clone: every collector holds the same one. See the module docs.
#[derive(Debug, Clone)]
pub struct PodResolver {
    inner: Arc<RwLock<Inner>>,
    cgroup_root: Arc<PathBuf>,
}

impl PodResolver {
    /// A resolver whose cgroup v2 tree is `<sysfs>/fs/cgroup` (`<sysfs>/fs/cgroup/unified` when
    /// that is a cgroup v2 mount: the systemd hybrid layout).
    pub fn new(sysfs: &Path) -> Self {
        let unified = sysfs.join("fs/cgroup/unified");
        let root = if unified.join("cgroup.controllers").is_file() {
            unified
        } else {
            sysfs.join("fs/cgroup")
        };
        PodResolver {
            inner: Arc::new(RwLock::new(Inner {
                pods: HashMap::new(),
                by_cgroup: HashMap::new(),
                last_walk: None,
                resync: None,
                state: ClusterState::Unknown,
            })),
            cgroup_root: Arc::new(root),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cgroup v2 mount this resolver walks.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn cluster_state(&self) -> ClusterState {
        self.read().state
    }

    pub fn set_cluster_state(&self, s: ClusterState) {
        self.write().state = s;
    }

    /// Number of pods known from the watch.
    pub fn pod_count(&self) -> usize {
        self.read().pods.len()
    }

    /// A pod was added or changed (watch event).
    pub fn apply_pod(&self, pod: &Pod) {
        let Some((uid, meta)) = PodMeta::from_pod(pod) else {
            return;
        };
        let mut w = self.write();
        if let Some(seen) = w.resync.as_mut()
            && seen.len() < MAX_PODS
        {
            seen.insert(uid.clone());
        }
        if w.pods.len() < MAX_PODS || w.pods.contains_key(&uid) {
            w.pods.insert(uid, meta);
        }
    }

    /// A pod was deleted (watch event).
    pub fn delete_pod(&self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            let uid = uid.to_ascii_lowercase();
            let mut w = self.write();
            w.pods.remove(&uid);
            w.by_cgroup
                .retain(|_, c| c.pod.as_ref().is_none_or(|(u, _)| *u != uid));
        }
    }

    /// The watch (re)lists: pods not listed again before [`PodResolver::end_resync`] are gone.
    pub fn begin_resync(&self) {
        self.write().resync = Some(HashSet::new());
    }

    pub fn end_resync(&self) {
        let mut w = self.write();
        if let Some(seen) = w.resync.take() {
            w.pods.retain(|uid, _| seen.contains(uid));
        }
        w.state = ClusterState::Synced;
    }

    /// What is known about a pod UID (and container id).
    pub fn lookup(&self, uid: &str, container_id: Option<&str>) -> PodRef {
        let r = self.read();
        let meta = r.pods.get(uid);
        PodRef {
            uid: uid.to_owned(),
            namespace: meta.map(|m| m.namespace.clone()),
            name: meta.map(|m| m.name.clone()),
            container: meta.and_then(|m| {
                let id = container_id?;
                m.containers
                    .iter()
                    .find(|(c, _)| c == id)
                    .map(|(_, n)| n.clone())
            }),
            container_id: container_id.map(str::to_owned),
            job: meta.and_then(|m| m.job.clone()),
        }
    }

    /// The pod of a parsed `/proc/<pid>/cgroup` (`None` for host processes).
    pub fn resolve(&self, info: &CgroupInfo) -> Option<PodRef> {
        let uid = info.pod_uid.as_deref()?;
        Some(self.lookup(uid, info.container_id.as_deref()))
    }

    /// The pod of a process: reads `<procfs>/<pid>/cgroup` (`None` for host processes, gone
    /// processes and unreadable files). One small file read per call.
    pub fn resolve_pid(&self, procfs: &Path, pid: u32) -> Option<PodRef> {
        let text = std::fs::read_to_string(procfs.join(pid.to_string()).join("cgroup")).ok()?;
        self.resolve(&parse_cgroup(&text)?)
    }

    /// Remembers the cgroup id of a cgroup whose owner is known (the `process` collector calls
    /// this for v2 processes it attributes).
    pub fn record_cgroup(&self, id: u64, info: &CgroupInfo) {
        let Some(uid) = info.pod_uid.clone() else {
            return;
        };
        let entry = Cgroup {
            path: info.path.clone(),
            pod: Some((uid, info.container_id.clone())),
        };
        let mut w = self.write();
        if w.by_cgroup.len() < MAX_CGROUP_IDS || w.by_cgroup.contains_key(&id) {
            w.by_cgroup.insert(id, entry);
        }
    }

    /// The cgroup id (inode of the cgroup v2 directory) of a v2 cgroup path.
    pub fn cgroup_id_of(&self, path: &str) -> Option<u64> {
        let rel = path.trim_start_matches('/');
        std::fs::metadata(self.cgroup_root.join(rel))
            .ok()
            .map(|m| m.ino())
    }

    /// **cgroup v2 id → pod.** `id` is the inode number of the cgroup directory (what
    /// `bpf_get_current_cgroup_id()` and `bpf_skb_cgroup_id()` return). `Some` when the cgroup
    /// is a pod's (or one of its containers'); namespace/name/container are filled when the pod
    /// watch knows the pod. `None` for host cgroups, unknown ids and hosts without cgroup v2.
    /// A miss walks the `kubepods*` subtrees again, at most once per [`RESCAN_INTERVAL`]
    /// (bounded by [`MAX_WALK_DIRS`]); hits cost one read lock and one hash look-up.
    pub fn by_cgroup_id(&self, id: u64) -> Option<PodRef> {
        let (uid, cid) = self.cgroup(id)?.pod?;
        Some(self.lookup(&uid, cid.as_deref()))
    }

    /// The path of any cgroup v2 id relative to the mount (`/system.slice/sshd.service`, `/`
    /// for the root); `None` for unknown ids. Walks on a miss like [`Self::by_cgroup_id`].
    pub fn cgroup_path(&self, id: u64) -> Option<String> {
        self.cgroup(id).map(|c| c.path)
    }

    /// Up to `max` pids of the cgroup with this id, from its `cgroup.procs` (empty when unknown
    /// or gone). Reads at most `max` lines.
    pub fn cgroup_pids(&self, id: u64, max: usize) -> Vec<u32> {
        use std::io::BufRead;
        let Some(path) = self.cgroup_path(id) else {
            return Vec::new();
        };
        let file = self
            .cgroup_root
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        let Ok(f) = std::fs::File::open(file) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .take(max)
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The indexed cgroup, walking the tree on a miss (rate-limited).
    fn cgroup(&self, id: u64) -> Option<Cgroup> {
        if let Some(c) = self.read().by_cgroup.get(&id) {
            return Some(c.clone());
        }
        let due = self
            .read()
            .last_walk
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL);
        if due {
            self.walk_cgroups();
            return self.read().by_cgroup.get(&id).cloned();
        }
        None
    }

    /// Walks the cgroup v2 tree (at most [`MAX_WALK_DIRS`] directories, 16 levels) and indexes
    /// every cgroup's id. Returns the number of pod and container cgroups found.
    pub fn walk_cgroups(&self) -> usize {
        self.write().last_walk = Some(Instant::now());
        let mut found = Vec::new();
        let mut stack: Vec<(PathBuf, String, usize)> =
            vec![((*self.cgroup_root).clone(), "/".to_owned(), 0)];
        while let Some((dir, rel, depth)) = stack.pop() {
            if found.len() >= MAX_WALK_DIRS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            if depth < 16
                && let Ok(rd) = std::fs::read_dir(&dir)
            {
                for e in rd.filter_map(|e| e.ok()) {
                    if stack.len() + found.len() >= MAX_WALK_DIRS {
                        break;
                    }
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let child = format!("{}/{name}", rel.trim_end_matches('/'));
                        stack.push((e.path(), child, depth + 1));
                    }
                }
            }
            found.push((meta.ino(), Cgroup::of_path(rel)));
        }
        let pods = found.iter().filter(|(_, c)| c.pod.is_some()).count();
        let mut w = self.write();
        // Ids of cgroups that no longer exist go; what the walk found replaces them.
        w.by_cgroup.clear();
        w.by_cgroup.extend(found.into_iter().take(MAX_CGROUP_IDS));
        pods
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0f4fe1c3b6c9c5a1b0bd3e4e7d0b4c9a4c6f1a2b3c4d5e6f708192a3b4c5d6e7";
    const UID: &str = "3b2a6f1e-7c4d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn resolver_lookup_and_resync() {
        let r = PodResolver::new(Path::new("/nonexistent"));
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": UID, "labels": {"job-name": "train"}},
            "status": {"containerStatuses": [{"name": "main", "containerID": format!("containerd://{CID}"),
                "image": "x", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        r.apply_pod(&pod);
        let p = r.lookup(UID, Some(CID));
        assert_eq!(p.name.as_deref(), Some("p"));
        assert_eq!(p.namespace.as_deref(), Some("ns"));
        assert_eq!(p.container.as_deref(), Some("main"));
        assert_eq!(p.job.as_deref(), Some("train"));
        assert_eq!(r.lookup(UID, Some("other")).container, None);
        r.begin_resync();
        r.end_resync();
        assert_eq!(r.pod_count(), 0);
        assert_eq!(r.lookup(UID, None).name, None);
        assert_eq!(r.by_cgroup_id(12345), None);
    }

    #[test]
    fn cgroup_index_names_host_and_pod_cgroups_and_their_pids() {
        let d = tempfile::tempdir().unwrap();
        // A hybrid host: v1 controllers in fs/cgroup, the v2 tree in fs/cgroup/unified.
        let root = d.path().join("fs/cgroup/unified");
        let pod = root.join(format!("nested/kubepods/besteffort/pod{UID}/{CID}"));
        let host = root.join("system.slice/sshd.service");
        for dir in [&pod, &host] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(root.join("cgroup.controllers"), "").unwrap();
        std::fs::write(host.join("cgroup.procs"), "7\n8\nnot-a-pid\n9\n").unwrap();
        let r = PodResolver::new(d.path());
        assert_eq!(r.cgroup_root(), root);
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        // Pod cgroups below any depth are found; the pod is named by its UID.
        let p = r.by_cgroup_id(ino(&pod)).expect("nested pod cgroup");
        assert_eq!(
            (p.uid.as_str(), p.container_id.as_deref()),
            (UID, Some(CID))
        );
        // Host cgroups are indexed (a path, pids) but are nobody's pod.
        assert_eq!(r.by_cgroup_id(ino(&host)), None);
        assert_eq!(
            r.cgroup_path(ino(&host)).as_deref(),
            Some("/system.slice/sshd.service")
        );
        assert_eq!(r.cgroup_path(ino(&root)).as_deref(), Some("/"));
        // At most `max` lines are read; garbage lines are skipped.
        assert_eq!(r.cgroup_pids(ino(&host), 2), [7, 8]);
        assert_eq!(r.cgroup_pids(ino(&host), 16), [7, 8, 9]);
        assert!(r.cgroup_pids(u64::MAX, 16).is_empty());
        // Without a unified mount the tree is fs/cgroup itself.
        let plain = tempfile::tempdir().unwrap();
        let r = PodResolver::new(plain.path());
        assert_eq!(r.cgroup_root(), plain.path().join("fs/cgroup"));
    }
}
