//! [`AlertStore`]: the open alerts by fingerprint, bounded in count and in bytes, and forgotten
//! when Alertmanager stops speaking of them.
//!
//! Pure: the caller passes the time (`now`) to every call that depends on it.
//!
//! Promises, each tried by `store_invariants_hold_under_random_apply_and_expire`:
//! - [`AlertStore::bytes`] never exceeds `max_bytes`, and is the sum of the stored alerts'
//!   [`Alert::bytes`]; [`AlertStore::len`] never exceeds `max_alerts`.
//! - Ordering: a later `startsAt` is a new occurrence and wins; for the same `startsAt`,
//!   `resolved` wins over `firing` (resolution is final for that occurrence), so a resolved
//!   occurrence is never turned back into firing by a late or repeated firing notification while
//!   the store remembers it (an hour after its last receipt, unless the budget evicts it earlier).
//! - Freshness (I4): a firing alert not received for `firing_expiry_seconds` is forgotten:
//!   Alertmanager re-sends every firing alert on `repeat_interval`, so silence means it stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};

use super::{Alert, AlertStatus};
use crate::config::Config;

/// How long a resolved alert is remembered after its last receipt: long enough to reject late
/// firing re-deliveries of that occurrence and to tell "resolved" from "never heard of".
pub const RESOLVED_MEMORY_SECONDS: i64 = 3600;

/// Bounds of an [`AlertStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Alerts kept (firing + recently resolved).
    pub max_alerts: usize,
    /// Sum of the kept alerts' [`Alert::bytes`].
    pub max_bytes: usize,
    /// A firing alert not received for this long is forgotten.
    pub firing_expiry_seconds: u64,
}

impl From<&Config> for StoreLimits {
    fn from(cfg: &Config) -> Self {
        StoreLimits {
            max_alerts: cfg.max_alerts,
            max_bytes: cfg.max_alert_bytes,
            firing_expiry_seconds: cfg.alert_expiry_seconds,
        }
    }
}

/// See [`AlertStore::condition_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionState {
    Firing,
    Resolved,
    Unknown,
}

/// What [`AlertStore::apply`] did with one alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// New or changed state (a new firing occurrence, or a resolution).
    Changed,
    /// Same state as already known: a re-send or a duplicate. Its receipt time is refreshed.
    Duplicate,
    /// Older than what we know (out-of-order delivery): ignored.
    Stale,
    /// A new alert that does not fit, even with every resolved alert evicted: not stored. The
    /// caller counts it (`ark_healer_alerts_dropped_total{reason="store_full"}`).
    Rejected,
}

/// What [`AlertStore::expire`] forgot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Firing alerts not re-sent for `firing_expiry_seconds`.
    pub firing: usize,
    /// Resolved alerts received more than [`RESOLVED_MEMORY_SECONDS`] ago.
    pub resolved: usize,
}

/// Position in an age index: receipt time, then arrival order among equal times (unique).
type Age = (Timestamp, u64);

#[derive(Debug)]
struct Entry {
    /// Shared with the planner's snapshot of a pass ([`AlertStore::shared`]): a pass over
    /// 100,000 alerts copies pointers, not the alerts.
    alert: Arc<Alert>,
    /// `alert.bytes()`, kept so that removal subtracts exactly what insertion added.
    bytes: usize,
    age: Age,
}

/// Open alerts by fingerprint; see the module docs for what it promises.
#[derive(Debug)]
pub struct AlertStore {
    limits: StoreLimits,
    entries: HashMap<String, Entry>,
    /// Firing entries, oldest receipt first: [`AlertStore::expire`] forgets from the front.
    firing_by_age: BTreeMap<Age, String>,
    /// Resolved entries, oldest receipt first: evicted from the front when the budget is short.
    resolved_by_age: BTreeMap<Age, String>,
    bytes: usize,
    resolved_bytes: usize,
    /// Arrival counter: the second half of every [`Age`].
    seq: u64,
}

impl AlertStore {
    pub fn new(limits: StoreLimits) -> Self {
        AlertStore {
            limits,
            entries: HashMap::new(),
            firing_by_age: BTreeMap::new(),
            resolved_by_age: BTreeMap::new(),
            bytes: 0,
            resolved_bytes: 0,
            seq: 0,
        }
    }

    /// Records `alert`, received at `now`. A changed state of an alert already known always fits:
    /// if its new labels and annotations do not, the known ones are kept with the new state (the
    /// fingerprint is Alertmanager's hash of the labels, so only annotations can differ). A new
    /// alert that does not fit first evicts resolved alerts, oldest receipt first, and is
    /// [`Applied::Rejected`] if that is not enough; firing alerts are never evicted.
    pub fn apply(&mut self, mut alert: Alert, now: Timestamp) -> Applied {
        let mut received = now;
        if let Some(known) = self.entries.get(&alert.fingerprint) {
            let k = &known.alert;
            if alert.starts_at < k.starts_at {
                return Applied::Stale;
            }
            if alert.starts_at == k.starts_at {
                match (k.status, alert.status) {
                    (AlertStatus::Resolved, AlertStatus::Firing) => return Applied::Stale,
                    (a, b) if a == b => {
                        self.refresh(&alert.fingerprint, now);
                        return Applied::Duplicate;
                    }
                    _ => {}
                }
            }
            // Receipt times never go backwards, whatever clock the caller reads.
            received = received.max(known.age.0);
        }
        let known = self.remove(&alert.fingerprint);
        let mut bytes = alert.bytes();
        if !self.can_fit(bytes) {
            let Some(known) = known else {
                return Applied::Rejected;
            };
            // It fitted before it was removed, so with the same size it fits again.
            let known_alert = Arc::unwrap_or_clone(known.alert);
            alert.labels = known_alert.labels;
            alert.annotations = known_alert.annotations;
            bytes = alert.bytes();
            debug_assert_eq!(bytes, known.bytes);
        }
        self.make_room(bytes);
        self.insert(alert, bytes, received);
        Applied::Changed
    }

    /// Forgets firing alerts not received for `firing_expiry_seconds` (Alertmanager stopped
    /// re-sending them) and resolved ones received more than an hour ago; receipt times, not
    /// Alertmanager's, which may be old.
    pub fn expire(&mut self, now: Timestamp) -> Expired {
        let firing_window = i64::try_from(self.limits.firing_expiry_seconds).unwrap_or(i64::MAX);
        let mut expired = Expired::default();
        for (status, window) in [
            (AlertStatus::Firing, firing_window),
            (AlertStatus::Resolved, RESOLVED_MEMORY_SECONDS),
        ] {
            // A window reaching before the first representable time expires nothing.
            let Ok(cutoff) = now.checked_sub(SignedDuration::from_secs(window)) else {
                continue;
            };
            loop {
                let index = match status {
                    AlertStatus::Firing => &self.firing_by_age,
                    AlertStatus::Resolved => &self.resolved_by_age,
                };
                let Some(((received, _), fp)) = index.first_key_value() else {
                    break;
                };
                if *received >= cutoff {
                    break;
                }
                let fp = fp.clone();
                self.remove(&fp);
                match status {
                    AlertStatus::Firing => expired.firing += 1,
                    AlertStatus::Resolved => expired.resolved += 1,
                }
            }
        }
        expired
    }

    /// Would an alert of `bytes` fit once every resolved alert is evicted?
    fn can_fit(&self, bytes: usize) -> bool {
        let firing = self.entries.len() - self.resolved_by_age.len();
        firing < self.limits.max_alerts
            && (self.bytes - self.resolved_bytes).saturating_add(bytes) <= self.limits.max_bytes
    }

    /// Evicts resolved alerts, oldest receipt first, until an alert of `bytes` fits.
    fn make_room(&mut self, bytes: usize) {
        while self.entries.len() >= self.limits.max_alerts
            || self.bytes.saturating_add(bytes) > self.limits.max_bytes
        {
            let Some((_, fp)) = self.resolved_by_age.first_key_value() else {
                break;
            };
            let fp = fp.clone();
            self.remove(&fp);
        }
    }

    fn index(&mut self, status: AlertStatus) -> &mut BTreeMap<Age, String> {
        match status {
            AlertStatus::Firing => &mut self.firing_by_age,
            AlertStatus::Resolved => &mut self.resolved_by_age,
        }
    }

    fn next_age(&mut self, received: Timestamp) -> Age {
        self.seq += 1;
        (received, self.seq)
    }

    fn insert(&mut self, alert: Alert, bytes: usize, received: Timestamp) {
        let age = self.next_age(received);
        let status = alert.status;
        self.index(status).insert(age, alert.fingerprint.clone());
        self.bytes += bytes;
        if status == AlertStatus::Resolved {
            self.resolved_bytes += bytes;
        }
        let fp = alert.fingerprint.clone();
        let alert = Arc::new(alert);
        self.entries.insert(fp, Entry { alert, bytes, age });
    }

    fn remove(&mut self, fp: &str) -> Option<Entry> {
        let e = self.entries.remove(fp)?;
        self.index(e.alert.status).remove(&e.age);
        self.bytes -= e.bytes;
        if e.alert.status == AlertStatus::Resolved {
            self.resolved_bytes -= e.bytes;
        }
        Some(e)
    }

    /// A re-send: the alert was received again at `now`.
    fn refresh(&mut self, fp: &str, now: Timestamp) {
        let Some((status, old)) = self.entries.get(fp).map(|e| (e.alert.status, e.age)) else {
            return;
        };
        let age = self.next_age(now.max(old.0));
        let index = self.index(status);
        if let Some(fp) = index.remove(&old) {
            index.insert(age, fp);
        }
        if let Some(e) = self.entries.get_mut(fp) {
            e.age = age;
        }
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    pub fn get(&self, fingerprint: &str) -> Option<&Alert> {
        self.entries.get(fingerprint).map(|e| &*e.alert)
    }

    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.entries
            .values()
            .map(|e| &*e.alert)
            .filter(|a| a.status == AlertStatus::Firing)
    }

    /// Is `condition` firing on `node`?
    pub fn is_firing(&self, node: &str, condition: &str) -> bool {
        self.firing()
            .any(|a| a.node() == Some(node) && a.condition() == Some(condition))
    }

    /// State of the alerts on `node` for which `is_condition` holds: any firing → Firing; else any
    /// resolved → Resolved; else Unknown (nothing heard, e.g. just after a restart).
    pub fn condition_state(
        &self,
        node: &str,
        is_condition: impl Fn(&Alert) -> bool,
    ) -> ConditionState {
        let mut state = ConditionState::Unknown;
        for a in self.entries.values().map(|e| &*e.alert) {
            if a.node() == Some(node) && is_condition(a) {
                match a.status {
                    AlertStatus::Firing => return ConditionState::Firing,
                    AlertStatus::Resolved => state = ConditionState::Resolved,
                }
            }
        }
        state
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the stored alerts' [`Alert::bytes`]; never over `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A copy of every stored alert (tests, tools).
    pub fn snapshot(&self) -> Vec<Alert> {
        self.entries
            .values()
            .map(|e| Alert::clone(&e.alert))
            .collect()
    }

    /// Every stored alert, shared: what a reconcile pass plans over. Costs a pointer per alert,
    /// so a pass never holds a second copy of the store.
    pub fn shared(&self) -> Vec<Arc<Alert>> {
        self.entries
            .values()
            .map(|e| Arc::clone(&e.alert))
            .collect()
    }
}

#[cfg(test)]
mod tests;
