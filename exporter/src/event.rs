//! The Ark event model and the probe protocol (JSON Lines), shared by probes, replay and the
//! built-in collectors.
//!
//! Parsing is pure (`parse_line(&[u8])`); the I/O that splits a byte stream into bounded lines is
//! [`LineReader`]. Nothing here touches the graph or the metrics: callers count the errors.

use std::borrow::Cow;
use std::fmt;
use std::io::BufRead;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest accepted line (bytes, without the newline). Longer lines are dropped as `oversized_line`.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Longest accepted id (`entity_id`, `job_id`, `node_id`, `pod`, `namespace`).
pub const MAX_ID_BYTES: usize = 256;
/// Longest accepted `value`.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The event types of the Ark probe protocol. Anything else is `unknown_event_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    ComputeUtil,
    ComputeMem,
    TransportBw,
    TransportDrop,
    StorageIops,
    StorageQdepth,
    ProcessState,
    ErrorHw,
    ErrorNet,
    TopoLinkDown,
    IntentRun,
    ActionExec,
}

impl EventType {
    /// Every type, in a stable order (`as usize` indexes it).
    pub const ALL: [EventType; 12] = [
        EventType::ComputeUtil,
        EventType::ComputeMem,
        EventType::TransportBw,
        EventType::TransportDrop,
        EventType::StorageIops,
        EventType::StorageQdepth,
        EventType::ProcessState,
        EventType::ErrorHw,
        EventType::ErrorNet,
        EventType::TopoLinkDown,
        EventType::IntentRun,
        EventType::ActionExec,
    ];
    /// Number of event types.
    pub const COUNT: usize = Self::ALL.len();

    /// The wire name (`compute.util`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ComputeUtil => "compute.util",
            EventType::ComputeMem => "compute.mem",
            EventType::TransportBw => "transport.bw",
            EventType::TransportDrop => "transport.drop",
            EventType::StorageIops => "storage.iops",
            EventType::StorageQdepth => "storage.qdepth",
            EventType::ProcessState => "process.state",
            EventType::ErrorHw => "error.hw",
            EventType::ErrorNet => "error.net",
            EventType::TopoLinkDown => "topo.link_down",
            EventType::IntentRun => "intent.run",
            EventType::ActionExec => "action.exec",
        }
    }

    /// Parses a wire name; `None` for an unknown type.
    pub fn parse(s: &str) -> Option<EventType> {
        Self::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// Errors put a BlockedBy edge on their entity.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            EventType::ErrorHw | EventType::ErrorNet | EventType::TopoLinkDown
        )
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One event. `pod` and `namespace` are optional Ark extensions (ignored by older readers).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    pub event_type: EventType,
    pub entity_id: String,
    pub job_id: Option<String>,
    pub pid: Option<u32>,
    pub value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Event {
    /// An event of a built-in collector: no job, node, pod or namespace (the pipeline and the
    /// pod resolver fill in what they know).
    pub fn new(
        ts: i64,
        event_type: EventType,
        entity_id: String,
        pid: Option<u32>,
        value: String,
    ) -> Self {
        Event {
            ts,
            event_type,
            entity_id,
            job_id: None,
            pid,
            value,
            node_id: None,
            pod: None,
            namespace: None,
        }
    }
}

/// Why a line was rejected. [`ParseError::reason`] is the `reason` label of
/// `ark_events_dropped_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line longer than {MAX_LINE_BYTES} bytes")]
    Oversized,
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("malformed JSON: {detail}")]
    Malformed { detail: String },
    #[error("missing field `{field}`")]
    MissingField { field: &'static str },
    #[error("unknown event type")]
    UnknownEventType,
    #[error("invalid field `{field}`")]
    InvalidField { field: &'static str },
}

impl ParseError {
    /// Stable, low-cardinality reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Oversized => "oversized_line",
            ParseError::NotUtf8 => "invalid_utf8",
            ParseError::Malformed { .. } => "malformed_json",
            ParseError::MissingField { .. } => "missing_field",
            ParseError::UnknownEventType => "unknown_event_type",
            ParseError::InvalidField { .. } => "invalid_field",
        }
    }
}

/// `value` is a string in the protocol; numbers are accepted too (probes written in shell often
/// print bare numbers) and kept in their JSON spelling.
struct StrOrNum<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for StrOrNum<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrOrNum<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(StrOrNum(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_any(V)
    }
}

/// Borrowing wire shape; serde rejects duplicate keys, which is what we want for hostile input.
#[derive(Deserialize)]
struct RawEvent<'a> {
    ts: Option<f64>,
    #[serde(borrow)]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    entity_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    job_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(borrow)]
    value: Option<StrOrNum<'a>>,
    #[serde(borrow, default)]
    node_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pod: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    namespace: Option<Cow<'a, str>>,
}

fn id_field(v: Option<Cow<'_, str>>, field: &'static str) -> Result<Option<String>, ParseError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) if s.len() > MAX_ID_BYTES || s.chars().any(char::is_control) => {
            Err(ParseError::InvalidField { field })
        }
        Some(s) => Ok(Some(s.into_owned())),
    }
}

/// Parses one protocol line (without its newline; a trailing `\r` is tolerated). Pure.
/// Timestamps are only checked for being a finite, non-negative integer-ish number here: whether
/// one is too far in the future or past depends on the pipeline's clock.
pub fn parse_line(line: &[u8]) -> Result<Event, ParseError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(ParseError::Oversized);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| ParseError::NotUtf8)?;
    let raw: RawEvent<'_> = serde_json::from_str(text).map_err(|e| {
        // A missing-field error cannot happen (all fields are Option); everything else is JSON.
        ParseError::Malformed {
            detail: e.to_string(),
        }
    })?;
    let ts = raw.ts.ok_or(ParseError::MissingField { field: "ts" })?;
    if !ts.is_finite() || !(0.0..=9.0e15).contains(&ts) {
        return Err(ParseError::InvalidField { field: "ts" });
    }
    let event_type = raw.event_type.ok_or(ParseError::MissingField {
        field: "event_type",
    })?;
    let event_type = EventType::parse(&event_type).ok_or(ParseError::UnknownEventType)?;
    let entity_id = id_field(raw.entity_id, "entity_id")?
        .ok_or(ParseError::MissingField { field: "entity_id" })?;
    let value = raw
        .value
        .ok_or(ParseError::MissingField { field: "value" })?
        .0;
    if value.len() > MAX_VALUE_BYTES {
        return Err(ParseError::InvalidField { field: "value" });
    }
    Ok(Event {
        ts: ts as i64,
        event_type,
        entity_id,
        job_id: id_field(raw.job_id, "job_id")?,
        pid: raw.pid,
        value: value.into_owned(),
        node_id: id_field(raw.node_id, "node_id")?,
        pod: id_field(raw.pod, "pod")?,
        namespace: id_field(raw.namespace, "namespace")?,
    })
}

/// Longest id or label kept once accepted (`entity_id`, `job_id`, `node_id`, `pod`,
/// `namespace`): what is longer is clipped (at a character boundary) and counted.
pub const MAX_STORED_ID_BYTES: usize = 128;
/// Longest `value` kept once accepted; longer values are clipped and counted.
pub const MAX_STORED_VALUE_BYTES: usize = 256;
/// The `field` label values of `ark_strings_clipped_total`, in [`ClipCounters`] order.
pub const CLIP_FIELDS: [&str; 6] = [
    "entity_id",
    "job_id",
    "node_id",
    "pod",
    "namespace",
    "value",
];

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
pub fn clip_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Strings clipped, per field of [`CLIP_FIELDS`]. Shared by the senders and the pipeline.
#[derive(Debug, Default)]
pub struct ClipCounters([std::sync::atomic::AtomicU64; 6]);

impl ClipCounters {
    /// Clips every string of `ev` to its stored bound, counting each field clipped. Strings that
    /// are clipped are reallocated to their new length (a queued event holds only what it keeps).
    pub fn clip(&self, ev: &mut Event) {
        let one = |i: usize, s: &mut String, max: usize| {
            if s.len() > max {
                let n = clip_str(s, max).len();
                s.truncate(n);
                s.shrink_to_fit();
                self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        one(0, &mut ev.entity_id, MAX_STORED_ID_BYTES);
        for (i, f) in [
            (1, &mut ev.job_id),
            (2, &mut ev.node_id),
            (3, &mut ev.pod),
            (4, &mut ev.namespace),
        ] {
            if let Some(s) = f {
                one(i, s, MAX_STORED_ID_BYTES);
            }
        }
        one(5, &mut ev.value, MAX_STORED_VALUE_BYTES);
    }

    /// Whether any string of `ev` is over its stored bound (no copy needed when not).
    pub fn needs_clip(ev: &Event) -> bool {
        let over = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_STORED_ID_BYTES);
        ev.entity_id.len() > MAX_STORED_ID_BYTES
            || ev.value.len() > MAX_STORED_VALUE_BYTES
            || over(&ev.job_id)
            || over(&ev.node_id)
            || over(&ev.pod)
            || over(&ev.namespace)
    }

    /// Counts so far, in [`CLIP_FIELDS`] order.
    pub fn get(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.0[i].load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Bytes an event holds in memory (struct, box and string buffers): what the pipeline queue
/// charges it.
pub fn event_bytes(ev: &Event) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
    std::mem::size_of::<Event>()
        + 16
        + ev.entity_id.capacity()
        + ev.value.capacity()
        + opt(&ev.job_id)
        + opt(&ev.node_id)
        + opt(&ev.pod)
        + opt(&ev.namespace)
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line (without the newline).
    Data(&'a [u8]),
    /// A line longer than the limit; its bytes were skipped up to the next newline.
    Oversized,
}

/// Splits a byte stream into lines without ever buffering more than `max` bytes of one line:
/// an endless line without a newline costs constant memory.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: Vec::with_capacity(256),
            max,
        }
    }

    /// Next line, `None` at end of input. A final line without a newline is returned too.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let mut oversized = false;
        loop {
            let chunk = self.inner.fill_buf()?;
            if chunk.is_empty() {
                if oversized {
                    return Ok(Some(Line::Oversized));
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Line::Data(&self.buf)));
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if !oversized {
                if self.buf.len() + take > self.max {
                    oversized = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.inner.consume(if done { take + 1 } else { take });
            if done {
                if oversized {
                    return Ok(Some(Line::Oversized));
                }
                return Ok(Some(Line::Data(&self.buf)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"ts": 1700000000000, "event_type": "compute.util", "entity_id": "gpu-0", "job_id": "job-1", "pid": 42, "value": "97", "node_id": "n1"}"#;

    #[test]
    fn parses_a_full_event() {
        let e = parse_line(OK.as_bytes()).unwrap();
        assert_eq!(e.ts, 1_700_000_000_000);
        assert_eq!(e.event_type, EventType::ComputeUtil);
        assert_eq!(e.entity_id, "gpu-0");
        assert_eq!(e.job_id.as_deref(), Some("job-1"));
        assert_eq!(e.pid, Some(42));
        assert_eq!(e.value, "97");
        assert_eq!(e.node_id.as_deref(), Some("n1"));
    }

    #[test]
    fn nulls_and_optional_fields() {
        let e = parse_line(
            br#"{"ts":1,"event_type":"error.hw","entity_id":"gpu-1","job_id":null,"pid":null,"value":"XID 79"}"#,
        )
        .unwrap();
        assert_eq!(e.job_id, None);
        assert_eq!(e.pid, None);
        assert_eq!(e.node_id, None);
        assert!(e.event_type.is_error());
    }

    #[test]
    fn numeric_value_and_crlf_and_escapes() {
        let e = parse_line(
            b"{\"ts\":5,\"event_type\":\"compute.mem\",\"entity_id\":\"gpu-\\u0030\",\"value\":12.5}\r",
        )
        .unwrap();
        assert_eq!(e.entity_id, "gpu-0");
        assert_eq!(e.value, "12.5");
    }

    #[test]
    fn every_type_round_trips() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("compute.UTIL"), None);
    }

    #[test]
    fn malformed_input_is_rejected_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "malformed_json"),
            (b"not json", "malformed_json"),
            (b"{\"ts\":1,", "malformed_json"),
            (b"[1,2,3]", "malformed_json"),
            (b"null", "malformed_json"),
            (br#"{"ts":"x","event_type":"compute.util","entity_id":"g","value":"1"}"#, "malformed_json"),
            (br#"{"event_type":"compute.util","entity_id":"g","value":"1"}"#, "missing_field"),
            (br#"{"ts":1,"entity_id":"g","value":"1"}"#, "missing_field"),
            (br#"{"ts":1,"event_type":"compute.util","value":"1"}"#, "missing_field"),
            (br#"{"ts":1,"event_type":"compute.util","entity_id":"g"}"#, "missing_field"),
            (br#"{"ts":1,"event_type":"compute.util","entity_id":"","value":"1"}"#, "missing_field"),
            (br#"{"ts":1,"event_type":"bogus.type","entity_id":"g","value":"1"}"#, "unknown_event_type"),
            (br#"{"ts":-5,"event_type":"compute.util","entity_id":"g","value":"1"}"#, "invalid_field"),
            (br#"{"ts":1e300,"event_type":"compute.util","entity_id":"g","value":"1"}"#, "invalid_field"),
            (br#"{"ts":1,"event_type":"compute.util","entity_id":"g","value":"1","pid":-1}"#, "malformed_json"),
            (br#"{"ts":1,"event_type":"compute.util","entity_id":"g","value":"1","pid":4294967296}"#, "malformed_json"),
            (br#"{"ts":1,"event_type":"compute.util","entity_id":"g\u0007","value":"1"}"#, "invalid_field"),
            (b"{\"ts\":1,\"event_type\":\"compute.util\",\"entity_id\":\"\xff\xfe\",\"value\":\"1\"}", "invalid_utf8"),
        ];
        for (line, reason) in cases {
            let err = parse_line(line).unwrap_err();
            assert_eq!(err.reason(), *reason, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn duplicated_keys_are_rejected() {
        let err = parse_line(
            br#"{"ts":1,"ts":2,"event_type":"compute.util","entity_id":"g","value":"1"}"#,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "malformed_json");
    }

    #[test]
    fn hostile_sizes_are_rejected() {
        let big = vec![b'x'; MAX_LINE_BYTES + 1];
        assert_eq!(parse_line(&big).unwrap_err(), ParseError::Oversized);
        let long_id = format!(
            r#"{{"ts":1,"event_type":"compute.util","entity_id":"{}","value":"1"}}"#,
            "a".repeat(MAX_ID_BYTES + 1)
        );
        assert_eq!(
            parse_line(long_id.as_bytes()).unwrap_err().reason(),
            "invalid_field"
        );
        let long_value = format!(
            r#"{{"ts":1,"event_type":"compute.util","entity_id":"g","value":"{}"}}"#,
            "v".repeat(MAX_VALUE_BYTES + 1)
        );
        assert_eq!(
            parse_line(long_value.as_bytes()).unwrap_err().reason(),
            "invalid_field"
        );
        // Deep nesting must not blow the stack (ignored field: skipped; known field: rejected).
        let deep_value = format!(
            r#"{{"ts":1,"event_type":"compute.util","entity_id":"g","value":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse_line(deep_value.as_bytes()).is_err());
        let deep = format!(
            r#"{{"ts":1,"event_type":"compute.util","entity_id":"g","value":"1","x":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let _ = parse_line(deep.as_bytes());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let e = parse_line(
            br#"{"ts":1,"event_type":"intent.run","entity_id":"gpu-0","value":"train","extra":{"a":[1]}}"#,
        )
        .unwrap();
        assert_eq!(e.event_type, EventType::IntentRun);
    }

    #[test]
    fn line_reader_bounds_memory_and_recovers() {
        let mut input = Vec::new();
        input.extend_from_slice(b"first\n");
        input.extend(std::iter::repeat_n(b'y', 100));
        input.extend_from_slice(b"\nsecond\n\nlast-no-newline");
        let mut r = LineReader::new(std::io::BufReader::with_capacity(7, &input[..]), 16);
        assert_eq!(r.next_line().unwrap(), Some(Line::Data(b"first")));
        assert_eq!(r.next_line().unwrap(), Some(Line::Oversized));
        assert_eq!(r.next_line().unwrap(), Some(Line::Data(b"second")));
        assert_eq!(r.next_line().unwrap(), Some(Line::Data(b"")));
        assert_eq!(r.next_line().unwrap(), Some(Line::Data(b"last-no-newline")));
        assert_eq!(r.next_line().unwrap(), None);
    }

    #[test]
    fn line_reader_oversized_at_eof() {
        let input = [b'z'; 50];
        let mut r = LineReader::new(&input[..], 10);
        assert_eq!(r.next_line().unwrap(), Some(Line::Oversized));
        assert_eq!(r.next_line().unwrap(), None);
    }

    #[test]
    fn stored_strings_are_clipped_at_a_char_boundary_and_counted() {
        let c = ClipCounters::default();
        let mut ev =
            parse_line(br#"{"ts":1,"event_type":"compute.util","entity_id":"g","value":"1"}"#)
                .unwrap();
        ev.entity_id = "é".repeat(100); // 200 bytes, 2 per char
        ev.value = "v".repeat(MAX_VALUE_BYTES);
        ev.job_id = Some("short".into());
        assert!(ClipCounters::needs_clip(&ev));
        c.clip(&mut ev);
        assert_eq!(ev.entity_id.len(), MAX_STORED_ID_BYTES);
        assert_eq!(ev.entity_id, "é".repeat(64));
        assert_eq!(ev.value.len(), MAX_STORED_VALUE_BYTES);
        assert_eq!(
            ev.value.capacity(),
            MAX_STORED_VALUE_BYTES,
            "reallocated, not just cut"
        );
        assert_eq!(ev.job_id.as_deref(), Some("short"));
        assert_eq!(c.get(), [1, 0, 0, 0, 0, 1]);
        assert!(!ClipCounters::needs_clip(&ev));
        assert_eq!(clip_str("aé", 2), "a");
    }
}
