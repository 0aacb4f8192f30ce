//! The store and object sources against real object-store servers that the test scripts start on loopback:
//! Garage (S3) and Azurite (Azure Blob Storage), each behaviour one function run against both; and
//! fake-gcs-server (GCS), which serves objects as sources only.

use std::time::Duration;

use bitsmith::fetch::Inputs;
use bitsmith::pipeline::PipelineError;
use bitsmith::resources::{Checksum, ChecksumType};
use bitsmith::sources::{HttpOptions, SourceError};
use bitsmith::store::{BlobStore, StoreError};
use futures::TryStreamExt;
use sha2::Digest;

use crate::support::cloud::{Azurite, Cloud, FakeGcs, S3};
use crate::support::data::{bytes, coreutils_digests, repeated_digests};
use crate::support::http_server::{Reply, TestServer};
use crate::support::{fetcher, file_fetcher, http_source, owner, plain_fetch};

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

/// An http source streamed into the store (in several parts) reads back whole, and a presigned URL serves it.
async fn http_source_round_trips<C: Cloud>(cloud: &C, seed: u64) {
    let server = TestServer::start().await;
    let size = (21 << 20) + 11;
    server.route("/app.zip", Reply::Body { seed, size, length: true });
    let (store, lister) = cloud.store("roundtrip");
    let fetcher = fetcher(store.clone(), HttpOptions::default(), 1 << 30);
    let stored = plain_fetch(&fetcher, "cloud", &http_source(server.url("/app.zip"))).await.unwrap();
    let expected = coreutils_digests(seed, size);
    assert_eq!(stored.digests, expected);
    assert!(stored.blob.store.starts_with(&format!("{}://", C::SCHEME)), "{}", stored.blob.store);
    assert!(!stored.blob.store.contains('?'), "settings stay out of statuses: {}", stored.blob.store);

    let (read_size, stream) = store.read(&stored.blob.key).await.unwrap();
    assert_eq!(read_size, size);
    assert_eq!(sha256_of(stream).await, expected.sha256);

    // A presigned URL works without credentials; a tampered signature is refused.
    let url = store.presigned_get(&stored.blob.key, Duration::from_secs(300)).await.unwrap().expect("a signed URL");
    assert!(url.as_str().starts_with(cloud.endpoint()), "{url}");
    let response = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(bitsmith::digest::to_hex(&sha2::Sha256::digest(&body)), expected.sha256);
    let signature = format!("{}=", C::SIGNATURE_PARAMETER);
    assert!(url.as_str().contains(&signature), "{url}");
    let tampered = url.as_str().replace(&signature, &format!("{signature}0"));
    assert_eq!(reqwest::get(tampered).await.unwrap().status(), 403);

    assert_eq!(lister.keys().await.len(), 1, "only the blob, no staging: {:?}", lister.keys().await);
    // Written in place under the owner's own prefix, by a write id: no copy out of staging.
    let key = &stored.blob.key;
    assert!(key.starts_with("packages/tests/cloud/") && !key.ends_with(&expected.sha256), "{key}");
}

/// A blob written in place is invisible until it is committed, and an aborted or dropped one never appears.
async fn in_place_writes_appear_whole<C: Cloud>(cloud: &C, seed: u64) {
    let (store, lister) = cloud.store("in-place");
    let data = bytes::Bytes::from(bytes(seed, (17 << 20) + 5));
    let mut write = store.begin_blob(&owner("whole")).await.unwrap();
    write.write(data.clone()).await.unwrap();
    // Two parts have gone up by now; the object is not there, only the upload's record under staging/.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys = lister.keys().await;
    assert!(keys.len() == 1 && keys[0].contains("/staging/"), "visible before the commit: {keys:?}");
    let sha256 = bitsmith::digest::to_hex(&sha2::Sha256::digest(&data));
    let blob = write.commit(&sha256).await.unwrap();
    assert_eq!(lister.keys().await.len(), 1);
    let (size, stream) = store.read(&blob.key).await.unwrap();
    assert_eq!((size, sha256_of(stream).await), (data.len() as u64, sha256));

    let mut aborted = store.begin_blob(&owner("aborted")).await.unwrap();
    aborted.write(data.clone()).await.unwrap();
    aborted.abort().await;
    let mut dropped = store.begin_blob(&owner("dropped")).await.unwrap();
    dropped.write(data).await.unwrap();
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let keys = lister.keys().await;
    assert!(keys.len() == 1 && keys[0].ends_with(&blob.key), "only the committed blob: {keys:?}");
}

#[tokio::test]
async fn in_place_writes_appear_whole_in_s3() {
    in_place_writes_appear_whole(&S3::from_env(), 33).await;
}

#[tokio::test]
async fn in_place_writes_appear_whole_in_azure() {
    in_place_writes_appear_whole(&Azurite::from_env(), 43).await;
}

/// A writer killed mid-upload (here: forgotten, so that nothing of it runs again) leaves an open multipart upload
/// and its record under `staging/`; the sweep of its tag aborts the upload and removes the record.
#[tokio::test]
async fn the_sweep_aborts_a_killed_writers_multipart_upload() {
    let s3 = S3::from_env();
    let (store, lister) = s3.store("killed");
    let tagged = store.staging_as("claim-1");
    let mut write = tagged.begin_blob(&owner("killed")).await.unwrap();
    write.write(bytes::Bytes::from(bytes(35, 9 << 20))).await.unwrap();
    std::mem::forget(write);
    let keys = lister.keys().await;
    assert!(keys.len() == 1 && keys[0].contains("/staging/claim-1-") && keys[0].ends_with(".multipart"), "{keys:?}");
    let record: serde_json::Value = serde_json::from_slice(&lister.get(&keys[0]).await).unwrap();
    let prefix = keys[0].split("/staging/").next().unwrap();
    let (key, id) = (format!("{prefix}/{}", record["key"].as_str().unwrap()), record["upload_id"].as_str().unwrap());
    assert!(key.contains("/packages/tests/killed/"), "{key}");
    assert!(lister.upload_is_open(&key, id).await, "the killed writer's upload is open");

    // Another tag's sweep and a sweep by age leave a recent record alone.
    assert_eq!(store.sweep_staged("claim-2").await.unwrap(), 0);
    assert_eq!(store.sweep_staging(Duration::from_millis(1)).await.unwrap(), 0, "records live 15 minutes");
    assert!(lister.upload_is_open(&key, id).await);
    assert_eq!(store.sweep_staged("claim-1").await.unwrap(), 1);
    assert!(!lister.upload_is_open(&key, id).await, "aborted");
    assert!(lister.keys().await.is_empty(), "{:?}", lister.keys().await);
}

/// A blob over the 5 GiB a server-side copy can take: 6 GiB streamed from http into S3 by the `bitsmith fetch`
/// binary, which holds the same memory as for a small one. The bytes repeat a 1 MiB block, which Garage stores
/// once, so the test needs no 6 GiB of disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_six_gibibyte_blob_streams_into_s3_in_flat_memory() {
    let s3 = S3::from_env();
    let server = TestServer::start().await;
    let (block, size) = (1usize << 20, (6u64 << 30) + 12_345);
    server.route("/huge", Reply::Repeated { seed: 34, block, size });
    // Big enough that the writer reaches its steady state (all parts in flight), which 64 MiB may not.
    server.route("/small", Reply::Repeated { seed: 34, block, size: 1 << 30 });
    let expected = tokio::task::spawn_blocking(move || repeated_digests(&bytes(34, block), size));
    let url = s3.store_url("huge");
    let (store, lister) = s3.store_at(&url);
    let store_opts: Vec<String> = s3.credentials().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let fetch = |path: &str| {
        let manifest = format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: huge\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n  timeout: 30m\n",
            server.url(path)
        );
        let mut args = vec!["fetch", "-f", "-", "--store", &url, "--max-size", "7GiB"];
        args.extend(["--allow-source-cidr", "127.0.0.0/8"]);
        for opt in &store_opts {
            args.extend(["--store-opt", opt.as_str()]);
        }
        crate::support::process::run_measured(env!("CARGO_BIN_EXE_bitsmith"), &args, &manifest)
    };
    let small = tokio::task::block_in_place(|| fetch("/small"));
    assert!(small.success, "{}", small.stderr);
    let huge = tokio::task::block_in_place(|| fetch("/huge"));
    assert!(huge.success, "{}", huge.stderr);
    let status: serde_json::Value = serde_saphyr::from_str(&huge.stdout).unwrap();
    let expected = expected.await.unwrap();
    assert_eq!(status["status"]["checksum"]["value"], expected.sha256.as_str());
    assert_eq!(status["status"]["hash"]["value"], expected.sha1.as_str());
    assert_eq!(status["status"]["size"], size);
    let key = status["status"]["blob"]["key"].as_str().unwrap();
    assert_eq!(store.size(key).await.unwrap(), size);
    assert_eq!(lister.keys().await.len(), 2, "the two blobs and nothing else: {:?}", lister.keys().await);

    // A copy of it (a Package copying another) is more than S3's CopyObject takes: it is streamed into a new
    // multipart upload instead, and comes out whole (its size, and its last bytes, read back).
    let copy = format!("{key}-copy");
    store.copy(key, &copy, size).await.unwrap();
    assert_eq!(store.size(&copy).await.unwrap(), size);
    let tail = |key: String| {
        let store = store.clone();
        async move {
            let blocks: Vec<bytes::Bytes> = store.read_range(&key, size - 2_000_000..size).try_collect().await.unwrap();
            blocks.concat()
        }
    };
    assert_eq!(tail(copy.clone()).await, tail(key.to_string()).await, "the copy ends as the original does");
    store.delete(&copy).await.unwrap();
    eprintln!("peak RSS: {} KiB for 1 GiB, {} KiB for 6 GiB", small.peak_rss_kib, huge.peak_rss_kib);
    // Flat: what a fetch holds is bounded by its design, the store's parts in flight and the hashes' queues,
    // whatever its size. A 1 GiB fetch may end before all of them fill at once; a longer one may reach them all,
    // so it may hold up to one write's parts more (one run here: 51 and 69 MiB), never gigabytes more.
    let write_kib = (bitsmith::store::WRITE_MEMORY / 1024) as i64;
    assert!(
        huge.peak_rss_kib < small.peak_rss_kib + write_kib,
        "peak RSS {} KiB for 6 GiB against {} KiB for 1 GiB",
        huge.peak_rss_kib,
        small.peak_rss_kib
    );
    // And within what the transfer budget sizes one transfer for, beside the process's own 32 MiB or so.
    let budget_kib = ((bitsmith::budget::TRANSFER_MEMORY + (32 << 20)) / 1024) as i64;
    assert!(huge.peak_rss_kib < budget_kib, "peak RSS {} KiB against {budget_kib} KiB", huge.peak_rss_kib);
}

#[tokio::test]
async fn http_source_into_s3_round_trips() {
    http_source_round_trips(&S3::from_env(), 31).await;
}

#[tokio::test]
async fn http_source_into_azure_round_trips() {
    http_source_round_trips(&Azurite::from_env(), 41).await;
}

/// A checksum mismatch and a source cut short both leave nothing in the store, staging included.
async fn failed_writes_leave_nothing<C: Cloud>(cloud: &C, seed: u64) {
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed, size: 17 << 20, length: true });
    server.route("/cut", Reply::Truncated { seed, announced: 17 << 20, sent: 12 << 20 });
    let (store, lister) = cloud.store("abort");
    let fetcher = fetcher(store, HttpOptions::default(), 1 << 30);
    let wrong = Checksum { checksum_type: ChecksumType::Sha256, value: "0".repeat(64) };
    let err =
        fetcher.fetch(&owner("cloud"), &http_source(server.url("/app.zip")), Some(&wrong), Inputs::default()).await;
    assert!(matches!(err, Err(PipelineError::ChecksumMismatch { .. })));
    let err = plain_fetch(&fetcher, "cloud", &http_source(server.url("/cut"))).await;
    assert!(matches!(err, Err(PipelineError::Source(SourceError::Interrupted { .. }))));
    assert!(lister.keys().await.is_empty(), "{:?}", lister.keys().await);
}

#[tokio::test]
async fn failed_writes_leave_nothing_in_s3() {
    failed_writes_leave_nothing(&S3::from_env(), 32).await;
}

#[tokio::test]
async fn failed_writes_leave_nothing_in_azure() {
    failed_writes_leave_nothing(&Azurite::from_env(), 42).await;
}

/// A stored blob read back as an object source with credentials from a Secret; wrong, missing and unrelated
/// credentials and a missing object each fail as they should.
async fn objects_as_sources<C: Cloud>(cloud: &C, seed: u64) {
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed, size: 6 << 20, length: true });
    let (store, lister) = cloud.store("source");
    let fetcher = fetcher(store.clone(), HttpOptions::default(), 1 << 30);
    let original = plain_fetch(&fetcher, "a", &http_source(server.url("/app.zip"))).await.unwrap();

    let source = cloud.object_source(&bucket_path(&store, &original.blob.key));
    let secret = cloud.secret();
    let inputs = Inputs { secret: Some(&secret), source_package: None, ..Default::default() };
    let copied = fetcher.fetch(&owner("b"), &source, None, inputs).await.unwrap();
    assert_eq!(copied.digests, coreutils_digests(seed, 6 << 20));

    // Asked again with what that fetch read, an unchanged object opens nothing (a HEAD that compares the ETag);
    // the object overwritten in place is opened again, with a new ETag.
    let known = copied.resolved.clone().expect("what the source served");
    assert!(known.etag.is_some(), "{known:?}");
    let inputs = Inputs { secret: Some(&secret), known: Some(&known), ..Default::default() };
    assert!(fetcher.open(&source, inputs).await.unwrap().is_none(), "unchanged");
    let mut overwrite = store.begin_write().await.unwrap();
    overwrite.write(bytes::Bytes::from(bytes(seed + 100, 1 << 20))).await.unwrap();
    overwrite.commit(&original.blob.key).await.unwrap();
    let inputs = Inputs { secret: Some(&secret), known: Some(&known), ..Default::default() };
    let changed = fetcher.open(&source, inputs).await.unwrap().expect("the object changed");
    assert_ne!(changed.resolved().unwrap().etag, known.etag);
    let stored = changed.store(&owner("b"), None).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(seed + 100, 1 << 20));

    let mut wrong = secret.clone();
    wrong.entries.insert(C::SECRET_KEY_ENTRY.into(), C::WRONG_SECRET_KEY.as_bytes().to_vec());
    let inputs = Inputs { secret: Some(&wrong), source_package: None, ..Default::default() };
    let err = fetcher.fetch(&owner("c"), &source, None, inputs).await.unwrap_err();
    assert!(err.is_permanent() || matches!(err, PipelineError::Source(SourceError::ObjectRead { .. })), "{err}");

    let mut no_keys = secret.clone();
    no_keys.entries.clear();
    no_keys.entries.insert("unrelated".into(), b"x".to_vec());
    let inputs = Inputs { secret: Some(&no_keys), source_package: None, ..Default::default() };
    let err = fetcher.fetch(&owner("c"), &source, None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::RefusedOption(_))), "{err}");
    assert!(err.to_string().contains("\"unrelated\""), "{err}");

    let mut missing = source.clone();
    missing.object_store.as_mut().unwrap().url = format!("{}://{}/no/such/object", C::SCHEME, cloud.bucket());
    let inputs = Inputs { secret: Some(&secret), source_package: None, ..Default::default() };
    let err = fetcher.fetch(&owner("c"), &missing, None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::NotFound { .. })), "{err}");

    assert_eq!(lister.keys().await.len(), 3, "the original, and both versions copied: {:?}", lister.keys().await);
}

#[tokio::test]
async fn s3_objects_as_sources() {
    objects_as_sources(&S3::from_env(), 33).await;
}

#[tokio::test]
async fn azure_objects_as_sources() {
    objects_as_sources(&Azurite::from_env(), 43).await;
}

#[tokio::test]
async fn gcs_objects_as_sources() {
    let gcs = FakeGcs::from_env();
    let size = (9 << 20) + 3;
    let name = format!("sources/{}/app.zip", uuid::Uuid::new_v4());
    gcs.put(&name, bytes(44, size)).await;
    let store = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(store.path(), 1 << 30);
    let source = gcs.object_source(&name);
    let secret = gcs.secret();
    let with_secret = || Inputs { secret: Some(&secret), source_package: None, ..Default::default() };

    // Read in several ranges, with credentials from the Secret.
    let stored = fetcher.fetch(&owner("gcs"), &source, None, with_secret()).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(44, size as u64));

    // Without a Secret the object is read anonymously: the emulator, like a public bucket, allows it.
    let mut anonymous = source.clone();
    anonymous.object_store.as_mut().unwrap().secret_ref = None;
    let stored = plain_fetch(&fetcher, "gcs-anonymous", &anonymous).await.unwrap();
    assert_eq!(stored.digests.size, size as u64);

    let mut missing = source.clone();
    missing.object_store.as_mut().unwrap().url = format!("gs://{}/no/such/object", gcs.bucket);
    let err = fetcher.fetch(&owner("c"), &missing, None, with_secret()).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::NotFound { .. })), "{err}");

    // A Secret that holds no credentials is the Secret's fault, said as such.
    let empty = bitsmith::sources::SecretData { name: "cloud".into(), entries: Default::default() };
    let inputs = Inputs { secret: Some(&empty), source_package: None, ..Default::default() };
    let err = fetcher.fetch(&owner("c"), &source, None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::InvalidCredentials { .. })), "{err}");

    // The size is known before any byte is read.
    let small = file_fetcher(store.path(), 1 << 20);
    let err = small.fetch(&owner("c"), &source, None, with_secret()).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::TooLarge { .. })), "{err}");
}

/// The bucket-relative path of a key in `store`.
fn bucket_path(store: &BlobStore, key: &str) -> String {
    let prefix = store.url().splitn(4, '/').nth(3).unwrap_or_default();
    format!("{prefix}/{key}")
}

/// Copy and delete inside the store (delete twice: it is idempotent), and the sweep of staged writes a killed
/// process left behind.
async fn copy_delete_and_sweep<C: Cloud>(cloud: &C) {
    let (store, lister) = cloud.store("copy");
    let mut write = store.begin_write().await.unwrap();
    write.write(bytes::Bytes::from(vec![1u8; 6 << 20])).await.unwrap();
    write.commit("packages/ns/a/1").await.unwrap();
    store.copy("packages/ns/a/1", "packages/ns/b/1", 6 << 20).await.unwrap();
    assert_eq!(store.size("packages/ns/b/1").await.unwrap(), 6 << 20);
    store.delete("packages/ns/a/1").await.unwrap();
    store.delete("packages/ns/a/1").await.unwrap();
    assert_eq!(lister.keys().await.len(), 1);
    let mut stale = store.begin_write().await.unwrap();
    stale.write(bytes::Bytes::from_static(b"left behind")).await.unwrap();
    // A process killed between finishing the upload and committing it leaves an object under staging only.
    let committed_stale = stale.commit("staging/killed").await.unwrap();
    assert!(committed_stale.key.starts_with("staging/"));
    assert_eq!(store.sweep_staging(Duration::from_secs(3600)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(store.sweep_staging(Duration::from_millis(1)).await.unwrap(), 1);
    assert_eq!(lister.keys().await.len(), 1);
}

#[tokio::test]
async fn copy_delete_and_sweep_in_s3() {
    copy_delete_and_sweep(&S3::from_env()).await;
}

#[tokio::test]
async fn copy_delete_and_sweep_in_azure() {
    copy_delete_and_sweep(&Azurite::from_env()).await;
}

/// Without credentials the store is refused at once, not at the first request.
fn refused_without_credentials<C: Cloud>(cloud: &C) {
    let err = BlobStore::open(&cloud.store_url("nocreds"), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("missing credentials"), "{err}");
}

#[test]
fn an_s3_store_without_credentials_is_refused() {
    refused_without_credentials(&S3::from_env());
}

#[test]
fn an_azure_store_without_credentials_is_refused() {
    refused_without_credentials(&Azurite::from_env());
}
