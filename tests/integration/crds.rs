//! The committed CRDs match the Rust types, and stay within what a Kubernetes 1.20 apiserver accepts.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
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

#[test]
fn crds_need_no_cel_and_declare_the_printer_columns() {
    let yaml = bitsmith::crd::all_yaml();
    assert!(!yaml.contains("x-kubernetes-validations"), "CEL rules are not available on Kubernetes 1.20");
    let package = bitsmith::crd::all().into_iter().find(|c| c.spec.names.kind == "Package").unwrap();
    assert_eq!(package.spec.names.short_names, Some(vec!["pkg".to_string()]));
    assert_eq!(package.spec.scope, "Namespaced");
    let version = &package.spec.versions[0];
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Type", "State", "Checksum", "Age"]);
    let schema = serde_json::to_value(&version.schema).unwrap();
    let source = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["source"];
    assert_eq!(source["oneOf"].as_array().map(|a| a.len()), Some(3), "source must say exactly one variant");
    let states = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["state"]["enum"];
    assert!(states.as_array().unwrap().iter().any(|s| s == "AWAITING_UPLOAD"));
}
