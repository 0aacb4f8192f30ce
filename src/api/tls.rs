//! Serving over TLS: a listener whose connections are already through the handshake. Handshakes run on tasks of
//! their own, with a deadline, so that a slow or silent client never holds up the others.
//!
//! Client certificates are asked for but never required: CF clients authenticate with bearer tokens. What a
//! certificate proves (the front proxy, the upload-offloading proxy) is worked out per connection against each
//! CA on its own ([`ClientCa::verifies`]), so that one CA's certificates never pass for another's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client CA {what}: {reason}")]
    ClientCa { what: String, reason: String },
}

/// A server configuration from PEM files: the certificate chain and its private key. With `clients`, client
/// certificates are asked for and verified by it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    clients: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<ServerConfig, TlsError> {
    let pem_error = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: cert.display().to_string(), reason: "no certificate in it".into() });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The CA of one kind of client certificate (the cluster's request-header CA, the offloading proxy's CA).
#[derive(Clone, Debug)]
pub struct ClientCa {
    roots: Vec<CertificateDer<'static>>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCa {
    /// The CA certificates in `pem`; `what` names them in errors.
    pub fn from_pem(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let error = |reason: String| TlsError::ClientCa { what: what.to_string(), reason };
        let roots =
            CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| error(e.to_string()))?;
        if roots.is_empty() {
            return Err(error("no certificate in it".into()));
        }
        let verifier = optional_client_auth(&roots).map_err(|e| error(e.to_string()))?;
        Ok(ClientCa { roots, verifier })
    }

    /// The CA certificates in the PEM file at `path`.
    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path)
            .map_err(|e| TlsError::Pem { path: path.display().to_string(), reason: e.to_string() })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Whether `chain` (the client's certificate first, then intermediates) chains to this CA and is valid for
    /// client authentication now. The TLS handshake already proved the client holds the certificate's key.
    pub fn verifies(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else { return false };
        self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok()
    }
}

/// Optional client authentication against `roots`: clients without a certificate are let in.
fn optional_client_auth(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))
}

/// The handshake's verifier for clients of any of `cas`. A certificate is asked for (naming the CAs) but never
/// required, and one that chains to none of them does not fail the handshake: the connection is then
/// anonymous, and its requests need a bearer token like anyone's. The client must still prove that it holds
/// the certificate's key.
pub fn client_verifier(cas: &[&ClientCa]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots: Vec<_> = cas.iter().flat_map(|ca| ca.roots.iter().cloned()).collect();
    Ok(Arc::new(AnyClientCert { inner: optional_client_auth(&roots)? }))
}

/// See [`client_verifier`].
#[derive(Debug)]
struct AnyClientCert {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Which CA, if any, vouches for the certificate is decided per connection; here it only must not end
        // the handshake of a client that also has a bearer token.
        if let Err(error) = self.inner.verify_client_cert(end_entity, intermediates, now) {
            tracing::debug!(%error, "a client certificate from no known CA: the connection is anonymous");
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The next connection on `listener`. Errors (out of file descriptors and the like) pause the loop instead of
/// spinning it or ending it.
pub(crate) async fn accept_tcp(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts TCP connections and yields them once their TLS handshake is done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Start accepting on `listener` (on the current runtime).
    pub fn new(listener: TcpListener, config: ServerConfig) -> Self {
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (done, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = accept_tcp(&listener).await;
                if done.is_closed() {
                    return;
                }
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = done.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready }
    }

    /// The next connection through its handshake.
    pub async fn accept(&mut self) -> (TlsStream<TcpStream>, SocketAddr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is gone, so this is never reached while serving.
            None => std::future::pending().await,
        }
    }
}
