//! The client side: `bitsmith push|download|wait`, also run as the kubectl plugin `kubectl bitsmith …` (the binary
//! named `kubectl-bitsmith`). It finds Packages through the Kubernetes API with the user's kubeconfig, and sends
//! bits straight to bitsmith's own API (the Package's `status.links`, or `--api-url`), never through
//! kube-apiserver, whose request timeout would cut a long upload.

pub mod appdir;
pub mod cfignore;
pub mod history;
pub mod manifest;
mod progress;
pub mod zipstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, ResourceExt};
use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use crate::resources::{AppRef, Package, PackageSpec, PackageState};
use history::History;
use manifest::{Class, Kind, Manifest};
use progress::Progress;

/// How to reach the cluster and the API, as kubectl users expect.
#[derive(Args, Debug, Clone, Default)]
pub struct Target {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long)]
    pub context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// bitsmith's API, e.g. `https://bits.example.com` (default: the links in the Package's status, which a
    /// controller that serves the API writes).
    #[arg(long)]
    pub api_url: Option<url::Url>,
    /// A PEM CA that bitsmith's API certificate chains to, besides the system's.
    #[arg(long)]
    pub api_ca: Option<PathBuf>,
}

/// `push PATH PACKAGE`.
#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    /// An app directory (walked as its `.cfignore` says) or a `.zip`.
    pub path: PathBuf,
    /// The Package to upload to; it must await an upload.
    pub package: String,
    /// Create the Package when it does not exist.
    #[arg(long)]
    pub create: bool,
    /// With --create: the app it belongs to (`spec.appRef.name`).
    #[arg(long, requires = "create")]
    pub app: Option<String>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
    /// How long to wait for the Package to become READY after the upload.
    #[arg(long, default_value = "5m", value_parser = crate::cli::parse_timeout)]
    pub timeout: Duration,
    /// Hash every file, and send every file the server's resource cache does not hold, instead of reusing the
    /// last push of this directory (its hashes and its package's files).
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    pub target: Target,
}

/// `download PACKAGE -o FILE`.
#[derive(Args, Debug, Clone)]
pub struct DownloadArgs {
    pub package: String,
    /// Where to write the bits; the file appears only once its sha256 matched the Package's.
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub target: Target,
}

/// `wait PACKAGE`.
#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    pub package: String,
    /// How long to wait for READY.
    #[arg(long, default_value = "5m", value_parser = crate::cli::parse_timeout)]
    pub timeout: Duration,
    #[command(flatten)]
    pub target: Target,
}

/// Why a command failed, as one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("{0}")]
    Kube(String),
    #[error("package {name:?} not found in namespace {namespace:?}{hint}")]
    NotFound { name: String, namespace: String, hint: &'static str },
    #[error("{0}")]
    Refused(String),
    #[error("{what}: HTTP {status} {title}: {detail}")]
    Api { what: &'static str, status: u16, title: String, detail: String },
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    #[error("package {name:?} FAILED: {reason}")]
    Failed { name: String, reason: String },
    #[error("package {name:?} is not READY after {}", humantime::format_duration(*.after))]
    Timeout { name: String, after: Duration },
    #[error("{0}")]
    AppDir(#[from] appdir::AppDirError),
    #[error("{0}")]
    Zip(#[from] zipstream::ZipStreamError),
    #[error("{path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("the downloaded bits have sha256 {actual}, the package says {expected}; nothing was kept")]
    Mismatch { expected: String, actual: String },
}

impl From<kube::Error> for PluginError {
    fn from(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => PluginError::Kube(format!("kubernetes: {} ({})", status.message, status.code)),
            other => PluginError::Kube(format!("kubernetes: {}", crate::sources::error_chain(&other))),
        }
    }
}

/// The cluster, the namespace and the API, as the user's kubeconfig and flags say.
struct Session {
    client: kube::Client,
    /// The Kubernetes API server's URL.
    cluster: String,
    namespace: String,
    /// The kubeconfig user's bearer token, which bitsmith's API takes as Kubernetes does.
    token: Option<String>,
    target: Target,
    http: reqwest::Client,
}

impl Session {
    async fn open(target: &Target) -> Result<Self, PluginError> {
        let bad = |e: &(dyn std::error::Error + 'static)| PluginError::Kubeconfig(crate::sources::error_chain(e));
        let kubeconfig = match &target.kubeconfig {
            Some(path) => Kubeconfig::read_from(path).map_err(|e| bad(&e))?,
            None => Kubeconfig::read().map_err(|e| bad(&e))?,
        };
        let options = KubeConfigOptions { context: target.context.clone(), ..Default::default() };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| bad(&e))?;
        let token = match (&config.auth_info.token, &config.auth_info.token_file) {
            (Some(token), _) => Some(token.expose_secret().to_string()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|source| PluginError::File { path: file.clone(), source })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let namespace = target.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let cluster = config.cluster_url.to_string();
        let client = crate::kube_client::client(config).map_err(|e| bad(&e))?;
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("kubectl-bitsmith/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // Redirects are followed by hand, without the credentials (see `download`).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &target.api_ca {
            let pem =
                std::fs::read(path).map_err(|source| PluginError::File { path: path.display().to_string(), source })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| PluginError::Refused(format!("--api-ca {}: {e}", path.display())))?;
            http = http.tls_certs_merge(certs);
        }
        let http = http.build().map_err(|e| PluginError::Refused(format!("http client: {e}")))?;
        Ok(Session { client, cluster, namespace, token, target: target.clone(), http })
    }

    fn packages(&self) -> Api<Package> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn package(&self, name: &str, hint: &'static str) -> Result<Package, PluginError> {
        self.packages().get_opt(name).await?.ok_or_else(|| PluginError::NotFound {
            name: name.into(),
            namespace: self.namespace.clone(),
            hint,
        })
    }

    /// The path of one of the package's actions in the aggregated API, through kube-apiserver.
    fn aggregated(&self, package: &Package, action: &str) -> String {
        let group = crate::api::aggregated::GROUP;
        format!("/apis/{group}/v1alpha1/namespaces/{}/packages/{}/{action}", self.namespace, package.name_any())
    }

    /// The URL of one of the package's API actions: under `--api-url`, else its status's link.
    fn action_url(&self, package: &Package, action: Action) -> Result<String, PluginError> {
        let uid = package.uid().unwrap_or_default();
        if let Some(base) = &self.target.api_url {
            return Ok(format!("{}/v3/packages/{uid}/{}", base.as_str().trim_end_matches('/'), action.path()));
        }
        let links = package.status.as_ref().and_then(|s| s.links.as_ref());
        let link = links.and_then(|l| match action {
            Action::Upload => l.upload.as_ref(),
            Action::Download => l.download.as_ref(),
        });
        match link {
            Some(link) => Ok(link.href.clone()),
            None => Err(PluginError::Refused(format!(
                "package {:?} has no {} link in its status (is the controller running with the API?); name the API with --api-url",
                package.name_any(),
                action.path()
            ))),
        }
    }

    /// What an upload to `package` authenticates with: an upload token for that one object from the aggregated
    /// API (so the user's own credentials never leave for bitsmith's API, and work whatever kind they are), or,
    /// where the aggregated API is not served, the kubeconfig's bearer token.
    async fn upload_credential(&self, package: &Package) -> Result<String, PluginError> {
        let path = self.aggregated(package, "uploadtoken");
        // bitsmith's API learns of a new Package from a watch, which may trail it by a moment; and an APIService
        // that just became available may not be routed to at once. Without a bearer token to fall back on, both
        // are waited out for a while.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let request = http::Request::post(&path).body(kube::client::Body::from(Vec::new())).expect("a request");
            let response = self.client.send(request).await?;
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .map_err(|e| PluginError::Kube(format!("kubernetes: reading the upload token: {e}")))?
                .to_bytes();
            let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status.is_success() {
                return answer["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| PluginError::Refused("the aggregated API answered without an upload token".into()));
            }
            let from_bitsmith = answer.get("errors").is_some();
            let not_served = !from_bitsmith && (status.as_u16() == 404 || status.as_u16() == 503);
            if not_served && let Some(bearer) = self.token.as_deref() {
                return Ok(bearer.to_string());
            }
            let passing = status.as_u16() == 404 || status.as_u16() == 503;
            if passing && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let detail = if from_bitsmith {
                let (title, detail) = cf_error(&answer);
                format!("{title} {detail}")
            } else {
                answer["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string())
            };
            let hint = if not_served {
                "; the aggregated API is not served, and this kubeconfig user has no bearer token for bitsmith's API"
            } else {
                ""
            };
            return Err(PluginError::Refused(format!("upload token: HTTP {}: {detail}{hint}", status.as_u16())));
        }
    }

    /// Send `request` with `credential` and read the answer's body; a CF error answer becomes
    /// [`PluginError::Api`].
    async fn send(
        &self,
        what: &'static str,
        request: reqwest::RequestBuilder,
        credential: &str,
    ) -> Result<bytes::Bytes, PluginError> {
        let response = request.bearer_auth(credential).send().await.map_err(|e| http_error(what, &e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| http_error(what, &e))?;
        if status.is_success() {
            return Ok(body);
        }
        let (title, detail) = cf_error(&serde_json::from_slice(&body).unwrap_or(Value::Null));
        Err(PluginError::Api { what, status: status.as_u16(), title, detail })
    }
}

/// The title and detail of a CF error answer (`{"errors": [{"title", "detail", "code"}]}`).
fn cf_error(body: &Value) -> (String, String) {
    let error = &body["errors"][0];
    let text = |key: &str, otherwise: &str| error[key].as_str().unwrap_or(otherwise).to_string();
    (text("title", "error"), text("detail", "no detail"))
}

#[derive(Clone, Copy)]
enum Action {
    Upload,
    Download,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Upload => "upload",
            Action::Download => "download",
        }
    }
}

fn http_error(what: &str, error: &reqwest::Error) -> PluginError {
    let url = error.url().map(|u| u.to_string()).unwrap_or_else(|| what.to_string());
    PluginError::Http { url, detail: crate::sources::error_chain(error) }
}

/// Files the server's resource cache takes part in matching, as Cloud Controller's clients ask for them.
const MATCH_BATCH: usize = 5000;

/// `push`: upload an app directory (or a zip) to a Package, then wait until it is READY and print its sha256.
pub async fn push(args: PushArgs) -> Result<(), PluginError> {
    let session = Session::open(&args.target).await?;
    let api = session.packages();
    let package = match api.get_opt(&args.package).await? {
        Some(package) => package,
        None if args.create => {
            let mut spec = PackageSpec::bits(None);
            spec.app_ref = args.app.clone().map(|name| AppRef { name });
            api.create(&PostParams::default(), &Package::new(&args.package, spec)).await?
        }
        None => {
            return Err(PluginError::NotFound {
                name: args.package.clone(),
                namespace: session.namespace.clone(),
                hint: " (push --create creates it)",
            });
        }
    };
    // Read the app while the controller takes a new Package in.
    let records = (!args.full).then(history::cache_dir).flatten();
    let history = match &records {
        Some(cache) if std::fs::metadata(&args.path).is_ok_and(|m| m.is_dir()) => {
            let (cache, root) = (cache.clone(), args.path.clone());
            tokio::task::spawn_blocking(move || History::load(&cache, &root)).await.expect("reading the record")
        }
        _ => History::default(),
    };
    let hashed_at_ns = now_ns();
    let (app, history) = read_app(&args.path, history).await?;
    let package = awaiting_upload(&api, &package).await?;
    let upload = session.action_url(&package, Action::Upload)?;
    let api_base = upload.split("/v3/").next().unwrap_or_default().to_string();
    let credential = session.upload_credential(&package).await?;

    let ready = match app {
        App::Zip { path, size } => {
            send_upload(&session, &upload, &credential, &AppBits::Zip { path, size }, args.quiet).await?;
            wait_ready(&api, &args.package, args.timeout).await?
        }
        App::Dir(manifest) => {
            let base = base_package(&api, &session, &history).await;
            drop(history);
            let mut classes = first_classes(&manifest, base.is_some())?;
            matches(&session, &api_base, &manifest, &mut classes, &credential).await?;
            let classes: Arc<[Class]> = classes.into();
            let root = args.path.clone();
            let parts = Parts::new(root.clone(), manifest.clone(), classes.clone(), base)?;
            let with_base = parts.base.is_some();
            match send_upload(&session, &upload, &credential, &AppBits::Dir(parts), args.quiet).await {
                // The last push's package could not serve (gone, its bits lost, no longer allowed): everything
                // the cache does not hold goes in the zip instead.
                Err(PluginError::Api { status: 422, detail, .. }) if with_base => {
                    eprintln!("the last push's package could not be reused ({detail}); sending the files again");
                    let mut classes = classes.to_vec();
                    for class in classes.iter_mut().filter(|c| **c == Class::Base) {
                        *class = Class::Unasked;
                    }
                    matches(&session, &api_base, &manifest, &mut classes, &credential).await?;
                    let parts = Parts::new(root, manifest.clone(), classes.into(), None)?;
                    send_upload(&session, &upload, &credential, &AppBits::Dir(parts), args.quiet).await
                }
                other => other,
            }?;
            let ready = wait_ready(&api, &args.package, args.timeout).await?;
            if let Some(cache) = &records {
                let pushed = history::Pushed {
                    cluster: session.cluster.clone(),
                    namespace: session.namespace.clone(),
                    package: args.package.clone(),
                    uid: ready.uid().unwrap_or_default(),
                    sha256: checksum_of(&ready),
                    hashed_at_ns,
                };
                let (cache, root) = (cache.clone(), args.path.clone());
                let saved =
                    tokio::task::spawn_blocking(move || History::save(&cache, &root, &pushed, manifest.entries()))
                        .await
                        .expect("recording the push");
                if let Err(error) = saved {
                    eprintln!("warning: this push is not recorded for the next one: {error}");
                }
            }
            ready
        }
    };
    println!("{}", checksum_of(&ready));
    Ok(())
}

/// What to do with each entry before the resource cache is asked: files the last push sent as they are now come
/// from its package when there is one to use, the others are to be asked about. Skipped entries are said here.
fn first_classes(manifest: &Manifest, with_base: bool) -> Result<Vec<Class>, PluginError> {
    let mut classes = Vec::with_capacity(manifest.len());
    for entry in manifest.entries() {
        let entry = entry.map_err(scratch)?;
        classes.push(match entry.kind {
            Kind::File if with_base && entry.in_last_push => Class::Base,
            Kind::File => Class::Unasked,
            Kind::Skipped => {
                eprintln!("skipping {}: not a file or directory (symlinks are not followed)", entry.path);
                Class::NotAFile
            }
            Kind::Dir => Class::NotAFile,
        });
    }
    Ok(classes)
}

/// The push's list of files could not be read back.
fn scratch(error: std::io::Error) -> PluginError {
    PluginError::AppDir(appdir::AppDirError::Manifest(error))
}

fn checksum_of(package: &Package) -> String {
    package.status.as_ref().and_then(|s| s.stored.checksum.as_ref()).map(|c| c.value.clone()).unwrap_or_default()
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The package the last push of this directory went to, if it is in this cluster and namespace and still holds
/// the bits it was pushed with: its uid.
async fn base_package(api: &Api<Package>, session: &Session, history: &History) -> Option<String> {
    let pushed = history.pushed.as_ref()?;
    if (pushed.cluster.as_str(), pushed.namespace.as_str()) != (session.cluster.as_str(), session.namespace.as_str()) {
        return None;
    }
    let package = api.get_opt(&pushed.package).await.ok()??;
    let ready = package.status.as_ref().and_then(|s| s.state) == Some(PackageState::Ready);
    (ready && package.uid().as_deref() == Some(pushed.uid.as_str()) && checksum_of(&package) == pushed.sha256)
        .then(|| pushed.uid.clone())
}

/// What an upload sends.
enum AppBits {
    /// A zip made elsewhere, sent as it is.
    Zip { path: PathBuf, size: u64 },
    /// An app directory, zipped while it is sent.
    Dir(Parts),
}

/// What an upload of a directory names and sends.
struct Parts {
    root: PathBuf,
    /// Its entries, and what the push does with each.
    manifest: Manifest,
    classes: Arc<[Class]>,
    /// The uid of an earlier package to take the files marked [`Class::Base`] from; none when there are none.
    base: Option<String>,
    counts: Counts,
}

/// Files and bytes of each class.
#[derive(Default)]
struct Counts {
    sent: (u64, u64),
    matched: (u64, u64),
    base: (u64, u64),
}

impl Parts {
    fn new(
        root: PathBuf,
        manifest: Manifest,
        classes: Arc<[Class]>,
        base: Option<String>,
    ) -> Result<Self, PluginError> {
        let mut counts = Counts::default();
        for entry in manifest.classified(&classes) {
            let (entry, class) = entry.map_err(scratch)?;
            let count = match class {
                Class::Sent => &mut counts.sent,
                Class::Matched => &mut counts.matched,
                Class::Base => &mut counts.base,
                Class::NotAFile | Class::Unasked => continue,
            };
            *count = (count.0 + 1, count.1 + entry.size);
        }
        let base = base.filter(|_| counts.base.0 > 0);
        Ok(Parts { root, manifest, classes, base, counts })
    }
}

/// Upload `bits`. A 404 is tried again for a while: bitsmith's API learns of a new Package from a watch, which may
/// trail the Kubernetes API (it answers before it reads the body, so little is sent in vain).
async fn send_upload(
    session: &Session,
    upload: &str,
    credential: &str,
    bits: &AppBits,
    quiet: bool,
) -> Result<(), PluginError> {
    if !quiet && let AppBits::Dir(Parts { counts, .. }) = bits {
        let (held, held_bytes) = (counts.matched.0 + counts.base.0, counts.matched.1 + counts.base.1);
        eprintln!(
            "uploading {} files ({} bytes); {held} files ({held_bytes} bytes) are on the server already",
            counts.sent.0, counts.sent.1
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match send_upload_once(session, upload, credential, bits, quiet).await {
            Err(PluginError::Api { status: 404, .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            answer => return answer,
        }
    }
}

async fn send_upload_once(
    session: &Session,
    upload: &str,
    credential: &str,
    bits: &AppBits,
    quiet: bool,
) -> Result<(), PluginError> {
    let total = match bits {
        AppBits::Zip { size, .. } => *size,
        AppBits::Dir(parts) => parts.counts.sent.1,
    };
    let read = Arc::new(AtomicU64::new(0));
    let progress = (!quiet).then(|| Progress::start(read.clone(), total));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut form = reqwest::multipart::Form::new();
    let mut producers = Vec::new();
    match bits {
        AppBits::Zip { path, .. } => {
            let (path, read) = (path.clone(), read.clone());
            producers.push(tokio::task::spawn_blocking(move || zipstream::send_file(&path, tx, read)));
        }
        AppBits::Dir(parts) => {
            if parts.counts.matched.0 > 0 {
                let (list, producer) = gzipped_resources(parts, Class::Matched);
                producers.push(producer);
                form = form.part("resources", list);
            }
            if let Some(uid) = &parts.base {
                let (list, producer) = gzipped_resources(parts, Class::Base);
                producers.push(producer);
                form = form.text("base_package", uid.clone()).part("base_resources", list);
            }
            let (root, manifest, classes) = (parts.root.clone(), parts.manifest.clone(), parts.classes.clone());
            let read = read.clone();
            producers
                .push(tokio::task::spawn_blocking(move || zipstream::write_zip(&root, &manifest, &classes, tx, read)));
        }
    }
    let form = form.part(
        "bits",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(tokio_stream(rx)))
            .file_name("app.zip")
            .mime_str("application/zip")
            .expect("a valid mime type"),
    );
    let sent = session.send("upload", session.http.post(upload).multipart(form), credential).await;
    let mut produced = Ok(());
    for producer in producers {
        let result = producer.await.expect("a part's writer panicked");
        produced = produced.and(result);
    }
    if let Some(progress) = progress {
        progress.finish().await;
    }
    // A file that could not be read says more than the broken upload it caused.
    produced.map_err(PluginError::from).and(sent).map(|_| ())
}

/// The files of `class` as an upload's resource list takes them, gzipped, written while the part is sent (a list of
/// 100 000 files is ~10 MiB of JSON, ~3 MiB gzipped); and the task writing it.
fn gzipped_resources(
    parts: &Parts,
    class: Class,
) -> (reqwest::multipart::Part, tokio::task::JoinHandle<Result<(), zipstream::ZipStreamError>>) {
    /// A file in the shorter form an upload's resources take.
    #[derive(serde::Serialize)]
    struct Resource<'a> {
        #[serde(rename = "fn")]
        path: &'a str,
        sha1: String,
        size: u64,
        mode: String,
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (manifest, classes) = (parts.manifest.clone(), parts.classes.clone());
    let producer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use zipstream::ZipStreamError;
        let mut gzip = flate2::write::GzEncoder::new(zipstream::BlockSink::new(tx), flate2::Compression::default());
        let mut separator = b"[".as_slice();
        for entry in manifest.classified(&classes) {
            let (file, of) = entry.map_err(ZipStreamError::Scratch)?;
            if of != class {
                continue;
            }
            let resource =
                Resource { path: &file.path, sha1: file.sha1.hex(), size: file.size, mode: format!("{:o}", file.mode) };
            gzip.write_all(separator).map_err(|_| ZipStreamError::Closed)?;
            serde_json::to_writer(&mut gzip, &resource).map_err(|_| ZipStreamError::Closed)?;
            separator = b",";
        }
        gzip.write_all(if separator == b"[" { b"[]" } else { b"]" }).map_err(|_| ZipStreamError::Closed)?;
        gzip.finish().and_then(|mut sink| sink.flush()).map_err(|_| ZipStreamError::Closed)
    });
    let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(tokio_stream(rx)))
        .mime_str("application/gzip")
        .expect("a valid mime type");
    (part, producer)
}

enum App {
    Dir(Manifest),
    Zip { path: PathBuf, size: u64 },
}

/// The app at `path`: a directory walked and hashed (files unchanged since `history` recorded them are not hashed
/// again), or a zip file.
async fn read_app(path: &Path, mut history: History) -> Result<(App, History), PluginError> {
    let meta =
        std::fs::metadata(path).map_err(|source| PluginError::File { path: path.display().to_string(), source })?;
    if meta.is_dir() {
        let path = path.to_path_buf();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (manifest, history) = tokio::task::spawn_blocking(move || {
            let manifest = appdir::read(&path, threads, &mut history);
            (manifest, history)
        })
        .await
        .expect("walk");
        Ok((App::Dir(manifest?), history))
    } else {
        Ok((App::Zip { path: path.to_path_buf(), size: meta.len() }, history))
    }
}

/// Ask the server which files `classes` marks [`Class::Unasked`] it has already, in batches of [`MATCH_BATCH`]:
/// those become [`Class::Matched`], the others [`Class::Sent`]. (The manifest is a local file read a batch at a
/// time: well under a millisecond each.)
async fn matches(
    session: &Session,
    base: &str,
    manifest: &Manifest,
    classes: &mut [Class],
    credential: &str,
) -> Result<(), PluginError> {
    let mut entries = manifest.entries().enumerate();
    loop {
        let mut batch = Vec::with_capacity(MATCH_BATCH);
        for (index, entry) in entries.by_ref() {
            let entry = entry.map_err(scratch)?;
            if classes[index] != Class::Unasked {
                continue;
            }
            classes[index] = Class::Sent;
            if crate::cache::cacheable(entry.size) {
                batch.push((index, entry));
                if batch.len() == MATCH_BATCH {
                    break;
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        // Written straight from the entries, and the answer read for its paths alone: a batch's JSON trees would
        // be megabytes that the allocator keeps for the rest of the push.
        let body = serde_json::to_vec(&json_resources(&batch)).expect("resources serialize");
        let request = session
            .http
            .post(format!("{base}/v3/resource_matches"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body);
        let answer = session.send("resource_matches", request, credential).await?;
        #[derive(serde::Deserialize)]
        struct Held {
            resources: Vec<HeldPath>,
        }
        #[derive(serde::Deserialize)]
        struct HeldPath {
            path: String,
        }
        let held: Held = serde_json::from_slice(&answer).map_err(|e| PluginError::Api {
            what: "resource_matches",
            status: 200,
            title: "an answer that is not a resource list".into(),
            detail: e.to_string(),
        })?;
        let asked: std::collections::HashMap<&str, usize> = batch.iter().map(|(i, f)| (f.path.as_str(), *i)).collect();
        for item in &held.resources {
            if let Some(&index) = asked.get(item.path.as_str()) {
                classes[index] = Class::Matched;
            }
        }
    }
}

/// `{"resources": [...]}` of `batch`, each file as Cloud Controller's v3 resource lists name it.
fn json_resources(batch: &[(usize, manifest::Entry)]) -> impl serde::Serialize + '_ {
    #[derive(serde::Serialize)]
    struct Checksum {
        value: String,
    }
    #[derive(serde::Serialize)]
    struct Resource<'a> {
        path: &'a str,
        size_in_bytes: u64,
        checksum: Checksum,
        mode: String,
    }
    struct Resources<'a>(&'a [(usize, manifest::Entry)]);
    impl serde::Serialize for Resources<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(|(_, file)| Resource {
                path: &file.path,
                size_in_bytes: file.size,
                checksum: Checksum { value: file.sha1.hex() },
                mode: format!("{:o}", file.mode),
            }))
        }
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        resources: Resources<'a>,
    }
    Body { resources: Resources(batch) }
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The Package once the controller has taken it in; refused unless it awaits an upload.
async fn awaiting_upload(api: &Api<Package>, package: &Package) -> Result<Package, PluginError> {
    let name = package.name_any();
    let has_state = |p: &Package| p.status.as_ref().and_then(|s| s.state).is_some();
    let no_state =
        || PluginError::Refused(format!("package {name:?} has no state after 60 s: is the controller running?"));
    let seen = watch_until(api, &name, has_state, Duration::from_secs(60), no_state).await?;
    let state = seen.status.as_ref().and_then(|s| s.state);
    match state {
        Some(PackageState::AwaitingUpload) => Ok(seen),
        Some(state) => Err(PluginError::Refused(format!(
            "package {name:?} is {}, not AWAITING_UPLOAD: bits may be uploaded only once; push to a new package",
            state_name(state)
        ))),
        None => unreachable!("waited for a state"),
    }
}

/// Watch the Package `name` until `condition` holds, for at most `timeout` (then `timed_out`).
async fn watch_until(
    api: &Api<Package>,
    name: &str,
    condition: impl Fn(&Package) -> bool,
    timeout: Duration,
    timed_out: impl FnOnce() -> PluginError,
) -> Result<Package, PluginError> {
    // A deleted Package ends the wait, once this watch has seen it: a watch may start from a cache that does not
    // hold a Package created a moment ago.
    let seen_once = std::sync::atomic::AtomicBool::new(false);
    let seen = kube::runtime::wait::await_condition(api.clone(), name, move |p: Option<&Package>| match p {
        Some(package) => {
            seen_once.store(true, std::sync::atomic::Ordering::Relaxed);
            condition(package)
        }
        None => seen_once.load(std::sync::atomic::Ordering::Relaxed),
    });
    tokio::time::timeout(timeout, seen)
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| PluginError::Kube(format!("watching package {name:?}: {e}")))?
        .ok_or_else(|| PluginError::Refused(format!("package {name:?} was deleted")))
}

fn state_name(state: PackageState) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Watch the Package until it is READY (returned) or FAILED (an error with its reason), for at most `timeout`.
async fn wait_ready(api: &Api<Package>, name: &str, timeout: Duration) -> Result<Package, PluginError> {
    let settled = |p: &Package| {
        matches!(
            p.status.as_ref().and_then(|s| s.state),
            Some(PackageState::Ready | PackageState::Failed | PackageState::Expired)
        )
    };
    let timed_out = || PluginError::Timeout { name: name.into(), after: timeout };
    let package = watch_until(api, name, settled, timeout, timed_out).await?;
    let status = package.status.clone().unwrap_or_default();
    match status.state {
        Some(PackageState::Ready) => Ok(package),
        _ => Err(PluginError::Failed {
            name: name.into(),
            reason: status.error.unwrap_or_else(|| format!("{:?}", status.state.map(state_name))),
        }),
    }
}

/// `wait`: until the Package is READY; prints its sha256.
pub async fn wait(args: WaitArgs) -> Result<(), PluginError> {
    let session = Session::open(&args.target).await?;
    session.package(&args.package, "").await?;
    let ready = wait_ready(&session.packages(), &args.package, args.timeout).await?;
    println!("{}", checksum_of(&ready));
    Ok(())
}

/// `download`: the Package's bits into a file, kept only once their sha256 matches the status's: straight from
/// bitsmith's API with the kubeconfig's bearer token, else through the aggregated API.
pub async fn download(args: DownloadArgs) -> Result<(), PluginError> {
    let session = Session::open(&args.target).await?;
    let package = session.package(&args.package, "").await?;
    let expected = package
        .status
        .as_ref()
        .filter(|s| s.state == Some(PackageState::Ready))
        .and_then(|s| s.stored.checksum.clone())
        .ok_or_else(|| PluginError::Refused(format!("package {:?} is not READY: nothing to download", args.package)))?;
    let body = match session.token.as_deref() {
        Some(bearer) => direct_download(&session, &package, bearer).await?,
        // No token bitsmith's API could check: through the aggregated API (within kube-apiserver's timeout).
        None => aggregated_download(&session, &package).await?,
    };
    let partial = partial_path(&args.output);
    let written = write_checked(body, &partial).await;
    let actual = match written {
        Ok(actual) => actual,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    if actual != expected.value {
        let _ = std::fs::remove_file(&partial);
        return Err(PluginError::Mismatch { expected: expected.value, actual });
    }
    std::fs::rename(&partial, &args.output)
        .map_err(|source| PluginError::File { path: args.output.display().to_string(), source })?;
    Ok(())
}

/// A hidden sibling of `output` that the bits are written to before they are checked.
fn partial_path(output: &Path) -> PathBuf {
    let name = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    output.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// The bits, as the stream of a download.
type Bits = futures::stream::BoxStream<'static, Result<bytes::Bytes, PluginError>>;

/// The bits from bitsmith's API with the bearer token; a redirect (a presigned URL of the store) is followed
/// without it.
async fn direct_download(session: &Session, package: &Package, bearer: &str) -> Result<Bits, PluginError> {
    let url = session.action_url(package, Action::Download)?;
    let mut response =
        session.http.get(&url).bearer_auth(bearer).send().await.map_err(|e| http_error("download", &e))?;
    if response.status().is_redirection() {
        let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
        let location = location
            .ok_or_else(|| PluginError::Http { url: url.clone(), detail: "a redirect without a Location".into() })?;
        let target = reqwest::Url::parse(&url)
            .and_then(|base| base.join(location))
            .map_err(|e| PluginError::Http { url: url.clone(), detail: e.to_string() })?;
        response = session.http.get(target).send().await.map_err(|e| http_error("download", &e))?;
    }
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let (title, detail) = cf_error(&response.json().await.unwrap_or(Value::Null));
        return Err(PluginError::Api { what: "download", status, title, detail });
    }
    Ok(response.bytes_stream().map(|chunk| chunk.map_err(|e| http_error("download", &e))).boxed())
}

/// The bits through the aggregated API, with whatever credentials the kubeconfig holds.
async fn aggregated_download(session: &Session, package: &Package) -> Result<Bits, PluginError> {
    use futures::AsyncReadExt;
    let path = session.aggregated(package, "download");
    let request = http::Request::get(path).body(Vec::new()).expect("a valid request");
    let reader = Box::pin(session.client.request_stream(request).await?);
    Ok(futures::stream::try_unfold(reader, |mut reader| async move {
        let mut block = vec![0u8; 256 << 10];
        let n = reader.read(&mut block).await.map_err(|e| PluginError::Kube(format!("download: {e}")))?;
        block.truncate(n);
        Ok((n > 0).then(|| (bytes::Bytes::from(block), reader)))
    })
    .boxed())
}

async fn write_checked(mut body: Bits, path: &Path) -> Result<String, PluginError> {
    let file_error = |source| PluginError::File { path: path.display().to_string(), source };
    let mut file = tokio::fs::File::create(path).await.map_err(file_error)?;
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(file_error)?;
    }
    file.sync_all().await.map_err(file_error)?;
    Ok(crate::digest::to_hex(&hasher.finalize()))
}
