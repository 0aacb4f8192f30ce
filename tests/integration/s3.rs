//! The S3 store and S3 sources against Garage, a production S3 server that the test scripts start on loopback.

use std::collections::BTreeMap;
use std::time::Duration;

use bitsmith::fetch::Inputs;
use bitsmith::pipeline::PipelineError;
use bitsmith::resources::{Checksum, ChecksumType, ObjectStoreSource, SecretRef, Source};
use bitsmith::sources::{HttpOptions, SecretData, SourceError};
use bitsmith::store::{BlobStore, StoreError};
use futures::TryStreamExt;
use sha2::Digest;

use crate::support::data::coreutils_digests;
use crate::support::http_server::{Reply, TestServer};
use crate::support::s3::S3;
use crate::support::{fetcher, http_source, owner, plain_fetch};

async fn sha256_of(stream: futures::stream::BoxStream<'static, Result<bytes::Bytes, StoreError>>) -> String {
    let hasher = stream
        .try_fold(sha2::Sha256::new(), |mut h, block| async move {
            h.update(&block);
            Ok(h)
        })
        .await
        .unwrap();
    bitsmith::digest::to_hex(&hasher.finalize())
}

#[tokio::test]
async fn http_source_into_s3_round_trips() {
    let s3 = S3::from_env();
    let server = TestServer::start().await;
    let size = (21 << 20) + 11;
    server.route("/app.zip", Reply::Body { seed: 31, size, length: true });
    let (store, lister) = s3.store("roundtrip");
    let fetcher = fetcher(store.clone(), HttpOptions::default(), 1 << 30);
    let stored = plain_fetch(&fetcher, "s3", &http_source(server.url("/app.zip"))).await.unwrap();
    let expected = coreutils_digests(31, size);
    assert_eq!(stored.digests, expected);
    assert!(stored.blob.store.starts_with("s3://"));
    assert!(!stored.blob.store.contains('?'), "settings stay out of statuses: {}", stored.blob.store);

    let (read_size, stream) = store.read(&stored.blob.key).await.unwrap();
    assert_eq!(read_size, size);
    assert_eq!(sha256_of(stream).await, expected.sha256);

    // A presigned URL works without credentials; a tampered signature is refused.
    let url = store.presigned_get(&stored.blob.key, Duration::from_secs(300)).await.unwrap().expect("S3 signs URLs");
    let response = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(bitsmith::digest::to_hex(&sha2::Sha256::digest(&body)), expected.sha256);
    let tampered = url.as_str().replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert_eq!(reqwest::get(tampered).await.unwrap().status(), 403);

    assert_eq!(lister.keys().await.len(), 1, "only the blob, no staging: {:?}", lister.keys().await);
}

#[tokio::test]
async fn failed_writes_leave_nothing_in_s3() {
    let s3 = S3::from_env();
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 32, size: 17 << 20, length: true });
    server.route("/cut", Reply::Truncated { seed: 32, announced: 17 << 20, sent: 12 << 20 });
    let (store, lister) = s3.store("abort");
    let fetcher = fetcher(store, HttpOptions::default(), 1 << 30);
    let wrong = Checksum { checksum_type: ChecksumType::Sha256, value: "0".repeat(64) };
    let err = fetcher.fetch(&owner("s3"), &http_source(server.url("/app.zip")), Some(&wrong), Inputs::default()).await;
    assert!(matches!(err, Err(PipelineError::ChecksumMismatch { .. })));
    let err = plain_fetch(&fetcher, "s3", &http_source(server.url("/cut"))).await;
    assert!(matches!(err, Err(PipelineError::Source(SourceError::Interrupted { .. }))));
    assert!(lister.keys().await.is_empty(), "{:?}", lister.keys().await);
}

#[tokio::test]
async fn s3_objects_as_sources_and_copies() {
    let s3 = S3::from_env();
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 33, size: 6 << 20, length: true });
    let (store, lister) = s3.store("source");
    let fetcher = fetcher(store.clone(), HttpOptions::default(), 1 << 30);
    let original = plain_fetch(&fetcher, "a", &http_source(server.url("/app.zip"))).await.unwrap();

    // The stored blob read back as an S3 object source, with credentials from a Secret.
    let object_url = format!("s3://{}/{}", s3.bucket, lister_path(&store, &original.blob.key));
    let source = Source {
        object_store: Some(ObjectStoreSource {
            url: object_url.clone(),
            secret_ref: Some(SecretRef { name: "s3".into() }),
            endpoint: Some(s3.endpoint.clone()),
            region: Some("us-east-1".into()),
            options: BTreeMap::new(),
        }),
        ..Default::default()
    };
    let secret = SecretData {
        name: "s3".into(),
        entries: BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), s3.access_key.clone().into_bytes()),
            ("aws_secret_access_key".to_string(), s3.secret_key.clone().into_bytes()),
        ]),
    };
    let inputs = Inputs { secret: Some(&secret), source_package: None };
    let copied = fetcher.fetch(&owner("b"), &source, None, inputs).await.unwrap();
    assert_eq!(copied.digests, coreutils_digests(33, 6 << 20));

    let mut wrong = secret.clone();
    wrong.entries.insert("aws_secret_access_key".into(), b"0000000000000000000000000000000000000000".to_vec());
    let inputs = Inputs { secret: Some(&wrong), source_package: None };
    let err = fetcher.fetch(&owner("c"), &source, None, inputs).await.unwrap_err();
    assert!(err.is_permanent() || matches!(err, PipelineError::Source(SourceError::ObjectRead { .. })), "{err}");

    let mut no_keys = secret.clone();
    no_keys.entries.clear();
    no_keys.entries.insert("unrelated".into(), b"x".to_vec());
    let inputs = Inputs { secret: Some(&no_keys), source_package: None };
    let err = fetcher.fetch(&owner("c"), &source, None, inputs).await.unwrap_err();
    assert!(
        matches!(err, PipelineError::Source(SourceError::ObjectUrl(_) | SourceError::InvalidCredentials { .. })),
        "{err}"
    );

    let mut missing = source.clone();
    missing.object_store.as_mut().unwrap().url = format!("s3://{}/no/such/object", s3.bucket);
    let inputs = Inputs { secret: Some(&secret), source_package: None };
    let err = fetcher.fetch(&owner("c"), &missing, None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::NotFound { .. })), "{err}");

    assert_eq!(lister.keys().await.len(), 2, "{:?}", lister.keys().await);
}

/// The bucket-relative path of a key in `store`.
fn lister_path(store: &BlobStore, key: &str) -> String {
    let prefix = store.url().splitn(4, '/').nth(3).unwrap_or_default();
    format!("{prefix}/{key}")
}

#[tokio::test]
async fn server_side_copy_and_delete_in_s3() {
    let s3 = S3::from_env();
    let (store, lister) = s3.store("copy");
    let mut write = store.begin_write().await.unwrap();
    write.write(bytes::Bytes::from(vec![1u8; 6 << 20])).await.unwrap();
    write.commit("packages/ns/a/1").await.unwrap();
    store.copy("packages/ns/a/1", "packages/ns/b/1").await.unwrap();
    assert_eq!(store.size("packages/ns/b/1").await.unwrap(), 6 << 20);
    store.delete("packages/ns/a/1").await.unwrap();
    store.delete("packages/ns/a/1").await.unwrap();
    assert_eq!(lister.keys().await.len(), 1);
    let stale = store.begin_write().await.unwrap();
    let committed_stale = {
        let mut w = stale;
        w.write(bytes::Bytes::from_static(b"left behind")).await.unwrap();
        // Simulate a process killed between finishing the upload and committing it: finish under staging only.
        w.commit("staging/killed").await.unwrap()
    };
    assert!(committed_stale.key.starts_with("staging/"));
    assert_eq!(store.sweep_staging(Duration::from_secs(3600)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(store.sweep_staging(Duration::from_millis(1)).await.unwrap(), 1);
    assert_eq!(lister.keys().await.len(), 1);
}

#[tokio::test]
async fn an_s3_store_without_credentials_is_refused() {
    let s3 = S3::from_env();
    let err = BlobStore::open(&s3.store_url("nocreds"), &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("missing credentials"), "{err}");
}
