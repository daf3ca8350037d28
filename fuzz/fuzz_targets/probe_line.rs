//! The Ark probe protocol parser: any bytes a probe writes to stdout, one line at a time.
#![no_main]

use ark_exporter::event::{EventType, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = parse_line(data) {
        // What was accepted must be a well-formed event: a known type that round-trips.
        assert_eq!(
            EventType::parse(ev.event_type.as_str()),
            Some(ev.event_type)
        );
        let _ = ev.event_type.is_error();
    }
});
