//! PCI bus id → GPU index, shared by the collectors that learn it (NVML, `/proc/driver/nvidia`)
//! and those that need it (the kernel log names GPUs only by bus id).
//!
//! Bus ids come in several spellings: NVML's `00000000:3B:00.0`, sysfs's `0000:3b:00.0`, the
//! driver's kernel-log `0000:3b:00` (no function). [`normalize_bdf`] maps all of them to the
//! sysfs form, which is the key here. Bounded: at most [`MAX_GPUS`] entries.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

/// Most GPUs remembered (more than any host has).
pub const MAX_GPUS: usize = 256;

/// See the module docs. Cloning shares the map.
#[derive(Debug, Clone, Default)]
pub struct GpuMap {
    inner: Arc<RwLock<BTreeMap<String, u32>>>,
}

/// `DDDD:BB:DD.F` in lower case from any of the spellings in the module docs; `None` for
/// anything that is not a bus id.
pub fn normalize_bdf(s: &str) -> Option<String> {
    let s = s.trim();
    let mut parts = s.splitn(3, ':');
    let (a, b, c) = (parts.next()?, parts.next()?, parts.next());
    // `BB:DD.F` without a domain.
    let (domain, bus, rest) = match c {
        Some(c) => (a, b, c),
        None => ("0", a, b),
    };
    let (dev, func) = match rest.split_once('.') {
        Some((d, f)) => (d, f),
        None => (rest, "0"),
    };
    let hex = |v: &str, max: usize| {
        !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if !hex(domain, 8) || !hex(bus, 2) || !hex(dev, 2) || !hex(func, 1) {
        return None;
    }
    let domain = u32::from_str_radix(domain, 16).ok()?;
    if domain > 0xffff {
        return None;
    }
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok()?;
    let func = u8::from_str_radix(func, 16).ok()?;
    if dev > 0x1f || func > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

impl GpuMap {
    /// Remembers that the GPU at `bdf` has NVML index `index`; false when `bdf` is not a bus id
    /// or the map is full.
    pub fn insert(&self, bdf: &str, index: u32) -> bool {
        let Some(key) = normalize_bdf(bdf) else {
            return false;
        };
        let mut m = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if m.len() >= MAX_GPUS && !m.contains_key(&key) {
            return false;
        }
        m.insert(key, index);
        true
    }

    /// The index of the GPU at `bdf` (any spelling; a bus id without function matches `.0`).
    pub fn index(&self, bdf: &str) -> Option<u32> {
        let key = normalize_bdf(bdf)?;
        let m = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        m.get(&key).copied()
    }

    /// The bus ids known, with their index.
    pub fn entries(&self) -> Vec<(String, u32)> {
        let m = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_normalize_to_sysfs() {
        for s in [
            "00000000:3B:00.0",
            "0000:3b:00.0",
            "0000:3b:00",
            "3b:00.0",
            " 3B:00 ",
        ] {
            assert_eq!(normalize_bdf(s).as_deref(), Some("0000:3b:00.0"), "{s}");
        }
        assert_eq!(
            normalize_bdf("0001:c1:1f.7").as_deref(),
            Some("0001:c1:1f.7")
        );
        for bad in [
            "",
            "3b",
            "zz:00.0",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "100000000:3b:00.0",
            "0000:3b:00.0:1",
            "0000:3b:00.",
            "0000::00.0",
        ] {
            assert_eq!(normalize_bdf(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bounded_and_shared() {
        let m = GpuMap::default();
        let other = m.clone();
        assert!(m.insert("00000000:3B:00.0", 2));
        assert_eq!(other.index("0000:3b:00"), Some(2));
        assert!(!m.insert("not a bus id", 1));
        for i in 0..MAX_GPUS as u32 * 2 {
            m.insert(&format!("0000:{:02x}:{:02x}.0", i / 32, i % 32), i);
        }
        assert_eq!(m.entries().len(), MAX_GPUS);
    }
}
