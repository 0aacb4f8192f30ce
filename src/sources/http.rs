//! The http(s) source: a streaming download with timeouts, a redirect limit, auth from a Secret, a custom CA,
//! and an early refusal of anything announced as too large.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH};

use super::egress::{Egress, GuardedResolver};
use super::{OpenedSource, SecretData, SourceError, error_chain};
use crate::resources::{HttpSource, ResolvedSource};

/// Timeouts and limits for http sources.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// How long to wait for a connection (including the TLS handshake).
    pub connect_timeout: Duration,
    /// How long a read may wait for the next bytes; a stalled server is cut off after this.
    pub read_timeout: Duration,
    /// Redirects followed before giving up.
    pub max_redirects: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            max_redirects: 10,
        }
    }
}

/// Opens http sources. Holds one shared client; sources with their own CA get a client of their own. Every
/// client resolves names through `egress` and checks each redirect with it.
#[derive(Clone, Debug)]
pub struct HttpFetcher {
    options: HttpOptions,
    egress: Arc<Egress>,
    shared: reqwest::Client,
}

/// Headers only a cloud metadata service wants: a source that sends one is trying to talk to it.
const METADATA_HEADERS: &[&str] = &["metadata-flavor", "metadata", "x-google-metadata-request"];
const METADATA_HEADER_PREFIX: &str = "x-aws-ec2-metadata-token";

impl HttpFetcher {
    pub fn new(options: HttpOptions, egress: Arc<Egress>) -> Result<Self, SourceError> {
        let shared =
            client(&options, &egress, Vec::new()).map_err(|e| SourceError::HttpClient { detail: error_chain(&e) })?;
        Ok(HttpFetcher { options, egress, shared })
    }

    /// Send the request and check the answer; the body is streamed by the returned source. With `known` (what an
    /// earlier fetch read) the request is conditional, and `None` means the server still serves that (304).
    pub async fn open(
        &self,
        spec: &HttpSource,
        secret: Option<&SecretData>,
        max_size: u64,
        known: Option<&ResolvedSource>,
    ) -> Result<Option<OpenedSource>, SourceError> {
        let url = parse_url(&spec.url)?;
        let shown = redacted(&url);
        self.egress.check_url(&url).map_err(|refusal| SourceError::Refused { url: shown.clone(), refusal })?;
        let auth = HttpAuth::from_secret(secret)?;
        // A CA comes from the Secret or from the spec's caBundle; a bad one is blamed on where it came from.
        let bad_ca = |reason: String| SourceError::InvalidCredentials {
            secret: secret.map(|s| s.name.clone()).unwrap_or_else(|| "caBundle".into()),
            reason,
        };
        let mut certs = Vec::new();
        for pem in spec.ca_bundle.iter().map(|s| s.as_bytes().to_vec()).chain(auth.ca.clone()) {
            let invalid = |detail: String| bad_ca(format!("CA bundle: {detail}"));
            let parsed = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| invalid(error_chain(&e)))?;
            if parsed.is_empty() {
                return Err(invalid("holds no PEM certificate".into()));
            }
            certs.extend(parsed);
        }
        let client = if certs.is_empty() {
            self.shared.clone()
        } else {
            client(&self.options, &self.egress, certs)
                .map_err(|e| bad_ca(format!("CA bundle rejected: {}", error_chain(&e))))?
        };

        let mut headers = HeaderMap::new();
        for h in &spec.headers {
            let (name, value) =
                header(&h.name, &h.value).map_err(|reason| SourceError::InvalidUrl { url: shown.clone(), reason })?;
            headers.append(name, value);
        }
        for (name, value) in &auth.headers {
            let (name, value) = header(name, value).map_err(|reason| SourceError::InvalidCredentials {
                secret: secret.map(|s| s.name.clone()).unwrap_or_default(),
                reason,
            })?;
            headers.insert(name, value);
        }
        if let Some(known) = known {
            // The source's own validators, sent back as they came; one that is not a valid header value is skipped.
            let validators = [(IF_NONE_MATCH, &known.etag), (IF_MODIFIED_SINCE, &known.last_modified)];
            for (name, value) in validators {
                if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                    headers.insert(name, value);
                }
            }
        }
        let mut request = client.get(url.clone()).headers(headers);
        request = match &auth.scheme {
            Some(Auth::Basic { username, password }) => request.basic_auth(username, Some(password)),
            Some(Auth::Bearer(token)) => request.bearer_auth(token),
            None => request,
        };

        let response = request.send().await.map_err(|e| classify(&shown, &e, self.options.max_redirects))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_MODIFIED && known.is_some() {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(SourceError::HttpStatus { url: shown, status: status.as_u16() });
        }
        let length = response.content_length();
        if let Some(size) = length.filter(|&n| n > max_size) {
            return Err(SourceError::TooLarge { url: shown, size, max: max_size });
        }
        let text = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let resolved = ResolvedSource {
            url: redacted(response.url()),
            etag: text(reqwest::header::ETAG),
            last_modified: text(reqwest::header::LAST_MODIFIED),
            size: length,
        };
        let max_redirects = self.options.max_redirects;
        let stream_url = shown.clone();
        let stream = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| classify(&stream_url, &e, max_redirects)))
            .boxed();
        Ok(Some(OpenedSource { stream, length, description: shown, resolved }))
    }
}

fn client(
    options: &HttpOptions,
    egress: &Arc<Egress>,
    extra_roots: Vec<reqwest::Certificate>,
) -> reqwest::Result<reqwest::Client> {
    let max_redirects = options.max_redirects;
    let redirect_egress = egress.clone();
    // A redirect to a literal address never reaches the resolver: check it here.
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max_redirects {
            return attempt.error(TooManyRedirects);
        }
        match redirect_egress.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refusal) => attempt.error(refusal),
        }
    });
    let mut builder = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .redirect(redirects)
        .dns_resolver(Arc::new(GuardedResolver(egress.clone())))
        // Connections go straight to the source, so that the address checks are about the source.
        .no_proxy()
        .user_agent(concat!("bitsmith/", env!("CARGO_PKG_VERSION")));
    if !extra_roots.is_empty() {
        builder = builder.tls_certs_merge(extra_roots);
    }
    builder.build()
}

#[derive(Debug, thiserror::Error)]
#[error("too many redirects")]
struct TooManyRedirects;

fn parse_url(raw: &str) -> Result<url::Url, SourceError> {
    let url =
        url::Url::parse(raw).map_err(|e| SourceError::InvalidUrl { url: raw.to_string(), reason: e.to_string() })?;
    match url.scheme() {
        "http" | "https" if url.host_str().is_some() => Ok(url),
        "http" | "https" => Err(SourceError::InvalidUrl { url: raw.to_string(), reason: "no host".into() }),
        other => Err(SourceError::InvalidUrl {
            url: raw.to_string(),
            reason: format!("scheme {other:?} is not http or https"),
        }),
    }
}

/// The URL without user info, which may hold a password.
fn redacted(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))?;
    if name == AUTHORIZATION {
        return Err("set credentials in the Secret as username/password or bearerToken, not as a header".into());
    }
    if METADATA_HEADERS.contains(&name.as_str()) || name.as_str().starts_with(METADATA_HEADER_PREFIX) {
        return Err(format!("header {name} is meant for cloud metadata services, which sources may not reach"));
    }
    let mut value = HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Turn a reqwest error into a source error a user can act on.
fn classify(url: &str, error: &reqwest::Error, max_redirects: usize) -> SourceError {
    let detail = error_chain(error);
    let url = url.to_string();
    if let Some(refusal) = SourceError::refusal_in(&url, error) {
        return refusal;
    }
    if error.is_redirect() {
        SourceError::TooManyRedirects { url, limit: max_redirects }
    } else if error.is_timeout() {
        SourceError::Timeout { url, detail }
    } else if is_tls(error) {
        SourceError::Tls { url, detail }
    } else if error.is_connect() {
        SourceError::Unreachable { url, detail }
    } else if error.is_body() || error.is_decode() {
        SourceError::Interrupted { url, detail }
    } else {
        SourceError::Unreachable { url, detail }
    }
}

/// Whether a rustls error is among the causes. The connector wraps it in layers of `io::Error` and boxed errors
/// whose types vary between versions, so this looks at each cause's type and, as a fallback, at rustls's own
/// wording ("invalid peer certificate", "received corrupt message", …).
fn is_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        let io_inner = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if e.downcast_ref::<rustls::Error>().is_some()
            || io_inner.is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        let text = e.to_string();
        if ["invalid peer certificate", "received corrupt message", "peer is incompatible", "handshake"]
            .iter()
            .any(|needle| text.contains(needle))
        {
            return true;
        }
        current = e.source();
    }
    false
}

enum Auth {
    Basic { username: String, password: String },
    Bearer(String),
}

/// What a Secret says about an http request.
#[derive(Default)]
struct HttpAuth {
    scheme: Option<Auth>,
    ca: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
}

impl HttpAuth {
    fn from_secret(secret: Option<&SecretData>) -> Result<Self, SourceError> {
        let Some(secret) = secret else {
            return Ok(HttpAuth::default());
        };
        let invalid =
            |reason: &str| SourceError::InvalidCredentials { secret: secret.name.clone(), reason: reason.into() };
        let username = secret.text("username")?;
        let password = secret.text("password")?;
        let token = secret.text("bearerToken")?;
        let scheme = match (username, password, token) {
            (Some(username), Some(password), None) => Some(Auth::Basic { username, password }),
            (None, None, Some(token)) => Some(Auth::Bearer(token.trim().to_string())),
            (None, None, None) => None,
            (Some(_), None, _) => return Err(invalid("has username but no password")),
            (None, Some(_), _) => return Err(invalid("has password but no username")),
            (Some(_), Some(_), Some(_)) => {
                return Err(invalid("has both username/password and bearerToken: keep one"));
            }
        };
        let mut headers = Vec::new();
        for key in secret.entries.keys() {
            if let Some(name) = key.strip_prefix("header.") {
                headers.push((name.to_string(), secret.text(key)?.unwrap_or_default()));
            }
        }
        let ca = secret.entries.get("ca.crt").cloned();
        if scheme.is_none() && headers.is_empty() && ca.is_none() {
            return Err(invalid("has none of username/password, bearerToken, ca.crt or header.<Name>"));
        }
        Ok(HttpAuth { scheme, ca, headers })
    }
}
