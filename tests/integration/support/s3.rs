//! The S3 server of record (Garage), started by `scripts/with-test-env.sh` and described by environment variables.
//! A test that needs it fails, with the command to run, when it is missing.

use std::collections::BTreeMap;

use bitsmith::object_url::{self, CredentialPolicy, ObjectClient};
use bitsmith::store::BlobStore;
use futures::TryStreamExt;

/// Connection details of the test S3 server.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3 {
    /// Read the details from the environment, or fail the test loudly.
    pub fn from_env() -> S3 {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: S3 tests need the Garage server that `make test` starts (scripts/with-test-env.sh)"
                )
            })
        };
        S3 {
            endpoint: var("BITSMITH_TEST_S3_ENDPOINT"),
            bucket: var("BITSMITH_TEST_S3_BUCKET"),
            access_key: var("BITSMITH_TEST_S3_ACCESS_KEY"),
            secret_key: var("BITSMITH_TEST_S3_SECRET_KEY"),
        }
    }

    /// A store URL under a fresh prefix, so tests do not see each other's objects.
    pub fn store_url(&self, test: &str) -> String {
        format!(
            "s3://{}/{test}-{}?endpoint={}&path_style=true&region=us-east-1",
            self.bucket,
            uuid::Uuid::new_v4(),
            self.endpoint
        )
    }

    pub fn credentials(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("aws_access_key_id".to_string(), self.access_key.clone()),
            ("aws_secret_access_key".to_string(), self.secret_key.clone()),
        ])
    }

    /// A store at a fresh prefix, with credentials passed as options, and a lister of what the prefix holds.
    pub fn store(&self, test: &str) -> (BlobStore, Lister) {
        let url = self.store_url(test);
        let store = BlobStore::open(&url, &self.credentials()).expect("open S3 store");
        let client = object_url::connect(&url, &self.credentials(), CredentialPolicy::Options).unwrap();
        (store, Lister(client))
    }
}

/// Lists a store's prefix directly, bypassing the store under test.
pub struct Lister(ObjectClient);

impl Lister {
    pub async fn keys(&self) -> Vec<String> {
        self.0.store.list(Some(&self.0.path)).map_ok(|m| m.location.to_string()).try_collect().await.unwrap()
    }
}
