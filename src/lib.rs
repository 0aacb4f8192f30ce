//! bitsmith: Cloud Foundry application bits (packages and droplets) as Kubernetes resources.
//!
//! Bytes flow one way: [`sources`] open a stream (or [`api`] receives an upload), [`digest`] hashes it,
//! [`store`] keeps it, and [`status`] records the outcome, which [`record`] writes. [`pipeline`] joins the
//! first three; [`fetch`] picks a source for an object; [`controller`] and [`api`] are the two ways in.
//! Modules without I/O ([`conditions`], [`status`], [`validate`], [`plan`], [`claims`], [`archive`], [`links`],
//! [`api::views`]) are tested without a cluster.

pub mod api;
pub mod archive;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod claims;
pub mod cli;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod digest;
pub mod fetch;
pub mod kube_client;
pub mod leader;
pub mod links;
pub mod metrics;
pub mod object_url;
pub mod offline;
pub mod ops;
pub mod pipeline;
pub mod plan;
pub mod plugin;
pub mod rechecks;
pub mod record;
pub mod recycle;
pub mod resources;
pub mod retention;
pub mod sources;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod validate;
pub mod watching;
pub mod workers;
