//! The committed CRDs (top-level and in the Helm chart) match the Rust types, and stay within what a
//! Kubernetes 1.20 apiserver accepts.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    // kubectl applies crds/; the Helm chart installs its own copy.
    for dir in ["crds", "charts/bitsmith/crds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for crd in bitsmith::crd::all() {
            let file = dir.join(bitsmith::crd::file_name(&crd));
            let committed =
                std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", file.display()));
            assert!(
                committed == bitsmith::crd::to_yaml(&crd),
                "{} differs from the Rust types: run `make crds` and commit the result",
                file.display()
            );
        }
    }
}

#[test]
fn crds_need_no_cel_and_declare_the_printer_columns() {
    let yaml = bitsmith::crd::all_yaml();
    assert!(!yaml.contains("x-kubernetes-validations"), "CEL rules are not available on Kubernetes 1.20");
    let package = bitsmith::crd::all().into_iter().find(|c| c.spec.names.kind == "Package").unwrap();
    assert_eq!(package.spec.names.short_names, Some(vec!["pkg".to_string()]));
    assert_eq!(package.spec.scope, "Namespaced");
    let version = &package.spec.versions[0];
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let columns = version.additional_printer_columns.iter().flatten();
    let shown = |wide: bool| -> Vec<_> {
        columns.clone().filter(|c| wide || c.priority.unwrap_or(0) == 0).map(|c| c.name.as_str()).collect()
    };
    // What fits a terminal by default; the 64-digit checksum and the refresh settings with `-o wide`.
    assert_eq!(shown(false), ["Type", "State", "Ready", "Age"]);
    assert_eq!(shown(true), ["Type", "State", "Ready", "Age", "Checksum", "Interval", "Suspended"]);
    let schema = serde_json::to_value(&version.schema).unwrap();
    let source = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["source"];
    assert_eq!(source["oneOf"].as_array().map(|a| a.len()), Some(3), "source must say exactly one variant");
    let state = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["state"];
    let states = state["enum"].as_array().unwrap();
    assert!(states.iter().any(|s| s == "AWAITING_UPLOAD"));
    assert!(states.iter().all(|s| s.is_string()), "Kubernetes refuses null enum members: {states:?}");
    assert_eq!(state["nullable"], true);
}

#[test]
fn a_kubernetes_1_20_apiserver_serves_the_crds() {
    use crate::support::kube::{install_crds, kubectl, kubectl_ok, namespace};
    install_crds();
    let version = kubectl_ok(&["version", "-o", "json"], None);
    assert!(version.contains("\"gitVersion\": \"v1.20"), "the test control plane is Kubernetes 1.20: {version}");
    let ns = namespace("crds");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    kubectl_ok(&["apply", "-n", &ns, "-f", &format!("{examples}/packages.yaml")], None);
    kubectl_ok(&["apply", "-n", &ns, "-f", &format!("{examples}/droplet.yaml")], None);

    let table = kubectl_ok(&["get", "pkg", "-n", &ns, "hello"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "STATE", "READY", "AGE"]);
    assert!(table.contains("hello") && table.contains("bits"), "{table}");
    let wide = kubectl_ok(&["get", "pkg", "-n", &ns, "hello", "-o", "wide"], None);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "STATE", "READY", "AGE", "CHECKSUM", "INTERVAL", "SUSPENDED"]);

    // Durations are checked by the API server: an interval under a minute or a timeout that is not a duration.
    let watched = |interval: &str, timeout: &str| {
        format!(
            "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: watched\nspec:\n  type: bits\n  source:\n    http: {{url: 'http://127.0.0.1/a.zip'}}\n  interval: '{interval}'\n  timeout: '{timeout}'\n"
        )
    };
    for (interval, timeout, field) in [("30s", "10m", "spec.interval"), ("1m", "forever", "spec.timeout")] {
        let out = kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", "-"], Some(&watched(interval, timeout)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(field), "{interval} / {timeout}: {stderr}");
    }
    kubectl_ok(&["apply", "--dry-run=server", "-n", &ns, "-f", "-"], Some(&watched("1h30m", "90s")));

    let two_sources = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: two\nspec:\n  type: bits\n  source:\n    http: {url: 'http://127.0.0.1/a.zip'}\n    package: {name: hello}\n";
    let out = kubectl(&["apply", "-n", &ns, "-f", "-"], Some(two_sources));
    assert!(!out.status.success(), "a source with two variants must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.source"), "{}", String::from_utf8_lossy(&out.stderr));

    let bad_type = two_sources.replace("type: bits", "type: zip").replace("    package: {name: hello}\n", "");
    let out = kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&bad_type));
    assert!(!out.status.success(), "an unknown package type must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.type"), "{}", String::from_utf8_lossy(&out.stderr));

    // The status subresource takes a status in the shape `bitsmith fetch` prints.
    let status = r#"{"status":{"state":"READY","checksum":{"type":"sha256","value":"ab"},"size":3,"conditions":[{"type":"Ready","status":"True","reason":"Succeeded","message":"stored 3 bytes","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    kubectl_ok(&["patch", "pkg", "hello", "-n", &ns, "--subresource=status", "--type=merge", "-p", status], None);
    let state = kubectl_ok(&["get", "pkg", "hello", "-n", &ns, "-o", "jsonpath={.status.state}"], None);
    assert_eq!(state, "READY");
    kubectl_ok(&["delete", "pkg,droplet", "--all", "-n", &ns], None);
}
