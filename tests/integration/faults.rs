//! Faults: processes that die mid-upload and uploads that race, with the real `bitsmith` binaries on loopback,
//! killed with real signals, against the real control plane. Every scenario checks the end state and its time
//! bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::api::{cf_error, python_zip, zip_contents};
use crate::support::files_under;
use crate::support::kube::{
    OwnControlPlane, awaiting_packages, install_crds, kube_ok, namespace, service_account_with_role, wait_for,
};
use crate::support::ports::free_port;
use crate::support::process::Process;

/// What "within the claim timeout" allows on a loaded 2-core machine: the timeout, a requeue, a status write.
const ABANDONED_WITHIN: Duration = Duration::from_secs(15);

fn package_json(ns: &str, name: &str) -> Value {
    serde_json::from_str(&kube_ok(&["get", "pkg", name, "-n", ns, "-o", "json"], None)).unwrap()
}

/// Staged files in `store` (writes not yet committed), by name.
fn staged(store: &Path) -> Vec<PathBuf> {
    files_under(store).into_iter().filter(|f| f.starts_with("staging")).collect()
}

const BOUNDARY: &str = "bitsmith-faults-boundary";

/// Send a package upload of `zip` to `addr` over a raw connection, `piece` bytes every `pause`, as a slow client
/// would; returns when all is sent or the connection breaks.
async fn trickle_upload(addr: String, path: String, token: String, zip: Vec<u8>, piece: usize, pause: Duration) {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"bits\"; filename=\"app.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&zip);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer {token}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let Ok(mut tcp) = TcpStream::connect(&addr).await else { return };
    if tcp.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for chunk in body.chunks(piece) {
        if tcp.write_all(chunk).await.is_err() {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

/// A zip of one stored file of `size` random bytes, made by Python.
fn random_zip(dir: &Path, name: &str, size: usize) -> Vec<u8> {
    let script = format!("z.writestr('app/data.bin', os.urandom({size}), compress_type=zipfile.ZIP_STORED)");
    std::fs::read(python_zip(dir, name, &script)).unwrap()
}

/// Upload `zip` as the bits of the package `uid` through the CF API at `addr`, as the holder of `token`.
async fn upload_zip(addr: &str, uid: &str, token: &str, zip: Vec<u8>) -> reqwest::Response {
    let form = reqwest::multipart::Form::new().part("bits", reqwest::multipart::Part::bytes(zip).file_name("app.zip"));
    reqwest::Client::new()
        .post(format!("http://{addr}/v3/packages/{uid}/upload"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// A namespace with an uploader, a running controller over a store of its own, and the Package `app` awaiting an
/// upload.
struct UploadScene {
    ns: String,
    token: String,
    work: tempfile::TempDir,
    store: PathBuf,
    uid: String,
    _controller: Process,
}

impl UploadScene {
    async fn new(test: &str) -> Self {
        tokio::task::block_in_place(install_crds);
        let ns = tokio::task::block_in_place(|| namespace(test));
        let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
        let work = tempfile::tempdir().unwrap();
        let store = work.path().join("store");
        kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&awaiting_packages(&["app"])));
        let _controller = Process::controller(&ns, &store).await;
        wait_for(&ns, "pkg/app", "{.status.state}", "AWAITING_UPLOAD").await;
        let uid = kube_ok(&["get", "pkg/app", "-n", &ns, "-o", "jsonpath={.metadata.uid}"], None);
        UploadScene { ns, token, work, store, uid, _controller }
    }

    /// Once `app` is READY: its one blob holds what `zip` holds, and nothing staged is left.
    async fn ready_with(&self, zip: &[u8]) {
        wait_for(&self.ns, "pkg/app", "{.status.state}", "READY").await;
        let blobs: Vec<PathBuf> = files_under(&self.store).into_iter().filter(|f| f.starts_with("packages")).collect();
        assert_eq!(blobs.len(), 1, "one blob: {blobs:?}");
        assert_eq!(zip_contents(&std::fs::read(self.store.join(&blobs[0])).unwrap()), zip_contents(zip));
        assert!(staged(&self.store).is_empty(), "nothing staged is left: {:?}", staged(&self.store));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_api_process_is_killed_is_given_back_and_can_be_made_again() {
    let scene = UploadScene::new("abandoned").await;
    let UploadScene { ns, token, work, store, uid, .. } = &scene;
    let port = free_port();
    let mut api = Process::api(ns, store, port, "api-doomed").await;

    // 96 MiB at about 8 MiB/s: the upload is still running when its process dies.
    let zip = random_zip(work.path(), "big.zip", 96 << 20);
    let path = format!("/v3/packages/{uid}/upload");
    let sending = tokio::spawn(trickle_upload(
        format!("127.0.0.1:{port}"),
        path,
        token.clone(),
        zip,
        256 << 10,
        Duration::from_millis(30),
    ));
    // The claim names its holder and is renewed while the bytes flow (every quarter of the timeout).
    let deadline = Instant::now() + Duration::from_secs(30);
    let claim = loop {
        let claim = package_json(ns, "app")["status"]["upload"].clone();
        if claim["renewals"].as_u64().is_some_and(|n| n >= 2) {
            break claim;
        }
        assert!(Instant::now() < deadline, "the upload's claim was not renewed: {claim}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(claim["holder"], "api-doomed");
    assert_eq!(package_json(ns, "app")["status"]["state"], "PROCESSING_UPLOAD");
    let id = claim["id"].as_str().unwrap().to_string();
    let ours = |f: &PathBuf| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{id}-")));
    assert!(staged(store).iter().any(ours), "the upload stages its bytes under its claim: {:?}", staged(store));

    api.kill9();
    let killed = Instant::now();
    sending.abort();
    wait_for(ns, "pkg/app", "{.status.state}", "AWAITING_UPLOAD").await;
    let took = killed.elapsed();
    assert!(took < ABANDONED_WITHIN, "given back after {took:?}");
    assert!(took >= Duration::from_secs(3), "not before the claim timeout: {took:?}");
    let status = package_json(ns, "app")["status"].clone();
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("UploadAbandoned")));
    assert!(status["error"].as_str().unwrap().contains("api-doomed"), "{status}");
    assert!(status["upload"].is_null(), "no claim is left: {status}");
    let events = kube_ok(
        &["get", "events", "-n", ns, "--field-selector", "reason=UploadAbandoned", "-o", "jsonpath={.items[*].type}"],
        None,
    );
    assert_eq!(events, "Warning");
    assert!(staged(store).is_empty(), "the abandoned upload's staged bytes are swept: {:?}", staged(store));

    // Another API process takes the next upload to the end.
    let port = free_port();
    let _api = Process::api(ns, store, port, "api-next").await;
    let small = random_zip(work.path(), "small.zip", 200_000);
    let response = upload_zip(&format!("127.0.0.1:{port}"), uid, token, small.clone()).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    scene.ready_with(&small).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_overlapping_uploads_exactly_one_wins() {
    let scene = UploadScene::new("race").await;
    let UploadScene { ns, token, work, store, uid, .. } = &scene;
    let port = free_port();
    let _api = Process::api(ns, store, port, "api-0").await;

    // Two different 200 MiB zips, sent at once from two clients.
    let zips = [random_zip(work.path(), "a.zip", 200 << 20), random_zip(work.path(), "b.zip", 200 << 20)];
    let addr = format!("127.0.0.1:{port}");
    let send = |zip: Vec<u8>| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let started = Instant::now();
            let response = upload_zip(&addr, uid, &token, zip).await;
            let status = response.status();
            let error = if status == StatusCode::OK { None } else { Some(cf_error(response).await) };
            (started, Instant::now(), status, error)
        }
    };
    let ([a, b], origin) = {
        let origin = Instant::now();
        let (a, b) = tokio::join!(send(zips[0].clone()), send(zips[1].clone()));
        ([a, b], origin)
    };
    // The two requests were in flight at the same time.
    let overlap = a.1.min(b.1).saturating_duration_since(a.0.max(b.0));
    assert!(
        overlap > Duration::ZERO,
        "the uploads overlap: {:?} and {:?}",
        (a.0 - origin, a.1 - origin),
        (b.0 - origin, b.1 - origin)
    );
    let outcomes = [(a.2, &a.3), (b.2, &b.3)];
    let winners: Vec<usize> = (0..2).filter(|&i| outcomes[i].0 == StatusCode::OK).collect();
    assert_eq!(winners.len(), 1, "exactly one upload wins: {outcomes:?}");
    let winner = winners[0];
    let (status, error) = outcomes[1 - winner];
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error.as_ref().unwrap().1, "CF-PackageBitsAlreadyUploaded", "{error:?}");

    // The package holds the winner's bytes.
    scene.ready_with(&zips[winner]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_frozen_past_its_claim_finds_it_lapsed_and_writes_nothing() {
    let scene = UploadScene::new("lapsed").await;
    let UploadScene { ns, token, work, store, uid, .. } = &scene;
    let port = free_port();
    let api = Process::api(ns, store, port, "api-frozen").await;
    // 96 MiB at about 8 MiB/s: still running when the process is frozen, and when it thaws.
    let zip = random_zip(work.path(), "big.zip", 96 << 20);
    let path = format!("/v3/packages/{uid}/upload");
    let pause = Duration::from_millis(30);
    let sending = tokio::spawn(trickle_upload(format!("127.0.0.1:{port}"), path, token.clone(), zip, 256 << 10, pause));
    wait_for(ns, "pkg/app", "{.status.upload.holder}", "api-frozen").await;

    // Frozen, the upload stops renewing its claim: the controller gives the package back.
    signal(&api, libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for(ns, "pkg/app", "{.status.conditions[?(@.type==\"Ready\")].reason}", "UploadAbandoned").await;
    assert!(frozen.elapsed() < ABANDONED_WITHIN, "given back after {:?}", frozen.elapsed());
    let given_back = package_json(ns, "app");

    // Thawed, its next renewal finds the status changed: it stops, and writes nothing over the controller's.
    signal(&api, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !staged(store).is_empty() {
        assert!(Instant::now() < deadline, "the lapsed upload left staged bytes: {:?}", staged(store));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = package_json(ns, "app");
    assert_eq!(
        after["metadata"]["resourceVersion"], given_back["metadata"]["resourceVersion"],
        "nothing was written after the package was given back: {}",
        after["status"]
    );
    assert_eq!(after["status"]["state"], "AWAITING_UPLOAD");
    sending.abort();

    // The same process takes the next upload to the end.
    let small = random_zip(work.path(), "small.zip", 200_000);
    let response = upload_zip(&format!("127.0.0.1:{port}"), uid, token, small.clone()).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    scene.ready_with(&small).await;
}

/// Wait for `process` to exit, for at most `within`.
async fn exit_status(process: &mut Process, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not exit within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(process: &Process, signal: libc::c_int) {
    // SAFETY: signals our own child process.
    unsafe { libc::kill(process.child.id() as libc::pid_t, signal) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_writes_nothing_after_it_thaws() {
    use crate::support::http_server::{Reply, TestServer};
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("frozen"));
    let server = TestServer::start().await;
    // 12 MiB at 1 MiB/s: the leader is in the middle of the fetch when it freezes.
    server.route("/slow.zip", Reply::Slow { seed: 80, size: 12 << 20, per_second: 1 << 20 });
    let work = tempfile::tempdir().unwrap();
    let replica = |identity: &str| {
        let store = work.path().join(identity);
        let args = [
            "--leader-election-namespace",
            &ns,
            "--instance",
            identity,
            "--leader-election-lease-duration",
            "4s",
            "--leader-election-renew-deadline",
            "3s",
            "--leader-election-retry-period",
            "500ms",
            "--allow-source-cidr",
            "127.0.0.0/8",
        ];
        Process::spawn("controller", &ns, &store, &args)
    };
    let mut a = replica("replica-a");
    a.ready().await;
    wait_for(&ns, "lease/bitsmith-controller", "{.spec.holderIdentity}", "replica-a").await;
    let b = replica("replica-b");
    b.ready().await;
    let manifest = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: slow\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n",
        server.url("/slow.zip")
    );
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest));
    wait_for(&ns, "pkg/slow", "{.status.state}", "PROCESSING_UPLOAD").await;

    signal(&a, libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for(&ns, "lease/bitsmith-controller", "{.spec.holderIdentity}", "replica-b").await;
    let took = frozen.elapsed();
    // The lease duration as b's clock measures it from when it first saw a's last renewal, plus b's retry period.
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(12), "taken over after {took:?}");
    wait_for(&ns, "pkg/slow", "{.status.state}", "READY").await;

    signal(&a, libc::SIGCONT);
    // Thawed, a sees its renew deadline long past: it stops reconciling and follows b.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(a.child.try_wait().unwrap().is_none(), "a carries on as a follower");
    // Nothing a wrote after it thawed: every Event it reported is from before b led, and b finished the fetch.
    let events: Value = serde_json::from_str(&kube_ok(&["get", "events", "-n", &ns, "-o", "json"], None)).unwrap();
    let reported = |instance: &str| -> Vec<String> {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reportingInstance"] == instance)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert!(
        !reported("replica-a").iter().any(|r| r == "Succeeded"),
        "a wrote after the takeover: {:?}",
        reported("replica-a")
    );
    assert!(reported("replica-b").iter().any(|r| r == "Succeeded"), "b finished: {:?}", reported("replica-b"));
    assert_eq!(
        kube_ok(&["get", "lease/bitsmith-controller", "-n", &ns, "-o", "jsonpath={.spec.holderIdentity}"], None),
        "replica-b"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_follower_that_serves_the_api_and_the_leader_hands_over_at_once() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sigterm"));
    let work = tempfile::tempdir().unwrap();
    let replica = |identity: &str, port: u16| {
        let listen = format!("127.0.0.1:{port}");
        let args = ["--leader-election-namespace", &ns, "--instance", identity, "--listen", &listen];
        Process::spawn("controller", &ns, &work.path().join(identity), &args)
    };
    let mut a = replica("replica-a", free_port());
    a.ready().await;
    wait_for(&ns, "lease/bitsmith-controller", "{.spec.holderIdentity}", "replica-a").await;
    let mut b = replica("replica-b", free_port());
    b.ready().await;

    // The follower, waiting for the lease and serving the API, stops at once and cleanly.
    signal(&b, libc::SIGTERM);
    let status = exit_status(&mut b, Duration::from_secs(10)).await;
    assert!(status.success(), "a follower exits 0 on SIGTERM: {status}");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", b.ops_port)).await;
    assert!(!ready.is_ok_and(|r| r.status() == StatusCode::OK), "a stopped replica is not ready");

    // The leader gives its lease up on the way out: another replica need not wait for it to expire.
    signal(&a, libc::SIGTERM);
    let stopped = Instant::now();
    let status = exit_status(&mut a, Duration::from_secs(10)).await;
    assert!(status.success(), "the leader exits 0 on SIGTERM: {status}");
    let holder =
        kube_ok(&["get", "lease/bitsmith-controller", "-n", &ns, "-o", "jsonpath={.spec.holderIdentity}"], None);
    assert_eq!(holder, "", "released");
    let mut c = replica("replica-c", free_port());
    c.ready().await;
    wait_for(&ns, "lease/bitsmith-controller", "{.spec.holderIdentity}", "replica-c").await;
    assert!(stopped.elapsed() < Duration::from_secs(10), "taken over after {:?}", stopped.elapsed());
    signal(&c, libc::SIGTERM);
    assert!(exit_status(&mut c, Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_still_running_when_the_shutdown_grace_ends_gives_its_package_back_at_once() {
    let scene = UploadScene::new("grace").await;
    let UploadScene { ns, token, work, store, uid, .. } = &scene;
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--listen", &listen, "--instance", "api-stopping", "--shutdown-grace", "2s"];
    let mut api = Process::spawn("api", ns, store, &args);
    api.ready().await;
    // 96 MiB at about 8 MiB/s: far from done when the grace ends.
    let zip = random_zip(work.path(), "big.zip", 96 << 20);
    let path = format!("/v3/packages/{uid}/upload");
    let pause = Duration::from_millis(30);
    let sending = tokio::spawn(trickle_upload(listen.clone(), path, token.clone(), zip, 256 << 10, pause));
    wait_for(ns, "pkg/app", "{.status.upload.holder}", "api-stopping").await;

    signal(&api, libc::SIGTERM);
    let stopped = Instant::now();
    let status = exit_status(&mut api, Duration::from_secs(20)).await;
    let took = stopped.elapsed();
    assert!(status.success(), "exits 0: {status}");
    assert!(took >= Duration::from_secs(2), "the upload had its grace: {took:?}");
    assert!(took < Duration::from_secs(12), "the grace, then a few seconds to give the package back: {took:?}");
    sending.abort();
    // The upload gave the package back itself before the process exited: no claim was left to lapse.
    let status = package_json(ns, "app")["status"].clone();
    assert_eq!(status["state"], "AWAITING_UPLOAD", "{status}");
    assert!(status["error"].as_str().unwrap().contains("shut down"), "{status}");
    assert!(status["upload"].is_null(), "no claim is left: {status}");
    let abandoned = kube_ok(
        &["get", "events", "-n", ns, "--field-selector", "reason=UploadAbandoned", "-o", "jsonpath={.items[*].type}"],
        None,
    );
    assert_eq!(abandoned, "", "not judged abandoned");
    assert!(staged(store).is_empty(), "nothing staged is left: {:?}", staged(store));
}

/// Poll `jsonpath` of `object` in `plane` until it equals `want`, for at most `within`.
async fn wait_in(plane: &OwnControlPlane, ns: &str, object: &str, jsonpath: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let out = tokio::task::block_in_place(|| {
            plane.kubectl(&["get", object, "-n", ns, "-o", &format!("jsonpath={jsonpath}")], None)
        });
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{object}: {jsonpath} is {got:?}, not {want:?}, after {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_and_the_api_carry_on_across_an_apiserver_restart() {
    let plane = tokio::task::block_in_place(OwnControlPlane::start);
    let kubectl = |args: &[&str], stdin: Option<&str>| tokio::task::block_in_place(|| plane.kubectl_ok(args, stdin));
    kubectl(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/crds")], None);
    kubectl(&["wait", "--for", "condition=established", "crd/packages.bitsmith.dev", "--timeout", "60s"], None);
    let ns = "restart";
    kubectl(&["create", "namespace", ns], None);
    let work = tempfile::tempdir().unwrap();
    let docker = |name: &str| {
        format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: docker\n  image:\n    reference: nginx:1.27\n"
        )
    };
    kubectl(&["apply", "-n", ns, "-f", "-"], Some(&docker("before")));
    let before = kubectl(&["get", "pkg/before", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let admin = kubectl(&["config", "view", "--raw", "-o", "jsonpath={.users[0].user.token}"], None);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--leader-election-namespace", ns, "--instance", "replica-0", "--listen", &listen];
    let controller = Process::spawn_at(&plane.kubeconfig, "controller", ns, &work.path().join("store"), &args);
    controller.ready().await;
    // Ready means the API knows the objects that exist.
    let client = reqwest::Client::new();
    let response = client.get(format!("http://{listen}/v3/packages/{before}")).bearer_auth(&admin).send().await;
    assert_eq!(response.unwrap().status(), StatusCode::OK, "ready before the API's watch cache was filled");
    wait_in(&plane, ns, "pkg/before", "{.status.state}", "READY", Duration::from_secs(60)).await;

    tokio::task::block_in_place(|| plane.restart_apiserver());
    let restarted = Instant::now();
    // Watches resume: a Package created after the restart is reconciled.
    kubectl(&["apply", "-n", ns, "-f", "-"], Some(&docker("after")));
    wait_in(&plane, ns, "pkg/after", "{.status.state}", "READY", Duration::from_secs(60)).await;
    // And the API serves an upload to a Package created after the restart.
    kubectl(&["apply", "-n", ns, "-f", "-"], Some(&awaiting_packages(&["upload"])));
    wait_in(&plane, ns, "pkg/upload", "{.status.state}", "AWAITING_UPLOAD", Duration::from_secs(60)).await;
    let uid = kubectl(&["get", "pkg/upload", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let zip = random_zip(work.path(), "small.zip", 100_000);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = upload_zip(&listen, &uid, &admin, zip.clone()).await;
        let status = response.status();
        if status == StatusCode::OK {
            break;
        }
        // The API's watch cache learns of the new Package once its watch has resumed.
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", response.text().await.unwrap());
        assert!(Instant::now() < deadline, "the API did not learn of the Package created after the restart");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_in(&plane, ns, "pkg/upload", "{.status.state}", "READY", Duration::from_secs(60)).await;
    assert!(restarted.elapsed() < Duration::from_secs(120), "carried on after {:?}", restarted.elapsed());
    drop(controller);
}

/// The value of the metric `name` (a line `name value`) on `process`'s operations endpoint.
async fn metric(process: &Process, name: &str) -> f64 {
    let text =
        reqwest::get(format!("http://127.0.0.1:{}/metrics", process.ops_port)).await.unwrap().text().await.unwrap();
    crate::support::metrics::value(&text, name).unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// Poll the metric `name` of `process` until it is `want`, for at most 30 s.
async fn wait_for_metric(process: &Process, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(process, name).await != want {
        assert!(Instant::now() < deadline, "{name} is {}, not {want}", metric(process, name).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_and_uploads_share_the_transfer_budget() {
    use crate::support::http_server::{Reply, TestServer};
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("budget"));
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    let work = tempfile::tempdir().unwrap();
    let server = TestServer::start().await;
    // The slow source takes about 4 s; the other would take no time.
    server.route("/slow.zip", Reply::Slow { seed: 81, size: 1 << 20, per_second: 256 << 10 });
    server.route("/fast.zip", Reply::Body { seed: 82, size: 64 << 10, length: true });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--leader-election-namespace",
        &ns,
        "--listen",
        &listen,
        "--max-concurrent-transfers",
        "1",
        "--allow-source-cidr",
        "127.0.0.0/8",
    ];
    let controller = Process::spawn("controller", &ns, &work.path().join("store"), &args);
    controller.ready().await;
    assert_eq!(metric(&controller, "bitsmith_transfers_max").await, 1.0);
    let http_package = |name: &str, path: &str| {
        format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n",
            server.url(path)
        )
    };
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&awaiting_packages(&["app"])));
    wait_for(&ns, "pkg/app", "{.status.state}", "AWAITING_UPLOAD").await;

    // The slow fetch holds the only slot; the next fetch waits for it without asking its source.
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&http_package("slow", "/slow.zip")));
    wait_for_metric(&controller, "bitsmith_transfers_running", 1.0).await;
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&http_package("fast", "/fast.zip")));
    wait_for_metric(&controller, "bitsmith_transfers_waiting", 1.0).await;
    assert!(!server.seen.lock().unwrap().iter().any(|s| s.path == "/fast.zip"), "a waiting fetch has not started");

    // An upload finds no slot: 503 with Cloud Controller's error and Retry-After, and the package is untouched.
    let uid = kube_ok(&["get", "pkg/app", "-n", &ns, "-o", "jsonpath={.metadata.uid}"], None);
    let dir = tempfile::tempdir().unwrap();
    let zip = std::fs::read(python_zip(dir.path(), "app.zip", "z.writestr('a.txt', 'hello')")).unwrap();
    let upload = || upload_zip(&listen, &uid, &token, zip.clone());
    let refused = upload().await;
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
    let (status, title, _, detail) = cf_error(refused).await;
    assert_eq!((status, title.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "CF-ServiceUnavailable"));
    assert!(detail.contains("maximum of 1 transfers"), "{detail}");
    assert_eq!(metric(&controller, "bitsmith_transfers_refused_total").await, 1.0);
    assert_eq!(package_json(&ns, "app")["status"]["state"], "AWAITING_UPLOAD");

    // The slot passes on: both fetches finish, and then the upload goes through.
    wait_for(&ns, "pkg/slow", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/fast", "{.status.state}", "READY").await;
    wait_for_metric(&controller, "bitsmith_transfers_running", 0.0).await;
    // The slow source's seconds were counted as the fetch waiting on its source.
    let on_source = metric(&controller, "bitsmith_transfer_wait_seconds_total{stage=\"source\"}").await;
    let took = metric(&controller, "bitsmith_transfer_seconds_total").await;
    assert!((2.0..=took).contains(&on_source), "waited {on_source} s on sources, of {took} s");
    let accepted = upload().await;
    assert_eq!(accepted.status(), StatusCode::OK, "{}", accepted.text().await.unwrap());
    wait_for(&ns, "pkg/app", "{.status.state}", "READY").await;
    assert_eq!(metric(&controller, "bitsmith_transfers_waiting").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bits_lost_behind_the_operators_back_are_found_and_orphans_removed() {
    use crate::support::http_server::{Reply, TestServer};
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("audit"));
    let token = tokio::task::block_in_place(|| service_account_with_role(&ns, "uploader", "bitsmith-uploader"));
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 95, size: 300_000, length: true });
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "--leader-election-namespace",
        &ns,
        "--listen",
        &listen,
        "--allow-source-cidr",
        "127.0.0.0/8",
        "--audit-interval",
        "2s",
        "--orphan-grace",
        "3s",
        "--verify-interval",
        "2s",
    ];
    let controller = Process::spawn("controller", &ns, &store, &args);
    controller.ready().await;
    let sourced = |name: &str| {
        format!(
            "---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n",
            server.url("/app.zip")
        )
    };
    let manifests =
        sourced("gone") + &sourced("cut") + &sourced("flipped") + "---\n" + &awaiting_packages(&["uploaded"]);
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifests));
    wait_for(&ns, "pkg/uploaded", "{.status.state}", "AWAITING_UPLOAD").await;
    let uid = |name: &str| kube_ok(&["get", "pkg", name, "-n", &ns, "-o", "jsonpath={.metadata.uid}"], None);
    let zip = random_zip(work.path(), "app.zip", 100_000);
    let response = upload_zip(&listen, &uid("uploaded"), &token, zip).await;
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    for name in ["gone", "cut", "flipped", "uploaded"] {
        wait_for(&ns, &format!("pkg/{name}"), "{.status.state}", "READY").await;
    }
    let checksum =
        |name: &str| kube_ok(&["get", "pkg", name, "-n", &ns, "-o", "jsonpath={.status.checksum.value}"], None);
    let (gone_checksum, cut_checksum, flipped_checksum) = (checksum("gone"), checksum("cut"), checksum("flipped"));
    let blob_of = |name: &str| {
        let uid = uid(name);
        let blobs: Vec<PathBuf> = files_under(&store)
            .into_iter()
            .filter(|f| f.starts_with("packages") && f.to_string_lossy().contains(&uid))
            .collect();
        assert_eq!(blobs.len(), 1, "{name}: {blobs:?}");
        store.join(&blobs[0])
    };

    // Behind the operator's back: two blobs deleted, one cut short, one with a byte changed (its size stays: only
    // hashing again finds it), and a blob nobody owns.
    let flipped = blob_of("flipped");
    let whole = std::fs::read(&flipped).unwrap();
    let mut changed = whole.clone();
    changed[1000] ^= 0xff;
    std::fs::write(&flipped, &changed).unwrap();
    std::fs::remove_file(blob_of("gone")).unwrap();
    std::fs::remove_file(blob_of("uploaded")).unwrap();
    let cut = blob_of("cut");
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(1000).unwrap();
    let orphan = store.join(format!("packages/{ns}/ghost/0b5e55ed-0000-4000-8000-000000000000/abc"));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"nobody's").unwrap();
    let damaged = Instant::now();

    // Fetched again: READY with the same digests and a whole blob.
    let reason = |name: &str| {
        let events = format!("involvedObject.name={name}");
        kube_ok(&["get", "events", "-n", &ns, "--field-selector", &events, "-o", "jsonpath={.items[*].reason}"], None)
    };
    let lost = [
        ("gone", &gone_checksum, "BlobMissing"),
        ("cut", &cut_checksum, "BlobCorrupt"),
        ("flipped", &flipped_checksum, "BlobCorrupt"),
    ];
    for (name, want, finding) in lost {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reason(name).contains(finding) {
            assert!(Instant::now() < deadline, "{name}: no {finding} Event: {}", reason(name));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        wait_for(&ns, &format!("pkg/{name}"), "{.status.state}", "READY").await;
        assert_eq!(&checksum(name), want);
        assert_eq!(std::fs::metadata(blob_of(name)).unwrap().len(), 300_000, "{name}: the blob is whole again");
    }
    assert!(std::fs::read(blob_of("flipped")).unwrap() == whole, "the changed blob holds the right bytes again");
    // Uploaded bits cannot be made again: FAILED and Stalled, naming no blob, and said with a Warning.
    wait_for(&ns, "pkg/uploaded", "{.status.state}", "FAILED").await;
    assert!(damaged.elapsed() < Duration::from_secs(30), "found within the audit bound: {:?}", damaged.elapsed());
    let status = package_json(&ns, "uploaded")["status"].clone();
    let condition = |type_: &str| {
        let c = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap().clone();
        (c["status"].as_str().unwrap().to_string(), c["reason"].as_str().unwrap().to_string())
    };
    assert_eq!(condition("Ready"), ("False".to_string(), "BlobMissing".to_string()));
    assert_eq!(condition("Stalled"), ("True".to_string(), "BlobMissing".to_string()));
    assert!(status["blob"].is_null() && status["artifact"].is_null(), "{status}");
    assert!(status["error"].as_str().unwrap().contains("gone"), "{status}");
    let warnings = kube_ok(
        &[
            "get",
            "events",
            "-n",
            &ns,
            "--field-selector",
            "involvedObject.name=uploaded,type=Warning",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
        None,
    );
    assert!(warnings.contains("BlobMissing"), "{warnings}");
    // The orphan goes once older than the grace.
    let deadline = Instant::now() + Duration::from_secs(30);
    while orphan.exists() {
        assert!(Instant::now() < deadline, "the orphan was not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(damaged.elapsed() >= Duration::from_secs(3), "not before the grace");
    assert!(metric(&controller, "bitsmith_orphans_removed_total").await >= 1.0);
    assert!(metric(&controller, "bitsmith_audit_findings_total").await >= 3.0);
}
