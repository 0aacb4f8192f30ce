//! The API against slow and oversized requests, and `bits_path` from anyone but the upload-offloading proxy: the
//! real `bitsmith api` binary on loopback, raw `TcpStream`s for clients that misbehave on the wire.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::api::{cf_error, python_zip, sha1_hex, zip_contents};
use crate::support::files_under;
use crate::support::kube::{awaiting_packages, install_crds, kube_ok, namespace, service_account_with_role, wait_for};
use crate::support::ports::free_port;

/// A generous bound for "was cut off at all": many times the timeouts the tests set.
const CUT_OFF_WITHIN: Duration = Duration::from_secs(20);

/// The `bitsmith api` binary serving one namespace on loopback, over a `file://` store of its own. Killed on
/// drop.
pub(super) struct ApiProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub ns: String,
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ApiProcess {
    /// Start the API for `ns` with `args` added (TLS when they name --tls-cert), once `manifests` are applied
    /// there, and wait until it answers.
    pub async fn start(ns: &str, manifests: &str, args: Vec<OsString>) -> Self {
        if !manifests.is_empty() {
            kube_ok(&["apply", "-n", ns, "-f", "-"], Some(manifests));
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let ops_port = free_port();
        let tls = args.iter().any(|a| a == "--tls-cert");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
            .args(["api", "--namespace", ns, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{ops_port}")])
            .arg("--store")
            .arg(dir.path().join("store"))
            .args(args)
            .env("KUBECONFIG", crate::support::kube::kubeconfig())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let base = format!("{}://{addr}", if tls { "https" } else { "http" });
        let process = ApiProcess { child, addr, base, dir, ns: ns.to_string() };
        // Ready once the watch cache holds the objects applied above; the API serves right after.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("http://127.0.0.1:{ops_port}/readyz")).await;
            if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                break;
            }
            assert!(Instant::now() < deadline, "the API did not become ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        process
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn uid(&self, object: &str) -> String {
        kube_ok(&["get", object, "-n", &self.ns, "-o", "jsonpath={.metadata.uid}"], None)
    }
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

const BOUNDARY: &str = "bitsmith-test-boundary";

/// A package upload as a CF client puts it on the wire: the request head, and the multipart body with `zip` in
/// its `bits` part.
fn upload_request(path: &str, token: &str, zip: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"bits\"; filename=\"app.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(zip);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer {token}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    (head.into_bytes(), body)
}

/// Read what the server sends until it closes the connection, for at most [`CUT_OFF_WITHIN`]: `None` when it
/// kept the connection open that long.
async fn until_closed(tcp: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + CUT_OFF_WITHIN;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// A zip of one stored file of `size` random bytes (big enough for the resource cache), made by Python.
fn stored_zip(dir: &Path, name: &str, size: usize) -> Vec<u8> {
    let script = format!("z.writestr('app/big.bin', os.urandom({size}), compress_type=zipfile.ZIP_STORED)");
    std::fs::read(python_zip(dir, name, &script)).unwrap()
}

/// Files the store holds under `prefix`, once writes that were given up on have been cleaned away (for at most
/// 30 s).
async fn settled_files(store: &Path, prefix: &str) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files: Vec<PathBuf> = files_under(store).into_iter().filter(|f| f.starts_with(prefix)).collect();
        if files.is_empty() || Instant::now() > deadline {
            return files;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_requests_are_cut_off() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sec-slow"));
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    let limits = args(&["--header-read-timeout", "2s", "--body-idle-timeout", "2s", "--max-header-size", "16KiB"]);
    let api = ApiProcess::start(&ns, &awaiting_packages(&["stalled"]), limits).await;
    let guid = api.uid("pkg/stalled");
    let http = reqwest::Client::new();
    let show = format!("{}/v3/packages/{guid}", api.base);

    // A slowloris client: its head, one byte at a time, never finished before the server hangs up.
    let head = format!(
        "GET /v3/packages/{guid} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer {token}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(400)
    );
    let mut tcp = TcpStream::connect(api.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    let cut_off = loop {
        if sent == head.len() || started.elapsed() > CUT_OFF_WITHIN {
            break false;
        }
        if tcp.write_all(&head.as_bytes()[sent..=sent]).await.is_err() {
            break true;
        }
        sent += 1;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => panic!("the server answered a head it never got whole"),
            Err(_) => {}
        }
    };
    assert!(cut_off, "a client dribbling its head was still connected after {sent} of {} bytes", head.len());
    assert!(sent < head.len());
    // Everyone else is still served.
    let shown = http.get(&show).bearer_auth(&token).send().await.unwrap();
    assert_eq!(shown.status(), StatusCode::OK);

    // Heads over --max-header-size, or with too many fields, get 431.
    let big = http.get(&show).bearer_auth(&token).header("x-filler", "a".repeat(20 << 10)).send().await.unwrap();
    assert_eq!(big.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let mut many = http.get(&show).bearer_auth(&token);
    for i in 0..150 {
        many = many.header(format!("x-field-{i}"), "x");
    }
    assert_eq!(many.send().await.unwrap().status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let fits = http.get(&show).bearer_auth(&token).header("x-filler", "a".repeat(8 << 10)).send().await.unwrap();
    assert_eq!(fits.status(), StatusCode::OK, "a head under the limit is served");

    // A client that stops mid-body: the upload breaks off, the package awaits another, nothing staged is left.
    let dir = tempfile::tempdir().unwrap();
    let zip = stored_zip(dir.path(), "big.zip", 3 << 20);
    let (head, body) = upload_request(&format!("/v3/packages/{guid}/upload"), &token, &zip);
    let mut tcp = TcpStream::connect(api.addr).await.unwrap();
    tcp.write_all(&head).await.unwrap();
    tcp.write_all(&body[..2 << 20]).await.unwrap();
    let answer = until_closed(&mut tcp).await.expect("a client that stopped mid-body was never cut off");
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(answer.contains("The upload broke off"), "{answer}");
    wait_for(&ns, "pkg/stalled", "{.status.state}", "AWAITING_UPLOAD").await;
    let error = kube_ok(&["get", "pkg/stalled", "-n", &ns, "-o", "jsonpath={.status.error}"], None);
    assert!(error.starts_with("the last upload failed"), "{error}");
    assert_eq!(settled_files(&api.store(), "staging").await, Vec::<PathBuf>::new(), "staged leftovers");
    assert_eq!(settled_files(&api.store(), "packages").await, Vec::<PathBuf>::new(), "a blob of a broken upload");

    // The package takes a whole upload afterwards.
    let form = reqwest::multipart::Form::new().part("bits", reqwest::multipart::Part::bytes(zip).file_name("a.zip"));
    let response = http.post(format!("{show}/upload")).bearer_auth(&token).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    wait_for(&ns, "pkg/stalled", "{.status.state}", "READY").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_cap_get_cf_json_while_the_first_complete() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sec-cap"));
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    let droplet = "---\napiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: web\nspec: {}\n";
    let manifests = awaiting_packages(&["held-1", "held-2", "extra"]) + droplet;
    let api = ApiProcess::start(&ns, &manifests, args(&["--max-concurrent-transfers", "2"])).await;
    let dir = tempfile::tempdir().unwrap();
    let zip = stored_zip(dir.path(), "app.zip", 300_000);
    let http = reqwest::Client::new();

    // Two uploads in progress: their heads and half their bodies sent.
    let mut held = Vec::new();
    for name in ["held-1", "held-2"] {
        let (head, body) =
            upload_request(&format!("/v3/packages/{}/upload", api.uid(&format!("pkg/{name}"))), &token, &zip);
        let mut tcp = TcpStream::connect(api.addr).await.unwrap();
        tcp.write_all(&head).await.unwrap();
        tcp.write_all(&body[..body.len() / 2]).await.unwrap();
        wait_for(&ns, &format!("pkg/{name}"), "{.status.state}", "PROCESSING_UPLOAD").await;
        held.push((tcp, body));
    }

    // A third, of any kind and by any route, is refused at once with Cloud Controller's error.
    let small = std::fs::read(python_zip(dir.path(), "small.zip", "z.writestr('a.txt', 'hello')")).unwrap();
    let form = || {
        reqwest::multipart::Form::new().part("bits", reqwest::multipart::Part::bytes(small.clone()).file_name("a.zip"))
    };
    let extra = api.uid("pkg/extra");
    let refused = [
        http.post(format!("{}/v3/packages/{extra}/upload", api.base)).bearer_auth(&token).multipart(form()),
        http.post(format!("{}/v3/droplets/{}/upload", api.base, api.uid("droplet/web")))
            .bearer_auth(&token)
            .multipart(form()),
        http.post(format!("{}/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/packages/extra/upload", api.base))
            .bearer_auth(&token)
            .body(small.clone()),
        // A body far bigger than the socket buffers: the answer comes while the client is still sending, and the
        // client gets to read it.
        http.post(format!("{}/apis/api.bitsmith.dev/v1alpha1/namespaces/{ns}/packages/extra/upload", api.base))
            .bearer_auth(&token)
            .body(vec![0u8; 256 << 20]),
    ];
    for request in refused {
        let response = request.send().await.unwrap();
        assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("5".into()));
        let (status, title, code, detail) = cf_error(response).await;
        assert_eq!((status, title.as_str(), code), (StatusCode::SERVICE_UNAVAILABLE, "CF-ServiceUnavailable", 10015));
        assert!(detail.contains("maximum of 2 transfers"), "{detail}");
    }
    // Refused before it was looked at: the package was never claimed.
    wait_for(&ns, "pkg/extra", "{.status.state}", "").await;
    // What is not an upload is served as ever.
    let shown = http.get(format!("{}/v3/packages/{extra}", api.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(shown.status(), StatusCode::OK);

    // The held uploads finish, and then there is room again.
    for (mut tcp, body) in held {
        tcp.write_all(&body[body.len() / 2..]).await.unwrap();
        let answer = until_closed_or_answered(&mut tcp).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    wait_for(&ns, "pkg/held-1", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/held-2", "{.status.state}", "READY").await;
    let response = http
        .post(format!("{}/v3/packages/{extra}/upload", api.base))
        .bearer_auth(&token)
        .multipart(form())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    wait_for(&ns, "pkg/extra", "{.status.state}", "READY").await;
}

/// The answer to a request on a kept-alive connection: read until the status line, headers and a JSON body
/// are in (the server keeps the connection open afterwards).
async fn until_closed_or_answered(tcp: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                .and_then(Result::ok);
            if length.is_some_and(|n| body.len() >= n) {
                return text;
            }
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buffer)).await {
            Err(_) => panic!("no answer within 60 s: {text}"),
            Ok(Ok(0)) | Ok(Err(_)) => return text,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bits_path_is_taken_only_from_the_offloading_proxy() {
    use super::front_proxy::{ClientCerts, front_proxy_client, issue};
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sec-offload"));
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    let certs = ClientCerts::new();
    let offload_ca = certs.ca("offload-ca", "bitsmith test offload CA");
    let foreign_ca = certs.ca("foreign-ca", "bitsmith test foreign CA");
    let proxy = issue(&certs, &offload_ca, "nginx-offload");
    let foreign = issue(&certs, &foreign_ca, "nginx-offload");
    let spool = tempfile::tempdir().unwrap();
    let offload_port = free_port();
    let mut flags = certs.serving_args();
    flags.extend(args(&["--offload-listen", &format!("127.0.0.1:{offload_port}"), "--upload-spool-dir"]));
    flags.push(spool.path().into());
    flags.push("--offload-client-ca".into());
    flags.push(offload_ca.cert.clone().into());
    let api = ApiProcess::start(&ns, &awaiting_packages(&["mine", "theirs", "sidecar"]), flags).await;

    let outside = tempfile::tempdir().unwrap();
    let zip = python_zip(outside.path(), "app.zip", "z.writestr('app/main.py', 'print(3)')");
    let spooled = spool.path().join("0001");
    std::fs::copy(&zip, &spooled).unwrap();
    std::os::unix::fs::symlink(&zip, spool.path().join("0002")).unwrap();
    let offload = |client: &reqwest::Client, base: &str, package: &str, path: &Path| {
        let form = reqwest::multipart::Form::new()
            .text("bits_name", "app.zip")
            .text("bits_path", path.display().to_string())
            .text("upload_start_time", "1700000000");
        let url = format!("{base}/v3/packages/{}/upload", api.uid(&format!("pkg/{package}")));
        client.post(url).bearer_auth(&token).multipart(form).send()
    };

    // Not the proxy: no certificate, one from another CA, or the cluster's front proxy's.
    let front_proxy = front_proxy_client();
    for (who, identity) in
        [("no certificate", None), ("another CA", Some(&foreign)), ("the front proxy", Some(&front_proxy))]
    {
        let client = certs.client(identity);
        let (status, title, _, detail) = cf_error(offload(&client, &api.base, "theirs", &spooled).await.unwrap()).await;
        assert_eq!(
            (status, title.as_str(), detail.as_str()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "CF-UnprocessableEntity",
                "Bits path is accepted only from the upload-offloading proxy"
            ),
            "{who}"
        );
        wait_for(&ns, "pkg/theirs", "{.status.state}", "AWAITING_UPLOAD").await;
        assert!(spooled.exists(), "{who}: the spooled upload is left alone");
    }
    let query = certs
        .client(None)
        .post(format!("{}/v3/packages/{}/upload?bits_path={}", api.base, api.uid("pkg/theirs"), spooled.display()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cf_error(query).await.0, StatusCode::UNPROCESSABLE_ENTITY);

    // The proxy, by its certificate: only files inside the spool directory.
    let client = certs.client(Some(&proxy));
    for refused in [zip.clone(), spool.path().join("0002"), spool.path().join("missing")] {
        let (status, _, _, detail) = cf_error(offload(&client, &api.base, "mine", &refused).await.unwrap()).await;
        assert_eq!(
            (status, detail.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "Bits path is invalid"),
            "{refused:?}"
        );
    }
    let response = offload(&client, &api.base, "mine", &spooled).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    wait_for(&ns, "pkg/mine", "{.status.state}", "READY").await;
    assert!(!spooled.exists(), "the spooled body is removed once taken");
    let download = format!("{}/v3/packages/{}/download", api.base, api.uid("pkg/mine"));
    let stored = client.get(download).bearer_auth(&token).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(zip_contents(&stored), [format!("app/main.py:{}", sha1_hex(b"print(3)"))]);

    // The proxy, by the address only it reaches.
    std::fs::copy(&zip, &spooled).unwrap();
    let sidecar = format!("https://127.0.0.1:{offload_port}");
    let response = offload(&certs.client(None), &sidecar, "sidecar", &spooled).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    wait_for(&ns, "pkg/sidecar", "{.status.state}", "READY").await;
    let theirs: Value = certs
        .client(None)
        .get(format!("{}/v3/packages/{}", api.base, api.uid("pkg/theirs")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["state"], "AWAITING_UPLOAD");
}
