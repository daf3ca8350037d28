//! Ark healer: Alertmanager webhook → conditions → per-node priority → SOPs on Kubernetes, with
//! tickets in node annotations, safety guardrails, an audit log, metrics and a dry-run CLI.
//!
//! One straight flow: [`planner`] (pure: what to do per node) → [`lifecycle`] (pure: what each
//! ticket becomes) → [`executor`] (I/O only: carries the plan out through [`k8s::Cluster`]).
//! Pure core: [`alerts`], [`catalog`], [`ticket`], [`planner`], [`lifecycle`], [`config`].
//! I/O: [`webhook`] (HTTP), [`k8s`] (the only module that talks to the cluster),
//! [`alertmanager`], [`serve`] (the loops), [`cli`], [`why`] (reads Prometheus for `ark-healer why`).

pub mod alertmanager;
pub mod alerts;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
mod error;
pub mod executor;
pub mod k8s;
pub mod lifecycle;
pub mod metrics;
pub mod pause;
pub mod planner;
pub mod serve;
#[cfg(test)]
mod testkit;
pub mod ticket;
pub mod webhook;
pub mod why;

pub use error::{Error, Result};
