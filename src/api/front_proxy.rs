//! Requests that reach the API through the Kubernetes API server's aggregation layer. The aggregator has
//! authenticated the user already and names them in request headers (`X-Remote-User`, `X-Remote-Group`,
//! `X-Remote-Extra-*`). Those headers count only on a TLS connection whose client certificate chains to the
//! cluster's request-header CA and names an allowed proxy; everywhere else they are ignored.
//! The settings come from the cluster itself: the ConfigMap `kube-system/extension-apiserver-authentication`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;

use super::tls::{ClientCa, TlsError};
use crate::auth::Caller;

/// How the cluster's front proxy identifies itself and its users.
#[derive(Clone, Debug)]
pub struct FrontProxy {
    ca: ClientCa,
    /// Common names a proxy certificate may have; any, when empty.
    allowed_names: Vec<String>,
    user_headers: Vec<String>,
    group_headers: Vec<String>,
    extra_prefixes: Vec<String>,
}

const CONFIG_MAP: &str = "extension-apiserver-authentication";

impl FrontProxy {
    /// The cluster's settings, or `None` when it has no front proxy configured.
    pub async fn from_cluster(client: &Client) -> Result<Option<Self>, String> {
        let map = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
            .get_opt(CONFIG_MAP)
            .await
            .map_err(|e| format!("reading kube-system/{CONFIG_MAP}: {e}"))?;
        let data = map.and_then(|m| m.data).unwrap_or_default();
        let Some(pem) = data.get("requestheader-client-ca-file") else { return Ok(None) };
        let ca =
            ClientCa::from_pem(pem.as_bytes(), &format!("requestheader-client-ca-file in kube-system/{CONFIG_MAP}"))
                .map_err(|e| e.to_string())?;
        let list =
            |key: &str| -> Vec<String> { data.get(key).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default() };
        Ok(Some(FrontProxy {
            ca,
            allowed_names: list("requestheader-allowed-names"),
            user_headers: list("requestheader-username-headers"),
            group_headers: list("requestheader-group-headers"),
            extra_prefixes: list("requestheader-extra-headers-prefix"),
        }))
    }

    /// A verifier that asks clients for a certificate from the request-header CA, and lets clients without one
    /// in (they authenticate with a bearer token instead).
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        super::tls::client_verifier(&[&self.ca])
    }

    /// The request-header CA.
    pub fn ca(&self) -> &ClientCa {
        &self.ca
    }

    /// The subject common name of a client certificate chain that the request-header CA vouches for.
    pub(super) fn proxy_name(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        if !self.ca.verifies(chain) {
            return None;
        }
        let name = subject_common_name(chain.first()?);
        if name.is_none() {
            tracing::warn!("a client certificate from the request-header CA without a common name");
        }
        name
    }

    /// The user the proxy vouches for, when `peer` is an allowed proxy and names one.
    fn caller(&self, peer: &PeerCert, headers: &HeaderMap) -> Option<Caller> {
        let name = peer.front_proxy.as_ref()?;
        if !self.allowed_names.is_empty() && !self.allowed_names.contains(name) {
            tracing::warn!(name, "a client certificate from the request-header CA, but not an allowed proxy");
            return None;
        }
        let values = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .flat_map(|n| headers.get_all(n.as_str()))
                .filter_map(|v| v.to_str().ok())
                .map(str::to_string)
                .collect()
        };
        let username = values(&self.user_headers).into_iter().next().filter(|u| !u.is_empty())?;
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let lower = header.as_str();
            if let Some(key) = self.extra_prefixes.iter().find_map(|p| lower.strip_prefix(&p.to_ascii_lowercase()))
                && let Ok(value) = value.to_str()
            {
                let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy().into_owned();
                extra.entry(key).or_default().push(value.to_string());
            }
        }
        Some(Caller { username, uid: None, groups: values(&self.group_headers), extra })
    }
}

/// What a connection proves about its client, worked out once when it is accepted: from its client certificate,
/// verified against each CA on its own, and from the listener it came in on.
#[derive(Clone, Debug, Default)]
pub struct PeerCert {
    /// The subject common name of a certificate that chains to the cluster's request-header CA.
    pub(super) front_proxy: Option<String>,
    /// The upload-offloading proxy: a certificate from `--offload-client-ca`, or a connection to
    /// `--offload-listen`. Only it may name spooled files (`bits_path`).
    pub(super) offload: bool,
}

/// Who a request says it is: a bearer token to review, or a user the front proxy vouches for.
pub struct Credentials {
    pub authorization: Option<String>,
    pub proxied: Option<Caller>,
    /// The request came from the upload-offloading proxy.
    pub offload: bool,
}

impl FromRequestParts<Arc<super::AppState>> for Credentials {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<super::AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<PeerCert>();
        let proxied = match (&state.front_proxy, peer) {
            (Some(proxy), Some(peer)) => proxy.caller(peer, &parts.headers),
            _ => None,
        };
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(Credentials { authorization, proxied, offload: peer.is_some_and(|p| p.offload) })
    }
}

/// The subject's common name of a DER certificate, if it has one that is text.
fn subject_common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let name = certificate.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn common_names_are_read_from_the_subject_not_the_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/O=bitsmith/CN=front-proxy-client", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        assert_eq!(subject_common_name(&der).as_deref(), Some("front-proxy-client"));
        assert_eq!(subject_common_name(&CertificateDer::from(&b"\x30\x03\x02\x01"[..])), None, "truncated DER");
    }
}
