//! Leader election on a `coordination.k8s.io/v1` Lease: two replicas, one acts. The holder renews
//! every third of the lease duration; another replica takes over as soon as `renewTime +
//! leaseDurationSeconds` has passed without renewal. Every write carries the Lease's
//! resourceVersion, so two candidates cannot both win (the loser gets 409). A leader that cannot
//! renew within the lease duration steps down by itself, and releases the Lease on SIGTERM.
//!
//! The [`Fence`] is what the rest of the healer sees of this (I2): the instant until which this
//! replica may send writes — the start of its last successful renewal plus the lease duration,
//! minus a safety margin for clock skew and the request in flight. The renewTime we write is
//! taken at that same start, so another replica's takeover (at renewTime + duration by its
//! clock) comes at least `margin` after our last possible write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

use super::Kube;
use crate::Result;
use crate::config;

/// Until when this replica may write. Cheap to clone; every clone sees the same state.
#[derive(Debug, Clone)]
pub struct Fence {
    /// `None`: leader election is off, writes are never fenced.
    until: Option<Arc<Mutex<Option<Instant>>>>,
    margin: Duration,
}

impl Fence {
    /// Leader election off: every write may go.
    pub fn unfenced() -> Self {
        Fence {
            until: None,
            margin: Duration::ZERO,
        }
    }

    /// Not leading until [`Fence::hold_until`] says so.
    pub fn new(margin: Duration) -> Self {
        Fence {
            until: Some(Arc::new(Mutex::new(None))),
            margin,
        }
    }

    /// The lease we hold is valid until `until` (`None`: we do not hold it).
    pub fn hold_until(&self, until: Option<Instant>) {
        if let Some(u) = &self.until {
            *u.lock().unwrap_or_else(|p| p.into_inner()) = until;
        }
    }

    /// Stops all writes now (SIGTERM, lost Lease).
    pub fn revoke(&self) {
        self.hold_until(None);
    }

    /// Time left in which a write may be sent and complete, or `None`: no write may be sent.
    pub fn write_window(&self) -> Option<Duration> {
        let Some(u) = &self.until else {
            return Some(Duration::MAX);
        };
        let until = (*u.lock().unwrap_or_else(|p| p.into_inner()))?;
        let left = until
            .checked_duration_since(Instant::now())?
            .checked_sub(self.margin)?;
        (!left.is_zero()).then_some(left)
    }

    /// May this replica act now?
    pub fn holds(&self) -> bool {
        self.write_window().is_some()
    }
}

/// What one acquire/renew attempt found.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attempt {
    /// We hold the Lease (created, renewed or taken over).
    Held,
    /// Another replica holds it; its lease ends in `expires_in` unless renewed.
    Standby { expires_in: Duration },
    /// Another replica won a race for it (409).
    Lost,
}

pub struct LeaderElector {
    kube: Kube,
    cfg: config::Lease,
    identity: String,
    fence: Fence,
    leader: AtomicBool,
}

impl LeaderElector {
    /// `fence` is set while this replica leads; `kube` should be unfenced (the Lease's own
    /// writes are what keeps the fence open).
    pub fn new(kube: Kube, cfg: config::Lease, identity: String, fence: Fence) -> Self {
        LeaderElector {
            kube,
            cfg,
            identity,
            fence,
            leader: AtomicBool::new(false),
        }
    }

    /// Releases the Lease if we hold it (SIGTERM): `holderIdentity` cleared, so a standby takes
    /// over at its next look instead of waiting out the lease. Call after [`Fence::revoke`].
    pub async fn release(&self) -> Result<bool> {
        self.fence.revoke();
        let api: Api<Lease> = Api::namespaced(self.kube.client.clone(), &self.cfg.namespace);
        let Some(mut lease) = self
            .kube
            .call("get lease", || api.get_opt(&self.cfg.name))
            .await?
        else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let pp = PostParams::default();
        self.kube
            .call("release lease", || api.replace(&self.cfg.name, &pp, &lease))
            .await?;
        self.kube.metrics.is_leader.set(0);
        tracing::info!(identity = %self.identity, "Lease released");
        Ok(true)
    }

    /// One acquire/renew attempt, saying when another holder's lease expires. A 409 on the
    /// renewal of a Lease we hold means it changed without a takeover (e.g. `ark-healer pause`
    /// annotated it): read it again once rather than step down.
    async fn attempt(&self) -> Result<Attempt> {
        match self.attempt_once().await? {
            (Attempt::Lost, true) => Ok(self.attempt_once().await?.0),
            (a, _) => Ok(a),
        }
    }

    /// One acquire/renew attempt, and whether we held the Lease when it began.
    async fn attempt_once(&self) -> Result<(Attempt, bool)> {
        let api: Api<Lease> = Api::namespaced(self.kube.client.clone(), &self.cfg.namespace);
        let now = Timestamp::now();
        let duration = self.cfg.duration_seconds as i32;
        let existing = self
            .kube
            .call("get lease", || api.get_opt(&self.cfg.name))
            .await?;
        let pp = PostParams::default();
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self
                .kube
                .call("create lease", || api.create(&pp, &lease))
                .await
            {
                Ok(_) => Ok((Attempt::Held, false)),
                Err(e) if e.api_status() == Some(409) => Ok((Attempt::Lost, false)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        // Millisecond precision: a standby wakes up right when the holder's lease ends.
        let left_ms = spec.renew_time.as_ref().map_or(0, |t| {
            let d = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
            t.0.as_millisecond() + d * 1000 - now.as_millisecond()
        });
        if !mine && !holder.is_empty() && left_ms >= 0 {
            return Ok((
                Attempt::Standby {
                    expires_in: Duration::from_millis(left_ms.unsigned_abs()),
                },
                false,
            ));
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration);
        match self
            .kube
            .call("update lease", || api.replace(&self.cfg.name, &pp, &lease))
            .await
        {
            Ok(_) => Ok((Attempt::Held, mine)),
            Err(e) if e.api_status() == Some(409) => Ok((Attempt::Lost, mine)),
            Err(e) => Err(e),
        }
    }

    /// Runs forever, keeping `leader` up to date. The lease we hold is valid until the start of
    /// our last successful renewal plus its duration (the renewTime we wrote is taken at the
    /// start of the attempt); we stop leading at that moment even while a renewal attempt is
    /// still retrying against an apiserver that does not answer, so a replica cut off from the
    /// apiserver never acts as leader after another replica may have taken over.
    pub async fn run(&self) {
        let lease = Duration::from_secs(self.cfg.duration_seconds);
        let period = Duration::from_secs((self.cfg.duration_seconds / 3).max(1));
        let mut last_renew: Option<Instant> = None;
        loop {
            let began = Instant::now();
            let attempt = match last_renew {
                Some(t) => {
                    let left = lease.saturating_sub(t.elapsed());
                    tokio::time::timeout(left, self.attempt()).await.ok()
                }
                None => Some(self.attempt().await),
            };
            let renewed = matches!(attempt, Some(Ok(Attempt::Held)));
            let mut standby = None;
            let held = match attempt {
                Some(Ok(Attempt::Held)) => true,
                Some(Ok(Attempt::Lost)) => false,
                Some(Ok(Attempt::Standby { expires_in })) => {
                    standby = Some(expires_in);
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!(identity = %self.identity, error = %e, "Lease renewal failed");
                    // Keep leading only while the last successful renewal is still valid.
                    last_renew.is_some_and(|t| t.elapsed() < lease)
                }
                None => {
                    tracing::warn!(identity = %self.identity, "Lease not renewed before it expired");
                    false
                }
            };
            if renewed {
                last_renew = Some(began);
            } else if !held {
                last_renew = None;
            } // else: a failed attempt inside a still-valid lease keeps that lease's deadline
            self.fence
                .hold_until(last_renew.filter(|_| held).map(|t| t + lease));

            let was = self.leader.swap(held, Ordering::SeqCst);
            if was != held {
                self.kube.metrics.is_leader.set(i64::from(held));
                tracing::info!(identity = %self.identity, leader = held, "Leadership changed");
            }
            // While leading after a failed renewal, wake up no later than the lease's end; as a
            // standby, right after the holder's lease ends (so a dead leader is replaced within
            // the lease duration of its last renewal, not up to a period later).
            let mut sleep = period;
            if let (true, Some(t)) = (held, last_renew) {
                sleep = sleep.min(lease.saturating_sub(t.elapsed()));
            }
            if let Some(left) = standby {
                sleep = sleep.min(left + Duration::from_millis(20));
            }
            tokio::time::sleep(sleep).await;
        }
    }
}
