//! Sources: where bits come from. Each source opens a byte stream (or, for a Package copy, names a blob already
//! in the store); none of them writes anywhere.

pub mod egress;
mod http;
mod object;
pub mod options;
mod package;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;

pub use egress::{Egress, EgressError};
pub use http::{HttpFetcher, HttpOptions};
pub use object::open_object;
pub use options::{OptionPolicy, RefusedOption};
pub use package::{PackageCopy, resolve_package_copy};

use crate::object_url::ObjectUrlError;

/// An open source: its bytes, and its length when the source announced one.
pub struct OpenedSource {
    pub stream: BoxStream<'static, Result<Bytes, SourceError>>,
    pub length: Option<u64>,
    /// What is being read, for messages (a URL without credentials).
    pub description: String,
    /// What the source said of what it serves.
    pub resolved: crate::resources::ResolvedSource,
}

/// The decoded entries of a Kubernetes Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretData {
    pub name: String,
    pub entries: BTreeMap<String, Vec<u8>>,
}

impl SecretData {
    /// A Secret's `data` and `stringData`, decoded.
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Self {
        let mut entries: BTreeMap<String, Vec<u8>> =
            secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        entries.extend(secret.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())));
        SecretData { name: secret.metadata.name.clone().unwrap_or_default(), entries }
    }

    /// An entry as UTF-8 text, or an error naming the Secret and key.
    pub fn text(&self, key: &str) -> Result<Option<String>, SourceError> {
        self.entries
            .get(key)
            .map(|v| {
                String::from_utf8(v.clone()).map_err(|_| SourceError::InvalidCredentials {
                    secret: self.name.clone(),
                    reason: format!("entry {key:?} is not UTF-8 text"),
                })
            })
            .transpose()
    }
}

/// What sources may reach and use, as the installer decides: tenants write the specs, so every default is closed.
#[derive(Clone, Debug, Default)]
pub struct SourcePolicy {
    /// `file://` sources are allowed below this directory only; `None` refuses them (the safe default in a
    /// cluster, where the controller's filesystem is not the user's).
    pub file_root: Option<PathBuf>,
    /// Which addresses sources may connect to.
    pub egress: Arc<Egress>,
    /// What object-store settings beyond the allowlist sources may use.
    pub options: OptionPolicy,
}

/// Why a source could not be read. [`SourceError::is_permanent`] tells whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot reach {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("TLS failure talking to {url}: {detail}")]
    Tls { url: String, detail: String },
    #[error("timed out reading {url}: {detail}")]
    Timeout { url: String, detail: String },
    #[error("{url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("{url}: more than {limit} redirects")]
    TooManyRedirects { url: String, limit: usize },
    #[error("{url} is {size} bytes, over the maximum of {max} bytes")]
    TooLarge { url: String, size: u64, max: u64 },
    #[error("reading {url} broke off: {detail}")]
    Interrupted { url: String, detail: String },
    #[error("{url}: no such object")]
    NotFound { url: String },
    #[error("{url}: {detail}")]
    ObjectRead { url: String, detail: String },
    #[error("{0}")]
    ObjectUrl(#[from] ObjectUrlError),
    #[error("file sources are not allowed here: {url} (allowed: {allowed})")]
    FileNotAllowed { url: String, allowed: String },
    #[error("Secret {secret:?}: {reason}")]
    InvalidCredentials { secret: String, reason: String },
    #[error("{0}")]
    RefusedOption(#[from] RefusedOption),
    /// The source's address is one sources may not reach.
    #[error("{url}: {refusal}")]
    Refused { url: String, refusal: EgressError },
    #[error("source Package {name:?}: {reason}")]
    PackageNotReady { name: String, reason: String },
    /// The TLS stack refused the client's setup: a fault of the machine, not of any source.
    #[error("cannot build the http client: {detail}")]
    HttpClient { detail: String },
}

impl SourceError {
    /// True when the same request will fail the same way until the spec or a Secret changes; false for
    /// failures of the network or the remote side, which are worth retrying.
    pub fn is_permanent(&self) -> bool {
        match self {
            SourceError::Unreachable { .. }
            | SourceError::Timeout { .. }
            | SourceError::Interrupted { .. }
            | SourceError::NotFound { .. }
            | SourceError::ObjectRead { .. }
            | SourceError::PackageNotReady { .. } => false,
            // 404 and 5xx may heal (an artifact not yet published, a server restarting); 4xx otherwise do not.
            SourceError::HttpStatus { status, .. } => {
                !(*status == 404 || *status == 408 || *status == 429 || *status >= 500)
            }
            SourceError::InvalidUrl { .. }
            | SourceError::Tls { .. }
            | SourceError::TooManyRedirects { .. }
            | SourceError::TooLarge { .. }
            | SourceError::ObjectUrl(_)
            | SourceError::FileNotAllowed { .. }
            | SourceError::InvalidCredentials { .. }
            | SourceError::RefusedOption(_)
            | SourceError::Refused { .. }
            | SourceError::HttpClient { .. } => true,
        }
    }
}

impl SourceError {
    /// The refusal of an address among `error`'s causes, as the error of a source at `url`: permanent, but a
    /// failure to resolve a name is not a refusal and may heal.
    pub(crate) fn refusal_in(url: &str, error: &(dyn std::error::Error + 'static)) -> Option<SourceError> {
        Some(match egress::find_refusal(error)? {
            EgressError::Resolve { detail, .. } => {
                SourceError::Unreachable { url: url.to_string(), detail: detail.clone() }
            }
            refusal => SourceError::Refused { url: url.to_string(), refusal: refusal.clone() },
        })
    }
}

/// An error and its causes on one line: library errors often say little at the top.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
