//! The controller against the real control plane, driven the way a user would: `kubectl apply`, `kubectl get`,
//! `kubectl delete`.

use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bitsmith::controller::{self, Options};
use bitsmith::ops::Ops;

use crate::support::data::coreutils_digests;
use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::{install_crds, kube_ok, namespace, wait_for, wait_for_within};
use crate::support::ports::free_port;
use crate::support::{file_fetcher, files_under};

/// A namespace of its own, a loopback source server, a file store, and a controller watching that namespace.
struct Setup {
    ns: String,
    server: TestServer,
    store: tempfile::TempDir,
    /// The controller's operations endpoint.
    ops_url: String,
    running: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.running.abort();
    }
}

async fn setup(test: &str) -> Setup {
    setup_with(test, Default::default()).await
}

/// [`setup`], keeping Packages and Droplets as `retention` says.
async fn setup_with(test: &str, retention: bitsmith::retention::Retention) -> Setup {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace(test));
    let server = TestServer::start().await;
    let store = tempfile::tempdir().unwrap();
    let client = kube::Client::try_default().await.expect("a client for the test control plane");
    let ops = Ops { metrics: Default::default(), ready: Arc::new(AtomicBool::new(true)) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(bitsmith::ops::serve(listener, ops.clone()));
    let options = Options {
        urls: None,
        upload_claim_timeout: std::time::Duration::from_secs(60),
        package_retention: retention,
        droplet_retention: retention,
        audit: Default::default(),
        concurrency: 4,
        namespace: Some(ns.clone()),
        reporter: "bitsmith-test".into(),
        metrics: ops.metrics,
    };
    // Transfers count their time on the same endpoint, as `bitsmith controller` wires them.
    let budget = bitsmith::budget::TransferBudget::with_metrics(4, options.metrics.transfers.clone());
    let running = tokio::spawn(controller::run(
        client,
        file_fetcher(store.path(), 1 << 30).with_budget(budget),
        options,
        bitsmith::leader::Leadership::always(),
    ));
    Setup { ns, server, store, ops_url, running }
}

fn http_package(name: &str, url: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  source:\n    http:\n      url: {url}\n{extra_spec}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_go_ready_and_their_blobs_go_with_them() {
    let Setup { ns, server, store, ops_url, .. } = &setup("controller").await;
    server.route("/app.zip", Reply::Body { seed: 51, size: 5 << 20, length: true });

    let manifests = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: app\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: registry.example.com/team/app:1.0\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: upload\nspec:\n  type: bits\n",
        server.url("/app.zip")
    );
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifests));
    wait_for(ns, "pkg/app", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/image", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/upload", "{.status.state}", "AWAITING_UPLOAD").await;

    let expected = coreutils_digests(51, 5 << 20);
    wait_for(ns, "pkg/app", "{.status.checksum.value}", &expected.sha256).await;
    wait_for(ns, "pkg/app", "{.status.hash.value}", &expected.sha1).await;
    wait_for(ns, "pkg/app", "{.status.size}", &(5u64 << 20).to_string()).await;
    wait_for(ns, "pkg/app", "{.status.conditions[?(@.type==\"Ready\")].status}", "True").await;
    let table = kube_ok(&["get", "pkg", "app", "-n", ns, "-o", "wide"], None);
    assert!(table.contains("READY") && table.contains(&expected.sha256), "{table}");
    let events = kube_ok(&["get", "events", "-n", ns, "-o", "jsonpath={.items[*].reason}"], None);
    assert!(events.contains("Succeeded"), "an Event for the transition: {events}");
    assert_eq!(files_under(store.path()).len(), 1, "one blob: {:?}", files_under(store.path()));

    let metrics = reqwest::get(format!("{ops_url}/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        "bitsmith_objects{kind=\"Package\",state=\"READY\"} 2",
        "bitsmith_objects{kind=\"Package\",state=\"AWAITING_UPLOAD\"} 1",
        &format!("bitsmith_stored_bytes_total {}", 5u64 << 20),
    ] {
        assert!(metrics.contains(line), "{line:?} not in\n{metrics}");
    }
    assert!(metrics.contains("bitsmith_status_writes_total{kind=\"Package\"}"), "{metrics}");
    assert!(metrics.contains("bitsmith_reconcile_duration_seconds_bucket"), "{metrics}");
    // The fetch counted its time and where it waited.
    let value = |series: &str| {
        crate::support::metrics::value(&metrics, series).unwrap_or_else(|| panic!("{series} not in\n{metrics}"))
    };
    let took = value("bitsmith_transfer_seconds_total");
    let waited: f64 = bitsmith::pipeline::StageWaits::STAGES
        .iter()
        .map(|stage| value(&format!("bitsmith_transfer_wait_seconds_total{{stage=\"{stage}\"}}")))
        .sum();
    assert!(took > 0.0 && waited <= took, "waited {waited} s of {took} s");
    for probe in ["healthz", "readyz"] {
        assert_eq!(reqwest::get(format!("{ops_url}/{probe}")).await.unwrap().status(), 200, "{probe}");
    }

    // Deleting the Package removes its blob through the finalizer, and the object goes.
    kube_ok(&["delete", "pkg", "app", "-n", ns, "--wait=true", "--timeout=60s"], None);
    assert!(files_under(store.path()).is_empty(), "{:?}", files_under(store.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_mismatch_fails_stalls_and_keeps_nothing() {
    let Setup { ns, server, store, .. } = &setup("mismatch").await;
    server.route("/app.zip", Reply::Body { seed: 52, size: 100_000, length: true });
    let pin = format!("  checksum:\n    type: sha256\n    value: {}\n", "f".repeat(64));
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&http_package("pinned", &server.url("/app.zip"), &pin)));
    wait_for(ns, "pkg/pinned", "{.status.state}", "FAILED").await;
    wait_for(ns, "pkg/pinned", "{.status.conditions[?(@.type==\"Stalled\")].reason}", "ChecksumMismatch").await;
    wait_for(ns, "pkg/pinned", "{.status.conditions[?(@.type==\"Ready\")].status}", "False").await;
    let error = kube_ok(&["get", "pkg/pinned", "-n", ns, "-o", "jsonpath={.status.error}"], None);
    assert!(error.contains("checksum mismatch"), "{error}");
    let events = kube_ok(&["get", "events", "-n", ns, "-o", "jsonpath={.items[*].type}"], None);
    assert!(events.contains("Warning"), "a Warning Event: {events}");
    assert!(files_under(store.path()).is_empty(), "{:?}", files_under(store.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_is_retried_until_it_appears() {
    let Setup { ns, server, .. } = &setup("retry").await;
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&http_package("later", &server.url("/later.zip"), "")));
    wait_for(ns, "pkg/later", "{.status.conditions[?(@.type==\"Reconciling\")].reason}", "SourceUnavailable").await;
    wait_for(ns, "pkg/later", "{.status.state}", "PROCESSING_UPLOAD").await;
    server.route("/later.zip", Reply::Body { seed: 53, size: 70_000, length: true });
    wait_for(ns, "pkg/later", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/later", "{.status.checksum.value}", &coreutils_digests(53, 70_000).sha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_replaces_the_bits_and_copies_follow() {
    let Setup { ns, server, store, .. } = &setup("generation").await;
    server.route("/v1.zip", Reply::Body { seed: 54, size: 80_000, length: true });
    server.route("/v2.zip", Reply::Body { seed: 55, size: 90_000, length: true });
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&http_package("app", &server.url("/v1.zip"), "")));
    let v1 = coreutils_digests(54, 80_000).sha256;
    wait_for(ns, "pkg/app", "{.status.checksum.value}", &v1).await;

    let copy = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: copy\nspec:\n  type: bits\n  source:\n    package:\n      name: app\n";
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(copy));
    wait_for(ns, "pkg/copy", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/copy", "{.status.checksum.value}", &v1).await;

    // A blob that an earlier removal failed to delete goes with the next generation's fetch too.
    let uid = kube_ok(&["get", "pkg/app", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let leftover = store.path().join(format!("packages/{ns}/app/{uid}/{}", "0".repeat(64)));
    std::fs::write(&leftover, b"left behind").unwrap();

    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&http_package("app", &server.url("/v2.zip"), "")));
    let v2 = coreutils_digests(55, 90_000).sha256;
    wait_for(ns, "pkg/app", "{.status.checksum.value}", &v2).await;
    wait_for(ns, "pkg/app", "{.status.observedGeneration}", "2").await;
    let blobs = files_under(store.path());
    assert_eq!(
        blobs.len(),
        2,
        "the copy's blob and app's new one; app's old blob and the leftover are gone: {blobs:?}"
    );
    assert!(!leftover.exists());
    assert!(
        blobs.iter().any(|b| b.ends_with(&v2))
            && blobs.iter().all(|b| !b.starts_with(format!("packages/{ns}/app")) || b.ends_with(&v2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_created_after_its_package_is_picked_up() {
    let Setup { ns, server, .. } = &setup("secret").await;
    let body = Box::new(Reply::Body { seed: 56, size: 60_000, length: true });
    server.route(
        "/private.zip",
        Reply::Require { header: "authorization".into(), value: "Bearer s3cret-token".into(), then: body },
    );
    let package = http_package("private", &server.url("/private.zip"), "")
        .replace("      url:", "      secretRef:\n        name: creds\n      url:");
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&package));
    wait_for(ns, "pkg/private", "{.status.conditions[?(@.type==\"Reconciling\")].reason}", "SecretNotFound").await;
    kube_ok(&["create", "secret", "generic", "creds", "-n", ns, "--from-literal=bearerToken=s3cret-token"], None);
    wait_for(ns, "pkg/private", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/private", "{.status.checksum.value}", &coreutils_digests(56, 60_000).sha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn droplets_are_staged() {
    let Setup { ns, server, .. } = &setup("droplet").await;
    server.route("/droplet.tgz", Reply::Body { seed: 57, size: 40_000, length: true });
    let droplet = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: web\nspec:\n  processTypes:\n    web: ./start\n  source:\n    http:\n      url: {}\n",
        server.url("/droplet.tgz")
    );
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&droplet));
    wait_for(ns, "droplet/web", "{.status.state}", "STAGED").await;
    wait_for(ns, "droplet/web", "{.status.checksum.value}", &coreutils_digests(57, 40_000).sha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_leader_reconciles_and_the_other_takes_over() {
    use bitsmith::leader::{LeaseConfig, run_as_leader};
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("leader"));
    let server = TestServer::start().await;
    server.route("/one.zip", Reply::Body { seed: 58, size: 10_000, length: true });
    server.route("/two.zip", Reply::Body { seed: 59, size: 20_000, length: true });
    let replica = |identity: &str, store: &std::path::Path| {
        let lease = LeaseConfig {
            duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_every: Duration::from_millis(300),
            ..LeaseConfig::new(ns.clone(), "bitsmith-test".into(), identity.into())
        };
        let options = Options {
            urls: None,
            upload_claim_timeout: std::time::Duration::from_secs(60),
            package_retention: Default::default(),
            droplet_retention: Default::default(),
            audit: Default::default(),
            concurrency: 2,
            namespace: Some(ns.clone()),
            reporter: identity.into(),
            metrics: Default::default(),
        };
        let fetcher = file_fetcher(store, 1 << 30);
        async move {
            let client = kube::Client::try_default().await.unwrap();
            let work = |leadership| controller::run(client.clone(), fetcher, options, leadership);
            let _ = run_as_leader(client.clone(), lease, std::future::pending(), work).await;
        }
    };
    let (store_a, store_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = tokio::spawn(replica("replica-a", store_a.path()));
    wait_for(&ns, "lease/bitsmith-test", "{.spec.holderIdentity}", "replica-a").await;
    let b = tokio::spawn(replica("replica-b", store_b.path()));

    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&http_package("one", &server.url("/one.zip"), "")));
    wait_for(&ns, "pkg/one", "{.status.state}", "READY").await;
    assert_eq!(files_under(store_a.path()).len(), 1, "the leader fetched");
    assert!(files_under(store_b.path()).is_empty(), "the follower did nothing");

    // The leader dies without a word; the follower takes over once the lease expires.
    a.abort();
    let died = Instant::now();
    wait_for(&ns, "lease/bitsmith-test", "{.spec.holderIdentity}", "replica-b").await;
    assert!(died.elapsed() < Duration::from_secs(10), "took over after {:?}", died.elapsed());
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&http_package("two", &server.url("/two.zip"), "")));
    wait_for(&ns, "pkg/two", "{.status.state}", "READY").await;
    assert_eq!(files_under(store_b.path()).len(), 1, "the new leader fetched");
    b.abort();
}

/// Start `bitsmith controller` on the test control plane, watching `ns` and leading as `identity`.
fn spawn_controller(ns: &str, store: &std::path::Path, metrics_port: u16, identity: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["controller", "--namespace", ns, "--leader-election-namespace", ns, "--instance", identity])
        .args(["--allow-source-cidr", "127.0.0.0/8"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}"), "--store"])
        .arg(store)
        .env("KUBECONFIG", crate::support::kube::kubeconfig())
        .spawn()
        .unwrap()
}

async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the controller did not stop within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_binary_leads_serves_probes_and_stops_on_sigterm() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("binary"));
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_controller(&ns, store.path(), port, "only-replica");
    let docker = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: nginx:1.27\n";
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(docker));
    wait_for(&ns, "pkg/image", "{.status.state}", "READY").await;
    wait_for(&ns, "lease/bitsmith-controller", "{.spec.holderIdentity}", "only-replica").await;
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert!(status.success(), "a graceful stop exits 0: {status}");
    let holder =
        kube_ok(&["get", "lease/bitsmith-controller", "-n", &ns, "-o", "jsonpath={.spec.holderIdentity}"], None);
    assert_eq!(holder, "", "the leader released its lease on the way out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_fetch_finishes_after_a_restart() {
    use bitsmith::resources::{Package, PackageState};
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sigkill"));
    let server = TestServer::start().await;
    let size = 48u64 << 20;
    server.route("/big.zip", Reply::Slow { seed: 60, size, per_second: 16 << 20 });
    let store = tempfile::tempdir().unwrap();

    // Every status the Package ever shows, to check that none names bits that are not the whole download.
    let client = kube::Client::try_default().await.unwrap();
    let packages: kube::Api<Package> = kube::Api::namespaced(client, &ns);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let watching =
        tokio::spawn(watcher(packages, watcher::Config::default()).applied_objects().for_each(move |package| {
            if let Ok(Package { status: Some(status), .. }) = package {
                recorder.lock().unwrap().push(status);
            }
            async {}
        }));

    let mut first = spawn_controller(&ns, store.path(), free_port(), "replica-0");
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&http_package("big", &server.url("/big.zip"), "")));
    wait_for(&ns, "pkg/big", "{.status.state}", "PROCESSING_UPLOAD").await;
    // Kill it once a good part of the bits has been staged.
    let deadline = Instant::now() + Duration::from_secs(30);
    let staged = || {
        files_under(store.path())
            .iter()
            .filter(|f| f.starts_with("staging"))
            .map(|f| std::fs::metadata(store.path().join(f)).map(|m| m.len()).unwrap_or(0))
            .sum::<u64>()
    };
    while staged() < size / 4 {
        assert!(Instant::now() < deadline, "nothing was staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let partial = staged();
    assert!(partial > 0 && partial < size, "killed mid-fetch, {partial} of {size} bytes staged");
    assert!(files_under(store.path()).iter().all(|f| f.starts_with("staging")), "no blob from a partial fetch");
    wait_for(&ns, "pkg/big", "{.status.state}", "PROCESSING_UPLOAD").await;
    wait_for(&ns, "pkg/big", "{.status.checksum}", "").await;

    // The same replica comes back (as a restarted container does) and finishes the job.
    let mut second = spawn_controller(&ns, store.path(), free_port(), "replica-0");
    let expected = coreutils_digests(60, size);
    wait_for(&ns, "pkg/big", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/big", "{.status.checksum.value}", &expected.sha256).await;
    wait_for(&ns, "pkg/big", "{.status.size}", &size.to_string()).await;
    second.kill().unwrap();
    second.wait().unwrap();
    watching.abort();

    let blob = kube_ok(&["get", "pkg/big", "-n", &ns, "-o", "jsonpath={.status.blob.key}"], None);
    let blobs: Vec<_> = files_under(store.path()).into_iter().filter(|f| !f.starts_with("staging")).collect();
    assert_eq!(blobs, [std::path::PathBuf::from(&blob)], "one blob, the one the status names");
    assert_eq!(std::fs::metadata(store.path().join(&blob)).unwrap().len(), size);
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2, "the watch saw the statuses: {seen:?}");
    for status in seen.iter() {
        if status.stored.blob.is_some() || status.stored.checksum.is_some() || status.state == Some(PackageState::Ready)
        {
            assert_eq!(status.state, Some(PackageState::Ready), "{status:?}");
            assert_eq!(status.stored.checksum.as_ref().unwrap().value, expected.sha256, "{status:?}");
            assert_eq!(status.stored.blob.as_ref().unwrap().key, blob, "{status:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_trickles_times_out_and_is_tried_again() {
    let Setup { ns, server, store, .. } = &setup("trickle").await;
    // 8 MiB at 64 KiB/s would take two minutes; spec.timeout allows 3 s.
    server.route("/trickle.zip", Reply::Slow { seed: 70, size: 8 << 20, per_second: 64 << 10 });
    kube_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&http_package("trickle", &server.url("/trickle.zip"), "  timeout: 3s\n")),
    );
    let started = Instant::now();
    wait_for(ns, "pkg/trickle", "{.status.conditions[?(@.type==\"Reconciling\")].reason}", "Timeout").await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(20), "timed out after {took:?}");
    let state = kube_ok(&["get", "pkg/trickle", "-n", ns, "-o", "jsonpath={.status.state}"], None);
    assert_eq!(state, "PROCESSING_UPLOAD", "a timeout is retried, not a failure");
    let message = kube_ok(&["get", "pkg/trickle", "-n", ns, "-o", "jsonpath={.status.error}"], None);
    assert!(message.contains("did not finish within 3s"), "{message}");
    // Tried again with backoff (at least 5 s later), and nothing of the attempts is kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.seen.lock().unwrap().iter().filter(|s| s.path == "/trickle.zip").count() < 2 {
        assert!(Instant::now() < deadline, "the fetch was not tried again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept: Vec<_> = files_under(store.path()).into_iter().filter(|f| !f.starts_with("staging")).collect();
    assert!(kept.is_empty(), "no blob from a fetch that timed out: {kept:?}");

    // A timeout the API server lets through (it parses) but outside 1s–24h is a spec error.
    kube_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&http_package("bad-timeout", &server.url("/trickle.zip"), "  timeout: 25h\n")),
    );
    wait_for(ns, "pkg/bad-timeout", "{.status.state}", "FAILED").await;
    let message = kube_ok(&["get", "pkg/bad-timeout", "-n", ns, "-o", "jsonpath={.status.error}"], None);
    assert!(message.contains("spec.timeout"), "{message}");
}

/// The `Ready` condition's reason of `object`.
fn ready_reason(ns: &str, object: &str) -> String {
    kube_ok(&["get", object, "-n", ns, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}"], None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_packages_of_an_app_expire_and_lose_their_bits() {
    let Setup { ns, server, store, .. } = &setup("retention").await;
    server.route("/app.zip", Reply::Body { seed: 91, size: 20_000, length: true });
    // Eight Packages of app `web`, created in this order; `p1` is exempt; `other` belongs to another app.
    let mut manifests = String::new();
    for n in 1..=8 {
        let annotations = if n == 1 { "  annotations:\n    bitsmith.dev/retain: \"true\"\n" } else { "" };
        manifests.push_str(&format!(
            "---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: p{n}\n{annotations}spec:\n  type: bits\n  appRef:\n    name: web\n  source:\n    http:\n      url: {}\n",
            server.url("/app.zip")
        ));
    }
    manifests.push_str(&format!(
        "---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: other\nspec:\n  type: bits\n  appRef:\n    name: api\n  source:\n    http:\n      url: {}\n",
        server.url("/app.zip")
    ));
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifests));
    let uid = |name: &str| kube_ok(&["get", "pkg", name, "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let uids: Vec<String> = (1..=8).map(|n| uid(&format!("p{n}"))).collect();

    // Of the seven not exempt, the newest five are kept: p2 and p3 expire.
    for n in [2, 3] {
        wait_for(ns, &format!("pkg/p{n}"), "{.status.state}", "EXPIRED").await;
        assert_eq!(ready_reason(ns, &format!("pkg/p{n}")), "Expired");
        let message = kube_ok(
            &[
                "get",
                &format!("pkg/p{n}"),
                "-n",
                ns,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
            ],
            None,
        );
        assert!(message.contains("app \"web\"") && message.contains("5 are kept"), "{message}");
        let object: serde_json::Value =
            serde_json::from_str(&kube_ok(&["get", &format!("pkg/p{n}"), "-n", ns, "-o", "json"], None)).unwrap();
        let status = &object["status"];
        assert!(status["blob"].is_null() && status["artifact"].is_null(), "an expired Package names no bits: {status}");
        assert!(status["checksum"]["value"].is_string(), "what the bits were stays on record: {status}");
    }
    for name in ["p1", "p4", "p5", "p6", "p7", "p8", "other"] {
        wait_for(ns, &format!("pkg/{name}"), "{.status.state}", "READY").await;
    }
    // Their bits are gone from the store; the others' are there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let files = files_under(store.path());
        let holds = |uid: &str| files.iter().any(|f| f.to_string_lossy().contains(uid));
        let expired_gone = !holds(&uids[1]) && !holds(&uids[2]);
        let kept_there = [0, 3, 4, 5, 6, 7].iter().all(|&i| holds(&uids[i]));
        if expired_gone && kept_there {
            break;
        }
        assert!(Instant::now() < deadline, "expired bits removed, kept ones there: {files:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = kube_ok(
        &[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "reason=Expired",
            "-o",
            "jsonpath={.items[*].involvedObject.name}",
        ],
        None,
    );
    assert!(events.contains("p2") && events.contains("p3"), "an Event says why: {events:?}");

    // Expiry is final: a new spec fetches nothing.
    kube_ok(&["patch", "pkg/p2", "-n", ns, "--type=merge", "-p", r#"{"spec":{"timeout":"5m"}}"#], None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(kube_ok(&["get", "pkg/p2", "-n", ns, "-o", "jsonpath={.status.state}"], None), "EXPIRED");

    // A ninth Package, once READY, pushes the next oldest out.
    kube_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: p9\nspec:\n  type: bits\n  appRef:\n    name: web\n  source:\n    http:\n      url: {}\n",
            server.url("/app.zip")
        )),
    );
    wait_for(ns, "pkg/p9", "{.status.state}", "READY").await;
    wait_for(ns, "pkg/p4", "{.status.state}", "EXPIRED").await;
    assert_eq!(kube_ok(&["get", "pkg/p1", "-n", ns, "-o", "jsonpath={.status.state}"], None), "READY", "exempt");
    assert_eq!(kube_ok(&["get", "pkg/other", "-n", ns, "-o", "jsonpath={.status.state}"], None), "READY");

    // Droplets likewise: of six STAGED Droplets of the app, the oldest expires.
    let droplets: String = (1..=6)
        .map(|n| {
            format!(
                "---\napiVersion: bitsmith.dev/v1alpha1\nkind: Droplet\nmetadata:\n  name: d{n}\nspec:\n  appRef:\n    name: web\n  source:\n    http:\n      url: {}\n",
                server.url("/app.zip")
            )
        })
        .collect();
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&droplets));
    wait_for(ns, "droplet/d1", "{.status.state}", "EXPIRED").await;
    for n in 2..=6 {
        wait_for(ns, &format!("droplet/d{n}"), "{.status.state}", "STAGED").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_awaited_too_long_expires() {
    let retention =
        bitsmith::retention::Retention { awaiting_upload: Some(Duration::from_secs(3)), ..Default::default() };
    let Setup { ns, .. } = &setup_with("awaiting-expiry", retention).await;
    let awaiting = |name: &str| {
        format!("apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n")
    };
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&awaiting("late")));
    let created = Instant::now();
    wait_for(ns, "pkg/late", "{.status.state}", "AWAITING_UPLOAD").await;
    wait_for(ns, "pkg/late", "{.status.state}", "EXPIRED").await;
    let took = created.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(15), "expired after {took:?}");
    let message = kube_ok(
        &["get", "pkg/late", "-n", ns, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}"],
        None,
    );
    assert!(message.contains("no upload came within 3s"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_request_is_handled_at_once_and_looks_at_the_stored_bits() {
    let Setup { ns, server, store, .. } = &setup("requested").await;
    server.route("/app.zip", Reply::Body { seed: 97, size: 50_000, length: true });
    server.route("/latest.zip", Reply::Redirect("/app.zip".into()));
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&http_package("app", &server.url("/latest.zip"), "")));
    wait_for(ns, "pkg/app", "{.status.state}", "READY").await;
    let get = |path: &str| kube_ok(&["get", "pkg/app", "-n", ns, "-o", &format!("jsonpath={path}")], None);
    let checksum = get("{.status.checksum.value}");
    // What was read: the URL after the redirect, and its size.
    assert_eq!(get("{.status.resolvedSource.url}"), server.url("/app.zip"));
    assert_eq!(get("{.status.resolvedSource.size}"), "50000");

    // A request on intact bits is echoed, and nothing else changes.
    let version = get("{.metadata.resourceVersion}");
    kube_ok(&["annotate", "pkg/app", "-n", ns, "bitsmith.dev/requested-at=first"], None);
    wait_for(ns, "pkg/app", "{.status.lastHandledReconcileAt}", "first").await;
    assert_eq!(get("{.status.state}"), "READY");
    assert_ne!(get("{.metadata.resourceVersion}"), version);

    // Bits lost behind the operator's back are found by the next request, long before an audit, and fetched
    // again.
    let blob: Vec<_> = files_under(store.path()).into_iter().filter(|f| f.starts_with("packages")).collect();
    assert_eq!(blob.len(), 1, "{blob:?}");
    std::fs::remove_file(store.path().join(&blob[0])).unwrap();
    let requested = Instant::now();
    kube_ok(&["annotate", "--overwrite", "pkg/app", "-n", ns, "bitsmith.dev/requested-at=second"], None);
    wait_for(ns, "pkg/app", "{.status.lastHandledReconcileAt}", "second").await;
    wait_for(ns, "pkg/app", "{.status.state}", "READY").await;
    assert!(store.path().join(&blob[0]).exists(), "fetched again");
    assert_eq!(get("{.status.checksum.value}"), checksum);
    assert!(requested.elapsed() < Duration::from_secs(30), "handled after {:?}", requested.elapsed());
    let reasons = kube_ok(
        &[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "involvedObject.name=app",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
        None,
    );
    assert!(reasons.contains("BlobMissing"), "{reasons}");
}

/// `spec.interval`, with a real wait of one interval: a source changed in place is fetched again (new revision,
/// old blob gone, an Event); an unchanged one is asked with a conditional GET and its status is not written; a
/// pinned one that changes keeps its good bits READY and says so; a suspended one is not asked at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutable_sources_are_checked_again_every_interval() {
    let Setup { ns, server, store, .. } = &setup("interval").await;
    let size = 60_000;
    let version = |seed: u64, etag: &str| Reply::Versioned { seed, size, etag: etag.into() };
    for (path, seed) in [("/same.zip", 161), ("/moving.zip", 162), ("/pinned.zip", 163), ("/paused.zip", 164)] {
        server.route(path, version(seed, "v1"));
    }
    let pin = coreutils_digests(163, size).sha256;
    let every_minute = "  interval: 1m\n";
    let manifests = [
        http_package("same", &server.url("/same.zip"), every_minute),
        http_package("moving", &server.url("/moving.zip"), every_minute),
        http_package(
            "pinned",
            &server.url("/pinned.zip"),
            &format!("{every_minute}  checksum:\n    type: sha256\n    value: {pin}\n"),
        ),
        http_package("paused", &server.url("/paused.zip"), every_minute),
    ]
    .join("---\n");
    kube_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifests));
    for name in ["same", "moving", "pinned", "paused"] {
        wait_for(ns, &format!("pkg/{name}"), "{.status.state}", "READY").await;
    }
    let get =
        |name: &str, path: &str| kube_ok(&["get", "pkg", name, "-n", ns, "-o", &format!("jsonpath={path}")], None);
    kube_ok(&["patch", "pkg", "paused", "-n", ns, "--type=merge", "-p", r#"{"spec":{"suspend":true}}"#], None);
    wait_for(ns, "pkg/paused", "{.status.conditions[?(@.type==\"Reconciling\")].reason}", "Suspended").await;
    assert_eq!(get("paused", "{.status.conditions[?(@.type==\"Reconciling\")].status}"), "False");
    let unchanged_version = get("same", "{.metadata.resourceVersion}");
    let first_revision = get("moving", "{.status.artifact.revision}");

    server.route("/moving.zip", version(165, "v2"));
    server.route("/pinned.zip", version(166, "v2"));
    server.route("/paused.zip", version(167, "v2"));
    let moved = coreutils_digests(165, size).sha256;
    let interval_and_margin = Duration::from_secs(60 + 30);
    wait_for_within(ns, "pkg/moving", "{.status.checksum.value}", &moved, interval_and_margin).await;
    assert_eq!(get("moving", "{.status.artifact.revision}"), format!("sha256:{moved}"));
    assert_ne!(get("moving", "{.status.artifact.revision}"), first_revision);
    assert_eq!(get("moving", "{.status.resolvedSource.etag}"), "\"v2\"");
    wait_for_within(
        ns,
        "pkg/pinned",
        "{.status.conditions[?(@.type==\"SourceVerified\")].reason}",
        "ChecksumMismatch",
        interval_and_margin,
    )
    .await;
    assert_eq!(get("pinned", "{.status.state}"), "READY");
    assert_eq!(get("pinned", "{.status.checksum.value}"), pin, "the bits that match stay");
    assert_eq!(get("pinned", "{.status.conditions[?(@.type==\"Ready\")].status}"), "True");

    // The unchanged source was asked too, conditionally, and answered 304: nothing was written.
    let asked = |path: &str| server.seen.lock().unwrap().iter().filter(|s| s.path == path).cloned().collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(30);
    while asked("/same.zip").len() < 2 {
        assert!(Instant::now() < deadline, "the unchanged source was not asked again: {:?}", asked("/same.zip"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = &asked("/same.zip")[1];
    assert_eq!(again.headers.get("if-none-match").map(String::as_str), Some("\"v1\""), "{:?}", again.headers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get("same", "{.metadata.resourceVersion}"),
        unchanged_version,
        "no status write for an unchanged source"
    );
    assert_eq!(asked("/paused.zip").len(), 1, "a suspended source is left alone");
    assert_eq!(get("paused", "{.status.checksum.value}"), coreutils_digests(164, size).sha256);

    let events = |name: &str| {
        kube_ok(
            &[
                "get",
                "events",
                "-n",
                ns,
                "--field-selector",
                &format!("involvedObject.name={name}"),
                "-o",
                "jsonpath={.items[*].reason}",
            ],
            None,
        )
    };
    assert!(events("moving").contains("NewRevision"), "{}", events("moving"));
    assert!(events("pinned").contains("ChecksumMismatch"), "{}", events("pinned"));
    // One blob per Package: the moving one's earlier blob went once its status named the new one.
    let blobs: Vec<_> = files_under(store.path()).into_iter().filter(|f| f.starts_with("packages")).collect();
    assert_eq!(blobs.len(), 4, "{blobs:?}");
}
