//! Integration tests over real parts: loopback HTTP(S) servers, the local filesystem, the Garage (S3) and
//! Azurite (Azure Blob) servers and the control plane that `make test` starts, and the `bitsmith` binary itself.

mod support;

mod api;
mod chart;
mod cli;
mod cloud;
mod controller;
mod crds;
mod faults;
mod gitops;
mod http_source;
mod object_source;
mod plugin;
mod security;
mod store;
