//! Fetching one object's bits: picks the source, runs the pipeline, returns stored digests. The caller looks up
//! the Secret and the source Package (from the cluster, or from manifests) and turns the outcome into status.

use std::time::Duration;

use crate::budget::TransferBudget;
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
    /// Transfer slots: a fetch that streams bytes waits for one.
    pub budget: TransferBudget,
}

/// What a fetch needs besides the source.
#[derive(Default)]
pub struct Inputs<'a> {
    /// The Secret named by the source's `secretRef`, when it has one.
    pub secret: Option<&'a SecretData>,
    /// The Package named by a `package` source.
    pub source_package: Option<&'a Package>,
    /// How long the fetch may take once it has a transfer slot (`spec.timeout`); none: as long as it takes.
    pub deadline: Option<Duration>,
}

impl Fetcher {
    /// A fetcher into `store` with default http timeouts; its http sources connect as `policy` allows.
    pub fn new(store: BlobStore, policy: SourcePolicy, max_size: u64) -> Result<Self, SourceError> {
        let http = HttpFetcher::new(HttpOptions::default(), policy.egress.clone())?;
        Ok(Fetcher { store, http, policy, max_size, budget: TransferBudget::default() })
    }

    /// The same fetcher, taking its transfer slots from `budget`.
    pub fn with_budget(self, budget: TransferBudget) -> Self {
        Fetcher { budget, ..self }
    }

    /// Fetch `source` into the store as `owner`'s blob, within the deadline of `inputs`. A fetch that streams
    /// bytes first waits for a transfer slot; the deadline runs from when it has one, so that waiting on other
    /// transfers is not taken for a slow source. Dropping the future (e.g. at the deadline) aborts the staged write.
    pub async fn fetch(
        &self,
        owner: &BlobOwner,
        source: &Source,
        pin: Option<&Checksum>,
        inputs: Inputs<'_>,
    ) -> Result<Stored, PipelineError> {
        let _slot = match source.package {
            None => Some(self.budget.start().await),
            // A copy inside the store moves no bytes through this process.
            Some(_) => None,
        };
        let Some(limit) = inputs.deadline else { return self.fetch_now(owner, source, pin, inputs).await };
        tokio::time::timeout(limit, self.fetch_now(owner, source, pin, inputs))
            .await
            .map_err(|_| PipelineError::Timeout { limit })?
    }

    async fn fetch_now(
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
