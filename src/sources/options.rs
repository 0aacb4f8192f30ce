//! Which object-store settings a Package may give its source. Every setting a tenant writes (in
//! `spec.source.objectStore.options`, in the URL's query, or as an entry of the Secret it names) reaches
//! object_store's credential code, which can read files, call token and metadata endpoints, use proxies and
//! skip TLS verification on the controller's behalf. So each backend has an allowlist: what says where the
//! object is and static credentials given as content. Everything else is refused, naming the key, before any
//! connection is made. Keys are parsed by the backend's own parser first, so an alias cannot slip past.

use object_store::ClientConfigKey;
use object_store::aws::AmazonS3ConfigKey as S3;
use object_store::azure::AzureConfigKey as Azure;
use object_store::gcp::GoogleConfigKey as Gcs;

use crate::object_url::Scheme;

/// Where a setting came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `spec.source.objectStore.options`, `endpoint` or `region`.
    Spec,
    /// The query of `spec.source.objectStore.url`.
    UrlQuery,
    /// An entry of the Secret `secretRef` names.
    Secret,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Spec => "spec.source.objectStore",
            Origin::UrlQuery => "the source URL's query",
            Origin::Secret => "the Secret",
        })
    }
}

/// A setting sources may not use; the message names the key, never its value (which may be a secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("option {key:?} in {origin} {reason}")]
pub struct RefusedOption {
    pub key: String,
    pub origin: Origin,
    pub reason: &'static str,
}

/// What sources may do beyond the allowlist, as the installer decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionPolicy {
    /// `credentials=ambient`: the controller's own cloud identity (`--allow-ambient-source-credentials`).
    pub allow_ambient_credentials: bool,
}

const FILE: &str = "names a file on the controller's disk, which sources may not read";
const IDENTITY: &str = "names a token, identity or metadata endpoint, which sources may not use";
const AMBIENT: &str = "asks for the controller's own cloud identity, which sources may not use unless the installer \
                       allows it (--allow-ambient-source-credentials)";
const PROXY: &str = "sets a proxy, which sources may not use";
const TLS: &str = "turns off TLS verification, which sources may not do";
const NOT_FOR_SOURCES: &str = "is not a setting sources may use (allowed: bucket location, endpoint, region, path \
                               style, and static credentials given as content)";
const BUCKET: &str = "names a bucket or container, which the source URL already does";
const BAD_REGION: &str = "must be a region name: lowercase letters, digits and dashes";
const BAD_ACCOUNT: &str = "must be a storage account name: 3 to 24 lowercase letters and digits";
const BAD_BOOL: &str = "must be true or false";

/// Check one setting of an object-store source. `key` is as written (any case); endpoints are checked for
/// their address separately, by the caller, once all settings are known.
pub fn check(
    scheme: Scheme,
    key: &str,
    value: &str,
    origin: Origin,
    policy: OptionPolicy,
) -> Result<(), RefusedOption> {
    let key_lower = key.to_ascii_lowercase();
    let refuse = |reason| Err(RefusedOption { key: key.to_string(), origin, reason });
    // Settings of bitsmith's own, the same for every backend.
    match key_lower.as_str() {
        "credentials" if value == "ambient" && policy.allow_ambient_credentials => return Ok(()),
        "credentials" if value == "ambient" => return refuse(AMBIENT),
        "credentials" => return refuse("may only be \"ambient\""),
        "path_style" if scheme == Scheme::S3 => return if is_bool(value) { Ok(()) } else { refuse(BAD_BOOL) },
        // GCS calls its endpoint the base URL; `endpoint` is accepted as an alias of it.
        "endpoint" if scheme == Scheme::Gcs => return Ok(()),
        _ => {}
    }
    let verdict = match scheme {
        Scheme::S3 => key_lower.parse::<S3>().map(|k| s3(&k, &key_lower, value)),
        Scheme::Gcs => key_lower.parse::<Gcs>().map(|k| gcs(&k)),
        Scheme::Azure => key_lower.parse::<Azure>().map(|k| azure(&k, value)),
        Scheme::File | Scheme::Memory => return refuse("applies to no setting of a file source"),
    };
    match verdict {
        Ok(None) => Ok(()),
        Ok(Some(reason)) => refuse(reason),
        Err(_) => refuse("is not a setting of this object store"),
    }
}

/// Whether a key (already accepted by [`check`]) holds an endpoint URL, whose address must be checked.
pub fn is_endpoint(scheme: Scheme, key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    match scheme {
        Scheme::S3 => matches!(key.parse::<S3>(), Ok(S3::Endpoint | S3::S3Endpoint)),
        Scheme::Gcs => key == "endpoint" || matches!(key.parse::<Gcs>(), Ok(Gcs::BaseUrl)),
        Scheme::Azure => matches!(key.parse::<Azure>(), Ok(Azure::Endpoint)),
        Scheme::File | Scheme::Memory => false,
    }
}

fn s3(key: &S3, key_lower: &str, value: &str) -> Option<&'static str> {
    match key {
        S3::AccessKeyId | S3::SecretAccessKey | S3::Token | S3::Endpoint | S3::S3Endpoint => None,
        S3::Region | S3::DefaultRegion => (!is_region(value)).then_some(BAD_REGION),
        S3::VirtualHostedStyleRequest | S3::UnsignedPayload | S3::SkipSignature | S3::RequestPayer => {
            (!is_bool(value)).then_some(BAD_BOOL)
        }
        S3::Checksum => None,
        // The key that reads an object encrypted with a customer key (SSE-C) is content, like any other key.
        S3::Encryption(_) if key_lower.ends_with("sse_customer_key_base64") => None,
        S3::WebIdentityTokenFile | S3::ContainerAuthorizationTokenFile => Some(FILE),
        S3::RoleArn
        | S3::RoleSessionName
        | S3::StsEndpoint
        | S3::MetadataEndpoint
        | S3::ImdsV1Fallback
        | S3::ContainerCredentialsRelativeUri
        | S3::ContainerCredentialsFullUri => Some(IDENTITY),
        S3::Bucket => Some(BUCKET),
        S3::Client(client) => client_setting(client),
        _ => Some(NOT_FOR_SOURCES),
    }
}

fn gcs(key: &Gcs) -> Option<&'static str> {
    match key {
        // The key itself (JSON content), never a path to one.
        Gcs::ServiceAccountKey | Gcs::BearerToken | Gcs::BaseUrl | Gcs::SkipSignature => None,
        Gcs::ServiceAccount | Gcs::ApplicationCredentials => Some(FILE),
        Gcs::Bucket => Some(BUCKET),
        Gcs::Client(client) => client_setting(client),
        _ => Some(NOT_FOR_SOURCES),
    }
}

fn azure(key: &Azure, value: &str) -> Option<&'static str> {
    match key {
        Azure::AccessKey | Azure::SasKey | Azure::Token | Azure::Endpoint => None,
        Azure::AccountName => (!is_account(value)).then_some(BAD_ACCOUNT),
        Azure::SkipSignature => (!is_bool(value)).then_some(BAD_BOOL),
        Azure::FederatedTokenFile => Some(FILE),
        Azure::ClientId
        | Azure::ClientSecret
        | Azure::AuthorityId
        | Azure::AuthorityHost
        | Azure::MsiEndpoint
        | Azure::ObjectId
        | Azure::MsiResourceId
        | Azure::UseAzureCli
        | Azure::UseFabricEndpoint
        | Azure::FabricTokenServiceUrl
        | Azure::FabricWorkloadHost
        | Azure::FabricSessionToken
        | Azure::FabricClusterIdentifier
        | Azure::CredentialType
        | Azure::UseEmulator => Some(IDENTITY),
        Azure::ContainerName => Some(BUCKET),
        Azure::Client(client) => client_setting(client),
        _ => Some(NOT_FOR_SOURCES),
    }
}

/// Of the http client's settings, sources may only ask for plain http (to an endpoint that is checked anyway).
fn client_setting(key: &ClientConfigKey) -> Option<&'static str> {
    match key {
        ClientConfigKey::AllowHttp => None,
        ClientConfigKey::ProxyUrl | ClientConfigKey::ProxyCaCertificate | ClientConfigKey::ProxyExcludes => Some(PROXY),
        ClientConfigKey::AllowInvalidCertificates | ClientConfigKey::NoSystemCertificates => Some(TLS),
        _ => Some(NOT_FOR_SOURCES),
    }
}

fn is_bool(value: &str) -> bool {
    matches!(value.to_ascii_lowercase().as_str(), "true" | "false")
}

fn is_region(value: &str) -> bool {
    (1..=64).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_account(value: &str) -> bool {
    (3..=24).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSED: OptionPolicy = OptionPolicy { allow_ambient_credentials: false };

    fn refused(scheme: Scheme, key: &str, value: &str) -> Option<&'static str> {
        check(scheme, key, value, Origin::Spec, CLOSED).err().map(|e| e.reason)
    }

    #[test]
    fn location_and_static_credentials_are_allowed() {
        for (scheme, key, value) in [
            (Scheme::S3, "aws_access_key_id", "AK"),
            (Scheme::S3, "AWS_SECRET_ACCESS_KEY", "SK"),
            (Scheme::S3, "aws_session_token", "T"),
            (Scheme::S3, "region", "eu-west-1"),
            (Scheme::S3, "endpoint", "https://minio.example.com"),
            (Scheme::S3, "path_style", "true"),
            (Scheme::S3, "aws_allow_http", "true"),
            (Scheme::S3, "aws_sse_customer_key_base64", "a2V5"),
            (Scheme::Gcs, "google_service_account_key", "{}"),
            (Scheme::Gcs, "endpoint", "https://gcs.example.com"),
            (Scheme::Azure, "azure_storage_account_name", "acct"),
            (Scheme::Azure, "azure_storage_account_key", "a2V5"),
            (Scheme::Azure, "azure_storage_sas_key", "sv=1&sig=x"),
            (Scheme::Azure, "endpoint", "https://acct.blob.example.com"),
        ] {
            assert_eq!(refused(scheme, key, value), None, "{scheme:?} {key}");
        }
    }

    #[test]
    fn files_identity_endpoints_proxies_and_tls_bypass_are_refused_by_any_alias() {
        for (scheme, key, reason) in [
            (Scheme::S3, "aws_web_identity_token_file", FILE),
            (Scheme::S3, "web_identity_token_file", FILE),
            (Scheme::S3, "aws_role_arn", IDENTITY),
            (Scheme::S3, "aws_endpoint_url_sts", IDENTITY),
            (Scheme::S3, "aws_metadata_endpoint", IDENTITY),
            (Scheme::S3, "aws_container_credentials_full_uri", IDENTITY),
            (Scheme::S3, "aws_container_authorization_token_file", FILE),
            (Scheme::S3, "aws_proxy_url", PROXY),
            (Scheme::S3, "proxy_url", PROXY),
            (Scheme::S3, "aws_allow_invalid_certificates", TLS),
            (Scheme::S3, "aws_timeout", NOT_FOR_SOURCES),
            (Scheme::Gcs, "google_service_account", FILE),
            (Scheme::Gcs, "service_account_path", FILE),
            (Scheme::Gcs, "google_application_credentials", FILE),
            (Scheme::Azure, "azure_federated_token_file", FILE),
            (Scheme::Azure, "azure_authority_host", IDENTITY),
            (Scheme::Azure, "azure_msi_endpoint", IDENTITY),
            (Scheme::Azure, "azure_client_id", IDENTITY),
            (Scheme::Azure, "azure_use_azure_cli", IDENTITY),
            (Scheme::Azure, "azure_proxy_url", PROXY),
        ] {
            assert_eq!(refused(scheme, key, "x"), Some(reason), "{scheme:?} {key}");
        }
    }

    #[test]
    fn ambient_credentials_need_the_installer() {
        assert_eq!(refused(Scheme::S3, "credentials", "ambient"), Some(AMBIENT));
        let open = OptionPolicy { allow_ambient_credentials: true };
        assert!(check(Scheme::S3, "credentials", "ambient", Origin::UrlQuery, open).is_ok());
        assert!(check(Scheme::S3, "credentials", "other", Origin::UrlQuery, open).is_err());
    }

    #[test]
    fn values_that_shape_a_host_name_are_checked() {
        // A region or account name lands in a host name: `@`, `/` or `#` there would move the request elsewhere.
        assert_eq!(refused(Scheme::S3, "region", "x.evil@169.254.169.254#"), Some(BAD_REGION));
        assert_eq!(refused(Scheme::Azure, "account_name", "a@127.0.0.1"), Some(BAD_ACCOUNT));
        assert_eq!(refused(Scheme::S3, "path_style", "maybe"), Some(BAD_BOOL));
        assert_eq!(refused(Scheme::Gcs, "region", "eu"), Some("is not a setting of this object store"));
    }

    #[test]
    fn messages_name_the_key_and_never_the_value() {
        let err = check(Scheme::S3, "aws_role_arn", "arn:secret-value", Origin::Secret, CLOSED).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("aws_role_arn") && text.contains("the Secret"), "{text}");
        assert!(!text.contains("secret-value"), "{text}");
    }

    #[test]
    fn endpoints_are_recognised_by_alias() {
        assert!(is_endpoint(Scheme::S3, "aws_endpoint_url"));
        assert!(is_endpoint(Scheme::S3, "endpoint"));
        assert!(is_endpoint(Scheme::Gcs, "google_base_url"));
        assert!(is_endpoint(Scheme::Gcs, "endpoint"));
        assert!(is_endpoint(Scheme::Azure, "azure_storage_endpoint"));
        assert!(!is_endpoint(Scheme::S3, "region"));
    }
}
