//! The source policy of tests and benchmarks: their servers listen on loopback, which sources may reach only
//! when it is opened.

use std::path::PathBuf;
use std::sync::Arc;

use bitsmith::sources::{Egress, SourcePolicy};

/// A source policy that opens loopback, with `file_root` for file sources.
pub fn loopback_policy(file_root: Option<PathBuf>) -> SourcePolicy {
    let loopback = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    SourcePolicy { file_root, egress: Arc::new(Egress::new(loopback, Vec::new())), ..Default::default() }
}
