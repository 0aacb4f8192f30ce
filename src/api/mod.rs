//! The CF v3 API: package and droplet JSON, downloads, uploads and jobs, with Kubernetes doing authentication
//! (TokenReview) and authorization (SubjectAccessReview). Guids are the objects' `metadata.uid`, resolved from
//! a watch cache; every body is streamed.

pub mod aggregated;
mod blobs;
mod droplets;
pub mod errors;
pub mod front_proxy;
mod index;
mod linger;
mod packages;
mod resources;
pub mod tls;
mod upload;
pub mod upload_token;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use kube::{Client, ResourceExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

pub use errors::CfError;
pub use front_proxy::{Credentials, FrontProxy};
pub use index::Index;

use crate::auth::{Access, Authorizer};
use crate::budget::TransferBudget;
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
    /// Client certificates from this CA are the upload-offloading proxy's, which may name spooled files.
    pub offload_client_ca: Option<tls::ClientCa>,
    /// What a connection may cost.
    pub limits: Limits,
    /// Who may use a file of the resource cache: callers with access to a namespace that uploaded it, or all.
    pub resource_cache_scope: crate::cache::Scope,
    /// This replica's name, recorded as the holder of the uploads it receives.
    pub instance: String,
    /// Uploads renew their claim every quarter of this; the controller gives up a claim unrenewed this long.
    pub upload_claim_timeout: Duration,
    /// The transfer slots an upload takes, shared with the controller's fetches when one process does both;
    /// an upload that finds none free is answered 503 with Retry-After.
    pub transfers: TransferBudget,
    /// Signs the upload tokens the aggregated API hands out, and checks them.
    pub upload_tokens: Arc<upload_token::UploadTokens>,
}

/// What the API tolerates of a connection, so that slow or oversized requests cannot tie it up.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A request's head must arrive within this time; it also closes a connection idle between requests.
    pub header_read_timeout: Duration,
    /// A request body that sends nothing for this long is cut off (an upload then breaks off).
    pub body_idle_timeout: Duration,
    /// The largest request head (request line and headers) in bytes; larger ones get 431.
    pub max_header_size: usize,
    /// After a shutdown signal, requests in flight get this long to finish; the rest are cut off (an upload cut
    /// off is given back by its lapsing claim).
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_header_size: 64 << 10,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What a refused upload is told to wait before trying again.
const RETRY_AFTER_SECONDS: u32 = 5;

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
            offload_client_ca: None,
            limits: Limits::default(),
            resource_cache_scope: crate::cache::Scope::Namespace,
            instance: "bitsmith-api".into(),
            upload_claim_timeout: Duration::from_secs(60),
            transfers: TransferBudget::default(),
            upload_tokens: Arc::new(upload_token::UploadTokens::random(Duration::from_secs(600))),
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
    /// Turns true when the shutdown grace has run out: uploads still running give their objects back.
    cut_off: watch::Sender<bool>,
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
        let auth = Authorizer::new(client.clone(), config.auth_cache_ttl, metrics.clone());
        let reporter = Reporter { controller: "bitsmith-api".into(), instance: None };
        let recorder = Recorder::new(client.clone(), reporter, metrics);
        let cache = ResourceCache::new(store.clone());
        tokio::spawn(cache.clone().keep_fresh(Duration::from_secs(300)));
        let cut_off = watch::Sender::new(false);
        Arc::new(AppState { client, store, index, auth, recorder, cache, front_proxy, config, cut_off })
    }

    /// The caller: the user the front proxy vouches for, or the owner of the bearer token (an upload token's
    /// user too: see [`AppState::authenticated_as`]).
    async fn authenticated(&self, credentials: &Credentials) -> Result<crate::auth::Caller, CfError> {
        Ok(self.authenticated_as(credentials).await?.caller)
    }

    /// The caller, and the one object whose upload they may do when they came with an upload token. Upload tokens
    /// are checked here, against this API's key: they never reach kube-apiserver's TokenReview.
    async fn authenticated_as(&self, credentials: &Credentials) -> Result<Authenticated, CfError> {
        if let Some(caller) = &credentials.proxied {
            return Ok(Authenticated { caller: caller.clone(), upload_of: None });
        }
        let header = credentials.authorization.as_deref().unwrap_or_default();
        if let Some(token) = crate::auth::bearer_token(header).filter(|t| t.starts_with(upload_token::PREFIX)) {
            let grant = self.config.upload_tokens.verify(token, k8s_openapi::jiff::Timestamp::now()).map_err(|e| {
                tracing::info!(reason = %e, "an upload token was refused");
                CfError::InvalidAuthToken
            })?;
            return Ok(Authenticated { caller: grant.user, upload_of: Some((grant.resource, grant.uid)) });
        }
        let caller = self.auth.authenticate(credentials.authorization.as_deref()).await?;
        Ok(Authenticated { caller, upload_of: None })
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
        Ok(self.authorized_caller(credentials, found, not_found, verb, subresource).await?.1)
    }

    /// Like [`AppState::authorized`], and who the caller is, for actions that depend on it.
    async fn authorized_caller<O: BitsObject>(
        &self,
        credentials: &Credentials,
        found: impl FnOnce() -> Option<Arc<O>>,
        not_found: &'static str,
        verb: &'static str,
        subresource: Option<&'static str>,
    ) -> Result<(crate::auth::Caller, Arc<O>), CfError> {
        let who = self.authenticated_as(credentials).await?;
        self.authorize_as(who, found, not_found, verb, subresource).await
    }

    /// The second half of [`AppState::authorized_caller`], for a caller already authenticated.
    async fn authorize_as<O: BitsObject>(
        &self,
        who: Authenticated,
        found: impl FnOnce() -> Option<Arc<O>>,
        not_found: &'static str,
        verb: &'static str,
        subresource: Option<&'static str>,
    ) -> Result<(crate::auth::Caller, Arc<O>), CfError> {
        let Authenticated { caller, upload_of } = who;
        let object = found().ok_or(CfError::ResourceNotFound { what: not_found })?;
        // An upload token is good for its object's upload, nothing else; the user's RBAC still decides that one.
        if let Some((resource, uid)) = &upload_of
            && !(resource == O::PLURAL
                && object.uid().as_ref() == Some(uid)
                && verb == "create"
                && subresource == Some("upload"))
        {
            return Err(CfError::NotAuthorized);
        }
        let access = Access {
            verb,
            resource: O::PLURAL,
            subresource,
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        };
        self.auth.authorize(&caller, &access).await?;
        Ok((caller, object))
    }
}

/// Who is calling, and the object `(plural, uid)` an upload token limits them to, if they came with one.
struct Authenticated {
    caller: crate::auth::Caller,
    upload_of: Option<(String, String)>,
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
        .route_layer(middleware::from_fn_with_state(state.clone(), budget_uploads))
        .fallback(|| async { CfError::UnknownRequest })
        .with_state(state)
}

/// An upload that finds no free transfer slot (`--max-concurrent-transfers`) is answered at once with 503 and
/// `Retry-After`: the limit is the server's capacity, shared by all callers, not a quota this caller exceeded
/// (which 429 would say). The slot is taken before authentication so that a refusal costs no TokenReview, and
/// is held until the upload's answer. An upload answered before its body was read to the end lingers (see
/// [`linger`]), so that the client reads the answer rather than a reset connection.
async fn budget_uploads(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let upload = request.method() == Method::POST
        && request.extensions().get::<MatchedPath>().is_some_and(|path| path.as_str().ends_with("/upload"));
    if !upload {
        return next.run(request).await;
    }
    let request = request.map(linger::lingering);
    let Some(_slot) = state.config.transfers.try_start() else {
        let max = state.config.transfers.max();
        tracing::info!(max, "an upload refused: all transfer slots are taken");
        let error = CfError::ServiceUnavailable(format!(
            "The server is running its maximum of {max} transfers at once; try again in {RETRY_AFTER_SECONDS} seconds."
        ));
        let mut response = error.into_response();
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        return response;
    };
    next.run(request).await
}

/// One address the API answers on.
pub struct Endpoint {
    pub listener: tokio::net::TcpListener,
    /// TLS, or plain HTTP without it.
    pub tls: Option<rustls::ServerConfig>,
    /// Every connection to it is the upload-offloading proxy's (`--offload-listen`): bind it where only the
    /// proxy reaches it.
    pub offload: bool,
}

/// Serve the API on `listener`, over TLS when `tls` is given, until `shutdown` completes; requests in flight
/// are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    serve_endpoints(vec![Endpoint { listener, tls, offload: false }], state, shutdown).await
}

/// Serve the API on every endpoint until `shutdown` completes; requests in flight are finished first.
/// Connections are served by hyper directly, with the limits of `state.config.limits`: a head that is slow or
/// too large, and a body that stalls, end the connection.
pub async fn serve_endpoints(
    endpoints: Vec<Endpoint>,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let router = router(state.clone());
    let (stop, stopped) = watch::channel(());
    let mut serving = Vec::new();
    for endpoint in endpoints {
        let acceptor = match endpoint.tls {
            Some(config) => Acceptor::Tls(tls::TlsListener::new(endpoint.listener, config)),
            None => Acceptor::Plain(endpoint.listener),
        };
        serving.push(serve_endpoint(acceptor, endpoint.offload, state.clone(), router.clone(), stopped.clone()));
    }
    let signal = async move {
        shutdown.await;
        let _ = stop.send(());
    };
    tokio::join!(signal, futures::future::join_all(serving));
}

enum Acceptor {
    Plain(tokio::net::TcpListener),
    Tls(tls::TlsListener),
}

/// Accept connections until `stopped` says so, then wait for the ones open to finish their requests.
async fn serve_endpoint(
    mut acceptor: Acceptor,
    offload: bool,
    state: Arc<AppState>,
    router: Router,
    mut stopped: watch::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = async {
            match &mut acceptor {
                Acceptor::Plain(listener) => Connection::Plain(tls::accept_tcp(listener).await.0),
                Acceptor::Tls(listener) => Connection::Tls(Box::new(listener.accept().await.0)),
            }
        };
        tokio::select! {
            connection = accepted => {
                let watcher = graceful.watcher();
                let (state, router) = (state.clone(), router.clone());
                tokio::spawn(async move {
                    match connection {
                        Connection::Plain(tcp) => {
                            let peer = front_proxy::PeerCert { front_proxy: None, offload };
                            serve_connection(tcp, peer, &state, router, watcher).await
                        }
                        Connection::Tls(stream) => {
                            let peer = peer_of(&state, stream.get_ref().1.peer_certificates().unwrap_or_default(), offload);
                            serve_connection(*stream, peer, &state, router, watcher).await
                        }
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    drop(acceptor);
    let mut finished = std::pin::pin!(graceful.shutdown());
    if tokio::time::timeout(state.config.limits.shutdown_grace, &mut finished).await.is_ok() {
        return;
    }
    // Uploads still running give their objects back (AWAITING_UPLOAD) and answer 503, rather than leave them
    // to the controller once their claims lapse.
    tracing::warn!("uploads still running at the end of the shutdown grace are given back");
    state.cut_off.send_replace(true);
    if tokio::time::timeout(SETTLE_GRACE, &mut finished).await.is_err() {
        tracing::warn!("requests still in flight after the shutdown grace are cut off");
    }
}

/// How long uploads cut off at the end of the shutdown grace get to record that they gave their objects back.
const SETTLE_GRACE: Duration = Duration::from_secs(5);

enum Connection {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// What a TLS client's certificate chain proves, each CA checked on its own.
fn peer_of(state: &AppState, chain: &[rustls::pki_types::CertificateDer<'_>], offload: bool) -> front_proxy::PeerCert {
    if chain.is_empty() {
        return front_proxy::PeerCert { front_proxy: None, offload };
    }
    front_proxy::PeerCert {
        front_proxy: state.front_proxy.as_ref().and_then(|proxy| proxy.proxy_name(chain)),
        offload: offload || state.config.offload_client_ca.as_ref().is_some_and(|ca| ca.verifies(chain)),
    }
}

/// Serve one connection's requests, each with `peer` in its extensions and its body under the idle timeout.
async fn serve_connection<I>(
    io: I,
    peer: front_proxy::PeerCert,
    state: &AppState,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
    let idle = limits.body_idle_timeout;
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let mut request = request.map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(idle, body)));
        request.extensions_mut().insert(peer.clone());
        tower::ServiceExt::oneshot(router.clone(), request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's own cap of 100 header fields stays: more also get 431.
        .max_header_size(limits.max_header_size);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection).await {
        // Timeouts, oversized heads and clients that went away: theirs to notice, not ours to alarm about.
        tracing::debug!(%error, "a connection ended with an error");
    }
}
