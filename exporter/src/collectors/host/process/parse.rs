//! The pure parts of the `process` collector: `/proc/<pid>/stat` and `io`, wait channels, disk
//! names and what a process's fd targets say it holds. No I/O here.

/// Fds whose target is stat'ed to find the disk behind a blocked process.
pub(super) const MAX_STAT_FDS: usize = 64;

/// The fields of `/proc/<pid>/stat` this collector uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub flags: u64,
    /// Start time in clock ticks since boot: with the pid, identifies a process across reuse.
    pub start: u64,
}

/// Pure: parses `/proc/<pid>/stat` (the comm may contain spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = text[..open].trim().parse().ok()?;
    let comm: String = text[open + 1..close].chars().take(64).collect();
    let f: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let state = f.first()?.chars().next()?;
    Some(ProcStat {
        pid,
        comm,
        state,
        flags: f.get(6)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// Pure: the last field of `/proc/loadavg` (`0.00 0.01 0.05 1/123 4567`): the most recently
/// allocated pid.
pub fn parse_last_pid(text: &str) -> Option<u64> {
    let f: Vec<&str> = text.split_ascii_whitespace().collect();
    if f.len() != 5 || !f[3].contains('/') {
        return None;
    }
    f[4].parse().ok()
}

/// Pure: `read_bytes` + `write_bytes` of `/proc/<pid>/io`.
pub fn parse_io(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':')
            && matches!(k.trim(), "read_bytes" | "write_bytes")
        {
            let v: u64 = v.trim().parse().ok()?;
            total = Some(total.unwrap_or(0u64).saturating_add(v));
        }
    }
    total
}

/// What a wchan symbol says a D-state process waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitClass {
    Gpu,
    Rdma,
    Block,
    Network,
    Unknown,
}

/// Pure: classifies a kernel wait channel symbol.
pub fn classify_wchan(w: &str) -> WaitClass {
    let w = w.trim();
    let has = |subs: &[&str]| subs.iter().any(|s| w.contains(s));
    if w.is_empty() || w == "0" {
        WaitClass::Unknown
    } else if w.starts_with("nv")
        || w.starts_with("_nv")
        || w.starts_with("os_")
        || has(&["nvidia", "uvm_"])
    {
        WaitClass::Gpu
    } else if has(&["ib_", "rdma", "mlx5", "mlx4", "uverbs"]) {
        WaitClass::Rdma
    } else if has(&[
        "io_schedule",
        "blk_",
        "folio_wait",
        "wait_on_page",
        "bit_wait_io",
        "jbd2",
        "submit_bio",
        "nvme",
        "balance_dirty_pages",
        "wb_wait",
        "rq_qos_wait",
        "filemap_",
        "xfs_",
        "ext4_",
    ]) {
        WaitClass::Block
    } else if has(&["sk_wait", "tcp_", "inet_", "sock_", "unix_"]) {
        WaitClass::Network
    } else {
        WaitClass::Unknown
    }
}

/// Pure: the whole disk of a partition name (`nvme0n1p2` → `nvme0n1`, `sda1` → `sda`).
pub fn disk_of(name: &str) -> &str {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == name.len() {
        return name;
    }
    if let Some(before) = stem.strip_suffix('p')
        && before.ends_with(|c: char| c.is_ascii_digit())
        && (before.starts_with("nvme") || before.starts_with("mmcblk"))
    {
        return before;
    }
    for prefix in ["sd", "vd", "xvd", "hd"] {
        if let Some(letters) = stem.strip_prefix(prefix)
            && !letters.is_empty()
            && letters.chars().all(|c| c.is_ascii_lowercase())
        {
            return stem;
        }
    }
    name
}

/// What a process holds, from its fd link targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    pub gpus: Vec<u32>,
    /// `uverbs<N>` device names.
    pub uverbs: Vec<String>,
    /// Block devices opened directly (`/dev/nvme0n1`).
    pub disks: Vec<String>,
    pub sockets: u32,
    /// fds pointing at regular files (candidates for the disk behind a block-layer wait).
    pub files: Vec<String>,
}

impl Holds {
    /// Pure: accounts one fd link target.
    pub fn add_target(&mut self, target: &str) {
        if target.starts_with("socket:[") {
            self.sockets = self.sockets.saturating_add(1);
        } else if let Some(rest) = target.strip_prefix("/dev/nvidia") {
            if let Ok(n) = rest.parse::<u32>()
                && !self.gpus.contains(&n)
                && self.gpus.len() < 64
            {
                self.gpus.push(n);
            }
        } else if let Some(rest) = target.strip_prefix("/dev/infiniband/") {
            if rest.starts_with("uverbs")
                && !self.uverbs.iter().any(|u| u == rest)
                && self.uverbs.len() < 16
            {
                self.uverbs.push(rest.to_owned());
            }
        } else if let Some(dev) = target.strip_prefix("/dev/") {
            let disk = disk_of(dev);
            let is_disk = ["nvme", "sd", "vd", "xvd", "hd", "md", "dm-"]
                .iter()
                .any(|p| disk.starts_with(p));
            if is_disk
                && !dev.contains('/')
                && !self.disks.iter().any(|d| d == disk)
                && self.disks.len() < 16
            {
                self.disks.push(disk.to_owned());
            }
        } else if target.starts_with('/') && self.files.len() < MAX_STAT_FDS {
            self.files.push(target.to_owned());
        }
    }

    pub(super) fn interesting(&self) -> bool {
        !self.gpus.is_empty() || !self.uverbs.is_empty() || self.sockets > 0
    }

    /// Tracking priority: lower first.
    pub(super) fn rank(&self, in_pod: bool) -> u8 {
        if !self.gpus.is_empty() || !self.uverbs.is_empty() {
            0
        } else if in_pod {
            1
        } else {
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let s = "4242 (python3 (train) x) D 1 4242 4242 0 -1 4194560 100 0 0 0 50 10 0 0 20 0 8 0 123456 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n";
        let p = parse_stat(s).unwrap();
        assert_eq!(p.pid, 4242);
        assert_eq!(p.comm, "python3 (train) x");
        assert_eq!(p.state, 'D');
        assert_eq!(p.flags, 4_194_560);
        assert_eq!(p.start, 123_456);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) R 1 2").is_none());
        assert!(parse_stat(")( R").is_none());
    }

    #[test]
    fn last_pid_of_loadavg() {
        assert_eq!(parse_last_pid("0.05 0.10 0.20 2/311 48211\n"), Some(48_211));
        assert_eq!(parse_last_pid("0.05 0.10 0.20 2/311\n"), None);
        assert_eq!(parse_last_pid("a b c d e"), None);
        assert_eq!(parse_last_pid(""), None);
    }

    #[test]
    fn wchan_and_disks() {
        assert_eq!(classify_wchan("nvkms_ioctl"), WaitClass::Gpu);
        assert_eq!(classify_wchan("os_acquire_mutex"), WaitClass::Gpu);
        assert_eq!(classify_wchan("ib_uverbs_write"), WaitClass::Rdma);
        assert_eq!(classify_wchan("io_schedule"), WaitClass::Block);
        assert_eq!(classify_wchan("folio_wait_bit_common"), WaitClass::Block);
        assert_eq!(classify_wchan("sk_wait_data"), WaitClass::Network);
        assert_eq!(classify_wchan("0"), WaitClass::Unknown);
        assert_eq!(classify_wchan("do_epoll_wait"), WaitClass::Unknown);
        assert_eq!(disk_of("nvme0n1p2"), "nvme0n1");
        assert_eq!(disk_of("sda1"), "sda");
        assert_eq!(disk_of("nvme0n1"), "nvme0n1");
        assert_eq!(disk_of("md0"), "md0");
        assert_eq!(
            parse_io("rchar: 1\nread_bytes: 4096\nwrite_bytes: 10\n"),
            Some(4106)
        );
        assert_eq!(parse_io("read_bytes: x\n"), None);
        assert_eq!(parse_io(""), None);
    }

    #[test]
    fn holds_from_fd_targets() {
        let mut h = Holds::default();
        for t in [
            "/dev/nvidia0",
            "/dev/nvidia0",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia3",
            "/dev/infiniband/uverbs1",
            "/dev/infiniband/rdma_cm",
            "socket:[123]",
            "socket:[124]",
            "pipe:[5]",
            "anon_inode:[eventfd]",
            "/dev/nvme0n1p1",
            "/dev/null",
            "/data/ckpt.pt",
        ] {
            h.add_target(t);
        }
        assert_eq!(h.gpus, [0, 3]);
        assert_eq!(h.uverbs, ["uverbs1"]);
        assert_eq!(h.sockets, 2);
        assert_eq!(h.disks, ["nvme0n1"]);
        assert_eq!(h.files, ["/data/ckpt.pt"]);
        assert!(h.interesting());
    }
}
