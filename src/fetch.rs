//! Fetching one object's bits: picks the source, runs the pipeline, returns stored digests. The caller looks up
//! the Secret and the source Package (from the cluster, or from manifests) and turns the outcome into status.

use crate::pipeline::{self, PipelineError, Stored};
use crate::resources::{Checksum, Package, Source, SourceKind};
use crate::sources::{self, HttpFetcher, HttpOptions, SecretData, SourceError, SourcePolicy};
use crate::store::{BlobOwner, BlobStore};

/// Everything needed to fetch bits into the store.
#[derive(Clone, Debug)]
pub struct Fetcher {
    pub store: BlobStore,
    pub http: HttpFetcher,
    pub policy: SourcePolicy,
    /// Largest accepted size in bytes.
    pub max_size: u64,
}

/// What a fetch reads from besides the spec.
#[derive(Default)]
pub struct Inputs<'a> {
    /// The Secret named by the source's `secretRef`, when it has one.
    pub secret: Option<&'a SecretData>,
    /// The Package named by a `package` source.
    pub source_package: Option<&'a Package>,
}

impl Fetcher {
    /// A fetcher into `store` with default http timeouts; its http sources connect as `policy` allows.
    pub fn new(store: BlobStore, policy: SourcePolicy, max_size: u64) -> Result<Self, SourceError> {
        let http = HttpFetcher::new(HttpOptions::default(), policy.egress.clone())?;
        Ok(Fetcher { store, http, policy, max_size })
    }

    /// Fetch `source` into the store as `owner`'s blob.
    pub async fn fetch(
        &self,
        owner: &BlobOwner,
        source: &Source,
        pin: Option<&Checksum>,
        inputs: Inputs<'_>,
    ) -> Result<Stored, PipelineError> {
        let kind = source.kind().ok_or_else(|| SourceError::InvalidUrl {
            url: String::new(),
            reason: "set exactly one of http, objectStore or package".into(),
        })?;
        match kind {
            SourceKind::Http(http) => {
                let opened = self.http.open(http, inputs.secret, self.max_size).await?;
                pipeline::store_stream(opened, &self.store, owner, pin, self.max_size).await
            }
            SourceKind::ObjectStore(object) => {
                let opened = sources::open_object(object, inputs.secret, &self.policy, self.max_size).await?;
                pipeline::store_stream(opened, &self.store, owner, pin, self.max_size).await
            }
            SourceKind::Package(reference) => {
                let package = inputs.source_package.ok_or_else(|| SourceError::PackageNotReady {
                    name: reference.name.clone(),
                    reason: "not found".into(),
                })?;
                let copy = sources::resolve_package_copy(package, self.store.url())?;
                pipeline::copy_in_store(copy, &self.store, owner, pin).await
            }
        }
    }
}
