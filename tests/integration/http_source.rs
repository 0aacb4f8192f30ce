//! The http source through the whole pipeline into a `file://` store, against a real loopback server.

use std::time::Duration;

use bitsmith::fetch::Inputs;
use bitsmith::pipeline::PipelineError;
use bitsmith::resources::{Checksum, ChecksumType, Header, HttpSource, ResolvedSource, SecretRef, Source};
use bitsmith::sources::{HttpOptions, SecretData, SourceError};

use crate::support::data::coreutils_digests;
use crate::support::http_server::{Reply, TestServer};
use crate::support::{fetcher, file_fetcher, file_store, files_under, http_source, owner, plain_fetch};

fn secret(entries: &[(&str, &str)]) -> SecretData {
    SecretData {
        name: "creds".into(),
        entries: entries.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
    }
}

#[tokio::test]
async fn digests_match_coreutils_for_every_size() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 30);
    let mib = 1u64 << 20;
    for (i, size) in [0, 1, mib - 1, mib, mib + 1, 8 * mib + 3, 33 * mib + 7].into_iter().enumerate() {
        for length in [true, false] {
            let path = format!("/data-{i}-{length}");
            server.route(&path, Reply::Body { seed: i as u64, size, length });
            let stored = plain_fetch(&fetcher, "sizes", &http_source(server.url(&path))).await.unwrap();
            assert_eq!(stored.digests, coreutils_digests(i as u64, size), "size {size}, content-length {length}");
            let blob = dir.path().join(&stored.blob.key);
            assert_eq!(std::fs::metadata(&blob).unwrap().len(), size);
            assert!(stored.blob.key.ends_with(&stored.digests.sha256));
        }
    }
    assert!(files_under(&dir.path().join("staging")).is_empty(), "no staging leftovers");
}

#[tokio::test]
async fn more_than_a_gibibyte_streams_through() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let size = (1u64 << 30) + 4097;
    server.route("/big", Reply::Body { seed: 77, size, length: true });
    let fetcher = file_fetcher(dir.path(), 2 << 30);
    let stored = plain_fetch(&fetcher, "big", &http_source(server.url("/big"))).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(77, size));
    assert_eq!(files_under(dir.path()).len(), 1, "exactly the blob: {:?}", files_under(dir.path()));
    assert_eq!(std::fs::metadata(dir.path().join(&stored.blob.key)).unwrap().len(), size);
}

/// Fetch `reply` with `fetcher` and return the error; the store must hold nothing afterwards.
async fn failure(reply: Reply, max_size: u64, http_options: HttpOptions, pin: Option<Checksum>) -> PipelineError {
    let server = TestServer::start().await;
    server.route("/x", reply);
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(file_store(dir.path()), http_options, max_size);
    let err = fetcher
        .fetch(&owner("bad"), &http_source(server.url("/x")), pin.as_ref(), Inputs::default())
        .await
        .unwrap_err();
    // The store's writers clean up in the background when dropped; give them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(files_under(dir.path()).is_empty(), "{err}: left {:?}", files_under(dir.path()));
    err
}

#[tokio::test]
async fn http_status_errors_say_whether_to_retry() {
    let err = failure(Reply::Status(404), 1 << 20, HttpOptions::default(), None).await;
    assert!(matches!(err, PipelineError::Source(SourceError::HttpStatus { status: 404, .. })), "{err}");
    assert!(!err.is_permanent(), "a missing artifact may appear later");
    assert!(err.to_string().contains("404"), "{err}");
    let err = failure(Reply::Status(500), 1 << 20, HttpOptions::default(), None).await;
    assert!(!err.is_permanent());
    let err = failure(Reply::Status(403), 1 << 20, HttpOptions::default(), None).await;
    assert!(err.is_permanent(), "{err}");
}

#[tokio::test]
async fn unreachable_source() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = file_fetcher(dir.path(), 1 << 20)
        .fetch(&owner("x"), &http_source(format!("http://{closed}/app.zip")), None, Inputs::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::Unreachable { .. })), "{err}");
    assert!(!err.is_permanent());
    assert!(files_under(dir.path()).is_empty());
}

#[tokio::test]
async fn truncated_body_is_an_interruption() {
    let err =
        failure(Reply::Truncated { seed: 1, announced: 5 << 20, sent: 3 << 20 }, 1 << 30, HttpOptions::default(), None)
            .await;
    assert!(matches!(err, PipelineError::Source(SourceError::Interrupted { .. })), "{err}");
}

#[tokio::test]
async fn stalled_server_times_out() {
    let options = HttpOptions { read_timeout: Duration::from_millis(500), ..HttpOptions::default() };
    let err = failure(Reply::Stall { seed: 1, announced: 4 << 20, sent: 1 << 20 }, 1 << 30, options, None).await;
    assert!(matches!(err, PipelineError::Source(SourceError::Timeout { .. })), "{err}");
}

#[tokio::test]
async fn too_large_is_refused_early_or_while_streaming() {
    let announced =
        failure(Reply::Body { seed: 1, size: 2 << 20, length: true }, 1 << 20, HttpOptions::default(), None).await;
    assert!(
        matches!(announced, PipelineError::Source(SourceError::TooLarge { size, max: 1048576, .. }) if size == 2 << 20),
        "{announced}"
    );
    assert!(announced.is_permanent());
    let chunked =
        failure(Reply::Body { seed: 1, size: 3 << 20, length: false }, 1 << 20, HttpOptions::default(), None).await;
    assert!(matches!(chunked, PipelineError::TooLarge { max: 1048576, .. }), "{chunked}");
    // Exactly at the limit is fine.
    let server = TestServer::start().await;
    server.route("/exact", Reply::Body { seed: 2, size: 1 << 20, length: false });
    let dir = tempfile::tempdir().unwrap();
    let stored = file_fetcher(dir.path(), 1 << 20)
        .fetch(&owner("exact"), &http_source(server.url("/exact")), None, Inputs::default())
        .await
        .unwrap();
    assert_eq!(stored.digests.size, 1 << 20);
}

#[tokio::test]
async fn checksum_pins_are_enforced() {
    let expected = coreutils_digests(5, 3 << 20);
    let wrong = Checksum { checksum_type: ChecksumType::Sha256, value: "0".repeat(64) };
    let err =
        failure(Reply::Body { seed: 5, size: 3 << 20, length: true }, 1 << 30, HttpOptions::default(), Some(wrong))
            .await;
    assert!(matches!(&err, PipelineError::ChecksumMismatch { actual, .. } if *actual == expected.sha256), "{err}");
    assert!(err.is_permanent());

    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 5, size: 3 << 20, length: true });
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 30);
    for pin in [
        Checksum { checksum_type: ChecksumType::Sha256, value: expected.sha256.clone() },
        Checksum { checksum_type: ChecksumType::Sha1, value: expected.sha1.clone() },
    ] {
        let stored =
            fetcher.fetch(&owner("pinned"), &http_source(server.url("/app.zip")), Some(&pin), Inputs::default()).await;
        assert_eq!(stored.unwrap().digests, expected);
    }
}

/// Asked with what an earlier fetch read, an unchanged http source answers 304 and nothing is opened; a changed
/// one is opened, with its new validators. A server without validators is simply fetched.
#[tokio::test]
async fn conditional_requests_open_only_changed_sources() {
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Versioned { seed: 81, size: 300_000, etag: "v1".into() });
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 30);
    let source = http_source(server.url("/app.zip"));
    let first = fetcher.fetch(&owner("versioned"), &source, None, Inputs::default()).await.unwrap();
    let known = first.resolved.clone().unwrap();
    assert_eq!(known.etag.as_deref(), Some("\"v1\""));
    assert!(known.last_modified.is_some());

    let inputs = Inputs { known: Some(&known), ..Default::default() };
    assert!(fetcher.open(&source, inputs).await.unwrap().is_none(), "304: unchanged");
    let asked = server.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked.headers.get("if-none-match").map(String::as_str), Some("\"v1\""));
    assert!(asked.headers.contains_key("if-modified-since"), "{:?}", asked.headers);

    server.route("/app.zip", Reply::Versioned { seed: 82, size: 200_000, etag: "v2".into() });
    let inputs = Inputs { known: Some(&known), ..Default::default() };
    let changed = fetcher.open(&source, inputs).await.unwrap().expect("changed");
    assert_eq!(changed.resolved().unwrap().etag.as_deref(), Some("\"v2\""));
    let stored = changed.store(&owner("versioned"), None).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(82, 200_000));

    server.route("/plain.zip", Reply::Body { seed: 83, size: 1000, length: true });
    let plain = ResolvedSource { url: server.url("/plain.zip"), ..Default::default() };
    let inputs = Inputs { known: Some(&plain), ..Default::default() };
    assert!(fetcher.open(&http_source(server.url("/plain.zip")), inputs).await.unwrap().is_some());
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let server = TestServer::start().await;
    server.route("/old", Reply::Redirect("/new".into()));
    server.route("/new", Reply::Body { seed: 9, size: 1000, length: true });
    server.route("/loop", Reply::Redirect("/loop".into()));
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 20);
    let stored = plain_fetch(&fetcher, "r", &http_source(server.url("/old"))).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(9, 1000));
    let err = plain_fetch(&fetcher, "r", &http_source(server.url("/loop"))).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::TooManyRedirects { limit: 10, .. })), "{err}");
}

#[tokio::test]
async fn credentials_and_headers_come_from_the_secret() {
    let server = TestServer::start().await;
    let body = || Box::new(Reply::Body { seed: 3, size: 4096, length: true });
    // "alice:s3cret" in base64.
    server.route(
        "/basic",
        Reply::Require { header: "authorization".into(), value: "Basic YWxpY2U6czNjcmV0".into(), then: body() },
    );
    server.route(
        "/bearer",
        Reply::Require { header: "authorization".into(), value: "Bearer t0ken".into(), then: body() },
    );
    server.route(
        "/headers",
        Reply::Require {
            header: "x-api-key".into(),
            value: "k3y".into(),
            then: Box::new(Reply::Require { header: "x-team".into(), value: "blue".into(), then: body() }),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 20);
    let with_ref = |path: &str, headers: Vec<Header>| Source {
        http: Some(HttpSource {
            url: server.url(path),
            secret_ref: Some(SecretRef { name: "creds".into() }),
            headers,
            ca_bundle: None,
        }),
        ..Default::default()
    };
    let expected = coreutils_digests(3, 4096);
    let basic = secret(&[("username", "alice"), ("password", "s3cret")]);
    let bearer = secret(&[("bearerToken", "t0ken\n")]);
    let header = secret(&[("header.X-Api-Key", "k3y")]);
    for (path, secret, headers) in [
        ("/basic", &basic, vec![]),
        ("/bearer", &bearer, vec![]),
        ("/headers", &header, vec![Header { name: "X-Team".into(), value: "blue".into() }]),
    ] {
        let inputs = Inputs { secret: Some(secret), source_package: None, ..Default::default() };
        let stored = fetcher.fetch(&owner("auth"), &with_ref(path, headers), None, inputs).await;
        assert_eq!(stored.unwrap().digests, expected, "{path}");
    }
    let err = plain_fetch(&fetcher, "auth", &http_source(server.url("/basic"))).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::HttpStatus { status: 401, .. })), "{err}");
    let seen = server.seen.lock().unwrap().clone();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/basic");
    assert!(!last.headers.contains_key("authorization"), "no credentials without a secretRef");
    assert!(last.headers["user-agent"].starts_with("bitsmith/"));
    let incomplete = secret(&[("username", "alice")]);
    let inputs = Inputs { secret: Some(&incomplete), source_package: None, ..Default::default() };
    let err = fetcher.fetch(&owner("auth"), &with_ref("/basic", vec![]), None, inputs).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::InvalidCredentials { .. })), "{err}");
    assert!(err.to_string().contains("no password"), "{err}");
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let (cert, key) = crate::support::self_signed();
    let server = TestServer::start_tls(&cert, &key).await;
    server.route("/app.zip", Reply::Body { seed: 4, size: 70_000, length: true });
    let dir = tempfile::tempdir().unwrap();
    let fetcher = file_fetcher(dir.path(), 1 << 20);
    let err = plain_fetch(&fetcher, "tls", &http_source(server.url("/app.zip"))).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::Tls { .. })), "{err}");
    assert!(err.is_permanent());
    assert!(files_under(dir.path()).is_empty());

    let trusted = Source {
        http: Some(HttpSource {
            url: server.url("/app.zip"),
            ca_bundle: Some(String::from_utf8(cert.clone()).unwrap()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let stored = plain_fetch(&fetcher, "tls", &trusted).await.unwrap();
    assert_eq!(stored.digests, coreutils_digests(4, 70_000));

    let garbage = Source {
        http: Some(HttpSource {
            url: server.url("/app.zip"),
            ca_bundle: Some("not a pem".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = plain_fetch(&fetcher, "tls", &garbage).await.unwrap_err();
    assert!(matches!(err, PipelineError::Source(SourceError::InvalidCredentials { .. })), "{err}");
}
