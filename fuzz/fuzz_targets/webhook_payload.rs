//! The Alertmanager webhook body parser (untrusted HTTP input, after auth and the size limit),
//! and the alert-file reader of `ark-healer plan`.
#![no_main]

use ark_healer::alerts::{Alert, AlertStore, parse_alert_file, parse_webhook};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = parse_webhook(data) {
        // Accepted alerts go through the same conversion and dedup store as in the server.
        let mut store = AlertStore::new(64);
        for a in payload.alerts {
            let alert = Alert::from(a);
            let _ = (alert.node(), alert.condition(), alert.reason());
            let _ = store.apply(alert);
        }
        let _ = store.snapshot();
    }
    let _ = parse_alert_file(data);
});
