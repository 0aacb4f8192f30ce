//! The controller against the real control plane, driven the way a user would: `kubectl apply`, `kubectl get`,
//! `kubectl delete`.

use std::time::{Duration, Instant};

use bitsmith::controller::{self, Options};

use crate::support::data::coreutils_digests;
use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::{install_crds, kubectl, kubectl_ok, namespace};
use crate::support::{file_fetcher, files_under};

/// kubectl blocks; let the runtime's other worker serve the controller and the source meanwhile.
fn kube_ok(args: &[&str], stdin: Option<&str>) -> String {
    tokio::task::block_in_place(|| kubectl_ok(args, stdin))
}

/// Poll `jsonpath` of an object until it equals `want`.
async fn wait_for(ns: &str, object: &str, jsonpath: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = tokio::task::block_in_place(|| {
            kubectl(&["get", object, "-n", ns, "-o", &format!("jsonpath={jsonpath}")], None)
        });
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{object}: {jsonpath} is {got:?}, not {want:?}, after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_go_ready_and_their_blobs_go_with_them() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("controller"));
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 51, size: 5 << 20, length: true });
    let store = tempfile::tempdir().unwrap();
    let client = kube::Client::try_default().await.expect("a client for the test control plane");
    let options = Options { concurrency: 4, namespace: Some(ns.clone()), reporter: "bitsmith-test".into() };
    let running = tokio::spawn(controller::run(client, file_fetcher(store.path(), 1 << 30), options));

    let manifests = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: app\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: registry.example.com/team/app:1.0\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: upload\nspec:\n  type: bits\n",
        server.url("/app.zip")
    );
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifests));
    wait_for(&ns, "pkg/app", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/image", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/upload", "{.status.state}", "AWAITING_UPLOAD").await;

    let expected = coreutils_digests(51, 5 << 20);
    wait_for(&ns, "pkg/app", "{.status.checksum.value}", &expected.sha256).await;
    wait_for(&ns, "pkg/app", "{.status.hash.value}", &expected.sha1).await;
    wait_for(&ns, "pkg/app", "{.status.size}", &(5u64 << 20).to_string()).await;
    wait_for(&ns, "pkg/app", "{.status.conditions[?(@.type==\"Ready\")].status}", "True").await;
    let table = kube_ok(&["get", "pkg", "app", "-n", &ns], None);
    assert!(table.contains("READY") && table.contains(&expected.sha256), "{table}");
    let events = kube_ok(&["get", "events", "-n", &ns, "-o", "jsonpath={.items[*].reason}"], None);
    assert!(events.contains("Succeeded"), "an Event for the transition: {events}");
    assert_eq!(files_under(store.path()).len(), 1, "one blob: {:?}", files_under(store.path()));

    // Deleting the Package removes its blob through the finalizer, and the object goes.
    kube_ok(&["delete", "pkg", "app", "-n", &ns, "--wait=true", "--timeout=60s"], None);
    assert!(files_under(store.path()).is_empty(), "{:?}", files_under(store.path()));
    running.abort();
}
