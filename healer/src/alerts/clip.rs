//! Fixed sizes for what Alertmanager sends, so that an alert's memory is bounded whatever a peer
//! writes (STYLE 18: budget bytes, not counts): at most [`MAX_ENTRIES`] labels and as many
//! annotations, keys of at most [`MAX_KEY_BYTES`], values of at most [`MAX_VALUE_BYTES`], and a
//! fingerprint of at most [`MAX_FINGERPRINT_BYTES`] (a ticket must fit its 4 KiB annotation).
//!
//! Pure: no I/O here.

use std::collections::BTreeMap;

/// Labels (and, separately, annotations) kept per alert.
pub const MAX_ENTRIES: usize = 64;
/// Bytes of a label or annotation key.
pub const MAX_KEY_BYTES: usize = 128;
/// Bytes of a label or annotation value.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Bytes of a fingerprint; a longer one is replaced by its 16-hex FNV-1a hash.
pub const MAX_FINGERPRINT_BYTES: usize = 64;

/// Kept first when there are too many entries: the healer reads these (`summary` is the
/// ticket's reason; `job_id` and `victim_nodes` go into its `jobs`); the rest follow in key order.
pub const FIRST_KEYS: [&str; 10] = [
    "node",
    "condition",
    "gpu",
    "xid",
    "device",
    "severity",
    "alertname",
    "summary",
    "job_id",
    "victim_nodes",
];

/// What clipping changed while one alert was built.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Clipped {
    /// Labels and annotations left out: over [`MAX_ENTRIES`], or a key that, once cut, equals a
    /// key already kept.
    pub dropped: usize,
    /// Keys and values cut to their limit.
    pub cut: usize,
    /// The fingerprint was replaced by its hash.
    pub fingerprint: bool,
}

impl Clipped {
    /// Fields dropped, cut or replaced: what `ark_healer_alert_fields_clipped_total` counts.
    pub fn fields(&self) -> usize {
        self.dropped + self.cut + usize::from(self.fingerprint)
    }
}

/// Cuts `s` to at most `max` bytes at a char boundary; says whether it cut.
pub fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    // truncate keeps the capacity: without this a 120 KB value cut to 1 KiB still held 120 KB
    // (6,000 such alerts: 800 MiB), and the byte budget counted 1 KiB.
    s.shrink_to_fit();
    true
}

/// `s` cut to at most `max` bytes at a char boundary, for log fields.
pub fn clipped_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Labels or annotations clipped: [`FIRST_KEYS`] first, then the rest in key order, up to
/// [`MAX_ENTRIES`]; keys and values cut.
pub fn entries(map: BTreeMap<String, String>, c: &mut Clipped) -> BTreeMap<String, String> {
    let fits = map.len() <= MAX_ENTRIES
        && map
            .iter()
            .all(|(k, v)| k.len() <= MAX_KEY_BYTES && v.len() <= MAX_VALUE_BYTES);
    if fits {
        // The common case: nothing to clip, nothing to copy.
        return map;
    }
    let mut rest = map;
    let mut out = BTreeMap::new();
    let mut keep = |mut k: String, mut v: String, out: &mut BTreeMap<String, String>| {
        if out.len() >= MAX_ENTRIES {
            c.dropped += 1;
            return;
        }
        let key_cut = cut(&mut k, MAX_KEY_BYTES);
        if out.contains_key(&k) {
            c.dropped += 1;
            return;
        }
        c.cut += usize::from(key_cut) + usize::from(cut(&mut v, MAX_VALUE_BYTES));
        out.insert(k, v);
    };
    for key in FIRST_KEYS {
        if let Some((k, v)) = rest.remove_entry(key) {
            keep(k, v, &mut out);
        }
    }
    for (k, v) in rest {
        keep(k, v, &mut out);
    }
    out
}

/// The fingerprint as sent, or, over [`MAX_FINGERPRINT_BYTES`], the 16-hex FNV-1a hash of it: a
/// cut would make distinct long fingerprints (a shared prefix) collide.
pub fn fingerprint(fp: String, c: &mut Clipped) -> String {
    if fp.len() <= MAX_FINGERPRINT_BYTES {
        return fp;
    }
    c.fingerprint = true;
    format!("{:016x}", fnv1a(fp.bytes()))
}

/// A stable fingerprint for alerts that come without one (hand-written plan input).
pub fn fingerprint_of(labels: &BTreeMap<String, String>) -> String {
    let bytes = labels
        .iter()
        .flat_map(|(k, v)| k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]));
    format!("{:016x}", fnv1a(bytes))
}

/// FNV-1a, 64 bits: stable across runs and platforms, unlike `DefaultHasher`.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, String> {
        kv.into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn small_entries_pass_unchanged() {
        let mut c = Clipped::default();
        let m = map([("node", "n1"), ("condition", "GpuHung")]);
        assert_eq!(entries(m.clone(), &mut c), m);
        assert_eq!(c, Clipped::default());
        assert_eq!(fingerprint("abc".into(), &mut c), "abc");
        let exact = "f".repeat(MAX_FINGERPRINT_BYTES);
        assert_eq!(fingerprint(exact.clone(), &mut c), exact);
        assert_eq!(c.fields(), 0);
    }

    #[test]
    fn huge_keys_and_values_are_cut_at_a_char_boundary() {
        let mut c = Clipped::default();
        // Two-byte and three-byte chars, so that the limits fall inside a char.
        let value = "é".repeat(3000) + "€";
        let key = "ü".repeat(300);
        let m = BTreeMap::from([
            (key.clone(), "v".to_owned()),
            ("summary".to_owned(), value),
            ("node".to_owned(), "€".repeat(1000)),
        ]);
        let out = entries(m, &mut c);
        assert_eq!(out.len(), 3);
        assert_eq!(out["summary"].len(), MAX_VALUE_BYTES);
        assert!(out["summary"].chars().all(|ch| ch == 'é'));
        // 1024 is not a multiple of 3: the cut goes back to the char before.
        assert_eq!(out["node"].len(), 1023);
        let cut_key = out.keys().find(|k| k.starts_with('ü')).unwrap();
        assert_eq!(cut_key.len(), MAX_KEY_BYTES);
        assert_eq!(c.cut, 3);
        assert_eq!(c.dropped, 0);
    }

    #[test]
    fn ten_thousand_labels_keep_the_ones_that_matter() {
        let mut c = Clipped::default();
        let mut m: BTreeMap<String, String> = (0..10_000)
            .map(|i| (format!("a{i:05}"), "x".repeat(2000)))
            .collect();
        for k in FIRST_KEYS {
            m.insert(k.to_owned(), format!("{k}-value"));
        }
        let out = entries(m, &mut c);
        assert_eq!(out.len(), MAX_ENTRIES);
        for k in FIRST_KEYS {
            assert_eq!(out[k], format!("{k}-value"), "{k}");
        }
        // Then the rest in key order.
        let rest: Vec<&String> = out.keys().filter(|k| k.starts_with("a0")).collect();
        assert_eq!(rest.len(), MAX_ENTRIES - FIRST_KEYS.len());
        assert_eq!(rest[0], "a00000");
        assert_eq!(rest[rest.len() - 1], &format!("a{:05}", rest.len() - 1));
        assert!(out.values().all(|v| v.len() <= MAX_VALUE_BYTES));
        assert_eq!(c.dropped, 10_000 + FIRST_KEYS.len() - MAX_ENTRIES);
        assert_eq!(c.cut, MAX_ENTRIES - FIRST_KEYS.len());
    }

    #[test]
    fn keys_that_collide_once_cut_are_dropped() {
        let mut c = Clipped::default();
        let base = "k".repeat(MAX_KEY_BYTES);
        let m = BTreeMap::from([
            (base.clone(), "first".to_owned()),
            (format!("{base}-one"), "second".to_owned()),
            (format!("{base}-two"), "third".to_owned()),
        ]);
        let out = entries(m, &mut c);
        assert_eq!(out, BTreeMap::from([(base, "first".to_owned())]));
        assert_eq!(c.dropped, 2);
    }

    #[test]
    fn long_fingerprints_are_hashed_and_stay_distinct() {
        let mut c = Clipped::default();
        let long = "f".repeat(5 * 1024);
        let a = fingerprint(format!("{long}a"), &mut c);
        let b = fingerprint(format!("{long}b"), &mut c);
        assert!(c.fingerprint);
        assert_ne!(a, b);
        for fp in [&a, &b] {
            assert_eq!(fp.len(), 16);
            assert!(fp.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        // Stable: the same long fingerprint always maps to the same short one.
        assert_eq!(fingerprint(format!("{long}a"), &mut c), a);
        let over = fingerprint("g".repeat(MAX_FINGERPRINT_BYTES + 1), &mut c);
        assert_eq!(over.len(), 16);
    }

    #[test]
    fn fingerprint_of_labels_is_stable_and_distinguishes() {
        let a = fingerprint_of(&map([("node", "n1"), ("condition", "GpuHung")]));
        assert_eq!(
            a,
            fingerprint_of(&map([("condition", "GpuHung"), ("node", "n1")]))
        );
        assert_ne!(
            a,
            fingerprint_of(&map([("node", "n1c"), ("ondition", "GpuHung")]))
        );
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn clipped_str_keeps_char_boundaries() {
        assert_eq!(clipped_str("abc", 10), "abc");
        assert_eq!(clipped_str("ééé", 3), "é");
        assert_eq!(clipped_str("ééé", 0), "");
    }
}
