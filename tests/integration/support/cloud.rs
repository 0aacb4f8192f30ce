//! The object-store servers of record, started by `scripts/with-test-env.sh` and described by environment
//! variables: Garage for S3, Azurite for Azure Blob Storage, and fake-gcs-server for GCS (a source only). A test
//! that needs one fails, with the command to run, when it is missing.

use std::collections::BTreeMap;

use bitsmith::object_url::{self, CredentialPolicy, ObjectClient};
use bitsmith::resources::{ObjectStoreSource, SecretRef, Source};
use bitsmith::sources::SecretData;
use bitsmith::store::BlobStore;
use futures::TryStreamExt;

/// The values of `names` in the environment, or the first name that is not set.
fn vars<const N: usize>(names: [&'static str; N]) -> Result<[String; N], &'static str> {
    let mut values = [const { String::new() }; N];
    for (value, name) in values.iter_mut().zip(names) {
        *value = std::env::var(name).map_err(|_| name)?;
    }
    Ok(values)
}

/// A test that needs a server fails loudly without it, saying how to get it.
fn required<T>(server: Result<T, &'static str>, what: &str) -> T {
    server.unwrap_or_else(|name| {
        panic!(
            "{name} is not set: these tests need the {what} server that `make test` starts (scripts/with-test-env.sh)"
        )
    })
}

/// A server that speaks one cloud's object-store protocol, with a bucket (or container) for the tests.
pub trait Cloud {
    /// The scheme of its URLs.
    const SCHEME: &'static str;
    /// The credential entry [`Cloud::secret`] holds the secret key under.
    const SECRET_KEY_ENTRY: &'static str;
    /// A well-formed secret key that is not the server's.
    const WRONG_SECRET_KEY: &'static str;
    /// The name of the query parameter that carries a presigned URL's signature.
    const SIGNATURE_PARAMETER: &'static str;

    fn bucket(&self) -> &str;
    /// The server's address, where its presigned URLs point.
    fn endpoint(&self) -> &str;
    /// Settings that reach the server, credentials aside.
    fn settings(&self) -> BTreeMap<String, String>;
    /// Credentials as object_store settings.
    fn credentials(&self) -> BTreeMap<String, String>;

    /// A store URL under a fresh prefix, so tests do not see each other's objects.
    fn store_url(&self, test: &str) -> String {
        let settings = self.settings().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
        format!("{}://{}/{test}-{}?{settings}", Self::SCHEME, self.bucket(), uuid::Uuid::new_v4())
    }

    /// A store at a fresh prefix, with credentials passed as options, and a lister of what the prefix holds.
    fn store(&self, test: &str) -> (BlobStore, Lister) {
        self.store_at(&self.store_url(test))
    }

    /// The store at `url` (one of [`Cloud::store_url`]), with credentials passed as options, and its lister.
    fn store_at(&self, url: &str) -> (BlobStore, Lister) {
        let store = BlobStore::open(url, &self.credentials()).expect("open the store");
        let client = object_url::connect(url, &self.credentials(), CredentialPolicy::Options, None).unwrap();
        (store, Lister(client))
    }

    /// The credentials as a Package's Secret would hold them: named like environment variables, except the
    /// secret key, named as object_store's setting (both spellings are read).
    fn secret(&self) -> SecretData {
        let entry = |name: String| if name == Self::SECRET_KEY_ENTRY { name } else { name.to_ascii_uppercase() };
        SecretData {
            name: "cloud".into(),
            entries: self.credentials().into_iter().map(|(k, v)| (entry(k), v.into_bytes())).collect(),
        }
    }

    /// An object-store source for the object at `path` in the bucket, reading credentials from [`Cloud::secret`].
    fn object_source(&self, path: &str) -> Source {
        let mut options = self.settings();
        let endpoint = options.remove("endpoint");
        let region = options.remove("region");
        Source {
            object_store: Some(ObjectStoreSource {
                url: format!("{}://{}/{path}", Self::SCHEME, self.bucket()),
                secret_ref: Some(SecretRef { name: "cloud".into() }),
                endpoint,
                region,
                options,
            }),
            ..Default::default()
        }
    }
}

/// Garage, for S3.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3 {
    pub fn from_env() -> S3 {
        required(Self::try_from_env(), "Garage S3")
    }

    pub fn try_from_env() -> Result<S3, &'static str> {
        let [endpoint, bucket, access_key, secret_key] = vars([
            "BITSMITH_TEST_S3_ENDPOINT",
            "BITSMITH_TEST_S3_BUCKET",
            "BITSMITH_TEST_S3_ACCESS_KEY",
            "BITSMITH_TEST_S3_SECRET_KEY",
        ])?;
        Ok(S3 { endpoint, bucket, access_key, secret_key })
    }
}

impl Cloud for S3 {
    const SCHEME: &'static str = "s3";
    const SECRET_KEY_ENTRY: &'static str = "aws_secret_access_key";
    const WRONG_SECRET_KEY: &'static str = "0000000000000000000000000000000000000000";
    const SIGNATURE_PARAMETER: &'static str = "X-Amz-Signature";

    fn bucket(&self) -> &str {
        &self.bucket
    }
    fn endpoint(&self) -> &str {
        &self.endpoint
    }
    fn settings(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("endpoint".to_string(), self.endpoint.clone()),
            ("path_style".to_string(), "true".to_string()),
            ("region".to_string(), "us-east-1".to_string()),
        ])
    }
    fn credentials(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("aws_access_key_id".to_string(), self.access_key.clone()),
            ("aws_secret_access_key".to_string(), self.secret_key.clone()),
        ])
    }
}

/// Azurite, for Azure Blob Storage, reached as a storage account at an explicit endpoint (as an Azure Stack or
/// sovereign-cloud account would be), not through object_store's emulator shortcut.
pub struct Azurite {
    /// The account's Blob endpoint, `http://127.0.0.1:PORT/ACCOUNT`.
    pub endpoint: String,
    pub container: String,
    pub account: String,
    pub key: String,
}

impl Azurite {
    pub fn from_env() -> Azurite {
        required(Self::try_from_env(), "Azurite")
    }

    pub fn try_from_env() -> Result<Azurite, &'static str> {
        let [endpoint, container, account, key] = vars([
            "BITSMITH_TEST_AZURE_ENDPOINT",
            "BITSMITH_TEST_AZURE_CONTAINER",
            "BITSMITH_TEST_AZURE_ACCOUNT",
            "BITSMITH_TEST_AZURE_KEY",
        ])?;
        Ok(Azurite { endpoint, container, account, key })
    }
}

impl Cloud for Azurite {
    const SCHEME: &'static str = "az";
    const SECRET_KEY_ENTRY: &'static str = "azure_storage_account_key";
    /// 64 zero bytes in base64: the shape of an account key.
    const WRONG_SECRET_KEY: &'static str =
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==";
    const SIGNATURE_PARAMETER: &'static str = "sig";

    fn bucket(&self) -> &str {
        &self.container
    }
    fn endpoint(&self) -> &str {
        &self.endpoint
    }
    fn settings(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("endpoint".to_string(), self.endpoint.clone())])
    }
    fn credentials(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("azure_storage_account_name".to_string(), self.account.clone()),
            ("azure_storage_account_key".to_string(), self.key.clone()),
        ])
    }
}

/// fake-gcs-server, for GCS. It takes no XML multipart uploads, which object_store's streaming writes use, so
/// it serves only as a source of objects.
pub struct FakeGcs {
    pub endpoint: String,
    pub bucket: String,
}

impl FakeGcs {
    pub fn from_env() -> FakeGcs {
        let names = ["BITSMITH_TEST_GCS_ENDPOINT", "BITSMITH_TEST_GCS_BUCKET"];
        let [endpoint, bucket] = required(vars(names), "fake-gcs-server");
        FakeGcs { endpoint, bucket }
    }

    /// Put `bytes` at `name` with the JSON API's media upload, as `gcloud storage cp` would.
    pub async fn put(&self, name: &str, bytes: Vec<u8>) {
        let mut url = url::Url::parse(&format!("{}/upload/storage/v1/b/{}/o", self.endpoint, self.bucket)).unwrap();
        url.query_pairs_mut().append_pair("uploadType", "media").append_pair("name", name);
        let response = reqwest::Client::new().post(url).body(bytes).send().await.unwrap();
        assert!(response.status().is_success(), "uploading {name}: {}", response.status());
    }

    /// A Secret with a service account key for the emulator: one that turns OAuth off, as its docs say.
    pub fn secret(&self) -> SecretData {
        let key = r#"{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}"#;
        SecretData {
            name: "cloud".into(),
            entries: BTreeMap::from([("google_service_account_key".to_string(), key.as_bytes().to_vec())]),
        }
    }

    /// An object-store source for `name`, at the emulator's endpoint, reading credentials from [`Self::secret`].
    pub fn object_source(&self, name: &str) -> Source {
        Source {
            object_store: Some(ObjectStoreSource {
                url: format!("gs://{}/{name}", self.bucket),
                secret_ref: Some(SecretRef { name: "cloud".into() }),
                endpoint: Some(self.endpoint.clone()),
                region: None,
                options: BTreeMap::new(),
            }),
            ..Default::default()
        }
    }
}

/// Lists a store's prefix directly, bypassing the store under test.
pub struct Lister(ObjectClient);

impl Lister {
    pub async fn keys(&self) -> Vec<String> {
        self.0.store.list(Some(&self.0.path)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap()
    }

    /// The object at `key` (bucket-relative, as [`Lister::keys`] gives it).
    pub async fn get(&self, key: &str) -> bytes::Bytes {
        use object_store::ObjectStoreExt;
        self.0.store.get(&key.into()).await.unwrap().bytes().await.unwrap()
    }

    /// Whether the multipart upload `id` to `key` (bucket-relative) is still open: it takes another part.
    pub async fn upload_is_open(&self, key: &str, id: &str) -> bool {
        let multipart = self.0.multipart.as_ref().expect("an object store");
        let part = object_store::PutPayload::from_static(b"probe");
        multipart.put_part(&key.into(), &id.to_string(), 5, part).await.is_ok()
    }
}
