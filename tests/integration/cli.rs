//! The `bitsmith` binary: `crd`, and `fetch` with its YAML output and one-line errors.

use std::process::{Command, Output};

use crate::support::data::coreutils_digests;
use crate::support::files_under;
use crate::support::http_server::{Reply, TestServer};

fn bitsmith(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    // The test servers are on loopback, which sources may reach only when allowed.
    let allow_loopback: &[&str] =
        if args.first() == Some(&"fetch") { &["--allow-source-cidr", "127.0.0.0/8"] } else { &[] };
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(args)
        .args(allow_loopback)
        .env_remove("BITSMITH_STORE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn manifest(url: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: app\nspec:\n  type: bits\n  source:\n    http:\n      url: {url}\n{extra_spec}"
    )
}

/// `fetch` must fail with exit 1 and exactly one readable line, and store nothing.
fn assert_one_line_failure(input: &str, store: &std::path::Path, expect: &str) {
    let out = bitsmith(&["fetch", "-f", "-", "--store", store.to_str().unwrap(), "--max-size", "1MiB"], Some(input));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, got: {stderr}");
    assert!(stderr.starts_with("bitsmith: ") && stderr.contains(expect), "{expect:?} not in {stderr}");
    assert!(out.stdout.is_empty());
    assert!(files_under(store).is_empty(), "{:?}", files_under(store));
}

#[test]
fn crd_prints_the_generated_definitions() {
    let out = bitsmith(&["crd"], None);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), bitsmith::crd::all_yaml());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_prints_ready_status_with_digests() {
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 41, size: 300_000, length: true });
    let store = tempfile::tempdir().unwrap();
    let expected = coreutils_digests(41, 300_000);
    let input = format!(
        "{}  checksum:\n    type: sha1\n    value: {}\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: copy\n  namespace: other\nspec:\n  type: bits\n  source:\n    package:\n      name: app\n",
        manifest(&server.url("/app.zip"), ""),
        expected.sha1
    );
    // The copy names a Package in another namespace, which is not visible to it.
    let out = bitsmith(&["fetch", "-f", "-", "--store", store.path().to_str().unwrap()], Some(&input));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("package other/copy"));

    let input = input.replace("  namespace: other\n", "");
    let out = bitsmith(&["fetch", "-f", "-", "--store", store.path().to_str().unwrap()], Some(&input));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(docs.len(), 2);
    for doc in &docs {
        let status = &doc["status"];
        assert_eq!(status["state"], "READY", "{doc}");
        assert_eq!(status["checksum"]["type"], "sha256");
        assert_eq!(status["checksum"]["value"], expected.sha256.as_str());
        assert_eq!(status["hash"]["value"], expected.sha1.as_str());
        assert_eq!(status["digest"], format!("sha256:{}", expected.sha256).as_str());
        assert_eq!(status["size"], 300_000);
        assert_eq!(status["conditions"][0]["type"], "Ready");
        assert_eq!(status["conditions"][0]["status"], "True");
        let key = status["blob"]["key"].as_str().unwrap();
        assert_eq!(std::fs::metadata(store.path().join(key)).unwrap().len(), 300_000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_errors_are_one_line_and_store_nothing() {
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 42, size: 2 << 20, length: true });
    server.route("/small.zip", Reply::Body { seed: 42, size: 1000, length: true });
    let store = tempfile::tempdir().unwrap();
    let dir = store.path();
    assert_one_line_failure(&manifest(&server.url("/missing"), ""), dir, "package default/app: ");
    assert_one_line_failure(&manifest(&server.url("/missing"), ""), dir, "HTTP 404");
    assert_one_line_failure(&manifest(&server.url("/app.zip"), ""), dir, "over the maximum of 1048576 bytes");
    let pin = format!("  checksum:\n    type: sha256\n    value: {}\n", "a".repeat(64));
    assert_one_line_failure(&manifest(&server.url("/small.zip"), &pin), dir, "checksum mismatch");
    assert_one_line_failure(&manifest("notaurl", ""), dir, "invalid spec: spec.source.http.url");
    let with_secret = manifest(&server.url("/small.zip"), "")
        .replace("      url:", "      secretRef:\n        name: nope\n      url:");
    assert_one_line_failure(&with_secret, dir, "Secret \"nope\" is not among the input documents");
    assert_one_line_failure("kind: [unclosed", dir, "-: ");
    assert_one_line_failure("apiVersion: v1\nkind: ConfigMap\n", dir, "fetch reads bitsmith.dev/v1alpha1 Package");
    let bad_store =
        bitsmith(&["fetch", "-f", "-", "--store", "ftp://x/y"], Some(&manifest(&server.url("/small.zip"), "")));
    assert_eq!(bad_store.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_store.stderr).contains("unsupported object URL scheme"));

    // An S3 blob is one multipart upload of at most 10 000 parts of 8 MiB: a larger --max-size is refused before
    // any fetch.
    let s3_store = ["--store", "s3://bits/prod?region=eu-west-1", "--store-opt", "aws_access_key_id=AK"];
    let s3_store = [&s3_store[..], &["--store-opt", "aws_secret_access_key=SK", "--max-size", "100GiB"]].concat();
    let too_big =
        bitsmith(&[&["fetch", "-f", "-"][..], &s3_store].concat(), Some(&manifest(&server.url("/small.zip"), "")));
    let stderr = String::from_utf8_lossy(&too_big.stderr);
    assert_eq!((too_big.status.code(), stderr.lines().count()), (Some(1), 1), "{stderr}");
    assert!(
        stderr.contains("--max-size 107374182400 is over the 83886080000 bytes a blob can have in s3://bits/prod"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_upload_packages_need_no_fetch() {
    let store = tempfile::tempdir().unwrap();
    let input = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: img\nspec:\n  type: docker\n  image:\n    reference: registry.example.com/team/app:1.0\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: later\nspec:\n  type: bits\n";
    let out = bitsmith(&["fetch", "-f", "-", "--store", store.path().to_str().unwrap()], Some(input));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(docs[0]["status"]["state"], "READY");
    assert_eq!(docs[1]["status"]["state"], "AWAITING_UPLOAD");
    assert_eq!(docs[1]["status"]["conditions"][0]["reason"], "AwaitingUpload");
    assert!(files_under(store.path()).is_empty());
    let bad_image = input.replace("registry.example.com/team/app:1.0", "Not/A:Valid:Ref");
    assert_one_line_failure(&bad_image, store.path(), "spec.image.reference");
}
