//! The threat model (`SECURITY.md`) tried as a tenant would: hostile source options and addresses, archives
//! built to cost time or memory, slow and oversized requests, forged front-proxy identities, another tenant's
//! cached files, and Secret values that must never leave. Real sockets, loopback addresses only.

mod api_limits;
mod archive;
mod cache;
mod front_proxy;
mod sources;
