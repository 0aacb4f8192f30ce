//! Spec validation that the CRD schema cannot express on Kubernetes 1.20 (no CEL). Pure functions: an invalid
//! spec fails the same way every time, so callers treat these errors as permanent.

use crate::resources::{Checksum, DropletSpec, PackageSpec, PackageType, Refresh, Source, SourceKind, duration};

/// What is wrong with a spec, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spec: {field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError { field: field.to_string(), reason: reason.into() }
}

/// Check a Package spec.
pub fn package_spec(spec: &PackageSpec) -> Result<(), SpecError> {
    match spec.package_type {
        PackageType::Bits => {
            if spec.image.is_some() {
                return Err(invalid("spec.image", "only docker Packages have an image"));
            }
        }
        PackageType::Docker => {
            let image = spec.image.as_ref().ok_or_else(|| invalid("spec.image", "a docker Package needs an image"))?;
            image_reference(&image.reference).map_err(|reason| invalid("spec.image.reference", reason))?;
            if spec.source.is_some() || spec.checksum.is_some() {
                return Err(invalid("spec.source", "a docker Package has an image, not a source or checksum"));
            }
        }
    }
    if let Some(source) = &spec.source {
        source_spec(source)?;
    }
    if let Some(pin) = &spec.checksum {
        checksum_pin(pin)?;
    }
    fetch_timeout(spec.timeout.as_deref())?;
    refresh(&spec.refresh, spec.source.as_ref())
}

/// Check a Droplet spec.
pub fn droplet_spec(spec: &DropletSpec) -> Result<(), SpecError> {
    if let Some(source) = &spec.source {
        source_spec(source)?;
    }
    if let Some(pin) = &spec.checksum {
        checksum_pin(pin)?;
    }
    if let Some(package) = &spec.package_ref {
        object_name(&package.name).map_err(|reason| invalid("spec.packageRef.name", reason))?;
    }
    fetch_timeout(spec.timeout.as_deref())?;
    refresh(&spec.refresh, spec.source.as_ref())
}

/// `spec.interval`: at least a minute, and only for a source that can change under the same spec.
fn refresh(refresh: &Refresh, source: Option<&Source>) -> Result<(), SpecError> {
    let Some(text) = &refresh.interval else { return Ok(()) };
    duration::parse_interval(text).map_err(|reason| invalid("spec.interval", reason))?;
    match source.and_then(Source::kind) {
        Some(SourceKind::Http(_) | SourceKind::ObjectStore(_)) => Ok(()),
        _ => Err(invalid("spec.interval", "re-checks an http or objectStore source; this object has neither")),
    }
}

/// `spec.timeout`: a duration from one second to a day.
fn fetch_timeout(timeout: Option<&str>) -> Result<(), SpecError> {
    let Some(text) = timeout else { return Ok(()) };
    let bad = || invalid("spec.timeout", format!("{text:?} is not a duration from 1s to 24h, like 10m or 90s"));
    let duration = duration::parse(text).ok_or_else(bad)?;
    if duration < std::time::Duration::from_secs(1) || duration > std::time::Duration::from_secs(86_400) {
        return Err(bad());
    }
    Ok(())
}

fn source_spec(source: &Source) -> Result<(), SpecError> {
    match source.kind() {
        None => Err(invalid("spec.source", "set exactly one of http, objectStore or package")),
        Some(SourceKind::Http(http)) => {
            let url = url::Url::parse(&http.url).map_err(|e| invalid("spec.source.http.url", e.to_string()))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid("spec.source.http.url", "must be an http:// or https:// URL with a host"));
            }
            Ok(())
        }
        Some(SourceKind::ObjectStore(object)) => {
            let url =
                url::Url::parse(&object.url).map_err(|e| invalid("spec.source.objectStore.url", e.to_string()))?;
            if !matches!(url.scheme(), "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" | "file") {
                return Err(invalid("spec.source.objectStore.url", "must be an s3://, gs://, az:// or file:// URL"));
            }
            Ok(())
        }
        Some(SourceKind::Package(package)) => {
            object_name(&package.name).map_err(|reason| invalid("spec.source.package.name", reason))
        }
    }
}

fn checksum_pin(pin: &Checksum) -> Result<(), SpecError> {
    let len = pin.checksum_type.hex_len();
    if pin.value.len() != len || !pin.value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid(
            "spec.checksum.value",
            format!("a {} checksum is {len} lowercase hex digits", pin.checksum_type),
        ));
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn object_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a valid object name")) }
}

/// Check a container image reference: `[registry[:port]/]path[:tag][@algorithm:hex]`, per the distribution
/// reference grammar.
pub fn image_reference(reference: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{reference:?} is not an image reference: {why}"));
    if reference.is_empty() || reference.len() > 4096 {
        return bad("empty or too long");
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return bad("digest needs algorithm:hex");
        };
        let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if algorithm.is_empty()
            || !algorithm.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
            || !hex_ok
        {
            return bad("malformed digest");
        }
    }
    // A tag follows the last ':' only if that ':' comes after the last '/' (otherwise it is a registry port).
    let last_slash = name_tag.rfind('/');
    let (name, tag) = match name_tag.rfind(':') {
        Some(i) if last_slash.is_none_or(|s| i > s) => (&name_tag[..i], Some(&name_tag[i + 1..])),
        _ => (name_tag, None),
    };
    if let Some(tag) = tag {
        let valid = !tag.is_empty()
            && tag.len() <= 128
            && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !valid {
            return bad("malformed tag");
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && (components[0].contains(['.', ':']) || components[0] == "localhost") {
        let registry = components.remove(0);
        let (host, port) = registry.split_once(':').unwrap_or((registry, "0"));
        if host.is_empty()
            || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            || port.parse::<u16>().is_err()
        {
            return bad("malformed registry");
        }
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if components.is_empty() || !components.iter().all(|c| component_ok(c)) {
        return bad("repository path must be lowercase letters, digits and separators");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{ChecksumType, HttpSource, ImageSpec, PackageSourceRef};

    fn bits() -> PackageSpec {
        PackageSpec::bits(None)
    }

    #[test]
    fn image_references() {
        for ok in [
            "nginx",
            "library/nginx:1.27",
            "registry.example.com:5000/team/app:v1.2_3",
            "localhost/app",
            "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(image_reference(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Nginx", "app:", "app:-x", "reg.io:notaport/app", "app@sha256:xyz", "a//b", "/app"] {
            assert!(image_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources_need_exactly_one_valid_variant() {
        let mut spec = bits();
        spec.source = Some(Source::default());
        assert_eq!(package_spec(&spec).unwrap_err().field, "spec.source");
        spec.source = Some(Source {
            http: Some(HttpSource { url: "ftp://x/y".into(), ..Default::default() }),
            ..Default::default()
        });
        assert_eq!(package_spec(&spec).unwrap_err().field, "spec.source.http.url");
        spec.source =
            Some(Source { package: Some(PackageSourceRef { name: "Bad_Name".into() }), ..Default::default() });
        assert_eq!(package_spec(&spec).unwrap_err().field, "spec.source.package.name");
        spec.source =
            Some(Source { package: Some(PackageSourceRef { name: "good.name-1".into() }), ..Default::default() });
        assert_eq!(package_spec(&spec), Ok(()));
    }

    #[test]
    fn checksum_pins_and_docker_rules() {
        let mut spec = bits();
        spec.checksum = Some(Checksum { checksum_type: ChecksumType::Sha1, value: "abc".into() });
        assert_eq!(package_spec(&spec).unwrap_err().field, "spec.checksum.value");
        spec.checksum = Some(Checksum { checksum_type: ChecksumType::Sha1, value: "a".repeat(40) });
        assert_eq!(package_spec(&spec), Ok(()));
        let mut docker = bits();
        docker.package_type = PackageType::Docker;
        assert_eq!(package_spec(&docker).unwrap_err().field, "spec.image");
        docker.image = Some(ImageSpec { reference: "nginx:1".into(), pull_secret_ref: None });
        assert_eq!(package_spec(&docker), Ok(()));
    }

    #[test]
    fn fetch_timeouts_are_durations_from_a_second_to_a_day() {
        let mut spec = bits();
        for good in ["10m", "90s", "1h", "24h"] {
            spec.timeout = Some(good.into());
            assert!(package_spec(&spec).is_ok(), "{good}");
        }
        for bad in ["forever", "0s", "500ms", "25h", ""] {
            spec.timeout = Some(bad.into());
            let error = package_spec(&spec).unwrap_err().to_string();
            assert!(error.contains("spec.timeout"), "{bad}: {error}");
        }
    }

    #[test]
    fn intervals_need_a_minute_and_a_source_that_can_change() {
        let mut spec = bits();
        spec.refresh.interval = Some("10m".into());
        assert_eq!(package_spec(&spec).unwrap_err().field, "spec.interval", "no source");
        spec.source = Some(Source {
            http: Some(crate::resources::HttpSource { url: "https://example.com/a.zip".into(), ..Default::default() }),
            ..Default::default()
        });
        assert_eq!(package_spec(&spec), Ok(()));
        spec.refresh.interval = Some("30s".into());
        assert!(package_spec(&spec).unwrap_err().reason.contains("minimum of 1m"));
        spec.refresh.interval = Some("1m".into());
        spec.source = Some(Source { package: Some(PackageSourceRef { name: "other".into() }), ..Default::default() });
        assert!(package_spec(&spec).unwrap_err().reason.contains("http or objectStore"));
    }
}
