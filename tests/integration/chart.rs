//! The Helm chart (`charts/bitsmith`): linted, rendered and schema-checked offline through the Helm SDK
//! (`scripts/helm.py`), every manifest validated against Kubernetes' schemas, then installed, upgraded and
//! uninstalled for real on a control plane of its own, where `bitsmith controller` runs with the chart's
//! ServiceAccount token to show that the chart's RBAC is enough, and `kubectl auth can-i` that it is no more.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::http_server::{Reply, TestServer};
use crate::support::kube::OwnControlPlane;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/bitsmith");
const HELM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/helm.py");

/// `scripts/helm.py ARGS`, against `kubeconfig` when given.
fn helm(args: &[&str], kubeconfig: Option<&str>) -> Output {
    let mut command = Command::new("python3");
    command.arg(HELM).args(args);
    if let Some(kubeconfig) = kubeconfig {
        command.env("KUBECONFIG", kubeconfig);
    }
    command.output().expect("python3 with helm-python-sdk: scripts/with-test-env.sh installs it")
}

fn helm_ok(args: &[&str], kubeconfig: Option<&str>) -> Value {
    let out = helm(args, kubeconfig);
    assert!(out.status.success(), "helm.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The chart rendered with `values` as release `bitsmith` in `bitsmith-system`: its objects and NOTES.txt.
struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn new(values: &Value, out_dir: Option<&Path>) -> Rendered {
        let values = values.to_string();
        let mut args =
            vec!["render", CHART, "--values", &values, "--name", "bitsmith", "--namespace", "bitsmith-system"];
        let dir = out_dir.map(|d| d.display().to_string());
        if let Some(dir) = &dir {
            args.extend(["--out-dir", dir]);
        }
        let rendered = helm_ok(&args, None);
        let objects = rendered["documents"].as_array().unwrap().iter().map(|d| d["object"].clone()).collect();
        Rendered { objects, notes: rendered["notes"].as_str().unwrap_or_default().to_string() }
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name).unwrap_or_else(|| panic!("no {kind} {name} among {:?}", self.names()))
    }

    fn names(&self) -> Vec<String> {
        self.objects
            .iter()
            .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
            .collect()
    }

    fn container(&self) -> &Value {
        &self.get("Deployment", "bitsmith")["spec"]["template"]["spec"]["containers"][0]
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    }
}

/// Value sets a platform team would use besides the defaults.
fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        (
            "s3 store, own certificate, one namespace, monitoring",
            json!({
                "replicaCount": 3,
                "store": {"url": "s3://bits/prod", "existingSecret": "bitsmith-s3",
                          "options": {"aws_region": "eu-central-1", "aws_endpoint": "https://minio.example:9000"}},
                "tls": {"source": "secret", "existingSecret": "bits-tls", "caBundle": "QUJD"},
                "controller": {"watchNamespace": "apps",
                               "sources": {"denyCIDRs": ["10.0.0.0/8", "fd00::/8"], "allowCIDRs": ["127.0.0.0/8"]},
                               "retention": {"maxPackagesPerApp": 3, "expireAwaitingUploadAfter": "24h"}},
                "api": {"externalURL": "https://bits.example.com"},
                "maxConcurrentTransfers": 3,
                "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}},
                "networkPolicy": {"enabled": true,
                                  "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
                                  "egress": {"enabled": true, "apiServer": [{"ipBlock": {"cidr": "10.96.0.1/32"}}]}},
                "image": {"digest": format!("sha256:{}", "a".repeat(64))},
            }),
        ),
        (
            "cert-manager, shared volume, one replica, no aggregated API",
            json!({
                "replicaCount": 1,
                "tls": {"source": "certManager", "certManager": {"issuerRef": {"kind": "ClusterIssuer", "name": "internal-ca"}}},
                "apiService": {"enabled": false},
                "persistence": {"existingClaim": "shared-bits", "accessModes": ["ReadWriteMany"]},
                "rbac": {"aggregateToDefaultRoles": false},
            }),
        ),
    ]
}

#[test]
fn the_chart_lints_strictly_and_renders_valid_kubernetes_manifests() {
    // Kinds from other projects' CRDs, which no Kubernetes schema holds; their fields are checked below.
    let foreign = ["ServiceMonitor", "Certificate", "Issuer"];
    for (label, values) in value_sets() {
        let report = helm_ok(&["lint", CHART, "--values", &values.to_string()], None);
        let findings: Vec<&Value> =
            report["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64() >= Some(2)).collect();
        assert!(findings.is_empty(), "{label}: lint warnings or errors: {findings:?}");

        let dir = tempfile::tempdir().unwrap();
        let rendered = Rendered::new(&values, Some(dir.path()));
        assert!(rendered.find("Deployment", "bitsmith").is_some(), "{label}");
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        for version in ["1.25.0", "1.37.0"] {
            let out = Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", version])
                .args(&files)
                .output()
                .expect("kubernetes-validate: scripts/with-test-env.sh installs it");
            let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{label}: Kubernetes {version} refuses a manifest:\n{report}");
            let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
            let unknown: Vec<&str> = report.lines().filter(|l| l.contains("Couldn't find schema")).collect();
            assert!(
                unknown.iter().all(|l| foreign.iter().any(|kind| l.contains(&format!("kind {kind} ")))),
                "{label}: manifests no schema knows: {unknown:?}"
            );
            let expected = rendered.objects.iter().filter(|o| !foreign.contains(&o["kind"].as_str().unwrap())).count();
            assert_eq!(passed, expected, "{label}: every manifest validated against {version}:\n{report}");
        }
    }
}

#[test]
fn values_schema_rejects_bad_values_with_the_path_at_fault() {
    let bad = [
        (json!({"replicaCount": 0}), "/replicaCount"),
        (json!({"replicaCount": "two"}), "/replicaCount"),
        (json!({"store": {"url": "ftp://bits.example.com/x"}}), "/store/url"),
        (json!({"store": {"url": "/var/lib/bits"}}), "/store/url"),
        (json!({"controller": {"maxSize": "1 gigabyte"}}), "/controller/maxSize"),
        (json!({"controller": {"sources": {"denyCIDRs": ["10.0.0.0"]}}}), "/controller/sources/denyCIDRs/0"),
        (json!({"api": {"resourceCacheScope": "global"}}), "/api/resourceCacheScope"),
        (json!({"tls": {"source": "self-signed"}}), "/tls/source"),
        (json!({"tls": {"source": "secret"}}), "/tls/existingSecret"),
        (json!({"tls": {"source": "secret", "existingSecret": "bits-tls"}}), "/tls/caBundle"),
        (json!({"image": {"digest": "latest"}}), "/image/digest"),
        (json!({"persistence": {"accessModes": ["ReadWriteSometimes"]}}), "/persistence/accessModes/0"),
        (json!({"api": {"externalURL": "bits.example.com"}}), "/api/externalURL"),
        (json!({"resources": {"limits": {"memory": "lots"}}}), "/resources/limits/memory"),
        (json!({"replicas": 2}), "additional properties 'replicas' not allowed"),
    ];
    for (values, complaint) in bad {
        let out = helm(&["check-values", CHART, "--values", &values.to_string()], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{values} was accepted");
        assert!(stderr.contains(complaint), "{values}: the complaint names {complaint}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one readable line: {stderr}");
    }
    // An install refuses them too, before anything is rendered.
    let out = helm(&["render", CHART, "--values", r#"{"replicaCount": -1}"#], None);
    assert!(!out.status.success());
    // An egress policy that could shut the API server out, because the denied ranges may cover it, must name it.
    let unknown_api_server = json!({"networkPolicy": {"egress": {"enabled": true}},
                                    "controller": {"sources": {"denyCIDRs": ["10.0.0.0/8"]}}});
    let out = helm(&["render", CHART, "--values", &unknown_api_server.to_string()], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("networkPolicy.egress.apiServer"));

    // The schema is valid JSON Schema, and the shipped values.yaml and every value set above pass it.
    let schema = format!("{CHART}/values.schema.json");
    let metaschema = Command::new("check-jsonschema").args(["--check-metaschema", &schema]).output().unwrap();
    assert!(metaschema.status.success(), "{}", String::from_utf8_lossy(&metaschema.stdout));
    let defaults = Command::new("check-jsonschema")
        .args(["--schemafile", &schema, &format!("{CHART}/values.yaml")])
        .output()
        .expect("check-jsonschema: scripts/with-test-env.sh installs it");
    assert!(defaults.status.success(), "{}", String::from_utf8_lossy(&defaults.stdout));
    for (label, values) in value_sets() {
        let out = helm(&["check-values", CHART, "--values", &values.to_string()], None);
        assert!(out.status.success(), "{label}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `(group, resource, verb)` of every rule, for comparing roles whatever their layout.
fn grants(rules: &Value) -> BTreeSet<(String, String, String)> {
    let strings = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>();
    let mut set = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    set.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    set
}

#[test]
fn the_chart_deploys_this_version_and_grants_users_the_documented_roles() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(format!("{CHART}/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"), "the chart deploys this version");

    let rendered = Rendered::new(&json!({}), None);
    let view = rendered.get("ClusterRole", "bitsmith-view");
    let edit = rendered.get("ClusterRole", "bitsmith-edit");
    let labels = |role: &Value, name: &str| {
        role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{name}")] == "true"
    };
    assert!(labels(view, "view") && labels(view, "edit") && labels(view, "admin"));
    assert!(labels(edit, "edit") && labels(edit, "admin") && !labels(edit, "view"), "viewers may not upload");

    let documented: Vec<Value> =
        serde_saphyr::from_multiple(include_str!("../../config/rbac/user-roles.yaml")).unwrap();
    let role = |name: &str| &documented.iter().find(|r| r["metadata"]["name"] == name).unwrap()["rules"];
    assert_eq!(
        grants(&view["rules"]),
        grants(role("bitsmith-viewer")),
        "the view role grants what bitsmith-viewer does"
    );
    let editor: BTreeSet<_> = grants(&view["rules"]).union(&grants(&edit["rules"])).cloned().collect();
    assert_eq!(editor, grants(role("bitsmith-uploader")), "view + edit grant what bitsmith-uploader does");
}

#[test]
fn the_deployment_is_hardened_and_follows_the_values() {
    let defaults = Rendered::new(&json!({}), None);
    let deployment = defaults.get("Deployment", "bitsmith");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = defaults.container();
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    for bound in ["requests", "limits"] {
        assert!(
            container["resources"][bound]["memory"].is_string() && container["resources"][bound]["cpu"].is_string()
        );
    }
    let args = defaults.args();
    for arg in
        ["controller", "--leader-elect=true", "--leader-election-id=bitsmith", "--store=file:///var/lib/bitsmith/store"]
    {
        assert!(args.contains(&arg.to_string()), "{arg} in {args:?}");
    }
    assert!(args.contains(&"--external-url=https://bitsmith.bitsmith-system.svc".to_string()), "{args:?}");
    assert!(!args.iter().any(|a| a.contains("source-cidr") || a.contains("ambient")), "closed by default: {args:?}");
    for arg in [
        "--max-zip-entries=100000",
        "--resource-cache-scope=namespace",
        "--max-retained-packages-per-app=5",
        "--max-retained-droplets-per-app=5",
        "--audit-interval=10m",
        "--orphan-grace=1h",
    ] {
        assert!(args.contains(&arg.to_string()), "{arg} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--max-concurrent-transfers")),
        "by default the binary sizes its transfers to the memory limit: {args:?}"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--expire-awaiting-upload-after")),
        "uploads awaited for ever: {args:?}"
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "store" && m["mountPath"] == "/var/lib/bitsmith/store"));
    assert_eq!(
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "store").unwrap()["persistentVolumeClaim"]["claimName"],
        "bitsmith-store"
    );
    let claim = defaults.get("PersistentVolumeClaim", "bitsmith-store");
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert!(pod["affinity"]["podAffinity"].is_object(), "replicas sharing a ReadWriteOnce volume go to one node");
    assert_eq!(defaults.get("PodDisruptionBudget", "bitsmith")["spec"]["minAvailable"], 1);
    assert_eq!(defaults.get("ClusterRole", "bitsmith")["kind"], "ClusterRole");
    let secret = defaults.get("Secret", "bitsmith-tls");
    let api_service = defaults.get("APIService", "v1alpha1.api.bitsmith.dev");
    assert_eq!(api_service["spec"]["caBundle"], secret["data"]["ca.crt"], "the APIService trusts the generated CA");
    assert_eq!(
        api_service["spec"]["service"],
        json!({"name": "bitsmith", "namespace": "bitsmith-system", "port": 443})
    );
    assert!(
        defaults.notes.contains("/apis/api.bitsmith.dev/v1alpha1/namespaces/") && defaults.notes.contains("/upload")
    );
    assert!(defaults.notes.contains("kind: Package"), "NOTES.txt shows how to create a Package: {}", defaults.notes);
    assert!(
        defaults.find("NetworkPolicy", "bitsmith").is_none() && defaults.find("ServiceMonitor", "bitsmith").is_none()
    );

    let [_, (_, s3_values), (_, cert_manager_values)] = value_sets().try_into().unwrap();
    let s3 = Rendered::new(&s3_values, None);
    let args = s3.args();
    for arg in [
        "--store=s3://bits/prod",
        "--store-opt=aws_region=eu-central-1",
        "--namespace=apps",
        "--external-url=https://bits.example.com",
        "--deny-source-cidr=10.0.0.0/8",
        "--deny-source-cidr=fd00::/8",
        "--allow-source-cidr=127.0.0.0/8",
        "--max-concurrent-transfers=3",
        "--max-retained-packages-per-app=3",
        "--expire-awaiting-upload-after=24h",
    ] {
        assert!(args.contains(&arg.to_string()), "{arg} in {args:?}");
    }
    // Egress: DNS, the API server, and anywhere else but the metadata addresses and the denied ranges.
    let egress = &s3.get("NetworkPolicy", "bitsmith-egress")["spec"];
    assert_eq!(egress["policyTypes"], json!(["Egress"]));
    let rules = egress["egress"].as_array().unwrap();
    assert!(rules.iter().any(|r| r["ports"][0]["port"] == 53 && r.get("to").is_none()), "{rules:?}");
    assert!(rules.iter().any(|r| r["to"][0]["ipBlock"]["cidr"] == "10.96.0.1/32"), "{rules:?}");
    let anywhere = &rules.last().unwrap()["to"];
    assert_eq!(anywhere[0]["ipBlock"], json!({"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16", "10.0.0.0/8"]}));
    assert_eq!(
        anywhere[1]["ipBlock"],
        json!({"cidr": "::/0", "except": ["fe80::/10", "fd00:ec2::254/128", "fd00::/8"]})
    );
    assert!(defaults.find("NetworkPolicy", "bitsmith-egress").is_none(), "egress is opt-in");
    assert_eq!(
        s3.container()["envFrom"],
        json!([{"secretRef": {"name": "bitsmith-s3"}}]),
        "store credentials from the Secret"
    );
    assert_eq!(s3.container()["image"], format!("ghcr.io/bitsmith-dev/bitsmith@sha256:{}", "a".repeat(64)));
    assert!(s3.find("PersistentVolumeClaim", "bitsmith-store").is_none(), "no volume for an object store");
    let pod = &s3.get("Deployment", "bitsmith")["spec"]["template"]["spec"];
    assert!(pod["volumes"].as_array().unwrap().iter().all(|v| v["name"] != "store"));
    assert!(pod["affinity"].is_null());
    assert_eq!(
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap()["secret"]["secretName"],
        "bits-tls"
    );
    assert!(s3.find("Secret", "bitsmith-tls").is_none(), "the user's certificate is used as it is");
    assert_eq!(s3.get("APIService", "v1alpha1.api.bitsmith.dev")["spec"]["caBundle"], "QUJD");
    let role = s3.get("Role", "bitsmith");
    assert_eq!(role["metadata"]["namespace"], "apps", "watching one namespace needs rights in that one only");
    assert!(s3.find("ClusterRole", "bitsmith").is_none());
    assert_eq!(s3.get("RoleBinding", "bitsmith")["metadata"]["namespace"], "apps");
    let monitor = s3.get("ServiceMonitor", "bitsmith");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], s3.get("Service", "bitsmith")["spec"]["selector"]);
    let policy = s3.get("NetworkPolicy", "bitsmith");
    assert_eq!(policy["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["name"], "monitoring");
    assert!(policy["spec"]["ingress"][0]["from"].is_null(), "the API stays reachable for users and the aggregator");

    let cm = Rendered::new(&cert_manager_values, None);
    let certificate = cm.get("Certificate", "bitsmith");
    assert_eq!(certificate["spec"]["issuerRef"], json!({"kind": "ClusterIssuer", "name": "internal-ca"}));
    assert_eq!(certificate["spec"]["secretName"], "bitsmith-tls");
    assert!(certificate["spec"]["dnsNames"].as_array().unwrap().contains(&json!("bitsmith.bitsmith-system.svc")));
    assert!(cm.find("Issuer", "bitsmith-selfsigned").is_none(), "the given issuer is used");
    assert!(cm.find("APIService", "v1alpha1.api.bitsmith.dev").is_none());
    assert!(cm.find("PersistentVolumeClaim", "bitsmith-store").is_none(), "the existing claim is used");
    let pod = &cm.get("Deployment", "bitsmith")["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "store").unwrap()["persistentVolumeClaim"]["claimName"],
        "shared-bits"
    );
    assert!(pod["affinity"].is_null(), "a ReadWriteMany volume lets replicas spread");
    assert!(cm.find("PodDisruptionBudget", "bitsmith").is_none(), "one replica cannot keep one available");
    assert!(cm.find("ClusterRole", "bitsmith-view").is_none());
    let self_signed = Rendered::new(&json!({"tls": {"source": "certManager"}}), None);
    assert_eq!(self_signed.get("Issuer", "bitsmith-selfsigned")["spec"]["selfSigned"], json!({}));
    assert_eq!(
        self_signed.get("APIService", "v1alpha1.api.bitsmith.dev")["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "bitsmith-system/bitsmith"
    );
}

/// Write a base64 field of a Secret to `dir/name`.
fn secret_file(data: &Value, key: &str, dir: &Path) -> std::path::PathBuf {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(data[key].as_str().unwrap()).unwrap();
    let path = dir.join(key);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_generated_certificate_names_the_service_and_chains_to_the_apiservice_ca() {
    let rendered = Rendered::new(&json!({}), None);
    let data = &rendered.get("Secret", "bitsmith-tls")["data"];
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert) = (secret_file(data, "ca.crt", dir.path()), secret_file(data, "tls.crt", dir.path()));
    let verify = Command::new("openssl").arg("verify").arg("-CAfile").arg(&ca).arg(&cert).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&cert).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("DNS:bitsmith.bitsmith-system.svc"), "{text}");
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
}

/// Helm 4 applies server-side by default, which Kubernetes 1.20's aggregator cannot do for an APIService (it
/// panics: "FieldManager must be installed to run apply"); on such clusters `helm install --server-side=false`.
const SERVER_SIDE: &str = "--server-side=false";

/// `kubectl get` of every object of `rendered` on `cluster`: the ones that exist.
fn existing(cluster: &OwnControlPlane, rendered: &Rendered) -> Vec<String> {
    rendered
        .objects
        .iter()
        .filter(|o| {
            let kind = format!(
                "{}.{}",
                o["kind"].as_str().unwrap(),
                o["apiVersion"].as_str().unwrap().split('/').next().unwrap()
            );
            let kind = kind.trim_end_matches(".v1").to_string();
            let name = o["metadata"]["name"].as_str().unwrap();
            let mut args = vec!["get", &kind, name, "-o", "name"];
            if let Some(ns) = o["metadata"]["namespace"].as_str() {
                args.extend(["-n", ns]);
            }
            cluster.kubectl(&args, None).status.success()
        })
        .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap()))
        .collect()
}

#[test]
fn helm_installs_upgrades_and_uninstalls_the_chart_on_a_real_control_plane() {
    let cluster = OwnControlPlane::start();
    let kubeconfig = Some(cluster.kubeconfig.as_str());
    let install = |action: &str, values: &Value| {
        let values = values.to_string();
        let args =
            [action, CHART, "--name", "bitsmith", "--namespace", "bitsmith-system", "--values", &values, SERVER_SIDE];
        helm_ok(&args, kubeconfig)
    };
    let release = install("install", &json!({}));
    assert_eq!((&release["revision"], &release["status"]), (&json!(1), &json!("deployed")), "{release}");
    let rendered = Rendered::new(&json!({}), None);
    let created = existing(&cluster, &rendered);
    assert_eq!(created, rendered.names(), "every object of the chart exists");
    for crd in ["packages.bitsmith.dev", "droplets.bitsmith.dev"] {
        cluster.kubectl_ok(&["wait", "--for=condition=established", "--timeout=60s", &format!("crd/{crd}")], None);
    }
    let pdb =
        cluster.kubectl_ok(&["get", "pdb", "bitsmith", "-n", "bitsmith-system", "-o", "jsonpath={.apiVersion}"], None);
    assert_eq!(pdb, "policy/v1beta1", "Kubernetes 1.20 has no policy/v1: the chart asks the cluster");
    let secret_json = |key: &str| {
        cluster.kubectl_ok(
            &["get", "secret", "bitsmith-tls", "-n", "bitsmith-system", "-o", &format!("jsonpath={{.data.{key}}}")],
            None,
        )
    };
    let certificate = secret_json("tls\\.crt");
    assert!(!certificate.is_empty());

    let release = install("upgrade", &json!({"replicaCount": 3, "controller": {"concurrency": 16}}));
    assert_eq!((&release["revision"], &release["status"]), (&json!(2), &json!("deployed")), "{release}");
    let deployment = cluster.kubectl_ok(
        &[
            "get",
            "deployment",
            "bitsmith",
            "-n",
            "bitsmith-system",
            "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].args}",
        ],
        None,
    );
    assert!(deployment.starts_with("3 ") && deployment.contains("--concurrency=16"), "{deployment}");
    assert_eq!(secret_json("tls\\.crt"), certificate, "an upgrade keeps the serving certificate");
    let ca_bundle = cluster
        .kubectl_ok(&["get", "apiservice", "v1alpha1.api.bitsmith.dev", "-o", "jsonpath={.spec.caBundle}"], None);
    assert_eq!(ca_bundle, secret_json("ca\\.crt"), "and the APIService still trusts it");

    helm_ok(&["uninstall", "--name", "bitsmith", "--namespace", "bitsmith-system"], kubeconfig);
    let left = existing(&cluster, &rendered);
    assert_eq!(left, ["PersistentVolumeClaim/bitsmith-store"], "only the kept volume of bits is left");
    let keep = cluster.kubectl_ok(
        &["get", "pvc", "bitsmith-store", "-n", "bitsmith-system", "-o", "jsonpath={.metadata.annotations}"],
        None,
    );
    assert!(keep.contains("helm.sh/resource-policy"), "{keep}");
    let crds = cluster.kubectl_ok(&["get", "crd", "-o", "name"], None);
    assert!(
        crds.contains("packages.bitsmith.dev") && crds.contains("droplets.bitsmith.dev"),
        "Helm keeps CRDs: {crds}"
    );
    let releases =
        cluster.kubectl_ok(&["get", "secrets", "-n", "bitsmith-system", "-l", "owner=helm", "-o", "name"], None);
    assert!(releases.trim().is_empty(), "no release history left: {releases}");
}

/// `kubectl auth can-i VERB RESOURCE ...` as `user`: whether it may.
fn can_i(cluster: &OwnControlPlane, user: &str, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i", "--as", user];
    all.extend(args);
    let out = cluster.kubectl(&all, None);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(answer == "yes" || answer == "no", "can-i {args:?}: {answer} {}", String::from_utf8_lossy(&out.stderr));
    answer == "yes"
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !tokio::task::block_in_place(&mut done) {
        assert!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_is_enough_for_the_controller_and_the_api_and_no_more() {
    let cluster = tokio::task::block_in_place(OwnControlPlane::start);
    let kubeconfig = Some(cluster.kubeconfig.as_str());
    // The Service's port is the one this process will listen on, so that the APIService can reach it below.
    let port = crate::support::ports::free_port();
    let values = json!({"service": {"port": port}, "controller": {"sources": {"allowCIDRs": ["127.0.0.0/8"]}}});
    tokio::task::block_in_place(|| {
        let values = values.to_string();
        let args = [
            "install",
            CHART,
            "--name",
            "bitsmith",
            "--namespace",
            "bitsmith-system",
            "--values",
            &values,
            SERVER_SIDE,
        ];
        helm_ok(&args, kubeconfig)
    });
    let kubectl = |args: &[&str]| tokio::task::block_in_place(|| cluster.kubectl_ok(args, None));
    let dir = tempfile::tempdir().unwrap();
    let token = kubectl(&["create", "token", "bitsmith", "-n", "bitsmith-system", "--duration=1h"]);
    let controller_kubeconfig = dir.path().join("kubeconfig");
    cluster.kubeconfig_for(token.trim(), &controller_kubeconfig);

    // The chart's Deployment arguments, with this machine's addresses and paths.
    let rendered = Rendered::new(&values, None);
    let tls: Value =
        serde_json::from_str(&kubectl(&["get", "secret", "bitsmith-tls", "-n", "bitsmith-system", "-o", "json"]))
            .unwrap();
    let (ca, cert, key) = (
        secret_file(&tls["data"], "ca.crt", dir.path()),
        secret_file(&tls["data"], "tls.crt", dir.path()),
        secret_file(&tls["data"], "tls.key", dir.path()),
    );
    let signing: Value = serde_json::from_str(&kubectl(&[
        "get",
        "secret",
        "bitsmith-upload-token-key",
        "-n",
        "bitsmith-system",
        "-o",
        "json",
    ]))
    .unwrap();
    let token_key = secret_file(&signing["data"], "key", dir.path());
    let ops_port = crate::support::ports::free_port();
    let store = dir.path().join("store");
    let args: Vec<String> = rendered
        .args()
        .into_iter()
        .map(|arg| match arg.split_once('=') {
            Some(("--store", _)) => format!("--store={}", store.display()),
            Some(("--listen", _)) => format!("--listen=127.0.0.1:{port}"),
            Some(("--metrics-listen", _)) => format!("--metrics-listen=127.0.0.1:{ops_port}"),
            Some(("--tls-cert", _)) => format!("--tls-cert={}", cert.display()),
            Some(("--tls-key", _)) => format!("--tls-key={}", key.display()),
            Some(("--upload-token-key-file", _)) => format!("--upload-token-key-file={}", token_key.display()),
            _ => arg,
        })
        .collect();
    assert!(args.contains(&format!("--external-url=https://bitsmith.bitsmith-system.svc:{port}")), "{args:?}");
    let mut controller = Command::new(env!("CARGO_BIN_EXE_bitsmith"))
        .args(&args)
        .env("KUBECONFIG", &controller_kubeconfig)
        .env("POD_NAME", "bitsmith-0")
        .env("POD_NAMESPACE", "bitsmith-system")
        .spawn()
        .unwrap();

    // Users: the built-in edit and view roles, which the chart's roles aggregate into.
    kubectl(&["create", "namespace", "apps"]);
    for (user, role) in [("dev", "edit"), ("auditor", "view")] {
        kubectl(&["create", "serviceaccount", user, "-n", "apps"]);
        kubectl(&[
            "create",
            "rolebinding",
            user,
            "-n",
            "apps",
            "--clusterrole",
            role,
            "--serviceaccount",
            &format!("apps:{user}"),
        ]);
    }
    let dev = kubectl(&["create", "token", "dev", "-n", "apps", "--duration=1h"]).trim().to_string();
    let auditor = kubectl(&["create", "token", "auditor", "-n", "apps", "--duration=1h"]).trim().to_string();
    wait_until("the edit role aggregates upload", || {
        can_i(
            &cluster,
            "system:serviceaccount:apps:dev",
            &["create", "packages.bitsmith.dev", "--subresource=upload", "-n", "apps"],
        )
    })
    .await;

    // A Package fetched by the controller.
    let server = TestServer::start().await;
    server.route("/app.zip", Reply::Body { seed: 90, size: 50_000, length: true });
    let fetched = format!(
        "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: fetched\nspec:\n  type: bits\n  source:\n    http:\n      url: {}\n---\napiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: uploaded\nspec:\n  type: bits\n",
        server.url("/app.zip")
    );
    tokio::task::block_in_place(|| cluster.kubectl_ok(&["apply", "-n", "apps", "-f", "-"], Some(&fetched)));
    let state = |name: &str| {
        let out = cluster.kubectl(&["get", "pkg", name, "-n", "apps", "-o", "jsonpath={.status.state}"], None);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    wait_until("the fetched Package is READY", || state("fetched") == "READY").await;
    wait_until("the other Package awaits its upload", || state("uploaded") == "AWAITING_UPLOAD").await;

    // An upload through the CF API, served with the chart's certificate under the Service's name.
    let host = "bitsmith.bitsmith-system.svc";
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap();
    let guid = kubectl(&["get", "pkg", "uploaded", "-n", "apps", "-o", "jsonpath={.metadata.uid}"]);
    let upload = format!("https://{host}:{port}/v3/packages/{guid}/upload");
    let zip = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sample-app.zip")).unwrap();
    let post = |token: &str| {
        let form = reqwest::multipart::Form::new()
            .part("bits", reqwest::multipart::Part::bytes(zip.clone()).file_name("app.zip"));
        client.post(&upload).bearer_auth(token.to_string()).multipart(form).send()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        match post(&dev).await {
            Ok(response) => break response,
            Err(error) => assert!(Instant::now() < deadline, "the API did not answer: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(answer.status(), 200, "{:?}", answer.text().await);
    wait_until("the uploaded Package is READY", || state("uploaded") == "READY").await;
    let refused = post(&auditor).await.unwrap();
    assert_eq!(refused.status(), 403, "viewers may not upload");
    let download = client
        .get(format!("https://{host}:{port}/v3/packages/{guid}/download"))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200, "viewers may download");
    assert!(!download.bytes().await.unwrap().is_empty());

    // The same through the Kubernetes API server: the chart's APIService, trusting the chart's CA, reaches this
    // process once the Service points here (there is no kube-proxy on the test machine; an ExternalName stands in).
    let external =
        r#"{"spec": {"type": "ExternalName", "externalName": "localhost", "clusterIP": null, "selector": null}}"#;
    kubectl(&["patch", "service", "bitsmith", "-n", "bitsmith-system", "--type", "merge", "-p", external]);
    kubectl(&["wait", "--for=condition=Available", "--timeout=90s", "apiservice/v1alpha1.api.bitsmith.dev"]);
    let proxied = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: proxied\nspec:\n  type: bits\n";
    tokio::task::block_in_place(|| cluster.kubectl_ok(&["apply", "-n", "apps", "-f", "-"], Some(proxied)));
    let path = "/apis/api.bitsmith.dev/v1alpha1/namespaces/apps/packages/proxied";
    let zip_path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sample-app.zip");
    let kubectl_as = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        tokio::task::block_in_place(|| cluster.kubectl(&all, None))
    };
    let upload = format!("{path}/upload");
    let refused = kubectl_as(&auditor, &["create", "--raw", &upload, "-f", zip_path]);
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && error.contains("Forbidden"),
        "viewers may not upload through the API server: {error}"
    );
    // The API's guid index may trail the apply by a moment.
    wait_until("an editor uploads through the API server", || {
        kubectl_as(&dev, &["create", "--raw", &upload, "-f", zip_path]).status.success()
    })
    .await;
    wait_until("the Package uploaded through the API server is READY", || state("proxied") == "READY").await;
    let downloaded = kubectl_as(&auditor, &["get", "--raw", &format!("{path}/download")]);
    assert!(downloaded.status.success(), "{}", String::from_utf8_lossy(&downloaded.stderr));
    let size = kubectl(&["get", "pkg", "proxied", "-n", "apps", "-o", "jsonpath={.status.size}"]);
    assert_eq!(downloaded.stdout.len().to_string(), size, "viewers download the stored bits through the API server");

    // It led through the Lease the chart allows, and recorded Events.
    let holder =
        kubectl(&["get", "lease", "bitsmith", "-n", "bitsmith-system", "-o", "jsonpath={.spec.holderIdentity}"]);
    assert_eq!(holder, "bitsmith-0");
    let events =
        kubectl(&["get", "events.events.k8s.io", "-n", "apps", "-o", "jsonpath={.items[*].reportingController}"]);
    assert!(events.contains("bitsmith"), "Events were written: {events:?}");

    // And no more than that.
    let me = "system:serviceaccount:bitsmith-system:bitsmith";
    let may = |args: &[&str]| tokio::task::block_in_place(|| can_i(&cluster, me, args));
    for allowed in [
        &["patch", "packages.bitsmith.dev", "--subresource=status", "-n", "apps"][..],
        &["watch", "droplets.bitsmith.dev", "--all-namespaces"],
        &["get", "secrets", "-n", "apps"],
        &["create", "tokenreviews.authentication.k8s.io"],
        &["create", "subjectaccessreviews.authorization.k8s.io"],
        &["get", "configmap/extension-apiserver-authentication", "-n", "kube-system"],
        &["update", "lease.coordination.k8s.io/bitsmith", "-n", "bitsmith-system"],
    ] {
        assert!(may(allowed), "the chart's identity needs {allowed:?}");
    }
    for denied in [
        &["create", "packages.bitsmith.dev", "-n", "apps"][..],
        &["delete", "packages.bitsmith.dev", "-n", "apps"],
        &["update", "droplets.bitsmith.dev", "-n", "apps"],
        &["create", "packages.bitsmith.dev", "--subresource=upload", "-n", "apps"],
        &["create", "secrets", "-n", "apps"],
        &["update", "secrets", "-n", "apps"],
        &["get", "configmap/coredns", "-n", "kube-system"],
        &["list", "configmaps", "-n", "kube-system"],
        &["update", "lease.coordination.k8s.io/other", "-n", "bitsmith-system"],
        &["get", "leases.coordination.k8s.io", "-n", "apps"],
        &["list", "pods", "--all-namespaces"],
        &["create", "events", "-n", "apps"],
        &["create", "clusterroles.rbac.authorization.k8s.io"],
        &["impersonate", "users"],
    ] {
        assert!(!may(denied), "the chart's identity must not {denied:?}");
    }

    // Still leading: renewing the Lease (an update) is allowed too.
    let renewed = kubectl(&["get", "lease", "bitsmith", "-n", "bitsmith-system", "-o", "jsonpath={.spec.renewTime}"]);
    wait_until("the Lease is renewed", || {
        let now = cluster.kubectl_ok(
            &["get", "lease", "bitsmith", "-n", "bitsmith-system", "-o", "jsonpath={.spec.renewTime}"],
            None,
        );
        now != renewed
    })
    .await;
    assert!(controller.try_wait().unwrap().is_none(), "the controller runs on");

    // SAFETY: signals our own child process.
    unsafe { libc::kill(controller.id() as libc::pid_t, libc::SIGTERM) };
    let status = controller.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn the_image_lints_clean_holds_what_the_binary_needs_and_runs_as_the_charts_user() {
    // The runtime image is distroless/cc: glibc and libgcc, nothing else. The binary may link nothing more.
    let provided = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "ld-linux-x86-64.so.2",
    ];
    let ldd = Command::new("ldd").arg(env!("CARGO_BIN_EXE_bitsmith")).output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    for line in ldd.lines() {
        let library = line.split_whitespace().next().unwrap_or_default();
        let name = library.rsplit('/').next().unwrap();
        assert!(provided.contains(&name), "the binary needs {library}, which the runtime image lacks:\n{ldd}");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile");
    let lint = Command::new("hadolint").arg(path).output().expect("hadolint: scripts/with-test-env.sh installs it");
    assert!(lint.status.success(), "hadolint: {}", String::from_utf8_lossy(&lint.stdout));
    let dockerfile = std::fs::read_to_string(path).unwrap();
    assert!(
        dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"),
        "the runtime base the list above describes"
    );
    // The glibc tunable the image sets is one this glibc (Debian 12's, as the image's) knows and takes.
    let tunables =
        dockerfile.lines().find_map(|l| l.strip_prefix("ENV GLIBC_TUNABLES=")).expect("the image's tunables");
    let (name, value) = tunables.split_once('=').unwrap();
    let listed = Command::new("/lib64/ld-linux-x86-64.so.2")
        .arg("--list-tunables")
        .env("GLIBC_TUNABLES", tunables)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let taken = listed.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_default();
    assert!(taken.starts_with(&format!("{:#x} ", value.parse::<u64>().unwrap())), "{name}: {taken}\n{listed}");
    let user = dockerfile.lines().find_map(|l| l.strip_prefix("USER ")).expect("the image names its user");
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap()).unwrap();
    let security = &values["podSecurityContext"];
    assert_eq!(
        user,
        format!("{}:{}", security["runAsUser"], security["runAsGroup"]),
        "the chart runs the image as its own user"
    );
}
