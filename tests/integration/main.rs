//! Integration tests over real parts: loopback HTTP(S) servers, the local filesystem, the Garage S3 server
//! that `make test` starts, and the `bitsmith` binary itself.

mod support;

mod api;
mod chart;
mod cli;
mod controller;
mod crds;
mod gitops;
mod http_source;
mod object_source;
mod s3;
mod store;
