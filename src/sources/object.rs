//! The object-store source: an object in S3, GCS, Azure, or (where allowed) a local file.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::egress::GuardedResolver;
use super::options::{self, Origin};
use super::{OpenedSource, SecretData, SourceError, SourcePolicy, error_chain};
use crate::object_url::{self, CredentialPolicy, Scheme};
use crate::resources::{ObjectStoreSource, ResolvedSource};

/// Look the object up and open it as a stream of ranged reads. Every setting is checked against the allowlist
/// and every endpoint's address against the egress policy before the first request. With `known` (what an earlier
/// fetch read), `None` means the object's HEAD still describes that: the same ETag, or without ETags the same
/// size and modification time.
pub async fn open_object(
    spec: &ObjectStoreSource,
    secret: Option<&SecretData>,
    policy: &SourcePolicy,
    max_size: u64,
    known: Option<&ResolvedSource>,
) -> Result<Option<OpenedSource>, SourceError> {
    check_settings(spec, secret, policy).await?;
    let mut options: BTreeMap<String, String> = spec.options.clone();
    if let Some(endpoint) = &spec.endpoint {
        options.insert("endpoint".into(), endpoint.clone());
        // S3-compatible servers at their own endpoint (MinIO, Garage, Ceph) are addressed path-style.
        if url::Url::parse(&spec.url).ok().and_then(|u| Scheme::of(&u)) == Some(Scheme::S3) {
            options.entry("path_style".into()).or_insert_with(|| "true".into());
        }
    }
    if let Some(region) = &spec.region {
        options.insert("region".into(), region.clone());
    }
    let credentials = match secret {
        Some(secret) => {
            for key in secret.entries.keys() {
                options.insert(key.to_ascii_lowercase(), secret.text(key)?.unwrap_or_default());
            }
            CredentialPolicy::Options
        }
        None => CredentialPolicy::Anonymous,
    };
    let resolver = Arc::new(GuardedResolver(policy.egress.clone()));
    let client = object_url::connect(&spec.url, &options, credentials, Some(resolver)).map_err(|e| match e {
        object_url::ObjectUrlError::MissingCredentials { url, hint } => SourceError::InvalidCredentials {
            secret: secret.map(|s| s.name.clone()).unwrap_or_default(),
            reason: format!("no credentials for {url}: {hint}"),
        },
        other => SourceError::ObjectUrl(other),
    })?;
    let url = client.display_url.clone();
    match client.scheme {
        Scheme::File => check_file_allowed(&url, client.path.as_ref(), policy)?,
        Scheme::Memory => {
            return Err(SourceError::InvalidUrl { url, reason: "memory:// holds nothing to read from".into() });
        }
        Scheme::S3 | Scheme::Gcs | Scheme::Azure => {}
    }
    if client.path.as_ref().is_empty() {
        return Err(SourceError::InvalidUrl { url, reason: "the URL names a bucket but no object".into() });
    }
    let meta = client.store.head(&client.path).await.map_err(|e| read_error(&url, e))?;
    if meta.size > max_size {
        return Err(SourceError::TooLarge { url, size: meta.size, max: max_size });
    }
    let resolved = ResolvedSource {
        url: url.clone(),
        etag: meta.e_tag.clone(),
        last_modified: Some(meta.last_modified.to_rfc3339()),
        size: Some(meta.size),
    };
    if known.is_some_and(|known| unchanged(known, &resolved)) {
        return Ok(None);
    }
    let stream_url = url.clone();
    let stream = object_url::ranged_stream(client.store, client.path, 0..meta.size)
        .map_err(move |e| read_error(&stream_url, e))
        .boxed();
    Ok(Some(OpenedSource { stream, length: Some(meta.size), description: url, resolved }))
}

/// Whether a HEAD (`now`) describes the object an earlier fetch read (`known`).
fn unchanged(known: &ResolvedSource, now: &ResolvedSource) -> bool {
    match (&known.etag, &now.etag) {
        (Some(before), Some(after)) => before == after && known.size == now.size,
        _ => known.last_modified.is_some() && known.last_modified == now.last_modified && known.size == now.size,
    }
}

/// Refuse settings outside the backend's allowlist (wherever they are written) and endpoints sources may not
/// reach. An endpoint's name is resolved here so that a refusal is immediate; the resolver that every connection
/// of the client goes through checks it again when it connects.
async fn check_settings(
    spec: &ObjectStoreSource,
    secret: Option<&SecretData>,
    policy: &SourcePolicy,
) -> Result<(), SourceError> {
    let parsed = url::Url::parse(&spec.url)
        .map_err(|e| SourceError::InvalidUrl { url: spec.url.clone(), reason: e.to_string() })?;
    let Some(scheme) = Scheme::of(&parsed) else { return Ok(()) };
    let mut settings: Vec<(String, String, Origin)> =
        parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned(), Origin::UrlQuery)).collect();
    settings.extend(spec.options.iter().map(|(k, v)| (k.clone(), v.clone(), Origin::Spec)));
    settings.extend(spec.endpoint.iter().map(|e| ("endpoint".to_string(), e.clone(), Origin::Spec)));
    settings.extend(spec.region.iter().map(|r| ("region".to_string(), r.clone(), Origin::Spec)));
    if let Some(secret) = secret {
        for key in secret.entries.keys() {
            settings.push((key.clone(), secret.text(key)?.unwrap_or_default(), Origin::Secret));
        }
    }
    for (key, value, origin) in &settings {
        options::check(scheme, key, value, *origin, policy.options)?;
    }
    for (_, endpoint, _) in settings.iter().filter(|(key, _, _)| options::is_endpoint(scheme, key)) {
        check_endpoint(endpoint, policy).await?;
    }
    Ok(())
}

async fn check_endpoint(endpoint: &str, policy: &SourcePolicy) -> Result<(), SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUrl { url: endpoint.to_string(), reason: reason.to_string() };
    let url = url::Url::parse(endpoint).map_err(|e| invalid(&format!("endpoint: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid("an endpoint is an http(s) URL with a host"));
    }
    let shown = url.origin().ascii_serialization();
    let refused = |refusal| SourceError::Refused { url: shown.clone(), refusal };
    policy.egress.check_url(&url).map_err(refused)?;
    if let Some(url::Host::Domain(name)) = url.host() {
        policy.egress.resolve(name).await.map_err(|refusal| match refusal {
            super::EgressError::Resolve { detail, .. } => SourceError::Unreachable { url: shown.clone(), detail },
            refusal => refused(refusal),
        })?;
    }
    Ok(())
}

fn read_error(url: &str, error: object_store::Error) -> SourceError {
    if let Some(refusal) = SourceError::refusal_in(url, &error) {
        return refusal;
    }
    match error {
        object_store::Error::NotFound { .. } => SourceError::NotFound { url: url.to_string() },
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            SourceError::InvalidCredentials { secret: String::new(), reason: format!("{url}: {}", error_chain(&error)) }
        }
        other => SourceError::ObjectRead { url: url.to_string(), detail: error_chain(&other) },
    }
}

/// A file source must resolve (after symlinks and `..`) to a path under the policy's root.
fn check_file_allowed(url: &str, path: &str, policy: &SourcePolicy) -> Result<(), SourceError> {
    let Some(root) = &policy.file_root else {
        return Err(SourceError::FileNotAllowed { url: url.to_string(), allowed: "none".into() });
    };
    let file = std::path::Path::new("/").join(path);
    let resolved = match file.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::NotFound { url: url.to_string() });
        }
        Err(e) => {
            return Err(SourceError::ObjectRead { url: url.to_string(), detail: e.to_string() });
        }
    };
    let root = root.canonicalize().unwrap_or_else(|_| root.clone());
    if resolved.starts_with(&root) {
        Ok(())
    } else {
        Err(SourceError::FileNotAllowed { url: url.to_string(), allowed: root.display().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_unchanged_by_its_etag_or_else_by_time_and_size() {
        let seen = |etag: Option<&str>, modified: Option<&str>, size| ResolvedSource {
            url: "s3://b/k".into(),
            etag: etag.map(str::to_string),
            last_modified: modified.map(str::to_string),
            size: Some(size),
        };
        let known = seen(Some("\"1\""), Some("t1"), 5);
        assert!(unchanged(&known, &seen(Some("\"1\""), Some("t2"), 5)), "a copy in place keeps the ETag");
        assert!(!unchanged(&known, &seen(Some("\"2\""), Some("t1"), 5)));
        assert!(unchanged(&seen(None, Some("t1"), 5), &seen(None, Some("t1"), 5)));
        assert!(!unchanged(&seen(None, Some("t1"), 5), &seen(None, Some("t1"), 6)));
        assert!(!unchanged(&seen(None, None, 5), &seen(None, None, 5)), "nothing to compare: changed");
    }
}
