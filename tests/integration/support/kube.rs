//! The real control plane (etcd + kube-apiserver) that `scripts/with-test-env.sh` starts, driven with the real
//! `kubectl`. A test that needs it fails, with the command to run, when it is missing.

use std::process::{Command, Output, Stdio};

/// The kubeconfig of the test control plane, or a loud failure.
pub fn kubeconfig() -> String {
    std::env::var("KUBECONFIG").unwrap_or_else(|_| {
        panic!("KUBECONFIG is not set: this test needs the control plane that `make test` starts (scripts/with-test-env.sh)")
    })
}

/// Run kubectl against the test control plane, feeding `stdin`.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    kubectl_at(&kubeconfig(), args, stdin)
}

/// Run kubectl against the cluster of `kubeconfig`, feeding `stdin`.
pub fn kubectl_at(kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Run kubectl and require success; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Install the CRDs from `crds/` and wait until they are served. Once per test process: tests run in parallel,
/// and two concurrent first applies race to create the same CRD.
pub fn install_crds() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
        kubectl_ok(&["apply", "-f", crds], None);
        // Right after an apply that changed a CRD, kubectl may find no conditions to wait on yet; it then fails
        // instead of waiting, so look again.
        let wait = [
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/packages.bitsmith.dev",
            "crd/droplets.bitsmith.dev",
        ];
        for _ in 0..10 {
            if kubectl(&wait, None).status.success() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        kubectl_ok(&wait, None);
    });
}

/// A fresh namespace for one test.
pub fn namespace(test: &str) -> String {
    let name = format!("{test}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    kubectl_ok(&["create", "namespace", &name], None);
    name
}

/// Install the user ClusterRoles bitsmith ships (config/rbac/user-roles.yaml), once per test process.
pub fn install_user_roles() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        kubectl_ok(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac/user-roles.yaml")], None);
    });
}

/// A new ServiceAccount `name` in `ns`, bound in `ns` to the shipped ClusterRole `role`, and a token for it.
pub fn service_account_with_role(ns: &str, name: &str, role: &str) -> String {
    install_user_roles();
    kubectl_ok(&["create", "serviceaccount", name, "-n", ns], None);
    kubectl_ok(
        &["create", "rolebinding", name, "-n", ns, "--clusterrole", role, "--serviceaccount", &format!("{ns}:{name}")],
        None,
    );
    kubectl_ok(&["create", "token", name, "-n", ns, "--duration=1h"], None).trim().to_string()
}

/// A new ServiceAccount `name` in `ns` and a token for it; with `rules` (the `rules:` of a Role, as YAML),
/// also a Role and RoleBinding granting them.
pub fn service_account_token(ns: &str, name: &str, rules: Option<&str>) -> String {
    kubectl_ok(&["create", "serviceaccount", name, "-n", ns], None);
    if let Some(rules) = rules {
        let role = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\nrules:\n{rules}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {name}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}\nsubjects:\n- kind: ServiceAccount\n  name: {name}\n  namespace: {ns}\n"
        );
        kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&role));
    }
    kubectl_ok(&["create", "token", name, "-n", ns, "--duration=1h"], None).trim().to_string()
}

/// kubectl blocks; let the runtime's other worker serve the controller and the API meanwhile.
pub fn kube_ok(args: &[&str], stdin: Option<&str>) -> String {
    tokio::task::block_in_place(|| kubectl_ok(args, stdin))
}

/// Poll `jsonpath` of an object until it equals `want`, for at most a minute.
pub async fn wait_for(ns: &str, object: &str, jsonpath: &str, want: &str) {
    wait_for_within(ns, object, jsonpath, want, std::time::Duration::from_secs(60)).await
}

/// Poll `jsonpath` of an object until it equals `want`, for at most `limit`.
pub async fn wait_for_within(ns: &str, object: &str, jsonpath: &str, want: &str, limit: std::time::Duration) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + limit;
    loop {
        let out = tokio::task::block_in_place(|| {
            kubectl(&["get", object, "-n", ns, "-o", &format!("jsonpath={jsonpath}")], None)
        });
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{object}: {jsonpath} is {got:?}, not {want:?}, after {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane of one test's own (`scripts/apiserver.sh`), for tests that install cluster-wide objects (a
/// Helm release's CRDs, ClusterRoles and APIService) and need a cluster that holds nothing else. Stopped on drop.
pub struct OwnControlPlane {
    dir: tempfile::TempDir,
    pub kubeconfig: String,
}

impl OwnControlPlane {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A control plane whose kube-apiserver also takes `args` (space-separated flags).
    pub fn start_with(args: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/apiserver.sh"))
            .arg("start")
            .arg(dir.path().join("apiserver"))
            .env("BITSMITH_APISERVER_ARGS", args)
            .output()
            .expect("scripts/apiserver.sh");
        assert!(out.status.success(), "control plane did not start: {}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = dir.path().join("apiserver/kubeconfig").display().to_string();
        OwnControlPlane { dir, kubeconfig }
    }

    /// The CA kube-apiserver trusts for client certificates: users it issues certificates to are authenticated.
    pub fn client_ca(&self) -> super::pki::Pem {
        let certs = self.dir.path().join("apiserver/certs");
        super::pki::Pem { cert: certs.join("ca.crt"), key: certs.join("ca.key") }
    }

    /// Stop kube-apiserver and start it again on the same address with the same data.
    pub fn restart_apiserver(&self) {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/apiserver.sh"))
            .arg("restart-apiserver")
            .arg(self.dir.path().join("apiserver"))
            .output()
            .expect("scripts/apiserver.sh");
        assert!(out.status.success(), "kube-apiserver did not restart: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl_at(&self.kubeconfig, args, stdin)
    }

    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A kubeconfig like this one's, authenticating with `token` instead of the admin's.
    pub fn kubeconfig_for(&self, token: &str, path: &std::path::Path) {
        kubeconfig_with_token(&self.kubeconfig, token, path);
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/apiserver.sh"))
            .arg("stop")
            .arg(self.dir.path().join("apiserver"))
            .status();
    }
}

/// A copy of the kubeconfig at `kubeconfig` that authenticates with `token` instead of the admin's, at `path`.
pub fn kubeconfig_with_token(kubeconfig: &str, token: &str, path: &std::path::Path) {
    let out = kubectl_at(kubeconfig, &["config", "view", "--raw", "-o", "jsonpath={.users[0].user.token}"], None);
    let admin = String::from_utf8(out.stdout).unwrap();
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    assert!(!admin.is_empty() && text.contains(&admin), "the admin authenticates with a token");
    std::fs::write(path, text.replace(&admin, token)).unwrap();
}

/// The `APIService` `v1alpha1.api.bitsmith.dev` (and its ExternalName Service) that sends aggregated requests to
/// `localhost:port`, trusting the serving CA `ca_pem`.
pub fn api_service(ns: &str, port: u16, ca_pem: &[u8]) -> String {
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bitsmith-api\n  namespace: {ns}\nspec:\n  type: ExternalName\n  externalName: localhost\n---\napiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata:\n  name: v1alpha1.api.bitsmith.dev\nspec:\n  group: api.bitsmith.dev\n  version: v1alpha1\n  groupPriorityMinimum: 1000\n  versionPriority: 15\n  caBundle: {bundle}\n  service:\n    namespace: {ns}\n    name: bitsmith-api\n    port: {port}\n"
    )
}

/// Manifests of bits Packages without a source, named `names`: they await an upload.
pub fn awaiting_packages(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            format!("apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: {n}\nspec:\n  type: bits\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
