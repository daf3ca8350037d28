//! The `ark.io/ticket` node annotation parser: YAML a human may have edited by hand.
#![no_main]

use ark_healer::ticket::Ticket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = Ticket::from_annotation("fuzz-node", text) {
        // Whatever was accepted is used by the healer: the step walk and the re-serialisation.
        let _ = t.next_step(8);
        let _ = t.id();
        let _ = t.status.is_open();
        let _ = t.remediations_since(t.created_at, 3600, u32::MAX);
        if let Ok(again) = t.to_annotation("fuzz-node") {
            assert!(
                Ticket::from_annotation("fuzz-node", &again).is_ok(),
                "{again}"
            );
        }
    }
});
