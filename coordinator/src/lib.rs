//! The cutover coordinator: node registry, store, agent and operator APIs.
#![forbid(unsafe_code)]

pub mod access;
pub mod agent_api;
pub mod agent_upgrade;
pub mod analysis;
pub mod artifacts;
pub mod auth;
pub mod backup;
pub mod ca;
pub mod clock;
pub mod config;
pub mod enroll;
pub mod env_diff;
pub mod environments;
mod following;
pub mod hooks;
pub mod http;
pub mod images;
pub mod jobs;
pub mod journal;
pub mod lb;
pub mod leading;
pub mod levers;
pub mod metrics;
pub mod migration;
pub mod notify;
pub mod operator_api;
pub mod pgbackrest;
pub mod policy;
pub mod queue_alerts;
pub mod queues;
pub mod refusals;
pub mod registry;
pub mod rollout;
pub mod secrets;
pub mod server;
pub mod server_status;
mod services;
pub mod spec;
pub mod spec_checks;
pub mod store;
pub mod strategy;

pub use server::Coordinator;
