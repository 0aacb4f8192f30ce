//! `bitsmith fetch`: the same pipeline on manifests, without a cluster. Secrets come from `kind: Secret`
//! documents among the inputs, and a `package` source names a Package fetched earlier in the same run.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::fetch::{Fetcher, Inputs};
use crate::pipeline::PipelineError;
use crate::resources::{BitsStatus, Droplet, Package, PackageType, Source};
use crate::sources::SecretData;
use crate::status::{self, CfState};
use crate::store::BlobOwner;
use crate::validate::{self, SpecError};

/// One document of the input.
#[derive(Clone, Debug)]
pub enum Manifest {
    Package(Box<Package>),
    Droplet(Box<Droplet>),
    Secret(Box<Secret>),
}

/// Why `fetch` stopped. Each names the document or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{origin}: {detail}")]
    Parse { origin: String, detail: String },
    #[error(
        "{origin}: document {index} is {kind}; fetch reads bitsmith.dev/v1alpha1 Package and Droplet, and v1 Secret"
    )]
    Unsupported {
        origin: String,
        index: usize,
        kind: String,
    },
    #[error("{object}: {source}")]
    Spec {
        object: String,
        #[source]
        source: SpecError,
    },
    #[error("{object}: Secret {secret:?} is not among the input documents")]
    MissingSecret { object: String, secret: String },
    #[error("{object}: {source}")]
    Pipeline {
        object: String,
        #[source]
        source: Box<PipelineError>,
    },
}

/// Parse a multi-document YAML text. `origin` names it in errors (a file name, or `-`).
pub fn parse_manifests(text: &str, origin: &str) -> Result<Vec<Manifest>, OfflineError> {
    let parse_error = |detail: String| OfflineError::Parse {
        origin: origin.to_string(),
        detail,
    };
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| parse_error(e.to_string().lines().next().unwrap_or("").to_string()))?;
    let mut manifests = Vec::new();
    for (index, doc) in documents
        .into_iter()
        .enumerate()
        .filter(|(_, d)| !d.is_null())
    {
        let api_version = doc
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind = doc
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let typed = |e: serde_json::Error| parse_error(format!("document {index} ({kind}): {e}"));
        let manifest = match (api_version.as_str(), kind.as_str()) {
            ("bitsmith.dev/v1alpha1", "Package") => {
                Manifest::Package(Box::new(serde_json::from_value(doc).map_err(typed)?))
            }
            ("bitsmith.dev/v1alpha1", "Droplet") => {
                Manifest::Droplet(Box::new(serde_json::from_value(doc).map_err(typed)?))
            }
            ("v1", "Secret") => {
                Manifest::Secret(Box::new(serde_json::from_value(doc).map_err(typed)?))
            }
            _ => {
                return Err(OfflineError::Unsupported {
                    origin: origin.to_string(),
                    index,
                    kind: format!("{api_version} {kind}"),
                });
            }
        };
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// Fetch every Package and Droplet in `manifests`, in order, and return them with their status filled in.
/// Stops at the first failure; blobs stored before it stay, as they would in a cluster.
pub async fn run(
    manifests: Vec<Manifest>,
    fetcher: &Fetcher,
    default_namespace: &str,
) -> Result<Vec<Manifest>, OfflineError> {
    let namespace_of = |ns: Option<String>| ns.unwrap_or_else(|| default_namespace.to_string());
    let mut secrets: BTreeMap<(String, String), SecretData> = BTreeMap::new();
    let mut packages: BTreeMap<(String, String), Package> = BTreeMap::new();
    let mut results = Vec::new();
    for manifest in manifests {
        match manifest {
            Manifest::Secret(secret) => {
                let key = (namespace_of(secret.namespace()), secret.name_any());
                secrets.insert(key, secret_data(&secret));
            }
            Manifest::Package(mut package) => {
                let namespace = namespace_of(package.namespace());
                package.metadata.namespace = Some(namespace.clone());
                let object = format!("package {namespace}/{}", package.name_any());
                validate::package_spec(&package.spec).map_err(|source| OfflineError::Spec {
                    object: object.clone(),
                    source,
                })?;
                let prev = package.status.clone().unwrap_or_default();
                let generation = package.metadata.generation;
                let now = Timestamp::now();
                let new_status = match (&package.spec.package_type, &package.spec.source) {
                    (PackageType::Docker, _) => {
                        let image = package
                            .spec
                            .image
                            .as_ref()
                            .map(|i| i.reference.as_str())
                            .unwrap_or_default();
                        status::done_without_bits(&prev, &format!("image {image}"), generation, now)
                    }
                    (PackageType::Bits, None) => status::awaiting_upload(&prev, generation, now),
                    (PackageType::Bits, Some(source)) => {
                        let owner = owner("packages", &namespace, &package.metadata);
                        let stored = fetch_one(
                            fetcher,
                            &object,
                            &owner,
                            &namespace,
                            source,
                            package.spec.checksum.as_ref(),
                            &secrets,
                            &packages,
                        )
                        .await?;
                        finished(&prev, stored, generation, now)
                    }
                };
                package.status = Some(new_status);
                packages.insert((namespace, package.name_any()), (*package).clone());
                results.push(Manifest::Package(package));
            }
            Manifest::Droplet(mut droplet) => {
                let namespace = namespace_of(droplet.namespace());
                droplet.metadata.namespace = Some(namespace.clone());
                let object = format!("droplet {namespace}/{}", droplet.name_any());
                validate::droplet_spec(&droplet.spec).map_err(|source| OfflineError::Spec {
                    object: object.clone(),
                    source,
                })?;
                let prev = droplet.status.clone().unwrap_or_default();
                let generation = droplet.metadata.generation;
                let now = Timestamp::now();
                let new_status = match &droplet.spec.source {
                    None => status::awaiting_upload(&prev, generation, now),
                    Some(source) => {
                        let owner = owner("droplets", &namespace, &droplet.metadata);
                        let stored = fetch_one(
                            fetcher,
                            &object,
                            &owner,
                            &namespace,
                            source,
                            droplet.spec.checksum.as_ref(),
                            &secrets,
                            &packages,
                        )
                        .await?;
                        finished(&prev, stored, generation, now)
                    }
                };
                droplet.status = Some(new_status);
                results.push(Manifest::Droplet(droplet));
            }
        }
    }
    Ok(results)
}

fn finished<S: CfState>(
    prev: &BitsStatus<S>,
    stored: crate::pipeline::Stored,
    generation: Option<i64>,
    now: Timestamp,
) -> BitsStatus<S> {
    status::done(
        prev,
        status::stored_digests(&stored.digests, stored.blob),
        generation,
        now,
    )
}

fn owner(plural: &'static str, namespace: &str, meta: &kube::api::ObjectMeta) -> BlobOwner {
    BlobOwner {
        plural,
        namespace: namespace.to_string(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn fetch_one(
    fetcher: &Fetcher,
    object: &str,
    owner: &BlobOwner,
    namespace: &str,
    source: &Source,
    pin: Option<&crate::resources::Checksum>,
    secrets: &BTreeMap<(String, String), SecretData>,
    packages: &BTreeMap<(String, String), Package>,
) -> Result<crate::pipeline::Stored, OfflineError> {
    let secret_name = source
        .http
        .as_ref()
        .and_then(|h| h.secret_ref.as_ref())
        .or(source
            .object_store
            .as_ref()
            .and_then(|o| o.secret_ref.as_ref()))
        .map(|r| r.name.clone());
    let secret = match secret_name {
        Some(name) => Some(
            secrets
                .get(&(namespace.to_string(), name.clone()))
                .ok_or_else(|| OfflineError::MissingSecret {
                    object: object.to_string(),
                    secret: name,
                })?,
        ),
        None => None,
    };
    let source_package = source
        .package
        .as_ref()
        .and_then(|p| packages.get(&(namespace.to_string(), p.name.clone())));
    fetcher
        .fetch(
            owner,
            source,
            pin,
            Inputs {
                secret,
                source_package,
            },
        )
        .await
        .map_err(|source| OfflineError::Pipeline {
            object: object.to_string(),
            source: Box::new(source),
        })
}

/// A Secret's `data` and `stringData`, decoded.
pub fn secret_data(secret: &Secret) -> SecretData {
    let mut entries: BTreeMap<String, Vec<u8>> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    entries.extend(
        secret
            .string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    SecretData {
        name: secret.name_any(),
        entries,
    }
}

/// The results as a multi-document YAML stream.
pub fn to_yaml(manifests: &[Manifest]) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for manifest in manifests {
        out.push_str("---\n");
        out.push_str(&match manifest {
            Manifest::Package(p) => yaml(p.as_ref())?,
            Manifest::Droplet(d) => yaml(d.as_ref())?,
            Manifest::Secret(s) => yaml(s.as_ref())?,
        });
    }
    Ok(out)
}

fn yaml<T: Serialize>(value: &T) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(value)
}
