//! cgroup path → pod UID and container id (pure; step 1 of [`super`]): the one parser of the
//! kubelet's cgroup shapes, for `/proc/<pid>/cgroup` and for cgroup directories alike.

/// Container runtime named by a cgroup path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    /// A bare 64-hex id (cgroupfs driver): the runtime is not in the path.
    Unknown,
}

/// What a cgroup path says about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupInfo {
    /// The path the information came from (the v2 path when there is one).
    pub path: String,
    /// True when `path` is from the unified (v2) hierarchy (`0::/...`).
    pub v2: bool,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as found after `pod` in a path element: 36 chars of hex and `-` or `_`.
fn uid_after_pod(seg: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = seg[from..].find("pod") {
        let start = from + i + 3;
        if let Some(cand) = seg.get(start..start + 36) {
            let ok = cand.bytes().enumerate().all(|(j, b)| match j {
                8 | 13 | 18 | 23 => b == b'-' || b == b'_',
                _ => b.is_ascii_hexdigit(),
            });
            let end_ok = seg[start + 36..].is_empty() || seg[start + 36..].starts_with(".slice");
            if ok && end_ok {
                return Some(cand.replace('_', "-").to_ascii_lowercase());
            }
        }
        from = start;
    }
    None
}

/// Container id of one path element, with its runtime.
fn container_in(seg: &str) -> Option<(String, Runtime)> {
    if is_hex64(seg) {
        return Some((seg.to_owned(), Runtime::Unknown));
    }
    // `<pod slice>:cri-containerd:<id>` (v1, containerd with systemd_cgroup).
    if let Some((_, rest)) = seg.split_once(':') {
        let (rt, id) = rest.split_once(':')?;
        let runtime = match rt {
            "cri-containerd" => Runtime::Containerd,
            "crio" => Runtime::Crio,
            "docker" => Runtime::Docker,
            _ => return None,
        };
        return is_hex64(id).then(|| (id.to_owned(), runtime));
    }
    let scope = seg.strip_suffix(".scope")?;
    for (prefix, runtime) in [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("docker-", Runtime::Docker),
    ] {
        if let Some(id) = scope.strip_prefix(prefix)
            && is_hex64(id)
        {
            return Some((id.to_owned(), runtime));
        }
    }
    None
}

/// Pure: pod UID and container id named by one cgroup path.
pub fn parse_cgroup_path(path: &str) -> (Option<String>, Option<(String, Runtime)>) {
    let mut uid = None;
    let mut container = None;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if uid.is_none()
            && (seg.starts_with("pod") || seg.contains("-pod"))
            && let Some(u) = uid_after_pod(seg.split(':').next().unwrap_or(seg))
        {
            uid = Some(u);
        }
        // `crio-conmon-<id>.scope` is the runtime monitor, not the container: no id.
        if container.is_none()
            && let Some(c) = container_in(seg)
        {
            container = Some(c);
        }
    }
    (uid, container)
}

/// Pure: parses `/proc/<pid>/cgroup`. Prefers the v2 line (`0::/path`); on a v1-only host takes
/// the first controller line that names a pod (else one that names a container).
pub fn parse_cgroup(text: &str) -> Option<CgroupInfo> {
    let mut best: Option<(u8, CgroupInfo)> = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id.parse::<u32>().is_err() || !path.starts_with('/') {
            continue;
        }
        let v2 = id == "0" && ctrl.is_empty();
        let (uid, container) = parse_cgroup_path(path);
        let score = u8::from(uid.is_some()) * 4 + u8::from(container.is_some()) * 2 + u8::from(v2);
        let info = CgroupInfo {
            path: path.to_owned(),
            v2,
            pod_uid: uid,
            container_id: container.as_ref().map(|c| c.0.clone()),
            runtime: container.map(|c| c.1),
        };
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, info));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "0f4fe1c3b6c9c5a1b0bd3e4e7d0b4c9a4c6f1a2b3c4d5e6f708192a3b4c5d6e7";
    const UID: &str = "3b2a6f1e-7c4d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn cgroup_path_shapes() {
        let us = UID.replace('-', "_");
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{us}.slice/cri-containerd-{CID}.scope"
                ),
                Runtime::Containerd,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{us}.slice/crio-{CID}.scope"),
                Runtime::Crio,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice/docker-{CID}.scope"
                ),
                Runtime::Docker,
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                Runtime::Unknown,
            ),
            (format!("/kubepods/pod{UID}/{CID}"), Runtime::Unknown),
            (
                format!(
                    "/system.slice/containerd.service/kubepods-burstable-pod{us}.slice:cri-containerd:{CID}"
                ),
                Runtime::Containerd,
            ),
        ];
        for (path, rt) in cases {
            let (uid, c) = parse_cgroup_path(&path);
            assert_eq!(uid.as_deref(), Some(UID), "{path}");
            assert_eq!(c, Some((CID.to_owned(), rt)), "{path}");
        }
        // Pod-level cgroup: UID, no container.
        let (uid, c) = parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}"));
        assert_eq!((uid.as_deref(), c), (Some(UID), None));
        // Plain docker: container, no pod.
        let (uid, c) = parse_cgroup_path(&format!("/docker/{CID}"));
        assert_eq!(uid, None);
        assert_eq!(c.map(|c| c.0).as_deref(), Some(CID));
        let (uid, c) = parse_cgroup_path(&format!("/system.slice/docker-{CID}.scope"));
        assert_eq!((uid, c.map(|c| c.1)), (None, Some(Runtime::Docker)));
        // conmon of CRI-O is in the pod but is no container.
        let (uid, c) = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod{us}.slice/crio-conmon-{CID}.scope",
            us = UID.replace('-', "_")
        ));
        assert_eq!((uid.as_deref(), c), (Some(UID), None));
        // Host and garbage.
        for p in [
            "/user.slice/user-0.slice/session-1.scope",
            "/",
            "/podcast/pod",
            "/kubepods/podnot-a-uid",
            "/kubepods/burstable/pod3b2a6f1e-7c4d-4e5f-8a9b-0c1d2e3f4a5bXX/abc",
        ] {
            assert_eq!(parse_cgroup_path(p), (None, None), "{p}");
        }
    }

    #[test]
    fn proc_cgroup_v1_and_v2() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        let i = parse_cgroup(&v2).unwrap();
        assert!(i.v2);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.container_id.as_deref(), Some(CID));
        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{CID}\n11:cpuset:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n"
        );
        let i = parse_cgroup(&v1).unwrap();
        assert!(!i.v2);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.runtime, Some(Runtime::Unknown));
        let host = parse_cgroup("0::/system.slice/sshd.service\n").unwrap();
        assert_eq!((host.pod_uid, host.container_id), (None, None));
        assert!(parse_cgroup("garbage\n\n::\nx:y:z\n").is_none());
        assert!(parse_cgroup("").is_none());
    }
}
