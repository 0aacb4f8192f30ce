//! Object URLs (`s3://`, `gs://`, `az://`, `file://`, `memory://`) turned into `object_store` clients.
//!
//! Both the blob store and object-store sources connect through here, so that both read options the same way
//! and neither ever falls back to a cloud metadata server by surprise: credentials must be configured, or the
//! caller asks for anonymous or ambient (instance metadata) access explicitly.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::client::DnsResolver;
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt};
use url::Url;

/// Bytes per ranged GET when streaming an object; with [`READ_CONCURRENCY`] this bounds read memory.
pub const READ_RANGE: u64 = 4 << 20;
/// Ranged GETs in flight while streaming an object.
pub const READ_CONCURRENCY: usize = 4;

/// The storage services an object URL can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    S3,
    Gcs,
    Azure,
    File,
    Memory,
}

impl Scheme {
    pub fn of(url: &Url) -> Option<Scheme> {
        Some(match url.scheme() {
            "s3" | "s3a" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" | "abfs" | "abfss" | "azure" => Scheme::Azure,
            "file" => Scheme::File,
            "memory" => Scheme::Memory,
            _ => return None,
        })
    }

    /// Whether the backend can hand out presigned URLs.
    pub fn signs_urls(self) -> bool {
        matches!(self, Scheme::S3 | Scheme::Gcs | Scheme::Azure)
    }
}

/// Where credentials may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialPolicy {
    /// Credentials must be among the options (or the environment, for [`CredentialPolicy::OptionsOrEnvironment`]).
    Options,
    /// Like `Options`, and the process environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`) counts too.
    OptionsOrEnvironment,
    /// Unsigned requests: public objects only.
    Anonymous,
}

/// A connected object store and the path an object URL named inside it.
#[derive(Clone)]
pub struct ObjectClient {
    pub store: Arc<dyn ObjectStore>,
    pub signer: Option<Arc<dyn Signer>>,
    /// The backend's multipart uploads by id, on object stores: what lets a write be resumed or aborted later.
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// The filesystem backend itself, on `file://`: what maps a key to a file.
    pub local: Option<Arc<LocalFileSystem>>,
    /// The path in the URL (a key for an object, a prefix for a store).
    pub path: Path,
    pub scheme: Scheme,
    /// The URL without query (which may carry settings) or credentials: safe to show.
    pub display_url: String,
}

impl std::fmt::Debug for ObjectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectClient")
            .field("store", &self.store)
            .field("path", &self.path)
            .field("display_url", &self.display_url)
            .finish_non_exhaustive()
    }
}

/// Why an object URL could not be turned into a client.
#[derive(Debug, thiserror::Error)]
pub enum ObjectUrlError {
    #[error("malformed object URL {url:?}: {reason}")]
    Malformed { url: String, reason: String },
    #[error("unsupported object URL scheme {scheme:?} in {url:?}: use s3://, gs://, az://, file:// or memory://")]
    UnsupportedScheme { scheme: String, url: String },
    #[error("unknown {scheme:?} option {key:?}")]
    UnknownOption { scheme: Scheme, key: String },
    #[error("missing credentials for {url}: {hint}")]
    MissingCredentials { url: String, hint: &'static str },
    #[error("cannot configure {url}: {source}")]
    Configure {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// Parse `url` and connect to its store with `options` (object_store configuration keys, e.g. `aws_region`,
/// plus `endpoint`, `region`, and `path_style`). URL query parameters count as options too, and
/// `credentials=ambient` in them or in `options` allows the cloud's own credential chain (instance metadata).
///
/// `resolver`, when given, resolves every name the client connects to (sources pass one that enforces where
/// they may connect; the store, configured by the installer, passes none).
pub fn connect(
    url: &str,
    options: &BTreeMap<String, String>,
    policy: CredentialPolicy,
    resolver: Option<Arc<dyn DnsResolver>>,
) -> Result<ObjectClient, ObjectUrlError> {
    let parsed = Url::parse(url).map_err(|e| malformed(url, e.to_string()))?;
    let scheme = Scheme::of(&parsed).ok_or_else(|| ObjectUrlError::UnsupportedScheme {
        scheme: parsed.scheme().to_string(),
        url: url.to_string(),
    })?;
    let mut opts: BTreeMap<String, String> =
        parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    opts.extend(options.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    let ambient = opts.remove("credentials").map(|v| v == "ambient").unwrap_or(false);
    let mut display = parsed.clone();
    display.set_query(None);
    let _ = display.set_password(None);
    let _ = display.set_username("");
    let display_url = display.to_string().trim_end_matches('/').to_string();
    let decoded_path = percent_decode(parsed.path());

    let mut client = client_options();
    if let Some(resolver) = resolver {
        client = client.with_dns_resolver(resolver);
    }
    type Parts = (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>, Option<Arc<dyn MultipartStore>>, Path);
    let mut local = None;
    let (store, signer, multipart, path): Parts = match scheme {
        Scheme::File => {
            if parsed.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(malformed(url, "file URLs name a local path: file:///path".into()));
            }
            let fs = Arc::new(LocalFileSystem::new().with_fsync(true).with_automatic_cleanup(true));
            local = Some(fs.clone());
            (fs, None, None, Path::from(decoded_path.trim_start_matches('/')))
        }
        Scheme::Memory => (Arc::new(InMemory::new()), None, None, path_of(url, &decoded_path)?),
        Scheme::S3 => {
            let s3 = cloud::<AmazonS3Builder>(url, &parsed, s3_aliases(opts), policy, ambient, client)?;
            (s3.clone(), Some(s3.clone()), Some(s3), path_of(url, &decoded_path)?)
        }
        Scheme::Gcs => {
            let gcs = cloud::<GoogleCloudStorageBuilder>(url, &parsed, gcs_aliases(opts), policy, ambient, client)?;
            (gcs.clone(), Some(gcs.clone()), Some(gcs), path_of(url, &decoded_path)?)
        }
        Scheme::Azure => {
            let opts = allow_plain_http(opts, &["endpoint", "azure_storage_endpoint", "azure_endpoint"]);
            let az = cloud::<MicrosoftAzureBuilder>(url, &parsed, opts, policy, ambient, client)?;
            (az.clone(), Some(az.clone()), Some(az), path_of(url, &decoded_path)?)
        }
    };
    Ok(ObjectClient { store, signer, multipart, local, path, scheme, display_url })
}

fn malformed(url: &str, reason: String) -> ObjectUrlError {
    ObjectUrlError::Malformed { url: url.to_string(), reason }
}

fn percent_decode(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()
}

fn path_of(url: &str, decoded: &str) -> Result<Path, ObjectUrlError> {
    Path::parse(decoded.trim_matches('/')).map_err(|e| malformed(url, e.to_string()))
}

fn bucket(url: &str, parsed: &Url) -> Result<String, ObjectUrlError> {
    match parsed.host_str() {
        Some(b) if !b.is_empty() => Ok(b.to_string()),
        _ => Err(malformed(url, "the URL names no bucket or container".into())),
    }
}

/// Client settings for every cloud backend: each request is bounded, and streams are read as ranged requests,
/// so a per-request timeout never cuts a large object short.
fn client_options() -> ClientOptions {
    ClientOptions::new().with_connect_timeout(Duration::from_secs(10)).with_timeout(Duration::from_secs(120))
}

/// What differs between the cloud backends; [`cloud`] does the rest the same way for all three.
trait CloudBuilder: Sized {
    type Key: std::str::FromStr + Clone;
    type Store: ObjectStore + Signer + MultipartStore;
    const SCHEME: Scheme;
    /// Environment variables with this prefix configure the store (for [`CredentialPolicy::OptionsOrEnvironment`]).
    const ENV_PREFIX: &'static str;
    /// The option that turns off request signing.
    const SKIP_SIGNATURE: &'static str;
    /// What to set when credentials are missing.
    const HINT: &'static str;
    fn new(bucket: String, client: ClientOptions) -> Self;
    fn with(self, key: Self::Key, value: String) -> Self;
    /// Whether setting `key` provides credentials (or explicitly waives them).
    fn provides_credentials(key: &Self::Key) -> bool;
    fn build(self) -> object_store::Result<Self::Store>;
}

impl CloudBuilder for AmazonS3Builder {
    type Key = AmazonS3ConfigKey;
    type Store = object_store::aws::AmazonS3;
    const SCHEME: Scheme = Scheme::S3;
    const ENV_PREFIX: &'static str = "AWS_";
    const SKIP_SIGNATURE: &'static str = "aws_skip_signature";
    const HINT: &'static str = "set aws_access_key_id and aws_secret_access_key (or AWS_* variables for the \
                                store), or credentials=ambient to use the instance's role";
    fn new(bucket: String, client: ClientOptions) -> Self {
        AmazonS3Builder::new().with_bucket_name(bucket).with_region("us-east-1").with_client_options(client)
    }
    fn with(self, key: Self::Key, value: String) -> Self {
        self.with_config(key, value)
    }
    fn provides_credentials(key: &Self::Key) -> bool {
        use AmazonS3ConfigKey as K;
        matches!(
            key,
            K::AccessKeyId
                | K::WebIdentityTokenFile
                | K::ContainerCredentialsRelativeUri
                | K::ContainerCredentialsFullUri
                | K::SkipSignature
                | K::MetadataEndpoint
        )
    }
    fn build(self) -> object_store::Result<Self::Store> {
        AmazonS3Builder::build(self)
    }
}

impl CloudBuilder for GoogleCloudStorageBuilder {
    type Key = GoogleConfigKey;
    type Store = object_store::gcp::GoogleCloudStorage;
    const SCHEME: Scheme = Scheme::Gcs;
    const ENV_PREFIX: &'static str = "GOOGLE_";
    const SKIP_SIGNATURE: &'static str = "google_skip_signature";
    const HINT: &'static str = "set google_service_account_key (or GOOGLE_* variables for the store), or \
                                credentials=ambient to use the workload's identity";
    fn new(bucket: String, client: ClientOptions) -> Self {
        GoogleCloudStorageBuilder::new().with_bucket_name(bucket).with_client_options(client)
    }
    fn with(self, key: Self::Key, value: String) -> Self {
        self.with_config(key, value)
    }
    fn provides_credentials(key: &Self::Key) -> bool {
        use GoogleConfigKey as K;
        matches!(
            key,
            K::ServiceAccount | K::ServiceAccountKey | K::ApplicationCredentials | K::BearerToken | K::SkipSignature
        )
    }
    fn build(self) -> object_store::Result<Self::Store> {
        GoogleCloudStorageBuilder::build(self)
    }
}

impl CloudBuilder for MicrosoftAzureBuilder {
    type Key = AzureConfigKey;
    type Store = object_store::azure::MicrosoftAzure;
    const SCHEME: Scheme = Scheme::Azure;
    const ENV_PREFIX: &'static str = "AZURE_";
    const SKIP_SIGNATURE: &'static str = "azure_skip_signature";
    const HINT: &'static str = "set azure_storage_account_name with azure_storage_account_key or \
                                azure_storage_sas_key (or AZURE_* variables for the store), or \
                                credentials=ambient to use a managed identity";
    fn new(container: String, client: ClientOptions) -> Self {
        MicrosoftAzureBuilder::new().with_container_name(container).with_client_options(client)
    }
    fn with(self, key: Self::Key, value: String) -> Self {
        self.with_config(key, value)
    }
    fn provides_credentials(key: &Self::Key) -> bool {
        use AzureConfigKey as K;
        matches!(
            key,
            K::AccessKey
                | K::SasKey
                | K::Token
                | K::ClientSecret
                | K::FederatedTokenFile
                | K::UseAzureCli
                | K::UseEmulator
                | K::SkipSignature
        )
    }
    fn build(self) -> object_store::Result<Self::Store> {
        MicrosoftAzureBuilder::build(self)
    }
}

/// Build a cloud client: options go through the backend's own key parser (so its aliases work and typos are
/// reported), and a client without credentials is refused unless anonymous or ambient access was asked for.
fn cloud<B: CloudBuilder>(
    url: &str,
    parsed: &Url,
    mut opts: BTreeMap<String, String>,
    policy: CredentialPolicy,
    ambient: bool,
    client: ClientOptions,
) -> Result<Arc<B::Store>, ObjectUrlError> {
    if policy == CredentialPolicy::OptionsOrEnvironment {
        for (key, value) in std::env::vars().filter(|(k, _)| k.starts_with(B::ENV_PREFIX)) {
            let key = key.to_ascii_lowercase();
            if key.parse::<B::Key>().is_ok() {
                opts.entry(key).or_insert(value);
            }
        }
    }
    if policy == CredentialPolicy::Anonymous {
        opts.insert(B::SKIP_SIGNATURE.into(), "true".into());
    }
    let mut builder = B::new(bucket(url, parsed)?, client);
    let mut has_credentials = false;
    for (key, value) in opts {
        let parsed: B::Key = key.parse().map_err(|_| ObjectUrlError::UnknownOption { scheme: B::SCHEME, key })?;
        has_credentials |= B::provides_credentials(&parsed);
        builder = builder.with(parsed, value);
    }
    if !has_credentials && !ambient {
        return Err(ObjectUrlError::MissingCredentials { url: url.to_string(), hint: B::HINT });
    }
    let store = builder.build().map_err(|source| ObjectUrlError::Configure { url: url.to_string(), source })?;
    Ok(Arc::new(store))
}

/// S3 settings with no object_store key of their own: `path_style`.
fn s3_aliases(mut opts: BTreeMap<String, String>) -> BTreeMap<String, String> {
    if let Some(path_style) = opts.remove("path_style") {
        opts.insert("aws_virtual_hosted_style_request".into(), (path_style != "true").to_string());
    }
    allow_plain_http(opts, &["endpoint", "aws_endpoint", "aws_endpoint_url"])
}

/// GCS settings with no object_store key of their own: `endpoint`, which GCS calls its base URL.
fn gcs_aliases(mut opts: BTreeMap<String, String>) -> BTreeMap<String, String> {
    if let Some(endpoint) = opts.remove("endpoint") {
        opts.entry("google_base_url".into()).or_insert(endpoint);
    }
    allow_plain_http(opts, &["google_base_url", "base_url"])
}

/// An `http://` endpoint (a server in the cluster or on loopback) is taken as asking for plain http, which the
/// backends otherwise refuse until `allow_http` is set as well.
fn allow_plain_http(mut opts: BTreeMap<String, String>, endpoint_keys: &[&str]) -> BTreeMap<String, String> {
    if endpoint_keys.iter().any(|k| opts.get(*k).is_some_and(|e| e.starts_with("http://"))) {
        opts.entry("allow_http".into()).or_insert_with(|| "true".into());
    }
    opts
}

/// `range` cut into the [`READ_RANGE`]-long pieces a stream reads one at a time, in order.
pub fn read_ranges(range: Range<u64>) -> impl Iterator<Item = Range<u64>> + Send + 'static {
    let end = range.end;
    (range.start..end).step_by(READ_RANGE as usize).map(move |start| start..(start + READ_RANGE).min(end))
}

/// Stream the bytes `range` of an object as ranged GETs, [`READ_CONCURRENCY`] at a time, in order. Ranged reads keep
/// each request short (so timeouts and retries work per range) and are much faster than one streaming GET on
/// the local filesystem.
pub fn ranged_stream(
    store: Arc<dyn ObjectStore>,
    path: Path,
    range: Range<u64>,
) -> BoxStream<'static, Result<Bytes, object_store::Error>> {
    stream::iter(read_ranges(range))
        .map(move |range: Range<u64>| {
            let store = store.clone();
            let path = path.clone();
            async move { store.get_range(&path, range).await }
        })
        .buffered(READ_CONCURRENCY)
        .try_filter(|b| futures::future::ready(!b.is_empty()))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    #[test]
    fn rejects_unknown_schemes_and_missing_buckets() {
        assert!(matches!(
            connect("ftp://host/x", &none(), CredentialPolicy::Options, None),
            Err(ObjectUrlError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            connect("not a url", &none(), CredentialPolicy::Options, None),
            Err(ObjectUrlError::Malformed { .. })
        ));
        assert!(matches!(
            connect("s3:///key", &none(), CredentialPolicy::Anonymous, None),
            Err(ObjectUrlError::Malformed { .. })
        ));
    }

    #[test]
    fn cloud_urls_need_credentials_unless_anonymous_or_ambient() {
        for url in ["s3://b/k", "gs://b/k", "az://c/k?azure_storage_account_name=acct"] {
            let err = connect(url, &none(), CredentialPolicy::Options, None).unwrap_err();
            assert!(matches!(err, ObjectUrlError::MissingCredentials { .. }), "{url}: {err}");
            let anonymous = connect(url, &none(), CredentialPolicy::Anonymous, None);
            assert!(anonymous.is_ok(), "{url}: {:?}", anonymous.err());
        }
        let ambient =
            connect("s3://b/k?credentials=ambient&region=eu-west-1", &none(), CredentialPolicy::Options, None);
        assert!(ambient.is_ok());
    }

    #[test]
    fn options_are_checked_and_query_is_hidden() {
        let mut opts = none();
        opts.insert("aws_access_key_id".into(), "AK".into());
        opts.insert("aws_secret_access_key".into(), "SK".into());
        let client = connect(
            "s3://bucket/some/prefix?endpoint=http://127.0.0.1:9&path_style=true",
            &opts,
            CredentialPolicy::Options,
            None,
        )
        .unwrap();
        assert_eq!(client.display_url, "s3://bucket/some/prefix");
        assert_eq!(client.path.as_ref(), "some/prefix");
        assert_eq!(client.scheme, Scheme::S3);
        opts.insert("aws_no_such_thing".into(), "1".into());
        assert!(matches!(
            connect("s3://bucket/p", &opts, CredentialPolicy::Options, None),
            Err(ObjectUrlError::UnknownOption { .. })
        ));
    }

    #[test]
    fn file_urls_map_to_local_paths() {
        let client = connect("file:///tmp/some%20dir/app.zip", &none(), CredentialPolicy::Options, None).unwrap();
        assert_eq!(client.path.as_ref(), "tmp/some dir/app.zip");
        assert!(connect("file://otherhost/x", &none(), CredentialPolicy::Options, None).is_err());
    }
}
