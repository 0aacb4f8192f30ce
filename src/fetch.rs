//! Fetching one object's bits: picks the source, runs the pipeline, returns stored digests. The caller looks up
//! the Secret and the source Package (from the cluster, or from manifests) and turns the outcome into status.

use std::time::Duration;

use crate::budget::{TransferBudget, TransferSlot};
use crate::pipeline::{self, PipelineError, Stored};
use crate::resources::{Checksum, Package, ResolvedSource, Source, SourceKind};
use crate::sources::{
    self, HttpFetcher, HttpOptions, OpenedSource, PackageCopy, SecretData, SourceError, SourcePolicy,
};
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
    /// What an earlier fetch read from the source, when its bits are still the object's: [`Fetcher::open`] asks the
    /// source whether it changed since, and opens nothing when it did not.
    pub known: Option<&'a ResolvedSource>,
}

/// A source opened for one transfer: it holds a transfer slot and its deadline until it is stored or dropped.
pub struct Transfer<'f> {
    fetcher: &'f Fetcher,
    opened: Opened,
    /// When the transfer must be done, and the limit that set it (for the error).
    deadline: Option<(tokio::time::Instant, Duration)>,
    _slot: Option<TransferSlot>,
}

enum Opened {
    Stream(OpenedSource),
    Copy(PackageCopy),
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

    /// Fetch `source` into the store as `owner`'s blob, within the deadline of `inputs`, whatever an earlier fetch
    /// read (`inputs.known` is not consulted).
    pub async fn fetch(
        &self,
        owner: &BlobOwner,
        source: &Source,
        pin: Option<&Checksum>,
        inputs: Inputs<'_>,
    ) -> Result<Stored, PipelineError> {
        let opened = self.open(source, Inputs { known: None, ..inputs }).await?;
        opened.expect("a source opened without known validators always has bytes").store(owner, pin).await
    }

    /// Open `source` for a transfer; `None` when `inputs.known` says what it serves and it still serves that. A
    /// fetch that streams bytes first waits for a transfer slot; the deadline runs from when it has one, so that
    /// waiting on other transfers is not taken for a slow source.
    pub async fn open(&self, source: &Source, inputs: Inputs<'_>) -> Result<Option<Transfer<'_>>, PipelineError> {
        let slot = match source.package {
            None => Some(self.budget.start().await),
            // A copy inside the store moves no bytes through this process.
            Some(_) => None,
        };
        let deadline = inputs.deadline.map(|limit| (tokio::time::Instant::now() + limit, limit));
        let opened = within(deadline, self.open_now(source, inputs)).await?;
        Ok(opened.map(|opened| Transfer { fetcher: self, opened, deadline, _slot: slot }))
    }

    async fn open_now(&self, source: &Source, inputs: Inputs<'_>) -> Result<Option<Opened>, PipelineError> {
        let kind = source.kind().ok_or_else(|| SourceError::InvalidUrl {
            url: String::new(),
            reason: "set exactly one of http, objectStore or package".into(),
        })?;
        Ok(match kind {
            SourceKind::Http(http) => {
                self.http.open(http, inputs.secret, self.max_size, inputs.known).await?.map(Opened::Stream)
            }
            SourceKind::ObjectStore(object) => {
                sources::open_object(object, inputs.secret, &self.policy, self.max_size, inputs.known)
                    .await?
                    .map(Opened::Stream)
            }
            SourceKind::Package(reference) => {
                let package = inputs.source_package.ok_or_else(|| SourceError::PackageNotReady {
                    name: reference.name.clone(),
                    reason: "not found".into(),
                })?;
                Some(Opened::Copy(sources::resolve_package_copy(package, self.store.url())?))
            }
        })
    }
}

impl Transfer<'_> {
    /// What the source says it serves; none for a copy.
    pub fn resolved(&self) -> Option<&ResolvedSource> {
        match &self.opened {
            Opened::Stream(opened) => Some(&opened.resolved),
            Opened::Copy(_) => None,
        }
    }

    /// Store the bits as `owner`'s blob, checked against `pin`. Dropping the future (e.g. at the deadline) aborts
    /// the staged write.
    pub async fn store(self, owner: &BlobOwner, pin: Option<&Checksum>) -> Result<Stored, PipelineError> {
        let Transfer { fetcher, opened, deadline, _slot } = self;
        let store = &fetcher.store;
        within(deadline, async {
            match opened {
                Opened::Stream(opened) => {
                    let stored = pipeline::store_stream(opened, store, owner, pin, fetcher.max_size).await?;
                    fetcher.budget.record(&stored.waits);
                    let (namespace, name, bytes) = (&owner.namespace, &owner.name, stored.digests.size);
                    tracing::debug!(namespace, name, bytes, took = %stored.waits, "fetched");
                    Ok(stored)
                }
                Opened::Copy(copy) => pipeline::copy_in_store(copy, store, owner, pin).await,
            }
        })
        .await
    }
}

/// `work`, cut off at the deadline.
async fn within<T>(
    deadline: Option<(tokio::time::Instant, Duration)>,
    work: impl Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    let Some((at, limit)) = deadline else { return work.await };
    tokio::time::timeout_at(at, work).await.map_err(|_| PipelineError::Timeout { limit })?
}
