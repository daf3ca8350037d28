//! cgroup v2 id → cgroup path → pids and pod UID, for attributing what the kernel keys by
//! cgroup id (a socket's cgroup at a TCP retransmit, the issuing cgroup of a block request).
//!
//! The id BPF reports (`kn->id`) is the inode number of the cgroup's directory in a cgroup2
//! mount. The directory tree is indexed lazily, rebuilt at most once per `rescan` interval on a
//! miss, and capped at [`MAX_CGROUPS`] directories.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Most cgroup directories indexed.
pub const MAX_CGROUPS: usize = 65_536;
/// Most pids read from one cgroup's `cgroup.procs`.
pub const MAX_PIDS_PER_CGROUP: usize = 16;

/// Pod identity parsed from a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupPod {
    /// Pod UID with dashes (`0f5c…-…`), from `pod<uid>` path segments (`_` in systemd slices).
    pub pod_uid: Option<String>,
    /// Container id (64 hex characters) from the last segment, any runtime prefix stripped.
    pub container_id: Option<String>,
}

/// Parses the pod UID and container id out of a cgroup path, for the shapes kubelet creates
/// with the cgroupfs and systemd drivers and containerd / CRI-O / docker runtimes:
/// `/kubepods/burstable/pod<uid>/<id>`,
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`,
/// `…/crio-<id>.scope`, `…/docker-<id>.scope`.
pub fn parse_pod_path(path: &str) -> CgroupPod {
    let mut out = CgroupPod::default();
    for seg in path.split('/') {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        if let Some(i) = seg.rfind("pod") {
            let uid = seg[i + 3..].replace('_', "-");
            if uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                out.pod_uid = Some(uid);
            }
        }
    }
    if let Some(last) = path.rsplit('/').next() {
        let last = last.strip_suffix(".scope").unwrap_or(last);
        let id = last.rsplit(['-', ':']).next().unwrap_or(last);
        if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) && out.pod_uid.is_some() {
            out.container_id = Some(id.to_owned());
        }
    }
    out
}

/// cgroup2 mount points listed in a `/proc/self/mountinfo` text.
pub fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// See the module docs.
#[derive(Debug)]
pub struct CgroupIndex {
    roots: Vec<PathBuf>,
    by_id: HashMap<u64, PathBuf>,
    last_scan: Option<Instant>,
    rescan: Duration,
}

impl CgroupIndex {
    /// Index over the cgroup2 mounts listed in `<procfs>/self/mountinfo`.
    pub fn new(procfs: &Path, rescan: Duration) -> Self {
        let mountinfo = std::fs::read_to_string(procfs.join("self/mountinfo")).unwrap_or_default();
        Self::with_roots(parse_cgroup2_mounts(&mountinfo), rescan)
    }

    pub fn with_roots(roots: Vec<PathBuf>, rescan: Duration) -> Self {
        Self {
            roots,
            by_id: HashMap::new(),
            last_scan: None,
            rescan,
        }
    }

    pub fn has_cgroup2(&self) -> bool {
        !self.roots.is_empty()
    }

    fn scan(&mut self) {
        self.by_id.clear();
        let mut stack: Vec<PathBuf> = self.roots.clone();
        while let Some(dir) = stack.pop() {
            if self.by_id.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.by_id.insert(meta.ino(), dir.clone());
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        self.last_scan = Some(Instant::now());
    }

    /// The cgroup directory with this id, rescanning (rate-limited) on a miss.
    pub fn path(&mut self, id: u64) -> Option<&Path> {
        if !self.by_id.contains_key(&id)
            && self.last_scan.is_none_or(|t| t.elapsed() >= self.rescan)
        {
            self.scan();
        }
        self.by_id.get(&id).map(PathBuf::as_path)
    }

    /// The cgroup's path relative to its mount (what `/proc/<pid>/cgroup` shows).
    pub fn relative(&mut self, id: u64) -> Option<String> {
        let roots = self.roots.clone();
        let p = self.path(id)?;
        let rel = roots.iter().find_map(|r| p.strip_prefix(r).ok())?;
        Some(format!("/{}", rel.display()))
    }

    /// Up to [`MAX_PIDS_PER_CGROUP`] pids in the cgroup.
    pub fn pids(&mut self, id: u64) -> Vec<u32> {
        let Some(p) = self.path(id) else {
            return Vec::new();
        };
        std::fs::read_to_string(p.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(MAX_PIDS_PER_CGROUP)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5c2b8e-1d7a-4c3e-9b2a-7e6d5c4b3a21";
    const CID: &str = "3b5e1c6a9f0d2e4b7a8c1d3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b4c6d8e0f1a";

    #[test]
    fn pod_paths_of_every_driver_and_runtime() {
        let uid_ = UID.replace('-', "_");
        for path in [
            format!("/kubepods/burstable/pod{UID}/{CID}"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{CID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/docker-{CID}.scope"),
        ] {
            let p = parse_pod_path(&path);
            assert_eq!(p.pod_uid.as_deref(), Some(UID), "{path}");
            assert_eq!(p.container_id.as_deref(), Some(CID), "{path}");
        }
        assert_eq!(
            parse_pod_path(&format!("/kubepods/pod{UID}")).container_id,
            None
        );
    }

    #[test]
    fn host_and_hostile_paths_have_no_pod() {
        for path in [
            "/",
            "",
            "/system.slice/sshd.service",
            "/user.slice/pod",
            "/podnot-a-uid/x",
            "/pod/../../etc",
        ] {
            assert_eq!(parse_pod_path(path), CgroupPod::default(), "{path}");
        }
    }

    #[test]
    fn finds_cgroup2_mounts() {
        let mi = "25 1 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  31 1 0:27 / /run/ark-cg2 rw,relatime - cgroup2 none rw\n\
                  garbage line\n";
        assert_eq!(
            parse_cgroup2_mounts(mi),
            vec![PathBuf::from("/run/ark-cg2")]
        );
    }

    #[test]
    fn indexes_directories_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join(format!("kubepods/pod{UID}/{CID}"));
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("cgroup.procs"), "123\n456\nnot-a-pid\n").unwrap();
        let ino = std::fs::metadata(&pod).unwrap().ino();
        let mut idx = CgroupIndex::with_roots(vec![dir.path().to_owned()], Duration::from_secs(60));
        assert_eq!(idx.pids(ino), vec![123, 456]);
        assert_eq!(
            idx.relative(ino).unwrap(),
            format!("/kubepods/pod{UID}/{CID}")
        );
        assert_eq!(idx.path(u64::MAX), None, "unknown ids miss without error");
    }
}
