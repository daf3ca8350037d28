//! Leader election on a `coordination.k8s.io/v1` Lease: two replicas, one acts. The holder renews
//! every third of the lease duration; another replica takes over once `renewTime +
//! leaseDurationSeconds` has passed without renewal. Every write carries the Lease's
//! resourceVersion, so two candidates cannot both win (the loser gets 409). A leader that cannot
//! renew within the lease duration steps down by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

use super::Kube;
use crate::Result;
use crate::config;

pub struct LeaderElector {
    kube: Kube,
    cfg: config::Lease,
    identity: String,
    leader: Arc<AtomicBool>,
}

impl LeaderElector {
    pub fn new(kube: Kube, cfg: config::Lease, identity: String, leader: Arc<AtomicBool>) -> Self {
        LeaderElector {
            kube,
            cfg,
            identity,
            leader,
        }
    }

    /// One acquire/renew attempt. Returns whether we hold the lease afterwards.
    pub async fn try_acquire(&self) -> Result<bool> {
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
                Ok(_) => Ok(true),
                Err(e) if e.api_status() == Some(409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let d = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
            t.0.as_second() + d < now.as_second()
        });
        if !mine && !holder.is_empty() && !expired {
            return Ok(false);
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
            Ok(_) => Ok(true),
            Err(e) if e.api_status() == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs forever, keeping `leader` up to date.
    pub async fn run(self) {
        let period = Duration::from_secs((self.cfg.duration_seconds / 3).max(1));
        let mut last_renew: Option<Instant> = None;
        loop {
            let held = match self.try_acquire().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(identity = %self.identity, error = %e, "Lease renewal failed");
                    // Keep leading only while the last successful renewal is still valid.
                    last_renew.is_some_and(|t| {
                        t.elapsed() < Duration::from_secs(self.cfg.duration_seconds)
                    })
                }
            };
            if held {
                last_renew = Some(Instant::now());
            } else {
                last_renew = None;
            }
            let was = self.leader.swap(held, Ordering::SeqCst);
            if was != held {
                self.kube.metrics.is_leader.set(i64::from(held));
                tracing::info!(identity = %self.identity, leader = held, "Leadership changed");
            }
            tokio::time::sleep(period).await;
        }
    }
}
