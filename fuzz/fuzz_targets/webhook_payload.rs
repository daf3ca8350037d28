//! The Alertmanager webhook body parser (untrusted HTTP input, after auth and the size limit),
//! and the alert-file reader of `ark-healer plan`.
#![no_main]

use ark_healer::alerts::{Alert, AlertStore, StoreLimits, parse_alert_file, parse_webhook};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = parse_webhook(data) {
        // Accepted alerts go through the same conversion and dedup store as in the server.
        let mut store = AlertStore::new(StoreLimits {
            max_alerts: 64,
            max_bytes: 64 << 10,
            firing_expiry_seconds: 7200,
        });
        for a in payload.alerts {
            let (alert, _clipped) = Alert::from_webhook(a);
            let _ = (alert.node(), alert.condition(), alert.reason(), alert.bytes());
            // Any time will do for a pure store: the alert's own.
            let now = alert.starts_at;
            let _ = store.apply(alert, now);
            let _ = store.expire(now);
            assert!(store.bytes() <= 64 << 10);
        }
        let _ = store.snapshot();
    }
    let _ = parse_alert_file(data);
});
