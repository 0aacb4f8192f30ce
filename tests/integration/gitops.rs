//! What GitOps tools read: the Argo CD health script (run by a real Lua interpreter on the statuses the
//! controller writes against the real control plane) and the Flux-style artifact.

use std::sync::Arc;

use bitsmith::controller::{self, Options};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::support::file_fetcher;
use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::{install_crds, kube_ok, namespace, wait_for};

const HEALTH: &str = include_str!("../../config/argocd/health.lua");

/// `value` as a Lua expression.
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => {
            format!("{{{}}}", map.iter().map(|(k, v)| format!("[{k:?}] = {}", lua(v))).collect::<Vec<_>>().join(", "))
        }
    }
}

/// Argo CD's verdict on `object`: `(status, message)`, from `lua5.4` running the shipped script.
fn argocd_health(object: &Value) -> (String, String) {
    let program = format!(
        "obj = {}\nlocal hs = (function() {HEALTH} end)()\nio.write(hs.status, '\\n', hs.message or '')",
        lua(object)
    );
    let out = std::process::Command::new("lua5.4")
        .args(["-e", &program])
        .output()
        .expect("lua5.4: scripts/with-test-env.sh installs it");
    assert!(out.status.success(), "lua: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

#[test]
fn the_argocd_patch_holds_the_health_script_for_both_kinds() {
    let patch: Value =
        serde_saphyr::from_str(include_str!("../../config/argocd/argocd-cm-patch.yaml")).expect("valid YAML");
    for kind in ["Package", "Droplet"] {
        let key = format!("resource.customizations.health.bitsmith.dev_{kind}");
        assert_eq!(patch["data"][&key].as_str(), Some(HEALTH), "{key} drifted from config/argocd/health.lua");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argocd_health_follows_the_status_the_controller_writes() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("gitops"));
    let server = TestServer::start().await;
    server.route("/ok.zip", Reply::Body { seed: 80, size: 10_000, length: true });
    server.route("/slow.zip", Reply::Stall { seed: 81, announced: 1 << 20, sent: 1000 });
    let store = tempfile::tempdir().unwrap();
    let client = kube::Client::try_default().await.unwrap();
    let options = Options {
        concurrency: 4,
        namespace: Some(ns.clone()),
        reporter: "bitsmith-test".into(),
        metrics: Arc::default(),
        urls: None,
        upload_claim_timeout: std::time::Duration::from_secs(60),
        package_retention: Default::default(),
        droplet_retention: Default::default(),
        audit: Default::default(),
    };
    let running = tokio::spawn(controller::run(
        client,
        file_fetcher(store.path(), 1 << 30),
        options,
        bitsmith::leader::Leadership::always(),
    ));

    let package = |name: &str, url: &str, extra: &str| {
        format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {name}\nspec:\n  type: bits\n  source:\n    http:\n      url: {url}\n{extra}---\n"
        )
    };
    let pin = format!("  checksum:\n    type: sha256\n    value: {}\n", "f".repeat(64));
    let manifests = [
        package("ready", &server.url("/ok.zip"), ""),
        package("failed", &server.url("/ok.zip"), &pin),
        package("fetching", &server.url("/slow.zip"), ""),
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: awaiting\nspec:\n  type: bits\n".into(),
    ]
    .concat();
    kube_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifests));
    wait_for(&ns, "pkg/ready", "{.status.state}", "READY").await;
    wait_for(&ns, "pkg/failed", "{.status.state}", "FAILED").await;
    wait_for(&ns, "pkg/fetching", "{.status.conditions[?(@.type==\"Reconciling\")].reason}", "Fetching").await;
    wait_for(&ns, "pkg/awaiting", "{.status.state}", "AWAITING_UPLOAD").await;

    let list: Value = serde_json::from_str(&kube_ok(&["get", "pkg", "-n", &ns, "-o", "json"], None)).unwrap();
    let verdicts: Vec<(String, String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let (status, message) = argocd_health(item);
            (item["metadata"]["name"].as_str().unwrap().to_string(), status, message)
        })
        .collect();
    let by_name = |name: &str| verdicts.iter().find(|v| v.0 == name).cloned().unwrap();
    assert_eq!(by_name("ready").1, "Healthy", "{verdicts:?}");
    let failed = by_name("failed");
    assert_eq!(failed.1, "Degraded");
    assert!(failed.2.contains("checksum mismatch"), "{failed:?}");
    assert_eq!(by_name("fetching").1, "Progressing");
    assert_eq!(by_name("awaiting").1, "Suspended");
    let unseen = serde_json::json!({"metadata": {"name": "new", "generation": 1}});
    assert_eq!(argocd_health(&unseen).0, "Progressing");

    // READY objects carry a Flux-style artifact.
    let ready = list["items"].as_array().unwrap().iter().find(|i| i["metadata"]["name"] == "ready").unwrap();
    // Past retention: final and nothing to repair, so not Degraded.
    let mut expired = ready.clone();
    let status: bitsmith::resources::PackageStatus = serde_json::from_value(ready["status"].clone()).unwrap();
    let message = "expired: 5 newer packages of app \"web\" are finished, and 5 are kept per app";
    expired["status"] =
        serde_json::to_value(bitsmith::status::expired(&status, message, Some(1), Timestamp::now())).unwrap();
    assert_eq!(argocd_health(&expired), ("Suspended".to_string(), message.to_string()));
    // Stored bits lost: fetched again (Progressing), or, uploaded, gone for good (Degraded).
    let with_status = |status: bitsmith::resources::PackageStatus| {
        let mut object = ready.clone();
        object["status"] = serde_json::to_value(status).unwrap();
        argocd_health(&object)
    };
    let lost = |refetch| {
        bitsmith::status::bits_lost(&status, "BlobMissing", "blob k is gone", refetch, Some(1), Timestamp::now())
    };
    let refetching = with_status(lost(true));
    assert_eq!(refetching.0, "Progressing", "{refetching:?}");
    assert!(refetching.1.contains("fetching them again"), "{refetching:?}");
    let gone = with_status(lost(false));
    assert_eq!(gone.0, "Degraded", "{gone:?}");
    assert!(gone.1.contains("upload them again"), "{gone:?}");
    // spec.suspend, and a pinned source that changed to other bits.
    let suspended = with_status(bitsmith::status::suspended(&status, Some(1), Timestamp::now()));
    assert_eq!(suspended.0, "Suspended", "{suspended:?}");
    assert!(suspended.1.contains("spec.suspend"), "{suspended:?}");
    let refused = bitsmith::status::source_unverified(&status, "checksum mismatch: x", Some(1), Timestamp::now());
    let refused = with_status(refused);
    assert_eq!(refused.0, "Healthy", "{refused:?}");
    assert!(refused.1.contains("checksum mismatch"), "{refused:?}");
    let artifact = &ready["status"]["artifact"];
    assert_eq!(artifact["digest"], format!("sha256:{}", crate::support::data::coreutils_digests(80, 10_000).sha256));
    assert_eq!(artifact["revision"], artifact["digest"]);
    assert_eq!(artifact["size"], 10_000);
    assert!(artifact["url"].as_str().unwrap().starts_with("file://"), "{artifact}");
    assert!(artifact["lastUpdateTime"].is_string());
    running.abort();
}
