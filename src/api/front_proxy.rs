//! Requests that reach the API through the Kubernetes API server's aggregation layer. The aggregator has
//! authenticated the user already and names them in request headers (`X-Remote-User`, `X-Remote-Group`,
//! `X-Remote-Extra-*`). Those headers count only on a TLS connection whose client certificate chains to the
//! cluster's request-header CA and names an allowed proxy; everywhere else they are ignored.
//! The settings come from the cluster itself: the ConfigMap `kube-system/extension-apiserver-authentication`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::extract::connect_info::Connected;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::tls::{TlsError, TlsListener};
use crate::auth::Caller;

/// How the cluster's front proxy identifies itself and its users.
#[derive(Clone, Debug)]
pub struct FrontProxy {
    ca: Vec<CertificateDer<'static>>,
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
        let ca = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the request-header CA in kube-system/{CONFIG_MAP}: {e}"))?;
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
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone())?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))
    }

    /// The user the proxy vouches for, when `peer` is an allowed proxy and names one.
    fn caller(&self, peer: &PeerCert, headers: &HeaderMap) -> Option<Caller> {
        let name = subject_common_name(peer.0.as_ref()?)?;
        if !self.allowed_names.is_empty() && !self.allowed_names.contains(&name) {
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

/// The client certificate a connection presented and TLS verified, if any.
#[derive(Clone, Debug, Default)]
pub struct PeerCert(Option<CertificateDer<'static>>);

impl Connected<IncomingStream<'_, TlsListener>> for PeerCert {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, connection) = stream.io().get_ref();
        PeerCert(connection.peer_certificates().and_then(|chain| chain.first()).map(|c| c.clone().into_owned()))
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for PeerCert {
    fn connect_info(_: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        PeerCert(None)
    }
}

/// Who a request says it is: a bearer token to review, or a user the front proxy vouches for.
pub struct Credentials {
    pub authorization: Option<String>,
    pub proxied: Option<Caller>,
}

impl FromRequestParts<Arc<super::AppState>> for Credentials {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<super::AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<PeerCert>>().map(|c| &c.0);
        let proxied = match (&state.front_proxy, peer) {
            (Some(proxy), Some(peer)) => proxy.caller(peer, &parts.headers),
            _ => None,
        };
        let authorization = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(Credentials { authorization, proxied })
    }
}

/// The subject's common name of a DER certificate: TBSCertificate's sixth field (after an explicit version,
/// serial, signature algorithm, issuer and validity), read with a minimal DER walk.
fn subject_common_name(der: &[u8]) -> Option<String> {
    let (certificate, _) = tlv(der)?;
    let (tbs, _) = tlv(certificate.1)?;
    let mut rest = tbs.1;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (field, after) = tlv(rest)?;
        fields.push(field);
        rest = after;
    }
    let offset = usize::from(fields.first()?.0 == 0xa0); // the [0] version is optional
    let subject = fields.get(offset + 4)?;
    // Name: SEQUENCE OF SET OF SEQUENCE { OID, value }.
    let mut names = subject.1;
    while !names.is_empty() {
        let (set, after) = tlv(names)?;
        names = after;
        let (pair, _) = tlv(set.1)?;
        let (oid, value) = tlv(pair.1)?;
        if oid.0 == 0x06 && oid.1 == [0x55, 0x04, 0x03] {
            let (text, _) = tlv(value)?;
            return String::from_utf8(text.1.to_vec()).ok();
        }
    }
    None
}

/// A DER element: its tag and contents.
type Element<'a> = (u8, &'a [u8]);

/// One DER element, and the rest of the input.
fn tlv(input: &[u8]) -> Option<(Element<'_>, &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| ((tag, &rest[..len]), &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(subject_common_name(b"\x30\x03\x02\x01"), None, "truncated DER");
    }
}
