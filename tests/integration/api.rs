//! The CF v3 API over real loopback sockets with a real client, beside the controller, against the real control
//! plane: real ServiceAccount tokens, checked by TokenReview and SubjectAccessReview.

use std::time::{Duration, Instant};

use bitsmith::api::{ApiConfig, AppState, Index};
use bitsmith::controller::{self, Options};
use bitsmith::fetch::Fetcher;
use bitsmith::links::ApiUrls;
use bitsmith::store::BlobStore;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::data::{bytes, coreutils_digests};
use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::{
    install_crds, kube_ok, kubectl, namespace, service_account_token, service_account_with_role, wait_for,
};
use crate::support::{fetcher, file_store};

/// A namespace with a controller, an API on loopback over the same store, a source server, and tokens.
struct Setup {
    ns: String,
    server: TestServer,
    /// The API's base URL.
    base: String,
    /// A token RBAC allows uploads and downloads.
    allowed: String,
    /// A valid token RBAC allows nothing.
    denied: String,
    http: reqwest::Client,
    /// The API's transfer budget, which counts the uploads' time.
    transfers: bitsmith::budget::TransferBudget,
    _store: Option<tempfile::TempDir>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// The API over `store`, served with `tls` when given, and a controller fetching into the same store.
async fn setup_with(
    test: &str,
    store: BlobStore,
    tls: Option<rustls::ServerConfig>,
    tweak: impl FnOnce(&mut ApiConfig),
) -> Setup {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace(test));
    let server = TestServer::start().await;
    let client = kube::Client::try_default().await.expect("a client for the test control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base = format!("{scheme}://{}", listener.local_addr().unwrap());
    let urls = ApiUrls::new(&url::Url::parse(&base).unwrap());
    let options = Options {
        concurrency: 4,
        namespace: Some(ns.clone()),
        reporter: "bitsmith-test".into(),
        metrics: Default::default(),
        urls: Some(urls.clone()),
        upload_claim_timeout: std::time::Duration::from_secs(60),
        package_retention: Default::default(),
        droplet_retention: Default::default(),
        audit: Default::default(),
    };
    let fetcher: Fetcher = fetcher(store.clone(), Default::default(), 1 << 30);
    let running =
        tokio::spawn(controller::run(client.clone(), fetcher, options, bitsmith::leader::Leadership::always()));

    let mut config = ApiConfig::new(urls);
    config.download_url_ttl = Duration::from_secs(60);
    config.auth_cache_ttl = Duration::from_secs(5);
    tweak(&mut config);
    let transfers = config.transfers.clone();
    let index = Index::start(&client, Some(&ns));
    index.ready().await;
    let state = AppState::new(client, store, index, config, Default::default(), None);
    let api = tokio::spawn(async move {
        bitsmith::api::serve(listener, tls, state, std::future::pending()).await;
    });
    let (allowed, denied) = tokio::task::block_in_place(|| {
        (service_account_with_role(&ns, "uploader", "bitsmith-uploader"), service_account_token(&ns, "stranger", None))
    });
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Setup { ns, server, base, allowed, denied, http, transfers, _store: None, tasks: vec![running, api] }
}

async fn setup(test: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut setup = setup_with(test, file_store(dir.path()), None, |_| ()).await;
    setup._store = Some(dir);
    setup
}

impl Setup {
    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("bearer {token}"));
        }
        request.send().await.unwrap()
    }

    fn uid(&self, object: &str) -> String {
        kube_ok(&["get", object, "-n", &self.ns, "-o", "jsonpath={.metadata.uid}"], None)
    }

    fn apply(&self, manifest: &str) {
        kube_ok(&["apply", "-n", &self.ns, "-f", "-"], Some(manifest));
    }
}

/// Status and CF error `(title, code, detail)` of an answer.
pub(crate) async fn cf_error(response: reqwest::Response) -> (StatusCode, String, u64, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    let error = &body["errors"][0];
    (
        status,
        error["title"].as_str().unwrap().into(),
        error["code"].as_u64().unwrap(),
        error["detail"].as_str().unwrap().into(),
    )
}

fn http_package(name: &str, url: &str) -> String {
    format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  appRef:\n    name: web\n  source:\n    http:\n      url: {url}\n"
    )
}

const OTHER_PACKAGES: &str = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: nginx:1.27\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: empty\nspec:\n  type: bits\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_are_shown_and_downloaded_to_those_rbac_allows() {
    let s = setup("api-packages").await;
    let size = 3u64 << 20;
    s.server.route("/app.zip", Reply::Body { seed: 70, size, length: true });
    s.apply(&http_package("app", &s.server.url("/app.zip")));
    s.apply(OTHER_PACKAGES);
    wait_for(&s.ns, "pkg/app", "{.status.state}", "READY").await;
    wait_for(&s.ns, "pkg/image", "{.status.state}", "READY").await;
    wait_for(&s.ns, "pkg/empty", "{.status.state}", "AWAITING_UPLOAD").await;
    let expected = coreutils_digests(70, size);
    let guid = s.uid("pkg/app");
    let path = format!("/v3/packages/{guid}");
    let status_link = kube_ok(&["get", "pkg/app", "-n", &s.ns, "-o", "jsonpath={.status.links.download.href}"], None);
    assert_eq!(status_link, format!("{}{path}/download", s.base), "the status links to the API");
    let artifact = kube_ok(
        &[
            "get",
            "pkg/app",
            "-n",
            &s.ns,
            "-o",
            "jsonpath={.status.artifact.url} {.status.artifact.digest} {.status.artifact.size}",
        ],
        None,
    );
    assert_eq!(
        artifact,
        format!("{status_link} sha256:{} {size}", coreutils_digests(70, size).sha256),
        "a Flux-style artifact"
    );

    let response = s.get(&path, Some(&s.allowed)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let package: Value = response.json().await.unwrap();
    assert_eq!(package["guid"], guid.as_str());
    assert_eq!(package["type"], "bits");
    assert_eq!(package["state"], "READY");
    assert_eq!(package["data"]["checksum"], serde_json::json!({"type": "sha256", "value": expected.sha256}));
    assert_eq!(package["data"]["error"], Value::Null);
    assert_eq!(package["relationships"]["app"]["data"]["guid"], "web");
    assert_eq!(package["links"]["download"]["href"], format!("{}{path}/download", s.base));
    let created = package["created_at"].as_str().unwrap();
    assert!(created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T', "{created}");

    // Who may see it.
    let cases = [
        (Some(s.denied.as_str()), StatusCode::FORBIDDEN, "CF-NotAuthorized", 10003),
        (Some("not-a-token"), StatusCode::UNAUTHORIZED, "CF-InvalidAuthToken", 1000),
        (None, StatusCode::UNAUTHORIZED, "CF-NotAuthenticated", 10002),
    ];
    for (token, status, title, code) in cases {
        let (got_status, got_title, got_code, _) = cf_error(s.get(&path, token).await).await;
        assert_eq!((got_status, got_title.as_str(), got_code), (status, title, code), "token {token:?}");
    }
    let unknown = cf_error(s.get("/v3/packages/7d5e2f3c-0000-4000-8000-000000000000", Some(&s.allowed)).await).await;
    assert_eq!(unknown, (StatusCode::NOT_FOUND, "CF-ResourceNotFound".into(), 10010, "Package not found".into()));
    let route = cf_error(s.get("/v3/nothing-here", Some(&s.allowed)).await).await;
    assert_eq!(route, (StatusCode::NOT_FOUND, "CF-NotFound".into(), 10000, "Unknown request".into()));

    // The bits, whole and in part.
    let response = s.get(&format!("{path}/download"), Some(&s.allowed)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-length"], size.to_string().as_str());
    let body = response.bytes().await.unwrap();
    assert_eq!(bitsmith::digest::to_hex(&Sha256::digest(&body)), expected.sha256);
    let ranged = s
        .http
        .get(format!("{}{path}/download", s.base))
        .header("Authorization", format!("bearer {}", s.allowed))
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.headers()["content-range"], format!("bytes 1000-1999/{size}").as_str());
    assert_eq!(ranged.bytes().await.unwrap(), body.slice(1000..2000));
    let denied = cf_error(s.get(&format!("{path}/download"), Some(&s.denied)).await).await;
    assert_eq!(denied.0, StatusCode::FORBIDDEN);

    let docker =
        cf_error(s.get(&format!("/v3/packages/{}/download", s.uid("pkg/image")), Some(&s.allowed)).await).await;
    assert_eq!(
        docker,
        (StatusCode::UNPROCESSABLE_ENTITY, "CF-UnprocessableEntity".into(), 10008, "Package type must be bits.".into())
    );
    let empty = cf_error(s.get(&format!("/v3/packages/{}/download", s.uid("pkg/empty")), Some(&s.allowed)).await).await;
    assert_eq!(empty.3, "Package has no bits to download.");
    let image: Value =
        s.get(&format!("/v3/packages/{}", s.uid("pkg/image")), Some(&s.allowed)).await.json().await.unwrap();
    assert_eq!(image["data"]["image"], "nginx:1.27");
    assert!(image["links"].get("download").is_none());

    // A store that lost the bits answers 502, not a broken stream.
    let blob = kube_ok(&["get", "pkg/app", "-n", &s.ns, "-o", "jsonpath={.status.blob.key}"], None);
    std::fs::remove_file(s._store.as_ref().unwrap().path().join(blob)).unwrap();
    let gone = cf_error(s.get(&format!("{path}/download"), Some(&s.allowed)).await).await;
    assert_eq!((gone.0, gone.1.as_str(), gone.2), (StatusCode::BAD_GATEWAY, "CF-BlobstoreUnavailable", 150006));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn droplets_and_their_jobs_are_shown() {
    let s = setup("api-droplets").await;
    s.server.route("/droplet.tgz", Reply::Body { seed: 71, size: 50_000, length: true });
    s.apply(OTHER_PACKAGES);
    let droplet = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: web\nspec:\n  packageRef:\n    name: empty\n  processTypes:\n    web: ./start\n  source:\n    http:\n      url: {}\n",
        s.server.url("/droplet.tgz")
    );
    s.apply(&droplet);
    wait_for(&s.ns, "droplet/web", "{.status.state}", "STAGED").await;
    let guid = s.uid("droplet/web");
    let json: Value = s.get(&format!("/v3/droplets/{guid}"), Some(&s.allowed)).await.json().await.unwrap();
    assert_eq!(json["state"], "STAGED");
    assert_eq!(json["checksum"]["value"], coreutils_digests(71, 50_000).sha256);
    assert_eq!(json["process_types"]["web"], "./start");
    assert_eq!(json["links"]["package"]["href"], format!("{}/v3/packages/{}", s.base, s.uid("pkg/empty")));
    assert!(json["links"].get("upload").is_none());
    let download = s.get(&format!("/v3/droplets/{guid}/download"), Some(&s.allowed)).await;
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.bytes().await.unwrap().len(), 50_000);

    let job: Value = s.get(&format!("/v3/jobs/{guid}"), Some(&s.allowed)).await.json().await.unwrap();
    assert_eq!((job["operation"].as_str(), job["state"].as_str()), (Some("droplet.upload"), Some("COMPLETE")));
    assert_eq!(job["links"]["droplet"]["href"], format!("{}/v3/droplets/{guid}", s.base));
    let missing = cf_error(s.get("/v3/jobs/7d5e2f3c-0000-4000-8000-000000000000", Some(&s.allowed)).await).await;
    assert_eq!(missing.3, "Job not found");
    let denied = cf_error(s.get(&format!("/v3/droplets/{guid}"), Some(&s.denied)).await).await;
    assert_eq!(denied.0, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_store_answers_downloads_with_a_presigned_redirect() {
    use crate::support::cloud::{Cloud, S3};
    let s3 = S3::from_env();
    let (store, _) = s3.store("api-presigned");
    let s = setup_with("api-presigned", store, None, |_| ()).await;
    s.server.route("/app.zip", Reply::Body { seed: 72, size: 200_000, length: true });
    s.apply(&http_package("app", &s.server.url("/app.zip")));
    wait_for(&s.ns, "pkg/app", "{.status.state}", "READY").await;
    let response = s.get(&format!("/v3/packages/{}/download", s.uid("pkg/app")), Some(&s.allowed)).await;
    assert_eq!(response.status(), StatusCode::FOUND);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&s3.endpoint), "{location}");
    assert_eq!(response.text().await.unwrap(), "You are being redirected.");
    // The signed URL is enough on its own: no Authorization is forwarded.
    let bits = reqwest::get(&location).await.unwrap();
    assert_eq!(bits.status(), StatusCode::OK);
    assert_eq!(
        bitsmith::digest::to_hex(&Sha256::digest(bits.bytes().await.unwrap())),
        coreutils_digests(72, 200_000).sha256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_binary_serves_tls_on_its_own() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("api-binary"));
    let (cert, key) = crate::support::self_signed();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), &key).unwrap();
    let port = crate::support::ports::free_port();
    let ops_port = crate::support::ports::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["api", "--namespace", &ns, "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{ops_port}")])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .arg("--store")
        .arg(dir.path().join("store"))
        .env("KUBECONFIG", crate::support::kube::kubeconfig())
        .spawn()
        .unwrap();
    let docker = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: nginx:1.27\n";
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(docker));
    let guid = kube_ok(&["get", "pkg/image", "-n", &ns, "-o", "jsonpath={.metadata.uid}"], None);
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "viewer", "bitsmith-viewer"));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}/v3/packages/{guid}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let json: Value = loop {
        match client.get(&url).bearer_auth(&token).send().await {
            Ok(response) if response.status() == StatusCode::OK => break response.json().await.unwrap(),
            other => assert!(Instant::now() < deadline, "the API did not answer: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(json["links"]["self"]["href"], url.as_str());
    assert_eq!(json["state"], "READY", "a docker Package is READY on creation, before any controller ran");
    let ready = reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200, "ready once serving");
    // The request's TokenReview and SubjectAccessReview were timed.
    let metrics = reqwest::get(format!("http://127.0.0.1:{ops_port}/metrics")).await.unwrap().text().await.unwrap();
    for kind in ["TokenReview", "SubjectAccessReview"] {
        let series = format!("bitsmith_kubernetes_review_duration_seconds_count{{kind=\"{kind}\"}}");
        let count = crate::support::metrics::value(&metrics, &series).unwrap_or(0.0);
        assert!(count >= 1.0, "no {kind} timed in\n{metrics}");
    }
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/v3/packages/{guid}")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP is not served");
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the API did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");
}

/// A real `.tgz` made with tar, and its sha256 from sha256sum.
fn droplet_tgz(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let app = dir.join("app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(app.join("bin/start"), "#!/bin/sh\nexec ./web\n").unwrap();
    std::fs::write(app.join("web.bin"), vec![7u8; 300_000]).unwrap();
    let tgz = dir.join("droplet.tgz");
    let status = std::process::Command::new("tar").arg("-czf").arg(&tgz).arg("-C").arg(&app).arg(".").status().unwrap();
    assert!(status.success());
    let sum = std::process::Command::new("sha256sum").arg(&tgz).output().unwrap();
    let sha256 = String::from_utf8(sum.stdout).unwrap().split_whitespace().next().unwrap().to_string();
    (tgz, sha256)
}

/// `curl -F bits=@file` as a CF client uploads: status, headers and body.
fn curl_upload(url: &str, token: &str, file: &std::path::Path) -> (u16, String, Value) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-X", "POST", "-H", &format!("Authorization: bearer {token}"), "-F"])
        .arg(format!("bits=@{}", file.display()))
        .arg(url)
        .output()
        .expect("curl");
    let mut text = String::from_utf8(out.stdout).unwrap();
    // curl asks before sending a big body: skip the interim "100 Continue".
    while text.starts_with("HTTP/1.1 100") {
        text = text.split_once("\r\n\r\n").map(|(_, rest)| rest.to_string()).unwrap_or_default();
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_droplet_upload_is_followed_through_its_job() {
    let s = setup("api-droplet-upload").await;
    let awaiting = "apiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: web\nspec:\n  processTypes:\n    web: ./start\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: bad\nspec: {}\n";
    s.apply(awaiting);
    wait_for(&s.ns, "droplet/web", "{.status.state}", "AWAITING_UPLOAD").await;
    wait_for(&s.ns, "droplet/bad", "{.status.state}", "AWAITING_UPLOAD").await;
    let guid = s.uid("droplet/web");
    let shown: Value = s.get(&format!("/v3/droplets/{guid}"), Some(&s.allowed)).await.json().await.unwrap();
    assert_eq!(shown["links"]["upload"]["href"], format!("{}/v3/droplets/{guid}/upload", s.base));

    let dir = tempfile::tempdir().unwrap();
    let (tgz, sha256) = droplet_tgz(dir.path());
    let url = format!("{}/v3/droplets/{guid}/upload", s.base);
    let denied = tokio::task::block_in_place(|| curl_upload(&url, &s.denied, &tgz));
    assert_eq!((denied.0, denied.2["errors"][0]["title"].as_str()), (403, Some("CF-NotAuthorized")));

    let (status, head, body) = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, &tgz));
    assert_eq!(status, 202, "{body}");
    assert!(head.contains(&format!("location: {}/v3/jobs/{guid}\r\n", s.base)), "{head}");
    assert_eq!(body["guid"], guid.as_str());
    assert_eq!(body["state"], "PROCESSING_UPLOAD");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = s.get(&format!("/v3/jobs/{guid}"), Some(&s.allowed)).await.json().await.unwrap();
        if job["state"] == "COMPLETE" {
            break;
        }
        assert_eq!(job["state"], "PROCESSING", "{job}");
        assert!(Instant::now() < deadline, "the job never completed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(&s.ns, "droplet/web", "{.status.state}", "STAGED").await;
    wait_for(&s.ns, "droplet/web", "{.status.checksum.value}", &sha256).await;
    let bits = s.get(&format!("/v3/droplets/{guid}/download"), Some(&s.allowed)).await.bytes().await.unwrap();
    assert_eq!(bits, std::fs::read(&tgz).unwrap());

    // Once staged, a droplet takes no more uploads.
    let again = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, &tgz));
    assert_eq!((again.0, again.2["errors"][0]["title"].as_str()), (422, Some("CF-UnprocessableEntity")));

    // What is not a .tgz is refused, and the droplet says why.
    let bad = dir.path().join("app.zip");
    std::fs::write(&bad, b"PK\x03\x04 not a tarball").unwrap();
    let bad_url = format!("{}/v3/droplets/{}/upload", s.base, s.uid("droplet/bad"));
    let (status, _, body) = tokio::task::block_in_place(|| curl_upload(&bad_url, &s.allowed, &bad));
    assert_eq!(status, 422);
    let detail = body["errors"][0]["detail"].as_str().unwrap();
    assert!(detail.starts_with("Uploaded droplet file is invalid: "), "{detail}");
    wait_for(&s.ns, "droplet/bad", "{.status.state}", "FAILED").await;
    let events = kube_ok(&["get", "events", "-n", &s.ns, "-o", "jsonpath={.items[*].reason}"], None);
    assert!(events.contains("InvalidBits") && events.contains("Uploading"), "{events}");
}

/// A zip made by Python's zipfile in `dir`: `script` adds entries to `z`.
pub(crate) fn python_zip(dir: &std::path::Path, name: &str, script: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let program = format!(
        "import zipfile, os\nz = zipfile.ZipFile({:?}, 'w', zipfile.ZIP_DEFLATED)\n{script}\nz.close()",
        path.display().to_string()
    );
    let out = std::process::Command::new("python3").args(["-c", &program]).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    path
}

/// Each file of a zip as `name:sha1` (directories as `name`), sorted; and Python's opinion of its integrity.
pub(crate) fn zip_contents(zip: &[u8]) -> Vec<String> {
    use std::io::Write;
    let program = "import sys, zipfile, io, hashlib\nz = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))\nassert z.testzip() is None\nfor i in z.infolist(): print(i.filename if i.is_dir() else i.filename + ':' + hashlib.sha1(z.read(i)).hexdigest())";
    let mut child = std::process::Command::new("python3")
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(zip).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not a valid zip");
    let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    lines.sort();
    lines
}

pub(crate) fn sha1_hex(bytes: &[u8]) -> String {
    bitsmith::digest::to_hex(&sha1::Sha1::digest(bytes))
}

const UPLOAD_PACKAGES: &str = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: first\nspec:\n  type: bits\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: second\nspec:\n  type: bits\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: bomb\nspec:\n  type: bits\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_feed_the_resource_cache_and_matched_files_come_back() {
    let s = setup("api-upload").await;
    s.apply(UPLOAD_PACKAGES);
    wait_for(&s.ns, "pkg/first", "{.status.state}", "AWAITING_UPLOAD").await;
    wait_for(&s.ns, "pkg/second", "{.status.state}", "AWAITING_UPLOAD").await;
    let dir = tempfile::tempdir().unwrap();
    let (lib, vendor) = (bytes(1, 100_000), bytes(2, 300_000));
    std::fs::write(dir.path().join("lib.bin"), &lib).unwrap();
    std::fs::write(dir.path().join("vendor.bin"), &vendor).unwrap();
    let script = format!(
        "z.write({lib:?}, 'app/lib.bin')\nz.write({vendor:?}, 'app/vendor.bin')\nz.writestr('app/main.py', 'print(1)')\nz.writestr('app/static/', '')\ni = zipfile.ZipInfo('app/passwd')\ni.create_system = 3\ni.external_attr = 0o120777 << 16\nz.writestr(i, '/etc/passwd')",
        lib = dir.path().join("lib.bin").display().to_string(),
        vendor = dir.path().join("vendor.bin").display().to_string(),
    );
    let zip = python_zip(dir.path(), "app.zip", &script);

    // The first upload, with curl, as the cf CLI sends it.
    let first = s.uid("pkg/first");
    let url = format!("{}/v3/packages/{first}/upload", s.base);
    let (status, _, body) = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, &zip));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "PROCESSING_UPLOAD");
    wait_for(&s.ns, "pkg/first", "{.status.state}", "READY").await;
    // The upload counted its time and where it waited.
    let counted = s.transfers.metrics();
    assert!(counted.seconds.get() > 0.0, "the upload's time is counted");
    assert!(counted.waited.get_or_create(&bitsmith::budget::StageLabel::of("source")).get() > 0.0);
    let stored = s.get(&format!("/v3/packages/{first}/download"), Some(&s.allowed)).await.bytes().await.unwrap();
    let mut want = vec![
        format!("app/lib.bin:{}", sha1_hex(&lib)),
        format!("app/main.py:{}", sha1_hex(b"print(1)")),
        "app/static/".to_string(),
        format!("app/vendor.bin:{}", sha1_hex(&vendor)),
    ];
    assert_eq!(zip_contents(&stored), want, "the symlink is gone, every file intact");
    let shown: Value = s.get(&format!("/v3/packages/{first}"), Some(&s.allowed)).await.json().await.unwrap();
    assert_eq!(shown["data"]["checksum"]["value"], bitsmith::digest::to_hex(&Sha256::digest(&stored)));

    // Which files does the server have? The two big ones: small files and unknown ones are never matched.
    let item = |sha1: &str, size: usize, path: &str| serde_json::json!({"checksum": {"value": sha1}, "size_in_bytes": size, "path": path, "mode": "644"});
    let request = serde_json::json!({"resources": [
        item(&sha1_hex(&lib), lib.len(), "app/lib.bin"),
        item(&sha1_hex(&vendor), vendor.len(), "app/vendor.bin"),
        item(&sha1_hex(b"print(1)"), 8, "app/main.py"),
        item(&"0".repeat(40), 100_000, "app/unknown.bin"),
    ]});
    let response = s
        .http
        .post(format!("{}/v3/resource_matches", s.base))
        .bearer_auth(&s.allowed)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let matched: Value = response.json().await.unwrap();
    assert_eq!(matched["resources"], serde_json::json!([request["resources"][0], request["resources"][1]]));
    let nobody = s.http.post(format!("{}/v3/resource_matches", s.base)).json(&request).send().await.unwrap();
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);

    // The second upload, with reqwest: only the new file in bits, the matched ones by reference.
    let resources = serde_json::json!([
        {"path": "app/lib.bin", "size_in_bytes": lib.len(), "checksum": {"value": sha1_hex(&lib)}, "mode": "644"},
        {"fn": "app/vendor.bin", "size": vendor.len(), "sha1": sha1_hex(&vendor), "mode": "755"},
    ]);
    let only_new = python_zip(dir.path(), "new.zip", "z.writestr('app/main.py', 'print(2)')");
    let form = reqwest::multipart::Form::new()
        .text("resources", resources.to_string())
        .part("bits", reqwest::multipart::Part::bytes(std::fs::read(&only_new).unwrap()).file_name("new.zip"));
    let second = s.uid("pkg/second");
    let response = s
        .http
        .post(format!("{}/v3/packages/{second}/upload", s.base))
        .bearer_auth(&s.allowed)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    wait_for(&s.ns, "pkg/second", "{.status.state}", "READY").await;
    let stored = s.get(&format!("/v3/packages/{second}/download"), Some(&s.allowed)).await.bytes().await.unwrap();
    want.retain(|line| !line.starts_with("app/main.py") && line != "app/static/");
    want.push(format!("app/main.py:{}", sha1_hex(b"print(2)")));
    want.sort();
    assert_eq!(zip_contents(&stored), want, "the package holds every file");

    // A READY package takes no second upload.
    let again = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, &zip));
    assert_eq!((again.0, again.2["errors"][0]["code"].as_u64()), (400, Some(150004)));

    // A cached file that no longer matches its sha1 fails the upload that names it, and leaves the cache.
    let store = s._store.as_ref().unwrap().path();
    let cached: Vec<_> = crate::support::files_under(store)
        .into_iter()
        .filter(|f| f.starts_with(format!("resource-cache/{}", sha1_hex(&lib))))
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mut bytes = std::fs::read(store.join(&cached[0])).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(store.join(&cached[0]), bytes).unwrap();
    s.apply("apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: third\nspec:\n  type: bits\n");
    wait_for(&s.ns, "pkg/third", "{.status.state}", "AWAITING_UPLOAD").await;
    let form = reqwest::multipart::Form::new().text("resources", serde_json::json!([resources[0]]).to_string());
    let third = format!("{}/v3/packages/{}/upload", s.base, s.uid("pkg/third"));
    let response = s.http.post(&third).bearer_auth(&s.allowed).multipart(form).send().await.unwrap();
    let (status, title, code, _) = cf_error(response).await;
    assert_eq!(
        (status, title.as_str(), code),
        (StatusCode::INTERNAL_SERVER_ERROR, "CF-ResourceChecksumMismatch", 150010)
    );
    assert!(!store.join(&cached[0]).exists(), "the corrupt file left the cache");

    // Well under the size limit, a zip bomb shows itself by its ratio.
    wait_for(&s.ns, "pkg/bomb", "{.status.state}", "AWAITING_UPLOAD").await;
    let bomb = python_zip(dir.path(), "bomb.zip", "z.writestr('zeros', bytes(50 << 20))");
    let url = format!("{}/v3/packages/{}/upload", s.base, s.uid("pkg/bomb"));
    let (status, _, body) = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, &bomb));
    assert_eq!((status, body["errors"][0]["title"].as_str()), (400, Some("CF-AppBitsUploadInvalid")));
    assert!(body["errors"][0]["detail"].as_str().unwrap().contains("zip bomb"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_with_cf_errors() {
    let s = setup_with("api-bad-upload", file_store(tempfile::tempdir().unwrap().keep().as_path()), None, |c| {
        c.max_package_size = 1 << 20
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let names = ["slip", "bomb", "truncated", "oversize", "resources", "empty", "offload", "race"];
    let manifests: Vec<String> = names
        .iter()
        .map(|n| {
            format!("apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {n}\nspec:\n  type: bits\n")
        })
        .collect();
    s.apply(&manifests.join("---\n"));
    for name in names {
        wait_for(&s.ns, &format!("pkg/{name}"), "{.status.state}", "AWAITING_UPLOAD").await;
    }
    let upload_url = |name: &str| format!("{}/v3/packages/{}/upload", s.base, s.uid(&format!("pkg/{name}")));
    let curl = |name: &str, file: &std::path::Path| {
        let url = upload_url(name);
        let (status, _, body) = tokio::task::block_in_place(|| curl_upload(&url, &s.allowed, file));
        let error = &body["errors"][0];
        (
            status,
            error["title"].as_str().unwrap_or_default().to_string(),
            error["detail"].as_str().unwrap_or_default().to_string(),
        )
    };

    let slip = python_zip(dir.path(), "slip.zip", "z.writestr('../../etc/cron.d/evil', 'x')");
    let (status, title, detail) = curl("slip", &slip);
    assert_eq!((status, title.as_str()), (400, "CF-AppBitsUploadInvalid"), "{detail}");
    assert!(detail.starts_with("The app upload is invalid: Invalid zip archive"), "{detail}");
    wait_for(&s.ns, "pkg/slip", "{.status.state}", "FAILED").await;

    // Under this small limit a zip bomb is stopped as too large before its ratio shows.
    let bomb = python_zip(dir.path(), "bomb.zip", "z.writestr('zeros', bytes(20 << 20))");
    let (status, title, detail) = curl("bomb", &bomb);
    assert_eq!((status, title.as_str()), (400, "CF-AppPackageInvalid"), "{detail}");

    let whole = std::fs::read(python_zip(dir.path(), "whole.zip", "z.writestr('a.txt', 'hello' * 1000)")).unwrap();
    let truncated = dir.path().join("truncated.zip");
    std::fs::write(&truncated, &whole[..whole.len() - 40]).unwrap();
    let (status, title, _) = curl("truncated", &truncated);
    assert_eq!((status, title.as_str()), (400, "CF-AppBitsUploadInvalid"));

    let big = dir.path().join("big.bin");
    std::fs::write(&big, bytes(3, 2 << 20)).unwrap();
    let oversize =
        python_zip(dir.path(), "oversize.zip", &format!("z.write({:?}, 'big.bin')", big.display().to_string()));
    let (status, title, detail) = curl("oversize", &oversize);
    assert_eq!((status, title.as_str()), (400, "CF-AppPackageInvalid"), "{detail}");

    // Request errors leave the package waiting for a good upload.
    let form = reqwest::multipart::Form::new().text("resources", "[{not json");
    let response = s.http.post(upload_url("resources")).bearer_auth(&s.allowed).multipart(form).send().await.unwrap();
    let (status, title, _, detail) = cf_error(response).await;
    assert_eq!(
        (status, title.as_str(), detail.as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "CF-UnprocessableEntity", "Resources must be valid JSON.")
    );
    wait_for(&s.ns, "pkg/resources", "{.status.state}", "AWAITING_UPLOAD").await;
    let form = reqwest::multipart::Form::new().text("other", "x");
    let response = s.http.post(upload_url("empty")).bearer_auth(&s.allowed).multipart(form).send().await.unwrap();
    assert_eq!(cf_error(response).await.3, "Upload must include either resources or bits");
    let form = reqwest::multipart::Form::new().text("bits_name", "app.zip").text("bits_path", "/tmp/upload/0001");
    let response = s.http.post(upload_url("offload")).bearer_auth(&s.allowed).multipart(form).send().await.unwrap();
    assert_eq!(cf_error(response).await.3, "Bits path is accepted only from the upload-offloading proxy");
    let response = s
        .http
        .post(format!("{}?bits_path=/etc/passwd", upload_url("offload")))
        .bearer_auth(&s.allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(cf_error(response).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    wait_for(&s.ns, "pkg/offload", "{.status.state}", "AWAITING_UPLOAD").await;

    // Of two uploads at once, exactly one wins.
    let good = std::fs::read(python_zip(dir.path(), "good.zip", "z.writestr('a.txt', 'hello')")).unwrap();
    let send = || {
        let form = reqwest::multipart::Form::new()
            .part("bits", reqwest::multipart::Part::bytes(good.clone()).file_name("a.zip"));
        s.http.post(upload_url("race")).bearer_auth(&s.allowed).multipart(form).send()
    };
    let (a, b) = tokio::join!(send(), send());
    let mut codes = [a.unwrap().status().as_u16(), b.unwrap().status().as_u16()];
    codes.sort();
    assert_eq!(codes, [200, 400]);
    wait_for(&s.ns, "pkg/race", "{.status.state}", "READY").await;
}

/// A CA and a serving certificate from it for `names` (DNS names), made with openssl: `(ca.crt, tls.crt, tls.key)`.
pub(crate) fn serving_certificate(
    dir: &std::path::Path,
    names: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).chain(["IP:127.0.0.1".to_string()]).collect();
    let extensions = format!("subjectAltName={}\nextendedKeyUsage=serverAuth\n", sans.join(","));
    let ca = crate::support::pki::ca(dir, "ca", "bitsmith test serving CA");
    let served = crate::support::pki::issue(dir, &ca, "tls", "bitsmith-api", &extensions);
    (ca.cert, served.cert, served.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_uploads_and_downloads_through_the_aggregated_api() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("aggregated"));
    let dir = tempfile::tempdir().unwrap();
    let service_name = format!("bitsmith-api.{ns}.svc");
    let (ca, cert, key) = serving_certificate(dir.path(), &[&service_name, "localhost"]);

    let client = kube::Client::try_default().await.unwrap();
    let front_proxy =
        bitsmith::api::FrontProxy::from_cluster(&client).await.unwrap().expect("the cluster's front proxy");
    let tls = bitsmith::api::tls::server_config(&cert, &key, Some(front_proxy.client_verifier().unwrap())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = ApiConfig::new(ApiUrls::new(&url::Url::parse(&format!("https://localhost:{port}")).unwrap()));
    let store = tempfile::tempdir().unwrap();
    let index = Index::start(&client, Some(&ns));
    index.ready().await;
    let state = AppState::new(client, file_store(store.path()), index, config, Default::default(), Some(front_proxy));
    let api = tokio::spawn(bitsmith::api::serve(listener, Some(tls), state, std::future::pending()));

    let registration = crate::support::kube::api_service(&ns, port, &std::fs::read(&ca).unwrap());
    kube_ok(&["apply", "-f", "-"], Some(&registration));
    kube_ok(&["wait", "--for=condition=Available", "--timeout=90s", "apiservice/v1alpha1.api.bitsmith.dev"], None);

    let aggregated_only =
        "- apiGroups: [api.bitsmith.dev]\n  resources: [packages/upload, packages/download]\n  verbs: [get, create]\n";
    let (allowed, outsider) = tokio::task::block_in_place(|| {
        (
            service_account_with_role(&ns, "uploader", "bitsmith-uploader"),
            service_account_token(&ns, "outsider", Some(aggregated_only)),
        )
    });
    kube_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: app\nspec:\n  type: bits\n"),
    );
    let zip = python_zip(
        dir.path(),
        "app.zip",
        "z.writestr('app/main.py', 'print(4)')\nz.writestr('app/Procfile', 'web: python app/main.py')",
    );
    let path = format!("/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/packages/app");
    let kubectl_as = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        tokio::task::block_in_place(|| kubectl(&all, None))
    };

    let discovery = kube_ok(&["get", "--raw", "/apis/api.bitsmith.dev/v1alpha1"], None);
    assert!(discovery.contains("packages/upload"), "{discovery}");

    // The guid index may trail the apply by a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    let uploaded = loop {
        let out = kubectl_as(&allowed, &["create", "--raw", &format!("{path}/upload"), "-f", zip.to_str().unwrap()]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        let error = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(error.contains("not found") && Instant::now() < deadline, "{error}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let answer: Value = serde_json::from_str(&uploaded).unwrap();
    assert_eq!(answer["state"], "PROCESSING_UPLOAD", "{answer}");
    wait_for(&ns, "pkg/app", "{.status.state}", "READY").await;

    let downloaded = kubectl_as(&allowed, &["get", "--raw", &format!("{path}/download")]);
    assert!(downloaded.status.success(), "{}", String::from_utf8_lossy(&downloaded.stderr));
    assert_eq!(
        zip_contents(&downloaded.stdout),
        [
            format!("app/Procfile:{}", sha1_hex(b"web: python app/main.py")),
            format!("app/main.py:{}", sha1_hex(b"print(4)"))
        ]
    );
    let digest = kube_ok(&["get", "pkg/app", "-n", &ns, "-o", "jsonpath={.status.checksum.value}"], None);
    assert_eq!(digest, bitsmith::digest::to_hex(&Sha256::digest(&downloaded.stdout)));

    // Allowed through the API server, but not by bitsmith's own check on bitsmith.dev.
    let refused = kubectl_as(&outsider, &["get", "--raw", &format!("{path}/download")]);
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("Forbidden") || error.contains("403"), "{error}");
    // Neither allowed by the API server.
    let stranger = tokio::task::block_in_place(|| service_account_token(&ns, "stranger", None));
    assert!(!kubectl_as(&stranger, &["get", "--raw", &format!("{path}/download")]).status.success());

    kube_ok(&["delete", "apiservice", "v1alpha1.api.bitsmith.dev", "--wait=false"], None);
    api.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_whose_identity_may_not_review_tokens_answers_unknown_error_and_no_internals() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("api-unknown"));
    let (weak, caller) = tokio::task::block_in_place(|| {
        (service_account_token(&ns, "weak-api", None), service_account_with_role(&ns, "uploader", "bitsmith-uploader"))
    });
    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info = kube::config::AuthInfo { token: Some(weak.into()), ..Default::default() };
    let client = kube::Client::try_from(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let store = tempfile::tempdir().unwrap();
    let index = Index::start(&client, Some(&ns));
    let config = ApiConfig::new(ApiUrls::new(&url::Url::parse(&base).unwrap()));
    let state = AppState::new(client, file_store(store.path()), index, config, Default::default(), None);
    let api = tokio::spawn(bitsmith::api::serve(listener, None, state, std::future::pending()));
    let response = reqwest::Client::new()
        .get(format!("{base}/v3/packages/7d5e2f3c-0000-4000-8000-000000000000"))
        .bearer_auth(&caller)
        .send()
        .await
        .unwrap();
    let error = cf_error(response).await;
    assert_eq!(
        error,
        (StatusCode::INTERNAL_SERVER_ERROR, "CF-UnknownError".into(), 10001, "An unknown error occurred.".into())
    );
    api.abort();
}
