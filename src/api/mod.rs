//! The CF v3 API: package and droplet JSON, downloads, uploads and jobs, with Kubernetes doing authentication
//! (TokenReview) and authorization (SubjectAccessReview). Guids are the objects' `metadata.uid`, resolved from
//! a watch cache; every body is streamed.

pub mod aggregated;
mod blobs;
mod droplets;
pub mod errors;
pub mod front_proxy;
mod index;
mod packages;
mod resources;
pub mod tls;
mod upload;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use kube::{Client, ResourceExt};

pub use errors::CfError;
pub use front_proxy::{Credentials, FrontProxy};
pub use index::Index;

use crate::auth::{Access, Authorizer};
use crate::cache::ResourceCache;
use crate::links::ApiUrls;
use crate::metrics::Metrics;
use crate::record::Recorder;
use crate::resources::BitsObject;
use crate::store::BlobStore;
use kube::runtime::events::Reporter;

/// How the API behaves.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Where clients reach the API; every `href` is under it.
    pub urls: ApiUrls,
    /// How long a presigned download URL stays valid.
    pub download_url_ttl: Duration,
    /// How long TokenReview and SubjectAccessReview answers are reused.
    pub auth_cache_ttl: Duration,
    /// The largest upload body (Cloud Controller's default is 2048 MiB).
    pub max_upload_size: u64,
    /// The largest package, counted as the sum of its files' uncompressed sizes (Cloud Controller's default is
    /// 1 GiB).
    pub max_package_size: u64,
    /// The most entries a package zip may have, added resources included.
    pub max_zip_entries: usize,
    /// Where an upload-offloading proxy (nginx's upload module) leaves request bodies; uploads naming a
    /// `bits_path` are accepted only when set, and only for files inside it.
    pub spool_dir: Option<std::path::PathBuf>,
}

impl ApiConfig {
    /// Cloud Controller's limits, and brief caches.
    pub fn new(urls: ApiUrls) -> Self {
        ApiConfig {
            urls,
            download_url_ttl: Duration::from_secs(600),
            auth_cache_ttl: Duration::from_secs(10),
            max_upload_size: 2048 << 20,
            max_package_size: 1 << 30,
            max_zip_entries: crate::archive::zip::DEFAULT_MAX_ENTRIES,
            spool_dir: None,
        }
    }
}

/// What every request shares.
pub struct AppState {
    pub client: Client,
    pub store: BlobStore,
    pub index: Index,
    pub auth: Authorizer,
    /// Writes the statuses uploads move objects through, and their Events.
    pub recorder: Recorder,
    /// Files of earlier uploads, for resource matching.
    pub cache: ResourceCache,
    /// The cluster's front proxy, whose users reach the API through aggregation.
    pub front_proxy: Option<FrontProxy>,
    pub config: ApiConfig,
}

impl AppState {
    pub fn new(
        client: Client,
        store: BlobStore,
        index: Index,
        config: ApiConfig,
        metrics: Arc<Metrics>,
        front_proxy: Option<FrontProxy>,
    ) -> Arc<Self> {
        let auth = Authorizer::new(client.clone(), config.auth_cache_ttl);
        let reporter = Reporter { controller: "bitsmith-api".into(), instance: None };
        let recorder = Recorder::new(client.clone(), reporter, metrics);
        let cache = ResourceCache::new(store.clone());
        tokio::spawn(cache.clone().keep_fresh(Duration::from_secs(300)));
        Arc::new(AppState { client, store, index, auth, recorder, cache, front_proxy, config })
    }

    /// The caller: the user the front proxy vouches for, or the owner of the bearer token.
    async fn authenticated(&self, credentials: &Credentials) -> Result<crate::auth::Caller, CfError> {
        match &credentials.proxied {
            Some(caller) => Ok(caller.clone()),
            None => self.auth.authenticate(credentials.authorization.as_deref()).await,
        }
    }

    /// The object `guid` names, once the caller may `verb` it (or its `subresource`): 401 without a valid token,
    /// 404 for an unknown guid, 403 when Kubernetes' RBAC says no.
    async fn authorized<O: BitsObject>(
        &self,
        credentials: &Credentials,
        found: impl FnOnce() -> Option<Arc<O>>,
        not_found: &'static str,
        verb: &'static str,
        subresource: Option<&'static str>,
    ) -> Result<Arc<O>, CfError> {
        let caller = self.authenticated(credentials).await?;
        let object = found().ok_or(CfError::ResourceNotFound { what: not_found })?;
        let access = Access {
            verb,
            resource: O::PLURAL,
            subresource,
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        };
        self.auth.authorize(&caller, &access).await?;
        Ok(object)
    }
}

/// A body limit for axum (a `usize`), with room for the multipart framing around the file.
fn body_limit(max_upload_size: u64) -> usize {
    usize::try_from(max_upload_size.saturating_add(1 << 20)).unwrap_or(usize::MAX)
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v3/packages/{guid}", get(packages::show))
        .route("/v3/packages/{guid}/download", get(packages::download))
        .route("/v3/droplets/{guid}", get(droplets::show))
        .route("/v3/droplets/{guid}/download", get(droplets::download))
        .route("/v3/jobs/{guid}", get(droplets::job))
        .route(
            "/v3/packages/{guid}/upload",
            post(packages::upload).layer(DefaultBodyLimit::max(body_limit(state.config.max_upload_size))),
        )
        .route("/v3/resource_matches", post(packages::resource_matches))
        .route(
            "/v3/droplets/{guid}/upload",
            post(droplets::upload).layer(DefaultBodyLimit::max(body_limit(state.config.max_upload_size))),
        )
        .merge(aggregated::routes().layer(DefaultBodyLimit::max(body_limit(state.config.max_upload_size))))
        .fallback(|| async { CfError::UnknownRequest })
        .with_state(state)
}

/// Serve the API on `listener`, over TLS when `tls` is given, until `shutdown` completes; requests in flight
/// are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Each connection's verified client certificate rides along, for the front proxy's requests.
    let service = router(state).into_make_service_with_connect_info::<front_proxy::PeerCert>();
    match tls {
        Some(config) => {
            axum::serve(tls::TlsListener::new(listener, config)?, service).with_graceful_shutdown(shutdown).await
        }
        None => axum::serve(listener, service).with_graceful_shutdown(shutdown).await,
    }
}
