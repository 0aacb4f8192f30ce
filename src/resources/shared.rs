//! Spec and status pieces that Package and Droplet share.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the bits come from. Exactly one of `http`, `objectStore` or `package` is set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = exactly_one_source)]
pub struct Source {
    /// Download the bits from an http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// Read the bits from an object in S3, GCS, Azure Blob Storage or a local directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreSource>,
    /// Copy the bits of another Package in the same namespace (it must be READY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageSourceRef>,
}

/// Which variant a [`Source`] holds, once validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SourceKind<'a> {
    Http(&'a HttpSource),
    ObjectStore(&'a ObjectStoreSource),
    Package(&'a PackageSourceRef),
}

impl Source {
    /// The Secret this source takes credentials from, if any.
    pub fn secret_name(&self) -> Option<&str> {
        let http = self.http.as_ref().and_then(|h| h.secret_ref.as_ref());
        let object = self.object_store.as_ref().and_then(|o| o.secret_ref.as_ref());
        http.or(object).map(|r| r.name.as_str())
    }

    /// The one source variant that is set, or `None` when zero or several are.
    pub fn kind(&self) -> Option<SourceKind<'_>> {
        match (&self.http, &self.object_store, &self.package) {
            (Some(h), None, None) => Some(SourceKind::Http(h)),
            (None, Some(o), None) => Some(SourceKind::ObjectStore(o)),
            (None, None, Some(p)) => Some(SourceKind::Package(p)),
            _ => None,
        }
    }
}

/// Structural schemas allow `oneOf` with `required` only: enough for the apiserver to reject a source with
/// zero or two variants, without CEL (which Kubernetes 1.20 lacks).
fn exactly_one_source(schema: &mut schemars::Schema) {
    schema.insert(
        "oneOf".into(),
        serde_json::json!([
            {"required": ["http"]},
            {"required": ["objectStore"]},
            {"required": ["package"]},
        ]),
    );
}

/// Re-checking a mutable source. Packages and Droplets share these fields of their spec.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Refresh {
    /// How often to look whether an `http` or `objectStore` source changed, e.g. `10m` or `1h`; at least `1m`.
    /// Absent: the source is fetched once. An http source is asked with a conditional GET (`If-None-Match`,
    /// `If-Modified-Since`) and an object with a HEAD that compares its ETag, so an unchanged source costs one
    /// small request and no status write. Changed bits are fetched into a new blob, which replaces the old one
    /// once the status names it. With `checksum` set, changed bits that do not match it are refused and the
    /// last good ones stay READY (condition `SourceVerified` False).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(super::INTERVAL_PATTERN))]
    pub interval: Option<String>,
    /// Stop fetching from the source and re-checking it (`Reconciling` False, reason `Suspended`); stored bits
    /// stay as they are. Objects without a source ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// An http(s) download.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The http or https URL of the bits.
    pub url: String,
    /// A Secret in the same namespace with credentials: `username` and `password` for basic auth, or
    /// `bearerToken`; optionally `ca.crt` (PEM) and `header.<Name>` entries sent as request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// Extra request headers that are not secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<Header>,
    /// PEM certificates trusted in addition to the system roots, for servers with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// One http request header.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// An object in an object store.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStoreSource {
    /// The object's URL: `s3://bucket/key`, `gs://bucket/key`, `az://container/key` or `file:///path`.
    pub url: String,
    /// A Secret in the same namespace whose entries are object store settings, e.g. `aws_access_key_id` and
    /// `aws_secret_access_key`, `google_service_account_key`, or `azure_storage_account_name` and
    /// `azure_storage_account_key`. Without it the object is read anonymously.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// The service's endpoint, when not the public cloud's: an S3-compatible server (addressed path-style), an
    /// Azure storage account's Blob endpoint, or a GCS-compatible base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Further non-secret object store settings, e.g. `aws_allow_http: "true"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

/// Another Package in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct PackageSourceRef {
    /// Name of the Package whose bits are copied.
    pub name: String,
}

/// A Secret in the object's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    pub name: String,
}

/// The hash algorithm of a checksum.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumType {
    Sha256,
    Sha1,
}

impl ChecksumType {
    /// The length of a hex digest of this type.
    pub fn hex_len(self) -> usize {
        match self {
            ChecksumType::Sha256 => 64,
            ChecksumType::Sha1 => 40,
        }
    }
}

impl std::fmt::Display for ChecksumType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChecksumType::Sha256 => "sha256",
            ChecksumType::Sha1 => "sha1",
        })
    }
}

/// A checksum: in a spec, a pin the bits must match before they become usable; in a status, the measured value.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Checksum {
    /// `sha256` or `sha1`.
    #[serde(rename = "type")]
    pub checksum_type: ChecksumType,
    /// Lowercase hex digest.
    pub value: String,
}

/// The digests and location of stored bits; filled in once they are READY (or STAGED).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredDigests {
    /// The sha256 of the bits (`{type: sha256, value}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
    /// The sha1 of the bits (`{type: sha1, value}`), as older Cloud Foundry clients expect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<Checksum>,
    /// The sha256 as an OCI-style digest, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Size of the bits in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where the bits live in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobRef>,
}

/// A blob in bitsmith's store.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BlobRef {
    /// The store's URL, without credentials (e.g. `s3://bucket/prefix` or `file:///var/lib/bitsmith`).
    pub store: String,
    /// The blob's key below the store's URL.
    pub key: String,
}

/// Links to the API's actions on this object, in Cloud Foundry's form.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Links {
    #[serde(rename = "self", default, skip_serializing_if = "Option::is_none")]
    pub self_: Option<Link>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Link>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<Link>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<Link>,
    /// A Droplet's Package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<Link>,
}

/// One link.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Link {
    /// Absolute URL.
    pub href: String,
    /// The http method, when not GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// Stored bits as Flux describes a source's artifact.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Where to download the bits: the API's download link when the API is served, else the blob in the store.
    pub url: String,
    /// `sha256:<hex>` of the bits.
    pub digest: String,
    /// The revision of the bits; content-addressed, so `sha256:<hex>` too.
    pub revision: String,
    /// Size in bytes.
    pub size: u64,
    /// When these bits became the object's.
    pub last_update_time: Time,
}

/// The status of a Package or Droplet; only the set of Cloud Foundry states differs between the two.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", bound(deserialize = "S: Deserialize<'de>", serialize = "S: Serialize"))]
pub struct BitsStatus<S> {
    /// The Cloud Foundry state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<S>,
    /// Digests, size and location of the bits (set once they are stored).
    #[serde(flatten)]
    pub stored: StoredDigests,
    /// Why it FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Links to the API's actions on this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<Links>,
    /// The stored bits as a Flux-style artifact, for GitOps tools; set while the bits are READY (STAGED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// Ready, Reconciling and Stalled, with their kstatus meaning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The upload the API is receiving, while the state is PROCESSING_UPLOAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadClaim>,
    /// What the last fetch actually read: the URL after redirects, and the source's validators and size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_source: Option<ResolvedSource>,
    /// The value of the annotation `bitsmith.dev/requested-at` the controller last acted on (like Flux's
    /// `reconcile.fluxcd.io/requestedAt`): a new value asks for a reconcile now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
}

/// What a fetch read, as the source described it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSource {
    /// The URL read, after redirects, without credentials.
    pub url: String,
    /// The source's ETag, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The source's Last-Modified, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// The size the source announced, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl ResolvedSource {
    /// Whether the source said anything to ask it "changed since?" with.
    pub fn has_validators(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }
}

/// The annotation that asks for a reconcile now: any new value.
pub const REQUESTED_AT_ANNOTATION: &str = "bitsmith.dev/requested-at";

/// An upload in progress through the API: who receives it, and proof that it still does. The holder renews the
/// claim while the upload runs; a claim whose renewals stop changing for `--upload-claim-timeout`, as the
/// controller's own clock measures it, was abandoned (its holder died), and the object awaits an upload again.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadClaim {
    /// The API replica receiving the upload.
    pub holder: String,
    /// This claim's id; the upload's staged bytes are named after it.
    pub id: String,
    /// Renewals so far.
    pub renewals: u64,
    /// When the holder last renewed, for people: the controller compares no clocks.
    pub renew_time: Time,
}

impl<S> Default for BitsStatus<S> {
    fn default() -> Self {
        BitsStatus {
            state: None,
            stored: StoredDigests::default(),
            error: None,
            links: None,
            artifact: None,
            conditions: Vec::new(),
            observed_generation: None,
            upload: None,
            resolved_source: None,
            last_handled_reconcile_at: None,
        }
    }
}
