//! The kernel-log line parser and classifier: any bytes a kernel log (or a file passed as
//! `--path.kmsg`) holds, one line at a time, through the same state the collector keeps.
#![no_main]

use ark_exporter::collectors::kmsg::parse::{Classifier, MAX_LINE_BYTES, parse_line};
use ark_exporter::collectors::kmsg::state::{KmsgState, Lookup};
use ark_exporter::gpu_map::GpuMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut classifier = Classifier::default();
    let none = std::path::Path::new("/nonexistent");
    let mut state = KmsgState::new(Lookup::new(GpuMap::default(), none, none), 0, Some(0), 8, false);
    let mut events = Vec::new();
    // The input is split like a file: several lines share the classifier's context.
    for line in data.split(|&b| b == b'\n') {
        if let Ok(l) = parse_line(line, 1_767_225_600_000) {
            assert!(line.len() <= MAX_LINE_BYTES);
            let _ = classifier.classify(l.message);
        }
        state.handle(line, 1_767_225_600_000, &mut events);
    }
    let _ = state.families();
});
