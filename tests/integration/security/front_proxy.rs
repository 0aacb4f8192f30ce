//! Forged front-proxy identities against the real `bitsmith api` binary over TLS: `X-Remote-User` and
//! `X-Remote-Group` count only on a connection whose client certificate chains to the cluster's request-header CA
//! and names an allowed proxy. Everyone else's are ignored, so without a bearer token the answer is 401.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::Value;

use super::api_limits::ApiProcess;
use crate::support::kube::{install_crds, install_user_roles, kubectl_ok, namespace, service_account_with_role};

pub(super) use crate::support::pki::Pem;

/// Client certificates made with openssl for one test, and the API's serving certificate.
pub(super) struct ClientCerts {
    dir: tempfile::TempDir,
    serving: Vec<u8>,
}

impl ClientCerts {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::support::self_signed();
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), &key).unwrap();
        ClientCerts { dir, serving: cert }
    }

    /// `--tls-cert` and `--tls-key` for the API.
    pub fn serving_args(&self) -> Vec<OsString> {
        vec![
            "--tls-cert".into(),
            self.dir.path().join("tls.crt").into(),
            "--tls-key".into(),
            self.dir.path().join("tls.key").into(),
        ]
    }

    /// A new self-signed CA with the common name `cn`.
    pub fn ca(&self, name: &str, cn: &str) -> Pem {
        crate::support::pki::ca(self.dir.path(), name, cn)
    }

    /// A client that trusts the API's certificate and presents `identity`, if any.
    pub fn client(&self, identity: Option<&Pem>) -> reqwest::Client {
        let mut builder =
            reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&self.serving).unwrap());
        if let Some(pem) = identity {
            let mut both = std::fs::read(&pem.cert).unwrap();
            both.extend(std::fs::read(&pem.key).unwrap());
            builder = builder.identity(reqwest::Identity::from_pem(&both).unwrap());
        }
        builder.build().unwrap()
    }
}

/// A client certificate for `cn` from `ca`, fit for client authentication as the front proxy's is.
pub(super) fn issue(certs: &ClientCerts, ca: &Pem, cn: &str) -> Pem {
    let stem = format!("{}-{cn}", ca.cert.file_stem().unwrap().to_string_lossy());
    let extensions =
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
    crate::support::pki::issue(certs.dir.path(), ca, &stem, cn, extensions)
}

/// The test control plane's certificates (`scripts/apiserver.sh`), beside its kubeconfig.
fn control_plane_certs() -> PathBuf {
    Path::new(&crate::support::kube::kubeconfig()).parent().unwrap().join("certs")
}

/// The client certificate the test control plane's aggregator presents: the genuine front proxy.
pub(super) fn front_proxy_client() -> Pem {
    let certs = control_plane_certs();
    Pem { cert: certs.join("front-proxy-client.crt"), key: certs.join("front-proxy-client.key") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_identities_count_only_from_the_allowed_front_proxy() {
    tokio::task::block_in_place(install_crds);
    let ns = tokio::task::block_in_place(|| namespace("sec-front-proxy"));
    let viewer = tokio::task::block_in_place(|| {
        install_user_roles();
        kubectl_ok_in(&ns, &["create", "rolebinding", "alice", "--clusterrole", "bitsmith-viewer", "--user", "alice"]);
        kubectl_ok_in(
            &ns,
            &["create", "rolebinding", "readers", "--clusterrole", "bitsmith-viewer", "--group", "bitsmith-readers"],
        );
        service_account_with_role(&ns, "viewer", "bitsmith-viewer")
    });
    let certs = ClientCerts::new();
    let foreign_ca = certs.ca("foreign-ca", "bitsmith-test-front-proxy-ca");
    let genuine_ca = Pem {
        cert: control_plane_certs().join("front-proxy-ca.crt"),
        key: control_plane_certs().join("front-proxy-ca.key"),
    };
    // Another CA under the same name, with the allowed common name; and the right CA, with a name not allowed.
    let foreign = issue(&certs, &foreign_ca, "front-proxy-client");
    let intruder = issue(&certs, &genuine_ca, "intruder");
    let genuine = front_proxy_client();
    let docker = "apiVersion: bitsmith.dev/v1alpha1\nkind: Package\nmetadata:\n  name: image\nspec:\n  type: docker\n  image:\n    reference: nginx:1.27\n";
    let api = ApiProcess::start(&ns, docker, certs.serving_args()).await;
    let url = format!("{}/v3/packages/{}", api.base, api.uid("pkg/image"));

    let ask = |identity: Option<&Pem>, headers: &[(&str, &str)], token: Option<&str>| {
        let mut request = certs.client(identity).get(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    };
    let alice = [("X-Remote-User", "alice")];
    let masters = [("X-Remote-User", "mallory"), ("X-Remote-Group", "system:masters")];
    let not_authenticated = |(status, body): (StatusCode, Value), case: &str| {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
        assert_eq!(body["errors"][0]["title"], "CF-NotAuthenticated", "{case}");
    };
    not_authenticated(ask(None, &alice, None).await, "no client certificate");
    not_authenticated(ask(None, &masters, None).await, "no client certificate, a group");
    not_authenticated(ask(Some(&foreign), &alice, None).await, "a certificate from another CA");
    not_authenticated(ask(Some(&foreign), &masters, None).await, "a certificate from another CA, a group");
    not_authenticated(ask(Some(&intruder), &alice, None).await, "a common name not allowed");
    not_authenticated(ask(Some(&genuine), &[], None).await, "the proxy naming no user");

    // The genuine proxy's users and groups count, and are authorized as themselves.
    let (status, body) = ask(Some(&genuine), &alice, None).await;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("READY")), "{body}");
    let bob_reader = [("X-Remote-User", "bob"), ("X-Remote-Group", "bitsmith-readers")];
    assert_eq!(ask(Some(&genuine), &bob_reader, None).await.0, StatusCode::OK);
    assert_eq!(ask(Some(&genuine), &[("X-Remote-User", "bob")], None).await.0, StatusCode::FORBIDDEN);
    // An ignored certificate costs nothing else: a bearer token still counts.
    assert_eq!(ask(Some(&foreign), &masters, Some(&viewer)).await.0, StatusCode::OK);
}

fn kubectl_ok_in(ns: &str, args: &[&str]) {
    let mut all = args.to_vec();
    all.extend(["-n", ns]);
    kubectl_ok(&all, None);
}
