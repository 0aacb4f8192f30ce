//! Sources cannot reach what the operator can: refused settings and addresses, tried on the real controller
//! binary against the real control plane. Every address is loopback: 127.0.0.2 (denied with
//! `--deny-source-cidr`, as the cluster's own ranges would be) and 127.0.0.1 (denied too, so that `localhost`
//! shows the check after name resolution) each have a listener that must see no connection at all.

use std::process::Child;

use crate::support::files_under;
use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::{install_crds, kube_ok, kubectl, namespace, wait_for};

/// A value that must not appear in anything the operator writes or says.
const MARKER: &str = "bitsmith-secret-marker-5f1d8c";

fn package(name: &str, source: &str) -> String {
    format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  source:\n{source}"
    )
}

fn http(url: &str) -> String {
    format!("    http:\n      url: {url}\n")
}

fn object(url: &str, endpoint: &str, options: &[(&str, &str)], secret: Option<&str>) -> String {
    let mut out = format!("    objectStore:\n      url: {url}\n      endpoint: {endpoint}\n");
    if !options.is_empty() {
        out.push_str("      options:\n");
        for (k, v) in options {
            out.push_str(&format!("        {k}: \"{v}\"\n"));
        }
    }
    if let Some(secret) = secret {
        out.push_str(&format!("      secretRef: {{name: {secret}}}\n"));
    }
    out
}

fn spawn_controller(ns: &str, store: &std::path::Path, log: &std::path::Path, extra: &[&str]) -> Child {
    let log = std::fs::File::create(log).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(["controller", "--namespace", ns, "--leader-elect=false", "--metrics-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(store)
        .args(extra)
        .env("KUBECONFIG", crate::support::kube::kubeconfig())
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn jsonpath(ns: &str, object: &str, path: &str) -> String {
    kube_ok(&["get", object, "-n", ns, "-o", &format!("jsonpath={path}")], None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_reach_neither_denied_addresses_nor_the_controllers_credentials() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sec-sources"));
    // Denied listeners: nothing may connect to them.
    let denied = TestServer::start_at("127.0.0.2").await;
    let local = TestServer::start().await;
    // Allowed servers: one serves bits and redirects, one stands in for an object store that must not be asked.
    let allowed = TestServer::start_at("127.0.0.3").await;
    let object_store = TestServer::start_at("127.0.0.4").await;
    allowed.route("/app.zip", Reply::Body { seed: 7, size: 4096, length: true });
    allowed.route("/hop-literal", Reply::Redirect(denied.url("/x.zip")));
    allowed.route("/hop-name", Reply::Redirect(format!("http://localhost:{}/x.zip", local.addr.port())));
    allowed.route("/metadata.zip", Reply::Body { seed: 8, size: 4096, length: true });
    let store = tempfile::tempdir().unwrap();
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("controller.log");
    let mut controller = spawn_controller(
        &ns,
        store.path(),
        &log,
        &[
            "--allow-source-cidr=127.0.0.0/8",
            "--deny-source-cidr=127.0.0.2/32",
            "--deny-source-cidr=127.0.0.1/32",
            "--deny-source-cidr=::1/128",
        ],
    );

    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: gcs\nstringData:\n  google_service_account: /etc/passwd-{MARKER}\n  google_service_account_key: '{{\"private_key\": \"{MARKER}\"}}'\n"
    );
    let store_endpoint = object_store.url("");
    let keys = [("aws_access_key_id", "AK"), ("aws_secret_access_key", "SK")];
    let refused: Vec<(&str, String, &str)> = vec![
        ("literal", package("literal", &http(&denied.url("/x.zip"))), "127.0.0.2"),
        ("redirect-literal", package("redirect-literal", &http(&allowed.url("/hop-literal"))), "127.0.0.2"),
        ("by-name", package("by-name", &http(&format!("http://localhost:{}/x.zip", local.addr.port()))), "localhost"),
        ("redirect-name", package("redirect-name", &http(&allowed.url("/hop-name"))), "localhost"),
        (
            "metadata-header",
            package(
                "metadata-header",
                &format!(
                    "{}      headers:\n      - {{name: Metadata-Flavor, value: Google}}\n",
                    http(&allowed.url("/metadata.zip"))
                ),
            ),
            "metadata-flavor",
        ),
        (
            "web-identity",
            package(
                "web-identity",
                &object(
                    "s3://bucket/app.zip",
                    &store_endpoint,
                    &[
                        ("aws_web_identity_token_file", "/var/run/secrets/kubernetes.io/serviceaccount/token"),
                        ("aws_role_arn", "arn:aws:iam::1:role/x"),
                        ("aws_endpoint_url_sts", &object_store.url("/sts")),
                    ],
                    None,
                ),
            ),
            // The first refused key, in the order the options are read (sorted).
            "aws_endpoint_url_sts",
        ),
        (
            "service-account-path",
            package("service-account-path", &object("gs://bucket/app.zip", &store_endpoint, &[], Some("gcs"))),
            "google_service_account",
        ),
        (
            "ambient",
            package("ambient", &object("s3://bucket/app.zip?credentials=ambient", &store_endpoint, &[], None)),
            "credentials",
        ),
        (
            "proxy",
            package(
                "proxy",
                &object("s3://bucket/app.zip", &store_endpoint, &[("aws_proxy_url", &object_store.url(""))], None),
            ),
            "aws_proxy_url",
        ),
        (
            "endpoint-by-name",
            package(
                "endpoint-by-name",
                &object("s3://bucket/app.zip", &format!("http://localhost:{}", local.addr.port()), &keys, None),
            ),
            "localhost",
        ),
        (
            "endpoint-literal",
            package("endpoint-literal", &object("s3://bucket/app.zip", &denied.url(""), &keys, None)),
            "127.0.0.2",
        ),
    ];
    // Secrets whose values are wrong: each fails with a reason that names the Secret and never shows the value.
    let bad_secrets = [
        ("half-basic", format!("  username: {MARKER}\n")),
        ("bad-ca", format!("  ca.crt: \"-----BEGIN CERTIFICATE-----\\n{MARKER}\\n-----END CERTIFICATE-----\\n\"\n")),
        ("bad-header", format!("  header.X-Token: \"\\x01{MARKER}\"\n")),
        ("wrong-keys", format!("  aws_access_key_id: AK\n  aws_secret_access_key: {MARKER}\n")),
    ];
    let mut manifests = vec![secret, package("ok", &http(&allowed.url("/app.zip")))];
    manifests.extend(refused.iter().map(|(_, manifest, _)| manifest.clone()));
    for (name, data) in &bad_secrets {
        manifests.push(format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\nstringData:\n{data}"));
        let source = match *name {
            // The stand-in answers 404 to the signed request: the key is sent, and still never shown.
            "wrong-keys" => object("s3://bucket/app.zip", &allowed.url(""), &[], Some(name)),
            _ => format!("{}      secretRef: {{name: {name}}}\n", http(&allowed.url("/app.zip"))),
        };
        manifests.push(package(name, &source));
    }
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifests.join("---\n")));

    wait_for(&ns, "pkg/ok", "{.status.state}", "READY").await;
    for (name, _, named) in &refused {
        let object = format!("pkg/{name}");
        wait_for(&ns, &object, "{.status.state}", "FAILED").await;
        let stalled = jsonpath(&ns, &object, "{.status.conditions[?(@.type==\"Stalled\")].reason}");
        assert_eq!(stalled, "InvalidSource", "{name}");
        let message = jsonpath(&ns, &object, "{.status.conditions[?(@.type==\"Stalled\")].message}");
        assert!(message.contains(named), "{name}: {named:?} not in {message:?}");
        assert_eq!(jsonpath(&ns, &object, "{.status.error}"), message, "{name}");
        let selector = format!("involvedObject.name={name}");
        let events = kube_ok(
            &[
                "get",
                "events",
                "-n",
                &ns,
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={.items[*].type}/{.items[*].reason}",
            ],
            None,
        );
        assert!(events.contains("Warning") && events.contains("InvalidSource"), "{name}: {events}");
    }

    for (name, _) in &bad_secrets {
        let object = format!("pkg/{name}");
        let reason = if *name == "wrong-keys" { "SourceUnavailable" } else { "InvalidCredentials" };
        wait_for(&ns, &object, "{.status.conditions[?(@.type==\"Ready\")].reason}", reason).await;
        let error = jsonpath(&ns, &object, "{.status.error}");
        assert!(error.contains(name) || *name == "wrong-keys", "{name}: the Secret is named in {error:?}");
    }

    assert_eq!(denied.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "127.0.0.2 was contacted");
    assert_eq!(local.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "127.0.0.1 was contacted");
    assert_eq!(object_store.connections.load(std::sync::atomic::Ordering::SeqCst), 0, "a refused store was contacted");
    let asked: Vec<String> = allowed.seen.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert!(!asked.contains(&"/metadata.zip".to_string()), "a metadata header was sent: {asked:?}");
    // Only the allowed Package's blob, and nothing staged.
    let stored = files_under(store.path());
    assert_eq!(stored.len(), 1, "{stored:?}");

    controller.kill().unwrap();
    controller.wait().unwrap();
    // The Secret's values stay in the Secret: not in statuses, Events or the controller's own log.
    let statuses = kube_ok(&["get", "packages", "-n", &ns, "-o", "jsonpath={.items[*].status}"], None);
    let events = kube_ok(&["get", "events", "-n", &ns, "-o", "yaml"], None);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("InvalidSource") || logged.contains("invalid"), "the log says something: {logged}");
    for (what, text) in [("statuses", &statuses), ("Events", &events), ("the log", &logged)] {
        assert!(!text.contains(MARKER), "a Secret value leaked into {what}");
    }
    let _ = tokio::task::block_in_place(|| kubectl(&["delete", "namespace", &ns, "--wait=false"], None));
}
