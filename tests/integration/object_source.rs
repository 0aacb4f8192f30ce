//! `file://` object sources and Package copies, through the pipeline into a `file://` store.

use bitsmith::fetch::Inputs;
use bitsmith::pipeline::PipelineError;
use bitsmith::resources::{
    Checksum, ChecksumType, ObjectStoreSource, Package, PackageSourceRef, PackageSpec, PackageState, PackageStatus,
    Source,
};
use bitsmith::sources::SourceError;
use k8s_openapi::jiff::Timestamp;

use crate::support::data::{coreutils_digests, write_file};
use crate::support::{file_fetcher, files_under, loopback_policy, owner, plain_fetch};

fn object(url: String) -> Source {
    Source { object_store: Some(ObjectStoreSource { url, ..Default::default() }), ..Default::default() }
}

#[tokio::test]
async fn file_objects_stream_into_the_store() {
    let input = tempfile::tempdir().unwrap();
    let size = (9 << 20) + 5;
    let file = input.path().join("my app.zip");
    write_file(&file, 21, size);
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_file_path(&file).unwrap().to_string();
    let stored =
        file_fetcher(dir.path(), 1 << 30).fetch(&owner("file"), &object(url), None, Inputs::default()).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(21, size));
}

#[tokio::test]
async fn file_sources_respect_the_policy_and_report_bad_urls() {
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("app.zip");
    write_file(&file, 1, 10);
    let dir = tempfile::tempdir().unwrap();
    let mut fetcher = file_fetcher(dir.path(), 1 << 20);
    let url = url::Url::from_file_path(&file).unwrap().to_string();

    fetcher.policy = loopback_policy(None);
    let err = plain_fetch(&fetcher, "f", &object(url.clone())).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::FileNotAllowed { .. })), "{err}");

    // A symlink inside the allowed directory that points outside it does not get out.
    let allowed = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&file, allowed.path().join("link.zip")).unwrap();
    fetcher.policy = loopback_policy(Some(allowed.path().to_path_buf()));
    let escaping = url::Url::from_file_path(allowed.path().join("link.zip")).unwrap().to_string();
    let err = plain_fetch(&fetcher, "f", &object(escaping)).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::FileNotAllowed { .. })), "{err}");
    std::fs::copy(&file, allowed.path().join("inside.zip")).unwrap();
    let inside = url::Url::from_file_path(allowed.path().join("inside.zip")).unwrap().to_string();
    plain_fetch(&fetcher, "f", &object(inside)).await.unwrap();
    let store_files = files_under(dir.path());
    assert_eq!(store_files.len(), 1, "{store_files:?}");
    std::fs::remove_file(dir.path().join(&store_files[0])).unwrap();

    fetcher.policy = loopback_policy(Some("/".into()));
    let missing = url::Url::from_file_path(input.path().join("missing.zip")).unwrap().to_string();
    let err = plain_fetch(&fetcher, "f", &object(missing)).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::NotFound { .. })), "{err}");
    assert!(!err.is_permanent());

    for bad in ["s3//bucket/key", "ftp://host/app.zip", "s3:///key", "memory:///x"] {
        let err = plain_fetch(&fetcher, "f", &object(bad.into())).await.unwrap_err();
        assert!(err.is_permanent(), "{bad}: {err}");
    }
    assert!(files_under(dir.path()).is_empty());
}

fn ready_package(name: &str, stored: &bitsmith::pipeline::Stored) -> Package {
    let mut package = Package::new(name, PackageSpec::bits(None));
    let status: PackageStatus = bitsmith::status::done(
        &PackageStatus::default(),
        bitsmith::status::stored_digests(&stored.digests, stored.blob.clone()),
        Some(1),
        Timestamp::now(),
    );
    package.status = Some(status);
    package
}

#[tokio::test]
async fn package_copies_stay_inside_the_store() {
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("app.zip");
    write_file(&file, 8, 3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 30);
    let url = url::Url::from_file_path(&file).unwrap().to_string();
    let original = plain_fetch(&fetcher, "a", &object(url)).await.unwrap();
    let source = ready_package("a", &original);
    let copy_source = Source { package: Some(PackageSourceRef { name: "a".into() }), ..Default::default() };

    let inputs = Inputs { secret: None, source_package: Some(&source), ..Default::default() };
    let copied = fetcher.fetch(&owner("b"), &copy_source, None, inputs).await.unwrap();
    assert_eq!(copied.digests, original.digests);
    assert_ne!(copied.blob.key, original.blob.key);
    let bytes = |key: &str| std::fs::read(dir.path().join(key)).unwrap();
    assert_eq!(bytes(&copied.blob.key), bytes(&original.blob.key));

    let wrong = Checksum { checksum_type: ChecksumType::Sha1, value: "f".repeat(40) };
    let inputs = Inputs { secret: None, source_package: Some(&source), ..Default::default() };
    let err = fetcher.fetch(&owner("c"), &copy_source, Some(&wrong), inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::ChecksumMismatch { .. }), "{err}");
    assert_eq!(files_under(dir.path()).len(), 2, "the mismatched copy left nothing");

    let mut pending = source.clone();
    pending.status.as_mut().unwrap().state = Some(PackageState::ProcessingUpload);
    let inputs = Inputs { secret: None, source_package: Some(&pending), ..Default::default() };
    let err = fetcher.fetch(&owner("d"), &copy_source, None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::PackageNotReady { .. })), "{err}");
    assert!(!err.is_permanent(), "the source Package may become READY");
    let err = plain_fetch(&fetcher, "d", &copy_source).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}
