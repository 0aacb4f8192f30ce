//! The command line: `bitsmith crd`, `fetch`, `controller` and `api`; and `push`, `download` and `wait`, which are
//! also `kubectl bitsmith …` when the binary runs as `kubectl-bitsmith`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::budget::{self, TransferBudget};
use crate::fetch::Fetcher;
use crate::leader::{Leadership, LeaseConfig, run_as_leader};
use crate::offline;
use crate::retention::Retention;
use crate::sources::{Egress, OptionPolicy, SourcePolicy, error_chain};
use crate::store::BlobStore;

#[derive(Parser, Debug)]
#[command(name = "bitsmith", version, about = "Cloud Foundry application bits as Kubernetes resources")]
pub struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write one file each with --out-dir).
    Crd {
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Fetch the bits of Package and Droplet manifests into a store, without a cluster, and print the objects
    /// with their status as YAML.
    Fetch(FetchArgs),
    /// Reconcile Packages and Droplets in the cluster of the current kubeconfig (or the in-cluster config);
    /// with --listen, also serve the CF v3 API.
    Controller(Box<ControllerArgs>),
    /// Serve the CF v3 API alone (any number of replicas behind one Service).
    Api(Box<ApiServerArgs>),
    /// Upload an app directory (or a zip) to a Package straight to bitsmith's API, and wait until it is READY.
    Push(crate::plugin::PushArgs),
    /// Download a READY Package's bits into a file, checked against its sha256.
    Download(crate::plugin::DownloadArgs),
    /// Wait until a Package is READY (exit 0) or FAILED (exit 1), and print its sha256.
    Wait(crate::plugin::WaitArgs),
}

/// The CF v3 API's settings.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Address of the CF v3 API; plain HTTP unless --tls-cert and --tls-key are given.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// The API's URL as clients reach it (e.g. `https://bits.example.com`); every link points under it.
    /// Default: derived from --listen.
    #[arg(long)]
    pub external_url: Option<url::Url>,
    /// PEM certificate chain to serve the API with.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest upload body, e.g. 2048MiB.
    #[arg(long, default_value = "2048MiB", value_parser = parse_size)]
    pub max_upload_size: u64,
    /// Largest package: the sum of its files' uncompressed sizes.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub max_package_size: u64,
    /// Most entries (files and directories) a package zip may have, added resources included.
    #[arg(long, default_value_t = crate::archive::zip::DEFAULT_MAX_ENTRIES)]
    pub max_zip_entries: usize,
    /// Directory where an upload-offloading proxy (nginx's upload module) spools request bodies; package
    /// uploads naming a `bits_path` are accepted only for files inside it.
    #[arg(long)]
    pub upload_spool_dir: Option<PathBuf>,
    /// Address only the upload-offloading proxy connects to: uploads through it may name a spooled file
    /// (`bits_path`). Bind it where only the proxy reaches it (e.g. 127.0.0.1 beside an nginx sidecar). Speaks
    /// TLS when --listen does.
    #[arg(long, requires = "upload_spool_dir")]
    pub offload_listen: Option<std::net::SocketAddr>,
    /// PEM CA of the upload-offloading proxy's client certificates: a TLS connection with a certificate from it
    /// may name a spooled file (`bits_path`).
    #[arg(long, requires_all = ["upload_spool_dir", "tls_cert"])]
    pub offload_client_ca: Option<PathBuf>,
    /// A request's headers must arrive within this time; it also closes connections idle between requests.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub header_read_timeout: std::time::Duration,
    /// A request body that sends nothing for this long is cut off; the upload may be tried again.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub body_idle_timeout: std::time::Duration,
    /// Largest request head (request line and headers); larger ones are answered 431.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub max_header_size: u64,
    /// Who is offered a file of the resource cache: `namespace`, callers who may download packages in a
    /// namespace whose uploads held it; `cluster`, every authenticated caller (Cloud Controller's global pool,
    /// for installs with a single tenant).
    #[arg(long, value_enum, default_value = "namespace")]
    pub resource_cache_scope: crate::cache::Scope,
    /// An upload renews its claim on the object every quarter of this; the controller returns an object whose
    /// claim went unrenewed this long to AWAITING_UPLOAD (its upload's holder died). Give every replica the
    /// same value.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub upload_claim_timeout: std::time::Duration,
    /// On SIGTERM the replica turns unready, stops taking requests and gives those in flight this long to
    /// finish before it exits. Set the Pod's terminationGracePeriodSeconds above it.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    pub shutdown_grace: std::time::Duration,
    /// A file of at least 32 bytes (e.g. a mounted Secret) that signs upload tokens: give every replica the same
    /// one. Without it each replica signs with a random key of its own, and a token is good only where it was
    /// issued.
    #[arg(long)]
    pub upload_token_key_file: Option<PathBuf>,
    /// How long an upload token (handed out through the aggregated API) is good for.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub upload_token_ttl: std::time::Duration,
}

impl ApiArgs {
    /// The external URL: as given, or the listen address with the scheme TLS implies.
    pub fn urls(&self) -> Option<crate::links::ApiUrls> {
        let url = self.external_url.clone().or_else(|| {
            let scheme = if self.tls_cert.is_some() { "https" } else { "http" };
            url::Url::parse(&format!("{scheme}://{}", self.listen?)).ok()
        })?;
        Some(crate::links::ApiUrls::new(&url))
    }

    /// The flags that bound the size of a blob the API stores.
    fn size_limits(&self) -> [(&'static str, u64); 2] {
        [("--max-upload-size", self.max_upload_size), ("--max-package-size", self.max_package_size)]
    }
}

/// How many transfers run at once.
#[derive(Args, Debug, Clone)]
pub struct TransferArgs {
    /// Fetches and uploads this process runs at once, together; more uploads are answered 503
    /// CF-ServiceUnavailable with Retry-After, more fetches wait. Default: as many as fit the container's memory
    /// limit, at ~80 MiB each after 128 MiB for the rest (8 without a limit).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_transfers: Option<u32>,
}

impl TransferArgs {
    /// The budget, reporting to `metrics`.
    fn budget(&self, metrics: &crate::metrics::Metrics) -> TransferBudget {
        let max = match self.max_concurrent_transfers {
            Some(max) => max as usize,
            None => {
                let limit = budget::container_memory_limit();
                let max = budget::transfers_for(limit);
                tracing::info!(memory_limit = limit, max, "transfers at once, for the memory limit");
                max
            }
        };
        TransferBudget::with_metrics(max, metrics.transfers.clone())
    }
}

#[derive(Args, Debug)]
pub struct ApiServerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub transfers: TransferArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Serve objects of one namespace only (default: all).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Address of the operations endpoint: /metrics, /healthz, /readyz (ready once the watch cache is filled).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: std::net::SocketAddr,
    /// Name of this replica, recorded as the holder of the uploads it receives (default: the Pod's name, else
    /// the host's).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
}

#[derive(Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub transfers: TransferArgs,
    /// Largest accepted size, e.g. 1GiB, 512MiB, 1000000.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub max_size: u64,
    /// Objects reconciled at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u16,
    /// Watch one namespace only (default: all).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Directory that file:// sources may read from; without it file:// sources are refused, because the
    /// controller's filesystem is not its users'.
    #[arg(long)]
    pub allow_files_under: Option<PathBuf>,
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Name of this instance in Events and as the Lease holder (default: the Pod's name, else the host's).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// Take part in leader election, so that of several replicas only one reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "bitsmith-controller")]
    pub leader_election_id: String,
    /// How long the Lease stays with a leader that stopped renewing it: another replica takes over after this.
    #[arg(long, default_value = "15s", value_parser = parse_timeout)]
    pub leader_election_lease_duration: std::time::Duration,
    /// A leader that could not renew the Lease for this long stops at once (shorter than the lease duration, so
    /// that it has stopped before another replica may start).
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub leader_election_renew_deadline: std::time::Duration,
    /// How often the leader renews the Lease and followers try to take it.
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    pub leader_election_retry_period: std::time::Duration,
    /// Address of the operations endpoint: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: std::net::SocketAddr,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// How long objects and blobs are kept, and how the store is checked.
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// How often the leader checks that every READY (STAGED) object's blob is in the store with its recorded
    /// size; one that is not is fetched again (with a source) or FAILED (uploaded). Also at the start of leading.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub audit_interval: std::time::Duration,
    /// Every this long, the leader reads and hashes every READY (STAGED) object's blob again, in transfer
    /// slots like fetches; one whose sha256 is not the recorded one is handled like a missing one (default: never).
    #[arg(long, value_parser = parse_timeout)]
    pub verify_interval: Option<std::time::Duration>,
    /// Blobs whose object no longer exists, and staged writes nobody finished, are removed once this old.
    #[arg(long, default_value = "1h", value_parser = parse_timeout)]
    pub orphan_grace: std::time::Duration,
    /// READY or FAILED Packages kept per app (`spec.appRef`) in a namespace; older ones become EXPIRED and lose
    /// their bits. The annotation `bitsmith.dev/retain: "true"` exempts one.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_retained_packages_per_app: u32,
    /// STAGED or FAILED Droplets kept per app, likewise.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_retained_droplets_per_app: u32,
    /// Packages and Droplets awaiting an upload this long after their creation become EXPIRED (default: never).
    #[arg(long, value_parser = parse_timeout)]
    pub expire_awaiting_upload_after: Option<std::time::Duration>,
}

impl RetentionArgs {
    fn packages(&self) -> Retention {
        Retention {
            keep: self.max_retained_packages_per_app as usize,
            awaiting_upload: self.expire_awaiting_upload_after,
        }
    }

    fn droplets(&self) -> Retention {
        Retention {
            keep: self.max_retained_droplets_per_app as usize,
            awaiting_upload: self.expire_awaiting_upload_after,
        }
    }
}

/// What sources may reach: Package authors choose their sources, and the connections are the controller's.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// An address range sources may not connect to, checked on the addresses a name resolves to, on top of
    /// loopback, link-local and cloud metadata addresses; repeatable (e.g. the cluster's Pod and Service ranges).
    #[arg(long = "deny-source-cidr", value_name = "CIDR")]
    pub deny: Vec<IpNet>,
    /// An address range sources may connect to although it is denied by default (loopback, link-local);
    /// --deny-source-cidr still wins. Repeatable.
    #[arg(long = "allow-source-cidr", value_name = "CIDR")]
    pub allow: Vec<IpNet>,
    /// Let object-store sources use the controller's own cloud identity (credentials=ambient in a source URL).
    #[arg(long)]
    pub allow_ambient_source_credentials: bool,
}

impl SourceArgs {
    pub fn policy(&self, file_root: Option<PathBuf>) -> SourcePolicy {
        SourcePolicy {
            file_root,
            egress: std::sync::Arc::new(Egress::new(self.allow.clone(), self.deny.clone())),
            options: OptionPolicy { allow_ambient_credentials: self.allow_ambient_source_credentials },
        }
    }
}

/// Where blobs are kept.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Store URL: file:///dir (or a plain directory), s3://bucket/prefix, gs://bucket/prefix,
    /// az://container/prefix, memory://. Settings may ride along as query parameters,
    /// e.g. s3://b/p?endpoint=http://127.0.0.1:3900&path_style=true.
    #[arg(long, env = "BITSMITH_STORE", default_value = ".bitsmith/store")]
    pub store: String,
    /// A store setting KEY=VALUE (object_store keys such as aws_region, aws_access_key_id); repeatable.
    #[arg(long = "store-opt", value_parser = parse_key_value)]
    pub store_opts: Vec<(String, String)>,
}

impl StoreArgs {
    pub fn open(&self) -> Result<BlobStore, String> {
        let url = if self.store.contains("://") {
            self.store.clone()
        } else {
            let dir = std::path::absolute(&self.store).map_err(|e| format!("store directory {}: {e}", self.store))?;
            std::fs::create_dir_all(&dir).map_err(|e| format!("store directory {}: {e}", dir.display()))?;
            url::Url::from_directory_path(&dir)
                .map_err(|()| format!("store directory {}: not absolute", dir.display()))?
                .to_string()
        };
        let options: BTreeMap<String, String> = self.store_opts.iter().cloned().collect();
        BlobStore::open(&url, &options).map_err(|e| error_chain(&e))
    }

    /// Open the store, refusing size limits (flag, bytes) that it could not honour: a fetch or upload over what
    /// the store can commit would otherwise fail only at its very end.
    pub fn open_for(&self, limits: &[(&str, u64)]) -> Result<BlobStore, String> {
        let store = self.open()?;
        if let Some(largest) = store.largest_blob()
            && let Some((flag, size)) = limits.iter().find(|(_, size)| *size > largest)
        {
            return Err(format!(
                "{flag} {size} is over the {largest} bytes a blob can have in {}: lower it",
                store.url()
            ));
        }
        Ok(store)
    }
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Manifest files (multi-document YAML); `-` reads standard input. Repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Largest accepted size, e.g. 1GiB, 512MiB, 1000000.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub max_size: u64,
    /// Namespace for manifests that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Directory that file:// sources may read from (default: anywhere this user can read).
    #[arg(long, default_value = "/")]
    pub allow_files_under: PathBuf,
    #[command(flatten)]
    pub sources: SourceArgs,
}

/// Parse a byte size with an optional binary (KiB, MiB, GiB, TiB) or decimal (K, M, G, T) suffix.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size like 1GiB or 1000000"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB, TiB, K, M, G or T)"));
        }
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parse a positive duration such as 30s, 2m or 500ms.
pub(crate) fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be more than zero".into()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(format!("{text:?} is not a duration like 30s or 2m: {e}")),
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// Run the command line; the error is one readable line.
pub async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Crd { out_dir: None } => {
            print!("{}", crate::crd::all_yaml());
            Ok(())
        }
        Command::Crd { out_dir: Some(dir) } => {
            crate::crd::write_dir(&dir).map_err(|e| format!("writing CRDs to {}: {e}", dir.display()))
        }
        Command::Fetch(args) => fetch(args).await,
        Command::Controller(args) => controller(*args).await,
        Command::Api(args) => api(*args).await,
        Command::Push(args) => crate::plugin::push(args).await.map_err(|e| e.to_string()),
        Command::Download(args) => crate::plugin::download(args).await.map_err(|e| e.to_string()),
        Command::Wait(args) => crate::plugin::wait(args).await.map_err(|e| e.to_string()),
    }
}

async fn connect() -> Result<kube::Client, String> {
    let failed = |e: &(dyn std::error::Error + 'static)| format!("connecting to Kubernetes: {}", error_chain(e));
    let mut config = kube::Config::infer().await.map_err(|e| failed(&e))?;
    // Every call ends when the API server sends nothing for this long (connecting has its own 30 s): watches ask
    // the server to end them within 290 s, so only a call to a server that stopped answering runs into it.
    config.read_timeout = Some(std::time::Duration::from_secs(300));
    config.reset_reader_on_write = true;
    crate::kube_client::client(config).map_err(|e| failed(&e))
}

/// The API's bound addresses, and what was read for them at start.
struct ApiListeners {
    main: tokio::net::TcpListener,
    /// `--offload-listen`.
    offload: Option<tokio::net::TcpListener>,
    /// `--offload-client-ca`.
    offload_client_ca: Option<crate::api::tls::ClientCa>,
}

/// Bind the API's addresses and read its TLS files, so that mistakes in them fail at start.
async fn bind_api(args: &ApiArgs) -> Result<Option<ApiListeners>, String> {
    let Some(addr) = args.listen else { return Ok(None) };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        crate::api::tls::server_config(cert, key, None).map_err(|e| e.to_string())?;
    }
    if args.upload_spool_dir.is_some() && args.offload_listen.is_none() && args.offload_client_ca.is_none() {
        return Err("--upload-spool-dir needs --offload-listen or --offload-client-ca: only the upload-offloading \
                    proxy may name spooled files"
            .into());
    }
    let offload_client_ca = match &args.offload_client_ca {
        Some(ca) => {
            Some(crate::api::tls::ClientCa::from_pem_file(ca).map_err(|e| format!("--offload-client-ca: {e}"))?)
        }
        None => None,
    };
    let main = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--listen {addr}: {e}"))?;
    let offload = match args.offload_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--offload-listen {addr}: {e}"))?)
        }
        None => None,
    };
    Ok(Some(ApiListeners { main, offload, offload_client_ca }))
}

/// What the parts of one process share.
struct Process<'a> {
    client: &'a kube::Client,
    ops: &'a crate::ops::Ops,
    /// This replica's name.
    instance: &'a str,
}

/// The upload tokens' signer: the key of --upload-token-key-file, or a random one for this replica alone.
fn upload_tokens(args: &ApiArgs) -> Result<crate::api::upload_token::UploadTokens, String> {
    use crate::api::upload_token::{MIN_KEY_LEN, UploadTokens};
    let Some(path) = &args.upload_token_key_file else {
        tracing::info!("upload tokens are signed with a key of this replica: give replicas --upload-token-key-file");
        return Ok(UploadTokens::random(args.upload_token_ttl));
    };
    let key = std::fs::read(path).map_err(|e| format!("--upload-token-key-file {}: {e}", path.display()))?;
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "--upload-token-key-file {}: {} bytes, fewer than {MIN_KEY_LEN}",
            path.display(),
            key.len()
        ));
    }
    Ok(UploadTokens::new(&key, args.upload_token_ttl))
}

/// Start serving the API, once its watch cache is filled. Over TLS, the cluster's front proxy (when it has one)
/// may present its client certificate, so that users reach the API through aggregation too.
async fn start_api(
    process: &Process<'_>,
    store: BlobStore,
    transfers: TransferBudget,
    namespace: Option<&str>,
    args: &ApiArgs,
    listeners: ApiListeners,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, String> {
    let Process { client, ops, instance } = *process;
    let mut config = crate::api::ApiConfig::new(args.urls().expect("an external URL: --listen is set"));
    config.max_upload_size = args.max_upload_size;
    config.max_package_size = args.max_package_size;
    config.max_zip_entries = args.max_zip_entries;
    config.spool_dir = args.upload_spool_dir.clone();
    config.limits = crate::api::Limits {
        header_read_timeout: args.header_read_timeout,
        body_idle_timeout: args.body_idle_timeout,
        max_header_size: usize::try_from(args.max_header_size).unwrap_or(usize::MAX),
        shutdown_grace: args.shutdown_grace,
    };
    config.offload_client_ca = listeners.offload_client_ca;
    config.resource_cache_scope = args.resource_cache_scope;
    config.instance = instance.to_string();
    config.upload_claim_timeout = args.upload_claim_timeout;
    config.transfers = transfers;
    config.upload_tokens = std::sync::Arc::new(upload_tokens(args)?);
    let (tls, front_proxy) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let front_proxy = match crate::api::FrontProxy::from_cluster(client).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(%error, "no front proxy: the API is reachable directly only");
                    None
                }
            };
            // Certificates from either CA get through the handshake; each request learns which one vouched.
            let cas: Vec<_> = front_proxy.iter().map(|p| p.ca()).chain(config.offload_client_ca.iter()).collect();
            let verifier = if cas.is_empty() {
                None
            } else {
                Some(crate::api::tls::client_verifier(&cas).map_err(|e| e.to_string())?)
            };
            (Some(crate::api::tls::server_config(cert, key, verifier).map_err(|e| e.to_string())?), front_proxy)
        }
        _ => (None, None),
    };
    let index = crate::api::Index::start(client, namespace);
    let state =
        crate::api::AppState::new(client.clone(), store, index.clone(), config, ops.metrics.clone(), front_proxy);
    let ready = ops.ready.clone();
    Ok(tokio::spawn(async move {
        index.ready().await;
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut endpoints = vec![crate::api::Endpoint { listener: listeners.main, tls: tls.clone(), offload: false }];
        if let Some(listener) = listeners.offload {
            endpoints.push(crate::api::Endpoint { listener, tls: tls.clone(), offload: true });
        }
        for endpoint in &endpoints {
            tracing::info!(
                listen = %endpoint.listener.local_addr()?,
                tls = tls.is_some(),
                offload = endpoint.offload,
                "CF v3 API serving"
            );
        }
        crate::api::serve_endpoints(endpoints, state, shutdown_signal()).await;
        Ok(())
    }))
}

/// Turn unready at the shutdown signal, before anything stops, so that no new request is routed here.
async fn unready_on_shutdown(ready: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    shutdown_signal().await;
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("shutting down: unready");
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn api(args: ApiServerArgs) -> Result<(), String> {
    let listeners = bind_api(&args.api).await?.ok_or("--listen is required")?;
    let ops = serve_ops(args.metrics_listen).await?;
    let client = connect().await?;
    let store = args.store.open_for(&args.api.size_limits())?;
    let instance = identity(args.instance);
    let transfers = args.transfers.budget(&ops.metrics);
    let namespace = args.namespace.as_deref();
    let process = Process { client: &client, ops: &ops, instance: &instance };
    let served = start_api(&process, store, transfers, namespace, &args.api, listeners).await?;
    tokio::spawn(unready_on_shutdown(ops.ready.clone()));
    match served.await {
        Ok(result) => result.map_err(|e| format!("serving the API: {e}")),
        Err(e) => Err(format!("the API stopped: {e}")),
    }
}

/// Serve /metrics, /healthz and /readyz on `addr`; not ready until the caller says so.
async fn serve_ops(addr: std::net::SocketAddr) -> Result<crate::ops::Ops, String> {
    let ops = crate::ops::Ops { metrics: Default::default(), ready: Default::default() };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    tokio::spawn(crate::ops::serve(listener, ops.clone()));
    Ok(ops)
}

/// This replica's name: as given (the Pod's name), else the host's with a random suffix.
fn identity(instance: Option<String>) -> String {
    instance.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), &uuid::Uuid::new_v4().simple().to_string()[..8])
    })
}

async fn controller(args: ControllerArgs) -> Result<(), String> {
    let ops = serve_ops(args.metrics_listen).await?;
    let api = bind_api(&args.api).await?;
    let client = connect().await?;
    let limits = [&[("--max-size", args.max_size)][..], &args.api.size_limits()].concat();
    let policy = args.sources.policy(args.allow_files_under);
    let transfers = args.transfers.budget(&ops.metrics);
    let fetcher = Fetcher::new(args.store.open_for(&limits)?, policy, args.max_size)
        .map_err(|e| e.to_string())?
        .with_budget(transfers.clone());
    let identity = identity(args.instance);
    // Every replica serves the API; only the leader reconciles.
    let api = match api {
        Some(listeners) => {
            let namespace = args.namespace.as_deref();
            let store = fetcher.store.clone();
            let process = Process { client: &client, ops: &ops, instance: &identity };
            Some(start_api(&process, store, transfers, namespace, &args.api, listeners).await?)
        }
        None => None,
    };
    tokio::spawn(unready_on_shutdown(ops.ready.clone()));
    let reporter = kube::runtime::events::Reporter { controller: "bitsmith".into(), instance: Some(identity.clone()) };
    let options = crate::controller::Options {
        concurrency: args.concurrency,
        namespace: args.namespace,
        reporter,
        metrics: ops.metrics.clone(),
        urls: args.api.urls(),
        upload_claim_timeout: args.api.upload_claim_timeout,
        package_retention: args.retention.packages(),
        droplet_retention: args.retention.droplets(),
        audit: crate::controller::AuditOptions {
            interval: args.retention.audit_interval,
            orphan_grace: args.retention.orphan_grace,
            verify_every: args.retention.verify_interval,
        },
    };
    tracing::info!(store = fetcher.store.url(), identity, "controller starting");
    let mut lease = LeaseConfig::new(args.leader_election_namespace, args.leader_election_id, identity);
    lease.duration = args.leader_election_lease_duration;
    lease.renew_deadline = args.leader_election_renew_deadline;
    lease.retry_every = args.leader_election_retry_period;
    lease.check().map_err(|e| format!("--leader-election-*: {e}"))?;
    // Connected and the store opened: ready, as a leader or as a follower waiting to take over. A replica that
    // serves the API is ready only once the API's watch cache is filled, which the API says itself.
    if api.is_none() {
        ops.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if args.leader_elect {
        // A leader that loses the Lease (the API server was away longer than the renew deadline, or the process
        // was frozen) stops reconciling and becomes a follower again; the API it serves carries on meanwhile.
        let mut shutdown = std::pin::pin!(shutdown_signal());
        loop {
            let work =
                |leadership| crate::controller::run(client.clone(), fetcher.clone(), options.clone(), leadership);
            match run_as_leader(client.clone(), lease.clone(), &mut shutdown, work).await {
                Ok(_) => break,
                Err(error) => tracing::warn!(%error, "stopped reconciling; following until the lease is free again"),
            }
        }
    } else {
        crate::controller::run(client, fetcher, options, Leadership::always()).await;
    }
    // The API stops on the same signal and finishes its requests within the grace; wait for it.
    if let Some(api) = api {
        match api.await {
            Ok(served) => served.map_err(|e| format!("serving the API: {e}"))?,
            Err(e) => return Err(format!("the API stopped: {e}")),
        }
    }
    Ok(())
}

async fn fetch(args: FetchArgs) -> Result<(), String> {
    let mut manifests = Vec::new();
    for file in &args.files {
        let (text, origin) = if file.as_os_str() == "-" {
            (
                std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading standard input: {e}"))?,
                "-".to_string(),
            )
        } else {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            (text, file.display().to_string())
        };
        manifests.extend(offline::parse_manifests(&text, &origin).map_err(|e| e.to_string())?);
    }
    let fetcher = Fetcher::new(
        args.store.open_for(&[("--max-size", args.max_size)])?,
        args.sources.policy(Some(args.allow_files_under.clone())),
        args.max_size,
    )
    .map_err(|e| e.to_string())?;
    let results = offline::run(manifests, &fetcher, &args.namespace).await.map_err(|e| error_chain(&e))?;
    print!("{}", offline::to_yaml(&results).map_err(|e| format!("printing results: {e}"))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::DEFAULT_MAX_SIZE;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(DEFAULT_MAX_SIZE, parse_size("1GiB").unwrap());
    }
}
