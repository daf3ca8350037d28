//! Ark healer: Alertmanager webhook → conditions → per-node priority → SOPs on Kubernetes, with
//! tickets in node annotations, safety guardrails, an audit log, metrics and a dry-run CLI.
//!
//! Pure core: [`alerts`], [`catalog`], [`ticket`], [`planner`], [`config`]. I/O: [`webhook`]
//! (HTTP), [`kube`] (the only module that talks to the cluster), [`cli`].

pub mod alerts;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
mod error;
pub mod k8s;
pub mod metrics;
pub mod planner;
pub mod steps;
pub mod ticket;
pub mod webhook;

pub use error::{Error, Result};
